//! The harness shared by the end-to-end suites of the gRPC server (`grpc_server.rs`,
//! `storms.rs`): the default model on the test device behind `serve_grpc::serve` on
//! 127.0.0.1 (ephemeral ports), clients, `/metrics` reading, request builders, and a CPU
//! backend with injectable faults.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // Each suite uses a part; tests panic on failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use engine::{Device, Engine, EngineConfig, EngineHandle, ModelSource};
use serve_grpc::pb;
use serve_grpc::pb::generation_client::GenerationClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const MAX_MODEL_LEN: usize = 4096;

/// Held by the tests whose assertions depend on time (a drain deadline) and by the one that
/// loads the CPU most (64 concurrent streams), so that they never run at the same time: the
/// CPU backend's thread pool is shared by every engine of this process, and on a two-core CI
/// machine the big test starved the shutdown test's 2-second drain once.
pub async fn timing_sensitive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

pub fn model_path() -> PathBuf {
    model::fetch::ensure_default_model(&model::fetch::default_models_dir()).unwrap()
}

/// The device the tests serve on: the CPU, or CUDA with `KVSERVE_TEST_DEVICE=cuda` (the GPU
/// machine runs this file that way).
pub fn test_device() -> Device {
    match std::env::var("KVSERVE_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda,
        _ => Device::Cpu,
    }
}

/// The tensor-parallel size the tests serve with: 1, or `KVSERVE_TEST_TP` (SmolLM2's 9 query
/// and 3 KV heads shard over 3 ranks: threads on the CPU, GPUs with `KVSERVE_TEST_DEVICE=cuda`).
pub fn test_tensor_parallel_size() -> usize {
    std::env::var("KVSERVE_TEST_TP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The default model on the test device with a small, quick-to-allocate KV pool.
pub fn config() -> EngineConfig {
    EngineConfig {
        model: ModelSource::Path(model_path()),
        device: test_device(),
        tensor_parallel_size: test_tensor_parallel_size(),
        max_model_len: Some(MAX_MODEL_LEN),
        kv_cache_memory: Some(192 << 20),
        ..EngineConfig::default()
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub engine: EngineHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), serve_grpc::ServeError>>,
}

impl TestServer {
    pub async fn start(config: EngineConfig) -> Self {
        Self::start_engine(Engine::start(config).unwrap(), Duration::from_secs(10)).await
    }

    pub async fn start_engine(engine: EngineHandle, shutdown_timeout: Duration) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, metrics_addr) = (grpc.local_addr().unwrap(), metrics.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let options = serve_grpc::ServeOptions { shutdown_timeout };
        let handle = engine.clone();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            serve_grpc::serve(handle, grpc, Some(metrics), shutdown, &options).await
        });
        Self {
            addr,
            metrics_addr,
            engine,
            stop: Some(stop),
            task,
        }
    }

    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(self.channel().await)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Triggers the graceful shutdown (without waiting for it).
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits for the server to stop.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }

    /// The overall health the server reports (`grpc.health.v1.Health/Check`, service "").
    pub async fn health(&self) -> ServingStatus {
        HealthClient::new(self.channel().await)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status()
    }

    pub async fn metrics_text(&self) -> String {
        let (status, headers, body) = http_get(self.metrics_addr, "/metrics").await;
        assert_eq!(status, 200, "{headers}\n{body}");
        assert!(
            headers
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{headers}"
        );
        body
    }

    /// Waits (bounded) until no request is live and no KV block is in use, as `/metrics`
    /// reports it; returns the final metrics text.
    pub async fn wait_idle(&self) -> String {
        for _ in 0..600 {
            // In flight first: a request that has left it is already counted in the text.
            let none_in_flight = self.engine.stats().requests_in_flight == 0;
            let text = self.metrics_text().await;
            if none_in_flight
                && gauge(&text, "kvserve_kv_blocks_used") == 0.0
                && gauge(&text, "kvserve_num_sequences_running") == 0.0
                && gauge(&text, "kvserve_num_requests_waiting") == 0.0
            {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the server did not go idle: {:?}\n{}",
            self.engine.stats(),
            self.metrics_text().await
        );
    }
}

pub type RawClient = GenerationClient<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic::body::Body,
    >,
>;

/// A gRPC client over a bare HTTP/2 connection (hyper): unlike tonic's `Channel` it does not
/// enforce the `grpc-timeout` it sends, so it sees the status the server answers.
pub fn raw_client(addr: SocketAddr) -> RawClient {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    GenerationClient::with_origin(client, format!("http://{addr}").parse().unwrap())
}

