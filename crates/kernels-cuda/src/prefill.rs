//! Paged prefill attention on tensor cores: the new tokens of each sequence of a
//! variable-length batch (a whole prompt, a chunk after a cached prefix, or a single decode
//! token) over their context in the paged cache, causal and optionally windowed
//! (`kernels/paged_prefill_tc.cu`).
//!
//! * [`PrefillBatch`] describes the batch on the host; [`PrefillBatch::validate`] checks it
//!   without a device (what [`PrefillMetadata::new`] does before uploading).
//! * [`PrefillMetadata`] holds the checked batch on the device; build it once per step and
//!   reuse it for every layer. The kernel's work list (tiles of 64 (token, query head) rows,
//!   heaviest first) depends on the GQA group: it is built and uploaded on the first launch
//!   for a group and kept.
//! * [`paged_prefill`] checks the shapes against the metadata and launches once.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use cudarc::driver::{CudaSlice, LaunchConfig};
use kv_quant::BlockLayout;

use crate::attention::{ActScalar, CacheArgs, LaunchShapes, Tables, check_launch};
use crate::compile::{MAX_GQA_GROUP, Program, Scalar, Variant};
use crate::device::Gpu;
use crate::error::{KernelError, Result, bad};
use crate::launch::Launch;

const KERNEL: &str = "paged_prefill";
/// (query token, query head) rows per CTA: `kBlockM` of the kernel.
const BLOCK_M: usize = 64;
/// Threads per CTA: `kThreads` of the kernel (its launch bound).
const THREADS: u32 = 128;

/// A variable-length prefill batch as the host holds it. Sequence `s` has
/// `query_starts[s + 1] - query_starts[s]` (>= 1) new tokens, rows `query_starts[s]..` of q
/// and out, already written into the cache; the last is at position `context_lens[s] - 1`, so
/// query token `i` is at `context_lens[s] - query_len + i` and attends to the cache positions
/// `<=` its own (and `> position - window` with a window).
#[derive(Debug, Clone, Copy)]
pub struct PrefillBatch<'a> {
    /// `[num_seqs][max_blocks]` block ids, row-major. Entries a sequence does not attend to
    /// (past its context, or before the window of its first query token) are ignored.
    pub block_tables: &'a [i32],
    /// Entries per block-table row.
    pub max_blocks: usize,
    /// `num_seqs + 1` offsets of each sequence's query tokens, from 0, strictly increasing.
    pub query_starts: &'a [i32],
    /// `num_seqs` context lengths (cached tokens including the new ones), each
    /// `query_len..=max_blocks * block_size`.
    pub context_lens: &'a [i32],
    /// Tokens per cache block (a power of two, at most 1024).
    pub block_size: usize,
    /// Blocks in the cache: every attended table entry must be below it.
    pub num_blocks: usize,
    /// Sliding window (tokens a query attends to, itself included); `None`: whole context.
    pub window: Option<usize>,
}

impl PrefillBatch<'_> {
    /// Checks the batch (no device needed): lengths, offsets, context lengths and every block
    /// table entry some query token attends to.
    ///
    /// # Errors
    /// [`KernelError::BadArgument`] naming the first problem.
    pub fn validate(&self) -> Result<()> {
        self.check().map(|_| ())
    }

    /// As [`Self::validate`], returning the number of query tokens.
    fn check(&self) -> Result<usize> {
        let tables = Tables {
            kernel: KERNEL,
            block_tables: self.block_tables,
            num_seqs: self.context_lens.len(),
            max_blocks: self.max_blocks,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            window: self.window,
        };
        tables.check()?;
        let num_seqs = tables.num_seqs;
        if self.query_starts.len() != num_seqs + 1 {
            return Err(bad(
                KERNEL,
                format!(
                    "query_starts has {} entries, expected num_seqs + 1 = {}",
                    self.query_starts.len(),
                    num_seqs + 1
                ),
            ));
        }
        if self.query_starts[0] != 0 {
            return Err(bad(
                KERNEL,
                format!("query_starts[0] is {}, expected 0", self.query_starts[0]),
            ));
        }
        let (bs, mb) = (self.block_size, self.max_blocks);
        for s in 0..num_seqs {
            let (start, end) = (self.query_starts[s], self.query_starts[s + 1]);
            if end <= start {
                return Err(bad(
                    KERNEL,
                    format!(
                        "sequence {s}: query_starts {start}..{end} hold no query token \
                         (query_starts must be strictly increasing)"
                    ),
                ));
            }
            let q_len = (end - start) as usize;
            let ctx = self.context_lens[s];
            if ctx < 1 || (ctx as usize) < q_len || ctx as usize > mb * bs {
                return Err(bad(
                    KERNEL,
                    format!(
                        "sequence {s}: context length {ctx} outside {q_len}..={} (query_len \
                         {q_len}, {mb} blocks of {bs})",
                        mb * bs
                    ),
                ));
            }
            let ctx = ctx as usize;
            // The first key any query token of the sequence attends to.
            let first = self
                .window
                .map_or(0, |w| (ctx - q_len + 1).saturating_sub(w));
            tables.check_row(s, first, ctx)?;
        }
        let tokens = self.query_starts[num_seqs] as usize;
        // The kernel indexes rows (token x query head) of one sequence with 32-bit ints.
        if tokens.saturating_mul(MAX_GQA_GROUP).saturating_add(BLOCK_M) > i32::MAX as usize {
            return Err(bad(
                KERNEL,
                format!("{tokens} query tokens: too many for 32-bit row indices"),
            ));
        }
        Ok(tokens)
    }
}

