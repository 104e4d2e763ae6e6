//! Verification of proposed tokens against the target model's next-token rows.
//!
//! The target runs once over the sequence's last token and the `k` drafts, giving `k + 1`
//! next-token rows: row `i` is the target's prediction after the history and drafts `0..i`.
//! Both verifiers return the accepted drafts followed by exactly one token of the target's, so
//! a step always makes progress.

use rand::Rng;

use super::SpecError;

/// How far from 1 a row of probabilities may sum (|sum − 1| ≤ this) and still be accepted;
/// rows are renormalized by their sum before use, so f32 softmax rounding over a large
/// vocabulary is harmless.
pub const PROB_SUM_TOLERANCE: f64 = 1e-3;

/// The result of verifying one sequence's proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The accepted drafts, then one token from the target: the correction at the first
    /// rejected position, or the bonus token when every draft was accepted. Never empty.
    pub tokens: Vec<u32>,
    /// How many drafts were accepted (`tokens.len() - 1`).
    pub num_accepted_drafts: usize,
}

/// Greedy verification: accepts the longest prefix of `draft` equal to the target's argmax at
/// each position, then appends the target's argmax at the first mismatch (or after the last
/// draft, the bonus token).
///
/// `target_argmax` has `draft.len() + 1` entries: entry `i` is the target's argmax after the
/// history and `draft[..i]`. The output is exactly what plain greedy decoding would produce
/// next, one to `draft.len() + 1` tokens of it.
pub fn verify_greedy(draft: &[u32], target_argmax: &[u32]) -> Result<Verified, SpecError> {
    if target_argmax.len() != draft.len() + 1 {
        return Err(SpecError::ShapeMismatch {
            what: "target_argmax",
            expected: draft.len() + 1,
            got: target_argmax.len(),
        });
    }
    let accepted = draft
        .iter()
        .zip(target_argmax)
        .take_while(|(d, t)| d == t)
        .count();
    Ok(Verified {
        tokens: target_argmax[..=accepted].to_vec(),
        num_accepted_drafts: accepted,
    })
}

/// Stochastic verification by rejection sampling (Leviathan et al. 2023; Chen et al. 2023):
/// the emitted tokens are distributed exactly as if sampled from the target one at a time.
///
/// - `draft`: the `k` proposed tokens;
/// - `draft_probs`: the draft distribution `q` each was sampled from (`k` rows of
///   `vocab_size`), or `None` for a point mass on each draft (greedy drafts, n-gram lookups);
/// - `target_probs`: the target distribution `p` (`k + 1` rows of `vocab_size`, after the
///   target's own temperature, top-k or top-p processing), row `i` after `draft[..i]`.
///
/// Draft `i` is accepted with probability `min(1, p_i(x) / q_i(x))`. At the first rejection the
/// replacement is sampled from `normalize(max(0, p_i − q_i))` (from `p_i` should that residual
/// be all zero, which happens with probability 0), and verification stops; if all `k` are
/// accepted, a bonus token is sampled from `p_k`.
///
/// Every row must have `vocab_size` finite, non-negative entries summing to 1 within
/// [`PROB_SUM_TOLERANCE`] (rows are renormalized), every draft token must be inside the
/// vocabulary, and a draft token must have `q > 0`. Costs O(k · vocab_size) (one validation
/// pass over every row, one more over the rejected row).
pub fn verify_stochastic<R: Rng + ?Sized>(
    draft: &[u32],
    draft_probs: Option<&[Vec<f32>]>,
    target_probs: &[Vec<f32>],
    rng: &mut R,
) -> Result<Verified, SpecError> {
    let k = draft.len();
    if target_probs.len() != k + 1 {
        return Err(SpecError::ShapeMismatch {
            what: "target_probs",
            expected: k + 1,
            got: target_probs.len(),
        });
    }
    let vocab = target_probs[0].len();
    let target_sums = row_sums("target_probs", target_probs, vocab)?;
    let draft_sums = match draft_probs {
        Some(q) => {
            if q.len() != k {
                return Err(SpecError::ShapeMismatch {
                    what: "draft_probs",
                    expected: k,
                    got: q.len(),
                });
            }
            Some(row_sums("draft_probs", q, vocab)?)
        }
        None => None,
    };
    for (index, &token) in draft.iter().enumerate() {
        if token as usize >= vocab {
            return Err(SpecError::TokenOutOfVocab {
                what: "draft",
                index,
                token,
                vocab_size: vocab,
            });
        }
        if let Some(q) = draft_probs
            && q[index][token as usize] <= 0.0
        {
            return Err(SpecError::ImpossibleDraft {
                position: index,
                token,
            });
        }
    }

    let mut tokens = Vec::with_capacity(k + 1);
    for (i, &x) in draft.iter().enumerate() {
        let p = &target_probs[i];
        let sp = target_sums[i];
        let px = f64::from(p[x as usize]) / sp;
        let q = draft_probs
            .zip(draft_sums.as_ref())
            .map(|(q, s)| (&q[i], s[i]));
        let qx = q.map_or(1.0, |(q, sq)| f64::from(q[x as usize]) / sq);
        // Accept with probability min(1, px / qx), as u * qx < px for u uniform in [0, 1).
        if rng.random::<f64>() * qx < px {
            tokens.push(x);
            continue;
        }
        // Residual max(0, p − q), q a point mass on x when there are no draft rows.
        let residual = |y: usize| -> f64 {
            let qy = match q {
                Some((q, sq)) => f64::from(q[y]) / sq,
                None => f64::from(u8::from(y == x as usize)),
            };
            (f64::from(p[y]) / sp - qy).max(0.0)
        };
        let total: f64 = (0..vocab).map(residual).sum();
        let u = rng.random::<f64>();
        let y = if total > 0.0 {
            sample_weighted(vocab, total, u, residual)
        } else {
            sample_weighted(vocab, sp, u, |y| f64::from(p[y]))
        };
        tokens.push(y as u32);
        return Ok(Verified {
            tokens,
            num_accepted_drafts: i,
        });
    }
    let p = &target_probs[k];
    let y = sample_weighted(vocab, target_sums[k], rng.random::<f64>(), |y| {
        f64::from(p[y])
    });
    tokens.push(y as u32);
    Ok(Verified {
        tokens,
        num_accepted_drafts: k,
    })
}

