//! Decode-attention timing on the GPU: Llama-3-8B heads (32 query / 8 KV, d = 128), batch ×
//! context, for bf16, int8 and int4 (groups of 32, and one group per head) KV: median time per
//! launch of back-to-back launches (both kernels of split-KV, host launch cost overlapped) over
//! copies of the cache rotated past the L2, and the effective bandwidth (K + V bytes read /
//! time). Run next to `scripts/bench_attention_baseline.py` (PyTorch SDPA and the copy
//! roofline) in the same call:
//!
//! `attention_bench [--quick | --shapes 64x1024,16x4096] [--kv bf16,int4] [--partition N]
//! [--block-size N] [--profile]`
//! (`KVSERVE_KERNEL_DEFINES=-DKV_UNROLL=8` to try a kernel variant; the default tensor-core
//! kernel runs every row, `KVSERVE_DECODE_KERNEL=split` runs them on the CUDA-core kernel).
//! `--profile`: one warm-up and one measured launch per case and no timing, for
//! `cargo xtask profile` (ncu).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::{cache_bytes, median_us, open_gpu, query};
use half::bf16;
use kernels_cuda::{DecodeMetadata, PagedDecoder};
use kv_quant::{BlockLayout, KvCacheDtype};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let profile = std::env::args().any(|a| a == "--profile");
    // `--partition N`: force the split (tokens per CTA) instead of the automatic choice.
    let partition: Option<usize> = std::env::args()
        .skip_while(|a| a != "--partition")
        .nth(1)
        .map(|p| p.parse().unwrap());
    let gpu = open_gpu();
    let stream = gpu.stream().clone();
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    // `--shapes 64x1024,16x4096`: these batch x context cases only.
    let only: Option<Vec<(usize, usize)>> = arg("--shapes").map(|v| {
        v.split(',')
            .map(|c| {
                let (b, l) = c.split_once('x').unwrap();
                (b.parse().unwrap(), l.parse().unwrap())
            })
            .collect()
    });
    // `--kv bf16,int4`: these KV dtypes only (bf16 first, for the ratios).
    let kv: Vec<KvCacheDtype> = arg("--kv")
        .unwrap_or_else(|| "bf16,int8,int4-g32,int4".into())
        .split(',')
        .map(|d| d.parse().unwrap())
        .collect();
    let shapes: Vec<(usize, usize)> = if let Some(only) = only {
        only
    } else if quick {
        vec![(1, 4096), (16, 4096), (64, 4096)]
    } else {
        let mut v = Vec::new();
        for b in [1, 16, 64, 256] {
            for l in [1024, 4096, 32768] {
                if b * l <= 64 * 32768 {
                    v.push((b, l));
                }
            }
        }
        v
    };
    // `--block-size N`: tokens per cache block (default 16).
    let bs: usize = std::env::args()
        .skip_while(|a| a != "--block-size")
        .nth(1)
        .map_or(16, |p| p.parse().unwrap());
    let (kv_heads, heads, d) = (8, 32, 128);
    println!("| batch | context | KV | µs | K+V GB/s | ratio to bf16 |");
    println!("| ---: | ---: | --- | ---: | ---: | ---: |");
    for (b, l) in shapes {
        let mut bf16_us = 0.0;
        for &dtype in &kv {
            let layout = BlockLayout::new(dtype, bs, kv_heads, d).unwrap();
            let per_seq = l / bs;
            let num_blocks = b * per_seq;
            let bb = layout.kv_block_bytes();
            let bytes = cache_bytes(num_blocks * bb);
            // Enough copies of the cache that back-to-back launches do not hit in the L2
            // (at least 256 MiB read per round), as the SDPA baseline does.
            let sets = (256usize << 20).div_ceil(2 * bytes.len()).clamp(1, 64);
            let caches: Vec<_> = (0..sets)
                .map(|_| {
                    (
                        stream.clone_htod(&bytes).unwrap(),
                        stream.clone_htod(&bytes).unwrap(),
                    )
                })
                .collect();
            let tables: Vec<i32> = (0..num_blocks as i32).collect();
            let ctx = vec![l as i32; b];
            let meta =
                DecodeMetadata::new(&gpu, &tables, per_seq, &ctx, bs, num_blocks, None).unwrap();
            let q = stream.clone_htod(&query(b * heads * d)).unwrap();
            let mut out = stream.alloc_zeros::<bf16>(b * heads * d).unwrap();
            let mut dec = PagedDecoder::new();
            dec.set_partition_size(partition).unwrap();
            let launches = sets.max(8);
            if profile {
                for _ in 0..2 {
                    dec.run(
                        &gpu,
                        &meta,
                        &layout,
                        heads,
                        &q,
                        &caches[0].0,
                        &caches[0].1,
                        &mut out,
                    )
                    .unwrap();
                }
                stream.synchronize().unwrap();
                println!("| {b} | {l} | {dtype} | (profiled) | | |");
                continue;
            }
            let us = median_us(&gpu, 15, launches, |i| {
                let (kc, vc) = &caches[i % sets];
                dec.run(&gpu, &meta, &layout, heads, &q, kc, vc, &mut out)
                    .unwrap();
            });
            let read = 2.0 * (b * l * kv_heads * layout.bytes_per_token_per_head()) as f64;
            if dtype == KvCacheDtype::Bf16 {
                bf16_us = us;
            }
            println!(
                "| {b} | {l} | {dtype} | {us:.1} | {:.0} | {:.2} |",
                read / us / 1e3,
                us / bf16_us
            );
        }
    }
}
