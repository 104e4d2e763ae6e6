//! The collective operations a tensor-parallel forward pass needs, as a trait the model runs
//! over without knowing the transport: the `dist` crate implements it (`dist::ThreadGroup`, for
//! ranks that are threads of one process), and [`SingleRank`] is the group of one.
//!
//! # The invariant
//!
//! A collective is entered by every rank of the group, so every rank must call the same
//! operations in the same order with the same lengths. The sharded CPU forward keeps it by
//! construction: the sequence of calls depends only on the batch and the model configuration,
//! which are the same on every rank (the construction handshake of
//! [`CpuBackend::new_sharded`](crate::CpuBackend::new_sharded) checks the configuration). One
//! forward pass over `t` tokens with `n` logits rows calls, in this order:
//!
//! 1. `all_reduce_sum` of `t * hidden_size` values (the vocab-parallel embedding);
//! 2. per layer, `all_reduce_sum` of `t * hidden_size` (after the output projection), then
//!    `all_reduce_sum` of `t * hidden_size` (after the down projection);
//! 3. `all_gather` of `n * ceil(vocab_size / world_size)` values (the vocab-parallel LM head;
//!    a group of one skips it, as it would only copy the logits).
//!
//! Every error a forward pass can return before or between these calls (a bad batch, a cache
//! write) is a function of that same batch and configuration, so ranks fail together and none
//! is left waiting in a collective. A collective that fails must fail on every rank (or the
//! implementation must abort the group so that waiting ranks return an error instead of
//! hanging).

use half::bf16;
use kernels_cuda::cudarc::driver::CudaSlice;

pub use crate::cpu::HANDSHAKE_VALUES;
use crate::error::ModelError;
use crate::weights::Shard;

/// Sum and gather over the ranks of a tensor-parallel group, on host `f32` buffers.
///
/// Implementations must give every rank bit-identical results (each rank keeps its own copy
/// of the residual stream, which must not drift apart), and must check lengths they can see:
/// a call with mismatched lengths across ranks is an error, never a silent truncation.
pub trait HostCollective: Send + Sync {
    /// Which rank this member is, and the group's size.
    fn shard(&self) -> Shard;

    /// Replaces `x`, on every rank, by the element-wise sum of every rank's `x`.
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), ModelError>;

    /// Sets `out` to every rank's `local`, concatenated in rank order (`world_size *
    /// local.len()` values); every rank passes the same length.
    fn all_gather(&self, local: &[f32], out: &mut Vec<f32>) -> Result<(), ModelError>;
}

/// The group of one rank: the sum is the input, the gather a copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl HostCollective for SingleRank {
    fn shard(&self) -> Shard {
        Shard::FULL
    }

    fn all_reduce_sum(&self, _x: &mut [f32]) -> Result<(), ModelError> {
        Ok(())
    }

    fn all_gather(&self, local: &[f32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        out.clear();
        out.extend_from_slice(local);
        Ok(())
    }
}

/// Sum and gather over the ranks of a tensor-parallel group, on device buffers: what the
/// sharded [`CudaBackend`](crate::CudaBackend) calls. `dist` implements it over NCCL (one GPU
/// per rank) and over any [`HostCollective`] (ranks sharing a GPU, by host copies).
///
/// Calls are enqueued on the stream of the backend's GPU (or complete before returning): work
/// enqueued after a call on that stream sees its result. The order invariant is that of the
/// host collectives (the module's documentation), for the CUDA forward pass: one
/// `all_reduce_sum_f32` of `t * hidden_size` values (the embedding), per layer two
/// `all_reduce_sum` of `t * hidden_size` bf16 values (after the O and the down products), and
/// one `all_gather` of `n * ceil(vocab_size / world_size)` values (the LM head) when a step
/// wants logits.
///
/// `Send` (a backend moves to the thread that runs it) but not required to be `Sync`: one
/// thread calls it at a time.
pub trait DeviceCollective: Send {
    /// Which rank this member is, and the group's size.
    fn shard(&self) -> Shard;

    /// Replaces `x`, on every rank, by the element-wise sum of every rank's `x` (bf16: the
    /// partial outputs of row-parallel products).
    ///
    /// # Errors
    /// [`ModelError::Collective`] when the transport fails.
    fn all_reduce_sum(&self, x: &mut CudaSlice<bf16>) -> Result<(), ModelError>;

    /// As [`all_reduce_sum`](Self::all_reduce_sum), on f32 values (the residual stream).
    ///
    /// # Errors
    /// [`ModelError::Collective`] when the transport fails.
    fn all_reduce_sum_f32(&self, x: &mut CudaSlice<f32>) -> Result<(), ModelError>;

    /// Sets `out` to every rank's `local`, concatenated in rank order: `out.len()` must be
    /// `world_size * local.len()`.
    ///
    /// # Errors
    /// [`ModelError::Collective`] for mismatched lengths or when the transport fails.
    fn all_gather(
        &self,
        local: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
    ) -> Result<(), ModelError>;
}

#[cfg(test)]
pub(crate) mod thread_group;
