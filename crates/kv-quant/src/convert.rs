//! Scalar conversions written branch-free (selects, integer ops and plain
//! `f32` arithmetic only) so that LLVM vectorizes the loops that call them on
//! the baseline x86-64 / aarch64 targets. Each is checked bit for bit against
//! a reference implementation in the tests (`half` for f16/bf16, `float8`,
//! a port of NVIDIA's `cuda_fp8.hpp`, for fp8).

use half::f16;

use crate::layout::{FP8_E4M3_MAX, FP8_E5M2_MAX, INT4_RANGE_MAX};

const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
const MAGIC_BITS: i32 = 0x4B40_0000; // MAGIC.to_bits()

/// Round to nearest, ties to even, for `|v| < 2^22`, using the
/// add-and-subtract-1.5·2^23 trick (SSE2 has no vector `round`).
#[cfg(test)]
pub(crate) fn round_ne(v: f32) -> f32 {
    (v + MAGIC) - MAGIC
}

/// `v` rounded to nearest (ties to even) as an integer, for `|v| < 2^22`:
/// after adding 1.5·2^23 the integer sits in the low mantissa bits, so no
/// float-to-int conversion (which Rust saturates, and LLVM scalarizes) is
/// needed.
#[inline(always)]
pub(crate) fn round_ne_i32(v: f32) -> i32 {
    ((v + MAGIC).to_bits() as i32).wrapping_sub(MAGIC_BITS)
}

/// IEEE binary16 bits to `f32`, exact (NaN stays NaN, sign kept).
///
/// The exponent and mantissa are moved into place and rescaled by one
/// multiply (exact for zeros, subnormals and normals); infinities and NaNs
/// get their all-ones exponent OR-ed in. (f16 subnormals become f32
/// denormal operands of the multiply: correct, possibly slower on some CPUs,
/// and rare in KV data.)
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    const RESCALE: f32 = f32::from_bits((127 + 112) << 23); // 2^(127-15)
    // (A select, not `(h & 0x8000) << 16`: LLVM lowers that shift with a
    // false loop-carried register dependency on SSE2.)
    let sign = if h >= 0x8000 { 0x8000_0000 } else { 0 };
    let h = u32::from(h);
    let magnitude = f32::from_bits((h & 0x7FFF) << 13) * RESCALE;
    let inf_nan = if h & 0x7C00 == 0x7C00 { 0x7F80_0000 } else { 0 };
    f32::from_bits(magnitude.to_bits() | inf_nan | sign)
}

/// bfloat16 bits to `f32`, exact.
#[inline(always)]
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// FP8 E4M3 (OCP "E4M3FN": bias 7, no infinities, `S.1111.111` is NaN) to
/// `f32`, exact. Same construction as [`f16_to_f32`].
#[inline(always)]
pub(crate) fn e4m3_to_f32(code: u8) -> f32 {
    const RESCALE: f32 = f32::from_bits((127 + 120) << 23); // 2^(127-7)
    let sign = if code >= 0x80 { 0x8000_0000 } else { 0 };
    let c = u32::from(code);
    let magnitude = f32::from_bits((c & 0x7F) << 20) * RESCALE;
    let nan = if c & 0x7F == 0x7F { 0x7F80_0000 } else { 0 };
    f32::from_bits(magnitude.to_bits() | nan | sign)
}

/// FP8 E5M2 (bias 15, IEEE-like with inf and NaN) to `f32`, exact: an E5M2
/// code is the top byte of an f16.
#[inline(always)]
pub(crate) fn e5m2_to_f32(code: u8) -> f32 {
    f16_to_f32(u16::from(code) << 8)
}

/// `f32` to FP8 E4M3, round to nearest even, saturating to ±448 (±inf
/// included); NaN becomes +0.
#[inline(always)]
pub(crate) fn f32_to_e4m3(x: f32) -> u8 {
    const MIN_NORMAL: f32 = 1.0 / 64.0; // 2^-6
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let a = f32::from_bits(bits & 0x7FFF_FFFF);
    let a = if a > FP8_E4M3_MAX { FP8_E4M3_MAX } else { a };
    // Subnormal codes 0..=8 are multiples of 2^-9 (8 is the smallest normal).
    let subnormal = round_ne_i32(a * 512.0) as u32;
    // Normal: round the f32 mantissa to 3 bits (ties to even), then rebias.
    let ab = a.to_bits();
    let rounded = ab + 0x7_FFFF + ((ab >> 20) & 1);
    let normal = (rounded >> 20).wrapping_sub((127 - 7) << 3);
    let code = if a < MIN_NORMAL { subnormal } else { normal } | sign;
    if x.is_nan() { 0 } else { code as u8 }
}

