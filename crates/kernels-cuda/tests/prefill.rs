//! Prefill attention (`paged_prefill`) against an f64 reference built from kv-quant's CPU
//! codecs, on a GPU (ignored by default: `cargo test --release -p kernels-cuda --test prefill
//! -- --include-ignored` on the GPU machine), and the host-side checks of a batch, which run
//! everywhere.
//!
//! Tolerance: max |out - ref| / max |ref| < 1e-2 per case. Expected ~3e-3 for 16-bit KV and
//! ~4-6e-3 for 8-bit codes with bf16 activations: P is rounded to bf16 before the P·V mma
//! (2^-9 relative per weight) and so is the output; that is what
//! `kernels/experiments/prefill_emulation.py --bf16` measures on the kernel's own arithmetic
//! (exact arithmetic there agrees to 1e-15). Quantization error of the cache is not counted:
//! the reference reads the same decoded codes.
#![allow(
    clippy::unwrap_used,
    clippy::print_stderr,
    clippy::too_many_arguments,
    clippy::needless_range_loop
)]

mod common;

use common::{Act, MaxError, attention_ref, gpu, paged_cache};
use half::{bf16, f16};
use kernels_cuda::cudarc::driver::CudaSlice;
use kernels_cuda::{Gpu, KernelError, PrefillBatch, PrefillMetadata, paged_prefill};
use kv_quant::{BlockLayout, KvCacheDtype};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One case: sequences of (query_len, context_len), random caches encoded on the CPU, random
/// block tables (entries nobody attends to left at -1), random q.
struct Case {
    layout: BlockLayout,
    num_heads: usize,
    seqs: Vec<(usize, usize)>,
    window: Option<usize>,
}

/// Whether query token `i` of a sequence with `q_len` of them is compared with the reference
/// (all of them for short queries; the ends and a sample for long ones, to keep the f64
/// reference fast). Every output is checked to be written.
fn compared(i: usize, q_len: usize) -> bool {
    q_len <= 300 || i < 8 || i + 8 >= q_len || i.is_multiple_of(41) || i % 64 == 63
}

