//! Stochastic verification preserves the target distribution, checked by Pearson's chi-square
//! test with fixed seeds, and the same statistic rejects deliberately wrong verifiers.
//!
//! - First emitted token, one draft, several (p, q) pairs on a 6-token vocabulary: q a point
//!   mass (inside p's support and outside it), q = p, q disjoint from p, q uniform, random pairs;
//!   `SAMPLES` draws each.
//! - Joint distribution of the first two emitted tokens of a whole propose → verify loop over a
//!   context-dependent (Markov) target and draft, k = 1..3, sampled and greedy drafts: every
//!   emitted pair must be distributed as p(t1) p(t2 | t1).
//!
//! The right verifier must get a p-value ≥ `ACCEPT_P`; each wrong verifier whose exact output
//! distribution is at least `MIN_TV` away (total variation) from the target's must get a p-value
//! ≤ `REJECT_P`. Set `SPEC_CHI2_VERBOSE=1` to print every statistic.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use scheduler::spec::{Verified, verify_stochastic};
use statrs::distribution::{ChiSquared, ContinuousCDF};

const V: usize = 6;
const SAMPLES: usize = 120_000;
const ACCEPT_P: f64 = 1e-3;
const REJECT_P: f64 = 1e-6;
const MIN_TV: f64 = 0.01;

/// Verifiers under test: the library's, and three deliberate bugs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verifier {
    /// `scheduler::spec::verify_stochastic`.
    Right,
    /// On rejection, samples from p instead of the residual max(0, p − q).
    ResampleFromP,
    /// Accepts with probability min(1, q/p) instead of min(1, p/q).
    InvertedRatio,
    /// When every draft is accepted, samples the bonus token from the row before the last.
    BonusFromWrongRow,
}

const WRONG: [Verifier; 3] = [
    Verifier::ResampleFromP,
    Verifier::InvertedRatio,
    Verifier::BonusFromWrongRow,
];

fn sample(row: &[f32], rng: &mut ChaCha8Rng) -> usize {
    let total: f64 = row.iter().map(|&v| f64::from(v)).sum();
    let mut u = rng.random::<f64>() * total;
    for (i, &w) in row.iter().enumerate() {
        if w > 0.0 {
            if u < f64::from(w) {
                return i;
            }
            u -= f64::from(w);
        }
    }
    row.iter().rposition(|&w| w > 0.0).unwrap()
}

fn point_mass(x: usize) -> Vec<f32> {
    let mut r = vec![0.0; V];
    r[x] = 1.0;
    r
}

/// A deliberately wrong verifier (a straightforward transcription of the algorithm with one
/// bug); `Right` delegates to the library.
fn verify(
    which: Verifier,
    draft: &[u32],
    q: Option<&[Vec<f32>]>,
    p: &[Vec<f32>],
    rng: &mut ChaCha8Rng,
) -> Verified {
    if which == Verifier::Right {
        return verify_stochastic(draft, q, p, rng).unwrap();
    }
    let mut tokens = Vec::new();
    for (i, &x) in draft.iter().enumerate() {
        let qi = q.map_or_else(|| point_mass(x as usize), |q| q[i].clone());
        let (px, qx) = (f64::from(p[i][x as usize]), f64::from(qi[x as usize]));
        let accept = if which == Verifier::InvertedRatio {
            px == 0.0 || rng.random::<f64>() * px < qx
        } else {
            rng.random::<f64>() * qx < px
        };
        if accept {
            tokens.push(x);
            continue;
        }
        let residual: Vec<f32> = if which == Verifier::ResampleFromP {
            p[i].clone()
        } else {
            p[i].iter()
                .zip(&qi)
                .map(|(a, b)| (a - b).max(0.0))
                .collect()
        };
        tokens.push(sample(&residual, rng) as u32);
        return Verified {
            tokens,
            num_accepted_drafts: i,
        };
    }
    let k = draft.len();
    let row = if which == Verifier::BonusFromWrongRow && k > 0 {
        &p[k - 1]
    } else {
        &p[k]
    };
    tokens.push(sample(row, rng) as u32);
    Verified {
        tokens,
        num_accepted_drafts: k,
    }
}

/// Pearson's statistic of `counts` against `probs`, its degrees of freedom and p-value. A count
/// in a cell of probability 0 is an outright failure (p-value 0).
fn chi_square(counts: &[u64], probs: &[f64]) -> (f64, usize, f64) {
    let n: u64 = counts.iter().sum();
    let mut stat = 0.0;
    let mut cells = 0;
    for (&c, &p) in counts.iter().zip(probs) {
        if p == 0.0 {
            if c > 0 {
                return (f64::INFINITY, 0, 0.0);
            }
            continue;
        }
        let e = p * n as f64;
        stat += (c as f64 - e).powi(2) / e;
        cells += 1;
    }
    let df = cells - 1;
    let p_value = ChiSquared::new(df as f64).unwrap().sf(stat);
    (stat, df, p_value)
}

fn total_variation(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0
}

fn normalized(raw: &[f64]) -> Vec<f32> {
    let s: f64 = raw.iter().sum();
    raw.iter().map(|v| (v / s) as f32).collect()
}

