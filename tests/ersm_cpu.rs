//! The CPU energy layer against a direct, naive transcription of DESIGN.md's equations.

use ersm::ersm::{cpu, EnergySpec, FeatureMap, HeadConv, Neighbourhood, UnaryHead};
use proptest::prelude::*;

/// The unary head written out as plainly as possible, in f64: `x` is `c × h × w`.
fn naive_unary(x: &[f64], c: usize, h: usize, w: usize, head: &UnaryHead) -> Vec<f64> {
    let at = |ch: usize, y: usize, xx: usize| x[ch * h * w + y * w + xx];
    let mut u = vec![0.0f64; h * w];
    if let UnaryHead::Conv { layers, head } = head {
        let (mut map, mut cin) = (x.to_vec(), c);
        for l in layers {
            let (cin_g, cout_g) = (cin / l.groups, l.cout / l.groups);
            let (d, r) = (l.dilation as i64, (l.dilation * (l.k / 2)) as i64);
            let mut out = vec![0.0f64; l.cout * h * w];
            for co in 0..l.cout {
                for y in 0..h as i64 {
                    for xx in 0..w as i64 {
                        let mut s = l.bias[co] as f64;
                        for ci in 0..cin_g {
                            let ch = co / cout_g * cin_g + ci;
                            for ky in 0..l.k as i64 {
                                for kx in 0..l.k as i64 {
                                    let (iy, ix) = (y + d * ky - r, xx + d * kx - r);
                                    if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64 {
                                        continue;
                                    }
                                    let wt = l.weight[((co * cin_g + ci) * l.k + ky as usize)
                                        * l.k
                                        + kx as usize];
                                    s += wt as f64 * map[(ch * h + iy as usize) * w + ix as usize];
                                }
                            }
                        }
                        out[(co * h + y as usize) * w + xx as usize] =
                            if l.relu { s.max(0.0) } else { s };
                    }
                }
            }
            map = out;
            cin = l.cout;
        }
        return naive_unary(&map, cin, h, w, head);
    }
    for y in 0..h {
        for xx in 0..w {
            u[y * w + xx] = match head {
                UnaryHead::Linear { w: wt, b } => {
                    (0..c).map(|ch| wt[ch] as f64 * at(ch, y, xx)).sum::<f64>() + *b as f64
                }
                UnaryHead::TwoLayer { w1, b1, w2, b2 } => {
                    let mut s = *b2 as f64;
                    for k in 0..b1.len() {
                        let hk: f64 = (0..c)
                            .map(|ch| w1[k * c + ch] as f64 * at(ch, y, xx))
                            .sum::<f64>()
                            + b1[k] as f64;
                        s += w2[k] as f64 * hk.max(0.0);
                    }
                    s
                }
                UnaryHead::Conv { .. } => unreachable!("handled above"),
            };
        }
    }
    u
}

/// The equations written out as plainly as possible, in f64.
fn naive(x: &[f32], c: usize, h: usize, w: usize, spec: &EnergySpec) -> (Vec<f64>, Vec<u32>) {
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let u = naive_unary(&x64, c, h, w, &spec.head);
    let sigma = |z: f64| 1.0 / (1.0 + (-z).exp());
    let tau = spec.tau as f64;
    let lambda = spec.lambda as f64;
    let mut q: Vec<f64> = u.iter().map(|&ui| sigma(-ui / tau)).collect();
    let mut e = u.clone();
    for _ in 0..spec.steps {
        for y in 0..h as i64 {
            for xx in 0..w as i64 {
                let mut s = 0.0;
                for dy in -1i64..=1 {
                    for dx in -1i64..=1 {
                        let four = dy == 0 || dx == 0;
                        if (dy, dx) == (0, 0)
                            || (spec.neighbourhood == Neighbourhood::Four && !four)
                        {
                            continue;
                        }
                        let (ny, nx) = (y + dy, xx + dx);
                        if ny >= 0 && nx >= 0 && ny < h as i64 && nx < w as i64 {
                            s += 1.0 - 2.0 * q[(ny * w as i64 + nx) as usize];
                        }
                    }
                }
                let i = (y * w as i64 + xx) as usize;
                e[i] = u[i] + lambda * s;
            }
        }
        q = e.iter().map(|&ei| sigma(-ei / tau)).collect();
    }
    let mut kept: Vec<u32> = (0..h * w)
        .filter(|&i| e[i] < 0.0)
        .map(|i| i as u32)
        .collect();
    if kept.is_empty() {
        let min = e.iter().cloned().fold(f64::INFINITY, f64::min);
        kept.push(e.iter().position(|&v| v == min).unwrap() as u32);
    }
    (e, kept)
}

