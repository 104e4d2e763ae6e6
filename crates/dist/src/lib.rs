//! Tensor parallelism of kvserve: the pieces that let one model run over several GPUs and
//! hosts, with NCCL (through cudarc) as the only transport for tensors.
//!
//! * [`DistConfig`]: how many GPUs (`tensor_parallel_size`) over how many nodes, which node
//!   this is, where the nodes meet; [`DistConfig::validate`] names the bad field. GPU `i` of
//!   node `n` is world rank `n * gpus_per_node + i`.
//! * [`Rendezvous`]: node 0 hands its NCCL unique id to the other nodes over TCP (std only,
//!   length-prefixed frames, every read bounded); each node's hello is checked against node 0's
//!   settings, and a mismatch fails loudly on both sides. [`bootstrap_unique_id`] does the
//!   whole exchange for a config.
//! * [`Communicator`]: all-reduce (sum), all-gather and broadcast on device buffers, lengths
//!   checked before NCCL is called. [`NcclCommunicator`] is one NCCL rank;
//!   [`LocalCommunicator`] the world of one. [`NcclCommunicator::run_local_ranks`] starts one
//!   thread per local GPU, each with its communicator.
//! * [`ThreadGroup`]: the `model::HostCollective` for ranks that are threads of one process
//!   (sums in rank order, bit-identical on every rank; abort, reset and an optional timeout).
//! * [`TensorParallelBackend`]: one `model::Backend` over N rank threads, each building and
//!   owning its sharded backend; one scheduler sends every step to all ranks and gets rank
//!   0's result; a rank that fails out of lockstep makes the backend dead
//!   (`ModelError::Unrecoverable`) instead of hanging it, even when its peers are stuck in a
//!   collective that cannot be aborted (given up after a grace period, optionally a step
//!   timeout).
//! * Several nodes: node 0's scheduler drives the ranks of the other hosts over the
//!   rendezvous connections, kept open ([`RendezvousHost::serve_keep`],
//!   [`Rendezvous::join_keep`]). [`TensorParallelBackend::spawn_multi_node`] runs node 0's
//!   ranks and a proxy per other node that sends it each step's plan (the batch, sampling
//!   rows, block copies: length-prefixed little-endian frames of at most [`MAX_STEP_FRAME`]
//!   bytes, every length checked before anything is allocated) and reads its one answer per
//!   step; [`serve_remote_ranks`] runs a node's ranks for it. Tensors never take this path:
//!   the ranks' collectives are NCCL across hosts (the CPU tests share one in-process
//!   [`ThreadGroup`] instead).
//!
//! **Never panics without NCCL or a GPU.** cudarc loads libnccl and libcuda at run time and
//! panics on the first call when one is missing; every NCCL entry point here first checks
//! [`nccl_available`], the driver library and `NCCL_NVLS_ENABLE=0` ([`check_nvls_disabled`]:
//! NVLink multicast must stay off), and returns a [`DistError`] instead. The crate builds and
//! its host-side logic is tested on a machine with neither; GPU tests are `#[ignore]`d.
//!
//! ```no_run
//! use std::time::Duration;
//! use dist::{Communicator, DistConfig, NcclCommunicator};
//!
//! # fn main() -> Result<(), dist::DistError> {
//! // Node 1 of 2, 8 GPUs in all; node 0 listens on node0:29500.
//! let config = DistConfig::multi_node(8, 2, 1, "node0:29500");
//! let id = dist::bootstrap_unique_id(&config, Duration::from_secs(60), NcclCommunicator::unique_id)?;
//! let ranks = NcclCommunicator::run_local_ranks(&config, &id, |gpu, comm| {
//!     let mut x = gpu.stream().alloc_zeros::<half::bf16>(4096).map_err(|e| e.to_string())?;
//!     comm.all_reduce_sum(&mut x).map_err(|e| e.to_string())?;
//!     Ok::<usize, String>(comm.rank())
//! })?;
//! assert_eq!(ranks.len(), 4);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod comm;
mod config;
mod device;
mod error;
mod gate;
mod nccl;
mod remote;
mod rendezvous;
mod step_wire;
mod tensor_parallel;
mod thread_group;

pub use comm::{Communicator, LocalCommunicator};
pub use config::{DistConfig, MAX_WORLD_SIZE};
pub use device::{CommCollective, StagedCollective};
pub use error::DistError;
pub use gate::StartGate;
pub use nccl::{
    NVLS_ENV, NcclCommunicator, NcclGroup, check_nvls_disabled, local_gpu_count, nccl_available,
};
pub use remote::serve_remote_ranks;
pub use rendezvous::{
    MAGIC, MAX_FRAME, PROTOCOL_VERSION, Rendezvous, RendezvousHost, UNIQUE_ID_LEN, UniqueId,
    bootstrap_unique_id,
};
pub use step_wire::MAX_STEP_FRAME;
pub use tensor_parallel::{GroupAbort, TensorParallelBackend};
pub use thread_group::ThreadGroup;
