use thiserror::Error;

/// Errors of the CUDA kernels and their launchers.
#[derive(Debug, Error)]
pub enum KernelError {
    /// No usable CUDA device: the driver library is missing, or no device answers.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// NVRTC (the run-time compiler) cannot be loaded.
    #[error("NVRTC is not available: {0}")]
    NoCompiler(String),
    /// The CUDA headers NVRTC needs (cuda_fp16.h, ...) were not found.
    #[error(
        "CUDA headers not found (searched {searched}); set KVSERVE_CUDA_INCLUDE to the folder \
         holding cuda_fp16.h"
    )]
    NoHeaders {
        /// The folders searched.
        searched: String,
    },
    /// A kernel failed to compile.
    #[error("compiling {kernel} ({options}) failed: {log}")]
    Compile {
        /// The kernel source and variant.
        kernel: String,
        /// The compiler options.
        options: String,
        /// NVRTC's log.
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(String),
    /// A launcher was given arguments that do not fit the kernel (checked before launching).
    #[error("bad argument to {kernel}: {reason}")]
    BadArgument {
        /// The kernel.
        kernel: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A combination the kernels do not implement (e.g. head_dim 96).
    #[error("{kernel} does not support {what}")]
    Unsupported {
        /// The kernel.
        kernel: &'static str,
        /// The unsupported parameter.
        what: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

pub(crate) fn bad(kernel: &'static str, reason: impl Into<String>) -> KernelError {
    KernelError::BadArgument {
        kernel,
        reason: reason.into(),
    }
}
