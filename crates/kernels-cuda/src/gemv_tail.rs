//! GEMV products whose last CTA runs the launch that would have followed them
//! (`kernels/gemv.cu`, "last CTA" tails): a batch-1 decode layer of a Llama model is then five
//! launches (Q/K/V with RoPE and the cache write, attention, O with the residual add and the
//! RMSNorm, gate/up, down with the residual add and the next RMSNorm) instead of eight.
//!
//! Each CTA of such a launch stores its outputs, fences and counts itself on a
//! [`TailCounter`]; the CTA that counts last reads every output back through L2 and runs the
//! tail with all its warps, then puts the counter back to zero:
//! * [`gemv_add_norm`] (O, down): `residual += round(x Wᵀ)`, then `out = RMSNorm(residual) ·
//!   weight`, bit for bit [`crate::gemv`] followed by [`crate::rms_norm`] with that product as
//!   its delta (the sum of squares in `rms_norm`'s own order: the tail replays its CTA's
//!   threads and warps).
//! * [`gemv_qkv_rope_cache`] (Q/K/V): the product split into q, k and v, then RoPE of q and k
//!   and the cache write of k and v, bit for bit [`crate::gemv`] followed by
//!   [`crate::rope_and_cache`] (the same device functions: every KV dtype quantizes the same).
//!
//! Measured against the unfused chain with `KVSERVE_GEMV_TAIL=0` in the model
//! (kernels/NOTES.md).
#![allow(unsafe_code)]

use cudarc::driver::CudaSlice;

use crate::attention::ActScalar;
use crate::cache::{LayerCache, RopeCacheShapes, Rotary, check_rope_cache};
use crate::compile::Variant;
use crate::device::Gpu;
use crate::error::{Result, bad};
use crate::gemv::{EpilogueLens, Family, check_epilogue, plan_gemv, push_bias, tokens_of};
use crate::indices::Indices;
use crate::launch::Launch;
use crate::layers::norm_threads;

/// The count a tail launch's CTAs add themselves to (one `u32` on the device). Zero between
/// launches: it is allocated zeroed and every launch's last CTA puts it back. Launches that
/// share one must be ordered (one stream; `&mut` here), which the crate's launches are.
/// Allocate it once per stream of steps, like other step scratch (a CUDA graph captures its
/// address).
#[derive(Debug)]
pub struct TailCounter {
    count: CudaSlice<u32>,
}

impl TailCounter {
    /// A zeroed counter on `gpu`.
    ///
    /// # Errors
    /// Driver errors (out of memory).
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Ok(Self {
            count: gpu.stream().alloc_zeros::<u32>(1)?,
        })
    }

    /// The counter's value, read back after the stream's work so far (zero unless a launch
    /// failed midway): for tests.
    ///
    /// # Errors
    /// Driver errors.
    pub fn value(&self, gpu: &Gpu) -> Result<u32> {
        let v = gpu.stream().clone_dtoh(&self.count)?;
        Ok(v.first().copied().unwrap_or(0))
    }
}

/// The residual add and RMSNorm that follow an O or down product ([`gemv_add_norm`]).
#[derive(Debug)]
pub struct AddNorm<'a, T> {
    /// The f32 residual stream, `[tokens][n]` for a weight of `n` rows: the product (rounded
    /// to the activation type) is added to it.
    pub residual: &'a mut CudaSlice<f32>,
    /// The norm weight, `[n]` (the next layer's attention norm after a down product, the
    /// final norm after the last one).
    pub weight: &'a CudaSlice<T>,
    /// RMSNorm's epsilon (finite, ≥ 0).
    pub eps: f32,
    /// Receives the normalized rows, `[tokens][n]`.
    pub out: &'a mut CudaSlice<T>,
}

