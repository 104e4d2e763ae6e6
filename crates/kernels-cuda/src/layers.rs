//! The per-token layers of a Llama step: embedding gather, RMSNorm with the residual add,
//! rotary embedding and SiLU·up (`kernels/elementwise.cu`). The residual stream is f32.
#![allow(unsafe_code)]

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig};

use crate::attention::ActScalar;
use crate::compile::Variant;
use crate::device::Gpu;
use crate::error::{Result, bad};
use crate::indices::Indices;
use crate::launch::Launch;

const THREADS: u32 = 256;
/// The most threads of an RMSNorm CTA (`kNormThreads` in elementwise.cu).
const NORM_THREADS: usize = 1024;

/// Values per thread of the vector `silu_mul` (16 bytes of a 16-bit type).
const SILU_VEC: usize = 8;

fn rows(tokens: usize) -> Result<LaunchConfig> {
    if tokens == 0 || tokens > i32::MAX as usize {
        return Err(bad("elementwise", format!("{tokens} tokens")));
    }
    Ok(LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Grid (tokens, chunks) of [`THREADS`]-thread CTAs, each thread `per_thread` values of a
/// `width`-value row (`silu_mul`, `split_qkv`).
fn chunked_rows(
    kernel: &'static str,
    tokens: usize,
    width: usize,
    per_thread: usize,
) -> Result<LaunchConfig> {
    let mut cfg = rows(tokens)?;
    cfg.grid_dim.1 = u32::try_from(width.div_ceil(THREADS as usize * per_thread))
        .ok()
        .filter(|&c| c <= 65_535)
        .ok_or_else(|| bad(kernel, format!("rows of {width} values: too wide")))?;
    Ok(cfg)
}

fn dim(kernel: &'static str, what: &str, n: usize) -> Result<i32> {
    if n == 0 || n > i32::MAX as usize {
        return Err(bad(kernel, format!("{what} = {n}")));
    }
    Ok(n as i32)
}

/// `residual[t] = table[ids[t]]` (as f32): `table` is `[vocab][hidden]`, `residual`
/// `[ids.len()][hidden]`.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for a token id outside `0..vocab` or mismatched sizes.
pub fn embedding_gather<T: ActScalar>(
    gpu: &Gpu,
    table: &CudaSlice<T>,
    vocab: usize,
    ids: &Indices<i32>,
    residual: &mut CudaSlice<f32>,
) -> Result<()> {
    if vocab == 0 || !table.len().is_multiple_of(vocab) {
        return Err(bad(
            "embedding_gather",
            format!("table of {} values for vocab {vocab}", table.len()),
        ));
    }
    let shard = VocabRows {
        start: 0,
        len: vocab,
        vocab,
    };
    embedding_gather_rows(gpu, table, table.len() / vocab, shard, ids, residual)
}

/// The rows of a vocabulary one table holds: token ids `start..start + len` of `vocab` (a
/// tensor-parallel rank's slice of the embedding or LM head; the whole vocabulary on one rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabRows {
    /// The token id of the table's first row.
    pub start: usize,
    /// The rows that are real tokens (a table may be longer: padding).
    pub len: usize,
    /// The whole vocabulary.
    pub vocab: usize,
}

/// The vocab-parallel embedding: `residual[t] = table[ids[t] - rows.start]` (as f32) for ids
/// in `rows`, zeros for the others (held by other ranks: the sum over ranks is the
/// embedding). `table` is `[at least rows.len][hidden]`, `residual` `[ids.len()][hidden]`.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for a token id outside `0..rows.vocab`, rows outside
/// the vocabulary or the table, or mismatched sizes.
pub fn embedding_gather_rows<T: ActScalar>(
    gpu: &Gpu,
    table: &CudaSlice<T>,
    hidden: usize,
    rows_of: VocabRows,
    ids: &Indices<i32>,
    residual: &mut CudaSlice<f32>,
) -> Result<()> {
    const K: &str = "embedding_gather";
    let h = dim(K, "hidden", hidden)?;
    let VocabRows { start, len, vocab } = rows_of;
    if vocab == 0
        || start.checked_add(len).is_none_or(|end| end > vocab)
        || table.len() < len.saturating_mul(hidden)
        || vocab > i32::MAX as usize
    {
        return Err(bad(
            K,
            format!(
                "rows {start}..{} of a vocabulary of {vocab} in a table of {} values of \
                 hidden size {hidden}",
                start.saturating_add(len),
                table.len()
            ),
        ));
    }
    if !ids.is_empty() && (ids.min() < 0 || ids.max() >= vocab as i64) {
        return Err(bad(
            K,
            format!(
                "token ids span {}..={}, outside the vocabulary 0..{vocab}",
                ids.min(),
                ids.max()
            ),
        ));
    }
    if residual.len() != ids.len() * hidden {
        return Err(bad(
            K,
            format!(
                "residual of {} values, expected {} x {hidden}",
                residual.len(),
                ids.len()
            ),
        ));
    }
    let cfg = rows(ids.len())?;
    let f = gpu.function(&Variant::elementwise(T::SCALAR), K)?;
    let (start, len) = (start as i32, len as i32);
    let mut launch = Launch::new(gpu, &f);
    launch
        .arg(&mut *residual)
        .arg(table)
        .arg(ids.device())
        .arg(&h)
        .arg(&start)
        .arg(&len);
    // SAFETY: matches `embedding_gather` in kernels/elementwise.cu; the kernel reads row
    // `id - start` only when it is in `0..len`, and `table` holds `len` rows of `hidden`
    // (checked); `residual` holds one row per id. The kernel calls kvs_wait_prior() before
    // touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

/// The vocab-parallel LM head's gathered logits back in token order: `src` is
/// `[world][n][per_rank]` (every rank's `[n][per_rank]` block, as an all-gather leaves them;
/// rank `r` holds token ids `r * vocab / world` up to `(r + 1) * vocab / world`, its rows
/// padded to `per_rank`), `out` is `[n][vocab]`.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for mismatched sizes, or a `per_rank` below a rank's
/// share of the vocabulary.
pub fn unshard_vocab<T: ActScalar>(
    gpu: &Gpu,
    src: &CudaSlice<T>,
    world: usize,
    per_rank: usize,
    vocab: usize,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    const K: &str = "unshard_vocab";
    let w = u32::try_from(world)
        .ok()
        .filter(|&w| (1..=65_535).contains(&w))
        .ok_or_else(|| bad(K, format!("{world} ranks")))?;
    let v = dim(K, "vocab", vocab)?;
    let p = dim(K, "per_rank", per_rank)?;
    if per_rank < vocab.div_ceil(world) || !out.len().is_multiple_of(vocab) {
        return Err(bad(
            K,
            format!("{per_rank} values per rank for {world} ranks of a vocabulary of {vocab}"),
        ));
    }
    let n = out.len() / vocab;
    if src.len() != world * n * per_rank {
        return Err(bad(
            K,
            format!(
                "src of {} values, expected {world} ranks x {n} rows x {per_rank}",
                src.len()
            ),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let mut cfg = rows(n)?;
    cfg.grid_dim.1 = w;
    let n = n as i32;
    let f = gpu.function(&Variant::elementwise(T::SCALAR), K)?;
    let mut launch = Launch::new(gpu, &f);
    launch.arg(&mut *out).arg(src).arg(&n).arg(&p).arg(&v);
    // SAFETY: matches `unshard_vocab` in kernels/elementwise.cu; CTA (j, r) reads rank r's
    // row j, `len_r <= ceil(vocab / world) <= per_rank` values inside `src` (sizes checked),
    // and writes them inside row j of `out`. The kernel calls kvs_wait_prior() first (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

/// `residual += delta` (when given), then `out = RMSNorm(residual) * weight` per token;
/// `weight` is `[hidden]`, the others `[tokens][hidden]`.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for mismatched sizes or a negative or non-finite `eps`.
pub fn rms_norm<T: ActScalar>(
    gpu: &Gpu,
    residual: &mut CudaSlice<f32>,
    delta: Option<&CudaSlice<T>>,
    weight: &CudaSlice<T>,
    eps: f32,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    const K: &str = "rms_norm";
    let hidden = weight.len();
    let h = dim(K, "hidden", hidden)?;
    if !eps.is_finite() || eps < 0.0 {
        return Err(bad(K, format!("eps {eps}")));
    }
    if !residual.len().is_multiple_of(hidden)
        || out.len() != residual.len()
        || delta.is_some_and(|d| d.len() != residual.len())
    {
        return Err(bad(
            K,
            format!(
                "residual {}, out {}, delta {:?} values for hidden {hidden}",
                residual.len(),
                out.len(),
                delta.map(CudaSlice::len)
            ),
        ));
    }
    let mut cfg = rows(residual.len() / hidden)?;
    // About 4 values per thread (each keeps up to 8 in registers), a multiple of 32 threads.
    cfg.block_dim.0 = (hidden.div_ceil(4).div_ceil(32) * 32).clamp(32, NORM_THREADS) as u32;
    let variant = Variant::elementwise(T::SCALAR);
    match delta {
        None => {
            let f = gpu.function(&variant, "rms_norm")?;
            let mut launch = Launch::new(gpu, &f);
            launch
                .arg(&mut *out)
                .arg(&mut *residual)
                .arg(weight)
                .arg(&h)
                .arg(&eps);
            // SAFETY: matches `rms_norm`; out and residual hold tokens x hidden values, the
            // weight hidden (checked).
            // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
            unsafe { launch.dependent().launch(cfg) }?;
        }
        Some(delta) => {
            let f = gpu.function(&variant, "add_rms_norm")?;
            let mut launch = Launch::new(gpu, &f);
            launch
                .arg(&mut *out)
                .arg(&mut *residual)
                .arg(delta)
                .arg(weight)
                .arg(&h)
                .arg(&eps);
            // SAFETY: matches `add_rms_norm`; out, residual and delta hold tokens x hidden
            // values, the weight hidden (checked).
            // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
            unsafe { launch.dependent().launch(cfg) }?;
        }
    }
    Ok(())
}

/// Shapes of a rotary embedding call.
#[derive(Debug, Clone, Copy)]
pub struct RopeShape {
    /// Query heads per token.
    pub num_q_heads: usize,
    /// KV heads per token.
    pub num_kv_heads: usize,
    /// Channels per head (even).
    pub head_dim: usize,
    /// Pairs `(2i, 2i + 1)` (GGUF Llama) rather than `(i, i + head_dim / 2)` (HF, NeoX).
    pub interleaved: bool,
}

/// Rotates `q` (`[tokens][num_q_heads][head_dim]`) and `k` (`[tokens][num_kv_heads][head_dim]`)
/// in place by `positions[t] * inv_freq[i]` (`inv_freq`: `[head_dim / 2]`, scaling included).
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for mismatched sizes or an odd head_dim.
pub fn rope<T: ActScalar>(
    gpu: &Gpu,
    shape: RopeShape,
    positions: &Indices<i32>,
    inv_freq: &CudaSlice<f32>,
    q: &mut CudaSlice<T>,
    k: &mut CudaSlice<T>,
) -> Result<()> {
    const K: &str = "rope";
    let d = shape.head_dim;
    if d == 0 || !d.is_multiple_of(2) || inv_freq.len() != d / 2 {
        return Err(bad(
            K,
            format!("head_dim {d} with {} inverse frequencies", inv_freq.len()),
        ));
    }
    let t = positions.len();
    if q.len() != t * shape.num_q_heads * d || k.len() != t * shape.num_kv_heads * d {
        return Err(bad(
            K,
            format!(
                "q {} and k {} values for {t} tokens of {} + {} heads x {d}",
                q.len(),
                k.len(),
                shape.num_q_heads,
                shape.num_kv_heads
            ),
        ));
    }
    if positions.min() < 0 {
        return Err(bad(K, format!("position {}", positions.min())));
    }
    // One CTA per (token, head), a thread per rotated pair.
    let mut cfg = rows(t)?;
    let heads = shape.num_q_heads + shape.num_kv_heads;
    if heads > 65_535 {
        return Err(bad(K, format!("{heads} heads per token")));
    }
    cfg.grid_dim.1 = heads as u32;
    cfg.block_dim.0 = (d / 2).div_ceil(32).clamp(1, 8) as u32 * 32;
    let qh = dim(K, "num_q_heads", shape.num_q_heads)?;
    let kh = dim(K, "num_kv_heads", shape.num_kv_heads)?;
    let di = dim(K, "head_dim", d)?;
    let inter = i32::from(shape.interleaved);
    let f = gpu.function(&Variant::elementwise(T::SCALAR), K)?;
    let mut launch = Launch::new(gpu, &f);
    launch
        .arg(&mut *q)
        .arg(&mut *k)
        .arg(positions.device())
        .arg(inv_freq)
        .arg(&qh)
        .arg(&kh)
        .arg(&di)
        .arg(&inter);
    // SAFETY: matches `rope`; q and k hold tokens x heads x head_dim values, inv_freq
    // head_dim / 2, positions one per token (checked).
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

/// `out[t][i] = silu(gate_up[t][i]) * gate_up[t][inter + i]`: `gate_up` is the fused
/// `[tokens][2 * inter]` output of the gate and up projections, `out` `[tokens][inter]`.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for mismatched sizes.
pub fn silu_mul<T: ActScalar>(
    gpu: &Gpu,
    gate_up: &CudaSlice<T>,
    inter: usize,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    const K: &str = "silu_mul";
    let i = dim(K, "intermediate size", inter)?;
    if !out.len().is_multiple_of(inter) || gate_up.len() != 2 * out.len() {
        return Err(bad(
            K,
            format!(
                "gate_up {} and out {} values for intermediate size {inter}",
                gate_up.len(),
                out.len()
            ),
        ));
    }
    // Whole 16-byte vectors of 8 values per thread where the rows allow (every row then
    // starts 16-byte aligned, the buffers themselves being allocations); one value otherwise.
    let (name, per_thread) = if inter.is_multiple_of(SILU_VEC) {
        (K, SILU_VEC)
    } else {
        ("silu_mul_scalar", 1)
    };
    let cfg = chunked_rows(K, out.len() / inter, inter, per_thread)?;
    let f = gpu.function(&Variant::elementwise(T::SCALAR), name)?;
    let mut launch = Launch::new(gpu, &f);
    launch.arg(&mut *out).arg(gate_up).arg(&i);
    // SAFETY: matches `silu_mul` / `silu_mul_scalar` (kernels/elementwise.cu); gate_up holds
    // tokens x 2 x inter values and out tokens x inter (checked); the grid is (tokens,
    // ceil(inter / (256 x per-thread values))), and the vector entry gets an inter that is a
    // multiple of its 8 values, so its 16-byte accesses stay inside each row and aligned
    // (both buffers are whole allocations).
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

/// `out[j] = src[rows[j]]`: copies whole rows of `width` values (e.g. the hidden states of the
/// tokens whose logits are wanted). `src` is `[n][width]`, `out` `[rows.len()][width]`.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for a row outside `src` or mismatched sizes.
pub fn gather_rows<T: ActScalar>(
    gpu: &Gpu,
    src: &CudaSlice<T>,
    width: usize,
    rows_idx: &Indices<i32>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    const K: &str = "gather_rows";
    let w = dim(K, "width", width)?;
    if !src.len().is_multiple_of(width) || out.len() != rows_idx.len() * width {
        return Err(bad(
            K,
            format!(
                "src {} and out {} values for {} rows of {width}",
                src.len(),
                out.len(),
                rows_idx.len()
            ),
        ));
    }
    let n = (src.len() / width) as i64;
    if rows_idx.is_empty() {
        return Ok(());
    }
    if rows_idx.min() < 0 || rows_idx.max() >= n {
        return Err(bad(
            K,
            format!(
                "rows {}..={} outside the source's {n}",
                rows_idx.min(),
                rows_idx.max()
            ),
        ));
    }
    let cfg = rows(rows_idx.len())?;
    let f = gpu.function(&Variant::elementwise(T::SCALAR), K)?;
    let mut launch = Launch::new(gpu, &f);
    launch
        .arg(&mut *out)
        .arg(src)
        .arg(rows_idx.device())
        .arg(&w);
    // SAFETY: matches `gather_rows` in kernels/elementwise.cu; every row index is inside
    // `src` and `out` holds one row per index (checked).
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

/// Fills `out` with values uniform in `[lo, hi)` from a hash of `seed` and the index: dummy
/// weights of a real shape for speed measurements, generated on the device.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for non-finite bounds or `lo > hi`.
pub fn fill_uniform<T: ActScalar>(
    gpu: &Gpu,
    out: &mut CudaSlice<T>,
    seed: u64,
    lo: f32,
    hi: f32,
) -> Result<()> {
    const K: &str = "fill_uniform";
    if !lo.is_finite() || !hi.is_finite() || lo > hi {
        return Err(bad(K, format!("range [{lo}, {hi})")));
    }
    let n = out.len();
    if n == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(THREADS as usize).min(gpu.num_sms() * 16) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let n_i = n as i64;
    let f = gpu.function(&Variant::elementwise(T::SCALAR), K)?;
    let mut launch = Launch::new(gpu, &f);
    launch.arg(&mut *out).arg(&n_i).arg(&seed).arg(&lo).arg(&hi);
    // SAFETY: matches `fill_uniform`; the kernel writes indices below n = out.len() only.
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

/// Splits the output of one Q/K/V product over the stacked weight (`qkv`, `[tokens][nq + 2 *
/// nkv]`) into `q` (`[tokens][nq]`), `k` and `v` (`[tokens][nkv]`), adding `bias` (stacked the
/// same way) when given: one product and one launch instead of three products.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for widths that are not positive multiples of 8 or
/// buffers that are not whole rows of them.
#[allow(clippy::too_many_arguments)]
pub fn split_qkv<T: ActScalar>(
    gpu: &Gpu,
    qkv: &CudaSlice<T>,
    bias: Option<&CudaSlice<T>>,
    nq: usize,
    nkv: usize,
    q: &mut CudaSlice<T>,
    k: &mut CudaSlice<T>,
    v: &mut CudaSlice<T>,
) -> Result<()> {
    const K: &str = "split_qkv";
    let (nq32, nkv32) = (dim(K, "q width", nq)?, dim(K, "k/v width", nkv)?);
    if !nq.is_multiple_of(SILU_VEC) || !nkv.is_multiple_of(SILU_VEC) {
        return Err(bad(
            K,
            format!("widths {nq} and {nkv}: not multiples of {SILU_VEC}"),
        ));
    }
    let width = nq + 2 * nkv;
    let tokens = q.len() / nq;
    if qkv.len() != tokens * width
        || q.len() != tokens * nq
        || k.len() != tokens * nkv
        || v.len() != tokens * nkv
        || bias.is_some_and(|b| b.len() != width)
    {
        return Err(bad(
            K,
            format!(
                "qkv {}, q {}, k {}, v {} and bias {:?} values for widths {nq} and {nkv}",
                qkv.len(),
                q.len(),
                k.len(),
                v.len(),
                bias.map(CudaSlice::len)
            ),
        ));
    }
    if tokens == 0 {
        return Ok(());
    }
    let cfg = chunked_rows(K, tokens, width, SILU_VEC)?;
    let f = gpu.function(&Variant::elementwise(T::SCALAR), K)?;
    // No bias: a null pointer the kernel never reads through.
    let null = 0u64;
    let mut launch = Launch::new(gpu, &f);
    launch.arg(&mut *q).arg(&mut *k).arg(&mut *v).arg(qkv);
    match bias {
        Some(b) => launch.arg(b),
        None => launch.arg(&null),
    };
    launch.arg(&nq32).arg(&nkv32);
    // SAFETY: matches `split_qkv` in kernels/elementwise.cu (a null bias pointer when there is
    // none); qkv holds tokens x (nq + 2 nkv) values, q tokens x nq, k and v tokens x nkv, bias
    // nq + 2 nkv (checked); widths are multiples of 8, so the 16-byte accesses stay inside
    // their rows and aligned (every buffer is a whole allocation), grid (tokens, chunks).
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

/// `x[t] += bias` for every row `t` of `x` (`[tokens][bias.len()]`): the biases of Qwen2's
/// Q/K/V projections (`bias` may be part of a stacked bias: `slice(..)`, or `as_view()`).
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for a `x` that is not whole rows of `bias`.
pub fn add_bias<T: ActScalar>(
    gpu: &Gpu,
    x: &mut CudaSlice<T>,
    bias: &CudaView<'_, T>,
) -> Result<()> {
    const K: &str = "add_bias";
    let w = dim(K, "bias length", bias.len())?;
    if !x.len().is_multiple_of(bias.len()) {
        return Err(bad(
            K,
            format!("{} values are not rows of {}", x.len(), bias.len()),
        ));
    }
    if x.is_empty() {
        return Ok(());
    }
    let cfg = rows(x.len() / bias.len())?;
    let f = gpu.function(&Variant::elementwise(T::SCALAR), K)?;
    let mut launch = Launch::new(gpu, &f);
    launch.arg(&mut *x).arg(bias).arg(&w);
    // SAFETY: matches `add_bias` in kernels/elementwise.cu; x holds whole rows of `bias`
    // (checked), one CTA per row.
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_rows_cover_the_row_and_refuse_what_the_grid_cannot_hold() {
        // Llama-3.1-8B's MLP width at 8 values a thread: 7 CTAs of 2,048 values per token.
        let cfg = chunked_rows("silu_mul", 32, 14_336, 8).unwrap();
        assert_eq!((cfg.grid_dim, cfg.block_dim), ((32, 7, 1), (THREADS, 1, 1)));
        // A width that does not divide: one partial CTA; one value a thread.
        assert_eq!(chunked_rows("k", 1, 1_001, 1).unwrap().grid_dim, (1, 4, 1));
        assert!(chunked_rows("k", 0, 8, 8).is_err());
        assert!(chunked_rows("k", 1, 65_536 * 256 + 1, 1).is_err());
    }
}
