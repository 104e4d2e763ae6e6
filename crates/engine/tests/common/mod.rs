//! Shared by the engine's test suites: the tiny tokenizer, a tiny dummy Llama on the CPU
//! backend, a scripted fake backend, fault injection, and small async helpers.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use engine::{
    Engine, EngineConfig, EngineError, EngineHandle, GenerateOutput, GenerateRequest, Prompt,
    ResponseStream, StreamDelta,
};
use kv_block_manager::CopyOp;
use model::{
    Backend, CpuBackend, DType, ForwardBatch, KvCacheConfig, ModelConfig, ModelError, Tokenizer,
    Weights,
};

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The tiny SmolLM-style tokenizer (1,200 tokens, ChatML template, `<|im_end|>` = 2 ends a
/// turn, `<|endoftext|>` = 0).
pub fn tokenizer() -> Tokenizer {
    let config = std::fs::read_to_string(data_dir().join("tiny_tokenizer_config.json")).unwrap();
    Tokenizer::from_file(data_dir().join("tiny_tokenizer.json"))
        .unwrap()
        .with_hf_config(&config)
        .unwrap()
}

pub const VOCAB: usize = 1200;

/// A tiny Llama sharing the tokenizer's vocabulary.
pub fn tiny_config() -> ModelConfig {
    ModelConfig::tiny(VOCAB)
}

pub fn tiny_weights() -> Weights {
    Weights::dummy(&tiny_config(), DType::Q8_0, 7).unwrap()
}

pub fn cache(num_blocks: usize) -> KvCacheConfig {
    KvCacheConfig {
        num_blocks,
        block_size: 16,
        dtype: "fp16".parse().unwrap(),
        num_cpu_blocks: 0,
    }
}

/// An engine over the tiny dummy model on the CPU backend.
pub fn cpu_engine(config: EngineConfig, num_blocks: usize) -> EngineHandle {
    let backend = CpuBackend::new(tiny_weights(), cache(num_blocks)).unwrap();
    Engine::start_with_backend(
        EngineConfig {
            device: engine::Device::Cpu,
            ..config
        },
        Box::new(backend),
        tokenizer(),
        "tiny".into(),
    )
    .unwrap()
}

/// A fake model: the logits at position `p` put the token `script[(p + 1) % len]` first (by a
/// margin of 8 over small pseudo-random values elsewhere), so greedy decoding of a prompt that
/// is a prefix of the script continues the script, cyclically. No KV is stored.
#[derive(Debug)]
pub struct ScriptBackend {
    config: ModelConfig,
    cache: KvCacheConfig,
    script: Vec<u32>,
    /// Sleep per forward pass (to keep requests running while a test acts).
    pub delay: Duration,
    pub fault: Fault,
    pub forwards: Arc<AtomicUsize>,
}

/// Fault injection by input token.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fault {
    /// A forward whose batch holds this input token fails.
    pub fail_on: Option<u32>,
    /// A forward whose batch holds this input token panics.
    pub panic_on: Option<u32>,
}

impl ScriptBackend {
    pub fn new(script: Vec<u32>, num_blocks: usize) -> Self {
        Self {
            config: tiny_config(),
            cache: cache(num_blocks),
            script,
            delay: Duration::ZERO,
            fault: Fault::default(),
            forwards: Arc::new(AtomicUsize::new(0)),
        }
    }
}

fn noise(pos: u32, token: usize) -> f32 {
    let mut x = (u64::from(pos) << 32 | token as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    (x % 1000) as f32 / 1000.0
}

impl Backend for ScriptBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_cache_config(&self) -> KvCacheConfig {
        self.cache
    }

    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.forwards.fetch_add(1, Ordering::Relaxed);
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        if let Some(t) = self.fault.panic_on
            && batch.token_ids.contains(&t)
        {
            panic!("injected panic");
        }
        if let Some(t) = self.fault.fail_on
            && batch.token_ids.contains(&t)
        {
            return Err(ModelError::Unsupported("injected failure".into()));
        }
        let v = self.config.vocab_size;
        logits.clear();
        for &i in batch.logits_indices {
            let pos = batch.positions[i as usize];
            let next = self.script[(pos as usize + 1) % self.script.len()] as usize;
            logits.extend((0..v).map(|t| noise(pos, t) + if t == next { 8.0 } else { 0.0 }));
        }
        Ok(())
    }

    fn copy_blocks(&mut self, _copies: &[CopyOp]) -> Result<(), ModelError> {
        Ok(())
    }

    fn swap_out(&mut self, _copies: &[CopyOp]) -> Result<(), ModelError> {
        Ok(())
    }

    fn swap_in(&mut self, _copies: &[CopyOp]) -> Result<(), ModelError> {
        Ok(())
    }
}

