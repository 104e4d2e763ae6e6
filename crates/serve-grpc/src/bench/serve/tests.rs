#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

//! `bench-serve` against a real server on loopback: the tiny dummy Llama of the offline bench
//! tests behind [`crate::serve`], called over TCP by [`Target`].

use std::net::SocketAddr;

use engine::{EngineConfig, EngineError, EngineHandle, GenerateRequest};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::*;
use crate::GenerationBackend;
use crate::bench::WorkloadKind;
use crate::bench::tests::{meta_fixture, timing, tiny_engine};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A server on 127.0.0.1 (any free ports: gRPC and `/metrics`) over `backend`, stopped by
/// [`TestServer::stop`].
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), crate::ServeError>>,
}

impl TestServer {
    pub(crate) async fn start<B: GenerationBackend>(backend: B) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = metrics_listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let options = crate::ServeOptions {
            shutdown_timeout: Duration::from_secs(5),
        };
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            crate::serve(backend, grpc, Some(metrics_listener), shutdown, &options).await
        });
        Self {
            addr,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    pub(crate) async fn target(&self) -> Target {
        Target::connect(&format!("http://{}", self.addr), TIMEOUT)
            .await
            .unwrap()
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn fixed(input_len: u32, output_len: u32, num_requests: u32) -> Workload {
    Workload {
        kind: WorkloadKind::Fixed {
            input_len,
            output_len,
        },
        num_requests,
        seed: 5,
    }
}

fn load(workload: Workload, rate: RequestRate, max_concurrency: Option<usize>) -> Load {
    Load {
        workload,
        request_rate: rate,
        max_concurrency: max_concurrency.and_then(NonZeroUsize::new),
    }
}

/// A report of two made-up requests (for the plot and table tests).
pub(crate) fn report_fixture() -> ServeReport {
    let timings = [timing(10, 50, &[20, 20]), timing(30, 70, &[20, 20])];
    let mut errors = ErrorSummary::default();
    errors.record(
        2,
        &Failure::Status(tonic::Status::unavailable("admission full")),
    );
    ServeReport {
        meta: ServeMeta {
            server: meta_fixture("fp16"),
            addr: "http://127.0.0.1:1".into(),
            request_rate: RequestRate::new(2.0).unwrap(),
            max_concurrency: Some(4),
        },
        workload: fixed(8, 3, 3),
        sent: 3,
        stats: RequestStats::of(&timings, Duration::from_millis(100)),
        achieved_request_rate: Some(2.5),
        errors,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limited_run_completes_every_request_and_never_exceeds_the_limit() {
    let engine = tiny_engine(EngineConfig::default(), 128).unwrap();
    let server = TestServer::start(engine.clone()).await;
    let target = server.target().await;
    assert_eq!(target.model_info().model, "tiny");
    let workload = fixed(8, 24, 8);
    let r = target
        .run(&load(workload, RequestRate::INFINITE, Some(2)))
        .await
        .unwrap();
    assert_eq!(r.errors, ErrorSummary::default(), "{r}");
    assert_eq!((r.sent, r.stats.requests), (8, 8));
    assert_eq!((r.stats.prompt_tokens, r.stats.output_tokens), (64, 192));
    assert_eq!(r.stats.ttft.count, 8);
    assert_eq!(
        r.stats.itl.count,
        8 * 23,
        "one gap per token after the first"
    );
    assert!(r.stats.ttft.p99_ms <= r.stats.latency.p99_ms);
    assert_eq!(r.meta.max_concurrency, Some(2));
    assert_eq!(r.meta.server.model, "tiny");
    assert_eq!(
        r.meta.server.max_model_len,
        target.model_info().max_model_len
    );
    // The server never ran more than two of them at once.
    let peak = engine.stats().running_peak;
    assert!((1..=2).contains(&peak), "running peak {peak}");
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<ServeReport>(&json).unwrap(), r);
    let table = r.to_string();
    assert!(
        table.contains("| max concurrency") && table.contains("| 2 |"),
        "{table}"
    );

    // The control: without the limit, the same requests run together.
    let r = target
        .run(&load(workload, RequestRate::INFINITE, None))
        .await
        .unwrap();
    assert_eq!((r.stats.requests, r.errors.failed), (8, 0));
    let peak = engine.stats().running_peak;
    assert!(peak > 2, "running peak {peak} without a limit");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisson_run_completes_and_reports_its_achieved_rate() {
    let engine = tiny_engine(EngineConfig::default(), 64).unwrap();
    let server = TestServer::start(engine).await;
    let target = server.target().await;
    let rate = RequestRate::new(200.0).unwrap();
    let r = target
        .run(&load(fixed(4, 4, 6), rate, Some(3)))
        .await
        .unwrap();
    assert_eq!((r.stats.requests, r.errors.failed), (6, 0), "{r}");
    assert_eq!(r.meta.request_rate, rate);
    assert!(r.achieved_request_rate.is_some_and(|x| x > 0.0), "{r:?}");
    server.stop().await;
}

#[test]
fn arrivals_are_a_seeded_poisson_process() {
    let rate = RequestRate::new(4.0).unwrap();
    let times: Vec<Duration> = Arrivals::new(rate, 11).take(20_001).collect();
    assert_eq!(
        times[0],
        Duration::ZERO,
        "the first request is sent at once"
    );
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let n = gaps.len() as f64;
    let mean = gaps.iter().sum::<f64>() / n;
    let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n;
    // Exponential with mean 1/4 s: standard deviation = mean, P(gap > mean) = 1/e.
    assert!((mean - 0.25).abs() < 0.25 * 0.03, "mean {mean}");
    assert!((var.sqrt() / mean - 1.0).abs() < 0.05, "sd {}", var.sqrt());
    let above = gaps.iter().filter(|&&g| g > 0.25).count() as f64 / n;
    assert!(
        (above - (-1.0f64).exp()).abs() < 0.015,
        "P(gap > mean) = {above}"
    );
    assert!(gaps.iter().all(|&g| g > 0.0));
    // Reproducible by seed, and another seed gives other times.
    let again: Vec<Duration> = Arrivals::new(rate, 11).take(20_001).collect();
    assert_eq!(again, times);
    let other: Vec<Duration> = Arrivals::new(rate, 12).take(100).collect();
    assert_ne!(other[..], times[..100]);
    // An infinite rate sends everything at once.
    assert!(
        Arrivals::new(RequestRate::INFINITE, 11)
            .take(50)
            .all(|t| t.is_zero())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_counted_by_code_and_do_not_stop_the_run() {
    let config = EngineConfig {
        max_queued_requests: 1,
        ..EngineConfig::default()
    };
    let engine = tiny_engine(config, 64).unwrap();
    let server = TestServer::start(engine).await;
    let target = server.target().await;
    let r = target
        .run(&load(fixed(4, 96, 6), RequestRate::INFINITE, None))
        .await
        .unwrap();
    let refused = r.errors.by_code.get("UNAVAILABLE").copied().unwrap_or(0);
    assert!(refused >= 1, "{r}");
    assert_eq!(r.errors.by_code.len(), 1, "{:?}", r.errors);
    assert!(r.stats.requests >= 1, "the admitted request completes: {r}");
    assert_eq!(r.stats.requests + r.errors.failed, 6);
    assert_eq!(r.sent, 6);
    assert_eq!(r.stats.output_tokens, 96 * r.stats.requests);
    let first = &r.errors.first_messages;
    assert_eq!(first.len() as u64, r.errors.failed.min(FIRST_ERRORS as u64));
    assert!(
        first[0].starts_with("request ") && first[0].contains("UNAVAILABLE"),
        "{first:?}"
    );
    let table = r.to_string();
    assert!(table.contains(&format!("UNAVAILABLE {refused}")), "{table}");
    assert!(table.contains("error: request "), "{table}");
    server.stop().await;
}

/// The engine, altered: every request stops one token short of what it asked for
/// (`one_short`), and `/metrics` starts with `metrics_prefix`.
#[derive(Clone)]
pub(crate) struct Altered {
    pub(crate) engine: EngineHandle,
    pub(crate) one_short: bool,
    pub(crate) metrics_prefix: &'static str,
}

impl GenerationBackend for Altered {
    type Stream = <EngineHandle as GenerationBackend>::Stream;

    fn generate(&self, mut request: GenerateRequest) -> Result<Self::Stream, EngineError> {
        if self.one_short {
            request.max_tokens = request.max_tokens.map(|n| n.saturating_sub(1).max(1));
        }
        GenerationBackend::generate(&self.engine, request)
    }
    fn abort(&self, request_id: &str) -> bool {
        GenerationBackend::abort(&self.engine, request_id)
    }
    fn tokenize(&self, prompt: &engine::Prompt) -> Result<Vec<u32>, EngineError> {
        GenerationBackend::tokenize(&self.engine, prompt)
    }
    fn model_info(&self) -> engine::ModelInfo {
        GenerationBackend::model_info(&self.engine)
    }
    fn health(&self) -> engine::Health {
        GenerationBackend::health(&self.engine)
    }
    fn metrics_text(&self) -> String {
        format!("{}{}", self.metrics_prefix, self.engine.metrics_text())
    }
    fn shutdown(&self, timeout: Duration) {
        GenerationBackend::shutdown(&self.engine, timeout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_the_wrong_number_of_tokens_is_an_error() {
    let engine = tiny_engine(EngineConfig::default(), 64).unwrap();
    let server = TestServer::start(Altered {
        engine,
        one_short: true,
        metrics_prefix: "",
    })
    .await;
    let target = server.target().await;
    let r = target
        .run(&load(fixed(4, 5, 3), RequestRate::INFINITE, None))
        .await
        .unwrap();
    assert_eq!(r.stats.requests, 0);
    assert_eq!(r.errors.failed, 3);
    assert_eq!(r.errors.by_code.get(WRONG_TOKEN_COUNT), Some(&3));
    assert!(
        r.errors.first_messages[0].contains("after 4 tokens, 5 were asked"),
        "{:?}",
        r.errors
    );
    assert_eq!(r.stats.ttft, super::super::Percentiles::default());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_writes_json_that_parses_back_and_a_png() {
    let engine = tiny_engine(EngineConfig::default(), 64).unwrap();
    let server = TestServer::start(engine).await;
    let target = server.target().await;
    let rates = ["100", "inf"].map(|r| r.parse::<RequestRate>().unwrap());
    let sweep = target.sweep(&fixed(4, 4, 4), &rates, None).await.unwrap();
    assert_eq!(sweep.runs.len(), 2);
    for (run, rate) in sweep.runs.iter().zip(rates) {
        assert_eq!(run.meta.request_rate, rate);
        assert_eq!((run.stats.requests, run.errors.failed), (4, 0));
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sweep.json");
    write_json(&json, &sweep).unwrap();
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(text.contains("\"request_rate\": \"inf\""), "{text}");
    assert_eq!(serde_json::from_str::<ServeSweep>(&text).unwrap(), sweep);
    let png = dir.path().join("sweep.png");
    crate::bench::plot::write_png(&png, &sweep.runs).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(bytes[..8], crate::bench::plot::tests::PNG_SIGNATURE);
    let table = sweep.to_string();
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert!(
        rows.len() == 2 && rows[0].starts_with("| 100 | ") && rows[1].starts_with("| inf | "),
        "{table}"
    );
    assert!(rows.iter().all(|r| r.contains(" | 4 | 0 | ")), "{table}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_and_workloads_are_clear_errors() {
    // Nothing listens on a port just freed: refused, naming the address.
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let err = Target::connect(&addr.to_string(), Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(err, ServeBenchError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("http://{addr}")), "{err}");

    // A listener that accepts and never speaks HTTP/2: the timeout ends the wait.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let err = Target::connect(&silent_addr.to_string(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ServeBenchError::Connect { .. } | ServeBenchError::ModelInfo { .. }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(&silent_addr.to_string()), "{err}");
    hold.abort();

    // Not an address at all.
    let err = Target::connect("http://bad host:1", TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, ServeBenchError::Address { .. }), "{err:?}");
    assert!(err.to_string().contains("bad host"), "{err}");

    // A workload longer than the server's max_model_len: the workload's error, nothing sent.
    let engine = tiny_engine(EngineConfig::default(), 64).unwrap();
    let server = TestServer::start(engine.clone()).await;
    let target = server.target().await;
    let too_long = fixed(16, target.model_info().max_model_len, 2);
    let err = target
        .run(&load(too_long, RequestRate::INFINITE, None))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ServeBenchError::Workload(WorkloadError::TooLong { index: 0, .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_model_len"), "{err}");
    assert_eq!(engine.stats().steps, 0, "nothing was sent");
    // An empty sweep.
    let err = target.sweep(&fixed(4, 4, 1), &[], None).await.unwrap_err();
    assert_eq!(err, ServeBenchError::EmptySweep);
    server.stop().await;
}

#[test]
fn rates_parse_and_bad_ones_are_named() {
    assert_eq!("inf".parse::<RequestRate>(), Ok(RequestRate::INFINITE));
    assert_eq!(
        " Infinity ".parse::<RequestRate>(),
        Ok(RequestRate::INFINITE)
    );
    assert_eq!("2".parse::<RequestRate>().unwrap().per_second(), 2.0);
    assert_eq!("0.5".parse::<RequestRate>().unwrap().to_string(), "0.5");
    for bad in ["0", "-1", "NaN", "nan", "", "fast", "-inf", "1e-400"] {
        let err = bad.parse::<RequestRate>().unwrap_err();
        assert_eq!(
            err,
            ServeBenchError::Rate {
                input: bad.to_owned()
            }
        );
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
    assert!(RequestRate::new(f64::NAN).is_err());
    assert!(RequestRate::new(0.0).is_err());
    // JSON: a number, or "inf"; a bad one is refused.
    let json =
        serde_json::to_string(&[RequestRate::new(4.0).unwrap(), RequestRate::INFINITE]).unwrap();
    assert_eq!(json, "[4.0,\"inf\"]");
    assert_eq!(
        serde_json::from_str::<Vec<RequestRate>>(&json).unwrap(),
        [RequestRate::new(4.0).unwrap(), RequestRate::INFINITE]
    );
    assert!(serde_json::from_str::<RequestRate>("0").is_err());
    assert!(serde_json::from_str::<RequestRate>("\"soon\"").is_err());
}

#[test]
fn output_paths_are_checked_before_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing/report.json");
    for bad in [dir.path().to_owned(), missing.clone()] {
        let err = check_writable(&bad).unwrap_err();
        assert!(matches!(&err, ServeBenchError::Write { path, .. } if *path == bad));
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );
    }
    let err = write_json(&missing, &report_fixture()).unwrap_err();
    assert!(err.to_string().contains("missing/report.json"), "{err}");
    // A new file is not left behind; an existing one is kept as it was.
    let new = dir.path().join("new.json");
    check_writable(&new).unwrap();
    assert!(!new.exists());
    std::fs::write(&new, "old").unwrap();
    check_writable(&new).unwrap();
    assert_eq!(std::fs::read_to_string(&new).unwrap(), "old");
}

#[test]
fn codes_are_named_as_the_protocol_names_them() {
    assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    assert_eq!(
        code_name(tonic::Code::DeadlineExceeded),
        "DEADLINE_EXCEEDED"
    );
    assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
    assert_eq!(achieved_rate(&[]), None);
    assert_eq!(achieved_rate(&[Duration::ZERO; 3]), None);
    let ms = Duration::from_millis;
    assert_eq!(achieved_rate(&[ms(0), ms(500), ms(1000)]), Some(2.0));
}

#[test]
fn the_report_table_shows_the_load_and_the_errors() {
    let r = report_fixture();
    let table = r.to_string();
    for want in [
        "| request rate ",
        "2 req/s (Poisson)",
        "| achieved request rate ",
        "2.50 req/s",
        "| failed requests ",
        "1 (UNAVAILABLE 1)",
        "| TTFT p50 / p90 / p99 ",
        "error: request 2: UNAVAILABLE: admission full",
    ] {
        assert!(table.contains(want), "{want:?} in\n{table}");
    }
    let json = serde_json::to_value(&r).unwrap();
    // The metadata is flat (as the offline bench's) with the load beside it.
    assert_eq!(json["meta"]["model"], "m");
    assert_eq!(json["meta"]["request_rate"], 2.0);
    assert_eq!(json["meta"]["max_concurrency"], 4);
    assert_eq!(json["output_tokens"], 6);
    assert_eq!(json["errors"]["by_code"]["UNAVAILABLE"], 1);
}
