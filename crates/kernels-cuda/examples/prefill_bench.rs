//! Prefill-attention timing on the GPU: Llama-3-8B heads (32 query / 8 KV, d = 128, bf16
//! activations), block size 16, for bf16 and int8 KV: the tensor-core prefill kernel
//! (`paged_prefill`) beside what the CUDA backend did before it, the decode kernel with one
//! "sequence" per query token (`PagedDecoder::run` over per-token `DecodeMetadata`, as
//! `token_metadata` in crates/model/src/cuda.rs builds it). Median time per launch of
//! back-to-back launches; TFLOP/s counts the causal work only (4 · d FLOPs per query head and
//! attended key: q·K and P·V).
//!
//! `prefill_bench [--quick]` (`--quick`: bf16 only, no 8K prompt).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::{cache_bytes, median_us, open_gpu, query};
use half::bf16;
use kernels_cuda::{DecodeMetadata, PagedDecoder, PrefillBatch, PrefillMetadata, paged_prefill};
use kv_quant::{BlockLayout, KvCacheDtype};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let gpu = open_gpu();
    let stream = gpu.stream().clone();
    let (kv_heads, heads, d, bs) = (8usize, 32usize, 128usize, 16usize);
    // (name, [(query_len, context_len)])
    let mut cases: Vec<(&str, Vec<(usize, usize)>)> = vec![
        ("1 x 2048 prompt", vec![(2048, 2048)]),
        ("4 x 512 prompts", vec![(512, 512); 4]),
        ("512 chunk after 3584", vec![(512, 4096)]),
    ];
    if !quick {
        cases.push(("1 x 8192 prompt", vec![(8192, 8192)]));
    }
    let dtypes: &[KvCacheDtype] = if quick {
        &[KvCacheDtype::Bf16]
    } else {
        &[KvCacheDtype::Bf16, KvCacheDtype::Int8]
    };
    println!(
        "| case | KV | prefill µs | prefill TFLOP/s | decode per token µs | decode TFLOP/s | speedup |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, seqs) in &cases {
        for &dtype in dtypes {
            let layout = BlockLayout::new(dtype, bs, kv_heads, d).unwrap();
            let max_blocks = seqs.iter().map(|s| s.1.div_ceil(bs)).max().unwrap();
            let num_blocks: usize = seqs.iter().map(|s| s.1.div_ceil(bs)).sum();
            let bb = layout.kv_block_bytes();
            let bytes = cache_bytes(num_blocks * bb);
            let kc = stream.clone_htod(&bytes).unwrap();
            let vc = stream.clone_htod(&bytes).unwrap();
            let mut tables = vec![0i32; seqs.len() * max_blocks];
            let mut next = 0;
            for (s, &(_, ctx)) in seqs.iter().enumerate() {
                for j in 0..ctx.div_ceil(bs) {
                    tables[s * max_blocks + j] = next;
                    next += 1;
                }
            }
            let mut starts = vec![0i32];
            for &(q_len, _) in seqs {
                starts.push(starts.last().unwrap() + q_len as i32);
            }
            let tokens = *starts.last().unwrap() as usize;
            let ctx: Vec<i32> = seqs.iter().map(|s| s.1 as i32).collect();
            let q = stream.clone_htod(&query(tokens * heads * d)).unwrap();
            let mut out = stream.alloc_zeros::<bf16>(tokens * heads * d).unwrap();
            let meta = PrefillMetadata::new(
                &gpu,
                &PrefillBatch {
                    block_tables: &tables,
                    max_blocks,
                    query_starts: &starts,
                    context_lens: &ctx,
                    block_size: bs,
                    num_blocks,
                    window: None,
                },
            )
            .unwrap();
            // Per-token decode metadata: token i of sequence s is a sequence of its own with
            // context position + 1 and s's table row.
            let mut tok_tables = vec![0i32; tokens * max_blocks];
            let mut tok_ctx = vec![0i32; tokens];
            for (s, &(q_len, c)) in seqs.iter().enumerate() {
                for i in 0..q_len {
                    let t = starts[s] as usize + i;
                    tok_tables[t * max_blocks..(t + 1) * max_blocks]
                        .copy_from_slice(&tables[s * max_blocks..(s + 1) * max_blocks]);
                    tok_ctx[t] = (c - q_len + i + 1) as i32;
                }
            }
            let dmeta = DecodeMetadata::new(
                &gpu,
                &tok_tables,
                max_blocks,
                &tok_ctx,
                bs,
                num_blocks,
                None,
            )
            .unwrap();
            let keys: usize = tok_ctx.iter().map(|&c| c as usize).sum();
            let flops = 4.0 * (d * heads * keys) as f64;
            let us = median_us(&gpu, 9, 10, |_| {
                paged_prefill(&gpu, &meta, &layout, heads, &q, &kc, &vc, &mut out).unwrap();
            });
            let mut dec = PagedDecoder::new();
            let dus = median_us(&gpu, 9, 3, |_| {
                dec.run(&gpu, &dmeta, &layout, heads, &q, &kc, &vc, &mut out)
                    .unwrap();
            });
            println!(
                "| {name} | {dtype} | {us:.1} | {:.1} | {dus:.1} | {:.1} | {:.1}x |",
                flops / us / 1e6,
                flops / dus / 1e6,
                dus / us
            );
        }
    }
}
