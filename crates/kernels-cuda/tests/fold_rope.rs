//! `PagedDecoder::run_with_rope` (RoPE and the new token's cache write folded into the
//! tensor-core decode kernel) against `rope_and_cache` then `PagedDecoder::run`, on a GPU.
//!
//! Both paths run the same arithmetic on the same bits (the rotation with cache.cu's own
//! device functions, then the same attention body), so every byte of both caches and every
//! bit of the output must be the same: a difference means a tile read before the new token's
//! K/V were stored, a wrong slot or head, or a differently rotated q. The output is also held
//! to the decode tests' tolerance (1.5e-2 of the separate path's largest value), to say how
//! far apart they are when they differ. The new token's slot starts with an older token's
//! bytes, so a missing or late write shows. Every KV dtype (16-bit of the other activation
//! type runs the split kernel: the fallback), both activation types, head_dim 64 and 128,
//! GQA groups 1 to 8, block sizes 8/16/32, both pair styles, windows, contexts of 1 token to
//! 32K, a padded row (slot -1: nothing written), the host plan (automatic and forced
//! partitions) and device-side partitions (fixed parts, the CUDA-graph mode), each case
//! twice through the same decoders (the in-kernel merge's counters must stay zero).
//!
//! Ignored by default (CI has no GPU): `cargo test --release -p kernels-cuda --test
//! fold_rope -- --include-ignored` on the GPU machine.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use common::{Bits, MaxError, decode_batch, first_diff, gpu, inv_freq, random_act};
use half::{bf16, f16};
use kernels_cuda::cudarc::driver::CudaSlice;
use kernels_cuda::{
    DecodeKernel, DecodeMetadata, Gpu, Indices, KernelError, LayerCache, NewTokens, PagedDecoder,
    RopeShape, Rotary, rope_and_cache,
};
use kv_quant::{BlockLayout, KvCacheDtype};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// How the decoders split a batch.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// The host plan, partitions chosen from the batch.
    Auto,
    /// The host plan with partitions of this many tokens.
    Forced(usize),
    /// This many partitions per sequence, sized on the device (CUDA graphs).
    Fixed(usize),
}

/// One comparison's shapes.
#[derive(Debug, Clone)]
struct Case {
    layout: BlockLayout,
    group: usize,
    interleaved: bool,
    contexts: Vec<usize>,
    window: Option<usize>,
    plan: Plan,
    /// The kernel asked for (a dtype without the tensor-core kernel runs the split one).
    kernel: DecodeKernel,
}

/// Two decoders set up alike for `c`: one for each path.
fn decoders(c: &Case) -> (PagedDecoder, PagedDecoder) {
    let make = || {
        let mut d = PagedDecoder::new();
        d.set_kernel(c.kernel);
        match c.plan {
            Plan::Auto => {}
            Plan::Forced(p) => d.set_partition_size(Some(p)).unwrap(),
            Plan::Fixed(p) => d.set_fixed_parts(Some(p)).unwrap(),
        }
        d
    };
    (make(), make())
}

