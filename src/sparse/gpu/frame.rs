//! A frame's token sets and rulebooks on the device: where each lies in the
//! workspace ([`FrameLayout`], fixed at load), the launches that build them
//! from a kept list in device memory (`tokens.cu`, the GPU twins of
//! `sparse/tokens.rs` and `sparse/rulebook.rs`), and the host-side writes
//! and reads around them.

use super::device::words_as_f32;
use super::workspace::Workspace;
use super::{Device, DeviceTokens, GpuSuffix};
use crate::sparse::frame::Frame;
use crate::sparse::launch::{Args, Kernel};
use crate::sparse::plan::Plan;
use crate::sparse::rulebook::{self, Rulebook, RulebookParams};
use crate::sparse::tokens::{self, LevelParams, StrideRule, TokenSet};
use anyhow::{ensure, Result};

/// Where a workspace holds a frame's sets, counts and tables on the device.
#[derive(Clone, Copy, Debug)]
pub(super) struct FrameAddresses {
    sets: u64,
    counts: u64,
    tables: u64,
}

/// The gate each level waits for (`None`: built from the kept list before
/// the steps): its own, or the latest its parents wait for.
pub(super) fn behind_gates(levels: &[crate::sparse::frame::Level]) -> Vec<Option<usize>> {
    let mut behind: Vec<Option<usize>> = Vec::with_capacity(levels.len());
    for l in levels {
        let b = match (l.gate, l.parent) {
            (Some(g), _) => Some(g),
            (None, Some(p)) => behind[p].max(l.merge.and_then(|m| behind[m])),
            (None, None) => None,
        };
        behind.push(b);
    }
    behind
}

/// Where each level's sets and each rulebook's table sit in the frame's
/// device buffers, fixed at load: every level sized for all its positions.
#[derive(Clone, Debug, Default)]
pub(super) struct FrameLayout {
    /// Positions (`h · w`) of each level.
    pub positions: Vec<usize>,
    /// Offset of each level's index map, then of its token list (the two
    /// of a level lie side by side), in the sets buffer.
    sets: Vec<usize>,
    /// Offset of each rulebook's table in the tables buffer.
    pub tables: Vec<usize>,
    pub sets_len: usize,
    pub tables_len: usize,
    /// The stream buffer: each level's held flags (one `u32` per position),
    /// then each gate's shift (one `f32`).
    held: Vec<usize>,
    /// Offset of the first gate's shift in the stream buffer.
    shifts: usize,
    pub gates: usize,
    pub stream_len: usize,
}

impl FrameLayout {
    /// Offset of level `l`'s index map in the sets buffer.
    pub fn index(&self, l: usize) -> usize {
        self.sets[l]
    }

    /// Offset of level `l`'s token list in the sets buffer.
    pub fn list(&self, l: usize) -> usize {
        self.sets[l] + self.positions[l]
    }

    /// Offset of level `l`'s held flags in the stream buffer.
    pub fn held(&self, l: usize) -> usize {
        self.held[l]
    }

    /// Offset of gate `g`'s shift in the stream buffer.
    pub fn shift(&self, g: usize) -> usize {
        self.shifts + g
    }

    /// The layout of `plan`'s levels and rulebooks.
    pub fn new(plan: &Plan) -> FrameLayout {
        let mut l = FrameLayout::default();
        let mut held = 0;
        for level in &plan.levels {
            l.positions.push(level.h * level.w);
            l.sets.push(l.sets_len);
            l.sets_len += 2 * level.h * level.w;
            l.held.push(held);
            held += level.h * level.w;
        }
        l.shifts = held;
        l.gates = plan.gates().count();
        l.stream_len = held + l.gates;
        for r in &plan.rules {
            l.tables.push(l.tables_len);
            l.tables_len += l.positions[r.out_level] * r.window.kh * r.window.kw;
        }
        l
    }
}

