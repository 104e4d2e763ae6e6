//! Linear layers for decode batches of at most [`GEMV_MAX_TOKENS`] tokens (`kernels/gemv.cu`):
//! bound by streaming the weight once, which cuBLAS's GEMM does at ~3.2 TB/s on an H200 for
//! one token (BENCHMARKS.md). One launch can split its rows into up to three outputs (a fused
//! Q/K/V weight) and add a bias; [`gemv_silu_mul`] fuses the gate/up product with SiLU·up.
//! From [`GEMV_TC_MIN_TOKENS`] tokens (and `k` a multiple of 32) the products run on tensor
//! cores, whose cost does not grow with the tokens as the f32 FMAs do.
//!
//! RMSNorm without a launch of its own ([`gemv_with`], [`gemv_silu_mul_with`]): a product
//! whose output width is the hidden size (O, down) can add its output to the f32 residual
//! stream instead of storing it ([`GemvEpilogue::Residual`]), each CTA leaving the sum of
//! squares of the residual values it wrote in a [`NormPartials`]; the next products (Q/K/V,
//! gate/up) then read the residual itself ([`GemvInput::Normalized`]), every CTA adding the
//! partial sums in the same fixed order. Each CTA writes the normalized rows once into shared
//! memory while its first weight loads are in flight (issued before the wait for the previous
//! kernel), then runs the plain product loop over them; where the rows do not fit in shared
//! memory (or with [`Gpu::set_staged_norm`] off) each warp normalizes the elements as it
//! loads them instead, with the same bits. Both are bit for bit the unfused rounding (the
//! product rounded to the activation type, then added in f32; the normalized value
//! `round(w · (r · rinv))`); only `rinv`'s sum is taken in another order than `rms_norm`'s.
#![allow(unsafe_code)]

use cudarc::driver::{CudaSlice, LaunchConfig};

use crate::attention::ActScalar;
use crate::compile::Variant;
use crate::device::{Gpu, SmemLimits};
use crate::error::{Result, bad};
use crate::launch::Launch;

/// The most tokens (rows of `x`) the GEMV kernels take; larger batches go to cuBLAS.
pub const GEMV_MAX_TOKENS: usize = 8;

/// Warps per CTA (`kWarps` in gemv.cu).
const WARPS: usize = 8;

/// Tokens from which the tensor-core kernels run (`KVSERVE_GEMV_TC_MIN` overrides it, for
/// comparisons; 9 or more turns them off).
pub const GEMV_TC_MIN_TOKENS: usize = 3;

fn tc_min_tokens() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("KVSERVE_GEMV_TC_MIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(GEMV_TC_MIN_TOKENS)
    })
}

/// Whether `tokens` rows of width `k` go to the tensor-core kernels.
fn use_tc(tokens: usize, k: usize) -> bool {
    tokens >= tc_min_tokens() && k.is_multiple_of(32)
}

/// Whether a GEMV over `tokens` input rows of width `k` runs on the tensor-core kernels (from
/// [`GEMV_TC_MIN_TOKENS`] tokens, `k` a multiple of 32) rather than the f32-FMA ones.
pub fn gemv_uses_tensor_cores(tokens: usize, k: usize) -> bool {
    use_tc(tokens, k)
}

/// The tensor-core launch over `tiles` tiles of 16 rows of width `k`: up to 8 warps split
/// each tile's K (the tiles are few: 384 for the 8B Q/K/V) while each keeps ≥ 8 chunks of 32.
fn tc_launch_shape(num_sms: usize, tiles: usize, k: usize) -> (i32, LaunchConfig) {
    let chunks = k / 32;
    let target = 64 * num_sms;
    let mut ksplit = 1;
    while ksplit < WARPS && tiles * ksplit * 2 <= 2 * target && chunks / (2 * ksplit) >= 8 {
        ksplit *= 2;
    }
    (ksplit as i32, grid(tiles, ksplit))
}

