//! Evaluations of the claims behind ERSM, on a user's model and images:
//! token deletion by ranking (`deletion`) and content-driven sparsity
//! (`sparsity`). Each image is analysed once (prefix, energies, dense
//! logits); the evaluations then re-run only the sparse suffix.

pub mod deletion;
pub mod occlusion;
pub mod sparsity;

use crate::ersm::cpu::gather;
use crate::ersm::{FeatureMap, TokenMask};
use crate::pipeline::{Pipeline, PrefixMaps};
use crate::source::{self, images, Frame, SourceOptions, Uri};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// One image, analysed: its cut features, energies and dense prediction.
pub struct Analysed {
    pub name: String,
    /// The prefix's maps: `C × H × W` features at the cut, and any map the
    /// suffix reads beside them.
    pub maps: PrefixMaps,
    pub mask: TokenMask,
    pub dense_logits: Vec<f32>,
    /// On a stream (`--track`): the sparse outputs and tokens per level,
    /// computed in frame order as the mask depends on the frame before.
    pub tracked: Option<(Vec<f32>, Vec<usize>)>,
}

impl Analysed {
    /// Runs the prefix, the energy layer and the dense suffix on one image.
    pub fn of(p: &Pipeline, frame: &Frame) -> Result<Analysed> {
        p.threads.install(|| Self::on_threads(p, frame))
    }

    fn on_threads(p: &Pipeline, frame: &Frame) -> Result<Analysed> {
        let input = p.preprocess(frame)?;
        let m = &p.model;
        let maps = p.features(&input)?;
        let (mask, tracked) = if p.tracking() {
            let (mask, logits, tokens) = p.tracked(&maps)?;
            (mask, Some((logits, tokens)))
        } else {
            let fmap = FeatureMap::new(&maps.features, m.cut.c, m.cut.h, m.cut.w)?;
            let mask = p
                .device()
                .compute(fmap, &m.energy)
                .context("energy layer")?;
            (mask, None)
        };
        let dense_logits = p.dense_logits(&maps)?;
        Ok(Analysed {
            name: frame.name.clone(),
            maps,
            mask,
            dense_logits,
            tracked,
        })
    }

    /// Logits of the sparse suffix with exactly `kept` tokens (ascending).
    pub fn logits_with(&self, p: &Pipeline, kept: &[u32]) -> Result<Vec<f32>> {
        Ok(self.suffix_with(p, kept)?.0)
    }

    /// The sparse suffix with exactly `kept` tokens (ascending): its logits
    /// and the active tokens at each level.
    pub fn suffix_with(&self, p: &Pipeline, kept: &[u32]) -> Result<(Vec<f32>, Vec<usize>)> {
        let m = &p.model;
        let fmap = FeatureMap::new(&self.maps.features, m.cut.c, m.cut.h, m.cut.w)?;
        p.threads
            .install(|| p.sparse_suffix(kept, gather(fmap, kept), self.maps.taps.clone()))
    }
}

/// Softmax probabilities.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// Hands `f` the frames an evaluation runs on, one at a time, so a long
/// video is never held whole: every image of each image file or folder, and
/// every `every`-th frame (the first included) of each video. An input that
/// cannot be read is reported (the error names it) and left out, and so are
/// the rest of a video that breaks mid-stream; the reports are returned.
pub fn for_each_input(
    paths: &[PathBuf],
    every: usize,
    mut f: impl FnMut(Frame),
) -> Result<Vec<String>> {
    anyhow::ensure!(every >= 1, "--every must be at least 1");
    let mut failed = Vec::new();
    let mut any = false;
    for path in paths {
        if path.is_dir() || images::is_image(path) {
            failed.extend(images::for_each(&images::list(path)?, |frame| {
                any = true;
                f(frame)
            }));
            continue;
        }
        let mut video = source::open(&Uri::File(path.clone()), &SourceOptions::default())?;
        let mut index = 0usize;
        loop {
            match video.next_frame() {
                Ok(Some(frame)) => {
                    if index.is_multiple_of(every) {
                        any = true;
                        f(frame);
                    }
                    index += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    let msg = format!("{e:#}");
                    log::warn!("skipping the rest of {}: {msg}", path.display());
                    failed.push(msg);
                    break;
                }
            }
        }
        anyhow::ensure!(index > 0, "video {}: no frame decoded", path.display());
    }
    anyhow::ensure!(any, "no input frame could be decoded");
    Ok(failed)
}

/// Every input frame, decoded and held (occlusion pastes one frame into
/// another); see [`for_each_input`].
pub fn load_inputs(paths: &[PathBuf], every: usize) -> Result<(Vec<Frame>, Vec<String>)> {
    let mut frames = Vec::new();
    let failed = for_each_input(paths, every, |f| frames.push(f))?;
    Ok((frames, failed))
}

/// Analyses every input frame as it is decoded; only the analysis is kept.
/// A frame that cannot be read or analysed is reported (the error names it)
/// and left out; the rest are evaluated.
pub fn analyse_inputs(
    p: &Pipeline,
    paths: &[PathBuf],
    every: usize,
) -> Result<(Vec<Analysed>, Vec<String>)> {
    let bar = progress(0, "analysing");
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    let mut analyse = |frame: Frame| {
        match Analysed::of(p, &frame) {
            Ok(a) => ok.push(a),
            Err(e) => {
                let msg = format!("image {}: {e:#}", frame.name);
                bar.suspend(|| log::warn!("skipping: {msg}"));
                bad.push(msg);
            }
        }
        bar.inc(1);
    };
    let mut failed = if p.tracking() {
        // Each input is its own stream: the last frame of one says nothing
        // about the first of the next.
        let mut failed = Vec::new();
        for path in paths {
            p.new_stream();
            failed.extend(for_each_input(
                std::slice::from_ref(path),
                every,
                &mut analyse,
            )?);
        }
        failed
    } else {
        for_each_input(paths, every, analyse)?
    };
    bar.finish_and_clear();
    failed.extend(bad);
    anyhow::ensure!(!ok.is_empty(), "no input frame could be evaluated");
    Ok((ok, failed))
}

/// A progress bar on a terminal, hidden otherwise; `len` 0 counts up
/// without a bar, for a total not known in advance.
pub fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(if len == 0 {
            "{msg} {pos} {elapsed}"
        } else {
            "{msg} {bar:30} {pos}/{len} {elapsed}"
        })
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}
