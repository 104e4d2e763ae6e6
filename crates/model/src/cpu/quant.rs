//! GGML block formats on the CPU: dequantization (the exact reference), activation
//! quantization to int8 blocks, and portable integer dot products.
//!
//! Weights stay block-quantized in memory (Q8_0, Q4_0, Q4_1): a decode step is bound by how
//! many weight bytes it streams, and 4.5–8.5 bits per weight instead of 32 is most of the
//! speed. Activations are quantized per block of 32 to int8 with an f32 scale (as llama.cpp
//! does), so a block's dot product is an integer sum of 32 products and one multiply.

use half::f16;

use crate::DType;

/// Elements per block of every supported quantized format.
pub(crate) const QK: usize = 32;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes one row of `out.len()` elements stored as `dtype` in `bytes`.
///
/// Callers guarantee `bytes.len() == dtype.row_bytes(out.len())` (checked at load time).
pub(crate) fn dequantize_row(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                    *x = d * f32::from(q as i8);
                }
            }
        }
        DType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                let (lo, hi) = o.split_at_mut(16);
                for (j, &q) in b[2..18].iter().enumerate() {
                    lo[j] = d * (f32::from(q & 0x0F) - 8.0);
                    hi[j] = d * (f32::from(q >> 4) - 8.0);
                }
            }
        }
        DType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let (lo, hi) = o.split_at_mut(16);
                for (j, &q) in b[4..20].iter().enumerate() {
                    lo[j] = d * f32::from(q & 0x0F) + m;
                    hi[j] = d * f32::from(q >> 4) + m;
                }
            }
        }
        DType::Q4K => dequantize_q4k(bytes, out),
        DType::Q6K => dequantize_q6k(bytes, out),
    }
}

/// Scale and min of sub-block `j` of a Q4_K super-block (6-bit packed).
fn q4k_scale_min(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

fn dequantize_q4k(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(256).zip(bytes.chunks_exact(144)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let scales = &b[4..16];
        let qs = &b[16..144];
        for (chunk, (q, o)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = q4k_scale_min(2 * chunk, scales);
            let (sc2, m2) = q4k_scale_min(2 * chunk + 1, scales);
            let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
            let (lo, hi) = o.split_at_mut(32);
            for (l, &byte) in q.iter().enumerate() {
                lo[l] = d1 * f32::from(byte & 0x0F) - min1;
                hi[l] = d2 * f32::from(byte >> 4) - min2;
            }
        }
    }
}

fn dequantize_q6k(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(256).zip(bytes.chunks_exact(210)) {
        let ql = &b[0..128];
        let qh = &b[128..192];
        let scales = &b[192..208];
        let d = f16_at(b, 208);
        for half in 0..2 {
            let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
            let sc = &scales[8 * half..];
            let o = &mut o[128 * half..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                o[l] = d * f32::from(sc[is] as i8) * q1 as f32;
                o[l + 32] = d * f32::from(sc[is + 2] as i8) * q2 as f32;
                o[l + 64] = d * f32::from(sc[is + 4] as i8) * q3 as f32;
                o[l + 96] = d * f32::from(sc[is + 6] as i8) * q4 as f32;
            }
        }
    }
}

/// Activations of one token quantized per block of 32: `x ≈ d[b] * qs[32 b + i]`.
#[derive(Debug, Clone, Default)]
pub(crate) struct QuantizedActivations {
    pub(crate) qs: Vec<i8>,
    pub(crate) d: Vec<f32>,
    /// `d[b] * Σ qs` over each block (for the offset terms of Q4_0 and Q4_1).
    pub(crate) sd: Vec<f32>,
}

impl QuantizedActivations {
    /// Quantizes `x` (length a multiple of 32) into `self`, reusing its buffers.
    pub(crate) fn quantize(&mut self, x: &[f32]) {
        let blocks = x.len() / QK;
        self.qs.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.sd.resize(blocks, 0.0);
        for (b, (xb, qb)) in x
            .chunks_exact(QK)
            .zip(self.qs.chunks_exact_mut(QK))
            .enumerate()
        {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                // Round half away from zero without a libm call; |v * inv| <= 127 by
                // construction, and the cast saturates NaN to 0.
                let scaled = v * inv;
                let r = (scaled + 0.5f32.copysign(scaled)) as i8;
                *q = r;
                sum += i32::from(r);
            }
            self.d[b] = d;
            self.sd[b] = d * sum as f32;
        }
    }
}