fn grid(groups: usize, ksplit: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (groups.div_ceil(WARPS / ksplit) as u32, 1, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Entry points of one kernel family by token count (index `tokens - 1`).
macro_rules! entries {
    ($p:literal) => {
        [
            concat!($p, "1"),
            concat!($p, "2"),
            concat!($p, "3"),
            concat!($p, "4"),
            concat!($p, "5"),
            concat!($p, "6"),
            concat!($p, "7"),
            concat!($p, "8"),
        ]
    };
}
type Entries = [&'static str; GEMV_MAX_TOKENS];
const PLAIN: Entries = entries!("gemv_");
const PLAIN_NORM: Entries = entries!("gemv_norm_");
const PLAIN_SNORM: Entries = entries!("gemv_snorm_");
const PLAIN_TC: Entries = entries!("gemv_tc_");
const PLAIN_TC_NORM: Entries = entries!("gemv_tc_norm_");
const PLAIN_TC_SNORM: Entries = entries!("gemv_tc_snorm_");
const GLU: Entries = entries!("gemv_glu_");
const GLU_NORM: Entries = entries!("gemv_glu_norm_");
const GLU_SNORM: Entries = entries!("gemv_glu_snorm_");
const GLU_TC: Entries = entries!("gemv_glu_tc_");
const GLU_TC_NORM: Entries = entries!("gemv_glu_tc_norm_");
const GLU_TC_SNORM: Entries = entries!("gemv_glu_tc_snorm_");

/// How a product reads its input: `x` itself, or the RMSNorm of the residual stream
/// normalized as each warp loads it (`*_norm_M`) or staged once per CTA in shared memory
/// (`*_snorm_M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    Plain,
    NormInLoop,
    NormStaged,
}

/// Values per staged row (gemv.cu's `stage_stride`): `k` padded so that consecutive rows
/// start 64 bytes apart modulo 128 (the tensor-core lanes reading two tokens' x at one
/// offset then hit different banks).
fn stage_stride(k: usize) -> usize {
    k + ((192 - (2 * k) % 128) % 128) / 2
}

/// The residual slots behind the staged rows (gemv.cu's `kStageSlotBytes`: 2 slices of 32
/// bytes per thread).
const STAGE_SLOT_BYTES: usize = 2 * WARPS * 32 * 32;

/// Dynamic shared memory of a `*_snorm_M` CTA: the `tokens` normalized rows, then the slots.
fn stage_bytes(tokens: usize, k: usize) -> usize {
    tokens * stage_stride(k) * 2 + STAGE_SLOT_BYTES
}

/// Static shared memory a `*_snorm_M` entry may add (the most: `gemv_glu_tc_snorm_8`, 8,480
/// bytes, rounded up) and the 1 KiB the driver keeps per CTA.
const STAGE_OVERHEAD: usize = 10 * 1024;

/// Whether `tokens` normalized rows of `k` are staged in shared memory on a device with
/// `limits`: when the CTA's dynamic shared memory is allowed, and two CTAs (the fewest the
/// kernels are compiled for) still fit on an SM. At `k` = 4,096 a CTA takes 24 KiB at 1 token,
/// 32 at 2, 80.5 at 8: on an H200 (227 KiB per CTA, 228 per SM) every token count fits (6
/// CTAs per SM at 1–2 tokens, as many as the registers allow; 2 at 7–8); on an A100 (163 /
/// 164 KiB) up to 6 tokens.
fn stage_fits(tokens: usize, k: usize, limits: SmemLimits) -> bool {
    let bytes = stage_bytes(tokens, k);
    bytes + STAGE_OVERHEAD <= limits.per_block && 2 * (bytes + STAGE_OVERHEAD) <= limits.per_sm
}

/// One output of a [`gemv`]: the next `width` rows of the weight, written `[tokens][width]`.
#[derive(Debug)]
pub struct GemvOut<'a, T> {
    /// Receives `tokens * width` values.
    pub out: &'a mut CudaSlice<T>,
    /// Weight rows (output features) it takes.
    pub width: usize,
}

/// What a [`GemvEpilogue::Residual`] product left for the normalized input of the next
/// products: per token, the sums of squares of the residual values each of its CTAs wrote
/// (`[tokens][count]` f32, `count` = its grid). They describe the residual as that product
/// left it: valid until something else writes the residual. Reused across launches (the
/// buffer grows when a launch needs more).
#[derive(Debug, Default)]
pub struct NormPartials {
    buf: Option<CudaSlice<f32>>,
    written: Option<PartialsShape>,
}

/// What a residual epilogue wrote: `count` partial sums per token of `tokens` rows of `width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PartialsShape {
    tokens: usize,
    width: usize,
    count: usize,
}

impl NormPartials {
    /// An empty set (no sums yet: a normalized input over it is refused).
    pub fn new() -> Self {
        Self::default()
    }

    /// `(tokens, width)` of the residual the sums describe, if a product wrote them.
    pub fn written(&self) -> Option<(usize, usize)> {
        self.written.map(|s| (s.tokens, s.width))
    }

    /// The buffer holding the sums, `[tokens][count]` in its first `tokens · count` values
    /// (row `t` adds up to `Σ_j residual[t][j]²`), and `count`: for tests and debugging.
    pub fn sums(&self) -> Option<(&CudaSlice<f32>, usize)> {
        let s = self.written?;
        Some((self.buf.as_ref()?, s.count))
    }
}

/// The input rows of a GEMV.
#[derive(Debug)]
pub enum GemvInput<'a, T> {
    /// `x`, `[tokens][k]` values of the activation type.
    Plain(&'a CudaSlice<T>),
    /// The RMSNorm of the residual stream, folded into the product.
    Normalized(NormInput<'a, T>),
}

/// `x[t][i] = round(weight[i] · (residual[t][i] · rinv[t]))` with
/// `rinv[t] = 1 / sqrt(Σ partials[t] / k + eps)`: `rms_norm`'s output, computed by the
/// product as it loads its input (no norm launch, no `x` buffer).
#[derive(Debug)]
pub struct NormInput<'a, T> {
    /// The f32 residual stream, `[tokens][k]`, as a [`GemvEpilogue::Residual`] left it.
    pub residual: &'a CudaSlice<f32>,
    /// The norm weight, `[k]`.
    pub weight: &'a CudaSlice<T>,
    /// The sums of squares that epilogue wrote (for `tokens` rows of `k`).
    pub partials: &'a NormPartials,
    /// RMSNorm's epsilon (finite, ≥ 0).
    pub eps: f32,
}

