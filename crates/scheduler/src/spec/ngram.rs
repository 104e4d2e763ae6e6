//! Prompt-lookup decoding: propose what followed the last earlier occurrence of the
//! sequence's final n-gram. No model, no KV cache; good on inputs that repeat themselves
//! (code edits, summaries quoting the prompt, retrieval answers).

use std::hash::Hasher;

use kv_block_manager::SeqId;
use rustc_hash::{FxHashMap, FxHasher};

use super::{Proposal, ProposeRequest, Proposer, SpecError, validate_requests};

/// Longest n-gram an [`NgramProposer`] may match.
pub const MAX_NGRAM: usize = 32;

/// Settings of an [`NgramProposer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramConfig {
    /// Shortest suffix to look up (≥ 1).
    pub min_n: usize,
    /// Longest suffix to look up (`min_n..=`[`MAX_NGRAM`]); longer matches are tried first.
    pub max_n: usize,
}

impl Default for NgramConfig {
    /// `min_n = 2`, `max_n = 4`.
    fn default() -> Self {
        Self { min_n: 2, max_n: 4 }
    }
}

/// Prompt-lookup proposer.
///
/// For a history `h` of length `L` it tries `n = max_n` down to `min_n`: it finds the most
/// recent earlier occurrence `h[s..s + n]` of the suffix `h[L − n..L]` (`s + n < L`) and
/// proposes the up to `k` tokens that followed it. The copy may run past the end of the
/// history into the tokens it is proposing (an overlapping copy, as in LZ77), so a repeating
/// pattern yields `k` tokens even when its last occurrence ends just before the suffix. No
/// match: an empty proposal. Proposals are point masses (`draft_probs` is `None`) at every
/// temperature.
///
/// Each sequence has an index from every n-gram (`min_n ≤ n ≤ max_n`) to its most recent
/// start, extended with the tokens added since the last call: a call costs
/// O(new tokens · (max_n − min_n + 1) · max_n) to update the index plus O(max_n² + k) to look
/// up, independent of the history's length, and the index holds up to `max_n − min_n + 1`
/// entries per token. The index assumes that a sequence's history only grows between calls (as
/// accepted tokens are appended): call [`release`](Proposer::release) before giving a sequence
/// id a different history. Even so, every hit is checked against the history given (a failed
/// check or a shorter history rebuilds the index), so a stale index may miss the most recent
/// match but never proposes anything but the continuation of a real one.
#[derive(Debug, Clone)]
pub struct NgramProposer {
    config: NgramConfig,
    seqs: FxHashMap<SeqId, NgramIndex>,
}

/// The n-grams of one sequence.
#[derive(Debug, Clone, Default)]
struct NgramIndex {
    /// N-grams ending before this position are indexed (the history's last token is never an
    /// end: the suffix being looked up must not find itself).
    indexed_end: usize,
    /// Hash of (n, tokens) → start of the most recent occurrence.
    starts: FxHashMap<u64, u32>,
}

