//! `kvserve bench`: offline throughput over a synthetic workload.
//!
//! Every request is submitted at once (the engine's continuous batching does the rest); each
//! has `input_len` random prompt token ids and generates exactly `output_len` tokens (EOS
//! ignored). The report gives wall time, throughput and latency percentiles as a table.

use std::fmt;
use std::time::{Duration, Instant};

use engine::{EngineError, GenerateRequest, Prompt};

use crate::backend::{DeltaStream, GenerationBackend};

/// The synthetic workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Requests, all submitted at once.
    pub num_requests: u32,
    /// Prompt tokens per request.
    pub input_len: u32,
    /// Generated tokens per request.
    pub output_len: u32,
    /// Seed of the random prompts.
    pub seed: u64,
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// The workload.
    pub workload: Workload,
    /// Prompt tokens over all requests.
    pub prompt_tokens: u64,
    /// Generated tokens over all requests.
    pub output_tokens: u64,
    /// From the first submission to the last token.
    pub elapsed: Duration,
    /// Time to first token of each request, sorted.
    pub ttft: Vec<Duration>,
    /// Time from submission to the last token of each request, sorted.
    pub latency: Vec<Duration>,
}

/// SplitMix64: a tiny, well-distributed generator for reproducible prompts.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The workload's prompts: random ids below `vocab_size`.
pub fn prompts(workload: &Workload, vocab_size: u32) -> Vec<Vec<u32>> {
    let mut state = workload.seed;
    let vocab = u64::from(vocab_size.max(1));
    (0..workload.num_requests)
        .map(|_| {
            (0..workload.input_len)
                .map(|_| (splitmix64(&mut state) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Runs `workload` on `backend` and measures it. A request the engine refuses or fails is an
/// error (the workload is meant to fit the configuration).
pub async fn run<B: GenerationBackend>(
    backend: &B,
    workload: &Workload,
) -> Result<BenchReport, EngineError> {
    let vocab_size = backend.model_info().vocab_size;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, ids) in prompts(workload, vocab_size).into_iter().enumerate() {
        let mut request = GenerateRequest::new(Prompt::TokenIds(ids));
        request.request_id = Some(format!("bench-{i}"));
        request.max_tokens = Some(workload.output_len);
        request.ignore_eos = true;
        let submitted = Instant::now();
        let mut stream = backend.generate(request)?;
        tasks.push(tokio::spawn(async move {
            let mut first = None;
            let mut tokens = 0u64;
            let mut prompt_tokens = 0u64;
            while let Some(delta) = stream.next().await {
                let delta = delta?;
                if first.is_none() && !delta.token_ids.is_empty() {
                    first = Some(submitted.elapsed());
                }
                tokens += delta.token_ids.len() as u64;
                if let Some(usage) = delta.usage {
                    prompt_tokens = u64::from(usage.prompt_tokens);
                }
            }
            let latency = submitted.elapsed();
            Ok::<_, EngineError>((first.unwrap_or(latency), latency, tokens, prompt_tokens))
        }));
    }
    let mut report = BenchReport {
        workload: *workload,
        prompt_tokens: 0,
        output_tokens: 0,
        elapsed: Duration::ZERO,
        ttft: Vec::new(),
        latency: Vec::new(),
    };
    for task in tasks {
        let (ttft, latency, tokens, prompt_tokens) = task
            .await
            .map_err(|e| EngineError::Internal(format!("bench task: {e}")))??;
        report.ttft.push(ttft);
        report.latency.push(latency);
        report.output_tokens += tokens;
        report.prompt_tokens += prompt_tokens;
    }
    report.elapsed = start.elapsed();
    report.ttft.sort();
    report.latency.sort();
    Ok(report)
}

/// The `q`-quantile of sorted `values` (nearest rank).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let w = &self.workload;
        let rows = [
            ("requests", w.num_requests.to_string()),
            (
                "prompt / output tokens per request",
                format!("{} / {}", w.input_len, w.output_len),
            ),
            ("wall time", format!("{secs:.2} s")),
            (
                "requests/s",
                format!("{:.2}", f64::from(w.num_requests) / secs),
            ),
            (
                "output tokens/s",
                format!("{:.1}", self.output_tokens as f64 / secs),
            ),
            (
                "total tokens/s",
                format!(
                    "{:.1}",
                    (self.prompt_tokens + self.output_tokens) as f64 / secs
                ),
            ),
            (
                "TTFT p50 / p90 / p99",
                format!(
                    "{} / {} / {}",
                    ms(percentile(&self.ttft, 0.5)),
                    ms(percentile(&self.ttft, 0.9)),
                    ms(percentile(&self.ttft, 0.99))
                ),
            ),
            (
                "latency p50 / p99",
                format!(
                    "{} / {}",
                    ms(percentile(&self.latency, 0.5)),
                    ms(percentile(&self.latency, 0.99))
                ),
            ),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        writeln!(f, "| {:width$} | value |", "metric")?;
        writeln!(f, "| {:-<width$} | ----- |", "")?;
        for (key, value) in rows {
            writeln!(f, "| {key:width$} | {value} |")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_reproducible_and_in_vocabulary() {
        let w = Workload {
            num_requests: 3,
            input_len: 50,
            output_len: 1,
            seed: 7,
        };
        let a = prompts(&w, 100);
        assert_eq!(a, prompts(&w, 100));
        assert_eq!(a.len(), 3);
        assert!(
            a.iter()
                .all(|p| p.len() == 50 && p.iter().all(|&t| t < 100))
        );
        assert_ne!(a[0], a[1]);
        assert!(prompts(&w, 0).iter().flatten().all(|&t| t == 0));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&v, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
