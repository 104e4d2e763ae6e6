//! The CPU backend: the reference implementation of the model over the paged, quantized KV
//! cache, and the fallback on machines without a GPU.
//!
//! Weights stay block-quantized and matrix products use integer dot products on int8
//! activations (AVX2 when available), split over threads by output rows. Attention reads K/V
//! through the block tables with kv-quant's fused `dot_k` / `axpy_v`, so quantized KV is
//! dequantized on the fly as the CUDA kernels will.
//!
//! It also runs one rank of a tensor-parallel group ([`CpuBackend::new_sharded`]): attention
//! over the rank's query heads with a KV cache of its own KV heads, the output and down
//! projections' partial sums all-reduced before the residual add, a vocab-parallel embedding
//! (each rank looks up its vocabulary rows, zeros elsewhere, all-reduced) and LM head (each
//! rank computes its slice of every logits row, all-gathered into full rows). The calls into
//! the [`HostCollective`] follow the invariant of [`crate::collective`].

mod attention;
mod linear;
mod quant;
mod simd;

use std::sync::Arc;

use kv_block_manager::CopyOp;
use kv_quant::BlockLayout;

pub(crate) use linear::Activations;
pub use linear::Linear;
pub(crate) use quant::dequantize_row;

use crate::ModelConfig;
use crate::backend::{Backend, ForwardBatch, KvCacheConfig};
use crate::collective::{HostCollective, SingleRank};
use crate::config::RopeStyle;
use crate::error::ModelError;
use crate::weights::{Shard, Weights};

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
    /// This rank's slice of the logits rows, padded for the all-gather, and the gathered rows.
    local_logits: Vec<f32>,
    padded_logits: Vec<f32>,
    gathered_logits: Vec<f32>,
}

/// The model on the CPU, with its paged KV cache: the whole model, or one rank of a
/// tensor-parallel group.
pub struct CpuBackend {
    weights: Weights,
    cache_config: KvCacheConfig,
    device: KvPools,
    host: KvPools,
    inv_freqs: Vec<f32>,
    scratch: Scratch,
    collective: Arc<dyn HostCollective>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("weights", &self.weights)
            .field("cache_config", &self.cache_config)
            .field("shard", &self.collective.shard())
            .finish_non_exhaustive()
    }
}

impl CpuBackend {
    /// A backend for the whole model `weights` with a KV cache of `cache` blocks. Weights of
    /// a tensor-parallel shard are refused ([`ModelError::ShardMismatch`]): they need
    /// [`CpuBackend::new_sharded`].
    pub fn new(weights: Weights, cache: KvCacheConfig) -> Result<Self, ModelError> {
        Self::new_sharded(weights, cache, Arc::new(SingleRank))
    }

    /// One rank of a tensor-parallel group: `weights` is the rank's shard, `cache` its own KV
    /// cache (blocks of the rank's local KV heads, [`Weights::local_shape`]), and `collective`
    /// its member of the group. Every rank of the group must call this at the same time: it
    /// ends with a handshake (one `all_gather`) that checks the ranks are `0..world_size` in
    /// order and that every rank has the same model and KV-cache configuration, so that their
    /// forward passes call the collectives alike (see [`crate::collective`]).
    ///
    /// # Errors
    /// [`ModelError::ShardMismatch`] when `weights` is another shard than `collective`'s, or
    /// the ranks disagree (every rank gets an error); [`ModelError::Collective`] from the
    /// handshake; the errors of [`CpuBackend::new`] for a bad cache.
    pub fn new_sharded(
        weights: Weights,
        cache: KvCacheConfig,
        collective: Arc<dyn HostCollective>,
    ) -> Result<Self, ModelError> {
        let c = weights.config();
        let local = weights.local_shape();
        // Every rank enters the handshake, even one whose own checks failed, so that none is
        // left waiting for it.
        let checked = check_shard(weights.shard(), collective.shard())
            .and_then(|()| crate::backend::cache_layout(c, &local, &cache));
        let agreed = handshake(&*collective, c, &cache, checked.is_ok());
        let layout = checked?;
        agreed?;
        Ok(Self {
            inv_freqs: c.rope_inv_freqs(),
            device: KvPools::new(layout, c.num_layers, cache.num_blocks)?,
            host: KvPools::new(layout, c.num_layers, cache.num_cpu_blocks)?,
            cache_config: cache,
            weights,
            scratch: Scratch::default(),
            collective,
        })
    }

    /// The weights this backend runs.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }
}

fn describe(s: Shard) -> String {
    format!("rank {} of {}", s.rank, s.world_size)
}

/// The weights must be the shard the collective says this rank is.
pub(crate) fn check_shard(weights: Shard, group: Shard) -> Result<(), ModelError> {
    if weights == group {
        return Ok(());
    }
    Err(ModelError::ShardMismatch {
        what: "the weights' shard against the collective's rank".into(),
        expected: describe(group),
        got: describe(weights),
    })
}

/// Values per rank in the construction handshake of a sharded backend: rank, world size,
/// whether the rank's own checks passed, and a 64-bit fingerprint of its configuration in
/// four exact 16-bit parts (the rank first).
pub const HANDSHAKE_VALUES: usize = 7;

/// Checks, with one all-gather, that the ranks are `0..world_size` in order, that every rank
/// passed its own checks (`ok`) and that all have the same model and KV-cache configuration.
/// Returns `Ok` when this rank's own checks failed (`!ok`): its caller reports its own error.
fn handshake(
    collective: &dyn HostCollective,
    config: &ModelConfig,
    cache: &KvCacheConfig,
    ok: bool,
) -> Result<(), ModelError> {
    check_ranks(collective.shard(), config, cache, ok, |mine, all| {
        collective.all_gather(mine, all)
    })
}

