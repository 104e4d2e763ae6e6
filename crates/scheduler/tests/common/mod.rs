//! A fake model for driving the scheduler: deterministic "logits" from the token history and a
//! simulated KV cache that checks every slot the scheduler hands out.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Instant;

use kv_block_manager::{BlockManager, BlockManagerConfig, CopyOp, PAD_BLOCK};
use scheduler::{
    FinishReason, Request, RequestId, SampleOutput, Scheduler, SchedulerConfig, SchedulerOutput,
    SeqResult,
};

/// Fingerprint of a token prefix: what the KV of its last token "is".
pub fn fingerprint(prefix: &[u32]) -> u64 {
    prefix.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
        (h ^ u64::from(t)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The fake model's greedy next token after `history` for sample `sample` (samples of one
/// request differ from their first token on).
pub fn next_token(history: &[u32], sample: usize, vocab: u32) -> u32 {
    let h = fingerprint(history) ^ (sample as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // Skip 0, which tests use as EOS when they want one.
    1 + (h % u64::from(vocab - 1)) as u32
}

/// A simulated paged KV cache: one fingerprint per slot.
#[derive(Debug)]
pub struct FakeKv {
    pub block_size: usize,
    pub gpu: Vec<Option<u64>>,
    pub cpu: Vec<Option<u64>>,
    pub window: Option<usize>,
}

impl FakeKv {
    pub fn new(bm: &BlockManagerConfig) -> Self {
        Self {
            block_size: bm.block_size,
            gpu: vec![None; bm.num_gpu_blocks * bm.block_size],
            cpu: vec![None; bm.num_cpu_blocks * bm.block_size],
            window: bm.sliding_window,
        }
    }

    fn copy(from: &[Option<u64>], to: &mut [Option<u64>], c: &CopyOp, bs: usize) {
        let (s, d) = (c.src.index() * bs, c.dst.index() * bs);
        let block: Vec<Option<u64>> = from[s..s + bs].to_vec();
        to[d..d + bs].copy_from_slice(&block);
    }

    /// Runs one step: copies, cache writes, then checks that every token reads the right KV
    /// for its whole (windowed) context through its block table. `histories[i]` are the tokens
    /// of `out.seqs[i]` including the ones computed in this step.
    pub fn run(&mut self, out: &SchedulerOutput, histories: &[Vec<u32>]) {
        self.copy_blocks(out);
        self.compute(out, histories);
    }

    /// The step's swap and copy-on-write copies (what runs before the forward pass).
    pub fn copy_blocks(&mut self, out: &SchedulerOutput) {
        let bs = self.block_size;
        for c in &out.swap_out {
            let gpu = self.gpu.clone();
            Self::copy(&gpu, &mut self.cpu, c, bs);
        }
        for c in &out.swap_in {
            let cpu = self.cpu.clone();
            Self::copy(&cpu, &mut self.gpu, c, bs);
        }
        for c in &out.copies {
            let gpu = self.gpu.clone();
            Self::copy(&gpu, &mut self.gpu, c, bs);
        }
    }

    /// The forward pass: cache writes, then the check that every token reads the right KV.
    pub fn compute(&mut self, out: &SchedulerOutput, histories: &[Vec<u32>]) {
        let bs = self.block_size;
        for (s, h) in out.seqs.iter().zip(histories) {
            for t in s.tokens.clone() {
                let p = out.positions[t] as usize;
                assert_eq!(out.token_ids[t], h[p], "token {t} of {:?}", s.seq);
                self.gpu[out.slot_mapping[t] as usize] = Some(fingerprint(&h[..=p]));
            }
        }
        let mb = out.block_tables.max_blocks();
        for (i, (s, h)) in out.seqs.iter().zip(histories).enumerate() {
            let row = &out.block_tables.block_tables()[i * mb..(i + 1) * mb];
            let last = out.positions[s.tokens.end - 1] as usize;
            assert_eq!(
                out.block_tables.context_lens()[i] as usize,
                last + 1,
                "context length of {:?}",
                s.seq
            );
            for t in s.tokens.clone() {
                let p = out.positions[t] as usize;
                let first = self.window.map_or(0, |w| (p + 1).saturating_sub(w));
                for j in first..=p {
                    let block = row[j / bs];
                    assert_ne!(block, PAD_BLOCK, "{:?} position {j} has no block", s.seq);
                    let got = self.gpu[block as usize * bs + j % bs];
                    assert_eq!(
                        got,
                        Some(fingerprint(&h[..=j])),
                        "{:?} reads wrong KV at position {j} (step {})",
                        s.seq,
                        out.step
                    );
                }
            }
        }
    }
}

/// Everything a test needs to run requests to completion.
pub struct Harness {
    pub sched: Scheduler,
    pub kv: FakeKv,
    pub vocab: u32,
    pub outputs: HashMap<(RequestId, usize), Vec<u32>>,
    pub finished: HashMap<(RequestId, usize), FinishReason>,
    pub trace: Vec<String>,
    pub now: Instant,
}

impl Harness {
    pub fn new(config: SchedulerConfig, bm: BlockManagerConfig) -> Self {
        let kv = FakeKv::new(&bm);
        let sched = Scheduler::new(config, BlockManager::new(bm).unwrap()).unwrap();
        Self {
            sched,
            kv,
            vocab: 1000,
            outputs: HashMap::new(),
            finished: HashMap::new(),
            trace: Vec::new(),
            now: Instant::now(),
        }
    }

    pub fn add(&mut self, req: Request) {
        self.sched.add_request(req).unwrap();
    }

    /// One step with the fake model's greedy tokens (verifying drafts greedily). Returns the
    /// step's sample outputs.
    pub fn step(&mut self) -> Vec<SampleOutput> {
        let (out, histories) = self.plan();
        self.kv.run(&out, &histories);
        let results = self.model_results(&out, &histories);
        let samples = self.sched.update(&results).unwrap();
        self.record(&samples);
        samples
    }

    /// Schedules a step (at `self.now`) without running it: the plan, and the token history
    /// of each scheduled sequence including its draft tokens. Records deadline finishes and
    /// the trace line.
    pub fn plan(&mut self) -> (SchedulerOutput, Vec<Vec<u32>>) {
        let out = self.sched.schedule(self.now).unwrap().clone();
        self.record_finished(&out.finished);
        let mut histories = Vec::new();
        for s in &out.seqs {
            let mut h = self.sched.seq_tokens(s.seq).unwrap().to_vec();
            h.extend_from_slice(&s.draft_tokens);
            histories.push(h);
        }
        self.trace.push(trace_line(&out));
        (out, histories)
    }

    /// What the fake model samples for a planned step (greedy; drafts verified greedily).
    pub fn model_results(&self, out: &SchedulerOutput, histories: &[Vec<u32>]) -> Vec<SeqResult> {
        let mut results = Vec::new();
        for (s, h) in out.seqs.iter().zip(histories) {
            let mut tokens = Vec::new();
            if !s.logits.is_empty() {
                let base = h.len() - s.draft_tokens.len();
                if s.num_samples > 1 {
                    tokens = (0..s.num_samples)
                        .map(|i| next_token(&h[..base], i, self.vocab))
                        .collect();
                } else {
                    // Greedy verification: accept drafts while they equal the target's token.
                    for i in 0..=s.draft_tokens.len() {
                        let t = next_token(&h[..base + i], s.sample, self.vocab);
                        tokens.push(t);
                        if i == s.draft_tokens.len() || s.draft_tokens[i] != t {
                            break;
                        }
                    }
                }
            }
            results.push(SeqResult { seq: s.seq, tokens });
        }
        results
    }

    /// Records the sample outputs of an update.
    pub fn record(&mut self, samples: &[SampleOutput]) {
        for o in samples {
            self.outputs
                .entry((o.request, o.sample))
                .or_default()
                .extend_from_slice(&o.new_tokens);
            if let Some(r) = o.finished {
                self.finished.insert((o.request, o.sample), r);
            }
        }
    }

    pub fn record_finished(&mut self, f: &[scheduler::FinishedSeq]) {
        for f in f {
            self.finished.insert((f.request, f.sample), f.reason);
        }
    }

    /// Steps until nothing is left (at most `max_steps`).
    pub fn run_to_end(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            if !self.sched.has_unfinished() {
                return;
            }
            self.step();
        }
        panic!("not finished after {max_steps} steps: {:?}", self.sched);
    }

    /// The fake model's greedy continuation of `prompt` for `sample`, `len` tokens.
    pub fn reference(&self, prompt: &[u32], sample: usize, len: usize) -> Vec<u32> {
        let mut h = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..len {
            let t = next_token(&h, sample, self.vocab);
            h.push(t);
            out.push(t);
        }
        out
    }

    pub fn assert_all_free(&self) {
        let st = self.sched.block_manager().stats();
        assert_eq!(st.used_blocks, 0, "{st:?}");
        assert_eq!(st.num_sequences, 0, "{st:?}");
        assert_eq!(st.cpu_free_blocks, st.cpu_total_blocks, "{st:?}");
        self.sched.block_manager().check_invariants().unwrap();
    }
}

/// One line per step: `+` prefill chunk, `d` decode, with positions; then preemptions, swaps,
/// copies.
pub fn trace_line(out: &SchedulerOutput) -> String {
    let mut parts: Vec<String> = out
        .seqs
        .iter()
        .map(|s| {
            let first = out.positions[s.tokens.start];
            let kind = if s.is_prefill { "prefill" } else { "decode" };
            let drafts = if s.draft_tokens.is_empty() {
                String::new()
            } else {
                format!("+{}draft", s.draft_tokens.len())
            };
            format!(
                "{}/{} {kind} {first}..{}{drafts}",
                s.request,
                s.sample,
                first as usize + s.tokens.len()
            )
        })
        .collect();
    if !out.preempted.is_empty() {
        parts.push(format!("preempt {:?}", out.preempted));
    }
    if !out.swap_out.is_empty() {
        parts.push(format!("swap_out {}", out.swap_out.len()));
    }
    if !out.swap_in.is_empty() {
        parts.push(format!("swap_in {}", out.swap_in.len()));
    }
    if !out.copies.is_empty() {
        parts.push(format!("cow {}", out.copies.len()));
    }
    format!("{}: {}", out.step, parts.join(" | "))
}

pub fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1 + (i * 7 + seed * 13) % 997)
        .collect()
}