/// Where a [`gemv_with`]'s products go.
#[derive(Debug)]
pub enum GemvEpilogue<'a, 'b, T> {
    /// Rows split in order among 1 to 3 outputs (the weight's rows are the sum of their
    /// widths).
    Store(&'a mut [GemvOut<'b, T>]),
    /// `residual[t][j] += round(y[t][j])` (`[tokens][n]`, f32; the product rounded to the
    /// activation type first, as `rms_norm`'s residual add of a stored product); nothing is
    /// stored, and `partials` receives the sums of squares of the new residual rows for a
    /// following [`GemvInput::Normalized`].
    Residual {
        /// The residual stream, `[tokens][n]` for a weight of `n` rows.
        residual: &'a mut CudaSlice<f32>,
        /// Receives the sums of squares (grown if needed).
        partials: &'a mut NormPartials,
    },
}

/// Rows of an input of `len` values for a weight of width `k`, checked.
fn tokens_of(kernel: &'static str, what: &str, len: usize, k: usize) -> Result<usize> {
    if k == 0 || !k.is_multiple_of(8) || k > i32::MAX as usize {
        return Err(bad(
            kernel,
            format!("input width {k} (must be a positive multiple of 8)"),
        ));
    }
    if !len.is_multiple_of(k) {
        return Err(bad(
            kernel,
            format!("{what} of {len} values is not whole rows of {k}"),
        ));
    }
    let tokens = len / k;
    if tokens == 0 || tokens > GEMV_MAX_TOKENS {
        return Err(bad(
            kernel,
            format!("{tokens} tokens (1..={GEMV_MAX_TOKENS})"),
        ));
    }
    Ok(tokens)
}

/// Lengths of an input, for the checks (no device needed).
#[derive(Debug, Clone, Copy)]
enum InputLens {
    Plain {
        x: usize,
    },
    Normalized {
        residual: usize,
        weight: usize,
        eps: f32,
        partials: Option<PartialsShape>,
        partials_len: usize,
    },
}

impl<T> GemvInput<'_, T> {
    fn lens(&self) -> InputLens {
        match self {
            Self::Plain(x) => InputLens::Plain { x: x.len() },
            Self::Normalized(n) => InputLens::Normalized {
                residual: n.residual.len(),
                weight: n.weight.len(),
                eps: n.eps,
                partials: n.partials.written,
                partials_len: n.partials.buf.as_ref().map_or(0, CudaSlice::len),
            },
        }
    }
}

/// Tokens of an input for width `k`, and (normalized) the partial sums per token.
fn check_input(kernel: &'static str, input: InputLens, k: usize) -> Result<(usize, usize)> {
    match input {
        InputLens::Plain { x } => Ok((tokens_of(kernel, "x", x, k)?, 0)),
        InputLens::Normalized {
            residual,
            weight,
            eps,
            partials,
            partials_len,
        } => {
            let tokens = tokens_of(kernel, "residual", residual, k)?;
            if weight != k {
                return Err(bad(
                    kernel,
                    format!("norm weight of {weight} values for rows of {k}"),
                ));
            }
            if !eps.is_finite() || eps < 0.0 {
                return Err(bad(kernel, format!("eps {eps}")));
            }
            match partials {
                Some(p)
                    if p.tokens == tokens
                        && p.width == k
                        && p.count > 0
                        && p.count <= i32::MAX as usize
                        && partials_len >= tokens * p.count =>
                {
                    Ok((tokens, p.count))
                }
                _ => Err(bad(
                    kernel,
                    format!(
                        "norm partials {:?} do not describe a residual of {tokens} x {k}",
                        partials.map(|p| (p.tokens, p.width))
                    ),
                )),
            }
        }
    }
}

/// The weight `[n][k]`, checked.
fn check_weight(kernel: &'static str, len: usize, n: usize, k: usize) -> Result<()> {
    if n == 0 || n > i32::MAX as usize || len != n * k {
        return Err(bad(
            kernel,
            format!("weight of {len} values for {n} rows of {k}"),
        ));
    }
    Ok(())
}

/// Lengths of an epilogue, for the checks.
#[derive(Debug, Clone, Copy)]
enum EpilogueLens<'a> {
    /// `(width, values)` of each output.
    Store(&'a [(usize, usize)]),
    Residual {
        residual: usize,
    },
}

/// The weight's rows `n` for an epilogue of `tokens` rows, every length checked.
fn check_epilogue(
    kernel: &'static str,
    epilogue: EpilogueLens<'_>,
    tokens: usize,
    weight: usize,
    k: usize,
    bias: Option<usize>,
) -> Result<usize> {
    let n = match epilogue {
        EpilogueLens::Store(outs) => {
            if outs.is_empty() || outs.len() > 3 || outs.iter().any(|o| o.0 == 0) {
                return Err(bad(
                    kernel,
                    format!(
                        "{} outputs of widths {:?} (1 to 3, each positive)",
                        outs.len(),
                        outs.iter().map(|o| o.0).collect::<Vec<_>>()
                    ),
                ));
            }
            let n: usize = outs.iter().map(|o| o.0).sum();
            check_weight(kernel, weight, n, k)?;
            if let Some(&(width, len)) = outs.iter().find(|o| o.1 != tokens * o.0) {
                return Err(bad(
                    kernel,
                    format!("an output of {len} values, expected {tokens} x {width}"),
                ));
            }
            n
        }
        EpilogueLens::Residual { residual } => {
            let n = weight / k;
            check_weight(kernel, weight, n, k)?;
            if residual != tokens * n {
                return Err(bad(
                    kernel,
                    format!("residual of {residual} values, expected {tokens} x {n}"),
                ));
            }
            n
        }
    };
    if let Some(b) = bias
        && b != n
    {
        return Err(bad(kernel, format!("bias of {b} values for {n} rows")));
    }
    Ok(n)
}

