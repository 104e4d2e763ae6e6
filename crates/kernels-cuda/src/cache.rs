//! Writing new K/V rows into the paged cache, quantizing on the fly.
#![allow(unsafe_code)]

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use kv_quant::BlockLayout;

use crate::attention::ActScalar;
use crate::compile::{HEAD_DIMS, Program, Variant};
use crate::device::Gpu;
use crate::error::{KernelError, Result, bad};
use crate::indices::Indices;

const KERNEL: &str = "reshape_and_cache";

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
    let d = layout.head_dim();
    if !HEAD_DIMS.contains(&d) {
        return Err(KernelError::Unsupported {
            kernel: KERNEL,
            what: format!("head_dim {d} (built: {HEAD_DIMS:?})"),
        });
    }
    if !layout.block_size().is_power_of_two() {
        return Err(bad(
            KERNEL,
            format!("block_size {} is not a power of two", layout.block_size()),
        ));
    }
    let kv_heads = layout.num_kv_heads();
    let tokens = slot_mapping.len();
    if tokens == 0 {
        return Ok(());
    }
    if tokens > i32::MAX as usize {
        return Err(bad(KERNEL, format!("{tokens} tokens in one call")));
    }
    let n = tokens * kv_heads * d;
    if k.len() != n || v.len() != n {
        return Err(bad(
            KERNEL,
            format!(
                "k has {} and v {} values, expected {tokens} tokens x {kv_heads} heads x {d}",
                k.len(),
                v.len()
            ),
        ));
    }
    let block_bytes = layout.kv_block_bytes();
    if k_cache.len() != v_cache.len() || !k_cache.len().is_multiple_of(block_bytes) {
        return Err(bad(
            KERNEL,
            format!(
                "caches of {} and {} bytes are not the same whole number of {block_bytes}-byte blocks",
                k_cache.len(),
                v_cache.len()
            ),
        ));
    }
    let slots = (k_cache.len() / block_bytes) as i64 * layout.block_size() as i64;
    if slot_mapping.max() >= slots {
        return Err(bad(
            KERNEL,
            format!(
                "slot {} outside the cache's {slots} slots",
                slot_mapping.max()
            ),
        ));
    }
    let variant = Variant {
        program: Program::Cache,
        scalar: T::SCALAR,
        dtype: layout.dtype(),
        head_dim: d,
        gqa_group: 0,
    };
    let f = gpu.function(&variant, KERNEL)?;
    let stream = gpu.stream();
    let kv_heads_i = kv_heads as i32;
    let bs = layout.block_size() as i32;
    let shift = layout.block_size().trailing_zeros() as i32;
    let block_bytes_i = block_bytes as i64;
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, kv_heads as u32, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = stream.launch_builder(&f);
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
    unsafe { launch.launch(cfg) }?;
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
    let stream = gpu.stream();
    let mut launch = stream.launch_builder(&f);
    launch.arg(&mut *cache).arg(pairs.device()).arg(&bb);
    // SAFETY: matches `copy_blocks` in kernels/elementwise.cu (256 threads = kThreads); every
    // block index is inside the cache (checked), so each copy reads and writes whole blocks
    // of it; no destination is a source or written twice (BlockCopies::new), so CTAs write
    // disjoint bytes and read none that another writes.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
