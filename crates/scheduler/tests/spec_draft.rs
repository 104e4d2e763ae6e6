//! The draft-model proposer on a tiny dummy Llama: a draft identical to the target is always
//! accepted and decodes exactly like plain decoding; rolling its KV cache back gives the same
//! proposals as a fresh proposer; batching, chunked catch-up and the sliding window change
//! nothing; a full cache shrinks proposals instead of failing; sampling is reproducible and
//! reports its distributions; bad input and backend failures give typed errors.
#![allow(clippy::unwrap_used)]

mod spec_support;

use kv_block_manager::{CopyOp, SeqId};
use model::{Backend, CpuBackend, ForwardBatch, KvCacheConfig, ModelConfig, ModelError};
use scheduler::spec::{
    DraftModelConfig, DraftModelProposer, Proposal, ProposeRequest, Proposer, SpecError,
    verify_stochastic,
};
use spec_support::{
    KPolicy, ModelTarget, plain_greedy, speculative_greedy, tiny_cache, tiny_config, tiny_weights,
};

const SEED: u64 = 3;

fn draft_with(config: &ModelConfig, blocks: usize, draft: DraftModelConfig) -> DraftModelProposer {
    let backend = CpuBackend::new(tiny_weights(config, SEED), tiny_cache(blocks)).unwrap();
    DraftModelProposer::new(Box::new(backend), draft).unwrap()
}

fn draft(blocks: usize) -> DraftModelProposer {
    draft_with(&tiny_config(), blocks, DraftModelConfig::default())
}

fn request(seq: u64, tokens: &[u32], k: usize, temperature: f32) -> ProposeRequest<'_> {
    ProposeRequest {
        seq: SeqId(seq),
        tokens,
        k,
        temperature,
    }
}

fn propose(p: &mut DraftModelProposer, requests: &[ProposeRequest<'_>]) -> Vec<Proposal> {
    let mut out = Vec::new();
    p.propose(requests, &mut out).unwrap();
    assert_eq!(out.len(), requests.len());
    out
}

fn greedy(p: &mut DraftModelProposer, seq: u64, tokens: &[u32], k: usize) -> Vec<u32> {
    let out = propose(p, &[request(seq, tokens, k, 0.0)]);
    assert!(out[0].draft_probs.is_none());
    out[0].tokens.clone()
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + salt * 11 + 5) % 96)
        .collect()
}

#[test]
fn an_identical_draft_model_is_always_accepted_and_decodes_like_plain() {
    for (len, k) in [(1, 4), (9, 3), (17, 6)] {
        let prompt = prompt(len, len as u32);
        let mut plain_target = ModelTarget::new(tiny_weights(&tiny_config(), SEED), tiny_cache(64));
        let want = plain_greedy(&mut plain_target, &prompt, 60);
        let mut target = ModelTarget::new(tiny_weights(&tiny_config(), SEED), tiny_cache(64));
        let mut p = draft(64);
        let got = speculative_greedy(&mut target, &mut p, &prompt, 60, KPolicy::Fixed(k));
        assert_eq!(got.tokens, want, "prompt of {len}, k {k}");
        assert_eq!(got.accepted, got.proposed, "prompt of {len}, k {k}");
        assert_eq!(got.steps, 60usize.div_ceil(k + 1));
        assert_eq!(target.passes, got.steps);
        // The harness released the sequence: the draft cache is empty again.
        assert_eq!(p.kv_stats().free_blocks, 64);
    }
}

#[test]
fn rollback_gives_the_proposals_of_a_fresh_proposer() {
    let mut rolled = draft(64);
    let mut history = prompt(13, 1);
    // Accept j of the 4 drafts, then a token the draft did not propose.
    for (step, j) in [0usize, 2, 4, 1, 3, 0, 4, 4, 2].into_iter().enumerate() {
        let d = greedy(&mut rolled, 7, &history, 4);
        assert_eq!(d.len(), 4);
        // A fresh proposer, catching up in chunks of 3 tokens, proposes the same.
        let mut fresh = draft_with(
            &tiny_config(),
            64,
            DraftModelConfig {
                prefill_chunk: 3,
                ..DraftModelConfig::default()
            },
        );
        assert_eq!(greedy(&mut fresh, 7, &history, 4), d, "step {step}");
        // The cache holds the history and every draft but the last (never fed).
        let mut cached = history.clone();
        cached.extend_from_slice(&d[..3]);
        assert_eq!(rolled.cached_tokens(SeqId(7)).unwrap(), cached);
        history.extend_from_slice(&d[..j]);
        history.push(d.get(j).map_or(step as u32, |t| (t + 1) % 96));
    }
    // A history that is a prefix of what is cached, and one that shares nothing.
    let short = history[..10].to_vec();
    assert_eq!(
        greedy(&mut rolled, 7, &short, 4),
        greedy(&mut draft(64), 7, &short, 4)
    );
    let other = prompt(5, 9);
    assert_eq!(
        greedy(&mut rolled, 7, &other, 2),
        greedy(&mut draft(64), 7, &other, 2)
    );
    rolled.release(SeqId(7));
    rolled.release(SeqId(7));
    assert!(rolled.cached_tokens(SeqId(7)).is_none());
    assert_eq!(rolled.kv_stats().free_blocks, 64);
}

