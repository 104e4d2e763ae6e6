//! Paged decode attention: one query token per sequence over its cached context.
#![allow(unsafe_code)]

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, ValidAsZeroBits};
use kv_quant::BlockLayout;
use rustc_hash::FxHashMap;

use crate::cache::{LayerCache, RopeCacheShapes, Rotary, check_rope_cache, rope_and_cache};
use crate::compile::{HEAD_DIMS, MAX_GQA_GROUP, Program, Scalar, Variant};
use crate::device::Gpu;
use crate::error::{KernelError, Result, bad};
use crate::indices::{DeviceArray, Indices};
use crate::launch::{
    KvCacheGeometry, KvTensorMapShape, Launch, TensorMapArg, encode_kv_tensor_map,
    kv_tensor_map_shape,
};
use crate::layers::RopeShape;

/// An activation type the kernels read and write (q, k, v, attention output).
pub trait ActScalar: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin {
    /// Which kernel variant reads it.
    const SCALAR: Scalar;
    /// 1 in this type.
    const ONE: Self;
    /// 0 in this type.
    const ZERO: Self;
}

impl ActScalar for half::f16 {
    const SCALAR: Scalar = Scalar::F16;
    const ONE: Self = half::f16::ONE;
    const ZERO: Self = half::f16::ZERO;
}

impl ActScalar for half::bf16 {
    const SCALAR: Scalar = Scalar::Bf16;
    const ONE: Self = half::bf16::ONE;
    const ZERO: Self = half::bf16::ZERO;
}

const KERNEL: &str = "paged_decode";
/// Dynamic shared memory a decode CTA may use without opting in to more: the 48 KiB default
/// less room for the kernel's static shared memory.
const SMEM_LIMIT: usize = 48 * 1024 - 1024;
/// Tokens one CTA iteration covers (`kTokensPerIter * kUnroll` of the kernel for head_dim
/// 64); partitions are multiples of it.
const PARTITION_QUANTUM: usize = 64;

/// The per-step metadata of a decode batch, validated and on the device: block tables and
/// context lengths. Build it once per step and reuse it for every layer.
#[derive(Debug)]
pub struct DecodeMetadata {
    block_tables: DeviceArray<i32>,
    context_lens: DeviceArray<i32>,
    num_seqs: usize,
    max_blocks: usize,
    block_size: usize,
    num_blocks: usize,
    window: Option<usize>,
    /// Longest context after the window.
    max_attended: usize,
}

/// What [`DecodeMetadata::new`] checks on the host, before the values are on the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckedDecodeBatch {
    num_seqs: usize,
    max_blocks: usize,
    block_size: usize,
    num_blocks: usize,
    window: Option<usize>,
    max_attended: usize,
}

impl CheckedDecodeBatch {
    /// The checks of [`DecodeMetadata::new`].
    pub(crate) fn new(
        block_tables: &[i32],
        max_blocks: usize,
        context_lens: &[i32],
        block_size: usize,
        num_blocks: usize,
        window: Option<usize>,
    ) -> Result<Self> {
        let tables = Tables {
            kernel: KERNEL,
            block_tables,
            num_seqs: context_lens.len(),
            max_blocks,
            block_size,
            num_blocks,
            window,
        };
        tables.check()?;
        let mut max_attended = 0;
        for (s, &ctx) in context_lens.iter().enumerate() {
            if ctx < 1 || ctx as usize > max_blocks * block_size {
                return Err(bad(
                    KERNEL,
                    format!(
                        "sequence {s}: context length {ctx} outside 1..={}",
                        max_blocks * block_size
                    ),
                ));
            }
            let ctx = ctx as usize;
            let first = window.map_or(0, |w| ctx.saturating_sub(w));
            max_attended = max_attended.max(ctx - first);
            tables.check_row(s, first, ctx)?;
        }
        Ok(Self {
            num_seqs: tables.num_seqs,
            max_blocks,
            block_size,
            num_blocks,
            window,
            max_attended,
        })
    }

    /// The metadata over device copies of the checked values.
    pub(crate) fn with_device(
        self,
        block_tables: DeviceArray<i32>,
        context_lens: DeviceArray<i32>,
    ) -> DecodeMetadata {
        DecodeMetadata {
            block_tables,
            context_lens,
            num_seqs: self.num_seqs,
            max_blocks: self.max_blocks,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            window: self.window,
            max_attended: self.max_attended,
        }
    }
}

impl DecodeMetadata {
    /// Checks and uploads `block_tables` (`[num_seqs][max_blocks]`, row-major) and
    /// `context_lens` (`[num_seqs]`, each `1..=max_blocks * block_size`). Every block a
    /// sequence attends to (inside its window) must be in `0..num_blocks`; entries past its
    /// context are ignored.
    ///
    /// # Errors
    /// [`KernelError::BadArgument`] naming the first problem; driver errors.
    pub fn new(
        gpu: &Gpu,
        block_tables: &[i32],
        max_blocks: usize,
        context_lens: &[i32],
        block_size: usize,
        num_blocks: usize,
        window: Option<usize>,
    ) -> Result<Self> {
        let checked = CheckedDecodeBatch::new(
            block_tables,
            max_blocks,
            context_lens,
            block_size,
            num_blocks,
            window,
        )?;
        let stream = gpu.stream();
        Ok(checked.with_device(
            DeviceArray::Owned(stream.clone_htod(block_tables)?),
            DeviceArray::Owned(stream.clone_htod(context_lens)?),
        ))
    }

    /// Sequences in the batch.
    pub fn num_seqs(&self) -> usize {
        self.num_seqs
    }
}

/// Which decode-attention kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeKernel {
    /// `paged_attention.cu`: CUDA cores, every KV dtype. Runs what the tensor-core kernel
    /// does not (mixed 16-bit types); `KVSERVE_DECODE_KERNEL=split` forces it.
    Split,
    /// `paged_attention_tc.cu`: tensor cores, cp.async tiles; 16-bit KV of the activation
    /// type, int8, fp8 and int4 (mixed 16-bit types run `Split`). The default: 1.1–1.4×
    /// faster than `Split` on an H200 for 16-bit and 8-bit KV (BENCHMARKS.md). One launch:
    /// the last CTA of a sequence's KV head merges its partitions (no reduce kernel).
    #[default]
    TensorCore,
}

