//! `kvserve bench-serve`: a gRPC load generator against a running server.
//!
//! [`Target::connect`] opens a channel to the server (with a connect timeout) and asks
//! `GetModelInfo` for the vocabulary, `max_model_len` and model name; [`Target::run`] builds a
//! [`Workload`]'s requests for that model and sends each as a `GenerateStream` call with
//! `token_ids`, `max_tokens` and `ignore_eos`, measuring it client-side from the stream's
//! deltas with the same [`RequestStats`] as the offline `kvserve bench`.
//!
//! Arrivals follow vLLM's `benchmark_serving.py`:
//! - [`RequestRate`]: requests are *sent* as a Poisson process of that rate (exponential
//!   inter-arrival times from a generator seeded by the workload's seed, [`Arrivals`]), the
//!   first at time 0; `inf` sends them all at once.
//! - `max_concurrency`: at most that many requests in flight (a semaphore); a request that
//!   arrives while the limit is reached waits for a slot. Its TTFT and latency are timed from
//!   when it is actually sent, as vLLM times them (the wait is not the server's).
//!
//! A request that fails (any gRPC status, or a stream that ends with another number of tokens
//! than asked) does not stop the run: it is counted in the report's [`ErrorSummary`] by code,
//! with the first few messages, and left out of the statistics, which cover the completed
//! requests. The report also gives the achieved request rate: requests sent per second between
//! the first and the last send.
//!
//! One HTTP/2 connection carries at most [`STREAMS_PER_CONNECTION`] requests at once here
//! (servers commonly cap concurrent streams per connection, hyper's default at 200, and queued
//! streams would wait inside the client); a run opens as many connections as its concurrency
//! needs, up to [`MAX_CONNECTIONS`].

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

use super::workload::SplitMix64;
use super::{
    BenchMeta, BenchRequest, RequestStats, RequestTiming, TimingRecorder, Workload, WorkloadError,
    table,
};
use crate::pb;
use crate::pb::generation_client::GenerationClient;

/// Requests in flight on one HTTP/2 connection at most.
pub const STREAMS_PER_CONNECTION: usize = 100;
/// Connections one run opens at most.
pub const MAX_CONNECTIONS: usize = 32;
/// Error messages a report keeps.
pub const FIRST_ERRORS: usize = 5;
/// Code under which a request that ended with another number of tokens than asked is counted.
pub const WRONG_TOKEN_COUNT: &str = "WRONG_TOKEN_COUNT";

