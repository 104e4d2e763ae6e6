//! The sharded CUDA backend (`CudaBackend::new_sharded`) against the whole model on one GPU:
//! every position's logits over prefill in one pass, in chunks and token by token.
//!
//! * On one GPU: 2 and 4 ranks share GPU 0, their collectives staged through the host
//!   ([`dist::StagedCollective`] over a [`dist::ThreadGroup`]; NCCL refuses two ranks on one
//!   device). This checks the sharding of every layer, the vocab-parallel embedding and LM
//!   head, and replicated KV heads.
//! * On 2 GPUs: the same over NCCL (`CommCollective<NcclCommunicator>`).
//!
//! Ignored without a GPU: `NCCL_NVLS_ENABLE=0 cargo test -p dist --test cuda_tp --
//! --include-ignored` on the GPU machine.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

#[path = "../../model/tests/batched/mod.rs"]
mod batched;

use std::sync::Arc;

use dist::{
    CommCollective, DistError, GroupAbort, NcclCommunicator, StagedCollective,
    TensorParallelBackend, ThreadGroup,
};
use kernels_cuda::Gpu;
use model::{
    Backend, CudaBackend, DType, HostCollective, KvCacheConfig, ModelConfig, ModelError, Shard,
    Weights,
};

/// Heads and widths that shard over 2 and 4 ranks (2 KV heads: replicated over 4), an uneven
/// vocabulary (1,001 rows: 501/500 and 251/250/250/250).
fn config(tied: bool) -> ModelConfig {
    let mut c = ModelConfig::tiny(1001);
    c.hidden_size = 256;
    c.intermediate_size = 512;
    c.num_heads = 8;
    c.num_kv_heads = 2;
    c.head_dim = 64;
    c.tie_word_embeddings = tied;
    c
}

fn cache() -> KvCacheConfig {
    KvCacheConfig {
        num_blocks: 64,
        block_size: 16,
        dtype: "bf16".parse().unwrap(),
        num_cpu_blocks: 4,
    }
}

fn weights(c: &ModelConfig, shard: Shard) -> Weights {
    Weights::dummy_shard(c, DType::F32, 11, shard).unwrap()
}

fn seqs(vocab: usize) -> Vec<Vec<u32>> {
    [53usize, 21]
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((i * 7919 + s * 104_729) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Every position's logits through `backend`, for three chunkings (prefill in one pass, in
/// chunks, token by token: the cuBLAS, GEMV and prefill-kernel paths).
fn logits(backend: &mut dyn Backend) -> Vec<Vec<Vec<f32>>> {
    let seqs = seqs(backend.config().vocab_size);
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    [[53, 21], [11, 3], [1, 1]]
        .iter()
        .map(|chunks| batched::run_batched(backend, &refs, chunks))
        .collect()
}

/// Max |got − want| / max |want| over everything, and the share of rows whose argmax agrees.
fn compare(got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f32>>], vocab: usize) -> (f32, f32) {
    let (mut err, mut scale, mut rows, mut same) = (0f32, 1e-30f32, 0, 0);
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m })
            .0
    };
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            err = err.max((a - b).abs());
            scale = scale.max(b.abs());
        }
        for (gr, wr) in g.chunks(vocab).zip(w.chunks(vocab)) {
            rows += 1;
            same += usize::from(argmax(gr) == argmax(wr));
        }
    }
    (err / scale, same as f32 / rows as f32)
}

/// `world` ranks sharing GPU 0 over staged host collectives.
fn staged_ranks(c: &ModelConfig, world: usize) -> Result<TensorParallelBackend, DistError> {
    let members = ThreadGroup::new(world)?;
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let c = c.clone();
    TensorParallelBackend::spawn(world, group, move |rank| {
        let member = members[rank].clone();
        let gpu = Gpu::new(0)?;
        let w = weights(&c, member.shard());
        let collective = StagedCollective::new(member, gpu.stream().clone());
        CudaBackend::new_sharded(&w, cache(), gpu, Box::new(collective))
    })
}