impl DecodeKernel {
    /// The kernel `KVSERVE_DECODE_KERNEL` names (`tc` or `split`), else the default.
    pub fn from_env() -> Self {
        match std::env::var("KVSERVE_DECODE_KERNEL").as_deref() {
            Ok("split") => Self::Split,
            Ok("tc") => Self::TensorCore,
            _ => Self::default(),
        }
    }
}

/// Runs decode attention, keeping the scratch buffers of split-KV between calls.
///
/// The tensor-core kernel merges a sequence's partitions in the last CTA of each (sequence,
/// KV head) to finish, counted in `counters`: zero when allocated, and every launch leaves
/// them zero (the merging CTA resets its counter), so they are never cleared again. Launches
/// through one decoder are ordered (one stream), so no two of them share the counters.
#[derive(Debug)]
pub struct PagedDecoder {
    tmp_out: Option<CudaSlice<f32>>,
    max_logits: Option<CudaSlice<f32>>,
    exp_sums: Option<CudaSlice<f32>>,
    /// Finished partitions per (sequence, KV head), `[num_seqs][num_kv_heads]` (tensor-core
    /// kernel).
    counters: Option<CudaSlice<u32>>,
    forced_partition: Option<usize>,
    /// Partitions per sequence fixed by the caller, sizes chosen on the device
    /// ([`PagedDecoder::set_fixed_parts`]).
    fixed_parts: Option<usize>,
    kernel: DecodeKernel,
    /// The TMA tensor maps encoded so far (a tensor-core kernel built with `-DKVS_TC_TMA=1`),
    /// per cache buffer and shape: one driver call per cache, not per launch.
    tensor_maps: FxHashMap<KvTensorMapShape, TensorMapArg>,
}

/// Tensor maps kept at most (a model's layers times K and V, with room for tests): past it the
/// cache starts over, so buffers freed and reallocated elsewhere do not pile up.
const MAX_TENSOR_MAPS: usize = 1024;

impl Default for PagedDecoder {
    fn default() -> Self {
        Self {
            tmp_out: None,
            max_logits: None,
            exp_sums: None,
            counters: None,
            forced_partition: None,
            fixed_parts: None,
            kernel: DecodeKernel::from_env(),
            tensor_maps: FxHashMap::default(),
        }
    }
}

/// The tensor-core kernel's partitions are multiples of this: tokens per warp tile (16) times
/// warps per CTA (2 or 4, `KVS_TC_WARPS`; the module exports its own, checked to divide this).
const TC_QUANTUM: usize = 64;

/// How one call is split (what [`PagedDecoder::run`] chose and returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// Tokens per partition (one CTA each, per KV head and sequence); 0: chosen on the device
    /// per sequence ([`PagedDecoder::set_fixed_parts`]).
    pub partition_size: usize,
    /// Partitions of the longest context.
    pub max_parts: usize,
}

/// Partitions per sequence for a grid of about two CTAs per SM (what the host plan
/// aims at for the tensor-core kernel) for `num_seqs` sequences of `num_kv_heads` KV heads,
/// whatever their contexts: the value for [`PagedDecoder::set_fixed_parts`].
pub fn fixed_parts_for(gpu: &Gpu, num_seqs: usize, num_kv_heads: usize) -> usize {
    parts_for_two_ctas_per_sm(gpu.num_sms(), num_seqs * num_kv_heads).min(65_535)
}

/// Partitions per (sequence, KV head) pair for about two CTAs per SM over `ctas` pairs.
fn parts_for_two_ctas_per_sm(num_sms: usize, ctas: usize) -> usize {
    (2 * num_sms).div_ceil(ctas.max(1)).max(1)
}

/// `ctx` tokens in partitions of `p` tokens.
fn split_into(ctx: usize, p: usize) -> DecodePlan {
    DecodePlan {
        partition_size: p,
        max_parts: ctx.div_ceil(p),
    }
}

/// The first plan of both kernels: about two CTAs per SM over `ctas` pairs, partitions a
/// multiple of `quantum` and at most `max_p` tokens.
fn two_ctas_per_sm(
    ctx: usize,
    ctas: usize,
    num_sms: usize,
    quantum: usize,
    max_p: usize,
) -> DecodePlan {
    let parts = parts_for_two_ctas_per_sm(num_sms, ctas);
    split_into(
        ctx,
        ctx.div_ceil(parts)
            .next_multiple_of(quantum)
            .clamp(quantum, max_p),
    )
}

/// How the tensor-core kernel splits a batch whose longest context attends `ctx` tokens over
/// `ctas` (sequence, KV head) pairs, on `num_sms` SMs that each hold `ctas_per_sm` of its CTAs
/// (`forced`: a partition size asked for, used as it is).
///
/// First choice, measured on an H200 with 2-warp CTAs (BENCHMARKS.md): about 2 CTAs per SM and
/// partitions of at most 1,024 tokens (finer splits pay their prologue, partial results and
/// merge). But where those CTAs would not fit one wave while the pairs alone do, a second,
/// partial wave would leave most SMs idle behind a few CTAs: then the partitions are made as
/// long as needed for one wave, if that wave still fills at least 3/4 of the device's CTA
/// slots (16 x 4K with 4-warp CTAs, 3 per SM: 3 partitions of 1,408 tokens, 384 CTAs in 396
/// slots, instead of 4 of 1,024 in two waves).
fn plan_tensor_core(
    ctx: usize,
    ctas: usize,
    num_sms: usize,
    ctas_per_sm: usize,
    forced: Option<usize>,
) -> DecodePlan {
    let ctx = ctx.max(1);
    let ctas = ctas.max(1);
    if let Some(p) = forced {
        return split_into(ctx, p.next_multiple_of(TC_QUANTUM));
    }
    let first = two_ctas_per_sm(ctx, ctas, num_sms, TC_QUANTUM, 1024);
    let slots = (num_sms * ctas_per_sm).max(1);
    let one_wave_parts = slots / ctas;
    if ctas * first.max_parts <= slots
        || one_wave_parts == 0
        || 4 * ctas * one_wave_parts < 3 * slots
    {
        return first;
    }
    split_into(
        ctx,
        ctx.div_ceil(one_wave_parts).next_multiple_of(TC_QUANTUM),
    )
}

