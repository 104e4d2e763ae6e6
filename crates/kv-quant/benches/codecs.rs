//! Codec throughput per dtype, in bytes of f32 per second, on one full block
//! (16 slots × 8 kv heads × head_dim 128 = 64 KiB of f32, Llama-3-8B K/V
//! geometry): `encode` (16 × `encode_token`), `decode` (`decode_slots` of all
//! 16 slots), `dot_k` (all 128 (slot, head) rows against one query) and
//! `axpy_v` (all 128 rows into one accumulator).
//!
//! `cargo bench -p kv-quant --bench codecs`

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kv_quant::{BlockLayout, KvCacheDtype, axpy_v, decode_slots, dot_k, encode_token};

const BLOCK_SIZE: usize = 16;
const HEADS: usize = 8;
const HEAD_DIM: usize = 128;

/// The dtypes benchmarked (`int4-g128` is `int4` at head_dim 128).
fn dtypes() -> Vec<KvCacheDtype> {
    KvCacheDtype::ALL
        .into_iter()
        .filter(|d| d.name() != "int4-g128")
        .collect()
}

/// Deterministic, roughly Gaussian-looking data.
fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                acc += (s as f32 / u32::MAX as f32) - 0.5;
            }
            acc * 1.7
        })
        .collect()
}

fn setup(dtype: KvCacheDtype) -> (BlockLayout, Vec<u8>, Vec<f32>) {
    let l = BlockLayout::new(dtype, BLOCK_SIZE, HEADS, HEAD_DIM).unwrap();
    let x = data(BLOCK_SIZE * l.values_per_token(), 1);
    let mut block = vec![0u8; l.kv_block_bytes()];
    for (slot, xs) in x.chunks_exact(l.values_per_token()).enumerate() {
        encode_token(&l, &mut block, slot, xs).unwrap();
    }
    (l, block, x)
}

fn f32_bytes() -> Throughput {
    Throughput::Bytes((BLOCK_SIZE * HEADS * HEAD_DIM * size_of::<f32>()) as u64)
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    g.throughput(f32_bytes());
    for dtype in dtypes() {
        let (l, mut block, x) = setup(dtype);
        // 1 unless the perf gate's end-to-end test slows this benchmark down on purpose.
        let repeat = calibration::slowdown(&format!("encode/{dtype}"));
        g.bench_function(BenchmarkId::from_parameter(dtype), |b| {
            b.iter(|| {
                for _ in 0..repeat {
                    for (slot, xs) in x.chunks_exact(l.values_per_token()).enumerate() {
                        encode_token(&l, &mut block, slot, black_box(xs)).unwrap();
                    }
                }
                black_box(&mut block);
            });
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(f32_bytes());
    for dtype in dtypes() {
        let (l, block, x) = setup(dtype);
        let mut out = vec![0.0f32; x.len()];
        g.bench_function(BenchmarkId::from_parameter(dtype), |b| {
            b.iter(|| {
                decode_slots(&l, black_box(&block), 0..BLOCK_SIZE, &mut out).unwrap();
                black_box(&mut out);
            });
        });
    }
    g.finish();
}

fn dot(c: &mut Criterion) {
    let mut g = c.benchmark_group("dot_k");
    g.throughput(f32_bytes());
    let q = data(HEAD_DIM, 2);
    for dtype in dtypes() {
        let (l, block, _) = setup(dtype);
        g.bench_function(BenchmarkId::from_parameter(dtype), |b| {
            b.iter(|| {
                let mut s = 0.0f32;
                for head in 0..HEADS {
                    for slot in 0..BLOCK_SIZE {
                        s += dot_k(&l, black_box(&block), slot, head, &q).unwrap();
                    }
                }
                black_box(s)
            });
        });
    }
    g.finish();
}

fn axpy(c: &mut Criterion) {
    let mut g = c.benchmark_group("axpy_v");
    g.throughput(f32_bytes());
    for dtype in dtypes() {
        let (l, block, _) = setup(dtype);
        let mut acc = vec![0.0f32; HEAD_DIM];
        g.bench_function(BenchmarkId::from_parameter(dtype), |b| {
            b.iter(|| {
                for head in 0..HEADS {
                    for slot in 0..BLOCK_SIZE {
                        axpy_v(&l, black_box(&block), slot, head, 0.01, &mut acc).unwrap();
                    }
                }
                black_box(&mut acc);
            });
        });
    }
    g.finish();
}

#[path = "../../../benches/calibration.rs"]
mod calibration;

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = calibration::bench, encode, decode, dot, axpy
}
criterion_main!(benches);
