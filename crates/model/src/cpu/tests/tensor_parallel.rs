//! The sharded forward: N ranks as N threads ([`run_ranks`]), each with its shard of the same
//! dummy model and its own paged KV cache, against the single-rank backend on the whole model,
//! over a script of mixed prefill / decode steps of two sequences whose blocks are scattered
//! through the cache. Plus the real SmolLM2 at TP=3, and bad input.
//!
//! Tolerance: the logits of every step within [`F32_TOL`] (f32 weights: only the order of the
//! row-parallel sums changes) or [`QUANT_TOL`] (Q8_0 / Q4_1 weights, whose int8 activation
//! blocks fall on the same 32 values in both, but a sum that differs in its last bit can move
//! an activation across an int8 rounding step in a later layer) of the largest logit. A
//! control that skips the all-reduce must miss by far more ([`CONTROL_MIN_ERR`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kv_quant::KvCacheDtype;

use super::max_rel_err;
use crate::collective::thread_group::{ThreadGroup, run_ranks};
use crate::collective::{HostCollective, SingleRank};
use crate::generate::{GenerateOptions, SequenceRunner, generate};
use crate::{Backend, CpuBackend, DType, ForwardBatch, KvCacheConfig, ModelConfig, ModelError};
use crate::{Shard, Weights};

const F32_TOL: f32 = 1e-4;
const QUANT_TOL: f32 = 2e-2;
const CONTROL_MIN_ERR: f32 = 0.2;
const SEED: u64 = 11;
/// Does not divide by 2, 3 or 6: the vocab-parallel slices are uneven (padded in the gather).
const VOCAB: usize = 97;
const BLOCK_SIZE: usize = 4;
/// Each sequence's blocks, scattered through a cache of 16.
const TABLES: [[i32; 5]; 2] = [[5, 2, 7, 9, 11], [1, 6, 3, 8, 0]];

/// 12 query heads, 6 KV heads of 16: splits over 1, 2, 3 and 6 ranks (local attention and MLP
/// widths stay whole 32-value blocks).
fn config(num_kv_heads: usize) -> ModelConfig {
    let mut c = ModelConfig::tiny(VOCAB);
    c.hidden_size = 192;
    c.intermediate_size = 192;
    c.num_heads = 12;
    c.num_kv_heads = num_kv_heads;
    c.head_dim = 16;
    c
}

fn cache(dtype: KvCacheDtype) -> KvCacheConfig {
    KvCacheConfig {
        num_blocks: 16,
        block_size: BLOCK_SIZE,
        dtype,
        num_cpu_blocks: 2,
    }
}

