//! The CPU backend on the real default model against the f32 oracle (HF transformers on the
//! same GGUF, dequantized on load), teacher-forced: each golden prompt plus its greedy
//! continuation runs through the paged cache in chunks of 48 tokens, and at every position the
//! model's next-token logits are compared with the golden top-10 logits.
//!
//! Tolerances (SmolLM2's logits span about ±30):
//! - exact math (weights dequantized to f32, fp16 KV): every golden top-10 logit within 0.1,
//!   and the argmax equal to the golden one at every position whose golden top-1/top-2 gap is
//!   at least 0.3 (smaller gaps are near-ties that rounding may legitimately flip);
//! - the fast kernels (block-quantized weights times int8 activations, as llama.cpp does): the
//!   argmax equal at ≥ 99% of the positions with gap ≥ 0.3, 99% of the top-10 logits within
//!   1.0 and all within 3.0. The maximum is a heavy tail: it sits at one sensitive position
//!   (`chat_capital` position 19, where exact math also has its largest error) and moved
//!   between 1.4 and 2.8 with equivalent summation orders of the kernel;
//! - int8 / fp8 KV on top of the fast kernels: the argmax equal at ≥ 97% of the positions with
//!   a clear gap (≥ 1.0).
//!
//! The golden file comes from `scripts/golden/make_golden.py` (see scripts/README.md); the model
//! from the same fetch step as `cargo xtask fetch-model`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use kv_quant::KvCacheDtype;
use model::generate::{SequenceRunner, argmax};
use model::{Backend, CpuBackend, CudaBackend, KvCacheConfig, Shard, Weights, load_gguf};
use serde::Deserialize;

const VOCAB: usize = 49152;

#[derive(Deserialize)]
struct Golden {
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    name: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    positions: Positions,
}

#[derive(Deserialize)]
struct Positions {
    top_ids: Vec<Vec<u32>>,
    top_logits: Vec<Vec<f32>>,
    gap: Vec<f32>,
}

fn golden() -> Golden {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/golden/smollm2_golden.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn weights() -> Weights {
    let path = model::fetch::ensure_default_model(&model::fetch::default_models_dir())
        .expect("the default model (cargo xtask fetch-model) is needed by this test");
    load_gguf(&path, Shard::FULL).unwrap().weights
}

/// What the comparison found over all prompts.
#[derive(Debug, Default)]
struct Comparison {
    /// |ours - golden| of every golden top-10 logit, sorted.
    errors: Vec<f32>,
    /// Positions with a golden gap of at least the threshold, and those whose argmax agrees.
    gap_positions: usize,
    gap_agree: usize,
    /// The worst logit error: (error, prompt, position, token).
    worst: (f32, String, usize, u32),
}

impl Comparison {
    fn quantile(&self, q: f64) -> f32 {
        self.errors[((self.errors.len() - 1) as f64 * q) as usize]
    }
}

fn compare(weights: Weights, kv: KvCacheDtype, gap: f32, prompts: usize) -> Comparison {
    compare_on(false, weights, kv, gap, prompts)
}

/// As [`compare`], on the CUDA backend when `cuda`.
fn compare_on(
    cuda: bool,
    weights: Weights,
    kv: KvCacheDtype,
    gap: f32,
    prompts: usize,
) -> Comparison {
    let cache = KvCacheConfig {
        num_blocks: 64,
        block_size: 16,
        dtype: kv,
        num_cpu_blocks: 0,
    };
    let mut b: Box<dyn Backend> = if cuda {
        Box::new(CudaBackend::new(&weights, cache, model::Gpu::new(0).unwrap()).unwrap())
    } else {
        Box::new(CpuBackend::new(weights, cache).unwrap())
    };
    let mut c = Comparison::default();
    for p in golden().prompts.iter().take(prompts) {
        let tokens: Vec<u32> = p
            .prompt_ids
            .iter()
            .chain(&p.generated_ids)
            .copied()
            .collect();
        assert_eq!(tokens.len(), p.positions.top_ids.len(), "{}", p.name);
        let logits = SequenceRunner::new(b.as_mut())
            .unwrap()
            .feed(&tokens, 48, true)
            .unwrap();
        for pos in 0..tokens.len() {
            let ours = &logits[pos * VOCAB..(pos + 1) * VOCAB];
            let ids = &p.positions.top_ids[pos];
            for (&id, &want) in ids.iter().zip(&p.positions.top_logits[pos]) {
                let err = (ours[id as usize] - want).abs();
                if err > c.worst.0 {
                    c.worst = (err, p.name.clone(), pos, id);
                }
                c.errors.push(err);
            }
            if p.positions.gap[pos] >= gap {
                c.gap_positions += 1;
                c.gap_agree += usize::from(argmax(ours) == ids[0]);
            }
        }
    }
    c.errors.sort_by(f32::total_cmp);
    println!(
        "{kv}: {} logits, |error| median {:.4} p99 {:.4} max {:.4} (worst {:?}); argmax {}/{} at gap >= {gap}",
        c.errors.len(),
        c.quantile(0.5),
        c.quantile(0.99),
        c.quantile(1.0),
        c.worst,
        c.gap_agree,
        c.gap_positions
    );
    c
}

#[test]
fn exact_math_matches_the_f32_oracle() {
    let c = compare(weights().to_f32(), KvCacheDtype::Fp16, 0.3, usize::MAX);
    assert!(
        c.gap_positions >= 500,
        "the golden file has too few clear positions"
    );
    assert!(c.quantile(1.0) <= 0.1, "worst logit error {:?}", c.worst);
    assert_eq!(c.gap_agree, c.gap_positions);
}

#[test]
fn fast_kernels_stay_close_to_the_f32_oracle() {
    let c = compare(weights(), KvCacheDtype::Fp16, 0.3, usize::MAX);
    assert!(
        c.gap_agree * 100 >= c.gap_positions * 99,
        "argmax {}/{}",
        c.gap_agree,
        c.gap_positions
    );
    assert!(
        c.quantile(0.99) <= 1.0,
        "p99 logit error {}",
        c.quantile(0.99)
    );
    assert!(c.quantile(1.0) <= 3.0, "worst logit error {:?}", c.worst);
}

#[test]
fn quantized_kv_caches_keep_the_argmax_at_clear_positions() {
    let w = weights();
    for kv in [KvCacheDtype::Int8, KvCacheDtype::Fp8E4m3] {
        let c = compare(w.clone(), kv, 1.0, 5);
        assert!(
            c.gap_agree * 100 >= c.gap_positions * 97,
            "{kv}: argmax {}/{}",
            c.gap_agree,
            c.gap_positions
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_backend_stays_close_to_the_f32_oracle() {
    let w = weights();
    let c = compare_on(true, w.clone(), KvCacheDtype::Fp16, 0.3, usize::MAX);
    // Measured on an H200 (2026-11-28): p99 0.27, max 0.45, argmax 753/753.
    assert!(
        c.gap_agree * 100 >= c.gap_positions * 99,
        "argmax {}/{}",
        c.gap_agree,
        c.gap_positions
    );
    assert!(
        c.quantile(0.99) <= 0.6,
        "p99 logit error {}",
        c.quantile(0.99)
    );
    assert!(c.quantile(1.0) <= 1.2, "worst logit error {:?}", c.worst);
    for kv in [KvCacheDtype::Int8, KvCacheDtype::Fp8E4m3] {
        let c = compare_on(true, w.clone(), kv, 1.0, 5);
        assert!(
            c.gap_agree * 100 >= c.gap_positions * 95,
            "{kv}: argmax {}/{}",
            c.gap_agree,
            c.gap_positions
        );
    }
}