impl PagedDecoder {
    /// A decoder with no scratch yet, running the kernel `KVSERVE_DECODE_KERNEL` names (the
    /// tensor-core kernel by default, where it applies).
    pub fn new() -> Self {
        Self::default()
    }

    /// Chooses the kernel (for the batches it supports; others run the split kernel).
    pub fn set_kernel(&mut self, kernel: DecodeKernel) {
        self.kernel = kernel;
    }

    /// The kernel that runs for activations of `scalar` over a cache of `dtype`.
    pub fn kernel_for(&self, scalar: Scalar, dtype: kv_quant::KvCacheDtype) -> DecodeKernel {
        match self.kernel {
            DecodeKernel::TensorCore if Variant::tensor_core_decode(scalar, dtype) => {
                DecodeKernel::TensorCore
            }
            _ => DecodeKernel::Split,
        }
    }

    /// Forces the partition size (a positive multiple of 64; `None`: automatic). For tests of
    /// the split path and for tuning.
    ///
    /// # Errors
    /// [`KernelError::BadArgument`] for a size that is not a positive multiple of 64.
    pub fn set_partition_size(&mut self, size: Option<usize>) -> Result<()> {
        if let Some(p) = size
            && (p == 0 || !p.is_multiple_of(PARTITION_QUANTUM))
        {
            return Err(bad(
                KERNEL,
                format!("partition size {p} is not a positive multiple of {PARTITION_QUANTUM}"),
            ));
        }
        self.forced_partition = size;
        Ok(())
    }

    /// Fixes the grid at `parts` partitions per sequence (`None`: planned on the host from the
    /// batch's longest context, the default). The tensor-core kernel then sizes each
    /// sequence's partitions itself, from its own context: its attended tokens over `parts`,
    /// rounded up to 32 (a short context uses fewer partitions; the grid's other CTAs return
    /// at once). The launch then depends on nothing but the batch's shape, as a CUDA graph
    /// needs. The split kernel ignores this (its partitions must fit shared memory).
    /// [`fixed_parts_for`] gives the value the host plan aims at for a batch size.
    ///
    /// # Errors
    /// [`KernelError::BadArgument`] for 0 or more than 65,535 partitions (the grid's z).
    pub fn set_fixed_parts(&mut self, parts: Option<usize>) -> Result<()> {
        if let Some(p) = parts
            && !(1..=65_535).contains(&p)
        {
            return Err(bad(KERNEL, format!("{p} fixed partitions (1..=65535)")));
        }
        self.fixed_parts = parts;
        Ok(())
    }

    /// The TMA tensor map of `cache` (one layer's K or V cache of `layout`, `num_blocks`
    /// blocks addressed), encoded once per buffer and shape; [`TensorMapArg::UNUSED`] for
    /// blocks of fewer than 8 tokens (the kernel loads those by cp.async).
    ///
    /// # Errors
    /// What [`kv_tensor_map_shape`] refuses; driver errors.
    fn tensor_map(
        &mut self,
        gpu: &Gpu,
        layout: &BlockLayout,
        num_blocks: usize,
        cache: &CudaSlice<u8>,
    ) -> Result<TensorMapArg> {
        // Event tracking is off for the crate's context (device.rs): the guard does nothing.
        let (address, _guard) = cache.device_ptr(gpu.stream());
        let geometry = KvCacheGeometry::of(layout, num_blocks, cache.len(), address);
        let Some(shape) = kv_tensor_map_shape(KERNEL, &geometry)? else {
            return Ok(TensorMapArg::UNUSED);
        };
        if let Some(map) = self.tensor_maps.get(&shape) {
            return Ok(*map);
        }
        let map = encode_kv_tensor_map(gpu, &shape)?;
        if self.tensor_maps.len() >= MAX_TENSOR_MAPS {
            self.tensor_maps.clear();
        }
        self.tensor_maps.insert(shape, map);
        Ok(map)
    }

    /// How a batch is split for the split kernel: enough CTAs to fill the device (2 per SM),
    /// partitions as long as possible within the shared memory of one CTA.
    fn plan_split(
        &self,
        gpu: &Gpu,
        meta: &DecodeMetadata,
        num_kv_heads: usize,
        gqa_group: usize,
        head_dim: usize,
    ) -> DecodePlan {
        let ctx = meta.max_attended.max(1);
        let ctas = meta.num_seqs * num_kv_heads;
        let max_p = ((SMEM_LIMIT / 4 - gqa_group * head_dim) / gqa_group.max(1))
            / PARTITION_QUANTUM
            * PARTITION_QUANTUM;
        match self.forced_partition {
            Some(p) => split_into(ctx, p.min(max_p)),
            None => two_ctas_per_sm(ctx, ctas, gpu.num_sms(), PARTITION_QUANTUM, max_p),
        }
    }

