//! Decode time per step of a Llama-3.1-8B-shaped model (dummy bf16 weights generated on the
//! device) at tensor-parallel sizes 1 and N, in the same run: TP 1 is a plain
//! `CudaBackend` on GPU 0 (what a one-GPU deployment runs), TP N a
//! `dist::TensorParallelBackend` of `CudaBackend::dummy_sharded` ranks over NCCL, one GPU
//! each (what `kvserve --tensor-parallel-size N` runs).
//!
//! Per batch size: every sequence is prefilled with `--context` tokens, then `--steps` greedy
//! decode steps sampled on the device are timed (wall time, host work and the tokens back
//! included: what the engine waits for), after one untimed step. Prints ms per step, tokens/s
//! and the speedup of TP N over TP 1.
//!
//! `--compute-only` (one GPU is enough) times instead one rank of TP N alone on GPU 0 with
//! collectives that move nothing: the rank's own kernels, the part of a TP N step that the
//! all-reduces add to.
//!
//! `NCCL_NVLS_ENABLE=0 tp_decode_bench [--tp 2] [--compute-only] [--layers N] [--context 1024]
//! [--steps 64] [--batches 1,16,64]`
#![allow(clippy::print_stdout, missing_docs)]

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use dist::{CommCollective, GroupAbort, NcclCommunicator, NcclGroup, TensorParallelBackend};
use half::bf16;
use kernels_cuda::cudarc::driver::CudaSlice;
use kv_quant::KvCacheDtype;
use model::collective::HANDSHAKE_VALUES as HANDSHAKE;
use model::{
    Backend, CudaBackend, DeviceCollective, ForwardBatch, Gpu, KvCacheConfig, ModelConfig,
    ModelError, RowSampling, Shard,
};

/// Rank 0 of a group whose collectives move nothing (`--compute-only`): sums are this rank's
/// partial sums, a gather fills only this rank's slot.
struct NoComm {
    shard: Shard,
}

impl DeviceCollective for NoComm {
    fn shard(&self) -> Shard {
        self.shard
    }
    fn all_reduce_sum(&self, _x: &mut CudaSlice<bf16>) -> Result<(), ModelError> {
        Ok(())
    }
    fn all_reduce_sum_f32(&self, x: &mut CudaSlice<f32>) -> Result<(), ModelError> {
        // The construction handshake (one slot of `HANDSHAKE` values per rank, this rank's in
        // slot 0): answered as if every other rank were a copy of this one, under its own rank.
        let w = self.shard.world_size;
        if x.len() != HANDSHAKE * w {
            return Ok(());
        }
        let err = |e: kernels_cuda::cudarc::driver::DriverError| ModelError::Collective {
            operation: "all_reduce_sum",
            reason: e.to_string(),
        };
        let stream = x.stream().clone();
        let mut v = stream.clone_dtoh(&*x).map_err(err)?;
        for r in 1..w {
            v.copy_within(0..HANDSHAKE, r * HANDSHAKE);
            v[r * HANDSHAKE] = r as f32;
        }
        stream.memcpy_htod(&v, x).map_err(err)
    }
    fn all_gather(
        &self,
        local: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
    ) -> Result<(), ModelError> {
        let stream = out.stream().clone();
        stream
            .memcpy_dtod(local, &mut out.slice_mut(..local.len()))
            .map_err(|e| ModelError::Collective {
                operation: "all_gather",
                reason: e.to_string(),
            })
    }
}

const BLOCK: usize = 16;

#[derive(Debug, Parser)]
#[command(about = "Decode time per step at tensor-parallel sizes 1 and N (Llama-3.1-8B shape)")]
struct Args {
    /// Tensor-parallel size compared with 1 (one GPU per rank).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=8))]
    tp: u32,
    /// Overrides the model's 32 layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Prompt tokens of every sequence before the timed steps.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    steps: u32,
    /// Time one rank's kernels alone (collectives that move nothing) instead of the group.
    #[arg(long)]
    compute_only: bool,
    /// Batch sizes (sequences decoding together).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    batches: Vec<usize>,
}

fn config(a: &Args) -> ModelConfig {
    let mut c = ModelConfig::llama31_8b();
    if let Some(n) = a.layers {
        c.num_layers = n;
    }
    c
}

fn cache(a: &Args) -> KvCacheConfig {
    let max_batch = a.batches.iter().copied().max().unwrap_or(1);
    KvCacheConfig {
        num_blocks: max_batch * per_seq(a),
        block_size: BLOCK,
        dtype: KvCacheDtype::Bf16,
        num_cpu_blocks: 0,
    }
}

