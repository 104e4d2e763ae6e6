//! Every bad request is refused by `generate` at once, with an error naming the field, and
//! nothing is queued; admission limits; `tokenize`; bad engine configurations.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use engine::{
    Engine, EngineConfig, EngineError, GenerateRequest, Limits, Message, Prompt, SpeculativeMode,
};

fn ok_request() -> GenerateRequest {
    let mut r = GenerateRequest::new(Prompt::TokenIds(vec![40, 41, 42]));
    r.max_tokens = Some(4);
    r
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

/// Asserts `generate` refuses `req` with `InvalidArgument` on `field`, queueing nothing.
fn assert_invalid(engine: &engine::EngineHandle, req: GenerateRequest, field: &str) {
    let before = engine.stats();
    match engine.generate(req.clone()) {
        Err(EngineError::InvalidArgument { field: f, reason }) => {
            assert_eq!(f, field, "{reason}");
            assert!(!reason.is_empty());
            let shown = EngineError::InvalidArgument { field: f, reason }.to_string();
            assert!(shown.contains(field), "{shown}");
        }
        Err(other) => panic!("{req:?}: expected InvalidArgument({field}), got {other:?}"),
        Ok(_) => panic!("{req:?}: accepted, expected InvalidArgument({field})"),
    }
    let after = engine.stats();
    assert_eq!(after.requests_in_flight, 0);
    assert_eq!(after.waiting, before.waiting);
}

#[test]
fn every_bad_field_is_refused_with_its_name() {
    let engine = script_engine(EngineConfig {
        max_model_len: Some(100),
        limits: Limits {
            max_n: 4,
            max_stop_strings: 2,
            max_stop_string_len: 8,
            max_stop_token_ids: 2,
            max_logprobs: 5,
        },
        ..EngineConfig::default()
    });
    let case = |f: &dyn Fn(&mut GenerateRequest), field: &str| {
        let mut r = ok_request();
        f(&mut r);
        assert_invalid(&engine, r, field);
    };
    // Prompts.
    case(&|r| r.prompt = Prompt::Text(String::new()), "prompt.text");
    case(&|r| r.prompt = Prompt::TokenIds(vec![]), "prompt.token_ids");
    case(
        &|r| r.prompt = Prompt::TokenIds(vec![1, VOCAB as u32]),
        "prompt.token_ids",
    );
    case(
        &|r| r.prompt = Prompt::TokenIds(vec![u32::MAX]),
        "prompt.token_ids",
    );
    case(&|r| r.prompt = Prompt::Messages(vec![]), "prompt.messages");
    case(
        &|r| r.prompt = Prompt::Messages(vec![msg("user", "hi"), msg("wizard", "boo")]),
        "prompt.messages.role",
    );
    case(&|r| r.prompt = Prompt::TokenIds(vec![40; 100]), "prompt");
    case(&|r| r.prompt = Prompt::TokenIds(vec![40; 5000]), "prompt");
    // Lengths.
    case(&|r| r.max_tokens = Some(0), "max_tokens");
    case(&|r| r.max_tokens = Some(98), "max_tokens");
    case(&|r| r.max_tokens = Some(u32::MAX), "max_tokens");
    // Sampling.
    for t in [-0.1f32, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        case(&|r| r.sampling.temperature = t, "sampling.temperature");
    }
    for p in [0.0f32, -0.5, 1.01, f32::NAN, f32::INFINITY] {
        case(&|r| r.sampling.top_p = p, "sampling.top_p");
    }
    for p in [-0.01f32, 1.01, f32::NAN] {
        case(&|r| r.sampling.min_p = p, "sampling.min_p");
    }
    for p in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        case(
            &|r| r.sampling.repetition_penalty = p,
            "sampling.repetition_penalty",
        );
    }
    // Counts and limits.
    case(&|r| r.n = 5, "n");
    case(&|r| r.n = u32::MAX, "n");
    case(
        &|r| r.stop = vec!["a".into(), "b".into(), "c".into()],
        "stop",
    );
    case(&|r| r.stop = vec!["a".into(), String::new()], "stop");
    case(&|r| r.stop = vec!["much too long".into()], "stop");
    case(&|r| r.stop_token_ids = vec![1, 2, 3], "stop_token_ids");
    case(&|r| r.stop_token_ids = vec![VOCAB as u32], "stop_token_ids");
    case(&|r| r.logprobs = 6, "logprobs");
    case(&|r| r.request_id = Some(String::new()), "request_id");
    case(&|r| r.request_id = Some("x".repeat(300)), "request_id");

    // The edges are fine: n = 0 means 1, exact limits, prompt + max_tokens = max_model_len.
    let mut r = ok_request();
    r.n = 0;
    r.logprobs = 5;
    r.stop = vec!["12345678".into(), "b".into()];
    r.stop_token_ids = vec![1, 2];
    r.sampling.top_p = 1.0;
    r.sampling.min_p = 1.0;
    r.sampling.temperature = 0.0;
    let out = run(&engine, r).unwrap();
    assert_eq!(out.completions.len(), 1);
    let mut r = ok_request();
    r.max_tokens = Some(97);
    r.ignore_eos = true;
    assert_eq!(run(&engine, r).unwrap().completions[0].token_ids.len(), 97);
    let mut r = ok_request();
    r.n = 4;
    assert_eq!(run(&engine, r).unwrap().completions.len(), 4);
    wait_idle(&engine);
}

