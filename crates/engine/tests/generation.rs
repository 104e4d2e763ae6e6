//! What the engine generates: greedy equal to the model crate's driver, seeded sampling that
//! does not depend on the batch, n > 1, stop strings and stop tokens, lengths, log-probabilities,
//! text streaming, many concurrent requests, speculative decoding.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::*;
use engine::{
    EngineConfig, FinishReason, GenerateOutput, GenerateRequest, Prompt, SamplingParams,
    SpeculativeMode,
};
use model::generate::{GenerateOptions, SequenceRunner, generate};
use model::{CpuBackend, Tokenizer};

fn greedy_req(prompt: Vec<u32>, max_tokens: u32) -> GenerateRequest {
    let mut r = GenerateRequest::new(Prompt::TokenIds(prompt));
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r
}

fn prompt(text: &str) -> Vec<u32> {
    tokenizer().encode(text, true).unwrap()
}

fn sampled(seed: u64, text: &str) -> GenerateRequest {
    let mut r = greedy_req(prompt(text), 20);
    r.sampling = SamplingParams {
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    r
}

#[test]
fn greedy_output_equals_the_model_crates_generate() {
    let engine = cpu_engine(EngineConfig::default(), 64);
    let ids = prompt("Hello there, how are you today?");
    let reference = generate(
        &mut CpuBackend::new(tiny_weights(), cache(64)).unwrap(),
        &ids,
        &GenerateOptions {
            max_new_tokens: 24,
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    let out = run(&engine, greedy_req(ids.clone(), 24)).unwrap();
    assert_eq!(out.completions.len(), 1);
    let c = &out.completions[0];
    assert_eq!(c.token_ids, reference);
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.text, tokenizer().decode(&reference, true).unwrap());
    assert_eq!(out.usage.prompt_tokens as usize, ids.len());
    assert_eq!(out.usage.completion_tokens, 24);
    // A text prompt is tokenized as the tokenizer does (no BOS for this tokenizer).
    let mut text = GenerateRequest::new(Prompt::Text("Hello there, how are you today?".into()));
    text.max_tokens = Some(24);
    text.ignore_eos = true;
    assert_eq!(
        run(&engine, text).unwrap().completions[0].token_ids,
        reference
    );
    wait_idle(&engine);
}

#[test]
fn seeded_sampling_does_not_depend_on_what_else_runs() {
    let engine = cpu_engine(EngineConfig::default(), 128);
    let alone = run(&engine, sampled(42, "Once upon a time")).unwrap();
    let tokens = &alone.completions[0].token_ids;
    assert_eq!(tokens.len(), 20);
    // The same request among others (other prompts, seeds and settings), in two orders.
    for order in 0..2 {
        let mut streams = Vec::new();
        let mut target = None;
        for i in 0..6 {
            if i == 2 + order {
                target = Some(streams.len());
                streams.push(engine.generate(sampled(42, "Once upon a time")).unwrap());
            }
            let mut other = sampled(100 + i, &format!("Another prompt number {i} here"));
            other.sampling.temperature = 0.3 + 0.2 * i as f32;
            other.max_tokens = Some(10 + 3 * i as u32);
            streams.push(engine.generate(other).unwrap());
        }
        let rt = runtime();
        let outs: Vec<GenerateOutput> = streams
            .into_iter()
            .map(|s| rt.block_on(s.collect()).unwrap())
            .collect();
        assert_eq!(&outs[target.unwrap()].completions[0].token_ids, tokens);
    }
    // Another seed gives another sequence; no seed gives fresh randomness.
    let other = run(&engine, sampled(43, "Once upon a time")).unwrap();
    assert_ne!(&other.completions[0].token_ids, tokens);
    wait_idle(&engine);
}

#[test]
fn n_samples_share_the_prompt_and_draw_independently() {
    let engine = cpu_engine(EngineConfig::default(), 64);
    let mut r = sampled(5, "Tell me a story");
    r.n = 3;
    r.max_tokens = Some(12);
    let out = run(&engine, r.clone()).unwrap();
    assert_eq!(out.completions.len(), 3);
    for (i, c) in out.completions.iter().enumerate() {
        assert_eq!(c.index as usize, i);
        assert_eq!(c.token_ids.len(), 12);
        assert_eq!(c.finish_reason, FinishReason::Length);
    }
    let distinct: HashSet<_> = out.completions.iter().map(|c| &c.token_ids).collect();
    assert_eq!(distinct.len(), 3, "three samples drew the same tokens");
    assert_eq!(out.usage.completion_tokens, 36);
    // Reproducible, sample by sample.
    assert_eq!(
        run(&engine, r.clone()).unwrap().completions,
        out.completions
    );
    // Greedy samples are all the greedy sequence.
    r.sampling = SamplingParams::default();
    r.n = 2;
    let g = run(&engine, r).unwrap();
    assert_eq!(g.completions[0].token_ids, g.completions[1].token_ids);
    wait_idle(&engine);
}

#[test]
fn stop_strings_match_across_tokens_and_are_excluded() {
    let engine = script_engine(EngineConfig::default());
    let tok = tokenizer();
    // The prompt is "The quick"; the script goes on " brown fox jumps over ...".
    let p = tok.encode("The quick", false).unwrap().len();
    let full = tok.decode(&script_continuation(p, 12), true).unwrap();
    assert!(full.starts_with(" brown fox jumps"), "{full:?}");
    let mut r = script_request(p, 40);
    r.stop = vec!["n fox j".into()];
    let out = run(&engine, r.clone()).unwrap();
    let c = &out.completions[0];
    assert_eq!(c.text, " brow");
    assert_eq!(c.finish_reason, FinishReason::Stop);
    // Tokens up to the one that completed the stop string are reported.
    let decoded = tok.decode(&c.token_ids, true).unwrap();
    assert!(decoded.contains("n fox j"), "{decoded:?}");
    assert!(c.token_ids.len() < 12);
    // Several stop strings: the earliest in the text wins, whatever their order.
    r.stop = vec!["lazy".into(), "over".into()];
    let c = &run(&engine, r.clone()).unwrap().completions[0];
    assert_eq!(c.text, " brown fox jumps ");
    // A stop string in the middle of one token's text.
    r.stop = vec!["row".into()];
    assert_eq!(run(&engine, r.clone()).unwrap().completions[0].text, " b");
    // Never matched: the whole text.
    r.stop = vec!["zebra".into()];
    r.max_tokens = Some(12);
    let c = &run(&engine, r).unwrap().completions[0];
    assert_eq!(c.text, full);
    assert_eq!(c.finish_reason, FinishReason::Length);
    wait_idle(&engine);
}

#[test]
fn streamed_chunks_hold_back_a_possible_stop_string() {
    let engine = script_engine(EngineConfig::default());
    let tok = tokenizer();
    let p = tok.encode("The quick", false).unwrap().len();
    let mut r = script_request(p, 30);
    r.stop = vec!["fox sleeps".into()];
    let items = drain(engine.generate(r).unwrap());
    let deltas: Vec<_> = items.into_iter().map(Result::unwrap).collect();
    let text: String = deltas.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(text, " brown fox jumps over the lazy dog. Then the ");
    // "fox" of "fox jumps" was held back until " jumps" ruled the stop string out, and no
    // chunk ever carried part of "fox sleeps".
    for d in &deltas {
        assert!(!d.text.contains("sleeps"), "{d:?}");
    }
    let last = deltas.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    assert!(last.usage.is_some());
    assert!(deltas[..deltas.len() - 1].iter().all(|d| d.usage.is_none()));
}

#[test]
fn stop_token_ids_and_eos_end_a_completion_without_their_text() {
    let tok = tokenizer();
    let engine = script_engine(EngineConfig::default());
    let p = tok.encode("The quick", false).unwrap().len();
    let cont = script_continuation(p, 12);
    let stop = cont[3];
    assert!(!cont[..3].contains(&stop));
    let mut r = script_request(p, 40);
    r.stop_token_ids = vec![stop];
    let c = &run(&engine, r).unwrap().completions[0];
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.token_ids, cont[..4]);
    assert_eq!(c.text, tok.decode(&cont[..3], true).unwrap());

    // A script that emits <|im_end|> (an EOS of this tokenizer) after "Hi".
    let mut script = tok.encode("Hi there", false).unwrap();
    script.push(2);
    let engine = script_engine_with(EngineConfig::default(), ScriptBackend::new(script, 64));
    let mut r = GenerateRequest::new(Prompt::TokenIds(tok.encode("Hi", false).unwrap()));
    r.max_tokens = Some(10);
    let c = &run(&engine, r.clone()).unwrap().completions[0];
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.text, " there");
    assert_eq!(c.token_ids.last(), Some(&2));
    // ignore_eos goes on to max_tokens.
    r.ignore_eos = true;
    let c = &run(&engine, r).unwrap().completions[0];
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.token_ids.len(), 10);
}

