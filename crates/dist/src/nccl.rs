//! The NCCL communicator (cudarc's safe NCCL API) and the probes that keep a machine without
//! NCCL or a GPU from panicking.
#![allow(unsafe_code)] // one `unsafe impl Send` (see its SAFETY line)

use std::ffi::{OsStr, c_char};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp, result::NcclError};
use half::bf16;
use kernels_cuda::Gpu;

use crate::comm::{check_all_gather, check_root};
use crate::config::MAX_WORLD_SIZE;
use crate::{Communicator, DistConfig, DistError, UNIQUE_ID_LEN, UniqueId};

/// The environment variable that turns NCCL's NVLink multicast (NVLS) off when `0`.
pub const NVLS_ENV: &str = "NCCL_NVLS_ENABLE";

/// Whether one of the names cudarc tries for libnccl can be loaded. cudarc panics on the first
/// NCCL call when none can; this opens (and closes) the library first.
pub use kernels_cuda::nccl_available;

/// Checks that NVLink multicast is off for this process: `NCCL_NVLS_ENABLE` must be `0` in
/// the environment before NCCL starts (a safety rule of the multi-GPU machines). `dist` does
/// not set it itself (changing the environment of a running process is `unsafe`): the
/// launcher or the shell does.
///
/// # Errors
/// [`DistError::NvlsNotDisabled`] with the value found.
pub fn check_nvls_disabled() -> Result<(), DistError> {
    check_nvls_value(std::env::var_os(NVLS_ENV).as_deref())
}

fn check_nvls_value(value: Option<&OsStr>) -> Result<(), DistError> {
    match value {
        Some(v) if v == "0" => Ok(()),
        Some(v) => Err(DistError::NvlsNotDisabled {
            found: format!("{:?}", v.to_string_lossy()),
        }),
        None => Err(DistError::NvlsNotDisabled {
            found: "unset".into(),
        }),
    }
}

/// Checks, in this order, that libnccl loads, that the CUDA driver library loads, and that
/// NVLink multicast is off; every NCCL entry point of the crate calls it first.
fn nccl_ready() -> Result<(), DistError> {
    if !nccl_available() {
        return Err(DistError::NcclUnavailable(format!(
            "none of {:?} can be loaded: install NCCL 2 and put its folder on \
             LD_LIBRARY_PATH (a pip wheel's libnccl.so.2 needs a libnccl.so link beside it)",
            cudarc::get_lib_name_candidates("nccl")
                .iter()
                .take(2)
                .collect::<Vec<_>>()
        )));
    }
    if !kernels_cuda::driver_available() {
        return Err(DistError::NoDevice(
            "the CUDA driver library (libcuda) is not installed".into(),
        ));
    }
    check_nvls_disabled()
}

