//! Shared test support: a small ONNX graph builder, random networks that cover
//! every op of the sparse executor, and the dense-masked reference run.
#![allow(dead_code)]

pub mod masked;

use ersm::model::manifest::{InputSpec, Manifest, Preprocess};
use ersm::package::ModelPackage;
use ersm::prefix::TractNet;
use ersm::sparse::StrideRule;
use masked::reference;
use std::ffi::OsStr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use tract_onnx::pb::{
    self, attribute_proto::AttributeType, AttributeProto, NodeProto, TensorProto,
};

/// A path under the system temp dir, named for the test file, the case and
/// this process, and removed (file or folder) when dropped, also when the
/// test fails: a suite run leaves nothing behind in /tmp.
pub struct Scratch(PathBuf);

impl Scratch {
    /// A path nothing exists at yet (a stale one from a reused pid is removed).
    pub fn path(file: &str, name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("ersm-{file}-{}-{name}", std::process::id()));
        remove(&p);
        Scratch(p)
    }
    /// An empty folder.
    pub fn dir(file: &str, name: &str) -> Scratch {
        let s = Scratch::path(file, name);
        std::fs::create_dir_all(&s.0).unwrap();
        s
    }
}

fn remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).ok(),
        Ok(_) => std::fs::remove_file(p).ok(),
        Err(_) => None,
    };
}

impl Drop for Scratch {
    fn drop(&mut self) {
        remove(&self.0);
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<OsStr> for Scratch {
    fn as_ref(&self) -> &OsStr {
        self.0.as_os_str()
    }
}

/// xorshift64*: deterministic, dependency-free randomness for tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }
    /// Uniform integer in [lo, hi].
    pub fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
    pub fn normals(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.range(-1.732, 1.732) * std).collect()
    }
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}
pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// Builds a graph node by node, naming tensors after their nodes.
pub struct Builder {
    pub nodes: Vec<NodeProto>,
    pub inits: Vec<TensorProto>,
    pub rng: Rng,
    count: usize,
}

impl Builder {
    pub fn new(seed: u64) -> Builder {
        Builder {
            nodes: vec![],
            inits: vec![],
            rng: Rng::new(seed),
            count: 0,
        }
    }