/// A plain HTTP/1.1 GET: (status, headers, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    // The body may be chunked: keep only the exposition lines.
    let body = body
        .lines()
        .filter(|l| l.starts_with('#') || l.starts_with("kvserve_"))
        .collect::<Vec<_>>()
        .join("\n");
    (status, head.to_owned(), body)
}

/// The value of an unlabelled sample in a Prometheus text exposition.
pub fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

pub fn text_request(text: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        text: Some(text.to_owned()),
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

pub fn sampled(temperature: f32, seed: u64) -> Option<pb::SamplingParams> {
    Some(pb::SamplingParams {
        temperature,
        seed: Some(seed),
        ..Default::default()
    })
}

/// A request that runs long enough to be cancelled, aborted or timed out mid-way.
pub fn long_request(id: Option<&str>) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: id.map(str::to_owned),
        ignore_eos: true,
        // Long in time on every device: ~3 s of decode steps on an H200 (SmolLM2 decodes a
        // token in under a millisecond there, so 400 tokens ended before a 1.5 s deadline).
        ..text_request("Once upon a time", 4000)
    }
}

/// Reads a stream to its end: the messages, and the status it ended with.
pub async fn drain(
    mut stream: tonic::Streaming<pb::GenerateStreamResponse>,
) -> (Vec<pb::GenerateStreamResponse>, Result<(), Status>) {
    let mut messages = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => messages.push(m),
            Ok(None) => return (messages, Ok(())),
            Err(status) => return (messages, Err(status)),
        }
    }
}

/// Faults to inject into a [`FaultyBackend`]'s forward passes.
#[derive(Debug, Default)]
pub struct Faults {
    /// Panic in every forward pass from now on (the step loop dies).
    pub panic: AtomicBool,
    /// Return an error from the forward pass of this index (counted from 0 by `forwards`).
    pub fail_forward: AtomicUsize,
    /// Forward passes so far.
    pub forwards: AtomicUsize,
    /// Sequences in the batch that failed (0 until then).
    pub failed_batch_seqs: AtomicUsize,
}

/// The CPU backend with [`Faults`] injected on demand.
pub struct FaultyBackend {
    inner: model::CpuBackend,
    faults: Arc<Faults>,
}

impl model::Backend for FaultyBackend {
    fn config(&self) -> &model::ModelConfig {
        self.inner.config()
    }
    fn kv_cache_config(&self) -> model::KvCacheConfig {
        self.inner.kv_cache_config()
    }
    fn forward(
        &mut self,
        batch: &model::ForwardBatch<'_>,
        logits: &mut Vec<f32>,
    ) -> Result<(), model::ModelError> {
        assert!(!self.faults.panic.load(Ordering::Acquire), "injected fault");
        let index = self.faults.forwards.fetch_add(1, Ordering::AcqRel);
        if index == self.faults.fail_forward.load(Ordering::Acquire) {
            let seqs = batch.num_seqs();
            self.faults.failed_batch_seqs.store(seqs, Ordering::Release);
            return Err(model::ModelError::InvalidBatch {
                field: "injected",
                reason: format!("injected failure of forward pass {index}"),
            });
        }
        self.inner.forward(batch, logits)
    }
    fn copy_blocks(
        &mut self,
        copies: &[kv_block_manager::CopyOp],
    ) -> Result<(), model::ModelError> {
        self.inner.copy_blocks(copies)
    }
    fn swap_out(&mut self, copies: &[kv_block_manager::CopyOp]) -> Result<(), model::ModelError> {
        self.inner.swap_out(copies)
    }
    fn swap_in(&mut self, copies: &[kv_block_manager::CopyOp]) -> Result<(), model::ModelError> {
        self.inner.swap_in(copies)
    }
}

/// An engine on the default model over a [`FaultyBackend`] (CPU, fp16 KV of `num_blocks`
/// blocks) and the handle to its faults (none armed).
pub fn faulty_engine(config: EngineConfig, num_blocks: usize) -> (EngineHandle, Arc<Faults>) {
    let loaded = model::load_gguf(&model_path(), model::Shard::FULL).unwrap();
    let cache = model::KvCacheConfig {
        num_blocks,
        block_size: 16,
        dtype: "fp16".parse().unwrap(),
        num_cpu_blocks: 0,
    };
    let faults = Arc::new(Faults {
        fail_forward: AtomicUsize::new(usize::MAX),
        ..Faults::default()
    });
    let backend = FaultyBackend {
        inner: model::CpuBackend::new(loaded.weights, cache).unwrap(),
        faults: Arc::clone(&faults),
    };
    let engine = Engine::start_with_backend(
        EngineConfig {
            device: Device::Cpu,
            ..config
        },
        Box::new(backend),
        loaded.tokenizer,
        "faulty".into(),
    )
    .unwrap();
    (engine, faults)
}
