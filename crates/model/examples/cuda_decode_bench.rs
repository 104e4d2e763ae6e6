//! Decode speed of the CUDA backend on a Llama-3.1-8B-shaped model with dummy bf16 weights
//! (generated on the device), against the weight-streaming floor measured in the same run:
//! `streamed weight bytes / copy bandwidth` (a device-to-device copy of 2 GiB, read + write
//! bytes over time, as the attention benchmark counts it).
//!
//! Per batch size it prints the wall time of a greedy decode step sampled on the device (host
//! work, uploads, every kernel, the tokens back: what the engine waits for), its ratio to the
//! floor, the same step with the small-batch GEMV kernels turned off (cuBLAS for every
//! product; batches of at most 8 tokens), the same step with the f32 logits brought to the
//! host instead, and two splits: the weight products alone (each layer's and the LM head, on
//! buffers of the same shapes) by the GEMV kernels and by cuBLAS, and the host's time to
//! enqueue a step (no logits)
//! against the GPU's time to run it: when enqueueing is shorter, launch overhead is hidden
//! and CUDA graphs could only save the GPU-side gaps between kernels.
//!
//! With `--graphs`, each batch's greedy steps are timed again replayed from CUDA graphs
//! (`CudaBackend::set_cuda_graphs`; batches above the GEMV path are not captured).
//!
//! `--model smollm2` runs the shape of the default model (SmolLM2-135M: 30 layers of width
//! 576, where a step is a few milliseconds of short launches and the host can be the bottleneck)
//! instead of Llama-3.1-8B's.
//!
//! `cuda_decode_bench [--model llama-3.1-8b|smollm2] [--layers N] [--context N] [--steps N]
//! [--kv DTYPE] [--graphs] [BATCH...]` (defaults: Llama-3.1-8B with its 32 layers, 1024 tokens
//! of context, 32 steps, bf16 KV, batches 1 16 64).
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::time::Instant;

use half::bf16;
use kernels_cuda::{Blas, GEMV_MAX_TOKENS, GemvOut};
use kv_quant::KvCacheDtype;
use model::{Backend, CudaBackend, ForwardBatch, Gpu, KvCacheConfig, ModelConfig, RowSampling};

const BLOCK: usize = 16;

