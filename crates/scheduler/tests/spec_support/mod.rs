//! Shared by the `spec_*` integration tests: greedy speculative decoding loops over a target
//! (a fake one, a function of the history, or a real model through the paged cache), and a
//! tiny dummy model.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use kv_block_manager::{BlockManager, BlockManagerConfig, BlockTableMatrix, SeqId, StepSlots};
use model::generate::argmax;
use model::{Backend, CpuBackend, DType, ForwardBatch, KvCacheConfig, ModelConfig, Weights};
use scheduler::spec::{ProposeRequest, Proposer, SpecController, verify_greedy};

/// A target model for greedy decoding.
pub trait GreedyTarget {
    /// The target's argmax after `history` and after each prefix of `drafts`:
    /// `drafts.len() + 1` tokens, computed in one "forward".
    fn argmax_rows(&mut self, history: &[u32], drafts: &[u32]) -> Vec<u32>;
    /// After verification: of the drafts of the last call, `accepted` were kept (roll back the
    /// rest). `history_len` is the history's length in that call.
    fn keep(&mut self, history_len: usize, accepted: usize);
}

/// A deterministic fake target: the next token is a function of the whole history.
#[derive(Debug, Clone, Copy)]
pub struct FakeTarget {
    pub vocab: u32,
    /// Target forward passes run.
    pub passes: usize,
}

impl FakeTarget {
    pub fn new(vocab: u32) -> Self {
        Self { vocab, passes: 0 }
    }

    /// Mostly a fixed map of the last token (so the text falls into cycles that n-gram lookup
    /// can exploit), but every so often, depending on the last three tokens and the length,
    /// something else.
    pub fn next(&self, h: &[u32]) -> u32 {
        let v = self.vocab;
        let last = h[h.len() - 1];
        let mut x = u64::from(last).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ h.len() as u64;
        for &t in h.iter().rev().take(3) {
            x = (x ^ u64::from(t)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 31;
        }
        if x.is_multiple_of(7) {
            (x >> 8) as u32 % v
        } else {
            (last * 17 + 5) % v
        }
    }
}

impl GreedyTarget for FakeTarget {
    fn argmax_rows(&mut self, history: &[u32], drafts: &[u32]) -> Vec<u32> {
        self.passes += 1;
        let mut h = history.to_vec();
        let mut rows = Vec::with_capacity(drafts.len() + 1);
        for i in 0..=drafts.len() {
            rows.push(self.next(&h));
            if i < drafts.len() {
                h.push(drafts[i]);
            }
        }
        rows
    }

    fn keep(&mut self, _history_len: usize, _accepted: usize) {}
}

/// A real model through its paged KV cache: one sequence, the verifying forward runs the
/// not-yet-cached history tokens plus the drafts, and rejected drafts are truncated away.
pub struct ModelTarget {
    pub backend: CpuBackend,
    pub blocks: BlockManager,
    step: StepSlots,
    matrix: BlockTableMatrix,
    logits: Vec<f32>,
    pub passes: usize,
}

const SEQ: SeqId = SeqId(0);

impl ModelTarget {
    pub fn new(weights: Weights, cache: KvCacheConfig) -> Self {
        let mut config = BlockManagerConfig::new(cache.num_blocks);
        config.block_size = cache.block_size;
        config.enable_prefix_caching = false;
        config.sliding_window = weights.config().sliding_window;
        config.watermark = 0.0;
        Self {
            backend: CpuBackend::new(weights, cache).unwrap(),
            blocks: BlockManager::new(config).unwrap(),
            step: StepSlots::default(),
            matrix: BlockTableMatrix::default(),
            logits: Vec::new(),
            passes: 0,
        }
    }

    fn cached(&self) -> usize {
        self.blocks.num_slotted_tokens(SEQ).unwrap_or(0)
    }

