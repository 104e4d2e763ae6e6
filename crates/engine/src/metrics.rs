//! Prometheus metrics of the engine (`kvserve_*`), kept with `prometheus-client` and rendered
//! in the Prometheus text exposition format (0.0.4), which `promtool check metrics` accepts.
//!
//! `prometheus-client` writes OpenMetrics text, which differs in three ways that the
//! Prometheus text parser (and so `promtool`) does not accept: a counter's `# HELP`/`# TYPE`
//! name lacks the `_total` of its samples, `# UNIT` lines, and the `# EOF` terminator.
//! [`to_prometheus_text`] rewrites those; everything else is the same in both formats.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `outcome` label of `kvserve_requests_total`.
pub(crate) type Outcome = [(&'static str, &'static str); 1];

/// Outcome label values.
pub(crate) mod outcome {
    /// Ended by EOS, a stop token id or a stop string.
    pub(crate) const STOP: &str = "stop";
    /// Ended by `max_tokens` or `max_model_len`.
    pub(crate) const LENGTH: &str = "length";
    /// Aborted by id or by the client going away.
    pub(crate) const ABORTED: &str = "aborted";
    /// Its deadline passed.
    pub(crate) const DEADLINE: &str = "deadline";
    /// The engine failed while computing it.
    pub(crate) const ERROR: &str = "error";
    /// Cut short by shutdown.
    pub(crate) const SHUTDOWN: &str = "shutdown";
    /// Refused by validation.
    pub(crate) const INVALID: &str = "invalid";
    /// Refused: too many requests in flight.
    pub(crate) const OVERLOADED: &str = "overloaded";
    /// Refused: not serving.
    pub(crate) const UNAVAILABLE: &str = "unavailable";
}

/// Every metric of the engine; cheap handles (`Arc`s inside) shared by the step loop and the
/// handle.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) requests: Family<Outcome, Counter>,
    pub(crate) time_to_first_token: Histogram,
    pub(crate) inter_token_latency: Histogram,
    pub(crate) e2e_latency: Histogram,
    pub(crate) waiting: Gauge,
    pub(crate) running: Gauge,
    pub(crate) swapped: Gauge,
    pub(crate) kv_blocks_used: Gauge,
    pub(crate) kv_blocks_free: Gauge,
    pub(crate) kv_usage: Gauge<f64, AtomicU64>,
    pub(crate) prefix_queries: Counter,
    pub(crate) prefix_hits: Counter,
    pub(crate) preemptions: Counter,
    pub(crate) spec_proposed: Counter,
    pub(crate) spec_accepted: Counter,
    pub(crate) prompt_tokens: Counter,
    pub(crate) generation_tokens: Counter,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut r = Registry::default();
        let requests = Family::<Outcome, Counter>::default();
        // Counters are registered without `_total`: prometheus-client adds it.
        r.register(
            "kvserve_requests",
            "Requests by outcome (stop, length, aborted, deadline, error, shutdown; refused: invalid, overloaded, unavailable).",
            requests.clone(),
        );
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        r.register(
            "kvserve_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            time_to_first_token.clone(),
        );
        let inter_token_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        r.register(
            "kvserve_inter_token_latency_seconds",
            "Time between consecutive steps that generate tokens for a completion.",
            inter_token_latency.clone(),
        );
        let e2e_latency = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        r.register(
            "kvserve_e2e_request_latency_seconds",
            "Time from a request's arrival to its end.",
            e2e_latency.clone(),
        );
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let waiting = gauge(
            &mut r,
            "kvserve_num_requests_waiting",
            "Sequences waiting for admission (queue depth).",
        );
        let running = gauge(
            &mut r,
            "kvserve_num_sequences_running",
            "Sequences holding KV blocks and being computed.",
        );
        let swapped = gauge(
            &mut r,
            "kvserve_num_sequences_swapped",
            "Sequences swapped out to the CPU pool.",
        );
        let kv_blocks_used = gauge(
            &mut r,
            "kvserve_kv_blocks_used",
            "KV blocks referenced by a live sequence.",
        );
        let kv_blocks_free = gauge(
            &mut r,
            "kvserve_kv_blocks_free",
            "KV blocks an allocation can take (free, or kept only by the prefix cache).",
        );
        let kv_usage = Gauge::<f64, AtomicU64>::default();
        r.register(
            "kvserve_kv_cache_usage_ratio",
            "Fraction of KV blocks in use.",
            kv_usage.clone(),
        );
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let prefix_queries = counter(
            &mut r,
            "kvserve_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
        );
        let prefix_hits = counter(
            &mut r,
            "kvserve_prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
        );
        let preemptions = counter(
            &mut r,
            "kvserve_preemptions",
            "Sequences preempted (recompute or swap).",
        );
        let spec_proposed = counter(
            &mut r,
            "kvserve_spec_decode_proposed_tokens",
            "Draft tokens proposed by speculative decoding.",
        );
        let spec_accepted = counter(
            &mut r,
            "kvserve_spec_decode_accepted_tokens",
            "Draft tokens accepted by verification.",
        );
        let prompt_tokens = counter(
            &mut r,
            "kvserve_prompt_tokens",
            "Prompt tokens of admitted requests.",
        );
        let generation_tokens = counter(
            &mut r,
            "kvserve_generation_tokens",
            "Tokens generated and streamed.",
        );
        Self {
            registry: r,
            requests,
            time_to_first_token,
            inter_token_latency,
            e2e_latency,
            waiting,
            running,
            swapped,
            kv_blocks_used,
            kv_blocks_free,
            kv_usage,
            prefix_queries,
            prefix_hits,
            preemptions,
            spec_proposed,
            spec_accepted,
            prompt_tokens,
            generation_tokens,
        }
    }

    /// Counts a request's outcome.
    pub(crate) fn request(&self, outcome: &'static str) {
        self.requests.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn text(&self) -> String {
        let mut open = String::new();
        if encode_registry(&mut open, &self.registry).is_err() {
            return String::new();
        }
        to_prometheus_text(&open)
    }
}

