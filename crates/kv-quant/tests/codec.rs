//! Codec properties (error bounds per dtype), edge inputs and bad-input
//! handling of the public entry points.

// Helpers outside `#[test]` fns unwrap too (clippy.toml only exempts tests).
#![allow(clippy::unwrap_used)]

use half::{bf16, f16};
use kv_quant::{
    BlockLayout, Int4GroupSize, KvCacheDtype, KvQuantError, axpy_v, decode_head, decode_slots,
    dot_k, encode_token,
};
use proptest::prelude::*;

const INT4_G32: KvCacheDtype = KvCacheDtype::Int4 {
    group_size: Int4GroupSize::G32,
};
const INT4_HEAD: KvCacheDtype = KvCacheDtype::Int4 {
    group_size: Int4GroupSize::HeadDim,
};
const QUANTIZED: [KvCacheDtype; 7] = [
    KvCacheDtype::Int8,
    INT4_HEAD,
    INT4_G32,
    KvCacheDtype::Int4 {
        group_size: Int4GroupSize::G64,
    },
    KvCacheDtype::Int4 {
        group_size: Int4GroupSize::G128,
    },
    KvCacheDtype::Fp8E4m3,
    KvCacheDtype::Fp8E5m2,
];

// ---------------------------------------------------------------------------
// Helpers.

fn layout(dtype: KvCacheDtype, bs: usize, h: usize, d: usize) -> BlockLayout {
    BlockLayout::new(dtype, bs, h, d).unwrap()
}

/// Encodes `x` into `slot` of a zeroed block; returns the block and the
/// decoded slot.
fn round_trip(l: &BlockLayout, slot: usize, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut block = vec![0u8; l.kv_block_bytes()];
    encode_token(l, &mut block, slot, x).unwrap();
    let mut out = vec![f32::NAN; l.values_per_token()];
    decode_slots(l, &block, slot..slot + 1, &mut out).unwrap();
    (block, out)
}

/// The f32 scale of `(head, slot)` (int8, fp8).
fn scale_of(l: &BlockLayout, block: &[u8], head: usize, slot: usize) -> f32 {
    let o = l.scale_offset(head, slot).unwrap();
    f32::from_le_bytes(block[o..o + 4].try_into().unwrap())
}

/// The `(scale, min)` pairs of `(head, slot)` (int4).
fn int4_params(l: &BlockLayout, block: &[u8], head: usize, slot: usize) -> Vec<(f32, f32)> {
    let o = l.scale_offset(head, slot).unwrap();
    block[o..o + l.scale_row_bytes()]
        .chunks_exact(4)
        .map(|p| {
            (
                f16::from_le_bytes([p[0], p[1]]).to_f32(),
                f16::from_le_bytes([p[2], p[3]]).to_f32(),
            )
        })
        .collect()
}

/// The "group" each channel's scale covers: G for int4, head_dim otherwise.
fn group_of(l: &BlockLayout) -> usize {
    l.group_size().unwrap_or(l.head_dim())
}

/// Finite values with magnitudes spread over 2^-20 .. 2^max_exp.
fn wide_value(max_exp: i32) -> impl Strategy<Value = f32> + Clone {
    (-1.0f32..1.0, -20i32..max_exp).prop_map(|(m, e)| m * 2f32.powi(e))
}

/// `(block_size, num_kv_heads, head_dim, slot, x)`.
fn token_case(
    head_dims: &'static [usize],
    value: impl Strategy<Value = f32> + Clone + 'static,
) -> impl Strategy<Value = (usize, usize, usize, usize, Vec<f32>)> {
    (1usize..=4, 1usize..=3, prop::sample::select(head_dims)).prop_flat_map(move |(bs, h, d)| {
        (
            Just(bs),
            Just(h),
            Just(d),
            0..bs,
            prop::collection::vec(value.clone(), h * d),
        )
    })
}

