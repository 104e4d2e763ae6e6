//! The GEMV products with a last-CTA tail, on a GPU, against the unfused chain bit for bit:
//! `gemv_add_norm` (residual add and RMSNorm) against `gemv` + `rms_norm` (the normalized
//! rows and the f32 residual), `gemv_qkv_rope_cache` against `gemv` + `rope_and_cache` (q,
//! the k and v buffers, every byte of both caches) for every KV dtype. The Llama-3-8B and
//! SmolLM2 widths (and one whose rows are not a multiple of 32: the FMA kernels at every
//! token count), 1, 3 and 8 tokens (FMA and tensor-core kernels), with and without a bias;
//! one counter through every launch (it must be back at zero after each).
//!
//! Ignored by default (CI has no GPU): `cargo test --release -p kernels-cuda --test gemv_tail
//! -- --include-ignored` on the GPU machine.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use common::{Act, first_diff, random_act};
use half::{bf16, f16};
use kernels_cuda::cudarc::driver::CudaSlice;
use kernels_cuda::{
    AddNorm, GemvOut, Gpu, Indices, KernelError, LayerCache, QkvRopeCache, RopeShape, Rotary,
    TailCounter, fill_uniform, gemv, gemv_add_norm, gemv_qkv_rope_cache, rms_norm, rope_and_cache,
};
use kv_quant::{BlockLayout, KvCacheDtype};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A device buffer of `n` values uniform in `[lo, hi)` (generated on the device).
fn uniform<T: Act>(gpu: &Gpu, n: usize, seed: u64, lo: f32, hi: f32) -> CudaSlice<T> {
    let mut b = gpu.stream().alloc_zeros::<T>(n).unwrap();
    fill_uniform(gpu, &mut b, seed, lo, hi).unwrap();
    b
}

fn bits<T: Act>(gpu: &Gpu, x: &CudaSlice<T>) -> Vec<u16> {
    gpu.stream()
        .clone_dtoh(x)
        .unwrap()
        .into_iter()
        .map(T::bits)
        .collect()
}

