//! Token sampling over one row of logits: repetition penalty, temperature, top-k, top-p and
//! min-p, seeded draws, and log-probabilities.
//!
//! The pipeline, in Hugging Face's order (`generate`'s logits processors and warpers):
//! 1. [`apply_repetition_penalty`] (HF's `RepetitionPenaltyLogitsProcessor`: every token id
//!    present in the prompt or the output so far has its logit divided by the penalty when
//!    positive, multiplied when negative);
//! 2. temperature 0 is greedy: the [`argmax`] of the penalized logits;
//! 3. otherwise [`probabilities`]: logits / temperature, then top-k (exactly the `k` highest
//!    logits, ties to the lower id), softmax, top-p (the most likely tokens, highest first,
//!    until their mass reaches `top_p`, the crossing token included), min-p (tokens below
//!    `min_p` times the top probability dropped), renormalized;
//! 4. [`sample`] draws from that distribution by inverse CDF with one uniform number of the
//!    completion's [`SampleRng`].
//!
//! Log-probabilities ([`log_softmax`], [`top_logprobs`]) are of the model's raw distribution,
//! before any of this processing.
//!
//! Every function is total: non-finite logits are handled (NaN as impossible, `+inf` as the
//! largest float), and a row with no finite logit gives `None` instead of a token.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::SamplingParams;

/// The random stream of one completion: ChaCha8 seeded with the request's seed, on the stream
/// numbered by the completion's index. It advances only when that completion draws a token, so
/// a seeded request gets the same tokens whatever else is batched with it.
#[derive(Debug, Clone)]
pub struct SampleRng(ChaCha8Rng);

impl SampleRng {
    /// The stream of completion `index` of a request seeded with `seed`.
    pub fn new(seed: u64, index: u32) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(u64::from(index));
        Self(rng)
    }

    /// A uniform number in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }

    /// The generator itself (for speculative verification, which draws several numbers).
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.0
    }
}

/// A logit with NaN as impossible and `+inf` as the largest float.
fn sane(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x.min(f32::MAX)
    }
}

/// HF's repetition penalty, in place: each distinct token id of `history` (the slices taken
/// together) that is inside the row has its logit divided by `penalty` if positive, multiplied
/// by it otherwise. `penalty == 1` changes nothing.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[&[u32]], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in history.iter().flat_map(|h| h.iter()) {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let l = logits[t];
            // Clamped: a huge penalty must not turn a logit into -inf (impossible).
            logits[t] = if l > 0.0 {
                l / penalty
            } else {
                (l * penalty).max(f32::MIN)
            };
        }
    }
}

/// The index of the largest logit (the lowest id among equals); `None` if no logit is finite
/// or `+inf` (NaN counts as impossible).
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        let l = sane(l);
        if l == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// The distribution a token is drawn from: `vocab` probabilities, zero outside the tokens kept
/// by top-k, top-p and min-p, summing to 1. Temperature 0 gives a point mass on the
/// [`argmax`]. `None` if no logit is finite.
///
/// `params` must be valid (as [`crate::EngineHandle::generate`] checks): temperature finite
/// and `>= 0`, `top_p` in `(0, 1]`, `min_p` in `[0, 1]`.
pub fn probabilities(logits: &[f32], params: &SamplingParams) -> Option<Vec<f32>> {
    let mut probs = vec![0.0f32; logits.len()];
    if params.temperature <= 0.0 {
        probs[argmax(logits)? as usize] = 1.0;
        return Some(probs);
    }
    let t = params.temperature;
    // Candidates, best first when a rank-based filter needs an order.
    let mut cand: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| sane(logits[i as usize]) > f32::NEG_INFINITY)
        .collect();
    if cand.is_empty() {
        return None;
    }
    let by_logit_desc = |a: &u32, b: &u32| {
        sane(logits[*b as usize])
            .total_cmp(&sane(logits[*a as usize]))
            .then(a.cmp(b))
    };
    let k = params.top_k as usize;
    if k > 0 && k < cand.len() {
        cand.select_nth_unstable_by(k - 1, by_logit_desc);
        cand.truncate(k);
    }
    let max = cand
        .iter()
        .map(|&i| sane(logits[i as usize]))
        .fold(f32::NEG_INFINITY, f32::max);
    // Softmax over the candidates in f64.
    let mut weights: Vec<f64> = cand
        .iter()
        .map(|&i| ((f64::from(sane(logits[i as usize])) - f64::from(max)) / f64::from(t)).exp())
        .collect();
    let mut total: f64 = weights.iter().sum();
    if params.top_p < 1.0 {
        let mut order: Vec<usize> = (0..cand.len()).collect();
        order.sort_by(|&a, &b| {
            weights[b]
                .total_cmp(&weights[a])
                .then(cand[a].cmp(&cand[b]))
        });
        let target = f64::from(params.top_p) * total;
        let mut cum = 0.0;
        let mut keep = vec![false; cand.len()];
        for &j in &order {
            keep[j] = true;
            cum += weights[j];
            if cum >= target {
                break;
            }
        }
        for (j, w) in weights.iter_mut().enumerate() {
            if !keep[j] {
                *w = 0.0;
            }
        }
        total = weights.iter().sum();
    }
    if params.min_p > 0.0 {
        let top = weights.iter().copied().fold(0.0, f64::max);
        let floor = f64::from(params.min_p) * top;
        for w in &mut weights {
            if *w < floor {
                *w = 0.0;
            }
        }
        total = weights.iter().sum();
    }
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    for (&i, &w) in cand.iter().zip(&weights) {
        probs[i as usize] = (w / total) as f32;
    }
    Some(probs)
}