/// One step: (sequence, its tokens in this step).
type Step = Vec<(usize, &'static [u32])>;

/// A mixed prefill of both sequences, decode steps of one and of both, a 2-token chunk.
fn script() -> Vec<Step> {
    vec![
        vec![
            (0, &[5, 17, 3, 88, 42, 42, 7, 1, 0][..]),
            (1, &[95, 60, 61, 62, 9, 30][..]),
        ],
        vec![(0, &[31][..]), (1, &[2][..])],
        vec![(1, &[77][..])],
        vec![(0, &[4, 50][..]), (1, &[12][..])],
        vec![(0, &[96][..]), (1, &[13][..])],
        vec![(0, &[8][..])],
    ]
}

/// Runs `step` on `b` (each sequence continuing after its `lens` tokens); on success,
/// advances `lens` and returns the logits of each sequence's last token.
fn run_step(
    b: &mut CpuBackend,
    lens: &mut [usize; 2],
    step: &Step,
) -> Result<Vec<f32>, ModelError> {
    let (mut ids, mut positions, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    let (mut starts, mut tables, mut ctx, mut rows) = (vec![0], Vec::new(), Vec::new(), Vec::new());
    for &(s, tokens) in step {
        let table = TABLES[s];
        for (i, &id) in tokens.iter().enumerate() {
            let p = lens[s] + i;
            ids.push(id);
            positions.push(p as u32);
            slots.push(
                i64::from(table[p / BLOCK_SIZE]) * BLOCK_SIZE as i64 + (p % BLOCK_SIZE) as i64,
            );
        }
        rows.push(ids.len() as u32 - 1);
        starts.push(ids.len() as u32);
        tables.extend(table);
        ctx.push((lens[s] + tokens.len()) as i32);
    }
    let batch = ForwardBatch {
        token_ids: &ids,
        positions: &positions,
        slot_mapping: &slots,
        seq_starts: &starts,
        block_tables: &tables,
        max_blocks: TABLES[0].len(),
        context_lens: &ctx,
        logits_indices: &rows,
    };
    let mut logits = Vec::new();
    b.forward(&batch, &mut logits)?;
    for &(s, tokens) in step {
        lens[s] += tokens.len();
    }
    Ok(logits)
}

fn run_script(b: &mut CpuBackend) -> Result<Vec<Vec<f32>>, ModelError> {
    let mut lens = [0; 2];
    script().iter().map(|s| run_step(b, &mut lens, s)).collect()
}

/// The single-rank backend on the whole model.
fn reference(config: &ModelConfig, dtype: DType, kv: KvCacheDtype) -> Vec<Vec<f32>> {
    let weights = Weights::dummy(config, dtype, SEED).unwrap();
    run_script(&mut CpuBackend::new(weights, cache(kv)).unwrap()).unwrap()
}

/// Runs `f` on every rank with its shard's backend (over `wrap(member)`), and returns each
/// rank's result.
fn on_ranks<T: Send>(
    config: &ModelConfig,
    dtype: DType,
    kv: KvCacheDtype,
    world: usize,
    wrap: impl Fn(ThreadGroup) -> Arc<dyn HostCollective> + Sync,
    f: impl Fn(&mut CpuBackend) -> T + Sync,
) -> Vec<Result<T, ModelError>> {
    run_ranks(world, |member| {
        let weights = Weights::dummy_shard(config, dtype, SEED, member.shard())?;
        let mut b = CpuBackend::new_sharded(weights, cache(kv), wrap(member))?;
        Ok(f(&mut b))
    })
}

fn plain(member: ThreadGroup) -> Arc<dyn HostCollective> {
    Arc::new(member)
}

/// The script at `world` ranks: rank 0's logits, after checking every rank got the same.
fn sharded(config: &ModelConfig, dtype: DType, kv: KvCacheDtype, world: usize) -> Vec<Vec<f32>> {
    let mut ranks = on_ranks(config, dtype, kv, world, plain, run_script).into_iter();
    let first = ranks.next().unwrap().unwrap().unwrap();
    for (r, other) in ranks.enumerate() {
        assert_eq!(
            other.unwrap().unwrap(),
            first,
            "rank {} got other logits",
            r + 1
        );
    }
    first
}

fn worst_err(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            assert_eq!(g.len(), w.len());
            max_rel_err(g, w)
        })
        .fold(0.0, f32::max)
}

#[test]
fn sharded_logits_equal_single_rank_logits() {
    let c = config(6);
    for (dtype, kv, tol) in [
        (DType::F32, KvCacheDtype::Fp16, F32_TOL),
        (DType::Q8_0, KvCacheDtype::Int8, QUANT_TOL),
        (DType::Q4_1, KvCacheDtype::Fp16, QUANT_TOL),
    ] {
        let want = reference(&c, dtype, kv);
        for world in [2, 3, 6] {
            let err = worst_err(&sharded(&c, dtype, kv, world), &want);
            eprintln!("{dtype} weights, {kv} KV, TP={world}: relative error {err:e}");
            assert!(err < tol, "{dtype}, {kv}, TP={world}: relative error {err}");
        }
    }
}

