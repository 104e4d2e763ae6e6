//! Writing new K/V rows into the paged cache, quantizing on the fly; the same fused with the
//! rotary embedding of q and k.
#![allow(unsafe_code)]

use cudarc::driver::{CudaSlice, LaunchConfig};
use kv_quant::BlockLayout;

use crate::attention::ActScalar;
use crate::compile::{HEAD_DIMS, Program, Variant};
use crate::device::Gpu;
use crate::error::{KernelError, Result, bad};
use crate::indices::Indices;
use crate::launch::Launch;
use crate::layers::RopeShape;

const KERNEL: &str = "reshape_and_cache";
const FUSED: &str = "rope_and_cache";
/// Query-head warps of a `rope_and_cache` CTA at most (`kMaxQueryWarps` in cache.cu).
const MAX_QUERY_WARPS: usize = 8;
/// The most heads per token (q and KV together) a rotary embedding takes (as `rope`).
const MAX_HEADS: usize = 65_535;

/// The layout checks of a cache write: a head_dim with a kernel, a power-of-two block size (the
/// kernels shift).
fn check_layout(kernel: &'static str, layout: &BlockLayout) -> Result<()> {
    let d = layout.head_dim();
    if !HEAD_DIMS.contains(&d) {
        return Err(KernelError::Unsupported {
            kernel,
            what: format!("head_dim {d} (built: {HEAD_DIMS:?})"),
        });
    }
    if !layout.block_size().is_power_of_two() {
        return Err(bad(
            kernel,
            format!("block_size {} is not a power of two", layout.block_size()),
        ));
    }
    Ok(())
}

/// Lengths of a cache write's buffers (what the host knows of them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheRows {
    /// Tokens (`slot_mapping.len()`).
    pub(crate) tokens: usize,
    /// Largest slot (`slot_mapping.max()`).
    pub(crate) max_slot: i64,
    /// Values of k and v.
    pub(crate) k: usize,
    pub(crate) v: usize,
    /// Bytes of the K and V caches.
    pub(crate) k_cache: usize,
    pub(crate) v_cache: usize,
}

/// The row checks of a cache write of at least one token: k and v hold `tokens` rows of
/// `num_kv_heads x head_dim`, both caches the same whole number of blocks, every slot inside.
fn check_rows(kernel: &'static str, layout: &BlockLayout, r: &CacheRows) -> Result<()> {
    let (d, kv_heads, tokens) = (layout.head_dim(), layout.num_kv_heads(), r.tokens);
    if tokens > i32::MAX as usize {
        return Err(bad(kernel, format!("{tokens} tokens in one call")));
    }
    let n = tokens.checked_mul(kv_heads * d);
    if n != Some(r.k) || n != Some(r.v) {
        return Err(bad(
            kernel,
            format!(
                "k has {} and v {} values, expected {tokens} tokens x {kv_heads} heads x {d}",
                r.k, r.v
            ),
        ));
    }
    let block_bytes = layout.kv_block_bytes();
    if r.k_cache != r.v_cache || !r.k_cache.is_multiple_of(block_bytes) {
        return Err(bad(
            kernel,
            format!(
                "caches of {} and {} bytes are not the same whole number of {block_bytes}-byte blocks",
                r.k_cache, r.v_cache
            ),
        ));
    }
    let slots = (r.k_cache / block_bytes) as i64 * layout.block_size() as i64;
    if r.max_slot >= slots {
        return Err(bad(
            kernel,
            format!("slot {} outside the cache's {slots} slots", r.max_slot),
        ));
    }
    Ok(())
}

