//! Sampling on the device against a CPU reference of the engine's pipeline (in f64), on a
//! GPU. Ignored by default (CI has no GPU): `cargo test -p kernels-cuda --test sampling --
//! --include-ignored` on the GPU machine.
#![allow(clippy::unwrap_used, clippy::print_stderr, clippy::needless_range_loop)]

use half::bf16;
use kernels_cuda::{Gpu, KernelError, RowSampling, sample_rows};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu() -> Gpu {
    Gpu::new(0).expect("a CUDA device (these tests are for the GPU machine)")
}

/// The processed logit (the engine's `processed_row`, the mask after the penalty).
fn processed(row: &[f32], p: &RowSampling<'_>, sample_vocab: usize) -> Vec<f32> {
    let mut l = row.to_vec();
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; l.len()];
        for &t in p.history {
            let t = t as usize;
            if t < l.len() && !seen[t] {
                seen[t] = true;
                l[t] = if l[t] > 0.0 {
                    l[t] / p.repetition_penalty
                } else {
                    (l[t] * p.repetition_penalty).max(f32::MIN)
                };
            }
        }
    }
    for (i, x) in l.iter_mut().enumerate() {
        if i >= sample_vocab || x.is_nan() {
            *x = f32::NEG_INFINITY;
        } else {
            *x = x.min(f32::MAX);
        }
    }
    l
}

/// The engine's distribution (crates/engine/src/sampling.rs `probabilities`), in f64.
fn probabilities(l: &[f32], p: &RowSampling<'_>) -> Option<Vec<f64>> {
    let mut cand: Vec<usize> = (0..l.len()).filter(|&i| l[i] > f32::NEG_INFINITY).collect();
    if cand.is_empty() {
        return None;
    }
    let mut probs = vec![0f64; l.len()];
    let desc = |a: &usize, b: &usize| l[*b].total_cmp(&l[*a]).then(a.cmp(b));
    if p.temperature <= 0.0 {
        cand.sort_by(desc);
        probs[cand[0]] = 1.0;
        return Some(probs);
    }
    let k = p.top_k as usize;
    if k > 0 && k < cand.len() {
        cand.sort_by(desc);
        cand.truncate(k);
    }
    let max = cand.iter().map(|&i| l[i]).fold(f32::NEG_INFINITY, f32::max);
    let mut w: Vec<f64> = cand
        .iter()
        .map(|&i| ((f64::from(l[i]) - f64::from(max)) / f64::from(p.temperature)).exp())
        .collect();
    if p.top_p < 1.0 {
        let total: f64 = w.iter().sum();
        let mut order: Vec<usize> = (0..cand.len()).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(cand[a].cmp(&cand[b])));
        let target = f64::from(p.top_p) * total;
        let (mut cum, mut keep) = (0.0, vec![false; cand.len()]);
        for &j in &order {
            keep[j] = true;
            cum += w[j];
            if cum >= target {
                break;
            }
        }
        for j in 0..cand.len() {
            if !keep[j] {
                w[j] = 0.0;
            }
        }
    }
    if p.min_p > 0.0 {
        let top = w.iter().copied().fold(0.0, f64::max);
        for x in &mut w {
            if *x < f64::from(p.min_p) * top {
                *x = 0.0;
            }
        }
    }
    let total: f64 = w.iter().sum();
    for (&i, &x) in cand.iter().zip(&w) {
        probs[i] = x / total;
    }
    Some(probs)
}

/// Inverse CDF in id order.
fn draw(probs: &[f64], u: f64) -> u32 {
    let mut target = u;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p <= 0.0 {
            continue;
        }
        last = i;
        target -= p;
        if target < 0.0 {
            return i as u32;
        }
    }
    last as u32
}

