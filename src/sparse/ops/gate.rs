//! A gate: a second `ersm.EnergyMask` inside the suffix. It reads a token
//! map as the sparse run computes it (its fill, or zero, at dropped
//! positions), computes the energy layer's equations on it (the CPU energy
//! layer of `crate::ersm::cpu`), and keeps the active positions whose
//! energy is negative (the lowest-energy one if none is): a narrower set
//! for everything read after it. On the GPU: `kernels/gate.cu` (the map,
//! the head, the mean field, the rows) and `sfx_level`'s rule 4 in
//! `tokens.cu` (the gate's level); the executor then builds the levels and
//! rulebooks behind the gate (`sparse::gpu`).

use super::{OnnxNode, Op, Tensor};
use crate::ersm::cuda::{pack_head, PackedHead};
use crate::ersm::node::DOMAIN;
use crate::ersm::{cpu, EnergySpec, FeatureMap, Neighbourhood, TokenMask, UnaryHead};
use crate::sparse::launch::{Family, Kernel, KernelArgs, StepIo};
use crate::sparse::tokens::{self, LevelParams};
use crate::sparse::{buffers::Buffers, frame::Frame, value::Shape, value::Value};
use anyhow::{bail, ensure, Result};
use std::borrow::Cow;

/// Rows transposed together by a per-token gate head (16 KB of 64-channel
/// rows).
const ROW_BLOCK: usize = 64;

/// The cut's energy node sets these for the whole suffix; a gate may not.
const CUT_ONLY: [&str; 2] = ["stride_rule", "fills"];

/// One gate, lowered.
#[derive(Clone, Debug)]
pub struct Gate {
    pub spec: EnergySpec,
    /// The gate's number among the suffix's gates (its level's `gate`).
    pub gate: usize,
    pub in_level: usize,
    pub out_level: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// What the input holds at dropped positions (its fill vector), as the
    /// energy head reads it.
    pub fill: Option<Vec<f32>>,
    /// The head's parameters as the GPU kernels read them.
    pub packed: PackedHead,
    /// What its unary costs move by before the mean field (0 but on a
    /// stream whose manifest moves this gate: `track.gate_offsets`).
    pub shift: f32,
}

/// Which offsets a frame's gates run at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateOffsets {
    /// Each gate's `shift` (0 unless a stream set one).
    Stream,
    /// None: the package's own operating points (a stream's refresh frame,
    /// manifest `track.refresh`).
    Package,
}

/// Moves unary costs by `shift` (none at 0: the same bits).
fn shifted(u: &mut [f32], shift: f32) {
    if shift != 0.0 {
        u.iter_mut().for_each(|v| *v += shift);
    }
}

/// Lowers a gate node: its input must be a token map.
pub fn from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    ensure!(
        n.node.domain == DOMAIN,
        "domain is '{}', expected '{DOMAIN}'",
        n.node.domain
    );
    if let Some(a) = n
        .node
        .attribute
        .iter()
        .find(|a| CUT_ONLY.contains(&a.name.as_str()))
    {
        bail!(
            "'{}' is set on the first energy layer (the cut) for the whole suffix; a second one may not set it",
            a.name
        );
    }
    let input = n.input(0)?;
    let Shape::Tokens { level, c } = input.shape else {
        bail!("a second energy layer must read a token map, not a pooled value");
    };
    let spec = crate::ersm::node::spec(n.node, n.consts, c)?;
    let fill = n.fill(input.slot).cloned();
    let (h, w) = (n.lowered.levels[level].h, n.lowered.levels[level].w);
    let (gate, out_level) = n.lowered.gate_level(level);
    let op = Gate {
        packed: pack_head(&spec.head),
        spec,
        gate,
        in_level: level,
        out_level,
        c,
        h,
        w,
        fill,
        shift: 0.0,
    };
    Ok(n.emit(
        op,
        vec![input.slot],
        Shape::Tokens {
            level: out_level,
            c,
        },
    ))
}

