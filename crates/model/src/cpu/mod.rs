//! The CPU backend: the reference implementation of the model over the paged, quantized KV
//! cache, and the fallback on machines without a GPU.
//!
//! Weights stay block-quantized and matrix products use integer dot products on int8
//! activations (AVX2 when available), split over threads by output rows. Attention reads K/V
//! through the block tables with kv-quant's fused `dot_k` / `axpy_v`, so quantized KV is
//! dequantized on the fly as the CUDA kernels will.

mod attention;
mod linear;
mod quant;
mod simd;

use kv_block_manager::CopyOp;
use kv_quant::BlockLayout;

pub(crate) use linear::Activations;
pub use linear::Linear;
pub(crate) use quant::dequantize_row;

use crate::ModelConfig;
use crate::backend::{Backend, ForwardBatch, KvCacheConfig};
use crate::config::RopeStyle;
use crate::error::ModelError;
use crate::weights::Weights;

/// K and V blocks of every layer, in kv-quant's layout.
#[derive(Debug)]
struct KvPools {
    layout: BlockLayout,
    block_bytes: usize,
    /// `[layer]` -> `num_blocks * block_bytes` bytes.
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
}

impl KvPools {
    fn new(layout: BlockLayout, layers: usize, blocks: usize) -> Result<Self, ModelError> {
        let block_bytes = layout.kv_block_bytes();
        let bytes = block_bytes.checked_mul(blocks).ok_or_else(|| {
            ModelError::Unsupported(format!("{blocks} KV blocks of {block_bytes} bytes"))
        })?;
        Ok(Self {
            layout,
            block_bytes,
            k: (0..layers).map(|_| vec![0u8; bytes]).collect(),
            v: (0..layers).map(|_| vec![0u8; bytes]).collect(),
        })
    }

    fn num_blocks(&self) -> usize {
        self.k
            .first()
            .map_or(0, |k| k.len() / self.block_bytes.max(1))
    }
}

/// Scratch buffers reused across steps.
#[derive(Debug, Default)]
struct Scratch {
    seq_of: Vec<usize>,
    x: Vec<f32>,
    normed: Activations,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Activations,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Activations,
    tmp: Vec<f32>,
}

/// The model on the CPU, with its paged KV cache.
#[derive(Debug)]
pub struct CpuBackend {
    weights: Weights,
    cache_config: KvCacheConfig,
    device: KvPools,
    host: KvPools,
    inv_freqs: Vec<f32>,
    scratch: Scratch,
}

impl CpuBackend {
    /// A backend for `weights` with a KV cache of `cache` blocks.
    pub fn new(weights: Weights, cache: KvCacheConfig) -> Result<Self, ModelError> {
        let c = weights.config();
        let local = weights.local_shape();
        let layout = crate::backend::cache_layout(c, &local, &cache)?;
        Ok(Self {
            inv_freqs: c.rope_inv_freqs(),
            device: KvPools::new(layout, c.num_layers, cache.num_blocks)?,
            host: KvPools::new(layout, c.num_layers, cache.num_cpu_blocks)?,
            cache_config: cache,
            weights,
            scratch: Scratch::default(),
        })
    }