/// Errors of `bench-serve` (failed requests are not errors: they are counted in the report).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServeBenchError {
    /// A request rate that is not a positive number or `inf`.
    #[error("invalid request rate {input:?}: expected a positive number of requests/s or inf")]
    Rate {
        /// What was given.
        input: String,
    },
    /// A rate sweep with no rate.
    #[error("the rate sweep names no request rate")]
    EmptySweep,
    /// An address that is not a URI.
    #[error("invalid server address {addr:?}: {reason}")]
    Address {
        /// What was given.
        addr: String,
        /// Why it is refused.
        reason: String,
    },
    /// No connection to the server.
    #[error("cannot connect to the server at {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The server did not answer `GetModelInfo`.
    #[error("the server at {addr} did not answer GetModelInfo: {reason}")]
    ModelInfo {
        /// The address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The workload cannot run on this server's model.
    #[error("the workload does not fit the server's model: {0}")]
    Workload(#[from] WorkloadError),
    /// An output file cannot be written.
    #[error("cannot write {}: {reason}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Requests per second of a Poisson arrival process; infinite: every request at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "RateRepr", try_from = "RateRepr")]
pub struct RequestRate(f64);

impl RequestRate {
    /// Every request at once.
    pub const INFINITE: Self = Self(f64::INFINITY);

    /// `per_second` requests per second.
    ///
    /// # Errors
    /// [`ServeBenchError::Rate`] unless `per_second` is positive (finite, or `+inf`).
    pub fn new(per_second: f64) -> Result<Self, ServeBenchError> {
        if per_second > 0.0 {
            Ok(Self(per_second))
        } else {
            Err(ServeBenchError::Rate {
                input: per_second.to_string(),
            })
        }
    }

    /// Requests per second (`+inf`: all at once).
    pub fn per_second(self) -> f64 {
        self.0
    }

    /// Whether every request is sent at once.
    pub fn is_infinite(self) -> bool {
        self.0.is_infinite()
    }
}

impl FromStr for RequestRate {
    type Err = ServeBenchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("inf") || t.eq_ignore_ascii_case("infinity") {
            return Ok(Self::INFINITE);
        }
        let err = || ServeBenchError::Rate {
            input: s.to_owned(),
        };
        let x: f64 = t.parse().map_err(|_| err())?;
        Self::new(x).map_err(|_| err())
    }
}

impl fmt::Display for RequestRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_infinite() {
            f.write_str("inf")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// A rate in JSON: a number, or `"inf"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum RateRepr {
    Number(f64),
    Text(String),
}

impl From<RequestRate> for RateRepr {
    fn from(rate: RequestRate) -> Self {
        if rate.is_infinite() {
            Self::Text("inf".to_owned())
        } else {
            Self::Number(rate.0)
        }
    }
}

impl TryFrom<RateRepr> for RequestRate {
    type Error = ServeBenchError;

    fn try_from(repr: RateRepr) -> Result<Self, Self::Error> {
        match repr {
            RateRepr::Number(x) => Self::new(x),
            RateRepr::Text(s) => s.parse(),
        }
    }
}

/// Send times of a Poisson process: offsets from the start of a run, the first at zero, then
/// exponential gaps of mean `1 / rate` (inverse transform of a seeded uniform); all zero at an
/// infinite rate. The same rate and seed give the same times on every machine.
#[derive(Debug, Clone)]
pub struct Arrivals {
    rate: RequestRate,
    rng: SplitMix64,
    next: Duration,
}

impl Arrivals {
    /// The arrival times of `rate`, seeded.
    pub fn new(rate: RequestRate, seed: u64) -> Self {
        // A stream of its own, apart from the workload's lengths and token ids.
        Self {
            rate,
            rng: SplitMix64(seed ^ 0x5EED_A441_7A15_0000),
            next: Duration::ZERO,
        }
    }
}

impl Iterator for Arrivals {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        if !self.rate.is_infinite() {
            let gap = -self.rng.open01().ln() / self.rate.0;
            let gap = Duration::try_from_secs_f64(gap).unwrap_or(Duration::MAX);
            self.next = self.next.saturating_add(gap);
        }
        Some(now)
    }
}

/// How a run loads the server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// The requests.
    pub workload: Workload,
    /// Their arrival rate.
    pub request_rate: RequestRate,
    /// Requests in flight at most (none: no limit).
    pub max_concurrency: Option<NonZeroUsize>,
}

/// What was measured, on which server, under which load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeMeta {
    /// The served model, KV layout and device (from `GetModelInfo`) and the UTC date.
    #[serde(flatten)]
    pub server: BenchMeta,
    /// The server's address.
    pub addr: String,
    /// The arrival rate asked for.
    pub request_rate: RequestRate,
    /// The concurrency limit (none: no limit).
    pub max_concurrency: Option<usize>,
}

/// Failed requests of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorSummary {
    /// Requests that failed.
    pub failed: u64,
    /// Failed requests by gRPC status code (`UNAVAILABLE`, ...) or [`WRONG_TOKEN_COUNT`].
    pub by_code: BTreeMap<String, u64>,
    /// The first [`FIRST_ERRORS`] failures (by request index): `request I: CODE: message`.
    pub first_messages: Vec<String>,
}