/// The construction handshake of a sharded backend over any transport: `gather` sets its
/// second argument to every rank's [`HANDSHAKE_VALUES`] values (the first argument on this
/// rank), in rank order; then the checks of [`handshake`].
pub(crate) fn check_ranks(
    me: Shard,
    config: &ModelConfig,
    cache: &KvCacheConfig,
    ok: bool,
    gather: impl FnOnce(&[f32], &mut Vec<f32>) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let fingerprint = crate::weights::fxhash(&format!("{config:?} {cache:?} {}", me.world_size));
    let mut mine = vec![
        me.rank as f32,
        me.world_size as f32,
        f32::from(u8::from(ok)),
    ];
    mine.extend((0..4).map(|i| ((fingerprint >> (16 * i)) & 0xffff) as f32));
    let mut all = Vec::new();
    gather(&mine, &mut all)?;
    if all.len() != HANDSHAKE_VALUES * me.world_size {
        return Err(ModelError::Collective {
            operation: "all_gather",
            reason: format!(
                "returned {} values for {} ranks of {HANDSHAKE_VALUES}",
                all.len(),
                me.world_size
            ),
        });
    }
    if !ok {
        return Ok(());
    }
    let mismatch = |what: String, expected: String, got: String| {
        Err(ModelError::ShardMismatch {
            what,
            expected,
            got,
        })
    };
    for (r, theirs) in all.chunks_exact(HANDSHAKE_VALUES).enumerate() {
        let (rank, world) = (theirs[0] as usize, theirs[1] as usize);
        if (rank, world) != (r, me.world_size) {
            return mismatch(
                format!("the member at position {r} of the group"),
                format!("rank {r} of {}", me.world_size),
                format!("rank {rank} of {world}"),
            );
        }
        if theirs[2] == 0.0 {
            return mismatch(
                format!("rank {r}'s own checks (its error says why)"),
                "passed".into(),
                "failed".into(),
            );
        }
        if theirs[3..] != mine[3..] {
            let theirs = theirs[3..]
                .iter()
                .rev()
                .fold(0u64, |acc, &v| acc << 16 | v as u64);
            return mismatch(
                format!("rank {r}'s model and KV-cache configuration"),
                format!("fingerprint {fingerprint:016x} (this rank's)"),
                format!("{theirs:016x}"),
            );
        }
    }
    Ok(())
}

/// Scatters the all-gathered, padded slices of the vocab-parallel LM head (`[world, rows,
/// per_rank]`) into full logits rows (`[rows, vocab]`).
fn unpad_logits(
    gathered: &[f32],
    world_size: usize,
    vocab: usize,
    rows: usize,
    logits: &mut Vec<f32>,
) -> Result<(), ModelError> {
    let per_rank = Shard {
        rank: 0,
        world_size,
    }
    .vocab_rows_per_rank(vocab);
    if gathered.len() != world_size * rows * per_rank {
        return Err(ModelError::Collective {
            operation: "all_gather",
            reason: format!(
                "returned {} values for {world_size} ranks of {rows} x {per_rank}",
                gathered.len()
            ),
        });
    }
    logits.resize(rows * vocab, 0.0);
    for rank in 0..world_size {
        let range = Shard { rank, world_size }.vocab_range(vocab);
        let part = &gathered[rank * rows * per_rank..(rank + 1) * rows * per_rank];
        for (row, src) in logits
            .chunks_exact_mut(vocab)
            .zip(part.chunks_exact(per_rank))
        {
            row[range.clone()].copy_from_slice(&src[..range.len()]);
        }
    }
    Ok(())
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
        let collective = &*self.collective;
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
        // Vocab-parallel embedding: this rank's rows, zeros for the others' tokens, summed.
        sc.x.resize(t * h, 0.0);
        let vocab = local.vocab_start..local.vocab_start + local.vocab_size;
        for (row, &id) in sc.x.chunks_exact_mut(h).zip(b.token_ids) {
            if vocab.contains(&(id as usize)) {
                w.embedding
                    .dequantize_row_into(id as usize - local.vocab_start, row);
            } else {
                row.fill(0.0);
            }
        }
        collective.all_reduce_sum(&mut sc.x)?;
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
            collective.all_reduce_sum(&mut sc.proj)?;
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
            collective.all_reduce_sum(&mut sc.proj)?;
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
        let head = w.lm_head.as_ref().unwrap_or(&w.embedding);
        let shard = w.shard();
        if shard.world_size == 1 {
            // A group of one skips the gather, which would be a copy of the logits.
            head.forward(&sc.normed, logits, &mut sc.tmp);
            return Ok(());
        }
        // Vocab-parallel LM head: this rank's slice of every row, padded to the same length
        // on every rank, gathered, and put in place.
        head.forward(&sc.normed, &mut sc.local_logits, &mut sc.tmp);
        let per_rank = shard.vocab_rows_per_rank(c.vocab_size);
        let local_rows = if local.vocab_size == per_rank {
            &sc.local_logits
        } else {
            sc.padded_logits.clear();
            for row in sc.local_logits.chunks_exact(local.vocab_size) {
                sc.padded_logits.extend_from_slice(row);
                sc.padded_logits
                    .extend(std::iter::repeat_n(0.0, per_rank - local.vocab_size));
            }
            &sc.padded_logits
        };
        collective.all_gather(local_rows, &mut sc.gathered_logits)?;
        unpad_logits(
            &sc.gathered_logits,
            shard.world_size,
            c.vocab_size,
            n,
            logits,
        )
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
