//! Linear layers for decode batches of at most [`GEMV_MAX_TOKENS`] tokens (`kernels/gemv.cu`):
//! bound by streaming the weight once, which cuBLAS's GEMM does at ~3.2 TB/s on an H200 for
//! one token (BENCHMARKS.md). One launch can split its rows into up to three outputs (a fused
//! Q/K/V weight) and add a bias; [`gemv_silu_mul`] fuses the gate/up product with SiLU·up.
//! From [`GEMV_TC_MIN_TOKENS`] tokens (and `k` a multiple of 32) the products run on tensor
//! cores, whose cost does not grow with the tokens as the f32 FMAs do.
#![allow(unsafe_code)]

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::attention::ActScalar;
use crate::compile::Variant;
use crate::device::Gpu;
use crate::error::{Result, bad};

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

/// The tensor-core launch over `tiles` tiles of 16 rows of width `k`: up to 8 warps split
/// each tile's K (the tiles are few: 384 for the 8B Q/K/V) while each keeps ≥ 8 chunks of 32.
fn tc_launch_shape(gpu: &Gpu, tiles: usize, k: usize) -> (i32, LaunchConfig) {
    let chunks = k / 32;
    let target = 64 * gpu.num_sms();
    let mut ksplit = 1;
    while ksplit < WARPS && tiles * ksplit * 2 <= 2 * target && chunks / (2 * ksplit) >= 8 {
        ksplit *= 2;
    }
    let cfg = LaunchConfig {
        grid_dim: (tiles.div_ceil(WARPS / ksplit) as u32, 1, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    (ksplit as i32, cfg)
}

/// Entry points by token count (index `tokens - 1`).
const PLAIN: [&str; GEMV_MAX_TOKENS] = [
    "gemv_1", "gemv_2", "gemv_3", "gemv_4", "gemv_5", "gemv_6", "gemv_7", "gemv_8",
];
const PLAIN_TC: [&str; GEMV_MAX_TOKENS] = [
    "gemv_tc_1",
    "gemv_tc_2",
    "gemv_tc_3",
    "gemv_tc_4",
    "gemv_tc_5",
    "gemv_tc_6",
    "gemv_tc_7",
    "gemv_tc_8",
];
const GLU_TC: [&str; GEMV_MAX_TOKENS] = [
    "gemv_glu_tc_1",
    "gemv_glu_tc_2",
    "gemv_glu_tc_3",
    "gemv_glu_tc_4",
    "gemv_glu_tc_5",
    "gemv_glu_tc_6",
    "gemv_glu_tc_7",
    "gemv_glu_tc_8",
];
const GLU: [&str; GEMV_MAX_TOKENS] = [
    "gemv_glu_1",
    "gemv_glu_2",
    "gemv_glu_3",
    "gemv_glu_4",
    "gemv_glu_5",
    "gemv_glu_6",
    "gemv_glu_7",
    "gemv_glu_8",
];
/// One output of a [`gemv`]: the next `width` rows of the weight, written `[tokens][width]`.
#[derive(Debug)]
pub struct GemvOut<'a, T> {
    /// Receives `tokens * width` values.
    pub out: &'a mut CudaSlice<T>,
    /// Weight rows (output features) it takes.
    pub width: usize,
}

/// Rows of `x` (`[tokens][k]`) for a weight of width `k`, checked.
fn tokens_of(kernel: &'static str, x_len: usize, k: usize) -> Result<usize> {
    if k == 0 || !k.is_multiple_of(8) || k > i32::MAX as usize {
        return Err(bad(
            kernel,
            format!("input width {k} (must be a positive multiple of 8)"),
        ));
    }
    if !x_len.is_multiple_of(k) {
        return Err(bad(
            kernel,
            format!("x of {x_len} values is not whole rows of {k}"),
        ));
    }
    let tokens = x_len / k;
    if tokens == 0 || tokens > GEMV_MAX_TOKENS {
        return Err(bad(
            kernel,
            format!("{tokens} tokens (1..={GEMV_MAX_TOKENS})"),
        ));
    }
    Ok(tokens)
}

/// The launch over `groups` row groups (one warp's rows each) of width `k`: how many warps
/// split each group's K, and the grid. Tuned on an H200 with the 8B shapes (ncu, per launch):
/// short grids split in 2 when each share keeps ≥ 256 16-byte chunks (O, 4,096 rows of
/// 4,096: 12.8 → 11.9 µs), long rows in 4 (down, 4,096 rows of 14,336: 38.7 → 31.8 µs); the
/// 6,144-row Q/K/V product ran slower split (16.2 → 18.4 µs), so grids of more than half the
/// ~64 warps per SM are not.
fn launch_shape(gpu: &Gpu, groups: usize, k: usize) -> (i32, LaunchConfig) {
    let chunks = k / 8;
    let target = 64 * gpu.num_sms();
    let mut ksplit = 1;
    if groups * 2 <= target && chunks >= 2 * 256 {
        ksplit = 2;
        if chunks >= 4 * 256 && groups <= target {
            ksplit = 4;
        }
    }
    let cfg = LaunchConfig {
        grid_dim: (groups.div_ceil(WARPS / ksplit) as u32, 1, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    (ksplit as i32, cfg)
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
    const K: &str = "gemv";
    let tokens = tokens_of(K, x.len(), k)?;
    if outs.is_empty() || outs.len() > 3 || outs.iter().any(|o| o.width == 0) {
        return Err(bad(
            K,
            format!(
                "{} outputs of widths {:?} (1 to 3, each positive)",
                outs.len(),
                outs.iter().map(|o| o.width).collect::<Vec<_>>()
            ),
        ));
    }
    let n: usize = outs.iter().map(|o| o.width).sum();
    check_weight(K, w.len(), n, k)?;
    if let Some(o) = outs.iter().find(|o| o.out.len() != tokens * o.width) {
        return Err(bad(
            K,
            format!(
                "an output of {} values, expected {tokens} x {}",
                o.out.len(),
                o.width
            ),
        ));
    }
    if let Some(b) = bias
        && b.len() != n
    {
        return Err(bad(K, format!("bias of {} values for {n} rows", b.len())));
    }
    let n0 = outs[0].width as i32;
    let n01 = n0 + outs.get(1).map_or(0, |o| o.width as i32);
    let (n_i, k_i) = (n as i32, k as i32);
    let (ksplit, cfg, name) = if use_tc(tokens, k) {
        let (ks, cfg) = tc_launch_shape(gpu, n.div_ceil(16), k);
        (ks, cfg, PLAIN_TC[tokens - 1])
    } else {
        let (ks, cfg) = launch_shape(gpu, n.div_ceil(plain_rows(tokens)), k);
        (ks, cfg, PLAIN[tokens - 1])
    };
    let f = gpu.function(&Variant::gemv(T::SCALAR), name)?;
    let stream = gpu.stream();
    let mut launch = stream.launch_builder(&f);
    // Absent outputs and bias are null pointers; the kernel never touches them (no rows map
    // to an absent output).
    let null = 0u64;
    match outs {
        [a] => launch.arg(&mut *a.out).arg(&null).arg(&null),
        [a, b] => launch.arg(&mut *a.out).arg(&mut *b.out).arg(&null),
        [a, b, c] => launch.arg(&mut *a.out).arg(&mut *b.out).arg(&mut *c.out),
        _ => return Err(bad(K, "outputs".to_string())),
    };
    launch.arg(w).arg(x);
    match bias {
        Some(b) => launch.arg(b),
        None => launch.arg(&null),
    };
    launch.arg(&n0).arg(&n01).arg(&n_i).arg(&k_i).arg(&ksplit);
    // SAFETY: matches `gemv_<tokens>` and `gemv_tc_<tokens>` in kernels/gemv.cu (same
    // arguments; the latter only for k a multiple of 32): w holds n x k values and x tokens x k
    // (k a multiple of 8, so every row starts 16-byte aligned in a cudarc allocation), each
    // output tokens x its width, the bias n values or null (all checked above); rows map to outputs by the prefix sums n0 and
    // n01 of the widths; the grid covers n rows at `ksplit` warps per row group.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

fn check_weight(kernel: &'static str, len: usize, n: usize, k: usize) -> Result<()> {
    if n == 0 || n > i32::MAX as usize || len != n * k {
        return Err(bad(
            kernel,
            format!("weight of {len} values for {n} rows of {k}"),
        ));
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
    const K: &str = "gemv_silu_mul";
    let tokens = tokens_of(K, x.len(), k)?;
    if inter == 0 || inter > (i32::MAX as usize) / 2 || w_gate_up.len() != 2 * inter * k {
        return Err(bad(
            K,
            format!(
                "gate/up weight of {} values for 2 x {inter} rows of {k}",
                w_gate_up.len()
            ),
        ));
    }
    if out.len() != tokens * inter {
        return Err(bad(
            K,
            format!("out of {} values, expected {tokens} x {inter}", out.len()),
        ));
    }
    let (i_i, k_i) = (inter as i32, k as i32);
    let (ksplit, cfg, name) = if use_tc(tokens, k) {
        let (ks, cfg) = tc_launch_shape(gpu, inter.div_ceil(16), k);
        (ks, cfg, GLU_TC[tokens - 1])
    } else {
        let (ks, cfg) = launch_shape(gpu, inter, k);
        (ks, cfg, GLU[tokens - 1])
    };
    let f = gpu.function(&Variant::gemv(T::SCALAR), name)?;
    let stream = gpu.stream();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&mut *out)
        .arg(w_gate_up)
        .arg(x)
        .arg(&i_i)
        .arg(&k_i)
        .arg(&ksplit);
    // SAFETY: matches `gemv_glu_<tokens>` and `gemv_glu_tc_<tokens>` in kernels/gemv.cu (same
    // arguments; the latter only for k a multiple of 32): w_gate_up holds 2 inter x k
    // values, x tokens x k (k a multiple of 8), out tokens x inter (checked above); the grid covers inter row pairs at `ksplit` warps each.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