/// Checks the documented bound for every finite input value (and the
/// documented treatment of non-finite ones) of one encoded token.
fn check_bounds(l: &BlockLayout, block: &[u8], slot: usize, x: &[f32], x_hat: &[f32]) {
    let d = l.head_dim();
    let g = group_of(l);
    for (head, (xh, yh)) in x.chunks_exact(d).zip(x_hat.chunks_exact(d)).enumerate() {
        assert!(yh.iter().all(|y| y.is_finite()), "non-finite decode {yh:?}");
        match l.dtype() {
            KvCacheDtype::Int8 | KvCacheDtype::Fp8E4m3 | KvCacheDtype::Fp8E5m2 => {
                let s = scale_of(l, block, head, slot);
                assert!(s.is_finite() && s >= 0.0, "scale {s}");
                let absmax = xh
                    .iter()
                    .filter(|v| v.is_finite())
                    .fold(0.0f32, |m, v| m.max(v.abs()));
                let (qmax, min_normal, rel, sub_abs) = match l.dtype() {
                    KvCacheDtype::Int8 => (127.0, 0.0, 0.0, 0.0),
                    KvCacheDtype::Fp8E4m3 => (448.0, 2f32.powi(-6), 2f32.powi(-4), 2f32.powi(-10)),
                    _ => (57344.0, 2f32.powi(-14), 2f32.powi(-3), 2f32.powi(-17)),
                };
                // The scale maps the finite absmax to the top code (no wasted range).
                assert!(s * qmax * (1.0 + 1e-6) >= absmax, "{s} {absmax}");
                assert!(s <= absmax / qmax * (1.0 + 1e-6) + 1e-44, "{s} {absmax}");
                for (&v, &y) in xh.iter().zip(yh) {
                    let err = (v - y).abs();
                    if v.is_nan() {
                        assert_eq!(y, 0.0);
                    } else if v.is_infinite() {
                        assert!(y.signum() == v.signum() || s == 0.0);
                        assert!((y.abs() - qmax * s).abs() <= qmax * s * 1e-6, "{v} -> {y}");
                    } else if l.dtype() == KvCacheDtype::Int8 {
                        assert!(
                            err <= s * (0.5 + 2e-5) + 1e-44,
                            "int8 {v} -> {y}, scale {s}"
                        );
                    } else if v.abs() >= min_normal * s {
                        // (+1e-44: f32-subnormal scales round the product.)
                        assert!(
                            err <= rel * v.abs() * (1.0 + 1e-5) + 1e-44,
                            "fp8 {v} -> {y} (s {s})"
                        );
                    } else {
                        assert!(err <= sub_abs * s * (1.0 + 1e-5) + 1e-44, "fp8 {v} -> {y}");
                    }
                }
            }
            KvCacheDtype::Int4 { .. } => {
                let params = int4_params(l, block, head, slot);
                assert_eq!(params.len(), d / g);
                for ((xg, yg), &(s, m)) in xh.chunks_exact(g).zip(yh.chunks_exact(g)).zip(&params) {
                    assert!(s.is_finite() && s >= 0.0 && m.is_finite(), "({s}, {m})");
                    let finite: Vec<f32> = xg
                        .iter()
                        .copied()
                        .filter(|v| v.is_finite())
                        .map(|v| v.clamp(-65504.0, 65504.0))
                        .collect();
                    let top = m + 15.0 * s;
                    if let (Some(lo), Some(hi)) = (
                        finite.iter().copied().reduce(f32::min),
                        finite.iter().copied().reduce(f32::max),
                    ) {
                        // The grid covers the group and is no coarser than needed.
                        assert!(m <= lo && f64::from(m) + 15.0 * f64::from(s) >= f64::from(hi));
                        let ulp_lo = (lo.abs() * 2f32.powi(-10)).max(2f32.powi(-24));
                        let s_max =
                            (hi - lo + ulp_lo) / 15.0 * (1.0 + 2f32.powi(-10)) + 2f32.powi(-24);
                        assert!(
                            s <= s_max * (1.0 + 1e-6),
                            "step {s} > {s_max} for [{lo}, {hi}]"
                        );
                    } else {
                        assert_eq!((s, m), (0.0, 0.0));
                    }
                    let eps = (m.abs() + 15.0 * s) * 2e-6 + 1e-30;
                    for (&v, &y) in xg.iter().zip(yg) {
                        let target = if v.is_nan() {
                            0.0f32.clamp(m, top.max(m))
                        } else if v == f32::INFINITY {
                            top
                        } else if v == f32::NEG_INFINITY {
                            m
                        } else {
                            v.clamp(-65504.0, 65504.0)
                        };
                        let bound = if v.is_infinite() { eps } else { s * 0.5 + eps };
                        assert!(
                            (target - y).abs() <= bound,
                            "int4 {v} -> {y}: (scale {s}, min {m})"
                        );
                    }
                }
            }
            KvCacheDtype::Fp16 | KvCacheDtype::Bf16 => unreachable!(),
        }
    }
}

// ---------------------------------------------------------------------------
// Error-bound properties.