#[test]
fn batched_proposals_equal_single_ones() {
    let histories: Vec<Vec<u32>> = (0..4).map(|i| prompt(3 + 6 * i, i as u32)).collect();
    let ks = [3, 0, 5, 1];
    let requests: Vec<ProposeRequest<'_>> = histories
        .iter()
        .zip(ks)
        .enumerate()
        .map(|(i, (h, k))| request(i as u64, h, k, 0.0))
        .collect();
    let mut batched = draft(64);
    let together = propose(&mut batched, &requests);
    for (i, r) in requests.iter().enumerate() {
        assert_eq!(together[i].tokens.len(), r.k);
        let alone = greedy(&mut draft(64), i as u64, r.tokens, r.k);
        assert_eq!(together[i].tokens, alone, "sequence {i}");
    }
    // k = 0: nothing proposed, nothing cached.
    assert!(batched.cached_tokens(SeqId(1)).is_none());
}

#[test]
fn a_sliding_window_rollback_past_the_window_re_prefills() {
    let config = ModelConfig {
        sliding_window: Some(8),
        ..tiny_config()
    };
    let mut p = draft_with(&config, 64, DraftModelConfig::default());
    let history = prompt(40, 2);
    let fresh = |h: &[u32]| {
        let mut f = draft_with(&config, 64, DraftModelConfig::default());
        greedy(&mut f, 1, h, 3)
    };
    assert_eq!(greedy(&mut p, 1, &history, 3), fresh(&history));
    // Back to 12 tokens: the window released the blocks the truncation would need, so the
    // sequence is re-prefilled.
    let mut diverged = history[..12].to_vec();
    diverged.push(95);
    assert_eq!(greedy(&mut p, 1, &diverged, 3), fresh(&diverged));
    assert_eq!(p.cached_tokens(SeqId(1)).unwrap().len(), 13 + 2);
}

#[test]
fn a_full_draft_cache_shrinks_proposals_instead_of_failing() {
    // 4 blocks of 8: 32 token slots in all.
    let mut p = draft(4);
    let a = prompt(20, 1);
    let b = prompt(20, 2);
    assert_eq!(greedy(&mut p, 1, &a, 4).len(), 4); // 23 tokens cached: 3 blocks
    // No room for another 20-token history: an empty proposal, and nothing kept.
    let out = propose(&mut p, &[request(1, &a, 4, 0.0), request(2, &b, 4, 0.0)]);
    assert_eq!(out[0].tokens.len(), 4);
    assert!(out[1].tokens.is_empty());
    assert!(p.cached_tokens(SeqId(2)).is_none());
    // Once the other sequence is released it fits.
    p.release(SeqId(1));
    assert_eq!(greedy(&mut p, 2, &b, 4).len(), 4);
    p.release(SeqId(2));
    // A history of 28 tokens and k = 8: the cache fills after 4 more drafts are fed, so the
    // proposal stops at 5 tokens, equal to the start of an unconstrained proposal.
    let c = prompt(28, 3);
    let short = greedy(&mut p, 3, &c, 8);
    assert_eq!(short.len(), 5);
    assert_eq!(short, greedy(&mut draft(64), 3, &c, 8)[..5]);
    p.release(SeqId(3));
    assert_eq!(p.kv_stats().free_blocks, 4);
}