/// `residual += round(x Wᵀ (+ bias))`, then `out = RMSNorm(residual) · weight`, in one launch:
/// the same bits as [`crate::gemv`] into a buffer followed by [`crate::rms_norm`] adding it.
/// `x` is `[tokens][k]` with `tokens ≤ GEMV_MAX_TOKENS`, the weight `[n][k]`.
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for sizes that do not fit (as [`crate::gemv`]; the
/// residual and `out` not `[tokens][n]`, `n` not a multiple of 8, a norm weight not of `n`
/// values, a bad `eps`).
pub fn gemv_add_norm<T: ActScalar>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    k: usize,
    bias: Option<&CudaSlice<T>>,
    norm: AddNorm<'_, T>,
    counter: &mut TailCounter,
) -> Result<()> {
    const K: &str = "gemv_add_norm";
    let (tokens, n) = check_add_norm(
        K,
        &AddNormLens {
            x: x.len(),
            w: w.len(),
            k,
            bias: bias.map(CudaSlice::len),
            residual: norm.residual.len(),
            weight: norm.weight.len(),
            eps: norm.eps,
            out: norm.out.len(),
        },
    )?;
    let plan = plan_gemv(gpu.num_sms(), tokens, n, k, Family::AddNorm);
    let f = gpu.function(&Variant::gemv(T::SCALAR), plan.name)?;
    let null = 0u64;
    let (n_i, k_i) = (n as i32, k as i32);
    let vthreads = norm_threads(n) as i32;
    let mut launch = Launch::new(gpu, &f);
    launch.arg(&mut *norm.residual).arg(w).arg(x);
    push_bias(&mut launch, bias, &null)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&plan.ksplit)
        .arg(&mut *norm.out)
        .arg(norm.weight)
        .arg(&norm.eps)
        .arg(&vthreads)
        .arg(&mut counter.count);
    // SAFETY: matches ADDNORM_PARAMS of `gemv[_tc]_addnorm_<tokens>` in kernels/gemv.cu (the
    // tensor-core ones only for k a multiple of 32): w holds n x k values (k a multiple of 8:
    // 16-byte aligned rows), x tokens x k, the residual and out tokens x n (n a multiple of
    // 8, tokens x n within i32: the tail's vector loads and offsets), the norm weight n, the
    // bias n values or null (checked above); vthreads is rms_norm's CTA size for n (a
    // multiple of 32 up to 1024, as the tail's shared sums assume); the counter is one u32,
    // zero between launches. The grid covers n rows at `ksplit` warps per row group.
    // The kernel prefetches only the weights into L2, then calls kvs_wait_prior() (PDL).
    unsafe { launch.dependent().launch(plan.cfg) }?;
    Ok(())
}

/// Lengths of a [`gemv_add_norm`] call, for the checks (no device needed).
#[derive(Debug, Clone, Copy)]
struct AddNormLens {
    x: usize,
    w: usize,
    k: usize,
    bias: Option<usize>,
    residual: usize,
    weight: usize,
    eps: f32,
    out: usize,
}

/// `(tokens, n)` of a [`gemv_add_norm`] call, every length checked.
fn check_add_norm(kernel: &'static str, l: &AddNormLens) -> Result<(usize, usize)> {
    let tokens = tokens_of(kernel, "x", l.x, l.k)?;
    let residual = EpilogueLens::Residual {
        residual: l.residual,
    };
    let n = check_epilogue(kernel, residual, tokens, l.w, l.k, l.bias)?;
    if !n.is_multiple_of(8) || tokens * n > i32::MAX as usize {
        return Err(bad(
            kernel,
            format!("{tokens} rows of {n} (a multiple of 8, within i32)"),
        ));
    }
    if l.weight != n {
        return Err(bad(
            kernel,
            format!("norm weight of {} values for rows of {n}", l.weight),
        ));
    }
    if !l.eps.is_finite() || l.eps < 0.0 {
        return Err(bad(kernel, format!("eps {}", l.eps)));
    }
    if l.out != tokens * n {
        return Err(bad(
            kernel,
            format!("out of {} values, expected {tokens} x {n}", l.out),
        ));
    }
    Ok((tokens, n))
}

