//! Generates a continuation of a prompt with the default model on the CPU backend, printing
//! the text as it comes.
//!
//! `cargo run --release -p model --example generate -- [--chat] [--max-tokens N] [--kv DTYPE] "prompt"`
#![allow(clippy::print_stdout, clippy::print_stderr, missing_docs)]

use std::io::Write;
use std::time::Instant;

use model::generate::{SequenceRunner, argmax};
use model::{ChatMessage, CpuBackend, IncrementalDetokenizer, KvCacheConfig, Shard, load_gguf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut chat, mut max_tokens, mut kv, mut prompt) = (false, 64usize, "fp16".to_owned(), None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--chat" => chat = true,
            "--max-tokens" => {
                max_tokens = args.next().ok_or("--max-tokens needs a value")?.parse()?
            }
            "--kv" => kv = args.next().ok_or("--kv needs a value")?,
            _ => prompt = Some(a),
        }
    }
    let prompt =
        prompt.ok_or("usage: generate [--chat] [--max-tokens N] [--kv DTYPE] \"prompt\"")?;
    let path = model::fetch::ensure_default_model(&model::fetch::default_models_dir())?;
    let loaded = load_gguf(&path, Shard::FULL)?;
    let tok = loaded.tokenizer;
    let text = if chat {
        tok.apply_chat_template(&[ChatMessage::user(prompt)], true)?
    } else {
        prompt
    };
    let ids = tok.encode(&text, false)?;
    let blocks = (ids.len() + max_tokens).div_ceil(16) + 1;
    let cache = KvCacheConfig {
        num_blocks: blocks,
        block_size: 16,
        dtype: kv.parse()?,
        num_cpu_blocks: 0,
    };
    let mut backend = CpuBackend::new(loaded.weights, cache)?;
    let mut runner = SequenceRunner::new(&mut backend)?;
    let mut detok = IncrementalDetokenizer::with_prompt(&tok, &ids, true)?;
    let start = Instant::now();
    let mut logits = runner.feed(&ids, 256, false)?;
    let prefill = start.elapsed();
    let mut out = std::io::stdout();
    let mut generated = 0;
    for _ in 0..max_tokens {
        let next = argmax(&logits);
        generated += 1;
        if tok.is_eos(next) {
            break;
        }
        write!(out, "{}", detok.push(&tok, next)?)?;
        out.flush()?;
        logits = runner.feed(&[next], 1, false)?;
    }
    writeln!(out, "{}", detok.finish(&tok)?)?;
    let decode = start.elapsed() - prefill;
    eprintln!(
        "[{} prompt tokens in {:.2} s; {generated} tokens in {:.2} s, {:.1} tok/s]",
        ids.len(),
        prefill.as_secs_f64(),
        decode.as_secs_f64(),
        generated as f64 / decode.as_secs_f64()
    );
    Ok(())
}