impl ErrorSummary {
    fn record(&mut self, index: usize, failure: &Failure) {
        let code = failure.code();
        self.failed += 1;
        if self.first_messages.len() < FIRST_ERRORS {
            self.first_messages
                .push(format!("request {index}: {code}: {}", failure.message()));
        }
        *self.by_code.entry(code).or_default() += 1;
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeReport {
    /// Server, date, address, rate and concurrency.
    pub meta: ServeMeta,
    /// The workload.
    pub workload: Workload,
    /// Requests sent (completed and failed).
    pub sent: u64,
    /// Counts, throughput and latency percentiles of the completed requests.
    #[serde(flatten)]
    pub stats: RequestStats,
    /// Requests sent per second between the first and the last send (none for a single
    /// request or sends all at the same instant).
    pub achieved_request_rate: Option<f64>,
    /// Failed requests.
    pub errors: ErrorSummary,
}

/// A rate sweep: the same workload once per rate, in the order asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeSweep {
    /// One run per rate.
    pub runs: Vec<ServeReport>,
}

/// Why one request failed.
#[derive(Debug)]
enum Failure {
    Status(tonic::Status),
    TokenCount { expected: u32, got: u64 },
    Client(String),
}

impl Failure {
    fn code(&self) -> String {
        match self {
            Self::Status(status) => code_name(status.code()),
            Self::TokenCount { .. } => WRONG_TOKEN_COUNT.to_owned(),
            Self::Client(_) => "CLIENT".to_owned(),
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Status(status) => status.message().to_owned(),
            Self::TokenCount { expected, got } => {
                format!("the stream ended after {got} tokens, {expected} were asked")
            }
            Self::Client(message) => message.clone(),
        }
    }
}

/// A gRPC code as the protocol spells it (`DEADLINE_EXCEEDED`).
pub(super) fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// An error and its sources, `a: b: c` (tonic's transport errors say little on their own).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// A connected server and what it serves.
#[derive(Debug, Clone)]
pub struct Target {
    addr: String,
    endpoint: Endpoint,
    channel: Channel,
    connect_timeout: Duration,
    info: engine::ModelInfo,
}

impl Target {
    /// Connects to the server at `addr` (`http://host:port`, or `host:port`) and asks what it
    /// serves, giving up after `timeout` for each.
    ///
    /// # Errors
    /// [`ServeBenchError::Address`], [`ServeBenchError::Connect`] or
    /// [`ServeBenchError::ModelInfo`], naming the address.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Self, ServeBenchError> {
        let uri = if addr.contains("://") {
            addr.trim().to_owned()
        } else {
            format!("http://{}", addr.trim())
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| ServeBenchError::Address {
                addr: addr.to_owned(),
                reason: error_chain(&e),
            })?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        let channel = connect(&endpoint, &uri, timeout).await?;
        let mut request = tonic::Request::new(pb::GetModelInfoRequest {});
        request.set_timeout(timeout);
        let answer = tokio::time::timeout(
            timeout,
            GenerationClient::new(channel.clone()).get_model_info(request),
        )
        .await;
        let info = match answer {
            Ok(Ok(info)) => info.into_inner(),
            Ok(Err(status)) => {
                return Err(ServeBenchError::ModelInfo {
                    addr: uri,
                    reason: format!("{}: {}", code_name(status.code()), status.message()),
                });
            }
            Err(_) => {
                return Err(ServeBenchError::ModelInfo {
                    addr: uri,
                    reason: format!("no answer within {timeout:?}"),
                });
            }
        };
        Ok(Self {
            addr: uri,
            endpoint,
            channel,
            connect_timeout: timeout,
            info: crate::convert::model_info_from_pb(info),
        })
    }

    /// The server's address, as a URI.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// What the server said it serves.
    pub fn model_info(&self) -> &engine::ModelInfo {
        &self.info
    }