/// Block-quantized weights repacked for the CPU kernels: per row, the codes of every block
/// back to back, and in a separate array the f32 scales `d` of every block (then, for Q4_1,
/// the minimums `m` of every block), so the kernels load eight blocks' scales at once and never
/// convert f16.
#[derive(Debug, Clone)]
pub(crate) struct Packed {
    pub(crate) dtype: DType,
    pub(crate) codes: Vec<u8>,
    pub(crate) scales: Vec<f32>,
    pub(crate) code_row: usize,
    pub(crate) scale_row: usize,
}

/// Code bytes and f32 scales per block of a packed type.
pub(crate) fn packed_block(dtype: DType) -> (usize, usize) {
    match dtype {
        DType::Q8_0 => (32, 1),
        DType::Q4_0 => (16, 1),
        _ => (16, 2),
    }
}

impl Packed {
    /// Repacks `rows` GGML rows of `cols` elements (Q8_0, Q4_0 or Q4_1).
    pub(crate) fn new(dtype: DType, cols: usize, data: &[u8]) -> Self {
        let blocks = cols / QK;
        let (cb, sb) = packed_block(dtype);
        let header = dtype.block_bytes() - cb;
        let rows = data.len() / (blocks * dtype.block_bytes()).max(1);
        let mut codes = Vec::with_capacity(rows * blocks * cb);
        let mut scales = Vec::with_capacity(rows * blocks * sb);
        for row in data.chunks_exact((blocks * dtype.block_bytes()).max(1)) {
            for block in row.chunks_exact(dtype.block_bytes()) {
                codes.extend_from_slice(&block[header..]);
                scales.push(f16_at(block, 0));
            }
            if sb == 2 {
                scales.extend(
                    row.chunks_exact(dtype.block_bytes())
                        .map(|block| f16_at(block, 2)),
                );
            }
        }
        Self {
            dtype,
            codes,
            scales,
            code_row: blocks * cb,
            scale_row: blocks * sb,
        }
    }

    pub(crate) fn row(&self, r: usize) -> (&[u8], &[f32]) {
        (
            &self.codes[r * self.code_row..(r + 1) * self.code_row],
            &self.scales[r * self.scale_row..(r + 1) * self.scale_row],
        )
    }

    /// Row `r` as f32.
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (codes, scales) = self.row(r);
        let (cb, _) = packed_block(self.dtype);
        let nb = codes.len() / cb;
        for (b, (o, c)) in out
            .chunks_exact_mut(QK)
            .zip(codes.chunks_exact(cb))
            .enumerate()
        {
            let d = scales[b];
            match self.dtype {
                DType::Q8_0 => {
                    for (x, &q) in o.iter_mut().zip(c) {
                        *x = d * f32::from(q as i8);
                    }
                }
                dtype => {
                    let (m, bias) = if dtype == DType::Q4_0 {
                        (0.0, 8.0)
                    } else {
                        (scales[nb + b], 0.0)
                    };
                    let (lo, hi) = o.split_at_mut(16);
                    for (j, &q) in c.iter().enumerate() {
                        lo[j] = d * (f32::from(q & 0x0F) - bias) + m;
                        hi[j] = d * (f32::from(q >> 4) - bias) + m;
                    }
                }
            }
        }
    }
}