/// Max |out - ref| / max |ref| of `paged_prefill` for `c` with activations `T`.
fn prefill_error<T: Act>(gpu: &Gpu, rng: &mut ChaCha8Rng, c: &Case) -> f64 {
    let stream = gpu.stream().clone();
    let l = &c.layout;
    let (bs, kvh, d) = (l.block_size(), l.num_kv_heads(), l.head_dim());
    let max_blocks = c.seqs.iter().map(|s| s.1.div_ceil(bs)).max().unwrap() + 1;
    // Blocks before the window of a sequence's first query token are not in the table.
    let seqs: Vec<(usize, usize)> = c
        .seqs
        .iter()
        .map(|&(q_len, ctx)| {
            (
                c.window.map_or(0, |w| (ctx - q_len + 1).saturating_sub(w)),
                ctx,
            )
        })
        .collect();
    let cache = paged_cache(rng, l, &seqs, max_blocks, |rng| {
        let k: Vec<f32> = (0..kvh * d)
            .map(|_| T::of(rng.random_range(-2.0f32..2.0)).f32())
            .collect();
        let v: Vec<f32> = (0..kvh * d)
            .map(|_| T::of(rng.random_range(-1.0f32..1.0)).f32())
            .collect();
        (k, v)
    });
    let nh = c.num_heads;
    let group = nh / kvh;
    let mut starts = vec![0i32];
    for &(q_len, _) in &c.seqs {
        starts.push(starts.last().unwrap() + q_len as i32);
    }
    let tokens = *starts.last().unwrap() as usize;
    let q: Vec<f32> = (0..tokens * nh * d)
        .map(|_| T::of(rng.random_range(-1.0f32..1.0)).f32())
        .collect();
    let ctx_i: Vec<i32> = c.seqs.iter().map(|s| s.1 as i32).collect();
    let batch = PrefillBatch {
        block_tables: &cache.tables,
        max_blocks,
        query_starts: &starts,
        context_lens: &ctx_i,
        block_size: bs,
        num_blocks: cache.num_blocks,
        window: c.window,
    };
    let meta = PrefillMetadata::new(gpu, &batch).unwrap();
    let kd = stream.clone_htod(&cache.k).unwrap();
    let vd = stream.clone_htod(&cache.v).unwrap();
    let q_t: Vec<T> = q.iter().map(|&x| T::of(x)).collect();
    let qd = stream.clone_htod(&q_t).unwrap();
    // Poisoned output: every element must be written.
    let mut out: CudaSlice<T> = stream.clone_htod(&vec![T::NAN; tokens * nh * d]).unwrap();
    paged_prefill(gpu, &meta, l, nh, &qd, &kd, &vd, &mut out).unwrap();
    let out: Vec<f32> = stream
        .clone_dtoh(&out)
        .unwrap()
        .iter()
        .map(|x| x.f32())
        .collect();
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        panic!(
            "output {i} (token {}, head {}) is {} (unwritten?)",
            i / (nh * d),
            i / d % nh,
            out[i]
        );
    }
    let mut err = MaxError::default();
    for (s, &(q_len, ctx)) in c.seqs.iter().enumerate() {
        for i in (0..q_len).filter(|&i| compared(i, q_len)) {
            let pos = ctx - q_len + i;
            let first = c.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let tok = starts[s] as usize + i;
            for h in 0..nh {
                let qh = &q[(tok * nh + h) * d..][..d];
                let (k, v) = (&cache.k_dec[s], &cache.v_dec[s]);
                let r = attention_ref(qh, k, v, kvh, h / group, first..pos + 1);
                for (ch, r) in r.into_iter().enumerate() {
                    err.add(f64::from(out[(tok * nh + h) * d + ch]), r);
                }
            }
        }
    }
    err.relative()
}

/// Tolerance of max |out - ref| / max |ref| (see the module docs).
const TOL: f64 = 1e-2;