/// `f32` to FP8 E5M2, round to nearest even, saturating to ±57344 (±inf
/// included); NaN becomes +0.
#[inline(always)]
pub(crate) fn f32_to_e5m2(x: f32) -> u8 {
    const MIN_NORMAL: f32 = 1.0 / 16384.0; // 2^-14
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let a = f32::from_bits(bits & 0x7FFF_FFFF);
    let a = if a > FP8_E5M2_MAX { FP8_E5M2_MAX } else { a };
    // Subnormal codes 0..=4 are multiples of 2^-16 (4 is the smallest normal).
    let subnormal = round_ne_i32(a * 65536.0) as u32;
    let ab = a.to_bits();
    let rounded = ab + 0xF_FFFF + ((ab >> 21) & 1);
    let normal = (rounded >> 21).wrapping_sub((127 - 15) << 2);
    let code = if a < MIN_NORMAL { subnormal } else { normal } | sign;
    if x.is_nan() { 0 } else { code as u8 }
}

/// Largest `|x|` over the finite elements of `xs` (0 if there are none).
#[inline]
pub(crate) fn finite_absmax(xs: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            let a = x.abs();
            let a = if a < f32::INFINITY { a } else { 0.0 };
            *m = if a > *m { a } else { *m };
        }
    }
    let mut m = 0.0f32;
    for &x in lanes.iter().chain(tail) {
        let a = x.abs();
        if a < f32::INFINITY && a > m {
            m = a;
        }
    }
    m
}

/// `(min, max)` over the finite elements of `xs`, or `None` if there are none.
#[inline]
pub(crate) fn finite_min_max(xs: &[f32]) -> Option<(f32, f32)> {
    const LANES: usize = 8;
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((l, h), &x) in lo.iter_mut().zip(hi.iter_mut()).zip(chunk) {
            let finite = x.abs() < f32::INFINITY;
            let xl = if finite { x } else { f32::INFINITY };
            let xh = if finite { x } else { f32::NEG_INFINITY };
            *l = if xl < *l { xl } else { *l };
            *h = if xh > *h { xh } else { *h };
        }
    }
    let mut min = f32::INFINITY;
    let mut max = f32::NEG_INFINITY;
    for &x in lo.iter().chain(hi.iter()).chain(tail) {
        if x.abs() < f32::INFINITY {
            min = min.min(x);
            max = max.max(x);
        }
    }
    (min <= max).then_some((min, max))
}

/// The scale mapping `absmax` (finite, `>= 0`) to `qmax`: `absmax / qmax`,
/// nudged up one ulp when needed so that `s * qmax >= absmax` (no finite
/// input quantizes past `qmax`), unless that would make `s * qmax` overflow
/// (absmax within an ulp of `f32::MAX`): decoded values stay finite.
#[inline]
pub(crate) fn symmetric_scale(absmax: f32, qmax: f32) -> f32 {
    let mut s = absmax / qmax;
    if s * qmax < absmax {
        s = s.next_up();
    }
    // Only for absmax within a few ulps of f32::MAX; terminates after an
    // iteration or two.
    while !(s * qmax).is_finite() {
        s = s.next_down();
    }
    s
}

/// The largest f16 `<= v` (`v` finite, within `±INT4_RANGE_MAX`).
fn f16_round_down(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() <= v {
        return h;
    }
    let bits = h.to_bits();
    f16::from_bits(match bits {
        0x0000 => 0x8001,              // +0 -> smallest negative subnormal
        b if b & 0x8000 == 0 => b - 1, // positive: toward zero
        b => b + 1,                    // negative: away from zero
    })
}

/// The smallest f16 `>= v` (`v` finite, `0 <= v < INT4_RANGE_MAX`).
fn f16_round_up(v: f64) -> f16 {
    let h = f16::from_f64(v);
    if h.to_f64() >= v {
        return h;
    }
    // `h` is non-negative here (v >= 0 and h rounds to nearest), so the next
    // f16 up is the next bit pattern.
    f16::from_bits(h.to_bits() + 1)
}