#[test]
fn max_tokens_and_max_model_len_end_with_length() {
    let engine = script_engine(EngineConfig {
        max_model_len: Some(40),
        ..EngineConfig::default()
    });
    assert_eq!(engine.model_info().max_model_len, 40);
    let out = run(&engine, script_request(5, 7)).unwrap();
    assert_eq!(out.completions[0].token_ids, script_continuation(5, 7));
    assert_eq!(out.completions[0].finish_reason, FinishReason::Length);
    // No max_tokens: up to max_model_len.
    let mut r = script_request(5, 1);
    r.max_tokens = None;
    let out = run(&engine, r).unwrap();
    assert_eq!(out.completions[0].token_ids.len(), 35);
    assert_eq!(out.completions[0].finish_reason, FinishReason::Length);
}

#[test]
fn chunks_never_split_a_utf8_character() {
    let tok = tokenizer();
    let text = "Größe 日本語 naïve 🙂 café";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > text.chars().count() / 2);
    let mut script = tok.encode("x", false).unwrap();
    script.extend_from_slice(&ids);
    let engine = script_engine_with(EngineConfig::default(), ScriptBackend::new(script, 64));
    let mut r = GenerateRequest::new(Prompt::TokenIds(tok.encode("x", false).unwrap()));
    r.max_tokens = Some(ids.len() as u32);
    r.ignore_eos = true;
    let deltas: Vec<_> = drain(engine.generate(r).unwrap())
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for d in &deltas {
        assert!(!d.text.contains('\u{FFFD}'), "{d:?}");
    }
    let all: String = deltas.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(all, text);
}

