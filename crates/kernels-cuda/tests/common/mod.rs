//! What the GPU test suites share (`mod common;` in each): the device, activation-type
//! conversions, a paged cache of random tokens encoded by kv-quant's CPU codecs (with the
//! decoded values the kernels must see), and softmax attention in f64 over it.

#![allow(dead_code, unreachable_pub)]

use std::ops::Range;

use half::{bf16, f16};
use kernels_cuda::{ActScalar, DecodeMetadata, Gpu};
use kv_quant::BlockLayout;
use rand::Rng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

pub fn gpu() -> Gpu {
    Gpu::new(0).expect("a CUDA device (these tests are for the GPU machine)")
}

/// An activation type as the tests convert it.
pub trait Act: ActScalar {
    fn of(x: f32) -> Self;
    fn f32(self) -> f32;
    const NAN: Self;
}

impl Act for bf16 {
    fn of(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn f32(self) -> f32 {
        self.to_f32()
    }
    const NAN: Self = bf16::NAN;
}

impl Act for f16 {
    fn of(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn f32(self) -> f32 {
        self.to_f32()
    }
    const NAN: Self = f16::NAN;
}

/// An activation type's bit pattern (NaN payloads included).
pub trait Bits: Act {
    fn bits(self) -> u16;
}

impl Bits for bf16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

impl Bits for f16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

/// Llama-style inverse frequencies (base 500000): `inv[0] = 1`, so the angle of pair 0 is
/// the position itself.
pub fn inv_freq(d: usize) -> Vec<f32> {
    (0..d / 2)
        .map(|i| 1.0 / 500_000f32.powf(2.0 * i as f32 / d as f32))
        .collect()
}

/// The first index where a fused path's values differ from the separate launches', as a
/// message (`None`: the same).
pub fn first_diff<X: PartialEq + std::fmt::Debug>(
    what: &str,
    got: &[X],
    want: &[X],
) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{what}: {} vs {} elements", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some(format!(
        "{what}: {n} differ, first at {i}: fused {:?}, separate {:?}",
        got[i], want[i]
    ))
}

/// Random values in bf16 precision (returned as the f32 both sides use).
pub fn random_bf16(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    random_act::<bf16>(rng, n, scale)
}

/// Random values in `[-scale, scale)` in the precision of `T` (as f32).
pub fn random_act<T: Act>(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| T::of(rng.random_range(-1.0f32..1.0) * scale).f32())
        .collect()
}

pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// K and V caches of one layer in kv-quant's block layout, filled on the CPU, and the values
/// they decode to.
pub struct PagedCache {
    /// `[num_seqs][max_blocks]` block ids; entries no token was written to stay -1.
    pub tables: Vec<i32>,
    pub max_blocks: usize,
    /// Blocks in each cache (a few more than the tables use).
    pub num_blocks: usize,
    pub k: Vec<u8>,
    pub v: Vec<u8>,
    /// Decoded K and V per sequence, `[position][kv head][head_dim]` (zero before the first
    /// written block).
    pub k_dec: Vec<Vec<f32>>,
    pub v_dec: Vec<Vec<f32>>,
}

