#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use engine::{Engine, EngineConfig, EngineHandle, EngineStats};
use model::{CpuBackend, DType, KvCacheConfig, ModelConfig, Tokenizer, Weights};

use super::*;

const VOCAB: usize = 1200;

/// The engine crate's tiny test tokenizer (1,200 tokens; the prompts are token ids, so only its
/// vocabulary size matters here).
fn tokenizer() -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/data");
    let config = std::fs::read_to_string(dir.join("tiny_tokenizer_config.json")).unwrap();
    Tokenizer::from_file(dir.join("tiny_tokenizer.json"))
        .unwrap()
        .with_hf_config(&config)
        .unwrap()
}

/// An engine over a tiny dummy Llama on the CPU backend, `num_blocks` KV blocks of 16 slots.
pub(super) fn tiny_engine(
    config: EngineConfig,
    num_blocks: usize,
) -> Result<EngineHandle, EngineError> {
    let weights = Weights::dummy(&ModelConfig::tiny(VOCAB), DType::Q8_0, 7).unwrap();
    let cache = KvCacheConfig {
        num_blocks,
        block_size: 16,
        dtype: "fp16".parse().unwrap(),
        num_cpu_blocks: 0,
    };
    let backend = CpuBackend::new(weights, cache).unwrap();
    Engine::start_with_backend(
        EngineConfig {
            device: engine::Device::Cpu,
            ..config
        },
        Box::new(backend),
        tokenizer(),
        "tiny".into(),
    )
}

fn bench(engine: &EngineHandle, workload: &Workload) -> Result<BenchReport, BenchError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(engine, workload))
}

fn check_invariants(r: &BenchReport, workload: &Workload) {
    let requests = workload
        .requests(VOCAB as u32, r.meta.max_model_len)
        .unwrap();
    let prompt: usize = requests.iter().map(|q| q.prompt.len()).sum();
    let output: u64 = requests.iter().map(|q| u64::from(q.output_len)).sum();
    assert_eq!(r.stats.requests, u64::from(workload.num_requests));
    assert_eq!(r.stats.prompt_tokens, prompt as u64);
    assert_eq!(r.stats.output_tokens, output);
    for p in [&r.stats.ttft, &r.stats.tpot, &r.stats.itl, &r.stats.latency] {
        assert!(p.p50_ms <= p.p90_ms && p.p90_ms <= p.p99_ms, "{p:?}");
        assert!(p.p50_ms >= 0.0);
    }
    assert!(r.stats.ttft.p99_ms <= r.stats.latency.p99_ms);
    assert_eq!(r.stats.ttft.count, requests.len());
    assert_eq!(
        r.stats.tpot.count,
        requests.iter().filter(|q| q.output_len >= 2).count()
    );
    assert_eq!(
        r.stats.itl.count as u64,
        output - requests.len() as u64,
        "one gap per token after the first (one token per delta without speculation)"
    );
    assert!(
        r.stats.output_tokens_per_s > 0.0
            && r.stats.total_tokens_per_s > r.stats.output_tokens_per_s
    );
    assert!(r.kv_blocks_peak > 0 && r.kv_peak_usage > 0.0 && r.kv_peak_usage <= 1.0);
    assert!(r.running_peak >= 1 && r.running_peak <= r.stats.requests);
    assert!(r.steps.count > 0 && r.steps.forward_mean_ms <= r.steps.mean_ms);
    assert!((0.0..=1.0).contains(&r.prefix_hit_rate));
    assert_eq!(r.meta.model, "tiny");
    assert_eq!(r.meta.kv_cache_dtype, "fp16");
    assert!(r.meta.date_utc.ends_with('Z'));
    let json = serde_json::to_string(r).unwrap();
    assert_eq!(&serde_json::from_str::<BenchReport>(&json).unwrap(), r);
    let table = r.to_string();
    assert!(table.contains("TPOT p50 / p90 / p99") && table.contains("prefix-cache hit rate"));
}