/// A launch: the entry point, how many warps split a row group's K, and the grid (with the
/// staged entries' dynamic shared memory).
#[derive(Debug, Clone, Copy)]
struct Plan {
    name: &'static str,
    ksplit: i32,
    cfg: LaunchConfig,
}

/// The entry points of one product kind, on tensor cores and on the f32-FMA kernels, each
/// for the three input kinds (plain, normalized in the loop, staged).
struct Family {
    tc: [Entries; 3],
    fma: [Entries; 3],
}

const PRODUCT: Family = Family {
    tc: [PLAIN_TC, PLAIN_TC_NORM, PLAIN_TC_SNORM],
    fma: [PLAIN, PLAIN_NORM, PLAIN_SNORM],
};

const GATE_UP: Family = Family {
    tc: [GLU_TC, GLU_TC_NORM, GLU_TC_SNORM],
    fma: [GLU, GLU_NORM, GLU_SNORM],
};

/// The launch of a `family` product of `tokens` input rows of width `k` over `rows` output
/// rows (row pairs for gate/up), `fma_rows` per warp on the FMA kernels. The launch shape
/// does not depend on the input kind: the normalized variants add exactly what the plain
/// entry would compute from the stored norm.
fn plan(
    num_sms: usize,
    tokens: usize,
    k: usize,
    input: InputKind,
    family: &Family,
    rows: usize,
    fma_rows: usize,
) -> Plan {
    let (entries, (ksplit, mut cfg)) = if use_tc(tokens, k) {
        (&family.tc, tc_launch_shape(num_sms, rows.div_ceil(16), k))
    } else {
        let groups = rows.div_ceil(fma_rows);
        (&family.fma, launch_shape(num_sms, groups, k))
    };
    let kind = match input {
        InputKind::Plain => 0,
        InputKind::NormInLoop => 1,
        InputKind::NormStaged => {
            cfg.shared_mem_bytes = stage_bytes(tokens, k) as u32;
            2
        }
    };
    Plan {
        name: entries[kind][tokens - 1],
        ksplit,
        cfg,
    }
}

/// The launch of a product of `tokens` rows over `n` weight rows of width `k`.
fn plan_gemv(num_sms: usize, tokens: usize, n: usize, k: usize, input: InputKind) -> Plan {
    plan(num_sms, tokens, k, input, &PRODUCT, n, plain_rows(tokens))
}

/// The launch of a gate/up product of `tokens` rows over `inter` row pairs of width `k`.
fn plan_glu(num_sms: usize, tokens: usize, inter: usize, k: usize, input: InputKind) -> Plan {
    plan(num_sms, tokens, k, input, &GATE_UP, inter, 1)
}

/// How `input` (of `tokens` rows of `k`) is read on `gpu`.
fn input_kind<T>(gpu: &Gpu, input: &GemvInput<'_, T>, tokens: usize, k: usize) -> InputKind {
    match input {
        GemvInput::Plain(_) => InputKind::Plain,
        GemvInput::Normalized(_)
            if gpu.staged_norm() && stage_fits(tokens, k, gpu.smem_limits()) =>
        {
            InputKind::NormStaged
        }
        GemvInput::Normalized(_) => InputKind::NormInLoop,
    }
}

/// The launch over `groups` row groups (one warp's rows each) of width `k`: how many warps
/// split each group's K, and the grid. Tuned on an H200 with the 8B shapes (ncu, per launch):
/// short grids split in 2 when each share keeps ≥ 256 16-byte chunks (O, 4,096 rows of
/// 4,096: 12.8 → 11.9 µs), long rows in 4 (down, 4,096 rows of 14,336: 38.7 → 31.8 µs); the
/// 6,144-row Q/K/V product ran slower split (16.2 → 18.4 µs), so grids of more than half the
/// ~64 warps per SM are not.
fn launch_shape(num_sms: usize, groups: usize, k: usize) -> (i32, LaunchConfig) {
    let chunks = k / 8;
    let target = 64 * num_sms;
    let mut ksplit = 1;
    if groups * 2 <= target && chunks >= 2 * 256 {
        ksplit = 2;
        if chunks >= 4 * 256 && groups <= target {
            ksplit = 4;
        }
    }
    (ksplit as i32, grid(groups, ksplit))
}

/// Rows per warp of the plain products (gemv.cu's PlainRows).
fn plain_rows(tokens: usize) -> usize {
    if tokens >= 3 { 2 } else { 1 }
}

