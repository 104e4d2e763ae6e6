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
///
/// One task per (token, KV head): the head's K and V rows of the context are dequantized once
/// and shared by the query heads of its group (GQA), then the math is plain f32.
pub(crate) fn paged_attention(
    input: &AttentionInput<'_>,
    q: &[f32],
    out: &mut [f32],
) -> Result<(), ModelError> {
    let b = input.batch;
    let d = input.head_dim;
    let bs = input.layout.block_size();
    let group = input.num_heads / input.num_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let seq_of = input.seq_of;
    out.par_chunks_mut(group * d).enumerate().try_for_each_init(
        Scratch::default,
        |sc, (task, o)| {
            let (token, kv_head) = (task / input.num_kv_heads, task % input.num_kv_heads);
            let s = seq_of[token];
            let row = &b.block_tables[s * b.max_blocks..(s + 1) * b.max_blocks];
            let p = b.positions[token] as usize;
            let start = input.window.map_or(0, |w| (p + 1).saturating_sub(w));
            let n = p + 1 - start;
            sc.k.resize(n * d, 0.0);
            sc.v.resize(n * d, 0.0);
            // Context positions start..=p, block by block.
            let mut pos = start;
            while pos <= p {
                let end = if pos / bs == p / bs { p % bs + 1 } else { bs };
                let slots = pos % bs..end;
                let id = row[pos / bs] as usize;
                let range = id * input.block_bytes..(id + 1) * input.block_bytes;
                let at = (pos - start) * d..(pos - start + slots.len()) * d;
                kv_quant::decode_head(
                    input.layout,
                    &input.k_pool[range.clone()],
                    kv_head,
                    slots.clone(),
                    &mut sc.k[at.clone()],
                )?;
                kv_quant::decode_head(
                    input.layout,
                    &input.v_pool[range],
                    kv_head,
                    slots.clone(),
                    &mut sc.v[at],
                )?;
                pos += slots.len();
            }
            for (h, oh) in o.chunks_exact_mut(d).enumerate() {
                let head = kv_head * group + h;
                let qh = &q[(token * input.num_heads + head) * d..][..d];
                sc.scores.clear();
                let mut max = f32::NEG_INFINITY;
                for k in sc.k.chunks_exact(d) {
                    let s = dot(qh, k) * scale;
                    max = max.max(s);
                    sc.scores.push(s);
                }
                let mut total = 0.0f32;
                for s in sc.scores.iter_mut() {
                    *s = (*s - max).exp();
                    total += *s;
                }
                let inv = 1.0 / total;
                oh.fill(0.0);
                for (&w, v) in sc.scores.iter().zip(sc.v.chunks_exact(d)) {
                    let w = w * inv;
                    for (a, &x) in oh.iter_mut().zip(v) {
                        *a += w * x;
                    }
                }
            }
            Ok(())
        },
    )
}

/// Per-thread buffers: one KV head's dequantized context and one query head's scores.
#[derive(Default)]
struct Scratch {
    k: Vec<f32>,
    v: Vec<f32>,
    scores: Vec<f32>,
}

/// `a · b` with 8 independent partial sums (vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, at) = a.as_chunks::<8>();
    let (bc, bt) = b.as_chunks::<8>();
    for (x, y) in ac.iter().zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + at.iter().zip(bt).map(|(x, y)| x * y).sum::<f32>()
}