impl NgramProposer {
    /// A proposer with `config`, checked.
    pub fn new(config: NgramConfig) -> Result<Self, SpecError> {
        if config.min_n == 0 {
            return Err(SpecError::InvalidConfig {
                field: "min_n",
                reason: "must be at least 1".into(),
            });
        }
        if config.max_n < config.min_n || config.max_n > MAX_NGRAM {
            return Err(SpecError::InvalidConfig {
                field: "max_n",
                reason: format!(
                    "is {}, must be in {}..={MAX_NGRAM}",
                    config.max_n, config.min_n
                ),
            });
        }
        Ok(Self {
            config,
            seqs: FxHashMap::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> NgramConfig {
        self.config
    }

    /// The proposal for one history, updating (or, when stale, rebuilding) its index.
    fn propose_one(&mut self, seq: SeqId, h: &[u32], k: usize) -> Vec<u32> {
        let config = self.config;
        let index = self.seqs.entry(seq).or_default();
        let len = h.len();
        if index.indexed_end > len - 1 {
            *index = NgramIndex::default();
        }
        index.extend(h, config);
        for n in (config.min_n..=config.max_n.min(len - 1)).rev() {
            let suffix = &h[len - n..];
            let Some(mut s) = index.starts.get(&key(suffix)).map(|&s| s as usize) else {
                continue;
            };
            if !(s + n < len && h[s..s + n] == *suffix) {
                // Stale index (the history changed) or a hash collision: rebuild, look again.
                *index = NgramIndex::default();
                index.extend(h, config);
                match index.starts.get(&key(suffix)) {
                    Some(&again)
                        if again as usize + n < len && h[again as usize..][..n] == *suffix =>
                    {
                        s = again as usize;
                    }
                    _ => continue,
                }
            }
            return overlapping_copy(h, s + n, k);
        }
        Vec::new()
    }
}

impl NgramIndex {
    /// Indexes the n-grams of `h` ending before its last token.
    fn extend(&mut self, h: &[u32], config: NgramConfig) {
        let end = h.len() - 1;
        for e in self.indexed_end..end {
            for n in config.min_n..=config.max_n.min(e + 1) {
                let start = e + 1 - n;
                self.starts.insert(key(&h[start..=e]), start as u32);
            }
        }
        self.indexed_end = self.indexed_end.max(end);
    }
}

/// The index key of an n-gram: a hash of its length and tokens.
fn key(gram: &[u32]) -> u64 {
    let mut hasher = FxHasher::default();
    hasher.write_usize(gram.len());
    for &t in gram {
        hasher.write_u32(t);
    }
    hasher.finish()
}

/// Up to `k` tokens copied from `h` starting at `from` (< `h.len()`), continuing into the copied
/// tokens themselves past the end of `h`.
fn overlapping_copy(h: &[u32], from: usize, k: usize) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::with_capacity(k);
    for j in 0..k {
        let i = from + j;
        let t = if i < h.len() { h[i] } else { out[i - h.len()] };
        out.push(t);
    }
    out
}

impl Proposer for NgramProposer {
    fn propose(
        &mut self,
        requests: &[ProposeRequest<'_>],
        out: &mut Vec<Proposal>,
    ) -> Result<(), SpecError> {
        out.clear();
        validate_requests(requests)?;
        for r in requests {
            let tokens = if r.k == 0 {
                Vec::new()
            } else {
                self.propose_one(r.seq, r.tokens, r.k)
            };
            out.push(Proposal {
                tokens,
                draft_probs: None,
            });
        }
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    /// The specification, by brute force.
    fn naive(h: &[u32], k: usize, config: NgramConfig) -> Vec<u32> {
        let len = h.len();
        if k == 0 {
            return Vec::new();
        }
        for n in (config.min_n..=config.max_n).rev() {
            if n >= len {
                continue;
            }
            let suffix = &h[len - n..];
            if let Some(s) = (0..len - n).rev().find(|&s| &h[s..s + n] == suffix) {
                return overlapping_copy(h, s + n, k);
            }
        }
        Vec::new()
    }

    fn propose(p: &mut NgramProposer, seq: u64, h: &[u32], k: usize) -> Vec<u32> {
        let mut out = Vec::new();
        p.propose(
            &[ProposeRequest {
                seq: SeqId(seq),
                tokens: h,
                k,
                temperature: 0.0,
            }],
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        assert!(out[0].draft_probs.is_none());
        out.pop().unwrap().tokens
    }

    #[test]
    fn proposes_what_followed_the_most_recent_longest_match() {
        let mut p = NgramProposer::new(NgramConfig { min_n: 1, max_n: 3 }).unwrap();
        // "1 2" occurs at 0 (followed by 3) and at 4 (followed by 5): the most recent wins.
        assert_eq!(
            propose(&mut p, 1, &[1, 2, 3, 9, 1, 2, 5, 7, 1, 2], 2),
            [5, 7]
        );
        // The 3-gram "8 1 2" (followed by 3) beats the more recent 2-gram "1 2" (followed by 5).
        assert_eq!(
            propose(&mut p, 2, &[8, 1, 2, 3, 9, 1, 2, 5, 8, 1, 2], 3),
            [3, 9, 1]
        );
        // k caps the proposal; the copy continues into itself past the end of the history.
        assert_eq!(propose(&mut p, 3, &[4, 5, 4, 5], 5), [4, 5, 4, 5, 4]);
        assert_eq!(propose(&mut p, 4, &[7, 7], 3), [7, 7, 7]);
        // No earlier occurrence of any suffix, a history of one token, k = 0: nothing.
        assert!(propose(&mut p, 5, &[1, 2, 3, 4], 4).is_empty());
        assert!(propose(&mut p, 6, &[1], 4).is_empty());
        assert!(propose(&mut p, 7, &[1, 1, 1], 0).is_empty());
    }

    #[test]
    fn min_n_rules_out_short_matches() {
        let mut p = NgramProposer::new(NgramConfig { min_n: 2, max_n: 2 }).unwrap();
        assert!(propose(&mut p, 1, &[1, 2, 3, 2], 2).is_empty());
        assert_eq!(propose(&mut p, 1, &[1, 2, 3, 2, 3], 2), [2, 3]);
    }

    #[test]
    fn a_changed_or_shorter_history_never_gives_a_false_match() {
        let config = NgramConfig { min_n: 1, max_n: 2 };
        let mut p = NgramProposer::new(config).unwrap();
        let a = [1, 2, 3, 4, 5, 1, 2];
        assert_eq!(propose(&mut p, 1, &a, 2), [3, 4]);
        // Same sequence id, an unrelated history of the same length: the stale index's hit for
        // "2" fails its check, the index is rebuilt, and there is no match.
        let b = [9, 8, 7, 6, 5, 4, 2];
        assert_eq!(propose(&mut p, 1, &b, 2), naive(&b, 2, config));
        // A shorter one.
        let c = [9, 3, 9];
        assert_eq!(propose(&mut p, 1, &c, 2), [3, 9]);
        p.release(SeqId(1));
        assert!(p.seqs.is_empty());
        p.release(SeqId(1)); // unknown: a no-op
    }

    #[test]
    fn bad_config_is_rejected() {
        for (min_n, max_n, field) in [
            (0, 3, "min_n"),
            (3, 2, "max_n"),
            (1, MAX_NGRAM + 1, "max_n"),
        ] {
            match NgramProposer::new(NgramConfig { min_n, max_n }) {
                Err(SpecError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{min_n}..={max_n}: {other:?}"),
            }
        }
        assert_eq!(
            NgramProposer::new(NgramConfig::default()).unwrap().config(),
            NgramConfig::default()
        );
    }

    #[test]
    fn bad_requests_are_rejected_and_clear_the_output() {
        let mut p = NgramProposer::new(NgramConfig::default()).unwrap();
        let r = |seq, tokens, temperature| ProposeRequest {
            seq: SeqId(seq),
            tokens,
            k: 2,
            temperature,
        };
        let good = [1u32, 2, 1];
        for (requests, field) in [
            (vec![r(1, &[][..], 0.0)], "tokens"),
            (vec![r(1, &good[..], f32::NAN)], "temperature"),
            (vec![r(1, &good[..], -1.0)], "temperature"),
            (vec![r(1, &good[..], f32::INFINITY)], "temperature"),
            (vec![r(1, &good[..], 0.0), r(1, &good[..], 0.0)], "seq"),
        ] {
            let mut out = vec![Proposal::default()];
            match p.propose(&requests, &mut out) {
                Err(SpecError::InvalidRequest { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
            assert!(out.is_empty());
        }
    }

    /// Whether `proposal` continues a real earlier occurrence of one of `h`'s suffixes.
    fn is_real_match(h: &[u32], k: usize, config: NgramConfig, proposal: &[u32]) -> bool {
        let len = h.len();
        (config.min_n..=config.max_n.min(len.saturating_sub(1))).any(|n| {
            (0..len - n)
                .any(|s| h[s..s + n] == h[len - n..] && overlapping_copy(h, s + n, k) == proposal)
        })
    }

    proptest! {
        /// The incrementally maintained index gives the brute-force answer as the history grows
        /// by a few tokens at a time, also after a release and a new history.
        #[test]
        fn index_matches_brute_force(
            min_n in 1usize..4,
            extra_n in 0usize..3,
            tokens in proptest::collection::vec(0u32..4, 1..120),
            steps in proptest::collection::vec(1usize..5, 1..40),
            k in 0usize..6,
            replace_at in 0usize..40,
        ) {
            let config = NgramConfig { min_n, max_n: min_n + extra_n };
            let mut p = NgramProposer::new(config).unwrap();
            let mut len = 0;
            for (i, step) in steps.iter().enumerate() {
                len = (len + step).min(tokens.len());
                let h: Vec<u32> = if i >= replace_at {
                    if i == replace_at {
                        p.release(SeqId(9));
                    }
                    tokens[..len].iter().map(|t| (t + 1) % 4).collect()
                } else {
                    tokens[..len].to_vec()
                };
                prop_assert_eq!(propose(&mut p, 9, &h, k), naive(&h, k, config), "len {}", len);
            }
        }

        /// Arbitrary histories under one sequence id, never released: every non-empty proposal
        /// continues a real match.
        #[test]
        fn a_stale_index_never_proposes_a_false_match(
            histories in proptest::collection::vec(
                proptest::collection::vec(0u32..3, 1..30), 1..12),
            k in 1usize..5,
        ) {
            let config = NgramConfig { min_n: 1, max_n: 3 };
            let mut p = NgramProposer::new(config).unwrap();
            for h in &histories {
                let got = propose(&mut p, 9, h, k);
                prop_assert!(got.is_empty() || is_real_match(h, k, config, &got), "{:?} -> {:?}", h, got);
            }
        }
    }
}