#[test]
fn a_deadline_already_past_is_refused() {
    let engine = script_engine(EngineConfig::default());
    let mut r = ok_request();
    r.deadline = Some(Instant::now() - Duration::from_millis(1));
    assert_eq!(
        engine.generate(r).err(),
        Some(EngineError::DeadlineExceeded)
    );
    assert_eq!(engine.stats().requests_in_flight, 0);
}

#[test]
fn a_request_that_can_never_fit_the_kv_pool_is_refused_at_once() {
    // 4 blocks of 16 slots: the longest sequence is 65 tokens (64 with KV, plus the last).
    let engine = script_engine_with(EngineConfig::default(), ScriptBackend::new(script(), 4));
    assert_eq!(engine.model_info().max_model_len, 65);
    let mut r = ok_request();
    r.max_tokens = Some(63);
    assert_invalid(&engine, r, "max_tokens");
    assert_invalid(
        &engine,
        GenerateRequest::new(Prompt::TokenIds(vec![40; 65])),
        "prompt",
    );
    // Exactly what fits runs to the end.
    let mut r = ok_request();
    r.max_tokens = Some(62);
    r.ignore_eos = true;
    assert_eq!(run(&engine, r).unwrap().completions[0].token_ids.len(), 62);
    wait_idle(&engine);
}

#[test]
fn duplicate_live_ids_are_refused_and_ids_are_reusable_after_the_end() {
    let mut backend = ScriptBackend::new(script(), 64);
    backend.delay = Duration::from_millis(2);
    let engine = script_engine_with(EngineConfig::default(), backend);
    let mut r = script_request(3, 200);
    r.request_id = Some("mine".into());
    let stream = engine.generate(r.clone()).unwrap();
    assert_eq!(stream.request_id(), "mine");
    assert_eq!(
        engine.generate(r.clone()).err(),
        Some(EngineError::DuplicateId("mine".into()))
    );
    assert!(engine.abort("mine"));
    let items = drain(stream);
    assert!(items.iter().all(Result::is_ok));
    wait_idle(&engine);
    r.max_tokens = Some(2);
    assert_eq!(run(&engine, r).unwrap().request_id, "mine");
    // Generated ids are unique.
    let a = engine.generate(ok_request()).unwrap();
    let b = engine.generate(ok_request()).unwrap();
    assert_ne!(a.request_id(), b.request_id());
}

