//! Aborts, cancellation, deadlines, failures, the death of the step loop, shutdown, metrics:
//! every path that ends a request frees its blocks, and health tells whether anything can
//! generate.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use engine::{EngineConfig, EngineError, FinishReason, Health, StreamDelta};

/// A script engine whose forward passes take `delay` (so requests stay running).
fn slow_engine(delay_ms: u64, config: EngineConfig) -> engine::EngineHandle {
    let mut backend = ScriptBackend::new(script(), 64);
    backend.delay = Duration::from_millis(delay_ms);
    script_engine_with(config, backend)
}

fn first_delta(stream: &mut engine::ResponseStream) -> StreamDelta {
    stream.blocking_next().unwrap().unwrap()
}

#[test]
fn abort_by_id_ends_the_stream_and_frees_its_blocks() {
    let engine = slow_engine(2, EngineConfig::default());
    let mut stream = engine.generate(script_request(30, 200)).unwrap();
    let id = stream.request_id().to_owned();
    first_delta(&mut stream);
    assert!(engine.stats().kv_blocks_used > 0);
    assert!(engine.abort(&id));
    let rest: Vec<StreamDelta> = drain(stream).into_iter().map(Result::unwrap).collect();
    let last = rest.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Aborted));
    let usage = last.usage.unwrap();
    assert!(usage.completion_tokens < 200);
    assert_eq!(usage.prompt_tokens, 30);
    wait_idle(&engine);
    assert!(!engine.abort(&id), "a finished request is unknown");
    assert!(!engine.abort("never-seen"));
    assert!(
        engine
            .metrics_text()
            .contains("kvserve_requests_total{outcome=\"aborted\"} 1")
    );
}

#[test]
fn dropping_the_stream_cancels_the_request() {
    let engine = slow_engine(2, EngineConfig::default());
    let mut streams: Vec<_> = (0..4)
        .map(|i| engine.generate(script_request(20 + i, 200)).unwrap())
        .collect();
    for s in &mut streams {
        first_delta(s);
    }
    assert!(engine.stats().kv_blocks_used > 0);
    assert_eq!(engine.stats().requests_in_flight, 4);
    drop(streams);
    wait_idle(&engine);
    // A stream dropped before its first step is cancelled too.
    drop(engine.generate(script_request(5, 200)).unwrap());
    wait_idle(&engine);
}

#[test]
fn an_abandoned_async_stream_is_cancelled() {
    let engine = slow_engine(2, EngineConfig::default());
    let e = engine.clone();
    runtime().block_on(async move {
        let mut stream = e.generate(script_request(10, 200)).unwrap();
        let d = stream.next().await.unwrap().unwrap();
        assert_eq!(d.index, 0);
        // A client that times out drops its stream mid-way.
        let r = tokio::time::timeout(Duration::from_millis(20), stream.collect()).await;
        assert!(r.is_err());
    });
    wait_idle(&engine);
}

#[test]
fn a_deadline_ends_the_request_and_frees_its_blocks() {
    let engine = slow_engine(2, EngineConfig::default());
    let mut r = script_request(10, 1000);
    r.max_tokens = Some(200);
    r.n = 2;
    r.deadline = Some(Instant::now() + Duration::from_millis(60));
    let items = drain(engine.generate(r).unwrap());
    let (last, deltas) = items.split_last().unwrap();
    assert_eq!(last, &Err(EngineError::DeadlineExceeded));
    for index in 0..2 {
        let finals: Vec<_> = deltas
            .iter()
            .map(|d| d.as_ref().unwrap())
            .filter(|d| d.index == index && d.finish_reason.is_some())
            .collect();
        assert_eq!(finals.len(), 1);
        assert_eq!(finals[0].finish_reason, Some(FinishReason::Deadline));
    }
    wait_idle(&engine);
    // collect() reports the deadline.
    let mut r = script_request(10, 200);
    r.deadline = Some(Instant::now() + Duration::from_millis(30));
    assert_eq!(run(&engine, r).err(), Some(EngineError::DeadlineExceeded));
    wait_idle(&engine);
    assert!(
        engine
            .metrics_text()
            .contains("kvserve_requests_total{outcome=\"deadline\"} 2")
    );
}

