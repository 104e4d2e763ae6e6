//! `kvserve soak`: a long run at steady load against a running server, watching for leaks.
//!
//! The run alternates a *load phase* (requests sent as a Poisson process of a modest rate, at
//! most `max_concurrency` in flight) and an *idle phase* (nothing sent: the requests in flight
//! are awaited, then the server is left alone). Every request is one of a seeded mix of what a
//! server meets in production ([`Kind`]): streams read to the end, unary calls, chat messages
//! through the chat template, parallel sampling (`n` = 2), streams the client drops after a
//! few tokens, streams aborted by id, and calls with a short deadline. A third of the prompts
//! share a prefix, so the prefix cache fills and evicts.
//!
//! A sampler scrapes the server's `/metrics` every `sample_every`: the engine's KV blocks in
//! use, running and waiting sequences, and the process's resident memory, open file
//! descriptors and threads (`process_*`). The last scrape of each idle phase is an *idle
//! point*, and the run passes ([`Verdict`]) when:
//! - no request ended in a way its kind does not allow (a completed stream with another
//!   number of tokens than asked, any status other than a deadline's for a deadline call, ...);
//! - at every idle point, no KV block is used and no sequence runs or waits;
//! - resident memory at the idle points grows by at most `max_rss_growth` from the second
//!   idle point on (the first load phase warms allocators and caches), and open file
//!   descriptors by at most [`FD_SLACK`].
//!
//! The samples go to CSV, the report (samples, idle points, counts, verdict) to JSON, and the
//! curve to a PNG ([`super::plot::write_soak_png`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};
use tonic::transport::Channel;

use super::BenchMeta;
use super::serve::{RequestRate, ServeBenchError, Target, code_name};
use super::workload::SplitMix64;
use crate::pb;
use crate::pb::generation_client::GenerationClient;

/// Open file descriptors the server may gain between the baseline idle point and a later one
/// (connections the client opens and closes, a log file rotating) before it counts as a leak.
pub const FD_SLACK: u64 = 16;
/// Prompt tokens of the prefix shared by a third of the requests.
pub const SHARED_PREFIX_LEN: u32 = 48;
/// A scrape of `/metrics` that takes longer fails.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest `/metrics` body read.
const MAX_METRICS_BYTES: usize = 4 << 20;

/// Errors of a soak run (requests that end badly are not errors: the verdict counts them).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SoakError {
    /// A plan that cannot run.
    #[error("soak plan: {0}")]
    Plan(String),
    /// The metrics URL is not `http://host:port/path`.
    #[error("metrics URL {url:?}: {reason}")]
    MetricsUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A scrape failed (the server went away, or does not serve metrics there).
    #[error("scraping {url}: {reason}")]
    Scrape {
        /// The URL scraped.
        url: String,
        /// What failed.
        reason: String,
    },
    /// Connecting or asking the server failed.
    #[error(transparent)]
    Serve(#[from] ServeBenchError),
}

/// How a soak loads the server and what it tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SoakPlan {
    /// The whole run (load and idle phases).
    #[serde(with = "secs")]
    pub duration: Duration,
    /// One load phase.
    #[serde(with = "secs")]
    pub load_phase: Duration,
    /// One idle phase (after the requests in flight ended).
    #[serde(with = "secs")]
    pub idle_phase: Duration,
    /// Time between two scrapes.
    #[serde(with = "secs")]
    pub sample_every: Duration,
    /// Requests per second during a load phase (Poisson); finite.
    pub request_rate: RequestRate,
    /// Requests in flight at most.
    pub max_concurrency: usize,
    /// Generated tokens per request at most (each request draws 4 up to this).
    pub max_output_len: u32,
    /// Prompt tokens per request at most (each request draws 8 up to this).
    pub max_prompt_len: u32,
    /// Resident memory (bytes) the idle points may gain over the baseline.
    pub max_rss_growth: u64,
    /// Seed of the request mix, lengths, token ids and arrival times.
    pub seed: u64,
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let x = f64::deserialize(d)?;
        Duration::try_from_secs_f64(x).map_err(serde::de::Error::custom)
    }
}