impl<D: Device> GpuSuffix<D> {
    /// Builds a frame's token sets and rulebooks on the device from a kept
    /// list on the host, and reads them back: what the kernels build, for
    /// checking against [`Plan::frame`]. Those behind a gate are the
    /// steps' to build: theirs hold what the last frame left.
    pub fn frame_on_device(&self, kept: &[u32]) -> Result<Frame> {
        self.with_workspace(|ws| {
            let tokens = self.put_kept(ws, kept)?;
            self.build_frame(ws, tokens)?;
            let rows = self.read_counts(ws, Some(kept.len()))?;
            let words = |buf: &D::Buf, n: usize| -> Result<Vec<u32>> {
                Ok(self
                    .device
                    .download(buf, n)?
                    .into_iter()
                    .map(f32::to_bits)
                    .collect())
            };
            let sets = self.device_sets(ws, &rows)?;
            let all_tables = words(&ws.tables, self.layout.tables_len.max(1))?;
            let rulebooks = self
                .rules
                .iter()
                .enumerate()
                .map(|(r, key)| {
                    let taps = key.window.kh * key.window.kw;
                    let at = self.layout.tables[r];
                    Rulebook {
                        taps,
                        table: all_tables[at..at + rows[key.out_level] * taps].to_vec(),
                    }
                })
                .collect();
            Ok(Frame::complete(sets, rulebooks))
        })
    }

    /// Every level's token set as the device holds it, for the level
    /// `counts` read back.
    pub(super) fn device_sets(
        &self,
        ws: &Workspace<D::Buf, D::Graph>,
        counts: &[usize],
    ) -> Result<Vec<TokenSet>> {
        let all: Vec<u32> = self
            .device
            .download(&ws.sets, self.layout.sets_len)?
            .into_iter()
            .map(f32::to_bits)
            .collect();
        Ok(self
            .levels
            .iter()
            .enumerate()
            .map(|(l, level)| {
                let (index, list) = (self.layout.index(l), self.layout.list(l));
                TokenSet {
                    h: level.h,
                    w: level.w,
                    index: all[index..list].to_vec(),
                    coords: all[list..list + counts[l]].to_vec(),
                }
            })
            .collect())
    }

    /// Writes a kept list from the host where the workspace keeps one; its
    /// addresses.
    pub(super) fn put_kept(
        &self,
        ws: &mut Workspace<D::Buf, D::Graph>,
        kept: &[u32],
    ) -> Result<DeviceTokens> {
        ensure!(
            !kept.is_empty() && kept.len() <= self.layout.positions[0],
            "a kept list of {} tokens for {} positions",
            kept.len(),
            self.layout.positions[0]
        );
        self.device.write(&mut ws.kept, 0, &words_as_f32(kept))?;
        self.device
            .write(&mut ws.kept_count, 0, &[f32::from_bits(kept.len() as u32)])?;
        Ok(DeviceTokens {
            kept: self.device.ptr(&ws.kept),
            count: self.device.ptr(&ws.kept_count),
        })
    }

    /// Writes a host-built frame (each level's count and each rulebook's
    /// table) and its gathered rows into the workspace; the counts.
    pub(super) fn put_host_frame(
        &self,
        ws: &mut Workspace<D::Buf, D::Graph>,
        frame: &Frame,
        features: &[f32],
    ) -> Result<Vec<usize>> {
        let d = &self.device;
        d.write(&mut ws.input, 0, features)?;
        let counts = frame.counts();
        let bits: Vec<f32> = counts.iter().map(|&c| f32::from_bits(c as u32)).collect();
        d.write(&mut ws.counts, 0, &bits)?;
        for (r, rb) in frame.rulebooks.iter().enumerate() {
            d.write(
                &mut ws.tables,
                self.layout.tables[r],
                &words_as_f32(&rb.table),
            )?;
        }
        // Prefix maps are gathered at the levels' token lists, which the
        // device path's kernels build and the host path must upload; a
        // gate's kernels read the index maps too.
        if !self.taps.is_empty() || self.gated() {
            for (l, set) in frame.sets.iter().enumerate() {
                if !frame.has(l) {
                    continue;
                }
                d.write(
                    &mut ws.sets,
                    self.layout.list(l),
                    &words_as_f32(&set.coords),
                )?;
                if self.gated() {
                    d.write(
                        &mut ws.sets,
                        self.layout.index(l),
                        &words_as_f32(&set.index),
                    )?;
                }
            }
        }
        Ok(counts)
    }

    /// Where `ws` holds the frame's sets, counts and tables.
    pub(super) fn frame_addresses(&self, ws: &Workspace<D::Buf, D::Graph>) -> FrameAddresses {
        FrameAddresses {
            sets: self.device.ptr(&ws.sets),
            counts: self.device.ptr(&ws.counts),
            tables: self.device.ptr(&ws.tables),
        }
    }

