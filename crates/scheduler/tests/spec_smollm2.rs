//! Greedy speculative decoding on the real default model (SmolLM2-135M, CPU backend, fp16 KV)
//! gives the tokens of plain greedy decoding, with n-gram proposals and with the model as its
//! own draft (then nearly every draft is accepted). The verifying forward runs the drafts as
//! one chunk and rejected drafts are truncated from the block table, so this also checks that
//! chunked verification and rollback agree with token-by-token decoding on real logits.
//!
//! Needs the default model (`cargo xtask fetch-model`; fetched on first use, like the model
//! crate's golden tests).
#![allow(clippy::unwrap_used)]

mod spec_support;

use model::generate::{GenerateOptions, generate};
use model::{CpuBackend, KvCacheConfig, Shard, Tokenizer, Weights, load_gguf};
use scheduler::spec::{DraftModelConfig, DraftModelProposer, NgramConfig, NgramProposer};
use spec_support::{KPolicy, ModelTarget, plain_greedy, speculative_greedy};

const NEW_TOKENS: usize = 32;

fn cache() -> KvCacheConfig {
    KvCacheConfig {
        num_blocks: 16,
        block_size: 16,
        dtype: "fp16".parse().unwrap(),
        num_cpu_blocks: 0,
    }
}

fn model() -> (Weights, Tokenizer, Vec<u32>) {
    let path = model::fetch::ensure_default_model(&model::fetch::default_models_dir())
        .expect("the default model (cargo xtask fetch-model) is needed by this test");
    let loaded = load_gguf(&path, Shard::FULL).unwrap();
    // Repetitive text, so that prompt lookup has something to find.
    let prompt = loaded
        .tokenizer
        .encode(
            "Copy the line three times.\nThe quick brown fox jumps over the lazy dog.\n\
             The quick brown fox jumps over the lazy dog.\nThe quick",
            false,
        )
        .unwrap();
    (loaded.weights, loaded.tokenizer, prompt)
}

#[test]
fn speculative_greedy_decoding_of_smollm2_equals_plain_decoding() {
    let (weights, tokenizer, prompt) = model();
    // The harness's plain decoding is the model crate's.
    let reference = generate(
        &mut CpuBackend::new(weights.clone(), cache()).unwrap(),
        &prompt,
        &GenerateOptions {
            max_new_tokens: NEW_TOKENS,
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    let plain = plain_greedy(
        &mut ModelTarget::new(weights.clone(), cache()),
        &prompt,
        NEW_TOKENS,
    );
    assert_eq!(plain, reference);
    eprintln!(
        "continuation: {:?}",
        tokenizer.decode(&plain, false).unwrap()
    );

    let mut ngram = NgramProposer::new(NgramConfig { min_n: 1, max_n: 4 }).unwrap();
    let mut target = ModelTarget::new(weights.clone(), cache());
    let got = speculative_greedy(
        &mut target,
        &mut ngram,
        &prompt,
        NEW_TOKENS,
        KPolicy::Fixed(4),
    );
    assert_eq!(got.tokens, plain, "n-gram proposals");
    eprintln!(
        "n-gram: {} target passes for {NEW_TOKENS} tokens, {}/{} drafts accepted",
        got.steps, got.accepted, got.proposed
    );
    assert!(got.accepted > 0 && got.steps < NEW_TOKENS);

    let draft_backend = CpuBackend::new(weights.clone(), cache()).unwrap();
    let mut draft =
        DraftModelProposer::new(Box::new(draft_backend), DraftModelConfig::default()).unwrap();
    let mut target = ModelTarget::new(weights, cache());
    let got = speculative_greedy(
        &mut target,
        &mut draft,
        &prompt,
        NEW_TOKENS,
        KPolicy::Fixed(3),
    );
    assert_eq!(got.tokens, plain, "draft model proposals");
    eprintln!(
        "draft = target: {} target passes for {NEW_TOKENS} tokens, {}/{} drafts accepted",
        got.steps, got.accepted, got.proposed
    );
    // The same model drafts: only near-ties between its token-by-token logits and the
    // target's chunked ones may disagree.
    assert!(got.accepted * 10 >= got.proposed * 9, "{got:?}");
}