    /// `out[s][h] = softmax(q[s][h] · K_s / sqrt(head_dim)) · V_s` for each sequence `s` of
    /// `meta` and query head `h`, reading K and V of one layer through the block tables.
    /// `q` and `out` are `[num_seqs][num_heads][head_dim]`; `k_cache` and `v_cache` hold
    /// `num_blocks` blocks of `layout`.
    ///
    /// # Errors
    /// [`KernelError::BadArgument`] for shapes that do not fit (checked before launching),
    /// [`KernelError::Unsupported`] for a head_dim or GQA group without a kernel, compile and
    /// driver errors.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: ActScalar>(
        &mut self,
        gpu: &Gpu,
        meta: &DecodeMetadata,
        layout: &BlockLayout,
        num_heads: usize,
        q: &CudaSlice<T>,
        k_cache: &CudaSlice<u8>,
        v_cache: &CudaSlice<u8>,
        out: &mut CudaSlice<T>,
    ) -> Result<DecodePlan> {
        let bufs = DecodeBuffers {
            q,
            k_cache,
            v_cache,
            out,
        };
        self.launch(gpu, meta, layout, num_heads, bufs, None)
    }

    /// [`crate::rope_and_cache`] then [`PagedDecoder::run`] over its result, in one launch
    /// where the tensor-core kernel runs, with the same cache bytes and `out` bit for bit:
    /// each CTA rotates its query rows as it loads them, and the CTA whose partition holds a
    /// row's new token rotates that token's K row and writes it, quantized, and its V row into
    /// the token's slot (one KV head per CTA) before it loads its tiles. The split kernel runs
    /// the two calls.
    ///
    /// `q` (`[num_seqs][num_heads][head_dim]`) comes unrotated, as the Q/K/V product leaves
    /// it, and `new` holds the rows' K and V, positions and slots (one row per sequence of
    /// `meta`). Each row must be its sequence's only new token, at position `context_len - 1`,
    /// in the slot its block table gives that position, in a block no other row attends: a
    /// decode step as the engine builds it. (With several tokens of one sequence in a batch,
    /// one row would attend another's token before it is written: call
    /// [`crate::rope_and_cache`] and [`PagedDecoder::run`].) Afterwards `q` holds the rotated
    /// queries (split kernel) or the unrotated ones (tensor-core kernel): use neither.
    ///
    /// # Errors
    /// Everything [`PagedDecoder::run`] and [`crate::rope_and_cache`] refuse, and rows other
    /// than the metadata's sequences or a rotary shape of other than `num_heads` query heads:
    /// [`KernelError::BadArgument`] (or [`KernelError::Unsupported`]) before any launch;
    /// compile and driver errors.
    pub fn run_with_rope<T: ActScalar>(
        &mut self,
        gpu: &Gpu,
        meta: &DecodeMetadata,
        num_heads: usize,
        q: &mut CudaSlice<T>,
        new: NewTokens<'_, T>,
        out: &mut CudaSlice<T>,
    ) -> Result<DecodePlan> {
        let NewTokens {
            rotary,
            k,
            v,
            slot_mapping,
            cache,
        } = new;
        let layout = cache.layout;
        let shapes = RopeCacheShapes::of(&rotary, q, k, v, slot_mapping, &cache);
        let launch = LaunchShapes::decode(meta, num_heads, q, out, cache.k, cache.v);
        check_new_tokens(layout, &rotary.shape, &shapes, &launch)?;
        if self.kernel_for(T::SCALAR, layout.dtype()) == DecodeKernel::Split {
            let (kc, vc) = (cache.k, cache.v);
            let dest = LayerCache {
                layout,
                k: &mut *kc,
                v: &mut *vc,
            };
            rope_and_cache(gpu, &rotary, q, k, v, slot_mapping, dest)?;
            return self.run(gpu, meta, layout, num_heads, q, kc, vc, out);
        }
        let fold = FoldedRope {
            k,
            v,
            positions: rotary.positions,
            inv_freq: rotary.inv_freq,
            slot_mapping,
            interleaved: i32::from(rotary.shape.interleaved),
        };
        // The kernel writes the caches through these shared borrows: `cache` holds them
        // exclusively for the call.
        let bufs = DecodeBuffers {
            q,
            k_cache: cache.k,
            v_cache: cache.v,
            out,
        };
        self.launch(gpu, meta, layout, num_heads, bufs, Some(&fold))
    }

    /// [`PagedDecoder::run`] over `bufs`, with `fold` (tensor-core kernel only) the folded
    /// [`crate::rope_and_cache`] of [`PagedDecoder::run_with_rope`], checked by it.
    fn launch<T: ActScalar>(
        &mut self,
        gpu: &Gpu,
        meta: &DecodeMetadata,
        layout: &BlockLayout,
        num_heads: usize,
        bufs: DecodeBuffers<'_, T>,
        fold: Option<&FoldedRope<'_, T>>,
    ) -> Result<DecodePlan> {
        let DecodeBuffers {
            q,
            k_cache,
            v_cache,
            out,
        } = bufs;
        let shapes = LaunchShapes::decode(meta, num_heads, q, out, k_cache, v_cache);
        let group = check_launch(KERNEL, layout, &shapes)?;
        let d = layout.head_dim();
        let kv_heads = layout.num_kv_heads();
        let kernel = self.kernel_for(T::SCALAR, layout.dtype());
        if fold.is_some() && kernel != DecodeKernel::TensorCore {
            return Err(bad(KERNEL, "RoPE folded into the split kernel"));
        }
        let (program, name) = match (kernel, fold) {
            (DecodeKernel::Split, _) => (Program::PagedAttention, "paged_decode_partition"),
            (DecodeKernel::TensorCore, None) => (Program::PagedAttentionTc, "paged_decode_tc"),
            (DecodeKernel::TensorCore, Some(_)) => {
                (Program::PagedAttentionTc, "paged_decode_tc_rope")
            }
        };
        let variant = Variant {
            program,
            scalar: T::SCALAR,
            dtype: layout.dtype(),
            head_dim: d,
            gqa_group: group,
        };
        let (partition, threads, smem, plan, tma) = match kernel {
            DecodeKernel::Split => {
                let plan = self.plan_split(gpu, meta, kv_heads, group, d);
                (
                    gpu.function(&variant, name)?,
                    128,
                    4 * group * (plan.partition_size + d),
                    plan,
                    false,
                )
            }
            DecodeKernel::TensorCore => {
                let (f, shape) = gpu.shaped_function(&variant, name)?;
                if shape.quantum == 0 || !TC_QUANTUM.is_multiple_of(shape.quantum as usize) {
                    return Err(KernelError::Unsupported {
                        kernel: name,
                        what: format!(
                            "{variant}: rounds of {} tokens (not a divisor of {TC_QUANTUM})",
                            shape.quantum
                        ),
                    });
                }
                let plan = match self.fixed_parts {
                    Some(parts) => DecodePlan {
                        partition_size: 0,
                        max_parts: parts,
                    },
                    None => plan_tensor_core(
                        meta.max_attended,
                        meta.num_seqs * kv_heads,
                        gpu.num_sms(),
                        shape.ctas_per_sm as usize,
                        self.forced_partition,
                    ),
                };
                (
                    f,
                    shape.threads,
                    shape.dynamic_smem as usize,
                    plan,
                    shape.tensor_maps,
                )
            }
        };
        // The TMA loader's tensor maps (a kernel built with -DKVS_TC_TMA=1), before anything
        // is allocated or launched.
        let maps = if tma {
            Some((
                self.tensor_map(gpu, layout, meta.num_blocks, k_cache)?,
                self.tensor_map(gpu, layout, meta.num_blocks, v_cache)?,
            ))
        } else {
            None
        };
        let scratch = meta.num_seqs * num_heads * plan.max_parts;
        let (tmp, maxl, sums) = (
            grow(&mut self.tmp_out, gpu, scratch * d)?,
            grow(&mut self.max_logits, gpu, scratch)?,
            grow(&mut self.exp_sums, gpu, scratch)?,
        );
        let counters = match kernel {
            DecodeKernel::TensorCore => {
                Some(grow(&mut self.counters, gpu, meta.num_seqs * kv_heads)?)
            }
            DecodeKernel::Split => None,
        };
        let cache = CacheArgs::new(layout, meta.max_blocks, meta.window);
        let p = plan.partition_size as i32;
        let max_parts = plan.max_parts as i32;
        let cfg = LaunchConfig {
            grid_dim: (kv_heads as u32, meta.num_seqs as u32, plan.max_parts as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut launch = Launch::new(gpu, &partition);
        launch
            .arg(&mut *out)
            .arg(&mut *tmp)
            .arg(&mut *maxl)
            .arg(&mut *sums)
            .arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(meta.block_tables.arg())
            .arg(meta.context_lens.arg());
        cache.push(&mut launch);
        launch.arg(&p).arg(&max_parts).arg(&cache.window);
        if let Some(counters) = counters {
            launch.arg(counters);
        }
        if let Some(f) = fold {
            // paged_decode_tc_rope: the new tokens' rows, positions, frequencies and slots.
            launch
                .arg(f.k)
                .arg(f.v)
                .arg(f.positions.device())
                .arg(f.inv_freq)
                .arg(f.slot_mapping.device())
                .arg(&f.interleaved);
        }
        if let Some((k_map, v_map)) = &maps {
            // Both entries' last parameters (KVS_TMA_PARAMS).
            launch.arg(k_map).arg(v_map);
        }
        // SAFETY: the argument list matches `paged_decode_partition` in
        // kernels/paged_attention.cu and `paged_decode_tc` / `paged_decode_tc_rope` in
        // kernels/paged_attention_tc.cu (the same list, then the tensor-core kernel's counters,
        // then the rope entry's arguments; 128 threads for the split kernel, the tensor-core
        // kernel's the threads its module exports for both entries, as their launch bounds);
        // every buffer was checked above to hold what the kernel reads or writes for this grid
        // (q/out sizes, caches of `num_blocks` blocks, block tables whose attended entries are
        // below `num_blocks`, scratch of `max_parts` partitions, a counter per (sequence, KV
        // head), zero as every earlier launch left it), and the dynamic shared memory fits:
        // the split kernel's the 48 KiB default limit (`plan_split`), the tensor-core kernel's
        // exactly what its module exports, the function's limit raised to it
        // (`shaped_function`, which refuses more than the device allows).
        // With `fold` (checked by run_with_rope: k and v of num_seqs x KV heads x head_dim,
        // a position per sequence, head_dim / 2 frequencies, a slot per sequence, every
        // non-negative one inside both caches, whose block size is a power of two) the kernel
        // also reads those and writes one (head, slot) row of K and of V per CTA that holds
        // a sequence's last token, inside the caches, which run_with_rope borrows mutably.
        // A kernel that takes tensor maps (its module says so) gets K's and V's, encoded over
        // these very buffers (address, the metadata's blocks, inside the buffers: checked by
        // kv_tensor_map_shape), or zeroed maps it does not read (blocks under 8 tokens).
        // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
        unsafe { launch.dependent().launch(cfg) }?;
        // The split kernel's partitions are merged by a second launch (the tensor-core kernel
        // merges its own).
        if kernel == DecodeKernel::Split && plan.max_parts > 1 {
            let reduce = gpu.function(&variant, "paged_decode_reduce")?;
            let heads = num_heads as i32;
            let cfg = LaunchConfig {
                grid_dim: (num_heads as u32, meta.num_seqs as u32, 1),
                block_dim: (d as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = Launch::new(gpu, &reduce);
            launch
                .arg(&mut *out)
                .arg(&*tmp)
                .arg(&*maxl)
                .arg(&*sums)
                .arg(meta.context_lens.arg())
                .arg(&heads)
                .arg(&p)
                .arg(&max_parts)
                .arg(&cache.window);
            // SAFETY: matches `paged_decode_reduce`; it reads the partitions the launch
            // above wrote (same partition size, window and context lengths) and writes `out`,
            // checked above.
            // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
            unsafe { launch.dependent().launch(cfg) }?;
        }
        Ok(plan)
    }
}

/// The new token of every decode row as the Q/K/V product leaves it (q and k unrotated, k
/// and v not yet in the cache), and where it goes: what [`crate::rope_and_cache`] rotates and
/// writes, and [`PagedDecoder::run_with_rope`] folds into the attention kernel.
#[derive(Debug)]
pub struct NewTokens<'a, T> {
    /// The rotary embedding: shapes (those of q and of the cache), each row's position (its
    /// context length - 1), the inverse frequencies.
    pub rotary: Rotary<'a>,
    /// Each row's K, `[num_seqs][num_kv_heads][head_dim]`, unrotated (left as it is).
    pub k: &'a CudaSlice<T>,
    /// Each row's V, the same shape.
    pub v: &'a CudaSlice<T>,
    /// Each row's slot (`block * block_size + offset`; negative: nothing written, e.g. the
    /// padded rows of a CUDA graph's batch).
    pub slot_mapping: &'a Indices<i64>,
    /// The layer's caches and their layout: written at the slots, then attended.
    pub cache: LayerCache<'a>,
}

/// The buffers of one decode launch: `[num_seqs][num_heads][head_dim]` queries and outputs,
/// one layer's caches.
struct DecodeBuffers<'a, T> {
    q: &'a CudaSlice<T>,
    k_cache: &'a CudaSlice<u8>,
    v_cache: &'a CudaSlice<u8>,
    out: &'a mut CudaSlice<T>,
}

/// The arguments of the RoPE + cache write folded into a tensor-core launch, checked by
/// [`check_new_tokens`].
struct FoldedRope<'a, T> {
    k: &'a CudaSlice<T>,
    v: &'a CudaSlice<T>,
    positions: &'a Indices<i32>,
    inv_freq: &'a CudaSlice<f32>,
    slot_mapping: &'a Indices<i64>,
    /// 1: pairs (2i, 2i + 1); 0: (i, i + head_dim / 2).
    interleaved: i32,
}

