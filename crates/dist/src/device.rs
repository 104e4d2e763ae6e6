//! The group's collectives as the sharded CUDA backend calls them
//! ([`model::DeviceCollective`]): over a [`Communicator`] (NCCL, one GPU per rank), or staged
//! through host memory over a [`HostCollective`] (ranks that share one GPU, where NCCL refuses
//! to run: tests of the sharded forward on a one-GPU machine).

use half::bf16;
use std::sync::Arc;

use kernels_cuda::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use model::{DeviceCollective, HostCollective, ModelError, Shard};

use crate::{Communicator, DistError};

fn collective_error(operation: &'static str) -> impl Fn(DistError) -> ModelError {
    move |e| ModelError::Collective {
        operation,
        reason: e.to_string(),
    }
}

/// A [`Communicator`] (NCCL, or the world of one) as the [`DeviceCollective`] of a sharded
/// CUDA backend.
#[derive(Debug)]
pub struct CommCollective<C> {
    comm: C,
}

impl<C: Communicator> CommCollective<C> {
    /// Wraps `comm`.
    pub fn new(comm: C) -> Self {
        Self { comm }
    }

    /// The communicator.
    pub fn comm(&self) -> &C {
        &self.comm
    }
}

impl CommCollective<crate::NcclCommunicator> {
    /// Joins the NCCL group `id` as `rank` of `world_size` on `gpu`'s stream (blocking until
    /// every rank has joined, as [`NcclCommunicator::from_gpu`](crate::NcclCommunicator::from_gpu)):
    /// the collective of one rank of a sharded CUDA backend.
    ///
    /// # Errors
    /// [`ModelError::Collective`] (`ncclCommInitRank`) with the reason NCCL could not start.
    pub fn join_nccl(
        gpu: &kernels_cuda::Gpu,
        rank: usize,
        world_size: usize,
        id: &crate::UniqueId,
    ) -> Result<Self, ModelError> {
        crate::NcclCommunicator::from_gpu(gpu, rank, world_size, id)
            .map(Self::new)
            .map_err(collective_error("ncclCommInitRank"))
    }
}

impl<C: Communicator + Send> DeviceCollective for CommCollective<C> {
    fn shard(&self) -> Shard {
        Shard {
            rank: self.comm.rank(),
            world_size: self.comm.world_size(),
        }
    }

    fn all_reduce_sum(&self, x: &mut CudaSlice<bf16>) -> Result<(), ModelError> {
        self.comm
            .all_reduce_sum(x)
            .map_err(collective_error("all_reduce_sum"))
    }

    fn all_reduce_sum_f32(&self, x: &mut CudaSlice<f32>) -> Result<(), ModelError> {
        self.comm
            .all_reduce_sum_f32(x)
            .map_err(collective_error("all_reduce_sum"))
    }

    fn all_gather(
        &self,
        local: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
    ) -> Result<(), ModelError> {
        self.comm
            .all_gather(local, out)
            .map_err(collective_error("all_gather"))
    }
}

/// A [`HostCollective`] (e.g. [`ThreadGroup`](crate::ThreadGroup)) as a [`DeviceCollective`]:
/// each call copies the buffer to the host (waiting for the stream), runs the host collective
/// on f32 values and copies the result back. Slow, but it runs ranks that share one GPU, which
/// NCCL refuses; bf16 values are summed in f32 and rounded once, as NCCL's reduction does.
#[derive(Debug)]
pub struct StagedCollective<H> {
    host: H,
    stream: Arc<CudaStream>,
}

impl<H: HostCollective> StagedCollective<H> {
    /// The member `host` of a host group, for buffers used on `stream` (the rank's GPU's).
    pub fn new(host: H, stream: Arc<CudaStream>) -> Self {
        Self { host, stream }
    }

    /// Copies `x` to the host (once the stream's work on it is done) as f32 and returns `f`
    /// of it.
    fn staged<T: DeviceRepr + Copy>(
        &self,
        operation: &'static str,
        x: &CudaSlice<T>,
        to_f32: impl Fn(T) -> f32,
        f: impl FnOnce(&[f32]) -> Result<Vec<f32>, ModelError>,
    ) -> Result<Vec<f32>, ModelError> {
        let cuda = |e: kernels_cuda::cudarc::driver::DriverError| ModelError::Collective {
            operation,
            reason: format!("staging through the host: {e}"),
        };
        let host: Vec<f32> = self
            .stream
            .clone_dtoh(x)
            .map_err(cuda)?
            .into_iter()
            .map(to_f32)
            .collect();
        f(&host)
    }

    fn upload<T: DeviceRepr>(
        &self,
        operation: &'static str,
        values: &[T],
        out: &mut CudaSlice<T>,
    ) -> Result<(), ModelError> {
        if values.len() != out.len() {
            return Err(ModelError::Collective {
                operation,
                reason: format!("{} values for a buffer of {}", values.len(), out.len()),
            });
        }
        self.stream
            .memcpy_htod(values, out)
            .map_err(|e| ModelError::Collective {
                operation,
                reason: format!("staging through the host: {e}"),
            })
    }
}

impl<H: HostCollective> DeviceCollective for StagedCollective<H> {
    fn shard(&self) -> Shard {
        self.host.shard()
    }

    fn all_reduce_sum(&self, x: &mut CudaSlice<bf16>) -> Result<(), ModelError> {
        let sum = self.staged("all_reduce_sum", x, bf16::to_f32, |v| {
            let mut v = v.to_vec();
            self.host.all_reduce_sum(&mut v)?;
            Ok(v)
        })?;
        let sum: Vec<bf16> = sum.into_iter().map(bf16::from_f32).collect();
        self.upload("all_reduce_sum", &sum, x)
    }

    fn all_reduce_sum_f32(&self, x: &mut CudaSlice<f32>) -> Result<(), ModelError> {
        let sum = self.staged(
            "all_reduce_sum",
            x,
            |v| v,
            |v| {
                let mut v = v.to_vec();
                self.host.all_reduce_sum(&mut v)?;
                Ok(v)
            },
        )?;
        self.upload("all_reduce_sum", &sum, x)
    }

    fn all_gather(
        &self,
        local: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
    ) -> Result<(), ModelError> {
        let all = self.staged("all_gather", local, bf16::to_f32, |v| {
            let mut all = Vec::new();
            self.host.all_gather(v, &mut all)?;
            Ok(all)
        })?;
        let all: Vec<bf16> = all.into_iter().map(bf16::from_f32).collect();
        self.upload("all_gather", &all, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalCommunicator;

    #[test]
    fn a_communicator_collective_reports_its_rank() {
        let c = CommCollective::new(LocalCommunicator::new());
        assert_eq!(c.shard(), Shard::FULL);
        assert_eq!(c.comm().world_size(), 1);
        // A backend owns it boxed, moved to the rank's thread.
        let boxed: Box<dyn DeviceCollective> = Box::new(c);
        assert_eq!(
            std::thread::spawn(move || boxed.shard()).join().ok(),
            Some(Shard::FULL)
        );
    }

    #[test]
    fn collective_errors_name_the_operation() {
        let e = collective_error("all_gather")(DistError::LengthMismatch {
            op: "all_gather",
            buffer: "recv",
            expected: 8,
            got: 4,
        });
        let text = e.to_string();
        assert!(matches!(
            e,
            ModelError::Collective {
                operation: "all_gather",
                ..
            }
        ));
        assert!(text.contains("recv") && text.contains('8'), "{text}");
    }
}
