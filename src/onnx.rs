//! Reading the ONNX protobuf: attributes, initializers, and sub-graphs cut from it.

use anyhow::{bail, ensure, Context, Result};
use std::collections::{HashMap, HashSet};
use tract_onnx::pb::ModelProto;
use tract_onnx::pb::{self, attribute_proto::AttributeType, NodeProto};
use tract_onnx::prelude::{Datum, Framework, InferenceFact, InferenceModelExt, Tensor, TypedModel};

/// A short label for a node in error messages: `Conv node 'b1.dw'`.
pub fn label(node: &NodeProto) -> String {
    format!("{} node '{}'", node.op_type, node_name(node))
}

/// The node's name, or its first output when it has none.
pub fn node_name(node: &NodeProto) -> &str {
    if node.name.is_empty() {
        node.output.first().map(String::as_str).unwrap_or("?")
    } else {
        &node.name
    }
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// A float attribute, or `default`.
pub fn attr_f32(node: &NodeProto, name: &str, default: Option<f32>) -> Result<f32> {
    match attr(node, name) {
        Some(a) if a.r#type == AttributeType::Float as i32 && !a.f.is_finite() => bail!(
            "{}: attribute '{name}' is {}, must be a finite number",
            label(node),
            a.f
        ),
        Some(a) if a.r#type == AttributeType::Float as i32 => Ok(a.f),
        Some(a) if a.r#type == AttributeType::Int as i32 => Ok(a.i as f32),
        Some(_) => bail!("{}: attribute '{name}' must be a float", label(node)),
        None => default.with_context(|| format!("{}: missing attribute '{name}'", label(node))),
    }
}

/// An int attribute, or `default`.
pub fn attr_i64(node: &NodeProto, name: &str, default: Option<i64>) -> Result<i64> {
    match attr(node, name) {
        Some(a) if a.r#type == AttributeType::Int as i32 => Ok(a.i),
        Some(_) => bail!("{}: attribute '{name}' must be an int", label(node)),
        None => default.with_context(|| format!("{}: missing attribute '{name}'", label(node))),
    }
}

/// An ints attribute, or `None` when absent.
pub fn attr_ints(node: &NodeProto, name: &str) -> Result<Option<Vec<i64>>> {
    match attr(node, name) {
        Some(a) if a.r#type == AttributeType::Ints as i32 => Ok(Some(a.ints.clone())),
        Some(_) => bail!("{}: attribute '{name}' must be a list of ints", label(node)),
        None => Ok(None),
    }
}

/// A string attribute, or `None` when absent.
pub fn attr_str(node: &NodeProto, name: &str) -> Result<Option<String>> {
    match attr(node, name) {
        Some(a) if a.r#type == AttributeType::String as i32 => {
            Ok(Some(String::from_utf8_lossy(&a.s).into_owned()))
        }
        Some(_) => bail!("{}: attribute '{name}' must be a string", label(node)),
        None => Ok(None),
    }
}

/// The padding of a 2-D Conv (top, left, bottom, right): its `pads`, or none
/// for `auto_pad` VALID. Dilated convs and the SAME modes are refused.
pub fn conv_pads(node: &NodeProto) -> Result<[usize; 4]> {
    if let Some(d) = attr_ints(node, "dilations")? {
        ensure!(
            d.iter().all(|&v| v == 1),
            "dilated convs are not supported, dilations {d:?}"
        );
    }
    let auto_pad = attr_str(node, "auto_pad")?.unwrap_or_else(|| "NOTSET".into());
    let pads = match auto_pad.as_str() {
        "NOTSET" => attr_ints(node, "pads")?.unwrap_or(vec![0; 4]),
        "VALID" => vec![0; 4],
        other => bail!("auto_pad {other} is not supported; export explicit pads"),
    };
    match pads.as_slice() {
        &[t, l, b, r] if pads.iter().all(|&p| p >= 0) => {
            Ok([t as usize, l as usize, b as usize, r as usize])
        }
        _ => bail!("pads must be 4 non-negative values, got {pads:?}"),
    }
}

/// ONNX element types tract cannot load (it panics on them): STRING,
/// COMPLEX64, COMPLEX128, BFLOAT16, and codes ONNX does not define.
fn unloadable(data_type: i32) -> Option<&'static str> {
    match data_type {
        8 => Some("STRING"),
        14 => Some("COMPLEX64"),
        15 => Some("COMPLEX128"),
        16 => Some("BFLOAT16"),
        1..=13 => None,
        _ => Some("an unknown element type"),
    }
}

