//! The CUDA backend: the same model as the CPU backend, on the GPU, over a paged KV cache in
//! device memory (kv-quant's layout, any KV dtype).
//!
//! First version: weights are dequantized to bf16 at load; one step runs embedding gather,
//! then per layer RMSNorm (fused with the residual add), Q/K/V, O, gate·up and down through
//! cuBLAS, RoPE, the quantizing cache write and paged attention (every token of the batch, the
//! prompt chunks' too, attends through the decode kernel with its own context length, after
//! the whole step's K/V is written: causal by construction), SiLU·up; then the final norm and
//! the LM head for the tokens whose logits are wanted. Logits come back to the host as f32
//! (computed in bf16). Not yet: tensor-core prefill attention, sampling on the device, CUDA
//! graphs, biases (Qwen2), pinned host memory for swapping.

use half::bf16;
use kernels_cuda::cudarc::driver::CudaSlice;
use kernels_cuda::{Blas, DecodeMetadata, Gpu, PagedDecoder, RopeShape};
use kv_block_manager::CopyOp;
use kv_quant::BlockLayout;

use crate::ModelConfig;
use crate::backend::{Backend, ForwardBatch, KvCacheConfig, validate_batch};
use crate::config::RopeStyle;
use crate::cpu::Linear;
use crate::error::ModelError;
use crate::weights::{LocalShape, Weights};

/// One transformer block's weights on the device (bf16, `[out][in]` row-major).
struct Layer {
    attn_norm: CudaSlice<bf16>,
    wq: CudaSlice<bf16>,
    wk: CudaSlice<bf16>,
    wv: CudaSlice<bf16>,
    wo: CudaSlice<bf16>,
    ffn_norm: CudaSlice<bf16>,
    /// Gate rows, then up rows: one product gives `[gate | up]` per token.
    w_gate_up: CudaSlice<bf16>,
    w_down: CudaSlice<bf16>,
}

/// Step buffers, grown as batches grow.
#[derive(Default)]
struct Buffers {
    tokens: usize,
    residual: Option<CudaSlice<f32>>,
    normed: Option<CudaSlice<bf16>>,
    q: Option<CudaSlice<bf16>>,
    k: Option<CudaSlice<bf16>>,
    v: Option<CudaSlice<bf16>>,
    attn: Option<CudaSlice<bf16>>,
    proj: Option<CudaSlice<bf16>>,
    gate_up: Option<CudaSlice<bf16>>,
    act: Option<CudaSlice<bf16>>,
}

/// The model on a CUDA device, with its paged KV cache.
pub struct CudaBackend {
    gpu: Gpu,
    blas: Blas,
    decoder: PagedDecoder,
    config: ModelConfig,
    local: LocalShape,
    cache_config: KvCacheConfig,
    layout: BlockLayout,
    embedding: CudaSlice<bf16>,
    layers: Vec<Layer>,
    final_norm: CudaSlice<bf16>,
    /// `None`: tied to the embedding.
    lm_head: Option<CudaSlice<bf16>>,
    inv_freq: CudaSlice<f32>,
    k_cache: Vec<CudaSlice<u8>>,
    v_cache: Vec<CudaSlice<u8>>,
    host_k: Vec<Vec<u8>>,
    host_v: Vec<Vec<u8>>,
    buffers: Buffers,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("gpu", &self.gpu)
            .field("cache_config", &self.cache_config)
            .finish_non_exhaustive()
    }
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// `[out][in]` bf16 rows of one or more linear layers stacked (same `in`).
fn rows_bf16(layers: &[&Linear]) -> Result<Vec<bf16>, ModelError> {
    let k = layers.first().map_or(0, |l| l.in_features());
    let mut out = Vec::with_capacity(layers.iter().map(|l| l.out_features()).sum::<usize>() * k);
    let mut row = vec![0f32; k];
    for l in layers {
        if l.has_bias() {
            return Err(ModelError::Unsupported(
                "linear layers with a bias on the CUDA backend (yet)".into(),
            ));
        }
        if l.in_features() != k {
            return Err(ModelError::Unsupported(
                "stacked layers of different widths".into(),
            ));
        }
        for r in 0..l.out_features() {
            l.dequantize_row_into(r, &mut row);
            out.extend(row.iter().map(|&v| bf16::from_f32(v)));
        }
    }
    Ok(out)
}

/// A buffer of at least `n` values in `slot` (reallocated when smaller); `n` exactly is used.
fn buffer<
    'a,
    T: kernels_cuda::cudarc::driver::DeviceRepr + kernels_cuda::cudarc::driver::ValidAsZeroBits,
