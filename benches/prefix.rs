//! The bundled face model's dense prefix (shared by ERSM and the dense
//! baseline, so every millisecond off it raises their ratio): ms per 640×480
//! frame on 1 and 2 threads, minimum and median over the rounds, with the
//! time per tract op. The minimum is the figure to compare between builds on
//! a shared machine: a neighbour's load only ever adds to a round.
//! Run: `cargo bench --bench prefix` (add `-- --quick` for fewer rounds).

use ersm::package::ModelPackage;
use ersm::threads::Threads;
use std::collections::BTreeMap;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 15 } else { 60 };
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/centerface_ersm");
    let m = ModelPackage::load(dir)?;
    let n: usize = m.prefix.input_shape.iter().product();
    // A smooth image in the model's input range, the same every round.
    let x: Vec<f32> = (0..n)
        .map(|i| 127.5 + 100.0 * ((i % 640) as f32 * 0.05 + (i / 640) as f32 * 0.03).sin())
        .collect();
    println!(
        "{} prefix, input {:?}, {rounds} rounds",
        m.model.manifest.name, m.prefix.input_shape
    );
    println!("{:>8} {:>10} {:>10}", "threads", "min ms", "median ms");
    for t in [1, 2] {
        let threads = Threads::new(t)?;
        let mut ms = Vec::new();
        let mut ops: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in 0..rounds + 3 {
            let start = Instant::now();
            std::hint::black_box(threads.install(|| m.prefix.run(&x))?);
            if r >= 3 {
                ms.push(start.elapsed().as_secs_f64() * 1e3);
                let mut round: BTreeMap<String, f64> = BTreeMap::new();
                for (op, shape, t) in threads.install(|| m.prefix.profile(&x))? {
                    *round.entry(format!("{op} {shape}")).or_default() += t;
                }
                for (op, t) in round {
                    ops.entry(op).or_default().push(t);
                }
            }
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        println!("{t:>8} {:>10.3} {:>10.3}", ms[0], ms[ms.len() / 2]);
        for (op, mut v) in ops {
            v.sort_by(|a, b| a.total_cmp(b));
            println!("{:>8} {:>10.3} {:>10.3}  {op}", "", v[0], v[v.len() / 2]);
        }
    }
    Ok(())
}