/// Refuses initializers and `Constant` values whose element type tract
/// cannot load, naming them, before tract sees the graph.
pub fn check_tensor_types(graph: &pb::GraphProto) -> Result<()> {
    let constants = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Constant")
        .filter_map(|n| {
            attr(n, "value")
                .and_then(|a| a.t.as_ref())
                .map(|t| (label(n), t.data_type))
        });
    let initializers = graph
        .initializer
        .iter()
        .map(|t| (format!("initializer '{}'", t.name), t.data_type));
    for (what, dt) in initializers.chain(constants) {
        if let Some(kind) = unloadable(dt) {
            bail!("{what} has element type {kind} (code {dt}), which ersm cannot load");
        }
    }
    Ok(())
}

/// Checks the manifest's input shape against the shape the ONNX graph declares
/// for its input: every dimension the graph fixes must match (symbolic or
/// absent dimensions take the manifest's).
pub fn check_declared_shape(input: &pb::ValueInfoProto, shape: &[usize]) -> Result<()> {
    use pb::tensor_shape_proto::dimension::Value;
    let Some(dims) = input
        .r#type
        .as_ref()
        .and_then(|t| t.value.as_ref())
        .and_then(|pb::type_proto::Value::TensorType(t)| t.shape.as_ref())
        .map(|s| &s.dim)
    else {
        return Ok(());
    };
    ensure!(
        dims.len() == shape.len(),
        "graph input '{}' has {} dimensions, the manifest's input.shape {shape:?} has {}",
        input.name,
        dims.len(),
        shape.len()
    );
    for (i, (d, &m)) in dims.iter().zip(shape).enumerate() {
        if let Some(Value::DimValue(v)) = d.value {
            ensure!(
                v <= 0 || v as u64 == m as u64,
                "graph input '{}' is declared with dimension {i} = {v}, the manifest's input.shape {shape:?} says {m}",
                input.name
            );
        }
    }
    Ok(())
}

/// The graph's constant tensors: initializers and `Constant` nodes.
pub struct Constants {
    map: HashMap<String, Tensor>,
}

impl Constants {
    /// Loads every initializer and `Constant` node value of `graph`.
    pub fn load(graph: &pb::GraphProto, model_dir: Option<&str>) -> Result<Constants> {
        let resolver = tract_onnx::data_resolver::MmapDataResolver;
        let mut map = HashMap::new();
        for t in &graph.initializer {
            let tensor = tract_onnx::tensor::load_tensor(&resolver, t, model_dir)
                .with_context(|| format!("initializer '{}'", t.name))?;
            map.insert(t.name.clone(), tensor);
        }
        for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
            let value = attr(node, "value")
                .and_then(|a| a.t.as_ref())
                .with_context(|| {
                    format!(
                        "{}: only tensor 'value' constants are supported",
                        label(node)
                    )
                })?;
            let tensor = tract_onnx::tensor::load_tensor(&resolver, value, model_dir)
                .with_context(|| label(node))?;
            for out in &node.output {
                map.insert(out.clone(), tensor.clone());
            }
        }
        let consts = Constants { map };
        consts.check_finite()?;
        Ok(consts)
    }

    /// Refuses a floating-point constant holding NaN or an infinity, naming it:
    /// such a weight would make every frame's result NaN.
    fn check_finite(&self) -> Result<()> {
        let mut names: Vec<&String> = self.map.keys().collect();
        names.sort();
        for name in names {
            let t = &self.map[name];
            if !t.datum_type().is_float() {
                continue;
            }
            let v = t
                .cast_to::<f32>()
                .with_context(|| format!("constant '{name}'"))?;
            let v = v.to_plain_array_view::<f32>()?;
            if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                bail!("constant '{name}' holds {x} at index {i}: weights must be finite");
            }
        }
        Ok(())
    }

    /// True when `name` is a constant.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The constant's shape.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.map.get(name).map(|t| t.shape())
    }

    /// The constant as f32 values (cast from any numeric type), row-major.
    pub fn f32s(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .map
            .get(name)
            .with_context(|| format!("'{name}' is not a constant"))?;
        let t = t
            .cast_to::<f32>()
            .with_context(|| format!("constant '{name}' is not numeric"))?;
        Ok(t.to_plain_array_view::<f32>()?.iter().copied().collect())
    }

    /// The constant as i64 values.
    pub fn i64s(&self, name: &str) -> Result<Vec<i64>> {
        let t = self
            .map
            .get(name)
            .with_context(|| format!("'{name}' is not a constant"))?;
        let t = t
            .cast_to::<i64>()
            .with_context(|| format!("constant '{name}' is not an integer"))?;
        Ok(t.to_plain_array_view::<i64>()?.iter().copied().collect())
    }
}