/// `out[t][j] = Σ_i x[t][i] · w[j][i] (+ bias[j])` for a weight `[n][k]` row-major (as
/// PyTorch's `Linear`) and `x` `[tokens][k]` with `tokens ≤ GEMV_MAX_TOKENS`; the `n` rows are
/// split in order among `outs` (1 to 3; `n` is the sum of their widths). f32 accumulation.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for sizes that do not fit: `k` not a multiple of 8,
/// too many tokens, outputs or a bias of the wrong size.
pub fn gemv<T: ActScalar>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    k: usize,
    bias: Option<&CudaSlice<T>>,
    outs: &mut [GemvOut<'_, T>],
) -> Result<()> {
    gemv_with(
        gpu,
        GemvInput::Plain(x),
        w,
        k,
        bias,
        GemvEpilogue::Store(outs),
    )
}

/// [`gemv`] with its input and its epilogue chosen: `x` plain or the RMSNorm of the residual
/// stream ([`GemvInput::Normalized`]), the rows stored or added to the residual stream
/// ([`GemvEpilogue::Residual`], which also leaves the sums of squares the next normalized
/// input needs). The launch (grid, K split, accumulation order) depends only on the tokens,
/// `n`, `k` and the input kind, so a residual epilogue adds exactly what [`gemv`] would have
/// stored.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for sizes that do not fit (as [`gemv`]; for a
/// normalized input also a norm weight not of `k` values, a bad `eps`, partials that do not
/// describe `tokens` rows of `k`; for a residual epilogue a residual not `[tokens][n]`).
pub fn gemv_with<T: ActScalar>(
    gpu: &Gpu,
    input: GemvInput<'_, T>,
    w: &CudaSlice<T>,
    k: usize,
    bias: Option<&CudaSlice<T>>,
    epilogue: GemvEpilogue<'_, '_, T>,
) -> Result<()> {
    const K: &str = "gemv";
    let (tokens, count) = check_input(K, input.lens(), k)?;
    let out_lens: Vec<(usize, usize)> = match &epilogue {
        GemvEpilogue::Store(outs) => outs.iter().map(|o| (o.width, o.out.len())).collect(),
        GemvEpilogue::Residual { .. } => Vec::new(),
    };
    let lens = match &epilogue {
        GemvEpilogue::Store(_) => EpilogueLens::Store(&out_lens),
        GemvEpilogue::Residual { residual, .. } => EpilogueLens::Residual {
            residual: residual.len(),
        },
    };
    let n = check_epilogue(K, lens, tokens, w.len(), k, bias.map(CudaSlice::len))?;
    let kind = input_kind(gpu, &input, tokens, k);
    let plan = plan_gemv(gpu.num_sms(), tokens, n, k, kind);
    let smem = plan.cfg.shared_mem_bytes as usize;
    let f = gpu.function_with_smem(&Variant::gemv(T::SCALAR), plan.name, smem)?;
    let stream = gpu.stream();
    // Absent pointers are null; the kernel never touches them (no rows map to an absent
    // output; a plain entry reads x only, a normalized one the residual, weight and partials
    // only; a storing epilogue leaves the residual pointers alone).
    let null = 0u64;
    let (n_i, k_i, count_i) = (n as i32, k as i32, count as i32);
    let (n0, n01) = match out_lens.as_slice() {
        [] => (n_i, n_i),
        [(a, _), rest @ ..] => {
            let a = *a as i32;
            (a, a + rest.first().map_or(0, |o| o.0 as i32))
        }
    };
    let mut launch = Launch::new(gpu, &f);
    let mut written = None;
    match epilogue {
        GemvEpilogue::Store(outs) => {
            match outs {
                [a] => launch.arg(&mut *a.out).arg(&null).arg(&null),
                [a, b] => launch.arg(&mut *a.out).arg(&mut *b.out).arg(&null),
                [a, b, c] => launch.arg(&mut *a.out).arg(&mut *b.out).arg(&mut *c.out),
                _ => return Err(bad(K, "outputs".to_string())),
            };
            launch.arg(&null).arg(&null);
        }
        GemvEpilogue::Residual { residual, partials } => {
            // One partial sum per token and CTA.
            let ctas = plan.cfg.grid_dim.0 as usize;
            let NormPartials { buf, written: slot } = partials;
            *slot = None;
            if buf.as_ref().is_none_or(|b| b.len() < tokens * ctas) {
                *buf = Some(stream.alloc_zeros::<f32>(tokens * ctas)?);
            }
            let buf = buf.as_mut().ok_or_else(|| bad(K, "norm partials buffer"))?;
            launch.arg(&null).arg(&null).arg(&null);
            launch.arg(residual).arg(buf);
            written = Some((
                slot,
                PartialsShape {
                    tokens,
                    width: n,
                    count: ctas,
                },
            ));
        }
    }
    launch.arg(w);
    let eps = push_input(K, &mut launch, &input, &null)?;
    launch.arg(&count_i).arg(&eps);
    match bias {
        Some(b) => launch.arg(b),
        None => launch.arg(&null),
    };
    launch
        .arg(&n0)
        .arg(&n01)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&plan.ksplit);
    // SAFETY: matches the GEMV_PARAMS of `gemv[_tc][_norm|_snorm]_<tokens>` in kernels/gemv.cu (the
    // tensor-core ones only for k a multiple of 32): w holds n x k values (k a multiple of 8,
    // so every row starts 16-byte aligned in a cudarc allocation); a plain input x holds
    // tokens x k values, a normalized one a residual of tokens x k, a norm weight of k and
    // partials of at least tokens x count values; storing, each output holds tokens x its
    // width (rows map to outputs by the prefix sums n0 and n01 of the widths); the residual
    // epilogue's residual holds tokens x n and its partials tokens x the grid; the bias n
    // values or null (all checked above). The grid covers n rows at `ksplit` warps per row
    // group; a staged entry gets the stage_bytes(tokens, k) of dynamic shared memory it
    // lays its rows and slots out in (`plan`), allowed by function_with_smem.
    // The kernel reads only weight rows before kvs_wait_prior() (PDL).
    unsafe { launch.dependent().launch(plan.cfg) }?;
    if let Some((slot, shape)) = written {
        *slot = Some(shape);
    }
    Ok(())
}

