//! Greedy speculative decoding produces exactly the tokens of plain greedy decoding, whatever
//! is proposed and however many tokens: a deterministic fake target (a function of the
//! history) driven through propose → verify loops with the n-gram proposer, an oracle that is
//! right most of the time, random proposals, a tiny draft model, and `k` chosen by the
//! controller.
#![allow(clippy::unwrap_used)]

mod spec_support;

use kv_block_manager::SeqId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use scheduler::spec::{
    DraftModelConfig, DraftModelProposer, NgramConfig, NgramProposer, Proposal, ProposeRequest,
    Proposer, SpecController, SpecControllerConfig, SpecError,
};
use spec_support::{
    FakeTarget, KPolicy, Outcome, plain_greedy, speculative_greedy, tiny_cache, tiny_config,
    tiny_weights,
};

const VOCAB: u32 = 96;
const N: usize = 200;

/// Proposes the fake target's own continuation, each token replaced by a random one with
/// probability `error_rate` (and the rest of the proposal following the wrong branch).
#[derive(Debug)]
struct OracleProposer {
    target: FakeTarget,
    error_rate: f64,
    rng: ChaCha8Rng,
}

impl Proposer for OracleProposer {
    fn propose(
        &mut self,
        requests: &[ProposeRequest<'_>],
        out: &mut Vec<Proposal>,
    ) -> Result<(), SpecError> {
        out.clear();
        for r in requests {
            let mut h = r.tokens.to_vec();
            let mut tokens = Vec::new();
            for _ in 0..r.k {
                let mut t = self.target.next(&h);
                if self.rng.random_bool(self.error_rate) {
                    t = self.rng.random_range(0..self.target.vocab);
                }
                tokens.push(t);
                h.push(t);
            }
            out.push(Proposal {
                tokens,
                draft_probs: None,
            });
        }
        Ok(())
    }

    fn release(&mut self, _seq: SeqId) {}
}

fn prompts() -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| (0..3 + 7 * i).map(|_| rng.random_range(0..VOCAB)).collect())
        .collect();
    prompts.push(vec![5]);
    prompts.push([1, 2, 3, 4].repeat(6));
    prompts
}

fn check(name: &str, proposer: &mut dyn Proposer, policy: impl Fn() -> usize) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for (i, prompt) in prompts().iter().enumerate() {
        let want = plain_greedy(&mut FakeTarget::new(VOCAB), prompt, N);
        let mut target = FakeTarget::new(VOCAB);
        let got = speculative_greedy(&mut target, proposer, prompt, N, KPolicy::Fixed(policy()));
        assert_eq!(got.tokens, want, "{name}: prompt {i}");
        assert_eq!(target.passes, got.steps);
        outcomes.push(got);
    }
    outcomes
}

#[test]
fn ngram_speculation_equals_plain_decoding() {
    for (min_n, max_n) in [(1, 1), (1, 3), (2, 4), (3, 8)] {
        let mut p = NgramProposer::new(NgramConfig { min_n, max_n }).unwrap();
        for k in [1, 2, 4, 7] {
            let outcomes = check(&format!("ngram {min_n}..={max_n}, k {k}"), &mut p, || k);
            let accepted: usize = outcomes.iter().map(|o| o.accepted).sum();
            // The fake target cycles, so lookups do pay off.
            assert!(accepted > 0, "{min_n}..={max_n}, k {k}: nothing accepted");
        }
    }
}

#[test]
fn oracle_speculation_equals_plain_decoding_and_saves_passes() {
    for error_rate in [0.0, 0.1, 0.5, 1.0] {
        let mut p = OracleProposer {
            target: FakeTarget::new(VOCAB),
            error_rate,
            rng: ChaCha8Rng::seed_from_u64(5),
        };
        let outcomes = check(&format!("oracle {error_rate}"), &mut p, || 4);
        let steps: usize = outcomes.iter().map(|o| o.steps).sum();
        let tokens = outcomes.len() * N;
        if error_rate == 0.0 {
            // Every draft accepted: 5 tokens per pass (the last step may overshoot).
            assert_eq!(steps, outcomes.len() * N.div_ceil(5));
        }
        if error_rate <= 0.1 {
            assert!(
                steps * 2 < tokens,
                "{error_rate}: {steps} passes for {tokens} tokens"
            );
        }
    }
}

#[test]
fn random_proposals_still_give_plain_decoding() {
    #[derive(Debug)]
    struct Random(ChaCha8Rng);
    impl Proposer for Random {
        fn propose(
            &mut self,
            requests: &[ProposeRequest<'_>],
            out: &mut Vec<Proposal>,
        ) -> Result<(), SpecError> {
            out.clear();
            for r in requests {
                let n = self.0.random_range(0..=r.k);
                let tokens = (0..n).map(|_| self.0.random_range(0..VOCAB)).collect();
                out.push(Proposal {
                    tokens,
                    draft_probs: None,
                });
            }
            Ok(())
        }
        fn release(&mut self, _seq: SeqId) {}
    }
    let mut p = Random(ChaCha8Rng::seed_from_u64(9));
    check("random", &mut p, || 5);
}

#[test]
fn a_draft_model_proposer_still_gives_plain_decoding() {
    let backend = model::CpuBackend::new(tiny_weights(&tiny_config(), 3), tiny_cache(64)).unwrap();
    let mut p = DraftModelProposer::new(Box::new(backend), DraftModelConfig::default()).unwrap();
    for prompt in prompts().iter().take(3) {
        let want = plain_greedy(&mut FakeTarget::new(VOCAB), prompt, 40);
        let got = speculative_greedy(
            &mut FakeTarget::new(VOCAB),
            &mut p,
            prompt,
            40,
            KPolicy::Fixed(3),
        );
        assert_eq!(got.tokens, want);
        assert_eq!(got.proposed, 3 * got.steps);
    }
    // `speculative_greedy` released its sequence.
    assert_eq!(p.kv_stats().free_blocks, 64);
}

#[test]
fn controller_chosen_k_still_gives_plain_decoding() {
    for batches in [vec![1], vec![1, 30, 100, 50], vec![200]] {
        for error_rate in [0.05, 0.9] {
            let mut controller = SpecController::new(SpecControllerConfig::default()).unwrap();
            let mut p = OracleProposer {
                target: FakeTarget::new(VOCAB),
                error_rate,
                rng: ChaCha8Rng::seed_from_u64(6),
            };
            for prompt in prompts() {
                let want = plain_greedy(&mut FakeTarget::new(VOCAB), &prompt, N);
                let got = speculative_greedy(
                    &mut FakeTarget::new(VOCAB),
                    &mut p,
                    &prompt,
                    N,
                    KPolicy::Controller(&mut controller, batches.clone()),
                );
                assert_eq!(got.tokens, want, "{batches:?} {error_rate}");
                if batches == [200] {
                    assert_eq!(got.proposed, 0, "no speculation in a huge batch");
                }
                if batches == [1] && error_rate < 0.1 {
                    assert!(got.steps * 2 < N, "{} steps", got.steps);
                }
                if batches == [1] && error_rate > 0.5 {
                    // Rarely accepted: the controller keeps speculation mostly off.
                    assert!(got.proposed < N / 4, "{} proposed", got.proposed);
                }
            }
        }
    }
}