/// The Q/K/V product's outputs and the RoPE + cache write its last CTA applies
/// ([`gemv_qkv_rope_cache`]).
#[derive(Debug)]
pub struct QkvRopeCache<'a, 'b, T> {
    /// Receives q, `[tokens][num_q_heads][head_dim]`, rotated.
    pub q: &'a mut CudaSlice<T>,
    /// Receives k, `[tokens][num_kv_heads][head_dim]`, unrotated (the cache holds it rotated).
    pub k: &'a mut CudaSlice<T>,
    /// Receives v, `[tokens][num_kv_heads][head_dim]`.
    pub v: &'a mut CudaSlice<T>,
    /// The rotary embedding: shapes, the step's positions, the inverse frequencies.
    pub rotary: &'a Rotary<'b>,
    /// Slot of each token's K and V (negative: not written; q is rotated all the same).
    pub slot_mapping: &'a Indices<i64>,
    /// Where K and V go.
    pub cache: LayerCache<'a>,
}

/// The Q/K/V product `x Wᵀ (+ bias)` of a stacked weight (`[q rows | k rows | v rows][k]`)
/// into q, k and v, then RoPE of q (in place) and of k and the cache write of k and v, in one
/// launch: the same bits as [`crate::gemv`] into the three outputs followed by
/// [`crate::rope_and_cache`] (q, both caches; k's buffer holds the unrotated product in both).
///
/// # Errors
/// [`crate::KernelError::BadArgument`] for sizes that do not fit (as [`crate::gemv`] and
/// [`crate::rope_and_cache`]; also a slot mapping of another token count than `x`),
/// [`crate::KernelError::Unsupported`] for a head_dim without kernels.
pub fn gemv_qkv_rope_cache<T: ActScalar>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    k: usize,
    bias: Option<&CudaSlice<T>>,
    qkv: QkvRopeCache<'_, '_, T>,
    counter: &mut TailCounter,
) -> Result<()> {
    const K: &str = "gemv_qkv_rope_cache";
    let QkvRopeCache {
        q,
        k: k_out,
        v,
        rotary,
        slot_mapping,
        cache,
    } = qkv;
    let layout = cache.layout;
    let shape = &rotary.shape;
    let tokens = tokens_of(K, "x", x.len(), k)?;
    if slot_mapping.len() != tokens {
        return Err(bad(
            K,
            format!("{} slots for {tokens} tokens", slot_mapping.len()),
        ));
    }
    let lens = [q.len(), k_out.len(), v.len()];
    let shapes = RopeCacheShapes::of(rotary, lens, slot_mapping, &cache);
    // Rotary shapes, positions, rows of q, k and v, slots inside the caches.
    check_rope_cache(layout, shape, &shapes)?;
    let d = layout.head_dim();
    let (nq, nkv) = (shape.num_q_heads * d, shape.num_kv_heads * d);
    let widths = [(nq, q.len()), (nkv, k_out.len()), (nkv, v.len())];
    let n = check_epilogue(
        K,
        EpilogueLens::Store(&widths),
        tokens,
        w.len(),
        k,
        bias.map(CudaSlice::len),
    )?;
    let plan = plan_gemv(gpu.num_sms(), tokens, n, k, Family::Rope);
    let variant = Variant::gemv_rope(T::SCALAR, layout.dtype(), d);
    let f = gpu.function(&variant, plan.name)?;
    let null = 0u64;
    let (n0, n01, n_i, k_i) = (nq as i32, (nq + nkv) as i32, n as i32, k as i32);
    let qh = shape.num_q_heads as i32;
    let kvh = shape.num_kv_heads as i32;
    let interleaved = i32::from(shape.interleaved);
    let bs = layout.block_size() as i32;
    let shift = layout.block_size().trailing_zeros() as i32;
    let block_bytes = layout.kv_block_bytes() as i64;
    let mut launch = Launch::new(gpu, &f);
    launch
        .arg(&mut *q)
        .arg(&mut *k_out)
        .arg(&mut *v)
        .arg(w)
        .arg(x);
    push_bias(&mut launch, bias, &null)
        .arg(&n0)
        .arg(&n01)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&plan.ksplit)
        .arg(&mut *cache.k)
        .arg(&mut *cache.v)
        .arg(rotary.positions.device())
        .arg(rotary.inv_freq)
        .arg(slot_mapping.device())
        .arg(&qh)
        .arg(&kvh)
        .arg(&interleaved)
        .arg(&bs)
        .arg(&shift)
        .arg(&block_bytes)
        .arg(&mut counter.count);
    // SAFETY: matches ROPE_PARAMS of `gemv[_tc]_rope_<tokens>` in kernels/gemv.cu compiled for
    // this activation type, KV dtype and head_dim (the tensor-core ones only for k a multiple
    // of 32): w holds n x k values (k a multiple of 8), x tokens x k, q tokens x num_q_heads x
    // head_dim, k and v tokens x num_kv_heads x head_dim (rows map to them by n0 and n01), the
    // bias n values or null; positions and slots one per token, inv_freq head_dim / 2; every
    // non-negative slot is inside both caches, whose block size is a power of two (the tail
    // shifts); the counter is one u32, zero between launches (all checked above). The grid
    // covers n rows at `ksplit` warps per row group.
    // The kernel prefetches only the weights into L2, then calls kvs_wait_prior() (PDL).
    unsafe { launch.dependent().launch(plan.cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelError;

    fn is_bad<T: std::fmt::Debug>(r: Result<T>) -> bool {
        matches!(r, Err(KernelError::BadArgument { .. }))
    }

    fn good(tokens: usize, n: usize, k: usize) -> AddNormLens {
        AddNormLens {
            x: tokens * k,
            w: n * k,
            k,
            bias: None,
            residual: tokens * n,
            weight: n,
            eps: 1e-5,
            out: tokens * n,
        }
    }

    #[test]
    fn add_norm_calls_are_checked() {
        const K: &str = "test";
        assert_eq!(check_add_norm(K, &good(3, 4096, 4096)).unwrap(), (3, 4096));
        assert_eq!(check_add_norm(K, &good(1, 576, 1536)).unwrap(), (1, 576));
        let with = |f: &dyn Fn(&mut AddNormLens)| {
            let mut l = good(2, 64, 96);
            f(&mut l);
            check_add_norm(K, &l)
        };
        assert!(with(&|_| {}).is_ok());
        assert!(with(&|l| l.bias = Some(64)).is_ok());
        // x: not whole rows, none, 9 tokens; k not a multiple of 8.
        assert!(is_bad(with(&|l| l.x -= 1)));
        assert!(is_bad(with(&|l| l.x = 0)));
        assert!(is_bad(with(&|l| l.x = 9 * 96)));
        assert!(is_bad(with(&|l| {
            l.k = 100;
            l.x = 200;
            l.w = 6400;
        })));
        // A weight that is not whole rows; a residual of another shape; a bias of another n.
        assert!(is_bad(with(&|l| l.w += 8)));
        assert!(is_bad(with(&|l| l.residual += 64)));
        assert!(is_bad(with(&|l| l.bias = Some(63))));
        // Rows not a multiple of 8 (the tail's vector loads).
        assert!(is_bad(with(&|l| {
            l.w = 60 * 96;
            l.residual = 120;
            l.weight = 60;
            l.out = 120;
        })));
        // The norm: weight, eps, out.
        assert!(is_bad(with(&|l| l.weight = 63)));
        assert!(is_bad(with(&|l| l.eps = -1.0)));
        assert!(is_bad(with(&|l| l.eps = f32::NAN)));
        assert!(is_bad(with(&|l| l.eps = f32::INFINITY)));
        assert!(is_bad(with(&|l| l.out -= 1)));
        assert!(is_bad(with(&|l| l.out = 0)));
    }
}
