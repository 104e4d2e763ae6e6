//! Paged attention on the CPU: each token's query heads against the K/V of its sequence,
//! read block by block through the block table and dequantized on the fly.

use kv_quant::BlockLayout;
use rayon::prelude::*;

use crate::backend::ForwardBatch;
use crate::error::ModelError;

/// Everything attention reads, for one layer.
pub(crate) struct AttentionInput<'a> {
    pub(crate) layout: &'a BlockLayout,
    pub(crate) k_pool: &'a [u8],
    pub(crate) v_pool: &'a [u8],
    pub(crate) block_bytes: usize,
    pub(crate) batch: &'a ForwardBatch<'a>,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) window: Option<usize>,
    /// The sequence of every token of the batch.
    pub(crate) seq_of: &'a [usize],
}

/// `out[token][head]` = softmax(q·K / sqrt(d)) · V over the token's causal (and windowed)
/// context. `q` and `out` are `[tokens, num_heads * head_dim]`. The batch was validated: every
/// block a token reads is a real block.
pub(crate) fn paged_attention<'a>(
    input: &AttentionInput<'a>,
    q: &[f32],
    out: &mut [f32],
) -> Result<(), ModelError> {
    let b = input.batch;
    let d = input.head_dim;
    let bs = input.layout.block_size();
    let group = input.num_heads / input.num_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let seq_of = input.seq_of;
    out.par_chunks_mut(d)
        .enumerate()
        .try_for_each_init(Vec::new, |scores, (task, o)| {
            let (token, head) = (task / input.num_heads, task % input.num_heads);
            let kv_head = head / group;
            let s = seq_of[token];
            let row = &b.block_tables[s * b.max_blocks..(s + 1) * b.max_blocks];
            let p = b.positions[token] as usize;
            let start = input.window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qh = &q[task * d..(task + 1) * d];
            let block = |pool: &'a [u8], pos: usize| -> &'a [u8] {
                let id = row[pos / bs] as usize;
                &pool[id * input.block_bytes..(id + 1) * input.block_bytes]
            };
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for pos in start..=p {
                let s = kv_quant::dot_k(
                    input.layout,
                    block(input.k_pool, pos),
                    pos % bs,
                    kv_head,
                    qh,
                )? * scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut total = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            o.fill(0.0);
            let inv = 1.0 / total;
            for (pos, &w) in (start..=p).zip(scores.iter()) {
                kv_quant::axpy_v(
                    input.layout,
                    block(input.v_pool, pos),
                    pos % bs,
                    kv_head,
                    w * inv,
                    o,
                )?;
            }
            Ok(())
        })
}
