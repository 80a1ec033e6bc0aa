//! Recording a frame's step launches once per input address: each step's
//! op records its own launch (its GPU twin, `Op::record`) on a [`StepIo`]
//! holding its inputs' addresses; this loop hands out the output buffers,
//! frees them after their last reader (from the plan's schedule), fuses the
//! residual Adds the plan marked into the kernel before them, and relabels
//! reshapes instead of copying.

use super::workspace::{keep_newest, Recorded, Recorder, Workspace};
use super::{Device, GpuSuffix};
use crate::sparse::launch::{Launch, StepIo};
use crate::sparse::value::Shape;
use anyhow::{Context, Result};

/// A value of a frame's steps while they are recorded, until its last
/// reader: its shape, its address, and its pool buffer (`None` for the
/// gathered rows, read where another component left them).
type Slot = Option<(Shape, u64, Option<usize>)>;

impl<D: Device> GpuSuffix<D> {
    /// The recorded launches for rows at `rows`, recorded now if this is
    /// the first frame from there: its index in `ws.recorded`.
    pub(super) fn recorded(
        &self,
        ws: &mut Workspace<D::Buf, D::Graph>,
        rows: u64,
    ) -> Result<usize> {
        if let Some(i) = ws.recorded.iter().position(|r| r.rows == rows) {
            return Ok(i);
        }
        let counts = self.device.ptr(&ws.counts);
        let ws_addresses = self.frame_addresses(ws);
        let tables: Vec<u64> = {
            let at = self.device.ptr(&ws.tables);
            self.layout
                .tables
                .iter()
                .map(|&t| at + 4 * t as u64)
                .collect()
        };
        let at = self.device.ptr(&ws.sets);
        let lists: Vec<u64> = (0..self.levels.len())
            .map(|l| at + 4 * self.layout.list(l) as u64)
            .collect();
        let sets: Vec<u64> = (0..self.levels.len())
            .map(|l| at + 4 * self.layout.index(l) as u64)
            .collect();
        let at = self.device.ptr(&ws.stream);
        let held: Vec<u64> = (0..self.levels.len())
            .map(|l| at + 4 * self.layout.held(l) as u64)
            .collect();
        let shifts: Vec<u64> = (0..self.layout.gates)
            .map(|g| at + 4 * self.layout.shift(g) as u64)
            .collect();
        let mut rec = Recorder::new(&self.device, &mut ws.pool);
        let mut launches = Vec::new();
        let mut slots: Vec<Slot> = (0..self.slots).map(|_| None).collect();
        slots[0] = Some((
            Shape::Tokens {
                level: 0,
                c: self.channels,
            },
            rows,
            None,
        ));
        for (k, &slot) in self.taps.iter().enumerate() {
            slots[slot] = Some((
                self.tap_shapes[k].clone(),
                self.device.ptr(&ws.taps[k]),
                None,
            ));
        }
        let mut i = 0;
        while i < self.steps.len() {
            let s = &self.steps[i];
            let context = || format!("GPU suffix, node '{}'", s.node);
            // A reshape of a value read by nothing after it relabels the
            // value's buffer: no launch, no copy.
            if let &[x] = &s.inputs[..] {
                if self.last_use[x] == i {
                    if let Some((shape, at, Some(buf))) = &slots[x] {
                        if let Some(out) = s.op.relabel(shape) {
                            let out = out.with_context(context)?;
                            slots[s.output] = Some((out, *at, Some(*buf)));
                            slots[x] = None;
                            i += 1;
                            continue;
                        }
                    }
                }
            }
            let inputs = s
                .inputs
                .iter()
                .enumerate()
                .map(|(k, &x)| {
                    let (shape, at, _) = slots[x]
                        .as_ref()
                        .with_context(|| format!("input {k} is not computed"))?;
                    Ok((shape.clone(), *at))
                })
                .collect::<Result<Vec<_>>>()
                .with_context(context)?;
            let residual = self.residual[i]
                .and_then(|r| slots[r].as_ref().map(|(shape, at, _)| (shape.clone(), *at)));
            let mut io = StepIo {
                inputs,
                capacity: &self.layout.positions,
                counts,
                tables: &tables,
                lists: &lists,
                sets: &sets,
                held: &held,
                shifts: &shifts,
                residual,
                fused: false,
                out: None,
                scratch: Vec::new(),
                pool: &mut rec,
                launches: &mut launches,
                step: i,
            };
            let shape = s.op.record(&mut io, &s.arrays).with_context(context)?;
            let (fused, out, scratch) = (io.fused, io.out, io.scratch);
            let (at, buf) = out
                .context("the step recorded no output")
                .with_context(context)?;
            for b in scratch {
                rec.release(b);
            }
            // After a gate, the levels and rulebooks it was holding back.
            if let Some(g) = s.op.gate() {
                for (kernel, threads, args) in self.frame_launches(ws_addresses, None, Some(g.gate))
                {
                    launches.push(Launch {
                        step: i,
                        kernel,
                        threads,
                        args,
                    });
                }
            }
            // With the Add fused, its output is the kernel's.
            let last = if fused { i + 1 } else { i };
            slots[self.steps[last].output] = Some((shape, at, Some(buf)));
            for j in i..=last {
                for &x in &self.steps[j].inputs {
                    if self.last_use[x] == j {
                        if let Some((_, _, Some(b))) = slots[x].take() {
                            rec.release(b);
                        }
                    }
                }
            }
            i = last + 1;
        }
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for &o in &self.outputs {
            let (shape, _, out) = slots[o]
                .clone()
                .context("a suffix output was never computed")?;
            outputs.push((shape, out));
        }
        let pool_mb = ws.pool.iter().map(|(_, n)| n).sum::<usize>() as f64 * 4.0 / 1e6;
        log::info!(
            "GPU suffix: {} launches recorded for rows at {rows:#x}; {} output buffers, {pool_mb:.1} MB",
            launches.len(),
            ws.pool.len()
        );
        keep_newest(
            &mut ws.recorded,
            Recorded {
                rows,
                launches,
                outputs,
            },
        );
        Ok(ws.recorded.len() - 1)
    }
}