impl SoakPlan {
    /// Checks that the plan can run.
    ///
    /// # Errors
    /// [`SoakError::Plan`] naming the field that cannot be.
    pub fn check(&self) -> Result<(), SoakError> {
        let bad = |what: &str| Err(SoakError::Plan(what.to_owned()));
        if self.load_phase.is_zero() || self.idle_phase.is_zero() {
            return bad("the load and idle phases must be longer than zero");
        }
        if self.sample_every.is_zero() || self.sample_every > self.idle_phase {
            return bad("sample_every must be longer than zero and at most the idle phase");
        }
        if self.duration < self.load_phase + self.idle_phase {
            return bad("the duration must hold at least one load phase and one idle phase");
        }
        if self.request_rate.is_infinite() {
            return bad("a soak needs a finite request rate");
        }
        if self.max_concurrency == 0 {
            return bad("max_concurrency must be at least 1");
        }
        if self.max_output_len < 4 || self.max_prompt_len < 8 {
            return bad("max_output_len must be at least 4 and max_prompt_len at least 8");
        }
        Ok(())
    }

    /// The phases of the run, in order: (load, idle) pairs filling `duration`; the last load
    /// phase is cut short so that the run ends with a whole idle phase.
    pub fn phases(&self) -> Vec<(Duration, Duration)> {
        let mut phases = Vec::new();
        let mut left = self.duration;
        while left >= self.idle_phase + Duration::from_millis(1) {
            let load = self.load_phase.min(left - self.idle_phase);
            if load.is_zero() {
                break;
            }
            phases.push((load, self.idle_phase));
            left -= load + self.idle_phase;
        }
        phases
    }
}

/// What a request does (drawn per request from a seeded mix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `GenerateStream` read to the end: exactly `max_tokens` tokens.
    Stream,
    /// `Generate`: one completion of exactly `max_tokens` tokens.
    Unary,
    /// `GenerateStream` of chat messages (the chat template): exactly `max_tokens` tokens.
    Chat,
    /// `GenerateStream` with `n` = 2, sampled: exactly `2 * max_tokens` tokens.
    Parallel,
    /// `GenerateStream` the client drops after some tokens.
    Dropped,
    /// `GenerateStream` aborted by id (`Abort`) after its first tokens: ends `ABORTED` or
    /// complete.
    Aborted,
    /// `GenerateStream` with a deadline of 50–500 ms: complete or `DEADLINE_EXCEEDED`.
    Deadline,
}

impl Kind {
    /// The mix, in percent.
    const MIX: [(Kind, u64); 7] = [
        (Kind::Stream, 40),
        (Kind::Unary, 12),
        (Kind::Chat, 10),
        (Kind::Parallel, 8),
        (Kind::Dropped, 12),
        (Kind::Aborted, 8),
        (Kind::Deadline, 10),
    ];

    fn draw(rng: &mut SplitMix64) -> Self {
        let mut x = rng.next_u64() % 100;
        for (kind, percent) in Self::MIX {
            if x < percent {
                return kind;
            }
            x -= percent;
        }
        Kind::Stream
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Stream => "stream",
            Kind::Unary => "unary",
            Kind::Chat => "chat",
            Kind::Parallel => "parallel",
            Kind::Dropped => "dropped",
            Kind::Aborted => "aborted",
            Kind::Deadline => "deadline",
        }
    }
}

/// One request of the mix.
#[derive(Debug, Clone)]
struct SoakRequest {
    kind: Kind,
    id: String,
    prompt: Vec<u32>,
    chat: Option<String>,
    max_tokens: u32,
    /// Tokens after which a `Dropped` stream is dropped or an `Aborted` one aborted.
    cut_after: u64,
    deadline: Duration,
    seed: u64,
}

const WORDS: [&str; 16] = [
    "cache",
    "token",
    "block",
    "paged",
    "memory",
    "server",
    "latency",
    "batch",
    "stream",
    "quantized",
    "attention",
    "window",
    "request",
    "prefix",
    "model",
    "decode",
];

