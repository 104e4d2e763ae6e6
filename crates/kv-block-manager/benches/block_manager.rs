//! Bookkeeping cost of the block manager: one decode step of a large batch, prefix lookup with
//! allocation, and raw allocate/free throughput.
//!
//! `cargo bench -p kv-block-manager` (or `cargo xtask bench -p kv-block-manager`).
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kv_block_manager::{BlockManager, BlockManagerConfig, BlockTableMatrix, SeqId, StepSlots};

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 256 running sequences with context lengths drawn from 128..2048, prefilled.
fn decode_batch() -> (BlockManager, Vec<SeqId>) {
    let mut m = BlockManager::new(BlockManagerConfig::new(40_000)).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut step = StepSlots::default();
    let seqs: Vec<SeqId> = (0..256).map(SeqId).collect();
    for &seq in &seqs {
        let len = 128 + rng.below(1920) as usize;
        let prompt: Vec<u32> = (0..len).map(|_| rng.below(32_000) as u32).collect();
        m.add_sequence(seq, &prompt, None).unwrap();
        m.allocate_slots(seq, len, &mut step).unwrap();
        m.cache_full_blocks(seq).unwrap();
    }
    (m, seqs)
}

/// Times `step` on the decode batch. Steps run back to back in runs of 16 (one block's worth
/// of tokens per sequence), as in a serving loop; after each run the sequences are rolled back
/// (untimed) so that the state stays the same.
fn bench_decode(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut step: impl FnMut(&mut BlockManager, &[SeqId], u32),
) {
    const RUN: u64 = 16;
    let (mut m, seqs) = decode_batch();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let run = RUN.min(iters - done);
                let start = Instant::now();
                for i in 0..run {
                    step(&mut m, &seqs, (done + i) as u32);
                }
                total += start.elapsed();
                for &seq in &seqs {
                    let len = m.num_slotted_tokens(seq).unwrap();
                    m.truncate(seq, len - run as usize).unwrap();
                }
                done += run;
            }
            total
        });
    });
}

fn decode_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_step");
    group.throughput(Throughput::Elements(256));
    let mut slots = StepSlots::default();
    let mut batch = BlockTableMatrix::default();
    // One step: append a token to each of 256 sequences, build the slot mapping, and bring the
    // persistent block-table matrix up to date.
    bench_decode(
        &mut group,
        "append_1_x256_and_update_matrix",
        |m, seqs, token| {
            slots.clear();
            for &seq in seqs {
                m.append_tokens(seq, &[token], &mut slots).unwrap();
            }
            m.update_block_table_matrix(seqs, None, &mut batch).unwrap();
            black_box((&slots, &batch));
        },
    );
    // Baseline in the same run: the same step rebuilding the whole matrix.
    bench_decode(
        &mut group,
        "append_1_x256_and_rebuild_matrix",
        |m, seqs, token| {
            slots.clear();
            for &seq in seqs {
                m.append_tokens(seq, &[token], &mut slots).unwrap();
            }
            m.block_table_matrix(seqs, None, &mut batch).unwrap();
            black_box((&slots, &batch));
        },
    );
    // The appends alone.
    bench_decode(&mut group, "append_1_x256", |m, seqs, token| {
        slots.clear();
        for &seq in seqs {
            m.append_tokens(seq, &[token], &mut slots).unwrap();
        }
        black_box(&slots);
    });
    group.finish();
}

fn prefix_lookup(c: &mut Criterion) {
    let mut m = BlockManager::new(BlockManagerConfig::new(4_096)).unwrap();
    let mut rng = Rng(7);
    let prompt: Vec<u32> = (0..2048).map(|_| rng.below(32_000) as u32).collect();
    // Cache the first 90% (1840 tokens = 115 blocks of 16) through a finished request.
    let cached_len = 1840;
    let mut step = StepSlots::default();
    m.add_sequence(SeqId(0), &prompt[..cached_len], None)
        .unwrap();
    m.allocate_slots(SeqId(0), cached_len, &mut step).unwrap();
    m.cache_full_blocks(SeqId(0)).unwrap();
    m.free(SeqId(0)).unwrap();
    assert_eq!(m.prefix_match(&prompt, None).num_cached_tokens, cached_len);

    let mut group = c.benchmark_group("prefix_cache");
    group.throughput(Throughput::Elements(prompt.len() as u64));
    group.bench_function("lookup_and_allocate_2048_tokens_90pct_cached", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                step.clear();
                let start = Instant::now();
                let cached = m.add_sequence(SeqId(1), black_box(&prompt), None).unwrap();
                m.allocate_slots(SeqId(1), prompt.len() - cached, &mut step)
                    .unwrap();
                black_box(&step);
                total += start.elapsed();
                m.free(SeqId(1)).unwrap();
            }
            total
        });
    });
    group.finish();
}

fn allocate_free(c: &mut Criterion) {
    let blocks = 4_096;
    let mut config = BlockManagerConfig::new(blocks);
    config.enable_prefix_caching = false;
    let mut m = BlockManager::new(config).unwrap();
    let prompt = vec![1u32; blocks * 16];
    let mut step = StepSlots::default();
    let mut group = c.benchmark_group("pool");
    group.throughput(Throughput::Elements(blocks as u64));
    group.bench_function("allocate_and_free_4096_blocks", |b| {
        b.iter(|| {
            step.clear();
            m.add_sequence(SeqId(0), &prompt, None).unwrap();
            m.allocate_slots(SeqId(0), prompt.len(), &mut step).unwrap();
            m.free(SeqId(0)).unwrap();
            black_box(&step);
        });
    });
    // Request churn: 256 short sequences (48-token prompts, 3 blocks) come and go.
    let prompts: Vec<Vec<u32>> = (0..256u32)
        .map(|i| (0..48).map(|t| i * 48 + t).collect())
        .collect();
    group.throughput(Throughput::Elements(prompts.len() as u64));
    group.bench_function("churn_256_sequences_of_48_tokens", |b| {
        b.iter(|| {
            step.clear();
            for (i, p) in prompts.iter().enumerate() {
                m.add_sequence(SeqId(i as u64), p, None).unwrap();
                m.allocate_slots(SeqId(i as u64), p.len(), &mut step)
                    .unwrap();
            }
            for i in 0..prompts.len() {
                m.free(SeqId(i as u64)).unwrap();
            }
            black_box(&step);
        });
    });
    group.finish();
}

#[path = "../../../benches/calibration.rs"]
mod calibration;

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = calibration::bench, decode_step, prefix_lookup, allocate_free
}
criterion_main!(benches);
