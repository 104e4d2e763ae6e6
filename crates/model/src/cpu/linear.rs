//! Linear layers on the CPU: weight matrices kept in their (block-quantized) storage type and
//! multiplied, multi-threaded, with a batch of token activations.

use rayon::prelude::*;

use super::quant::{Packed, QK, QuantizedActivations, dequantize_row};
use super::simd::dot_packed;
use crate::DType;
use crate::error::ModelError;

/// A weight matrix `[out_features, in_features]` (row `r` = output `r`) with an optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    in_features: usize,
    out_features: usize,
    weights: Storage,
    bias: Option<Vec<f32>>,
}

/// How a [`Linear`] keeps its weights.
#[derive(Debug, Clone)]
enum Storage {
    /// Row-major f32.
    F32(Vec<f32>),
    /// Block-quantized, repacked for the integer kernels.
    Packed(Packed),
}

/// The input of a batch of tokens to a linear layer: f32 and, for quantized weights, int8.
#[derive(Debug, Default)]
pub(crate) struct Activations {
    /// `[tokens, width]`.
    pub(crate) f32: Vec<f32>,
    /// One per token, filled by [`Activations::prepare`].
    pub(crate) quantized: Vec<QuantizedActivations>,
    pub(crate) width: usize,
}

impl Activations {
    /// Resizes for `tokens` tokens of `width` values (contents unspecified until written).
    pub(crate) fn resize(&mut self, tokens: usize, width: usize) {
        self.width = width;
        self.f32.resize(tokens * width, 0.0);
    }

    pub(crate) fn tokens(&self) -> usize {
        self.f32.len().checked_div(self.width).unwrap_or(0)
    }

    /// Quantizes every token's f32 values (needed before a quantized matmul).
    pub(crate) fn prepare(&mut self) {
        let tokens = self.tokens();
        self.quantized
            .resize_with(tokens, QuantizedActivations::default);
        if self.width.is_multiple_of(QK) {
            let width = self.width;
            self.quantized
                .par_iter_mut()
                .zip(self.f32.par_chunks(width))
                .for_each(|(q, x)| q.quantize(x));
        }
    }
}