    /// The connection opened by [`connect`](Self::connect) (cheap to clone: HTTP/2 streams
    /// share it).
    pub(super) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Runs `load` against the server and measures it. Failed requests are counted in the
    /// report, not returned as errors.
    ///
    /// # Errors
    /// [`ServeBenchError::Workload`] when the workload does not fit the server's model
    /// (checked before anything is sent); [`ServeBenchError::Connect`] when the extra
    /// connections a high concurrency needs cannot be opened.
    pub async fn run(&self, load: &Load) -> Result<ServeReport, ServeBenchError> {
        let requests = load
            .workload
            .requests(self.info.vocab_size, self.info.max_model_len)?;
        let in_flight = load
            .max_concurrency
            .map_or(requests.len(), NonZeroUsize::get)
            .min(requests.len());
        let mut channels = vec![self.channel.clone()];
        let wanted = in_flight
            .div_ceil(STREAMS_PER_CONNECTION)
            .clamp(1, MAX_CONNECTIONS);
        while channels.len() < wanted {
            channels.push(connect(&self.endpoint, &self.addr, self.connect_timeout).await?);
        }
        let limit = load
            .max_concurrency
            .map(|n| Arc::new(Semaphore::new(n.get())));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(requests.len());
        let arrivals = Arrivals::new(load.request_rate, load.workload.seed);
        for ((index, request), at) in requests.into_iter().enumerate().zip(arrivals) {
            match start.checked_add(at) {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
            let client = GenerationClient::new(channels[index % channels.len()].clone());
            let limit = limit.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = match limit {
                    Some(semaphore) => match semaphore.acquire_owned().await {
                        Ok(permit) => Some(permit),
                        Err(e) => return (start.elapsed(), Err(Failure::Client(e.to_string()))),
                    },
                    None => None,
                };
                let sent = start.elapsed();
                (sent, send(client, request).await)
            }));
        }
        let mut sends = Vec::with_capacity(tasks.len());
        let mut timings = Vec::with_capacity(tasks.len());
        let mut errors = ErrorSummary::default();
        for (index, task) in tasks.into_iter().enumerate() {
            let (sent, outcome) = task.await.unwrap_or_else(|e| {
                (
                    start.elapsed(),
                    Err(Failure::Client(format!("request task: {e}"))),
                )
            });
            sends.push(sent);
            match outcome {
                Ok(timing) => timings.push(timing),
                Err(failure) => errors.record(index, &failure),
            }
        }
        let elapsed = start.elapsed();
        Ok(ServeReport {
            meta: ServeMeta {
                server: BenchMeta::new(&self.info),
                addr: self.addr.clone(),
                request_rate: load.request_rate,
                max_concurrency: load.max_concurrency.map(NonZeroUsize::get),
            },
            workload: load.workload,
            sent: sends.len() as u64,
            stats: RequestStats::of(&timings, elapsed),
            achieved_request_rate: achieved_rate(&sends),
            errors,
        })
    }

    /// Runs `workload` once per rate of `rates`, in order, each a fresh run against the same
    /// server.
    ///
    /// # Errors
    /// [`ServeBenchError::EmptySweep`] for no rate, else the first run's error.
    pub async fn sweep(
        &self,
        workload: &Workload,
        rates: &[RequestRate],
        max_concurrency: Option<NonZeroUsize>,
    ) -> Result<ServeSweep, ServeBenchError> {
        if rates.is_empty() {
            return Err(ServeBenchError::EmptySweep);
        }
        let mut runs = Vec::with_capacity(rates.len());
        for &request_rate in rates {
            let load = Load {
                workload: *workload,
                request_rate,
                max_concurrency,
            };
            let report = self.run(&load).await?;
            tracing::info!(
                request_rate = %request_rate,
                completed = report.stats.requests,
                failed = report.errors.failed,
                output_tokens_per_s = format!("{:.1}", report.stats.output_tokens_per_s),
                "bench-serve run done"
            );
            runs.push(report);
        }
        Ok(ServeSweep { runs })
    }
}

/// Opens one connection to `endpoint`, within `timeout`.
async fn connect(
    endpoint: &Endpoint,
    addr: &str,
    timeout: Duration,
) -> Result<Channel, ServeBenchError> {
    match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(ServeBenchError::Connect {
            addr: addr.to_owned(),
            reason: error_chain(&e),
        }),
        Err(_) => Err(ServeBenchError::Connect {
            addr: addr.to_owned(),
            reason: format!("no connection within {timeout:?}"),
        }),
    }
}

/// Sends one request and times its stream.
async fn send(
    mut client: GenerationClient<Channel>,
    request: BenchRequest,
) -> Result<RequestTiming, Failure> {
    let expected = request.output_len;
    let prompt_len = u32::try_from(request.prompt.len()).unwrap_or(u32::MAX);
    let message = pb::GenerateRequest {
        token_ids: request.prompt,
        max_tokens: Some(expected),
        ignore_eos: true,
        ..pb::GenerateRequest::default()
    };
    let mut recorder = TimingRecorder::start();
    let mut stream = client
        .generate_stream(message)
        .await
        .map_err(Failure::Status)?
        .into_inner();
    let mut usage = false;
    while let Some(delta) = stream.message().await.map_err(Failure::Status)? {
        usage |= delta.usage.is_some();
        recorder.delta(delta.token_ids.len(), delta.usage.map(|u| u.prompt_tokens));
    }
    if !usage {
        recorder.delta(0, Some(prompt_len));
    }
    let timing = recorder.finish();
    if timing.tokens != u64::from(expected) {
        return Err(Failure::TokenCount {
            expected,
            got: timing.tokens,
        });
    }
    Ok(timing)
}