impl Gate {
    /// The raster indices this gate keeps of its input `x` (tokens of its
    /// input level, whose set `frame` holds): the input level's positions
    /// whose final energy is negative, or the lowest-energy one (first in
    /// raster order) if none is, so a level is never empty.
    pub fn keeps(&self, x: &Value, frame: &Frame, offsets: GateOffsets) -> Result<Vec<u32>> {
        let active = &frame.sets[self.in_level].coords;
        let shift = match offsets {
            GateOffsets::Stream => self.shift,
            GateOffsets::Package => 0.0,
        };
        // New tokens (a stream's `track.new_tokens`) reach this gate only
        // when it is moved and the frame runs at the stream's offsets.
        let fresh = match frame.fresh.get(self.in_level) {
            Some(s) if shift != 0.0 && !s.coords.is_empty() => &s.coords[..],
            _ => &[][..],
        };
        // The energies at the active positions at `shift` and, with new
        // tokens, at the package's own offset (the unary costs once).
        let (e, own) = if matches!(self.spec.head, UnaryHead::Conv { .. }) {
            let (_, map) = x.to_dense(&frame.sets, self.fill.as_deref());
            let fm = FeatureMap::new(&map, self.c, self.h, self.w)?;
            let mut u = cpu::unary(fm, &self.spec.head);
            let at = |e: Vec<f32>| active.iter().map(|&i| e[i as usize]).collect::<Vec<f32>>();
            let own =
                (!fresh.is_empty()).then(|| at(cpu::mean_field(&u, self.h, self.w, &self.spec)));
            shifted(&mut u, shift);
            (at(cpu::mean_field(&u, self.h, self.w, &self.spec)), own)
        } else {
            let costs = self.per_token_costs(x.data(), active)?;
            let own = (!fresh.is_empty()).then(|| self.per_token_field(&costs, active, 0.0));
            (self.per_token_field(&costs, active, shift), own)
        };
        if let Some(why) = TokenMask::non_finite(&e) {
            bail!(why);
        }
        if active.is_empty() {
            return Ok(Vec::new());
        }
        // The energy layer's own rule over the active positions, in raster
        // order: the negative ones and the held ones, or the first lowest
        // alone.
        let held = frame.held.get(self.in_level).map_or(&[][..], |s| &s.coords);
        let mut also = positions_in(active, held);
        if let Some(own) = own {
            // Within the new tokens' reach, what the package's offset keeps.
            also.extend(
                positions_in(active, fresh)
                    .into_iter()
                    .filter(|&j| own[j as usize] < 0.0),
            );
            also.sort_unstable();
            also.dedup();
        }
        Ok(cpu::select_holding(&e, &also)
            .into_iter()
            .map(|j| active[j as usize])
            .collect())
    }

    /// The unary costs of a per-token head (no convs) at the active
    /// positions (in the set's order), then the one every dropped position
    /// holds: what [`Gate::per_token_field`] turns into the final energies
    /// the whole map would give. A position's unary cost reads its own
    /// channels only: it is computed at
    /// the active positions and once for what every dropped position holds
    /// (the fill vector, or zero), with the sums `cpu::unary` makes on the
    /// whole map. After T mean-field steps a position's energy depends on
    /// positions at most T away, so the field runs on the active positions'
    /// bounding box grown by T (the map's edges stay edges). A gate before
    /// CenterFace's heads reads a 160×120 map of which a frame keeps a
    /// fraction.
    fn per_token_costs(&self, rows: &[f32], active: &[u32]) -> Result<Vec<f32>> {
        let (c, n) = (self.c, active.len());
        if n == 0 {
            return Ok(Vec::new());
        }
        let cols = n + 1;
        // Frame after frame these buffers are a few hundred kilobytes: kept
        // per thread rather than mapped and faulted in again each time.
        let mut planar = cpu::scratch::take(c * cols);
        // By blocks of rows, so each block is read from cache C times while
        // every plane is written in runs.
        for (b, block) in rows.chunks(c * ROW_BLOCK).enumerate() {
            let first = b * ROW_BLOCK;
            for (ch, plane) in planar.chunks_exact_mut(cols).enumerate() {
                for (k, row) in block.chunks_exact(c).enumerate() {
                    plane[first + k] = row[ch];
                }
            }
        }
        for ch in 0..c {
            planar[ch * cols + n] = self.fill.as_ref().map_or(0.0, |f| f[ch]);
        }
        let costs = cpu::unary(FeatureMap::new(&planar, c, 1, cols)?, &self.spec.head);
        cpu::scratch::give(planar);
        Ok(costs)
    }

