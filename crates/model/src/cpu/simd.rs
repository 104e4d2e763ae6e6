//! x86-64 AVX2 integer dot products of packed quantized weight rows with int8 activations,
//! chosen at run time when the CPU has AVX2 and FMA (the portable versions otherwise).
//!
//! This is one of the few modules allowed `unsafe`: calling `#[target_feature]` functions and
//! unaligned SIMD loads. Every block states why it is sound.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use super::quant::{QK, QuantizedActivations, dot_packed_scalar, packed_block};
use crate::DType;

fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether `codes`/`scales`/`x` describe the same whole number of blocks of `dtype`.
fn shapes_agree(dtype: DType, codes: &[u8], scales: &[f32], x: &QuantizedActivations) -> bool {
    let (cb, sb) = packed_block(dtype);
    let blocks = x.d.len();
    codes.len() == blocks * cb
        && scales.len() == blocks * sb
        && x.qs.len() == blocks * QK
        && x.sd.len() == blocks
}

/// Dot products of one packed weight row (`dtype` Q8_0, Q4_0 or Q4_1) with the activations
/// of up to four tokens at once (the row is unpacked once for all of them).
pub(crate) fn dot_packed(
    dtype: DType,
    codes: &[u8],
    scales: &[f32],
    xs: &[&QuantizedActivations],
    out: &mut [f32],
) {
    debug_assert!(xs.len() <= 4 && out.len() == xs.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && xs.iter().all(|x| shapes_agree(dtype, codes, scales, x)) {
        // SAFETY: AVX2 and FMA are available (checked above), and every activation has exactly
        // as many blocks as the row (checked above), which is all the kernels read.
        unsafe {
            match dtype {
                DType::Q8_0 => avx2::dot_q8_0(codes, scales, xs, out),
                DType::Q4_0 | DType::Q4_1 => {
                    avx2::dot_q4(dtype == DType::Q4_1, codes, scales, xs, out)
                }
                _ => {}
            }
        }
        return;
    }
    for (o, x) in out.iter_mut().zip(xs) {
        *o = dot_packed_scalar(dtype, codes, scales, x);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{QK, QuantizedActivations};

    /// Horizontal sum of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// AVX2 must be available; `p` points to 32 readable bytes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load32(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 32 readable bytes; loadu has no alignment needs.
        unsafe { _mm256_loadu_si256(p.cast()) }
    }

    /// The 32 nibbles of a Q4 block as bytes: low nibbles (elements 0..16) in the low lane,
    /// high nibbles (elements 16..32) in the high lane.
    ///
    /// # Safety
    /// AVX2 must be available; `p` points to 16 readable bytes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(p: *const u8, mask: __m256i) -> __m256i {
        // SAFETY: the caller guarantees 16 readable bytes; loadu has no alignment needs.
        let q = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), mask)
    }

    /// `Σ u[i] * s[i]` over 32 unsigned-by-signed byte pairs, as 8 f32 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn mul_sum_us8(u: __m256i, s: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// Q4_0 / Q4_1 rows (`with_min`) against up to four tokens.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `codes` holds 16 bytes and `scales` 1 (Q4_0) or 2
    /// (Q4_1) values per block, and every `xs[t]` as many blocks of 32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q4(
        with_min: bool,
        codes: &[u8],
        scales: &[f32],
        xs: &[&QuantizedActivations],
        out: &mut [f32],
    ) {
        // SAFETY: forwarded contract; each arm passes exactly N activations.
        unsafe {
            match xs.len() {
                1 => dot_q4_n::<1>(with_min, codes, scales, xs, out),
                2 => dot_q4_n::<2>(with_min, codes, scales, xs, out),
                3 => dot_q4_n::<3>(with_min, codes, scales, xs, out),
                _ => dot_q4_n::<4>(with_min, codes, scales, xs, out),
            }
        }
    }

    /// Pointers to the codes, scales and scaled sums of `N` tokens' activations.
    #[inline(always)]
    fn token_ptrs<const N: usize>(
        xs: &[&QuantizedActivations],
    ) -> ([*const i8; N], [*const f32; N], [*const f32; N]) {
        (
            std::array::from_fn(|t| xs[t].qs.as_ptr()),
            std::array::from_fn(|t| xs[t].d.as_ptr()),
            std::array::from_fn(|t| xs[t].sd.as_ptr()),
        )
    }

    /// # Safety
    /// As [`dot_q4`], with `xs.len() == N`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q4_n<const N: usize>(
        with_min: bool,
        codes: &[u8],
        scales: &[f32],
        xs: &[&QuantizedActivations],
        out: &mut [f32],
    ) {
        let blocks = codes.len() / 16;
        let (qx, dx, sx) = token_ptrs::<N>(xs);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut offsets = [_mm256_setzero_ps(); N];
        let mask = _mm256_set1_epi8(0x0F);
        let d = scales.as_ptr();
        // Offsets per block: `m` (Q4_1) or `-8 d` (Q4_0), times the token's `d Σq`.
        let m = if with_min { d.wrapping_add(blocks) } else { d };
        let m_factor = _mm256_set1_ps(if with_min { 1.0 } else { -8.0 });
        let groups = blocks / 8;
        for g in 0..groups {
            // SAFETY: blocks 8g..8g+8 < `blocks` exist in the row (16 code bytes, a `d` and, for
            // Q4_1, an `m` each) and in every token (32 codes, a `d` and an `sd` each).
            unsafe {
                let dw = _mm256_loadu_ps(d.add(8 * g));
                let mw = _mm256_mul_ps(_mm256_loadu_ps(m.add(8 * g)), m_factor);
                let mut sc = [_mm256_setzero_ps(); N];
                for t in 0..N {
                    sc[t] = _mm256_mul_ps(dw, _mm256_loadu_ps(dx[t].add(8 * g)));
                    offsets[t] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(sx[t].add(8 * g)), offsets[t]);
                }
                for j in 0..8 {
                    let b = 8 * g + j;
                    let q = nibbles(codes.as_ptr().add(b * 16), mask);
                    let lane = _mm256_set1_epi32(j as i32);
                    for t in 0..N {
                        let y = load32(qx[t].add(b * QK).cast());
                        let scale = _mm256_permutevar8x32_ps(sc[t], lane);
                        acc[t] = _mm256_fmadd_ps(scale, mul_sum_us8(q, y), acc[t]);
                    }
                }
            }
        }
        let mut tail = [0.0f32; N];
        for b in groups * 8..blocks {
            // SAFETY: block `b` < `blocks` exists in the row and in every token, as above.
            unsafe {
                let q = nibbles(codes.as_ptr().add(b * 16), mask);
                let dw = *d.add(b);
                let offset_w = if with_min { *m.add(b) } else { -8.0 * dw };
                for t in 0..N {
                    let y = load32(qx[t].add(b * QK).cast());
                    acc[t] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dw * *dx[t].add(b)),
                        mul_sum_us8(q, y),
                        acc[t],
                    );
                    tail[t] += offset_w * *sx[t].add(b);
                }
            }
        }
        for t in 0..N {
            out[t] = hsum(acc[t]) + hsum(offsets[t]) + tail[t];
        }
    }

    /// Q8_0 rows against up to four tokens.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `codes` holds 32 bytes and `scales` 1 value per block,
    /// and every `xs[t]` as many blocks of 32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q8_0(
        codes: &[u8],
        scales: &[f32],
        xs: &[&QuantizedActivations],
        out: &mut [f32],
    ) {
        // SAFETY: forwarded contract; each arm passes exactly N activations.
        unsafe {
            match xs.len() {
                1 => dot_q8_0_n::<1>(codes, scales, xs, out),
                2 => dot_q8_0_n::<2>(codes, scales, xs, out),
                3 => dot_q8_0_n::<3>(codes, scales, xs, out),
                _ => dot_q8_0_n::<4>(codes, scales, xs, out),
            }
        }
    }

    /// # Safety
    /// As [`dot_q8_0`], with `xs.len() == N`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q8_0_n<const N: usize>(
        codes: &[u8],
        scales: &[f32],
        xs: &[&QuantizedActivations],
        out: &mut [f32],
    ) {
        let blocks = codes.len() / 32;
        let (qx, dx, _) = token_ptrs::<N>(xs);
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..blocks {
            // SAFETY: block `b` < `blocks` of the row has 32 code bytes and one scale; every
            // token has `blocks` blocks of 32 codes and one `d` each (the contract).
            unsafe {
                let q = load32(codes.as_ptr().add(b * 32));
                let abs = _mm256_sign_epi8(q, q);
                let dw = *scales.as_ptr().add(b);
                for t in 0..N {
                    let y = load32(qx[t].add(b * QK).cast());
                    // maddubs multiplies unsigned by signed: move the weight's sign onto x.
                    let prod = mul_sum_us8(abs, _mm256_sign_epi8(y, q));
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * *dx[t].add(b)), prod, acc[t]);
                }
            }
        }
        for t in 0..N {
            out[t] = hsum(acc[t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::quant::{Packed, dequantize_row};

    fn random_row(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let bytes = dtype.row_bytes(n).unwrap();
        let mut row: Vec<u8> = (0..bytes)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        // Finite, moderate and different scales per block, so a kernel that mixes up blocks'
        // scales fails.
        for (i, block) in row.chunks_exact_mut(dtype.block_bytes()).enumerate() {
            let d = 0.005 + 0.001 * ((i * 7) % 13) as f32;
            block[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
            if dtype == DType::Q4_1 {
                let m = -0.08 + 0.01 * ((i * 5) % 11) as f32;
                block[2..4].copy_from_slice(&half::f16::from_f32(m).to_le_bytes());
            }
        }
        row
    }

    #[test]
    fn simd_matches_scalar_and_dequantized_reference() {
        let n = 576;
        let xs: Vec<Vec<f32>> = (0..4)
            .map(|t| {
                (0..n)
                    .map(|i| ((i * 37 + t * 11) % 101) as f32 / 25.0 - 2.0)
                    .collect()
            })
            .collect();
        let qas: Vec<QuantizedActivations> = xs
            .iter()
            .map(|x| {
                let mut q = QuantizedActivations::default();
                q.quantize(x);
                q
            })
            .collect();
        let refs: Vec<&QuantizedActivations> = qas.iter().collect();
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            let packed = Packed::new(dtype, n, &random_row(dtype, n, 42));
            let (codes, scales) = packed.row(0);
            for tokens in 1..=4 {
                let mut fast = vec![0.0; tokens];
                dot_packed(dtype, codes, scales, &refs[..tokens], &mut fast);
                for t in 0..tokens {
                    let scalar = dot_packed_scalar(dtype, codes, scales, refs[t]);
                    assert!(
                        (fast[t] - scalar).abs() <= 1e-4 * scalar.abs().max(1.0),
                        "{dtype}: {} vs {scalar}",
                        fast[t]
                    );
                    let mut w = vec![0.0; n];
                    packed.dequantize_row(0, &mut w);
                    let exact: f32 = w.iter().zip(&xs[t]).map(|(a, b)| a * b).sum();
                    let mag: f32 = w.iter().zip(&xs[t]).map(|(a, b)| (a * b).abs()).sum();
                    assert!(
                        (fast[t] - exact).abs() < 1e-2 * mag,
                        "{dtype}: {} vs {exact}",
                        fast[t]
                    );
                }
            }
            let mut direct = vec![0.0; n];
            dequantize_row(dtype, &random_row(dtype, n, 42), &mut direct);
            let mut w = vec![0.0; n];
            packed.dequantize_row(0, &mut w);
            assert_eq!(w, direct);
        }
    }
}
