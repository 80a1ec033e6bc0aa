//! `ersm inspect`: where a package is cut, its energy layer, the prefix's
//! ops and each sparse suffix step with its cost.

use super::CutModel;
use std::fmt::Write;

impl CutModel {
    /// A description of the package for people: the cut, the energy layer,
    /// the sparse semantics, the baseline and fallback, the prefix's ops, the
    /// suffix's steps with their dense cost, and the suffix's cost at `keep`.
    pub fn describe(&self, keep: f64) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_description(&mut s, keep);
        s
    }

    fn write_description(&self, s: &mut String, keep: f64) -> std::fmt::Result {
        let e = &self.energy;
        writeln!(
            s,
            "model      {} ({})",
            self.manifest.name,
            self.origin.display()
        )?;
        writeln!(
            s,
            "input      {} {:?}",
            self.manifest.input.name, self.manifest.input.shape
        )?;
        writeln!(
            s,
            "cut        energy node '{}' reads '{}' ({}×{}×{} = {} tokens of {} channels)",
            self.cut.node,
            self.cut.input,
            self.cut.c,
            self.cut.h,
            self.cut.w,
            self.cut.h * self.cut.w,
            self.cut.c
        )?;
        writeln!(
            s,
            "energy     λ = {}, τ = {}, T = {}, {:?}-neighbourhood, {} head ({:.2} M multiply-adds)",
            e.lambda,
            e.tau,
            e.steps,
            e.neighbourhood,
            e.head.describe(),
            e.head.macs(self.cut.h, self.cut.w) as f64 / 1e6
        )?;
        let filled = self.plan.fill_count();
        let hold = if filled == 0 {
            "zero".to_string()
        } else {
            let s = if filled == 1 { "" } else { "s" };
            format!("the package's fill vectors ({filled} tensor{s}; zero elsewhere)")
        };
        writeln!(
            s,
            "sparse     dropped tokens hold {hold}; strided layers follow the \"{}\" rule",
            self.plan.stride_rule.as_str()
        )?;
        match &self.baseline {
            Some(b) => writeln!(
                s,
                "baseline   the original network, {} (shares the prefix)",
                b.origin.display()
            )?,
            None => writeln!(s, "baseline   this network with every token kept")?,
        }
        if let Some(f) = &self.manifest.fallback {
            writeln!(
                s,
                "fallback   with --fallback, re-run densely when the top-1 margin is below {}",
                f.margin
            )?;
        }
        writeln!(
            s,
            "\nprefix ({} ONNX nodes, dense in tract):",
            self.prefix_ops.len()
        )?;
        writeln!(s, "  {}", self.prefix_ops.join(" → "))?;
        writeln!(s, "\nsuffix ({} sparse steps):", self.plan.steps.len())?;
        for step in &self.plan.steps {
            let level = self.plan.slot_shapes[step.output]
                .level()
                .map(|l| format!("{}×{}", self.plan.levels[l].h, self.plan.levels[l].w))
                .unwrap_or_else(|| "dense".into());
            let full: Vec<usize> = self.plan.levels.iter().map(|l| l.h * l.w).collect();
            let name = step.label();
            writeln!(
                s,
                "  {:<22} {:<28} {:>9}  {:>10} MACs",
                name,
                step.node,
                level,
                step.op.cost(&full)
            )?;
        }
        // Estimate: every level keeps the same fraction (strided levels keep at least that).
        let est: Vec<usize> = self
            .plan
            .levels
            .iter()
            .map(|l| ((l.h * l.w) as f64 * keep).ceil() as usize)
            .collect();
        let (dense, sparse) = (self.plan.dense_cost(), self.plan.cost(&est));
        writeln!(
            s,
            "\nsuffix cost: {:.3} GFLOPs dense, {:.3} GFLOPs at keep {:.2} ({:.2}x fewer; assumes the same keep ratio at every resolution)",
            2.0 * dense as f64 / 1e9,
            2.0 * sparse as f64 / 1e9,
            keep,
            dense as f64 / sparse.max(1) as f64
        )?;
        Ok(())
    }
}
