//! kvserve's CUDA kernels and their launchers: paged decode attention over the paged,
//! optionally quantized KV cache (split-KV, GQA-aware, sliding window, dequantization fused),
//! prefill / chunked-prefill attention over the same cache on tensor cores, the quantizing
//! cache write, and the per-token layers of a Llama step (embedding gather,
//! RMSNorm fused with the residual add, RoPE, SiLU·up), and logits processing with sampling.
//!
//! * **No CUDA at build time.** cudarc loads the driver and NVRTC at run time; the kernel
//!   sources (`kernels/*.cu`, embedded) are compiled by NVRTC for the device's architecture
//!   on first use and cached on disk ([`compile`] says why). The crate builds and its
//!   host-side checks are tested on a machine with no GPU.
//! * **Never panics without a GPU.** [`Gpu::new`] probes for the driver library before
//!   cudarc touches it and returns [`KernelError::NoDevice`].
//! * **Checked launches.** Every launcher validates shapes, lengths, block tables and slots
//!   on the host and returns [`KernelError::BadArgument`] before its single `unsafe` launch.
//! * **One layout.** Blocks are laid out as `kv-quant` says (`kernels/kv_layout.cuh` is
//!   generated from it); kv-quant's CPU codecs are the reference the GPU tests compare with.
//!
//! GPU tests are `#[ignore]`d (they need a device): run them on the GPU machine with
//! `--include-ignored`.

pub mod compile;

mod attention;
mod cache;
mod device;
mod error;
mod ffi;
mod gemm;
mod gemv;
pub mod graph;
mod indices;
mod launch;
mod layers;
mod prefill;
mod sampling;
mod staging;

pub use attention::{
    ActScalar, DecodeKernel, DecodeMetadata, DecodePlan, NewTokens, PagedDecoder, fixed_parts_for,
};
pub use cache::{BlockCopies, LayerCache, Rotary, copy_blocks, reshape_and_cache, rope_and_cache};
pub use compile::{Program, Scalar, Variant};
pub use device::{Gpu, Preloaded, driver_available, nccl_available};
pub use error::{KernelError, Result};
pub use gemm::Blas;
pub use gemv::{
    GEMV_MAX_TOKENS, GEMV_TC_MIN_TOKENS, GemvEpilogue, GemvInput, GemvOut, NormInput, NormPartials,
    gemv, gemv_silu_mul, gemv_silu_mul_with, gemv_uses_tensor_cores, gemv_with,
};
pub use indices::{Index, Indices};
pub use layers::{
    RopeShape, VocabRows, add_bias, embedding_gather, embedding_gather_rows, fill_uniform,
    gather_rows, rms_norm, rope, silu_mul, split_qkv, unshard_vocab,
};
pub use prefill::{PrefillBatch, PrefillMetadata, paged_prefill};
pub use sampling::{MAX_SAMPLING_VOCAB, RowSampling, sample_rows};
pub use staging::StepStaging;

/// Re-exported so callers allocate device buffers with the same cudarc.
pub use cudarc;