/// The checks of [`PagedDecoder::run_with_rope`]: everything [`PagedDecoder::run`] checks of
/// `launch` and [`crate::rope_and_cache`] of `shape` and `rope`, one new token per row of the
/// metadata, and the rotary's query heads those of the launch.
///
/// # Errors
/// [`KernelError::BadArgument`] or [`KernelError::Unsupported`] naming the first problem.
pub(crate) fn check_new_tokens(
    layout: &BlockLayout,
    shape: &RopeShape,
    rope: &RopeCacheShapes,
    launch: &LaunchShapes,
) -> Result<()> {
    check_launch(KERNEL, layout, launch)?;
    check_rope_cache(layout, shape, rope)?;
    if rope.rows.tokens != launch.rows || shape.num_q_heads != launch.num_heads {
        return Err(bad(
            KERNEL,
            format!(
                "{} new tokens of {} query heads for {} sequences of {}",
                rope.rows.tokens, shape.num_q_heads, launch.rows, launch.num_heads
            ),
        ));
    }
    Ok(())
}

/// The scalar arguments both attention kernels take after the block tables, in their order:
/// softmax scale, KV heads, block size and its log2, bytes of a block, entries per table row
/// (pushed by [`CacheArgs::push`]); and the window (0: none), which comes later.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheArgs {
    scale: f32,
    num_kv_heads: i32,
    block_size: i32,
    block_shift: i32,
    block_bytes: i64,
    max_blocks: i32,
    /// Sliding window in tokens, 0 without one.
    pub(crate) window: i32,
}

