//! NCCL collectives on 2 GPUs (ignored without them: run on the GPU machine with
//! `NCCL_NVLS_ENABLE=0 ... --include-ignored`), and the clean refusal on a machine without NCCL
//! or a GPU (runs everywhere).
//!
//! Rank closures never panic (a rank that stops calling collectives would leave the other
//! waiting in NCCL): they return what they saw, and the test thread asserts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dist::{Communicator, DistConfig, DistError, NcclCommunicator};
use half::bf16;
use kernels_cuda::Gpu;

const GPUS: usize = 2;

/// Runs `f` on ranks 0 and 1 (GPUs 0 and 1) and returns their results, failing the test
/// with the reason when the ranks could not start.
fn on_two_gpus<T: Send>(f: impl Fn(Gpu, NcclCommunicator) -> Result<T, String> + Sync) -> Vec<T> {
    let visible = dist::local_gpu_count().expect("a CUDA driver");
    assert!(visible >= GPUS, "needs {GPUS} GPUs, {visible} visible");
    NcclCommunicator::run_on_local_gpus(GPUS, f)
        .expect("ranks started (is NCCL_NVLS_ENABLE=0 set?)")
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank}: {e}")))
        .collect()
}

fn to_bf16(values: impl Iterator<Item = f32>) -> Vec<bf16> {
    values.map(bf16::from_f32).collect()
}

