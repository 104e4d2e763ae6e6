//! `rope_and_cache` (RoPE and the quantizing cache write in one launch) against `rope`
//! followed by `reshape_and_cache`, on a GPU: the rotated q and every byte of both caches must
//! be bit-identical, the k buffer left as it was. Every KV dtype under both activation types,
//! both pair styles, head_dim 64 and 128, GQA groups 1, 4 and 12 (more query heads than a
//! CTA has query warps) and 5 query heads over 2 KV heads, block sizes 8/16/32, ragged
//! sequences at positions up to 300K (sincosf's slow path), negative (skipped) slots, and
//! zero, huge, infinite and NaN values.
//!
//! Ignored by default (CI has no GPU): `cargo test -p kernels-cuda --test rope_cache --
//! --include-ignored` on the GPU machine; without a device the ignored tests say they skipped.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use common::{Bits, first_diff, inv_freq, random_act};
use half::{bf16, f16};
use kernels_cuda::cudarc::driver::CudaSlice;
use kernels_cuda::{
    Gpu, Indices, KernelError, LayerCache, RopeShape, Rotary, reshape_and_cache, rope,
    rope_and_cache,
};
use kv_quant::{BlockLayout, KvCacheDtype};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The device, or `None` (with a note) on a machine without one.
fn device() -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(KernelError::NoDevice(why)) => {
            eprintln!("skipped: no CUDA device ({why})");
            None
        }
        Err(e) => panic!("the device is there but unusable: {e}"),
    }
}

/// Positions of ragged sequences laid end to end: runs of 1 to 9 consecutive positions, each
/// from a random start below 300,000.
fn ragged_positions(rng: &mut ChaCha8Rng, tokens: usize) -> Vec<i32> {
    let mut p = Vec::with_capacity(tokens);
    while p.len() < tokens {
        let len = rng.random_range(1..=9).min(tokens - p.len());
        let start = if rng.random_bool(0.3) {
            rng.random_range(0..64)
        } else {
            rng.random_range(0..300_000)
        };
        p.extend((0..len as i32).map(|i| start + i));
    }
    p
}

/// One comparison's shapes.
#[derive(Debug, Clone, Copy)]
struct Case {
    dtype: KvCacheDtype,
    head_dim: usize,
    block_size: usize,
    kv_heads: usize,
    q_heads: usize,
    interleaved: bool,
    tokens: usize,
}

