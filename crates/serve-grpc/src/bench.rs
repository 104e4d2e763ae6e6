//! `kvserve bench`: offline throughput over a synthetic [`workload`].
//!
//! Every request is submitted at once (the engine's continuous batching does the rest); each
//! has its workload's prompt token ids and generates exactly its output length (EOS ignored).
//! [`run`] measures one workload on one engine into a [`BenchReport`]: throughput, TTFT, time
//! per output token (TPOT), inter-token latency (ITL) and end-to-end latency percentiles, peak
//! KV usage, and the engine's preemptions and prefix-cache hits over the run (the change of
//! [`GenerationBackend::stats`]'s counters). The report prints as a table and serializes to
//! JSON with the model, KV dtype, device and UTC date ([`BenchMeta`]); a KV-dtype sweep is a
//! [`SweepReport`] of one [`SweepEntry`] per dtype.
//!
//! Definitions (as vLLM's benchmarks define them): TTFT is submission → first token; TPOT
//! of a request is `(latency - TTFT) / (output_len - 1)` (requests of one output token have
//! none); ITL is the time between consecutive deltas that carry tokens, over every request;
//! percentiles are nearest-rank.
//!
//! The measurement core ([`RequestStats`]: counts, throughput and latency percentiles, its table
//! rows, and the per-request timing of a stream of deltas) is shared with [`serve`], the
//! `kvserve bench-serve` load generator, which measures the same quantities client-side over
//! gRPC against a running server.

pub mod plot;
pub mod serve;
pub mod soak;
pub mod workload;

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use engine::{EngineError, GenerateRequest, ModelInfo, Prompt};
use serde::{Deserialize, Serialize};

use crate::backend::{DeltaStream, GenerationBackend};
pub use workload::{BenchRequest, Workload, WorkloadError, WorkloadKind};

/// Errors of a bench run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BenchError {
    /// The workload cannot run on this engine.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The engine refused or failed a request.
    #[error("request {index}: {source}")]
    Engine {
        /// The request's index in the workload.
        index: usize,
        /// What the engine said.
        source: EngineError,
    },
    /// A request ended with fewer or more tokens than asked (the report would be wrong).
    #[error("request {index} produced {got} tokens, the workload asked for {expected}")]
    TokenCount {
        /// The request's index in the workload.
        index: usize,
        /// Tokens asked for.
        expected: u32,
        /// Tokens produced.
        got: u64,
    },
}

/// What was measured, and on what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchMeta {
    /// Model name.
    pub model: String,
    /// KV-cache format.
    pub kv_cache_dtype: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Token slots per KV block.
    pub block_size: u32,
    /// KV blocks in the pool.
    pub kv_blocks_total: u32,
    /// The engine's longest sequence.
    pub max_model_len: u32,
    /// When the run ended, UTC, RFC 3339 (`2026-12-02T21:42:33Z`).
    pub date_utc: String,
    /// kvserve's version.
    pub kvserve_version: String,
}