/// Next-token logits of the model after each prefix `prompt + out[..i]`, from the model
/// crate's single-sequence runner.
fn reference_rows(prompt: &[u32], out: &[u32]) -> Vec<Vec<f32>> {
    let mut backend = CpuBackend::new(tiny_weights(), cache(64)).unwrap();
    let mut runner = SequenceRunner::new(&mut backend).unwrap();
    let mut rows = vec![runner.feed(prompt, 512, false).unwrap()];
    for &t in &out[..out.len() - 1] {
        rows.push(runner.feed(&[t], 1, false).unwrap());
    }
    rows
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

#[test]
fn logprobs_are_the_models_log_softmax() {
    let engine = cpu_engine(EngineConfig::default(), 64);
    let ids = prompt("The weather is");
    for temperature in [0.0f32, 1.3] {
        let mut r = greedy_req(ids.clone(), 8);
        r.logprobs = 5;
        r.sampling.temperature = temperature;
        r.sampling.seed = Some(9);
        let c = run(&engine, r).unwrap().completions.remove(0);
        assert_eq!(c.logprobs.len(), 8);
        let rows = reference_rows(&ids, &c.token_ids);
        for ((lp, &t), row) in c.logprobs.iter().zip(&c.token_ids).zip(&rows) {
            let want = log_softmax(row);
            let total: f64 = want.iter().map(|x| x.exp()).sum();
            assert!((total - 1.0).abs() < 1e-9);
            assert_eq!(lp.token_id, t);
            // Before temperature: the model's own distribution.
            assert!(
                (f64::from(lp.logprob) - want[t as usize]).abs() < 1e-3,
                "{lp:?}"
            );
            assert_eq!(lp.top.len(), 5);
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "{lp:?}");
            for &(id, v) in &lp.top {
                assert!((f64::from(v) - want[id as usize]).abs() < 1e-3);
            }
            let best = want.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert!((f64::from(lp.top[0].1) - best).abs() < 1e-3);
            if temperature == 0.0 {
                assert_eq!(lp.top[0].0, t);
            }
        }
    }
    // No logprobs asked, none given.
    let c = run(&engine, greedy_req(ids, 4))
        .unwrap()
        .completions
        .remove(0);
    assert!(c.logprobs.is_empty());
}