/// The kernel's work list for GQA group `group`: (sequence, first row) of each tile of
/// [`BLOCK_M`] rows (row = query token x group + query head), the tiles with the most keys
/// to read first (they finish last otherwise; ties keep batch order).
fn work_items(
    query_starts: &[i32],
    context_lens: &[i32],
    group: usize,
    window: Option<usize>,
) -> Vec<(i32, i32)> {
    let mut items = Vec::new();
    for (s, &ctx) in context_lens.iter().enumerate() {
        let q_len = (query_starts[s + 1] - query_starts[s]) as usize;
        let p0 = ctx as usize - q_len;
        let rows = q_len * group;
        for r0 in (0..rows).step_by(BLOCK_M) {
            let last = (r0 + BLOCK_M).min(rows) - 1;
            let lo = window.map_or(0, |w| (p0 + r0 / group + 1).saturating_sub(w));
            let hi = p0 + last / group + 1;
            items.push((hi - lo, s as i32, r0 as i32));
        }
    }
    items.sort_by_key(|&(keys, _, _)| std::cmp::Reverse(keys));
    items.into_iter().map(|(_, s, r)| (s, r)).collect()
}

/// A checked prefill batch on the device (see [`PrefillBatch`]). Build it once per step and
/// reuse it for every layer.
#[derive(Debug)]
pub struct PrefillMetadata {
    block_tables: CudaSlice<i32>,
    query_starts: CudaSlice<i32>,
    context_lens: CudaSlice<i32>,
    /// Host copies, for the work lists.
    starts_host: Vec<i32>,
    ctx_host: Vec<i32>,
    num_tokens: usize,
    max_blocks: usize,
    block_size: usize,
    num_blocks: usize,
    window: Option<usize>,
    /// Work list per GQA group (index group - 1): `(sequence, first row)` pairs and their
    /// count, uploaded on the first launch for that group.
    work: [OnceLock<(CudaSlice<i32>, usize)>; MAX_GQA_GROUP],
}

impl PrefillMetadata {
    /// Checks `batch` ([`PrefillBatch::validate`]) and uploads it.
    ///
    /// # Errors
    /// [`KernelError::BadArgument`] naming the first problem; driver errors.
    pub fn new(gpu: &Gpu, batch: &PrefillBatch<'_>) -> Result<Self> {
        let num_tokens = batch.check()?;
        let stream = gpu.stream();
        Ok(Self {
            block_tables: stream.clone_htod(batch.block_tables)?,
            query_starts: stream.clone_htod(batch.query_starts)?,
            context_lens: stream.clone_htod(batch.context_lens)?,
            starts_host: batch.query_starts.to_vec(),
            ctx_host: batch.context_lens.to_vec(),
            num_tokens,
            max_blocks: batch.max_blocks,
            block_size: batch.block_size,
            num_blocks: batch.num_blocks,
            window: batch.window,
            work: Default::default(),
        })
    }

    /// Sequences in the batch.
    pub fn num_seqs(&self) -> usize {
        self.ctx_host.len()
    }

