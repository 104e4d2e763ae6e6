//! Attention-level accuracy harness, shared by `tests/attention.rs` and
//! `examples/attention_error.rs`: softmax(q·Kᵀ/√d)·V with K and V stored in
//! quantized blocks and read through `dot_k` / `axpy_v` (as the fused kernels
//! do), against the same attention in f64 on the unquantized data.

#![allow(dead_code, unreachable_pub)]

use kv_quant::{BlockLayout, KvCacheDtype, KvQuantError, axpy_v, dot_k, encode_token};

/// SplitMix64: tiny, deterministic, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn gaussian(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// One attention problem for a single kv head.
#[derive(Debug, Clone)]
pub struct Case {
    pub tokens: usize,
    pub head_dim: usize,
    /// `[query][head_dim]`
    pub queries: Vec<f32>,
    /// `[token][head_dim]`
    pub k: Vec<f32>,
    /// `[token][head_dim]`
    pub v: Vec<f32>,
}

/// Gaussian K, V and queries; `outliers` channels of K and V are multiplied
/// by `outlier_scale` (real K caches have a few such channels).
pub fn make_case(
    seed: u64,
    tokens: usize,
    head_dim: usize,
    num_queries: usize,
    outliers: &[usize],
    outlier_scale: f32,
) -> Case {
    let mut rng = Rng::new(seed);
    let mut gen_rows = |rows: usize, boost: bool| -> Vec<f32> {
        (0..rows * head_dim)
            .map(|i| {
                let g = rng.gaussian();
                if boost && outliers.contains(&(i % head_dim)) {
                    g * outlier_scale
                } else {
                    g
                }
            })
            .collect()
    };
    let k = gen_rows(tokens, true);
    let v = gen_rows(tokens, true);
    let queries = gen_rows(num_queries, false);
    Case {
        tokens,
        head_dim,
        queries,
        k,
        v,
    }
}

/// Reference attention output for one query, in f64.
pub fn attention_f64(case: &Case, q: &[f32]) -> Vec<f64> {
    let d = case.head_dim;
    let scale = 1.0 / (d as f64).sqrt();
    let logits: Vec<f64> = case
        .k
        .chunks_exact(d)
        .map(|k| {
            scale
                * q.iter()
                    .zip(k)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>()
        })
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0.0f64; d];
    for (w, v) in weights.iter().zip(case.v.chunks_exact(d)) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w / total * f64::from(x);
        }
    }
    out
}

/// K and V of `case` written into blocks of `dtype` (one kv head).
#[derive(Debug, Clone)]
pub struct QuantizedCache {
    pub layout: BlockLayout,
    pub k_blocks: Vec<Vec<u8>>,
    pub v_blocks: Vec<Vec<u8>>,
}

pub fn quantize(
    case: &Case,
    dtype: KvCacheDtype,
    block_size: usize,
) -> Result<QuantizedCache, KvQuantError> {
    let layout = BlockLayout::new(dtype, block_size, 1, case.head_dim)?;
    let n_blocks = case.tokens.div_ceil(block_size);
    let mut k_blocks = vec![vec![0u8; layout.kv_block_bytes()]; n_blocks];
    let mut v_blocks = k_blocks.clone();
    let d = case.head_dim;
    for (t, (k, v)) in case
        .k
        .chunks_exact(d)
        .zip(case.v.chunks_exact(d))
        .enumerate()
    {
        let (b, s) = (t / block_size, t % block_size);
        encode_token(&layout, &mut k_blocks[b], s, k)?;
        encode_token(&layout, &mut v_blocks[b], s, v)?;
    }
    Ok(QuantizedCache {
        layout,
        k_blocks,
        v_blocks,
    })
}

/// Attention for one query over the quantized cache, through `dot_k` and
/// `axpy_v`, in f32 (as a CPU kernel would).
pub fn attention_quantized(
    cache: &QuantizedCache,
    tokens: usize,
    q: &[f32],
) -> Result<Vec<f32>, KvQuantError> {
    let l = &cache.layout;
    let bs = l.block_size();
    let scale = 1.0 / (l.head_dim() as f32).sqrt();
    let mut logits = Vec::with_capacity(tokens);
    for t in 0..tokens {
        logits.push(scale * dot_k(l, &cache.k_blocks[t / bs], t % bs, 0, q)?);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let total: f32 = weights.iter().sum();
    let mut out = vec![0.0f32; l.head_dim()];
    for (t, w) in weights.iter().enumerate() {
        axpy_v(l, &cache.v_blocks[t / bs], t % bs, 0, w / total, &mut out)?;
    }
    Ok(out)
}

/// `‖a − b‖₂ / ‖b‖₂`.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - y).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// Mean and max relative error of the attention output over the case's
/// queries.
pub fn attention_rel_err(
    case: &Case,
    dtype: KvCacheDtype,
    block_size: usize,
) -> Result<(f64, f64), KvQuantError> {
    let cache = quantize(case, dtype, block_size)?;
    let mut sum = 0.0;
    let mut max = 0.0f64;
    let mut n = 0;
    for q in case.queries.chunks_exact(case.head_dim) {
        let reference = attention_f64(case, q);
        let got = attention_quantized(&cache, case.tokens, q)?;
        let e = rel_err(&got, &reference);
        sum += e;
        max = max.max(e);
        n += 1;
    }
    Ok((sum / f64::from(n), max))
}

/// The standard accuracy setup: 512 tokens, blocks of 16, 16 queries,
/// channels 3, 17 and 42 of K and V scaled ×20.
pub const TOKENS: usize = 512;
pub const BLOCK_SIZE: usize = 16;
pub const QUERIES: usize = 16;
pub const OUTLIERS: [usize; 3] = [3, 17, 42];
pub const OUTLIER_SCALE: f32 = 20.0;

pub fn standard_case(head_dim: usize, with_outliers: bool) -> Case {
    let outliers: &[usize] = if with_outliers { &OUTLIERS } else { &[] };
    make_case(
        0x5EED_0000 + head_dim as u64,
        TOKENS,
        head_dim,
        QUERIES,
        outliers,
        OUTLIER_SCALE,
    )
}