/// Writes token `t`'s K and V rows (`k`, `v`: `[num_tokens][num_kv_heads][head_dim]`) into
/// slot `slot_mapping[t]` (`block * block_size + offset`; negative: skipped) of `k_cache` and
/// `v_cache`, encoded as `layout` says, with exactly kv-quant's rounding.
///
/// # Errors
/// [`KernelError::BadArgument`] for shapes or slots that do not fit (checked before
/// launching), [`KernelError::Unsupported`] for a head_dim without a kernel, compile and
/// driver errors.
pub fn reshape_and_cache<T: ActScalar>(
    gpu: &Gpu,
    layout: &BlockLayout,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    slot_mapping: &Indices<i64>,
    k_cache: &mut CudaSlice<u8>,
    v_cache: &mut CudaSlice<u8>,
) -> Result<()> {
    check_layout(KERNEL, layout)?;
    let tokens = slot_mapping.len();
    if tokens == 0 {
        return Ok(());
    }
    check_rows(
        KERNEL,
        layout,
        &CacheRows {
            tokens,
            max_slot: slot_mapping.max(),
            k: k.len(),
            v: v.len(),
            k_cache: k_cache.len(),
            v_cache: v_cache.len(),
        },
    )?;
    let kv_heads = layout.num_kv_heads();
    let variant = cache_variant::<T>(layout);
    let f = gpu.function(&variant, KERNEL)?;
    let kv_heads_i = kv_heads as i32;
    let bs = layout.block_size() as i32;
    let shift = layout.block_size().trailing_zeros() as i32;
    let block_bytes_i = layout.kv_block_bytes() as i64;
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, kv_heads as u32, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = Launch::new(gpu, &f);
    launch
        .arg(&mut *k_cache)
        .arg(&mut *v_cache)
        .arg(k)
        .arg(v)
        .arg(slot_mapping.device())
        .arg(&kv_heads_i)
        .arg(&bs)
        .arg(&shift)
        .arg(&block_bytes_i);
    // SAFETY: the arguments match `reshape_and_cache` in kernels/cache.cu; k and v hold
    // `tokens x kv_heads x head_dim` values, every non-negative slot is inside the caches
    // (checked above), and the block size is a power of two (checked: the kernel shifts).
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

/// The rotary embedding [`rope_and_cache`] applies, as [`crate::rope`] takes it: the shapes,
/// the step's positions (one per token) and the inverse frequencies (`[head_dim / 2]`, any
/// scaling included).
#[derive(Debug, Clone, Copy)]
pub struct Rotary<'a> {
    /// Heads, head_dim and channel pairing.
    pub shape: RopeShape,
    /// Position of each token.
    pub positions: &'a Indices<i32>,
    /// `inv_freq[i]` rotates pair `i` by `position * inv_freq[i]`.
    pub inv_freq: &'a CudaSlice<f32>,
}

/// One layer's paged K and V caches and their layout (where [`rope_and_cache`] writes).
#[derive(Debug)]
pub struct LayerCache<'a> {
    /// The block layout of both caches.
    pub layout: &'a BlockLayout,
    /// The K cache: whole blocks of `layout`.
    pub k: &'a mut CudaSlice<u8>,
    /// The V cache: as many blocks as `k`.
    pub v: &'a mut CudaSlice<u8>,
}

/// Lengths of a [`rope_and_cache`] call (what the host knows of its buffers).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopeCacheShapes {
    pub(crate) rows: CacheRows,
    /// Values of q.
    pub(crate) q: usize,
    /// Inverse frequencies.
    pub(crate) inv_freq: usize,
    /// Positions, and the smallest.
    pub(crate) positions: usize,
    pub(crate) min_position: i64,
}

impl RopeCacheShapes {
    /// The lengths of a call's buffers: q, k and v rows, the caches of `cache`, `rotary`'s
    /// positions and inverse frequencies, `slot_mapping`.
    pub(crate) fn of<T>(
        rotary: &Rotary<'_>,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        slot_mapping: &Indices<i64>,
        cache: &LayerCache<'_>,
    ) -> Self {
        Self {
            rows: CacheRows {
                tokens: slot_mapping.len(),
                max_slot: slot_mapping.max(),
                k: k.len(),
                v: v.len(),
                k_cache: cache.k.len(),
                v_cache: cache.v.len(),
            },
            q: q.len(),
            inv_freq: rotary.inv_freq.len(),
            positions: rotary.positions.len(),
            min_position: rotary.positions.min(),
        }
    }
}