fn to_f32(values: Vec<bf16>) -> Vec<f32> {
    values.into_iter().map(bf16::to_f32).collect()
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL"]
fn all_reduce_sums_every_rank() {
    // Small integers: exact in bf16, so the sum is exact too. An odd length on purpose.
    const N: usize = 4099;
    let value = |rank: usize, i: usize| ((i % 17) * (rank + 1)) as f32;
    let results = on_two_gpus(|gpu, comm| {
        let s = gpu.stream();
        let rank = comm.rank();
        let mut buf = s
            .clone_htod(&to_bf16((0..N).map(|i| value(rank, i))))
            .map_err(|e| e.to_string())?;
        comm.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
        Ok((
            comm.world_size(),
            to_f32(s.clone_dtoh(&buf).map_err(|e| e.to_string())?),
        ))
    });
    let expected: Vec<f32> = (0..N).map(|i| value(0, i) + value(1, i)).collect();
    for (rank, (world, got)) in results.into_iter().enumerate() {
        assert_eq!(world, GPUS);
        assert_eq!(got, expected, "rank {rank}");
    }
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL"]
fn all_gather_is_rank_major() {
    const N: usize = 100;
    let value = |rank: usize, i: usize| (rank * 128 + i) as f32;
    let results = on_two_gpus(|gpu, comm| {
        let s = gpu.stream();
        let rank = comm.rank();
        let send = s
            .clone_htod(&to_bf16((0..N).map(|i| value(rank, i))))
            .map_err(|e| e.to_string())?;
        let mut recv = s.alloc_zeros::<bf16>(N * GPUS).map_err(|e| e.to_string())?;
        comm.all_gather(&send, &mut recv)
            .map_err(|e| e.to_string())?;
        Ok(to_f32(s.clone_dtoh(&recv).map_err(|e| e.to_string())?))
    });
    let expected: Vec<f32> = (0..GPUS)
        .flat_map(|rank| (0..N).map(move |i| value(rank, i)))
        .collect();
    for (rank, got) in results.into_iter().enumerate() {
        assert_eq!(got, expected, "rank {rank}");
    }
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL"]
fn broadcast_copies_the_root_everywhere() {
    const N: usize = 1000;
    let pattern = |root: usize| -> Vec<u8> { (0..N).map(|i| (i * 7 + root) as u8).collect() };
    let results = on_two_gpus(|gpu, comm| {
        let s = gpu.stream();
        let mut seen = Vec::new();
        for root in 0..GPUS {
            let mine = if comm.rank() == root {
                pattern(root)
            } else {
                vec![0; N]
            };
            let mut buf = s.clone_htod(&mine).map_err(|e| e.to_string())?;
            comm.broadcast(&mut buf, root).map_err(|e| e.to_string())?;
            seen.push(s.clone_dtoh(&buf).map_err(|e| e.to_string())?);
        }
        Ok(seen)
    });
    for (rank, seen) in results.into_iter().enumerate() {
        for (root, got) in seen.into_iter().enumerate() {
            assert_eq!(got, pattern(root), "rank {rank}, root {root}");
        }
    }
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL"]
fn bad_lengths_and_roots_are_refused_before_nccl() {
    // Each rank makes the same bad calls: had one reached NCCL, the ranks would have written
    // out of bounds or waited forever. A good collective afterwards shows the group is intact.
    let results = on_two_gpus(|gpu, comm| {
        let s = gpu.stream();
        let send = s.alloc_zeros::<bf16>(8).map_err(|e| e.to_string())?;
        let mut short = s
            .alloc_zeros::<bf16>(8 * GPUS - 1)
            .map_err(|e| e.to_string())?;
        let gather = comm.all_gather(&send, &mut short);
        let mut bytes = s.alloc_zeros::<u8>(4).map_err(|e| e.to_string())?;
        let broadcast = comm.broadcast(&mut bytes, GPUS);
        let mut ones = s
            .clone_htod(&to_bf16(std::iter::repeat_n(1.0, 16)))
            .map_err(|e| e.to_string())?;
        comm.all_reduce_sum(&mut ones).map_err(|e| e.to_string())?;
        let after = to_f32(s.clone_dtoh(&ones).map_err(|e| e.to_string())?);
        Ok((gather, broadcast, after))
    });
    for (gather, broadcast, after) in results {
        assert!(
            matches!(
                gather,
                Err(DistError::LengthMismatch {
                    op: "all_gather",
                    buffer: "recv",
                    expected: 16,
                    got: 15
                })
            ),
            "{gather:?}"
        );
        assert!(
            matches!(
                broadcast,
                Err(DistError::RankOutOfRange {
                    what: "root",
                    rank: 2,
                    ..
                })
            ),
            "{broadcast:?}"
        );
        assert_eq!(after, vec![GPUS as f32; 16]);
    }
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL"]
fn construction_refuses_bad_ranks_and_missing_gpus() {
    let gpu = Gpu::new(0).expect("GPU 0");
    let id = NcclCommunicator::unique_id().expect("NCCL (is NCCL_NVLS_ENABLE=0 set?)");
    let err = NcclCommunicator::from_gpu(&gpu, 2, 2, &id).unwrap_err();
    assert!(
        matches!(err, DistError::RankOutOfRange { what: "rank", .. }),
        "{err}"
    );
    let err = NcclCommunicator::from_gpu(&gpu, 0, 0, &id).unwrap_err();
    assert!(
        matches!(
            err,
            DistError::Config {
                field: "world_size",
                ..
            }
        ),
        "{err}"
    );
    let visible = dist::local_gpu_count().unwrap();
    let err = NcclCommunicator::run_on_local_gpus(visible + 1, |_, _| ()).unwrap_err();
    assert!(matches!(err, DistError::NoDevice(_)), "{err}");
}

/// Runs everywhere: without libnccl or a GPU, every entry point returns an error (cudarc
/// would panic on the first call).
#[test]
fn without_nccl_or_a_gpu_construction_is_an_error_not_a_panic() {
    // Bad input is refused before any probing, on every machine.
    let err = NcclCommunicator::run_on_local_gpus(0, |_, _| ()).unwrap_err();
    assert!(
        matches!(
            err,
            DistError::Config {
                field: "tensor_parallel_size",
                ..
            }
        ),
        "{err}"
    );
    if dist::nccl_available() && dist::local_gpu_count().is_ok_and(|n| n > 0) {
        eprintln!("NCCL and a GPU are here: the refusals are checked on machines without them");
        return;
    }
    let unavailable = |e: &DistError| {
        matches!(
            e,
            DistError::NcclUnavailable(_)
                | DistError::NoDevice(_)
                | DistError::NvlsNotDisabled { .. }
        )
    };
    let err = NcclCommunicator::unique_id().unwrap_err();
    assert!(unavailable(&err), "{err}");
    let err = NcclCommunicator::run_on_local_gpus(2, |_, _| ()).unwrap_err();
    assert!(unavailable(&err), "{err}");
    let config = DistConfig::single_node(2);
    let err = NcclCommunicator::run_local_ranks(&config, &dist::UniqueId([0; 128]), |_, _| ())
        .unwrap_err();
    assert!(unavailable(&err), "{err}");
    let err =
        dist::bootstrap_unique_id(&config, Duration::from_secs(1), NcclCommunicator::unique_id)
            .unwrap_err();
    assert!(unavailable(&err), "{err}");
    if !dist::nccl_available() {
        assert!(matches!(err, DistError::NcclUnavailable(_)), "{err}");
        assert!(err.to_string().contains("libnccl"), "{err}");
    }
}
