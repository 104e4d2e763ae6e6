//! Perplexity of the default model on the GNU GPL v3 text, per KV-cache dtype, on the same
//! tokens and windows as `scripts/golden/perplexity.py` (HF transformers, f32).
//!
//! `cargo run -p model --release --example perplexity -- [windows] [dtype...]`
//! (defaults: all windows; fp16 int8 int4 fp8).
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::time::Instant;

use kv_quant::KvCacheDtype;
use model::generate::SequenceRunner;
use model::{CpuBackend, KvCacheConfig, Shard, load_gguf};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    text_path: String,
    window_size: usize,
    n_windows: usize,
    window_mean_nll: Vec<f64>,
    perplexity: f64,
    token_ids: Vec<u32>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/golden/gpl3_perplexity.json"
    );
    let r: Reference = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let windows = args.next().map_or(r.n_windows, |a| {
        a.parse::<usize>().unwrap().min(r.n_windows)
    });
    let dtypes: Vec<KvCacheDtype> = {
        let rest: Vec<String> = args.collect();
        let names = if rest.is_empty() {
            vec!["fp16".into(), "int8".into(), "int4".into(), "fp8".into()]
        } else {
            rest
        };
        names.iter().map(|n| n.parse().unwrap()).collect()
    };
    let model_path =
        model::fetch::ensure_default_model(&model::fetch::default_models_dir()).unwrap();
    let loaded = load_gguf(&model_path, Shard::FULL).unwrap();

    // Our own tokenizer must give the reference's tokens.
    let text = std::fs::read_to_string(&r.text_path).unwrap();
    let ours = loaded.tokenizer.encode(&text, false).unwrap();
    println!(
        "tokenizer: {} tokens, reference {}; identical: {}",
        ours.len(),
        r.token_ids.len(),
        ours == r.token_ids
    );
    if let Some(i) = ours.iter().zip(&r.token_ids).position(|(a, b)| a != b) {
        let show = |ids: &[u32]| {
            ids.iter()
                .map(|&t| format!("{t}:{:?}", loaded.tokenizer.decode(&[t], false).unwrap()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (a, b) = (i.saturating_sub(3), i + 4);
        println!("first difference at token {i}:");
        println!("  ours      {}", show(&ours[a..b.min(ours.len())]));
        println!(
            "  reference {}",
            show(&r.token_ids[a..b.min(r.token_ids.len())])
        );
    }
    if std::env::var_os("KVSERVE_TOKENIZER_ONLY").is_some() {
        return;
    }

    let hf_nll: f64 = r.window_mean_nll[..windows].iter().sum::<f64>() / windows as f64;
    println!(
        "HF transformers f32: perplexity {:.4} over {windows} windows of {} (all {} windows: {:.4})",
        hf_nll.exp(),
        r.window_size,
        r.n_windows,
        r.perplexity
    );
    let weights = loaded.weights;
    for dtype in dtypes {
        let blocks = r.window_size.div_ceil(16) + 1;
        let mut backend = CpuBackend::new(
            weights.clone(),
            KvCacheConfig {
                num_blocks: blocks,
                block_size: 16,
                dtype,
                num_cpu_blocks: 0,
            },
        )
        .unwrap();
        let start = Instant::now();
        let mut total = 0.0f64;
        for w in 0..windows {
            let tokens = &r.token_ids[w * r.window_size..(w + 1) * r.window_size];
            let logits = SequenceRunner::new(&mut backend)
                .unwrap()
                .feed(tokens, 128, true)
                .unwrap();
            let mut nll = 0.0f64;
            for (p, &next) in tokens.iter().enumerate().skip(1) {
                let row = &logits[(p - 1) * 49152..p * 49152];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = f64::from(max)
                    + row
                        .iter()
                        .map(|&l| f64::from(l - max).exp())
                        .sum::<f64>()
                        .ln();
                nll += lse - f64::from(row[next as usize]);
            }
            total += nll / (r.window_size - 1) as f64;
        }
        let mean = total / windows as f64;
        println!(
            "kvserve CPU, KV {dtype}: perplexity {:.4} ({:+.2}% vs HF f32) in {:.0} s",
            mean.exp(),
            (mean.exp() / hf_nll.exp() - 1.0) * 100.0,
            start.elapsed().as_secs_f64()
        );
    }
}