impl Linear {
    /// A layer from raw rows in `dtype` (`out_features` rows of `in_features` elements).
    /// Types the CPU has no kernel for are converted: F16/BF16 to F32 (exactly), Q4_K/Q6_K to
    /// Q8_0.
    pub fn from_raw(
        name: &str,
        dtype: DType,
        in_features: usize,
        out_features: usize,
        data: &[u8],
        bias: Option<Vec<f32>>,
    ) -> Result<Self, ModelError> {
        let row_bytes = dtype
            .row_bytes(in_features)
            .ok_or_else(|| ModelError::BadTensor {
                name: name.to_owned(),
                reason: format!("{in_features} columns are not whole {dtype} blocks"),
            })?;
        let expected = row_bytes.checked_mul(out_features);
        if expected != Some(data.len()) {
            return Err(ModelError::BadTensor {
                name: name.to_owned(),
                reason: format!(
                    "{} bytes for [{out_features}, {in_features}] {dtype}, expected {expected:?}",
                    data.len()
                ),
            });
        }
        if let Some(b) = &bias
            && b.len() != out_features
        {
            return Err(ModelError::BadTensor {
                name: name.to_owned(),
                reason: format!("bias has {} values for {out_features} outputs", b.len()),
            });
        }
        let weights = match dtype {
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
                Storage::Packed(Packed::new(dtype, in_features, data))
            }
            _ if dtype.is_quantized() && in_features.is_multiple_of(QK) => {
                Storage::Packed(Packed::new(
                    DType::Q8_0,
                    in_features,
                    &requantize_q8_0(dtype, in_features, row_bytes, data),
                ))
            }
            _ => Storage::F32(to_f32(dtype, in_features, row_bytes, data)),
        };
        Ok(Self {
            in_features,
            out_features,
            weights,
            bias,
        })
    }

    /// Storage type of the weights.
    pub fn dtype(&self) -> DType {
        match &self.weights {
            Storage::F32(_) => DType::F32,
            Storage::Packed(p) => p.dtype,
        }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The same layer with its weights dequantized to f32: exact math (no activation
    /// quantization) at 4 bytes per weight, the reference the quantized path is checked against.
    pub fn to_f32(&self) -> Self {
        let k = self.in_features;
        let mut w = vec![0.0f32; k * self.out_features];
        for (r, row) in w.chunks_exact_mut(k.max(1)).enumerate() {
            self.dequantize_row_into(r, row);
        }
        Self {
            in_features: k,
            out_features: self.out_features,
            weights: Storage::F32(w),
            bias: self.bias.clone(),
        }
    }

    /// Row `r` dequantized into `out` (`in_features` long): the embedding lookup.
    pub(crate) fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        let k = self.in_features;
        match &self.weights {
            Storage::F32(w) => out.copy_from_slice(&w[r * k..(r + 1) * k]),
            Storage::Packed(p) => p.dequantize_row(r, out),
        }
    }

    /// `y[t] = W x[t] + b` for every token `t` of `x`; `y` is resized to `[tokens, out]`.
    /// `scratch` is reused between calls. `x` must be [`Activations::prepare`]d for quantized
    /// weights.
    pub(crate) fn forward(&self, x: &Activations, y: &mut Vec<f32>, scratch: &mut Vec<f32>) {
        let tokens = x.tokens();
        let (n, k) = (self.out_features, self.in_features);
        debug_assert_eq!(x.width, k);
        y.resize(tokens * n, 0.0);
        if tokens == 0 {
            return;
        }
        // Rows are split among threads; each thread reads its rows once and applies them to
        // every token (four at a time for quantized rows), writing a `[rows, tokens]` tile of
        // the transposed output.
        let rows_per_task = (n / (rayon::current_num_threads() * 8)).clamp(8, 256);
        let out: &mut [f32] = if tokens == 1 {
            y
        } else {
            scratch.resize(tokens * n, 0.0);
            scratch
        };
        let quantized: Vec<&QuantizedActivations> = x.quantized.iter().collect();
        out.par_chunks_mut(rows_per_task * tokens)
            .enumerate()
            .for_each(|(task, tile)| {
                let first = task * rows_per_task;
                for (i, out_row) in tile.chunks_exact_mut(tokens).enumerate() {
                    let r = first + i;
                    match &self.weights {
                        Storage::F32(w) => {
                            let w = &w[r * k..(r + 1) * k];
                            for (t, o) in out_row.iter_mut().enumerate() {
                                *o = dot_f32(w, &x.f32[t * k..(t + 1) * k]);
                            }
                        }
                        Storage::Packed(p) => {
                            let (codes, scales) = p.row(r);
                            for (xs, o) in quantized.chunks(4).zip(out_row.chunks_mut(4)) {
                                dot_packed(p.dtype, codes, scales, xs, o);
                            }
                        }
                    }
                }
            });
        if tokens > 1 {
            for (r, col) in scratch.chunks_exact(tokens).enumerate() {
                for (t, &v) in col.iter().enumerate() {
                    y[t * n + r] = v;
                }
            }
        }
        if let Some(bias) = &self.bias {
            for yt in y.chunks_exact_mut(n) {
                for (o, b) in yt.iter_mut().zip(bias) {
                    *o += b;
                }
            }
        }
    }

    /// Rows `rows` only (column-parallel shard: a slice of the outputs).
    pub(crate) fn slice_rows(&self, rows: std::ops::Range<usize>) -> Self {
        let k = self.in_features;
        let weights = match &self.weights {
            Storage::F32(w) => Storage::F32(w[rows.start * k..rows.end * k].to_vec()),
            Storage::Packed(p) => Storage::Packed(Packed {
                dtype: p.dtype,
                codes: p.codes[rows.start * p.code_row..rows.end * p.code_row].to_vec(),
                scales: p.scales[rows.start * p.scale_row..rows.end * p.scale_row].to_vec(),
                code_row: p.code_row,
                scale_row: p.scale_row,
            }),
        };
        Self {
            in_features: k,
            out_features: rows.len(),
            weights,
            bias: self.bias.as_ref().map(|b| b[rows].to_vec()),
        }
    }

    /// Columns `cols` only (row-parallel shard: a slice of the inputs). `cols` must fall on
    /// block boundaries. The bias stays with rank 0's shard (`keep_bias`).
    pub(crate) fn slice_cols(&self, cols: std::ops::Range<usize>, keep_bias: bool) -> Self {
        let k = self.in_features;
        let weights = match &self.weights {
            Storage::F32(w) => Storage::F32(
                w.chunks_exact(k)
                    .flat_map(|row| row[cols.clone()].iter().copied())
                    .collect(),
            ),
            Storage::Packed(p) => {
                let (cb, sb) = super::quant::packed_block(p.dtype);
                let (b0, b1) = (cols.start / QK, cols.end / QK);
                let mut codes = Vec::with_capacity(self.out_features * (b1 - b0) * cb);
                let mut scales = Vec::with_capacity(self.out_features * (b1 - b0) * sb);
                for r in 0..self.out_features {
                    let (c, s) = p.row(r);
                    let nb = c.len() / cb;
                    codes.extend_from_slice(&c[b0 * cb..b1 * cb]);
                    scales.extend_from_slice(&s[b0..b1]);
                    if sb == 2 {
                        scales.extend_from_slice(&s[nb + b0..nb + b1]);
                    }
                }
                Storage::Packed(Packed {
                    dtype: p.dtype,
                    codes,
                    scales,
                    code_row: (b1 - b0) * cb,
                    scale_row: (b1 - b0) * sb,
                })
            }
        };
        Self {
            in_features: cols.len(),
            out_features: self.out_features,
            weights,
            bias: if keep_bias { self.bias.clone() } else { None },
        }
    }
}

fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (wc, xc) in w.chunks_exact(8).zip(x.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += wc[i] * xc[i];
        }
    }
    let tail = x.len() / 8 * 8;
    acc.iter().sum::<f32>()
        + w[tail..]
            .iter()
            .zip(&x[tail..])
            .map(|(a, b)| a * b)
            .sum::<f32>()
}

fn to_f32(dtype: DType, cols: usize, row_bytes: usize, data: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0f32; data.len() / row_bytes.max(1) * cols];
    for (r, o) in data.chunks_exact(row_bytes).zip(out.chunks_exact_mut(cols)) {
        dequantize_row(dtype, r, o);
    }
    out
}

/// Re-encodes rows as Q8_0 (for K-quants, which the CPU kernels do not read directly).
fn requantize_q8_0(dtype: DType, cols: usize, row_bytes: usize, data: &[u8]) -> Vec<u8> {
    let mut row = vec![0.0f32; cols];
    let mut out = Vec::with_capacity(data.len() / row_bytes.max(1) * cols / QK * 34);
    for r in data.chunks_exact(row_bytes) {
        dequantize_row(dtype, r, &mut row);
        for block in row.chunks_exact(QK) {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            out.extend(half::f16::from_f32(d).to_le_bytes());
            out.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
        }
    }
    out
}