/// Checks a [`rope_and_cache`] call: everything [`crate::rope`] and [`reshape_and_cache`]
/// check, and that the rotary shapes are the cache's. `Ok(None)`: no tokens, nothing to do;
/// else the query-head warps of a CTA.
pub(crate) fn check_rope_cache(
    layout: &BlockLayout,
    shape: &RopeShape,
    s: &RopeCacheShapes,
) -> Result<Option<usize>> {
    check_layout(FUSED, layout)?;
    let (d, kv_heads) = (layout.head_dim(), layout.num_kv_heads());
    if shape.head_dim != d || shape.num_kv_heads != kv_heads {
        return Err(bad(
            FUSED,
            format!(
                "rotary shape of {} KV heads x {} channels for a cache of {kv_heads} x {d}",
                shape.num_kv_heads, shape.head_dim
            ),
        ));
    }
    let qh = shape.num_q_heads;
    if qh == 0 || qh + kv_heads > MAX_HEADS {
        return Err(bad(
            FUSED,
            format!("{qh} query + {kv_heads} KV heads per token (1..={MAX_HEADS} in all)"),
        ));
    }
    if s.inv_freq != d / 2 {
        return Err(bad(
            FUSED,
            format!("head_dim {d} with {} inverse frequencies", s.inv_freq),
        ));
    }
    let tokens = s.rows.tokens;
    if s.positions != tokens {
        return Err(bad(
            FUSED,
            format!("{} positions for {tokens} slots", s.positions),
        ));
    }
    if tokens == 0 {
        return Ok(None);
    }
    if s.min_position < 0 {
        return Err(bad(FUSED, format!("position {}", s.min_position)));
    }
    if tokens.checked_mul(qh * d) != Some(s.q) {
        return Err(bad(
            FUSED,
            format!(
                "q has {} values for {tokens} tokens x {qh} heads x {d}",
                s.q
            ),
        ));
    }
    check_rows(FUSED, layout, &s.rows)?;
    Ok(Some(qh.div_ceil(kv_heads).min(MAX_QUERY_WARPS)))
}