#[test]
fn replicated_kv_heads_equal_single_rank_logits() {
    // 2 KV heads over 6 ranks (each held by 3) and 1 KV head over 3 ranks.
    for (kv_heads, world) in [(2, 6), (1, 3)] {
        let c = config(kv_heads);
        let want = reference(&c, DType::F32, KvCacheDtype::Fp16);
        let local = Weights::dummy_shard(
            &c,
            DType::F32,
            SEED,
            Shard {
                rank: 1,
                world_size: world,
            },
        )
        .unwrap()
        .local_shape();
        assert_eq!((local.num_heads, local.num_kv_heads), (12 / world, 1));
        let err = worst_err(&sharded(&c, DType::F32, KvCacheDtype::Fp16, world), &want);
        assert!(
            err < F32_TOL,
            "{kv_heads} KV heads, TP={world}: relative error {err}"
        );
    }
}

#[test]
fn biases_untied_head_window_and_interleaved_rope_shard_too() {
    let mut c = config(6);
    c.qkv_bias = true;
    c.tie_word_embeddings = false;
    c.sliding_window = Some(5);
    c.rope_style = crate::RopeStyle::Interleaved;
    let want = reference(&c, DType::F32, KvCacheDtype::Fp16);
    let err = worst_err(&sharded(&c, DType::F32, KvCacheDtype::Fp16, 3), &want);
    assert!(err < F32_TOL, "relative error {err}");
}

#[test]
fn hf_tiny_models_at_tp2_equal_tp1() {
    // HF checkpoints through the safetensors loader: Llama 3 (untied head), Qwen2 (Q/K/V
    // biases), Mistral (sliding window), a tied model split over several files.
    for variant in ["llama3", "qwen2", "mistral", "llama_tied_sharded"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/tiny_hf")
            .join(variant);
        // The block manager of `SequenceRunner` takes blocks of at least 8.
        let kv = KvCacheConfig {
            block_size: 8,
            ..cache(KvCacheDtype::Fp16)
        };
        let run = |b: &mut CpuBackend| SequenceRunner::new(b)?.feed(&super::TOKENS, 4, true);
        let full = crate::load_hf_dir(&dir, Shard::FULL).unwrap().weights;
        let want = run(&mut CpuBackend::new(full, kv).unwrap()).unwrap();
        let ranks = run_ranks(2, |member| {
            let weights = crate::load_hf_dir(&dir, member.shard())?.weights;
            run(&mut CpuBackend::new_sharded(weights, kv, Arc::new(member))?)
        });
        for (rank, got) in ranks.into_iter().enumerate() {
            let err = max_rel_err(&got.unwrap(), &want);
            assert!(
                err < F32_TOL,
                "{variant}, rank {rank}: relative error {err}"
            );
        }
    }
}

/// Sums nothing: each rank keeps its partial sums (and its own embedding rows).
#[derive(Debug)]
struct SkipReduce(ThreadGroup);