proptest! {
    #[test]
    fn int8_error_is_at_most_half_a_step(
        (bs, h, d, slot, x) in token_case(&[1, 7, 32, 64, 80], wide_value(30))
    ) {
        let l = layout(KvCacheDtype::Int8, bs, h, d);
        let (block, x_hat) = round_trip(&l, slot, &x);
        check_bounds(&l, &block, slot, &x, &x_hat);
    }

    #[test]
    fn int4_error_is_at_most_half_a_step_per_group(
        (bs, h, d, slot, x) in token_case(&[2, 32, 64, 128, 256], wide_value(16)),
        group in prop::sample::select(vec![
            Int4GroupSize::HeadDim, Int4GroupSize::G32, Int4GroupSize::G64, Int4GroupSize::G128,
        ]),
    ) {
        let dtype = KvCacheDtype::Int4 { group_size: group };
        let Ok(l) = BlockLayout::new(dtype, bs, h, d) else {
            prop_assume!(false);
            unreachable!()
        };
        let (block, x_hat) = round_trip(&l, slot, &x);
        check_bounds(&l, &block, slot, &x, &x_hat);
    }

    #[test]
    fn int4_error_bound_on_offset_groups(
        (bs, h, d, slot, x) in token_case(&[32, 64], 100.0f32..101.0),
    ) {
        // Narrow groups far from zero: the asymmetric format's case.
        let l = layout(INT4_G32, bs, h, d);
        let (block, x_hat) = round_trip(&l, slot, &x);
        check_bounds(&l, &block, slot, &x, &x_hat);
        for (a, b) in x.iter().zip(&x_hat) {
            prop_assert!((a - b).abs() <= 1.0 / 30.0 + 0.01, "{a} -> {b}");
        }
    }

    #[test]
    fn fp8_relative_error_within_format_bound(
        (bs, h, d, slot, x) in token_case(&[1, 16, 64, 128], wide_value(60)),
        e5m2 in any::<bool>(),
    ) {
        let dtype = if e5m2 { KvCacheDtype::Fp8E5m2 } else { KvCacheDtype::Fp8E4m3 };
        let l = layout(dtype, bs, h, d);
        let (block, x_hat) = round_trip(&l, slot, &x);
        check_bounds(&l, &block, slot, &x, &x_hat);
    }

    #[test]
    fn quantized_dtypes_survive_arbitrary_bits(
        (bs, h, d, slot, bits) in token_case(&[64, 128], any::<u32>().prop_map(f32::from_bits)),
        dtype in prop::sample::select(QUANTIZED.to_vec()),
    ) {
        // NaN, ±inf, subnormals and f32::MAX-sized values: never a NaN scale,
        // finite decodes, bounds hold for the finite values.
        let Ok(l) = BlockLayout::new(dtype, bs, h, d) else {
            prop_assume!(false);
            unreachable!()
        };
        let (block, x_hat) = round_trip(&l, slot, &bits);
        check_bounds(&l, &block, slot, &bits, &x_hat);
    }

    #[test]
    fn fp16_round_trip_is_exact(
        (bs, h, d, slot, raw) in token_case(&[1, 5, 64, 128], any::<u16>().prop_map(f32::from)),
    ) {
        // `raw` are u16 bit patterns carried in f32; reinterpret as f16/bf16.
        for bf in [false, true] {
            let dtype = if bf { KvCacheDtype::Bf16 } else { KvCacheDtype::Fp16 };
            let x: Vec<f32> = raw
                .iter()
                .map(|&b| {
                    let b = b as u16;
                    if bf { bf16::from_bits(b).to_f32() } else { f16::from_bits(b).to_f32() }
                })
                .collect();
            let l = layout(dtype, bs, h, d);
            let (_, x_hat) = round_trip(&l, slot, &x);
            for (a, b) in x.iter().zip(&x_hat) {
                prop_assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{dtype}: {a} -> {b}");
            }
        }
    }

    #[test]
    fn fp16_rounds_to_nearest(
        (bs, h, d, slot, x) in token_case(&[3, 64], any::<u32>().prop_map(f32::from_bits)),
    ) {
        for dtype in [KvCacheDtype::Fp16, KvCacheDtype::Bf16] {
            let l = layout(dtype, bs, h, d);
            let (_, x_hat) = round_trip(&l, slot, &x);
            for (&a, &b) in x.iter().zip(&x_hat) {
                let want = if dtype == KvCacheDtype::Fp16 {
                    f16::from_f32(a).to_f32()
                } else {
                    bf16::from_f32(a).to_f32()
                };
                prop_assert!(want.to_bits() == b.to_bits() || (want.is_nan() && b.is_nan()));
            }
        }
    }

    #[test]
    fn fused_helpers_match_decode(
        (bs, h, d, slot, x) in token_case(&[2, 10, 32, 64, 96, 128], wide_value(10)),
        q_seed in prop::collection::vec(-2.0f32..2.0, 128),
        weight in -3.0f32..3.0,
        dtype in prop::sample::select(KvCacheDtype::ALL.to_vec()),
    ) {
        let Ok(l) = BlockLayout::new(dtype, bs, h, d) else {
            prop_assume!(false);
            unreachable!()
        };
        let (block, x_hat) = round_trip(&l, slot, &x);
        let q = &q_seed[..d];
        let g = group_of(&l);
        for head in 0..h {
            let row = &x_hat[head * d..(head + 1) * d];
            // Magnitude of the terms the fused formula adds (int4: scale·Σqc and min·Σq).
            let offsets: Vec<f32> = if l.group_size().is_some() {
                int4_params(&l, &block, head, slot)
                    .iter()
                    .flat_map(|&(s, m)| std::iter::repeat_n(m.abs() + 15.0 * s, g))
                    .collect()
            } else {
                vec![0.0; d]
            };
            let exact: f64 = q.iter().zip(row).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            let mag: f64 = q
                .iter()
                .zip(row)
                .zip(&offsets)
                .map(|((&a, &b), &o)| f64::from(a.abs()) * f64::from(b.abs() + o))
                .sum();
            let got = dot_k(&l, &block, slot, head, q).unwrap();
            prop_assert!(
                (f64::from(got) - exact).abs() <= 1e-5 * mag + 1e-30,
                "{dtype}: dot {got} vs {exact}"
            );

            let mut acc: Vec<f32> = q.iter().map(|v| v * 0.5).collect();
            let before = acc.clone();
            axpy_v(&l, &block, slot, head, weight, &mut acc).unwrap();
            for i in 0..d {
                let want = f64::from(before[i]) + f64::from(weight) * f64::from(row[i]);
                let tol = 1e-6 * (f64::from(before[i].abs()) + f64::from(weight.abs()) * f64::from(row[i].abs() + offsets[i])) + 1e-30;
                prop_assert!((f64::from(acc[i]) - want).abs() <= tol, "{dtype}: axpy {} vs {want}", acc[i]);
            }
        }
    }

    #[test]
    fn encode_touches_only_its_slot(
        (bs, h, d, slot, x) in token_case(&[2, 32, 64], wide_value(5)),
        dtype in prop::sample::select(KvCacheDtype::ALL.to_vec()),
    ) {
        let Ok(l) = BlockLayout::new(dtype, bs, h, d) else {
            prop_assume!(false);
            unreachable!()
        };
        let mut block = vec![0xA5u8; l.kv_block_bytes()];
        let before = block.clone();
        encode_token(&l, &mut block, slot, &x).unwrap();
        let mut owned = vec![false; block.len()];
        for head in 0..h {
            let v = l.value_offset(head, slot).unwrap();
            owned[v..v + l.value_row_bytes()].iter_mut().for_each(|o| *o = true);
            let s = l.scale_offset(head, slot).unwrap();
            owned[s..s + l.scale_row_bytes()].iter_mut().for_each(|o| *o = true);
        }
        for (i, ((a, b), own)) in block.iter().zip(&before).zip(&owned).enumerate() {
            if !own {
                prop_assert_eq!(a, b, "byte {} outside slot {} changed", i, slot);
            }
        }
        // Re-encoding over garbage gives the same bytes as into a fresh block.
        let mut fresh = vec![0u8; l.kv_block_bytes()];
        encode_token(&l, &mut fresh, slot, &x).unwrap();
        for (i, own) in owned.iter().enumerate() {
            if *own {
                prop_assert_eq!(block[i], fresh[i]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Edge inputs.

#[test]
fn all_zero_tokens_and_groups_decode_exactly_to_zero() {
    for dtype in KvCacheDtype::ALL {
        let l = layout(dtype, 4, 2, 128);
        let (block, x_hat) = round_trip(&l, 1, &vec![0.0; 256]);
        assert!(block.iter().all(|&b| b == 0), "{dtype}: non-zero bytes");
        assert!(
            x_hat.iter().all(|&v| v == 0.0 && v.is_sign_positive()),
            "{dtype}"
        );
    }
    // One zero group in an otherwise non-zero int4 head.
    let l = layout(INT4_G32, 1, 1, 64);
    let x: Vec<f32> = (0..64)
        .map(|i| if i < 32 { 0.0 } else { i as f32 })
        .collect();
    let (block, x_hat) = round_trip(&l, 0, &x);
    assert_eq!(int4_params(&l, &block, 0, 0)[0], (0.0, 0.0));
    assert!(x_hat[..32].iter().all(|&v| v == 0.0));
    check_bounds(&l, &block, 0, &x, &x_hat);
}

#[test]
fn constant_groups() {
    for dtype in QUANTIZED {
        let Ok(l) = BlockLayout::new(dtype, 2, 1, 64) else {
            continue;
        };
        for c in [1.0f32, -3.5, 0.25, 0.1] {
            let (_, x_hat) = round_trip(&l, 1, &[c; 64]);
            let is_int4 = l.group_size().is_some();
            for &v in &x_hat {
                if is_int4 && f16::from_f32(c).to_f32() == c {
                    // f16-representable constant: min = c, scale = 0, exact.
                    assert_eq!(v, c, "{dtype}");
                } else {
                    assert!((v - c).abs() <= c.abs() * 1e-3, "{dtype} {c}: {v}");
                }
            }
        }
    }
}

#[test]
fn one_huge_outlier() {
    let mut x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.1).sin()).collect();
    for outlier in [1e4f32, -3e6, 1e30, f32::MAX] {
        x[17] = outlier;
        for dtype in QUANTIZED {
            let Ok(l) = BlockLayout::new(dtype, 1, 1, 64) else {
                continue;
            };
            let (block, x_hat) = round_trip(&l, 0, &x);
            check_bounds(&l, &block, 0, &x, &x_hat);
            let y = x_hat[17];
            assert!(
                y.is_finite() && y.signum() == outlier.signum(),
                "{dtype}: {y}"
            );
            if matches!(dtype, KvCacheDtype::Int4 { .. }) && outlier.abs() > 65504.0 {
                assert!(
                    y.abs() >= 65504.0 * 0.99,
                    "{dtype}: int4 saturates, got {y}"
                );
            } else {
                assert!((y - outlier).abs() <= outlier.abs() * 0.125, "{dtype}: {y}");
            }
        }
    }
}

#[test]
fn nan_and_infinities_documented_behaviour() {
    let mut x: Vec<f32> = (0..32).map(|i| i as f32 / 16.0 - 1.0).collect(); // [-1, 0.9375]
    x[0] = f32::NAN;
    x[1] = f32::INFINITY;
    x[2] = f32::NEG_INFINITY;
    x[3] = -1.0;
    // fp16 / bf16: stored as is.
    for dtype in [KvCacheDtype::Fp16, KvCacheDtype::Bf16] {
        let (_, y) = round_trip(&layout(dtype, 1, 1, 32), 0, &x);
        assert!(y[0].is_nan());
        assert_eq!((y[1], y[2]), (f32::INFINITY, f32::NEG_INFINITY), "{dtype}");
        assert_eq!(y[3], -1.0);
    }
    // fp16 overflows to inf like an fp16 model; bf16 keeps the range.
    let (_, y) = round_trip(&layout(KvCacheDtype::Fp16, 1, 1, 1), 0, &[1e6]);
    assert_eq!(y[0], f32::INFINITY);
    let (_, y) = round_trip(&layout(KvCacheDtype::Bf16, 1, 1, 1), 0, &[1e6]);
    assert!((y[0] - 1e6).abs() < 1e4);
    // Quantized: scale from the finite values (absmax 1), inf saturates,
    // NaN encodes as 0.
    for dtype in [
        KvCacheDtype::Int8,
        KvCacheDtype::Fp8E4m3,
        KvCacheDtype::Fp8E5m2,
    ] {
        let l = layout(dtype, 1, 1, 32);
        let (block, y) = round_trip(&l, 0, &x);
        let s = scale_of(&l, &block, 0, 0);
        let qmax = match dtype {
            KvCacheDtype::Int8 => 127.0,
            KvCacheDtype::Fp8E4m3 => 448.0,
            _ => 57344.0,
        };
        assert!((s * qmax - 1.0).abs() <= 1e-6, "{dtype}: scale {s}");
        assert_eq!(y[0], 0.0, "{dtype}: NaN -> 0");
        for (got, want) in [(y[1], 1.0), (y[2], -1.0), (y[3], -1.0)] {
            assert!((got - want).abs() <= 1e-6, "{dtype}: {got} vs {want}");
        }
    }
    let l = layout(INT4_G32, 1, 1, 32);
    let (block, y) = round_trip(&l, 0, &x);
    let (s, m) = int4_params(&l, &block, 0, 0)[0];
    assert_eq!(m, -1.0);
    assert!(s >= 1.9375 / 15.0);
    assert_eq!(y[1], m + 15.0 * s);
    assert_eq!(y[2], m);
    assert!(
        y[0].abs() <= s / 2.0,
        "NaN -> value nearest 0, got {}",
        y[0]
    );
    check_bounds(&l, &block, 0, &x, &y);
    // No finite value at all: zero scale, zero decode; never NaN.
    let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    for dtype in QUANTIZED {
        let Ok(l) = BlockLayout::new(dtype, 1, 1, 4) else {
            continue;
        };
        let (block, y) = round_trip(&l, 0, &bad);
        assert!(block.iter().all(|&b| b == 0), "{dtype}");
        assert!(y.iter().all(|&v| v == 0.0), "{dtype}: {y:?}");
    }
}

#[test]
fn subnormal_inputs() {
    let x: Vec<f32> = (0..64)
        .map(|i| f32::from_bits(1 + i * 12_345) * if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    assert!(x.iter().all(|v| v.is_subnormal()));
    for dtype in KvCacheDtype::ALL {
        let Ok(l) = BlockLayout::new(dtype, 2, 1, 64) else {
            continue;
        };
        let (block, y) = round_trip(&l, 1, &x);
        assert!(y.iter().all(|v| v.is_finite()), "{dtype}");
        if dtype.is_quantized() {
            check_bounds(&l, &block, 1, &x, &y);
            if dtype == KvCacheDtype::Int8 || dtype == KvCacheDtype::Fp8E4m3 {
                // f32 scales keep subnormal tokens (roughly) intact.
                let worst = x
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(worst <= absmax * 0.07, "{dtype}: {worst} vs {absmax}");
            }
        } else {
            // Below f16/bf16 resolution: rounds like the `half` crate does.
            for (a, b) in x.iter().zip(&y) {
                let want = if dtype == KvCacheDtype::Fp16 {
                    f16::from_f32(*a).to_f32()
                } else {
                    bf16::from_f32(*a).to_f32()
                };
                assert_eq!(want.to_bits(), b.to_bits());
            }
        }
    }
}

#[test]
fn decode_slots_layout_is_slot_head_dim() {
    let l = layout(KvCacheDtype::Fp16, 4, 2, 3);
    let mut block = vec![0u8; l.kv_block_bytes()];
    for slot in 0..4 {
        let x: Vec<f32> = (0..6).map(|i| (slot * 10 + i) as f32).collect();
        encode_token(&l, &mut block, slot, &x).unwrap();
    }
    let mut out = vec![0.0; 2 * 6];
    decode_slots(&l, &block, 1..3, &mut out).unwrap();
    let want: Vec<f32> = (0..12)
        .map(|i| (10 + (i / 6) * 10 + i % 6) as f32)
        .collect();
    assert_eq!(out, want);
    // Head-major storage: head 1 of slot 0 sits after all slots of head 0.
    let v = l.value_offset(1, 0).unwrap();
    assert_eq!(v, 4 * 3 * 2);
    assert_eq!(f16::from_le_bytes([block[v], block[v + 1]]).to_f32(), 3.0);
    // Empty range.
    decode_slots(&l, &block, 2..2, &mut []).unwrap();
}

#[test]
fn decode_head_is_one_head_of_decode_slots_for_every_dtype() {
    for dtype in [
        KvCacheDtype::Fp16,
        KvCacheDtype::Bf16,
        KvCacheDtype::Int8,
        INT4_HEAD,
        KvCacheDtype::Fp8E4m3,
        KvCacheDtype::Fp8E5m2,
    ] {
        let l = layout(dtype, 8, 3, 32);
        let mut block = vec![0u8; l.kv_block_bytes()];
        for slot in 0..8 {
            let x: Vec<f32> = (0..96)
                .map(|i| ((slot * 131 + i * 17) % 53) as f32 / 7.0 - 3.0)
                .collect();
            encode_token(&l, &mut block, slot, &x).unwrap();
        }
        let mut all = vec![0.0; 5 * 96];
        decode_slots(&l, &block, 2..7, &mut all).unwrap();
        for head in 0..3 {
            let mut one = vec![f32::NAN; 5 * 32];
            decode_head(&l, &block, head, 2..7, &mut one).unwrap();
            for (s, row) in one.chunks_exact(32).enumerate() {
                let want = &all[s * 96 + head * 32..s * 96 + (head + 1) * 32];
                assert_eq!(
                    row.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{dtype} head {head} slot {}",
                    s + 2
                );
            }
        }
        decode_head(&l, &block, 2, 8..8, &mut []).unwrap();
    }
}

#[test]
fn int4_packing_low_nibble_is_even_channel() {
    let l = layout(INT4_HEAD, 1, 1, 4);
    let (block, _) = round_trip(&l, 0, &[0.0, 15.0, 1.0, 14.0]);
    // scale 1, min 0: codes equal values.
    assert_eq!(int4_params(&l, &block, 0, 0), vec![(1.0, 0.0)]);
    assert_eq!(&block[..2], &[0xF0, 0xE1]);
    let (s, m) = (f16::from_f32(1.0).to_le_bytes(), f16::ZERO.to_le_bytes());
    let so = l.scale_section_offset();
    assert_eq!(&block[so..so + 4], &[s[0], s[1], m[0], m[1]]);
}

#[test]
fn precision_tiering_requantizes_a_block() {
    // An fp16 block re-quantized to int4-g32 through decode + encode: the
    // per-block dtype tag is all that changes in the block table.
    let hot = layout(KvCacheDtype::Fp16, 16, 2, 64);
    let cold = layout(INT4_G32, 16, 2, 64);
    assert_eq!(cold.block_size(), hot.block_size());
    let mut hot_block = vec![0u8; hot.kv_block_bytes()];
    let x: Vec<f32> = (0..16 * 128)
        .map(|i| ((i * 7) % 23) as f32 - 11.0)
        .collect();
    for (slot, xs) in x.chunks_exact(128).enumerate() {
        encode_token(&hot, &mut hot_block, slot, xs).unwrap();
    }
    let mut cold_block = vec![0u8; cold.kv_block_bytes()];
    let mut buf = vec![0.0; 16 * 128];
    decode_slots(&hot, &hot_block, 0..16, &mut buf).unwrap();
    for (slot, xs) in buf.chunks_exact(128).enumerate() {
        encode_token(&cold, &mut cold_block, slot, xs).unwrap();
    }
    let tag = cold.dtype().tag();
    assert_eq!(KvCacheDtype::from_tag(tag).unwrap(), INT4_G32);
    let mut back = vec![0.0; 16 * 128];
    decode_slots(&cold, &cold_block, 0..16, &mut back).unwrap();
    for (a, b) in x.iter().zip(&back) {
        assert!((a - b).abs() <= 22.0 / 30.0 + 1e-3, "{a} -> {b}");
    }
    assert!(cold.kv_block_bytes() * 3 < hot.kv_block_bytes());
}

// ---------------------------------------------------------------------------
// Bad input: every entry point returns an error, never panics.

fn bad_setup() -> (BlockLayout, Vec<u8>) {
    let l = layout(KvCacheDtype::Int8, 4, 2, 8);
    let block = vec![0u8; l.kv_block_bytes()];
    (l, block)
}

#[test]
fn encode_token_rejects_bad_input() {
    let (l, mut block) = bad_setup();
    let x = vec![1.0; 16];
    let n = l.kv_block_bytes();
    assert_eq!(
        encode_token(&l, &mut block[..n - 1], 0, &x),
        Err(KvQuantError::LengthMismatch {
            what: "block",
            expected: n,
            got: n - 1
        })
    );
    let mut longer = vec![0u8; n + 16];
    assert!(matches!(
        encode_token(&l, &mut longer, 0, &x),
        Err(KvQuantError::LengthMismatch { what: "block", .. })
    ));
    assert_eq!(
        encode_token(&l, &mut block, 4, &x),
        Err(KvQuantError::SlotOutOfRange {
            slot: 4,
            block_size: 4
        })
    );
    assert_eq!(
        encode_token(&l, &mut block, 0, &x[..15]),
        Err(KvQuantError::LengthMismatch {
            what: "x",
            expected: 16,
            got: 15
        })
    );
    assert_eq!(
        encode_token(&l, &mut block, 0, &[]),
        Err(KvQuantError::LengthMismatch {
            what: "x",
            expected: 16,
            got: 0
        })
    );
    assert!(
        block.iter().all(|&b| b == 0),
        "a rejected call must not write"
    );
}

#[test]
fn decode_slots_rejects_bad_input() {
    let (l, block) = bad_setup();
    let mut out = vec![0.0; 16];
    assert!(matches!(
        decode_slots(&l, &block[1..], 0..1, &mut out),
        Err(KvQuantError::LengthMismatch { what: "block", .. })
    ));
    assert_eq!(
        decode_slots(&l, &block, 3..5, &mut out),
        Err(KvQuantError::SlotRangeOutOfRange {
            start: 3,
            end: 5,
            block_size: 4
        })
    );
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 3..1;
    assert_eq!(
        decode_slots(&l, &block, reversed, &mut out),
        Err(KvQuantError::SlotRangeOutOfRange {
            start: 3,
            end: 1,
            block_size: 4
        })
    );
    assert_eq!(
        decode_slots(&l, &block, 0..2, &mut out),
        Err(KvQuantError::LengthMismatch {
            what: "out",
            expected: 32,
            got: 16
        })
    );
    assert_eq!(
        decode_slots(&l, &block, usize::MAX - 1..usize::MAX, &mut out),
        Err(KvQuantError::SlotRangeOutOfRange {
            start: usize::MAX - 1,
            end: usize::MAX,
            block_size: 4
        })
    );
}

#[test]
fn decode_head_rejects_bad_input() {
    let (l, block) = bad_setup();
    let mut out = vec![0.0; 8];
    assert!(matches!(
        decode_head(&l, &block[1..], 0, 0..1, &mut out),
        Err(KvQuantError::LengthMismatch { what: "block", .. })
    ));
    assert_eq!(
        decode_head(&l, &block, 2, 0..1, &mut out),
        Err(KvQuantError::HeadOutOfRange {
            head: 2,
            num_kv_heads: 2
        })
    );
    assert_eq!(
        decode_head(&l, &block, 0, 3..5, &mut out),
        Err(KvQuantError::SlotRangeOutOfRange {
            start: 3,
            end: 5,
            block_size: 4
        })
    );
    assert_eq!(
        decode_head(&l, &block, 0, 0..2, &mut out),
        Err(KvQuantError::LengthMismatch {
            what: "out",
            expected: 16,
            got: 8
        })
    );
    assert_eq!(
        decode_head(&l, &block, 0, usize::MAX - 1..usize::MAX, &mut out),
        Err(KvQuantError::SlotRangeOutOfRange {
            start: usize::MAX - 1,
            end: usize::MAX,
            block_size: 4
        })
    );
}

#[test]
fn dot_k_rejects_bad_input() {
    let (l, block) = bad_setup();
    let q = vec![1.0; 8];
    assert!(matches!(
        dot_k(&l, &block[..10], 0, 0, &q),
        Err(KvQuantError::LengthMismatch { what: "block", .. })
    ));
    assert_eq!(
        dot_k(&l, &block, 4, 0, &q),
        Err(KvQuantError::SlotOutOfRange {
            slot: 4,
            block_size: 4
        })
    );
    assert_eq!(
        dot_k(&l, &block, 0, 2, &q),
        Err(KvQuantError::HeadOutOfRange {
            head: 2,
            num_kv_heads: 2
        })
    );
    assert_eq!(
        dot_k(&l, &block, 0, 0, &q[..7]),
        Err(KvQuantError::LengthMismatch {
            what: "q",
            expected: 8,
            got: 7
        })
    );
    assert_eq!(dot_k(&l, &block, 3, 1, &q), Ok(0.0));
}

#[test]
fn axpy_v_rejects_bad_input() {
    let (l, block) = bad_setup();
    let mut acc = vec![1.0; 8];
    assert!(matches!(
        axpy_v(&l, &block[..10], 0, 0, 1.0, &mut acc),
        Err(KvQuantError::LengthMismatch { what: "block", .. })
    ));
    assert_eq!(
        axpy_v(&l, &block, 9, 0, 1.0, &mut acc),
        Err(KvQuantError::SlotOutOfRange {
            slot: 9,
            block_size: 4
        })
    );
    assert_eq!(
        axpy_v(&l, &block, 0, 5, 1.0, &mut acc),
        Err(KvQuantError::HeadOutOfRange {
            head: 5,
            num_kv_heads: 2
        })
    );
    let mut long = vec![0.0; 9];
    assert_eq!(
        axpy_v(&l, &block, 0, 0, 1.0, &mut long),
        Err(KvQuantError::LengthMismatch {
            what: "acc",
            expected: 8,
            got: 9
        })
    );
    assert_eq!(acc, vec![1.0; 8], "a rejected call must not write");
}

#[test]
fn garbage_blocks_decode_without_panicking() {
    for dtype in KvCacheDtype::ALL {
        let Ok(l) = BlockLayout::new(dtype, 3, 2, 64) else {
            continue;
        };
        let block: Vec<u8> = (0..l.kv_block_bytes())
            .map(|i| (i * 151 % 256) as u8)
            .collect();
        let mut out = vec![0.0; 3 * 128];
        decode_slots(&l, &block, 0..3, &mut out).unwrap();
        let q = vec![0.5; 64];
        let _ = dot_k(&l, &block, 2, 1, &q).unwrap();
        let mut acc = vec![0.0; 64];
        axpy_v(&l, &block, 2, 1, 0.5, &mut acc).unwrap();
    }
}