fn random_dist(rng: &mut ChaCha8Rng, support: std::ops::Range<usize>) -> Vec<f32> {
    let raw: Vec<f64> = (0..V)
        .map(|i| {
            if support.contains(&i) {
                0.05 + rng.random::<f64>()
            } else {
                0.0
            }
        })
        .collect();
    normalized(&raw)
}

fn verbose() -> bool {
    std::env::var_os("SPEC_CHI2_VERBOSE").is_some()
}

/// The exact distribution of the first emitted token for one draft, by enumeration over the
/// draft token (used to know which wrong verifiers must be caught, and to double-check that the
/// right one is exact).
fn exact_first_token(which: Verifier, p: &[f32], q: Option<&[f32]>, point: usize) -> Vec<f64> {
    let p: Vec<f64> = p.iter().map(|&v| f64::from(v)).collect();
    let q: Vec<f64> = q.map_or_else(
        || (0..V).map(|i| f64::from(u8::from(i == point))).collect(),
        |q| q.iter().map(|&v| f64::from(v)).collect(),
    );
    let mut out = vec![0.0; V];
    for x in 0..V {
        if q[x] == 0.0 {
            continue;
        }
        let accept = match which {
            Verifier::InvertedRatio if p[x] == 0.0 => 1.0,
            Verifier::InvertedRatio => (q[x] / p[x]).min(1.0),
            _ => (p[x] / q[x]).min(1.0),
        };
        out[x] += q[x] * accept;
        let residual: Vec<f64> = if which == Verifier::ResampleFromP {
            p.clone()
        } else {
            p.iter().zip(&q).map(|(a, b)| (a - b).max(0.0)).collect()
        };
        let rs: f64 = residual.iter().sum();
        if rs > 0.0 {
            for y in 0..V {
                out[y] += q[x] * (1.0 - accept) * residual[y] / rs;
            }
        }
    }
    out
}

#[test]
fn first_token_follows_the_target_for_many_draft_distributions() {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let peaked = normalized(&[10.0, 1.0, 0.5, 0.2, 0.2, 0.1]);
    let uniform = vec![1.0 / V as f32; V];
    let p_random = random_dist(&mut rng, 0..V);
    let p_low = random_dist(&mut rng, 0..3);
    let q_high = random_dist(&mut rng, 3..V);
    let p_partial = random_dist(&mut rng, 1..V);
    // (name, p, q (None: a point mass on `point`), point)
    type Case = (&'static str, Vec<f32>, Option<Vec<f32>>, usize);
    let cases: Vec<Case> = vec![
        ("q point mass inside p", p_random.clone(), None, 2),
        ("q point mass where p = 0", p_partial.clone(), None, 0),
        ("q = p", p_random.clone(), Some(p_random.clone()), 0),
        ("q disjoint from p", p_low.clone(), Some(q_high.clone()), 0),
        (
            "q uniform, p peaked",
            peaked.clone(),
            Some(uniform.clone()),
            0,
        ),
        ("q peaked, p uniform", uniform, Some(peaked), 0),
        (
            "random p and q",
            p_random.clone(),
            Some(random_dist(&mut rng, 0..V)),
            0,
        ),
        (
            "random p, q on part",
            p_random,
            Some(random_dist(&mut rng, 2..V)),
            0,
        ),
    ];
    let bonus = random_dist(&mut rng, 0..V);
    for (name, p, q, point) in cases {
        let target = vec![p.clone(), bonus.clone()];
        let probs: Vec<f64> = p.iter().map(|&v| f64::from(v)).collect();
        // The enumeration agrees that the algorithm is exact.
        let exact = exact_first_token(Verifier::Right, &p, q.as_deref(), point);
        assert!(total_variation(&exact, &probs) < 1e-6, "{name}: {exact:?}");
        for which in [
            Verifier::Right,
            Verifier::ResampleFromP,
            Verifier::InvertedRatio,
        ] {
            let mut counts = vec![0u64; V];
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            for _ in 0..SAMPLES {
                let (draft, q_rows) = match &q {
                    Some(q) => (sample(q, &mut rng) as u32, Some(vec![q.clone()])),
                    None => (point as u32, None),
                };
                let v = verify(which, &[draft], q_rows.as_deref(), &target, &mut rng);
                counts[v.tokens[0] as usize] += 1;
            }
            let (stat, df, p_value) = chi_square(&counts, &probs);
            let tv = total_variation(&exact_first_token(which, &p, q.as_deref(), point), &probs);
            if verbose() {
                eprintln!(
                    "{name:<26} {which:<14?} chi2 {stat:>12.2} df {df} p-value {p_value:.3e} (exact TV {tv:.4})"
                );
            }
            if which == Verifier::Right {
                assert!(
                    p_value >= ACCEPT_P,
                    "{name}: chi2 {stat:.2} df {df} p {p_value:.2e}"
                );
            } else if tv >= MIN_TV {
                assert!(
                    p_value <= REJECT_P,
                    "{name}: wrong verifier {which:?} not caught: chi2 {stat:.2} df {df} p {p_value:.2e}"
                );
            }
        }
    }
}

/// A Markov target and draft: row `t` is the distribution after token `t`.
struct Chain {
    p: Vec<Vec<f32>>,
    q: Vec<Vec<f32>>,
}

impl Chain {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let p: Vec<Vec<f32>> = (0..V).map(|_| random_dist(&mut rng, 0..V)).collect();
        // The draft is roughly right: 60% the target's row, 40% noise on part of the
        // vocabulary.
        let q = (0..V)
            .map(|t| {
                let noise = random_dist(&mut rng, (t % 3)..V);
                let blend: Vec<f64> = (0..V)
                    .map(|i| 0.6 * f64::from(p[t][i]) + 0.4 * f64::from(noise[i]))
                    .collect();
                normalized(&blend)
            })
            .collect();
        Self { p, q }
    }
}