impl SoakRequest {
    fn draw(index: u64, plan: &SoakPlan, vocab: u32, prefix: &[u32], rng: &mut SplitMix64) -> Self {
        let kind = Kind::draw(rng);
        let mut below = |n: u32| (rng.next_u64() % u64::from(n.max(1))) as u32;
        let prompt_len = 8 + below(plan.max_prompt_len - 7);
        let max_tokens = 4 + below(plan.max_output_len - 3);
        let shared = below(3) == 0;
        let cut_after = 1 + u64::from(below(max_tokens - 1));
        let deadline = Duration::from_millis(50 + u64::from(below(451)));
        let mut prompt: Vec<u32> = if shared {
            prefix[..prefix.len().min(prompt_len as usize)].to_vec()
        } else {
            Vec::new()
        };
        while prompt.len() < prompt_len as usize {
            prompt.push((rng.next_u64() % u64::from(vocab)) as u32);
        }
        let chat = (kind == Kind::Chat).then(|| {
            let words = 3 + rng.next_u64() % 40;
            (0..words)
                .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(" ")
        });
        Self {
            kind,
            id: format!("soak-{index}"),
            prompt,
            chat,
            max_tokens,
            cut_after,
            deadline,
            seed: rng.next_u64(),
        }
    }

    fn message(&self) -> pb::GenerateRequest {
        let mut m = pb::GenerateRequest {
            request_id: Some(self.id.clone()),
            max_tokens: Some(self.max_tokens),
            ignore_eos: true,
            ..pb::GenerateRequest::default()
        };
        match &self.chat {
            Some(text) => {
                m.messages = vec![pb::ChatMessage {
                    role: "user".to_owned(),
                    content: text.clone(),
                }];
            }
            None => m.token_ids = self.prompt.clone(),
        }
        if self.kind == Kind::Parallel {
            m.n = 2;
            m.sampling = Some(pb::SamplingParams {
                temperature: 0.8,
                seed: Some(self.seed),
                ..pb::SamplingParams::default()
            });
        }
        m
    }

    /// Tokens a complete call of this request generates.
    fn expected_tokens(&self) -> u64 {
        u64::from(self.max_tokens) * if self.kind == Kind::Parallel { 2 } else { 1 }
    }
}

/// How one request ended, as its kind allows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// Completed, dropped, aborted or past its deadline, as its kind allows.
    Expected(&'static str),
    /// Anything else: a code and a message.
    Unexpected(String, String),
}

/// Sends `r` and tells how it ended.
async fn send(mut client: GenerationClient<Channel>, r: SoakRequest) -> Ending {
    let expected = r.expected_tokens();
    let wrong_count = |got: u64| {
        Ending::Unexpected(
            "WRONG_TOKEN_COUNT".to_owned(),
            format!("{}: {got} tokens, {expected} asked", r.id),
        )
    };
    let status_ending = |status: tonic::Status| {
        if r.kind == Kind::Deadline
            && matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            )
        {
            Ending::Expected("deadline_exceeded")
        } else {
            Ending::Unexpected(
                code_name(status.code()),
                format!("{}: {}", r.id, status.message()),
            )
        }
    };
    if r.kind == Kind::Unary {
        return match client.generate(r.message()).await {
            Ok(answer) => {
                let got: u64 = answer
                    .into_inner()
                    .completions
                    .iter()
                    .map(|c| c.token_ids.len() as u64)
                    .sum();
                if got == expected {
                    Ending::Expected("completed")
                } else {
                    wrong_count(got)
                }
            }
            Err(status) => status_ending(status),
        };
    }
    let mut request = tonic::Request::new(r.message());
    if r.kind == Kind::Deadline {
        request.set_timeout(r.deadline);
    }
    let mut stream = match client.generate_stream(request).await {
        Ok(s) => s.into_inner(),
        Err(status) => return status_ending(status),
    };
    let mut got = 0u64;
    let mut aborted = false;
    loop {
        match stream.message().await {
            Ok(Some(delta)) => {
                got += delta.token_ids.len() as u64;
                aborted |= delta.finish_reason == pb::FinishReason::Aborted as i32;
                if got >= r.cut_after && r.kind == Kind::Dropped {
                    return Ending::Expected("dropped");
                }
                if got >= r.cut_after && r.kind == Kind::Aborted && got < expected {
                    let abort = pb::AbortRequest {
                        request_id: r.id.clone(),
                    };
                    if let Err(status) = client.abort(abort).await {
                        return Ending::Unexpected(
                            code_name(status.code()),
                            format!("{}: Abort: {}", r.id, status.message()),
                        );
                    }
                    // Read on to the end of the stream: it ends ABORTED (or complete, when
                    // the last step raced the abort).
                    let mut rest = 0u64;
                    loop {
                        match stream.message().await {
                            Ok(Some(d)) => {
                                rest += d.token_ids.len() as u64;
                                aborted |= d.finish_reason == pb::FinishReason::Aborted as i32;
                            }
                            Ok(None) => break,
                            Err(status) => return status_ending(status),
                        }
                    }
                    return if aborted {
                        Ending::Expected("aborted")
                    } else if got + rest == expected {
                        Ending::Expected("completed")
                    } else {
                        Ending::Unexpected(
                            "NOT_ABORTED".to_owned(),
                            format!("{}: ended after {} tokens, not aborted", r.id, got + rest),
                        )
                    };
                }
            }
            Ok(None) => break,
            Err(status) => return status_ending(status),
        }
    }
    if got == expected && !aborted {
        Ending::Expected("completed")
    } else {
        wrong_count(got)
    }
}

