//! Storms: the gRPC server (the real SmolLM2-135M on the CPU, on 127.0.0.1) under many
//! concurrent requests that end badly: cancelled at random points, preempted by a tiny KV pool,
//! refused by admission, timed out, failed by the backend. After each storm nothing is leaked
//! (no KV block used, no request running or in flight, as `/metrics` and the engine report it)
//! and the server still serves correct output.
//!
//! Bounded in count and time (the file runs in about a minute on two cores); the random
//! choices come from a seeded RNG whose seed each test prints (`KVSERVE_STORM_SEED=N` replays
//! it). The scaled-down, deterministic versions are in `grpc_server.rs`. RELIABILITY.md
//! ("Storms") says what each storm proves.
#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use engine::EngineConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serve_grpc::pb;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;

/// KV bytes of one block of SmolLM2 in fp16: 16 slots x 30 layers x 3 KV heads x 64 dims x
/// 2 bytes x (K + V).
const BLOCK_BYTES: u64 = 16 * 30 * 3 * 64 * 2 * 2;

/// The storm's RNG: seeded from `KVSERVE_STORM_SEED` or the clock, the seed printed.
fn storm_rng(test: &str) -> StdRng {
    let seed = std::env::var("KVSERVE_STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: seed {seed} (KVSERVE_STORM_SEED={seed} replays it)");
    StdRng::seed_from_u64(seed)
}

/// A labelled or unlabelled sample of `/metrics`, 0 when absent (a label value never seen).
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// `kvserve_requests_total` of one outcome.
fn outcome(text: &str, outcome: &str) -> f64 {
    sample(
        text,
        &format!("kvserve_requests_total{{outcome=\"{outcome}\"}}"),
    )
}

/// A greedy request of exactly `max_tokens` tokens.
fn greedy(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        ignore_eos: true,
        ..text_request(prompt, max_tokens)
    }
}

/// The tokens of one completion of a stream's messages.
fn stream_tokens(messages: &[pb::GenerateStreamResponse]) -> Vec<u32> {
    messages
        .iter()
        .flat_map(|m| m.token_ids.iter().copied())
        .collect()
}

/// The tokens of `req`'s first completion (unary call).
async fn tokens_of(server: &TestServer, req: &pb::GenerateRequest) -> Vec<u32> {
    let mut client = server.client().await;
    let r = client.generate(req.clone()).await.unwrap().into_inner();
    r.completions[0].token_ids.clone()
}