fn per_seq(a: &Args) -> usize {
    (a.context + a.steps as usize + 1).div_ceil(BLOCK)
}

/// Seconds per decode step of each batch size on `backend`.
fn decode_times(backend: &mut dyn Backend, a: &Args) -> Result<Vec<f64>, ModelError> {
    let vocab = backend.config().vocab_size;
    let per_seq = per_seq(a);
    let mut logits = Vec::new();
    let mut sampled = Vec::new();
    let greedy = RowSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        history: &[],
        uniform: 0.0,
    };
    let mut out = Vec::new();
    for &b in &a.batches {
        let tables: Vec<i32> = (0..(b * per_seq) as i32).collect();
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
            backend.forward(&fb, &mut logits)?;
        }
        let starts: Vec<u32> = (0..=b as u32).collect();
        let all: Vec<u32> = (0..b as u32).collect();
        let rows = vec![greedy; b];
        let mut tokens = vec![1u32; b];
        let mut step = |backend: &mut dyn Backend, pos: usize| -> Result<(), ModelError> {
            let positions = vec![pos as u32; b];
            let slots: Vec<i64> = (0..b).map(|s| slot(s, pos)).collect();
            let ctx = vec![pos as i32 + 1; b];
            let fb = ForwardBatch {
                token_ids: &tokens,
                positions: &positions,
                slot_mapping: &slots,
                seq_starts: &starts,
                block_tables: &tables,
                max_blocks: per_seq,
                context_lens: &ctx,
                logits_indices: &all,
            };
            backend.forward_sampled(&fb, &rows, vocab, &mut sampled)?;
            for (t, s) in tokens.iter_mut().zip(&sampled) {
                *t = s.unwrap_or(0);
            }
            Ok(())
        };
        step(backend, a.context)?; // warm-up
        let t = Instant::now();
        for i in 1..=a.steps as usize {
            step(backend, a.context + i)?;
        }
        out.push(t.elapsed().as_secs_f64() / f64::from(a.steps));
    }
    Ok(out)
}

fn run() -> Result<(), Box<dyn Error>> {
    let a = Args::parse();
    let c = config(&a);
    let tp = a.tp as usize;
    let visible = dist::local_gpu_count()?;
    if visible < tp && !a.compute_only {
        return Err(format!("--tp {tp} needs {tp} GPUs, {visible} visible").into());
    }
    let t = Instant::now();
    let mut one = CudaBackend::dummy(&c, cache(&a), Gpu::new(0)?, 7)?;
    println!(
        "device: {}; Llama-3.1-8B shape, {} layers, dummy bf16 weights, bf16 KV, context {}, {} steps",
        one.gpu().name(),
        c.num_layers,
        a.context,
        a.steps
    );
    println!("TP 1 set up in {:.1} s", t.elapsed().as_secs_f64());
    let tp1 = decode_times(&mut one, &a)?;
    drop(one);

    let t = Instant::now();
    let (tpn, label) = if a.compute_only {
        let shard = Shard {
            rank: 0,
            world_size: tp,
        };
        let comm = Box::new(NoComm { shard });
        let mut rank = CudaBackend::dummy_sharded(&c, cache(&a), Gpu::new(0)?, 7, comm)?;
        println!(
            "TP {tp} rank 0 alone set up in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        (decode_times(&mut rank, &a)?, format!("TP {tp} rank alone"))
    } else {
        let id = NcclCommunicator::unique_id()?;
        let group: Arc<dyn GroupAbort> = Arc::new(NcclGroup::new());
        let (c2, kv) = (c.clone(), cache(&a));
        let mut sharded = TensorParallelBackend::spawn(tp, group, move |rank| {
            let gpu = Gpu::new(rank)?;
            let comm = CommCollective::join_nccl(&gpu, rank, tp, &id)?;
            CudaBackend::dummy_sharded(&c2, kv, gpu, 7, Box::new(comm))
        })?;
        println!(
            "TP {tp} set up in {:.1} s ({})",
            t.elapsed().as_secs_f64(),
            sharded.device()
        );
        (decode_times(&mut sharded, &a)?, format!("TP {tp}"))
    };

    println!("| batch | TP 1 ms/step | {label} ms/step | TP 1 tok/s | {label} tok/s | speedup |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for ((&b, &s1), &sn) in a.batches.iter().zip(&tp1).zip(&tpn) {
        println!(
            "| {b} | {:.3} | {:.3} | {:.0} | {:.0} | {:.2}x |",
            s1 * 1e3,
            sn * 1e3,
            b as f64 / s1,
            b as f64 / sn,
            s1 / sn
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tp_decode_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