impl BenchMeta {
    /// The metadata of a run on an engine serving `info`, dated now.
    pub fn new(info: &ModelInfo) -> Self {
        Self {
            model: info.model.clone(),
            kv_cache_dtype: info.kv_cache_dtype.clone(),
            device: info.device.clone(),
            block_size: info.block_size,
            kv_blocks_total: info.num_blocks,
            max_model_len: info.max_model_len,
            date_utc: utc_now(),
            kvserve_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// p50 / p90 / p99 of a set of durations, in milliseconds (0 for an empty set).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Samples.
    pub count: usize,
}

impl Percentiles {
    /// The percentiles of `values` (sorted here).
    pub fn of(mut values: Vec<Duration>) -> Self {
        values.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mean = if values.is_empty() {
            0.0
        } else {
            values.iter().map(|&d| ms(d)).sum::<f64>() / values.len() as f64
        };
        Self {
            p50_ms: ms(percentile(&values, 0.5)),
            p90_ms: ms(percentile(&values, 0.9)),
            p99_ms: ms(percentile(&values, 0.99)),
            mean_ms: mean,
            count: values.len(),
        }
    }
}

/// Counts, throughput and latency percentiles of the requests of one run that completed:
/// what `kvserve bench` and `kvserve bench-serve` both report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestStats {
    /// Requests completed.
    pub requests: u64,
    /// Prompt tokens over the completed requests.
    pub prompt_tokens: u64,
    /// Generated tokens over the completed requests.
    pub output_tokens: u64,
    /// From the first submission to the last token, seconds.
    pub elapsed_s: f64,
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// Generated tokens per second.
    pub output_tokens_per_s: f64,
    /// Prompt and generated tokens per second.
    pub total_tokens_per_s: f64,
    /// Time to first token.
    pub ttft: Percentiles,
    /// Time per output token after the first, per request.
    pub tpot: Percentiles,
    /// Time between consecutive token-carrying deltas.
    pub itl: Percentiles,
    /// Submission to last token.
    pub latency: Percentiles,
}

impl RequestStats {
    /// The statistics of `timings` (the completed requests) over a run of `elapsed`.
    fn of(timings: &[RequestTiming], elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let prompt_tokens: u64 = timings.iter().map(|t| t.prompt_tokens).sum();
        let output_tokens: u64 = timings.iter().map(|t| t.tokens).sum();
        let requests = timings.len() as u64;
        let tpot = timings
            .iter()
            .filter(|t| t.tokens >= 2)
            .map(|t| {
                let steps = u32::try_from(t.tokens - 1).unwrap_or(u32::MAX);
                t.latency.saturating_sub(t.ttft) / steps
            })
            .collect();
        Self {
            requests,
            prompt_tokens,
            output_tokens,
            elapsed_s: secs,
            requests_per_s: requests as f64 / secs,
            output_tokens_per_s: output_tokens as f64 / secs,
            total_tokens_per_s: (prompt_tokens + output_tokens) as f64 / secs,
            ttft: Percentiles::of(timings.iter().map(|t| t.ttft).collect()),
            tpot: Percentiles::of(tpot),
            itl: Percentiles::of(
                timings
                    .iter()
                    .flat_map(|t| t.gaps.iter().copied())
                    .collect(),
            ),
            latency: Percentiles::of(timings.iter().map(|t| t.latency).collect()),
        }
    }

