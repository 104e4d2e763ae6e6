//! The flat arrays the attention kernels consume.

use crate::{BlockId, SeqId};

/// Padding value of [`BlockTableMatrix::block_tables`]: entries past a sequence's last block, and
/// entries of blocks released by the sliding window. Kernels never read them; a negative value
/// makes a stray read fault loudly under compute-sanitizer instead of reading another sequence.
pub const PAD_BLOCK: i32 = -1;

/// A block copy the backend must execute before the step's forward pass.
///
/// For copy-on-write both blocks are GPU blocks; in the lists returned by
/// [`swap_out`](crate::BlockManager::swap_out) `src` is a GPU block and `dst` a CPU block, and the
/// other way round for [`swap_in`](crate::BlockManager::swap_in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CopyOp {
    /// Block to read.
    pub src: BlockId,
    /// Block to write.
    pub dst: BlockId,
}

/// What one step's KV writes need, filled by [`allocate_slots`](crate::BlockManager::allocate_slots)
/// and [`append_tokens`](crate::BlockManager::append_tokens). Reuse one across steps and
/// [`clear`](Self::clear) it, so a step allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepSlots {
    /// Physical slot (`block * block_size + offset`) of each new token, in the order the calls
    /// were made; the cache-write kernel stores token `i`'s K and V at `slot_mapping[i]`.
    pub slot_mapping: Vec<i64>,
    /// Copy-on-write copies to run before the cache writes.
    pub copies: Vec<CopyOp>,
}

impl StepSlots {
    /// Empties both lists, keeping their capacity.
    pub fn clear(&mut self) {
        self.slot_mapping.clear();
        self.copies.clear();
    }
}

/// A batch's block tables as one padded row-major `[num_seqs, max_blocks]` matrix, plus each
/// sequence's context length: the layout of vLLM's `block_tables` and `seq_lens` tensors.
///
/// Keep one across steps and refresh it with
/// [`update_block_table_matrix`](crate::BlockManager::update_block_table_matrix): rows that hold
/// the same sequence as last time are patched (new blocks, a copy-on-write swap, blocks the
/// window released) instead of rewritten, so a decode step costs O(batch), not O(batch x blocks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTableMatrix {
    max_blocks: usize,
    block_tables: Vec<i32>,
    context_lens: Vec<i32>,
    /// What each row held when it was last written.
    rows: Vec<RowState>,
    /// Identifies this matrix to the manager's per-sequence change tracking (0: never synced).
    id: u64,
}

/// The part of a sequence's table a row was last synced with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RowState {
    /// `None` for a row not written since the matrix was (re)shaped.
    pub(crate) seq: Option<SeqId>,
    /// Where the manager stored the sequence (a hint: checked before use).
    pub(crate) index: u32,
    /// Logical blocks in the table.
    pub(crate) len: usize,
    /// Leading blocks released by the sliding window.
    pub(crate) released: usize,
}

impl BlockTableMatrix {
    /// Rows (sequences).
    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }

    /// Columns: at least the widest table of the batch, or exactly the fixed width asked for.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// `num_seqs * max_blocks` physical block ids, row-major, [`PAD_BLOCK`] where there is none.
    pub fn block_tables(&self) -> &[i32] {
        &self.block_tables
    }

    /// Tokens with a KV slot, per sequence (including those written this step).
    pub fn context_lens(&self) -> &[i32] {
        &self.context_lens
    }

    /// The block-table row of sequence `i` of the batch.
    pub fn row(&self, i: usize) -> Option<&[i32]> {
        if i >= self.num_seqs() {
            return None;
        }
        self.block_tables
            .get(i * self.max_blocks..(i + 1) * self.max_blocks)
    }

    /// Resets the shape to `num_seqs` rows of `max_blocks` columns, keeping rows that stay
    /// valid (when the width is unchanged) and padding the rest.
    pub(crate) fn reshape(&mut self, num_seqs: usize, max_blocks: usize) {
        if max_blocks != self.max_blocks {
            self.block_tables.clear();
            self.rows.clear();
            self.max_blocks = max_blocks;
        }
        self.rows.resize(num_seqs, RowState::default());
        self.block_tables.resize(num_seqs * max_blocks, PAD_BLOCK);
        self.context_lens.resize(num_seqs, 0);
    }

    pub(crate) fn parts_mut(&mut self) -> (&mut [i32], &mut [i32], &mut [RowState]) {
        (
            &mut self.block_tables,
            &mut self.context_lens,
            &mut self.rows,
        )
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}