#[test]
fn every_workload_runs_end_to_end_with_exact_token_counts() {
    let engine = tiny_engine(EngineConfig::default(), 128).unwrap();
    let kinds = [
        WorkloadKind::Fixed {
            input_len: 9,
            output_len: 5,
        },
        WorkloadKind::Fixed {
            input_len: 3,
            output_len: 1,
        },
        WorkloadKind::Sharegpt {
            mean_input_len: 12.0,
            mean_output_len: 6.0,
            sigma: 0.5,
        },
        WorkloadKind::SharedPrefix {
            prefix_len: 48,
            suffix_len: 4,
            output_len: 3,
        },
    ];
    for kind in kinds {
        let workload = Workload {
            kind,
            num_requests: 5,
            seed: 3,
        };
        let report = bench(&engine, &workload).unwrap();
        check_invariants(&report, &workload);
    }
    engine.shutdown(Duration::from_secs(5));
}

#[test]
fn shared_prefix_hits_the_prefix_cache_and_not_without_it() {
    let workload = Workload {
        kind: WorkloadKind::SharedPrefix {
            prefix_len: 64,
            suffix_len: 4,
            output_len: 2,
        },
        num_requests: 4,
        seed: 1,
    };
    // Small steps, so that the first prompt's blocks are cached before the later prompts are
    // prefilled (all four arrive together).
    let config = EngineConfig {
        max_num_batched_tokens: 32,
        ..EngineConfig::default()
    };
    let on = tiny_engine(config.clone(), 64).unwrap();
    let r = bench(&on, &workload).unwrap();
    check_invariants(&r, &workload);
    assert!(r.prefix_hit_tokens > 0, "{r:?}");
    assert!(r.prefix_hit_rate > 0.0 && r.prefix_hit_rate < 1.0);
    // A second run reports its own hits, not the engine's total.
    let again = bench(&on, &workload).unwrap();
    assert!(again.prefix_hit_tokens <= again.stats.prompt_tokens);
    on.shutdown(Duration::from_secs(5));
    let off = tiny_engine(
        EngineConfig {
            enable_prefix_caching: false,
            ..config
        },
        64,
    )
    .unwrap();
    let r = bench(&off, &workload).unwrap();
    assert_eq!((r.prefix_hit_tokens, r.prefix_hit_rate), (0, 0.0));
    off.shutdown(Duration::from_secs(5));
}

