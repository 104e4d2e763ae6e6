//! Cost of the scheduler's bookkeeping per step in the steady state of a large decode batch:
//! `schedule()` and `update()` timed separately, with 256 and 1024 running sequences that each
//! decode one token per step (all prompts prefilled, no speculation, prefix caching on).
//!
//! `cargo bench -p scheduler --bench schedule` (or `cargo xtask bench -p scheduler`).
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use kv_block_manager::{BlockManager, BlockManagerConfig};
use scheduler::{Request, RequestId, Scheduler, SchedulerConfig, SchedulerOutput, SeqResult};

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

/// Decode steps between two refills of the batch (each sequence grows by this many tokens).
const REFILL_EVERY: u64 = 256;

/// Longest prompt (1023) plus room for the tokens decoded between two refills, and for those
/// the first sequences decode while the last ones are first prefilled (about `n / 4` steps).
const MAX_MODEL_LEN: usize = 2048;

/// One sampled token for every scheduled sequence that samples.
fn sample(out: &SchedulerOutput, results: &mut Vec<SeqResult>) {
    results.clear();
    for (i, s) in out.seqs.iter().enumerate() {
        let tokens = if s.logits.is_empty() {
            Vec::new()
        } else {
            vec![((out.step as usize * 7 + i) % 32_000) as u32]
        };
        results.push(SeqResult { seq: s.seq, tokens });
    }
}

/// `n` running sequences with prompts of 128..1024 tokens (block size 16), all decoding.
struct DecodeBatch {
    sched: Scheduler,
    prompts: Vec<Vec<u32>>,
    generation: u64,
    steps: u64,
    results: Vec<SeqResult>,
}

impl DecodeBatch {
    fn new(n: usize) -> Self {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|_| {
                let len = 128 + rng.below(896) as usize;
                (0..len).map(|_| rng.below(32_000) as u32).collect()
            })
            .collect();
        // Room for every sequence's longest context and a block more; the cached blocks of
        // the previous generation are evicted as needed.
        let blocks = n * MAX_MODEL_LEN.div_ceil(16);
        let bm = BlockManager::new(BlockManagerConfig::new(blocks)).unwrap();
        // Long enough that no sequence ends between two refills.
        let mut config = SchedulerConfig::new(MAX_MODEL_LEN);
        config.max_num_seqs = n;
        config.max_num_batched_tokens = 2048.max(n);
        let mut b = Self {
            sched: Scheduler::new(config, bm).unwrap(),
            prompts,
            generation: 0,
            steps: 0,
            results: Vec::new(),
        };
        b.refill();
        b
    }

    /// Aborts every request and adds them again (their prompts are prefix-cache hits but for
    /// the last partial block), then steps until every sequence decodes; so sequences stay
    /// within `REFILL_EVERY` tokens of their prompts however long the benchmark runs.
    fn refill(&mut self) {
        let n = self.prompts.len() as u64;
        if self.generation > 0 {
            for i in 0..n {
                let id = RequestId((self.generation - 1) * n + i);
                self.sched.abort(id).unwrap();
            }
        }
        for (i, p) in self.prompts.iter().enumerate() {
            let id = RequestId(self.generation * n + i as u64);
            let mut r = Request::new(id, p.clone(), MAX_MODEL_LEN);
            r.ignore_eos = true;
            self.sched.add_request(r).unwrap();
        }
        self.generation += 1;
        loop {
            let out = self.sched.schedule(Instant::now()).unwrap();
            let all_decoding =
                out.seqs.len() == self.prompts.len() && out.seqs.iter().all(|s| !s.is_prefill);
            sample(out, &mut self.results);
            self.sched.update(&self.results).unwrap();
            if all_decoding {
                break;
            }
        }
        self.steps = 0;
    }

    /// One decode step; returns the time spent in `schedule()` and in `update()`.
    fn step(&mut self) -> (Duration, Duration) {
        if self.steps == REFILL_EVERY {
            self.refill();
        }
        self.steps += 1;
        let now = Instant::now();
        let start = Instant::now();
        let out = self.sched.schedule(now).unwrap();
        let scheduled = start.elapsed();
        debug_assert_eq!(out.seqs.len(), self.prompts.len());
        black_box(out.num_tokens());
        sample(out, &mut self.results);
        let start = Instant::now();
        let samples = self.sched.update(&self.results).unwrap();
        let updated = start.elapsed();
        black_box(samples);
        (scheduled, updated)
    }
}

fn bench(group: &mut BenchmarkGroup<'_, WallTime>, n: usize) {
    let mut batch = DecodeBatch::new(n);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(format!("schedule/{n}_decoding"), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| batch.step().0).sum());
    });
    group.bench_function(format!("update/{n}_decoding"), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| batch.step().1).sum());
    });
}

fn decode_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_step");
    for n in [256, 1024] {
        bench(&mut group, n);
    }
    group.finish();
}

#[path = "../../../benches/calibration.rs"]
mod calibration;

criterion_group!(benches, calibration::bench, decode_step);
criterion_main!(benches);
