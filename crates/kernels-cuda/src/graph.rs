//! CUDA graphs of the device's stream: capture a sequence of launches once, replay it with one
//! driver call. A replay runs the captured kernels with the arguments they were captured with
//! (the same buffers, the same grids): the caller keeps every buffer alive and in place, and
//! changes only their contents (e.g. through a [`crate::StepStaging`]).
#![allow(unsafe_code)]

use cudarc::driver::{CudaGraph, sys};

use crate::device::Gpu;
use crate::error::Result;

/// A captured, instantiated graph.
pub struct StepGraph(CudaGraph);

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGraph").finish_non_exhaustive()
    }
}

// SAFETY: CUDA graph objects may be used from any thread as long as calls on one graph are
// serialized (CUDA's graph thread-safety rules); a StepGraph is only used through `&self`
// methods of an owner that is itself moved between threads, never shared (it is not Sync).
unsafe impl Send for StepGraph {}

impl StepGraph {
    /// Queues a replay on the device's stream.
    ///
    /// # Errors
    /// Driver errors.
    pub fn launch(&self) -> Result<()> {
        Ok(self.0.launch()?)
    }
}

/// Starts capturing the device's stream (this thread's launches on it are recorded, not run;
/// allocations and synchronizations on this thread fail until [`end_capture`]).
///
/// # Errors
/// Driver errors (a stream already capturing, ...).
pub fn begin_capture(gpu: &Gpu) -> Result<()> {
    Ok(gpu
        .stream()
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?)
}

/// Ends the capture begun by [`begin_capture`] and instantiates the graph (`None`: nothing
/// was captured). Call it even when a launch failed during the capture: the stream is
/// unusable until then.
///
/// # Errors
/// Driver errors (an operation that invalidated the capture, ...).
pub fn end_capture(gpu: &Gpu) -> Result<Option<StepGraph>> {
    let g = gpu.stream().end_capture(sys::CUgraphInstantiate_flags(0))?;
    Ok(g.map(StepGraph))
}
