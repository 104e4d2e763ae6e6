//! x86-64 AVX2 integer dot products of packed quantized weight rows with int8 activations,
//! chosen at run time when the CPU has AVX2 and FMA (the portable versions otherwise).
//!
//! This is one of the few modules allowed `unsafe`: calling `#[target_feature]` functions and
//! unaligned SIMD loads. Every block states why it is sound.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use super::quant::{
    Q4x8, QK, QuantizedActivations, ROWS, dot_packed_scalar, dot_q4x8_scalar, packed_block,
};
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

/// Dot products of one packed weight row (`dtype` Q8_0, Q4_0 or Q4_1; SIMD for Q8_0) with the
/// activations of up to four tokens at once (the row is loaded once for all of them).
pub(crate) fn dot_packed(
    dtype: DType,
    codes: &[u8],
    scales: &[f32],
    xs: &[QuantizedActivations],
    out: &mut [f32],
) {
    debug_assert!(xs.len() <= 4 && out.len() == xs.len());
    #[cfg(target_arch = "x86_64")]
    if dtype == DType::Q8_0
        && has_avx2()
        && xs.iter().all(|x| shapes_agree(dtype, codes, scales, x))
    {
        // SAFETY: AVX2 and FMA are available (checked above), and every activation has exactly
        // as many blocks as the row (checked above), which is all the kernel reads.
        unsafe { avx2::dot_q8_0(codes, scales, xs, out) };
        return;
    }
    for (o, x) in out.iter_mut().zip(xs) {
        *o = dot_packed_scalar(dtype, codes, scales, x);
    }
}