fn f32_bits(gpu: &Gpu, x: &CudaSlice<f32>) -> Vec<u32> {
    gpu.stream()
        .clone_dtoh(x)
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// One residual add + norm both ways: `residual += x Wᵀ (+ bias)` and the norm of it, for
/// `tokens` rows of `n` from inputs of width `k`.
fn compare_add_norm<T: Act>(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    counter: &mut TailCounter,
    (n, k, tokens, bias): (usize, usize, usize, bool),
) -> Vec<String> {
    let s = gpu.stream().clone();
    let seed = rng.random::<u64>();
    // ±1.7 / sqrt(k): products of about unit size, so the residual (±2) changes visibly.
    let a = 1.7 / (k as f32).sqrt();
    let w = uniform::<T>(gpu, n * k, seed, -a, a);
    let x = uniform::<T>(gpu, tokens * k, seed + 1, -1.0, 1.0);
    let b = uniform::<T>(gpu, n, seed + 2, -0.5, 0.5);
    let norm_w = uniform::<T>(gpu, n, seed + 3, 0.5, 1.5);
    let bias = bias.then_some(&b);
    let residual0: Vec<f32> = (0..tokens * n)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    let eps = 1e-5;

    // Unfused: the product stored, rms_norm adding it.
    let mut res_u = s.clone_htod(&residual0).unwrap();
    let mut proj = s.alloc_zeros::<T>(tokens * n).unwrap();
    let mut normed_u = s.alloc_zeros::<T>(tokens * n).unwrap();
    let out = GemvOut {
        out: &mut proj,
        width: n,
    };
    gemv(gpu, &x, &w, k, bias, &mut [out]).unwrap();
    rms_norm(gpu, &mut res_u, Some(&proj), &norm_w, eps, &mut normed_u).unwrap();

    // Tail. The output starts as garbage: a row the tail misses shows.
    let mut res_t = s.clone_htod(&residual0).unwrap();
    let mut normed_t = uniform::<T>(gpu, tokens * n, seed + 4, -9.0, 9.0);
    let norm = AddNorm {
        residual: &mut res_t,
        weight: &norm_w,
        eps,
        out: &mut normed_t,
    };
    gemv_add_norm(gpu, &x, &w, k, bias, norm, counter).unwrap();

    let what = format!("{n} x {k}, {tokens} tokens, bias {}", bias.is_some());
    let mut failures = Vec::new();
    failures.extend(first_diff(
        "residual",
        &f32_bits(gpu, &res_t),
        &f32_bits(gpu, &res_u),
    ));
    failures.extend(first_diff(
        "normed",
        &bits(gpu, &normed_t),
        &bits(gpu, &normed_u),
    ));
    let left = counter.value(gpu).unwrap();
    if left != 0 {
        failures.push(format!("counter left at {left}"));
    }
    failures
        .into_iter()
        .map(|m| format!("add_norm {what}: {m}"))
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn add_norm_tail_matches_gemv_then_rms_norm_bit_for_bit() {
    let gpu = common::gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut counter = TailCounter::new(&gpu).unwrap();
    let mut failures = Vec::new();
    // (rows n, input width k): the 8B O and down products (rms_norm CTA of 1024 threads),
    // SmolLM2's (576: 160 threads, 4 values each but the last), rows of 584 (160 threads)
    // from inputs of 1544 (not a multiple of 32: the FMA kernels at every token count).
    let shapes = [
        (4096, 4096),
        (4096, 14336),
        (576, 576),
        (576, 1536),
        (584, 1544),
    ];
    let mut cases = 0;
    for (n, k) in shapes {
        for tokens in [1, 2, 3, 8] {
            for bias in [false, true] {
                failures.extend(compare_add_norm::<bf16>(
                    &gpu,
                    &mut rng,
                    &mut counter,
                    (n, k, tokens, bias),
                ));
                cases += 1;
            }
        }
        failures.extend(compare_add_norm::<f16>(
            &gpu,
            &mut rng,
            &mut counter,
            (n, k, 3, false),
        ));
        cases += 1;
    }
    eprintln!("{cases} cases compared");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One Q/K/V product + RoPE + cache write, both ways.
#[derive(Debug, Clone, Copy)]
struct QkvCase {
    dtype: KvCacheDtype,
    hidden: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    tokens: usize,
    interleaved: bool,
    bias: bool,
}

fn compare_qkv<T: Act>(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    counter: &mut TailCounter,
    c: QkvCase,
) -> Vec<String> {
    let s = gpu.stream().clone();
    let (h, d, t) = (c.hidden, c.head_dim, c.tokens);
    let (nq, nkv) = (c.q_heads * d, c.kv_heads * d);
    let n = nq + 2 * nkv;
    let block_size = 16;
    let layout = BlockLayout::new(c.dtype, block_size, c.kv_heads, d).unwrap();
    let num_blocks = t.div_ceil(block_size) + 3;
    let cache_bytes = num_blocks * layout.kv_block_bytes();
    let seed = rng.random::<u64>();
    // Products of about ±3 (k, q) and ±1 (v).
    let a = 3.0 / (h as f32).sqrt();
    let w = uniform::<T>(gpu, n * h, seed, -a, a);
    let x = uniform::<T>(gpu, t * h, seed + 1, -1.0, 1.0);
    let b = uniform::<T>(gpu, n, seed + 2, -0.5, 0.5);
    let bias = c.bias.then_some(&b);
    // Positions: small ones and large ones (sincosf's slow path past ~105,000 rad).
    let positions: Vec<i32> = (0..t)
        .map(|_| {
            if rng.random_bool(0.5) {
                rng.random_range(0..64)
            } else {
                rng.random_range(0..300_000)
            }
        })
        .collect();
    let mut slots: Vec<i64> = (0..(num_blocks * block_size) as i64).collect();
    slots.shuffle(rng);
    slots.truncate(t);
    if t >= 3 {
        slots[1] = -1; // padding: neither path writes it
    }
    // Both caches start as the same garbage: a skipped or stray write shows.
    let init: Vec<u8> = (0..cache_bytes).map(|_| rng.random()).collect();
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 500_000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let inv = s.clone_htod(&inv).unwrap();
    let pos = Indices::new(gpu, &positions).unwrap();
    let slots_d = Indices::new(gpu, &slots).unwrap();
    let rotary = Rotary {
        shape: RopeShape {
            num_q_heads: c.q_heads,
            num_kv_heads: c.kv_heads,
            head_dim: d,
            interleaved: c.interleaved,
        },
        positions: &pos,
        inv_freq: &inv,
    };
    let zeros = |len: usize| s.alloc_zeros::<T>(len).unwrap();

    // Unfused: the product into q, k, v; rope_and_cache.
    let (mut q_u, mut k_u, mut v_u) = (zeros(t * nq), zeros(t * nkv), zeros(t * nkv));
    let (mut kc_u, mut vc_u) = (s.clone_htod(&init).unwrap(), s.clone_htod(&init).unwrap());
    let mut outs = [
        GemvOut {
            out: &mut q_u,
            width: nq,
        },
        GemvOut {
            out: &mut k_u,
            width: nkv,
        },
        GemvOut {
            out: &mut v_u,
            width: nkv,
        },
    ];
    gemv(gpu, &x, &w, h, bias, &mut outs).unwrap();
    let dest = LayerCache {
        layout: &layout,
        k: &mut kc_u,
        v: &mut vc_u,
    };
    rope_and_cache(gpu, &rotary, &mut q_u, &k_u, &v_u, &slots_d, dest).unwrap();

    // Tail.
    let (mut q_t, mut k_t, mut v_t) = (zeros(t * nq), zeros(t * nkv), zeros(t * nkv));
    let (mut kc_t, mut vc_t) = (s.clone_htod(&init).unwrap(), s.clone_htod(&init).unwrap());
    let qkv = QkvRopeCache {
        q: &mut q_t,
        k: &mut k_t,
        v: &mut v_t,
        rotary: &rotary,
        slot_mapping: &slots_d,
        cache: LayerCache {
            layout: &layout,
            k: &mut kc_t,
            v: &mut vc_t,
        },
    };
    gemv_qkv_rope_cache(gpu, &x, &w, h, bias, qkv, counter).unwrap();

    let bytes = |x: &CudaSlice<u8>| s.clone_dtoh(x).unwrap();
    let mut failures = Vec::new();
    failures.extend(first_diff("q", &bits(gpu, &q_t), &bits(gpu, &q_u)));
    failures.extend(first_diff("k buffer", &bits(gpu, &k_t), &bits(gpu, &k_u)));
    failures.extend(first_diff("v buffer", &bits(gpu, &v_t), &bits(gpu, &v_u)));
    failures.extend(first_diff("K cache", &bytes(&kc_t), &bytes(&kc_u)));
    failures.extend(first_diff("V cache", &bytes(&vc_t), &bytes(&vc_u)));
    if bytes(&kc_t) == init {
        failures.push("the K cache was not written".into());
    }
    let left = counter.value(gpu).unwrap();
    if left != 0 {
        failures.push(format!("counter left at {left}"));
    }
    failures
        .into_iter()
        .map(|m| format!("{c:?}: {m}"))
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn qkv_rope_cache_tail_matches_gemv_then_rope_and_cache_bit_for_bit() {
    let gpu = common::gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut counter = TailCounter::new(&gpu).unwrap();
    let mut failures = Vec::new();
    let mut cases = 0;
    // (hidden, q heads, KV heads, head_dim): Llama-3-8B (48 rows a token: one stage of the
    // tail per token), SmolLM2-135M (15 rows of 64), and a hidden size that is not a multiple
    // of 32 (the FMA kernels at every token count).
    let shapes = [(4096, 32, 8, 128), (576, 9, 3, 64), (584, 4, 2, 64)];
    for dtype in KvCacheDtype::ALL {
        for (hidden, q_heads, kv_heads, head_dim) in shapes {
            if BlockLayout::new(dtype, 16, kv_heads, head_dim).is_err() {
                continue; // int4-g128 at head_dim 64
            }
            for tokens in [1, 3, 8] {
                let c = QkvCase {
                    dtype,
                    hidden,
                    q_heads,
                    kv_heads,
                    head_dim,
                    tokens,
                    interleaved: tokens != 3,
                    bias: tokens == 3,
                };
                failures.extend(compare_qkv::<bf16>(&gpu, &mut rng, &mut counter, c));
                cases += 1;
                if tokens == 3 {
                    failures.extend(compare_qkv::<f16>(&gpu, &mut rng, &mut counter, c));
                    cases += 1;
                }
            }
        }
    }
    eprintln!("{cases} cases compared");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tail_products_refuse_bad_arguments_before_launch() {
    let gpu = common::gpu();
    let s = gpu.stream().clone();
    let mut counter = TailCounter::new(&gpu).unwrap();
    let is_bad = |r: kernels_cuda::Result<()>| {
        assert!(matches!(r, Err(KernelError::BadArgument { .. })), "{r:?}");
    };
    // add_norm: 2 tokens, rows of 64 from inputs of 96.
    let (t, n, k) = (2, 64, 96);
    let w = s.alloc_zeros::<bf16>(n * k).unwrap();
    let x = s.alloc_zeros::<bf16>(t * k).unwrap();
    let norm_w = s.alloc_zeros::<bf16>(n).unwrap();
    let mut res = s.alloc_zeros::<f32>(t * n).unwrap();
    let mut out = s.alloc_zeros::<bf16>(t * n).unwrap();
    let mut short = s.alloc_zeros::<bf16>(t * n - 1).unwrap();
    let mut add_norm = |weight: &CudaSlice<bf16>, eps: f32, out: &mut CudaSlice<bf16>| {
        let norm = AddNorm {
            residual: &mut res,
            weight,
            eps,
            out,
        };
        gemv_add_norm(&gpu, &x, &w, k, None, norm, &mut counter)
    };
    add_norm(&norm_w, 1e-5, &mut out).unwrap();
    is_bad(add_norm(&norm_w, 1e-5, &mut short));
    is_bad(add_norm(&norm_w, f32::NAN, &mut out));
    is_bad(add_norm(&w, 1e-5, &mut out)); // a norm weight of n x k values

    // qkv: 3 tokens, 4 q and 2 KV heads of 64, int8 cache of 2 blocks of 16.
    let layout = BlockLayout::new(KvCacheDtype::Int8, 16, 2, 64).unwrap();
    let (t, h, nq, nkv) = (3, 128, 4 * 64, 2 * 64);
    let w = s.alloc_zeros::<bf16>((nq + 2 * nkv) * h).unwrap();
    let x = s.alloc_zeros::<bf16>(t * h).unwrap();
    let inv = s.clone_htod(&[1f32; 32]).unwrap();
    let pos = Indices::new(&gpu, &[0i32, 1, 2]).unwrap();
    let rotary = Rotary {
        shape: RopeShape {
            num_q_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            interleaved: true,
        },
        positions: &pos,
        inv_freq: &inv,
    };
    let mut q = s.alloc_zeros::<bf16>(t * nq).unwrap();
    let mut kb = s.alloc_zeros::<bf16>(t * nkv).unwrap();
    let mut vb = s.alloc_zeros::<bf16>(t * nkv).unwrap();
    let mut kc = s.alloc_zeros::<u8>(2 * layout.kv_block_bytes()).unwrap();
    let mut vc = s.alloc_zeros::<u8>(2 * layout.kv_block_bytes()).unwrap();
    let mut run = |rotary: &Rotary<'_>, slots: &Indices<i64>, q: &mut CudaSlice<bf16>| {
        let qkv = QkvRopeCache {
            q,
            k: &mut kb,
            v: &mut vb,
            rotary,
            slot_mapping: slots,
            cache: LayerCache {
                layout: &layout,
                k: &mut kc,
                v: &mut vc,
            },
        };
        gemv_qkv_rope_cache(&gpu, &x, &w, h, None, qkv, &mut counter)
    };
    let slots = Indices::new(&gpu, &[0i64, -1, 31]).unwrap();
    run(&rotary, &slots, &mut q).unwrap();
    // A slot past the cache's 32; 2 slots for 3 tokens; q of the wrong size; 2 positions.
    is_bad(run(
        &rotary,
        &Indices::new(&gpu, &[0i64, 1, 32]).unwrap(),
        &mut q,
    ));
    is_bad(run(
        &rotary,
        &Indices::new(&gpu, &[0i64, 1]).unwrap(),
        &mut q,
    ));
    let mut short_q = s.alloc_zeros::<bf16>(t * nq - 64).unwrap();
    is_bad(run(&rotary, &slots, &mut short_q));
    let two = Indices::new(&gpu, &[0i32, 1]).unwrap();
    let short_pos = Rotary {
        positions: &two,
        ..rotary
    };
    is_bad(run(&short_pos, &slots, &mut q));
    assert_eq!(counter.value(&gpu).unwrap(), 0);
}

/// The same step's products through `random_act` values (not only uniform): NaN and infinite
/// inputs reach the tails as they reach the unfused kernels.
#[test]
#[ignore = "needs a CUDA GPU"]
fn add_norm_tail_propagates_non_finite_values_like_rms_norm() {
    let gpu = common::gpu();
    let s = gpu.stream().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut counter = TailCounter::new(&gpu).unwrap();
    let (t, n, k) = (3, 576, 576);
    let mut xs = random_act::<bf16>(&mut rng, t * k, 1.0);
    xs[k + 7] = f32::INFINITY; // token 1: an infinite product row, then NaN norms
    let x = s
        .clone_htod(&xs.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
        .unwrap();
    let w = uniform::<bf16>(&gpu, n * k, 11, -0.07, 0.07);
    let norm_w = uniform::<bf16>(&gpu, n, 12, 0.5, 1.5);
    let residual0 = vec![0.25f32; t * n];
    let mut res_u = s.clone_htod(&residual0).unwrap();
    let mut proj = s.alloc_zeros::<bf16>(t * n).unwrap();
    let mut normed_u = s.alloc_zeros::<bf16>(t * n).unwrap();
    let out = GemvOut {
        out: &mut proj,
        width: n,
    };
    gemv(&gpu, &x, &w, k, None, &mut [out]).unwrap();
    rms_norm(&gpu, &mut res_u, Some(&proj), &norm_w, 1e-5, &mut normed_u).unwrap();
    let mut res_t = s.clone_htod(&residual0).unwrap();
    let mut normed_t = s.alloc_zeros::<bf16>(t * n).unwrap();
    let norm = AddNorm {
        residual: &mut res_t,
        weight: &norm_w,
        eps: 1e-5,
        out: &mut normed_t,
    };
    gemv_add_norm(&gpu, &x, &w, k, None, norm, &mut counter).unwrap();
    assert_eq!(f32_bits(&gpu, &res_t), f32_bits(&gpu, &res_u));
    assert_eq!(bits(&gpu, &normed_t), bits(&gpu, &normed_u));
    assert_eq!(counter.value(&gpu).unwrap(), 0);
}
