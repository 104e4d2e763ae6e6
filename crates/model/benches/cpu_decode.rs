//! CPU decode of SmolLM2-135M: one decode step of `batch` sequences (one token each) through
//! the CPU backend, including the block manager's bookkeeping for the step. The model has
//! SmolLM2-135M's shape with deterministic dummy Q4_1 weights (the default model's format), so
//! the benchmark needs no download and costs the same as the real model; contexts stay
//! between 32 and 96 tokens (the sequences are prefilled again, untimed, every 64 steps).
//!
//! `cargo bench -p model --bench cpu_decode` (gated by `cargo xtask perf-gate`).
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../../../benches/calibration.rs"]
mod calibration;

use std::cell::OnceCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use kv_block_manager::{BlockManager, BlockManagerConfig, BlockTableMatrix, SeqId, StepSlots};
use model::generate::argmax;
use model::{Backend, CpuBackend, DType, ForwardBatch, KvCacheConfig, ModelConfig, Weights};

const PROMPT: usize = 32;
/// Decode steps between two refills.
const STEPS: usize = 64;

/// `batch` sequences decoding together.
struct Decoder {
    backend: CpuBackend,
    bm: BlockManager,
    seqs: Vec<SeqId>,
    tokens: Vec<u32>,
    vocab: usize,
    steps: usize,
    generation: u64,
    step: StepSlots,
    matrix: BlockTableMatrix,
    logits: Vec<f32>,
    positions: Vec<u32>,
}

impl Decoder {
    fn new(weights: &Weights, batch: usize) -> Self {
        let blocks = batch * (PROMPT + STEPS + 16).div_ceil(16) + 8;
        let cache = KvCacheConfig {
            num_blocks: blocks,
            block_size: 16,
            dtype: kv_quant::KvCacheDtype::Fp16,
            num_cpu_blocks: 0,
        };
        let mut config = BlockManagerConfig::new(blocks);
        config.enable_prefix_caching = false;
        let mut d = Self {
            backend: CpuBackend::new(weights.clone(), cache).unwrap(),
            bm: BlockManager::new(config).unwrap(),
            seqs: Vec::new(),
            tokens: Vec::new(),
            vocab: weights.config().vocab_size,
            steps: 0,
            generation: 0,
            step: StepSlots::default(),
            matrix: BlockTableMatrix::default(),
            logits: Vec::new(),
            positions: Vec::new(),
        };
        d.refill(batch);
        d
    }

    /// Frees the sequences and prefills `batch` new ones (32-token prompts).
    fn refill(&mut self, batch: usize) {
        for &s in &self.seqs {
            self.bm.free(s).unwrap();
        }
        let first = self.generation * batch as u64;
        self.generation += 1;
        self.seqs = (first..first + batch as u64).map(SeqId).collect();
        self.tokens.clear();
        for &s in &self.seqs {
            let prompt: Vec<u32> = (0..PROMPT as u32)
                .map(|i| (i * 131 + s.0 as u32 * 7 + 1) % self.vocab as u32)
                .collect();
            self.bm.add_sequence(s, &prompt, None).unwrap();
            self.step.clear();
            self.bm.allocate_slots(s, PROMPT, &mut self.step).unwrap();
            self.bm
                .update_block_table_matrix(&[s], None, &mut self.matrix)
                .unwrap();
            let positions: Vec<u32> = (0..PROMPT as u32).collect();
            let fb = ForwardBatch {
                token_ids: &prompt,
                positions: &positions,
                slot_mapping: &self.step.slot_mapping,
                seq_starts: &[0, PROMPT as u32],
                block_tables: self.matrix.block_tables(),
                max_blocks: self.matrix.max_blocks(),
                context_lens: self.matrix.context_lens(),
                logits_indices: &[PROMPT as u32 - 1],
            };
            self.backend.forward(&fb, &mut self.logits).unwrap();
            self.tokens.push(argmax(&self.logits));
        }
        self.steps = 0;
    }

    /// One timed decode step (a refill first, untimed, every `STEPS` steps).
    fn step(&mut self) -> Duration {
        if self.steps == STEPS {
            self.refill(self.seqs.len());
        }
        self.steps += 1;
        let start = Instant::now();
        self.step.clear();
        self.positions.clear();
        for (&s, &t) in self.seqs.iter().zip(&self.tokens) {
            self.positions
                .push(self.bm.num_slotted_tokens(s).unwrap() as u32);
            self.bm.append_tokens(s, &[t], &mut self.step).unwrap();
        }
        self.bm
            .update_block_table_matrix(&self.seqs, None, &mut self.matrix)
            .unwrap();
        let n = self.seqs.len() as u32;
        let starts: Vec<u32> = (0..=n).collect();
        let all: Vec<u32> = (0..n).collect();
        let fb = ForwardBatch {
            token_ids: &self.tokens,
            positions: &self.positions,
            slot_mapping: &self.step.slot_mapping,
            seq_starts: &starts,
            block_tables: self.matrix.block_tables(),
            max_blocks: self.matrix.max_blocks(),
            context_lens: self.matrix.context_lens(),
            logits_indices: &all,
        };
        self.backend.forward(&fb, &mut self.logits).unwrap();
        for (i, t) in self.tokens.iter_mut().enumerate() {
            *t = argmax(&self.logits[i * self.vocab..(i + 1) * self.vocab]);
        }
        black_box(&self.tokens);
        start.elapsed()
    }
}

fn decode(c: &mut Criterion) {
    // Built on first use (outside the timed `iter_custom`), so a process whose filter leaves
    // these benchmarks out, or runs only one of them (the perf gate runs one benchmark per
    // process), does not spend seconds quantising dummy weights it never uses.
    let weights = OnceCell::new();
    let mut group = c.benchmark_group("cpu_decode");
    // A step takes milliseconds: flat sampling keeps the sample count (not the iteration
    // count) proportional to the measurement time.
    group.sampling_mode(SamplingMode::Flat);
    for batch in [1, 8] {
        let mut decoder = None;
        group.bench_function(format!("smollm2_135m_q4_1/batch{batch}"), |b| {
            let decoder = decoder.get_or_insert_with(|| {
                let weights = weights.get_or_init(|| {
                    Weights::dummy(&ModelConfig::smollm2_135m(), DType::Q4_1, 1).unwrap()
                });
                Decoder::new(weights, batch)
            });
            b.iter_custom(|iters| (0..iters).map(|_| decoder.step()).sum());
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
}

criterion_group! {
    name = benches;
    config = config();
    targets = calibration::bench, decode
}
criterion_main!(benches);