#[test]
fn thirty_two_concurrent_requests_all_finish_and_free_everything() {
    let engine = cpu_engine(
        EngineConfig {
            max_num_seqs: 16,
            ..EngineConfig::default()
        },
        96,
    );
    let tok = tokenizer();
    let streams: Vec<_> = (0..32u32)
        .map(|i| {
            let mut r = GenerateRequest::new(Prompt::Text(format!(
                "Request {i}: {}",
                "more words ".repeat(i as usize % 7)
            )));
            r.max_tokens = Some(4 + i % 9);
            r.ignore_eos = i % 2 == 0;
            if i % 3 == 0 {
                r.sampling.temperature = 0.8;
                r.sampling.seed = Some(u64::from(i));
            }
            if i % 5 == 0 {
                r.n = 2;
            }
            (i, engine.generate(r).unwrap())
        })
        .collect();
    let rt = runtime();
    for (i, s) in streams {
        let out = rt.block_on(s.collect()).unwrap();
        assert_eq!(out.completions.len(), if i % 5 == 0 { 2 } else { 1 });
        for c in &out.completions {
            assert!(c.token_ids.len() <= (4 + i % 9) as usize);
            if i % 2 == 0 {
                assert_eq!(c.token_ids.len(), (4 + i % 9) as usize);
            }
            assert_eq!(c.text, tok.decode(&strip_eos(&c.token_ids), true).unwrap());
        }
    }
    wait_idle(&engine);
    assert_eq!(
        engine.stats().kv_blocks_free,
        engine.stats().kv_blocks_total
    );
}

/// Token ids without a final EOS (whose text is not part of the completion).
fn strip_eos(ids: &[u32]) -> Vec<u32> {
    match ids.last() {
        Some(0 | 2) => ids[..ids.len() - 1].to_vec(),
        _ => ids.to_vec(),
    }
}

#[test]
fn ngram_speculation_keeps_greedy_output_and_accepts_drafts() {
    let plain = script_engine(EngineConfig::default());
    let spec = script_engine(EngineConfig {
        speculative: Some(SpeculativeMode::Ngram),
        num_speculative_tokens: 4,
        ..EngineConfig::default()
    });
    // The prompt holds the script more than once, so prompt lookup finds what comes next.
    let p = script().len() + 5;
    let r = script_request(p, 60);
    let want = run(&plain, r.clone()).unwrap();
    let got = run(&spec, r).unwrap();
    assert_eq!(got.completions, want.completions);
    assert_eq!(want.completions[0].token_ids, script_continuation(p, 60));
    let stats = spec.stats();
    assert!(
        stats.spec_proposed_tokens > 0 && stats.spec_accepted_tokens > 0,
        "{stats:?}"
    );
    assert!(
        stats.steps < plain.stats().steps,
        "speculation saved no step"
    );
    // Sampling with speculation: seeded, within the script's vocabulary of likely tokens.
    let mut r = script_request(p, 30);
    r.sampling.temperature = 0.5;
    r.sampling.seed = Some(3);
    r.logprobs = 2;
    let c = run(&spec, r).unwrap().completions.remove(0);
    assert_eq!(c.token_ids.len(), 30);
    assert_eq!(c.logprobs.len(), 30);
    wait_idle(&spec);
}