    /// The final energies at the active positions from
    /// [`Gate::per_token_costs`]' `costs`, moved by `shift`.
    fn per_token_field(&self, costs: &[f32], active: &[u32], shift: f32) -> Vec<f32> {
        let n = active.len();
        if n == 0 {
            return Vec::new();
        }
        let mut at = costs.to_vec();
        shifted(&mut at, shift);
        if self.spec.steps == 0 || self.spec.lambda == 0.0 {
            at.truncate(n);
            return at;
        }
        let w = self.w;
        let (mut y0, mut y1, mut x0, mut x1) = (usize::MAX, 0, usize::MAX, 0);
        for &i in active {
            let (y, x) = (i as usize / w, i as usize % w);
            (y0, y1, x0, x1) = (y0.min(y), y1.max(y), x0.min(x), x1.max(x));
        }
        let grow = self.spec.steps as usize;
        let (y0, x0) = (y0.saturating_sub(grow), x0.saturating_sub(grow));
        let (y1, x1) = ((y1 + grow).min(self.h - 1), (x1 + grow).min(w - 1));
        let (bh, bw) = (y1 - y0 + 1, x1 - x0 + 1);
        let at_box = |i: u32| (i as usize / w - y0) * bw + (i as usize % w - x0);
        let mut u = cpu::scratch::take(bh * bw);
        u.fill(at[n]);
        for (&i, &v) in active.iter().zip(&at) {
            u[at_box(i)] = v;
        }
        let e = cpu::mean_field(&u, bh, bw, &self.spec);
        cpu::scratch::give(u);
        active.iter().map(|&i| e[at_box(i)]).collect()
    }
}

/// The indices into `active` (ascending raster indices) of those raster
/// indices of `held` (ascending) that are active.
fn positions_in(active: &[u32], held: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut at = 0;
    for &h in held {
        at += active[at..].partition_point(|&a| a < h);
        if active.get(at) == Some(&h) {
            out.push(at as u32);
        }
    }
    out
}

impl Op for Gate {
    fn name(&self) -> &'static str {
        "Gate"
    }

    /// The input's rows at the gate's kept positions.
    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame, bufs: &Buffers) -> Result<Value> {
        ensure!(
            frame.has(self.out_level),
            "internal: gate {} ran before its set was built",
            self.gate
        );
        let (from, to) = (&frame.sets[self.in_level], &frame.sets[self.out_level]);
        let x = inputs[0].data();
        let mut rows = bufs.take_for_writing(to.len() * self.c);
        for (row, &i) in rows.chunks_exact_mut(self.c).zip(&to.coords) {
            let n = from.index[i as usize] as usize;
            row.copy_from_slice(&x[n * self.c..(n + 1) * self.c]);
        }
        Ok(Value::tokens(self.out_level, self.c, rows))
    }

    /// The head's multiply-adds on the input level's whole map, whatever
    /// is active: as the GPU runs it (the mean field reads every
    /// neighbour). The CPU computes a per-token head at the active
    /// positions only, so this overstates its work there.
    fn cost(&self, _tokens: &[usize]) -> u64 {
        self.spec.head.macs(self.h, self.w)
    }

    fn gate(&self) -> Option<&Gate> {
        Some(self)
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        let mut arrays = vec![Cow::Borrowed(&self.packed.values[..])];
        arrays.extend(self.fill.as_deref().map(Cow::Borrowed));
        Some(arrays)
    }

    /// The input scattered to its map, the head's convs (ping-ponging
    /// between two scratch maps), the unary costs, the mean-field steps,
    /// the gate's level, then its rows: as [`Gate::keeps`] and
    /// [`Op::eval`] compute them.
    fn record(&self, io: &mut StepIo<'_>, arrays: &[u64]) -> Result<Shape> {
        let (level, x) = io.tokens(0, self.c, "Gate")?;
        let (c, hw) = (self.c, self.h * self.w);
        let widest = self
            .packed
            .layers
            .iter()
            .map(|l| l.cout)
            .fold(c, usize::max);
        let mut maps = [io.scratch(widest * hw)?, io.scratch(widest * hw)?];
        io.launch(
            MAP,
            c * hw,
            &GateMapParams {
                x,
                set_in: io.set(level),
                fill: arrays.get(1).copied().unwrap_or(0),
                map: maps[0],
                c: c as i32,
                positions: hw as i32,
            },
        );
        let at = |offset: usize| arrays[0] + 4 * offset as u64;
        let mut channels = c;
        for l in &self.packed.layers {
            io.launch(
                CONV,
                l.cout * hw,
                &GateConvParams {
                    input: maps[0],
                    w: at(l.weight),
                    b: at(l.bias),
                    out: maps[1],
                    cin: l.cin as i32,
                    h: self.h as i32,
                    w_: self.w as i32,
                    cout: l.cout as i32,
                    k: l.k as i32,
                    dil: l.dilation as i32,
                    groups: l.groups as i32,
                    relu: i32::from(l.relu),
                },
            );
            maps.swap(0, 1);
            channels = l.cout;
        }
        let (unary, energies, pull) = (io.scratch(hw)?, io.scratch(hw)?, io.scratch(hw)?);
        let spec = &self.spec;
        io.launch(
            UNARY,
            hw,
            &GateUnaryParams {
                hx: maps[0],
                params: at(self.packed.per_token),
                unary,
                energies,
                pull,
                shift: io.shift(self.gate),
                hc: channels as i32,
                positions: hw as i32,
                hidden: self.packed.hidden as i32,
                tau: spec.tau,
            },
        );
        if spec.steps > 0 && spec.lambda != 0.0 {
            for step in 0..spec.steps {
                for update_pull in [0, 1] {
                    // No pull after the last step (cpu::mean_field).
                    if update_pull == 1 && step + 1 == spec.steps {
                        continue;
                    }
                    io.launch(
                        FIELD,
                        hw,
                        &GateFieldParams {
                            unary,
                            energies,
                            pull,
                            h: self.h as i32,
                            w: self.w as i32,
                            eight: i32::from(spec.neighbourhood == Neighbourhood::Eight),
                            update_pull,
                            lambda: spec.lambda,
                            tau: spec.tau,
                        },
                    );
                }
            }
        }
        io.launch(
            tokens::LEVEL,
            hw,
            &LevelParams {
                set_in: io.set(level),
                list_in: io.list(level),
                count_in: io.count(level),
                set_out: io.set(self.out_level),
                list_out: io.list(self.out_level),
                count_out: io.count(self.out_level),
                energies,
                held: io.held(level),
                map_h: self.h as i32,
                map_w: self.w as i32,
                in_h: self.h as i32,
                in_w: self.w as i32,
                stride: 1,
                rule: 4,
                ..LevelParams::default()
            },
        );
        let y = io.output(hw * c)?;
        io.launch(
            ROWS,
            hw * c,
            &GateRowsParams {
                x,
                set_in: io.set(level),
                list: io.list(self.out_level),
                count: io.count(self.out_level),
                y,
                c: c as i32,
                rows: hw as i32,
            },
        );
        Ok(Shape::Tokens {
            level: self.out_level,
            c,
        })
    }
}