impl Packed {
    /// Rows `rows` only.
    pub(crate) fn slice_rows(&self, rows: std::ops::Range<usize>) -> Self {
        Self {
            dtype: self.dtype,
            codes: self.codes[rows.start * self.code_row..rows.end * self.code_row].to_vec(),
            scales: self.scales[rows.start * self.scale_row..rows.end * self.scale_row].to_vec(),
            code_row: self.code_row,
            scale_row: self.scale_row,
        }
    }

    /// Columns `cols` only; `cols` falls on block boundaries.
    pub(crate) fn slice_cols(&self, cols: std::ops::Range<usize>) -> Self {
        let (cb, sb) = packed_block(self.dtype);
        let (b0, b1) = (cols.start / QK, cols.end / QK);
        let rows = self.codes.len() / self.code_row.max(1);
        let mut codes = Vec::with_capacity(rows * (b1 - b0) * cb);
        let mut scales = Vec::with_capacity(rows * (b1 - b0) * sb);
        for r in 0..rows {
            let (c, s) = self.row(r);
            let nb = c.len() / cb;
            codes.extend_from_slice(&c[b0 * cb..b1 * cb]);
            scales.extend_from_slice(&s[b0..b1]);
            if sb == 2 {
                scales.extend_from_slice(&s[nb + b0..nb + b1]);
            }
        }
        Self {
            dtype: self.dtype,
            codes,
            scales,
            code_row: (b1 - b0) * cb,
            scale_row: (b1 - b0) * sb,
        }
    }
}

/// Rows per interleaved group of [`Q4x8`].
pub(crate) const ROWS: usize = 8;

/// Q4_0 / Q4_1 weights with every 8 consecutive rows interleaved block by block, so one AVX2
/// register holds 4 codes bytes of each of 8 rows and a kernel produces 8 outputs per vector
/// operation (one integer-to-float conversion and one scale multiply per block for 8 rows,
/// instead of per row).
///
/// For group `g` (rows `8g..8g+8`) and block `b`: `codes[(g * blocks + b) * 128 ..][..128]`
/// is four 32-byte words; word `k`, row `r` holds the row's code bytes `4k..4k+4` (low nibbles
/// elements `4k..4k+4`, high nibbles elements `16+4k..16+4k+4`). `scales[(g * blocks + b) *
/// 16 ..][..16]` is the 8 rows' `d`, then their offsets `m` (Q4_1's minimum; `-8 d` for Q4_0,
/// so both types share one formula, `x = d q + m`). Rows past `rows` (padding of the last
/// group) are zero.
#[derive(Debug, Clone)]
pub(crate) struct Q4x8 {
    pub(crate) dtype: DType,
    pub(crate) rows: usize,
    pub(crate) blocks: usize,
    pub(crate) codes: Vec<u8>,
    pub(crate) scales: Vec<f32>,
}

impl Q4x8 {
    /// Bytes of codes and number of scales of one (group, block).
    pub(crate) const GROUP_BLOCK_CODES: usize = 16 * ROWS;
    pub(crate) const GROUP_BLOCK_SCALES: usize = 2 * ROWS;

    /// Interleaves a packed Q4_0 / Q4_1 matrix.
    pub(crate) fn from_packed(p: &Packed) -> Self {
        debug_assert!(matches!(p.dtype, DType::Q4_0 | DType::Q4_1));
        let blocks = p.code_row / 16;
        let rows = p.codes.len() / p.code_row.max(1);
        let groups = rows.div_ceil(ROWS);
        let mut codes = vec![0u8; groups * blocks * Self::GROUP_BLOCK_CODES];
        let mut scales = vec![0.0f32; groups * blocks * Self::GROUP_BLOCK_SCALES];
        for r in 0..rows {
            let (g, lane) = (r / ROWS, r % ROWS);
            let (c, s) = p.row(r);
            for b in 0..blocks {
                let gb = g * blocks + b;
                for k in 0..4 {
                    let at = gb * Self::GROUP_BLOCK_CODES + k * 32 + lane * 4;
                    codes[at..at + 4].copy_from_slice(&c[b * 16 + 4 * k..b * 16 + 4 * k + 4]);
                }
                let d = s[b];
                let m = if p.dtype == DType::Q4_0 {
                    -8.0 * d
                } else {
                    s[blocks + b]
                };
                scales[gb * Self::GROUP_BLOCK_SCALES + lane] = d;
                scales[gb * Self::GROUP_BLOCK_SCALES + ROWS + lane] = m;
            }
        }
        Self {
            dtype: p.dtype,
            rows,
            blocks,
            codes,
            scales,
        }
    }