#[test]
fn admission_is_bounded_by_max_queued_requests() {
    let mut backend = ScriptBackend::new(script(), 64);
    backend.delay = Duration::from_millis(2);
    let engine = script_engine_with(
        EngineConfig {
            max_queued_requests: 2,
            ..EngineConfig::default()
        },
        backend,
    );
    let a = engine.generate(script_request(3, 200)).unwrap();
    let b = engine.generate(script_request(3, 200)).unwrap();
    assert_eq!(
        engine.generate(script_request(3, 5)).err(),
        Some(EngineError::Overloaded(2))
    );
    assert_eq!(engine.stats().requests_in_flight, 2);
    drop(a);
    wait_until("a slot to free", || engine.stats().requests_in_flight < 2);
    let c = engine.generate(script_request(3, 5)).unwrap();
    assert!(drain(c).iter().all(Result::is_ok));
    drop(b);
    wait_idle(&engine);
    assert!(
        engine
            .metrics_text()
            .contains("kvserve_requests_total{outcome=\"overloaded\"} 1")
    );
}

#[test]
fn tokenize_matches_what_generate_uses() {
    let engine = script_engine(EngineConfig::default());
    let tok = tokenizer();
    assert_eq!(
        engine
            .tokenize(&Prompt::Text("Hello world".into()))
            .unwrap(),
        tok.encode("Hello world", true).unwrap()
    );
    assert_eq!(
        engine.tokenize(&Prompt::TokenIds(vec![5, 6])).unwrap(),
        [5, 6]
    );
    let chat = engine
        .tokenize(&Prompt::Messages(vec![msg("user", "Hi!")]))
        .unwrap();
    let text = tok.decode(&chat, false).unwrap();
    assert!(
        text.starts_with("<|im_start|>system") && text.ends_with("<|im_start|>assistant\n"),
        "{text:?}"
    );
    for (p, field) in [
        (Prompt::Text(String::new()), "prompt.text"),
        (Prompt::TokenIds(vec![]), "prompt.token_ids"),
        (Prompt::TokenIds(vec![VOCAB as u32]), "prompt.token_ids"),
        (Prompt::Messages(vec![]), "prompt.messages"),
        (
            Prompt::Messages(vec![msg("robot", "x")]),
            "prompt.messages.role",
        ),
    ] {
        match engine.tokenize(&p) {
            Err(EngineError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{p:?}: {other:?}"),
        }
    }
    // A chat request runs through the template.
    let mut r = GenerateRequest::new(Prompt::Messages(vec![
        msg("system", "Be brief."),
        msg("user", "Hi!"),
        msg("assistant", "Hello."),
        msg("user", "Bye"),
    ]));
    r.max_tokens = Some(3);
    let out = run(&engine, r).unwrap();
    assert!(out.usage.prompt_tokens > 10);
}

#[test]
fn bad_engine_configs_are_refused_at_startup() {
    let start = |config: EngineConfig| {
        Engine::start_with_backend(
            config,
            Box::new(ScriptBackend::new(script(), 16)),
            tokenizer(),
            "x".into(),
        )
        .err()
    };
    for (config, field) in [
        (
            EngineConfig {
                max_num_seqs: 0,
                ..EngineConfig::default()
            },
            "max_num_seqs",
        ),
        (
            EngineConfig {
                max_num_batched_tokens: 0,
                ..EngineConfig::default()
            },
            "max_num_batched_tokens",
        ),
        (
            EngineConfig {
                max_queued_requests: 0,
                ..EngineConfig::default()
            },
            "max_queued_requests",
        ),
        (
            EngineConfig {
                max_model_len: Some(1),
                ..EngineConfig::default()
            },
            "max_model_len",
        ),
        (
            EngineConfig {
                gpu_memory_utilization: f64::NAN,
                ..EngineConfig::default()
            },
            "gpu_memory_utilization",
        ),
        (
            EngineConfig {
                speculative: Some(SpeculativeMode::Ngram),
                num_speculative_tokens: 0,
                ..EngineConfig::default()
            },
            "num_speculative_tokens",
        ),
        (
            EngineConfig {
                speculative: Some(SpeculativeMode::Draft("/nonexistent/draft.gguf".into())),
                ..EngineConfig::default()
            },
            "/nonexistent/draft.gguf",
        ),
    ] {
        match start(config) {
            Some(EngineError::Startup(msg)) => assert!(msg.contains(field), "{field}: {msg}"),
            other => panic!("{field}: {other:?}"),
        }
    }
    // Engine::start refuses a bad config before loading anything, and a missing model.
    for (config, what) in [
        (
            EngineConfig {
                device: engine::Device::Cuda,
                model: engine::ModelSource::Path("/nonexistent".into()),
                ..EngineConfig::default()
            },
            "device",
        ),
        (
            EngineConfig {
                model: engine::ModelSource::Path("/nonexistent/model.gguf".into()),
                ..EngineConfig::default()
            },
            "/nonexistent/model.gguf",
        ),
    ] {
        // With a GPU, `cuda` gets past the device and fails on the missing model instead.
        let gpu = model::Gpu::new(0).is_ok();
        match Engine::start(config) {
            Err(EngineError::Startup(msg)) => assert!(
                msg.contains(what) || (gpu && msg.contains("/nonexistent")),
                "{what}: {msg}"
            ),
            other => panic!("{what}: {other:?}"),
        }
    }
    // The KV budget: too small for one block, and sizing from the model's shape.
    let model = tiny_config();
    let config = EngineConfig {
        kv_cache_memory: Some(100),
        ..EngineConfig::default()
    };
    match engine::kv_cache_config(&config, &model) {
        Err(EngineError::Startup(msg)) => assert!(msg.contains("kv_cache_memory"), "{msg}"),
        other => panic!("{other:?}"),
    }
    // fp16, 16 slots, 2 KV heads of 16 channels: 1 KiB per K or V block and layer.
    let per_block = 2 * 1024 * model.num_layers as u64;
    let kv = engine::kv_cache_config(
        &EngineConfig {
            kv_cache_memory: Some(per_block * 10 + 5),
            swap_space: per_block * 3,
            ..EngineConfig::default()
        },
        &model,
    )
    .unwrap();
    assert_eq!(
        (kv.num_blocks, kv.num_cpu_blocks, kv.block_size),
        (10, 3, 16)
    );
    let kv = engine::kv_cache_config(
        &EngineConfig {
            kv_cache_dtype: Some("int8".parse().unwrap()),
            ..EngineConfig::default()
        },
        &model,
    )
    .unwrap();
    assert!(kv.num_blocks as u64 * per_block > engine::DEFAULT_CPU_KV_CACHE_MEMORY);
    match engine::kv_cache_config(
        &EngineConfig {
            block_size: 7,
            ..EngineConfig::default()
        },
        &model,
    ) {
        Err(EngineError::Startup(msg)) => assert!(msg.contains("block_size"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

/// `validate_request` (the engine-free check used by the fuzzers) refuses what `generate`
/// refuses, naming the field, and returns the prompt's ids for a good request.
#[test]
fn validate_request_without_an_engine() {
    let tokenizer = model::Tokenizer::synthetic(64).unwrap();
    let bounds = engine::RequestBounds {
        limits: Limits::default(),
        vocab_size: 64,
        max_model_len: 16,
        max_num_seqs: 4,
    };
    let check = |req: &GenerateRequest| engine::validate_request(req, &tokenizer, &bounds);

    let mut good = GenerateRequest::new(Prompt::TokenIds(vec![1, 2, 3]));
    good.max_tokens = Some(4);
    assert_eq!(check(&good).unwrap(), vec![1, 2, 3]);
    let text = GenerateRequest::new(Prompt::Text("t5 t6".into()));
    assert_eq!(check(&text).unwrap(), vec![5, 6]);

    let field_of = |req: &GenerateRequest| match check(req) {
        Err(EngineError::InvalidArgument { field, .. }) => field,
        other => panic!("{req:?}: expected InvalidArgument, got {other:?}"),
    };
    let mut out_of_vocab = good.clone();
    out_of_vocab.prompt = Prompt::TokenIds(vec![64]);
    assert_eq!(field_of(&out_of_vocab), "prompt.token_ids");
    let mut too_long = good.clone();
    too_long.max_tokens = Some(u32::MAX);
    assert_eq!(field_of(&too_long), "max_tokens");
    let mut too_many = good.clone();
    too_many.n = 5;
    assert_eq!(field_of(&too_many), "n");
    let mut bad_top_p = good;
    bad_top_p.sampling.top_p = f32::NAN;
    assert_eq!(field_of(&bad_top_p), "sampling.top_p");
}
