//! The crate's error type.

use crate::{BlockId, SeqId};

/// Everything that can go wrong in a [`BlockManager`](crate::BlockManager) call.
///
/// Every fallible call is atomic: when it returns an error, the manager's state is exactly what it
/// was before the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlockManagerError {
    /// A configuration field is out of range.
    #[error("invalid block manager config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field of [`BlockManagerConfig`](crate::BlockManagerConfig).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The sequence id is not known (never added, or already freed).
    #[error("unknown sequence {seq}")]
    UnknownSequence {
        /// The sequence asked for.
        seq: SeqId,
    },
    /// A sequence with this id already exists.
    #[error("sequence {seq} already exists")]
    DuplicateSequence {
        /// The id that is taken.
        seq: SeqId,
    },
    /// A sequence must start with at least one token.
    #[error("sequence {seq}: the prompt is empty")]
    EmptyPrompt {
        /// The sequence being added.
        seq: SeqId,
    },
    /// The sequence would grow past the longest length the kernels can index (`i32::MAX` tokens).
    #[error("sequence {seq}: length {requested} exceeds the maximum of {max} tokens")]
    SequenceTooLong {
        /// The sequence.
        seq: SeqId,
        /// The length it would reach.
        requested: usize,
        /// The maximum.
        max: usize,
    },
    /// Not enough GPU blocks, even after evicting every cached block.
    #[error("out of KV blocks: {needed} needed, {free} free")]
    OutOfBlocks {
        /// Blocks the operation needs.
        needed: usize,
        /// Blocks that could be allocated (free plus evictable).
        free: usize,
    },
    /// Not enough CPU (swap) blocks.
    #[error("out of CPU swap blocks: {needed} needed, {free} free")]
    OutOfCpuBlocks {
        /// Blocks the operation needs.
        needed: usize,
        /// Free CPU blocks.
        free: usize,
    },
    /// `allocate_slots` asked for more tokens than the sequence has waiting for a slot.
    #[error("sequence {seq}: {requested} slots requested but only {pending} tokens are pending")]
    NotEnoughPendingTokens {
        /// The sequence.
        seq: SeqId,
        /// Slots asked for.
        requested: usize,
        /// Tokens known but without a slot yet.
        pending: usize,
    },
    /// `append_tokens` was called while prompt tokens still wait for their slots.
    #[error("sequence {seq}: {pending} prompt tokens still need slots; allocate them first")]
    PrefillIncomplete {
        /// The sequence.
        seq: SeqId,
        /// Tokens known but without a slot yet.
        pending: usize,
    },
    /// The operation needs the sequence's blocks on the GPU, but it is swapped out.
    #[error("sequence {seq} is swapped out to the CPU")]
    SwappedOut {
        /// The sequence.
        seq: SeqId,
    },
    /// `swap_in` was called on a sequence that is on the GPU.
    #[error("sequence {seq} is not swapped out")]
    NotSwappedOut {
        /// The sequence.
        seq: SeqId,
    },
    /// The same sequence appears twice in one batch operation.
    #[error("sequence {seq} appears more than once in the batch")]
    DuplicateInBatch {
        /// The repeated sequence.
        seq: SeqId,
    },
    /// `truncate` to a length the sequence cannot go back to.
    #[error("sequence {seq}: cannot truncate to {requested} tokens ({reason})")]
    InvalidTruncate {
        /// The sequence.
        seq: SeqId,
        /// The length asked for.
        requested: usize,
        /// Why it is refused.
        reason: String,
    },
    /// A block id outside the pool.
    #[error("block {block} does not exist (the pool has {num_blocks} blocks)")]
    UnknownBlock {
        /// The block asked for.
        block: BlockId,
        /// Size of the pool.
        num_blocks: usize,
    },
    /// A fixed-width block-table matrix is too narrow for a sequence of the batch.
    #[error("sequence {seq} needs {needed} block-table columns but max_blocks is {max_blocks}")]
    TableTooWide {
        /// The sequence.
        seq: SeqId,
        /// Columns it needs.
        needed: usize,
        /// The fixed width asked for.
        max_blocks: usize,
    },
}

/// A broken internal invariant, reported by [`BlockManager::check_invariants`](crate::BlockManager::check_invariants).
///
/// Seeing one is always a bug in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block manager invariant violated: {0}")]
pub struct InvariantViolation(pub String);