    /// Back to one row after another (for slicing into tensor-parallel shards).
    pub(crate) fn to_packed(&self) -> Packed {
        let sb = if self.dtype == DType::Q4_0 { 1 } else { 2 };
        let mut codes = Vec::with_capacity(self.rows * self.blocks * 16);
        let mut scales = Vec::with_capacity(self.rows * self.blocks * sb);
        for r in 0..self.rows {
            for b in 0..self.blocks {
                let (c, _) = self.block(r, b);
                codes.extend_from_slice(&c);
            }
            scales.extend((0..self.blocks).map(|b| self.block(r, b).1.0));
            if sb == 2 {
                scales.extend((0..self.blocks).map(|b| self.block(r, b).1.1));
            }
        }
        Packed {
            dtype: self.dtype,
            codes,
            scales,
            code_row: self.blocks * 16,
            scale_row: self.blocks * sb,
        }
    }

    /// The 16 code bytes and `(d, m)` of row `r`, block `b`.
    fn block(&self, r: usize, b: usize) -> ([u8; 16], (f32, f32)) {
        let (g, lane) = (r / ROWS, r % ROWS);
        let gb = g * self.blocks + b;
        let mut c = [0u8; 16];
        for k in 0..4 {
            let at = gb * Self::GROUP_BLOCK_CODES + k * 32 + lane * 4;
            c[4 * k..4 * k + 4].copy_from_slice(&self.codes[at..at + 4]);
        }
        let s = &self.scales[gb * Self::GROUP_BLOCK_SCALES..];
        (c, (s[lane], s[ROWS + lane]))
    }

    /// Row `r` as f32 (bit for bit what [`dequantize_row`] gives for the original row: for
    /// Q4_0, `d q + (-8 d)` is exact).
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let (c, (d, m)) = self.block(r, b);
            let (lo, hi) = o.split_at_mut(16);
            for (j, &q) in c.iter().enumerate() {
                lo[j] = d * f32::from(q & 0x0F) + m;
                hi[j] = d * f32::from(q >> 4) + m;
            }
        }
    }

    /// The codes and scales of group `g` (rows `8g..8g+8`).
    pub(crate) fn group(&self, g: usize) -> (&[u8], &[f32]) {
        let (cg, sg) = (
            self.blocks * Self::GROUP_BLOCK_CODES,
            self.blocks * Self::GROUP_BLOCK_SCALES,
        );
        (
            &self.codes[g * cg..(g + 1) * cg],
            &self.scales[g * sg..(g + 1) * sg],
        )
    }
}

/// Portable version of the interleaved Q4 kernel: group `codes`/`scales` (see [`Q4x8`]) times
/// each token of `xs`, into `out[t][lane]`.
pub(crate) fn dot_q4x8_scalar(
    codes: &[u8],
    scales: &[f32],
    xs: &[QuantizedActivations],
    out: &mut [[f32; ROWS]],
) {
    let blocks = codes.len() / Q4x8::GROUP_BLOCK_CODES;
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        *o = [0.0; ROWS];
        for b in 0..blocks {
            let c = &codes[b * Q4x8::GROUP_BLOCK_CODES..(b + 1) * Q4x8::GROUP_BLOCK_CODES];
            let s = &scales[b * Q4x8::GROUP_BLOCK_SCALES..(b + 1) * Q4x8::GROUP_BLOCK_SCALES];
            let y = &x.qs[b * QK..(b + 1) * QK];
            for (lane, acc) in o.iter_mut().enumerate() {
                let mut isum = 0i32;
                for k in 0..4 {
                    for j in 0..4 {
                        let q = c[k * 32 + lane * 4 + j];
                        isum += i32::from(q & 0x0F) * i32::from(y[4 * k + j])
                            + i32::from(q >> 4) * i32::from(y[16 + 4 * k + j]);
                    }
                }
                *acc += s[lane] * x.d[b] * isum as f32 + s[ROWS + lane] * x.sd[b];
            }
        }
    }
}