    /// The table rows of these statistics (after a report's own leading rows).
    fn rows(&self) -> Vec<(&'static str, String)> {
        let per_request = |n: u64| n as f64 / self.requests.max(1) as f64;
        vec![
            ("requests completed", self.requests.to_string()),
            (
                "mean prompt / output tokens",
                format!(
                    "{:.1} / {:.1}",
                    per_request(self.prompt_tokens),
                    per_request(self.output_tokens)
                ),
            ),
            ("wall time", format!("{:.2} s", self.elapsed_s)),
            ("requests/s", format!("{:.2}", self.requests_per_s)),
            (
                "output tokens/s",
                format!("{:.1}", self.output_tokens_per_s),
            ),
            ("total tokens/s", format!("{:.1}", self.total_tokens_per_s)),
            ("TTFT p50 / p90 / p99", ms3(&self.ttft)),
            ("TPOT p50 / p90 / p99", ms3(&self.tpot)),
            ("ITL p50 / p90 / p99", ms3(&self.itl)),
            ("latency p50 / p90 / p99", ms3(&self.latency)),
        ]
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Model, KV dtype, device, date.
    pub meta: BenchMeta,
    /// The workload.
    pub workload: Workload,
    /// Counts, throughput and latency percentiles (flattened into the report's JSON).
    #[serde(flatten)]
    pub stats: RequestStats,
    /// The most KV blocks in use at once (since the engine started).
    pub kv_blocks_peak: u64,
    /// `kv_blocks_peak / kv_blocks_total`.
    pub kv_peak_usage: f64,
    /// The most sequences running at once (since the engine started).
    pub running_peak: u64,
    /// Preemptions during the run.
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache during the run (re-prefills count again).
    pub prefix_query_tokens: u64,
    /// Prompt tokens found in the prefix cache during the run.
    pub prefix_hit_tokens: u64,
    /// `prefix_hit_tokens / prompt_tokens`.
    pub prefix_hit_rate: f64,
    /// Where the engine's step loop spent the run (absent in reports from before it existed).
    #[serde(default)]
    pub steps: StepBreakdown,
}

/// The engine's steps during a run: how many, and where their time went.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepBreakdown {
    /// Steps run.
    pub count: u64,
    /// Mean wall time of a step, milliseconds.
    pub mean_ms: f64,
    /// Mean time of a step's forward pass (with on-device sampling), milliseconds.
    pub forward_mean_ms: f64,
    /// Mean time of a step's scheduling, milliseconds.
    pub schedule_mean_ms: f64,
    /// The forward passes by kind of step and batch size (classes with steps only).
    #[serde(default)]
    pub shapes: Vec<StepShapeRow>,
}

/// The steps of one kind and batch-size class during a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepShapeRow {
    /// `decode` (one token per sequence, or draft verification) or `prefill` (with a prompt
    /// chunk).
    pub kind: String,
    /// Sequences per step, e.g. `"2-4"` or `">256"`.
    pub seqs: String,
    /// Steps run.
    pub steps: u64,
    /// Mean tokens per step.
    pub mean_tokens: f64,
    /// Mean forward pass, milliseconds.
    pub forward_mean_ms: f64,
    /// Share of all forward time in the run.
    pub forward_share: f64,
}

impl StepShapeRow {
    fn rows(before: &engine::StepShapes, after: &engine::StepShapes) -> Vec<Self> {
        let kinds = [
            ("decode", &before.decode, &after.decode),
            ("prefill", &before.prefill, &after.prefill),
        ];
        let diff = |b: &engine::StepClass, a: &engine::StepClass| engine::StepClass {
            steps: a.steps.saturating_sub(b.steps),
            tokens: a.tokens.saturating_sub(b.tokens),
            forward_micros: a.forward_micros.saturating_sub(b.forward_micros),
        };
        let classes: Vec<(&str, usize, engine::StepClass)> = kinds
            .iter()
            .flat_map(|(kind, b, a)| {
                b.iter()
                    .zip(a.iter())
                    .enumerate()
                    .map(move |(i, (b, a))| (*kind, i, diff(b, a)))
            })
            .filter(|(_, _, c)| c.steps > 0)
            .collect();
        let total: u64 = classes.iter().map(|(_, _, c)| c.forward_micros).sum();
        classes
            .into_iter()
            .map(|(kind, i, c)| Self {
                kind: kind.to_owned(),
                seqs: engine::StepShapes::class_label(i),
                steps: c.steps,
                mean_tokens: c.tokens as f64 / c.steps as f64,
                forward_mean_ms: c.forward_micros as f64 / 1e3 / c.steps as f64,
                forward_share: if total == 0 {
                    0.0
                } else {
                    c.forward_micros as f64 / total as f64
                },
            })
            .collect()
    }
}

impl StepBreakdown {
    fn between(before: &engine::EngineStats, after: &engine::EngineStats) -> Self {
        let count = after.steps.saturating_sub(before.steps);
        let mean = |a: u64, b: u64| {
            if count == 0 {
                0.0
            } else {
                a.saturating_sub(b) as f64 / 1e3 / count as f64
            }
        };
        Self {
            count,
            mean_ms: mean(after.step_micros, before.step_micros),
            forward_mean_ms: mean(after.forward_micros, before.forward_micros),
            schedule_mean_ms: mean(after.schedule_micros, before.schedule_micros),
            shapes: StepShapeRow::rows(&before.step_shapes, &after.step_shapes),
        }
    }
}