    /// Launches the kernels that build every level's set and every rulebook
    /// not behind a gate into the workspace from the kept list at `tokens`;
    /// the counts stay on the device.
    pub(super) fn build_frame(
        &self,
        ws: &Workspace<D::Buf, D::Graph>,
        tokens: DeviceTokens,
    ) -> Result<()> {
        for (kernel, threads, args) in
            self.frame_launches(self.frame_addresses(ws), Some(tokens), None)
        {
            self.device.launch(kernel, threads, &args)?;
        }
        Ok(())
    }

    /// The launches building the levels and rulebooks that wait for gate
    /// `gate` (`None`: for no gate, level 0 from the kept list at `tokens`
    /// first), in order. A gate's own level is the gate's to build.
    pub(super) fn frame_launches(
        &self,
        at: FrameAddresses,
        tokens: Option<DeviceTokens>,
        gate: Option<usize>,
    ) -> Vec<(Kernel, usize, Args)> {
        let l = &self.layout;
        let index_at = |level: usize| at.sets + 4 * l.index(level) as u64;
        let list_at = |level: usize| at.sets + 4 * l.list(level) as u64;
        let count_at = |level: usize| at.counts + 4 * level as u64;
        let mut launches = Vec::new();
        for (i, level) in self.levels.iter().enumerate() {
            if self.behind[i] != gate || level.gate.is_some() {
                continue;
            }
            let mut p = LevelParams {
                set_out: index_at(i),
                list_out: list_at(i),
                count_out: count_at(i),
                map_h: level.h as i32,
                map_w: level.w as i32,
                ..LevelParams::default()
            };
            let kernel = match (level.parent, tokens) {
                (None, Some(tokens)) => {
                    p.list_in = tokens.kept;
                    p.count_in = tokens.count;
                    tokens::LEVEL0
                }
                (None, None) => continue,
                (Some(parent), _) => {
                    p.set_in = index_at(parent);
                    p.list_in = list_at(parent);
                    p.count_in = count_at(parent);
                    p.in_h = self.levels[parent].h as i32;
                    p.in_w = self.levels[parent].w as i32;
                    p.stride = level.stride as i32;
                    p.rule = match (level.merge, level.up, self.stride_rule) {
                        (Some(m), ..) => {
                            p.set_in2 = index_at(m);
                            3
                        }
                        (None, true, _) => 2,
                        (None, false, StrideRule::Any) => 0,
                        (None, false, StrideRule::Centre) => 1,
                    };
                    tokens::LEVEL
                }
            };
            launches.push((kernel, level.h * level.w, Args::of(&p)));
        }
        for (r, key) in self.rules.iter().enumerate() {
            if self.behind[key.in_level].max(self.behind[key.out_level]) != gate {
                continue;
            }
            let (out, inp) = (&self.levels[key.out_level], &self.levels[key.in_level]);
            let win = key.window;
            let p = RulebookParams {
                set_in: index_at(key.in_level),
                list_in: list_at(key.out_level),
                count_in: count_at(key.out_level),
                table: at.tables + 4 * l.tables[r] as u64,
                map_h: out.h as i32,
                map_w: out.w as i32,
                in_h: inp.h as i32,
                in_w: inp.w as i32,
                stride: win.stride as i32,
                kh: win.kh as i32,
                kw: win.kw as i32,
                pad_top: win.pad_top as i32,
                pad_left: win.pad_left as i32,
                transposed: i32::from(win.transposed),
            };
            launches.push((
                rulebook::KERNEL,
                out.h * out.w * win.kh * win.kw,
                Args::of(&p),
            ));
        }
        launches
    }

    /// Reads back the token count of each level, once everything launched
    /// has finished, and checks level 0's against the map (the kernels clamp
    /// to it, so a bad count cannot reach past a buffer, but it must not
    /// pass unreported). `expect` is the kept count when the host knows it,
    /// checked against what the kernels saw.
    pub(super) fn read_counts(
        &self,
        ws: &Workspace<D::Buf, D::Graph>,
        expect: Option<usize>,
    ) -> Result<Vec<usize>> {
        let rows: Vec<usize> = self
            .device
            .download(&ws.counts, self.levels.len())?
            .into_iter()
            .map(|c| c.to_bits() as usize)
            .collect();
        let all = self.layout.positions[0];
        ensure!(
            rows[0] > 0 && rows[0] <= all,
            "the kept list holds {} tokens of {all}",
            rows[0]
        );
        if let Some(n) = expect {
            ensure!(
                rows[0] == n,
                "the device saw {} kept tokens, the host {n}",
                rows[0]
            );
        }
        Ok(rows)
    }
}