#[test]
fn a_workload_that_does_not_fit_the_kv_pool_is_refused_before_running() {
    let engine = tiny_engine(EngineConfig::default(), 4).unwrap();
    let workload = Workload {
        kind: WorkloadKind::Fixed {
            input_len: 128,
            output_len: 8,
        },
        num_requests: 2,
        seed: 0,
    };
    let err = bench(&engine, &workload).unwrap_err();
    assert!(
        matches!(
            err,
            BenchError::Workload(WorkloadError::TooLong { index: 0, .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_model_len"), "{err}");
    assert_eq!(engine.stats().steps, 0, "nothing ran");
    engine.shutdown(Duration::from_secs(5));
    // A budget that holds no KV block at all fails at engine start, naming the setting.
    let tiny_budget = EngineConfig {
        kv_cache_memory: Some(1024),
        ..EngineConfig::default()
    };
    let err = engine::kv_cache_config(&tiny_budget, &ModelConfig::tiny(VOCAB)).unwrap_err();
    assert!(err.to_string().contains("kv_cache_memory"), "{err}");
}

/// A made-up request of 8 prompt tokens: TTFT, latency and the gaps between its token deltas
/// in milliseconds (one token per delta).
pub(super) fn timing(ttft_ms: u64, latency_ms: u64, gaps_ms: &[u64]) -> RequestTiming {
    RequestTiming {
        ttft: Duration::from_millis(ttft_ms),
        latency: Duration::from_millis(latency_ms),
        gaps: gaps_ms.iter().map(|&g| Duration::from_millis(g)).collect(),
        tokens: gaps_ms.len() as u64 + 1,
        prompt_tokens: 8,
    }
}

/// The metadata of a made-up run: model `m` on the CPU, 10 blocks of 16, `max_model_len` 64.
pub(super) fn meta_fixture(kv_cache_dtype: &str) -> BenchMeta {
    BenchMeta {
        model: "m".into(),
        kv_cache_dtype: kv_cache_dtype.into(),
        device: "cpu".into(),
        block_size: 16,
        kv_blocks_total: 10,
        max_model_len: 64,
        date_utc: utc_from_unix(0),
        kvserve_version: "0".into(),
    }
}

/// Step shapes with class 0 of decode and prefill set to (steps, tokens, forward µs).
fn shapes(decode: &[(u64, u64, u64)], prefill: &[(u64, u64, u64)]) -> engine::StepShapes {
    let mut s = engine::StepShapes::default();
    let class = |&(steps, tokens, forward_micros): &(u64, u64, u64)| engine::StepClass {
        steps,
        tokens,
        forward_micros,
    };
    for (i, c) in decode.iter().enumerate() {
        s.decode[i] = class(c);
    }
    for (i, c) in prefill.iter().enumerate() {
        s.prefill[i] = class(c);
    }
    s
}

#[test]
fn summary_computes_tpot_and_counter_deltas() {
    let ms = Duration::from_millis;
    let timings = vec![timing(10, 50, &[20, 20]), timing(30, 30, &[])];
    let meta = meta_fixture("int8");
    let before = EngineStats {
        preemptions: 2,
        prefix_hit_tokens: 100,
        prefix_query_tokens: 200,
        steps: 10,
        step_micros: 5_000,
        forward_micros: 4_000,
        schedule_micros: 100,
        step_shapes: shapes(&[(1, 10, 1_000)], &[(1, 100, 3_000)]),
        ..EngineStats::default()
    };
    let after = EngineStats {
        preemptions: 3,
        prefix_hit_tokens: 104,
        prefix_query_tokens: 216,
        steps: 14,
        step_micros: 13_000,
        forward_micros: 10_000,
        schedule_micros: 500,
        kv_blocks_used_peak: 4,
        running_peak: 2,
        // +3 decode steps of one sequence (1.5 ms), +1 prefill step of 16 tokens (4.5 ms).
        step_shapes: shapes(&[(4, 13, 2_500)], &[(2, 116, 7_500)]),
        ..EngineStats::default()
    };
    let workload = Workload {
        kind: WorkloadKind::Fixed {
            input_len: 8,
            output_len: 3,
        },
        num_requests: 2,
        seed: 0,
    };
    let r = summarize(meta, workload, &timings, ms(100), before, after);
    assert_eq!((r.stats.prompt_tokens, r.stats.output_tokens), (16, 4));
    assert!((r.stats.requests_per_s - 20.0).abs() < 1e-9);
    assert!((r.stats.output_tokens_per_s - 40.0).abs() < 1e-9);
    assert!((r.stats.total_tokens_per_s - 200.0).abs() < 1e-9);
    // One request with more than one token: (50 - 10) / 2 = 20 ms.
    assert_eq!(r.stats.tpot.count, 1);
    assert!((r.stats.tpot.p50_ms - 20.0).abs() < 1e-9);
    assert_eq!(r.stats.itl.count, 2);
    assert!((r.stats.ttft.p50_ms - 10.0).abs() < 1e-9 && (r.stats.ttft.p99_ms - 30.0).abs() < 1e-9);
    assert_eq!((r.preemptions, r.prefix_hit_tokens), (1, 4));
    assert_eq!(r.prefix_query_tokens, 16);
    assert!((r.prefix_hit_rate - 0.25).abs() < 1e-9);
    assert!((r.kv_peak_usage - 0.4).abs() < 1e-9);
    // 4 steps in the run: 8 ms, 6 ms of forward passes and 0.4 ms of scheduling.
    assert_eq!(r.steps.count, 4);
    assert!((r.steps.mean_ms - 2.0).abs() < 1e-9);
    assert!((r.steps.forward_mean_ms - 1.5).abs() < 1e-9);
    assert!((r.steps.schedule_mean_ms - 0.1).abs() < 1e-9);
    assert!(r.to_string().contains("| 4 (2.00 / 1.50 / 0.10 ms)"), "{r}");
    assert_eq!(r.steps.shapes.len(), 2, "{:?}", r.steps.shapes);
    let (d, p) = (&r.steps.shapes[0], &r.steps.shapes[1]);
    assert_eq!(
        (d.kind.as_str(), d.seqs.as_str(), d.steps),
        ("decode", "1", 3)
    );
    assert!((d.forward_mean_ms - 0.5).abs() < 1e-9 && (d.forward_share - 0.25).abs() < 1e-9);
    assert_eq!(
        (p.kind.as_str(), p.seqs.as_str(), p.steps),
        ("prefill", "1", 1)
    );
    assert!((p.mean_tokens - 16.0).abs() < 1e-9 && (p.forward_mean_ms - 4.5).abs() < 1e-9);
    assert!(
        r.to_string()
            .contains("| prefill | 1 | 1 | 16.0 | 4.50 ms | 75.0% |"),
        "{r}"
    );
    let entry = SweepEntry::new(r);
    // 160 slots / ceil(20 tokens / 2 requests) = 16 sequences.
    assert_eq!((entry.kv_blocks, entry.kv_capacity_seqs), (10, 16));
    let sweep = SweepReport {
        kv_cache_memory: 1 << 20,
        entries: vec![entry],
    };
    let json = serde_json::to_string(&sweep).unwrap();
    assert_eq!(serde_json::from_str::<SweepReport>(&json).unwrap(), sweep);
    assert!(sweep.to_string().contains("| int8 | 10 | 16 |"));
}

#[test]
fn percentiles_by_nearest_rank() {
    let v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
    let p = Percentiles::of(v);
    assert_eq!((p.p50_ms, p.p90_ms, p.p99_ms), (50.0, 90.0, 99.0));
    assert!((p.mean_ms - 50.5).abs() < 1e-9);
    assert_eq!(Percentiles::of(Vec::new()), Percentiles::default());
    assert_eq!(percentile(&[], 0.5), Duration::ZERO);
}

#[test]
fn utc_dates() {
    assert_eq!(utc_from_unix(0), "1970-01-01T00:00:00Z");
    assert_eq!(utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(utc_from_unix(1_796_247_753), "2026-12-02T21:42:33Z");
    assert_eq!(utc_from_unix(4_102_444_799), "2099-12-31T23:59:59Z");
}

#[test]
fn warm_up_runs_short_requests_of_another_seed_untimed() {
    let engine = tiny_engine(EngineConfig::default(), 512).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let workload = Workload {
        kind: WorkloadKind::Fixed {
            input_len: 48,
            output_len: 40,
        },
        num_requests: 4,
        seed: 3,
    };
    // None asked: nothing runs.
    rt.block_on(warm_up(&engine, &workload, 0)).unwrap();
    assert_eq!(engine.stats().steps, 0);
    // More than the workload has: its count; at most WARMUP_OUTPUT_TOKENS tokens each.
    rt.block_on(warm_up(&engine, &workload, 100)).unwrap();
    let warm = engine.stats();
    assert!(warm.steps > 0);
    assert!(warm.steps < u64::from(WARMUP_OUTPUT_TOKENS) * 4, "{warm:?}");
    // The measured run shares no prompt block with the warm-up (another seed).
    let r = rt.block_on(run(&engine, &workload)).unwrap();
    assert_eq!(r.prefix_hit_tokens, 0);
    assert_eq!(r.stats.output_tokens, 4 * 40);
    // A workload longer than the engine allows is the workload's error, before anything runs.
    let long = Workload {
        kind: WorkloadKind::Fixed {
            input_len: 100_000,
            output_len: 4,
        },
        ..workload
    };
    let err = rt.block_on(warm_up(&engine, &long, 2)).unwrap_err();
    assert!(matches!(err, BenchError::Workload(_)), "{err}");
    engine.shutdown(std::time::Duration::from_secs(5));
}