/// Logits like a model's: a bulk around 0, a few strong candidates, repeated values (ties)
/// and, when asked, NaN and infinities; bf16-rounded.
fn logits_row(rng: &mut ChaCha8Rng, vocab: usize, edges: bool) -> Vec<f32> {
    let mut l: Vec<f32> = (0..vocab)
        .map(|_| bf16::from_f32(rng.random_range(-4.0f32..4.0)).to_f32())
        .collect();
    for _ in 0..12 {
        let i = rng.random_range(0..vocab);
        l[i] = bf16::from_f32(rng.random_range(6.0f32..12.0)).to_f32();
    }
    // Ties at the top.
    let (a, b) = (rng.random_range(0..vocab), rng.random_range(0..vocab));
    l[a] = 12.5;
    l[b] = 12.5;
    if edges {
        l[rng.random_range(0..vocab)] = f32::NAN;
        l[rng.random_range(0..vocab)] = f32::NEG_INFINITY;
        l[rng.random_range(0..vocab)] = f32::INFINITY;
    }
    l
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_sampling_matches_the_engine_pipeline() {
    let gpu = gpu();
    let s = gpu.stream().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let history: Vec<u32> = (0..300).map(|i| (i * 7919) % 40_000).collect();
    let settings = [
        (0.0, 0, 1.0, 0.0, 1.0),
        (0.0, 0, 1.0, 0.0, 1.3),
        (1.0, 0, 1.0, 0.0, 1.0),
        (0.7, 50, 1.0, 0.0, 1.0),
        (0.7, 0, 0.9, 0.0, 1.0),
        (0.7, 0, 1.0, 0.05, 1.0),
        (0.8, 40, 0.95, 0.02, 1.2),
        (1.5, 1, 1.0, 0.0, 1.0),
        (2.0, 0, 0.5, 0.0, 0.8),
    ];
    for (vocab, sample_vocab) in [(49_152, 49_152), (128_256, 128_000)] {
        let rows_per_setting = 24;
        let n = settings.len() * rows_per_setting;
        let mut host = Vec::with_capacity(n * vocab);
        let mut params = Vec::with_capacity(n);
        for (si, &(temperature, top_k, top_p, min_p, penalty)) in settings.iter().enumerate() {
            for r in 0..rows_per_setting {
                host.extend(logits_row(&mut rng, vocab, r % 6 == 0 && si % 2 == 1));
                params.push(RowSampling {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repetition_penalty: penalty,
                    history: &history,
                    uniform: rng.random_range(0.0..1.0),
                });
            }
        }
        let dev = s
            .clone_htod(&host.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())
            .unwrap();
        let got = sample_rows(&gpu, &dev, vocab, sample_vocab, &params).unwrap();
        let again = sample_rows(&gpu, &dev, vocab, sample_vocab, &params).unwrap();
        assert_eq!(got, again, "the same rows and draws gave other tokens");
        let (mut same, mut greedy_same, mut greedy, mut impossible) = (0, 0, 0, Vec::new());
        for (r, p) in params.iter().enumerate() {
            let l = processed(&host[r * vocab..(r + 1) * vocab], p, sample_vocab);
            let probs = probabilities(&l, p).unwrap();
            let want = draw(&probs, p.uniform);
            let tok = got[r].unwrap();
            if probs[tok as usize] <= 0.0 {
                impossible.push((r, tok, want));
            }
            same += usize::from(tok == want);
            if p.temperature == 0.0 {
                greedy += 1;
                greedy_same += usize::from(tok == want);
            }
        }
        eprintln!(
            "vocab {vocab}: {same}/{n} rows drew the reference token; greedy {greedy_same}/{greedy}; tokens outside the reference's kept set: {impossible:?}"
        );
        assert_eq!(greedy_same, greedy, "greedy rows differ");
        assert!(impossible.is_empty(), "drew tokens the reference excludes");
        // f32 weights (the reference: f64) move CDF boundaries by ~1e-7: a draw within that
        // of a boundary may pick the neighbour.
        assert!(same * 100 >= n * 98, "{same}/{n} rows agree");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_sampling_draws_the_right_distribution() {
    // 20 000 draws from one row at temperature 1 (no filters): the frequency of each token
    // is within 5 standard deviations of its probability.
    let gpu = gpu();
    let s = gpu.stream().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let vocab = 64;
    let row: Vec<f32> = (0..vocab)
        .map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0)).to_f32())
        .collect();
    let draws = 20_000;
    let logits: Vec<bf16> = (0..draws)
        .flat_map(|_| row.iter().map(|&x| bf16::from_f32(x)))
        .collect();
    let dev = s.clone_htod(&logits).unwrap();
    let params: Vec<RowSampling<'_>> = (0..draws)
        .map(|_| RowSampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            history: &[],
            uniform: rng.random_range(0.0..1.0),
        })
        .collect();
    let got = sample_rows(&gpu, &dev, vocab, vocab, &params).unwrap();
    let p = probabilities(&row, &params[0]).unwrap();
    let mut counts = vec![0usize; vocab];
    for t in got {
        counts[t.unwrap() as usize] += 1;
    }
    let mut worst = 0f64;
    for i in 0..vocab {
        let expected = p[i] * draws as f64;
        let sd = (draws as f64 * p[i] * (1.0 - p[i])).sqrt().max(1.0);
        worst = worst.max((counts[i] as f64 - expected).abs() / sd);
    }
    eprintln!("20000 draws: largest deviation {worst:.2} standard deviations");
    assert!(worst < 5.0, "{worst}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_sampling_refuses_bad_input_and_reports_empty_rows() {
    let gpu = gpu();
    let s = gpu.stream().clone();
    let vocab = 100;
    let mut row = vec![bf16::from_f32(f32::NAN); vocab];
    let dev = s.clone_htod(&row).unwrap();
    let ok = RowSampling {
        temperature: 0.5,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        history: &[],
        uniform: 0.5,
    };
    // Nothing finite: no token, for greedy and sampling alike.
    assert_eq!(
        sample_rows(&gpu, &dev, vocab, vocab, &[ok]).unwrap(),
        [None]
    );
    let greedy = RowSampling {
        temperature: 0.0,
        ..ok
    };
    assert_eq!(
        sample_rows(&gpu, &dev, vocab, vocab, &[greedy]).unwrap(),
        [None]
    );
    // Only masked ids are finite: none either.
    row[vocab - 1] = bf16::from_f32(1.0);
    let dev = s.clone_htod(&row).unwrap();
    assert_eq!(
        sample_rows(&gpu, &dev, vocab, vocab - 1, &[ok]).unwrap(),
        [None]
    );
    assert_eq!(
        sample_rows(&gpu, &dev, vocab, vocab, &[ok]).unwrap(),
        [Some(vocab as u32 - 1)]
    );
    let bad = |p: RowSampling<'_>| {
        matches!(
            sample_rows(&gpu, &dev, vocab, vocab, &[p]),
            Err(KernelError::BadArgument { .. })
        )
    };
    assert!(bad(RowSampling {
        temperature: f32::NAN,
        ..ok
    }));
    assert!(bad(RowSampling {
        temperature: -1.0,
        ..ok
    }));
    assert!(bad(RowSampling { top_p: 0.0, ..ok }));
    assert!(bad(RowSampling { min_p: 1.5, ..ok }));
    assert!(bad(RowSampling {
        repetition_penalty: 0.0,
        ..ok
    }));
    assert!(bad(RowSampling { uniform: 1.0, ..ok }));
    // Sizes that do not fit.
    assert!(matches!(
        sample_rows(&gpu, &dev, vocab + 1, vocab, &[ok]),
        Err(KernelError::BadArgument { .. })
    ));
    assert!(matches!(
        sample_rows(&gpu, &dev, vocab, vocab, &[ok, ok]),
        Err(KernelError::BadArgument { .. })
    ));
}
