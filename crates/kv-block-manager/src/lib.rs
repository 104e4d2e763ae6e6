//! Paged KV-cache block manager.
//!
//! The KV cache is split into fixed-size physical *blocks* of `block_size` token slots. Each
//! sequence has a *block table* that maps its logical blocks to physical ones, so a sequence's
//! cache need not be contiguous and memory is allocated on demand, one block at a time. This
//! crate owns that bookkeeping. It never touches KV data: it hands out slot numbers, block
//! tables and copy lists, which a backend (CPU or CUDA) executes.
//!
//! What it owns:
//! - **Block pool**: O(1) allocate / release, a reference count per block.
//! - **Block tables**: [`append_tokens`](BlockManager::append_tokens) and
//!   [`allocate_slots`](BlockManager::allocate_slots) allocate a block only when the last one is
//!   full and return the step's `slot_mapping`; [`block_table_matrix`](BlockManager::block_table_matrix)
//!   builds the padded `[num_seqs, max_blocks]` matrix and context lengths the kernels read.
//! - **Fork and copy-on-write**: [`fork`](BlockManager::fork) shares every block; the first write
//!   into a shared, partially filled last block copies it ([`CopyOp`]).
//! - **Automatic prefix caching**: full blocks are keyed by a chained hash of their tokens and
//!   verified on content, so a hash collision can never reuse a block with different tokens. A
//!   released cached block stays evictable in LRU order and is reused only when no free block is
//!   left.
//! - **Sliding window**: blocks whose tokens all fell out of the window are released, so a
//!   decoding sequence holds at most `ceil(W / block_size) + 1` blocks.
//! - **Preemption**: [`free`](BlockManager::free) for recompute, [`swap_out`](BlockManager::swap_out)
//!   / [`swap_in`](BlockManager::swap_in) to and from a CPU pool.
//! - **Rollback**: [`truncate`](BlockManager::truncate) drops rejected speculative tokens.
//!
//! It is pure, synchronous and deterministic: no GPU, no async, no global state (but a counter
//! that gives each block-table matrix a unique id); the same calls give the same blocks. Every
//! fallible call is atomic: on error the manager is unchanged.
//!
//! # Example
//!
//! ```
//! use kv_block_manager::{BlockManager, BlockManagerConfig, BlockTableMatrix, SeqId, StepSlots};
//!
//! let mut config = BlockManagerConfig::new(64);
//! config.block_size = 8;
//! let mut manager = BlockManager::new(config)?;
//! let mut step = StepSlots::default();
//!
//! // Prefill a 20-token prompt in one chunk.
//! let prompt: Vec<u32> = (0..20).collect();
//! let cached = manager.add_sequence(SeqId(1), &prompt, None)?;
//! assert_eq!(cached, 0);
//! manager.allocate_slots(SeqId(1), prompt.len() - cached, &mut step)?;
//! assert_eq!(step.slot_mapping.len(), 20);
//! // ... the backend writes K/V at those slots and runs the step, then:
//! manager.cache_full_blocks(SeqId(1))?;
//!
//! // A second request with the same prompt reuses the two full blocks (16 tokens).
//! assert_eq!(manager.add_sequence(SeqId(2), &prompt, None)?, 16);
//!
//! // Decode: one token per step.
//! step.clear();
//! manager.append_tokens(SeqId(1), &[42], &mut step)?;
//! let mut batch = BlockTableMatrix::default();
//! manager.block_table_matrix(&[SeqId(1)], None, &mut batch)?;
//! assert_eq!(batch.context_lens(), &[21]);
//!
//! manager.free(SeqId(1))?;
//! manager.free(SeqId(2))?;
//! manager.check_invariants()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod batch;
mod config;
mod error;
mod manager;
mod pool;
mod prefix;

use std::fmt;

pub use batch::{BlockTableMatrix, CopyOp, PAD_BLOCK, StepSlots};
pub use config::{BlockManagerConfig, DEFAULT_BLOCK_SIZE, SUPPORTED_BLOCK_SIZES};
pub use error::{BlockManagerError, InvariantViolation};
pub use manager::{AllocStatus, BlockManager, BlockManagerStats, MAX_SEQUENCE_LEN, PrefixMatch};

/// A physical block of a pool (GPU or CPU, as the context says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The block's index in its pool.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A sequence, chosen by the caller (the scheduler).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