/// What one request measured.
#[derive(Debug, Default)]
struct RequestTiming {
    ttft: Duration,
    latency: Duration,
    gaps: Vec<Duration>,
    tokens: u64,
    prompt_tokens: u64,
}

/// Times one request's stream of deltas, from its submission on.
#[derive(Debug)]
struct TimingRecorder {
    submitted: Instant,
    first: Option<Duration>,
    last: Option<Duration>,
    timing: RequestTiming,
}

impl TimingRecorder {
    /// Starts timing now (call it right before submitting).
    fn start() -> Self {
        Self {
            submitted: Instant::now(),
            first: None,
            last: None,
            timing: RequestTiming::default(),
        }
    }

    /// A delta of `tokens` new tokens arrived; `prompt_tokens` when it carries the usage.
    fn delta(&mut self, tokens: usize, prompt_tokens: Option<u32>) {
        if tokens > 0 {
            let now = self.submitted.elapsed();
            if self.first.is_none() {
                self.first = Some(now);
            }
            if let Some(prev) = self.last {
                self.timing.gaps.push(now.saturating_sub(prev));
            }
            self.last = Some(now);
        }
        self.timing.tokens += tokens as u64;
        if let Some(n) = prompt_tokens {
            self.timing.prompt_tokens = u64::from(n);
        }
    }

    /// The stream ended: its timing (latency: to the last token).
    fn finish(self) -> RequestTiming {
        let mut t = self.timing;
        t.latency = self.last.unwrap_or_else(|| self.submitted.elapsed());
        t.ttft = self.first.unwrap_or(t.latency);
        t
    }
}

/// A bench request: `prompt`'s token ids, exactly `output_len` tokens (EOS ignored).
fn engine_request(prompt: Vec<u32>, output_len: u32, id: String) -> GenerateRequest {
    let mut request = GenerateRequest::new(Prompt::TokenIds(prompt));
    request.request_id = Some(id);
    request.max_tokens = Some(output_len);
    request.ignore_eos = true;
    request
}

/// Generated tokens per warm-up request at most ([`warm_up`]).
pub const WARMUP_OUTPUT_TOKENS: u32 = 16;

/// Added to the workload's seed for the warm-up's requests, so that they share no prompt (and
/// no prefix-cache block) with the measured ones.
const WARMUP_SEED_OFFSET: u64 = 0x5741_524D;

/// Runs up to `requests` requests shaped like `workload`'s (another seed, at most
/// [`WARMUP_OUTPUT_TOKENS`] tokens each) and waits for them, untimed: a first run pays
/// one-time costs (a GPU backend compiles its kernels, or loads them from the disk cache, and
/// captures CUDA graphs) that a measurement must not include.
///
/// # Errors
/// As [`run`].
pub async fn warm_up<B: GenerationBackend>(
    backend: &B,
    workload: &Workload,
    requests: u32,
) -> Result<(), BenchError> {
    let warm = Workload {
        num_requests: requests.min(workload.num_requests),
        seed: workload.seed.wrapping_add(WARMUP_SEED_OFFSET),
        ..*workload
    };
    if warm.num_requests == 0 {
        return Ok(());
    }
    let info = backend.model_info();
    let mut tasks = Vec::new();
    for (index, r) in warm
        .requests(info.vocab_size, info.max_model_len)?
        .into_iter()
        .enumerate()
    {
        let output_len = r.output_len.min(WARMUP_OUTPUT_TOKENS);
        let request = engine_request(r.prompt, output_len, format!("bench-warmup-{index}"));
        let mut stream = backend
            .generate(request)
            .map_err(|source| BenchError::Engine { index, source })?;
        tasks.push(tokio::spawn(async move {
            while let Some(delta) = stream.next().await {
                delta?;
            }
            Ok::<_, EngineError>(())
        }));
    }
    for (index, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(BenchError::Engine { index, source }),
            Err(e) => {
                return Err(BenchError::Engine {
                    index,
                    source: EngineError::Internal(format!("warm-up task: {e}")),
                });
            }
        }
    }
    Ok(())
}