/// CUDA devices visible to this process.
///
/// # Errors
/// [`DistError::NoDevice`] without the driver library, or when the driver cannot count.
pub fn local_gpu_count() -> Result<usize, DistError> {
    if !kernels_cuda::driver_available() {
        return Err(DistError::NoDevice(
            "the CUDA driver library (libcuda) is not installed".into(),
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| DistError::NoDevice(format!("cuInit/cuDeviceGetCount: {e}")))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

fn nccl_error(op: &'static str) -> impl Fn(NcclError) -> DistError {
    move |e| DistError::Nccl {
        op,
        code: format!("{:?}", e.0),
    }
}

fn rank_i32(
    op: &'static str,
    what: &'static str,
    rank: usize,
    world_size: usize,
) -> Result<i32, DistError> {
    i32::try_from(rank).map_err(|_| DistError::RankOutOfRange {
        op,
        what,
        rank,
        world_size,
    })
}

/// One rank of an NCCL group, enqueueing its collectives on one CUDA stream.
///
/// `Send` but not `Sync`: it may move to another thread (a rank's backend is built on the
/// rank's thread and may be handed on), but one thread at a time calls it. Buffers passed to
/// it must be used on its stream (or synchronized with it by the caller).
#[derive(Debug)]
pub struct NcclCommunicator {
    comm: Comm,
}

// SAFETY: cudarc's `Comm` is `!Send` only because it holds NCCL's raw `ncclComm_t`. NCCL
// does not bind a communicator to the thread that created it: its calls may come from any
// thread as long as no two run at once on the same communicator (NCCL's thread-safety rule),
// and each call makes the communicator's device current itself. Without `Sync`, owning the
// value (moved whole, never shared) is what keeps calls from two threads from overlapping.
unsafe impl Send for NcclCommunicator {}

impl NcclCommunicator {
    /// A fresh NCCL unique id, for rank 0 to share with the others (over
    /// [`bootstrap_unique_id`](crate::bootstrap_unique_id) across nodes).
    ///
    /// # Errors
    /// [`DistError::NcclUnavailable`], [`DistError::NoDevice`] or
    /// [`DistError::NvlsNotDisabled`] when NCCL cannot start here; [`DistError::Nccl`] when
    /// `ncclGetUniqueId` fails.
    pub fn unique_id() -> Result<UniqueId, DistError> {
        nccl_ready()?;
        let id = Id::new().map_err(nccl_error("ncclGetUniqueId"))?;
        Ok(UniqueId(id.internal().map(|c| c.to_ne_bytes()[0])))
    }

    /// Joins the group `id` as `rank` of `world_size`, with collectives on `stream`. Blocks
    /// until every rank of the group has joined (NCCL's `ncclCommInitRank`): start the ranks
    /// of one process on separate threads.
    ///
    /// # Errors
    /// [`DistError::Config`] for a `world_size` of 0 or above [`MAX_WORLD_SIZE`];
    /// [`DistError::RankOutOfRange`] when `rank >= world_size`; the errors of
    /// [`unique_id`](Self::unique_id) when NCCL cannot start here; [`DistError::Cuda`] or
    /// [`DistError::Nccl`] when initialization fails.
    pub fn new(
        stream: Arc<CudaStream>,
        rank: usize,
        world_size: usize,
        id: &UniqueId,
    ) -> Result<Self, DistError> {
        if world_size == 0 || world_size > MAX_WORLD_SIZE {
            return Err(DistError::config(
                "world_size",
                format!("{world_size} is not in 1..={MAX_WORLD_SIZE}"),
            ));
        }
        if rank >= world_size {
            return Err(DistError::RankOutOfRange {
                op: "NcclCommunicator::new",
                what: "rank",
                rank,
                world_size,
            });
        }
        nccl_ready()?;
        // ncclCommInitRank picks the device current on this thread.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| DistError::Cuda {
                what: "binding the context to the rank's thread",
                message: e.to_string(),
            })?;
        let id = Id::uninit(id.0.map(|b| c_char::from_ne_bytes([b])));
        let comm = Comm::from_rank(stream, rank, world_size, id)
            .map_err(nccl_error("ncclCommInitRank"))?;
        Ok(Self { comm })
    }

    /// As [`new`](Self::new), on `gpu`'s stream (the one its kernels run on).
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn from_gpu(
        gpu: &Gpu,
        rank: usize,
        world_size: usize,
        id: &UniqueId,
    ) -> Result<Self, DistError> {
        Self::new(gpu.stream().clone(), rank, world_size, id)
    }

    /// The stream the collectives are enqueued on.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.comm.stream()
    }

    /// Runs this node's ranks of `config` (validated first), one thread per local GPU: the
    /// thread of local GPU `i` opens it, joins the group `id` as world rank
    /// `config.world_rank(i)` and hands `f` the GPU and the communicator (both owned: a
    /// rank's model backend can keep them for the rank's lifetime). Returns each rank's
    /// result, in local GPU order, once all are done.
    ///
    /// All local GPUs are opened before NCCL is started, so a missing device fails every
    /// local rank cleanly instead of leaving the others waiting in `ncclCommInitRank` (ranks
    /// of other nodes still wait until their own timeout). Once the ranks run `f`, a rank that
    /// stops calling collectives (a panic in `f`) leaves the others waiting inside NCCL.
    ///
    /// # Errors
    /// [`DistConfig::validate`]'s; those of [`unique_id`](Self::unique_id) when NCCL cannot
    /// start here; [`DistError::NoDevice`] when fewer GPUs are visible than the node runs;
    /// [`DistError::Rank`] naming the first rank that failed to start or panicked.
    pub fn run_local_ranks<T, F>(
        config: &DistConfig,
        id: &UniqueId,
        f: F,
    ) -> Result<Vec<T>, DistError>
    where
        T: Send,
        F: Fn(Gpu, NcclCommunicator) -> T + Sync,
    {
        config.validate()?;
        nccl_ready()?;
        let local = config.gpus_per_node();
        let visible = local_gpu_count()?;
        if local > visible {
            return Err(DistError::NoDevice(format!(
                "{local} GPUs per node asked for (tensor_parallel_size {} over {} nodes), {visible} visible",
                config.tensor_parallel_size, config.nnodes
            )));
        }
        let world_size = config.tensor_parallel_size;
        let gate = crate::StartGate::new(local);
        let (gate, f) = (&gate, &f);
        std::thread::scope(|scope| {
            let ranks: Vec<_> = (0..local)
                .zip(config.local_ranks())
                .map(|(gpu_index, rank)| {
                    // Nothing may return before the gate: the other ranks wait there.
                    scope.spawn(move || -> Result<T, DistError> {
                        let opened = Gpu::new(gpu_index).map_err(|e| DistError::Rank {
                            rank,
                            message: format!("opening GPU {gpu_index}: {e}"),
                        });
                        let gpu = gate.pass(opened, || DistError::Rank {
                            rank,
                            message: "not started: another rank could not open its GPU".into(),
                        })?;
                        let comm = Self::from_gpu(&gpu, rank, world_size, id).map_err(|e| {
                            DistError::Rank {
                                rank,
                                message: e.to_string(),
                            }
                        })?;
                        Ok(f(gpu, comm))
                    })
                })
                .collect();
            let results: Vec<Result<T, DistError>> = ranks
                .into_iter()
                .zip(config.local_ranks())
                .map(|(thread, rank)| {
                    thread.join().unwrap_or_else(|_| {
                        Err(DistError::Rank {
                            rank,
                            message: "panicked".into(),
                        })
                    })
                })
                .collect();
            results.into_iter().collect()
        })
    }

    /// [`run_local_ranks`](Self::run_local_ranks) over `gpus` GPUs of this host, with a fresh
    /// unique id: the single-host case (benchmarks, tests).
    ///
    /// # Errors
    /// As [`run_local_ranks`](Self::run_local_ranks); [`DistError::Config`]
    /// (`tensor_parallel_size`) when `gpus` is 0.
    pub fn run_on_local_gpus<T, F>(gpus: usize, f: F) -> Result<Vec<T>, DistError>
    where
        T: Send,
        F: Fn(Gpu, NcclCommunicator) -> T + Sync,
    {
        let config = DistConfig::single_node(gpus);
        config.validate()?;
        let id = Self::unique_id()?;
        Self::run_local_ranks(&config, &id, f)
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, buf: &mut CudaSlice<bf16>) -> Result<(), DistError> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(nccl_error("ncclAllReduce"))?;
        Ok(())
    }

    fn all_reduce_sum_f32(&self, buf: &mut CudaSlice<f32>) -> Result<(), DistError> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(nccl_error("ncclAllReduce"))?;
        Ok(())
    }

    fn all_gather(
        &self,
        send: &CudaSlice<bf16>,
        recv: &mut CudaSlice<bf16>,
    ) -> Result<(), DistError> {
        check_all_gather(send.len(), recv.len(), self.world_size())?;
        self.comm
            .all_gather(send, recv)
            .map_err(nccl_error("ncclAllGather"))?;
        Ok(())
    }

    fn broadcast(&self, buf: &mut CudaSlice<u8>, root: usize) -> Result<(), DistError> {
        check_root("broadcast", root, self.world_size())?;
        let root = rank_i32("broadcast", "root", root, self.world_size())?;
        self.comm
            .broadcast_in_place(buf, root)
            .map_err(nccl_error("ncclBroadcast"))?;
        Ok(())
    }
}