/// Where a stream of the cancel storm is cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelAt {
    /// Dropped as soon as the call is answered, before any token: queued (or prefilling).
    Queued,
    /// Dropped after this many messages, before the last one: mid-decode.
    MidDecode(usize),
    /// Dropped right after the message carrying the finish reason (before the trailers).
    AfterLast,
    /// Aborted by id (`Abort`) after the first token.
    AbortById,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_storm_frees_every_block_and_the_server_still_serves() {
    const STREAMS: usize = 200;
    const MAX_TOKENS: u32 = 6;
    let _serial = timing_sensitive().await;
    let mut rng = storm_rng("cancel storm");
    let mut config = config();
    // Few running at once, so that many streams are still queued when cancelled.
    config.max_num_seqs = 16;
    let server = TestServer::start(config).await;
    let client = server.client().await;
    let probe = greedy("The capital of France is", MAX_TOKENS);
    let want = tokens_of(&server, &probe).await;

    let mut calls = Vec::new();
    for i in 0..STREAMS {
        let at = match rng.random_range(0..4) {
            0 => CancelAt::Queued,
            1 => CancelAt::MidDecode(rng.random_range(1..MAX_TOKENS as usize)),
            2 => CancelAt::AfterLast,
            _ => CancelAt::AbortById,
        };
        let id = format!("storm-{i}");
        let req = pb::GenerateRequest {
            request_id: Some(id.clone()),
            ..greedy(&format!("Storm {i}:"), MAX_TOKENS)
        };
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let mut stream = client.generate_stream(req).await?.into_inner();
            let mut messages = Vec::new();
            match at {
                CancelAt::Queued => {}
                CancelAt::MidDecode(n) => {
                    while messages.len() < n {
                        match stream.message().await? {
                            Some(m) => messages.push(m),
                            None => break,
                        }
                    }
                }
                CancelAt::AfterLast => {
                    while let Some(m) = stream.message().await? {
                        let last = m.finish_reason() != pb::FinishReason::Unspecified;
                        messages.push(m);
                        if last {
                            break;
                        }
                    }
                }
                CancelAt::AbortById => {
                    messages.extend(stream.message().await?);
                    let found = client
                        .abort(pb::AbortRequest { request_id: id })
                        .await?
                        .into_inner()
                        .found;
                    let (rest, end) = drain(stream).await;
                    end?;
                    messages.extend(rest);
                    return Ok::<_, Status>((at, messages, Some(found)));
                }
            }
            drop(stream);
            Ok((at, messages, None))
        }));
    }
    let mut aborted_by_id = 0;
    for (i, call) in calls.into_iter().enumerate() {
        let (at, messages, found) = call
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("stream {i}: {s:?}"));
        let tokens = stream_tokens(&messages).len();
        let finish = messages.last().map(|m| m.finish_reason());
        match at {
            CancelAt::Queued => {}
            CancelAt::MidDecode(n) => assert_eq!(messages.len(), n, "stream {i}"),
            CancelAt::AfterLast => {
                assert_eq!(tokens, MAX_TOKENS as usize, "stream {i}");
                assert_eq!(finish, Some(pb::FinishReason::Length), "stream {i}");
            }
            CancelAt::AbortById => match finish {
                // Aborted while it ran, or it ended before the abort arrived.
                Some(pb::FinishReason::Aborted) => aborted_by_id += 1,
                Some(pb::FinishReason::Length) => assert_eq!(tokens, MAX_TOKENS as usize),
                other => panic!("stream {i} (found: {found:?}) ended {other:?}"),
            },
        }
    }
    assert!(aborted_by_id > 0, "no abort by id landed mid-stream");

    let text = server.wait_idle().await;
    assert_eq!(gauge(&text, "kvserve_kv_blocks_used"), 0.0, "{text}");
    assert_eq!(gauge(&text, "kvserve_num_sequences_running"), 0.0);
    assert_eq!(gauge(&text, "kvserve_num_requests_waiting"), 0.0);
    // Every request was accounted for exactly once (the probe, then the storm).
    let ended: f64 = ["stop", "length", "aborted", "error", "deadline"]
        .iter()
        .map(|o| outcome(&text, o))
        .sum();
    assert_eq!(ended, (STREAMS + 1) as f64, "{text}");
    assert_eq!(outcome(&text, "error"), 0.0, "{text}");
    assert_eq!(tokens_of(&server, &probe).await, want, "after the storm");
    server.wait_idle().await;
    server.stop().await;
}

