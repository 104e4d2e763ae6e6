//! Paged decode attention: one query token per sequence over its cached context.
#![allow(unsafe_code)]

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use kv_quant::BlockLayout;

use crate::compile::{HEAD_DIMS, MAX_GQA_GROUP, Program, Scalar, Variant};
use crate::device::Gpu;
use crate::error::{KernelError, Result, bad};

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
    block_tables: CudaSlice<i32>,
    context_lens: CudaSlice<i32>,
    num_seqs: usize,
    max_blocks: usize,
    block_size: usize,
    num_blocks: usize,
    window: Option<usize>,
    /// Longest context after the window.
    max_attended: usize,
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
        let num_seqs = context_lens.len();
        if num_seqs == 0 {
            return Err(bad(KERNEL, "empty batch (no context lengths)"));
        }
        if !block_size.is_power_of_two() || block_size > 1024 {
            return Err(bad(
                KERNEL,
                format!("block_size {block_size} is not a power of two <= 1024"),
            ));
        }
        if max_blocks == 0 || block_tables.len() != num_seqs * max_blocks {
            return Err(bad(
                KERNEL,
                format!(
                    "block_tables has {} entries, expected {num_seqs} x {max_blocks}",
                    block_tables.len()
                ),
            ));
        }
        if num_blocks > i32::MAX as usize
            || max_blocks.saturating_mul(block_size) > i32::MAX as usize
        {
            return Err(bad(KERNEL, "cache or table too large for 32-bit indices"));
        }
        if window == Some(0) {
            return Err(bad(KERNEL, "a sliding window of 0 tokens"));
        }
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
            let row = &block_tables[s * max_blocks..(s + 1) * max_blocks];
            for (j, &b) in row[first / block_size..ctx.div_ceil(block_size)]
                .iter()
                .enumerate()
            {
                if b < 0 || b as usize >= num_blocks {
                    return Err(bad(
                        KERNEL,
                        format!(
                            "sequence {s}: block table entry {} is {b}, outside 0..{num_blocks}",
                            first / block_size + j
                        ),
                    ));
                }
            }
        }
        let stream = gpu.stream();
        Ok(Self {
            block_tables: stream.clone_htod(block_tables)?,
            context_lens: stream.clone_htod(context_lens)?,
            num_seqs,
            max_blocks,
            block_size,
            num_blocks,
            window,
            max_attended,
        })
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
    /// does not (int4, mixed 16-bit types); `KVSERVE_DECODE_KERNEL=split` forces it.
    Split,
    /// `paged_attention_tc.cu`: tensor cores, cp.async tiles; 16-bit KV of the activation
    /// type, int8 and fp8 (int4 and mixed 16-bit types run `Split`). The default: 1.1–1.4×
    /// faster than `Split` on an H200 (BENCHMARKS.md).
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
#[derive(Debug)]
pub struct PagedDecoder {
    tmp_out: Option<CudaSlice<f32>>,
    max_logits: Option<CudaSlice<f32>>,
    exp_sums: Option<CudaSlice<f32>>,
    forced_partition: Option<usize>,
    kernel: DecodeKernel,
}

impl Default for PagedDecoder {
    fn default() -> Self {
        Self {
            tmp_out: None,
            max_logits: None,
            exp_sums: None,
            forced_partition: None,
            kernel: DecodeKernel::from_env(),
        }
    }
}

/// Tokens per warp tile times warps per CTA of the tensor-core kernel: its partitions are
/// multiples of this.
const TC_QUANTUM: usize = 32;