/// The [`GroupAbort`](crate::GroupAbort) of ranks whose collectives run on NCCL.
///
/// NCCL's collectives run on the GPU: a rank waiting for a peer that never joins spins in a
/// kernel, and nothing on the host can interrupt it safely here (cudarc owns the raw
/// communicator). So `abort` only records why (and logs it), and
/// [`TensorParallelBackend`](crate::TensorParallelBackend) bounds its wait for ranks that do
/// not answer after a failure. `reset` succeeds: it is called only when every rank refused a
/// step alike before any collective, which leaves the ranks in lockstep.
#[derive(Debug, Default)]
pub struct NcclGroup {
    aborted: std::sync::Mutex<Option<String>>,
}

impl NcclGroup {
    /// A group that has not aborted.
    pub fn new() -> Self {
        Self::default()
    }

    /// The reason of the last abort, if any.
    pub fn aborted(&self) -> Option<String> {
        self.aborted.lock().ok().and_then(|a| a.clone())
    }
}

impl crate::GroupAbort for NcclGroup {
    fn abort(&self, reason: &str) {
        tracing::error!(reason, "tensor-parallel NCCL group aborted");
        if let Ok(mut a) = self.aborted.lock() {
            *a = Some(reason.to_owned());
        }
    }

    fn reset(&self) -> bool {
        if let Ok(mut a) = self.aborted.lock() {
            *a = None;
        }
        true
    }
}

const _: () = assert!(UNIQUE_ID_LEN == 128, "NCCL_UNIQUE_ID_BYTES is 128");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nccl_group_records_its_abort_and_resets() {
        use crate::GroupAbort;
        let g = NcclGroup::new();
        assert_eq!(g.aborted(), None);
        g.abort("rank 1 failed");
        assert_eq!(g.aborted().as_deref(), Some("rank 1 failed"));
        assert!(g.reset());
        assert_eq!(g.aborted(), None);
    }

    #[test]
    fn nvls_must_be_exactly_zero() {
        assert!(check_nvls_value(Some(OsStr::new("0"))).is_ok());
        for (value, found) in [
            (None, "unset"),
            (Some("1"), "\"1\""),
            (Some(""), "\"\""),
            (Some("00"), "\"00\""),
        ] {
            match check_nvls_value(value.map(OsStr::new)) {
                Err(DistError::NvlsNotDisabled { found: got }) => assert_eq!(got, found),
                other => panic!("{value:?}: {other:?}"),
            }
        }
    }
}