/// `out[t][j] = silu(g) · u` with `g = (x Wᵀ)[t][j]` and `u = (x Wᵀ)[t][inter + j]`: the
/// gate and up projections stacked in one weight `[2 · inter][k]` (gate rows first), fused
/// with SiLU·up. `x` is `[tokens][k]` with `tokens ≤ GEMV_MAX_TOKENS`, `out`
/// `[tokens][inter]`. `g` and `u` are rounded to the activation type first, as the unfused
/// product and `silu_mul` do.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for sizes that do not fit.
pub fn gemv_silu_mul<T: ActScalar>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    w_gate_up: &CudaSlice<T>,
    inter: usize,
    k: usize,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    gemv_silu_mul_with(gpu, GemvInput::Plain(x), w_gate_up, inter, k, out)
}

/// Checks a gate/up product's weight and output.
fn check_glu(
    kernel: &'static str,
    tokens: usize,
    inter: usize,
    weight: usize,
    k: usize,
    out: usize,
) -> Result<()> {
    if inter == 0 || inter > (i32::MAX as usize) / 2 || weight != 2 * inter * k {
        return Err(bad(
            kernel,
            format!("gate/up weight of {weight} values for 2 x {inter} rows of {k}"),
        ));
    }
    if out != tokens * inter {
        return Err(bad(
            kernel,
            format!("out of {out} values, expected {tokens} x {inter}"),
        ));
    }
    Ok(())
}