/// `GateMapParams` of `gate.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GateMapParams {
    x: u64,
    set_in: u64,
    fill: u64,
    map: u64,
    c: i32,
    positions: i32,
}

/// `GateConvParams` of `gate.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GateConvParams {
    input: u64,
    w: u64,
    b: u64,
    out: u64,
    cin: i32,
    h: i32,
    w_: i32,
    cout: i32,
    k: i32,
    dil: i32,
    groups: i32,
    relu: i32,
}

/// `GateUnaryParams` of `gate.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GateUnaryParams {
    hx: u64,
    params: u64,
    unary: u64,
    energies: u64,
    pull: u64,
    shift: u64,
    hc: i32,
    positions: i32,
    hidden: i32,
    tau: f32,
}

/// `GateFieldParams` of `gate.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GateFieldParams {
    unary: u64,
    energies: u64,
    pull: u64,
    h: i32,
    w: i32,
    eight: i32,
    update_pull: i32,
    lambda: f32,
    tau: f32,
}

/// `GateRowsParams` of `gate.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GateRowsParams {
    x: u64,
    set_in: u64,
    list: u64,
    count: u64,
    y: u64,
    c: i32,
    rows: i32,
}

// SAFETY: repr(C) addresses, i32s and f32s, as in gate.cu.
unsafe impl KernelArgs for GateMapParams {}
unsafe impl KernelArgs for GateConvParams {}
unsafe impl KernelArgs for GateUnaryParams {}
unsafe impl KernelArgs for GateFieldParams {}
unsafe impl KernelArgs for GateRowsParams {}

const MAP: Kernel = Kernel {
    family: Family::Gate,
    name: "sfx_gate_map",
};
const CONV: Kernel = Kernel {
    family: Family::Gate,
    name: "sfx_gate_conv",
};
const UNARY: Kernel = Kernel {
    family: Family::Gate,
    name: "sfx_gate_unary",
};
const FIELD: Kernel = Kernel {
    family: Family::Gate,
    name: "sfx_gate_field",
};
const ROWS: Kernel = Kernel {
    family: Family::Gate,
    name: "sfx_gate_rows",
};