/// How one call is split (what [`PagedDecoder::plan`] chose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// Tokens per partition (one CTA each, per KV head and sequence).
    pub partition_size: usize,
    /// Partitions of the longest context.
    pub max_parts: usize,
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

    /// How a batch is split for `kernel`. The split kernel: enough CTAs to fill the device
    /// (2 per SM), partitions as long as possible within the shared memory of one CTA. The
    /// tensor-core kernel keeps no per-token state in shared memory, so its partitions are only
    /// sized for about six 2-warp CTAs per SM.
    pub fn plan(
        &self,
        kernel: DecodeKernel,
        gpu: &Gpu,
        meta: &DecodeMetadata,
        num_kv_heads: usize,
        gqa_group: usize,
        head_dim: usize,
    ) -> DecodePlan {
        let ctx = meta.max_attended.max(1);
        let ctas = meta.num_seqs * num_kv_heads;
        // CTAs per SM to aim for, the partition quantum, and the longest partition.
        let (per_sm, quantum, max_p) = match kernel {
            // Measured on an H200 with forced partitions (BENCHMARKS.md): about 2 CTAs per
            // SM and partitions of at most 1,024 tokens were the fastest or within 8% of it at
            // every batch {1, 16, 64, 256} x context {1K, 4K, 32K}; 6 per SM (the first
            // choice) split too finely (16 x 4K: 88.6 us against 77.1).
            DecodeKernel::TensorCore => (2, TC_QUANTUM, 1024),
            DecodeKernel::Split => (
                2,
                PARTITION_QUANTUM,
                ((SMEM_LIMIT / 4 - gqa_group * head_dim) / gqa_group.max(1)) / PARTITION_QUANTUM
                    * PARTITION_QUANTUM,
            ),
        };
        let p = match self.forced_partition {
            Some(p) => p.min(max_p),
            None => {
                let parts = (per_sm * gpu.num_sms()).div_ceil(ctas.max(1)).max(1);
                ctx.div_ceil(parts)
                    .next_multiple_of(quantum)
                    .clamp(quantum, max_p)
            }
        };
        DecodePlan {
            partition_size: p,
            max_parts: ctx.div_ceil(p),
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
        let d = layout.head_dim();
        let kv_heads = layout.num_kv_heads();
        if !HEAD_DIMS.contains(&d) {
            return Err(KernelError::Unsupported {
                kernel: KERNEL,
                what: format!("head_dim {d} (built: {HEAD_DIMS:?})"),
            });
        }
        if num_heads == 0 || !num_heads.is_multiple_of(kv_heads) {
            return Err(bad(
                KERNEL,
                format!("{num_heads} query heads are not a multiple of {kv_heads} KV heads"),
            ));
        }
        let group = num_heads / kv_heads;
        if group > MAX_GQA_GROUP {
            return Err(KernelError::Unsupported {
                kernel: KERNEL,
                what: format!("GQA group {group} (at most {MAX_GQA_GROUP})"),
            });
        }
        if layout.block_size() != meta.block_size {
            return Err(bad(
                KERNEL,
                format!(
                    "layout block_size {} but the metadata's is {}",
                    layout.block_size(),
                    meta.block_size
                ),
            ));
        }
        let n = meta.num_seqs * num_heads * d;
        if q.len() != n || out.len() != n {
            return Err(bad(
                KERNEL,
                format!(
                    "q has {} and out {} values, expected {} seqs x {num_heads} heads x {d}",
                    q.len(),
                    out.len(),
                    meta.num_seqs
                ),
            ));
        }
        let block_bytes = layout.kv_block_bytes();
        let need = meta.num_blocks * block_bytes;
        if k_cache.len() < need || v_cache.len() < need {
            return Err(bad(
                KERNEL,
                format!(
                    "caches of {} and {} bytes hold fewer than {} blocks of {block_bytes}",
                    k_cache.len(),
                    v_cache.len(),
                    meta.num_blocks
                ),
            ));
        }
        let kernel = self.kernel_for(T::SCALAR, layout.dtype());
        let plan = self.plan(kernel, gpu, meta, kv_heads, group, d);
        let (program, name, threads, smem) = match kernel {
            DecodeKernel::Split => (
                Program::PagedAttention,
                "paged_decode_partition",
                128,
                4 * group * (plan.partition_size + d),
            ),
            DecodeKernel::TensorCore => (Program::PagedAttentionTc, "paged_decode_tc", 64, 0),
        };
        let variant = Variant {
            program,
            scalar: T::SCALAR,
            dtype: layout.dtype(),
            head_dim: d,
            gqa_group: group,
        };
        let partition = gpu.function(&variant, name)?;
        let stream = gpu.stream();
        let scratch = meta.num_seqs * num_heads * plan.max_parts;
        let (tmp, maxl, sums) = (
            grow(&mut self.tmp_out, gpu, scratch * d)?,
            grow(&mut self.max_logits, gpu, scratch)?,
            grow(&mut self.exp_sums, gpu, scratch)?,
        );
        let scale = 1.0f32 / (d as f32).sqrt();
        let kv_heads_i = kv_heads as i32;
        let bs = meta.block_size as i32;
        let shift = meta.block_size.trailing_zeros() as i32;
        let block_bytes_i = block_bytes as i64;
        let max_blocks = meta.max_blocks as i32;
        let p = plan.partition_size as i32;
        let max_parts = plan.max_parts as i32;
        let window = meta.window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        let cfg = LaunchConfig {
            grid_dim: (kv_heads as u32, meta.num_seqs as u32, plan.max_parts as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut launch = stream.launch_builder(&partition);
        launch
            .arg(&mut *out)
            .arg(&mut *tmp)
            .arg(&mut *maxl)
            .arg(&mut *sums)
            .arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(&meta.block_tables)
            .arg(&meta.context_lens)
            .arg(&scale)
            .arg(&kv_heads_i)
            .arg(&bs)
            .arg(&shift)
            .arg(&block_bytes_i)
            .arg(&max_blocks)
            .arg(&p)
            .arg(&max_parts)
            .arg(&window);
        // SAFETY: the argument list matches `paged_decode_partition` in
        // kernels/paged_attention.cu and `paged_decode_tc` in kernels/paged_attention_tc.cu
        // (the same list; 128 and 64 threads as their launch bounds); every buffer was checked
        // above to hold what the kernel reads or writes for this grid (q/out sizes, caches of
        // `num_blocks` blocks, block tables whose attended entries are below `num_blocks`,
        // scratch of `max_parts` partitions), and the dynamic shared memory fits the 48 KiB
        // default limit (plan(); the tensor-core kernel's is static, 35 KiB).
        unsafe { launch.launch(cfg) }?;
        if plan.max_parts > 1 {
            let reduce = gpu.function(&variant, "paged_decode_reduce")?;
            let heads = num_heads as i32;
            let cfg = LaunchConfig {
                grid_dim: (num_heads as u32, meta.num_seqs as u32, 1),
                block_dim: (d as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(&reduce);
            launch
                .arg(&mut *out)
                .arg(&*tmp)
                .arg(&*maxl)
                .arg(&*sums)
                .arg(&meta.context_lens)
                .arg(&heads)
                .arg(&p)
                .arg(&max_parts)
                .arg(&window);
            // SAFETY: matches `paged_decode_reduce`; it reads the partitions the launch
            // above wrote (same partition size, window and context lengths) and writes `out`,
            // checked above.
            unsafe { launch.launch(cfg) }?;
        }
        Ok(plan)
    }
}

/// `slot` holding at least `n` values (reallocated when smaller).
fn grow<'a>(
    slot: &'a mut Option<CudaSlice<f32>>,
    gpu: &Gpu,
    n: usize,
) -> Result<&'a mut CudaSlice<f32>> {
    let n = n.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = Some(gpu.stream().alloc_zeros::<f32>(n)?);
    }
    slot.as_mut()
        .ok_or_else(|| bad(KERNEL, "scratch buffer vanished"))
}