/// A per-token head (linear or two-layer) reading `c` channels.
fn token_head(c: usize) -> impl Strategy<Value = UnaryHead> {
    let linear = (prop::collection::vec(-1.0f32..1.0, c), -0.5f32..0.5)
        .prop_map(|(w, b)| UnaryHead::Linear { w, b });
    let two = (1usize..5).prop_flat_map(move |hid| {
        (
            prop::collection::vec(-1.0f32..1.0, hid * c),
            prop::collection::vec(-0.5f32..0.5, hid),
            prop::collection::vec(-1.0f32..1.0, hid),
            -0.5f32..0.5,
        )
            .prop_map(|(w1, b1, w2, b2)| UnaryHead::TwoLayer { w1, b1, w2, b2 })
    });
    prop_oneof![linear, two]
}

/// A conv layer reading `cin` channels: dense, depthwise or (when `cin` is
/// even) two groups; kernel 1, 3 or 5.
fn head_conv(cin: usize) -> impl Strategy<Value = HeadConv> {
    let mut groups = vec![1, cin];
    if cin.is_multiple_of(2) {
        groups.push(2);
    }
    (
        prop::sample::select(groups),
        prop::sample::select(vec![1usize, 3, 5]),
        // Nine outputs a group: a full block of eight summed in registers
        // and one more.
        prop::sample::select(vec![1usize, 2, 3, 9]),
        any::<bool>(),
        // Spacings wider than small maps too: those taps read padding only.
        prop::sample::select(vec![1usize, 1, 2, 3, 8]),
    )
        .prop_flat_map(move |(g, k, per_group_out, relu, dilation)| {
            let cout = g * per_group_out;
            (
                prop::collection::vec(-0.5f32..0.5, cout * (cin / g) * k * k),
                prop::collection::vec(-0.5f32..0.5, cout),
            )
                .prop_map(move |(weight, bias)| HeadConv {
                    cin,
                    cout,
                    k,
                    groups: g,
                    dilation,
                    weight,
                    bias,
                    relu,
                })
        })
}

/// One or two conv layers, then a per-token head on their output.
fn conv_head(c: usize) -> impl Strategy<Value = UnaryHead> {
    head_conv(c).prop_flat_map(|first| {
        let c1 = first.cout;
        prop::option::of(head_conv(c1)).prop_flat_map(move |second| {
            let mut layers = vec![first.clone()];
            layers.extend(second);
            let last = layers[layers.len() - 1].cout;
            token_head(last).prop_map(move |head| UnaryHead::Conv {
                layers: layers.clone(),
                head: Box::new(head),
            })
        })
    })
}

fn spec_strategy(c: usize) -> impl Strategy<Value = EnergySpec> {
    (
        prop_oneof![token_head(c), conv_head(c)],
        0.0f32..1.0,
        0.2f32..3.0,
        0u32..5,
        any::<bool>(),
    )
        .prop_map(|(head, lambda, tau, steps, eight)| EnergySpec {
            head,
            lambda,
            tau,
            steps,
            neighbourhood: if eight {
                Neighbourhood::Eight
            } else {
                Neighbourhood::Four
            },
        })
}

fn case() -> impl Strategy<Value = (usize, usize, usize, Vec<f32>, EnergySpec)> {
    (
        1usize..6,
        prop_oneof![Just(1usize), 1usize..12],
        prop_oneof![Just(1usize), 1usize..12],
    )
        .prop_flat_map(|(c, h, w)| {
            (
                Just(c),
                Just(h),
                Just(w),
                prop::collection::vec(-2.0f32..2.0, c * h * w),
                spec_strategy(c),
            )
        })
}

/// Tokens whose naive energy is this close to 0 may flip with f32 rounding.
const MARGIN: f64 = 1e-4;