/// Rewrites OpenMetrics text (as `prometheus-client` writes it) into the Prometheus text
/// format: counter families are named after their `_total` samples, `# UNIT` and `# EOF`
/// lines go.
pub(crate) fn to_prometheus_text(open_metrics: &str) -> String {
    let mut counters = Vec::new();
    for line in open_metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.push(name.to_owned());
        }
    }
    let mut out = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            let is_counter = counters.iter().any(|c| c == name);
            (is_counter && !name.ends_with("_total"))
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => {
                // OpenMetrics `_created` samples have no place in the Prometheus format.
                if counters
                    .iter()
                    .any(|c| line.starts_with(&format!("{c}_created")))
                {
                    continue;
                }
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_renamed_and_openmetrics_lines_dropped() {
        let open = "# HELP a_requests Requests.\n# TYPE a_requests counter\n\
                    a_requests_total{outcome=\"stop\"} 2\n\
                    # HELP h_seconds Latency.\n# TYPE h_seconds histogram\n# UNIT h_seconds seconds\n\
                    h_seconds_sum 0.0\n# EOF\n";
        let text = to_prometheus_text(open);
        assert_eq!(
            text,
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
             a_requests_total{outcome=\"stop\"} 2\n\
             # HELP h_seconds Latency.\n# TYPE h_seconds histogram\nh_seconds_sum 0.0\n"
        );
    }

    #[test]
    fn every_family_has_help_and_type_and_counters_end_in_total() {
        let m = Metrics::new();
        m.request(outcome::STOP);
        m.time_to_first_token.observe(0.01);
        m.kv_usage.set(0.5);
        let text = m.text();
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line["# TYPE ".len()..].split(' ');
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(name.starts_with("kvserve_"), "{line}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no help for {name}"
            );
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{line}");
            }
        }
        assert!(
            text.contains("kvserve_requests_total{outcome=\"stop\"} 1"),
            "{text}"
        );
        assert!(text.contains("kvserve_kv_cache_usage_ratio 0.5"), "{text}");
    }
}
