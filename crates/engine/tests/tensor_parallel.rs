//! Tensor parallelism on the CPU through the engine: greedy outputs at TP > 1 equal TP = 1
//! (the real default model at TP 3, the tiny dummy model at TP 2), a rank that fails or
//! panics ends the running requests with an error and turns health `NotServing` without
//! hanging, and bad settings are refused with errors naming `tensor_parallel_size`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::{run, tokenizer, wait_until};
use dist::{GroupAbort, TensorParallelBackend, ThreadGroup};
use engine::{
    Device, Engine, EngineConfig, EngineError, GenerateRequest, Health, ModelSource, Prompt,
};
use kv_block_manager::CopyOp;
use model::{
    Backend, CpuBackend, DType, ForwardBatch, HostCollective, KvCacheConfig, ModelConfig,
    ModelError, Weights,
};

fn greedy(prompt: Prompt, max_tokens: u32) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt);
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r
}

/// Greedy token ids of each prompt on an engine started from `config`.
fn outputs(config: EngineConfig, prompts: &[Prompt], max_tokens: u32) -> Vec<Vec<u32>> {
    let engine = Engine::start(config).unwrap_or_else(|e| panic!("{e}"));
    let out = prompts
        .iter()
        .map(|p| {
            let out = run(&engine, greedy(p.clone(), max_tokens)).unwrap();
            out.completions[0].token_ids.clone()
        })
        .collect();
    engine.shutdown(Duration::from_secs(5));
    out
}

#[test]
fn smollm2_at_tp3_gives_the_greedy_tokens_of_tp1() {
    let prompts = [
        Prompt::Text("The capital of France is".into()),
        Prompt::Text("def fibonacci(n):".into()),
    ];
    let config = |tp| EngineConfig {
        device: Device::Cpu,
        kv_cache_memory: Some(8 << 20),
        tensor_parallel_size: tp,
        ..EngineConfig::default()
    };
    let one = outputs(config(1), &prompts, 12);
    let three = Engine::start(config(3)).expect("the default model (cargo xtask fetch-model)");
    let info = three.model_info().clone();
    assert!(info.device.contains("x 3"), "{}", info.device);
    for (p, want) in prompts.iter().zip(&one) {
        let got = run(&three, greedy(p.clone(), 12)).unwrap();
        assert_eq!(&got.completions[0].token_ids, want, "{p:?}");
    }
    three.shutdown(Duration::from_secs(5));
}

/// A directory holding the tiny dummy model's `config.json` and the tiny tokenizer.
fn tiny_dummy_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvserve-tp-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = ModelConfig::tiny(common::VOCAB);
    let json = format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": {}, "intermediate_size": {}, "num_hidden_layers": {},
            "num_attention_heads": {}, "num_key_value_heads": {}, "vocab_size": {},
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": {},
            "tie_word_embeddings": true}}"#,
        c.hidden_size,
        c.intermediate_size,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        c.vocab_size,
        c.max_position_embeddings
    );
    std::fs::write(dir.join("config.json"), json).unwrap();
    for (from, to) in [
        ("tiny_tokenizer.json", "tokenizer.json"),
        ("tiny_tokenizer_config.json", "tokenizer_config.json"),
    ] {
        std::fs::copy(common::data_dir().join(from), dir.join(to)).unwrap();
    }
    dir
}