/// Whether the run is loading the server or idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Requests are being sent.
    Load,
    /// No new request; the last ones may still be finishing.
    Drain,
    /// Nothing in flight.
    Idle,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Load => "load",
            Phase::Drain => "drain",
            Phase::Idle => "idle",
        }
    }
}

/// One scrape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the start of the run.
    pub t_s: f64,
    /// The phase it was taken in.
    pub phase: Phase,
    /// `process_resident_memory_bytes`.
    pub rss_bytes: Option<u64>,
    /// `process_open_fds`.
    pub open_fds: Option<u64>,
    /// `process_threads`.
    pub threads: Option<u64>,
    /// `kvserve_kv_blocks_used`.
    pub kv_blocks_used: u64,
    /// `kvserve_num_sequences_running`.
    pub running: u64,
    /// `kvserve_num_requests_waiting`.
    pub waiting: u64,
    /// Requests the client has in flight.
    pub client_in_flight: u64,
    /// Requests the client saw end so far.
    pub ended: u64,
}

/// The values of a Prometheus text exposition, by sample name (labels dropped: the first
/// sample of a name wins).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut values = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.rsplitn(2, ' ');
        let (Some(value), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        let name = name.split('{').next().unwrap_or(name).trim();
        if let Ok(v) = value.trim().parse::<f64>() {
            values.entry(name.to_owned()).or_insert(v);
        }
    }
    values
}

/// A `/metrics` endpoint over plain HTTP/1.1.
#[derive(Debug, Clone)]
pub struct MetricsEndpoint {
    url: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl MetricsEndpoint {
    /// `http://host:port/path` (the path defaults to `/metrics`).
    ///
    /// # Errors
    /// [`SoakError::MetricsUrl`] for another scheme or a missing port.
    pub fn new(url: &str) -> Result<Self, SoakError> {
        let bad = |reason: &str| SoakError::MetricsUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = url
            .trim()
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// is served"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/metrics"),
        };
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("no port (http://host:port/metrics)"))?;
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 && !host.is_empty() => p,
            _ => return Err(bad("the host or the port is not valid")),
        };
        Ok(Self {
            url: url.trim().to_owned(),
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fetches and parses the metrics.
    ///
    /// # Errors
    /// [`SoakError::Scrape`] when the server cannot be reached in [`SCRAPE_TIMEOUT`], answers
    /// with another status than 200, or sends more than 4 MiB.
    pub async fn scrape(&self) -> Result<BTreeMap<String, f64>, SoakError> {
        let err = |reason: String| SoakError::Scrape {
            url: self.url.clone(),
            reason,
        };
        let fetch = async {
            let mut tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
            let request = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.path, self.authority
            );
            tcp.write_all(request.as_bytes()).await?;
            let mut body = Vec::new();
            (&mut tcp)
                .take(MAX_METRICS_BYTES as u64 + 1)
                .read_to_end(&mut body)
                .await?;
            Ok::<_, std::io::Error>(body)
        };
        let bytes = tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
            .await
            .map_err(|_| err(format!("no answer within {SCRAPE_TIMEOUT:?}")))?
            .map_err(|e| err(e.to_string()))?;
        if bytes.len() > MAX_METRICS_BYTES {
            return Err(err("the answer is larger than 4 MiB".to_owned()));
        }
        let text = String::from_utf8_lossy(&bytes);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| err("not an HTTP answer".to_owned()))?;
        let status = head.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(err(format!("answered {status:?}")));
        }
        if head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        }) {
            return Ok(parse_metrics(&dechunk(body)));
        }
        Ok(parse_metrics(body))
    }
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || tail.len() < size {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    out
}