/// Inverse-CDF draw from `probs` at uniform `u` in `[0, 1)`. Never returns a token of
/// probability 0 (rounding past the end falls back to the last token with mass); `None` if no
/// token has mass.
pub fn sample(probs: &[f32], u: f64) -> Option<u32> {
    let total: f64 = probs.iter().map(|&p| f64::from(p.max(0.0))).sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let mut target = u * total;
    let mut last = None;
    for (i, &p) in probs.iter().enumerate() {
        let p = f64::from(p.max(0.0));
        if p <= 0.0 {
            continue;
        }
        last = Some(i as u32);
        target -= p;
        if target < 0.0 {
            return last;
        }
    }
    last
}

/// Draws one token from raw `logits` as [`SamplingParams`] say: greedy at temperature 0 (no
/// random number used), otherwise one uniform number of `rng`. `logits` must already carry the
/// repetition penalty.
pub fn sample_token(logits: &[f32], params: &SamplingParams, rng: &mut SampleRng) -> Option<u32> {
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    let probs = probabilities(logits, params)?;
    sample(&probs, rng.uniform())
}

/// `log_softmax(logits)`, computed in f64 (NaN logits get `-inf`).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits
        .iter()
        .map(|&l| sane(l))
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let max = f64::from(max);
    let lse = max
        + logits
            .iter()
            .map(|&l| (f64::from(sane(l)) - max).exp())
            .sum::<f64>()
            .ln();
    logits
        .iter()
        .map(|&l| (f64::from(sane(l)) - lse) as f32)
        .collect()
}