impl HostCollective for SkipReduce {
    fn shard(&self) -> Shard {
        self.0.shard()
    }
    fn all_reduce_sum(&self, _x: &mut [f32]) -> Result<(), ModelError> {
        Ok(())
    }
    fn all_gather(&self, local: &[f32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        self.0.all_gather(local, out)
    }
}

#[test]
fn control_without_the_all_reduce_misses() {
    let c = config(6);
    let want = reference(&c, DType::F32, KvCacheDtype::Fp16);
    let ranks = on_ranks(
        &c,
        DType::F32,
        KvCacheDtype::Fp16,
        2,
        |m| Arc::new(SkipReduce(m)),
        run_script,
    );
    let got = ranks.into_iter().next().unwrap().unwrap().unwrap();
    let err = worst_err(&got, &want);
    eprintln!("without the all-reduce: relative error {err}");
    assert!(
        err > CONTROL_MIN_ERR,
        "the comparison cannot see a missing all-reduce ({err})"
    );
}

#[test]
fn the_shard_cache_holds_local_kv_heads_and_embeddings_local_rows() {
    let c = config(6);
    let shard = Shard {
        rank: 2,
        world_size: 3,
    };
    let w = Weights::dummy_shard(&c, DType::Q8_0, SEED, shard).unwrap();
    let full = Weights::dummy(&c, DType::Q8_0, SEED).unwrap();
    let local = w.local_shape();
    assert_eq!((local.vocab_start, local.vocab_size), (64, 33));
    assert_eq!(w.embedding.out_features(), 33);
    let (mut a, mut b) = (vec![0.0; 192], vec![0.0; 192]);
    w.embedding.dequantize_row_into(0, &mut a);
    full.embedding.dequantize_row_into(64, &mut b);
    assert_eq!(a, b, "the shard's first embedding row is token 64's");
    let layout = crate::backend::cache_layout(&c, &local, &cache(KvCacheDtype::Int8)).unwrap();
    assert_eq!(
        layout,
        kv_quant::BlockLayout::new(KvCacheDtype::Int8, BLOCK_SIZE, 2, 16).unwrap()
    );
    let pools = on_ranks(&c, DType::Q8_0, KvCacheDtype::Int8, 3, plain, |b| {
        (b.device.layout, b.device.k[0].len())
    });
    for p in pools {
        let (l, bytes) = p.unwrap();
        assert_eq!(l, layout);
        assert_eq!(bytes, 16 * layout.kv_block_bytes());
    }
}

#[test]
fn vocab_ranges_cover_the_vocabulary_evenly() {
    for vocab in 1..40 {
        for world_size in 1..=vocab.min(8) {
            let mut next = 0;
            for rank in 0..world_size {
                let s = Shard { rank, world_size };
                let r = s.vocab_range(vocab);
                assert_eq!(r.start, next, "{vocab} over {world_size}");
                assert!(!r.is_empty() && r.len() <= s.vocab_rows_per_rank(vocab));
                assert!(r.len() + 1 >= s.vocab_rows_per_rank(vocab));
                next = r.end;
            }
            assert_eq!(next, vocab);
        }
    }
    // Ranks outside the world, huge values: empty ranges, no overflow.
    for (rank, world_size) in [(3, 3), (usize::MAX, 2)] {
        let r = Shard { rank, world_size }.vocab_range(usize::MAX);
        assert!(r.is_empty(), "{rank} of {world_size}: {r:?}");
    }
}

/// The SmolLM2 golden prompts of `names`.
fn golden_prompts(names: &[&str]) -> Vec<Vec<u32>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/golden/smollm2_golden.json"
    );
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    names
        .iter()
        .map(|name| {
            let p = golden["prompts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == *name)
                .unwrap();
            serde_json::from_value(p["prompt_ids"].clone()).unwrap()
        })
        .collect()
}

#[test]
fn smollm2_greedy_tokens_at_tp3_equal_tp1() {
    // Like tests/golden_smollm2.rs: the default model, fetched by `cargo xtask fetch-model`.
    let path = crate::fetch::ensure_default_model(&crate::fetch::default_models_dir())
        .expect("the default model (cargo xtask fetch-model) is needed by this test");
    let prompts = golden_prompts(&["chat_capital", "raw_fact"]);
    let options = GenerateOptions {
        max_new_tokens: 16,
        ..GenerateOptions::default()
    };
    let kv = KvCacheConfig {
        num_blocks: 16,
        block_size: 16,
        dtype: KvCacheDtype::Fp16,
        num_cpu_blocks: 0,
    };
    let run = |b: &mut CpuBackend| -> Vec<Vec<u32>> {
        prompts
            .iter()
            .map(|p| generate(b, p, &options).unwrap())
            .collect()
    };
    let loaded = crate::load_gguf(&path, Shard::FULL).unwrap();
    let want = run(&mut CpuBackend::new(loaded.weights, kv).unwrap());
    let ranks = run_ranks(3, |member| {
        let weights = crate::load_gguf(&path, member.shard())?.weights;
        assert_eq!(weights.local_shape().num_kv_heads, 1);
        let mut b = CpuBackend::new_sharded(weights, kv, Arc::new(member))?;
        Ok::<_, ModelError>(run(&mut b))
    });
    for (rank, got) in ranks.into_iter().enumerate() {
        assert_eq!(got.unwrap(), want, "rank {rank}");
    }
}