/// The values an idle point is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IdlePoint {
    /// Which idle phase (0 = after the first load phase).
    pub phase: usize,
    /// The sample (the last of its idle phase).
    pub sample: Sample,
}

/// Requests by kind and by how they ended.
pub type Endings = BTreeMap<String, BTreeMap<String, u64>>;

/// Whether the soak passed, and why not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// No failure below.
    pub passed: bool,
    /// Each broken rule, in words.
    pub failures: Vec<String>,
    /// Resident memory at the baseline idle point (the second, or the only one), bytes.
    pub rss_baseline: Option<u64>,
    /// The most resident memory at a later idle point minus the baseline, bytes (negative:
    /// it shrank).
    pub rss_growth: Option<i64>,
    /// Least-squares slope of resident memory over the idle points from the baseline on,
    /// MiB per hour.
    pub rss_slope_mib_per_hour: Option<f64>,
}

/// Judges a run by its idle points and unexpected endings.
pub fn judge(points: &[IdlePoint], unexpected: u64, max_rss_growth: u64) -> Verdict {
    let mut failures = Vec::new();
    if unexpected > 0 {
        failures.push(format!("{unexpected} requests ended unexpectedly"));
    }
    if points.is_empty() {
        failures.push("no idle point was sampled".to_owned());
    }
    for p in points {
        let s = &p.sample;
        if s.kv_blocks_used != 0 || s.running != 0 || s.waiting != 0 || s.client_in_flight != 0 {
            failures.push(format!(
                "idle phase {} at {:.0} s: {} KV blocks used, {} running, {} waiting, {} in flight",
                p.phase, s.t_s, s.kv_blocks_used, s.running, s.waiting, s.client_in_flight
            ));
        }
    }
    let from = usize::from(points.len() > 1);
    let tail = points.get(from..).unwrap_or_default();
    let rss: Vec<(f64, u64)> = tail
        .iter()
        .filter_map(|p| p.sample.rss_bytes.map(|r| (p.sample.t_s, r)))
        .collect();
    let rss_baseline = rss.first().map(|&(_, r)| r);
    let rss_growth = rss_baseline.and_then(|base| {
        rss.iter()
            .map(|&(_, r)| r as i64 - base as i64)
            .skip(1)
            .max()
    });
    if let Some(growth) = rss_growth
        && growth > max_rss_growth as i64
    {
        failures.push(format!(
            "resident memory at idle grew by {:.1} MiB (allowed {:.1} MiB)",
            growth as f64 / MIB,
            max_rss_growth as f64 / MIB
        ));
    }
    let fds: Vec<u64> = tail.iter().filter_map(|p| p.sample.open_fds).collect();
    if let (Some(&base), Some(&most)) = (fds.first(), fds.iter().skip(1).max())
        && most > base + FD_SLACK
    {
        failures.push(format!(
            "open file descriptors at idle grew from {base} to {most}"
        ));
    }
    Verdict {
        passed: failures.is_empty(),
        failures,
        rss_baseline,
        rss_growth,
        rss_slope_mib_per_hour: slope(&rss).map(|s| s * 3600.0 / MIB),
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Least-squares slope of `(t, y)` in units of y per t (none below two distinct times).
fn slope(points: &[(f64, u64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let var: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    if var <= 0.0 {
        return None;
    }
    let cov: f64 = points
        .iter()
        .map(|p| (p.0 - mean_t) * (p.1 as f64 - mean_y))
        .sum();
    Some(cov / var)
}

/// What a soak measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakReport {
    /// The server and the date.
    pub server: BenchMeta,
    /// The gRPC address and the metrics URL.
    pub addr: String,
    /// The metrics URL.
    pub metrics_url: String,
    /// The plan run.
    pub plan: SoakPlan,
    /// Seconds the run took.
    pub elapsed_s: f64,
    /// Requests sent.
    pub sent: u64,
    /// Requests sent in each load phase.
    pub sent_per_phase: Vec<u64>,
    /// Requests by kind, then by ending (`completed`, `dropped`, `aborted`,
    /// `deadline_exceeded`, or an unexpected code).
    pub endings: Endings,
    /// The first unexpected endings, in words.
    pub first_unexpected: Vec<String>,
    /// Every scrape.
    pub samples: Vec<Sample>,
    /// The last scrape of each idle phase.
    pub idle_points: Vec<IdlePoint>,
    /// The verdict.
    pub verdict: Verdict,
}

impl SoakReport {
    /// The samples as CSV, one line per scrape, with a header.
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "t_s,phase,rss_mib,open_fds,threads,kv_blocks_used,running,waiting,client_in_flight,ended\n",
        );
        let opt = |v: Option<u64>| v.map_or_else(String::new, |v| v.to_string());
        for s in &self.samples {
            out.push_str(&format!(
                "{:.1},{},{},{},{},{},{},{},{},{}\n",
                s.t_s,
                s.phase.name(),
                s.rss_bytes
                    .map_or_else(String::new, |r| format!("{:.2}", r as f64 / MIB)),
                opt(s.open_fds),
                opt(s.threads),
                s.kv_blocks_used,
                s.running,
                s.waiting,
                s.client_in_flight,
                s.ended
            ));
        }
        out
    }
}

/// The client's live counts, shared with the sampler.
#[derive(Debug, Default)]
struct Live {
    in_flight: AtomicU64,
    ended: AtomicU64,
}

/// Takes one sample.
async fn sample(
    metrics: &MetricsEndpoint,
    start: Instant,
    phase: Phase,
    live: &Live,
) -> Result<Sample, SoakError> {
    let m = metrics.scrape().await?;
    let int = |name: &str| m.get(name).map(|&v| v.max(0.0) as u64);
    if int("kvserve_kv_blocks_used").is_none() {
        return Err(SoakError::Scrape {
            url: metrics.url().to_owned(),
            reason: "no kvserve_kv_blocks_used: not a kvserve /metrics".to_owned(),
        });
    }
    Ok(Sample {
        t_s: start.elapsed().as_secs_f64(),
        phase,
        rss_bytes: int("process_resident_memory_bytes"),
        open_fds: int("process_open_fds"),
        threads: int("process_threads"),
        kv_blocks_used: int("kvserve_kv_blocks_used").unwrap_or(0),
        running: int("kvserve_num_sequences_running").unwrap_or(0),
        waiting: int("kvserve_num_requests_waiting").unwrap_or(0),
        client_in_flight: live.in_flight.load(Ordering::Relaxed),
        ended: live.ended.load(Ordering::Relaxed),
    })
}

/// What the request tasks report back.
#[derive(Debug, Default)]
struct Tally {
    endings: Endings,
    first_unexpected: Vec<String>,
    unexpected: u64,
}

impl Tally {
    fn unexpected_task(&mut self, message: &str) {
        self.unexpected += 1;
        if self.first_unexpected.len() < 10 {
            self.first_unexpected
                .push(format!("CLIENT: a request task failed: {message}"));
        }
        *self
            .endings
            .entry("client".to_owned())
            .or_default()
            .entry("task_failed".to_owned())
            .or_default() += 1;
    }

    fn record(&mut self, kind: Kind, ending: Ending) {
        let key = match ending {
            Ending::Expected(name) => name.to_owned(),
            Ending::Unexpected(code, message) => {
                self.unexpected += 1;
                if self.first_unexpected.len() < 10 {
                    self.first_unexpected.push(format!("{code}: {message}"));
                }
                code
            }
        };
        *self
            .endings
            .entry(kind.name().to_owned())
            .or_default()
            .entry(key)
            .or_default() += 1;
    }
}

/// Runs `plan` against `target`, scraping `metrics`; `progress` is called after each sample.
///
/// # Errors
/// [`SoakError::Plan`] for a plan that cannot run, [`SoakError::Scrape`] when the metrics
/// cannot be read (at the start, or at the end of an idle phase), [`SoakError::Serve`] when the
/// workload's connection fails.
pub async fn run(
    target: &Target,
    metrics: &MetricsEndpoint,
    plan: &SoakPlan,
    mut progress: impl FnMut(&Sample),
) -> Result<SoakReport, SoakError> {
    plan.check()?;
    let info = target.model_info().clone();
    if plan.max_prompt_len + plan.max_output_len > info.max_model_len {
        return Err(SoakError::Plan(format!(
            "max_prompt_len + max_output_len ({}) exceed the server's max_model_len ({})",
            plan.max_prompt_len + plan.max_output_len,
            info.max_model_len
        )));
    }
    let start = Instant::now();
    let live = Arc::new(Live::default());
    // The metrics must be readable before anything is sent.
    let mut samples = vec![sample(metrics, start, Phase::Idle, &live).await?];
    let tally = Arc::new(Mutex::new(Tally::default()));
    let limit = Arc::new(Semaphore::new(plan.max_concurrency));
    let mut rng = SplitMix64(plan.seed);
    let prefix: Vec<u32> = (0..SHARED_PREFIX_LEN)
        .map(|_| (rng.next_u64() % u64::from(info.vocab_size)) as u32)
        .collect();
    // One Poisson process over the whole run, paused while idle: its gaps, in order.
    let mut arrivals = super::serve::Arrivals::new(plan.request_rate, plan.seed);
    let mut last_arrival = Duration::ZERO;
    let mut next_gap = move || {
        let at = arrivals.next().unwrap_or(Duration::MAX);
        let gap = at.saturating_sub(last_arrival);
        last_arrival = at;
        gap
    };
    let mut sent = 0u64;
    let mut sent_per_phase = Vec::new();
    let mut idle_points = Vec::new();
    for (phase_index, (load, idle)) in plan.phases().into_iter().enumerate() {
        let phase_start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let mut next_sample = Instant::now() + plan.sample_every;
        let mut next_send = phase_start;
        let sent_before = sent;
        let phase_end = phase_start + load;
        loop {
            let now = Instant::now();
            if now >= phase_end {
                break;
            }
            if now >= next_sample {
                let s = sample(metrics, start, Phase::Load, &live).await;
                if let Ok(s) = s {
                    progress(&s);
                    samples.push(s);
                }
                next_sample += plan.sample_every;
                continue;
            }
            if now >= next_send {
                let request = SoakRequest::draw(sent, plan, info.vocab_size, &prefix, &mut rng);
                sent += 1;
                let permit = Arc::clone(&limit).acquire_owned().await;
                let client = GenerationClient::new(target.channel());
                let live = Arc::clone(&live);
                let tally = Arc::clone(&tally);
                live.in_flight.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(async move {
                    let _permit = permit;
                    let kind = request.kind;
                    let ending = send(client, request).await;
                    tally.lock().await.record(kind, ending);
                    live.ended.fetch_add(1, Ordering::Relaxed);
                    live.in_flight.fetch_sub(1, Ordering::Relaxed);
                });
                next_send = Instant::now() + next_gap();
                continue;
            }
            let wake = next_send.min(next_sample).min(phase_end);
            tokio::time::sleep_until(wake.into()).await;
        }
        sent_per_phase.push(sent - sent_before);
        // Drain: await what is in flight, sampling meanwhile.
        loop {
            let tick = tokio::time::sleep_until(next_sample.into());
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Ok(())) => {}
                    // A request task that panicked or was cancelled is a client failure.
                    Some(Err(e)) => {
                        live.in_flight.fetch_sub(1, Ordering::Relaxed);
                        tally.lock().await.unexpected_task(&e.to_string());
                    }
                },
                () = tick => {
                    if let Ok(s) = sample(metrics, start, Phase::Drain, &live).await {
                        progress(&s);
                        samples.push(s);
                    }
                    next_sample += plan.sample_every;
                }
            }
        }
        // Idle: sample through the phase; its last sample is the idle point.
        let idle_end = Instant::now() + idle;
        next_sample = next_sample.max(Instant::now());
        while next_sample < idle_end {
            tokio::time::sleep_until(next_sample.into()).await;
            if let Ok(s) = sample(metrics, start, Phase::Idle, &live).await {
                progress(&s);
                samples.push(s);
            }
            next_sample += plan.sample_every;
        }
        tokio::time::sleep_until(idle_end.into()).await;
        let point = sample(metrics, start, Phase::Idle, &live).await?;
        progress(&point);
        samples.push(point);
        idle_points.push(IdlePoint {
            phase: phase_index,
            sample: point,
        });
        next_sample = Instant::now() + plan.sample_every;
    }
    let tally = std::mem::take(&mut *tally.lock().await);
    let verdict = judge(&idle_points, tally.unexpected, plan.max_rss_growth);
    Ok(SoakReport {
        server: BenchMeta::new(&info),
        addr: target.addr().to_owned(),
        metrics_url: metrics.url().to_owned(),
        plan: *plan,
        elapsed_s: start.elapsed().as_secs_f64(),
        sent,
        sent_per_phase,
        endings: tally.endings,
        first_unexpected: tally.first_unexpected,
        samples,
        idle_points,
        verdict,
    })
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: Option<u64>| {
            b.map_or_else(|| "-".to_owned(), |b| format!("{:.1} MiB", b as f64 / MIB))
        };
        writeln!(
            f,
            "soak: {} at {} ({}, KV {}), {:.0} s, {} requests sent, rate {} req/s, concurrency {}",
            self.server.model,
            self.addr,
            self.server.device,
            self.server.kv_cache_dtype,
            self.elapsed_s,
            self.sent,
            self.plan.request_rate,
            self.plan.max_concurrency
        )?;
        let per_phase: Vec<String> = self.sent_per_phase.iter().map(u64::to_string).collect();
        writeln!(f, "requests sent per load phase: {}", per_phase.join(", "))?;
        writeln!(f, "\n| kind | endings |\n| --- | --- |")?;
        for (kind, endings) in &self.endings {
            let list: Vec<String> = endings.iter().map(|(e, n)| format!("{e} {n}")).collect();
            writeln!(f, "| {kind} | {} |", list.join(", "))?;
        }
        writeln!(
            f,
            "\n| idle phase | t (s) | RSS | open fds | threads | KV blocks used | running | waiting |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        )?;
        for p in &self.idle_points {
            let s = &p.sample;
            let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
            writeln!(
                f,
                "| {} | {:.0} | {} | {} | {} | {} | {} | {} |",
                p.phase,
                s.t_s,
                mib(s.rss_bytes),
                opt(s.open_fds),
                opt(s.threads),
                s.kv_blocks_used,
                s.running,
                s.waiting
            )?;
        }
        let peak = self.samples.iter().filter_map(|s| s.rss_bytes).max();
        writeln!(
            f,
            "\nRSS: baseline {} (idle phase {}), growth at idle {}, slope {}, peak under load {}",
            mib(self.verdict.rss_baseline),
            usize::from(self.idle_points.len() > 1),
            self.verdict
                .rss_growth
                .map_or_else(|| "-".to_owned(), |g| format!("{:+.2} MiB", g as f64 / MIB)),
            self.verdict
                .rss_slope_mib_per_hour
                .map_or_else(|| "-".to_owned(), |s| format!("{s:+.2} MiB/h")),
            mib(peak)
        )?;
        for line in &self.first_unexpected {
            writeln!(f, "unexpected: {line}")?;
        }
        if self.verdict.passed {
            writeln!(f, "verdict: PASSED")
        } else {
            writeln!(f, "verdict: FAILED")?;
            for failure in &self.verdict.failures {
                writeln!(f, "  - {failure}")?;
            }
            Ok(())
        }
    }
}

/// Writes `text` to `path`.
///
/// # Errors
/// [`ServeBenchError::Write`] naming the path.
pub fn write_text(path: &Path, text: &str) -> Result<(), ServeBenchError> {
    std::fs::write(path, text).map_err(|e| ServeBenchError::Write {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