/// Runs propose → verify from history `[0]` until `m` tokens are emitted; returns them.
fn emit(
    chain: &Chain,
    which: Verifier,
    k: usize,
    greedy_draft: bool,
    m: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<usize> {
    let mut last = 0usize;
    let mut emitted = Vec::new();
    while emitted.len() < m {
        let mut drafts = Vec::with_capacity(k);
        let mut q_rows = Vec::with_capacity(k);
        let mut ctx = last;
        for _ in 0..k {
            let q = &chain.q[ctx];
            let x = if greedy_draft {
                q.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap()
                    .0
            } else {
                sample(q, rng)
            };
            drafts.push(x as u32);
            q_rows.push(q.clone());
            ctx = x;
        }
        let mut target = vec![chain.p[last].clone()];
        target.extend(drafts.iter().map(|&d| chain.p[d as usize].clone()));
        let q = (!greedy_draft).then_some(q_rows.as_slice());
        let v = verify(which, &drafts, q, &target, rng);
        assert_eq!(v.tokens.len(), v.num_accepted_drafts + 1);
        emitted.extend(v.tokens.iter().map(|&t| t as usize));
        last = *emitted.last().unwrap();
    }
    emitted.truncate(m);
    emitted
}

/// For k = 1..3 drafts per step (sampled drafts, and greedy drafts as point masses), over
/// whole propose → verify loops: the joint of the first two emitted tokens must be
/// p(t1 | 0) p(t2 | t1), and the joint of tokens k and k + 1 (where the first step's bonus
/// token lands when every draft is accepted) P(t_k) p(t_{k+1} | t_k). Each wrong verifier fails
/// at least one of the two.
#[test]
fn multi_token_outputs_follow_the_target() {
    let chain = Chain::new(99);
    let p = |a: usize, b: usize| f64::from(chain.p[a][b]);
    let joint: Vec<f64> = (0..V * V).map(|i| p(0, i / V) * p(i / V, i % V)).collect();
    // marginals[j]: distribution of emitted token j + 1.
    let mut marginals = vec![(0..V).map(|b| p(0, b)).collect::<Vec<f64>>()];
    for j in 1..3 {
        let prev = &marginals[j - 1];
        let next = (0..V)
            .map(|b| (0..V).map(|a| prev[a] * p(a, b)).sum())
            .collect();
        marginals.push(next);
    }
    for (k, greedy_draft) in [(1, false), (2, false), (3, false), (2, true)] {
        for which in [Verifier::Right].into_iter().chain(WRONG) {
            let mut rng = ChaCha8Rng::seed_from_u64(31 + k as u64);
            let mut pairs = vec![0u64; V * V];
            let mut at_bonus = vec![0u64; V * V];
            for _ in 0..SAMPLES {
                let t = emit(&chain, which, k, greedy_draft, k + 1, &mut rng);
                pairs[t[0] * V + t[1]] += 1;
                at_bonus[t[k - 1] * V + t[k]] += 1;
            }
            let (stat2, df2, p2) = chi_square(&pairs, &joint);
            let bonus_joint: Vec<f64> = (0..V * V)
                .map(|i| marginals[k - 1][i / V] * p(i / V, i % V))
                .collect();
            let (statb, dfb, pb) = chi_square(&at_bonus, &bonus_joint);
            if verbose() {
                eprintln!(
                    "k={k} greedy_draft={greedy_draft:<5} {which:<17?} joint(t1,t2): chi2 {stat2:>10.2} df {df2} p {p2:.3e}; joint(t{k},t{}): chi2 {statb:>10.2} df {dfb} p {pb:.3e}",
                    k + 1
                );
            }
            if which == Verifier::Right {
                assert!(
                    p2 >= ACCEPT_P && pb >= ACCEPT_P,
                    "k {k} greedy {greedy_draft}: joint chi2 {stat2:.2} p {p2:.2e}, (t{k}, t{}) chi2 {statb:.2} p {pb:.2e}",
                    k + 1
                );
            } else {
                // Every bug shows here: the chain's rows all differ, and drafts are accepted
                // and rejected often.
                assert!(
                    p2.min(pb) <= REJECT_P,
                    "k {k} greedy {greedy_draft}: {which:?} not caught: p {p2:.2e} / {pb:.2e}"
                );
            }
        }
    }
}