#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_matches_the_reference_across_dtypes_shapes_and_windows() {
    let gpu = gpu();
    eprintln!(
        "device: {} ({}, {} SMs)",
        gpu.name(),
        gpu.arch(),
        gpu.num_sms()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let mut worst = Vec::new();
    let mut i = 0usize;
    for dtype in [
        KvCacheDtype::Bf16,
        KvCacheDtype::Int8,
        KvCacheDtype::Fp8E4m3,
        KvCacheDtype::Fp8E5m2,
    ] {
        for head_dim in [64, 128] {
            for (kv_heads, group) in [(2, 1), (3, 3), (2, 4), (1, 8)] {
                i += 1;
                let block_size = [8, 16, 32][i % 3];
                let layout = BlockLayout::new(dtype, block_size, kv_heads, head_dim).unwrap();
                let window = i.is_multiple_of(3).then_some(30 + 37 * (i % 5));
                // A whole prompt, decode rows, chunks after cached prefixes (one not aligned
                // to anything), a one-token context.
                let case = Case {
                    layout,
                    num_heads: kv_heads * group,
                    seqs: vec![
                        (150 + i, 150 + i),
                        (1, 700 + 3 * i),
                        (64, 400),
                        (37 + i, 1100 + i),
                        (1, 1),
                        (9, 9),
                    ],
                    window,
                };
                let e = prefill_error::<bf16>(&gpu, &mut rng, &case);
                eprintln!(
                    "{dtype} d={head_dim} gqa={group} bs={block_size} window={window:?}: \
                     err {e:.2e}"
                );
                if e.is_nan() || e > TOL {
                    worst.push(format!(
                        "{dtype} d={head_dim} gqa={group} bs={block_size} window={window:?}: \
                         {e:.2e}"
                    ));
                }
            }
        }
    }
    // fp16 activations (fp16 and int8 KV).
    for (dtype, window) in [(KvCacheDtype::Fp16, None), (KvCacheDtype::Int8, Some(100))] {
        let case = Case {
            layout: BlockLayout::new(dtype, 16, 2, 128).unwrap(),
            num_heads: 8,
            seqs: vec![(200, 200), (1, 500), (70, 333)],
            window,
        };
        let e = prefill_error::<f16>(&gpu, &mut rng, &case);
        eprintln!("f16 activations, {dtype} window={window:?}: err {e:.2e}");
        if e.is_nan() || e > TOL {
            worst.push(format!("f16 {dtype}: {e:.2e}"));
        }
    }
    assert!(worst.is_empty(), "over tolerance:\n{}", worst.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_handles_long_prompts_and_chunks() {
    // Contexts of a few thousand tokens: a 2048-token prompt, a 512-token chunk after a
    // 3584-token prefix, decode rows; Llama-3-like GQA 4 at d = 128.
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let mut worst = Vec::new();
    for (dtype, window) in [
        (KvCacheDtype::Bf16, None),
        (KvCacheDtype::Int8, None),
        (KvCacheDtype::Fp8E5m2, None),
        (KvCacheDtype::Bf16, Some(1000)),
    ] {
        let case = Case {
            layout: BlockLayout::new(dtype, 16, 2, 128).unwrap(),
            num_heads: 8,
            seqs: vec![(2048, 2048), (512, 4096), (1, 3000), (1500, 2700)],
            window,
        };
        let e = prefill_error::<bf16>(&gpu, &mut rng, &case);
        eprintln!("{dtype} long, window={window:?}: err {e:.2e}");
        if e.is_nan() || e > TOL {
            worst.push(format!("{dtype} window={window:?}: {e:.2e}"));
        }
    }
    assert!(worst.is_empty(), "over tolerance:\n{}", worst.join("\n"));
}

/// A valid batch: 2 sequences, a chunk of 3 after 17 cached tokens and a 2-token prompt, in
/// 4 blocks of 16 (table rows of 2).
fn good<'a>(tables: &'a [i32], starts: &'a [i32], ctx: &'a [i32]) -> PrefillBatch<'a> {
    PrefillBatch {
        block_tables: tables,
        max_blocks: 2,
        query_starts: starts,
        context_lens: ctx,
        block_size: 16,
        num_blocks: 4,
        window: None,
    }
}

fn refused(b: PrefillBatch<'_>, what: &str) {
    match b.validate() {
        Err(KernelError::BadArgument { reason, .. }) => eprintln!("{what}: {reason}"),
        r => panic!("{what}: expected BadArgument, got {r:?}"),
    }
}

