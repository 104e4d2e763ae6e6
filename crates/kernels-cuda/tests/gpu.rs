//! The kernels against the CPU reference (kv-quant's codecs, attention in f64), on a GPU.
//! Ignored by default (CI has no GPU): `cargo test -p kernels-cuda -- --include-ignored` on
//! the GPU machine. Without a GPU the non-ignored test checks the clean refusal.
#![allow(
    clippy::unwrap_used,
    clippy::print_stderr,
    clippy::too_many_arguments,
    clippy::needless_range_loop
)]

mod common;

use common::{
    Act, MaxError, PagedCache, attention_ref, decode_batch, gpu, random_act, random_bf16, to_bf16,
};
use half::bf16;
use kernels_cuda::cudarc::driver::CudaSlice;
use kernels_cuda::{
    DecodeKernel, DecodeMetadata, DecodePlan, Gpu, Indices, KernelError, PagedDecoder, StepStaging,
    reshape_and_cache,
};
use kv_quant::{BlockLayout, KvCacheDtype};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn no_gpu_is_an_error_not_a_panic() {
    match Gpu::new(0) {
        Ok(g) => eprintln!("a GPU is present: {} ({})", g.name(), g.arch()),
        Err(KernelError::NoDevice(why)) => eprintln!("no device, as expected here: {why}"),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    assert!(matches!(Gpu::new(1 << 20), Err(KernelError::NoDevice(_))));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cache_write_matches_the_cpu_encoder_byte_for_byte() {
    let gpu = gpu();
    let stream = gpu.stream().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut mismatches = Vec::new();
    for dtype in KvCacheDtype::ALL {
        for head_dim in [64, 128] {
            for block_size in [8, 16, 32] {
                let kv_heads = 3;
                let Ok(layout) = BlockLayout::new(dtype, block_size, kv_heads, head_dim) else {
                    continue;
                };
                let num_blocks = 5;
                let bb = layout.kv_block_bytes();
                let tokens = 2 * block_size + 3;
                let per = kv_heads * head_dim;
                let mut k = random_bf16(&mut rng, tokens * per, 3.0);
                let v = random_bf16(&mut rng, tokens * per, 0.5);
                // Edge rows: all zero, one huge value, infinities and a NaN.
                k[..per].fill(0.0);
                k[per] = bf16::from_f32(60000.0).to_f32();
                k[2 * per + 1] = f32::INFINITY;
                k[2 * per + 2] = f32::NEG_INFINITY;
                k[2 * per + 3] = f32::NAN;
                let mut slots: Vec<i64> = (0..(num_blocks * block_size) as i64).collect();
                slots.shuffle(&mut rng);
                slots.truncate(tokens);
                slots[4] = -1; // padding: skipped
                let mut kc = stream.alloc_zeros::<u8>(num_blocks * bb).unwrap();
                let mut vc = stream.alloc_zeros::<u8>(num_blocks * bb).unwrap();
                let kd = stream.clone_htod(&to_bf16(&k)).unwrap();
                let vd = stream.clone_htod(&to_bf16(&v)).unwrap();
                let slots_d = Indices::new(&gpu, &slots).unwrap();
                reshape_and_cache(&gpu, &layout, &kd, &vd, &slots_d, &mut kc, &mut vc).unwrap();
                let kc = stream.clone_dtoh(&kc).unwrap();
                let vc = stream.clone_dtoh(&vc).unwrap();
                let mut k_ref = vec![0u8; num_blocks * bb];
                let mut v_ref = vec![0u8; num_blocks * bb];
                for (t, &s) in slots.iter().enumerate() {
                    if s < 0 {
                        continue;
                    }
                    let (b, o) = (s as usize / block_size, s as usize % block_size);
                    let x = &k[t * per..(t + 1) * per];
                    kv_quant::encode_token(&layout, &mut k_ref[b * bb..(b + 1) * bb], o, x)
                        .unwrap();
                    let x = &v[t * per..(t + 1) * per];
                    kv_quant::encode_token(&layout, &mut v_ref[b * bb..(b + 1) * bb], o, x)
                        .unwrap();
                }
                // Bytes must match, but a NaN may be stored with another payload.
                for (name, got, want) in [("K", &kc, &k_ref), ("V", &vc, &v_ref)] {
                    for b in 0..num_blocks {
                        let (g, w) = (&got[b * bb..(b + 1) * bb], &want[b * bb..(b + 1) * bb]);
                        if g == w {
                            continue;
                        }
                        let mut gd = vec![0f32; block_size * per];
                        let mut wd = vec![0f32; block_size * per];
                        kv_quant::decode_slots(&layout, g, 0..block_size, &mut gd).unwrap();
                        kv_quant::decode_slots(&layout, w, 0..block_size, &mut wd).unwrap();
                        let differs = |x: &f32, y: &f32| {
                            x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan())
                        };
                        let first_value = gd.iter().zip(&wd).position(|(x, y)| differs(x, y));
                        let float_dtype = matches!(dtype, KvCacheDtype::Fp16 | KvCacheDtype::Bf16);
                        if first_value.is_none() && float_dtype {
                            continue; // NaN payloads only
                        }
                        let i = g.iter().zip(w).position(|(x, y)| x != y).unwrap_or(0);
                        mismatches.push(format!(
                            "{dtype} d={head_dim} bs={block_size} {name} block {b}: byte {i} \
                             gpu {} cpu {}; first value diff (slot, channel, gpu, cpu) {:?}",
                            g[i],
                            w[i],
                            first_value.map(|v| (v / per, v % per, gd[v], wd[v]))
                        ));
                    }
                }
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "GPU != CPU encoder:\n{}",
        mismatches.join("\n")
    );
}

/// One attention case: random caches encoded on the CPU, random block tables, bf16 q.
struct Case {
    layout: BlockLayout,
    num_heads: usize,
    contexts: Vec<usize>,
    window: Option<usize>,
}

/// Max |out - ref| / max |ref| of the GPU decode (bf16 activations) against an f64
/// reference of the decoded cache.
fn decode_error(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    c: &Case,
    partition: Option<usize>,
    kernel: DecodeKernel,
) -> f64 {
    decode_error_as::<bf16>(gpu, rng, c, partition, kernel)
}

/// [`decode_error`] with activations (q, out, the values cached) of type `T`.
fn decode_error_as<T: Act>(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    c: &Case,
    partition: Option<usize>,
    kernel: DecodeKernel,
) -> f64 {
    let mut dec = PagedDecoder::new();
    dec.set_kernel(kernel);
    dec.set_partition_size(partition).unwrap();
    decode_error_on::<T>(gpu, rng, c, &mut dec).0
}

/// [`decode_error_as`] through `dec` (its kernel and partition size, its scratch kept from
/// earlier calls), with the plan it ran.
fn decode_error_on<T: Act>(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    c: &Case,
    dec: &mut PagedDecoder,
) -> (f64, DecodePlan) {
    let (cache, meta) = decode_batch::<T>(gpu, rng, &c.layout, &c.contexts, c.window);
    decode_error_over::<T>(gpu, rng, c, &cache, &meta, dec)
}

/// Random queries for `c`, run through `dec` over `cache` and `meta`: the relative error
/// against the f64 reference, and the plan. Every output must be written and finite.
fn decode_error_over<T: Act>(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    c: &Case,
    cache: &PagedCache,
    meta: &DecodeMetadata,
    dec: &mut PagedDecoder,
) -> (f64, DecodePlan) {
    let stream = gpu.stream().clone();
    let l = &c.layout;
    let (kvh, d) = (l.num_kv_heads(), l.head_dim());
    let nh = c.num_heads;
    let group = nh / kvh;
    let q = random_act::<T>(rng, c.contexts.len() * nh * d, 1.0);
    let kd = stream.clone_htod(&cache.k).unwrap();
    let vd = stream.clone_htod(&cache.v).unwrap();
    let q_t: Vec<T> = q.iter().map(|&x| T::of(x)).collect();
    let qd = stream.clone_htod(&q_t).unwrap();
    // Poisoned output: every element must be written.
    let mut out: CudaSlice<T> = stream
        .clone_htod(&vec![T::NAN; c.contexts.len() * nh * d])
        .unwrap();
    let plan = dec.run(gpu, meta, l, nh, &qd, &kd, &vd, &mut out).unwrap();
    let out: Vec<f32> = stream
        .clone_dtoh(&out)
        .unwrap()
        .iter()
        .map(|x| x.f32())
        .collect();
    let mut err = MaxError::default();
    for (s, &ctx) in c.contexts.iter().enumerate() {
        let first = c.window.map_or(0, |w| ctx.saturating_sub(w));
        for h in 0..nh {
            let qh = &q[(s * nh + h) * d..][..d];
            let r = attention_ref(
                qh,
                &cache.k_dec[s],
                &cache.v_dec[s],
                kvh,
                h / group,
                first..ctx,
            );
            for (i, r) in r.into_iter().enumerate() {
                let o = f64::from(out[(s * nh + h) * d + i]);
                assert!(o.is_finite(), "seq {s} head {h} ch {i}: {o} (unwritten?)");
                err.add(o, r);
            }
        }
    }
    (err.relative(), plan)
}

/// A grid of decode cases: for each dtype, head dims 64 and 128 (where the layout exists) and
/// each (KV heads, GQA group) pair, block sizes 8/16/32 in turn and a window where
/// `window(case number)` gives one, ragged contexts; each case run with the automatic and with
/// forced 64-token partitions.
struct Grid<'a> {
    dtypes: &'a [KvCacheDtype],
    pairs: &'a [(usize, usize)],
    window: fn(usize) -> Option<usize>,
    kernel: DecodeKernel,
    /// Prefix of the printed lines.
    label: &'a str,
}

impl Grid<'_> {
    /// Runs the grid (bf16 activations), numbering cases from `*i + 1`; returns the cases over
    /// the tolerance (bf16 output, 2^-9 relative, plus f32 accumulation: 1.5e-2).
    fn run(&self, gpu: &Gpu, rng: &mut ChaCha8Rng, i: &mut usize) -> Vec<String> {
        let mut worst = Vec::new();
        for &dtype in self.dtypes {
            for head_dim in [64, 128] {
                for &(kv_heads, group) in self.pairs {
                    *i += 1;
                    let block_size = [8, 16, 32][*i % 3];
                    let Ok(layout) = BlockLayout::new(dtype, block_size, kv_heads, head_dim) else {
                        continue;
                    };
                    let window = (self.window)(*i);
                    let case = Case {
                        layout,
                        num_heads: kv_heads * group,
                        contexts: vec![1, 7, 100 + *i, 333, 1025],
                        window,
                    };
                    let auto = decode_error(gpu, rng, &case, None, self.kernel);
                    let split = decode_error(gpu, rng, &case, Some(64), self.kernel);
                    let name = format!("{dtype} d={head_dim} gqa={group} bs={block_size}");
                    eprintln!(
                        "{}{name} window={window:?}: err {auto:.2e} (auto), {split:.2e} \
                         (partitions of 64)",
                        self.label
                    );
                    if auto > 1.5e-2 || split > 1.5e-2 {
                        worst.push(format!("{name}: {auto:.2e} {split:.2e}"));
                    }
                }
            }
        }
        worst
    }
}

/// [`decode_error`] of one 32K-token sequence with Llama-3-8B heads (32 query / 8 KV,
/// d = 128), block size 16, no window.
fn long_context_error(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    dtype: KvCacheDtype,
    kernel: DecodeKernel,
) -> f64 {
    let case = Case {
        layout: BlockLayout::new(dtype, 16, 8, 128).unwrap(),
        num_heads: 32,
        contexts: vec![32768],
        window: None,
    };
    decode_error(gpu, rng, &case, None, kernel)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_attention_matches_the_reference_across_dtypes_shapes_and_windows() {
    let gpu = gpu();
    eprintln!(
        "device: {} ({}, {} SMs)",
        gpu.name(),
        gpu.arch(),
        gpu.num_sms()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let grid = Grid {
        dtypes: &KvCacheDtype::ALL,
        pairs: &[(2, 1), (3, 3), (2, 4), (1, 8)],
        window: |i| i.is_multiple_of(4).then_some(50 + i % 7),
        kernel: DecodeKernel::Split,
        label: "",
    };
    let worst = grid.run(&gpu, &mut rng, &mut 0);
    assert!(worst.is_empty(), "over tolerance:\n{}", worst.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_attention_handles_32k_contexts_and_batch_1() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for dtype in [
        KvCacheDtype::Bf16,
        KvCacheDtype::Int8,
        "int4-g32".parse().unwrap(),
    ] {
        let e = long_context_error(&gpu, &mut rng, dtype, DecodeKernel::Split);
        eprintln!("{dtype} 1 x 32K, 32/8 heads, d=128: err {e:.2e}");
        assert!(e < 1.5e-2, "{dtype}: {e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tensor_core_decode_matches_the_reference() {
    // The tensor-core kernel (bf16 activations; bf16, int8, fp8 and every int4 layout):
    // head dims, GQA groups 1 to 8, block sizes, windows, ragged contexts, automatic and
    // forced partitions, 1 x 32K; then fp16 activations. Tolerance: max |out - ref| / max |ref|
    // < 1.5e-2 against f64 attention over the *decoded* cache (quantization error is not
    // counted), as for the split kernel. Expected: ~3e-3 for bf16 KV, ~4-7e-3 for codes (P s
    // is rounded to bf16 before the P . V mma, and so is the output: the int4 emulation,
    // `kernels/experiments/tc_emulation.py --round`, gives 3.3-6.8e-3 with bf16 and
    // 2.4-4.9e-4 with fp16 activations).
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let tc = DecodeKernel::TensorCore;
    const PAIRS: &[(usize, usize)] = &[(2, 1), (3, 3), (2, 4), (1, 5), (1, 8)];
    let window = |i: usize| i.is_multiple_of(3).then_some(40 + i % 9);
    let mut i = 0usize;
    let mut worst = Grid {
        dtypes: &[
            KvCacheDtype::Bf16,
            KvCacheDtype::Int8,
            KvCacheDtype::Fp8E4m3,
            KvCacheDtype::Fp8E5m2,
        ],
        pairs: PAIRS,
        window,
        kernel: tc,
        label: "tc ",
    }
    .run(&gpu, &mut rng, &mut i);
    for dtype in [KvCacheDtype::Bf16, KvCacheDtype::Int8] {
        let e = long_context_error(&gpu, &mut rng, dtype, tc);
        eprintln!("tc {dtype} 1 x 32K, 32/8 heads, d=128: err {e:.2e}");
        if e > 1.5e-2 {
            worst.push(format!("{dtype} 1 x 32K: {e:.2e}"));
        }
    }
    // int4 (its own kernel body): every group size at d 64 and 128 (int4-g128 needs 128).
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let int4: Vec<KvCacheDtype> = KvCacheDtype::ALL
        .into_iter()
        .filter(|d| matches!(d, KvCacheDtype::Int4 { .. }))
        .collect();
    for &dtype in &int4 {
        let kernel = PagedDecoder::new().kernel_for(kernels_cuda::Scalar::Bf16, dtype);
        assert_eq!(kernel, tc, "{dtype} runs the tensor-core kernel");
    }
    worst.extend(
        Grid {
            dtypes: &int4,
            pairs: PAIRS,
            window,
            kernel: tc,
            label: "tc ",
        }
        .run(&gpu, &mut rng, &mut i),
    );
    for dtype in ["int4-g32", "int4"] {
        let e = long_context_error(&gpu, &mut rng, dtype.parse().unwrap(), tc);
        eprintln!("tc {dtype} 1 x 32K, 32/8 heads, d=128: err {e:.2e}");
        if e > 1.5e-2 {
            worst.push(format!("{dtype} 1 x 32K: {e:.2e}"));
        }
    }
    // fp16 activations: fp16, int8 and int4 KV (the fp16 fragments, int8's fp16 codes without
    // the power-of-two scaling of bf16 q, and the nibble patterns).
    for (dtype, head_dim, window) in [
        ("fp16", 128, None),
        ("int8", 64, Some(77)),
        ("int8", 128, None),
        ("int4-g32", 128, None),
        ("int4-g64", 64, Some(77)),
        ("int4", 128, Some(300)),
    ] {
        let case = Case {
            layout: BlockLayout::new(dtype.parse().unwrap(), 16, 2, head_dim).unwrap(),
            num_heads: 8,
            contexts: vec![1, 30, 500, 2049],
            window,
        };
        let e = decode_error_as::<half::f16>(&gpu, &mut rng, &case, None, tc);
        eprintln!("tc f16 activations, {dtype} d={head_dim} window={window:?}: err {e:.2e}");
        if e > 1.5e-2 {
            worst.push(format!("f16 {dtype} d={head_dim}: {e:.2e}"));
        }
    }
    assert!(worst.is_empty(), "over tolerance:\n{}", worst.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tensor_core_decode_with_blocks_smaller_than_a_tile_matches_the_reference() {
    // Blocks of 1, 2 and 4 tokens: a 16-token tile spans 16, 8 or 4 blocks, each row its own
    // table lookup (the warp-specialized producer, `-DKVS_TC_WS=1`, looks tile i + 1's blocks
    // up while it waits for tile i's stage). Windows that start inside a tile, contexts that
    // end inside one, partitions of many rounds of the ring (1,100 tokens). bf16 and fp16
    // activations of their own KV dtype; tolerance as tensor_core_decode_matches_the_reference.
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let tc = DecodeKernel::TensorCore;
    let mut worst = Vec::new();
    for (i, block_size) in [1usize, 2, 4].into_iter().enumerate() {
        for head_dim in [64, 128] {
            for window in [None, Some(37 + 100 * i)] {
                let case = |dtype| Case {
                    layout: BlockLayout::new(dtype, block_size, 2, head_dim).unwrap(),
                    num_heads: 8,
                    contexts: vec![1, 15, 17, 300, 1100],
                    window,
                };
                let name = format!("bs={block_size} d={head_dim} window={window:?}");
                for partition in [None, Some(64)] {
                    let e = decode_error(&gpu, &mut rng, &case(KvCacheDtype::Bf16), partition, tc);
                    let h = decode_error_as::<half::f16>(
                        &gpu,
                        &mut rng,
                        &case(KvCacheDtype::Fp16),
                        partition,
                        tc,
                    );
                    eprintln!("tc {name} partition={partition:?}: err {e:.2e} bf16, {h:.2e} f16");
                    if e > 1.5e-2 || h > 1.5e-2 {
                        worst.push(format!("{name} partition={partition:?}: {e:.2e} {h:.2e}"));
                    }
                }
            }
        }
    }
    assert!(worst.is_empty(), "over tolerance:\n{}", worst.join("\n"));
}

/// [`decode_error_as`] (tensor-core kernel) over a cache poisoned outside what the batch
/// attends: every byte that is not in a value row (any KV head) of an attended token (slots
/// past a context, tokens before the window, the spare blocks) is 0xFF (NaN in bf16 and
/// fp16), and table entries of blocks wholly before a sequence's window are -1 (the metadata
/// checks only the attended ones). A loader that reads
/// such a row and lets it reach the P . V product (0 * NaN), or looks such a block up, fails.
fn poisoned_decode_error<T: Act>(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    c: &Case,
    partition: Option<usize>,
) -> f64 {
    let l = &c.layout;
    let (kvh, bs) = (l.num_kv_heads(), l.block_size());
    let (row_bytes, bb) = (l.value_row_bytes(), l.kv_block_bytes());
    let (mut cache, _) = decode_batch::<T>(gpu, rng, l, &c.contexts, c.window);
    let mb = cache.max_blocks;
    let mut attended = vec![false; cache.k.len()];
    for (s, &ctx) in c.contexts.iter().enumerate() {
        let first = c.window.map_or(0, |w| ctx.saturating_sub(w));
        for t in first..ctx {
            let b = cache.tables[s * mb + t / bs] as usize;
            for h in 0..kvh {
                let at = b * bb + (h * bs + t % bs) * row_bytes;
                attended[at..at + row_bytes].fill(true);
            }
        }
        for j in 0..first / bs {
            cache.tables[s * mb + j] = -1;
        }
    }
    for (i, &a) in attended.iter().enumerate() {
        if !a {
            cache.k[i] = 0xFF;
            cache.v[i] = 0xFF;
        }
    }
    let ctx_i: Vec<i32> = c.contexts.iter().map(|&x| x as i32).collect();
    let meta = DecodeMetadata::new(
        gpu,
        &cache.tables,
        mb,
        &ctx_i,
        bs,
        cache.num_blocks,
        c.window,
    )
    .unwrap();
    let mut dec = PagedDecoder::new();
    dec.set_kernel(DecodeKernel::TensorCore);
    dec.set_partition_size(partition).unwrap();
    decode_error_over::<T>(gpu, rng, c, &cache, &meta, &mut dec).0
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tensor_core_decode_ignores_poisoned_rows_and_tables_outside_what_it_attends() {
    // NaN in every cache row the batch does not attend (slots past a context, tokens before a
    // window, spare blocks) and -1 in the table entries before a window: the tiles' masked
    // tokens must contribute nothing (-DKVS_TC_TMA=1 brings whole boxes of 8 rows and zeroes
    // the masked V rows; cp.async zero-fills them). Block sizes 1 to 32 (the TMA loader's
    // cp.async fallback below 8), d 64 / 128, windows starting inside tiles and blocks, bf16
    // and fp16; tolerance as tensor_core_decode_matches_the_reference.
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let mut worst = Vec::new();
    for (i, block_size) in [8usize, 16, 32, 4].into_iter().enumerate() {
        for head_dim in [64, 128] {
            for window in [None, Some(45 + 50 * i)] {
                let case = |dtype| Case {
                    layout: BlockLayout::new(dtype, block_size, 2, head_dim).unwrap(),
                    num_heads: 2 * (1 + i),
                    contexts: vec![1, 9, 23, 300, 1037],
                    window,
                };
                let name = format!("bs={block_size} d={head_dim} window={window:?}");
                for partition in [None, Some(64)] {
                    let e = poisoned_decode_error::<bf16>(
                        &gpu,
                        &mut rng,
                        &case(KvCacheDtype::Bf16),
                        partition,
                    );
                    let h = poisoned_decode_error::<half::f16>(
                        &gpu,
                        &mut rng,
                        &case(KvCacheDtype::Fp16),
                        partition,
                    );
                    eprintln!(
                        "tc poisoned {name} partition={partition:?}: err {e:.2e} bf16, {h:.2e} f16"
                    );
                    if !(e <= 1.5e-2 && h <= 1.5e-2) {
                        worst.push(format!("{name} partition={partition:?}: {e:.2e} {h:.2e}"));
                    }
                }
            }
        }
    }
    assert!(
        worst.is_empty(),
        "over tolerance or not finite:\n{}",
        worst.join("\n")
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_arguments_are_refused_before_launch() {
    let gpu = gpu();
    let stream = gpu.stream().clone();
    let layout = BlockLayout::new(KvCacheDtype::Fp16, 16, 2, 64).unwrap();
    let bad = |r: Result<DecodeMetadata, KernelError>| {
        assert!(matches!(r, Err(KernelError::BadArgument { .. })), "{r:?}");
    };
    bad(DecodeMetadata::new(&gpu, &[], 1, &[], 16, 4, None));
    bad(DecodeMetadata::new(&gpu, &[0], 1, &[17], 16, 4, None)); // context > table
    bad(DecodeMetadata::new(&gpu, &[9], 1, &[3], 16, 4, None)); // block id >= num_blocks
    bad(DecodeMetadata::new(&gpu, &[0], 1, &[3], 12, 4, None)); // block size not 2^k
    bad(DecodeMetadata::new(&gpu, &[0, 1], 1, &[3], 16, 4, None)); // table shape
    bad(DecodeMetadata::new(&gpu, &[0], 1, &[3], 16, 4, Some(0))); // empty window
    let meta = DecodeMetadata::new(&gpu, &[0], 1, &[3], 16, 4, None).unwrap();
    let kc = stream
        .alloc_zeros::<u8>(4 * layout.kv_block_bytes())
        .unwrap();
    let q = stream.alloc_zeros::<bf16>(4 * 64).unwrap();
    let mut out = stream.alloc_zeros::<bf16>(4 * 64).unwrap();
    let mut dec = PagedDecoder::new();
    // 3 query heads over 2 KV heads.
    let r = dec.run(&gpu, &meta, &layout, 3, &q, &kc, &kc, &mut out);
    assert!(matches!(r, Err(KernelError::BadArgument { .. })), "{r:?}");
    // Cache too small for the metadata's 4 blocks.
    let small = stream.alloc_zeros::<u8>(layout.kv_block_bytes()).unwrap();
    let r = dec.run(&gpu, &meta, &layout, 4, &q, &small, &small, &mut out);
    assert!(matches!(r, Err(KernelError::BadArgument { .. })), "{r:?}");
    assert!(dec.set_partition_size(Some(100)).is_err());
    assert!(dec.set_partition_size(Some(0)).is_err());
    // Slots outside the cache.
    let mut kc2 = stream.alloc_zeros::<u8>(layout.kv_block_bytes()).unwrap();
    let mut vc2 = stream.alloc_zeros::<u8>(layout.kv_block_bytes()).unwrap();
    let k = stream.alloc_zeros::<bf16>(2 * 64).unwrap();
    let slots = Indices::new(&gpu, &[16i64]).unwrap();
    let r = reshape_and_cache(&gpu, &layout, &k, &k, &slots, &mut kc2, &mut vc2);
    assert!(matches!(r, Err(KernelError::BadArgument { .. })), "{r:?}");
}

/// Max |a − b| over max |b|.
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((f64::from(*x) - y).abs()));
    assert!(a.iter().all(|x| x.is_finite()), "non-finite output");
    err / scale
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn per_token_layers_match_the_reference() {
    let gpu = gpu();
    let s = gpu.stream().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let is_bad = |r: Result<(), KernelError>| matches!(r, Err(KernelError::BadArgument { .. }));
    let (vocab, hidden, tokens) = (1000, 576, 37);

    // Embedding gather: exact.
    let table = random_bf16(&mut rng, vocab * hidden, 1.0);
    let ids: Vec<u32> = (0..tokens)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let table_d = s.clone_htod(&to_bf16(&table)).unwrap();
    let mut residual = s.alloc_zeros::<f32>(tokens * hidden).unwrap();
    let ids_d = Indices::from_u32(&gpu, &ids, "ids").unwrap();
    kernels_cuda::embedding_gather(&gpu, &table_d, vocab, &ids_d, &mut residual).unwrap();
    let got = s.clone_dtoh(&residual).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        assert_eq!(
            &got[t * hidden..(t + 1) * hidden],
            &table[id as usize * hidden..(id as usize + 1) * hidden]
        );
    }

    // The vocab-parallel embedding: over 3 ranks (uneven: 333/333/334 rows, each table
    // padded to 334 rows), every rank's rows or zeros, summing to the embedding exactly.
    let world = 3;
    let per_rank = vocab.div_ceil(world);
    let mut sum = vec![0f32; tokens * hidden];
    for r in 0..world {
        let (start, end) = (r * vocab / world, (r + 1) * vocab / world);
        let mut part = table[start * hidden..end * hidden].to_vec();
        part.resize(per_rank * hidden, 7.0); // padding rows are never read
        let part_d = s.clone_htod(&to_bf16(&part)).unwrap();
        let rows = kernels_cuda::VocabRows {
            start,
            len: end - start,
            vocab,
        };
        kernels_cuda::embedding_gather_rows(&gpu, &part_d, hidden, rows, &ids_d, &mut residual)
            .unwrap();
        let got = s.clone_dtoh(&residual).unwrap();
        for (t, &id) in ids.iter().enumerate() {
            let row = &got[t * hidden..(t + 1) * hidden];
            if (start..end).contains(&(id as usize)) {
                let want = &table[id as usize * hidden..(id as usize + 1) * hidden];
                assert_eq!(row, want, "rank {r}, token {t}");
            } else {
                assert!(
                    row.iter().all(|&x| x == 0.0),
                    "rank {r}, token {t}: not zeros"
                );
            }
        }
        for (acc, x) in sum.iter_mut().zip(got) {
            *acc += x;
        }
    }
    for (t, &id) in ids.iter().enumerate() {
        let want = &table[id as usize * hidden..(id as usize + 1) * hidden];
        assert_eq!(
            &sum[t * hidden..(t + 1) * hidden],
            want,
            "token {t} over the ranks"
        );
    }
    // A table shorter than its rows, and rows past the vocabulary, are refused.
    let short_table = s.clone_htod(&to_bf16(&table[..10 * hidden])).unwrap();
    for rows in [
        kernels_cuda::VocabRows {
            start: 0,
            len: 11,
            vocab,
        },
        kernels_cuda::VocabRows {
            start: vocab - 5,
            len: 6,
            vocab,
        },
    ] {
        assert!(is_bad(kernels_cuda::embedding_gather_rows(
            &gpu,
            &short_table,
            hidden,
            rows,
            &ids_d,
            &mut residual
        )));
    }

    // Unsharding the vocab-parallel LM head's gathered logits: exact, uneven ranks.
    let n = 5;
    let logits = random_bf16(&mut rng, n * vocab, 1.0);
    let mut gathered = vec![0f32; world * n * per_rank];
    for r in 0..world {
        let (start, end) = (r * vocab / world, (r + 1) * vocab / world);
        for j in 0..n {
            let at = (r * n + j) * per_rank;
            gathered[at..at + end - start]
                .copy_from_slice(&logits[j * vocab + start..j * vocab + end]);
            gathered[at + end - start..at + per_rank].fill(-9.0); // padding
        }
    }
    let gathered_d = s.clone_htod(&to_bf16(&gathered)).unwrap();
    let mut out = s.alloc_zeros::<bf16>(n * vocab).unwrap();
    kernels_cuda::unshard_vocab(&gpu, &gathered_d, world, per_rank, vocab, &mut out).unwrap();
    let got: Vec<f32> = s
        .clone_dtoh(&out)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    assert_eq!(got, logits, "unsharded logits");
    assert!(is_bad(kernels_cuda::unshard_vocab(
        &gpu,
        &gathered_d,
        world,
        per_rank - 1,
        vocab,
        &mut out
    )));
    assert!(is_bad(kernels_cuda::unshard_vocab(
        &gpu,
        &gathered_d,
        2,
        per_rank,
        vocab,
        &mut out
    )));

    // Row gather: exact, rows repeated and out of order.
    let picks: Vec<u32> = vec![5, 0, 5, tokens as u32 - 1];
    let picks_d = Indices::from_u32(&gpu, &picks, "rows").unwrap();
    let mut picked = s.alloc_zeros::<bf16>(picks.len() * hidden).unwrap();
    kernels_cuda::gather_rows(&gpu, &table_d, hidden, &picks_d, &mut picked).unwrap();
    let got = s.clone_dtoh(&picked).unwrap();
    for (j, &r) in picks.iter().enumerate() {
        let want = &table[r as usize * hidden..(r as usize + 1) * hidden];
        let row: Vec<f32> = got[j * hidden..(j + 1) * hidden]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        assert_eq!(row, want, "gathered row {j}");
    }
    let far = Indices::from_u32(&gpu, &[vocab as u32], "rows").unwrap();
    let r = kernels_cuda::gather_rows(&gpu, &table_d, hidden, &far, &mut picked);
    assert!(matches!(r, Err(KernelError::BadArgument { .. })), "{r:?}");

    // RMSNorm, with and without the residual add.
    let weight = random_bf16(&mut rng, hidden, 2.0);
    let delta = random_bf16(&mut rng, tokens * hidden, 3.0);
    let w_d = s.clone_htod(&to_bf16(&weight)).unwrap();
    let delta_d = s.clone_htod(&to_bf16(&delta)).unwrap();
    let mut out = s.alloc_zeros::<bf16>(tokens * hidden).unwrap();
    for add in [false, true] {
        let before = s.clone_dtoh(&residual).unwrap();
        let d = add.then_some(&delta_d);
        kernels_cuda::rms_norm(&gpu, &mut residual, d, &w_d, 1e-5, &mut out).unwrap();
        let after = s.clone_dtoh(&residual).unwrap();
        let r: Vec<f32> = if add {
            before.iter().zip(&delta).map(|(a, b)| a + b).collect()
        } else {
            before
        };
        assert_eq!(after, r, "residual after add={add}");
        let mut want = vec![0f64; tokens * hidden];
        for t in 0..tokens {
            let row = &r[t * hidden..(t + 1) * hidden];
            let ms = row.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / hidden as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for i in 0..hidden {
                want[t * hidden + i] = f64::from(weight[i]) * f64::from(row[i]) * inv;
            }
        }
        let got: Vec<f32> = s
            .clone_dtoh(&out)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let e = rel_err(&got, &want);
        eprintln!("rms_norm add={add}: err {e:.2e}");
        assert!(e < 1e-2, "rms_norm add={add}: {e}");
    }

    // RoPE, both pair styles, positions up to 131K.
    let (qh, kh, d) = (9, 3, 64);
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 100_000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let inv_d = s.clone_htod(&inv).unwrap();
    for interleaved in [false, true] {
        let positions: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..131_072)).collect();
        let q = random_bf16(&mut rng, tokens * qh * d, 1.0);
        let k = random_bf16(&mut rng, tokens * kh * d, 1.0);
        let mut q_d = s.clone_htod(&to_bf16(&q)).unwrap();
        let mut k_d = s.clone_htod(&to_bf16(&k)).unwrap();
        let shape = kernels_cuda::RopeShape {
            num_q_heads: qh,
            num_kv_heads: kh,
            head_dim: d,
            interleaved,
        };
        let pos_d = Indices::from_u32(&gpu, &positions, "positions").unwrap();
        kernels_cuda::rope(&gpu, shape, &pos_d, &inv_d, &mut q_d, &mut k_d).unwrap();
        for (x, x_d, heads) in [(&q, &q_d, qh), (&k, &k_d, kh)] {
            let mut want = vec![0f64; x.len()];
            for t in 0..tokens {
                for h in 0..heads {
                    let base = (t * heads + h) * d;
                    for i in 0..d / 2 {
                        let (a, b) = if interleaved {
                            (2 * i, 2 * i + 1)
                        } else {
                            (i, i + d / 2)
                        };
                        let angle = f64::from(positions[t] as f32 * inv[i]);
                        let (sn, c) = angle.sin_cos();
                        let (x0, x1) = (f64::from(x[base + a]), f64::from(x[base + b]));
                        want[base + a] = x0 * c - x1 * sn;
                        want[base + b] = x0 * sn + x1 * c;
                    }
                }
            }
            let got: Vec<f32> = s
                .clone_dtoh(x_d)
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();
            let e = rel_err(&got, &want);
            eprintln!("rope interleaved={interleaved}: err {e:.2e}");
            assert!(e < 1e-2, "rope: {e}");
        }
    }

    // Bias add (Qwen2's Q/K/V), in bf16.
    let bias = random_bf16(&mut rng, 192, 1.0);
    let xs = random_bf16(&mut rng, tokens * 192, 2.0);
    let bias_d = s.clone_htod(&to_bf16(&bias)).unwrap();
    let mut x_d = s.clone_htod(&to_bf16(&xs)).unwrap();
    kernels_cuda::add_bias(&gpu, &mut x_d, &bias_d.as_view()).unwrap();
    let want: Vec<f64> = xs
        .iter()
        .enumerate()
        .map(|(i, &x)| f64::from(x) + f64::from(bias[i % 192]))
        .collect();
    let got: Vec<f32> = s
        .clone_dtoh(&x_d)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let e = rel_err(&got, &want);
    eprintln!("add_bias: err {e:.2e}");
    assert!(e < 1e-2, "add_bias: {e}");
    let bad = kernels_cuda::add_bias(
        &gpu,
        &mut x_d,
        &s.clone_htod(&to_bf16(&bias[..191])).unwrap().as_view(),
    );
    assert!(
        matches!(bad, Err(KernelError::BadArgument { .. })),
        "{bad:?}"
    );

    // SiLU(gate) * up: 16-byte vectors (widths of a multiple of 8), one value per thread
    // otherwise, and a width of several CTAs per token (Llama-3.1-8B's).
    for inter in [1536, 1001, 14336] {
        let gu = random_bf16(&mut rng, tokens * 2 * inter, 4.0);
        let gu_d = s.clone_htod(&to_bf16(&gu)).unwrap();
        let mut out = s.alloc_zeros::<bf16>(tokens * inter).unwrap();
        kernels_cuda::silu_mul(&gpu, &gu_d, inter, &mut out).unwrap();
        let mut want = vec![0f64; tokens * inter];
        for t in 0..tokens {
            for i in 0..inter {
                let g = f64::from(gu[t * 2 * inter + i]);
                want[t * inter + i] =
                    g / (1.0 + (-g).exp()) * f64::from(gu[t * 2 * inter + inter + i]);
            }
        }
        let got: Vec<f32> = s
            .clone_dtoh(&out)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let e = rel_err(&got, &want);
        eprintln!("silu_mul (inter {inter}): err {e:.2e}");
        assert!(e < 1e-2, "silu_mul (inter {inter}): {e}");
    }

    // The fused Q/K/V product split into q, k and v, with and without the stacked bias:
    // exact without (a copy), the bias added in f32 and rounded once with it.
    let (nq, nkv) = (576, 192);
    let width = nq + 2 * nkv;
    let qkv = random_bf16(&mut rng, tokens * width, 2.0);
    let bias = random_bf16(&mut rng, width, 1.0);
    let qkv_d = s.clone_htod(&to_bf16(&qkv)).unwrap();
    let bias_d = s.clone_htod(&to_bf16(&bias)).unwrap();
    for with_bias in [false, true] {
        let mut q = s.alloc_zeros::<bf16>(tokens * nq).unwrap();
        let mut k = s.alloc_zeros::<bf16>(tokens * nkv).unwrap();
        let mut v = s.alloc_zeros::<bf16>(tokens * nkv).unwrap();
        let b = with_bias.then_some(&bias_d);
        kernels_cuda::split_qkv(&gpu, &qkv_d, b, nq, nkv, &mut q, &mut k, &mut v).unwrap();
        let (q, k, v) = (
            s.clone_dtoh(&q).unwrap(),
            s.clone_dtoh(&k).unwrap(),
            s.clone_dtoh(&v).unwrap(),
        );
        for t in 0..tokens {
            for i in 0..width {
                let x = qkv[t * width + i] + if with_bias { bias[i] } else { 0.0 };
                let want = bf16::from_f32(x);
                let got = if i < nq {
                    q[t * nq + i]
                } else if i < nq + nkv {
                    k[t * nkv + i - nq]
                } else {
                    v[t * nkv + i - nq - nkv]
                };
                assert_eq!(got, want, "token {t}, column {i}, bias {with_bias}");
            }
        }
    }
    {
        let mut q = s.alloc_zeros::<bf16>(tokens * nq).unwrap();
        let mut k = s.alloc_zeros::<bf16>(tokens * nkv).unwrap();
        let mut v = s.alloc_zeros::<bf16>(tokens * nkv).unwrap();
        // Widths not a multiple of 8, a short qkv, a bias of the wrong length.
        let odd =
            kernels_cuda::split_qkv(&gpu, &qkv_d, None, nq - 4, nkv + 2, &mut q, &mut k, &mut v);
        assert!(is_bad(odd));
        let short = s.alloc_zeros::<bf16>(tokens * width - 8).unwrap();
        assert!(is_bad(kernels_cuda::split_qkv(
            &gpu, &short, None, nq, nkv, &mut q, &mut k, &mut v
        )));
        assert!(is_bad(kernels_cuda::split_qkv(
            &gpu,
            &qkv_d,
            Some(&qkv_d),
            nq,
            nkv,
            &mut q,
            &mut k,
            &mut v
        )));
    }

    // Bad input is refused before launching.
    assert!(is_bad(kernels_cuda::embedding_gather(
        &gpu,
        &table_d,
        vocab,
        &Indices::from_u32(&gpu, &[vocab as u32], "ids").unwrap(),
        &mut residual
    )));
    assert!(is_bad(kernels_cuda::embedding_gather(
        &gpu,
        &table_d,
        999,
        &ids_d,
        &mut residual
    )));
    let mut short = s.alloc_zeros::<bf16>(hidden).unwrap();
    assert!(is_bad(kernels_cuda::rms_norm(
        &gpu,
        &mut residual,
        None,
        &w_d,
        1e-5,
        &mut short
    )));
    assert!(is_bad(kernels_cuda::rms_norm(
        &gpu,
        &mut residual,
        None,
        &w_d,
        f32::NAN,
        &mut out
    )));
    let odd = kernels_cuda::RopeShape {
        num_q_heads: 1,
        num_kv_heads: 1,
        head_dim: 3,
        interleaved: false,
    };
    let mut q1 = s.alloc_zeros::<bf16>(3).unwrap();
    let mut k1 = s.alloc_zeros::<bf16>(3).unwrap();
    assert!(is_bad(kernels_cuda::rope(
        &gpu,
        odd,
        &Indices::from_u32(&gpu, &[0], "positions").unwrap(),
        &inv_d,
        &mut q1,
        &mut k1
    )));
    let inter = 1536;
    let gu_d = s.alloc_zeros::<bf16>(tokens * 2 * inter).unwrap();
    let mut out = s.alloc_zeros::<bf16>(tokens * inter).unwrap();
    assert!(is_bad(kernels_cuda::silu_mul(
        &gpu,
        &gu_d,
        inter + 1,
        &mut out
    )));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_layer_matches_the_reference() {
    let gpu = gpu();
    let s = gpu.stream().clone();
    let blas = kernels_cuda::Blas::new(&gpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for (tokens, n, k) in [(1, 576, 576), (7, 1536, 576), (33, 192, 64)] {
        let x = random_bf16(&mut rng, tokens * k, 1.0);
        let w = random_bf16(&mut rng, n * k, 0.1);
        let x_d = s.clone_htod(&to_bf16(&x)).unwrap();
        let w_d = s.clone_htod(&to_bf16(&w)).unwrap();
        let mut out = s.alloc_zeros::<bf16>(tokens * n).unwrap();
        blas.linear(&x_d, &w_d, n, k, &mut out).unwrap();
        let mut want = vec![0f64; tokens * n];
        for t in 0..tokens {
            for j in 0..n {
                want[t * n + j] = (0..k)
                    .map(|i| f64::from(x[t * k + i]) * f64::from(w[j * k + i]))
                    .sum();
            }
        }
        let got: Vec<f32> = s
            .clone_dtoh(&out)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let e = rel_err(&got, &want);
        eprintln!("linear {tokens} x {k} -> {n}: err {e:.2e}");
        assert!(e < 1e-2, "linear: {e}");
        // Wrong shapes are refused before cuBLAS is called.
        let r = blas.linear(&x_d, &w_d, n + 1, k, &mut out);
        assert!(matches!(r, Err(KernelError::BadArgument { .. })), "{r:?}");
    }
}

/// One output taking every row.
fn one(out: &mut CudaSlice<bf16>, width: usize) -> Vec<kernels_cuda::GemvOut<'_, bf16>> {
    vec![kernels_cuda::GemvOut { out, width }]
}

/// `x Wᵀ` in f64: `x` `[tokens][k]`, `w` `[n][k]`.
fn matmul_ref(x: &[f32], w: &[f32], tokens: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0f64; tokens * n];
    for t in 0..tokens {
        for j in 0..n {
            out[t * n + j] = (0..k)
                .map(|i| f64::from(x[t * k + i]) * f64::from(w[j * k + i]))
                .sum();
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemv_matches_the_reference_and_refuses_bad_shapes() {
    use kernels_cuda::{GEMV_MAX_TOKENS, GemvOut};
    let gpu = gpu();
    let s = gpu.stream().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let is_bad = |r: kernels_cuda::Result<()>| matches!(r, Err(KernelError::BadArgument { .. }));
    // (k, widths of the outputs, bias): a fused Q/K/V of SmolLM2's shape with a bias, an odd
    // number of rows (the last warp has one row when two rows share a warp), one long row.
    let shapes: [(usize, &[usize], bool); 4] = [
        (576, &[576, 192, 192], true),
        (1536, &[577], false),
        (4096, &[1024, 8], false),
        // Not a multiple of 32: the f32-FMA kernels at every token count (the others take the
        // tensor-core kernels from GEMV_TC_MIN_TOKENS on).
        (584, &[200, 56], true),
    ];
    for tokens in 1..=GEMV_MAX_TOKENS {
        for &(k, widths, with_bias) in &shapes {
            let n: usize = widths.iter().sum();
            let x = random_bf16(&mut rng, tokens * k, 1.0);
            let w = random_bf16(&mut rng, n * k, 0.05);
            let b = random_bf16(&mut rng, n, 1.0);
            let x_d = s.clone_htod(&to_bf16(&x)).unwrap();
            let w_d = s.clone_htod(&to_bf16(&w)).unwrap();
            let b_d = s.clone_htod(&to_bf16(&b)).unwrap();
            let mut bufs: Vec<CudaSlice<bf16>> = widths
                .iter()
                .map(|&wd| s.alloc_zeros::<bf16>(tokens * wd).unwrap())
                .collect();
            let mut outs: Vec<GemvOut<'_, bf16>> = bufs
                .iter_mut()
                .zip(widths)
                .map(|(out, &width)| GemvOut { out, width })
                .collect();
            let bias = with_bias.then_some(&b_d);
            kernels_cuda::gemv(&gpu, &x_d, &w_d, k, bias, &mut outs).unwrap();
            drop(outs);
            let mut want = matmul_ref(&x, &w, tokens, n, k);
            if with_bias {
                for t in 0..tokens {
                    for j in 0..n {
                        want[t * n + j] += f64::from(b[j]);
                    }
                }
            }
            // The outputs side by side, as rows of n.
            let mut got = vec![0f32; tokens * n];
            let mut start = 0;
            for (buf, &wd) in bufs.iter().zip(widths) {
                let h = s.clone_dtoh(buf).unwrap();
                for t in 0..tokens {
                    for j in 0..wd {
                        got[t * n + start + j] = h[t * wd + j].to_f32();
                    }
                }
                start += wd;
            }
            let e = rel_err(&got, &want);
            eprintln!("gemv {tokens} x {k} -> {widths:?} bias {with_bias}: err {e:.2e}");
            assert!(e < 1e-2, "gemv {tokens} x {k} -> {widths:?}: {e}");
        }
        // Gate/up fused with SiLU: 2 x 1536 rows of 576.
        let (inter, k) = (1536, 576);
        let x = random_bf16(&mut rng, tokens * k, 1.0);
        let w = random_bf16(&mut rng, 2 * inter * k, 0.1);
        let x_d = s.clone_htod(&to_bf16(&x)).unwrap();
        let w_d = s.clone_htod(&to_bf16(&w)).unwrap();
        let mut out = s.alloc_zeros::<bf16>(tokens * inter).unwrap();
        kernels_cuda::gemv_silu_mul(&gpu, &x_d, &w_d, inter, k, &mut out).unwrap();
        let gu = matmul_ref(&x, &w, tokens, 2 * inter, k);
        let want: Vec<f64> = (0..tokens * inter)
            .map(|i| {
                let (t, j) = (i / inter, i % inter);
                let g = gu[t * 2 * inter + j];
                g / (1.0 + (-g).exp()) * gu[t * 2 * inter + inter + j]
            })
            .collect();
        let got: Vec<f32> = s
            .clone_dtoh(&out)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let e = rel_err(&got, &want);
        eprintln!("gemv_silu_mul {tokens} x {k} -> {inter}: err {e:.2e}");
        assert!(e < 2e-2, "gemv_silu_mul {tokens}: {e}");
    }

    // Bad shapes are refused before the launch.
    let (k, n) = (64, 16);
    let x_d = s.alloc_zeros::<bf16>(2 * k).unwrap();
    let w_d = s.alloc_zeros::<bf16>(n * k).unwrap();
    let mut out = s.alloc_zeros::<bf16>(2 * n).unwrap();
    // k not a multiple of 8; more tokens than the kernels take; widths that do not add up to
    // the weight; an output of the wrong size; a bias of the wrong size; no outputs.
    assert!(is_bad(kernels_cuda::gemv(
        &gpu,
        &x_d,
        &w_d,
        60,
        None,
        &mut one(&mut out, n)
    )));
    let many = s.alloc_zeros::<bf16>(9 * k).unwrap();
    assert!(is_bad(kernels_cuda::gemv(
        &gpu,
        &many,
        &w_d,
        k,
        None,
        &mut one(&mut out, n)
    )));
    assert!(is_bad(kernels_cuda::gemv(
        &gpu,
        &x_d,
        &w_d,
        k,
        None,
        &mut one(&mut out, n - 1)
    )));
    let mut small = s.alloc_zeros::<bf16>(n).unwrap();
    assert!(is_bad(kernels_cuda::gemv(
        &gpu,
        &x_d,
        &w_d,
        k,
        None,
        &mut one(&mut small, n)
    )));
    let short_bias = s.alloc_zeros::<bf16>(n - 1).unwrap();
    assert!(is_bad(kernels_cuda::gemv(
        &gpu,
        &x_d,
        &w_d,
        k,
        Some(&short_bias),
        &mut one(&mut out, n)
    )));
    assert!(is_bad(kernels_cuda::gemv(
        &gpu,
        &x_d,
        &w_d,
        k,
        None,
        &mut []
    )));
    // Gate/up: a weight that is not 2 x inter rows; an output of the wrong size.
    assert!(is_bad(kernels_cuda::gemv_silu_mul(
        &gpu, &x_d, &w_d, n, k, &mut out
    )));
    let mut half_out = s.alloc_zeros::<bf16>(2 * (n / 2) + 1).unwrap();
    assert!(is_bad(kernels_cuda::gemv_silu_mul(
        &gpu,
        &x_d,
        &w_d,
        n / 2,
        k,
        &mut half_out
    )));
    // The good calls still work after the refusals.
    let mut act = s.alloc_zeros::<bf16>(2 * (n / 2)).unwrap();
    kernels_cuda::gemv_silu_mul(&gpu, &x_d, &w_d, n / 2, k, &mut act).unwrap();
    kernels_cuda::gemv(&gpu, &x_d, &w_d, k, None, &mut one(&mut out, n)).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tensor_core_decode_merges_in_kernel_across_repeated_calls() {
    // The tensor-core kernel merges a sequence's partitions in the last CTA of each (sequence,
    // KV head) to finish, counted by per-decoder counters that every launch must leave at zero
    // (they are cleared only when allocated). One decoder runs many calls in a row: batches,
    // KV head counts, GQA groups, dtypes and partition counts change between calls (1 to 313
    // partitions: one, two and three chunks of the merge's statistics), sequences of one
    // partition sit among longer ones, and each call runs twice. The first call sizes the
    // counters for the largest (sequences x KV heads), so the later ones reuse counters left by
    // earlier launches. A counter not reset makes a CTA merge before the other partitions are
    // written (or none merge): wrong or unwritten (NaN-poisoned) outputs.
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let mut dec = PagedDecoder::new();
    dec.set_kernel(DecodeKernel::TensorCore);
    let int4_g32: KvCacheDtype = "int4-g32".parse().unwrap();
    // (dtype, KV heads, GQA group, head_dim, block size, contexts, window, forced partition)
    type Run = (
        KvCacheDtype,
        usize,
        usize,
        usize,
        usize,
        &'static [usize],
        Option<usize>,
        Option<usize>,
    );
    // 4 x 5 = 20 counters: the largest; 79 partitions and single-partition sequences.
    let widest: Run = (
        KvCacheDtype::Bf16,
        4,
        2,
        128,
        16,
        &[1, 5000, 64, 65, 2049],
        None,
        Some(64),
    );
    // Llama-3-8B heads, batch 1: 32 partitions (forced).
    let llama: Run = (KvCacheDtype::Bf16, 8, 4, 128, 16, &[4096], None, Some(128));
    let runs: [Run; 10] = [
        widest,
        llama,
        // The same, with the automatic plan.
        (KvCacheDtype::Bf16, 8, 4, 128, 16, &[4096], None, None),
        // Two chunks (141 partitions), GQA 3 at d = 64, int8.
        (
            KvCacheDtype::Int8,
            2,
            3,
            64,
            32,
            &[9000, 17],
            None,
            Some(64),
        ),
        // int4 (its own kernel body) with 1024-token partitions: 1 to 5 partitions.
        (
            int4_g32,
            4,
            2,
            128,
            16,
            &[3000, 1, 4999, 700, 128],
            None,
            Some(1024),
        ),
        // Three chunks (313 partitions), GQA 8.
        (KvCacheDtype::Bf16, 1, 8, 128, 16, &[20000], None, Some(64)),
        // GQA 1 at d = 64: the merge's columns split over 4 slices; a window (47 partitions).
        (
            "int4".parse().unwrap(),
            2,
            1,
            64,
            8,
            &[5000, 33],
            Some(3000),
            Some(64),
        ),
        // fp8, GQA 5 (3 columns per thread at d = 128), batch 3.
        (
            KvCacheDtype::Fp8E4m3,
            2,
            5,
            128,
            32,
            &[2500, 640, 641],
            None,
            Some(64),
        ),
        // The first calls again, in the other order.
        llama,
        widest,
    ];
    let mut worst = Vec::new();
    for (i, &(dtype, kv_heads, group, head_dim, block_size, contexts, window, partition)) in
        runs.iter().enumerate()
    {
        let case = Case {
            layout: BlockLayout::new(dtype, block_size, kv_heads, head_dim).unwrap(),
            num_heads: kv_heads * group,
            contexts: contexts.to_vec(),
            window,
        };
        dec.set_partition_size(partition).unwrap();
        for repeat in 0..2 {
            let (e, plan) = decode_error_on::<bf16>(&gpu, &mut rng, &case, &mut dec);
            let name = format!(
                "call {i}.{repeat}: {dtype} {kv_heads}x{group} heads d={head_dim} \
                 contexts {contexts:?} window {window:?}: {} partitions of {}",
                plan.max_parts, plan.partition_size
            );
            eprintln!("{name}: err {e:.2e}");
            if let Some(p) = partition {
                let attended = contexts
                    .iter()
                    .map(|&c| window.map_or(c, |w| c.min(w)))
                    .max()
                    .unwrap();
                assert_eq!(plan.max_parts, attended.div_ceil(p), "{name}");
            }
            if e > 1.5e-2 {
                worst.push(format!("{name}: {e:.2e}"));
            }
        }
    }
    assert!(worst.is_empty(), "over tolerance:\n{}", worst.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tensor_core_decode_with_device_side_partitions_matches_the_reference() {
    // PagedDecoder::set_fixed_parts (the CUDA-graph mode): the grid's z is fixed, each
    // sequence sizes its partitions from its own context on the device. Fixed counts from 1
    // (one partition of the whole context) to more partitions than a short context has
    // tokens / 32 (CTAs past its partitions return), ragged contexts with windows, every
    // tensor-core dtype, repeated calls through one decoder (the in-kernel merge counters must
    // stay zero between launches); the same tolerance as the host-planned path.
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let mut worst = Vec::new();
    let tc = DecodeKernel::TensorCore;
    let dtypes = [
        KvCacheDtype::Bf16,
        KvCacheDtype::Int8,
        KvCacheDtype::Fp8E4m3,
        "int4-g64".parse().unwrap(),
    ];
    let mut i = 0usize;
    for dtype in dtypes {
        for (kv_heads, group, head_dim) in [(2, 4, 128), (1, 8, 64), (3, 3, 128)] {
            let Ok(layout) = BlockLayout::new(dtype, [8, 16, 32][i % 3], kv_heads, head_dim) else {
                continue;
            };
            for parts in [
                1,
                3,
                8,
                33,
                kernels_cuda::fixed_parts_for(&gpu, 5, kv_heads),
            ] {
                i += 1;
                let window = i.is_multiple_of(4).then_some(90 + i);
                let case = Case {
                    layout,
                    num_heads: kv_heads * group,
                    contexts: vec![1, 7, 100 + i, 333, 4097],
                    window,
                };
                let mut dec = PagedDecoder::new();
                dec.set_kernel(tc);
                dec.set_fixed_parts(Some(parts)).unwrap();
                for round in 0..2 {
                    let (e, plan) = decode_error_on::<bf16>(&gpu, &mut rng, &case, &mut dec);
                    assert_eq!(plan.partition_size, 0, "device-side sizing");
                    assert_eq!(plan.max_parts, parts);
                    eprintln!(
                        "tc fixed {parts} parts, {dtype} d={head_dim} gqa={group} \
                         window={window:?} round {round}: err {e:.2e}"
                    );
                    if e > 1.5e-2 {
                        worst.push(format!("{dtype} d={head_dim} parts={parts}: {e:.2e}"));
                    }
                }
            }
        }
    }
    // 1 x 32K through 2 partitions (16K tokens each) and through 264.
    for parts in [2, 264] {
        let case = Case {
            layout: BlockLayout::new(KvCacheDtype::Bf16, 16, 8, 128).unwrap(),
            num_heads: 32,
            contexts: vec![32768],
            window: None,
        };
        let mut dec = PagedDecoder::new();
        dec.set_kernel(tc);
        dec.set_fixed_parts(Some(parts)).unwrap();
        let (e, _) = decode_error_on::<bf16>(&gpu, &mut rng, &case, &mut dec);
        eprintln!("tc fixed {parts} parts, 1 x 32K: err {e:.2e}");
        if e > 1.5e-2 {
            worst.push(format!("1 x 32K parts={parts}: {e:.2e}"));
        }
    }
    assert!(PagedDecoder::new().set_fixed_parts(Some(0)).is_err());
    assert!(worst.is_empty(), "over tolerance:\n{}", worst.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn step_staging_refuses_bad_input_and_keeps_what_it_holds() {
    // The CUDA-graph path stages each step's metadata in one pinned area: a push that does not
    // fit, a u32 past i32, and decode metadata that the launch checks would refuse are errors
    // that leave the area as it was; later pushes and the upload still work.
    let gpu = gpu();
    let mut st = StepStaging::new(&gpu, 256).unwrap();
    st.begin().unwrap();
    let held = st.push_indices(&[1i32, 2, 3]).unwrap();
    assert_eq!((held.len(), held.min(), held.max()), (3, 1, 3));
    let r = st.push_indices(&[7i32; 100]);
    assert!(
        matches!(r, Err(KernelError::BadArgument { .. })),
        "400 bytes into a 256-byte area: {r:?}"
    );
    let r = st.push_u32(&[u32::MAX], "slots");
    assert!(
        matches!(r, Err(KernelError::BadArgument { .. })),
        "u32::MAX as a 32-bit index: {r:?}"
    );
    // Block 9 of a 4-block pool.
    let r = st.push_decode_metadata(&[0, 9], 2, &[20], 16, 4, None);
    assert!(
        matches!(r, Err(KernelError::BadArgument { .. })),
        "block table entry outside the pool: {r:?}"
    );
    // 17 tokens in one 16-token block.
    let r = st.push_decode_metadata(&[0], 1, &[17], 16, 4, None);
    assert!(
        matches!(r, Err(KernelError::BadArgument { .. })),
        "context longer than its table: {r:?}"
    );
    let r = st.push_decode_metadata(&[0], 1, &[8], 12, 4, None);
    assert!(
        matches!(r, Err(KernelError::BadArgument { .. })),
        "block size 12: {r:?}"
    );
    // What was accepted is intact and the area still takes what fits.
    st.push_decode_metadata(&[0, 1], 2, &[20], 16, 4, None)
        .unwrap();
    st.upload(&gpu).unwrap();
    gpu.stream().synchronize().unwrap();
    st.begin().unwrap();
    assert!(
        st.push_indices(&[5i32; 60]).is_ok(),
        "begin() empties the area"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn preload_loads_each_module_once() {
    let gpu = gpu();
    let variants =
        kernels_cuda::Variant::for_model(kernels_cuda::Scalar::Bf16, KvCacheDtype::Bf16, 128, 4);
    let first = gpu.preload(&variants).unwrap();
    // This process may have compiled none of them (the disk cache), but it loads each once.
    assert_eq!(first.compiled + first.cached, variants.len(), "{first:?}");
    // Twice over the same list, or a duplicate: nothing more to load.
    let twice: Vec<_> = variants.iter().chain(&variants).copied().collect();
    assert_eq!(
        gpu.preload(&twice).unwrap(),
        kernels_cuda::Preloaded::default()
    );
    assert_eq!(
        gpu.preload(&[]).unwrap(),
        kernels_cuda::Preloaded::default()
    );
}