/// A client (or the service's backstop) that gives up on a request whose deadline passed
/// during a step longer than the deadline: the engine sees an abort, but counts the deadline.
#[test]
fn an_abort_after_the_deadline_during_a_long_step_counts_as_a_deadline() {
    let engine = slow_engine(400, EngineConfig::default());
    let mut r = script_request(10, 200);
    r.deadline = Some(Instant::now() + Duration::from_millis(50));
    let stream = engine.generate(r).unwrap();
    // The first step (400 ms) starts at once; the deadline passes during it.
    std::thread::sleep(Duration::from_millis(100));
    drop(stream);
    // The same drop before the deadline is an abort.
    let mut r = script_request(10, 200);
    r.deadline = Some(Instant::now() + Duration::from_secs(600));
    let stream = engine.generate(r).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(stream);
    wait_idle(&engine);
    let text = engine.metrics_text();
    assert!(
        text.contains("kvserve_requests_total{outcome=\"deadline\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kvserve_requests_total{outcome=\"aborted\"} 1"),
        "{text}"
    );
}

#[test]
fn a_failed_forward_fails_only_its_batch_and_the_engine_goes_on() {
    let poison = 1111;
    let mut backend = ScriptBackend::new(script(), 64);
    backend.fault.fail_on = Some(poison);
    let engine = script_engine_with(EngineConfig::default(), backend);
    let mut r = script_request(10, 20);
    if let engine::Prompt::TokenIds(ids) = &mut r.prompt {
        ids.push(poison);
    }
    let items = drain(engine.generate(r).unwrap());
    let (last, deltas) = items.split_last().unwrap();
    match last {
        Err(EngineError::Internal(msg)) => assert!(msg.contains("injected failure"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        deltas.last().unwrap().as_ref().unwrap().finish_reason,
        Some(FinishReason::Error)
    );
    assert_eq!(engine.health(), Health::Serving);
    wait_idle(&engine);
    let out = run(&engine, script_request(10, 20)).unwrap();
    assert_eq!(out.completions[0].token_ids, script_continuation(10, 20));
    assert!(
        engine
            .metrics_text()
            .contains("kvserve_requests_total{outcome=\"error\"} 1")
    );
}

#[test]
fn a_dead_step_loop_turns_health_not_serving_and_fails_requests() {
    let bomb = 1112;
    let mut backend = ScriptBackend::new(script(), 64);
    backend.fault.panic_on = Some(bomb);
    backend.delay = Duration::from_millis(1);
    let engine = script_engine_with(EngineConfig::default(), backend);
    assert_eq!(engine.health(), Health::Serving);
    let bystander = engine.generate(script_request(10, 200)).unwrap();
    let mut r = script_request(10, 20);
    if let engine::Prompt::TokenIds(ids) = &mut r.prompt {
        ids.push(bomb);
    }
    let victim = engine.generate(r).unwrap();
    for stream in [victim, bystander] {
        let items = drain(stream);
        match items.last().unwrap() {
            Err(EngineError::Internal(msg)) => assert!(msg.contains("injected panic"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(engine.health(), Health::NotServing);
    match engine.generate(script_request(3, 3)) {
        Err(EngineError::Unavailable(msg)) => assert!(msg.contains("died"), "{msg}"),
        other => panic!("{other:?}"),
    }
    // The dead loop's requests are released as it unwinds, maybe just after the streams end.
    wait_until("no request in flight", || {
        engine.stats().requests_in_flight == 0
    });
    assert!(!engine.metrics_text().is_empty());
    engine.shutdown(Duration::from_secs(1));
}

#[test]
fn shutdown_drains_running_requests_then_refuses_new_ones() {
    let engine = slow_engine(1, EngineConfig::default());
    let streams: Vec<_> = (0..3)
        .map(|i| engine.generate(script_request(5 + i, 30)).unwrap())
        .collect();
    let e = engine.clone();
    let stopper = std::thread::spawn(move || e.shutdown(Duration::from_secs(30)));
    let rt = runtime();
    for (i, s) in streams.into_iter().enumerate() {
        let out = rt.block_on(s.collect()).unwrap();
        assert_eq!(out.completions[0].token_ids, script_continuation(5 + i, 30));
        assert_eq!(out.completions[0].finish_reason, FinishReason::Length);
    }
    stopper.join().unwrap();
    assert_eq!(engine.health(), Health::NotServing);
    assert!(matches!(
        engine.generate(script_request(3, 3)),
        Err(EngineError::Unavailable(_))
    ));
    // Idempotent.
    engine.shutdown(Duration::from_secs(1));
    engine.clone().shutdown(Duration::ZERO);
}

#[test]
fn shutdown_aborts_what_does_not_finish_in_time() {
    let engine = slow_engine(2, EngineConfig::default());
    let mut stream = engine.generate(script_request(5, 250)).unwrap();
    first_delta(&mut stream);
    engine.shutdown(Duration::from_millis(30));
    let items = drain(stream);
    let (last, deltas) = items.split_last().unwrap();
    let generated: usize = deltas
        .iter()
        .map(|d| d.as_ref().unwrap().token_ids.len())
        .sum();
    assert!(generated < 249, "the request ran to its end");
    assert!(matches!(last, Err(EngineError::Unavailable(_))), "{last:?}");
    assert_eq!(
        deltas.last().unwrap().as_ref().unwrap().finish_reason,
        Some(FinishReason::Aborted)
    );
    assert_eq!(engine.health(), Health::NotServing);
    assert_eq!(engine.stats().requests_in_flight, 0);
}

#[test]
fn metrics_cover_requests_latency_queues_kv_and_tokens() {
    let engine = script_engine(EngineConfig::default());
    for _ in 0..3 {
        run(&engine, script_request(20, 8)).unwrap();
    }
    wait_idle(&engine);
    let text = engine.metrics_text();
    for family in [
        "kvserve_requests_total",
        "kvserve_time_to_first_token_seconds",
        "kvserve_inter_token_latency_seconds",
        "kvserve_e2e_request_latency_seconds",
        "kvserve_num_requests_waiting",
        "kvserve_num_sequences_running",
        "kvserve_kv_blocks_used",
        "kvserve_kv_blocks_free",
        "kvserve_kv_cache_usage_ratio",
        "kvserve_prefix_cache_queries_total",
        "kvserve_prefix_cache_hits_total",
        "kvserve_preemptions_total",
        "kvserve_spec_decode_proposed_tokens_total",
        "kvserve_spec_decode_accepted_tokens_total",
        "kvserve_prompt_tokens_total",
        "kvserve_generation_tokens_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
    }
    assert!(
        text.contains("kvserve_requests_total{outcome=\"length\"} 3"),
        "{text}"
    );
    assert!(text.contains("kvserve_prompt_tokens_total 60"), "{text}");
    assert!(
        text.contains("kvserve_generation_tokens_total 24"),
        "{text}"
    );
    assert!(
        text.contains("kvserve_time_to_first_token_seconds_count 3"),
        "{text}"
    );
    assert!(
        text.contains("kvserve_e2e_request_latency_seconds_count 3"),
        "{text}"
    );
    assert!(
        text.contains("kvserve_inter_token_latency_seconds_count 21"),
        "{text}"
    );
    assert!(text.contains("kvserve_kv_blocks_used 0"), "{text}");
    // The same 20-token prompt three times: the second and third hit its first block.
    assert!(
        text.contains("kvserve_prefix_cache_hits_total 32"),
        "{text}"
    );
    // `promtool check metrics` when it is installed (Debian package `prometheus`).
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
