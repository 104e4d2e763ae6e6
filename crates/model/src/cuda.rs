//! The CUDA backend: the same model as the CPU backend, on the GPU, over a paged KV cache in
//! device memory (kv-quant's layout, any KV dtype).
//!
//! Weights are dequantized to bf16 at load; one step runs embedding gather, then per layer
//! RMSNorm (fused with the residual add), the Q/K/V product (one stacked weight), RoPE and the
//! quantizing cache write (one launch; with `KVSERVE_FOLD_ROPE=1` folded into the attention
//! launch in decode steps, `PagedDecoder::run_with_rope`), attention, the O product,
//! RMSNorm, gate·up with SiLU·up and down;
//! then the final norm, a row gather and the LM head for the tokens whose logits are wanted.
//! Products: GEMV kernels for steps of at most 8 tokens, cuBLAS above. On steps whose GEMVs
//! run the f32-FMA kernels (1–2 tokens; [`FusedNorm`], `KVSERVE_FUSED_NORM`), the norms but
//! layer 0's attention norm and the final one are folded into the products: the O and down
//! products add into the residual, the Q/K/V and gate/up products normalize it once per CTA
//! into shared memory while their first weight loads are in flight (kernels/NOTES.md).
//! Attention: steps with a
//! prompt chunk run the prefill kernel (every sequence, after the whole step's K/V is
//! written: causal by construction); decode-only steps, and int4 caches, the decode kernel
//! with one row per token. Logits come back to the host as f32 (computed in bf16), or are
//! sampled on the device (`forward_sampled`: only the tokens come back). Copy-on-write is one
//! block-copy launch per cache buffer; swap space is pinned host memory. Qwen2's Q/K/V biases
//! are added in the product (GEMV) or after it.
//!
//! CUDA graphs (`KVSERVE_CUDA_GRAPHS=1` or [`CudaBackend::set_cuda_graphs`]): decode-only
//! steps (one token per sequence) whose batch, padded to a power of two (the bucket), runs the
//! GEMV path (at most 8 tokens, or 4 when a width is not a multiple of 32) are replayed from a
//! graph captured per bucket. Each bucket owns its step buffers, its decoder (a grid of fixed
//! partitions, sized on the device per sequence) and a staging area: a step writes its
//! metadata (padded rows: token 0, position 0, no cache write, a context of 1 in block 0)
//! into pinned memory, one copy puts it on the device, and the graph replays embedding to LM
//! head; sampling stays outside the graph. The first step of a bucket (or of wider block
//! tables) runs uncaptured, allocating, then is captured.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use half::bf16;
use kernels_cuda::cudarc::driver::{CudaSlice, PinnedHostSlice};
use kernels_cuda::graph::StepGraph;
use kernels_cuda::{
    Blas, DecodeKernel, DecodeMetadata, GemvEpilogue, GemvInput, GemvOut, Gpu, Indices, NewTokens,
    NormInput, NormPartials, PagedDecoder, PrefillBatch, PrefillMetadata, Preloaded, RopeShape,
    Scalar, StepStaging, Variant,
};
use kv_block_manager::CopyOp;
use kv_quant::BlockLayout;

use crate::ModelConfig;
use crate::backend::{Backend, ForwardBatch, KvCacheConfig, RowSampling, validate_batch};
use crate::collective::DeviceCollective;
use crate::config::RopeStyle;
use crate::cpu::Linear;
use crate::error::ModelError;
use crate::weights::{LocalShape, Shard, Weights};

/// One transformer block's weights on the device (bf16, `[out][in]` row-major).
struct Layer {
    attn_norm: CudaSlice<bf16>,
    /// Q rows, then K rows, then V rows: one weight read (one launch for small batches).
    w_qkv: CudaSlice<bf16>,
    /// Q/K/V biases (Qwen2), stacked like `w_qkv`.
    qkv_bias: Option<CudaSlice<bf16>>,
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
    /// The fused Q/K/V product before [`kernels_cuda::split_qkv`] (cuBLAS path).
    qkv: Option<CudaSlice<bf16>>,
    attn: Option<CudaSlice<bf16>>,
    proj: Option<CudaSlice<bf16>>,
    gate_up: Option<CudaSlice<bf16>>,
    act: Option<CudaSlice<bf16>>,
    /// Hidden states of the tokens whose logits are wanted.
    picked: Option<CudaSlice<bf16>>,
    logits: Option<CudaSlice<bf16>>,
    /// Tensor parallel: this rank's slice of the logits rows (`[rows][per_rank]`), and every
    /// rank's, all-gathered (`[world][rows][per_rank]`), before [`kernels_cuda::unshard_vocab`].
    local_logits: Option<CudaSlice<bf16>>,
    gathered_logits: Option<CudaSlice<bf16>>,
    /// The sums of squares the O and down products leave for the next normalized products
    /// (fused norms).
    norm_partials: NormPartials,
}

/// How a step attends: the prefill kernel over whole chunks, or the decode kernel per token.
enum StepAttention {
    Prefill(Box<PrefillMetadata>),
    Decode(DecodeMetadata),
}

/// A step's index arrays and attention metadata on the device.
struct StepInputs {
    ids: Indices<i32>,
    positions: Indices<i32>,
    slots: Indices<i64>,
    /// The rows whose logits are computed.
    rows: Indices<i32>,
    attention: StepAttention,
    /// Tokens (rows of every buffer; a padded batch's bucket).
    tokens: usize,
    /// At most one token per sequence: no row attends another row's new token, so a decode
    /// step may write each token's K and V inside its own attention launch.
    one_token_per_seq: bool,
}

/// The decode steps of one bucket (padded batch size): a CUDA graph of everything from the
/// embedding to the LM head, and what it reads and writes, allocated once.
struct GraphStep {
    /// Captured after the bucket's first step (dropped before the buffers it uses).
    graph: Option<StepGraph>,
    /// Why the capture failed (the bucket then runs uncaptured).
    capture_error: Option<String>,
    staging: StepStaging,
    buffers: Buffers,
    decoder: PagedDecoder,
    /// Block-table entries per row the graph was captured for.
    table_width: usize,
}