/// Runs `c` both ways with activations of type `T`; returns the differences found.
fn compare<T: Bits>(gpu: &Gpu, rng: &mut ChaCha8Rng, c: Case) -> Vec<String> {
    let s = gpu.stream().clone();
    let layout = BlockLayout::new(c.dtype, c.block_size, c.kv_heads, c.head_dim).unwrap();
    let (d, t) = (c.head_dim, c.tokens);
    let (nq, nkv) = (c.q_heads * d, c.kv_heads * d);
    let num_blocks = t.div_ceil(c.block_size) + 2;
    let cache_bytes = num_blocks * layout.kv_block_bytes();

    let mut q = random_act::<T>(rng, t * nq, 2.0);
    let mut k = random_act::<T>(rng, t * nkv, 3.0);
    let mut v = random_act::<T>(rng, t * nkv, 0.5);
    // Edge rows: token 0's K all zero (a zero scale), token 1 one huge K value, token 2
    // infinities and a NaN in K, a NaN in V and an infinity in q.
    k[..nkv].fill(0.0);
    if t > 2 {
        k[nkv] = T::of(60000.0).f32();
        k[2 * nkv + 1] = f32::INFINITY;
        k[2 * nkv + 2] = f32::NEG_INFINITY;
        k[2 * nkv + d / 2] = f32::NAN;
        v[2 * nkv + 3] = f32::NAN;
        q[2 * nq + 5] = f32::INFINITY;
    }
    let to_t = |x: &[f32]| x.iter().map(|&x| T::of(x)).collect::<Vec<T>>();
    let (q, k, v) = (to_t(&q), to_t(&k), to_t(&v));

    let positions = ragged_positions(rng, t);
    let mut slots: Vec<i64> = (0..(num_blocks * c.block_size) as i64).collect();
    slots.shuffle(rng);
    slots.truncate(t);
    for (i, s) in slots.iter_mut().enumerate() {
        if i % 5 == 3 {
            *s = -1; // padding: neither path writes it
        }
    }
    // Both caches start as the same garbage: a skipped or stray write shows.
    let init: Vec<u8> = (0..cache_bytes).map(|_| rng.random()).collect();

    let inv = s.clone_htod(&inv_freq(d)).unwrap();
    let pos = Indices::new(gpu, &positions).unwrap();
    let slots_d = Indices::new(gpu, &slots).unwrap();
    let shape = RopeShape {
        num_q_heads: c.q_heads,
        num_kv_heads: c.kv_heads,
        head_dim: d,
        interleaved: c.interleaved,
    };
    let up = |x: &[T]| s.clone_htod(x).unwrap();
    let cache = || s.clone_htod(&init).unwrap();

    // Separate: rope (q and k in place), then the cache write of the rotated k.
    let (mut q_a, mut k_a, v_a) = (up(&q), up(&k), up(&v));
    let (mut kc_a, mut vc_a): (CudaSlice<u8>, CudaSlice<u8>) = (cache(), cache());
    rope(gpu, shape, &pos, &inv, &mut q_a, &mut k_a).unwrap();
    reshape_and_cache(gpu, &layout, &k_a, &v_a, &slots_d, &mut kc_a, &mut vc_a).unwrap();

    // Fused.
    let (mut q_b, k_b, v_b) = (up(&q), up(&k), up(&v));
    let (mut kc_b, mut vc_b) = (cache(), cache());
    let rotary = Rotary {
        shape,
        positions: &pos,
        inv_freq: &inv,
    };
    let dest = LayerCache {
        layout: &layout,
        k: &mut kc_b,
        v: &mut vc_b,
    };
    rope_and_cache(gpu, &rotary, &mut q_b, &k_b, &v_b, &slots_d, dest).unwrap();

    let bits = |x: &CudaSlice<T>| -> Vec<u16> {
        s.clone_dtoh(x).unwrap().into_iter().map(T::bits).collect()
    };
    let bytes = |x: &CudaSlice<u8>| s.clone_dtoh(x).unwrap();
    let (q_sep, q_fused) = (bits(&q_a), bits(&q_b));
    let q0: Vec<u16> = q.iter().map(|&x| x.bits()).collect();
    let k0: Vec<u16> = k.iter().map(|&x| x.bits()).collect();
    let mut out = Vec::new();
    if positions.iter().any(|&p| p != 0) && q_fused == q0 {
        out.push("q was not rotated".to_string());
    }
    out.extend(first_diff("q", &q_fused, &q_sep));
    out.extend(first_diff(
        "k buffer (must stay unrotated)",
        &bits(&k_b),
        &k0,
    ));
    out.extend(first_diff("K cache", &bytes(&kc_b), &bytes(&kc_a)));
    out.extend(first_diff("V cache", &bytes(&vc_b), &bytes(&vc_a)));
    out.into_iter().map(|m| format!("{c:?}: {m}")).collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_rope_and_cache_matches_rope_then_reshape_and_cache_bit_for_bit() {
    let Some(gpu) = device() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let mut failures = Vec::new();
    let mut cases = 0;
    for dtype in KvCacheDtype::ALL {
        for head_dim in [64, 128] {
            for block_size in [8, 16, 32] {
                // (KV heads, query heads): GQA 1, 4, 12 (loops past 8 query warps), 5 over 2.
                for (kv_heads, q_heads) in [(2, 2), (2, 8), (1, 12), (2, 5)] {
                    if BlockLayout::new(dtype, block_size, kv_heads, head_dim).is_err() {
                        continue; // e.g. int4-g128 at head_dim 64
                    }
                    for interleaved in [false, true] {
                        for tokens in [1, 7, 37] {
                            let c = Case {
                                dtype,
                                head_dim,
                                block_size,
                                kv_heads,
                                q_heads,
                                interleaved,
                                tokens,
                            };
                            failures.extend(compare::<bf16>(&gpu, &mut rng, c));
                            failures.extend(compare::<f16>(&gpu, &mut rng, c));
                            cases += 2;
                        }
                    }
                }
            }
        }
    }
    eprintln!("{cases} cases compared");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_and_cache_refuses_bad_arguments_before_launch() {
    let Some(gpu) = device() else { return };
    let s = gpu.stream().clone();
    let layout = BlockLayout::new(KvCacheDtype::Int8, 16, 2, 64).unwrap();
    let bb = layout.kv_block_bytes();
    let (tokens, qh) = (3, 4);
    let inv = s.clone_htod(&inv_freq(64)).unwrap();
    let pos = Indices::new(&gpu, &[0i32, 1, 2]).unwrap();
    let slots = Indices::new(&gpu, &[0i64, -1, 31]).unwrap();
    let shape = RopeShape {
        num_q_heads: qh,
        num_kv_heads: 2,
        head_dim: 64,
        interleaved: true,
    };
    let mut q = s.alloc_zeros::<bf16>(tokens * qh * 64).unwrap();
    let kv = s.alloc_zeros::<bf16>(tokens * 2 * 64).unwrap();
    let mut kc = s.alloc_zeros::<u8>(2 * bb).unwrap();
    let mut vc = s.alloc_zeros::<u8>(2 * bb).unwrap();
    let mut run = |rotary: Rotary<'_>, q: &mut CudaSlice<bf16>, slots: &Indices<i64>| {
        let dest = LayerCache {
            layout: &layout,
            k: &mut kc,
            v: &mut vc,
        };
        rope_and_cache(&gpu, &rotary, q, &kv, &kv, slots, dest)
    };
    let good = Rotary {
        shape,
        positions: &pos,
        inv_freq: &inv,
    };
    run(good, &mut q, &slots).unwrap();
    let is_bad = |r: kernels_cuda::Result<()>| {
        assert!(matches!(r, Err(KernelError::BadArgument { .. })), "{r:?}");
    };
    // A slot past the cache's 32; q of the wrong size; a negative position; 2 positions for
    // 3 slots; a rotary shape other than the cache's.
    is_bad(run(
        good,
        &mut q,
        &Indices::new(&gpu, &[0i64, 1, 32]).unwrap(),
    ));
    let mut short_q = s.alloc_zeros::<bf16>(tokens * qh * 64 - 64).unwrap();
    is_bad(run(good, &mut short_q, &slots));
    let negative = Indices::new(&gpu, &[0i32, -5, 2]).unwrap();
    let two = Indices::new(&gpu, &[0i32, 1]).unwrap();
    for positions in [&negative, &two] {
        is_bad(run(Rotary { positions, ..good }, &mut q, &slots));
    }
    let other = RopeShape {
        num_kv_heads: 1,
        num_q_heads: 8,
        ..shape
    };
    is_bad(run(
        Rotary {
            shape: other,
            ..good
        },
        &mut q,
        &slots,
    ));
}