/// A paged cache for sequences `(first, context)`: positions `first..context` of each
/// (rounded down to whole blocks) are written into blocks in random order, each token's K and
/// V values (`num_kv_heads * head_dim` each) drawn by `token`; table rows have `max_blocks`
/// entries.
pub fn paged_cache(
    rng: &mut ChaCha8Rng,
    l: &BlockLayout,
    seqs: &[(usize, usize)],
    max_blocks: usize,
    mut token: impl FnMut(&mut ChaCha8Rng) -> (Vec<f32>, Vec<f32>),
) -> PagedCache {
    let (bs, kvh, d) = (l.block_size(), l.num_kv_heads(), l.head_dim());
    let bb = l.kv_block_bytes();
    let num_blocks: usize = seqs.iter().map(|s| s.1.div_ceil(bs)).sum::<usize>() + 3;
    let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
    ids.shuffle(rng);
    let mut tables = vec![-1i32; seqs.len() * max_blocks];
    let mut next = 0;
    let mut kc = vec![0u8; num_blocks * bb];
    let mut vc = vec![0u8; num_blocks * bb];
    let mut k_dec = Vec::new();
    let mut v_dec = Vec::new();
    for (s, &(first, ctx)) in seqs.iter().enumerate() {
        let mut kd = vec![0f32; ctx * kvh * d];
        let mut vd = vec![0f32; ctx * kvh * d];
        for j in first / bs..ctx.div_ceil(bs) {
            let b = ids[next] as usize;
            next += 1;
            tables[s * max_blocks + j] = b as i32;
            let n = bs.min(ctx - j * bs);
            let block = b * bb..(b + 1) * bb;
            for o in 0..n {
                let (k, v) = token(rng);
                kv_quant::encode_token(l, &mut kc[block.clone()], o, &k).unwrap();
                kv_quant::encode_token(l, &mut vc[block.clone()], o, &v).unwrap();
            }
            let rows = j * bs * kvh * d..(j * bs + n) * kvh * d;
            kv_quant::decode_slots(l, &kc[block.clone()], 0..n, &mut kd[rows.clone()]).unwrap();
            kv_quant::decode_slots(l, &vc[block], 0..n, &mut vd[rows]).unwrap();
        }
        k_dec.push(kd);
        v_dec.push(vd);
    }
    PagedCache {
        tables,
        max_blocks,
        num_blocks,
        k: kc,
        v: vc,
        k_dec,
        v_dec,
    }
}

/// A decode batch over a paged cache of random tokens: sequences of `contexts` tokens (every
/// position written; K in [-2, 2), V in [-1, 1), in the precision of `T`), tables of just
/// enough entries for the longest, and the batch's metadata on the device.
pub fn decode_batch<T: Act>(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    l: &BlockLayout,
    contexts: &[usize],
    window: Option<usize>,
) -> (PagedCache, DecodeMetadata) {
    let (bs, kvh, d) = (l.block_size(), l.num_kv_heads(), l.head_dim());
    let max_blocks = contexts.iter().max().unwrap().div_ceil(bs);
    let seqs: Vec<(usize, usize)> = contexts.iter().map(|&ctx| (0, ctx)).collect();
    let cache = paged_cache(rng, l, &seqs, max_blocks, |rng| {
        (
            random_act::<T>(rng, kvh * d, 2.0),
            random_act::<T>(rng, kvh * d, 1.0),
        )
    });
    let ctx_i: Vec<i32> = contexts.iter().map(|&x| x as i32).collect();
    let meta = DecodeMetadata::new(
        gpu,
        &cache.tables,
        max_blocks,
        &ctx_i,
        bs,
        cache.num_blocks,
        window,
    )
    .unwrap();
    (cache, meta)
}

/// Softmax attention in f64 of query head `q` (`head_dim` values) over `positions` of KV head
/// `kv` of decoded K and V (`[position][num_kv_heads][head_dim]`), scaled by 1/sqrt(head_dim).
pub fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    num_kv_heads: usize,
    kv: usize,
    positions: Range<usize>,
) -> Vec<f64> {
    let d = q.len();
    let row = |t: usize| (t * num_kv_heads + kv) * d..(t * num_kv_heads + kv + 1) * d;
    let logits: Vec<f64> = positions
        .clone()
        .map(|t| {
            q.iter()
                .zip(&k[row(t)])
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>()
                / (d as f64).sqrt()
        })
        .collect();
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut out = vec![0f64; d];
    for (t, wt) in positions.zip(&w) {
        for (o, x) in out.iter_mut().zip(&v[row(t)]) {
            *o += wt * f64::from(*x);
        }
    }
    out.iter().map(|o| o / total).collect()
}

/// Max |out − ref| and max |ref|, accumulated over outputs: the relative error of a case.
#[derive(Debug, Clone, Copy)]
pub struct MaxError {
    err: f64,
    scale: f64,
}

impl Default for MaxError {
    fn default() -> Self {
        Self {
            err: 0.0,
            scale: 1e-30,
        }
    }
}

impl MaxError {
    pub fn add(&mut self, got: f64, want: f64) {
        self.err = self.err.max((got - want).abs());
        self.scale = self.scale.max(want.abs());
    }

    /// Max |out − ref| / max |ref|.
    pub fn relative(&self) -> f64 {
        self.err / self.scale
    }
}