proptest! {
    // Shrunk failures are kept as named tests below rather than files in the tree.
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn cpu_matches_naive_equations((c, h, w, x, spec) in case()) {
        let (e_ref, kept_ref) = naive(&x, c, h, w, &spec);
        let mask = cpu::compute(FeatureMap::new(&x, c, h, w).unwrap(), &spec).unwrap();
        for (i, (&a, &b)) in mask.energies.iter().zip(&e_ref).enumerate() {
            prop_assert!((a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "energy {i}: {a} vs {b}");
        }
        prop_assume!(e_ref.iter().all(|e| e.abs() > MARGIN));
        if e_ref.iter().any(|&e| e < 0.0) {
            prop_assert_eq!(&mask.kept, &kept_ref);
        } else {
            // No negative energy: the lowest is kept. f32 and f64 may order near-ties
            // differently, so check the pick against the CPU's own energies (first
            // lowest in raster order) and that it is a minimum of the naive ones too.
            prop_assert_eq!(mask.kept.len(), 1);
            let k = mask.kept[0] as usize;
            let first_min = (0..mask.energies.len()).find(|&i| mask.energies.iter().all(|&e| mask.energies[i] <= e)).unwrap();
            prop_assert_eq!(k, first_min);
            let naive_min = e_ref.iter().cloned().fold(f64::INFINITY, f64::min);
            prop_assert!(e_ref[k] - naive_min <= 1e-4 * (1.0 + naive_min.abs()), "kept {k} is not a naive minimum");
        }
        // Gathered rows are the kept tokens' feature vectors, unscaled, in raster order.
        prop_assert_eq!(mask.features.len(), mask.kept.len() * c);
        for (n, &i) in mask.kept.iter().enumerate() {
            for ch in 0..c {
                prop_assert_eq!(mask.features[n * c + ch], x[ch * h * w + i as usize]);
            }
        }
    }
}

#[test]
fn keeps_lowest_token_when_none_is_negative() {
    let x = vec![1.0, 2.0, 0.5, 0.5, 3.0, 4.0];
    let spec = EnergySpec {
        head: UnaryHead::Linear {
            w: vec![1.0],
            b: 1.0,
        },
        lambda: 0.0,
        tau: 1.0,
        steps: 0,
        neighbourhood: Neighbourhood::Four,
    };
    let mask = cpu::compute(FeatureMap::new(&x, 1, 2, 3).unwrap(), &spec).unwrap();
    // Two tokens tie at the lowest energy: the first in raster order wins.
    assert_eq!(mask.kept, vec![2]);
    assert_eq!(mask.features, vec![0.5]);
}

/// On a stream the held tokens (where the last frame's faces were) are
/// kept whatever their energy, beside the negative ones, and gathered in
/// raster order; the lowest one alone only when nothing is held; a held
/// index outside the map is an error naming it.
#[test]
fn held_tokens_are_kept_beside_the_negative_ones() {
    // energies = x - 1.5: tokens 0 and 2 negative
    let x = vec![1.0, 2.0, 0.5, 3.0, 4.0, 5.0];
    let spec = EnergySpec {
        head: UnaryHead::Linear {
            w: vec![1.0],
            b: -1.5,
        },
        lambda: 0.0,
        tau: 1.0,
        steps: 0,
        neighbourhood: Neighbourhood::Four,
    };
    let fm = FeatureMap::new(&x, 1, 2, 3).unwrap();
    let mask = cpu::compute_holding(fm, &spec, &[2, 4, 4, 5]).unwrap();
    assert_eq!(mask.kept, vec![0, 2, 4, 5]);
    assert_eq!(mask.features, vec![1.0, 0.5, 4.0, 5.0]);
    assert_eq!(cpu::compute(fm, &spec).unwrap().kept, vec![0, 2]);
    // Nothing negative: the held ones alone, not the lowest beside them.
    assert_eq!(cpu::select_holding(&[1.0, 0.5, 2.0], &[2]), vec![2]);
    assert_eq!(cpu::select_holding(&[1.0, 0.5, 2.0], &[]), vec![1]);
    let err = cpu::compute_holding(fm, &spec, &[1, 6]).unwrap_err();
    assert!(err.to_string().contains("held token 6"), "{err}");
}

#[test]
fn pairwise_term_fills_holes_and_removes_specks() {
    // A 5×5 map whose unary costs are mildly positive except a ring of strongly
    // negative tokens: with λ large enough, the centre (surrounded) is kept too.
    let (h, w) = (5, 5);
    let mut u = vec![0.3f32; h * w];
    for y in 1..4 {
        for x in 1..4 {
            if (y, x) != (2, 2) {
                u[y * w + x] = -2.0;
            }
        }
    }
    let spec = |lambda| EnergySpec {
        head: UnaryHead::Linear {
            w: vec![1.0],
            b: 0.0,
        },
        lambda,
        tau: 1.0,
        steps: 3,
        neighbourhood: Neighbourhood::Four,
    };
    let without = cpu::compute(FeatureMap::new(&u, 1, h, w).unwrap(), &spec(0.0)).unwrap();
    let with = cpu::compute(FeatureMap::new(&u, 1, h, w).unwrap(), &spec(0.5)).unwrap();
    assert!(!without.kept.contains(&12));
    assert!(
        with.kept.contains(&12),
        "centre should be pulled in: {:?}",
        with.kept
    );
}

#[test]
fn rejects_mismatched_channels_and_bad_shapes() {
    let spec = EnergySpec {
        head: UnaryHead::Linear {
            w: vec![1.0, 2.0],
            b: 0.0,
        },
        lambda: 0.1,
        tau: 1.0,
        steps: 1,
        neighbourhood: Neighbourhood::Eight,
    };
    let x = vec![0.0; 12];
    let err = cpu::compute(FeatureMap::new(&x, 3, 2, 2).unwrap(), &spec).unwrap_err();
    assert!(err.to_string().contains("2 channels"), "{err}");
    assert!(FeatureMap::new(&x, 2, 2, 2).is_err());
}

/// Shrunk from a proptest failure: every energy positive, many tokens tied at
/// the minimum (zero features), where f32 and f64 break the tie differently.
#[test]
fn near_tie_at_the_minimum_keeps_the_first_lowest() {
    let (c, h, w) = (5, 2, 8);
    let mut x = vec![0.0f32; c * h * w];
    x[0] = 1.5890739;
    x[8] = 0.34381357;
    x[15] = 1.417257;
    let spec = EnergySpec {
        head: UnaryHead::TwoLayer {
            w1: vec![-0.9356569, 0.0, 0.46404833, -0.3464463, -0.20132752],
            b1: vec![0.0],
            w2: vec![0.7798001],
            b2: 0.24129045,
        },
        lambda: 0.9383112,
        tau: 0.2,
        steps: 3,
        neighbourhood: Neighbourhood::Four,
    };
    let mask = cpu::compute(FeatureMap::new(&x, c, h, w).unwrap(), &spec).unwrap();
    assert!(mask.energies.iter().all(|&e| e >= 0.0));
    let min = mask.energies.iter().cloned().fold(f32::INFINITY, f32::min);
    let first = mask.energies.iter().position(|&e| e == min).unwrap();
    assert_eq!(mask.kept, vec![first as u32]);
}

/// The CPU energy layer keeps its work buffers (padded grids, layer outputs,
/// sums) across frames on each thread: a frame computed after another, its
/// buffers full of that frame's values, gives the bits a fresh thread gives.
#[test]
fn a_frame_after_another_gives_the_bits_of_a_first_frame() {
    let (c, h, w) = (4usize, 9usize, 13usize);
    let wave = |n: usize, f: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * f).sin()).collect() };
    let depthwise = |d: usize| HeadConv {
        cin: c,
        cout: c,
        k: 3,
        groups: c,
        dilation: d,
        weight: wave(c * 9, 0.7),
        bias: vec![0.1; c],
        relu: false,
    };
    let pointwise = HeadConv {
        cin: c,
        cout: c,
        k: 1,
        groups: 1,
        dilation: 1,
        weight: wave(c * c, 1.3),
        bias: vec![-0.2; c],
        relu: true,
    };
    let spec = EnergySpec {
        head: UnaryHead::Conv {
            layers: vec![depthwise(1), pointwise.clone(), depthwise(2), pointwise],
            head: Box::new(UnaryHead::TwoLayer {
                w1: wave(3 * c, 0.9),
                b1: vec![0.05; 3],
                w2: vec![0.5, -0.7, 0.3],
                b2: 0.1,
            }),
        },
        lambda: 0.25,
        tau: 1.0,
        steps: 2,
        neighbourhood: Neighbourhood::Four,
    };
    // Large values first, so anything the second frame read from them shows.
    let first: Vec<f32> = (0..c * h * w).map(|i| 1e3 + i as f32).collect();
    let second = wave(c * h * w, 0.37);
    let fresh = {
        let (x, spec) = (second.clone(), spec.clone());
        std::thread::spawn(move || {
            cpu::compute(FeatureMap::new(&x, c, h, w).unwrap(), &spec).unwrap()
        })
        .join()
        .unwrap()
    };
    cpu::compute(FeatureMap::new(&first, c, h, w).unwrap(), &spec).unwrap();
    let after = cpu::compute(FeatureMap::new(&second, c, h, w).unwrap(), &spec).unwrap();
    let bits = |e: &[f32]| e.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&after.energies), bits(&fresh.energies));
    assert_eq!(after.kept, fresh.kept);
}