/// The script the fake model follows: this text, tokenized.
pub const SCRIPT_TEXT: &str = "The quick brown fox jumps over the lazy dog. Then the fox sleeps. ";

pub fn script() -> Vec<u32> {
    tokenizer().encode(SCRIPT_TEXT, false).unwrap()
}

pub fn script_engine_with(config: EngineConfig, backend: ScriptBackend) -> EngineHandle {
    Engine::start_with_backend(
        EngineConfig {
            device: engine::Device::Cpu,
            ..config
        },
        Box::new(backend),
        tokenizer(),
        "script".into(),
    )
    .unwrap()
}

pub fn script_engine(config: EngineConfig) -> EngineHandle {
    script_engine_with(config, ScriptBackend::new(script(), 256))
}

/// A greedy request for the first `prompt_len` tokens of the (cycled) script.
pub fn script_request(prompt_len: usize, max_tokens: u32) -> GenerateRequest {
    let s = script();
    let prompt = (0..prompt_len).map(|p| s[p % s.len()]).collect();
    let mut r = GenerateRequest::new(Prompt::TokenIds(prompt));
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r
}

/// What the script continues with after `prompt_len` tokens, `n` tokens of it.
pub fn script_continuation(prompt_len: usize, n: usize) -> Vec<u32> {
    let s = script();
    (prompt_len..prompt_len + n)
        .map(|p| s[p % s.len()])
        .collect()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs a request to its end (synchronously).
pub fn run(engine: &EngineHandle, req: GenerateRequest) -> Result<GenerateOutput, EngineError> {
    let stream = engine.generate(req)?;
    runtime().block_on(stream.collect())
}

/// Every item of a stream, synchronously.
pub fn drain(mut stream: ResponseStream) -> Vec<Result<StreamDelta, EngineError>> {
    let mut items = Vec::new();
    while let Some(item) = stream.blocking_next() {
        items.push(item);
    }
    items
}

/// Polls `cond` until it holds, failing after 30 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until no request is in flight and no KV block is in use.
pub fn wait_idle(engine: &EngineHandle) {
    wait_until("the engine to be idle with every block free", || {
        let s = engine.stats();
        s.requests_in_flight == 0 && s.kv_blocks_used == 0 && s.running == 0 && s.waiting == 0
    });
}

/// The CPU backend posing as one that samples on the device: `forward_sampled` runs the
/// forward pass, then samples each row on the host with the engine's own functions, at the
/// row's uniform number. An engine over it takes the device-sampling path, which must give
/// exactly the host path's tokens.
#[derive(Debug)]
pub struct DeviceSamplingCpu {
    pub inner: CpuBackend,
    pub sampled_rows: Arc<AtomicUsize>,
    logits: Vec<f32>,
}

impl DeviceSamplingCpu {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            inner: CpuBackend::new(tiny_weights(), cache(num_blocks)).unwrap(),
            sampled_rows: Arc::new(AtomicUsize::new(0)),
            logits: Vec::new(),
        }
    }
}

impl Backend for DeviceSamplingCpu {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn kv_cache_config(&self) -> KvCacheConfig {
        self.inner.kv_cache_config()
    }

    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.inner.forward(batch, logits)
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn forward_sampled(
        &mut self,
        batch: &ForwardBatch<'_>,
        rows: &[model::RowSampling<'_>],
        sample_vocab: usize,
        tokens: &mut Vec<Option<u32>>,
    ) -> Result<(), ModelError> {
        use engine::sampling::{apply_repetition_penalty, argmax, probabilities, sample};
        self.inner.forward(batch, &mut self.logits)?;
        let vocab = self.inner.config().vocab_size;
        tokens.clear();
        for (i, r) in rows.iter().enumerate() {
            let mut l = self.logits[i * vocab..(i + 1) * vocab].to_vec();
            for x in l.iter_mut().skip(sample_vocab) {
                *x = f32::NEG_INFINITY;
            }
            apply_repetition_penalty(&mut l, &[r.history], r.repetition_penalty);
            let params = engine::SamplingParams {
                temperature: r.temperature,
                top_p: r.top_p,
                top_k: r.top_k,
                min_p: r.min_p,
                repetition_penalty: r.repetition_penalty,
                seed: None,
            };
            tokens.push(if r.temperature <= 0.0 {
                argmax(&l)
            } else {
                probabilities(&l, &params).and_then(|p| sample(&p, r.uniform))
            });
        }
        self.sampled_rows.fetch_add(rows.len(), Ordering::Relaxed);
        Ok(())
    }

    fn copy_blocks(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        self.inner.copy_blocks(copies)
    }

    fn swap_out(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        self.inner.swap_out(copies)
    }

    fn swap_in(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        self.inner.swap_in(copies)
    }
}