    /// The weights this backend runs.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

/// Rotates every head of every token (`x` is `[tokens, heads * head_dim]`).
fn rope(x: &mut [f32], positions: &[u32], head_dim: usize, inv_freqs: &[f32], style: RopeStyle) {
    let width = x.len() / positions.len().max(1);
    let half = head_dim / 2;
    let mut cos_sin = vec![(0.0f32, 0.0f32); half];
    for (xt, &p) in x.chunks_exact_mut(width).zip(positions) {
        for (cs, &f) in cos_sin.iter_mut().zip(inv_freqs) {
            let angle = p as f32 * f;
            *cs = (angle.cos(), angle.sin());
        }
        for head in xt.chunks_exact_mut(head_dim) {
            for (i, &(c, s)) in cos_sin.iter().enumerate() {
                let (a, b) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::HalfSplit => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        self.weights.config()
    }

    fn kv_cache_config(&self) -> KvCacheConfig {
        self.cache_config
    }

    fn forward(&mut self, b: &ForwardBatch<'_>, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        crate::backend::validate_batch(
            b,
            self.weights.config(),
            self.device.num_blocks(),
            self.cache_config.block_size,
        )?;
        let w = &self.weights;
        let c = w.config();
        let local = w.local_shape();
        let (h, d) = (c.hidden_size, c.head_dim);
        let (q_width, kv_width) = (local.num_heads * d, local.num_kv_heads * d);
        let t = b.token_ids.len();
        let sc = &mut self.scratch;
        let bs = self.cache_config.block_size;

        // The sequence of every token, for attention (the same for every layer).
        sc.seq_of.clear();
        for s in 0..b.num_seqs() {
            let n = (b.seq_starts[s + 1] - b.seq_starts[s]) as usize;
            sc.seq_of.extend(std::iter::repeat_n(s, n));
        }
        sc.x.resize(t * h, 0.0);
        for (row, &id) in sc.x.chunks_exact_mut(h).zip(b.token_ids) {
            w.embedding.dequantize_row_into(id as usize, row);
        }
        for (layer, lw) in w.layers.iter().enumerate() {
            sc.normed.resize(t, h);
            rms_norm(&sc.x, &lw.attn_norm, c.rms_norm_eps, &mut sc.normed.f32);
            sc.normed.prepare();
            Linear::forward_fused(
                &mut [
                    (&lw.wq, &mut sc.q),
                    (&lw.wk, &mut sc.k),
                    (&lw.wv, &mut sc.v),
                ],
                &sc.normed,
                &mut sc.tmp,
            );
            rope(&mut sc.q, b.positions, d, &self.inv_freqs, c.rope_style);
            rope(&mut sc.k, b.positions, d, &self.inv_freqs, c.rope_style);

            let pools = &mut self.device;
            let (layout, block_bytes) = (&pools.layout, pools.block_bytes);
            for (i, &slot) in b.slot_mapping.iter().enumerate() {
                let slot = slot as usize;
                let range = (slot / bs) * block_bytes..(slot / bs + 1) * block_bytes;
                kv_quant::encode_token(
                    layout,
                    &mut pools.k[layer][range.clone()],
                    slot % bs,
                    &sc.k[i * kv_width..(i + 1) * kv_width],
                )?;
                kv_quant::encode_token(
                    layout,
                    &mut pools.v[layer][range],
                    slot % bs,
                    &sc.v[i * kv_width..(i + 1) * kv_width],
                )?;
            }

            sc.attn.resize(t, q_width);
            attention::paged_attention(
                &attention::AttentionInput {
                    layout,
                    k_pool: &pools.k[layer],
                    v_pool: &pools.v[layer],
                    block_bytes,
                    batch: b,
                    num_heads: local.num_heads,
                    num_kv_heads: local.num_kv_heads,
                    head_dim: d,
                    window: c.sliding_window,
                    seq_of: &sc.seq_of,
                },
                &sc.q,
                &mut sc.attn.f32,
            )?;
            sc.attn.prepare();
            lw.wo.forward(&sc.attn, &mut sc.proj, &mut sc.tmp);
            for (x, p) in sc.x.iter_mut().zip(&sc.proj) {
                *x += p;
            }

            rms_norm(&sc.x, &lw.ffn_norm, c.rms_norm_eps, &mut sc.normed.f32);
            sc.normed.prepare();
            Linear::forward_fused(
                &mut [(&lw.w_gate, &mut sc.gate), (&lw.w_up, &mut sc.up.f32)],
                &sc.normed,
                &mut sc.tmp,
            );
            sc.up.width = local.intermediate_size;
            for (u, &g) in sc.up.f32.iter_mut().zip(&sc.gate) {
                *u *= g / (1.0 + (-g).exp());
            }
            sc.up.prepare();
            lw.w_down.forward(&sc.up, &mut sc.proj, &mut sc.tmp);
            for (x, p) in sc.x.iter_mut().zip(&sc.proj) {
                *x += p;
            }
        }

        // Final norm and LM head for the requested tokens only.
        let n = b.logits_indices.len();
        sc.normed.resize(n, h);
        for (row, &i) in sc.normed.f32.chunks_exact_mut(h).zip(b.logits_indices) {
            let i = i as usize;
            rms_norm(
                &sc.x[i * h..(i + 1) * h],
                &w.final_norm,
                c.rms_norm_eps,
                row,
            );
        }
        sc.normed.prepare();
        w.lm_head
            .as_ref()
            .unwrap_or(&w.embedding)
            .forward(&sc.normed, logits, &mut sc.tmp);
        Ok(())
    }

    fn copy_blocks(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        let n = self.device.num_blocks();
        check_copies("copies", copies, n, n)?;
        let bb = self.device.block_bytes;
        for pool in self.device.k.iter_mut().chain(self.device.v.iter_mut()) {
            for c in copies {
                pool.copy_within(
                    c.src.index() * bb..(c.src.index() + 1) * bb,
                    c.dst.index() * bb,
                );
            }
        }
        Ok(())
    }

    fn swap_out(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        check_copies(
            "swap_out",
            copies,
            self.device.num_blocks(),
            self.host.num_blocks(),
        )?;
        transfer(&self.device, &mut self.host, copies);
        Ok(())
    }

    fn swap_in(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        check_copies(
            "swap_in",
            copies,
            self.host.num_blocks(),
            self.device.num_blocks(),
        )?;
        transfer(&self.host, &mut self.device, copies);
        Ok(())
    }
}

fn check_copies(
    field: &'static str,
    copies: &[CopyOp],
    src: usize,
    dst: usize,
) -> Result<(), ModelError> {
    match copies
        .iter()
        .find(|c| c.src.index() >= src || c.dst.index() >= dst)
    {
        Some(c) => Err(ModelError::InvalidBatch {
            field,
            reason: format!(
                "copy {} -> {} is outside the pools ({src} -> {dst} blocks)",
                c.src, c.dst
            ),
        }),
        None => Ok(()),
    }
}

fn transfer(from: &KvPools, to: &mut KvPools, copies: &[CopyOp]) {
    let bb = from.block_bytes;
    for (src, dst) in from
        .k
        .iter()
        .zip(to.k.iter_mut())
        .chain(from.v.iter().zip(to.v.iter_mut()))
    {
        for c in copies {
            let (s, d) = (c.src.index() * bb, c.dst.index() * bb);
            dst[d..d + bb].copy_from_slice(&src[s..s + bb]);
        }
    }
}

#[cfg(test)]
mod tests;