impl CacheArgs {
    /// The arguments for caches of `layout` read through tables of `max_blocks` entries (sizes
    /// checked to fit by [`Tables::check`]).
    pub(crate) fn new(layout: &BlockLayout, max_blocks: usize, window: Option<usize>) -> Self {
        Self {
            scale: 1.0 / (layout.head_dim() as f32).sqrt(),
            num_kv_heads: layout.num_kv_heads() as i32,
            block_size: layout.block_size() as i32,
            block_shift: layout.block_size().trailing_zeros() as i32,
            block_bytes: layout.kv_block_bytes() as i64,
            max_blocks: max_blocks as i32,
            window: window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
        }
    }

    /// Pushes scale, num_kv_heads, block_size, block_shift, block_bytes and max_blocks.
    pub(crate) fn push<'a>(&'a self, launch: &mut Launch<'a>) {
        launch
            .arg(&self.scale)
            .arg(&self.num_kv_heads)
            .arg(&self.block_size)
            .arg(&self.block_shift)
            .arg(&self.block_bytes)
            .arg(&self.max_blocks);
    }
}

/// A batch's block tables as a launcher receives them; the checks the decode and prefill
/// metadata share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tables<'a> {
    /// The kernel named in errors.
    pub(crate) kernel: &'static str,
    /// `[num_seqs][max_blocks]` block ids, row-major.
    pub(crate) block_tables: &'a [i32],
    pub(crate) num_seqs: usize,
    pub(crate) max_blocks: usize,
    /// Tokens per block.
    pub(crate) block_size: usize,
    /// Blocks in the cache.
    pub(crate) num_blocks: usize,
    /// Sliding window, if any.
    pub(crate) window: Option<usize>,
}