/// [`crate::rope`] then [`reshape_and_cache`] in one launch, with the same results bit for bit:
/// rotates `q` (`[tokens][num_q_heads][head_dim]`) in place by `rotary`, and writes token `t`'s
/// rotated K row and its V row (`k`, `v`: `[tokens][num_kv_heads][head_dim]`) into slot
/// `slot_mapping[t]` (negative: skipped; q is rotated all the same) of `cache`.
///
/// `k` itself is left unrotated (unlike [`crate::rope`], which rotates it in place): attention
/// reads K from the cache only.
///
/// # Errors
/// [`KernelError::BadArgument`] for shapes, positions or slots that do not fit (checked before
/// launching), [`KernelError::Unsupported`] for a head_dim without a kernel, compile and
/// driver errors.
pub fn rope_and_cache<T: ActScalar>(
    gpu: &Gpu,
    rotary: &Rotary<'_>,
    q: &mut CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    slot_mapping: &Indices<i64>,
    cache: LayerCache<'_>,
) -> Result<()> {
    let layout = cache.layout;
    let shape = &rotary.shape;
    let shapes = RopeCacheShapes::of(rotary, q, k, v, slot_mapping, &cache);
    let Some(query_warps) = check_rope_cache(layout, shape, &shapes)? else {
        return Ok(());
    };
    let variant = cache_variant::<T>(layout);
    let f = gpu.function(&variant, FUSED)?;
    let kv_heads = layout.num_kv_heads();
    let qh = shape.num_q_heads as i32;
    let kvh = kv_heads as i32;
    let inter = i32::from(shape.interleaved);
    let bs = layout.block_size() as i32;
    let shift = layout.block_size().trailing_zeros() as i32;
    let block_bytes = layout.kv_block_bytes() as i64;
    let cfg = LaunchConfig {
        grid_dim: (slot_mapping.len() as u32, kv_heads as u32, 1),
        block_dim: (32 * (2 + query_warps) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = Launch::new(gpu, &f);
    launch
        .arg(&mut *q)
        .arg(&mut *cache.k)
        .arg(&mut *cache.v)
        .arg(k)
        .arg(v)
        .arg(rotary.positions.device())
        .arg(rotary.inv_freq)
        .arg(slot_mapping.device())
        .arg(&qh)
        .arg(&kvh)
        .arg(&inter)
        .arg(&bs)
        .arg(&shift)
        .arg(&block_bytes);
    // SAFETY: the arguments match `rope_and_cache` in kernels/cache.cu, and the block has
    // 2 + query_warps <= 2 + kMaxQueryWarps warps (its launch bound). Checked above: q holds
    // tokens x num_q_heads x head_dim values and k, v tokens x num_kv_heads x head_dim (the
    // layout's); positions has one entry per token and inv_freq head_dim / 2; the grid is
    // tokens x num_kv_heads; every non-negative slot is inside both caches, whose block size
    // is a power of two (the kernel shifts).
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

/// A step's block copies, checked and on the device: build once, apply to every layer's
/// caches with [`copy_blocks`].
#[derive(Debug)]
pub struct BlockCopies {
    pairs: Indices<i64>,
}

impl BlockCopies {
    /// Uploads `(src, dst)` block pairs.
    ///
    /// # Errors
    /// [`KernelError::BadArgument`] when a destination is also a source or is written twice
    /// (the copies run in parallel: chains would race).
    pub fn new(gpu: &Gpu, pairs: &[(usize, usize)]) -> Result<Self> {
        const K: &str = "copy_blocks";
        let mut dsts: Vec<usize> = pairs.iter().map(|p| p.1).collect();
        dsts.sort_unstable();
        if let Some(w) = dsts.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(K, format!("block {} is written twice", w[0])));
        }
        if let Some(p) = pairs.iter().find(|p| dsts.binary_search(&p.0).is_ok()) {
            return Err(bad(
                K,
                format!("block {} is both a source and a destination", p.0),
            ));
        }
        let mut flat = Vec::with_capacity(2 * pairs.len());
        for &(a, b) in pairs {
            let id = |x: usize| {
                i64::try_from(x).map_err(|_| bad(K, format!("block {x} beyond 64-bit indices")))
            };
            flat.push(id(a)?);
            flat.push(id(b)?);
        }
        Ok(Self {
            pairs: Indices::new(gpu, &flat)?,
        })
    }

    /// Number of copies.
    pub fn len(&self) -> usize {
        self.pairs.len() / 2
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// Copies whole blocks within one cache buffer (copy-on-write), every pair of `copies` in
/// one launch.
///
/// # Errors
/// [`KernelError::BadArgument`] for a block outside the cache or a cache that is not whole
/// blocks.
pub fn copy_blocks(
    gpu: &Gpu,
    cache: &mut CudaSlice<u8>,
    block_bytes: usize,
    copies: &BlockCopies,
) -> Result<()> {
    let pairs = &copies.pairs;
    const K: &str = "copy_blocks";
    if block_bytes == 0 || !cache.len().is_multiple_of(block_bytes) {
        return Err(bad(
            K,
            format!(
                "a cache of {} bytes is not whole {block_bytes}-byte blocks",
                cache.len()
            ),
        ));
    }
    if pairs.is_empty() {
        return Ok(());
    }
    let blocks = (cache.len() / block_bytes) as i64;
    if pairs.min() < 0 || pairs.max() >= blocks {
        return Err(bad(
            K,
            format!(
                "blocks {}..={} outside the cache's {blocks}",
                pairs.min(),
                pairs.max()
            ),
        ));
    }
    if pairs.len() / 2 > i32::MAX as usize {
        return Err(bad(K, format!("{} pairs in one call", pairs.len() / 2)));
    }
    let cfg = LaunchConfig {
        grid_dim: ((pairs.len() / 2) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let bb = block_bytes as i64;
    // Any scalar variant holds the (type-free) copy kernel; bf16 is the one the model loads.
    let f = gpu.function(&Variant::elementwise(crate::Scalar::Bf16), K)?;
    let mut launch = Launch::new(gpu, &f);
    launch.arg(&mut *cache).arg(pairs.device()).arg(&bb);
    // SAFETY: matches `copy_blocks` in kernels/elementwise.cu (256 threads = kThreads); every
    // block index is inside the cache (checked), so each copy reads and writes whole blocks
    // of it; no destination is a source or written twice (BlockCopies::new), so CTAs write
    // disjoint bytes and read none that another writes.
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

/// The cache program compiled for activations `T` and caches of `layout`.
fn cache_variant<T: ActScalar>(layout: &BlockLayout) -> Variant {
    Variant {
        program: Program::Cache,
        scalar: T::SCALAR,
        dtype: layout.dtype(),
        head_dim: layout.head_dim(),
        gqa_group: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_quant::KvCacheDtype;

    fn layout() -> BlockLayout {
        BlockLayout::new(KvCacheDtype::Int8, 16, 2, 64).unwrap()
    }

    /// 5 tokens, 8 query heads over the layout's 2 KV heads of 64 channels, 4 blocks.
    fn good() -> (RopeShape, RopeCacheShapes) {
        let bb = layout().kv_block_bytes();
        let shape = RopeShape {
            num_q_heads: 8,
            num_kv_heads: 2,
            head_dim: 64,
            interleaved: false,
        };
        let shapes = RopeCacheShapes {
            rows: CacheRows {
                tokens: 5,
                max_slot: 63,
                k: 5 * 2 * 64,
                v: 5 * 2 * 64,
                k_cache: 4 * bb,
                v_cache: 4 * bb,
            },
            q: 5 * 8 * 64,
            inv_freq: 32,
            positions: 5,
            min_position: 0,
        };
        (shape, shapes)
    }

    fn is_bad(r: Result<Option<usize>>) -> bool {
        matches!(r, Err(KernelError::BadArgument { .. }))
    }

    #[test]
    fn rope_and_cache_checks_accept_a_good_call() {
        let l = layout();
        let (shape, s) = good();
        assert_eq!(check_rope_cache(&l, &shape, &s).unwrap(), Some(4));
        // Query warps: ceil(q heads / KV heads), at most MAX_QUERY_WARPS; any q head count.
        for (qh, warps) in [(2, 1), (3, 2), (40, 8)] {
            let shape = RopeShape {
                num_q_heads: qh,
                ..shape
            };
            let s = RopeCacheShapes {
                q: 5 * qh * 64,
                ..s
            };
            assert_eq!(check_rope_cache(&l, &shape, &s).unwrap(), Some(warps));
        }
        // Negative slots are skipped, not refused; no tokens: nothing to launch.
        let empty = RopeCacheShapes {
            rows: CacheRows {
                tokens: 0,
                max_slot: i64::MIN,
                ..s.rows
            },
            positions: 0,
            min_position: i64::MAX,
            ..s
        };
        assert_eq!(check_rope_cache(&l, &shape, &empty).unwrap(), None);
    }

    #[test]
    fn rope_and_cache_refuses_bad_shapes_positions_and_slots() {
        let l = layout();
        let (shape, s) = good();
        let rows = |r: CacheRows| RopeCacheShapes { rows: r, ..s };
        let bad_shapes = [
            RopeCacheShapes { q: s.q - 64, ..s },
            RopeCacheShapes { inv_freq: 64, ..s },
            RopeCacheShapes { positions: 4, ..s },
            RopeCacheShapes {
                min_position: -1,
                ..s
            },
            rows(CacheRows {
                k: s.rows.k + 1,
                ..s.rows
            }),
            rows(CacheRows {
                v: s.rows.v - 64,
                ..s.rows
            }),
            rows(CacheRows {
                max_slot: 64,
                ..s.rows
            }),
            rows(CacheRows {
                v_cache: s.rows.v_cache / 2,
                ..s.rows
            }),
            rows(CacheRows {
                k_cache: s.rows.k_cache + 1,
                v_cache: s.rows.v_cache + 1,
                ..s.rows
            }),
        ];
        for (i, b) in bad_shapes.iter().enumerate() {
            assert!(is_bad(check_rope_cache(&l, &shape, b)), "case {i}: {b:?}");
        }
        let bad_rotary = [
            RopeShape {
                head_dim: 128,
                ..shape
            },
            RopeShape {
                num_kv_heads: 1,
                ..shape
            },
            RopeShape {
                num_q_heads: 0,
                ..shape
            },
            RopeShape {
                num_q_heads: MAX_HEADS,
                ..shape
            },
        ];
        for (i, r) in bad_rotary.iter().enumerate() {
            assert!(is_bad(check_rope_cache(&l, r, &s)), "rotary {i}: {r:?}");
        }
        // A block size the kernel cannot shift by; a head_dim without a kernel.
        let bs12 = BlockLayout::new(KvCacheDtype::Int8, 12, 2, 64).unwrap();
        let s12 = rows(CacheRows {
            k_cache: 4 * bs12.kv_block_bytes(),
            v_cache: 4 * bs12.kv_block_bytes(),
            max_slot: 47,
            ..s.rows
        });
        assert!(is_bad(check_rope_cache(&bs12, &shape, &s12)));
        let d96 = BlockLayout::new(KvCacheDtype::Int8, 16, 2, 96).unwrap();
        let shape96 = RopeShape {
            head_dim: 96,
            ..shape
        };
        assert!(matches!(
            check_rope_cache(&d96, &shape96, &s),
            Err(KernelError::Unsupported { .. })
        ));
    }

    #[test]
    fn cache_write_rows_are_checked() {
        let l = layout();
        let r = good().1.rows;
        assert!(check_rows(KERNEL, &l, &r).is_ok());
        for b in [
            CacheRows { k: 0, ..r },
            CacheRows {
                max_slot: 4 * 16,
                ..r
            },
            CacheRows {
                tokens: i32::MAX as usize + 1,
                ..r
            },
        ] {
            assert!(
                matches!(
                    check_rows(KERNEL, &l, &b),
                    Err(KernelError::BadArgument { .. })
                ),
                "{b:?}"
            );
        }
    }
}