    pub fn init(&mut self, name: &str, dims: &[usize], data: Vec<f32>) -> String {
        assert_eq!(dims.iter().product::<usize>(), data.len());
        self.inits.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: data,
            ..Default::default()
        });
        name.into()
    }

    pub fn init_i64(&mut self, name: &str, data: Vec<i64>) -> String {
        self.inits.push(TensorProto {
            name: name.into(),
            dims: vec![data.len() as i64],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: data,
            ..Default::default()
        });
        name.into()
    }

    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.count += 1;
        let name = format!("{}{}", op.to_lowercase(), self.count);
        self.nodes.push(NodeProto {
            name: name.clone(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.clone()],
            attribute: attrs,
            ..Default::default()
        });
        name
    }

    /// Conv with random weights and bias; `pads` top, left, bottom, right.
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        x: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pads: [usize; 4],
        groups: usize,
    ) -> String {
        let fan = (cin / groups * k * k) as f32;
        let w = self
            .rng
            .normals(cout * cin / groups * k * k, (2.0 / fan).sqrt());
        let b = self.rng.normals(cout, 0.1);
        let n = self.count + 1;
        let wn = self.init(&format!("w{n}"), &[cout, cin / groups, k, k], w);
        let bn = self.init(&format!("b{n}"), &[cout], b);
        let attrs = vec![
            attr_ints("kernel_shape", &[k as i64, k as i64]),
            attr_ints("strides", &[stride as i64, stride as i64]),
            attr_ints("pads", &pads.map(|p| p as i64)),
            attr_int("group", groups as i64),
        ];
        self.op("Conv", &[x, &wn, &bn], attrs)
    }

    /// A transposed conv with kernel and stride `k` and no padding (the
    /// upsampling of FPN necks), with a bias or not.
    pub fn conv_transpose(&mut self, x: &str, cin: usize, cout: usize, k: usize) -> String {
        let w = self
            .rng
            .normals(cin * cout * k * k, (2.0 / cin as f32).sqrt());
        let n = self.count + 1;
        let wn = self.init(&format!("wt{n}"), &[cin, cout, k, k], w);
        let attrs = vec![
            attr_ints("kernel_shape", &[k as i64, k as i64]),
            attr_ints("strides", &[k as i64, k as i64]),
        ];
        if self.rng.coin() {
            let b = self.rng.normals(cout, 0.1);
            let bn = self.init(&format!("bt{n}"), &[cout], b);
            self.op("ConvTranspose", &[x, &wn, &bn], attrs)
        } else {
            self.op("ConvTranspose", &[x, &wn], attrs)
        }
    }

    pub fn bn(&mut self, x: &str, c: usize) -> String {
        let n = self.count + 1;
        let g: Vec<f32> = (0..c).map(|_| self.rng.range(0.5, 1.5)).collect();
        let b = self.rng.normals(c, 0.1);
        let m = self.rng.normals(c, 0.1);
        let v: Vec<f32> = (0..c).map(|_| self.rng.range(0.5, 1.5)).collect();
        let ins = [
            self.init(&format!("g{n}"), &[c], g),
            self.init(&format!("be{n}"), &[c], b),
            self.init(&format!("m{n}"), &[c], m),
            self.init(&format!("v{n}"), &[c], v),
        ];
        self.op(
            "BatchNormalization",
            &[x, &ins[0], &ins[1], &ins[2], &ins[3]],
            vec![attr_float("epsilon", 1e-5)],
        )
    }

    pub fn act(&mut self, x: &str) -> String {
        match self.rng.int(0, 4) {
            0 => self.op("Relu", &[x], vec![]),
            1 => {
                let n = self.count + 1;
                let lo = self.init(&format!("lo{n}"), &[], vec![0.0]);
                let hi = self.init(&format!("hi{n}"), &[], vec![6.0]);
                self.op("Clip", &[x, &lo, &hi], vec![])
            }
            2 => self.op("Sigmoid", &[x], vec![]),
            3 => self.op(
                "HardSigmoid",
                &[x],
                vec![attr_float("alpha", 0.2), attr_float("beta", 0.5)],
            ),
            _ => self.op("HardSwish", &[x], vec![]),
        }
    }

    /// Wraps the graph into a model: one input, one output, the ersm opset.
    pub fn model(self, input: (&str, &[usize]), output: &str) -> pb::ModelProto {
        self.model_outputs(input, &[output])
    }

    /// Wraps the graph into a model with one input and several outputs.
    pub fn model_outputs(self, input: (&str, &[usize]), outputs: &[&str]) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![
                pb::OperatorSetIdProto {
                    domain: String::new(),
                    version: 14,
                },
                pb::OperatorSetIdProto {
                    domain: "ersm".into(),
                    version: 1,
                },
            ],
            graph: Some(pb::GraphProto {
                name: "random".into(),
                node: self.nodes,
                initializer: self.inits,
                input: vec![ersm::onnx::float_input(input.0, input.1)],
                output: outputs
                    .iter()
                    .map(|o| pb::ValueInfoProto {
                        name: o.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The energy node: linear head on `c` channels.
pub fn energy(
    b: &mut Builder,
    x: &str,
    c: usize,
    lambda: f32,
    steps: i64,
    neighbourhood: i64,
) -> String {
    let w = b.rng.normals(c, 1.0 / (c as f32).sqrt());
    let wn = b.init("ersm.w", &[1, c, 1, 1], w);
    let bn = b.init("ersm.b", &[1], vec![0.0]);
    let out = b.op(
        "EnergyMask",
        &[x, &wn, &bn],
        vec![
            attr_float("lambda", lambda),
            attr_float("tau", 1.0),
            attr_int("steps", steps),
            attr_int("neighbourhood", neighbourhood),
        ],
    );
    b.nodes.last_mut().unwrap().domain = "ersm".into();
    out
}

/// A gate (a second energy node, inside the suffix) on token map `x` of `c`
/// channels: a random linear head of zero bias (about half the map's
/// energies negative), `steps` mean-field steps.
pub fn gate(b: &mut Builder, x: &str, c: usize, steps: i64) -> String {
    let tag = format!("gate{}", b.count);
    let w = b.rng.normals(c, 1.0 / (c as f32).sqrt());
    let wn = b.init(&format!("{tag}.w"), &[1, c, 1, 1], w);
    let bn = b.init(&format!("{tag}.b"), &[1], vec![0.0]);
    let out = b.op(
        "EnergyMask",
        &[x, &wn, &bn],
        vec![
            attr_float("lambda", 0.3),
            attr_float("tau", 1.0),
            attr_int("steps", steps),
            attr_int("neighbourhood", 8),
        ],
    );
    b.nodes.last_mut().unwrap().domain = "ersm".into();
    out
}

/// Sets (or replaces) one attribute of the energy node.
pub fn set_energy_attr(proto: &mut pb::ModelProto, attr: AttributeProto) {
    let node = proto
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.op_type == "EnergyMask")
        .unwrap();
    node.attribute.retain(|a| a.name != attr.name);
    node.attribute.push(attr);
}

/// Sets the energy node's `stride_rule` attribute ("any" or "centre").
pub fn with_stride_rule(mut proto: pb::ModelProto, rule: &str) -> pb::ModelProto {
    set_energy_attr(
        &mut proto,
        AttributeProto {
            name: "stride_rule".into(),
            r#type: AttributeType::String as i32,
            s: rule.as_bytes().to_vec(),
            ..Default::default()
        },
    );
    proto
}

/// The energy node's `fills` attribute holding `tensors`.
pub fn fills_attr(tensors: Vec<TensorProto>) -> AttributeProto {
    AttributeProto {
        name: "fills".into(),
        r#type: AttributeType::Tensors as i32,
        tensors,
        ..Default::default()
    }
}

/// A fill vector as the `fills` attribute holds it: FLOAT, named after its tensor.
pub fn fill_tensor(name: &str, v: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![v.len() as i64],
        data_type: 1,
        float_data: v,
        ..Default::default()
    }
}

/// Sets the energy node's `fills` attribute: one named float tensor per entry.
pub fn with_fills_attr(mut proto: pb::ModelProto, fills: &[(String, Vec<f32>)]) -> pb::ModelProto {
    let tensors = fills
        .iter()
        .map(|(n, v)| fill_tensor(n, v.clone()))
        .collect();
    set_energy_attr(&mut proto, fills_attr(tensors));
    proto
}

/// `proto` with random fill vectors on about `p` of its suffix's token maps
/// (the cut always among them), as a package of input `h × w`.
pub fn with_random_fills(
    proto: pb::ModelProto,
    h: usize,
    w: usize,
    rng: &mut Rng,
    p: f32,
) -> ModelPackage {
    let plain = package(proto.clone(), h, w);
    // Aliases (Identity, Dropout) share their source's fill and may not name one.
    let mut fills: Vec<(String, Vec<f32>)> = Vec::new();
    for (name, &c) in &plain.plan.fillable {
        let source = &plain.plan.slot_names[plain.plan.tensors[name]];
        if source == name && (*name == plain.cut.output || rng.f32() < p) {
            fills.push((name.clone(), rng.normals(c, 1.0)));
        }
    }
    let m = package(with_fills_attr(proto, &fills), h, w);
    assert!(m.plan.fill_count() > 0, "fills attach");
    m
}

/// A manifest for a built network with input `[1, 3, h, w]`.
pub fn manifest(h: usize, w: usize) -> Manifest {
    Manifest {
        name: "random".into(),
        description: String::new(),
        model: "model.onnx".into(),
        input: InputSpec {
            name: "image".into(),
            shape: vec![1, 3, h, w],
            layout: None,
            colour: None,
        },
        preprocess: Preprocess {
            resize_short: h.max(w),
            crop: h,
            scale: 1.0 / 255.0,
            mean: [0.0; 3],
            std: [1.0; 3],
            resize: None,
        },
        labels: vec![],
        licence: serde_json::Value::Null,
        dense_model: None,
        fallback: None,
        detector: None,
        track: None,
        output: None,
    }
}

/// Map shapes (h, w, c) the random networks cycle through, seed by seed.
pub const RANDOM_SHAPES: [(usize, usize, usize); 6] = [
    (9, 9, 8),
    (7, 12, 6),
    (16, 5, 4),
    (4, 4, 8),
    (11, 11, 6),
    (6, 17, 4),
];

/// A random ERSM network on a `3 × h × w` input with `c` feature channels,
/// its suffix a random stack of blocks followed by a random head.
pub fn random_network(seed: u64, h: usize, w: usize, c: usize) -> pb::ModelProto {
    let mut b = Builder::new(seed);
    let x = b.conv("image", 3, c, 3, 1, [1, 1, 1, 1], 1);
    let x = b.op("Relu", &[&x], vec![]);
    let nb = if b.rng.coin() { 8 } else { 4 };
    let steps = b.rng.int(0, 3) as i64;
    let mut x = energy(&mut b, &x, c, 0.3, steps, nb);
    let mut ch = c;
    let (mut hh, mut ww) = (h, w);
    // Every block's output with its channels and size: an upsampled map of
    // the same size may add a lateral of one (FPN style).
    let mut laterals = vec![(x.clone(), ch, hh, ww)];
    let blocks = b.rng.int(2, 4);
    for _ in 0..blocks {
        let mut kind = b.rng.int(0, 5);
        if [1, 3, 4].contains(&kind) {
            if hh.min(ww) < 4 {
                kind = if b.rng.coin() { 0 } else { 5 };
            } else if kind == 3 {
                (hh, ww) = ((hh - 2) / 2 + 1, (ww - 2) / 2 + 1);
            } else {
                (hh, ww) = ((hh - 1) / 2 + 1, (ww - 1) / 2 + 1);
            }
        }
        x = match kind {
            0 => {
                // Inverted residual with squeeze-excite.
                let e = ch * 2;
                let y = b.conv(&x, ch, e, 1, 1, [0; 4], 1);
                let y = b.bn(&y, e);
                let y = b.act(&y);
                let k = if b.rng.coin() { 3 } else { 5 };
                let y = b.conv(&y, e, e, k, 1, [k / 2; 4], e);
                let y = b.act(&y);
                let s = b.op("GlobalAveragePool", &[&y], vec![]);
                let s = b.conv(&s, e, e / 2, 1, 1, [0; 4], 1);
                let s = b.op("Relu", &[&s], vec![]);
                let s = b.conv(&s, e / 2, e, 1, 1, [0; 4], 1);
                let s = b.op(
                    "HardSigmoid",
                    &[&s],
                    vec![attr_float("alpha", 1.0 / 6.0), attr_float("beta", 0.5)],
                );
                let y = if b.rng.coin() {
                    b.op("Mul", &[&y, &s], vec![])
                } else {
                    b.op("Mul", &[&s, &y], vec![])
                };
                let y = b.conv(&y, e, ch, 1, 1, [0; 4], 1);
                let y = b.bn(&y, ch);
                b.op("Add", &[&y, &x], vec![])
            }
            1 => {
                // Grouped strided conv with a sigmoid gate.
                let g = if ch.is_multiple_of(4) { 4 } else { 2 };
                let y = b.conv(&x, ch, ch * 2, 3, 2, [1; 4], g);
                ch *= 2;
                let s = b.op("Sigmoid", &[&y], vec![]);
                b.op("Mul", &[&y, &s], vec![])
            }
            2 => {
                // Dense k×k conv, stride 1, then a standalone BN and per-channel constants.
                let k = if b.rng.coin() { 3 } else { 5 };
                let y = b.conv(&x, ch, ch, k, 1, [k / 2; 4], 1);
                let y = b.act(&y);
                let y = b.bn(&y, ch);
                let n = b.rng.normals(ch, 0.5);
                let cst = b.init(&format!("cst{}", b.nodes.len()), &[1, ch, 1, 1], n);
                let y = b.op("Mul", &[&y, &cst], vec![]);
                let cst = b.init(&format!("cadd{}", b.nodes.len()), &[1], vec![0.25]);
                b.op("Add", &[&cst, &y], vec![])
            }
            3 => {
                // Strided 2×2 conv without padding, or 3×3 with asymmetric padding.
                let y = if b.rng.coin() {
                    b.conv(&x, ch, ch + 4, 2, 2, [0; 4], 1)
                } else {
                    b.conv(&x, ch, ch + 4, 3, 2, [0, 0, 1, 1], 1)
                };
                ch += 4;
                b.act(&y)
            }
            4 => {
                // Depthwise stride 2, then pointwise.
                let y = b.conv(&x, ch, ch, 3, 2, [1; 4], ch);
                let y = b.bn(&y, ch);
                let y = b.op("Relu", &[&y], vec![]);
                let y = b.conv(&y, ch, ch + 2, 1, 1, [0; 4], 1);
                ch += 2;
                b.op("Identity", &[&y], vec![])
            }
            _ => {
                // Residual of two branches at the same level.
                let a = b.conv(&x, ch, ch, 3, 1, [1; 4], 1);
                let a = b.act(&a);
                let c2 = b.conv(&x, ch, ch, 1, 1, [0; 4], 1);
                b.op("Add", &[&a, &c2], vec![])
            }
        };
        laterals.push((x.clone(), ch, hh, ww));
    }
    // An FPN-style upsampling: a transposed 2×2 conv (its BatchNorm folded
    // in, or not), then an activation and, on the upsampled level, a 3×3 conv.
    if b.rng.coin() {
        let y = b.conv_transpose(&x, ch, ch + 2, 2);
        ch += 2;
        let y = if b.rng.coin() { b.bn(&y, ch) } else { y };
        let y = b.act(&y);
        // A lateral of the upsampled size, brought to its channels by a 1×1
        // conv, added on the union of the two sets.
        let lateral = laterals
            .iter()
            .rev()
            .find(|l| (l.2, l.3) == (hh * 2, ww * 2))
            .cloned();
        let y = match lateral {
            Some((l, lc, ..)) => {
                let l = b.conv(&l, lc, ch, 1, 1, [0; 4], 1);
                if b.rng.coin() {
                    b.op("Add", &[&y, &l], vec![])
                } else {
                    b.op("Add", &[&l, &y], vec![])
                }
            }
            None => y,
        };
        x = if b.rng.coin() {
            b.conv(&y, ch, ch, 3, 1, [1; 4], 1)
        } else {
            y
        };
    }
    // Head.
    let keep = b.rng.coin();
    let mut y = if b.rng.coin() {
        b.op("GlobalAveragePool", &[&x], vec![])
    } else {
        b.op(
            "ReduceMean",
            &[&x],
            vec![
                attr_ints("axes", &[2, 3]),
                attr_int("keepdims", keep as i64),
            ],
        )
    };
    y = if b.rng.coin() {
        b.op("Flatten", &[&y], vec![attr_int("axis", 1)])
    } else {
        let s = b.init_i64(&format!("shape{}", b.nodes.len()), vec![1, -1]);
        b.op("Reshape", &[&y, &s], vec![])
    };
    let hidden = 16;
    let trans_b = b.rng.coin();
    let wd = b.rng.normals(ch * hidden, (2.0 / ch as f32).sqrt());
    let wn = if trans_b {
        b.init("fc1.w", &[hidden, ch], wd)
    } else {
        b.init("fc1.w", &[ch, hidden], wd)
    };
    let bias = b.rng.normals(hidden, 0.1);
    let bn = b.init("fc1.b", &[hidden], bias);
    y = b.op(
        "Gemm",
        &[&y, &wn, &bn],
        vec![attr_int("transB", trans_b as i64), attr_float("alpha", 0.9)],
    );
    y = b.act(&y);
    let w2 = b.rng.normals(hidden * 7, 0.3);
    let w2 = b.init("fc2.w", &[hidden, 7], w2);
    y = b.op("MatMul", &[&y, &w2], vec![]);
    let b2 = b.rng.normals(7, 0.1);
    let b2 = b.init("fc2.b", &[7], b2);
    let out = b.op("Add", &[&y, &b2], vec![]);
    b.model(("image", &[1, 3, h, w]), &out)
}

/// A random detector-shaped ERSM network on a `3 × h × w` input (h, w
/// multiples of 8): a prefix with maps at strides 1, 2 and 4, cut at stride
/// 2 (`c` channels); a suffix that reads the prefix's stride-1 map (finer
/// than the cut), sometimes its stride-4 map (coarser) and the cut's own
/// input (the same size), as FPN laterals beside the energy layer's
/// output; ConvTranspose upsampling with Adds on the union of sets; and
/// two token-map outputs at stride 1 (a sigmoid "heatmap" and a 4-channel
/// "box" map), like CenterFace's heads.
pub fn random_detector(seed: u64, h: usize, w: usize, c: usize) -> pb::ModelProto {
    detector(seed, h, w, c, false)
}

fn detector(seed: u64, h: usize, w: usize, c: usize, gated: bool) -> pb::ModelProto {
    let mut b = Builder::new(seed);
    let p0 = b.conv("image", 3, 6, 3, 1, [1; 4], 1);
    let p0 = b.op("Relu", &[&p0], vec![]);
    let p1 = b.conv(&p0, 6, c, 3, 2, [1; 4], 1);
    let p1 = b.act(&p1);
    let coarse = b.rng.coin();
    let (cut, p2) = if coarse {
        // Down to stride 4 and back: the stride-4 map is computed before the
        // cut, and the suffix reads it too.
        let p2 = b.conv(&p1, c, c + 2, 3, 2, [1; 4], 1);
        let p2 = b.op("Relu", &[&p2], vec![]);
        let up = b.conv_transpose(&p2, c + 2, c, 2);
        (b.op("Add", &[&up, &p1], vec![]), Some(p2))
    } else {
        (p1, None)
    };
    let steps = b.rng.int(0, 2) as i64;
    let x = energy(&mut b, &cut, c, 0.3, steps, 4);
    // At the cut's level; one block down to stride 4.
    let y = b.conv(&x, c, c, 3, 1, [1; 4], 1);
    let y = b.act(&y);
    let d = b.conv(&y, c, c + 4, 3, 2, [1; 4], 1);
    let d = b.op("Relu", &[&d], vec![]);
    let d = if gated {
        let steps = b.rng.int(0, 2) as i64;
        let g = gate(&mut b, &d, c + 4, steps);
        let g = b.conv(&g, c + 4, c + 4, 3, 1, [1; 4], 1);
        b.op("Relu", &[&g], vec![])
    } else {
        d
    };
    let d = match &p2 {
        // The coarser prefix map joins the stride-4 level.
        Some(p2) => {
            let l = b.conv(p2, c + 2, c + 4, 1, 1, [0; 4], 1);
            b.op("Add", &[&d, &l], vec![])
        }
        None => d,
    };
    // Back up to the cut's size, adding a lateral of the cut's own input.
    let u = b.conv_transpose(&d, c + 4, c, 2);
    let u = if b.rng.coin() { b.bn(&u, c) } else { u };
    let u = b.op("Relu", &[&u], vec![]);
    let l = b.conv(&cut, c, c, 1, 1, [0; 4], 1);
    let l = b.op("Relu", &[&l], vec![]);
    let u = b.op("Add", &[&u, &l], vec![]);
    // Up to stride 1, adding a lateral of the prefix's stride-1 map.
    let u = b.conv_transpose(&u, c, 8, 2);
    let u = b.op("Relu", &[&u], vec![]);
    let l = b.conv(&p0, 6, 8, 1, 1, [0; 4], 1);
    let l = b.op("Relu", &[&l], vec![]);
    let u = if b.rng.coin() {
        b.op("Add", &[&u, &l], vec![])
    } else {
        b.op("Add", &[&l, &u], vec![])
    };
    // On half the gated networks, a second gate on that union level, read
    // only by the conv the heads read (CenterFace's peak gate).
    // Its mean field takes 1 to 3 steps: a per-token head's field runs on
    // the active positions' bounding box grown by them.
    let u = if gated && seed % 4 >= 2 {
        gate(&mut b, &u, 8, 1 + (seed % 3) as i64)
    } else {
        u
    };
    let u = b.conv(&u, 8, 8, 3, 1, [1; 4], 1);
    let u = b.op("Relu", &[&u], vec![]);
    let heat = b.conv(&u, 8, 1, 1, 1, [0; 4], 1);
    let heat = b.op("Sigmoid", &[&heat], vec![]);
    let boxes = b.conv(&u, 8, 4, 1, 1, [0; 4], 1);
    b.model_outputs(("image", &[1, 3, h, w]), &[&heat, &boxes])
}

/// [`random_detector`] as a package: the shape `shapes[seed % len]`, the
/// `centre` stride rule on even seeds.
pub fn detector_package(seed: u64, shapes: &[(usize, usize, usize)]) -> ModelPackage {
    detector_package_of(seed, shapes, false)
}

/// [`detector_package`] with a gate after the suffix's stride-2 block, as
/// CenterFace's second mask at stride 16: the coarser level's later layers
/// run on the gate's narrower set, the finer levels on the union of it
/// (upsampled) and the cut's; when `seed % 4` is 2 or 3, a second gate on
/// the finest union level before the heads' conv, as CenterFace's third
/// energy layer.
pub fn gated_detector_package(seed: u64, shapes: &[(usize, usize, usize)]) -> ModelPackage {
    detector_package_of(seed, shapes, true)
}

fn detector_package_of(seed: u64, shapes: &[(usize, usize, usize)], gated: bool) -> ModelPackage {
    let (h, w, c) = shapes[seed as usize % shapes.len()];
    let proto = detector(seed, h, w, c, gated);
    let proto = if seed.is_multiple_of(2) {
        with_stride_rule(proto, "centre")
    } else {
        proto
    };
    package(proto, h, w)
}

/// The prefix's maps for `image`, as the prefix computes them: the cut's
/// features first, then each map the suffix reads.
pub fn prefix_maps(m: &ModelPackage, image: &[f32]) -> Vec<Vec<f32>> {
    let outs = m.prefix.run_outputs(image).expect("the prefix runs");
    outs.iter()
        .map(|o| o.to_vec().expect("host values"))
        .collect()
}

/// Loads a built network as a package (no files involved).
pub fn package(proto: pb::ModelProto, h: usize, w: usize) -> ModelPackage {
    ModelPackage::from_proto(proto, manifest(h, w), Path::new("random/model.onnx"))
        .expect("random network loads")
}

/// Masks of every level of `m`'s plan for the kept raster indices, computed
/// independently of the sparse executor: level 0 from `kept`, each strided
/// level as the s×s max-pool of its parent, or its centre tap under
/// [`StrideRule::Centre`] (and, when that leaves nothing, the position over
/// the parent's first active token), each upsampled level as its parent's
/// mask repeated s×s, each union level as the larger of its two parents'.
pub fn level_masks(m: &ModelPackage, kept: &[u32]) -> Vec<Vec<f32>> {
    level_masks_gated(m, kept, &[])
}

/// [`level_masks`] where gate `g`'s level keeps the raster indices
/// `gates[g]` (none, for a gate not in the list).
pub fn level_masks_gated(m: &ModelPackage, kept: &[u32], gates: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let mut masks: Vec<Vec<f32>> = Vec::new();
    for l in &m.plan.levels {
        let mut mask = vec![0.0f32; l.h * l.w];
        match l.parent {
            None => kept.iter().for_each(|&i| mask[i as usize] = 1.0),
            Some(_) if l.gate.is_some() => {
                let list = gates.get(l.gate.unwrap()).map_or(&[][..], Vec::as_slice);
                list.iter().for_each(|&i| mask[i as usize] = 1.0);
            }
            Some(p) if l.merge.is_some() => {
                let q = l.merge.unwrap();
                for (i, v) in mask.iter_mut().enumerate() {
                    *v = masks[p][i].max(masks[q][i]);
                }
            }
            Some(p) if l.up => {
                let pw = m.plan.levels[p].w;
                for oy in 0..l.h {
                    for ox in 0..l.w {
                        mask[oy * l.w + ox] = masks[p][oy / l.stride * pw + ox / l.stride];
                    }
                }
            }
            Some(p) => {
                let (ph, pw) = (m.plan.levels[p].h, m.plan.levels[p].w);
                for oy in 0..l.h {
                    for ox in 0..l.w {
                        if m.plan.stride_rule == StrideRule::Centre {
                            let (y, x) = (oy * l.stride, ox * l.stride);
                            mask[oy * l.w + ox] = masks[p][y * pw + x];
                            continue;
                        }
                        let mut any = false;
                        for y in oy * l.stride..((oy + 1) * l.stride).min(ph) {
                            for x in ox * l.stride..((ox + 1) * l.stride).min(pw) {
                                any |= masks[p][y * pw + x] > 0.0;
                            }
                        }
                        mask[oy * l.w + ox] = if any { 1.0 } else { 0.0 };
                    }
                }
                if mask.iter().all(|&v| v == 0.0) {
                    if let Some(i) = masks[p].iter().position(|&v| v > 0.0) {
                        let (oy, ox) = (i / pw / l.stride, i % pw / l.stride);
                        mask[oy.min(l.h - 1) * l.w + ox.min(l.w - 1)] = 1.0;
                    }
                }
            }
        }
        masks.push(mask);
    }
    masks
}

/// The dense-masked reference output for features `x` (`C×H×W`) and kept tokens.
pub fn dense_masked(m: &ModelPackage, x: &[f32], kept: &[u32]) -> Vec<f32> {
    dense_masked_with(m, x, &[], kept)
}

/// [`dense_masked`] of a suffix that also reads the prefix maps `taps`
/// (dense, in the cut's order): each masked by its own level.
pub fn dense_masked_with(m: &ModelPackage, x: &[f32], taps: &[Vec<f32>], kept: &[u32]) -> Vec<f32> {
    let masks = level_masks(m, kept);
    let proto = reference(&m.suffix_proto, &m.plan);
    run_reference(m, &proto, x, taps, &masks)
}

/// Runs a reference built by [`reference`] on features `x` (masked here by
/// level 0), the prefix maps `taps`, and every level's mask.
fn run_reference(
    m: &ModelPackage,
    proto: &pb::ModelProto,
    x: &[f32],
    taps: &[Vec<f32>],
    masks: &[Vec<f32>],
) -> Vec<f32> {
    let hw = m.cut.h * m.cut.w;
    let xm: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| v * masks[0][i % hw])
        .collect();
    let maps = m.cut.suffix_input_shapes();
    let net = TractNet::new(proto, &maps[0], "dense-masked reference").expect("reference builds");
    let scales: Vec<[f32; 1]> = masks
        .iter()
        .map(|mk| [mk.len() as f32 / mk.iter().sum::<f32>().max(1.0)])
        .collect();
    let shapes: Vec<[usize; 4]> = m.plan.levels.iter().map(|l| [1, 1, l.h, l.w]).collect();
    let values = std::iter::once(&xm).chain(taps);
    let mut inputs: Vec<(&[usize], &[f32])> = maps
        .iter()
        .zip(values)
        .map(|(s, v)| (&s[..], &v[..]))
        .collect();
    for l in 0..masks.len() {
        inputs.push((&shapes[l], &masks[l]));
        inputs.push((&[1], &scales[l]));
    }
    net.run_many(&inputs).expect("reference runs")
}

/// [`dense_masked_with`] of a suffix with gates: each gate's input is taken
/// from the reference itself (a first run with the gates not yet known),
/// its energies computed on that masked map, and its level's mask set to
/// the input level's positions with negative energy (the lowest one if
/// none is); then the reference runs with every mask. The gates' kept
/// raster indices are returned too.
pub fn dense_masked_gated(
    m: &ModelPackage,
    x: &[f32],
    taps: &[Vec<f32>],
    kept: &[u32],
) -> (Vec<f32>, Vec<Vec<u32>>) {
    dense_masked_gated_holding(m, x, taps, kept, &[], false)
}

/// [`dense_masked_gated`] on a stream: each gate also keeps the positions
/// of its input level that the held raster indices of level 0 reach (their
/// level masks with every gate passing all it reads), whatever their
/// energies; the lowest one alone only if neither rule keeps any. With
/// `shifted`, each gate's unary costs first move by its stream offset
/// (`Gate::shift`).
pub fn dense_masked_gated_holding(
    m: &ModelPackage,
    x: &[f32],
    taps: &[Vec<f32>],
    kept: &[u32],
    held: &[u32],
    shifted: bool,
) -> (Vec<f32>, Vec<Vec<u32>>) {
    dense_masked_gated_stream(m, x, taps, kept, held, &[], shifted)
}

/// [`dense_masked_gated_holding`] with new tokens (`track.new_tokens`): with
/// `shifted`, a gate whose shift is not zero also keeps the positions of
/// its input level that the raster indices `fresh` of level 0 reach and
/// whose energy without the shift is negative.
pub fn dense_masked_gated_stream(
    m: &ModelPackage,
    x: &[f32],
    taps: &[Vec<f32>],
    kept: &[u32],
    held: &[u32],
    fresh: &[u32],
    shifted: bool,
) -> (Vec<f32>, Vec<Vec<u32>>) {
    let gates: Vec<(&ersm::sparse::ops::Gate, &str)> = m
        .plan
        .steps
        .iter()
        .filter_map(|s| Some((s.op.gate()?, m.plan.slot_names[s.inputs[0]].as_str())))
        .collect();
    // Where the held (and the new) tokens reach, gate by gate: each passes
    // its whole input.
    let reach_of = |tokens: &[u32]| {
        let mut reach: Vec<Vec<u32>> = Vec::new();
        for (g, _) in &gates {
            let masks = level_masks_gated(m, tokens, &reach);
            let all = (0..masks[g.in_level].len() as u32)
                .filter(|&i| !tokens.is_empty() && masks[g.in_level][i as usize] > 0.0)
                .collect();
            reach.push(all);
        }
        reach
    };
    let reach = reach_of(held);
    let new_reach = reach_of(fresh);
    let mut lists: Vec<Vec<u32>> = Vec::new();
    for (k, (g, input)) in gates.iter().enumerate() {
        let masks = level_masks_gated(m, kept, &lists);
        let mut proto = reference(&m.suffix_proto, &m.plan);
        let graph = proto.graph.as_mut().unwrap();
        graph.output.push(pb::ValueInfoProto {
            name: input.to_string(),
            ..Default::default()
        });
        let all = run_reference(m, &proto, x, taps, &masks);
        let map = &all[all.len() - g.c * g.h * g.w..];
        let fm = ersm::ersm::FeatureMap::new(map, g.c, g.h, g.w).unwrap();
        let mut u = ersm::ersm::cpu::unary(fm, &g.spec.head);
        let own = ersm::ersm::cpu::mean_field(&u, g.h, g.w, &g.spec);
        let fresh_here = shifted && g.shift != 0.0;
        if shifted {
            u.iter_mut().for_each(|v| *v += g.shift);
        }
        let e = ersm::ersm::cpu::mean_field(&u, g.h, g.w, &g.spec);
        let active: Vec<u32> = masks[g.in_level]
            .iter()
            .enumerate()
            .filter(|(_, &v)| v > 0.0)
            .map(|(i, _)| i as u32)
            .collect();
        let mut list: Vec<u32> = active
            .iter()
            .copied()
            .filter(|&i| {
                e[i as usize] < 0.0
                    || reach[k].binary_search(&i).is_ok()
                    || (fresh_here
                        && own[i as usize] < 0.0
                        && new_reach[k].binary_search(&i).is_ok())
            })
            .collect();
        if list.is_empty() {
            let lowest =
                active
                    .iter()
                    .copied()
                    .reduce(|a, b| if e[b as usize] < e[a as usize] { b } else { a });
            list.extend(lowest);
        }
        lists.push(list);
    }
    let masks = level_masks_gated(m, kept, &lists);
    let proto = reference(&m.suffix_proto, &m.plan);
    (run_reference(m, &proto, x, taps, &masks), lists)
}

/// The dense suffix (tract, every token) on features `x` and the prefix maps
/// `taps` (in the cut's order).
pub fn dense_suffix_with(m: &ModelPackage, x: &[f32], taps: &[Vec<f32>]) -> Vec<f32> {
    let shapes = m.cut.suffix_input_shapes();
    let inputs: Vec<(&[usize], &[f32])> = shapes
        .iter()
        .zip(std::iter::once(x).chain(taps.iter().map(Vec::as_slice)))
        .map(|(s, v)| (&s[..], v))
        .collect();
    m.dense_suffix
        .run_many(&inputs)
        .expect("the dense suffix runs")
}

/// The sparse suffix's output (scattered to dense) for features `x` and kept tokens.
pub fn sparse(m: &ModelPackage, x: &[f32], kept: &[u32]) -> Vec<f32> {
    sparse_with(m, x, &[], kept)
}

/// [`sparse`] of a suffix that also reads the prefix maps `taps`.
pub fn sparse_with(m: &ModelPackage, x: &[f32], taps: &[Vec<f32>], kept: &[u32]) -> Vec<f32> {
    sparse_frame(m, x, taps, kept).0
}

/// [`sparse_with`], and the frame the run built (behind a gate, its sets
/// are known only from the run).
pub fn sparse_frame(
    m: &ModelPackage,
    x: &[f32],
    taps: &[Vec<f32>],
    kept: &[u32],
) -> (Vec<f32>, ersm::sparse::Frame) {
    let fm = ersm::ersm::FeatureMap::new(x, m.cut.c, m.cut.h, m.cut.w).unwrap();
    let feats = ersm::ersm::cpu::gather(fm, kept);
    let (out, frame) = m
        .plan
        .run(kept, feats, taps.to_vec())
        .expect("sparse suffix runs");
    (m.plan.dense_outputs(&out, &frame.sets), frame)
}

/// `‖a − b‖∞ / ‖b‖∞`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// A random kept set over `n` tokens with probability `p` (at least one token).
pub fn random_kept(rng: &mut Rng, n: usize, p: f32) -> Vec<u32> {
    let mut kept: Vec<u32> = (0..n as u32).filter(|_| rng.f32() < p).collect();
    if kept.is_empty() {
        kept.push(rng.int(0, n - 1) as u32);
    }
    kept
}

/// A MobileNetV2 (width 1.0, 224×224) cut after its stride-8 stage: the input
/// is mapped to the 32×28×28 stage output by a 1×1 conv (standing in for the
/// real prefix), then the energy layer, then torchvision's features[7..] and
/// the classifier, with random weights. Inverted residuals: 1×1 expand + BN +
/// ReLU6, 3×3 depthwise + BN + ReLU6, 1×1 project + BN, residual where shapes allow.
pub fn mobilenet_v2_suffix(seed: u64) -> pb::ModelProto {
    let mut b = Builder::new(seed);
    let relu6 = |b: &mut Builder, x: &str| {
        let n = b.nodes.len();
        let lo = b.init(&format!("r6lo{n}"), &[], vec![0.0]);
        let hi = b.init(&format!("r6hi{n}"), &[], vec![6.0]);
        b.op("Clip", &[x, &lo, &hi], vec![])
    };
    let x = b.conv("image", 3, 32, 1, 1, [0; 4], 1);
    let mut x = energy(&mut b, &x, 32, 0.3, 2, 4);
    let mut c = 32;
    // (expansion t, channels, repeats, first stride): torchvision's stages after 28×28.
    for (t, cout, n, s) in [(6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)] {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let e = c * t;
            let y = b.conv(&x, c, e, 1, 1, [0; 4], 1);
            let y = b.bn(&y, e);
            let y = relu6(&mut b, &y);
            let y = b.conv(&y, e, e, 3, stride, [1; 4], e);
            let y = b.bn(&y, e);
            let y = relu6(&mut b, &y);
            let y = b.conv(&y, e, cout, 1, 1, [0; 4], 1);
            let y = b.bn(&y, cout);
            x = if stride == 1 && c == cout {
                b.op("Add", &[&y, &x], vec![])
            } else {
                y
            };
            c = cout;
        }
    }
    let y = b.conv(&x, c, 1280, 1, 1, [0; 4], 1);
    let y = b.bn(&y, 1280);
    let y = relu6(&mut b, &y);
    let y = b.op("GlobalAveragePool", &[&y], vec![]);
    let y = b.op("Flatten", &[&y], vec![attr_int("axis", 1)]);
    let w = b.rng.normals(1000 * 1280, (1.0 / 1280f32).sqrt());
    let wn = b.init("classifier.w", &[1000, 1280], w);
    let bias = b.rng.normals(1000, 0.01);
    let bn = b.init("classifier.b", &[1000], bias);
    let out = b.op("Gemm", &[&y, &wn, &bn], vec![attr_int("transB", 1)]);
    b.model(("image", &[1, 3, 28, 28]), &out)
}