/// Runs `c` both ways with activations of type `T` through `dec` (separate, fused); returns
/// the differences found and the relative error of the fused output.
fn compare<T: Bits>(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    c: &Case,
    dec: &mut (PagedDecoder, PagedDecoder),
) -> (Vec<String>, f64) {
    let s = gpu.stream().clone();
    let l = &c.layout;
    let (bs, kvh, d) = (l.block_size(), l.num_kv_heads(), l.head_dim());
    let nh = kvh * c.group;
    let n = c.contexts.len();
    // Every position is cached, the new token's included: its slot holds an older token's
    // bytes until one of the paths writes it.
    let (cache, meta) = decode_batch::<T>(gpu, rng, l, &c.contexts, c.window);
    let max_blocks = cache.max_blocks;
    let positions: Vec<i32> = c.contexts.iter().map(|&ctx| ctx as i32 - 1).collect();
    let mut slots: Vec<i64> = c
        .contexts
        .iter()
        .enumerate()
        .map(|(i, &ctx)| {
            let block = cache.tables[i * max_blocks + (ctx - 1) / bs];
            i64::from(block) * bs as i64 + ((ctx - 1) % bs) as i64
        })
        .collect();
    if n > 2 {
        slots[1] = -1; // a padded row: nothing written, both paths attend the old token
    }
    let to_t = |x: Vec<f32>| x.into_iter().map(T::of).collect::<Vec<T>>();
    let q = to_t(random_act::<T>(rng, n * nh * d, 1.0));
    let k = to_t(random_act::<T>(rng, n * kvh * d, 2.0));
    let v = to_t(random_act::<T>(rng, n * kvh * d, 1.0));

    let inv = s.clone_htod(&inv_freq(d)).unwrap();
    let pos = Indices::new(gpu, &positions).unwrap();
    let slots_d = Indices::new(gpu, &slots).unwrap();
    let rotary = Rotary {
        shape: RopeShape {
            num_q_heads: nh,
            num_kv_heads: kvh,
            head_dim: d,
            interleaved: c.interleaved,
        },
        positions: &pos,
        inv_freq: &inv,
    };
    let (k_d, v_d) = (s.clone_htod(&k).unwrap(), s.clone_htod(&v).unwrap());
    let poisoned = || s.clone_htod(&vec![T::NAN; n * nh * d]).unwrap();

    // Separate: rope_and_cache (q rotated in place, K and V into the cache), then run.
    let mut q_a = s.clone_htod(&q).unwrap();
    let (mut kc_a, mut vc_a) = (
        s.clone_htod(&cache.k).unwrap(),
        s.clone_htod(&cache.v).unwrap(),
    );
    let dest = LayerCache {
        layout: l,
        k: &mut kc_a,
        v: &mut vc_a,
    };
    rope_and_cache(gpu, &rotary, &mut q_a, &k_d, &v_d, &slots_d, dest).unwrap();
    let mut out_a: CudaSlice<T> = poisoned();
    let plan_a = dec
        .0
        .run(gpu, &meta, l, nh, &q_a, &kc_a, &vc_a, &mut out_a)
        .unwrap();

    // Fused.
    let mut q_b = s.clone_htod(&q).unwrap();
    let (mut kc_b, mut vc_b) = (
        s.clone_htod(&cache.k).unwrap(),
        s.clone_htod(&cache.v).unwrap(),
    );
    let new = NewTokens {
        rotary,
        k: &k_d,
        v: &v_d,
        slot_mapping: &slots_d,
        cache: LayerCache {
            layout: l,
            k: &mut kc_b,
            v: &mut vc_b,
        },
    };
    let mut out_b: CudaSlice<T> = poisoned();
    let plan_b = dec
        .1
        .run_with_rope(gpu, &meta, nh, &mut q_b, new, &mut out_b)
        .unwrap();

    let mut diffs = Vec::new();
    if plan_a != plan_b {
        diffs.push(format!("plans {plan_a:?} vs {plan_b:?}"));
    }
    let bytes = |x: &CudaSlice<u8>| s.clone_dtoh(x).unwrap();
    diffs.extend(first_diff("K cache", &bytes(&kc_b), &bytes(&kc_a)));
    diffs.extend(first_diff("V cache", &bytes(&vc_b), &bytes(&vc_a)));
    let (got, want) = (s.clone_dtoh(&out_b).unwrap(), s.clone_dtoh(&out_a).unwrap());
    let bits = |x: &[T]| x.iter().map(|&v| v.bits()).collect::<Vec<u16>>();
    diffs.extend(first_diff("output bits", &bits(&got), &bits(&want)));
    let mut err = MaxError::default();
    for (g, w) in got.iter().zip(&want) {
        let (g, w) = (f64::from(g.f32()), f64::from(w.f32()));
        if !g.is_finite() || !w.is_finite() {
            diffs.push(format!(
                "output not finite: fused {g}, separate {w} (unwritten?)"
            ));
            break;
        }
        err.add(g, w);
    }
    if err.relative() > 1.5e-2 {
        diffs.push(format!("output error {:.2e} over 1.5e-2", err.relative()));
    }
    (diffs, err.relative())
}