    /// Feeds `tokens` after the cached ones in one forward; next-token logits of the last
    /// `want` of them.
    fn run(&mut self, tokens: &[u32], want: usize) -> Vec<Vec<f32>> {
        let first = self.cached();
        self.step.clear();
        if first == 0 {
            self.blocks.add_sequence(SEQ, tokens, None).unwrap();
            self.blocks
                .allocate_slots(SEQ, tokens.len(), &mut self.step)
                .unwrap();
        } else {
            self.blocks
                .append_tokens(SEQ, tokens, &mut self.step)
                .unwrap();
        }
        self.blocks
            .update_block_table_matrix(&[SEQ], None, &mut self.matrix)
            .unwrap();
        let n = tokens.len() as u32;
        let positions: Vec<u32> = (first as u32..first as u32 + n).collect();
        let logits_indices: Vec<u32> = (n - want as u32..n).collect();
        let batch = ForwardBatch {
            token_ids: tokens,
            positions: &positions,
            slot_mapping: &self.step.slot_mapping,
            seq_starts: &[0, n],
            block_tables: self.matrix.block_tables(),
            max_blocks: self.matrix.max_blocks(),
            context_lens: self.matrix.context_lens(),
            logits_indices: &logits_indices,
        };
        self.backend.copy_blocks(&self.step.copies).unwrap();
        self.backend.forward(&batch, &mut self.logits).unwrap();
        self.passes += 1;
        let vocab = self.backend.config().vocab_size;
        self.logits
            .chunks_exact(vocab)
            .map(<[f32]>::to_vec)
            .collect()
    }
}

impl GreedyTarget for ModelTarget {
    fn argmax_rows(&mut self, history: &[u32], drafts: &[u32]) -> Vec<u32> {
        let cached = self.cached();
        let mut tokens = history[cached..].to_vec();
        tokens.extend_from_slice(drafts);
        self.run(&tokens, drafts.len() + 1)
            .iter()
            .map(|row| argmax(row))
            .collect()
    }

    fn keep(&mut self, history_len: usize, accepted: usize) {
        self.blocks.truncate(SEQ, history_len + accepted).unwrap();
    }
}

/// How many drafts to ask for, each step.
pub enum KPolicy<'a> {
    /// Always this many.
    Fixed(usize),
    /// A controller, with the running batch size of each step (cycled).
    Controller(&'a mut SpecController, Vec<usize>),
}

/// What a decoding loop produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub steps: usize,
    pub proposed: usize,
    pub accepted: usize,
}

/// Plain greedy decoding of `n` tokens: one target pass per token.
pub fn plain_greedy(target: &mut dyn GreedyTarget, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut history = prompt.to_vec();
    for _ in 0..n {
        let next = target.argmax_rows(&history, &[])[0];
        target.keep(history.len(), 0);
        history.push(next);
    }
    history.split_off(prompt.len())
}

/// Greedy speculative decoding of `n` tokens: propose → verify in one target pass → keep.
pub fn speculative_greedy(
    target: &mut dyn GreedyTarget,
    proposer: &mut dyn Proposer,
    prompt: &[u32],
    n: usize,
    mut policy: KPolicy<'_>,
) -> Outcome {
    let seq = SeqId(42);
    let mut history = prompt.to_vec();
    let mut outcome = Outcome::default();
    let mut proposals = Vec::new();
    while history.len() < prompt.len() + n {
        let k = match &mut policy {
            KPolicy::Fixed(k) => *k,
            KPolicy::Controller(c, batches) => {
                c.next_step();
                c.k_for(seq, batches[outcome.steps % batches.len()])
            }
        };
        proposer
            .propose(
                &[ProposeRequest {
                    seq,
                    tokens: &history,
                    k,
                    temperature: 0.0,
                }],
                &mut proposals,
            )
            .unwrap();
        let drafts = &proposals[0].tokens;
        assert!(drafts.len() <= k, "{} drafts for k = {k}", drafts.len());
        assert!(proposals[0].draft_probs.is_none());
        let rows = target.argmax_rows(&history, drafts);
        let verified = verify_greedy(drafts, &rows).unwrap();
        target.keep(history.len(), verified.num_accepted_drafts);
        if let KPolicy::Controller(c, _) = &mut policy {
            c.record(seq, drafts.len(), verified.num_accepted_drafts)
                .unwrap();
        }
        outcome.steps += 1;
        outcome.proposed += drafts.len();
        outcome.accepted += verified.num_accepted_drafts;
        history.extend_from_slice(&verified.tokens);
    }
    proposer.release(seq);
    history.truncate(prompt.len() + n);
    outcome.tokens = history.split_off(prompt.len());
    outcome
}

/// The tiny Llama of the model crate's CPU tests.
pub fn tiny_config() -> ModelConfig {
    ModelConfig::tiny(96)
}

pub fn tiny_weights(config: &ModelConfig, seed: u64) -> Weights {
    Weights::dummy(config, DType::F32, seed).unwrap()
}

pub fn tiny_cache(num_blocks: usize) -> KvCacheConfig {
    KvCacheConfig {
        num_blocks,
        block_size: 8,
        // fp16 KV: what the model crate's exactness tests use.
        dtype: "fp16".parse().unwrap(),
        num_cpu_blocks: 0,
    }
}