/// Read + write bytes per second of a device-to-device copy of 2 GiB (median of 9).
fn copy_bandwidth(gpu: &Gpu) -> f64 {
    let s = gpu.stream();
    let n = 2usize << 30;
    let src = s.alloc_zeros::<u8>(n).unwrap();
    let mut dst = s.alloc_zeros::<u8>(n).unwrap();
    let mut times = Vec::new();
    for _ in 0..9 {
        s.synchronize().unwrap();
        let t = Instant::now();
        s.memcpy_dtod(&src, &mut dst).unwrap();
        s.synchronize().unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    2.0 * n as f64 / times[times.len() / 2]
}

/// Wall seconds per call of `f(0)`, `f(1)`, ... `f(n - 1)`, run back to back.
fn per_step(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// Median seconds of 7 runs of `pass` (after one warm-up), to the end of its GPU work.
fn median_pass(gpu: &Gpu, mut pass: impl FnMut()) -> f64 {
    let s = gpu.stream();
    pass();
    s.synchronize().unwrap();
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        pass();
        s.synchronize().unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Seconds per pass of the weight products of `c` at `batch` tokens, by cuBLAS alone: one
/// layer's seven matrices (fused q/k/v as three products, o, gate·up, down) run `num_layers`
/// times, then the LM head. One layer's weights (436 MB for 8B) far exceed the L2, so
/// repeating them streams from memory like distinct layers would.
fn cublas_only(gpu: &Gpu, c: &ModelConfig, batch: usize) -> f64 {
    let s = gpu.stream();
    let blas = Blas::new(gpu).unwrap();
    let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let shapes = [
        (c.num_heads * d, h),
        (c.num_kv_heads * d, h),
        (c.num_kv_heads * d, h),
        (h, c.num_heads * d),
        (2 * i, h),
        (h, i),
    ];
    let weights: Vec<_> = shapes
        .iter()
        .map(|&(n, k)| {
            let mut w = s.alloc_zeros::<bf16>(n * k).unwrap();
            kernels_cuda::fill_uniform(gpu, &mut w, n as u64, -0.02, 0.02).unwrap();
            w
        })
        .collect();
    let io: Vec<_> = shapes
        .iter()
        .map(|&(n, k)| {
            (
                s.alloc_zeros::<bf16>(batch * k).unwrap(),
                s.alloc_zeros::<bf16>(batch * n).unwrap(),
            )
        })
        .collect();
    let x_head = s.alloc_zeros::<bf16>(batch * h).unwrap();
    let mut y_head = s.alloc_zeros::<bf16>(batch * c.vocab_size).unwrap();
    let mut head = s.alloc_zeros::<bf16>(c.vocab_size * h).unwrap();
    kernels_cuda::fill_uniform(gpu, &mut head, 99, -0.02, 0.02).unwrap();
    let mut io = io;
    let pass = || {
        for _ in 0..c.num_layers {
            for ((w, &(n, k)), (x, y)) in weights.iter().zip(&shapes).zip(io.iter_mut()) {
                blas.linear(x, w, n, k, y).unwrap();
            }
        }
        blas.linear(&x_head, &head, c.vocab_size, h, &mut y_head)
            .unwrap();
    };
    median_pass(gpu, pass)
}

/// Seconds per pass of the weight products of `c` at `batch` tokens (≤ 8) by the GEMV
/// kernels alone, as the backend runs them: fused Q/K/V, o, gate·up fused with SiLU, down,
/// then the LM head.
fn gemv_only(gpu: &Gpu, c: &ModelConfig, batch: usize) -> f64 {
    let s = gpu.stream();
    let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (nq, nkv) = (c.num_heads * d, c.num_kv_heads * d);
    let alloc = |n: usize, seed: u64| {
        let mut w = s.alloc_zeros::<bf16>(n).unwrap();
        kernels_cuda::fill_uniform(gpu, &mut w, seed, -0.02, 0.02).unwrap();
        w
    };
    let (w_qkv, w_o) = (alloc((nq + 2 * nkv) * h, 1), alloc(h * nq, 2));
    let (w_gu, w_down) = (alloc(2 * i * h, 3), alloc(h * i, 4));
    let head = alloc(c.vocab_size * h, 5);
    let x_h = alloc(batch * h, 6);
    let x_q = alloc(batch * nq, 7);
    let x_i = alloc(batch * i, 8);
    let (mut q, mut k, mut v) = (
        alloc(batch * nq, 9),
        alloc(batch * nkv, 9),
        alloc(batch * nkv, 9),
    );
    let (mut y_h, mut act) = (alloc(batch * h, 9), alloc(batch * i, 9));
    let mut logits = alloc(batch * c.vocab_size, 9);
    let pass = || {
        for _ in 0..c.num_layers {
            let mut outs = [
                GemvOut {
                    out: &mut q,
                    width: nq,
                },
                GemvOut {
                    out: &mut k,
                    width: nkv,
                },
                GemvOut {
                    out: &mut v,
                    width: nkv,
                },
            ];
            kernels_cuda::gemv(gpu, &x_h, &w_qkv, h, None, &mut outs).unwrap();
            let mut o = [GemvOut {
                out: &mut y_h,
                width: h,
            }];
            kernels_cuda::gemv(gpu, &x_q, &w_o, nq, None, &mut o).unwrap();
            kernels_cuda::gemv_silu_mul(gpu, &x_h, &w_gu, i, h, &mut act).unwrap();
            let mut o = [GemvOut {
                out: &mut y_h,
                width: h,
            }];
            kernels_cuda::gemv(gpu, &x_i, &w_down, i, None, &mut o).unwrap();
        }
        let mut o = [GemvOut {
            out: &mut logits,
            width: c.vocab_size,
        }];
        kernels_cuda::gemv(gpu, &x_h, &head, h, None, &mut o).unwrap();
    };
    median_pass(gpu, pass)
}

struct Args {
    /// `llama-3.1-8b` or `smollm2`.
    model: String,
    /// Overrides the model's layer count.
    layers: Option<usize>,
    context: usize,
    steps: usize,
    kv: KvCacheDtype,
    batches: Vec<usize>,
    /// Also time the steps replayed from CUDA graphs (`--graphs`).
    graphs: bool,
}

fn args() -> Args {
    let mut a = Args {
        model: "llama-3.1-8b".into(),
        layers: None,
        context: 1024,
        steps: 32,
        kv: KvCacheDtype::Bf16,
        batches: Vec::new(),
        graphs: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--model" => a.model = it.next().unwrap(),
            "--layers" => a.layers = Some(it.next().unwrap().parse().unwrap()),
            "--context" => a.context = it.next().unwrap().parse().unwrap(),
            "--steps" => a.steps = it.next().unwrap().parse().unwrap(),
            "--kv" => a.kv = it.next().unwrap().parse().unwrap(),
            "--graphs" => a.graphs = true,
            b => a.batches.push(b.parse().unwrap()),
        }
    }
    if a.batches.is_empty() {
        a.batches = vec![1, 16, 64];
    }
    a
}

fn main() {
    let a = args();
    let mut config = match a.model.as_str() {
        "llama-3.1-8b" => ModelConfig::llama31_8b(),
        "smollm2" => ModelConfig::smollm2_135m(),
        m => panic!("unknown --model {m} (llama-3.1-8b or smollm2)"),
    };
    if let Some(n) = a.layers {
        config.num_layers = n;
    }
    let max_batch = a.batches.iter().copied().max().unwrap();
    let per_seq = (a.context + a.steps + 1).div_ceil(BLOCK);
    let cache = KvCacheConfig {
        num_blocks: max_batch * per_seq,
        block_size: BLOCK,
        dtype: a.kv,
        num_cpu_blocks: 0,
    };
    let t = Instant::now();
    let mut backend = CudaBackend::dummy(&config, cache, Gpu::new(0).unwrap(), 7).unwrap();
    backend.gpu().stream().synchronize().unwrap();
    let setup = t.elapsed().as_secs_f64();
    let gpu = backend.gpu();
    let bw = copy_bandwidth(gpu);
    println!(
        "device: {} ({}); copy bandwidth {:.2} TB/s (read + write)",
        gpu.name(),
        gpu.arch(),
        bw / 1e12
    );
    let bytes = backend.streamed_weight_bytes();
    let floor = bytes as f64 / bw;
    println!(
        "{} shape, {} layers, dummy bf16 weights ({:.2} GB streamed per step, set up in {:.1} s), KV {}, context {}",
        a.model,
        config.num_layers,
        bytes as f64 / 1e9,
        setup,
        a.kv,
        a.context
    );
    println!("weight-streaming floor: {:.3} ms per step", floor * 1e3);
    println!(
        "| batch | step ms | ratio to floor | tok/s | step ms, cuBLAS products | step ms, logits to host | GEMV-only ms | cuBLAS-only ms | host enqueue ms | GPU ms (no logits) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let vocab = config.vocab_size;
    let mut logits = Vec::new();
    // One prompt of `context` tokens in one chunk: attention through the prefill kernel, then
    // through the decode kernel one row per token (the path before the prefill kernel).
    {
        let ids: Vec<u32> = (0..a.context)
            .map(|i| ((i * 7919) % vocab) as u32)
            .collect();
        let positions: Vec<u32> = (0..a.context as u32).collect();
        let table: Vec<i32> = (0..per_seq as i32).collect();
        let slots: Vec<i64> = (0..a.context)
            .map(|p| (table[p / BLOCK] as usize * BLOCK + p % BLOCK) as i64)
            .collect();
        let fb = ForwardBatch {
            token_ids: &ids,
            positions: &positions,
            slot_mapping: &slots,
            seq_starts: &[0, a.context as u32],
            block_tables: &table,
            max_blocks: per_seq,
            context_lens: &[a.context as i32],
            logits_indices: &[a.context as u32 - 1],
        };
        let mut time = |backend: &mut CudaBackend, prefill_kernel: bool| {
            backend.set_prefill_kernel(prefill_kernel);
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                backend.forward(&fb, &mut logits).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            best
        };
        let with = time(&mut backend, true);
        let without = time(&mut backend, false);
        backend.set_prefill_kernel(true);
        println!(
            "prefill of one {}-token prompt: {:.2} ms with the prefill kernel, {:.2} ms with the decode kernel per token ({:.0} prompt tok/s)",
            a.context,
            with * 1e3,
            without * 1e3,
            a.context as f64 / with
        );
    }
    for &b in &a.batches {
        // Prefill every sequence (one chunk each) into its own run of blocks.
        let table =
            |s: usize| -> Vec<i32> { (0..per_seq).map(|j| (s * per_seq + j) as i32).collect() };
        let tables: Vec<i32> = (0..b).flat_map(table).collect();
        let slot = |s: usize, p: usize| {
            (tables[s * per_seq + p / BLOCK] as usize * BLOCK + p % BLOCK) as i64
        };
        for s in 0..b {
            let ids: Vec<u32> = (0..a.context)
                .map(|i| ((i * 7919 + s * 31) % vocab) as u32)
                .collect();
            let positions: Vec<u32> = (0..a.context as u32).collect();
            let slots: Vec<i64> = (0..a.context).map(|p| slot(s, p)).collect();
            let fb = ForwardBatch {
                token_ids: &ids,
                positions: &positions,
                slot_mapping: &slots,
                seq_starts: &[0, a.context as u32],
                block_tables: &tables[s * per_seq..(s + 1) * per_seq],
                max_blocks: per_seq,
                context_lens: &[a.context as i32],
                logits_indices: &[a.context as u32 - 1],
            };
            backend.forward(&fb, &mut logits).unwrap();
        }
        let starts: Vec<u32> = (0..=b as u32).collect();
        let all: Vec<u32> = (0..b as u32).collect();
        let mut tokens: Vec<u32> = vec![1; b];
        // How a step's tokens are chosen: on the device (greedy rows: only the tokens come
        // back, as the engine runs plain requests), or the logits of `want` to the host.
        enum Mode<'a> {
            Device(&'a [RowSampling<'a>]),
            Host(&'a [u32]),
        }
        let mut sampled = Vec::new();
        let mut step = |backend: &mut CudaBackend,
                        tokens: &mut Vec<u32>,
                        pos: usize,
                        mode: Mode<'_>,
                        logits: &mut Vec<f32>| {
            let positions = vec![pos as u32; b];
            let slots: Vec<i64> = (0..b).map(|s| slot(s, pos)).collect();
            let ctx = vec![pos as i32 + 1; b];
            let fb = ForwardBatch {
                token_ids: tokens,
                positions: &positions,
                slot_mapping: &slots,
                seq_starts: &starts,
                block_tables: &tables,
                max_blocks: per_seq,
                context_lens: &ctx,
                logits_indices: match mode {
                    Mode::Device(_) => &all,
                    Mode::Host(want) => want,
                },
            };
            match mode {
                Mode::Device(rows) => {
                    backend
                        .forward_sampled(&fb, rows, vocab, &mut sampled)
                        .unwrap();
                    for (t, s) in tokens.iter_mut().zip(&sampled) {
                        *t = s.unwrap_or(0);
                    }
                }
                Mode::Host(want) => {
                    backend.forward(&fb, logits).unwrap();
                    for (s, tok) in tokens.iter_mut().enumerate().take(want.len()) {
                        let row = &logits[s * vocab..(s + 1) * vocab];
                        *tok = row
                            .iter()
                            .enumerate()
                            .fold((0, f32::MIN), |m, (j, &x)| if x > m.1 { (j, x) } else { m })
                            .0 as u32;
                    }
                }
            }
        };
        let greedy = RowSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            history: &[],
            uniform: 0.0,
        };
        let rows = vec![greedy; b];
        // Warm-up (kernels compiled and loaded, buffers grown), then timed steps.
        step(
            &mut backend,
            &mut tokens,
            a.context,
            Mode::Device(&rows),
            &mut logits,
        );
        let step_s = per_step(a.steps, |i| {
            step(
                &mut backend,
                &mut tokens,
                a.context + i,
                Mode::Device(&rows),
                &mut logits,
            );
        });
        // --graphs: the same steps replayed from a CUDA graph (the first one captures it;
        // batches above the GEMV path run uncaptured: the same time).
        if a.graphs {
            backend.set_cuda_graphs(true);
            step(
                &mut backend,
                &mut tokens,
                a.context,
                Mode::Device(&rows),
                &mut logits,
            );
            let graph_s = per_step(a.steps, |i| {
                step(
                    &mut backend,
                    &mut tokens,
                    a.context + i,
                    Mode::Device(&rows),
                    &mut logits,
                );
            });
            println!(
                "batch {b}: graphs {:.3} ms/step vs {:.3} uncaptured ({:.3}x); captured buckets {:?}, capture errors {:?}",
                graph_s * 1e3,
                step_s * 1e3,
                step_s / graph_s,
                backend.graph_buckets(),
                backend.graph_capture_errors()
            );
            backend.set_cuda_graphs(false);
        }
        // The same steps with cuBLAS for every product (only differs for small batches).
        let blas_step_s = if b <= GEMV_MAX_TOKENS {
            backend.set_small_batch_gemv(false);
            let s = per_step(a.steps, |i| {
                step(
                    &mut backend,
                    &mut tokens,
                    a.context + i,
                    Mode::Device(&rows),
                    &mut logits,
                );
            });
            backend.set_small_batch_gemv(true);
            Some(s)
        } else {
            None
        };
        // The same steps with the logits brought to the host (f32) and greedy there.
        let host_steps = a.steps.min(8);
        let host_s = per_step(host_steps, |i| {
            step(
                &mut backend,
                &mut tokens,
                a.context + i,
                Mode::Host(&all),
                &mut logits,
            );
        });
        // Enqueue vs run, without the logits (no download, so forward returns once queued).
        let (mut enqueue, mut total) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            backend.gpu().stream().synchronize().unwrap();
            let t = Instant::now();
            step(
                &mut backend,
                &mut tokens,
                a.context,
                Mode::Host(&[]),
                &mut logits,
            );
            enqueue.push(t.elapsed().as_secs_f64());
            backend.gpu().stream().synchronize().unwrap();
            total.push(t.elapsed().as_secs_f64());
        }
        enqueue.sort_by(f64::total_cmp);
        total.sort_by(f64::total_cmp);
        let blas_s = cublas_only(backend.gpu(), &config, b);
        let ms = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{:.3}", x * 1e3));
        let gemv_s = (b <= GEMV_MAX_TOKENS).then(|| gemv_only(backend.gpu(), &config, b));
        println!(
            "| {b} | {:.3} | {:.2} | {:.0} | {} | {:.3} | {} | {:.3} | {:.3} | {:.3} |",
            step_s * 1e3,
            step_s / floor,
            b as f64 / step_s,
            ms(blas_step_s),
            host_s * 1e3,
            ms(gemv_s),
            blas_s * 1e3,
            enqueue[3] * 1e3,
            total[3] * 1e3
        );
    }
}