/// Runs every request at once; each answer's tokens, or its status.
async fn run_all(
    server: &TestServer,
    requests: &[pb::GenerateRequest],
) -> Vec<Result<Vec<u32>, Status>> {
    let client = server.client().await;
    let calls: Vec<_> = requests
        .iter()
        .map(|r| {
            let (mut client, r) = (client.clone(), r.clone());
            tokio::spawn(async move {
                let out = client.generate(r).await?.into_inner();
                Ok(out.completions[0].token_ids.clone())
            })
        })
        .collect();
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_storm_matches_an_unconstrained_run_without_livelock() {
    const REQUESTS: usize = 8;
    const MAX_TOKENS: u32 = 32;
    const POOL_BLOCKS: u64 = 3;
    let _serial = timing_sensitive().await;
    let mut rng = storm_rng("preemption storm");
    let requests: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let topic =
                ["rivers", "engines", "gardens", "stars", "bridges"][rng.random_range(0..5)];
            greedy(&format!("Essay {i}: a few words about {topic}"), MAX_TOKENS)
        })
        .collect();

    // The reference: a pool far bigger than the demand.
    let server = TestServer::start(config()).await;
    let want = run_all(&server, &requests).await;
    server.wait_idle().await;
    server.stop().await;

    // ~10% of the demand: each request needs 3 blocks (a prompt of ~10 tokens + 32), the
    // eight together 24; the pool holds 3, so they run one at a time, preempting each other.
    let mut config = config();
    // Each tensor-parallel rank holds its share of the KV heads in `kv_cache_memory`.
    config.kv_cache_memory = Some(POOL_BLOCKS * BLOCK_BYTES / config.tensor_parallel_size as u64);
    let server = TestServer::start(config).await;
    // One more that can never fit is refused with a reason, at once.
    let mut all = requests.clone();
    all.push(greedy("This one asks for too much", 200));
    let started = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(150), run_all(&server, &all))
        .await
        .unwrap_or_else(|_| panic!("livelock: the storm did not end in 150 s"));
    eprintln!("preemption storm: {:?}", started.elapsed());
    let (refused, got) = got.split_last().unwrap();
    let refused = refused.as_ref().unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("max_tokens"), "{refused:?}");
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        let want = want.as_ref().unwrap();
        assert_eq!(want.len(), MAX_TOKENS as usize);
        assert_eq!(got.as_ref().unwrap(), want, "request {i}");
    }
    let text = server.wait_idle().await;
    assert_eq!(server.engine.stats().kv_blocks_total as u64, POOL_BLOCKS);
    assert!(
        gauge(&text, "kvserve_preemptions_total") > 0.0,
        "no preemption: {text}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_refuses_at_once_while_the_accepted_complete() {
    const ACCEPTED: usize = 4;
    const EXTRA: usize = 24;
    const MAX_TOKENS: u32 = 64;
    let _serial = timing_sensitive().await;
    let mut rng = storm_rng("overload");
    let mut config = config();
    config.max_queued_requests = ACCEPTED;
    let server = TestServer::start(config).await;
    let client = server.client().await;

    let mut accepted = Vec::new();
    for i in 0..ACCEPTED {
        let req = greedy(&format!("Accepted request {i} tells a story:"), MAX_TOKENS);
        let mut stream = client
            .clone()
            .generate_stream(req)
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        accepted.push((first, stream));
    }
    let generating = Instant::now();

    // A burst beyond the limit, unary and streaming mixed: every one refused UNAVAILABLE.
    let refusals: Vec<_> = (0..EXTRA)
        .map(|i| {
            let mut client = client.clone();
            let stream = rng.random_bool(0.5);
            let req = greedy(&format!("Extra request {i}"), MAX_TOKENS);
            tokio::spawn(async move {
                let sent = Instant::now();
                let status = if stream {
                    client.generate_stream(req).await.map(|_| ()).unwrap_err()
                } else {
                    client.generate(req).await.map(|_| ()).unwrap_err()
                };
                (status, sent.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for call in refusals {
        let (status, took) = call.await.unwrap();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("overloaded"), "{status:?}");
        slowest = slowest.max(took);
    }
    // At once: the whole burst was answered while the accepted requests were still generating.
    let stats = server.engine.stats();
    assert_eq!(stats.requests_in_flight, ACCEPTED, "{stats:?}");
    let refused_within = generating.elapsed();

    for (i, (first, stream)) in accepted.into_iter().enumerate() {
        let (mut messages, end) = drain(stream).await;
        end.unwrap();
        messages.insert(0, first);
        assert_eq!(stream_tokens(&messages).len(), MAX_TOKENS as usize, "{i}");
        assert_eq!(
            messages.last().unwrap().finish_reason(),
            pb::FinishReason::Length
        );
    }
    let generation = generating.elapsed();
    eprintln!(
        "overload: slowest refusal {slowest:?}, burst done {refused_within:?}, accepted done {generation:?}"
    );
    // Immediate relative to generation (no absolute times): the burst took a small part of
    // what the accepted requests took to finish.
    assert!(
        refused_within * 4 < generation,
        "refusals took {refused_within:?}, generation {generation:?}"
    );
    let text = server.wait_idle().await;
    assert_eq!(outcome(&text, "overloaded"), EXTRA as f64, "{text}");
    assert_eq!(outcome(&text, "length"), ACCEPTED as f64, "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_storm_ends_every_call_deadline_exceeded_and_frees_the_blocks() {
    const CALLS: usize = 48;
    let _serial = timing_sensitive().await;
    let mut rng = storm_rng("deadline storm");
    let mut config = config();
    // Short steps (chunked prefill): the engine checks deadlines between steps, and one
    // prefill of every prompt at once takes seconds on a loaded two-core machine.
    config.max_num_batched_tokens = 64;
    let server = TestServer::start(config).await;
    let probe = greedy("The capital of France is", 6);
    let want = tokens_of(&server, &probe).await;

    // A bare HTTP/2 client: it sends grpc-timeout without enforcing it, so each call ends
    // with the status the server gives.
    let raw = raw_client(server.addr);
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let mut raw = raw.clone();
            let stream = rng.random_bool(0.5);
            let timeout = Duration::from_millis(rng.random_range(20..1500));
            let mut req = Request::new(pb::GenerateRequest {
                request_id: Some(format!("deadline-{i}")),
                ..long_request(None)
            });
            req.set_timeout(timeout);
            tokio::spawn(async move {
                let end = if stream {
                    match raw.generate_stream(req).await {
                        Ok(s) => drain(s.into_inner()).await.1,
                        Err(status) => Err(status),
                    }
                } else {
                    raw.generate(req).await.map(|_| ())
                };
                (stream, timeout, end)
            })
        })
        .collect();
    for call in calls {
        let (stream, timeout, end) = call.await.unwrap();
        let status = end.unwrap_err();
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "stream: {stream}, timeout {timeout:?}: {status:?}"
        );
    }
    let text = server.wait_idle().await;
    assert_eq!(gauge(&text, "kvserve_kv_blocks_used"), 0.0);
    assert_eq!(outcome(&text, "deadline"), CALLS as f64, "{text}");
    assert_eq!(tokens_of(&server, &probe).await, want, "after the storm");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_forward_fails_only_its_batch_and_the_server_goes_on() {
    const REQUESTS: usize = 10;
    const MAX_TOKENS: u32 = 12;
    let _serial = timing_sensitive().await;
    let mut rng = storm_rng("fault injection");
    let engine_config = EngineConfig {
        // At most 4 sequences per batch: the failing batch leaves others waiting.
        max_num_seqs: 4,
        ..EngineConfig::default()
    };
    let (engine, faults) = faulty_engine(engine_config, 256);
    let server = TestServer::start_engine(engine, Duration::from_secs(5)).await;
    let requests: Vec<_> = (0..REQUESTS)
        .map(|i| greedy(&format!("Fault {i}: the weather today"), MAX_TOKENS))
        .collect();
    let want = run_all(&server, &requests).await;
    server.wait_idle().await;

    // Fail one forward pass a few steps into the storm.
    let nth = faults.forwards.load(Ordering::Acquire) + rng.random_range(1..12);
    faults.fail_forward.store(nth, Ordering::Release);
    let got = run_all(&server, &requests).await;
    let failed_seqs = faults.failed_batch_seqs.load(Ordering::Acquire);
    assert!(failed_seqs > 0, "forward pass {nth} never ran");
    let mut failed = 0;
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        match got {
            Ok(tokens) => assert_eq!(tokens, want.as_ref().unwrap(), "request {i}"),
            Err(status) => {
                assert_eq!(status.code(), Code::Internal, "request {i}: {status:?}");
                failed += 1;
            }
        }
    }
    // Exactly the requests of the failed batch failed, and the others were exact.
    assert_eq!(
        failed, failed_seqs,
        "failed requests vs sequences in the batch"
    );
    assert!(
        failed < REQUESTS,
        "requests outside the failed batch completed"
    );

    let text = server.wait_idle().await;
    assert_eq!(gauge(&text, "kvserve_kv_blocks_used"), 0.0);
    assert_eq!(outcome(&text, "error"), failed as f64, "{text}");
    assert_eq!(server.health().await, ServingStatus::Serving);
    let after = tokens_of(&server, &requests[0]).await;
    assert_eq!(&after, want[0].as_ref().unwrap(), "after the storm");
    server.stop().await;
}