/// The `n` most likely tokens of a row of log-probabilities, most likely first (ties: lower id
/// first).
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut ids: Vec<u32> = (0..logprobs.len() as u32).collect();
    let desc = |a: &u32, b: &u32| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
            .then(a.cmp(b))
    };
    if n < ids.len() {
        ids.select_nth_unstable_by(n - 1, desc);
        ids.truncate(n);
    }
    ids.sort_by(desc);
    ids.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| (f64::from(l - m) / f64::from(t)).exp())
            .collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    fn support(p: &[f32]) -> Vec<u32> {
        p.iter()
            .enumerate()
            .filter(|(_, x)| **x > 0.0)
            .map(|(i, _)| i as u32)
            .collect()
    }

    fn assert_normalized(p: &[f32]) {
        let s: f64 = p.iter().map(|&x| f64::from(x)).sum();
        assert!((s - 1.0).abs() < 1e-5, "sum {s}");
    }

    const LOGITS: [f32; 8] = [1.0, 3.0, -2.0, 2.5, 0.0, 3.0, -1.0, 2.0];

    #[test]
    fn greedy_is_the_argmax_with_the_lowest_id_among_ties() {
        assert_eq!(argmax(&LOGITS), Some(1));
        let p = probabilities(&LOGITS, &params(0.0)).unwrap();
        assert_eq!(support(&p), [1]);
        let mut rng = SampleRng::new(0, 0);
        assert_eq!(sample_token(&LOGITS, &params(0.0), &mut rng), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::INFINITY, 5.0]), Some(2));
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), None);
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn temperature_scales_the_softmax() {
        for t in [0.5f32, 1.0, 2.0] {
            let p = probabilities(&LOGITS, &params(t)).unwrap();
            let want = softmax(&LOGITS, t);
            for (a, b) in p.iter().zip(&want) {
                assert!((f64::from(*a) - b).abs() < 1e-6, "t={t}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn top_k_keeps_exactly_k_tokens_ties_to_the_lower_id() {
        let mut sp = params(1.0);
        sp.top_k = 1;
        assert_eq!(support(&probabilities(&LOGITS, &sp).unwrap()), [1]);
        sp.top_k = 2;
        assert_eq!(support(&probabilities(&LOGITS, &sp).unwrap()), [1, 5]);
        sp.top_k = 3;
        let p = probabilities(&LOGITS, &sp).unwrap();
        assert_eq!(support(&p), [1, 3, 5]);
        assert_normalized(&p);
        // Renormalized softmax over the kept tokens.
        let kept = softmax(&[3.0, 2.5, 3.0], 1.0);
        assert!((f64::from(p[1]) - kept[0]).abs() < 1e-6);
        assert!((f64::from(p[3]) - kept[1]).abs() < 1e-6);
        sp.top_k = 100;
        assert_eq!(support(&probabilities(&LOGITS, &sp).unwrap()).len(), 8);
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_the_mass() {
        let logits = [0.4f32, 0.3, 0.2, 0.1].map(f32::ln);
        let mut sp = params(1.0);
        for (top_p, want) in [
            (0.3f32, vec![0u32]),
            (0.39, vec![0]),
            (0.41, vec![0, 1]),
            (0.69, vec![0, 1]),
            (0.71, vec![0, 1, 2]),
            (0.95, vec![0, 1, 2, 3]),
            (1.0, vec![0, 1, 2, 3]),
        ] {
            sp.top_p = top_p;
            let p = probabilities(&logits, &sp).unwrap();
            assert_eq!(support(&p), want, "top_p {top_p}");
            assert_normalized(&p);
        }
        sp.top_p = 0.69;
        let p = probabilities(&logits, &sp).unwrap();
        assert!((p[0] - 0.4 / 0.7).abs() < 1e-6 && (p[1] - 0.3 / 0.7).abs() < 1e-6);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_top() {
        let logits = [0.5f32, 0.25, 0.15, 0.1].map(f32::ln);
        let mut sp = params(1.0);
        for (min_p, want) in [
            (0.0f32, vec![0u32, 1, 2, 3]),
            (0.19, vec![0, 1, 2, 3]),
            (0.21, vec![0, 1, 2]),
            (0.49, vec![0, 1]),
            (0.51, vec![0]),
            (1.0, vec![0]),
        ] {
            sp.min_p = min_p;
            let p = probabilities(&logits, &sp).unwrap();
            assert_eq!(support(&p), want, "min_p {min_p}");
            assert_normalized(&p);
        }
    }

    #[test]
    fn filters_compose_in_hf_order() {
        // top-k 3 → {1, 5, 3}; top-p 0.5 of those → {1} alone reaches 0.38 < 0.5, then 5.
        let mut sp = params(1.0);
        sp.top_k = 3;
        sp.top_p = 0.5;
        assert_eq!(support(&probabilities(&LOGITS, &sp).unwrap()), [1, 5]);
        sp.min_p = 0.9;
        assert_eq!(support(&probabilities(&LOGITS, &sp).unwrap()), [1, 5]);
        sp.top_p = 1.0;
        sp.min_p = 0.7;
        // p(3)/p(1) = e^-0.5 = 0.61 < 0.7.
        assert_eq!(support(&probabilities(&LOGITS, &sp).unwrap()), [1, 5]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut l = [2.0f32, -2.0, 1.0, 0.0];
        apply_repetition_penalty(&mut l, &[&[0, 1, 0], &[1, 9]], 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0, 0.0]);
        let mut l = [2.0f32, -2.0];
        apply_repetition_penalty(&mut l, &[&[0, 1]], 0.5);
        assert_eq!(l, [4.0, -1.0]);
        let mut l = [2.0f32, -2.0];
        apply_repetition_penalty(&mut l, &[&[0, 1]], 1.0);
        assert_eq!(l, [2.0, -2.0]);
        let mut l = [-2.0f32];
        apply_repetition_penalty(&mut l, &[&[0]], f32::MAX);
        assert_eq!(l, [f32::MIN]);
    }

    #[test]
    fn sampling_frequencies_follow_the_distribution() {
        // Chi-square goodness of fit at a fixed seed: 8 categories, 7 degrees of freedom;
        // 24.3 is the 0.001 critical value.
        let sp = params(0.7);
        let p = probabilities(&LOGITS, &sp).unwrap();
        let mut rng = SampleRng::new(12345, 0);
        let draws = 20_000;
        let mut counts = [0usize; 8];
        for _ in 0..draws {
            counts[sample_token(&LOGITS, &sp, &mut rng).unwrap() as usize] += 1;
        }
        let chi2: f64 = counts
            .iter()
            .zip(&p)
            .filter(|(_, p)| **p > 0.0)
            .map(|(&c, &p)| {
                let e = f64::from(p) * draws as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 24.3, "chi2 {chi2}, counts {counts:?}");
    }

    #[test]
    fn masked_tokens_are_never_drawn() {
        let mut sp = params(1.5);
        sp.top_k = 3;
        sp.min_p = 0.3;
        let p = probabilities(&LOGITS, &sp).unwrap();
        let allowed = support(&p);
        let mut rng = SampleRng::new(7, 3);
        for _ in 0..5_000 {
            let t = sample_token(&LOGITS, &sp, &mut rng).unwrap();
            assert!(allowed.contains(&t), "{t} outside {allowed:?}");
        }
        // Edges of the uniform.
        assert_eq!(sample(&[0.0, 0.5, 0.0, 0.5, 0.0], 0.0), Some(1));
        assert_eq!(sample(&[0.0, 0.5, 0.0, 0.5, 0.0], 0.999_999_9), Some(3));
        assert_eq!(sample(&[0.0, 0.0], 0.5), None);
        assert_eq!(sample(&[], 0.5), None);
    }

    #[test]
    fn streams_are_reproducible_and_distinct_per_index() {
        let draw = |seed, index| {
            let mut r = SampleRng::new(seed, index);
            (0..8).map(|_| r.uniform()).collect::<Vec<_>>()
        };
        assert_eq!(draw(1, 0), draw(1, 0));
        assert_ne!(draw(1, 0), draw(1, 1));
        assert_ne!(draw(1, 0), draw(2, 0));
    }

    #[test]
    fn log_softmax_normalizes_and_top_logprobs_are_sorted() {
        let lp = log_softmax(&LOGITS);
        let s: f64 = lp.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        let top = top_logprobs(&lp, 3);
        assert_eq!(
            top.iter().map(|t| t.0).collect::<Vec<_>>(),
            [1, 5, 3],
            "{top:?}"
        );
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(top_logprobs(&lp, 0), []);
        assert_eq!(top_logprobs(&lp, 100).len(), 8);
        // Non-finite logits: NaN is impossible, and an all-impossible row stays finite-free.
        let lp = log_softmax(&[f32::NAN, 0.0]);
        assert_eq!(lp[0], f32::NEG_INFINITY);
        assert!(lp[1].abs() < 1e-7);
        assert!(
            log_softmax(&[f32::NAN])
                .iter()
                .all(|x| *x == f32::NEG_INFINITY)
        );
    }

    #[test]
    fn rows_without_a_finite_logit_give_no_token() {
        let bad = [f32::NAN, f32::NEG_INFINITY];
        assert_eq!(probabilities(&bad, &params(1.0)), None);
        assert_eq!(probabilities(&bad, &params(0.0)), None);
        let mut rng = SampleRng::new(0, 0);
        assert_eq!(sample_token(&bad, &params(1.0), &mut rng), None);
        // +inf is the largest logit, not a NaN factory.
        let p = probabilities(&[f32::INFINITY, 0.0], &params(1.0)).unwrap();
        assert_eq!(support(&p), [0]);
    }
}
