//! How close the CPU backend gets to the golden f32 oracle, with the fast kernels or exact f32
//! math (`f32`): teacher-forced logit errors and argmax agreement, then free-running greedy
//! generation from each golden prompt (informative: near-ties may diverge legitimately).
//!
//! `cargo run -p model --release --example golden_check -- [f32]`
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use kv_quant::KvCacheDtype;
use model::generate::{GenerateOptions, SequenceRunner, argmax, generate};
use model::{CpuBackend, KvCacheConfig, Shard, load_gguf};

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn main() {
    let exact = std::env::args().any(|a| a == "f32");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/golden/smollm2_golden.json"
    );
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let model_path =
        model::fetch::ensure_default_model(&model::fetch::default_models_dir()).unwrap();
    let loaded = load_gguf(&model_path, Shard::FULL).unwrap();
    let tok = loaded.tokenizer;
    let weights = if exact {
        loaded.weights.to_f32()
    } else {
        loaded.weights
    };
    let cache = KvCacheConfig {
        num_blocks: 64,
        block_size: 16,
        dtype: KvCacheDtype::Fp16,
        num_cpu_blocks: 0,
    };
    let mut b = CpuBackend::new(weights, cache).unwrap();
    let (mut errs, mut gap_total, mut gap_agree) = (Vec::new(), 0, 0);
    let mut free = Vec::new();
    for p in golden["prompts"].as_array().unwrap() {
        let (prompt, want) = (ids(&p["prompt_ids"]), ids(&p["generated_ids"]));
        let tokens: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        let logits = SequenceRunner::new(&mut b)
            .unwrap()
            .feed(&tokens, 48, true)
            .unwrap();
        let pos = &p["positions"];
        for i in 0..tokens.len() {
            let ours = &logits[i * 49152..(i + 1) * 49152];
            for (id, w) in pos["top_ids"][i]
                .as_array()
                .unwrap()
                .iter()
                .zip(pos["top_logits"][i].as_array().unwrap())
            {
                errs.push((ours[id.as_u64().unwrap() as usize] - w.as_f64().unwrap() as f32).abs());
            }
            if pos["gap"][i].as_f64().unwrap() >= 0.3 {
                gap_total += 1;
                gap_agree +=
                    usize::from(u64::from(argmax(ours)) == pos["top_ids"][i][0].as_u64().unwrap());
            }
        }
        let same_ids = tok
            .encode(
                p["rendered"].as_str().unwrap(),
                p["add_special_tokens"].as_bool().unwrap(),
            )
            .unwrap()
            == prompt;
        let got = generate(
            &mut b,
            &prompt,
            &GenerateOptions {
                max_new_tokens: want.len(),
                ..Default::default()
            },
        )
        .unwrap();
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        free.push(format!(
            "{:16} our tokenizer {} ids; free-running: first {same}/{} tokens equal: {:?}",
            p["name"].as_str().unwrap(),
            if same_ids {
                "gives the same"
            } else {
                "gives DIFFERENT"
            },
            want.len(),
            tok.decode(&got, false).unwrap()
        ));
    }
    errs.sort_by(f32::total_cmp);
    let q = |f: f64| errs[((errs.len() - 1) as f64 * f) as usize];
    println!(
        "{}: {} logits: |error| median {:.4}, p99 {:.4}, max {:.4}; argmax at gap >= 0.3: {gap_agree}/{gap_total}",
        if exact { "f32 weights" } else { "fast kernels" },
        errs.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    );
    for line in free {
        println!("{line}");
    }
}