/// Splits `graph` at tensor `cut`: the nodes that compute it (graph order) and
/// every other node.
pub fn split_at<'a>(
    graph: &'a pb::GraphProto,
    cut: &str,
) -> (Vec<&'a NodeProto>, Vec<&'a NodeProto>) {
    let before = ancestors(graph, &[cut]);
    let names: HashSet<&str> = before.iter().map(|n| node_name(n)).collect();
    let after = graph
        .node
        .iter()
        .filter(|n| !names.contains(node_name(n)))
        .collect();
    (before, after)
}

/// The nodes needed to compute `outputs` from the graph inputs and constants,
/// in graph order.
pub fn ancestors<'a>(graph: &'a pb::GraphProto, outputs: &[&str]) -> Vec<&'a NodeProto> {
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut needed = HashSet::new();
    let mut stack: Vec<&str> = outputs.to_vec();
    while let Some(t) = stack.pop() {
        if let Some(&i) = producer.get(t) {
            if needed.insert(i) {
                stack.extend(
                    graph.node[i]
                        .input
                        .iter()
                        .map(String::as_str)
                        .filter(|s| !s.is_empty()),
                );
            }
        }
    }
    graph
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| needed.contains(i))
        .map(|(_, n)| n)
        .collect()
}

/// A model holding `nodes` of `base`'s graph with the given inputs and outputs,
/// and only the initializers those nodes read.
pub fn subgraph(
    base: &pb::ModelProto,
    nodes: Vec<NodeProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: &[&str],
) -> pb::ModelProto {
    let graph = base.graph.as_ref().expect("checked at load");
    let used: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let initializer = graph
        .initializer
        .iter()
        .filter(|t| used.contains(t.name.as_str()))
        .cloned()
        .collect();
    let output = outputs
        .iter()
        .map(|o| pb::ValueInfoProto {
            name: o.to_string(),
            ..Default::default()
        })
        .collect();
    pb::ModelProto {
        graph: Some(pb::GraphProto {
            name: graph.name.clone(),
            node: nodes,
            initializer,
            input: inputs,
            output,
            ..Default::default()
        }),
        ..base.clone_without_graph()
    }
}

/// A float tensor value-info of fixed shape, for a cut graph's new input.
pub fn float_input(name: &str, shape: &[usize]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = shape
        .iter()
        .map(|&d| Dimension {
            value: Some(Value::DimValue(d as i64)),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Cloning a model without its (large) graph.
pub trait CloneWithoutGraph {
    /// Everything but the graph.
    fn clone_without_graph(&self) -> pb::ModelProto;
}

impl CloneWithoutGraph for pb::ModelProto {
    fn clone_without_graph(&self) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: self.ir_version,
            opset_import: self.opset_import.clone(),
            producer_name: self.producer_name.clone(),
            producer_version: self.producer_version.clone(),
            domain: self.domain.clone(),
            model_version: self.model_version,
            doc_string: self.doc_string.clone(),
            graph: None,
            ..Default::default()
        }
    }
}

/// `proto` typed by tract with its first input of shape `input_shape` (other
/// inputs keep the shapes the graph declares), before optimisation; `what`
/// names the graph in errors.
pub fn typed(proto: &ModelProto, input_shape: &[usize], what: &str) -> Result<TypedModel> {
    let mut model = tract_onnx::onnx()
        .model_for_proto_model(proto)
        .with_context(|| format!("{what}: tract could not parse the graph"))?;
    model
        .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), input_shape))
        .with_context(|| format!("{what}: setting input shape {input_shape:?}"))?;
    model
        .into_typed()
        .with_context(|| format!("{what}: tract could not type the graph (shapes or ops)"))
}

/// The shape of `proto`'s first output for an input of `input_shape`.
pub fn output_shape(proto: &ModelProto, input_shape: &[usize], what: &str) -> Result<Vec<usize>> {
    let mut shapes = output_shapes(proto, input_shape, what)?;
    ensure!(!shapes.is_empty(), "{what}: the graph has no output");
    Ok(shapes.swap_remove(0))
}

/// The concrete shape of every output of `proto` for an input of `input_shape`.
pub fn output_shapes(
    proto: &ModelProto,
    input_shape: &[usize],
    what: &str,
) -> Result<Vec<Vec<usize>>> {
    let typed = typed(proto, input_shape, what)?;
    (0..typed.outputs.len())
        .map(|i| {
            Ok(typed
                .output_fact(i)?
                .shape
                .as_concrete()
                .with_context(|| format!("{what}: output {i}'s shape is not concrete"))?
                .to_vec())
        })
        .collect()
}