/// Runs `workload` on `backend` and measures it. A request the engine refuses or fails, or one
/// that does not produce exactly its output length, is an error (the workload is meant to fit
/// the configuration).
///
/// # Errors
/// [`BenchError`]: a workload that does not fit the engine (checked before anything is
/// submitted), or the first request that failed.
pub async fn run<B: GenerationBackend>(
    backend: &B,
    workload: &Workload,
) -> Result<BenchReport, BenchError> {
    let info = backend.model_info();
    let requests = workload.requests(info.vocab_size, info.max_model_len)?;
    let expected: Vec<u32> = requests.iter().map(|r| r.output_len).collect();
    let before = backend.stats();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(requests.len());
    for (index, r) in requests.into_iter().enumerate() {
        let request = engine_request(r.prompt, r.output_len, format!("bench-{index}"));
        let mut recorder = TimingRecorder::start();
        let mut stream = backend
            .generate(request)
            .map_err(|source| BenchError::Engine { index, source })?;
        tasks.push(tokio::spawn(async move {
            while let Some(delta) = stream.next().await {
                let delta = delta?;
                recorder.delta(delta.token_ids.len(), delta.usage.map(|u| u.prompt_tokens));
            }
            Ok::<_, EngineError>(recorder.finish())
        }));
    }
    let mut timings = Vec::with_capacity(tasks.len());
    for (index, task) in tasks.into_iter().enumerate() {
        let t = task
            .await
            .map_err(|e| EngineError::Internal(format!("bench task: {e}")))
            .and_then(|r| r)
            .map_err(|source| BenchError::Engine { index, source })?;
        if t.tokens != u64::from(expected[index]) {
            return Err(BenchError::TokenCount {
                index,
                expected: expected[index],
                got: t.tokens,
            });
        }
        timings.push(t);
    }
    let elapsed = start.elapsed();
    let after = backend.stats();
    Ok(summarize(
        BenchMeta::new(&info),
        *workload,
        &timings,
        elapsed,
        before,
        after,
    ))
}

fn summarize(
    meta: BenchMeta,
    workload: Workload,
    timings: &[RequestTiming],
    elapsed: Duration,
    before: engine::EngineStats,
    after: engine::EngineStats,
) -> BenchReport {
    let stats = RequestStats::of(timings, elapsed);
    let kv_blocks_peak = after.kv_blocks_used_peak as u64;
    let prefix_hit_tokens = after
        .prefix_hit_tokens
        .saturating_sub(before.prefix_hit_tokens);
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    BenchReport {
        kv_peak_usage: ratio(kv_blocks_peak, u64::from(meta.kv_blocks_total)),
        prefix_hit_rate: ratio(prefix_hit_tokens, stats.prompt_tokens),
        meta,
        workload,
        stats,
        kv_blocks_peak,
        running_peak: after.running_peak as u64,
        preemptions: after.preemptions.saturating_sub(before.preemptions),
        prefix_query_tokens: after
            .prefix_query_tokens
            .saturating_sub(before.prefix_query_tokens),
        prefix_hit_tokens,
        steps: StepBreakdown::between(&before, &after),
    }
}

/// The `q`-quantile of sorted `values` (nearest rank).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Now, UTC, as RFC 3339 to the second.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_from_unix(secs)
}

/// Seconds since the Unix epoch as an RFC 3339 UTC date (the civil-from-days algorithm of
/// Howard Hinnant's date library, proleptic Gregorian).
fn utc_from_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn ms3(p: &Percentiles) -> String {
    format!("{:.1} / {:.1} / {:.1} ms", p.p50_ms, p.p90_ms, p.p99_ms)
}

