//! Decode-attention timing on the GPU: Llama-3-8B heads (32 query / 8 KV, d = 128), batch ×
//! context, for bf16, int8 and int4 KV: median time per launch of back-to-back launches (both
//! kernels of split-KV, host launch cost overlapped) over copies of the cache rotated past the
//! L2, and the effective bandwidth (K + V bytes read / time). Run next to
//! `scripts/bench_attention_baseline.py` (PyTorch SDPA and the copy roofline) in the same call:
//!
//! `attention_bench [--quick] [--partition N] [--profile]` (`KVSERVE_KERNEL_DEFINES=-DKV_UNROLL=8`
//! to try a kernel variant; `KVSERVE_DECODE_KERNEL=split` for the CUDA-core kernel on the rows
//! the default tensor-core kernel runs: bf16 and int8). `--profile`: one warm-up and one measured launch per case and no
//! timing, for `cargo xtask profile` (ncu).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use half::bf16;
use kernels_cuda::cudarc::driver::sys::CUevent_flags;
use kernels_cuda::{DecodeMetadata, Gpu, PagedDecoder};
use kv_quant::{BlockLayout, KvCacheDtype};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let profile = std::env::args().any(|a| a == "--profile");
    // `--partition N`: force the split (tokens per CTA) instead of the automatic choice.
    let partition: Option<usize> = std::env::args()
        .skip_while(|a| a != "--partition")
        .nth(1)
        .map(|p| p.parse().unwrap());
    let gpu = Gpu::new(0).unwrap();
    let stream = gpu.stream().clone();
    println!(
        "device: {} ({}, {} SMs)",
        gpu.name(),
        gpu.arch(),
        gpu.num_sms()
    );
    let shapes: Vec<(usize, usize)> = if quick {
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
    let (kv_heads, heads, d, bs) = (8, 32, 128, 16);
    println!("| batch | context | KV | µs | K+V GB/s | ratio to bf16 |");
    println!("| ---: | ---: | --- | ---: | ---: | ---: |");
    for (b, l) in shapes {
        let mut bf16_us = 0.0;
        for dtype in [
            KvCacheDtype::Bf16,
            KvCacheDtype::Int8,
            "int4-g32".parse().unwrap(),
        ] {
            let layout = BlockLayout::new(dtype, bs, kv_heads, d).unwrap();
            let per_seq = l / bs;
            let num_blocks = b * per_seq;
            let bb = layout.kv_block_bytes();
            // Random bytes: any code is a valid value (scales included, finite or not does
            // not change the memory traffic); never zeros.
            let bytes: Vec<u8> = (0..num_blocks * bb)
                .map(|i| ((i as u64).wrapping_mul(0x9e37_79b9) >> 13) as u8 & 0x3f)
                .collect();
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
            let q: Vec<bf16> = (0..b * heads * d)
                .map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) / 64.0))
                .collect();
            let q = stream.clone_htod(&q).unwrap();
            let mut out = stream.alloc_zeros::<bf16>(b * heads * d).unwrap();
            let mut dec = PagedDecoder::new();
            dec.set_partition_size(partition).unwrap();
            let launches = sets.max(8);
            let mut round = |dec: &mut PagedDecoder| {
                for i in 0..launches {
                    let (kc, vc) = &caches[i % sets];
                    dec.run(&gpu, &meta, &layout, heads, &q, kc, vc, &mut out)
                        .unwrap();
                }
            };
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
            round(&mut dec);
            let mut times = Vec::new();
            for _ in 0..15 {
                let start = gpu
                    .context()
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .unwrap();
                let end = gpu
                    .context()
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .unwrap();
                start.record(&stream).unwrap();
                round(&mut dec);
                end.record(&stream).unwrap();
                end.synchronize().unwrap();
                times.push(f64::from(start.elapsed_ms(&end).unwrap()) * 1e3 / launches as f64);
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let us = times[times.len() / 2];
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