/// The tiny Llama 3 HF checkpoint of the model crate's tests (vocabulary of 300).
fn tiny_hf_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny_hf/llama3")
}

#[test]
fn engine_start_loads_an_hf_directory_and_a_draft_model() {
    let dir = tiny_hf_dir();
    let config = EngineConfig {
        model: engine::ModelSource::Path(dir.clone()),
        device: engine::Device::Cpu,
        kv_cache_memory: Some(1 << 20),
        ..EngineConfig::default()
    };
    let plain = engine::Engine::start(config.clone()).unwrap();
    let info = plain.model_info().clone();
    assert_eq!(info.model, "llama3");
    assert_eq!(info.vocab_size, 300);
    assert_eq!(info.kv_cache_dtype, "fp16");
    assert_eq!(info.device, "cpu");
    assert!(info.num_blocks > 0);
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let ids = tok.encode("hello hello hello world", false).unwrap();
    let r = greedy_req(ids.clone(), 20);
    let want = run(&plain, r.clone()).unwrap();
    // The same model as its own draft: same greedy output, most drafts accepted.
    let spec = engine::Engine::start(EngineConfig {
        speculative: Some(SpeculativeMode::Draft(dir)),
        num_speculative_tokens: 3,
        ..config
    })
    .unwrap();
    let got = run(&spec, r).unwrap();
    assert_eq!(got.completions[0].token_ids, want.completions[0].token_ids);
    let s = spec.stats();
    assert!(s.spec_accepted_tokens > 0, "{s:?}");
    spec.shutdown(std::time::Duration::from_secs(5));
    plain.shutdown(std::time::Duration::from_secs(5));
}