/// The int4 `(scale, min)` pair, stored as f16, for a group whose finite
/// values span `[lo, hi]` (`None`: no finite values).
///
/// `min` is rounded down and `scale` up so that the grid
/// `min + scale * 0..=15` covers `[lo, hi]` (after clamping both to
/// `±INT4_RANGE_MAX`).
pub(crate) fn int4_params(range: Option<(f32, f32)>) -> (f16, f16) {
    let Some((lo, hi)) = range else {
        return (f16::ZERO, f16::ZERO);
    };
    let lo = lo.clamp(-INT4_RANGE_MAX, INT4_RANGE_MAX);
    let hi = hi.clamp(-INT4_RANGE_MAX, INT4_RANGE_MAX);
    let min = f16_round_down(lo);
    // In f64 so the span is not rounded down before the upward f16 rounding.
    let span = f64::from(hi) - f64::from(min.to_f32());
    let scale = f16_round_up(span / 15.0);
    (scale, min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use float8::{F8E4M3, F8E5M2};
    use half::bf16;

    fn same(a: f32, b: f32) -> bool {
        (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
    }

    #[test]
    fn f16_decode_is_exact_for_all_codes() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            assert!(same(got, want), "{bits:#06x}: {got} vs {want}");
            if want.is_nan() {
                assert_eq!(got.is_sign_negative(), want.is_sign_negative());
            }
        }
    }

    #[test]
    fn bf16_decode_is_exact_for_all_codes() {
        for bits in 0..=u16::MAX {
            let want = bf16::from_bits(bits).to_f32();
            assert!(same(bf16_to_f32(bits), want), "{bits:#06x}");
        }
    }

    #[test]
    fn fp8_decode_matches_reference_for_all_256_codes() {
        for code in 0..=u8::MAX {
            let want = F8E4M3::from_bits(code).to_f32();
            assert!(same(e4m3_to_f32(code), want), "e4m3 {code:#04x}");
            let want = F8E5M2::from_bits(code).to_f32();
            assert!(same(e5m2_to_f32(code), want), "e5m2 {code:#04x}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(e5m2_to_f32(0x7B), 57344.0);
        assert_eq!(e5m2_to_f32(0x7C), f32::INFINITY);
    }

    /// Every code's value, the midpoints between neighbours and their f32
    /// neighbours: all rounding boundaries of both formats.
    fn fp8_boundary_inputs(decode: fn(u8) -> f32) -> Vec<f32> {
        let mut values: Vec<f32> = (0..=0x7Fu8).map(decode).filter(|v| v.is_finite()).collect();
        values.sort_by(f32::total_cmp);
        let mut out = Vec::new();
        for w in values.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            for v in [w[0], mid, w[1]] {
                out.extend([v, v.next_down(), v.next_up()]);
            }
        }
        let max = values.last().copied().unwrap_or(0.0);
        let beyond = max + (max - values[values.len() - 2]) / 2.0;
        out.extend([
            beyond,
            beyond.next_down(),
            beyond.next_up(),
            max * 4.0,
            f32::MAX,
        ]);
        out.extend([f32::INFINITY, f32::MIN_POSITIVE, 1e-40, 0.0]);
        let negated: Vec<f32> = out.iter().map(|v| -v).collect();
        out.extend(negated);
        out
    }

    #[test]
    fn fp8_encode_matches_reference_on_all_rounding_boundaries() {
        for x in fp8_boundary_inputs(e4m3_to_f32) {
            let want = F8E4M3::from_f32(x).to_bits();
            assert_eq!(f32_to_e4m3(x), want, "e4m3 {x:e} ({:#010x})", x.to_bits());
        }
        for x in fp8_boundary_inputs(e5m2_to_f32) {
            let want = F8E5M2::from_f32(x).to_bits();
            assert_eq!(f32_to_e5m2(x), want, "e5m2 {x:e} ({:#010x})", x.to_bits());
        }
    }

    #[test]
    fn fp8_encode_saturates_and_zeroes_nan() {
        assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f32_to_e4m3(1e9), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NAN), 0);
        assert_eq!(f32_to_e4m3(-f32::NAN), 0);
        assert_eq!(f32_to_e5m2(f32::INFINITY), 0x7B);
        assert_eq!(f32_to_e5m2(f32::NEG_INFINITY), 0xFB);
        assert_eq!(f32_to_e5m2(f32::NAN), 0);
    }

    /// Sweeps every f32 bit pattern (4 billion): run with
    /// `cargo test -p kv-quant --release -- --ignored`.
    #[test]
    #[ignore = "exhaustive, ~1 minute in release"]
    fn fp8_encode_matches_reference_for_all_f32() {
        for bits in 0..=u32::MAX {
            let x = f32::from_bits(bits);
            if x.is_nan() {
                continue;
            }
            assert_eq!(f32_to_e4m3(x), F8E4M3::from_f32(x).to_bits(), "{bits:#x}");
            assert_eq!(f32_to_e5m2(x), F8E5M2::from_f32(x).to_bits(), "{bits:#x}");
        }
    }

    proptest::proptest! {
        #[test]
        fn fp8_encode_matches_reference(bits in proptest::num::u32::ANY) {
            let x = f32::from_bits(bits);
            proptest::prop_assume!(!x.is_nan());
            proptest::prop_assert_eq!(f32_to_e4m3(x), F8E4M3::from_f32(x).to_bits());
            proptest::prop_assert_eq!(f32_to_e5m2(x), F8E5M2::from_f32(x).to_bits());
        }

        #[test]
        fn fp8_encode_matches_reference_in_range(x in -500.0f32..500.0) {
            proptest::prop_assert_eq!(f32_to_e4m3(x), F8E4M3::from_f32(x).to_bits());
            proptest::prop_assert_eq!(f32_to_e5m2(x * 100.0), F8E5M2::from_f32(x * 100.0).to_bits());
        }
    }

    #[test]
    fn round_ne_i32_matches_round_ne() {
        for i in -40_000..40_000 {
            let v = i as f32 * 0.25;
            assert_eq!(round_ne_i32(v), round_ne(v) as i32, "{v}");
        }
        assert_eq!(round_ne_i32(-127.0) as u8, (-127i8) as u8);
        assert_eq!(round_ne_i32(-0.0), 0);
    }

    #[test]
    fn round_ne_ties_to_even() {
        for (v, want) in [
            (0.5, 0.0),
            (1.5, 2.0),
            (2.5, 2.0),
            (-0.5, -0.0),
            (-1.5, -2.0),
            (126.5, 126.0),
            (14.49, 14.0),
        ] {
            assert_eq!(round_ne(v), want, "{v}");
        }
    }

    #[test]
    fn finite_reductions_skip_non_finite() {
        let xs = [
            1.0,
            -3.0,
            f32::NAN,
            f32::INFINITY,
            2.0,
            f32::NEG_INFINITY,
            0.5,
            -0.25,
            7.0,
        ];
        assert_eq!(finite_absmax(&xs), 7.0);
        assert_eq!(finite_min_max(&xs), Some((-3.0, 7.0)));
        assert_eq!(finite_absmax(&xs[..8]), 3.0);
        assert_eq!(finite_min_max(&xs[..8]), Some((-3.0, 2.0)));
        let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        assert_eq!(finite_absmax(&bad), 0.0);
        assert_eq!(finite_min_max(&bad), None);
        assert_eq!(finite_absmax(&[]), 0.0);
        assert_eq!(finite_min_max(&[]), None);
    }

    #[test]
    fn symmetric_scale_covers_absmax() {
        for absmax in [0.0, 1e-45, 1e-40, 1.0, 3.0, 1e38, f32::MAX] {
            for qmax in [127.0, 448.0, 57344.0] {
                let s = symmetric_scale(absmax, qmax);
                assert!(s.is_finite() && s >= 0.0);
                assert!((s * qmax).is_finite(), "{absmax} {qmax}");
                if absmax < f32::MAX {
                    assert!(s * qmax >= absmax, "{absmax} {qmax}");
                }
            }
        }
    }

    #[test]
    fn int4_params_cover_the_range() {
        for (lo, hi) in [
            (0.0, 0.0),
            (1.0, 1.0),
            (0.1, 0.1),
            (-1.0, 1.0),
            (100.0, 101.0),
            (-1e-9, 1e-9),
            (3e-8, 5e-8),
            (-70000.0, 70000.0),
            (-1e30, -1e29),
        ] {
            let (s, m) = int4_params(Some((lo, hi)));
            let (s, m) = (s.to_f32(), m.to_f32());
            let lo_c = lo.clamp(-INT4_RANGE_MAX, INT4_RANGE_MAX);
            let hi_c = hi.clamp(-INT4_RANGE_MAX, INT4_RANGE_MAX);
            assert!(s.is_finite() && s >= 0.0 && m.is_finite());
            assert!(m <= lo_c, "{lo} {hi}: min {m}");
            assert!(
                f64::from(m) + 15.0 * f64::from(s) >= f64::from(hi_c),
                "{lo} {hi}: {m} + 15 * {s}"
            );
        }
        assert_eq!(int4_params(None), (f16::ZERO, f16::ZERO));
        let (s, m) = int4_params(Some((0.0, 0.0)));
        assert_eq!((s.to_f32(), m.to_f32()), (0.0, 0.0));
    }

    #[test]
    fn f16_directed_rounding() {
        assert_eq!(
            f16_round_down(0.1).to_f32(),
            f16::from_bits(0x2E66).to_f32()
        );
        assert!(f16_round_down(0.1).to_f32() <= 0.1);
        assert!(f16_round_down(-0.1).to_f32() <= -0.1);
        assert!(f16_round_down(1e-9).to_f32() <= 1e-9);
        assert!(f16_round_down(-1e-9).to_f32() <= -1e-9);
        assert!(f16_round_up(1e-9).to_f64() >= 1e-9);
        assert!(f16_round_up(0.1).to_f64() >= 0.1);
        assert_eq!(f16_round_up(0.0).to_f32(), 0.0);
        assert_eq!(f16_round_down(-INT4_RANGE_MAX).to_f32(), -INT4_RANGE_MAX);
        assert_eq!(f16_round_down(INT4_RANGE_MAX).to_f32(), INT4_RANGE_MAX);
    }
}