/// Portable dot product of one packed weight row with quantized activations.
pub(crate) fn dot_packed_scalar(
    dtype: DType,
    codes: &[u8],
    scales: &[f32],
    x: &QuantizedActivations,
) -> f32 {
    let (cb, _) = packed_block(dtype);
    let nb = codes.len() / cb;
    let mut acc = 0.0f32;
    for (b, c) in codes.chunks_exact(cb).enumerate() {
        let qx = &x.qs[b * QK..(b + 1) * QK];
        let d = scales[b] * x.d[b];
        match dtype {
            DType::Q8_0 => {
                let isum: i32 = c
                    .iter()
                    .zip(qx)
                    .map(|(&a, &b)| i32::from(a as i8) * i32::from(b))
                    .sum();
                acc += d * isum as f32;
            }
            _ => {
                let mut isum = 0i32;
                for (j, &q) in c.iter().enumerate() {
                    isum += i32::from(q & 0x0F) * i32::from(qx[j])
                        + i32::from(q >> 4) * i32::from(qx[j + 16]);
                }
                acc += d * isum as f32;
                acc += if dtype == DType::Q4_0 {
                    -8.0 * scales[b] * x.sd[b]
                } else {
                    scales[nb + b] * x.sd[b]
                };
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantizes `x` to Q4_1 the way llama.cpp does (min/max per block).
    pub(crate) fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for xb in x.chunks_exact(QK) {
            let min = xb.iter().copied().fold(f32::INFINITY, f32::min);
            let max = xb.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            out.extend(f16::from_f32(d).to_le_bytes());
            out.extend(f16::from_f32(min).to_le_bytes());
            for j in 0..16 {
                let lo = (((xb[j] - min) * inv + 0.5) as u8).min(15);
                let hi = (((xb[j + 16] - min) * inv + 0.5) as u8).min(15);
                out.push(lo | (hi << 4));
            }
        }
        out
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn q4_1_dequantizes_low_nibbles_first() {
        let mut block = vec![0u8; 20];
        block[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        block[4] = 0x31; // element 0 = 1, element 16 = 3
        let mut out = [0.0f32; 32];
        dequantize_row(DType::Q4_1, &block, &mut out);
        assert_eq!(out[0], -0.5);
        assert_eq!(out[16], 0.5);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn integer_dot_matches_dequantized_dot() {
        let w = data(256, 7);
        let x = data(256, 99);
        let mut qa = QuantizedActivations::default();
        qa.quantize(&x);
        let row = quantize_q4_1(&w);
        let mut wd = vec![0.0; 256];
        dequantize_row(DType::Q4_1, &row, &mut wd);
        let packed = Packed::new(DType::Q4_1, 256, &row);
        let mut wp = vec![0.0; 256];
        packed.dequantize_row(0, &mut wp);
        assert_eq!(wp, wd);
        let exact: f32 = wd.iter().zip(&x).map(|(a, b)| a * b).sum();
        let (codes, scales) = packed.row(0);
        let got = dot_packed_scalar(DType::Q4_1, codes, scales, &qa);
        // Activation quantization: relative error of a few 1e-3 of Σ|w x|.
        let scale: f32 = wd.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
        assert!((got - exact).abs() < 5e-3 * scale, "{got} vs {exact}");
    }
}
