//! A model package ready to run: its network cut into parts
//! ([`crate::model`]) and the tract plans built from them
//! ([`crate::prefix`]): the dense prefix, the suffix run densely (the dense
//! baseline's second half), and the original network's suffix when the
//! package carries one. Everything of the cut is read through the package.

use crate::answer::Reader;
use crate::model::{CutModel, Manifest};
use crate::prefix::TractNet;
use anyhow::{Context, Result};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use tract_onnx::pb::ModelProto;

/// A loaded, validated model package with its tract plans.
pub struct ModelPackage {
    /// The network, cut.
    pub model: CutModel,
    /// The dense prefix in tract.
    pub prefix: TractNet,
    /// The suffix run densely in tract (the dense baseline's second half).
    pub dense_suffix: TractNet,
    /// The original network's layers after the cut, when the manifest names
    /// one (`dense_model`).
    pub original_suffix: Option<TractNet>,
    /// How the outputs are read: a classifier's logits, or a detector's maps.
    pub reader: Reader,
}

/// A package is its cut network, with runtimes: `m.plan`, `m.cut`,
/// `m.manifest` read the cut.
impl Deref for ModelPackage {
    type Target = CutModel;

    fn deref(&self) -> &CutModel {
        &self.model
    }
}

/// The cut's parts the runtimes do not depend on (the energy layer's spec,
/// say) may be changed in place.
impl DerefMut for ModelPackage {
    fn deref_mut(&mut self) -> &mut CutModel {
        &mut self.model
    }
}

impl ModelPackage {
    /// Loads a package folder holding `manifest.json` and its ONNX file.
    pub fn load(dir: impl AsRef<Path>) -> Result<ModelPackage> {
        ModelPackage::load_sized(dir, None)
    }

    /// Loads a package, a detector's at another input size (`(W, H)`)
    /// when one is given ([`CutModel::load_sized`]).
    pub fn load_sized(dir: impl AsRef<Path>, size: Option<(usize, usize)>) -> Result<ModelPackage> {
        let dir = dir.as_ref();
        let model = CutModel::load_sized(dir, size)?;
        let package = crate::panics::catch(
            || format!("model package {}", dir.display()),
            || ModelPackage::build(model),
        )?;
        package.check_readable()?;
        Ok(package)
    }

    /// Fails unless an answer can be read from the outputs the way the
    /// manifest says (a package loaded from a folder must be readable).
    fn check_readable(&self) -> Result<()> {
        let what = || format!("model {}", self.origin.display());
        self.reader.check_readable().with_context(what)?;
        if let Some(o) = &self.manifest.output {
            let outputs = &self.cut.graph_outputs;
            anyhow::ensure!(
                *outputs == [o.name.clone()],
                "{}: the manifest's output.name is '{}', the graph's output is {}",
                what(),
                o.name,
                outputs.join(", ")
            );
        }
        Ok(())
    }

    /// Validates and cuts an ONNX model and builds its plans; `origin` names
    /// it in errors.
    pub fn from_proto(
        proto: ModelProto,
        manifest: Manifest,
        origin: &Path,
    ) -> Result<ModelPackage> {
        let model = CutModel::from_proto(proto, manifest, origin)?;
        crate::panics::catch(
            || format!("model {}", origin.display()),
            || ModelPackage::build(model),
        )
    }

    /// Builds the tract plans of a cut network.
    pub fn build(model: CutModel) -> Result<ModelPackage> {
        let what = || format!("model {}", model.origin.display());
        let reader =
            Reader::new(&model.manifest, &model.plan.output_shapes()).with_context(what)?;
        let prefix =
            TractNet::from_image(&model.prefix_proto, &model.manifest.input.shape, "prefix")
                .with_context(what)?;
        let cut = &model.cut;
        let features = cut.shape();
        let dense_suffix =
            TractNet::new(&model.suffix_proto, &features, "dense suffix").with_context(what)?;
        let original_suffix = match &model.baseline {
            Some(b) => Some(
                TractNet::new(&b.suffix_proto, &features, "original suffix")
                    .with_context(|| format!("dense_model {}", b.origin.display()))?,
            ),
            None => None,
        };
        Ok(ModelPackage {
            model,
            prefix,
            dense_suffix,
            original_suffix,
            reader,
        })
    }

    /// The dense baseline's layers after the cut: the original network's when
    /// the package carries one, else the package's own with every token kept.
    pub fn baseline_suffix(&self) -> &TractNet {
        self.original_suffix.as_ref().unwrap_or(&self.dense_suffix)
    }
}

impl std::fmt::Debug for ModelPackage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.model.fmt(f)
    }
}