pub fn bm_config(blocks: usize, block_size: usize) -> BlockManagerConfig {
    let mut c = BlockManagerConfig::new(blocks);
    c.block_size = block_size;
    c.watermark = 0.0;
    c
}

/// Checks the shape of a step plan against the configuration: the token budget and
/// `max_num_seqs`, one contiguous token range per sequence matching `seq_starts`, consecutive
/// positions, one block-table row per sequence, and logits rows (the last known token, then one
/// per draft token) in batch order.
pub fn check_batch(out: &SchedulerOutput, c: &SchedulerConfig) {
    let n = out.num_tokens();
    assert!(
        n <= c.max_num_batched_tokens,
        "step {}: {n} tokens over a budget of {}",
        out.step,
        c.max_num_batched_tokens
    );
    assert!(
        out.seqs.len() <= c.max_num_seqs,
        "step {}: {} sequences, max_num_seqs {}",
        out.step,
        out.seqs.len(),
        c.max_num_seqs
    );
    assert_eq!(out.positions.len(), n);
    assert_eq!(out.slot_mapping.len(), n);
    assert_eq!(out.seq_starts.len(), out.seqs.len() + 1);
    assert_eq!(out.seq_starts[0], 0);
    assert_eq!(out.block_tables.num_seqs(), out.seqs.len());
    assert_eq!(out.block_tables.context_lens().len(), out.seqs.len());
    let mut seen = std::collections::HashSet::new();
    let mut logits_end = 0;
    for (i, s) in out.seqs.iter().enumerate() {
        assert!(seen.insert(s.seq), "{:?} twice in step {}", s.seq, out.step);
        assert_eq!(s.tokens.start, out.seq_starts[i] as usize);
        assert_eq!(s.tokens.end, out.seq_starts[i + 1] as usize);
        assert!(
            s.tokens.len() > s.draft_tokens.len(),
            "{:?} computes no known token",
            s.seq
        );
        for t in s.tokens.start + 1..s.tokens.end {
            assert_eq!(out.positions[t], out.positions[t - 1] + 1, "{:?}", s.seq);
        }
        assert_eq!(
            s.logits.start, logits_end,
            "{:?}: logits rows out of order",
            s.seq
        );
        logits_end = s.logits.end;
        assert!(s.num_samples >= 1);
        if s.logits.is_empty() {
            assert!(s.is_prefill && s.draft_tokens.is_empty() && s.num_samples == 1);
        } else {
            assert_eq!(s.logits.len(), 1 + s.draft_tokens.len(), "{:?}", s.seq);
            let last_known = s.tokens.end - 1 - s.draft_tokens.len();
            for (j, row) in s.logits.clone().enumerate() {
                assert_eq!(
                    out.logits_indices[row] as usize,
                    last_known + j,
                    "{:?}",
                    s.seq
                );
            }
            if s.num_samples > 1 {
                assert!(s.draft_tokens.is_empty());
            }
        }
        if let Some(p) = &s.draft_probs {
            assert_eq!(p.len(), s.draft_tokens.len());
        }
    }
    assert_eq!(logits_end, out.logits_indices.len());
    assert_eq!(*out.seq_starts.last().unwrap() as usize, n);
}