#[test]
fn a_shard_that_is_not_its_collectives_rank_is_refused() {
    let c = config(6);
    let shard = Shard {
        rank: 1,
        world_size: 2,
    };
    let w = Weights::dummy_shard(&c, DType::F32, SEED, shard).unwrap();
    let r = CpuBackend::new(w, cache(KvCacheDtype::Fp16));
    assert!(
        matches!(&r, Err(ModelError::ShardMismatch { expected, got, .. }) if expected == "rank 0 of 1" && got == "rank 1 of 2"),
        "{r:?}"
    );
    // In a group of 2, rank 0 brings the whole model: both ranks fail, neither waits.
    let results = run_ranks(2, |member| {
        let shard = if member.shard().rank == 0 {
            Shard::FULL
        } else {
            member.shard()
        };
        let w = Weights::dummy_shard(&c, DType::F32, SEED, shard)?;
        CpuBackend::new_sharded(w, cache(KvCacheDtype::Fp16), Arc::new(member)).map(drop)
    });
    assert!(
        matches!(&results[0], Err(ModelError::ShardMismatch { got, .. }) if got == "rank 0 of 1"),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(&results[1], Err(ModelError::ShardMismatch { what, .. }) if what.contains("rank 0's own checks")),
        "{:?}",
        results[1]
    );
}

#[test]
fn ranks_with_other_kv_caches_are_refused_together() {
    let c = config(6);
    let variants: [fn(KvCacheConfig) -> KvCacheConfig; 4] = [
        |k| KvCacheConfig {
            num_blocks: 15,
            ..k
        },
        |k| KvCacheConfig {
            dtype: KvCacheDtype::Int8,
            ..k
        },
        |k| KvCacheConfig {
            num_cpu_blocks: 0,
            ..k
        },
        // Refused by rank 1's own checks.
        |k| KvCacheConfig { num_blocks: 0, ..k },
    ];
    for (i, variant) in variants.iter().enumerate() {
        let results = run_ranks(2, |member| {
            let rank = member.shard().rank;
            let w = Weights::dummy_shard(&c, DType::F32, SEED, member.shard())?;
            let k = cache(KvCacheDtype::Fp16);
            let k = if rank == 1 { variant(k) } else { k };
            CpuBackend::new_sharded(w, k, Arc::new(member)).map(drop)
        });
        for (rank, r) in results.iter().enumerate() {
            let ok = match (i, rank) {
                (3, 1) => matches!(r, Err(ModelError::Unsupported(_))),
                (3, 0) => {
                    matches!(r, Err(ModelError::ShardMismatch { what, .. }) if what.contains("rank 1's own checks"))
                }
                _ => {
                    matches!(r, Err(ModelError::ShardMismatch { what, .. }) if what.contains("KV-cache configuration"))
                }
            };
            assert!(ok, "variant {i}, rank {rank}: {r:?}");
        }
    }
}

#[test]
fn models_that_do_not_split_are_refused() {
    let cases = [
        // 4 KV heads over 6 ranks: rank 1's query heads 2 and 3 would read KV heads 0 and 1.
        (config(4), 6, "replicated"),
        (config(6), 4, "6 KV heads over 4 ranks"),
        (config(6), 5, "12 query heads over 5 ranks"),
        (
            ModelConfig {
                vocab_size: 5,
                ..config(6)
            },
            6,
            "vocabulary",
        ),
    ];
    for (c, world_size, what) in cases {
        let r = Weights::dummy_shard(
            &c,
            DType::F32,
            SEED,
            Shard {
                rank: 0,
                world_size,
            },
        );
        assert!(
            matches!(&r, Err(ModelError::Unsupported(m)) if m.contains(what)),
            "{what}: {r:?}"
        );
    }
}

/// A member that fails (or, with `truncate`, drops the last value of a gather) at the
/// `countdown`-th call from when it was armed.
struct Faulty {
    inner: Arc<dyn HostCollective>,
    countdown: AtomicUsize,
    truncate: bool,
}

