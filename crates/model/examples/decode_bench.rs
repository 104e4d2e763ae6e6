//! Decode throughput of the CPU backend: `batch` sequences decode together, one token each per
//! step, after a 32-token prompt each.
//!
//! `cargo run -p model --release --example decode_bench -- [--dummy] [--steps N] [BATCH...]`
//! (defaults: the default model, 64 steps, batches 1 4 16 64). Prints one line per batch size
//! and a JSON summary; `scripts/bench_decode.sh` runs it beside llama.cpp.
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::time::Instant;

use kv_block_manager::{BlockManager, BlockManagerConfig, BlockTableMatrix, SeqId, StepSlots};
use model::generate::argmax;
use model::{
    Backend, CpuBackend, DType, ForwardBatch, KvCacheConfig, ModelConfig, Shard, Weights, load_gguf,
};

const PROMPT: usize = 32;

fn run(weights: &Weights, batch: usize, steps: usize) -> f64 {
    let vocab = weights.config().vocab_size;
    let blocks = batch * (PROMPT + steps + 16).div_ceil(16) + 8;
    let cache = KvCacheConfig {
        num_blocks: blocks,
        block_size: 16,
        dtype: kv_quant::KvCacheDtype::Fp16,
        num_cpu_blocks: 0,
    };
    let mut backend = CpuBackend::new(weights.clone(), cache).unwrap();
    let mut bm = BlockManager::new(BlockManagerConfig::new(blocks)).unwrap();
    let seqs: Vec<SeqId> = (0..batch as u64).map(SeqId).collect();
    let (mut step, mut matrix, mut logits) = (
        StepSlots::default(),
        BlockTableMatrix::default(),
        Vec::new(),
    );
    let mut tokens = Vec::with_capacity(batch);
    for &s in &seqs {
        let prompt: Vec<u32> = (0..PROMPT as u32)
            .map(|i| (i * 131 + s.0 as u32 * 7 + 1) % vocab as u32)
            .collect();
        bm.add_sequence(s, &prompt, None).unwrap();
        step.clear();
        bm.allocate_slots(s, PROMPT, &mut step).unwrap();
        bm.update_block_table_matrix(&[s], None, &mut matrix)
            .unwrap();
        let positions: Vec<u32> = (0..PROMPT as u32).collect();
        let batch = ForwardBatch {
            token_ids: &prompt,
            positions: &positions,
            slot_mapping: &step.slot_mapping,
            seq_starts: &[0, PROMPT as u32],
            block_tables: matrix.block_tables(),
            max_blocks: matrix.max_blocks(),
            context_lens: matrix.context_lens(),
            logits_indices: &[PROMPT as u32 - 1],
        };
        backend.forward(&batch, &mut logits).unwrap();
        tokens.push(argmax(&logits));
    }
    let starts: Vec<u32> = (0..=batch as u32).collect();
    let all: Vec<u32> = (0..batch as u32).collect();
    let mut positions = Vec::with_capacity(batch);
    let t0 = Instant::now();
    for _ in 0..steps {
        step.clear();
        positions.clear();
        for (&s, &t) in seqs.iter().zip(&tokens) {
            positions.push(bm.num_slotted_tokens(s).unwrap() as u32);
            bm.append_tokens(s, &[t], &mut step).unwrap();
        }
        bm.update_block_table_matrix(&seqs, None, &mut matrix)
            .unwrap();
        let fb = ForwardBatch {
            token_ids: &tokens,
            positions: &positions,
            slot_mapping: &step.slot_mapping,
            seq_starts: &starts,
            block_tables: matrix.block_tables(),
            max_blocks: matrix.max_blocks(),
            context_lens: matrix.context_lens(),
            logits_indices: &all,
        };
        backend.forward(&fb, &mut logits).unwrap();
        for (i, t) in tokens.iter_mut().enumerate() {
            *t = argmax(&logits[i * vocab..(i + 1) * vocab]);
        }
    }
    (batch * steps) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let mut dummy = false;
    let mut steps = 64;
    let mut batches = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dummy" => dummy = true,
            "--steps" => steps = args.next().unwrap().parse().unwrap(),
            b => batches.push(b.parse::<usize>().unwrap()),
        }
    }
    if batches.is_empty() {
        batches = vec![1, 4, 16, 64];
    }
    let weights = if dummy {
        Weights::dummy(&ModelConfig::smollm2_135m(), DType::Q4_1, 1).unwrap()
    } else {
        let path = model::fetch::ensure_default_model(&model::fetch::default_models_dir()).unwrap();
        load_gguf(&path, Shard::FULL).unwrap().weights
    };
    let threads = rayon::current_num_threads();
    run(&weights, 1, 8); // warm up
    let mut results = Vec::new();
    for &b in &batches {
        let tps = run(&weights, b, steps);
        println!(
            "batch {b:>3}: {tps:8.1} tok/s aggregate ({:.1} tok/s per sequence), {threads} threads",
            tps / b as f64
        );
        results.push(format!("\"{b}\": {tps:.1}"));
    }
    println!(
        "{{\"engine\": \"kvserve-cpu\", \"threads\": {threads}, \"steps\": {steps}, \"tok_per_s\": {{{}}}}}",
        results.join(", ")
    );
}