/// A fresh NCCL unique id for 2 ranks on GPUs 0 and 1, after checking both are there (a rank
/// that cannot open its GPU would leave the other waiting in `ncclCommInitRank`).
fn nccl_pair() -> dist::UniqueId {
    let visible = dist::local_gpu_count().expect("a CUDA driver");
    assert!(visible >= 2, "needs 2 GPUs, {visible} visible");
    NcclCommunicator::unique_id().expect("NCCL (is NCCL_NVLS_ENABLE=0 set?)")
}

/// Rank `rank` of 2 over NCCL on GPU `rank`, with its shard of `c`'s weights.
fn nccl_rank(c: &ModelConfig, rank: usize, id: &dist::UniqueId) -> Result<CudaBackend, ModelError> {
    let gpu = Gpu::new(rank)?;
    let comm = CommCollective::join_nccl(&gpu, rank, 2, id)?;
    let w = weights(
        c,
        Shard {
            rank,
            world_size: 2,
        },
    );
    CudaBackend::new_sharded(&w, cache(), gpu, Box::new(comm))
}

fn one_rank(c: &ModelConfig) -> CudaBackend {
    CudaBackend::new(&weights(c, Shard::FULL), cache(), Gpu::new(0).unwrap()).unwrap()
}

/// bf16 products summed over ranks in another order, rounded to bf16 before the sum: a few
/// bf16 ulps of the logits' scale.
const TOLERANCE: f32 = 2e-2;