fn table(f: &mut fmt::Formatter<'_>, rows: &[(&str, String)]) -> fmt::Result {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    writeln!(f, "| {:width$} | value |", "metric")?;
    writeln!(f, "| {:-<width$} | ----- |", "")?;
    for (key, value) in rows {
        writeln!(f, "| {key:width$} | {value} |")?;
    }
    Ok(())
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows = vec![(
            "workload",
            format!("{} (seed {})", self.workload.kind, self.workload.seed),
        )];
        rows.extend(self.stats.rows());
        rows.extend([
            (
                "peak KV blocks",
                format!(
                    "{} / {} ({:.1}%)",
                    self.kv_blocks_peak,
                    self.meta.kv_blocks_total,
                    100.0 * self.kv_peak_usage
                ),
            ),
            ("peak running sequences", self.running_peak.to_string()),
            ("preemptions", self.preemptions.to_string()),
            (
                "engine steps (mean: all / forward / schedule)",
                format!(
                    "{} ({:.2} / {:.2} / {:.2} ms)",
                    self.steps.count,
                    self.steps.mean_ms,
                    self.steps.forward_mean_ms,
                    self.steps.schedule_mean_ms
                ),
            ),
            (
                "prefix-cache hit rate",
                format!(
                    "{:.1}% ({} of {} prompt tokens)",
                    100.0 * self.prefix_hit_rate,
                    self.prefix_hit_tokens,
                    self.stats.prompt_tokens
                ),
            ),
        ]);
        table(f, &rows)?;
        if !self.steps.shapes.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "| step kind | sequences | steps | mean tokens | mean forward | share of forward |"
            )?;
            writeln!(f, "| --- | --- | ---: | ---: | ---: | ---: |")?;
            for r in &self.steps.shapes {
                writeln!(
                    f,
                    "| {} | {} | {} | {:.1} | {:.2} ms | {:.1}% |",
                    r.kind,
                    r.seqs,
                    r.steps,
                    r.mean_tokens,
                    r.forward_mean_ms,
                    100.0 * r.forward_share
                )?;
            }
        }
        Ok(())
    }
}

/// One KV dtype of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepEntry {
    /// KV blocks the budget holds in this dtype.
    pub kv_blocks: u32,
    /// Sequences of the workload's mean length (prompt + output) the KV pool holds at once:
    /// `kv_blocks × block_size / mean length` (before `--max-num-seqs`).
    pub kv_capacity_seqs: u64,
    /// The run.
    pub report: BenchReport,
}

impl SweepEntry {
    /// The entry of one run.
    pub fn new(report: BenchReport) -> Self {
        let tokens = report.stats.prompt_tokens + report.stats.output_tokens;
        let mean_len = tokens.div_ceil(report.stats.requests.max(1)).max(1);
        let slots = u64::from(report.meta.kv_blocks_total) * u64::from(report.meta.block_size);
        Self {
            kv_blocks: report.meta.kv_blocks_total,
            kv_capacity_seqs: slots / mean_len,
            report,
        }
    }
}

/// A KV-dtype sweep: the same workload at one KV memory budget, one run per dtype.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    /// The KV memory budget, bytes.
    pub kv_cache_memory: u64,
    /// One entry per dtype, in the order asked.
    pub entries: Vec<SweepEntry>,
}

impl fmt::Display for SweepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "KV-dtype sweep at {:.1} MiB of KV cache",
            self.kv_cache_memory as f64 / f64::from(1u32 << 20)
        )?;
        writeln!(
            f,
            "| KV dtype | KV blocks | seqs the KV holds | peak running | preemptions | req/s | output tok/s | TPOT p50 |"
        )?;
        writeln!(
            f,
            "| -------- | --------- | ----------------- | ------------ | ----------- | ----- | ------------ | -------- |"
        )?;
        for e in &self.entries {
            let r = &e.report;
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} ms |",
                r.meta.kv_cache_dtype,
                e.kv_blocks,
                e.kv_capacity_seqs,
                r.running_peak,
                r.preemptions,
                r.stats.requests_per_s,
                r.stats.output_tokens_per_s,
                r.stats.tpot.p50_ms
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
