//! The collectives a tensor-parallel forward pass needs, behind one trait, and its single-rank
//! implementation.

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::DistError;

/// The device collectives of one rank of a tensor-parallel group, on the model's bf16 buffers.
///
/// Every call is asynchronous: it is enqueued on the rank's stream (the one its buffers are
/// used on) and returns; work later on that stream sees the result. Every rank of the group
/// must make the same calls, in the same order, with the same lengths: a rank that skips one
/// leaves the others waiting inside NCCL. Lengths and roots are checked on the host before
/// anything is enqueued, so a bad call returns an error on every rank instead of corrupting
/// memory.
///
/// Not required to be `Sync`: one thread calls a rank's communicator at a time (NCCL
/// communicators are not thread-safe). Each rank builds its communicator on its own thread
/// ([`NcclCommunicator::run_local_ranks`](crate::NcclCommunicator::run_local_ranks) does):
/// `ncclCommInitRank` blocks until every rank has joined.
pub trait Communicator {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn world_size(&self) -> usize;

    /// Replaces `buf` on every rank with the element-wise sum of all ranks' `buf`.
    ///
    /// # Errors
    /// [`DistError::Nccl`] or [`DistError::Cuda`] when the collective cannot be enqueued.
    fn all_reduce_sum(&self, buf: &mut CudaSlice<bf16>) -> Result<(), DistError>;

    /// As [`all_reduce_sum`](Self::all_reduce_sum), on f32 values.
    ///
    /// # Errors
    /// As [`all_reduce_sum`](Self::all_reduce_sum).
    fn all_reduce_sum_f32(&self, buf: &mut CudaSlice<f32>) -> Result<(), DistError>;

    /// Gathers every rank's `send` into `recv`, rank-major: rank `r`'s `send` lands at
    /// `recv[r * send.len()..(r + 1) * send.len()]`.
    ///
    /// # Errors
    /// [`DistError::LengthMismatch`] when `recv.len() != world_size() * send.len()`;
    /// [`DistError::Nccl`] or [`DistError::Cuda`] when the collective cannot be enqueued.
    fn all_gather(
        &self,
        send: &CudaSlice<bf16>,
        recv: &mut CudaSlice<bf16>,
    ) -> Result<(), DistError>;

    /// Copies rank `root`'s `buf` into every other rank's `buf` (same length everywhere).
    ///
    /// # Errors
    /// [`DistError::RankOutOfRange`] when `root >= world_size()`; [`DistError::Nccl`] when the
    /// collective cannot be enqueued.
    fn broadcast(&self, buf: &mut CudaSlice<u8>, root: usize) -> Result<(), DistError>;
}

/// Checks an all-gather's lengths: `recv` holds `world_size` copies of `send`.
pub(crate) fn check_all_gather(
    send: usize,
    recv: usize,
    world_size: usize,
) -> Result<(), DistError> {
    let expected = send
        .checked_mul(world_size)
        .ok_or(DistError::LengthMismatch {
            op: "all_gather",
            buffer: "send",
            expected: usize::MAX / world_size.max(1),
            got: send,
        })?;
    if recv != expected {
        return Err(DistError::LengthMismatch {
            op: "all_gather",
            buffer: "recv",
            expected,
            got: recv,
        });
    }
    Ok(())
}

/// Checks that `root` names a rank.
pub(crate) fn check_root(
    op: &'static str,
    root: usize,
    world_size: usize,
) -> Result<(), DistError> {
    if root >= world_size {
        return Err(DistError::RankOutOfRange {
            op,
            what: "root",
            rank: root,
            world_size,
        });
    }
    Ok(())
}

/// The group of one: no other rank, no NCCL. All-reduce and broadcast leave the buffer as it
/// is; all-gather copies `send` into `recv` on `recv`'s stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalCommunicator;

impl LocalCommunicator {
    /// The single-rank communicator.
    pub fn new() -> Self {
        Self
    }
}

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut CudaSlice<bf16>) -> Result<(), DistError> {
        Ok(())
    }

    fn all_reduce_sum_f32(&self, _buf: &mut CudaSlice<f32>) -> Result<(), DistError> {
        Ok(())
    }

    fn all_gather(
        &self,
        send: &CudaSlice<bf16>,
        recv: &mut CudaSlice<bf16>,
    ) -> Result<(), DistError> {
        check_all_gather(send.len(), recv.len(), 1)?;
        if send.is_empty() {
            return Ok(());
        }
        let stream = recv.stream().clone();
        stream.memcpy_dtod(send, recv).map_err(|e| DistError::Cuda {
            what: "all_gather (device copy)",
            message: e.to_string(),
        })
    }

    fn broadcast(&self, _buf: &mut CudaSlice<u8>, root: usize) -> Result<(), DistError> {
        check_root("broadcast", root, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_gather_lengths() {
        assert!(check_all_gather(4, 8, 2).is_ok());
        assert!(check_all_gather(0, 0, 8).is_ok());
        for (send, recv, world) in [(4, 4, 2), (4, 9, 2), (4, 0, 1), (1, 3, 2)] {
            match check_all_gather(send, recv, world) {
                Err(DistError::LengthMismatch {
                    buffer: "recv",
                    expected,
                    got,
                    ..
                }) => assert_eq!((expected, got), (send * world, recv)),
                other => panic!("{send}/{recv}/{world}: {other:?}"),
            }
        }
        // No overflow when send × world_size does not fit.
        assert!(matches!(
            check_all_gather(usize::MAX, 0, 2),
            Err(DistError::LengthMismatch { buffer: "send", .. })
        ));
    }

    #[test]
    fn roots_must_name_a_rank() {
        assert!(check_root("broadcast", 1, 2).is_ok());
        let err = check_root("broadcast", 2, 2).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("broadcast: `root` is 2, but the world has 2 ranks")
        );
    }

    #[test]
    fn the_local_communicator_is_a_world_of_one() {
        let comm = LocalCommunicator::new();
        assert_eq!((comm.rank(), comm.world_size()), (0, 1));
        // Usable from any thread, and as a trait object.
        let boxed: Box<dyn Communicator + Send + Sync> = Box::new(comm);
        assert_eq!(boxed.world_size(), 1);
    }
}
