//! The crate's top-level error type.

use crate::config::ConfigError;

/// Everything that can go wrong when loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The model configuration is missing a key or is inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A required tensor is not in the weights file.
    #[error("tensor `{name}` is missing from the weights")]
    MissingTensor {
        /// The tensor's name.
        name: String,
    },
    /// A tensor has the wrong type, shape or size.
    #[error("tensor `{name}`: {reason}")]
    BadTensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A forward batch is inconsistent (lengths, slots, block ids, positions).
    #[error("invalid forward batch: `{field}` {reason}")]
    InvalidBatch {
        /// The offending field of the batch.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Tensor-parallel parts that do not fit together: a shard and its collective, or ranks
    /// whose configurations differ.
    #[error("tensor-parallel mismatch: {what}: expected {expected}, got {got}")]
    ShardMismatch {
        /// What was compared.
        what: String,
        /// The value this rank expected.
        expected: String,
        /// The value found.
        got: String,
    },
    /// A collective operation of a tensor-parallel group failed (a transport error, a peer
    /// that died, mismatched lengths across ranks).
    #[error("collective `{operation}` failed: {reason}")]
    Collective {
        /// The operation (`all_reduce_sum`, `all_gather`).
        operation: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The backend cannot run any step any more (a tensor-parallel rank died or the ranks
    /// fell out of lockstep); every later call fails the same way. The engine treats it as
    /// fatal, unlike a failed step.
    #[error("the backend cannot run any more: {0}")]
    Unrecoverable(String),
    /// A setting the backend does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An error of the KV-cache format.
    #[error(transparent)]
    KvQuant(#[from] kv_quant::KvQuantError),
    /// A malformed or unsupported GGUF file.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// A malformed or unsupported safetensors directory.
    #[error(transparent)]
    Safetensors(#[from] crate::safetensors::SafetensorsError),
    /// The default model could not be fetched.
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    /// A tokenizer or chat-template error.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// An error of the block manager (in `generate`).
    #[error(transparent)]
    Blocks(#[from] kv_block_manager::BlockManagerError),

    /// The CUDA device or one of its kernels failed.
    #[error(transparent)]
    Cuda(#[from] kernels_cuda::KernelError),
}