/// Runs `c` twice through one pair of decoders; the failures, labelled.
fn check<T: Bits>(gpu: &Gpu, rng: &mut ChaCha8Rng, c: &Case) -> Vec<String> {
    let mut dec = decoders(c);
    let ran = dec.0.kernel_for(T::SCALAR, c.layout.dtype());
    let name = format!(
        "{:?} {ran:?} {} d={} kv={} gqa={} bs={} interleaved={} window={:?} {:?} contexts {:?}",
        T::SCALAR,
        c.layout.dtype(),
        c.layout.head_dim(),
        c.layout.num_kv_heads(),
        c.group,
        c.layout.block_size(),
        c.interleaved,
        c.window,
        c.plan,
        c.contexts
    );
    let mut failures = Vec::new();
    for round in 0..2 {
        let (diffs, err) = compare::<T>(gpu, rng, c, &mut dec);
        eprintln!(
            "{name} round {round}: {} (output error {err:.1e})",
            if diffs.is_empty() {
                "same bits"
            } else {
                "DIFFERENT"
            }
        );
        failures.extend(
            diffs
                .into_iter()
                .map(|m| format!("{name} round {round}: {m}")),
        );
    }
    failures
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn run_with_rope_matches_rope_and_cache_then_run_bit_for_bit() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let tc = DecodeKernel::TensorCore;
    let mut failures = Vec::new();
    let mut i = 0usize;
    // bf16 activations: every KV dtype (fp16 KV runs the split kernel: the fallback).
    for dtype in KvCacheDtype::ALL {
        for head_dim in [64, 128] {
            for (kv_heads, group) in [(2, 1), (3, 3), (2, 4), (1, 8)] {
                i += 1;
                let Ok(layout) = BlockLayout::new(dtype, [8, 16, 32][i % 3], kv_heads, head_dim)
                else {
                    continue; // int4-g128 at head_dim 64
                };
                let plan = match i % 4 {
                    0 => Plan::Auto,
                    1 => Plan::Forced(64),
                    2 => Plan::Fixed(3),
                    _ => Plan::Fixed(kernels_cuda::fixed_parts_for(&gpu, 5, kv_heads)),
                };
                let case = Case {
                    layout,
                    group,
                    interleaved: i.is_multiple_of(2),
                    contexts: vec![1, 7, 100 + i, 333, 1025],
                    window: i.is_multiple_of(3).then_some(40 + i % 9),
                    plan,
                    kernel: tc,
                };
                failures.extend(check::<bf16>(&gpu, &mut rng, &case));
            }
        }
    }
    // fp16 activations: fp16, int8 and int4 KV on tensor cores; bf16 KV (split kernel).
    for (dtype, head_dim, window) in [
        ("fp16", 128, None),
        ("int8", 64, Some(77)),
        ("int4-g32", 128, None),
        ("bf16", 64, None),
    ] {
        let case = Case {
            layout: BlockLayout::new(dtype.parse().unwrap(), 16, 2, head_dim).unwrap(),
            group: 4,
            interleaved: false,
            contexts: vec![1, 30, 500, 2049],
            window,
            plan: Plan::Auto,
            kernel: tc,
        };
        failures.extend(check::<f16>(&gpu, &mut rng, &case));
    }
    // Llama-3-8B heads at batch 1: 1K (the step) and 32K contexts (the new token in
    // the last of many partitions), host plan and fixed parts; the split kernel forced.
    for (dtype, context, plan, kernel) in [
        (KvCacheDtype::Bf16, 1024, Plan::Auto, tc),
        (KvCacheDtype::Bf16, 1024, Plan::Fixed(33), tc),
        (KvCacheDtype::Bf16, 32768, Plan::Auto, tc),
        (KvCacheDtype::Int8, 32768, Plan::Fixed(264), tc),
        (KvCacheDtype::Bf16, 1024, Plan::Auto, DecodeKernel::Split),
    ] {
        let case = Case {
            layout: BlockLayout::new(dtype, 16, 8, 128).unwrap(),
            group: 4,
            interleaved: false,
            contexts: vec![context],
            window: None,
            plan,
            kernel,
        };
        failures.extend(check::<bf16>(&gpu, &mut rng, &case));
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn run_with_rope_refuses_bad_arguments_before_any_launch() {
    // Each refusal leaves the caches and the output as they were: nothing was launched (not
    // even the split kernel's rope_and_cache).
    let gpu = gpu();
    let s = gpu.stream().clone();
    for kernel in [DecodeKernel::TensorCore, DecodeKernel::Split] {
        let layout = BlockLayout::new(KvCacheDtype::Int8, 16, 2, 64).unwrap();
        let bb = layout.kv_block_bytes();
        // 3 sequences of 4 query heads over the layout's 2 KV heads, contexts 5, 17, 3 in
        // blocks 0, 1 and 2, 3.
        let meta =
            DecodeMetadata::new(&gpu, &[0, 0, 1, 2, 3, 0], 2, &[5, 17, 3], 16, 4, None).unwrap();
        let (seqs, qh) = (3, 4);
        let inv = s.clone_htod(&inv_freq(64)).unwrap();
        let pos = Indices::new(&gpu, &[4i32, 16, 2]).unwrap();
        let slots = Indices::new(&gpu, &[4i64, 32, 50]).unwrap();
        let shape = RopeShape {
            num_q_heads: qh,
            num_kv_heads: 2,
            head_dim: 64,
            interleaved: true,
        };
        let good = Rotary {
            shape,
            positions: &pos,
            inv_freq: &inv,
        };
        let kv = s.alloc_zeros::<bf16>(seqs * 2 * 64).unwrap();
        let init: Vec<u8> = (0..4 * bb).map(|i| (i % 251) as u8).collect();
        let mut kc = s.clone_htod(&init).unwrap();
        let mut vc = s.clone_htod(&init).unwrap();
        let mut dec = PagedDecoder::new();
        dec.set_kernel(kernel);
        let poison = vec![bf16::NAN; seqs * qh * 64];
        let mut out = s.clone_htod(&poison).unwrap();
        let mut q = s.alloc_zeros::<bf16>(seqs * qh * 64).unwrap();
        let mut short_q = s.alloc_zeros::<bf16>(seqs * qh * 64 - 64).unwrap();
        let past = Indices::new(&gpu, &[4i64, 32, 64]).unwrap();
        let two_slots = Indices::new(&gpu, &[4i64, 32]).unwrap();
        let two_positions = Indices::new(&gpu, &[4i32, 16]).unwrap();
        let eight_heads = RopeShape {
            num_q_heads: 8,
            ..shape
        };
        let mut refuse = |rotary: Rotary<'_>, q: &mut CudaSlice<bf16>, slots: &Indices<i64>| {
            let new = NewTokens {
                rotary,
                k: &kv,
                v: &kv,
                slot_mapping: slots,
                cache: LayerCache {
                    layout: &layout,
                    k: &mut kc,
                    v: &mut vc,
                },
            };
            let r = dec.run_with_rope(&gpu, &meta, qh, q, new, &mut out);
            assert!(
                matches!(r, Err(KernelError::BadArgument { .. })),
                "{kernel:?}: {r:?}"
            );
        };
        // A slot past the cache's 64; two slots for three sequences; q of the wrong size;
        // two positions; a rotary shape of 8 query heads for a launch of 4.
        refuse(good, &mut q, &past);
        refuse(good, &mut q, &two_slots);
        refuse(good, &mut short_q, &slots);
        let positions = &two_positions;
        refuse(Rotary { positions, ..good }, &mut q, &slots);
        let shape = eight_heads;
        refuse(Rotary { shape, ..good }, &mut q, &slots);
        assert_eq!(
            s.clone_dtoh(&kc).unwrap(),
            init,
            "{kernel:?}: K cache written"
        );
        assert_eq!(
            s.clone_dtoh(&vc).unwrap(),
            init,
            "{kernel:?}: V cache written"
        );
        let out_bits: Vec<u16> = s
            .clone_dtoh(&out)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        let poison_bits: Vec<u16> = poison.iter().map(|x| x.to_bits()).collect();
        assert_eq!(out_bits, poison_bits, "{kernel:?}: output written");
        // The good call runs.
        let new = NewTokens {
            rotary: good,
            k: &kv,
            v: &kv,
            slot_mapping: &slots,
            cache: LayerCache {
                layout: &layout,
                k: &mut kc,
                v: &mut vc,
            },
        };
        dec.run_with_rope(&gpu, &meta, qh, &mut q, new, &mut out)
            .unwrap();
    }
}
