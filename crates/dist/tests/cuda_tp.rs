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
    assert!(matches!(err, DistError::Rank { .. }), "{err}");
    assert!(err.to_string().contains("shard"), "{err}");
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
    let id = NcclCommunicator::unique_id().expect("NCCL (is NCCL_NVLS_ENABLE=0 set?)");
    let members = ThreadGroup::new(2).unwrap(); // only as the group's abort switch
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let c2 = c.clone();
    let mut tp = TensorParallelBackend::spawn(2, group, move |rank| {
        let gpu = Gpu::new(rank)?;
        let comm =
            NcclCommunicator::from_gpu(&gpu, rank, 2, &id).map_err(|e| ModelError::Collective {
                operation: "ncclCommInitRank",
                reason: e.to_string(),
            })?;
        let w = weights(
            &c2,
            Shard {
                rank,
                world_size: 2,
            },
        );
        CudaBackend::new_sharded(&w, cache(), gpu, Box::new(CommCollective::new(comm)))
    })
    .unwrap();
    let got = logits(&mut tp);
    let (err, same) = compare(&got, &want, c.vocab_size);
    eprintln!(
        "TP 2 over NCCL vs TP 1: rel err {err:.2e}, argmax agrees {:.1}%",
        100.0 * same
    );
    assert!(err < TOLERANCE, "{err}");
    assert!(same > 0.97, "{same}");
}