/// Sends per second between the first and the last send.
fn achieved_rate(sends: &[Duration]) -> Option<f64> {
    let first = sends.iter().min()?;
    let last = sends.iter().max()?;
    let span = last.saturating_sub(*first).as_secs_f64();
    (sends.len() >= 2 && span > 0.0).then(|| (sends.len() - 1) as f64 / span)
}

/// Writes `value` as pretty JSON (and a newline) to `path`.
///
/// # Errors
/// [`ServeBenchError::Write`] naming the path.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ServeBenchError> {
    let write_err = |reason: String| ServeBenchError::Write {
        path: path.to_owned(),
        reason,
    };
    let json = serde_json::to_string_pretty(value).map_err(|e| write_err(e.to_string()))?;
    std::fs::write(path, json + "\n").map_err(|e| write_err(e.to_string()))
}

/// Checks that `path` can be written (before a long run), leaving the file system as it was.
///
/// # Errors
/// [`ServeBenchError::Write`] naming the path.
pub fn check_writable(path: &Path) -> Result<(), ServeBenchError> {
    let write_err = |e: std::io::Error| ServeBenchError::Write {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    if path.is_dir() {
        return Err(ServeBenchError::Write {
            path: path.to_owned(),
            reason: "it is a directory".to_owned(),
        });
    }
    if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(write_err)?;
    } else {
        std::fs::File::create(path).map_err(write_err)?;
        std::fs::remove_file(path).map_err(write_err)?;
    }
    Ok(())
}

fn fmt_rate(rate: RequestRate) -> String {
    if rate.is_infinite() {
        "inf (all at once)".to_owned()
    } else {
        format!("{rate} req/s (Poisson)")
    }
}

fn fmt_codes(errors: &ErrorSummary) -> String {
    if errors.failed == 0 {
        return "0".to_owned();
    }
    let codes: Vec<String> = errors
        .by_code
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect();
    format!("{} ({})", errors.failed, codes.join(", "))
}

impl fmt::Display for ServeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = &self.meta.server;
        let mut rows = vec![
            (
                "workload",
                format!("{} (seed {})", self.workload.kind, self.workload.seed),
            ),
            (
                "server",
                format!(
                    "{} at {} ({}, KV {})",
                    server.model, self.meta.addr, server.device, server.kv_cache_dtype
                ),
            ),
            ("request rate", fmt_rate(self.meta.request_rate)),
            (
                "max concurrency",
                self.meta
                    .max_concurrency
                    .map_or_else(|| "none".to_owned(), |n| n.to_string()),
            ),
            (
                "achieved request rate",
                self.achieved_request_rate
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2} req/s")),
            ),
            ("requests sent", self.sent.to_string()),
            ("failed requests", fmt_codes(&self.errors)),
        ];
        rows.extend(self.stats.rows());
        table(f, &rows)?;
        for message in &self.errors.first_messages {
            writeln!(f, "error: {message}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ServeSweep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| rate (req/s) | achieved | completed | failed | req/s | output tok/s | total tok/s | TTFT mean | TTFT p99 | TPOT p50 | ITL p50 |"
        )?;
        writeln!(
            f,
            "| ------------ | -------- | --------- | ------ | ----- | ------------ | ----------- | --------- | -------- | -------- | ------- |"
        )?;
        for r in &self.runs {
            let s = &r.stats;
            writeln!(
                f,
                "| {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
                r.meta.request_rate,
                r.achieved_request_rate
                    .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}")),
                s.requests,
                r.errors.failed,
                s.requests_per_s,
                s.output_tokens_per_s,
                s.total_tokens_per_s,
                s.ttft.mean_ms,
                s.ttft.p99_ms,
                s.tpot.p50_ms,
                s.itl.p50_ms
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests;