>(
    slot: &'a mut Option<CudaSlice<T>>,
    gpu: &Gpu,
    n: usize,
) -> Result<&'a mut CudaSlice<T>, ModelError> {
    if slot.as_ref().is_none_or(|s| s.len() != n) {
        *slot = Some(
            gpu.stream()
                .alloc_zeros::<T>(n.max(1))
                .map_err(kernels_cuda::KernelError::from)?,
        );
    }
    slot.as_mut()
        .ok_or_else(|| ModelError::Unsupported("device buffer vanished".into()))
}

impl CudaBackend {
    /// Uploads `weights` (dequantized to bf16) to `gpu` and allocates a KV cache of `cache`
    /// blocks per layer.
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for what the CUDA backend does not run yet (biases, a
    /// head_dim or GQA group without kernels), device errors (out of memory, ...).
    pub fn new(weights: &Weights, cache: KvCacheConfig, gpu: Gpu) -> Result<Self, ModelError> {
        let c = weights.config().clone();
        let local = weights.local_shape();
        let layout = BlockLayout::new(
            cache.dtype,
            cache.block_size,
            local.num_kv_heads,
            c.head_dim,
        )?;
        if cache.num_blocks == 0 {
            return Err(ModelError::Unsupported("a KV cache of 0 blocks".into()));
        }
        if !kernels_cuda::compile::HEAD_DIMS.contains(&c.head_dim)
            || !local.num_heads.is_multiple_of(local.num_kv_heads)
            || local.num_heads / local.num_kv_heads > kernels_cuda::compile::MAX_GQA_GROUP
            || !cache.block_size.is_power_of_two()
        {
            return Err(ModelError::Unsupported(format!(
                "head_dim {}, {} / {} heads, block size {} on the CUDA backend",
                c.head_dim, local.num_heads, local.num_kv_heads, cache.block_size
            )));
        }
        let blas = Blas::new(&gpu)?;
        let s = gpu.stream().clone();
        let up = |x: &[bf16]| s.clone_htod(x).map_err(kernels_cuda::KernelError::from);
        let mut layers = Vec::with_capacity(weights.layers.len());
        for lw in &weights.layers {
            layers.push(Layer {
                attn_norm: up(&to_bf16(&lw.attn_norm))?,
                wq: up(&rows_bf16(&[&lw.wq])?)?,
                wk: up(&rows_bf16(&[&lw.wk])?)?,
                wv: up(&rows_bf16(&[&lw.wv])?)?,
                wo: up(&rows_bf16(&[&lw.wo])?)?,
                ffn_norm: up(&to_bf16(&lw.ffn_norm))?,
                w_gate_up: up(&rows_bf16(&[&lw.w_gate, &lw.w_up])?)?,
                w_down: up(&rows_bf16(&[&lw.w_down])?)?,
            });
        }
        let embedding = up(&rows_bf16(&[&weights.embedding])?)?;
        let lm_head = match &weights.lm_head {
            Some(l) => Some(up(&rows_bf16(&[l])?)?),
            None => None,
        };
        let bytes = layout.kv_block_bytes() * cache.num_blocks;
        let host_bytes = layout.kv_block_bytes() * cache.num_cpu_blocks;
        let alloc = || {
            s.alloc_zeros::<u8>(bytes)
                .map_err(kernels_cuda::KernelError::from)
        };
        let (mut k_cache, mut v_cache) = (Vec::new(), Vec::new());
        for _ in 0..c.num_layers {
            k_cache.push(alloc()?);
            v_cache.push(alloc()?);
        }
        Ok(Self {
            final_norm: up(&to_bf16(&weights.final_norm))?,
            inv_freq: s
                .clone_htod(&c.rope_inv_freqs())
                .map_err(kernels_cuda::KernelError::from)?,
            embedding,
            lm_head,
            layers,
            host_k: (0..c.num_layers).map(|_| vec![0u8; host_bytes]).collect(),
            host_v: (0..c.num_layers).map(|_| vec![0u8; host_bytes]).collect(),
            k_cache,
            v_cache,
            decoder: PagedDecoder::new(),
            blas,
            gpu,
            config: c,
            local,
            cache_config: cache,
            layout,
            buffers: Buffers::default(),
        })
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Per-token attention metadata: token `i` of sequence `s` reads `s`'s block table up to
    /// its own position (causal; the step's K/V is written before attention).
    fn token_metadata(&self, b: &ForwardBatch<'_>) -> Result<DecodeMetadata, ModelError> {
        let t = b.token_ids.len();
        let mb = b.max_blocks.max(1);
        let mut tables = vec![0i32; t * mb];
        let mut ctx = vec![0i32; t];
        for s in 0..b.num_seqs() {
            let row = &b.block_tables[s * b.max_blocks..(s + 1) * b.max_blocks];
            for i in b.seq_starts[s] as usize..b.seq_starts[s + 1] as usize {
                tables[i * mb..i * mb + b.max_blocks].copy_from_slice(row);
                ctx[i] = b.positions[i] as i32 + 1;
            }
        }
        // Entries past a token's position may be -1 (unused): the kernel reads only attended
        // blocks, which validate_batch checked.
        for v in &mut tables {
            if *v < 0 {
                *v = 0;
            }
        }
        Ok(DecodeMetadata::new(
            &self.gpu,
            &tables,
            mb,
            &ctx,
            self.cache_config.block_size,
            self.cache_config.num_blocks,
            self.config.sliding_window,
        )?)
    }
}

impl Backend for CudaBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_cache_config(&self) -> KvCacheConfig {
        self.cache_config
    }

    fn device(&self) -> String {
        format!("cuda ({})", self.gpu.name())
    }

    fn forward(&mut self, b: &ForwardBatch<'_>, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        validate_batch(
            b,
            &self.config,
            self.cache_config.num_blocks,
            self.cache_config.block_size,
        )?;
        let t = b.token_ids.len();
        let n = b.logits_indices.len();
        if t == 0 {
            logits.clear();
            return Ok(());
        }
        let c = &self.config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qh, kvh, inter) = (
            self.local.num_heads,
            self.local.num_kv_heads,
            self.local.intermediate_size,
        );
        let meta = self.token_metadata(b)?;
        let gpu = &self.gpu;
        let bf = &mut self.buffers;
        bf.tokens = t;
        let residual = buffer(&mut bf.residual, gpu, t * h)?;
        kernels_cuda::embedding_gather(gpu, &self.embedding, c.vocab_size, b.token_ids, residual)?;
        let shape = RopeShape {
            num_q_heads: qh,
            num_kv_heads: kvh,
            head_dim: d,
            interleaved: c.rope_style == RopeStyle::Interleaved,
        };
        let eps = c.rms_norm_eps;
        for (l, lw) in self.layers.iter().enumerate() {
            // attn norm (adding the previous layer's MLP output).
            {
                let normed = buffer(&mut bf.normed, gpu, t * h)?;
                let residual = bf.residual.as_mut().ok_or_else(missing)?;
                let delta = if l == 0 { None } else { bf.proj.as_ref() };
                kernels_cuda::rms_norm(gpu, residual, delta, &lw.attn_norm, eps, normed)?;
            }
            let normed = bf.normed.as_ref().ok_or_else(missing)?;
            self.blas.linear(
                normed,
                &lw.wq,
                qh * d,
                h,
                buffer(&mut bf.q, gpu, t * qh * d)?,
            )?;
            self.blas.linear(
                normed,
                &lw.wk,
                kvh * d,
                h,
                buffer(&mut bf.k, gpu, t * kvh * d)?,
            )?;
            self.blas.linear(
                normed,
                &lw.wv,
                kvh * d,
                h,
                buffer(&mut bf.v, gpu, t * kvh * d)?,
            )?;
            {
                let (q, k) = (
                    bf.q.as_mut().ok_or_else(missing)?,
                    bf.k.as_mut().ok_or_else(missing)?,
                );
                kernels_cuda::rope(gpu, shape, b.positions, &self.inv_freq, q, k)?;
            }
            kernels_cuda::reshape_and_cache(
                gpu,
                &self.layout,
                bf.k.as_ref().ok_or_else(missing)?,
                bf.v.as_ref().ok_or_else(missing)?,
                b.slot_mapping,
                &mut self.k_cache[l],
                &mut self.v_cache[l],
            )?;
            let attn = buffer(&mut bf.attn, gpu, t * qh * d)?;
            self.decoder.run(
                gpu,
                &meta,
                &self.layout,
                qh,
                bf.q.as_ref().ok_or_else(missing)?,
                &self.k_cache[l],
                &self.v_cache[l],
                attn,
            )?;
            self.blas.linear(
                bf.attn.as_ref().ok_or_else(missing)?,
                &lw.wo,
                h,
                qh * d,
                buffer(&mut bf.proj, gpu, t * h)?,
            )?;
            {
                let normed = bf.normed.as_mut().ok_or_else(missing)?;
                let residual = bf.residual.as_mut().ok_or_else(missing)?;
                kernels_cuda::rms_norm(gpu, residual, bf.proj.as_ref(), &lw.ffn_norm, eps, normed)?;
            }
            self.blas.linear(
                bf.normed.as_ref().ok_or_else(missing)?,
                &lw.w_gate_up,
                2 * inter,
                h,
                buffer(&mut bf.gate_up, gpu, t * 2 * inter)?,
            )?;
            kernels_cuda::silu_mul(
                gpu,
                bf.gate_up.as_ref().ok_or_else(missing)?,
                inter,
                buffer(&mut bf.act, gpu, t * inter)?,
            )?;
            self.blas.linear(
                bf.act.as_ref().ok_or_else(missing)?,
                &lw.w_down,
                h,
                inter,
                buffer(&mut bf.proj, gpu, t * h)?,
            )?;
        }
        // Final norm over every token (adding the last MLP output), then the requested rows.
        {
            let normed = bf.normed.as_mut().ok_or_else(missing)?;
            let residual = bf.residual.as_mut().ok_or_else(missing)?;
            kernels_cuda::rms_norm(
                gpu,
                residual,
                bf.proj.as_ref(),
                &self.final_norm,
                eps,
                normed,
            )?;
        }
        logits.clear();
        if n == 0 {
            return Ok(());
        }
        let s = gpu.stream();
        let normed = bf.normed.as_ref().ok_or_else(missing)?;
        let mut picked = s
            .alloc_zeros::<bf16>(n * h)
            .map_err(kernels_cuda::KernelError::from)?;
        for (j, &i) in b.logits_indices.iter().enumerate() {
            let i = i as usize;
            s.memcpy_dtod(
                &normed.slice(i * h..(i + 1) * h),
                &mut picked.slice_mut(j * h..(j + 1) * h),
            )
            .map_err(kernels_cuda::KernelError::from)?;
        }
        let vocab = c.vocab_size;
        let mut out = s
            .alloc_zeros::<bf16>(n * vocab)
            .map_err(kernels_cuda::KernelError::from)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embedding);
        self.blas.linear(&picked, head, vocab, h, &mut out)?;
        let host = s
            .clone_dtoh(&out)
            .map_err(kernels_cuda::KernelError::from)?;
        logits.extend(host.iter().map(|x| x.to_f32()));
        Ok(())
    }

    fn copy_blocks(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        let n = self.cache_config.num_blocks;
        check(copies, n, n)?;
        let bb = self.layout.kv_block_bytes();
        let s = self.gpu.stream().clone();
        for cache in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            for op in copies {
                let (src, dst) = (op.src.index() * bb, op.dst.index() * bb);
                let block = s
                    .clone_dtod(&cache.slice(src..src + bb))
                    .map_err(kernels_cuda::KernelError::from)?;
                s.memcpy_dtod(&block, &mut cache.slice_mut(dst..dst + bb))
                    .map_err(kernels_cuda::KernelError::from)?;
            }
        }
        Ok(())
    }

    fn swap_out(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        check(
            copies,
            self.cache_config.num_blocks,
            self.cache_config.num_cpu_blocks,
        )?;
        let bb = self.layout.kv_block_bytes();
        let s = self.gpu.stream().clone();
        for (dev, host) in self
            .k_cache
            .iter()
            .zip(self.host_k.iter_mut())
            .chain(self.v_cache.iter().zip(self.host_v.iter_mut()))
        {
            for op in copies {
                let (src, dst) = (op.src.index() * bb, op.dst.index() * bb);
                s.memcpy_dtoh(&dev.slice(src..src + bb), &mut host[dst..dst + bb])
                    .map_err(kernels_cuda::KernelError::from)?;
            }
        }
        s.synchronize().map_err(kernels_cuda::KernelError::from)?;
        Ok(())
    }

    fn swap_in(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        check(
            copies,
            self.cache_config.num_cpu_blocks,
            self.cache_config.num_blocks,
        )?;
        let bb = self.layout.kv_block_bytes();
        let s = self.gpu.stream().clone();
        for (dev, host) in self
            .k_cache
            .iter_mut()
            .zip(self.host_k.iter())
            .chain(self.v_cache.iter_mut().zip(self.host_v.iter()))
        {
            for op in copies {
                let (src, dst) = (op.src.index() * bb, op.dst.index() * bb);
                s.memcpy_htod(&host[src..src + bb], &mut dev.slice_mut(dst..dst + bb))
                    .map_err(kernels_cuda::KernelError::from)?;
            }
        }
        Ok(())
    }
}

fn missing() -> ModelError {
    ModelError::Unsupported("a step buffer was not allocated".into())
}

/// Copy ops must name existing blocks on both sides.
fn check(copies: &[CopyOp], src_blocks: usize, dst_blocks: usize) -> Result<(), ModelError> {
    for op in copies {
        if op.src.index() >= src_blocks || op.dst.index() >= dst_blocks {
            return Err(ModelError::InvalidBatch {
                field: "copies",
                reason: format!(
                    "{} -> {} outside {src_blocks} source / {dst_blocks} destination blocks",
                    op.src.index(),
                    op.dst.index()
                ),
            });
        }
    }
    Ok(())
}
