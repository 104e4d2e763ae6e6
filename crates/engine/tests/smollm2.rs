//! End to end on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF, fetched on first use
//! like the model crate's golden tests): `Engine::start` with the default source, greedy output
//! equal to the model crate's driver, a chat request, stop strings on real text, and n-gram
//! speculation giving the same tokens.
#![allow(clippy::unwrap_used)]

mod common;

use common::run;
use engine::{
    Engine, EngineConfig, EngineHandle, FinishReason, GenerateRequest, Message, Prompt,
    SpeculativeMode,
};
use model::generate::{GenerateOptions, generate};
use model::{CpuBackend, Shard, load_gguf};

/// The engine on the default model with a small KV pool (fast to allocate).
fn start(speculative: Option<SpeculativeMode>) -> EngineHandle {
    Engine::start(EngineConfig {
        kv_cache_memory: Some(24 << 20),
        speculative,
        ..EngineConfig::default()
    })
    .expect("the default model (cargo xtask fetch-model) is needed by this test")
}

const PROMPT: &str = "Copy the line three times.\nThe quick brown fox jumps over the lazy dog.\n\
                      The quick brown fox jumps over the lazy dog.\nThe quick";

#[test]
fn greedy_generation_matches_the_model_crate_and_speculation_keeps_it() {
    let engine = start(None);
    let info = engine.model_info().clone();
    assert_eq!(info.model, "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(info.vocab_size, 49152);
    assert_eq!(info.kv_cache_dtype, "fp16");
    let path = model::fetch::default_model_path();
    let loaded = load_gguf(&path, Shard::FULL).unwrap();
    let ids = loaded.tokenizer.encode(PROMPT, true).unwrap();
    let cache = model::KvCacheConfig {
        num_blocks: 16,
        block_size: 16,
        dtype: "fp16".parse().unwrap(),
        num_cpu_blocks: 0,
    };
    let reference = generate(
        &mut CpuBackend::new(loaded.weights, cache).unwrap(),
        &ids,
        &GenerateOptions {
            max_new_tokens: 24,
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    let mut r = GenerateRequest::new(Prompt::Text(PROMPT.into()));
    r.max_tokens = Some(24);
    r.ignore_eos = true;
    let out = run(&engine, r.clone()).unwrap();
    let c = &out.completions[0];
    assert_eq!(c.token_ids, reference);
    assert_eq!(c.text, loaded.tokenizer.decode(&reference, true).unwrap());
    eprintln!("continuation: {:?}", c.text);

    // A stop string on the real text: the output ends right before it.
    let mut stopped = r.clone();
    stopped.stop = vec!["lazy".into()];
    let s = run(&engine, stopped).unwrap().completions.remove(0);
    if let Some(at) = c.text.find("lazy") {
        assert_eq!(s.text, c.text[..at]);
        assert_eq!(s.finish_reason, FinishReason::Stop);
    }
    engine.shutdown(std::time::Duration::from_secs(5));

    let spec = start(Some(SpeculativeMode::Ngram));
    let got = run(&spec, r).unwrap();
    assert_eq!(got.completions[0].token_ids, reference);
    let stats = spec.stats();
    assert!(stats.spec_accepted_tokens > 0, "{stats:?}");
    eprintln!(
        "n-gram speculation: {} steps, {}/{} drafts accepted",
        stats.steps, stats.spec_accepted_tokens, stats.spec_proposed_tokens
    );
}

#[test]
fn a_chat_request_answers_through_the_template() {
    let engine = start(None);
    let mut r = GenerateRequest::new(Prompt::Messages(vec![Message {
        role: "user".into(),
        content: "What is the capital of France? Answer in one word.".into(),
    }]));
    r.max_tokens = Some(16);
    r.logprobs = 3;
    let out = run(&engine, r).unwrap();
    let c = &out.completions[0];
    eprintln!("answer: {:?} ({:?})", c.text, c.finish_reason);
    assert!(c.text.contains("Paris"), "{:?}", c.text);
    // The model ends its turn with <|im_end|>, whose text is not part of the answer.
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert!(!c.text.contains("<|im_end|>"));
    assert_eq!(c.logprobs.len(), c.token_ids.len());
    assert!(out.usage.prompt_tokens > 20);
}