/// A spatially coherent kept set of about `keep · h · w` tokens, as the
/// pairwise term makes them: the lowest values of a smooth random field.
pub fn blob_kept(rng: &mut Rng, h: usize, w: usize, keep: f64) -> Vec<u32> {
    let centres: Vec<(f32, f32, f32)> = (0..4)
        .map(|_| {
            (
                rng.range(0.0, h as f32),
                rng.range(0.0, w as f32),
                rng.range(2.0, 6.0),
            )
        })
        .collect();
    let field: Vec<f32> = (0..h * w)
        .map(|i| {
            let (y, x) = ((i / w) as f32, (i % w) as f32);
            -centres
                .iter()
                .map(|(cy, cx, r)| (-((y - cy).powi(2) + (x - cx).powi(2)) / (2.0 * r * r)).exp())
                .sum::<f32>()
        })
        .collect();
    let mut order: Vec<usize> = (0..h * w).collect();
    order.sort_by(|&a, &b| field[a].total_cmp(&field[b]));
    let n = ((keep * (h * w) as f64).round() as usize).clamp(1, h * w);
    let mut kept: Vec<u32> = order[..n].iter().map(|&i| i as u32).collect();
    kept.sort();
    kept
}

/// True when ffmpeg runs; with ERSM_REQUIRE_FFMPEG=1 (CI) its absence fails.
pub fn have_ffmpeg() -> bool {
    let ok = std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("ERSM_REQUIRE_FFMPEG").as_deref() != Ok("1"),
            "ffmpeg is required (ERSM_REQUIRE_FFMPEG=1) but not found"
        );
        println!("SKIPPED: ffmpeg not found");
    }
    ok
}