    /// Query tokens in the batch (rows of q and out).
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// The work list for `group` and its length, uploaded on first use.
    fn work(&self, gpu: &Gpu, group: usize) -> Result<&(CudaSlice<i32>, usize)> {
        let slot = group
            .checked_sub(1)
            .and_then(|i| self.work.get(i))
            .ok_or_else(|| {
                bad(
                    KERNEL,
                    format!("GQA group {group} outside 1..={MAX_GQA_GROUP}"),
                )
            })?;
        if let Some(w) = slot.get() {
            return Ok(w);
        }
        let items = work_items(&self.starts_host, &self.ctx_host, group, self.window);
        let flat: Vec<i32> = items.iter().flat_map(|&(s, r)| [s, r]).collect();
        let dev = gpu.stream().clone_htod(&flat)?;
        // Another thread may have set it meanwhile, to the same list.
        let _ = slot.set((dev, items.len()));
        slot.get().ok_or_else(|| bad(KERNEL, "work list vanished"))
    }
}

/// Checks a launch's shapes ([`check_launch`]) and that the prefill kernel reads the cache's
/// dtype; returns the GQA group.
fn check_shapes(layout: &BlockLayout, scalar: Scalar, s: &LaunchShapes) -> Result<usize> {
    if !Variant::tensor_core_prefill(scalar, layout.dtype()) {
        return Err(KernelError::Unsupported {
            kernel: KERNEL,
            what: format!(
                "{} KV with {scalar:?} activations (16-bit KV of the activation type, int8, \
                 fp8)",
                layout.dtype()
            ),
        });
    }
    check_launch(KERNEL, layout, s)
}