/// Checks that every row has `vocab` finite, non-negative entries summing to about 1, and
/// returns the sums.
fn row_sums(what: &'static str, rows: &[Vec<f32>], vocab: usize) -> Result<Vec<f64>, SpecError> {
    rows.iter()
        .enumerate()
        .map(|(row, r)| {
            if r.len() != vocab {
                return Err(SpecError::RowLength {
                    what,
                    row,
                    expected: vocab,
                    got: r.len(),
                });
            }
            let mut sum = 0.0f64;
            for (token, &v) in r.iter().enumerate() {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(SpecError::InvalidProbability {
                        what,
                        row,
                        token,
                        value: v,
                    });
                }
                sum += f64::from(v);
            }
            if (sum - 1.0).abs() > PROB_SUM_TOLERANCE {
                return Err(SpecError::NotNormalized { what, row, sum });
            }
            Ok(sum)
        })
        .collect()
}

/// Inverse-CDF sample of the index `0..n` with non-negative weights `weight(i)` summing to
/// `total` (> 0), at uniform `u` in [0, 1). Rounding never yields an index of weight 0: past the
/// end it falls back to the last index of positive weight.
pub(crate) fn sample_weighted(
    n: usize,
    total: f64,
    u: f64,
    weight: impl Fn(usize) -> f64,
) -> usize {
    let mut target = u * total;
    let mut last_positive = 0;
    for i in 0..n {
        let w = weight(i);
        if w > 0.0 {
            if target < w {
                return i;
            }
            target -= w;
            last_positive = i;
        }
    }
    last_positive
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn greedy_accepts_the_matching_prefix_then_the_targets_token() {
        let v = verify_greedy(&[1, 2, 3], &[1, 2, 9, 4]).unwrap();
        assert_eq!(v.tokens, [1, 2, 9]);
        assert_eq!(v.num_accepted_drafts, 2);
        let v = verify_greedy(&[1, 2, 3], &[1, 2, 3, 4]).unwrap();
        assert_eq!(
            (v.tokens.as_slice(), v.num_accepted_drafts),
            (&[1, 2, 3, 4][..], 3)
        );
        let v = verify_greedy(&[5], &[6, 7]).unwrap();
        assert_eq!((v.tokens.as_slice(), v.num_accepted_drafts), (&[6][..], 0));
        // No drafts: plain decoding.
        let v = verify_greedy(&[], &[8]).unwrap();
        assert_eq!((v.tokens.as_slice(), v.num_accepted_drafts), (&[8][..], 0));
    }

    #[test]
    fn greedy_rejects_a_wrong_number_of_target_rows() {
        for bad in [&[][..], &[1, 2][..], &[1, 2, 3, 4, 5][..]] {
            let err = verify_greedy(&[1, 2, 3], bad).unwrap_err();
            assert!(
                matches!(err, SpecError::ShapeMismatch { what: "target_argmax", expected: 4, got } if got == bad.len()),
                "{err}"
            );
        }
    }

    fn one_hot(v: usize, i: usize) -> Vec<f32> {
        let mut r = vec![0.0; v];
        r[i] = 1.0;
        r
    }

    #[test]
    fn stochastic_with_certain_drafts_accepts_all_and_adds_the_bonus() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let target = vec![one_hot(4, 1), one_hot(4, 2), one_hot(4, 3)];
        for q in [None, Some(&target[..2])] {
            let v = verify_stochastic(&[1, 2], q, &target, &mut rng).unwrap();
            assert_eq!(v.tokens, [1, 2, 3]);
            assert_eq!(v.num_accepted_drafts, 2);
        }
    }

    #[test]
    fn stochastic_never_accepts_a_token_the_target_rules_out() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // The target puts no mass on the draft 0: it is always rejected and the replacement
        // comes from the residual, which excludes 0.
        let target = vec![vec![0.0, 0.5, 0.5], vec![1.0, 0.0, 0.0]];
        for _ in 0..1000 {
            let v = verify_stochastic(&[0], None, &target, &mut rng).unwrap();
            assert_eq!(v.num_accepted_drafts, 0);
            assert_eq!(v.tokens.len(), 1);
            assert_ne!(v.tokens[0], 0);
        }
    }

    #[test]
    fn stochastic_with_draft_equal_to_target_always_accepts() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let p = vec![0.1f32, 0.2, 0.3, 0.4];
        let target = vec![p.clone(), p.clone(), p.clone()];
        let q = vec![p.clone(), p];
        for _ in 0..1000 {
            let v = verify_stochastic(&[0, 3], Some(&q), &target, &mut rng).unwrap();
            assert_eq!(v.num_accepted_drafts, 2);
        }
    }

    #[test]
    fn stochastic_rejects_malformed_input() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let p = vec![0.25f32; 4];
        let ok = vec![p.clone(), p.clone()];
        let check = |r: Result<Verified, SpecError>, want: &str| {
            let e = r.unwrap_err();
            let name = format!("{e:?}");
            assert!(name.starts_with(want), "{want}: got {e}");
        };
        check(
            verify_stochastic(&[1, 2], None, &ok, &mut rng),
            "ShapeMismatch",
        );
        check(
            verify_stochastic(&[1], Some(&ok), &ok, &mut rng),
            "ShapeMismatch",
        );
        check(
            verify_stochastic(&[1], None, &[p.clone(), vec![0.5; 2]], &mut rng),
            "RowLength",
        );
        check(
            verify_stochastic(&[1], Some(&[vec![1.0; 1]]), &ok, &mut rng),
            "RowLength",
        );
        check(
            verify_stochastic(&[4], None, &ok, &mut rng),
            "TokenOutOfVocab",
        );
        let mut nan = p.clone();
        nan[2] = f32::NAN;
        check(
            verify_stochastic(&[1], None, &[p.clone(), nan], &mut rng),
            "InvalidProbability",
        );
        let mut neg = vec![0.5f32, 0.5, 0.25, -0.25];
        check(
            verify_stochastic(&[1], Some(&[neg.clone()]), &ok, &mut rng),
            "InvalidProbability",
        );
        neg[3] = f32::INFINITY;
        check(
            verify_stochastic(&[1], None, &[neg, p.clone()], &mut rng),
            "InvalidProbability",
        );
        check(
            verify_stochastic(&[1], None, &[vec![0.3; 4], p.clone()], &mut rng),
            "NotNormalized",
        );
        check(
            verify_stochastic(&[], None, &[vec![]], &mut rng),
            "NotNormalized",
        );
        check(
            verify_stochastic(&[1], Some(&[vec![0.5, 0.0, 0.5, 0.0]]), &ok, &mut rng),
            "ImpossibleDraft",
        );
        // Within the tolerance is fine.
        let almost = vec![0.25f32, 0.25, 0.25, 0.2502];
        assert!(
            verify_stochastic(
                &[1],
                Some(std::slice::from_ref(&almost)),
                &[almost.clone(), p],
                &mut rng
            )
            .is_ok()
        );
    }

    #[test]
    fn sample_weighted_skips_zero_weights_even_at_the_edges() {
        let w = [0.0, 0.5, 0.0, 0.5, 0.0];
        assert_eq!(sample_weighted(5, 1.0, 0.0, |i| w[i]), 1);
        assert_eq!(sample_weighted(5, 1.0, 0.49, |i| w[i]), 1);
        assert_eq!(sample_weighted(5, 1.0, 0.5, |i| w[i]), 3);
        // A total slightly larger than the weights' sum (rounding) still lands on a real index.
        assert_eq!(sample_weighted(5, 1.001, 0.99999, |i| w[i]), 3);
    }
}
