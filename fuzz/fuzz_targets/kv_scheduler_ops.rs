//! The block manager and the scheduler driven by arbitrary operation streams, with their
//! invariants checked after every operation (`BlockManager::check_invariants`: pools
//! partitioned, refcounts equal to table references, cache entries, table lengths; plus the
//! step plan's token budget and `max_num_seqs`). Operations may fail with an error (unknown
//! sequence, pool full, ...); they must never panic or break an invariant, and once everything
//! is freed or aborted every block is free or evictable.
#![no_main]

use std::time::Instant;

use arbitrary::Arbitrary;
use kv_block_manager::{BlockManager, BlockManagerConfig, SeqId, StepSlots};
use libfuzzer_sys::fuzz_target;
use scheduler::{
    FinishReason, PreemptionMode, Request, RequestId, Scheduler, SchedulerConfig, SeqResult,
};

/// Pool shape shared by both modes (kept small so that pools fill and evict often).
#[derive(Debug, Arbitrary)]
struct PoolShape {
    /// GPU blocks: 1 + this % 32.
    gpu_blocks: u8,
    /// CPU swap blocks: this % 16.
    cpu_blocks: u8,
    /// Block size: one of the supported sizes.
    block_size: u8,
    prefix_caching: bool,
    /// Sliding window in tokens: `Some(1 + w % 64)`.
    sliding_window: Option<u8>,
}

impl PoolShape {
    fn config(&self) -> BlockManagerConfig {
        let mut c = BlockManagerConfig::new(1 + usize::from(self.gpu_blocks % 32));
        c.num_cpu_blocks = usize::from(self.cpu_blocks % 16);
        c.block_size = kv_block_manager::SUPPORTED_BLOCK_SIZES
            [usize::from(self.block_size) % kv_block_manager::SUPPORTED_BLOCK_SIZES.len()];
        c.enable_prefix_caching = self.prefix_caching;
        c.sliding_window = self.sliding_window.map(|w| 1 + usize::from(w % 64));
        c.watermark = 0.0;
        c
    }
}

/// Prompt tokens from a tiny alphabet, so that prompts share prefixes (prefix-cache hits).
fn prompt(len: u8, seed: u8) -> Vec<u32> {
    (0..u32::from(len))
        .map(|i| (i * u32::from(seed | 1) / 17) % 3)
        .collect()
}

#[derive(Debug, Arbitrary)]
enum BlockOp {
    Add {
        seq: u8,
        len: u8,
        seed: u8,
        namespace: bool,
    },
    Allocate {
        seq: u8,
        tokens: u8,
    },
    Append {
        seq: u8,
        tokens: u8,
        seed: u8,
    },
    CacheFull {
        seq: u8,
    },
    Fork {
        parent: u8,
        child: u8,
    },
    Truncate {
        seq: u8,
        tokens: u8,
    },
    Free {
        seq: u8,
    },
    SwapOut {
        seq: u8,
    },
    SwapIn {
        seq: u8,
    },
    ResetPrefixCache,
}

#[derive(Debug, Arbitrary)]
enum SchedOp {
    Add {
        id: u8,
        len: u8,
        seed: u8,
        max_tokens: u8,
        n: u8,
        ignore_eos: bool,
        stop_token: Option<u8>,
        priority: i8,
    },
    Abort {
        id: u8,
    },
    /// Schedule a step, then report its tokens (`token` picks them; EOS is token 0) or fail it.
    Step {
        token: u8,
        fail: bool,
        abort_in_flight: Option<u8>,
    },
    /// Finish one running sample (as a stop string would).
    FinishSample {
        index: u8,
    },
}

#[derive(Debug, Arbitrary)]
enum Input {
    BlockManager {
        pool: PoolShape,
        ops: Vec<BlockOp>,
    },
    Scheduler {
        pool: PoolShape,
        swap: bool,
        max_num_seqs: u8,
        max_num_batched_tokens: u8,
        ops: Vec<SchedOp>,
    },
}

fn check(bm: &BlockManager) {
    if let Err(e) = bm.check_invariants() {
        panic!("block manager invariant broken: {e}");
    }
}

/// Every block is free or evictable (cached, unreferenced); the swap pool is empty.
fn check_all_free(bm: &BlockManager) {
    check(bm);
    let s = bm.stats();
    assert_eq!(s.used_blocks, 0, "{s:?}");
    assert_eq!(s.free_blocks + s.evictable_blocks, s.total_blocks, "{s:?}");
    assert_eq!(s.cpu_free_blocks, s.cpu_total_blocks, "{s:?}");
    assert_eq!(s.num_sequences, 0, "{s:?}");
}