#[test]
fn bad_batches_are_refused_on_the_host() {
    let (t, s, c) = ([0, 1, 2, -1], [0, 3, 5], [20, 2]);
    good(&t, &s, &c).validate().unwrap();
    // Entries nobody attends to may be padding: before the window of the first query token
    // (position 17 with a window of 2 attends to 16..=17: block 0 is not read; with a window
    // of 4, 14..=17, it is) and past the context.
    let t2 = [-1, 1, 2, -1];
    PrefillBatch {
        window: Some(2),
        ..good(&t2, &s, &c)
    }
    .validate()
    .unwrap();
    refused(
        PrefillBatch {
            window: Some(4),
            ..good(&t2, &s, &c)
        },
        "window reaching a padding entry",
    );
    refused(good(&t, &[0, 3], &c), "starts of the wrong length");
    refused(good(&t, &[1, 3, 5], &c), "starts not from 0");
    refused(good(&t, &[0, 3, 3], &c), "an empty sequence");
    refused(good(&t, &[0, 4, 3], &c), "decreasing starts");
    refused(good(&t, &s, &[20, 1]), "context shorter than query_len");
    refused(good(&t, &s, &[33, 2]), "context past the table row");
    refused(good(&t, &s, &[0, 2]), "empty context");
    refused(good(&[0, 9, 2, -1], &s, &c), "table entry >= num_blocks");
    refused(
        good(&[0, -1, 2, -1], &s, &c),
        "padding entry inside the context",
    );
    refused(good(&t[..3], &s, &c), "table of the wrong shape");
    refused(good(&[], &[0], &[]), "empty batch");
    refused(
        PrefillBatch {
            block_size: 12,
            ..good(&t, &s, &c)
        },
        "block size not a power of two",
    );
    refused(
        PrefillBatch {
            window: Some(0),
            ..good(&t, &s, &c)
        },
        "window of 0",
    );
    refused(
        PrefillBatch {
            max_blocks: 0,
            ..good(&[], &s, &c)
        },
        "no table columns",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_launches_are_refused_before_launch() {
    let gpu = gpu();
    let stream = gpu.stream().clone();
    let (t, s, c) = ([0, 1, 2, -1], [0, 3, 5], [20, 2]);
    let meta = PrefillMetadata::new(&gpu, &good(&t, &s, &c)).unwrap();
    assert!(matches!(
        PrefillMetadata::new(&gpu, &good(&t, &s, &[1, 2])),
        Err(KernelError::BadArgument { .. })
    ));
    let layout = BlockLayout::new(KvCacheDtype::Bf16, 16, 2, 64).unwrap();
    let kc = stream
        .alloc_zeros::<u8>(4 * layout.kv_block_bytes())
        .unwrap();
    let (tokens, heads, d) = (5, 8, 64);
    let q = stream.alloc_zeros::<bf16>(tokens * heads * d).unwrap();
    let mut out = stream.alloc_zeros::<bf16>(tokens * heads * d).unwrap();
    paged_prefill(&gpu, &meta, &layout, heads, &q, &kc, &kc, &mut out).unwrap();
    stream.synchronize().unwrap();
    let is_bad = |r: Result<(), KernelError>| {
        assert!(matches!(r, Err(KernelError::BadArgument { .. })), "{r:?}");
    };
    // q and out of the wrong size.
    let short = stream.alloc_zeros::<bf16>(tokens * heads * d - 1).unwrap();
    is_bad(paged_prefill(
        &gpu, &meta, &layout, heads, &short, &kc, &kc, &mut out,
    ));
    let mut short_out = stream.alloc_zeros::<bf16>(4 * heads * d).unwrap();
    is_bad(paged_prefill(
        &gpu,
        &meta,
        &layout,
        heads,
        &q,
        &kc,
        &kc,
        &mut short_out,
    ));
    // 7 query heads over 2 KV heads.
    let q7 = stream.alloc_zeros::<bf16>(tokens * 7 * d).unwrap();
    let mut out7 = stream.alloc_zeros::<bf16>(tokens * 7 * d).unwrap();
    is_bad(paged_prefill(
        &gpu, &meta, &layout, 7, &q7, &kc, &kc, &mut out7,
    ));
    // Caches smaller than the metadata's 4 blocks.
    let small = stream.alloc_zeros::<u8>(layout.kv_block_bytes()).unwrap();
    is_bad(paged_prefill(
        &gpu, &meta, &layout, heads, &q, &small, &kc, &mut out,
    ));
    // A layout of another block size than the metadata's.
    let bs32 = BlockLayout::new(KvCacheDtype::Bf16, 32, 2, 64).unwrap();
    let big = stream.alloc_zeros::<u8>(4 * bs32.kv_block_bytes()).unwrap();
    is_bad(paged_prefill(
        &gpu, &meta, &bs32, heads, &q, &big, &big, &mut out,
    ));
    // int4 KV has no prefill kernel.
    let int4 = BlockLayout::new("int4-g32".parse().unwrap(), 16, 2, 64).unwrap();
    let r = paged_prefill(&gpu, &meta, &int4, heads, &q, &kc, &kc, &mut out);
    assert!(matches!(r, Err(KernelError::Unsupported { .. })), "{r:?}");
}