impl Tables<'_> {
    /// A non-empty batch, a power-of-two block size, tables of `num_seqs x max_blocks`
    /// entries, sizes that fit 32-bit indices, no empty window.
    ///
    /// # Errors
    /// [`KernelError::BadArgument`] naming the first problem.
    pub(crate) fn check(&self) -> Result<()> {
        let (k, n, mb, bs) = (self.kernel, self.num_seqs, self.max_blocks, self.block_size);
        if n == 0 {
            return Err(bad(k, "empty batch (no context lengths)"));
        }
        if !bs.is_power_of_two() || bs > 1024 {
            return Err(bad(
                k,
                format!("block_size {bs} is not a power of two <= 1024"),
            ));
        }
        if mb == 0 || self.block_tables.len() != n * mb {
            return Err(bad(
                k,
                format!(
                    "block_tables has {} entries, expected {n} x {mb}",
                    self.block_tables.len()
                ),
            ));
        }
        if self.num_blocks > i32::MAX as usize || mb.saturating_mul(bs) > i32::MAX as usize {
            return Err(bad(k, "cache or table too large for 32-bit indices"));
        }
        if self.window == Some(0) {
            return Err(bad(k, "a sliding window of 0 tokens"));
        }
        Ok(())
    }

    /// Every table entry of sequence `s` holding a position in `first..ctx` is a block of the
    /// cache (`ctx` at most `max_blocks * block_size`).
    ///
    /// # Errors
    /// [`KernelError::BadArgument`] naming the first entry outside the cache.
    pub(crate) fn check_row(&self, s: usize, first: usize, ctx: usize) -> Result<()> {
        let (mb, bs) = (self.max_blocks, self.block_size);
        let row = &self.block_tables[s * mb..(s + 1) * mb];
        for (j, &b) in row
            .iter()
            .enumerate()
            .take(ctx.div_ceil(bs))
            .skip(first / bs)
        {
            if b < 0 || b as usize >= self.num_blocks {
                return Err(bad(
                    self.kernel,
                    format!(
                        "sequence {s}: block table entry {j} is {b}, outside 0..{}",
                        self.num_blocks
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Buffer lengths of one attention launch over the paged cache, checked by [`check_launch`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct LaunchShapes {
    /// Rows of q and out: sequences (decode) or query tokens (prefill).
    pub(crate) rows: usize,
    /// What a row is, for errors ("seqs", "tokens").
    pub(crate) row_name: &'static str,
    pub(crate) num_heads: usize,
    /// Elements of q and out.
    pub(crate) q: usize,
    pub(crate) out: usize,
    /// Bytes of the caches.
    pub(crate) k_cache: usize,
    pub(crate) v_cache: usize,
    /// Blocks and block size of the metadata.
    pub(crate) num_blocks: usize,
    pub(crate) block_size: usize,
}

impl LaunchShapes {
    /// The lengths of a decode launch over `meta`'s sequences.
    fn decode<T>(
        meta: &DecodeMetadata,
        num_heads: usize,
        q: &CudaSlice<T>,
        out: &CudaSlice<T>,
        k_cache: &CudaSlice<u8>,
        v_cache: &CudaSlice<u8>,
    ) -> Self {
        Self {
            rows: meta.num_seqs,
            row_name: "seqs",
            num_heads,
            q: q.len(),
            out: out.len(),
            k_cache: k_cache.len(),
            v_cache: v_cache.len(),
            num_blocks: meta.num_blocks,
            block_size: meta.block_size,
        }
    }
}

/// Checks a launch of `kernel` over caches of `layout`: a head_dim with kernels, query heads a
/// multiple of the KV heads in a GQA group with kernels, the metadata's block size, q and out
/// of `rows x num_heads x head_dim` values, caches holding the metadata's blocks. Returns the
/// GQA group.
///
/// # Errors
/// [`KernelError::Unsupported`] for a head_dim or GQA group without a kernel,
/// [`KernelError::BadArgument`] for the rest.
pub(crate) fn check_launch(
    kernel: &'static str,
    layout: &BlockLayout,
    s: &LaunchShapes,
) -> Result<usize> {
    let d = layout.head_dim();
    let kv_heads = layout.num_kv_heads();
    if !HEAD_DIMS.contains(&d) {
        return Err(KernelError::Unsupported {
            kernel,
            what: format!("head_dim {d} (built: {HEAD_DIMS:?})"),
        });
    }
    let num_heads = s.num_heads;
    if num_heads == 0 || !num_heads.is_multiple_of(kv_heads) {
        return Err(bad(
            kernel,
            format!("{num_heads} query heads are not a multiple of {kv_heads} KV heads"),
        ));
    }
    let group = num_heads / kv_heads;
    if group > MAX_GQA_GROUP {
        return Err(KernelError::Unsupported {
            kernel,
            what: format!("GQA group {group} (at most {MAX_GQA_GROUP})"),
        });
    }
    if layout.block_size() != s.block_size {
        return Err(bad(
            kernel,
            format!(
                "layout block_size {} but the metadata's is {}",
                layout.block_size(),
                s.block_size
            ),
        ));
    }
    let n = s.rows * num_heads * d;
    if s.q != n || s.out != n {
        return Err(bad(
            kernel,
            format!(
                "q has {} and out {} values, expected {} {} x {num_heads} heads x {d}",
                s.q, s.out, s.rows, s.row_name
            ),
        ));
    }
    let block_bytes = layout.kv_block_bytes();
    let need = s.num_blocks.saturating_mul(block_bytes);
    if s.k_cache < need || s.v_cache < need {
        return Err(bad(
            kernel,
            format!(
                "caches of {} and {} bytes hold fewer than {} blocks of {block_bytes}",
                s.k_cache, s.v_cache, s.num_blocks
            ),
        ));
    }
    Ok(group)
}

/// `slot` holding at least `n` values (reallocated, zeroed, when smaller).
fn grow<'a, T: DeviceRepr + ValidAsZeroBits>(
    slot: &'a mut Option<CudaSlice<T>>,
    gpu: &Gpu,
    n: usize,
) -> Result<&'a mut CudaSlice<T>> {
    let n = n.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = Some(gpu.stream().alloc_zeros::<T>(n)?);
    }
    slot.as_mut()
        .ok_or_else(|| bad(KERNEL, "scratch buffer vanished"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheRows;
    use kv_quant::KvCacheDtype;

    /// An H200: 132 SMs.
    const SMS: usize = 132;

    #[test]
    fn tensor_core_plan_keeps_two_ctas_per_sm_and_short_partitions_where_they_fit_one_wave() {
        // 2-warp bf16 CTAs, 6 per SM: the measured plan (BENCHMARKS.md) is unchanged.
        for (ctx, ctas, p, parts) in [
            (4096, 8, 128, 32),    // 1 x 4K
            (32768, 8, 1024, 32),  // 1 x 32K
            (4096, 128, 1024, 4),  // 16 x 4K: 512 CTAs in 792 slots
            (1024, 128, 384, 3),   // 16 x 1K
            (4096, 512, 1024, 4),  // 64 x 4K: one wave would fill 512 of 792 slots
            (1024, 2048, 1024, 1), // 256 x 1K: more pairs than slots
        ] {
            let plan = plan_tensor_core(ctx, ctas, SMS, 6, None);
            assert_eq!(
                (plan.partition_size, plan.max_parts),
                (p, parts),
                "{ctx} x {ctas}"
            );
        }
    }

    #[test]
    fn tensor_core_plan_takes_one_full_wave_instead_of_a_partial_second() {
        // 4-warp bf16 CTAs, 3 per SM (396 slots): 16 x 4K would be 512 CTAs (two waves).
        let plan = plan_tensor_core(4096, 128, SMS, 3, None);
        assert_eq!((plan.partition_size, plan.max_parts), (1408, 3));
        assert!(128 * plan.max_parts <= 3 * SMS);
        // 16 x 32K with 2-warp CTAs: 6 partitions of 5,504 tokens instead of 32 of 1,024.
        let plan = plan_tensor_core(32768, 128, SMS, 6, None);
        assert_eq!((plan.partition_size, plan.max_parts), (5504, 6));
        // More pairs than slots: the first plan, whatever the waves.
        let plan = plan_tensor_core(4096, 512, SMS, 3, None);
        assert_eq!((plan.partition_size, plan.max_parts), (1024, 4));
    }

    #[test]
    fn tensor_core_plan_uses_a_forced_size_as_it_is_and_survives_degenerate_input() {
        let plan = plan_tensor_core(4096, 128, SMS, 3, Some(2048));
        assert_eq!((plan.partition_size, plan.max_parts), (2048, 2));
        let plan = plan_tensor_core(100, 1, SMS, 6, Some(64 * 1000));
        assert_eq!((plan.partition_size, plan.max_parts), (64_000, 1));
        for (ctx, ctas, sms, per_sm) in [(0, 0, 0, 0), (1, 1, 1, 1), (usize::MAX / 4, 1, 1, 1)] {
            let plan = plan_tensor_core(ctx, ctas, sms, per_sm, None);
            assert!(plan.partition_size >= TC_QUANTUM && plan.max_parts >= 1);
        }
    }

    /// 3 sequences of Llama-3-8B heads (32 query over 8 KV heads, d = 128) over a 6-block int8
    /// cache: the shapes of a good `run_with_rope` call.
    fn good() -> (BlockLayout, RopeShape, RopeCacheShapes, LaunchShapes) {
        let layout = BlockLayout::new(KvCacheDtype::Int8, 16, 8, 128).unwrap();
        let bb = layout.kv_block_bytes();
        let (seqs, qh, kvh, d) = (3, 32, 8, 128);
        let shape = RopeShape {
            num_q_heads: qh,
            num_kv_heads: kvh,
            head_dim: d,
            interleaved: false,
        };
        let rope = RopeCacheShapes {
            rows: CacheRows {
                tokens: seqs,
                max_slot: 6 * 16 - 1,
                k: seqs * kvh * d,
                v: seqs * kvh * d,
                k_cache: 6 * bb,
                v_cache: 6 * bb,
            },
            q: seqs * qh * d,
            inv_freq: d / 2,
            positions: seqs,
            min_position: 0,
        };
        let launch = LaunchShapes {
            rows: seqs,
            row_name: "seqs",
            num_heads: qh,
            q: seqs * qh * d,
            out: seqs * qh * d,
            k_cache: 6 * bb,
            v_cache: 6 * bb,
            num_blocks: 6,
            block_size: 16,
        };
        (layout, shape, rope, launch)
    }

    #[test]
    fn run_with_rope_checks_accept_a_good_call() {
        let (layout, shape, rope, launch) = good();
        check_new_tokens(&layout, &shape, &rope, &launch).unwrap();
        // Negative slots (padded rows) are skipped, not refused; both pair styles.
        let padded = RopeCacheShapes {
            rows: CacheRows {
                max_slot: -1,
                ..rope.rows
            },
            ..rope
        };
        let interleaved = RopeShape {
            interleaved: true,
            ..shape
        };
        check_new_tokens(&layout, &interleaved, &padded, &launch).unwrap();
    }

    #[test]
    fn run_with_rope_refuses_what_either_call_would_and_mismatched_rows() {
        let (layout, shape, rope, launch) = good();
        let refused = |shape: &RopeShape, rope: &RopeCacheShapes, launch: &LaunchShapes| {
            let r = check_new_tokens(&layout, shape, rope, launch);
            assert!(
                matches!(r, Err(KernelError::BadArgument { .. })),
                "{shape:?} {rope:?} {launch:?}: {r:?}"
            );
        };
        let rows = |r: CacheRows| RopeCacheShapes { rows: r, ..rope };
        // Two new tokens for three sequences (k, v, q and positions of two rows).
        let two = RopeCacheShapes {
            rows: CacheRows {
                tokens: 2,
                k: 2 * 8 * 128,
                v: 2 * 8 * 128,
                ..rope.rows
            },
            q: 2 * 32 * 128,
            positions: 2,
            ..rope
        };
        refused(&shape, &two, &launch);
        // A rotary shape of 16 query heads for a launch of 32 (q sized for either side).
        let sixteen = RopeShape {
            num_q_heads: 16,
            ..shape
        };
        refused(
            &sixteen,
            &RopeCacheShapes {
                q: 3 * 16 * 128,
                ..rope
            },
            &launch,
        );
        refused(&sixteen, &rope, &launch);
        // What rope_and_cache refuses: a slot past the cache, positions of another count, a
        // negative position, too few frequencies, a short k, a rotary shape of other KV heads.
        for bad in [
            rows(CacheRows {
                max_slot: 6 * 16,
                ..rope.rows
            }),
            RopeCacheShapes {
                positions: 4,
                ..rope
            },
            RopeCacheShapes {
                min_position: -1,
                ..rope
            },
            RopeCacheShapes {
                inv_freq: 32,
                ..rope
            },
            rows(CacheRows {
                k: 3 * 8 * 128 - 1,
                ..rope.rows
            }),
        ] {
            refused(&shape, &bad, &launch);
        }
        refused(
            &RopeShape {
                num_kv_heads: 4,
                ..shape
            },
            &rope,
            &launch,
        );
        // What run refuses: q or out of another size, caches smaller than the metadata's
        // blocks, the metadata's block size other than the layout's.
        for bad in [
            LaunchShapes {
                out: launch.out - 1,
                ..launch
            },
            LaunchShapes {
                num_blocks: 7,
                ..launch
            },
            LaunchShapes {
                block_size: 32,
                ..launch
            },
        ] {
            refused(&shape, &rope, &bad);
        }
        // A GQA group without a kernel (9 query heads per KV head).
        let nine = LaunchShapes {
            num_heads: 72,
            q: 3 * 72 * 128,
            out: 3 * 72 * 128,
            ..launch
        };
        assert!(matches!(
            check_new_tokens(&layout, &shape, &rope, &nine),
            Err(KernelError::Unsupported { .. })
        ));
    }
}