#[test]
fn sampled_drafts_are_reproducible_and_report_their_distribution() {
    let histories: Vec<Vec<u32>> = (0..3).map(|i| prompt(4 + 5 * i, i as u32)).collect();
    let requests: Vec<ProposeRequest<'_>> = histories
        .iter()
        .enumerate()
        .map(|(i, h)| request(i as u64, h, 4, 0.9))
        .collect();
    let run = |seed: u64| {
        let mut p = draft_with(
            &tiny_config(),
            64,
            DraftModelConfig {
                seed,
                ..DraftModelConfig::default()
            },
        );
        propose(&mut p, &requests)
    };
    let first = run(1);
    assert_eq!(first, run(1), "same seed, same proposals");
    assert_ne!(first, run(2), "another seed, other samples");
    for p in &first {
        let rows = p.draft_probs.as_ref().unwrap();
        assert_eq!(p.tokens.len(), 4);
        assert_eq!(rows.len(), 4);
        for (row, &t) in rows.iter().zip(&p.tokens) {
            assert_eq!(row.len(), 96);
            let sum: f64 = row.iter().map(|&v| f64::from(v)).sum();
            assert!((sum - 1.0).abs() < 1e-5, "{sum}");
            assert!(row[t as usize] > 0.0);
        }
    }
    // A sequence's samples do not depend on what it is batched with (one RNG stream each).
    let mut alone = draft_with(
        &tiny_config(),
        64,
        DraftModelConfig {
            seed: 1,
            ..DraftModelConfig::default()
        },
    );
    assert_eq!(propose(&mut alone, &requests[2..]), first[2..]);
    // The rows are what verification needs: verifying a draft against the same distribution
    // (q = p) accepts every token.
    let p = &first[0];
    let rows = p.draft_probs.as_ref().unwrap();
    let mut target = rows.clone();
    target.push(rows[0].clone());
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
    let v = verify_stochastic(&p.tokens, Some(rows), &target, &mut rng).unwrap();
    assert_eq!(v.num_accepted_drafts, 4);
}

/// A backend that fails, or returns NaN logits.
struct BrokenBackend {
    config: ModelConfig,
    nan: bool,
}

impl Backend for BrokenBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn kv_cache_config(&self) -> KvCacheConfig {
        tiny_cache(16)
    }
    fn forward(&mut self, b: &ForwardBatch<'_>, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        if self.nan {
            logits.clear();
            logits.resize(b.logits_indices.len() * self.config.vocab_size, f32::NAN);
            Ok(())
        } else {
            Err(ModelError::Unsupported("broken on purpose".into()))
        }
    }
    fn copy_blocks(&mut self, _: &[CopyOp]) -> Result<(), ModelError> {
        Ok(())
    }
    fn swap_out(&mut self, _: &[CopyOp]) -> Result<(), ModelError> {
        Ok(())
    }
    fn swap_in(&mut self, _: &[CopyOp]) -> Result<(), ModelError> {
        Ok(())
    }
}

#[test]
fn backend_failures_are_typed_errors_and_drop_the_calls_sequences() {
    for nan in [false, true] {
        let backend = BrokenBackend {
            config: tiny_config(),
            nan,
        };
        let mut p =
            DraftModelProposer::new(Box::new(backend), DraftModelConfig::default()).unwrap();
        let h = prompt(10, 0);
        let mut out = vec![Proposal::default()];
        let err = p
            .propose(&[request(1, &h, 3, 0.0), request(2, &h, 3, 0.5)], &mut out)
            .unwrap_err();
        match (nan, &err) {
            (false, SpecError::Model(ModelError::Unsupported(_))) => {}
            (true, SpecError::NonFiniteLogits { seq: SeqId(1) }) => {}
            _ => panic!("nan {nan}: {err:?}"),
        }
        assert!(out.is_empty());
        assert!(p.cached_tokens(SeqId(1)).is_none());
        assert!(p.cached_tokens(SeqId(2)).is_none());
        assert_eq!(p.kv_stats().free_blocks, 16);
        assert!(format!("{p:?}").contains("DraftModelProposer"));
    }
}

#[test]
fn bad_requests_and_config_are_rejected_without_changing_anything() {
    let backend = CpuBackend::new(tiny_weights(&tiny_config(), SEED), tiny_cache(8)).unwrap();
    match DraftModelProposer::new(
        Box::new(backend),
        DraftModelConfig {
            prefill_chunk: 0,
            ..DraftModelConfig::default()
        },
    ) {
        Err(SpecError::InvalidConfig {
            field: "prefill_chunk",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let mut p = draft(8);
    let good = prompt(6, 0);
    let outside = [1, 2, 96];
    for (requests, field) in [
        (
            vec![request(1, &good, 2, 0.0), request(2, &outside, 2, 0.0)],
            "tokens",
        ),
        (
            vec![request(1, &good, 2, 0.0), request(2, &[], 2, 0.0)],
            "tokens",
        ),
        (vec![request(1, &good, 2, f32::NAN)], "temperature"),
        (vec![request(1, &good, 2, -0.5)], "temperature"),
        (
            vec![request(1, &good, 2, 0.0), request(1, &good, 1, 0.0)],
            "seq",
        ),
    ] {
        let mut out = vec![Proposal::default()];
        match p.propose(&requests, &mut out) {
            Err(SpecError::InvalidRequest { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
        assert!(out.is_empty());
        assert!(p.cached_tokens(SeqId(1)).is_none(), "{field}");
        assert_eq!(p.kv_stats().free_blocks, 8);
    }
    assert_eq!(p.config(), DraftModelConfig::default());
}