/// The network of the package file `model`, its energy layers removed (each
/// reader reading the layer's input directly) and `edit_weights` applied: an
/// original network for a package's `dense_model`.
pub fn without_energy_layer(
    model: &Path,
    edit_weights: impl FnOnce(&mut pb::ModelProto),
) -> pb::ModelProto {
    let mut p = ersm::model::read_onnx(model).unwrap();
    let g = p.graph.as_mut().unwrap();
    while let Some(e) = g.node.iter().position(|n| n.op_type == "EnergyMask") {
        remove_energy_node(g, e);
    }
    p.opset_import.retain(|o| o.domain != "ersm");
    edit_weights(&mut p);
    p
}

/// The network of the package file `model` with its cut's energy layer
/// only: every later one (a gate) removed.
pub fn without_gates(model: &Path) -> pb::ModelProto {
    let mut p = ersm::model::read_onnx(model).unwrap();
    let g = p.graph.as_mut().unwrap();
    // The first energy node is the cut's; each later one is a gate.
    while let Some(e) = (0..g.node.len())
        .filter(|&i| g.node[i].op_type == "EnergyMask")
        .nth(1)
    {
        remove_energy_node(g, e);
    }
    p
}

/// Removes node `at` (an energy layer) and its weights; its readers read
/// its input.
fn remove_energy_node(g: &mut pb::GraphProto, at: usize) {
    let node = g.node.remove(at);
    let (input, output) = (node.input[0].clone(), node.output[0].clone());
    let energy_weights: Vec<String> = node.input[1..].to_vec();
    g.initializer.retain(|t| !energy_weights.contains(&t.name));
    for n in g.node.iter_mut() {
        for i in n.input.iter_mut() {
            if *i == output {
                *i = input.clone();
            }
        }
    }
}

/// Adds `by` to a weight's first value, stored as floats or raw bytes.
pub fn shift_first_value(t: &mut TensorProto, by: f32) {
    if t.raw_data.is_empty() {
        t.float_data[0] += by;
    } else {
        let v = f32::from_le_bytes(t.raw_data[..4].try_into().unwrap()) + by;
        t.raw_data[..4].copy_from_slice(&v.to_le_bytes());
    }
}