#[test]
#[ignore = "needs a CUDA GPU"]
fn ranks_sharing_one_gpu_give_the_logits_of_one() {
    for (world, tied) in [(2, false), (4, true)] {
        let c = config(tied);
        let want = logits(&mut one_rank(&c));
        let mut tp = staged_ranks(&c, world).unwrap();
        assert!(tp.device().contains("tensor parallel"), "{}", tp.device());
        let got = logits(&mut tp);
        let (err, same) = compare(&got, &want, c.vocab_size);
        eprintln!(
            "TP {world} (tied {tied}) on one GPU vs TP 1: rel err {err:.2e}, argmax agrees {:.1}%",
            100.0 * same
        );
        assert!(err < TOLERANCE, "TP {world}: {err}");
        assert!(same > 0.97, "TP {world}: argmax agrees on {same}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sharded_construction_refuses_mismatched_ranks() {
    let c = config(false);
    // Rank 1 loads rank 0's shard: every rank fails (the handshake), none hangs.
    let members = ThreadGroup::new(2).unwrap();
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let c2 = c.clone();
    let err = TensorParallelBackend::spawn(2, group, move |rank| {
        let member = members[rank].clone();
        let gpu = Gpu::new(0)?;
        let w = weights(
            &c2,
            Shard {
                rank: 0,
                world_size: 2,
            },
        );
        let collective = StagedCollective::new(member, gpu.stream().clone());
        CudaBackend::new_sharded(&w, cache(), gpu, Box::new(collective))
    })
    .unwrap_err();
    eprintln!("{err}");
    // Whichever rank reports first: rank 1 names its shard, rank 0 that rank 1 failed.
    assert!(matches!(err, DistError::Rank { .. }), "{err}");
    assert!(
        err.to_string().contains("tensor-parallel mismatch"),
        "{err}"
    );
    // The whole-model constructor refuses a shard.
    let shard = weights(
        &c,
        Shard {
            rank: 1,
            world_size: 2,
        },
    );
    let refused = CudaBackend::new(&shard, cache(), Gpu::new(0).unwrap()).unwrap_err();
    assert!(
        matches!(refused, ModelError::ShardMismatch { .. }),
        "{refused}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dummy_shards_run_on_one_gpu() {
    // Dummy weights generated per rank on the device: shapes only (their logits mean nothing),
    // but a step runs end to end and every rank returns full, finite logits rows.
    let mut c = config(true);
    c.num_layers = 1;
    let members = ThreadGroup::new(2).unwrap();
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let c2 = c.clone();
    let mut tp = TensorParallelBackend::spawn(2, group, move |rank| {
        let member = members[rank].clone();
        let gpu = Gpu::new(0)?;
        let collective = StagedCollective::new(member, gpu.stream().clone());
        CudaBackend::dummy_sharded(&c2, cache(), gpu, 5, Box::new(collective))
    })
    .unwrap();
    let got = logits(&mut tp);
    let rows: usize = got[0].iter().map(|s| s.len() / c.vocab_size).sum();
    assert_eq!(rows, 53 + 21);
    assert!(got.iter().flatten().flatten().all(|x| x.is_finite()));
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL"]
fn two_gpus_over_nccl_give_the_logits_of_one() {
    let c = config(false);
    let want = logits(&mut one_rank(&c));
    let id = nccl_pair();
    let c2 = c.clone();
    let group = Arc::new(dist::NcclGroup::new());
    let mut tp =
        TensorParallelBackend::spawn(2, group, move |rank| nccl_rank(&c2, rank, &id)).unwrap();
    let got = logits(&mut tp);
    let (err, same) = compare(&got, &want, c.vocab_size);
    eprintln!(
        "TP 2 over NCCL vs TP 1: rel err {err:.2e}, argmax agrees {:.1}%",
        100.0 * same
    );
    assert!(err < TOLERANCE, "{err}");
    assert!(same > 0.97, "{same}");
}

/// A rank's CUDA backend that fails its `fail_at`th forward (counting from 1) before running
/// it: its peers enter the step's first collective alone and wait in NCCL for good.
struct FailingRank {
    inner: CudaBackend,
    fail_at: Option<usize>,
    forwards: usize,
}

impl Backend for FailingRank {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn kv_cache_config(&self) -> KvCacheConfig {
        self.inner.kv_cache_config()
    }
    fn forward(
        &mut self,
        b: &model::ForwardBatch<'_>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.forwards += 1;
        if self.fail_at == Some(self.forwards) {
            return Err(ModelError::Unsupported("injected rank failure".into()));
        }
        self.inner.forward(b, logits)
    }
    fn copy_blocks(&mut self, c: &[kv_block_manager::CopyOp]) -> Result<(), ModelError> {
        self.inner.copy_blocks(c)
    }
    fn swap_out(&mut self, c: &[kv_block_manager::CopyOp]) -> Result<(), ModelError> {
        self.inner.swap_out(c)
    }
    fn swap_in(&mut self, c: &[kv_block_manager::CopyOp]) -> Result<(), ModelError> {
        self.inner.swap_in(c)
    }
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL"]
fn a_rank_that_fails_over_nccl_ends_the_backend_without_a_hang() {
    let c = config(false);
    let id = nccl_pair();
    let c2 = c.clone();
    let mut tp = TensorParallelBackend::spawn(2, Arc::new(dist::NcclGroup::new()), move |rank| {
        let inner = nccl_rank(&c2, rank, &id)?;
        Ok(FailingRank {
            inner,
            fail_at: (rank == 1).then_some(3),
            forwards: 0,
        })
    })
    .unwrap();
    tp.set_failure_grace(std::time::Duration::from_secs(3))
        .unwrap();
    // Token by token: forwards 1 and 2 run, rank 1 fails the third while rank 0 waits in its
    // embedding all-reduce.
    let seqs = seqs(c.vocab_size);
    let started = std::time::Instant::now();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        batched::run_batched(&mut tp, &refs[..1], &[1])
    }));
    // run_batched unwraps the forward's error: the panic message carries it.
    let message = match outcome {
        Ok(_) => panic!("the third forward should have failed"),
        Err(p) => p.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    eprintln!("after {:?}: {message}", started.elapsed());
    assert!(
        message.contains("Unrecoverable") || message.contains("cannot run"),
        "{message}"
    );
    assert!(message.contains("rank 1"), "{message}");
    // Every later call fails at once, and dropping the backend returns (a stuck rank 0 is
    // detached, not joined).
    let mut logits = Vec::new();
    let p = [1u32];
    let again = tp.forward(
        &model::ForwardBatch {
            token_ids: &p,
            positions: &[0],
            slot_mapping: &[0],
            seq_starts: &[0, 1],
            block_tables: &[0],
            max_blocks: 1,
            context_lens: &[1],
            logits_indices: &[0],
        },
        &mut logits,
    );
    assert!(
        matches!(again, Err(ModelError::Unrecoverable(_))),
        "{again:?}"
    );
    drop(tp);
}
