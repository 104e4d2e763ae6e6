//! Linear layers on the CPU: weight matrices kept in their (block-quantized) storage type and
//! multiplied, multi-threaded, with a batch of token activations.

use rayon::prelude::*;

use super::quant::{Packed, Q4x8, QK, QuantizedActivations, ROWS, dequantize_row};
use super::simd::{dot_packed, dot_q4x8};
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
    /// Block-quantized (Q8_0), repacked for the integer kernels.
    Packed(Packed),
    /// Q4_0 / Q4_1 with groups of 8 rows interleaved for the integer kernels.
    Q4x8(Q4x8),
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
            DType::Q4_0 | DType::Q4_1 => {
                Storage::Q4x8(Q4x8::from_packed(&Packed::new(dtype, in_features, data)))
            }
            DType::Q8_0 => Storage::Packed(Packed::new(dtype, in_features, data)),
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
            Storage::Q4x8(q) => q.dtype,
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
    /// Whether the layer adds a bias.
    pub(crate) fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// The bias, if the layer adds one.
    pub(crate) fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    pub(crate) fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        let k = self.in_features;
        match &self.weights {
            Storage::F32(w) => out.copy_from_slice(&w[r * k..(r + 1) * k]),
            Storage::Packed(p) => p.dequantize_row(r, out),
            Storage::Q4x8(q) => q.dequantize_row(r, out),
        }
    }

    /// `y[t] = W x[t] + b` for every token `t` of `x`; `y` is resized to `[tokens, out]`.
    /// `scratch` is reused between calls. `x` must be [`Activations::prepare`]d for quantized
    /// weights.
    pub(crate) fn forward(&self, x: &Activations, y: &mut Vec<f32>, scratch: &mut Vec<f32>) {
        Self::forward_fused(&mut [(self, y)], x, scratch);
    }

    /// [`Linear::forward`] of several layers that read the same input (Q, K and V; gate and
    /// up), in one parallel pass: one hand-off to the thread pool instead of one per layer,
    /// which is most of the gain at batch 1.
    pub(crate) fn forward_fused(
        parts: &mut [(&Linear, &mut Vec<f32>)],
        x: &Activations,
        scratch: &mut Vec<f32>,
    ) {
        let tokens = x.tokens();
        for (layer, y) in parts.iter_mut() {
            debug_assert_eq!(x.width, layer.in_features);
            y.resize(tokens * layer.out_features, 0.0);
        }
        if tokens == 0 {
            return;
        }
        // Rows are split among threads in whole interleaved groups; each task reads its rows
        // once per four tokens and writes a `[tokens, rows]` tile of `scratch`, scattered into
        // the outputs after.
        let threads = rayon::current_num_threads();
        let mut tasks = Vec::new();
        for (p, (layer, _)) in parts.iter().enumerate() {
            let n = layer.out_features;
            let per_task = (n / (threads * 8)).clamp(ROWS, 256).next_multiple_of(ROWS);
            tasks.extend(
                (0..n)
                    .step_by(per_task)
                    .map(|r| (p, r..(r + per_task).min(n))),
            );
        }
        let total: usize = parts.iter().map(|(l, _)| l.out_features).sum();
        scratch.resize(tokens * total, 0.0);
        let mut tiles = Vec::with_capacity(tasks.len());
        let mut rest = &mut scratch[..];
        for (_, rows) in &tasks {
            let (tile, tail) = rest.split_at_mut(rows.len() * tokens);
            tiles.push(tile);
            rest = tail;
        }
        tiles
            .into_par_iter()
            .zip(&tasks)
            .for_each(|(tile, (p, rows))| parts[*p].0.tile(x, rows.clone(), tile));
        let mut offset = 0;
        for (p, rows) in &tasks {
            let (layer, y) = &mut parts[*p];
            let n = layer.out_features;
            let tile = &scratch[offset..offset + rows.len() * tokens];
            for (yt, src) in y.chunks_exact_mut(n).zip(tile.chunks_exact(rows.len())) {
                yt[rows.clone()].copy_from_slice(src);
            }
            offset += tile.len();
        }
        for (layer, y) in parts.iter_mut() {
            if let Some(bias) = &layer.bias {
                for yt in y.chunks_exact_mut(layer.out_features) {
                    for (o, b) in yt.iter_mut().zip(bias) {
                        *o += b;
                    }
                }
            }
        }
    }

    /// Outputs `rows` (starting on a group boundary) for every token of `x`, into `tile`
    /// laid out `[tokens, rows]`.
    fn tile(&self, x: &Activations, rows: std::ops::Range<usize>, tile: &mut [f32]) {
        let (tokens, k, n) = (x.tokens(), self.in_features, rows.len());
        let xq = &x.quantized;
        match &self.weights {
            Storage::F32(w) => {
                for (i, r) in rows.enumerate() {
                    let w = &w[r * k..(r + 1) * k];
                    for t in 0..tokens {
                        tile[t * n + i] = dot_f32(w, &x.f32[t * k..(t + 1) * k]);
                    }
                }
            }
            Storage::Packed(p) => {
                for (i, r) in rows.enumerate() {
                    let (codes, scales) = p.row(r);
                    for t0 in (0..tokens).step_by(4) {
                        let xs = &xq[t0..(t0 + 4).min(tokens)];
                        let mut o = [0.0f32; 4];
                        dot_packed(p.dtype, codes, scales, xs, &mut o[..xs.len()]);
                        for (j, v) in o[..xs.len()].iter().enumerate() {
                            tile[(t0 + j) * n + i] = *v;
                        }
                    }
                }
            }
            Storage::Q4x8(q) => {
                for g in (0..n).step_by(ROWS) {
                    let (codes, scales) = q.group((rows.start + g) / ROWS);
                    let lanes = (n - g).min(ROWS);
                    for t0 in (0..tokens).step_by(4) {
                        let xs = &xq[t0..(t0 + 4).min(tokens)];
                        let mut o = [[0.0f32; ROWS]; 4];
                        dot_q4x8(codes, scales, xs, &mut o[..xs.len()]);
                        for (j, v) in o[..xs.len()].iter().enumerate() {
                            let at = (t0 + j) * n + g;
                            if lanes == ROWS {
                                tile[at..at + ROWS].copy_from_slice(v);
                            } else {
                                tile[at..at + lanes].copy_from_slice(&v[..lanes]);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Rows `rows` only (column-parallel shard: a slice of the outputs).
    pub(crate) fn slice_rows(&self, rows: std::ops::Range<usize>) -> Self {
        let k = self.in_features;
        let weights = match &self.weights {
            Storage::F32(w) => Storage::F32(w[rows.start * k..rows.end * k].to_vec()),
            Storage::Packed(p) => Storage::Packed(p.slice_rows(rows.clone())),
            Storage::Q4x8(q) => {
                Storage::Q4x8(Q4x8::from_packed(&q.to_packed().slice_rows(rows.clone())))
            }
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
            Storage::Packed(p) => Storage::Packed(p.slice_cols(cols.clone())),
            Storage::Q4x8(q) => {
                Storage::Q4x8(Q4x8::from_packed(&q.to_packed().slice_cols(cols.clone())))
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