#[test]
fn engine_start_makes_dummy_weights_from_a_config() {
    let start = |source: engine::ModelSource| {
        engine::Engine::start(EngineConfig {
            model: source,
            device: engine::Device::Cpu,
            kv_cache_memory: Some(1 << 20),
            ..EngineConfig::default()
        })
    };
    // A directory with a tokenizer.json: its tokenizer, the checkpoint's shape.
    let dir = tiny_hf_dir();
    let with_tok = start(engine::ModelSource::Dummy(dir.clone())).unwrap();
    let info = with_tok.model_info().clone();
    assert_eq!(info.model, "llama3 (dummy weights)");
    assert_eq!(info.vocab_size, 300);
    let out = run(&with_tok, greedy_req(vec![1, 2, 3], 12)).unwrap();
    assert_eq!(out.completions[0].token_ids.len(), 12);
    // The step loop accounts for its time: forward passes within steps.
    wait_idle(&with_tok);
    let s = with_tok.stats();
    assert!(s.steps >= 12, "{s:?}");
    assert!(
        s.forward_micros > 0 && s.forward_micros <= s.step_micros,
        "{s:?}"
    );
    assert!(s.schedule_micros <= s.step_micros, "{s:?}");
    // ...split by kind of step and batch size: the one-sequence request's prompt step, then
    // its decode steps, all in the first class; together they are every step and its time.
    let sh = s.step_shapes;
    let steps: u64 = sh.decode.iter().chain(&sh.prefill).map(|c| c.steps).sum();
    let fwd: u64 = sh
        .decode
        .iter()
        .chain(&sh.prefill)
        .map(|c| c.forward_micros)
        .sum();
    assert_eq!(steps, s.steps, "{sh:?}");
    // Each class sums whole microseconds: up to one lost per step.
    assert!(
        fwd <= s.forward_micros && fwd + steps >= s.forward_micros,
        "{sh:?}"
    );
    assert!(
        sh.prefill[0].steps >= 1 && sh.decode[0].steps >= 11,
        "{sh:?}"
    );
    assert_eq!(sh.decode[0].tokens, sh.decode[0].steps, "{sh:?}");
    with_tok.shutdown(std::time::Duration::from_secs(5));

    // A bare config.json: the synthetic tokenizer (token i is the word `t{i}`).
    let tmp = std::env::temp_dir().join(format!("kvserve-dummy-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let file = tmp.join("config.json");
    std::fs::copy(dir.join("config.json"), &file).unwrap();
    let bare = start(engine::ModelSource::Dummy(file.clone())).unwrap();
    assert_eq!(bare.model_info().vocab_size, 300);
    let mut r = GenerateRequest::new(Prompt::Text("t5 t6 t7".into()));
    r.max_tokens = Some(4);
    r.ignore_eos = true;
    let c = run(&bare, r).unwrap().completions.remove(0);
    assert_eq!(c.token_ids.len(), 4);
    let words: Vec<String> = c.token_ids.iter().map(|id| format!("t{id}")).collect();
    assert_eq!(c.text.trim(), words.join(" "));
    bare.shutdown(std::time::Duration::from_secs(5));

    // Bad sources: a missing path, a config that is not JSON, a shape that is not valid.
    std::fs::write(tmp.join("broken.json"), "{ not json").unwrap();
    let mut bad_shape: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    bad_shape["num_key_value_heads"] = serde_json::json!(3);
    std::fs::write(tmp.join("bad_shape.json"), bad_shape.to_string()).unwrap();
    for name in ["missing.json", "broken.json", "bad_shape.json"] {
        let path = tmp.join(name);
        match start(engine::ModelSource::Dummy(path.clone())) {
            Err(engine::EngineError::Startup(msg)) => {
                assert!(msg.contains(&path.display().to_string()), "{name}: {msg}")
            }
            other => panic!("{name}: {:?}", other.map(|h| h.model_info().clone())),
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Greedy continuation of `ids` by the model crate's single-sequence driver.
fn reference_greedy(ids: &[u32], n: usize) -> Vec<u32> {
    generate(
        &mut CpuBackend::new(tiny_weights(), cache(64)).unwrap(),
        ids,
        &GenerateOptions {
            max_new_tokens: n,
            ..GenerateOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn preemption_by_recompute_and_by_swap_keeps_every_output_exact() {
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| prompt(&format!("Sequence {i} starts with a prompt of some length")))
        .collect();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| reference_greedy(p, 40)).collect();
    for mode in [
        engine::PreemptionMode::Recompute,
        engine::PreemptionMode::Swap,
    ] {
        // 14 blocks of 16 slots for six sequences of about 50 tokens (4 blocks each).
        let kv = model::KvCacheConfig {
            num_cpu_blocks: 32,
            ..cache(14)
        };
        let engine = engine::Engine::start_with_backend(
            EngineConfig {
                preemption_mode: mode,
                enable_prefix_caching: false,
                ..EngineConfig::default()
            },
            Box::new(CpuBackend::new(tiny_weights(), kv).unwrap()),
            tokenizer(),
            "tiny".into(),
        )
        .unwrap();
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| engine.generate(greedy_req(p.clone(), 40)).unwrap())
            .collect();
        let rt = runtime();
        for (s, w) in streams.into_iter().zip(&want) {
            assert_eq!(
                &rt.block_on(s.collect()).unwrap().completions[0].token_ids,
                w,
                "{mode:?}"
            );
        }
        let stats = engine.stats();
        assert!(stats.preemptions > 0, "{mode:?}: no preemption: {stats:?}");
        wait_idle(&engine);
    }
}

#[test]
fn greedy_samples_of_one_prompt_all_equal_plain_greedy() {
    // n = 3 shares the prompt's blocks; each sample's first write into the shared last block
    // is a copy-on-write copy the backend must run before the forward pass.
    let engine = cpu_engine(EngineConfig::default(), 64);
    let ids = prompt("Copy on write must keep every sample exact");
    let mut r = greedy_req(ids.clone(), 20);
    r.n = 3;
    let out = run(&engine, r).unwrap();
    let want = reference_greedy(&ids, 20);
    for c in &out.completions {
        assert_eq!(c.token_ids, want, "sample {}", c.index);
    }
}

#[test]
fn sampling_on_the_device_gives_the_host_paths_tokens() {
    // Greedy, seeded sampling with every filter and a repetition penalty, n = 2 (its first
    // step fans out on the host, later steps sample each completion on the device), and a
    // request with log-probabilities (its steps stay on the host).
    let mut penalized = sampled(11, "The quick brown fox");
    penalized.sampling.repetition_penalty = 1.3;
    penalized.sampling.min_p = 0.05;
    let mut pair = sampled(12, "Tell me a story");
    pair.n = 2;
    let mut with_logprobs = sampled(13, "Numbers: one two");
    with_logprobs.logprobs = 2;
    let requests = [
        greedy_req(prompt("Hello there, how are you today?"), 16),
        sampled(10, "Once upon a time"),
        penalized,
        pair,
        with_logprobs,
    ];
    let host = cpu_engine(EngineConfig::default(), 128);
    let backend = DeviceSamplingCpu::new(128);
    let rows = backend.sampled_rows.clone();
    let device = engine::Engine::start_with_backend(
        EngineConfig {
            device: engine::Device::Cpu,
            ..EngineConfig::default()
        },
        Box::new(backend),
        tokenizer(),
        "tiny".into(),
    )
    .unwrap();
    for r in &requests {
        let want = run(&host, r.clone()).unwrap();
        let got = run(&device, r.clone()).unwrap();
        let tokens = |o: &GenerateOutput| -> Vec<Vec<u32>> {
            o.completions.iter().map(|c| c.token_ids.clone()).collect()
        };
        assert_eq!(tokens(&got), tokens(&want), "{:?}", r.sampling);
    }
    assert!(
        rows.load(std::sync::atomic::Ordering::Relaxed) > 40,
        "the device path was not taken"
    );
    wait_idle(&host);
    wait_idle(&device);
}

#[test]
fn stats_count_prefix_hits_and_peaks() {
    let engine = cpu_engine(EngineConfig::default(), 64);
    let before = engine.stats();
    assert_eq!(
        (before.prefix_hit_tokens, before.kv_blocks_used_peak),
        (0, 0)
    );
    // Two full blocks of shared prefix, then distinct suffixes; the first request fills the
    // prefix cache before the second arrives.
    let prefix: Vec<u32> = (100..132).collect();
    let with_suffix = |s: u32| {
        let mut p = prefix.clone();
        p.extend([s, s + 1, s + 2]);
        p
    };
    run(&engine, greedy_req(with_suffix(500), 4)).unwrap();
    run(&engine, greedy_req(with_suffix(600), 4)).unwrap();
    wait_idle(&engine);
    let s = engine.stats();
    assert_eq!(s.prefix_query_tokens, 2 * 35);
    assert_eq!(s.prefix_hit_tokens, 32, "{s:?}");
    // Each request held 3 blocks (38 slots) at most, one at a time.
    assert!(
        (2..=3).contains(&s.kv_blocks_used_peak),
        "{}",
        s.kv_blocks_used_peak
    );
    assert_eq!(s.running_peak, 1);
    assert_eq!(s.kv_blocks_used, 0);
}
