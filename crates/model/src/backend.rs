//! The interface between the engine and a device: one forward pass over a mixed batch, and
//! the block copies the block manager asks for.

use kv_block_manager::CopyOp;

use crate::ModelConfig;
use crate::error::ModelError;

/// One step's work, flattened: prefill chunks and decode tokens of many sequences together.
///
/// Tokens of sequence `s` are `seq_starts[s]..seq_starts[s + 1]`; each has a position in its
/// sequence and a KV slot (from the block manager's `slot_mapping`). The new K/V of every
/// token is written to its slot before attention, so a token attends to the cached prefix and
/// to the tokens before it in the same chunk (causal).
#[derive(Debug, Clone, Copy)]
pub struct ForwardBatch<'a> {
    /// Input token of each flattened position.
    pub token_ids: &'a [u32],
    /// Position of each token in its sequence.
    pub positions: &'a [u32],
    /// KV slot (`block * block_size + offset`) of each token.
    pub slot_mapping: &'a [i64],
    /// `num_seqs + 1` offsets into the tokens, from 0 to `token_ids.len()`.
    pub seq_starts: &'a [u32],
    /// `[num_seqs, max_blocks]` block tables, row-major; -1 pads.
    pub block_tables: &'a [i32],
    /// Columns of `block_tables`.
    pub max_blocks: usize,
    /// Per sequence: tokens with KV once this step's are written.
    pub context_lens: &'a [i32],
    /// Tokens whose next-token logits are wanted (usually the last of each sequence).
    pub logits_indices: &'a [u32],
}

impl ForwardBatch<'_> {
    /// Number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.seq_starts.len().saturating_sub(1)
    }
}

/// The shape of the paged KV cache a backend holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// GPU (device) blocks.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Storage format of K and V.
    pub dtype: kv_quant::KvCacheDtype,
    /// Host blocks for swapping.
    pub num_cpu_blocks: usize,
}

/// A device that runs the model: the CPU now, CUDA later. The engine does not care which.
pub trait Backend: Send {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// The KV cache's shape.
    fn kv_cache_config(&self) -> KvCacheConfig;

    /// Runs one step: writes the batch's K/V into the cache, and fills `logits` with
    /// `[logits_indices.len(), vocab_size]` next-token logits. A batch that does not fit the
    /// model or the cache is rejected before anything is written.
    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError>;

    /// Copies device blocks (copy-on-write), before the next forward.
    fn copy_blocks(&mut self, copies: &[CopyOp]) -> Result<(), ModelError>;

    /// Copies device blocks to host blocks (`src` device, `dst` host).
    fn swap_out(&mut self, copies: &[CopyOp]) -> Result<(), ModelError>;

    /// Copies host blocks to device blocks (`src` host, `dst` device).
    fn swap_in(&mut self, copies: &[CopyOp]) -> Result<(), ModelError>;
}