fn run_block_manager(pool: &PoolShape, ops: &[BlockOp]) {
    let Ok(mut bm) = BlockManager::new(pool.config()) else {
        return;
    };
    let seq = |s: u8| SeqId(u64::from(s % 8));
    let mut slots = StepSlots::default();
    for op in ops {
        slots.slot_mapping.clear();
        slots.copies.clear();
        let _ = match *op {
            BlockOp::Add {
                seq: s,
                len,
                seed,
                namespace,
            } => bm
                .add_sequence(seq(s), &prompt(len, seed), namespace.then_some("b"))
                .map(drop),
            BlockOp::Allocate { seq: s, tokens } => {
                bm.allocate_slots(seq(s), usize::from(tokens), &mut slots)
            }
            BlockOp::Append {
                seq: s,
                tokens,
                seed,
            } => bm.append_tokens(seq(s), &prompt(tokens % 8, seed), &mut slots),
            BlockOp::CacheFull { seq: s } => bm.cache_full_blocks(seq(s)),
            BlockOp::Fork { parent, child } => bm.fork(seq(parent), seq(child)),
            BlockOp::Truncate { seq: s, tokens } => bm.truncate(seq(s), usize::from(tokens)),
            BlockOp::Free { seq: s } => bm.free(seq(s)),
            BlockOp::SwapOut { seq: s } => bm.swap_out(&[seq(s)]).map(drop),
            BlockOp::SwapIn { seq: s } => bm.swap_in(&[seq(s)]).map(drop),
            BlockOp::ResetPrefixCache => {
                bm.reset_prefix_cache();
                Ok(())
            }
        };
        check(&bm);
    }
    for s in 0..8 {
        let _ = bm.free(SeqId(s));
    }
    check_all_free(&bm);
}

fn run_scheduler(
    pool: &PoolShape,
    swap: bool,
    max_num_seqs: u8,
    max_num_batched_tokens: u8,
    ops: &[SchedOp],
) {
    let Ok(bm) = BlockManager::new(pool.config()) else {
        return;
    };
    let mut config = SchedulerConfig::new(512);
    config.max_num_seqs = 1 + usize::from(max_num_seqs % 8);
    config.max_num_batched_tokens = 1 + usize::from(max_num_batched_tokens);
    config.max_prefill_chunk = None;
    config.preemption_mode = if swap {
        PreemptionMode::Swap
    } else {
        PreemptionMode::Recompute
    };
    config.eos_token_ids = vec![0];
    config.vocab_size = Some(16);
    let Ok(mut sched) = Scheduler::new(config.clone(), bm) else {
        return;
    };
    let now = Instant::now();
    let mut ids = std::collections::BTreeSet::new();
    // The sequences of the last step planned (candidates for `FinishSample`).
    let mut last_seqs: Vec<SeqId> = Vec::new();
    for op in ops {
        match *op {
            SchedOp::Add {
                id,
                len,
                seed,
                max_tokens,
                n,
                ignore_eos,
                stop_token,
                priority,
            } => {
                let id = RequestId(u64::from(id % 16));
                let mut req = Request::new(id, prompt(len, seed), 1 + usize::from(max_tokens % 32));
                req.n = usize::from(n % 4);
                req.ignore_eos = ignore_eos;
                req.stop_token_ids = stop_token.map(|t| u32::from(t % 16)).into_iter().collect();
                req.priority = i32::from(priority);
                if sched.add_request(req).is_ok() {
                    ids.insert(id);
                }
            }
            SchedOp::Abort { id } => {
                let _ = sched.abort(RequestId(u64::from(id % 16)));
            }
            SchedOp::Step {
                token,
                fail,
                abort_in_flight,
            } => {
                let Ok(out) = sched.schedule(now) else {
                    continue;
                };
                assert!(
                    out.num_tokens() <= config.max_num_batched_tokens,
                    "token budget"
                );
                assert!(out.seqs.len() <= config.max_num_seqs, "max_num_seqs");
                last_seqs = out.seqs.iter().map(|s| s.seq).collect();
                let results: Vec<SeqResult> = out
                    .seqs
                    .iter()
                    .map(|s| {
                        let count = if s.logits.is_empty() {
                            0
                        } else if s.num_samples > 1 {
                            s.num_samples
                        } else {
                            1 + s.draft_tokens.len()
                        };
                        let tokens = (0..count).map(|i| (u32::from(token) + i as u32) % 16);
                        SeqResult {
                            seq: s.seq,
                            tokens: tokens.collect(),
                        }
                    })
                    .collect();
                check(sched.block_manager());
                if let Some(id) = abort_in_flight {
                    let _ = sched.abort(RequestId(u64::from(id % 16)));
                    check(sched.block_manager());
                }
                let _ = if fail {
                    sched.fail_step().map(drop)
                } else {
                    sched.update(&results).map(drop)
                };
            }
            SchedOp::FinishSample { index } => {
                if let Some(&seq) = last_seqs.get(usize::from(index) % last_seqs.len().max(1)) {
                    let _ = sched.finish(seq, FinishReason::StopString);
                }
            }
        }
        check(sched.block_manager());
    }
    for id in ids {
        let _ = sched.abort(id);
    }
    assert!(!sched.has_unfinished(), "requests left after aborting all");
    check_all_free(sched.block_manager());
}

fuzz_target!(|input: Input| {
    match input {
        Input::BlockManager { pool, ops } => run_block_manager(&pool, &ops),
        Input::Scheduler {
            pool,
            swap,
            max_num_seqs,
            max_num_batched_tokens,
            ops,
        } => run_scheduler(&pool, swap, max_num_seqs, max_num_batched_tokens, &ops),
    }
});