/// One group of 8 interleaved Q4 rows (see [`Q4x8`]: `codes`/`scales` from
/// [`Q4x8::group`]) times up to four tokens: `out[t][lane]` = row `lane` · token `t`.
pub(crate) fn dot_q4x8(
    codes: &[u8],
    scales: &[f32],
    xs: &[QuantizedActivations],
    out: &mut [[f32; ROWS]],
) {
    debug_assert!(xs.len() <= 4 && out.len() == xs.len());
    let blocks = codes.len() / Q4x8::GROUP_BLOCK_CODES;
    #[cfg(target_arch = "x86_64")]
    if has_avx2()
        && codes.len() == blocks * Q4x8::GROUP_BLOCK_CODES
        && scales.len() == blocks * Q4x8::GROUP_BLOCK_SCALES
        && xs
            .iter()
            .all(|x| x.qs.len() == blocks * QK && x.d.len() == blocks && x.sd.len() == blocks)
    {
        // SAFETY: AVX2 and FMA are available and every token has exactly as many blocks as the
        // group (both checked above), which is all the kernel reads.
        unsafe { avx2::dot_q4x8(codes, scales, xs, out) };
        return;
    }
    dot_q4x8_scalar(codes, scales, xs, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Q4x8, QK, QuantizedActivations, ROWS};

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

    /// `Σ u[i] * s[i]` over 32 unsigned-by-signed byte pairs, as 8 f32 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn mul_sum_us8(u: __m256i, s: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// Interleaved Q4 group against up to four tokens.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `codes` holds `blocks` × 128 bytes, `scales` `blocks`
    /// × 16 values, and every `xs[t]` `blocks` blocks of 32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q4x8(
        codes: &[u8],
        scales: &[f32],
        xs: &[QuantizedActivations],
        out: &mut [[f32; ROWS]],
    ) {
        // SAFETY: forwarded contract; each arm passes exactly N activations.
        unsafe {
            match xs.len() {
                1 => dot_q4x8_n::<1>(codes, scales, xs, out),
                2 => dot_q4x8_n::<2>(codes, scales, xs, out),
                3 => dot_q4x8_n::<3>(codes, scales, xs, out),
                _ => dot_q4x8_n::<4>(codes, scales, xs, out),
            }
        }
    }

    /// Pointers to the codes, scales and scaled sums of `N` tokens' activations.
    #[inline(always)]
    fn token_ptrs<const N: usize>(
        xs: &[QuantizedActivations],
    ) -> ([*const i8; N], [*const f32; N], [*const f32; N]) {
        (
            std::array::from_fn(|t| xs[t].qs.as_ptr()),
            std::array::from_fn(|t| xs[t].d.as_ptr()),
            std::array::from_fn(|t| xs[t].sd.as_ptr()),
        )
    }

    /// # Safety
    /// As [`dot_q4x8`], with `xs.len() == N`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q4x8_n<const N: usize>(
        codes: &[u8],
        scales: &[f32],
        xs: &[QuantizedActivations],
        out: &mut [[f32; ROWS]],
    ) {
        let blocks = codes.len() / Q4x8::GROUP_BLOCK_CODES;
        let (qx, dx, sx) = token_ptrs::<N>(xs);
        let mut acc = [_mm256_setzero_ps(); N];
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for b in 0..blocks {
            // SAFETY: block `b` < `blocks`: the group has 128 code bytes and 16 scales for it,
            // every token 32 codes (8 words), a `d` and an `sd` (the contract).
            unsafe {
                let c = codes.as_ptr().add(b * Q4x8::GROUP_BLOCK_CODES);
                let s = scales.as_ptr().add(b * Q4x8::GROUP_BLOCK_SCALES);
                // Word k, row r: low nibbles = elements 4k..4k+4, high = 16+4k..16+4k+4,
                // which pair with the token's code words k and 4 + k.
                let mut w = [_mm256_setzero_si256(); 8];
                for k in 0..4 {
                    let v = load32(c.add(32 * k));
                    w[k] = _mm256_and_si256(v, mask);
                    w[4 + k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                }
                let dw = _mm256_loadu_ps(s);
                let mw = _mm256_loadu_ps(s.add(ROWS));
                for t in 0..N {
                    let y = qx[t].add(b * QK).cast::<i32>();
                    // Each 16-bit lane sums 8 maddubs pairs of ≤ 2·15·128: ≤ 30720, no overflow.
                    let mut s16 = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(y.read_unaligned()));
                    for (k, &wk) in w.iter().enumerate().skip(1) {
                        let yk = _mm256_set1_epi32(y.add(k).read_unaligned());
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wk, yk));
                    }
                    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*dx[t].add(b)));
                    acc[t] = _mm256_fmadd_ps(sums, scale, acc[t]);
                    acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*sx[t].add(b)), acc[t]);
                }
            }
        }
        for t in 0..N {
            // SAFETY: `out[t]` is 8 f32s; storeu has no alignment needs.
            unsafe { _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]) };
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
        xs: &[QuantizedActivations],
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
        xs: &[QuantizedActivations],
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

    fn activations(n: usize) -> (Vec<Vec<f32>>, Vec<QuantizedActivations>) {
        let xs: Vec<Vec<f32>> = (0..4)
            .map(|t| {
                (0..n)
                    .map(|i| ((i * 37 + t * 11) % 101) as f32 / 25.0 - 2.0)
                    .collect()
            })
            .collect();
        let qas = xs
            .iter()
            .map(|x| {
                let mut q = QuantizedActivations::default();
                q.quantize(x);
                q
            })
            .collect();
        (xs, qas)
    }

    /// `fast` against the portable integer dot and the exact dot with the dequantized row.
    fn check(dtype: DType, fast: f32, scalar: f32, w: &[f32], x: &[f32]) {
        assert!(
            (fast - scalar).abs() <= 1e-4 * scalar.abs().max(1.0),
            "{dtype}: {fast} vs {scalar}"
        );
        let exact: f32 = w.iter().zip(x).map(|(a, b)| a * b).sum();
        let mag: f32 = w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
        assert!(
            (fast - exact).abs() < 1e-2 * mag,
            "{dtype}: {fast} vs {exact}"
        );
    }

    #[test]
    fn q8_0_simd_matches_scalar_and_dequantized_reference() {
        let (n, dtype) = (576, DType::Q8_0);
        let (xs, qas) = activations(n);
        let raw = random_row(dtype, n, 42);
        let packed = Packed::new(dtype, n, &raw);
        let (codes, scales) = packed.row(0);
        let mut w = vec![0.0; n];
        packed.dequantize_row(0, &mut w);
        let mut direct = vec![0.0; n];
        dequantize_row(dtype, &raw, &mut direct);
        assert_eq!(w, direct);
        for tokens in 1..=4 {
            let mut fast = vec![0.0; tokens];
            dot_packed(dtype, codes, scales, &qas[..tokens], &mut fast);
            for t in 0..tokens {
                let scalar = dot_packed_scalar(dtype, codes, scales, &qas[t]);
                check(dtype, fast[t], scalar, &w, &xs[t]);
            }
        }
    }

    /// 13 rows: one full interleaved group and a padded one; every row has its own codes and
    /// per-block scales, so a kernel that mixes up rows, blocks or lanes fails.
    #[test]
    fn interleaved_q4_matches_per_row_reference() {
        let (n, rows) = (576, 13usize);
        let (xs, qas) = activations(n);
        for dtype in [DType::Q4_0, DType::Q4_1] {
            let raw: Vec<Vec<u8>> = (0..rows)
                .map(|r| random_row(dtype, n, 42 + r as u64))
                .collect();
            let packed = Packed::new(dtype, n, &raw.concat());
            let q = Q4x8::from_packed(&packed);
            let back = q.to_packed();
            assert_eq!((&back.codes, &back.scales), (&packed.codes, &packed.scales));
            for tokens in 1..=4 {
                for g in 0..rows.div_ceil(ROWS) {
                    let (codes, scales) = q.group(g);
                    let mut fast = vec![[0.0; ROWS]; tokens];
                    let mut portable = vec![[0.0; ROWS]; tokens];
                    dot_q4x8(codes, scales, &qas[..tokens], &mut fast);
                    dot_q4x8_scalar(codes, scales, &qas[..tokens], &mut portable);
                    for r in g * ROWS..rows.min((g + 1) * ROWS) {
                        let mut w = vec![0.0; n];
                        q.dequantize_row(r, &mut w);
                        let mut direct = vec![0.0; n];
                        dequantize_row(dtype, &raw[r], &mut direct);
                        assert_eq!(w, direct, "{dtype} row {r}");
                        let (rc, rs) = packed.row(r);
                        for t in 0..tokens {
                            let scalar = dot_packed_scalar(dtype, rc, rs, &qas[t]);
                            check(dtype, fast[t][r % ROWS], scalar, &w, &xs[t]);
                            check(dtype, portable[t][r % ROWS], scalar, &w, &xs[t]);
                        }
                    }
                    // Padding lanes are zero rows.
                    let real = rows.saturating_sub(g * ROWS).min(ROWS);
                    assert!(fast[0][real..].iter().all(|&v| v == 0.0));
                }
            }
        }
    }
}