/// The model on a CUDA device, with its paged KV cache.
pub struct CudaBackend {
    gpu: Gpu,
    /// The kernel modules compiled or loaded before the first step, and how long that took.
    preloaded: (Preloaded, Duration),
    blas: Blas,
    /// `None` only while a step runs (taken out so the step can borrow the rest).
    decoder: Option<PagedDecoder>,
    /// Decode steps replayed from CUDA graphs (`KVSERVE_CUDA_GRAPHS=1`).
    cuda_graphs: bool,
    /// Per bucket (padded batch size).
    graph_steps: HashMap<usize, GraphStep>,
    /// The bucket whose buffers hold the last step's logits (`None`: `buffers`).
    last_graph_bucket: Option<usize>,
    /// Small batches (≤ [`GEMV_TOKENS`] tokens) run their linear layers through the GEMV
    /// kernels instead of cuBLAS (`KVSERVE_GEMV=0` turns this off).
    gemv: bool,
    /// Which steps of the GEMV path fold every RMSNorm but layer 0's attention norm and the
    /// final norm into the products: the O and down products add into the residual stream,
    /// the Q/K/V and gate/up products normalize it as they read it.
    fused_norm: FusedNorm,
    /// Steps with prompt chunks attend through the prefill kernel
    /// (`KVSERVE_PREFILL_KERNEL=0`: through the decode kernel, one row per token).
    prefill: bool,
    /// Steps above the GEMV path run one Q/K/V product over the stacked weight and split it
    /// (`split_qkv`), instead of three products over views of it (`KVSERVE_FUSED_QKV=0`): on
    /// an H200 the 8B workload's 17–64-sequence decode steps went 7.10 → 6.64 ms with it.
    fused_qkv: bool,
    /// Decode steps (at most one token per sequence) fold RoPE and the cache write into the
    /// attention launch (`PagedDecoder::run_with_rope`: one launch fewer per layer, the same
    /// bits). Off unless `KVSERVE_FOLD_ROPE=1`: on an H200 it saved no GPU time on the 8B
    /// shape (BENCHMARKS.md, session 9).
    fold_rope: bool,
    config: ModelConfig,
    local: LocalShape,
    /// This rank of a tensor-parallel group, and the group's collectives (`None`: the whole
    /// model on one GPU).
    shard: Shard,
    collective: Option<Box<dyn DeviceCollective>>,
    cache_config: KvCacheConfig,
    layout: BlockLayout,
    /// `[rows][hidden]`: the whole vocabulary, or (tensor parallel) this rank's rows of it
    /// padded to `ceil(vocab / world)` rows (zeros), as the LM head when tied.
    embedding: CudaSlice<bf16>,
    layers: Vec<Layer>,
    final_norm: CudaSlice<bf16>,
    /// `None`: tied to the embedding.
    lm_head: Option<CudaSlice<bf16>>,
    inv_freq: CudaSlice<f32>,
    k_cache: Vec<CudaSlice<u8>>,
    v_cache: Vec<CudaSlice<u8>>,
    /// Swap space in page-locked host memory (`None` without host blocks).
    host_k: Vec<Option<PinnedHostSlice<u8>>>,
    host_v: Vec<Option<PinnedHostSlice<u8>>>,
    buffers: Buffers,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("gpu", &self.gpu)
            .field("shard", &self.shard)
            .field("cache_config", &self.cache_config)
            .finish_non_exhaustive()
    }
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// `[out][in]` bf16 rows of one or more linear layers stacked (same `in`). A bias is refused
/// unless `bias_apart` (the Q/K/V biases, which the caller uploads apart: [`qkv_biases`]).
fn rows_bf16(layers: &[&Linear], bias_apart: bool) -> Result<Vec<bf16>, ModelError> {
    let k = layers.first().map_or(0, |l| l.in_features());
    let mut out = Vec::with_capacity(layers.iter().map(|l| l.out_features()).sum::<usize>() * k);
    let mut row = vec![0f32; k];
    for l in layers {
        if l.has_bias() && !bias_apart {
            return Err(ModelError::Unsupported(
                "a bias on a layer other than Q, K or V on the CUDA backend".into(),
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

/// The Q/K/V weights' biases in bf16, stacked, when the layer has them (all three or none).
fn qkv_biases(wq: &Linear, wk: &Linear, wv: &Linear) -> Result<Option<Vec<bf16>>, ModelError> {
    match (wq.bias(), wk.bias(), wv.bias()) {
        (None, None, None) => Ok(None),
        (Some(q), Some(k), Some(v)) => Ok(Some(to_bf16(&[q, k, v].concat()))),
        _ => Err(ModelError::Unsupported(
            "biases on some of Q, K and V but not all".into(),
        )),
    }
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

/// Batches up to this many tokens run their products through the GEMV kernels when every
/// width is a multiple of 32 (the tensor-core GEMV from `GEMV_TC_MIN_TOKENS` on), else up to
/// [`GEMV_FMA_TOKENS`].
const GEMV_TOKENS: usize = kernels_cuda::GEMV_MAX_TOKENS;

/// The f32-FMA GEMV alone beats cuBLAS up to 4 tokens on an H200 (8B shape, whole step: 5.2
/// vs 8.6 ms at 1 token, 6.3 vs 7.4 at 4), not at 8 (8.8 vs 7.6: its FMAs grow with the tokens).
const GEMV_FMA_TOKENS: usize = 4;

/// The linear layers of one step: through the GEMV kernels for small batches, else cuBLAS.
struct Products<'a> {
    gpu: &'a Gpu,
    blas: &'a Blas,
    small: bool,
}

impl Products<'_> {
    /// `out = x Wᵀ` for a weight `[n][k]`.
    fn linear(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        n: usize,
        k: usize,
        out: &mut CudaSlice<bf16>,
    ) -> Result<(), ModelError> {
        if self.small {
            kernels_cuda::gemv(self.gpu, x, w, k, None, &mut [GemvOut { out, width: n }])?;
        } else {
            self.blas.linear(x, w, n, k, out)?;
        }
        Ok(())
    }
}

/// Which decode steps fold the RMSNorms into the GEMV products (no norm launches but layer
/// 0's attention norm and the final norm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedNorm {
    /// Never: every norm is a launch of its own (`KVSERVE_FUSED_NORM=0`).
    Off,
    /// Steps whose products over the hidden state run the f32-FMA GEMV kernels (fewer than
    /// [`kernels_cuda::GEMV_TC_MIN_TOKENS`] tokens, or a hidden size not a multiple of 32):
    /// the default. There a CTA's staged rows (8 KiB per token at hidden 4,096) build while its
    /// first weight loads are in flight; the tensor-core products (3–8 tokens) would read
    /// 16 KiB of f32 residual per token and CTA, more than their prologue can hide.
    FmaSteps,
    /// Every step of the GEMV path (`KVSERVE_FUSED_NORM=1`).
    All,
}

impl FusedNorm {
    /// `KVSERVE_FUSED_NORM`: `0` [`FusedNorm::Off`], `1` [`FusedNorm::All`], otherwise (or
    /// unset) [`FusedNorm::FmaSteps`].
    pub fn from_env() -> Self {
        match std::env::var("KVSERVE_FUSED_NORM").as_deref() {
            Ok("0") => Self::Off,
            Ok("1") => Self::All,
            _ => Self::FmaSteps,
        }
    }

    /// Whether a step of `tokens` tokens on the GEMV path, hidden size `hidden`, folds them.
    pub fn folds(self, tokens: usize, hidden: usize) -> bool {
        match self {
            Self::Off => false,
            Self::FmaSteps => !kernels_cuda::gemv_uses_tensor_cores(tokens, hidden),
            Self::All => true,
        }
    }
}

/// The RMSNorm of the residual stream (`[tokens][hidden]`) with `weight` as the input of a
/// GEMV, from the sums of squares the last [`add_to_residual`] left in `partials`.
fn normalized<'a>(
    residual: &'a Option<CudaSlice<f32>>,
    partials: &'a NormPartials,
    weight: &'a CudaSlice<bf16>,
    eps: f32,
) -> Result<GemvInput<'a, bf16>, ModelError> {
    Ok(GemvInput::Normalized(NormInput {
        residual: residual.as_ref().ok_or_else(missing)?,
        weight,
        partials,
        eps,
    }))
}

/// `residual += x Wᵀ` (the product rounded to bf16 first, as a stored product added by
/// `rms_norm`) through the GEMV kernels, leaving the new residual's sums of squares in
/// `partials` for the next [`normalized`] input.
fn add_to_residual(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    k: usize,
    residual: &mut CudaSlice<f32>,
    partials: &mut NormPartials,
) -> Result<(), ModelError> {
    let epilogue = GemvEpilogue::Residual { residual, partials };
    kernels_cuda::gemv_with(gpu, GemvInput::Plain(x), w, k, None, epilogue)?;
    Ok(())
}

/// The weights of the whole model on the device.
struct DeviceWeights {
    embedding: CudaSlice<bf16>,
    layers: Vec<Layer>,
    final_norm: CudaSlice<bf16>,
    lm_head: Option<CudaSlice<bf16>>,
}

/// The cache layout for `c`, or why the CUDA backend cannot run this shape.
fn check_shape(
    c: &ModelConfig,
    local: &LocalShape,
    cache: &KvCacheConfig,
) -> Result<BlockLayout, ModelError> {
    let layout = crate::backend::cache_layout(c, local, cache)?;
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
    Ok(layout)
}

/// `rows` bf16 rows of `width` values padded with zero rows to `padded` rows.
fn pad_rows(mut rows: Vec<bf16>, width: usize, padded: usize) -> Vec<bf16> {
    rows.resize(padded.max(rows.len() / width.max(1)) * width, bf16::ZERO);
    rows
}

/// The rows of the vocabulary each rank's embedding and LM head tables hold (padded to the
/// same count on every rank for the all-gather): the whole vocabulary on one rank.
fn vocab_rows_per_rank(c: &ModelConfig, shard: Shard) -> usize {
    if shard.world_size == 1 {
        c.vocab_size
    } else {
        shard.vocab_rows_per_rank(c.vocab_size)
    }
}

/// The construction handshake of a tensor-parallel rank (`crate::cpu`'s checks), gathered
/// over the device collective: each rank writes its values into its own slot of a zeroed
/// buffer and one f32 all-reduce sums the slots (exact: every other rank adds zeros).
fn device_handshake(
    collective: &dyn DeviceCollective,
    gpu: &Gpu,
    config: &ModelConfig,
    cache: &KvCacheConfig,
    ok: bool,
) -> Result<(), ModelError> {
    let me = collective.shard();
    crate::cpu::check_ranks(me, config, cache, ok, |mine, all| {
        let n = mine.len();
        let mut slots = vec![0f32; n * me.world_size];
        slots
            .get_mut(me.rank * n..(me.rank + 1) * n)
            .ok_or_else(|| ModelError::ShardMismatch {
                what: "the collective's rank".into(),
                expected: format!("below {}", me.world_size),
                got: me.rank.to_string(),
            })?
            .copy_from_slice(mine);
        let s = gpu.stream();
        let mut d = s
            .clone_htod(&slots)
            .map_err(kernels_cuda::KernelError::from)?;
        collective.all_reduce_sum_f32(&mut d)?;
        *all = s.clone_dtoh(&d).map_err(kernels_cuda::KernelError::from)?;
        Ok(())
    })
}

impl CudaBackend {
    /// Uploads `weights` (dequantized to bf16) to `gpu` and allocates a KV cache of `cache`
    /// blocks per layer.
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for what the CUDA backend does not run yet (a head_dim or
    /// GQA group without kernels, biases but on Q, K and V), [`ModelError::ShardMismatch`]
    /// for a tensor-parallel shard (it needs [`CudaBackend::new_sharded`]), device errors
    /// (out of memory, ...).
    pub fn new(weights: &Weights, cache: KvCacheConfig, gpu: Gpu) -> Result<Self, ModelError> {
        crate::cpu::check_shard(weights.shard(), Shard::FULL)?;
        Self::upload(weights, cache, gpu, None)
    }

    /// One rank of a tensor-parallel group on its GPU: `weights` is the rank's shard
    /// (column-parallel Q/K/V and gate/up, row-parallel O and down, vocab-parallel embedding
    /// and LM head), `cache` its own KV cache (blocks of its local KV heads), `collective` its
    /// member of the group. A step sums the embedding and the O and down products over the
    /// ranks and gathers the logits rows, so every rank ends a step with the same full logits.
    /// Every rank of the group must call this at the same time: it ends with a handshake that
    /// checks the ranks are `0..world_size` in order with the same model and cache
    /// configuration (as [`CpuBackend::new_sharded`](crate::CpuBackend::new_sharded)).
    ///
    /// # Errors
    /// [`ModelError::ShardMismatch`] when `weights` is another shard than `collective`'s, or
    /// the ranks disagree; [`ModelError::Collective`] from the handshake; the errors of
    /// [`CudaBackend::new`].
    pub fn new_sharded(
        weights: &Weights,
        cache: KvCacheConfig,
        gpu: Gpu,
        collective: Box<dyn DeviceCollective>,
    ) -> Result<Self, ModelError> {
        let c = weights.config();
        // Every rank enters the handshake, even one whose own checks failed, so that none is
        // left waiting for it.
        let checked = crate::cpu::check_shard(weights.shard(), collective.shard())
            .and_then(|()| check_shape(c, &weights.local_shape(), &cache));
        let agreed = device_handshake(&*collective, &gpu, c, &cache, checked.is_ok());
        checked?;
        agreed?;
        Self::upload(weights, cache, gpu, Some(collective))
    }

    fn upload(
        weights: &Weights,
        cache: KvCacheConfig,
        gpu: Gpu,
        collective: Option<Box<dyn DeviceCollective>>,
    ) -> Result<Self, ModelError> {
        let c = weights.config().clone();
        let local = weights.local_shape();
        let shard = weights.shard();
        let layout = check_shape(&c, &local, &cache)?;
        let s = gpu.stream().clone();
        let up = |x: &[bf16]| s.clone_htod(x).map_err(kernels_cuda::KernelError::from);
        let mut layers = Vec::with_capacity(weights.layers.len());
        for lw in &weights.layers {
            let qkv_bias = match qkv_biases(&lw.wq, &lw.wk, &lw.wv)? {
                Some(b) => Some(up(&b)?),
                None => None,
            };
            layers.push(Layer {
                attn_norm: up(&to_bf16(&lw.attn_norm))?,
                w_qkv: up(&rows_bf16(&[&lw.wq, &lw.wk, &lw.wv], true)?)?,
                qkv_bias,
                wo: up(&rows_bf16(&[&lw.wo], false)?)?,
                ffn_norm: up(&to_bf16(&lw.ffn_norm))?,
                w_gate_up: up(&rows_bf16(&[&lw.w_gate, &lw.w_up], false)?)?,
                w_down: up(&rows_bf16(&[&lw.w_down], false)?)?,
            });
        }
        let (h, per_rank) = (c.hidden_size, vocab_rows_per_rank(&c, shard));
        let vocab_table = |l: &Linear| -> Result<CudaSlice<bf16>, ModelError> {
            Ok(up(&pad_rows(rows_bf16(&[l], false)?, h, per_rank))?)
        };
        let dw = DeviceWeights {
            embedding: vocab_table(&weights.embedding)?,
            lm_head: weights.lm_head.as_ref().map(vocab_table).transpose()?,
            final_norm: up(&to_bf16(&weights.final_norm))?,
            layers,
        };
        Self::assemble(gpu, c, local, (shard, collective), cache, layout, dw)
    }

    /// A model of `config`'s shape with dummy bf16 weights generated on the device (uniform
    /// in ±0.02, norms 1; like vLLM's `load_format=dummy`): for speed measurements of large
    /// shapes (Llama-3.1-8B) without a checkpoint. Its outputs mean nothing.
    ///
    /// # Errors
    /// As [`CudaBackend::new`]; [`ModelError::Config`] for an inconsistent `config`.
    pub fn dummy(
        config: &ModelConfig,
        cache: KvCacheConfig,
        gpu: Gpu,
        seed: u64,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        Self::generate(config, cache, gpu, seed, None)
    }

    /// One tensor-parallel rank of [`CudaBackend::dummy`]'s model: the rank's shard shapes,
    /// weights generated on its GPU (each rank from its own seed: the shards of no one model,
    /// which speed measurements do not need). Every rank calls it at the same time, as
    /// [`CudaBackend::new_sharded`].
    ///
    /// # Errors
    /// As [`CudaBackend::new_sharded`]; [`ModelError::Unsupported`] when `config` does not
    /// shard over the group.
    pub fn dummy_sharded(
        config: &ModelConfig,
        cache: KvCacheConfig,
        gpu: Gpu,
        seed: u64,
        collective: Box<dyn DeviceCollective>,
    ) -> Result<Self, ModelError> {
        let shard = collective.shard();
        let checked = config
            .validate()
            .map_err(ModelError::from)
            .and_then(|()| LocalShape::new(config, shard))
            .and_then(|local| check_shape(config, &local, &cache));
        let agreed = device_handshake(&*collective, &gpu, config, &cache, checked.is_ok());
        checked?;
        agreed?;
        let seed = seed ^ (shard.rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        Self::generate(config, cache, gpu, seed, Some(collective))
    }

    fn generate(
        config: &ModelConfig,
        cache: KvCacheConfig,
        gpu: Gpu,
        seed: u64,
        collective: Option<Box<dyn DeviceCollective>>,
    ) -> Result<Self, ModelError> {
        let c = config.clone();
        let shard = collective.as_ref().map_or(Shard::FULL, |g| g.shard());
        let local = LocalShape::new(&c, shard)?;
        let layout = check_shape(&c, &local, &cache)?;
        let mut next_seed = seed;
        let mut fill = |n: usize, lo: f32, hi: f32| -> Result<CudaSlice<bf16>, ModelError> {
            let mut t = gpu
                .stream()
                .alloc_zeros::<bf16>(n)
                .map_err(kernels_cuda::KernelError::from)?;
            next_seed = next_seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            kernels_cuda::fill_uniform(&gpu, &mut t, next_seed, lo, hi)?;
            Ok(t)
        };
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qh, kvh, inter) = (local.num_heads, local.num_kv_heads, local.intermediate_size);
        let w = 0.02;
        let mut layers = Vec::with_capacity(c.num_layers);
        let qkv_rows = (qh + 2 * kvh) * d;
        for _ in 0..c.num_layers {
            let qkv_bias = if c.qkv_bias {
                Some(fill(qkv_rows, -w, w)?)
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: fill(h, 1.0, 1.0)?,
                w_qkv: fill(qkv_rows * h, -w, w)?,
                qkv_bias,
                wo: fill(h * qh * d, -w, w)?,
                ffn_norm: fill(h, 1.0, 1.0)?,
                w_gate_up: fill(2 * inter * h, -w, w)?,
                w_down: fill(h * inter, -w, w)?,
            });
        }
        let rows = vocab_rows_per_rank(&c, shard);
        let dw = DeviceWeights {
            embedding: fill(rows * h, -w, w)?,
            lm_head: if c.tie_word_embeddings {
                None
            } else {
                Some(fill(rows * h, -w, w)?)
            },
            final_norm: fill(h, 1.0, 1.0)?,
            layers,
        };
        Self::assemble(gpu, c, local, (shard, collective), cache, layout, dw)
    }

    /// Bytes of weights one decode step streams (every layer, the final norm and the LM head;
    /// the embedding only through the gathered rows): the numerator of the weight-streaming
    /// floor of batch-1 decode.
    pub fn streamed_weight_bytes(&self) -> usize {
        let bytes = |t: &CudaSlice<bf16>| t.len() * std::mem::size_of::<bf16>();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.attn_norm,
                    &l.w_qkv,
                    &l.wo,
                    &l.ffn_norm,
                    &l.w_gate_up,
                    &l.w_down,
                ]
                .into_iter()
                .chain(l.qkv_bias.as_ref())
                .map(bytes)
                .sum::<usize>()
            })
            .sum();
        layers + bytes(&self.final_norm) + bytes(self.lm_head.as_ref().unwrap_or(&self.embedding))
    }

    fn assemble(
        gpu: Gpu,
        c: ModelConfig,
        local: LocalShape,
        (shard, collective): (Shard, Option<Box<dyn DeviceCollective>>),
        cache: KvCacheConfig,
        layout: BlockLayout,
        dw: DeviceWeights,
    ) -> Result<Self, ModelError> {
        // Every kernel module the steps can use, before the first step: a module compiled on
        // first use stops that step for seconds (a first step of a batch size the warm-up
        // did not run, minutes into serving).
        let started = Instant::now();
        let group = local.num_heads / local.num_kv_heads.max(1);
        let variants = Variant::for_model(Scalar::Bf16, layout.dtype(), c.head_dim, group);
        let preloaded = (gpu.preload(&variants)?, started.elapsed());
        let blas = Blas::new(&gpu)?;
        let s = gpu.stream().clone();
        let bytes = layout.kv_block_bytes() * cache.num_blocks;
        let host_bytes = layout.kv_block_bytes() * cache.num_cpu_blocks;
        let alloc = || {
            s.alloc_zeros::<u8>(bytes)
                .map_err(kernels_cuda::KernelError::from)
        };
        let pinned = |n: usize| {
            (0..c.num_layers)
                .map(|_| (n > 0).then(|| gpu.alloc_pinned(n)).transpose())
                .collect::<Result<Vec<_>, _>>()
        };
        let (mut k_cache, mut v_cache) = (Vec::new(), Vec::new());
        for _ in 0..c.num_layers {
            k_cache.push(alloc()?);
            v_cache.push(alloc()?);
        }
        Ok(Self {
            final_norm: dw.final_norm,
            inv_freq: s
                .clone_htod(&c.rope_inv_freqs())
                .map_err(kernels_cuda::KernelError::from)?,
            embedding: dw.embedding,
            lm_head: dw.lm_head,
            layers: dw.layers,
            host_k: pinned(host_bytes)?,
            host_v: pinned(host_bytes)?,
            k_cache,
            v_cache,
            decoder: Some(PagedDecoder::new()),
            cuda_graphs: std::env::var("KVSERVE_CUDA_GRAPHS").as_deref() == Ok("1"),
            graph_steps: HashMap::new(),
            last_graph_bucket: None,
            gemv: std::env::var("KVSERVE_GEMV").as_deref() != Ok("0"),
            fused_norm: FusedNorm::from_env(),
            prefill: std::env::var("KVSERVE_PREFILL_KERNEL").as_deref() != Ok("0"),
            fused_qkv: std::env::var("KVSERVE_FUSED_QKV").as_deref() != Ok("0"),
            fold_rope: std::env::var("KVSERVE_FOLD_ROPE").as_deref() == Ok("1"),
            blas,
            gpu,
            preloaded,
            config: c,
            local,
            shard,
            collective,
            cache_config: cache,
            layout,
            buffers: Buffers::default(),
        })
    }

    /// Runs one step on the device: the K/V of every token into the cache, and the logits
    /// of `logits_indices` into `buffers.logits` (bf16). `false` when there are no logits.
    fn run_step(&mut self, b: &ForwardBatch<'_>) -> Result<bool, ModelError> {
        validate_batch(
            b,
            &self.config,
            self.cache_config.num_blocks,
            self.cache_config.block_size,
        )?;
        let t = b.token_ids.len();
        let n = b.logits_indices.len();
        if t == 0 {
            return Ok(false);
        }
        self.last_graph_bucket = None;
        if let Some(bucket) = self.graph_bucket(b) {
            return self.graph_step(b, bucket);
        }
        // Steps with a prompt chunk attend through the prefill kernel (every sequence, decode
        // rows too); decode-only steps (and KV dtypes without it) through the decode kernel,
        // one row per token.
        let attention = match self.prefill_metadata(b)? {
            Some(p) => StepAttention::Prefill(Box::new(p)),
            None => StepAttention::Decode(self.token_metadata(b)?),
        };
        let gpu = &self.gpu;
        // The step's index arrays go to the device once; every layer reuses them.
        let inputs = StepInputs {
            ids: Indices::from_u32(gpu, b.token_ids, "token_ids")?,
            positions: Indices::from_u32(gpu, b.positions, "positions")?,
            slots: Indices::new(gpu, b.slot_mapping)?,
            rows: Indices::from_u32(gpu, b.logits_indices, "logits_indices")?,
            attention,
            tokens: t,
            one_token_per_seq: b.seq_starts.windows(2).all(|w| w[1] - w[0] <= 1),
        };
        let mut bf = std::mem::take(&mut self.buffers);
        let mut decoder = self.decoder.take().ok_or_else(missing)?;
        let r = self.launch_step(&inputs, &mut bf, &mut decoder);
        self.buffers = bf;
        self.decoder = Some(decoder);
        r?;
        Ok(n > 0)
    }

    /// Queues one step's kernels: the K/V of every token into the cache, and the logits of
    /// `inputs.rows` into `bf.logits` (bf16). Allocates nothing when `bf` and `decoder` have
    /// run a step of the same shape before (what graph capture needs).
    fn launch_step(
        &mut self,
        inputs: &StepInputs,
        bf: &mut Buffers,
        decoder: &mut PagedDecoder,
    ) -> Result<(), ModelError> {
        let t = inputs.tokens;
        let n = inputs.rows.len();
        let c = &self.config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qh, kvh, inter) = (
            self.local.num_heads,
            self.local.num_kv_heads,
            self.local.intermediate_size,
        );
        let gpu = &self.gpu;
        let (ids, positions, slots) = (&inputs.ids, &inputs.positions, &inputs.slots);
        bf.tokens = t;
        let residual = buffer(&mut bf.residual, gpu, t * h)?;
        // Tensor parallel: the ranks' partial sums (the embedding rows, the row-parallel O
        // and down products) are summed over the group before the residual stream takes them.
        let collective = self.collective.as_deref();
        let vocab_rows = kernels_cuda::VocabRows {
            start: self.local.vocab_start,
            len: self.local.vocab_size,
            vocab: c.vocab_size,
        };
        kernels_cuda::embedding_gather_rows(gpu, &self.embedding, h, vocab_rows, ids, residual)?;
        if let Some(group) = collective {
            group.all_reduce_sum_f32(residual)?;
        }
        let shape = RopeShape {
            num_q_heads: qh,
            num_kv_heads: kvh,
            head_dim: d,
            interleaved: c.rope_style == RopeStyle::Interleaved,
        };
        let eps = c.rms_norm_eps;
        // Small batches stream each weight once through the GEMV kernels (their inputs must be
        // rows of a multiple of 8 values).
        let widths = [h, qh * d, inter];
        let max_small = if widths.iter().all(|x| x.is_multiple_of(32)) {
            GEMV_TOKENS
        } else {
            GEMV_FMA_TOKENS
        };
        let small = self.gemv && t <= max_small && widths.iter().all(|x| x.is_multiple_of(8));
        // Fused norms: no norm launch but layer 0's attention norm and the final one. The O
        // and down products add into the residual stream (leaving its sums of squares in
        // `norm_partials`), the Q/K/V and gate/up products normalize it as they read it.
        // (Not with a group: the products' partial sums must be summed first.)
        let fused = small && self.fused_norm.folds(t, h) && collective.is_none();
        // Decode steps write each token's K and V in its attention launch.
        let fold_rope = self.fold_rope && inputs.one_token_per_seq;
        let products = Products {
            gpu,
            blas: &self.blas,
            small,
        };
        for (l, lw) in self.layers.iter().enumerate() {
            let fold_attn_norm = fused && l > 0;
            if !fold_attn_norm {
                // attn norm (adding the previous layer's MLP output).
                let normed = buffer(&mut bf.normed, gpu, t * h)?;
                let residual = bf.residual.as_mut().ok_or_else(missing)?;
                let delta = if l == 0 { None } else { bf.proj.as_ref() };
                kernels_cuda::rms_norm(gpu, residual, delta, &lw.attn_norm, eps, normed)?;
            }
            let normed = bf.normed.as_ref().ok_or_else(missing)?;
            let (nq, nkv) = (qh * d, kvh * d);
            let q = buffer(&mut bf.q, gpu, t * nq)?;
            let k = buffer(&mut bf.k, gpu, t * nkv)?;
            let v = buffer(&mut bf.v, gpu, t * nkv)?;
            if small {
                let mut outs = [
                    GemvOut { out: q, width: nq },
                    GemvOut { out: k, width: nkv },
                    GemvOut { out: v, width: nkv },
                ];
                let input = if fold_attn_norm {
                    normalized(&bf.residual, &bf.norm_partials, &lw.attn_norm, eps)?
                } else {
                    GemvInput::Plain(normed)
                };
                let bias = lw.qkv_bias.as_ref();
                let outs = GemvEpilogue::Store(&mut outs);
                kernels_cuda::gemv_with(gpu, input, &lw.w_qkv, h, bias, outs)?;
            } else if self.fused_qkv && nq.is_multiple_of(8) && nkv.is_multiple_of(8) {
                // One product over the stacked weight, split (and biased) by one launch.
                let qkv = buffer(&mut bf.qkv, gpu, t * (nq + 2 * nkv))?;
                self.blas.linear(normed, &lw.w_qkv, nq + 2 * nkv, h, qkv)?;
                kernels_cuda::split_qkv(gpu, qkv, lw.qkv_bias.as_ref(), nq, nkv, q, k, v)?;
            } else {
                let w = &lw.w_qkv;
                let (q_end, k_end) = (nq * h, (nq + nkv) * h);
                self.blas.linear(normed, &w.slice(..q_end), nq, h, q)?;
                self.blas
                    .linear(normed, &w.slice(q_end..k_end), nkv, h, k)?;
                self.blas.linear(normed, &w.slice(k_end..), nkv, h, v)?;
                if let Some(b) = &lw.qkv_bias {
                    kernels_cuda::add_bias(gpu, q, &b.slice(..nq))?;
                    kernels_cuda::add_bias(gpu, k, &b.slice(nq..nq + nkv))?;
                    kernels_cuda::add_bias(gpu, v, &b.slice(nq + nkv..))?;
                }
            }
            // RoPE on q and k and the cache write of k and v, one launch (k stays unrotated
            // in its buffer: attention reads K from the cache); in decode steps inside the
            // attention launch instead.
            let rotary = kernels_cuda::Rotary {
                shape,
                positions,
                inv_freq: &self.inv_freq,
            };
            let cache = kernels_cuda::LayerCache {
                layout: &self.layout,
                k: &mut self.k_cache[l],
                v: &mut self.v_cache[l],
            };
            let (k, v) = (
                bf.k.as_ref().ok_or_else(missing)?,
                bf.v.as_ref().ok_or_else(missing)?,
            );
            let attn = buffer(&mut bf.attn, gpu, t * qh * d)?;
            let q = bf.q.as_mut().ok_or_else(missing)?;
            match &inputs.attention {
                StepAttention::Decode(m) if fold_rope => {
                    let new = NewTokens {
                        rotary,
                        k,
                        v,
                        slot_mapping: slots,
                        cache,
                    };
                    decoder.run_with_rope(gpu, m, qh, q, new, attn)?;
                }
                attention => {
                    kernels_cuda::rope_and_cache(gpu, &rotary, q, k, v, slots, cache)?;
                    let (kc, vc) = (&self.k_cache[l], &self.v_cache[l]);
                    match attention {
                        StepAttention::Prefill(p) => {
                            kernels_cuda::paged_prefill(gpu, p, &self.layout, qh, q, kc, vc, attn)?
                        }
                        StepAttention::Decode(m) => {
                            decoder.run(gpu, m, &self.layout, qh, q, kc, vc, attn)?;
                        }
                    }
                }
            }
            // O product, then the ffn norm adding it (fused: the product adds itself).
            let attn = bf.attn.as_ref().ok_or_else(missing)?;
            if fused {
                let residual = bf.residual.as_mut().ok_or_else(missing)?;
                add_to_residual(gpu, attn, &lw.wo, qh * d, residual, &mut bf.norm_partials)?;
            } else {
                let proj = buffer(&mut bf.proj, gpu, t * h)?;
                products.linear(attn, &lw.wo, h, qh * d, proj)?;
                if let Some(group) = collective {
                    group.all_reduce_sum(proj)?;
                }
                let normed = bf.normed.as_mut().ok_or_else(missing)?;
                let residual = bf.residual.as_mut().ok_or_else(missing)?;
                kernels_cuda::rms_norm(gpu, residual, bf.proj.as_ref(), &lw.ffn_norm, eps, normed)?;
            }
            let normed = bf.normed.as_ref().ok_or_else(missing)?;
            let act = buffer(&mut bf.act, gpu, t * inter)?;
            if small {
                let input = if fused {
                    normalized(&bf.residual, &bf.norm_partials, &lw.ffn_norm, eps)?
                } else {
                    GemvInput::Plain(normed)
                };
                kernels_cuda::gemv_silu_mul_with(gpu, input, &lw.w_gate_up, inter, h, act)?;
            } else {
                let gate_up = buffer(&mut bf.gate_up, gpu, t * 2 * inter)?;
                self.blas
                    .linear(normed, &lw.w_gate_up, 2 * inter, h, gate_up)?;
                kernels_cuda::silu_mul(gpu, gate_up, inter, act)?;
            }
            // Down product (fused: adding itself to the residual stream).
            let act = bf.act.as_ref().ok_or_else(missing)?;
            if fused {
                let residual = bf.residual.as_mut().ok_or_else(missing)?;
                add_to_residual(gpu, act, &lw.w_down, inter, residual, &mut bf.norm_partials)?;
            } else {
                let proj = buffer(&mut bf.proj, gpu, t * h)?;
                products.linear(act, &lw.w_down, h, inter, proj)?;
                if let Some(group) = collective {
                    group.all_reduce_sum(proj)?;
                }
            }
        }
        // Final norm over every token (adding the last MLP output unless the down product
        // did), then the requested rows.
        {
            let normed = bf.normed.as_mut().ok_or_else(missing)?;
            let residual = bf.residual.as_mut().ok_or_else(missing)?;
            let delta = if fused { None } else { bf.proj.as_ref() };
            kernels_cuda::rms_norm(gpu, residual, delta, &self.final_norm, eps, normed)?;
        }
        if n == 0 {
            return Ok(());
        }
        let rows = &inputs.rows;
        let picked = buffer(&mut bf.picked, gpu, n * h)?;
        kernels_cuda::gather_rows(
            gpu,
            bf.normed.as_ref().ok_or_else(missing)?,
            h,
            rows,
            picked,
        )?;
        let vocab = c.vocab_size;
        // This rank's rows of the LM head (all of them on one rank).
        let per_rank = vocab_rows_per_rank(c, self.shard);
        let out = if collective.is_some() {
            buffer(&mut bf.local_logits, gpu, n * per_rank)?
        } else {
            buffer(&mut bf.logits, gpu, n * vocab)?
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embedding);
        let picked = bf.picked.as_ref().ok_or_else(missing)?;
        let small_head = self.gemv
            && h.is_multiple_of(8)
            && n <= if h.is_multiple_of(32) {
                GEMV_TOKENS
            } else {
                GEMV_FMA_TOKENS
            };
        if small_head {
            kernels_cuda::gemv(
                gpu,
                picked,
                head,
                h,
                None,
                &mut [GemvOut {
                    out,
                    width: per_rank,
                }],
            )?;
        } else {
            self.blas.linear(picked, head, per_rank, h, out)?;
        }
        if let Some(group) = collective {
            let world = self.shard.world_size;
            let local = bf.local_logits.as_ref().ok_or_else(missing)?;
            let gathered = buffer(&mut bf.gathered_logits, gpu, world * n * per_rank)?;
            group.all_gather(local, gathered)?;
            let out = buffer(&mut bf.logits, gpu, n * vocab)?;
            let gathered = bf.gathered_logits.as_ref().ok_or_else(missing)?;
            kernels_cuda::unshard_vocab(gpu, gathered, world, per_rank, vocab, out)?;
        }
        Ok(())
    }

    /// Replays decode steps from CUDA graphs (see the module's documentation), or runs every
    /// step uncaptured (the default; `KVSERVE_CUDA_GRAPHS=1` turns graphs on at
    /// construction). Turning them off drops the graphs captured so far.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.cuda_graphs = on;
        if !on {
            self.graph_steps.clear();
        }
    }

    /// Why the capture of a bucket's graph failed, per bucket (those buckets run uncaptured).
    pub fn graph_capture_errors(&self) -> Vec<(usize, String)> {
        let mut v: Vec<(usize, String)> = self
            .graph_steps
            .iter()
            .filter_map(|(&b, g)| g.capture_error.clone().map(|e| (b, e)))
            .collect();
        v.sort();
        v
    }

    /// Buckets with a captured graph.
    pub fn graph_buckets(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph_steps
            .iter()
            .filter(|(_, g)| g.graph.is_some())
            .map(|(&b, _)| b)
            .collect();
        v.sort_unstable();
        v
    }

    /// The bucket a step runs in as a graph replay, or `None` when it runs uncaptured: graphs
    /// on, one token per sequence, a bucket (the batch rounded up to a power of two) that runs
    /// the GEMV path for every product and the LM head (no cuBLAS in a graph), the tensor-core
    /// decode kernel (partitions sized on the device).
    fn graph_bucket(&self, b: &ForwardBatch<'_>) -> Option<usize> {
        let t = b.token_ids.len();
        // Not with a tensor-parallel group: its collectives are not captured (yet).
        if !self.cuda_graphs
            || self.collective.is_some()
            || t != b.num_seqs()
            || b.logits_indices.is_empty()
        {
            return None;
        }
        let c = &self.config;
        let h = c.hidden_size;
        let widths = [
            h,
            self.local.num_heads * c.head_dim,
            self.local.intermediate_size,
        ];
        let max_small = if widths.iter().all(|x| x.is_multiple_of(32)) {
            GEMV_TOKENS
        } else {
            GEMV_FMA_TOKENS
        };
        let max_head = if h.is_multiple_of(32) {
            GEMV_TOKENS
        } else {
            GEMV_FMA_TOKENS
        };
        let bucket = t.next_power_of_two();
        let decoder = self.decoder.as_ref()?;
        let tc = decoder.kernel_for(Scalar::Bf16, self.layout.dtype()) == DecodeKernel::TensorCore;
        (self.gemv
            && widths.iter().all(|x| x.is_multiple_of(8))
            && bucket <= max_small.min(max_head)
            && tc)
            .then_some(bucket)
    }

    /// A bucket's buffers, decoder and staging for block tables of `width` entries per row.
    fn new_graph_step(&self, bucket: usize, width: usize) -> Result<GraphStep, ModelError> {
        let mut decoder = PagedDecoder::new();
        let parts = kernels_cuda::fixed_parts_for(&self.gpu, bucket, self.local.num_kv_heads);
        decoder.set_fixed_parts(Some(parts))?;
        // ids, positions, rows, context lengths (i32), slots (i64), tables (i32).
        let bytes = StepStaging::bytes_for(&[
            (bucket, 4),
            (bucket, 4),
            (bucket, 4),
            (bucket, 4),
            (bucket, 8),
            (bucket * width, 4),
        ]);
        Ok(GraphStep {
            graph: None,
            capture_error: None,
            staging: StepStaging::new(&self.gpu, bytes)?,
            buffers: Buffers::default(),
            decoder,
            table_width: width,
        })
    }

    /// Runs a decode step padded to `bucket` rows through the bucket's graph (capturing it
    /// after running the step uncaptured the first time).
    fn graph_step(&mut self, b: &ForwardBatch<'_>, bucket: usize) -> Result<bool, ModelError> {
        let width = b.max_blocks.max(1).next_power_of_two();
        let mut g = match self.graph_steps.remove(&bucket) {
            Some(g) if g.table_width >= width => g,
            _ => self.new_graph_step(bucket, width)?,
        };
        let r = self.graph_step_in(&mut g, b, bucket);
        self.graph_steps.insert(bucket, g);
        r?;
        self.last_graph_bucket = Some(bucket);
        Ok(true)
    }

    fn graph_step_in(
        &mut self,
        g: &mut GraphStep,
        b: &ForwardBatch<'_>,
        bucket: usize,
    ) -> Result<(), ModelError> {
        let t = b.token_ids.len();
        let pad = |v: &[u32]| {
            let mut p = v.to_vec();
            p.resize(bucket, 0);
            p
        };
        let mut slots = b.slot_mapping.to_vec();
        slots.resize(bucket, -1); // padded rows write no cache slot
        let (tables, ctx) = decode_tables(b, g.table_width, bucket);
        let st = &mut g.staging;
        st.begin()?;
        // The order and lengths of these pushes are the same every step of the bucket: the
        // arrays land where the graph's kernels read them.
        let inputs = StepInputs {
            ids: st.push_u32(&pad(b.token_ids), "token_ids")?,
            positions: st.push_u32(&pad(b.positions), "positions")?,
            rows: st.push_u32(&pad(b.logits_indices), "logits_indices")?,
            slots: st.push_indices(&slots)?,
            attention: StepAttention::Decode(st.push_decode_metadata(
                &tables,
                g.table_width,
                &ctx,
                self.cache_config.block_size,
                self.cache_config.num_blocks,
                self.config.sliding_window,
            )?),
            tokens: bucket,
            one_token_per_seq: true, // graph_bucket: one token per sequence, padding alike
        };
        debug_assert!(t <= bucket);
        st.upload(&self.gpu)?;
        if let Some(graph) = &g.graph {
            graph.launch()?;
            return Ok(());
        }
        // First step of the bucket: run it (allocating the bucket's buffers and scratch,
        // loading kernels), then capture the same launches for later steps.
        self.launch_step(&inputs, &mut g.buffers, &mut g.decoder)?;
        if g.capture_error.is_none() {
            kernels_cuda::graph::begin_capture(&self.gpu)?;
            let r = self.launch_step(&inputs, &mut g.buffers, &mut g.decoder);
            let graph = kernels_cuda::graph::end_capture(&self.gpu);
            match (r, graph) {
                (Ok(()), Ok(Some(graph))) => g.graph = Some(graph),
                (Ok(()), Ok(None)) => g.capture_error = Some("nothing captured".into()),
                (Err(e), _) => g.capture_error = Some(e.to_string()),
                (_, Err(e)) => g.capture_error = Some(e.to_string()),
            }
        }
        Ok(())
    }

    /// The logits of the last step (`[rows][vocab]` bf16; a graph step's buffer has its
    /// bucket's rows, the first ones the step's).
    fn step_logits(&self) -> Result<&CudaSlice<bf16>, ModelError> {
        match self.last_graph_bucket {
            Some(bucket) => self
                .graph_steps
                .get(&bucket)
                .and_then(|g| g.buffers.logits.as_ref()),
            None => self.buffers.logits.as_ref(),
        }
        .ok_or_else(missing)
    }

    /// Runs small batches' linear layers through cuBLAS instead of the GEMV kernels (for
    /// comparisons; `KVSERVE_GEMV=0` does the same at construction).
    pub fn set_small_batch_gemv(&mut self, on: bool) {
        self.gemv = on;
        self.graph_steps.clear();
    }

    /// Which steps of the GEMV path fold the RMSNorms into the products (for comparisons;
    /// `KVSERVE_FUSED_NORM` at construction, see [`FusedNorm`]).
    pub fn set_fused_norm(&mut self, mode: FusedNorm) {
        self.fused_norm = mode;
        self.graph_steps.clear();
    }

    /// Folds RoPE and the cache write into the decode attention launch in decode steps, or
    /// launches `rope_and_cache` apart (the default; `KVSERVE_FOLD_ROPE=1` at construction
    /// folds). The logits are the same bit for bit.
    pub fn set_fold_rope(&mut self, on: bool) {
        self.fold_rope = on;
        self.graph_steps.clear();
    }

    /// Runs prompt chunks' attention through the decode kernel, one row per token, instead
    /// of the prefill kernel (for comparisons; `KVSERVE_PREFILL_KERNEL=0` at construction).
    pub fn set_prefill_kernel(&mut self, on: bool) {
        self.prefill = on;
    }

    /// The kernel modules compiled (or found in the disk cache) at construction, and how
    /// long that took.
    pub fn preloaded(&self) -> (Preloaded, Duration) {
        self.preloaded
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The step as a prefill batch, when it has a sequence of more than one token, the
    /// prefill kernel runs this cache's dtype and is on (`KVSERVE_PREFILL_KERNEL=0` turns it
    /// off), and every sequence's tokens are the last of its context (as the engine sends
    /// them); `None` otherwise.
    fn prefill_metadata(
        &self,
        b: &ForwardBatch<'_>,
    ) -> Result<Option<PrefillMetadata>, ModelError> {
        let n = b.num_seqs();
        let chunked = (0..n).any(|s| b.seq_starts[s + 1] - b.seq_starts[s] > 1);
        if !self.prefill
            || !chunked
            || !kernels_cuda::Variant::tensor_core_prefill(Scalar::Bf16, self.layout.dtype())
        {
            return Ok(None);
        }
        let trailing = (0..n).all(|s| {
            let (start, end) = (b.seq_starts[s] as usize, b.seq_starts[s + 1] as usize);
            let ctx = i64::from(b.context_lens[s]);
            (start..end).all(|i| i64::from(b.positions[i]) == ctx - (end - i) as i64)
        });
        if !trailing {
            return Ok(None);
        }
        let query_starts: Vec<i32> = b.seq_starts.iter().map(|&x| x as i32).collect();
        let batch = PrefillBatch {
            block_tables: b.block_tables,
            max_blocks: b.max_blocks,
            query_starts: &query_starts,
            context_lens: b.context_lens,
            block_size: self.cache_config.block_size,
            num_blocks: self.cache_config.num_blocks,
            window: self.config.sliding_window,
        };
        Ok(Some(PrefillMetadata::new(&self.gpu, &batch)?))
    }

    /// Per-token attention metadata: token `i` of sequence `s` reads `s`'s block table up to
    /// its own position (causal; the step's K/V is written before attention).
    fn token_metadata(&self, b: &ForwardBatch<'_>) -> Result<DecodeMetadata, ModelError> {
        let t = b.token_ids.len();
        let mb = b.max_blocks.max(1);
        let (tables, ctx) = decode_tables(b, mb, t);
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
        logits.clear();
        if !self.run_step(b)? {
            return Ok(());
        }
        let n = b.logits_indices.len() * self.config.vocab_size;
        let out = self.step_logits()?;
        let host = self
            .gpu
            .stream()
            .clone_dtoh(&out.slice(..n))
            .map_err(kernels_cuda::KernelError::from)?;
        logits.extend(host.iter().map(|x| x.to_f32()));
        Ok(())
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn forward_sampled(
        &mut self,
        b: &ForwardBatch<'_>,
        rows: &[RowSampling<'_>],
        sample_vocab: usize,
        tokens: &mut Vec<Option<u32>>,
    ) -> Result<(), ModelError> {
        tokens.clear();
        if rows.len() != b.logits_indices.len() {
            return Err(ModelError::InvalidBatch {
                field: "rows",
                reason: format!(
                    "{} sampling rows for {} logits rows",
                    rows.len(),
                    b.logits_indices.len()
                ),
            });
        }
        // Checked before the step runs, so a bad row writes nothing to the cache.
        for (i, r) in rows.iter().enumerate() {
            r.check().map_err(|reason| ModelError::InvalidBatch {
                field: "rows",
                reason: format!("row {i}: {reason}"),
            })?;
        }
        if !self.run_step(b)? {
            return Ok(());
        }
        let out = self.step_logits()?;
        tokens.extend(kernels_cuda::sample_rows(
            &self.gpu,
            out,
            self.config.vocab_size,
            sample_vocab,
            rows,
        )?);
        Ok(())
    }

    fn copy_blocks(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        let n = self.cache_config.num_blocks;
        check(copies, n, n)?;
        if copies.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(usize, usize)> = copies
            .iter()
            .map(|op| (op.src.index(), op.dst.index()))
            .collect();
        let copies = kernels_cuda::BlockCopies::new(&self.gpu, &pairs)?;
        let bb = self.layout.kv_block_bytes();
        for cache in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            kernels_cuda::copy_blocks(&self.gpu, cache, bb, &copies)?;
        }
        Ok(())
    }

    fn swap_out(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        check(
            copies,
            self.cache_config.num_blocks,
            self.cache_config.num_cpu_blocks,
        )?;
        if copies.is_empty() {
            return Ok(());
        }
        let bb = self.layout.kv_block_bytes();
        let s = self.gpu.stream().clone();
        for (dev, host) in self
            .k_cache
            .iter()
            .zip(self.host_k.iter_mut())
            .chain(self.v_cache.iter().zip(self.host_v.iter_mut()))
        {
            let host = host_blocks(host)?;
            for op in copies {
                let (src, dst) = (op.src.index() * bb, op.dst.index() * bb);
                s.memcpy_dtoh(&dev.slice(src..src + bb), &mut host[dst..dst + bb])
                    .map_err(kernels_cuda::KernelError::from)?;
            }
        }
        // The blocks are freed on the device after this returns: the copies must be done.
        s.synchronize().map_err(kernels_cuda::KernelError::from)?;
        Ok(())
    }

    fn swap_in(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        check(
            copies,
            self.cache_config.num_cpu_blocks,
            self.cache_config.num_blocks,
        )?;
        if copies.is_empty() {
            return Ok(());
        }
        let bb = self.layout.kv_block_bytes();
        let s = self.gpu.stream().clone();
        for (dev, host) in self
            .k_cache
            .iter_mut()
            .zip(self.host_k.iter_mut())
            .chain(self.v_cache.iter_mut().zip(self.host_v.iter_mut()))
        {
            let host = host_blocks(host)?;
            for op in copies {
                let (src, dst) = (op.src.index() * bb, op.dst.index() * bb);
                // Pinned source: asynchronous; stream order puts it before the next forward,
                // and the host blocks are only written again by a later swap_out on this
                // stream.
                s.memcpy_htod(&host[src..src + bb], &mut dev.slice_mut(dst..dst + bb))
                    .map_err(kernels_cuda::KernelError::from)?;
            }
        }
        Ok(())
    }
}

/// Per-token block tables (`[rows][width]`) and context lengths: token `i` of sequence `s`
/// reads `s`'s table up to its own position (causal; the step's K/V is written before
/// attention). Rows past the batch's tokens (padding) read a context of 1 in block 0; entries
/// past a token's position are 0 (the kernel reads only attended blocks, which validate_batch
/// checked). `width` is at least `b.max_blocks`.
fn decode_tables(b: &ForwardBatch<'_>, width: usize, rows: usize) -> (Vec<i32>, Vec<i32>) {
    let mut tables = vec![0i32; rows * width];
    let mut ctx = vec![1i32; rows];
    for s in 0..b.num_seqs() {
        let row = &b.block_tables[s * b.max_blocks..(s + 1) * b.max_blocks];
        for i in b.seq_starts[s] as usize..b.seq_starts[s + 1] as usize {
            for (dst, &src) in tables[i * width..i * width + b.max_blocks]
                .iter_mut()
                .zip(row)
            {
                *dst = src.max(0);
            }
            ctx[i] = b.positions[i] as i32 + 1;
        }
    }
    (tables, ctx)
}

/// The host blocks of one layer's swap space.
fn host_blocks(host: &mut Option<PinnedHostSlice<u8>>) -> Result<&mut [u8], ModelError> {
    host.as_mut()
        .ok_or_else(|| ModelError::Unsupported("swapping without host blocks".into()))?
        .as_mut_slice()
        .map_err(|e| kernels_cuda::KernelError::from(e).into())
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