/// `out[t][h] = softmax(q[t][h] · K_s[attended] / sqrt(head_dim)) · V_s[attended]` for every
/// query token `t` of every sequence `s` of `meta` and query head `h`, reading K and V of one
/// layer through the block tables (causal: the positions up to the token's own, within the
/// window). `q` and `out` are `[num_tokens][num_heads][head_dim]`; `k_cache` and `v_cache`
/// hold `num_blocks` blocks of `layout`. KV dtypes: those of
/// [`Variant::tensor_core_prefill`] (16-bit KV of the activation type, int8, fp8); head_dim 64
/// or 128; GQA group 1 to 8.
///
/// # Errors
/// [`KernelError::BadArgument`] for shapes that do not fit (checked before launching),
/// [`KernelError::Unsupported`] for a dtype, head_dim or GQA group without a kernel, compile
/// and driver errors.
#[allow(clippy::too_many_arguments)]
pub fn paged_prefill<T: ActScalar>(
    gpu: &Gpu,
    meta: &PrefillMetadata,
    layout: &BlockLayout,
    num_heads: usize,
    q: &CudaSlice<T>,
    k_cache: &CudaSlice<u8>,
    v_cache: &CudaSlice<u8>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let group = check_shapes(
        layout,
        T::SCALAR,
        &LaunchShapes {
            rows: meta.num_tokens,
            row_name: "tokens",
            num_heads,
            q: q.len(),
            out: out.len(),
            k_cache: k_cache.len(),
            v_cache: v_cache.len(),
            num_blocks: meta.num_blocks,
            block_size: meta.block_size,
        },
    )?;
    let kv_heads = layout.num_kv_heads();
    let (work, items) = meta.work(gpu, group)?;
    let ctas = items * kv_heads;
    if ctas == 0 || ctas > i32::MAX as usize {
        return Err(bad(
            KERNEL,
            format!("{items} work items x {kv_heads} KV heads: not a launchable grid"),
        ));
    }
    let variant = Variant {
        program: Program::PagedPrefillTc,
        scalar: T::SCALAR,
        dtype: layout.dtype(),
        head_dim: layout.head_dim(),
        gqa_group: group,
    };
    let function = gpu.function(&variant, "paged_prefill_tc")?;
    let cache = CacheArgs::new(layout, meta.max_blocks, meta.window);
    let cfg = LaunchConfig {
        grid_dim: (ctas as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = Launch::new(gpu, &function);
    launch
        .arg(&mut *out)
        .arg(q)
        .arg(k_cache)
        .arg(v_cache)
        .arg(&meta.block_tables)
        .arg(&meta.query_starts)
        .arg(&meta.context_lens)
        .arg(work);
    cache.push(&mut launch);
    launch.arg(&cache.window);
    // SAFETY: the argument list matches `paged_prefill_tc` in kernels/paged_prefill_tc.cu
    // (128 threads, its launch bound; static shared memory only). Every buffer was checked to
    // hold what the kernel touches for this grid: q and out have num_tokens x num_heads x
    // head_dim values for the metadata's query_starts (validated: from 0, increasing, ending at
    // num_tokens); both caches hold num_blocks blocks of `layout`, whose block size is the
    // metadata's; every table entry a query token attends to (from the window of each
    // sequence's first query token to its context length, which fits its table row) is in
    // 0..num_blocks; the work list has `items` (sequence, first row) pairs, each a sequence of
    // the batch and a row below its query_len x group, and the grid is items x KV heads.
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_quant::KvCacheDtype;

    #[test]
    fn work_items_cover_every_row_once_heaviest_first() {
        let starts = [0, 100, 101, 140, 141];
        let ctx = [100, 3000, 540, 7];
        for group in 1..=MAX_GQA_GROUP {
            for window in [None, Some(33)] {
                let items = work_items(&starts, &ctx, group, window);
                let mut covered: Vec<Vec<usize>> = (0..4)
                    .map(|s| vec![0; (starts[s + 1] - starts[s]) as usize * group])
                    .collect();
                let mut last_cost = usize::MAX;
                for &(s, r0) in &items {
                    let (s, r0) = (s as usize, r0 as usize);
                    let rows = covered[s].len();
                    assert!(r0 < rows && r0.is_multiple_of(BLOCK_M));
                    for c in &mut covered[s][r0..(r0 + BLOCK_M).min(rows)] {
                        *c += 1;
                    }
                    let p0 = ctx[s] as usize - rows / group;
                    let last = (r0 + BLOCK_M).min(rows) - 1;
                    let lo = window.map_or(0, |w| (p0 + r0 / group + 1).saturating_sub(w));
                    let cost = p0 + last / group + 1 - lo;
                    assert!(cost <= last_cost, "not heaviest first");
                    last_cost = cost;
                }
                assert!(covered.iter().flatten().all(|&c| c == 1));
            }
        }
    }

    #[test]
    fn launch_shapes_are_checked() {
        let layout = BlockLayout::new(KvCacheDtype::Bf16, 16, 2, 64).unwrap();
        let bb = layout.kv_block_bytes();
        let good = || LaunchShapes {
            rows: 5,
            row_name: "tokens",
            num_heads: 8,
            q: 5 * 8 * 64,
            out: 5 * 8 * 64,
            k_cache: 4 * bb,
            v_cache: 4 * bb,
            num_blocks: 4,
            block_size: 16,
        };
        assert_eq!(check_shapes(&layout, Scalar::Bf16, &good()).unwrap(), 4);
        let is_bad = |s: LaunchShapes| {
            matches!(
                check_shapes(&layout, Scalar::Bf16, &s),
                Err(KernelError::BadArgument { .. })
            )
        };
        assert!(is_bad(LaunchShapes {
            q: 5 * 8 * 64 - 1,
            ..good()
        }));
        assert!(is_bad(LaunchShapes {
            out: 6 * 8 * 64,
            ..good()
        }));
        assert!(is_bad(LaunchShapes {
            num_heads: 7,
            q: 5 * 7 * 64,
            out: 5 * 7 * 64,
            ..good()
        }));
        assert!(is_bad(LaunchShapes {
            k_cache: 4 * bb - 1,
            ..good()
        }));
        assert!(is_bad(LaunchShapes {
            v_cache: bb,
            ..good()
        }));
        assert!(is_bad(LaunchShapes {
            block_size: 32,
            ..good()
        }));
        // GQA group 9, fp16 KV under bf16 activations, int4 KV, head_dim 96: no kernel.
        let unsupported = |l: &BlockLayout, scalar, s: LaunchShapes| {
            matches!(
                check_shapes(l, scalar, &s),
                Err(KernelError::Unsupported { .. })
            )
        };
        assert!(unsupported(
            &layout,
            Scalar::Bf16,
            LaunchShapes {
                num_heads: 18,
                q: 5 * 18 * 64,
                out: 5 * 18 * 64,
                ..good()
            }
        ));
        assert!(unsupported(&layout, Scalar::F16, good()));
        let int4 = BlockLayout::new("int4-g32".parse().unwrap(), 16, 2, 64).unwrap();
        assert!(unsupported(&int4, Scalar::Bf16, good()));
        let d96 = BlockLayout::new(KvCacheDtype::Bf16, 16, 2, 96).unwrap();
        assert!(unsupported(&d96, Scalar::Bf16, good()));
    }
}
