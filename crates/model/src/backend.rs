//! The interface between the engine and a device: one forward pass over a mixed batch, and
//! the block copies the block manager asks for.

use kv_block_manager::CopyOp;

use crate::ModelConfig;
use crate::error::ModelError;
pub use kernels_cuda::RowSampling;

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

    /// Where it runs, for logs and model info: "cpu", or e.g. "cuda (NVIDIA H200)".
    fn device(&self) -> String {
        "cpu".into()
    }

    /// Runs one step: writes the batch's K/V into the cache, and fills `logits` with
    /// `[logits_indices.len(), vocab_size]` next-token logits. A batch that does not fit the
    /// model or the cache is rejected before anything is written.
    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError>;

    /// Whether [`Backend::forward_sampled`] samples on the device; otherwise the caller
    /// samples from [`Backend::forward`]'s logits.
    fn samples_on_device(&self) -> bool {
        false
    }

    /// Runs one step as [`Backend::forward`] does, then draws one token per logits row on
    /// the device (`rows[i]` says how for row `i` of `logits_indices`; ids at or past
    /// `sample_vocab` are never drawn), so only the tokens leave the device. `None` for a row
    /// without a finite logit. Backends that cannot ([`Backend::samples_on_device`] false)
    /// refuse with [`ModelError::Unsupported`].
    fn forward_sampled(
        &mut self,
        batch: &ForwardBatch<'_>,
        rows: &[RowSampling<'_>],
        sample_vocab: usize,
        tokens: &mut Vec<Option<u32>>,
    ) -> Result<(), ModelError> {
        let _ = (batch, rows, sample_vocab, tokens);
        Err(ModelError::Unsupported(
            "sampling on the device (this backend returns logits)".into(),
        ))
    }

    /// Copies device blocks (copy-on-write), before the next forward.
    fn copy_blocks(&mut self, copies: &[CopyOp]) -> Result<(), ModelError>;

    /// Copies device blocks to host blocks (`src` device, `dst` host).
    fn swap_out(&mut self, copies: &[CopyOp]) -> Result<(), ModelError>;

    /// Copies host blocks to device blocks (`src` host, `dst` device).
    fn swap_in(&mut self, copies: &[CopyOp]) -> Result<(), ModelError>;
}

/// The block layout of a backend's cache for the heads it holds; a cache of no blocks is
/// refused.
pub(crate) fn cache_layout(
    c: &ModelConfig,
    local: &crate::LocalShape,
    cache: &KvCacheConfig,
) -> Result<kv_quant::BlockLayout, ModelError> {
    let layout = kv_quant::BlockLayout::new(
        cache.dtype,
        cache.block_size,
        local.num_kv_heads,
        c.head_dim,
    )?;
    if cache.num_blocks == 0 {
        return Err(ModelError::Unsupported("a KV cache of 0 blocks".into()));
    }
    Ok(layout)
}

/// Checks a batch against the model and the cache (every backend runs this before writing
/// anything): lengths agree, token ids are in the vocabulary, every slot is where the block
/// table puts the token's position, and every block a token attends to exists.
pub(crate) fn validate_batch(
    b: &ForwardBatch<'_>,
    config: &ModelConfig,
    num_blocks: usize,
    block_size: usize,
) -> Result<(), ModelError> {
    let invalid = |field, reason: String| Err(ModelError::InvalidBatch { field, reason });
    let t = b.token_ids.len();
    if b.positions.len() != t {
        return invalid(
            "positions",
            format!("{} entries for {t} tokens", b.positions.len()),
        );
    }
    if b.slot_mapping.len() != t {
        return invalid(
            "slot_mapping",
            format!("{} entries for {t} tokens", b.slot_mapping.len()),
        );
    }
    let n = b.num_seqs();
    if b.seq_starts.first() != Some(&0) || b.seq_starts.last().map(|&e| e as usize) != Some(t) {
        return invalid("seq_starts", format!("must run from 0 to {t}"));
    }
    if b.seq_starts.windows(2).any(|w| w[0] > w[1]) {
        return invalid("seq_starts", "must not decrease".into());
    }
    if b.context_lens.len() != n {
        return invalid(
            "context_lens",
            format!("{} entries for {n} sequences", b.context_lens.len()),
        );
    }
    if Some(b.block_tables.len()) != n.checked_mul(b.max_blocks) {
        return invalid(
            "block_tables",
            format!(
                "{} entries for {n} x {}",
                b.block_tables.len(),
                b.max_blocks
            ),
        );
    }
    let vocab = config.vocab_size;
    if let Some(&id) = b.token_ids.iter().find(|&&id| id as usize >= vocab) {
        return invalid(
            "token_ids",
            format!("{id} is outside the vocabulary of {vocab}"),
        );
    }
    let (blocks, bs) = (num_blocks, block_size);
    let slots = (blocks * bs) as i64;
    if let Some(&s) = b.slot_mapping.iter().find(|&&s| !(0..slots).contains(&s)) {
        return invalid(
            "slot_mapping",
            format!("slot {s} is outside the cache's {slots} slots"),
        );
    }
    if let Some(&i) = b.logits_indices.iter().find(|&&i| i as usize >= t) {
        return invalid(
            "logits_indices",
            format!("{i} is not one of the {t} tokens"),
        );
    }
    let window = config.sliding_window;
    for s in 0..n {
        let tokens = b.seq_starts[s] as usize..b.seq_starts[s + 1] as usize;
        if tokens.is_empty() {
            continue;
        }
        let ctx = usize::try_from(b.context_lens[s]).unwrap_or(usize::MAX);
        let row = &b.block_tables[s * b.max_blocks..(s + 1) * b.max_blocks];
        let (mut lowest, mut highest) = (usize::MAX, 0);
        for i in tokens {
            let p = b.positions[i] as usize;
            if p >= ctx {
                return invalid(
                    "positions",
                    format!("token {i} at {p} is past its context length {ctx}"),
                );
            }
            // The token's slot must be where its block table says position p lives.
            let block = row.get(p / bs).copied().unwrap_or(-1);
            if i64::from(block) * bs as i64 + (p % bs) as i64 != b.slot_mapping[i] {
                return invalid(
                    "slot_mapping",
                    format!(
                        "token {i} (position {p}) maps to slot {}, but its block table says block {block}",
                        b.slot_mapping[i]
                    ),
                );
            }
            lowest = lowest.min(window.map_or(0, |w| (p + 1).saturating_sub(w)));
            highest = highest.max(p);
        }
        for blk in lowest / bs..=highest / bs {
            let id = row.get(blk).copied().unwrap_or(-1);
            if id < 0 || id as usize >= blocks {
                return invalid(
                    "block_tables",
                    format!("sequence {s} block {blk} is {id}, not one of {blocks} blocks"),
                );
            }
        }
    }
    Ok(())
}