impl Faulty {
    fn new(inner: Arc<dyn HostCollective>, truncate: bool) -> Arc<Self> {
        Arc::new(Self {
            inner,
            countdown: AtomicUsize::new(0),
            truncate,
        })
    }

    /// Whether this call is the armed one.
    fn fires(&self) -> bool {
        self.countdown
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            == Ok(1)
    }
}

impl HostCollective for Faulty {
    fn shard(&self) -> Shard {
        self.inner.shard()
    }
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), ModelError> {
        if self.fires() && !self.truncate {
            return Err(ModelError::Collective {
                operation: "all_reduce_sum",
                reason: "injected".into(),
            });
        }
        self.inner.all_reduce_sum(x)
    }
    fn all_gather(&self, local: &[f32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        let fires = self.fires();
        if fires && !self.truncate {
            return Err(ModelError::Collective {
                operation: "all_gather",
                reason: "injected".into(),
            });
        }
        self.inner.all_gather(local, out)?;
        if fires {
            out.pop();
        }
        Ok(())
    }
}

#[test]
fn a_failed_collective_fails_the_step_and_a_retry_recovers() {
    let c = config(6);
    let want = sharded(&c, DType::Q8_0, KvCacheDtype::Fp16, 2);
    // Calls of one step: the embedding's all-reduce, two per layer, the logits' gather.
    let calls = 2 + 2 * c.num_layers;
    for (fail_at, operation) in [
        (1, "all_reduce_sum"),
        (4, "all_reduce_sum"),
        (calls, "all_gather"),
    ] {
        let ranks = run_ranks(2, |member| {
            let faulty = Faulty::new(Arc::new(member.clone()), false);
            let w = Weights::dummy_shard(&c, DType::Q8_0, SEED, member.shard())?;
            let mut b = CpuBackend::new_sharded(w, cache(KvCacheDtype::Fp16), faulty.clone())?;
            let mut lens = [0; 2];
            let mut out = Vec::new();
            for (i, step) in script().iter().enumerate() {
                if i == 2 {
                    faulty.countdown.store(fail_at, Ordering::SeqCst);
                    let failed = run_step(&mut b, &mut lens, step);
                    assert!(
                        matches!(&failed, Err(ModelError::Collective { operation: o, reason }) if *o == operation && reason == "injected"),
                        "call {fail_at}: {failed:?}"
                    );
                }
                out.push(run_step(&mut b, &mut lens, step)?);
            }
            Ok::<_, ModelError>(out)
        });
        for (rank, got) in ranks.into_iter().enumerate() {
            assert_eq!(
                got.unwrap(),
                want,
                "call {fail_at}, rank {rank}: the retried run differs"
            );
        }
    }
}

#[test]
fn a_collective_returning_a_short_gather_is_an_error() {
    let c = config(6);
    let short_gather = |r: &Result<(), ModelError>| {
        matches!(
            r,
            Err(ModelError::Collective {
                operation: "all_gather",
                ..
            })
        )
    };
    // The handshake's gather, alone.
    let faulty = Faulty::new(Arc::new(SingleRank), true);
    faulty.countdown.store(1, Ordering::SeqCst);
    let w = Weights::dummy(&c, DType::F32, SEED).unwrap();
    let r = CpuBackend::new_sharded(w, cache(KvCacheDtype::Fp16), faulty).map(drop);
    assert!(short_gather(&r), "{r:?}");
    // The logits' gather, in a group of two.
    let results = run_ranks(2, |member| {
        let faulty = Faulty::new(Arc::new(member.clone()), true);
        let w = Weights::dummy_shard(&c, DType::F32, SEED, member.shard())?;
        let mut b = CpuBackend::new_sharded(w, cache(KvCacheDtype::Fp16), faulty.clone())?;
        faulty
            .countdown
            .store(2 + 2 * c.num_layers, Ordering::SeqCst);
        run_step(&mut b, &mut [0; 2], &script()[0]).map(drop)
    });
    for r in results {
        assert!(short_gather(&r), "{r:?}");
    }
}