/// [`gemv_silu_mul`] over a plain or a normalized input (see [`gemv_with`]).
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for sizes that do not fit (the input as in
/// [`gemv_with`]).
pub fn gemv_silu_mul_with<T: ActScalar>(
    gpu: &Gpu,
    input: GemvInput<'_, T>,
    w_gate_up: &CudaSlice<T>,
    inter: usize,
    k: usize,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    const K: &str = "gemv_silu_mul";
    let (tokens, count) = check_input(K, input.lens(), k)?;
    check_glu(K, tokens, inter, w_gate_up.len(), k, out.len())?;
    let kind = input_kind(gpu, &input, tokens, k);
    let plan = plan_glu(gpu.num_sms(), tokens, inter, k, kind);
    let (i_i, k_i, count_i) = (inter as i32, k as i32, count as i32);
    let smem = plan.cfg.shared_mem_bytes as usize;
    let f = gpu.function_with_smem(&Variant::gemv(T::SCALAR), plan.name, smem)?;
    let null = 0u64;
    let mut launch = Launch::new(gpu, &f);
    launch.arg(&mut *out).arg(w_gate_up);
    let eps = push_input(K, &mut launch, &input, &null)?;
    launch
        .arg(&count_i)
        .arg(&eps)
        .arg(&i_i)
        .arg(&k_i)
        .arg(&plan.ksplit);
    // SAFETY: matches the GLU_PARAMS of `gemv_glu[_tc][_norm|_snorm]_<tokens>` in kernels/gemv.cu
    // (the tensor-core ones only for k a multiple of 32): w_gate_up holds 2 inter x k values,
    // a plain x tokens x k (k a multiple of 8), a normalized input a residual of tokens x k, a
    // norm weight of k and partials of at least tokens x count values, out tokens x inter
    // (checked above); the grid covers inter row pairs at `ksplit` warps each; a staged
    // entry gets its stage_bytes(tokens, k) of dynamic shared memory (`plan`).
    // The kernel reads only weight rows before kvs_wait_prior() (PDL).
    unsafe { launch.dependent().launch(plan.cfg) }?;
    Ok(())
}

/// Pushes the input arguments both entry families take (x, then the norm's residual, weight
/// and partials; null where unused) and returns the norm's epsilon (0 for a plain input).
fn push_input<'a, T>(
    kernel: &'static str,
    launch: &mut Launch<'a>,
    input: &'a GemvInput<'a, T>,
    null: &'a u64,
) -> Result<f32> {
    Ok(match input {
        GemvInput::Plain(x) => {
            launch.arg(*x).arg(null).arg(null).arg(null);
            0.0
        }
        GemvInput::Normalized(ni) => {
            let buf = ni
                .partials
                .buf
                .as_ref()
                .ok_or_else(|| bad(kernel, "norm partials buffer"))?;
            launch.arg(null).arg(ni.residual).arg(ni.weight).arg(buf);
            ni.eps
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelError;

    fn is_bad<T: std::fmt::Debug>(r: Result<T>) -> bool {
        matches!(r, Err(KernelError::BadArgument { .. }))
    }

    const K: &str = "test";

    fn partials(tokens: usize, width: usize, count: usize) -> Option<PartialsShape> {
        Some(PartialsShape {
            tokens,
            width,
            count,
        })
    }

    fn normalized(tokens: usize, k: usize, count: usize) -> InputLens {
        InputLens::Normalized {
            residual: tokens * k,
            weight: k,
            eps: 1e-5,
            partials: partials(tokens, k, count),
            partials_len: tokens * count,
        }
    }

    #[test]
    fn inputs_are_checked() {
        assert_eq!(
            check_input(K, InputLens::Plain { x: 3 * 64 }, 64).unwrap(),
            (3, 0)
        );
        assert_eq!(check_input(K, normalized(2, 64, 17), 64).unwrap(), (2, 17));
        // Plain: k not a multiple of 8, x not whole rows, no or too many tokens.
        assert!(is_bad(check_input(K, InputLens::Plain { x: 120 }, 60)));
        assert!(is_bad(check_input(K, InputLens::Plain { x: 65 }, 64)));
        assert!(is_bad(check_input(K, InputLens::Plain { x: 0 }, 64)));
        assert!(is_bad(check_input(K, InputLens::Plain { x: 9 * 64 }, 64)));
        let good = normalized(2, 64, 17);
        let with = |f: &dyn Fn(&mut InputLens)| {
            let mut l = good;
            f(&mut l);
            check_input(K, l, 64)
        };
        let set =
            |f: fn(&mut usize, &mut usize, &mut f32, &mut Option<PartialsShape>, &mut usize)| {
                with(&|l: &mut InputLens| {
                    if let InputLens::Normalized {
                        residual,
                        weight,
                        eps,
                        partials,
                        partials_len,
                    } = l
                    {
                        f(residual, weight, eps, partials, partials_len);
                    }
                })
            };
        // A residual of part of a row or of 9 tokens; a norm weight of the wrong width.
        assert!(is_bad(set(|r, _, _, _, _| *r -= 1)));
        assert!(is_bad(set(|r, _, _, _, _| *r = 9 * 64)));
        assert!(is_bad(set(|_, w, _, _, _| *w = 63)));
        // eps negative, NaN or infinite.
        assert!(is_bad(set(|_, _, e, _, _| *e = -1e-6)));
        assert!(is_bad(set(|_, _, e, _, _| *e = f32::NAN)));
        assert!(is_bad(set(|_, _, e, _, _| *e = f32::INFINITY)));
        // Partials never written, of another token count or width, or a short buffer.
        assert!(is_bad(set(|_, _, _, p, _| *p = None)));
        assert!(is_bad(set(|_, _, _, p, _| *p = partials(3, 64, 17))));
        assert!(is_bad(set(|_, _, _, p, _| *p = partials(2, 72, 17))));
        assert!(is_bad(set(|_, _, _, p, _| *p = partials(2, 64, 0))));
        assert!(is_bad(set(|_, _, _, _, n| *n = 33)));
        // The residual of a different token count (its partials say 2 rows).
        assert!(is_bad(set(|r, _, _, _, _| *r = 64)));
    }

    #[test]
    fn epilogues_are_checked() {
        let (t, k) = (2, 64);
        let outs = [(48, 2 * 48), (8, 2 * 8), (8, 2 * 8)];
        let store = EpilogueLens::Store(&outs);
        assert_eq!(
            check_epilogue(K, store, t, 64 * k, k, Some(64)).unwrap(),
            64
        );
        assert_eq!(check_epilogue(K, store, t, 64 * k, k, None).unwrap(), 64);
        // Widths that do not add up to the weight; a bias of the wrong size; an output of
        // the wrong size; no outputs, four, an empty one.
        assert!(is_bad(check_epilogue(K, store, t, 65 * k, k, None)));
        assert!(is_bad(check_epilogue(K, store, t, 64 * k, k, Some(63))));
        let short = [(48, 2 * 48), (8, 15), (8, 16)];
        assert!(is_bad(check_epilogue(
            K,
            EpilogueLens::Store(&short),
            t,
            64 * k,
            k,
            None
        )));
        for outs in [
            &[][..],
            &[(16, 32), (16, 32), (16, 32), (16, 32)][..],
            &[(64, 128), (0, 0)][..],
        ] {
            let n: usize = outs.iter().map(|o| o.0).sum();
            assert!(is_bad(check_epilogue(
                K,
                EpilogueLens::Store(outs),
                t,
                n * k,
                k,
                None
            )));
        }
        // Residual: [tokens][n] for the weight's n rows, a bias of n.
        let res = |residual| EpilogueLens::Residual { residual };
        assert_eq!(
            check_epilogue(K, res(t * 96), t, 96 * k, k, Some(96)).unwrap(),
            96
        );
        assert!(is_bad(check_epilogue(
            K,
            res(t * 96 - 1),
            t,
            96 * k,
            k,
            None
        )));
        assert!(is_bad(check_epilogue(K, res(3 * 96), t, 96 * k, k, None)));
        assert!(is_bad(check_epilogue(
            K,
            res(t * 96),
            t,
            96 * k + 8,
            k,
            None
        )));
        assert!(is_bad(check_epilogue(K, res(0), t, 0, k, None)));
        assert!(is_bad(check_epilogue(
            K,
            res(t * 96),
            t,
            96 * k,
            k,
            Some(95)
        )));
    }

    #[test]
    fn gate_up_is_checked() {
        assert!(check_glu(K, 2, 96, 2 * 96 * 64, 64, 2 * 96).is_ok());
        assert!(is_bad(check_glu(K, 2, 96, 96 * 64, 64, 2 * 96)));
        assert!(is_bad(check_glu(K, 2, 0, 0, 64, 0)));
        assert!(is_bad(check_glu(K, 2, 96, 2 * 96 * 64, 64, 2 * 96 + 1)));
    }

    #[test]
    fn plans_pick_the_kernel_and_cover_every_row() {
        let kinds = [
            (InputKind::Plain, ""),
            (InputKind::NormInLoop, "_norm_"),
            (InputKind::NormStaged, "_snorm_"),
        ];
        for tokens in 1..=GEMV_MAX_TOKENS {
            for (n, k) in [
                (4096, 4096),
                (4096, 14336),
                (6144, 4096),
                (577, 1536),
                (200, 584),
            ] {
                let plain = plan_gemv(132, tokens, n, k, InputKind::Plain);
                let plain_glu = plan_glu(132, tokens, n, k, InputKind::Plain);
                for (kind, infix) in kinds {
                    let p = plan_gemv(132, tokens, n, k, kind);
                    let tc = tokens >= GEMV_TC_MIN_TOKENS && k % 32 == 0;
                    assert_eq!(p.name.contains("_tc_"), tc, "{}", p.name);
                    for other in ["_norm_", "_snorm_"] {
                        assert_eq!(p.name.contains(other), infix == other, "{}", p.name);
                    }
                    assert!(p.name.ends_with(&tokens.to_string()), "{}", p.name);
                    let rows_per_group = if tc { 16 } else { plain_rows(tokens) };
                    let groups_per_cta = WARPS / p.ksplit as usize;
                    let rows = p.cfg.grid_dim.0 as usize * groups_per_cta * rows_per_group;
                    assert!(rows >= n && rows - n < groups_per_cta * rows_per_group);
                    let g = plan_glu(132, tokens, n, k, kind);
                    assert_eq!(g.name.contains("_snorm_"), infix == "_snorm_", "{}", g.name);
                    assert!(g.name.starts_with("gemv_glu_"), "{}", g.name);
                    // Every input kind launches the same shape (the products add in the same
                    // order); only the staged entries take shared memory.
                    for (q, base) in [(p, plain), (g, plain_glu)] {
                        assert_eq!(q.ksplit, base.ksplit);
                        assert_eq!(q.cfg.grid_dim, base.cfg.grid_dim);
                        let smem = if kind == InputKind::NormStaged {
                            stage_bytes(tokens, k) as u32
                        } else {
                            0
                        };
                        assert_eq!(q.cfg.shared_mem_bytes, smem, "{}", q.name);
                    }
                }
            }
        }
    }

    #[test]
    fn staged_rows_are_laid_out_and_sized() {
        for k in (8..=20_000).step_by(8) {
            let stride = stage_stride(k);
            // 16-byte aligned rows, consecutive ones 64 bytes apart modulo 128, little padding.
            assert_eq!(stride % 8, 0, "{k}");
            assert_eq!((2 * stride) % 128, 64, "{k}");
            assert!(stride >= k && stride - k < 64, "{k}");
        }
        assert_eq!(stage_stride(4096), 4128);
        assert_eq!(stage_stride(4064), 4064);
        // The 8B consumers: 24 KiB at 1 token (rows, then 16 KiB of slots), 80.5 at 8.
        assert_eq!(stage_bytes(1, 4096), 8256 + 16384);
        assert_eq!(stage_bytes(8, 4096), 8 * 8256 + 16384);
        let h200 = SmemLimits {
            per_block: 232_448,
            per_sm: 233_472,
        };
        let a100 = SmemLimits {
            per_block: 166_912,
            per_sm: 167_936,
        };
        let ada = SmemLimits {
            per_block: 101_376,
            per_sm: 102_400,
        };
        for tokens in 1..=GEMV_MAX_TOKENS {
            assert!(stage_fits(tokens, 4096, h200), "{tokens}");
            assert_eq!(stage_fits(tokens, 4096, a100), tokens <= 6, "{tokens}");
            // Llama-3-70B's 8,192 on an H200: two CTAs of 6 tokens (122 KiB each with the
            // overhead) do not fit on an SM: those fall back to the in-loop normalization.
            assert_eq!(stage_fits(tokens, 8192, h200), tokens <= 5, "{tokens}");
        }
        // 100 KiB per SM: two CTAs of 2 tokens at 4,096, not of 3.
        assert!(stage_fits(2, 4096, ada));
        assert!(!stage_fits(3, 4096, ada));
        assert!(!stage_fits(1, 1 << 20, h200));
    }
}