#[test]
fn the_tiny_dummy_model_at_tp2_gives_the_greedy_tokens_of_tp1_and_tp3_is_refused() {
    let dir = tiny_dummy_dir();
    let config = |tp| EngineConfig {
        model: ModelSource::Dummy(dir.clone()),
        device: Device::Cpu,
        kv_cache_memory: Some(1 << 20),
        tensor_parallel_size: tp,
        ..EngineConfig::default()
    };
    let prompts = [
        Prompt::TokenIds(vec![5, 17, 42, 99, 7]),
        Prompt::TokenIds((100..140).collect()),
    ];
    let one = outputs(config(1), &prompts, 16);
    let two = outputs(config(2), &prompts, 16);
    assert_eq!(one, two);
    // 4 query heads do not divide over 3 ranks.
    let err = Engine::start(config(3)).err().unwrap().to_string();
    assert!(
        err.contains("tensor_parallel_size") && err.contains("4 query heads over 3 ranks"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_tensor_parallel_settings_are_refused_clearly() {
    let start = |tp, device| {
        Engine::start(EngineConfig {
            device,
            tensor_parallel_size: tp,
            ..EngineConfig::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    let zero = start(0, Device::Cpu);
    assert!(
        zero.contains("tensor_parallel_size") && zero.contains("at least 1"),
        "{zero}"
    );
    // Without a GPU: cuda refused; with one GPU: 2 ranks need 2.
    let gpu = start(2, Device::Cuda);
    assert!(
        gpu.contains("cuda was asked for") || gpu.contains("2 ranks need 2 GPUs"),
        "{gpu}"
    );
    // Several nodes: validated, CUDA only, and node 0 alone runs the engine.
    let nodes = |device, node_rank, addr: Option<&str>| EngineConfig {
        device,
        tensor_parallel_size: 2,
        nnodes: 2,
        node_rank,
        dist_init_addr: addr.map(str::to_owned),
        ..EngineConfig::default()
    };
    fn err<T>(r: Result<T, engine::EngineError>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }
    let no_addr = err(Engine::start(nodes(Device::Cpu, 0, None)));
    assert!(no_addr.contains("dist_init_addr"), "{no_addr}");
    let cpu = err(Engine::start(nodes(
        Device::Cpu,
        0,
        Some("127.0.0.1:29500"),
    )));
    assert!(cpu.contains("nnodes") && cpu.contains("CUDA"), "{cpu}");
    let other = err(Engine::start(nodes(
        Device::Auto,
        1,
        Some("127.0.0.1:29500"),
    )));
    assert!(other.contains("serves its ranks to node 0"), "{other}");
    let host = err(Engine::serve_node(nodes(
        Device::Auto,
        0,
        Some("127.0.0.1:29500"),
    )));
    assert!(host.contains("runs the engine"), "{host}");
    let single = err(Engine::serve_node(EngineConfig::default()));
    assert!(single.contains("runs the engine"), "{single}");
    let node_cpu = err(Engine::serve_node(nodes(
        Device::Cpu,
        1,
        Some("127.0.0.1:29500"),
    )));
    assert!(node_cpu.contains("CUDA"), "{node_cpu}");
    // SmolLM2 has 9 query heads and 3 KV heads: 2 ranks cannot share them.
    let uneven = start(2, Device::Cpu);
    assert!(
        uneven.contains("tensor_parallel_size") && uneven.contains("9 query heads over 2 ranks"),
        "{uneven}"
    );
}

/// A sharded CPU backend that fails (or panics) on its `at`th forward.
#[derive(Debug)]
struct Faulty {
    inner: CpuBackend,
    at: Option<usize>,
    panic: bool,
    forwards: Arc<AtomicUsize>,
}

impl Backend for Faulty {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn kv_cache_config(&self) -> KvCacheConfig {
        self.inner.kv_cache_config()
    }
    fn forward(&mut self, b: &ForwardBatch<'_>, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        let n = self.forwards.fetch_add(1, Ordering::Relaxed) + 1;
        if self.at == Some(n) {
            assert!(!self.panic, "injected panic on forward {n}");
            return Err(ModelError::Unsupported(format!(
                "injected failure on forward {n}"
            )));
        }
        self.inner.forward(b, logits)
    }
    fn copy_blocks(&mut self, c: &[CopyOp]) -> Result<(), ModelError> {
        self.inner.copy_blocks(c)
    }
    fn swap_out(&mut self, c: &[CopyOp]) -> Result<(), ModelError> {
        self.inner.swap_out(c)
    }
    fn swap_in(&mut self, c: &[CopyOp]) -> Result<(), ModelError> {
        self.inner.swap_in(c)
    }
}

fn faulty_engine(panic: bool) -> engine::EngineHandle {
    let members = ThreadGroup::new(2).unwrap();
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let backend = TensorParallelBackend::spawn(2, group, move |rank| {
        let member = members[rank].clone();
        let shard = member.shard();
        let weights = Weights::dummy_shard(&common::tiny_config(), DType::Q8_0, 7, shard)?;
        Ok(Faulty {
            inner: CpuBackend::new_sharded(weights, common::cache(64), Arc::new(member))?,
            at: (rank == 1).then_some(4),
            panic,
            forwards: Arc::new(AtomicUsize::new(0)),
        })
    })
    .unwrap();
    Engine::start_with_backend(
        EngineConfig {
            device: Device::Cpu,
            ..EngineConfig::default()
        },
        Box::new(backend),
        tokenizer(),
        "tiny tp".into(),
    )
    .unwrap()
}

fn a_dying_rank_fails_the_requests_and_the_engine(panic: bool) {
    let engine = faulty_engine(panic);
    assert_eq!(engine.health(), Health::Serving);
    let (tx, rx) = mpsc::channel();
    let e = engine.clone();
    std::thread::spawn(move || {
        let _ = tx.send(run(&e, greedy(Prompt::TokenIds(vec![5, 17, 42]), 20)));
    });
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the request hung after a rank died");
    let err = result.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, EngineError::Internal(_)), "{message}");
    assert!(message.contains("rank 1"), "{message}");
    assert!(
        message.contains(if panic {
            "injected panic"
        } else {
            "injected failure"
        }),
        "{message}"
    );
    wait_until("health NotServing", || {
        engine.health() == Health::NotServing
    });
    assert!(matches!(
        engine.generate(greedy(Prompt::TokenIds(vec![1, 2]), 2)),
        Err(EngineError::Unavailable(_))
    ));
}

#[test]
fn a_failing_rank_fails_the_requests_and_turns_health_not_serving() {
    a_dying_rank_fails_the_requests_and_the_engine(false);
}

#[test]
fn a_panicking_rank_fails_the_requests_and_turns_health_not_serving() {
    a_dying_rank_fails_the_requests_and_the_engine(true);
}
