//! End-to-end tests of the gRPC server: the real SmolLM2-135M on the CPU behind
//! `serve_grpc::serve` on 127.0.0.1 (ephemeral ports), called with a real tonic client.
//!
//! Covers Generate, GenerateStream, n > 1, stop strings, seeds, Tokenize, GetModelInfo,
//! health, reflection, every request error the API promises, admission limits, cancellation,
//! abort by id and deadlines freeing KV blocks (checked through `/metrics`), a dying step
//! loop, graceful shutdown, 64 concurrent streams, and the Python grpcio client
//! (`scripts/grpc_client.py`) when python3 with grpcio is available. `KVSERVE_TEST_DEVICE=cuda`
//! serves on the GPU, `KVSERVE_TEST_TP=N` over N tensor-parallel ranks.
#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use engine::{Device, Engine, EngineConfig};
use serve_grpc::pb;
use serve_grpc::pb::generation_client::GenerationClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

// ---------------------------------------------------------------------------------------
// Harness (the shared part is in `common`)
// ---------------------------------------------------------------------------------------

/// Asserts `INVALID_ARGUMENT` whose message names `field`.
fn assert_invalid(result: Result<impl std::fmt::Debug, Status>, field: &str, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    assert!(
        status.message().contains(&format!("invalid {field}:"))
            || status.message().contains(&format!("invalid {field} ")),
        "{what}: the message should name `{field}`: {:?}",
        status.message()
    );
}

// ---------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_stream_and_tokenize_agree() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;
    let prompt = "The capital of France is";

    let mut req = text_request(prompt, 12);
    req.request_id = Some("unary-1".into());
    let unary = client.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(unary.request_id, "unary-1");
    assert_eq!(unary.completions.len(), 1);
    let c = &unary.completions[0];
    assert_eq!(c.index, 0);
    assert!(!c.text.is_empty());
    assert!(c.text.contains("Paris"), "{:?}", c.text);
    assert!((1..=12).contains(&c.token_ids.len()));
    assert!(matches!(
        c.finish_reason(),
        pb::FinishReason::Length | pb::FinishReason::Stop
    ));
    let usage = unary.usage.unwrap();
    assert_eq!(usage.completion_tokens as usize, c.token_ids.len());

    // Tokenize gives the prompt Generate used.
    let ids = client
        .tokenize(pb::TokenizeRequest {
            text: Some(prompt.into()),
            messages: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    assert_eq!(ids.len(), usage.prompt_tokens as usize);

    // The stream carries the same greedy output, as deltas.
    req.request_id = Some("stream-1".into());
    let stream = client.generate_stream(req).await.unwrap().into_inner();
    let (messages, end) = drain(stream).await;
    end.unwrap();
    assert!(messages.len() >= 2, "deltas, not one blob: {messages:?}");
    assert!(messages.iter().all(|m| m.request_id == "stream-1"));
    let text: String = messages.iter().map(|m| m.text.as_str()).collect();
    let tokens: Vec<u32> = messages
        .iter()
        .flat_map(|m| m.token_ids.iter().copied())
        .collect();
    assert_eq!(text, c.text);
    assert_eq!(tokens, c.token_ids);
    let last = messages.last().unwrap();
    assert_eq!(last.finish_reason(), c.finish_reason());
    assert!(last.usage.is_some(), "usage on the final message");
    let finished = messages
        .iter()
        .filter(|m| m.finish_reason() != pb::FinishReason::Unspecified)
        .count();
    assert_eq!(finished, 1, "one finish_reason per completion");

    // The same prompt as token ids generates the same text.
    let by_ids = pb::GenerateRequest {
        token_ids: ids,
        max_tokens: Some(12),
        ..Default::default()
    };
    let r = client.generate(by_ids).await.unwrap().into_inner();
    assert_eq!(r.completions[0].token_ids, c.token_ids);

    // The second run of the prompt found its full blocks in the prefix cache.
    assert!(r.usage.unwrap().cached_prompt_tokens <= usage.prompt_tokens);

    // Chat messages are rendered with the template; Tokenize agrees with Generate.
    let messages = vec![pb::ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let chat = pb::GenerateRequest {
        messages: messages.clone(),
        max_tokens: Some(8),
        ..Default::default()
    };
    let r = client.generate(chat).await.unwrap().into_inner();
    let chat_ids = client
        .tokenize(pb::TokenizeRequest {
            text: None,
            messages,
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    assert_eq!(chat_ids.len(), r.usage.unwrap().prompt_tokens as usize);
    assert!(chat_ids.len() > ids_len_of_user_text(&mut client).await);

    server.wait_idle().await;
    server.stop().await;
}

async fn ids_len_of_user_text(client: &mut GenerationClient<Channel>) -> usize {
    client
        .tokenize(pb::TokenizeRequest {
            text: Some("What is the capital of France?".into()),
            messages: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_samples_seeds_stop_strings_and_logprobs() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;

    // n = 2 sampled completions, reproducible with a seed, in unary and stream form.
    let req = pb::GenerateRequest {
        n: 2,
        sampling: sampled(1.0, 42),
        ignore_eos: true,
        ..text_request("My favourite animal is", 10)
    };
    let a = client.generate(req.clone()).await.unwrap().into_inner();
    let b = client.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(a.completions.len(), 2);
    assert_eq!(
        a.completions.iter().map(|c| c.index).collect::<Vec<_>>(),
        [0, 1]
    );
    for (x, y) in a.completions.iter().zip(&b.completions) {
        assert_eq!(x.token_ids, y.token_ids, "same seed, same tokens");
        assert_eq!(x.text, y.text);
        assert_eq!(x.token_ids.len(), 10);
        assert_eq!(x.finish_reason(), pb::FinishReason::Length);
    }
    assert_eq!(a.usage.unwrap().completion_tokens, 20);
    let (messages, end) = drain(client.generate_stream(req).await.unwrap().into_inner()).await;
    end.unwrap();
    for c in &a.completions {
        let ids: Vec<u32> = messages
            .iter()
            .filter(|m| m.index == c.index)
            .flat_map(|m| m.token_ids.iter().copied())
            .collect();
        assert_eq!(ids, c.token_ids, "stream of completion {}", c.index);
    }
    assert_eq!(
        messages
            .iter()
            .filter(|m| m.finish_reason() != pb::FinishReason::Unspecified)
            .count(),
        2
    );
    assert!(messages.last().unwrap().usage.is_some());

    // n = 0 means 1.
    let one = pb::GenerateRequest {
        n: 0,
        ..text_request("Hello", 3)
    };
    let r = client.generate(one).await.unwrap().into_inner();
    assert_eq!(r.completions.len(), 1);

    // Stop strings: the greedy text up to the first occurrence, without it.
    let base = pb::GenerateRequest {
        ignore_eos: true,
        ..text_request("The capital of France is", 24)
    };
    let full = client.generate(base.clone()).await.unwrap().into_inner();
    let full_text = full.completions[0].text.clone();
    let chars: Vec<char> = full_text.chars().collect();
    assert!(chars.len() > 12, "{full_text:?}");
    let stop: String = chars[6..9].iter().collect();
    let expected = &full_text[..full_text.find(&stop).unwrap()];
    let stopped = client
        .generate(pb::GenerateRequest {
            stop: vec![stop.clone(), "never appears ###".into()],
            ..base.clone()
        })
        .await
        .unwrap()
        .into_inner();
    let c = &stopped.completions[0];
    assert_eq!(c.text, expected, "stop {stop:?} in {full_text:?}");
    assert_eq!(c.finish_reason(), pb::FinishReason::Stop);
    // And through the stream, the stop string never reaches the client.
    let (messages, end) = drain(
        client
            .generate_stream(pb::GenerateRequest {
                stop: vec![stop.clone()],
                ..base.clone()
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    end.unwrap();
    let text: String = messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(text, expected);

    // Stop token ids: stop at the greedy output's third token.
    let third = full.completions[0].token_ids[2];
    let r = client
        .generate(pb::GenerateRequest {
            stop_token_ids: vec![third],
            ..base.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.completions[0].finish_reason(), pb::FinishReason::Stop);
    assert!(r.completions[0].token_ids.len() <= 3);

    // Log-probabilities: one entry per token, top-N sorted, the greedy token first.
    let r = client
        .generate(pb::GenerateRequest {
            logprobs: 3,
            ..text_request("The capital of France is", 4)
        })
        .await
        .unwrap()
        .into_inner();
    let c = &r.completions[0];
    assert_eq!(c.logprobs.len(), c.token_ids.len());
    for (lp, &id) in c.logprobs.iter().zip(&c.token_ids) {
        assert_eq!(lp.token_id, id);
        assert!(lp.logprob <= 0.0 && lp.logprob.is_finite());
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].token_id, id, "greedy picks the top token");
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
    }

    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_info_health_and_reflection() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;

    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.model.contains("SmolLM2"), "{info:?}");
    assert_eq!(info.vocab_size, 49152);
    assert_eq!(info.max_model_len as usize, MAX_MODEL_LEN);
    assert_eq!(info.block_size, 16);
    assert_eq!(info.kv_cache_dtype, "fp16");
    match test_device() {
        Device::Cuda => assert!(info.device.starts_with("cuda"), "{info:?}"),
        _ => assert_eq!(info.device, "cpu"),
    }
    assert!(info.num_blocks > 0);

    // Health: overall and per service; unknown services are NOT_FOUND.
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "kvserve.v1.Generation"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let err = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first: HealthCheckResponse = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    drop(watch);

    // Reflection v1 and v1alpha list the services and serve the kvserve.v1 descriptors.
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
        let mut reflection = ServerReflectionClient::new(server.channel().await);
        let ask = |m: MessageRequest| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        };
        let requests = vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "kvserve.v1.Generation".into(),
            )),
        ];
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let list: ServerReflectionResponse = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = list.message_response else {
            panic!("{list:?}")
        };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        for expected in [
            "kvserve.v1.Generation",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(names.contains(&expected), "{names:?}");
        }
        let file = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = file.message_response else {
            panic!("{file:?}")
        };
        let protos: Vec<prost_types::FileDescriptorProto> = files
            .file_descriptor_proto
            .iter()
            .map(|b| prost::Message::decode(b.as_slice()).unwrap())
            .collect();
        let kvserve = protos
            .iter()
            .find(|p| p.name() == "kvserve/v1/kvserve.proto")
            .unwrap();
        assert_eq!(kvserve.package(), "kvserve.v1");
        let methods: Vec<&str> = kvserve.service[0].method.iter().map(|m| m.name()).collect();
        assert_eq!(
            methods,
            [
                "Generate",
                "GenerateStream",
                "Tokenize",
                "Abort",
                "GetModelInfo"
            ]
        );
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut reflection = ServerReflectionClient::new(server.channel().await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let list = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = list.message_response else {
            panic!("{list:?}")
        };
        assert!(
            list.service
                .iter()
                .any(|s| s.name == "kvserve.v1.Generation")
        );
    }

    // An unknown method is UNIMPLEMENTED, not a crash.
    let mut raw = tonic::client::Grpc::new(server.channel().await);
    raw.ready().await.unwrap();
    let err = raw
        .unary::<pb::GetModelInfoRequest, pb::ModelInfo, _>(
            Request::new(pb::GetModelInfoRequest {}),
            "/kvserve.v1.Generation/NoSuchMethod".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    // The metrics endpoint serves the engine's kvserve_* metrics; other paths are 404.
    let text = server.metrics_text().await;
    assert!(
        text.contains("# TYPE kvserve_kv_blocks_used gauge"),
        "{text}"
    );
    assert!(text.contains("kvserve_num_requests_waiting 0"), "{text}");
    let (status, _, _) = http_get(server.metrics_addr, "/nope").await;
    assert_eq!(status, 404);

    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Every bad request of the API, each on Generate and GenerateStream: INVALID_ARGUMENT naming
/// the field, nothing queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_is_invalid_argument_naming_the_field() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;
    let ok = || text_request("Hello", 4);
    let with_sampling = |f: &dyn Fn(&mut pb::SamplingParams)| {
        let mut s = pb::SamplingParams::default();
        f(&mut s);
        pb::GenerateRequest {
            sampling: Some(s),
            ..ok()
        }
    };
    let long_prompt: Vec<u32> = (0..MAX_MODEL_LEN as u32).map(|i| 100 + i % 1000).collect();

    let mut cases: Vec<(&str, &str, pb::GenerateRequest)> = vec![
        ("no input", "input", pb::GenerateRequest::default()),
        (
            "text and token_ids",
            "input",
            pb::GenerateRequest {
                token_ids: vec![1, 2],
                ..ok()
            },
        ),
        (
            "text and messages",
            "input",
            pb::GenerateRequest {
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: "x".into(),
                }],
                ..ok()
            },
        ),
        ("empty text", "text", text_request("", 4)),
        (
            "prompt reaching max_model_len",
            "prompt",
            pb::GenerateRequest {
                token_ids: long_prompt,
                max_tokens: None,
                ..Default::default()
            },
        ),
        (
            "prompt + max_tokens over max_model_len",
            "max_tokens",
            text_request("Hello", MAX_MODEL_LEN as u32),
        ),
        (
            "max_tokens u32::MAX",
            "max_tokens",
            text_request("Hello", u32::MAX),
        ),
        (
            "explicit max_tokens 0",
            "max_tokens",
            text_request("Hello", 0),
        ),
        (
            "n above the limit",
            "n",
            pb::GenerateRequest { n: 17, ..ok() },
        ),
        (
            "n u32::MAX",
            "n",
            pb::GenerateRequest {
                n: u32::MAX,
                ..ok()
            },
        ),
        (
            "too many stop strings",
            "stop",
            pb::GenerateRequest {
                stop: (0..17).map(|i| format!("s{i}")).collect(),
                ..ok()
            },
        ),
        (
            "an empty stop string",
            "stop",
            pb::GenerateRequest {
                stop: vec!["fine".into(), String::new()],
                ..ok()
            },
        ),
        (
            "prompt token id >= vocab",
            "token_ids",
            pb::GenerateRequest {
                token_ids: vec![1, 49152],
                ..Default::default()
            },
        ),
        (
            "prompt token id u32::MAX",
            "token_ids",
            pb::GenerateRequest {
                token_ids: vec![u32::MAX],
                ..Default::default()
            },
        ),
        (
            "stop token id >= vocab",
            "stop_token_ids",
            pb::GenerateRequest {
                stop_token_ids: vec![49152],
                ..ok()
            },
        ),
        (
            "unknown chat role",
            "messages.role",
            pb::GenerateRequest {
                messages: vec![pb::ChatMessage {
                    role: "wizard".into(),
                    content: "hi".into(),
                }],
                max_tokens: Some(4),
                ..Default::default()
            },
        ),
        (
            "too many logprobs",
            "logprobs",
            pb::GenerateRequest {
                logprobs: 21,
                ..ok()
            },
        ),
        (
            "request id too long",
            "request_id",
            pb::GenerateRequest {
                request_id: Some("x".repeat(257)),
                ..ok()
            },
        ),
    ];
    let temperature = "sampling.temperature";
    for t in [-0.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        cases.push((
            "bad temperature",
            temperature,
            with_sampling(&|s| s.temperature = t),
        ));
    }
    for p in [0.0, -0.1, 1.01, f32::NAN, f32::INFINITY] {
        cases.push((
            "top_p outside (0, 1]",
            "sampling.top_p",
            with_sampling(&|s| s.top_p = Some(p)),
        ));
    }
    for p in [-0.01, 1.01, f32::NAN] {
        cases.push((
            "min_p outside [0, 1]",
            "sampling.min_p",
            with_sampling(&|s| s.min_p = p),
        ));
    }
    for p in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        cases.push((
            "repetition_penalty <= 0 or not finite",
            "sampling.repetition_penalty",
            with_sampling(&|s| s.repetition_penalty = Some(p)),
        ));
    }

    for (what, field, request) in cases {
        assert_invalid(client.generate(request.clone()).await, field, what);
        let stream = client.generate_stream(request).await;
        assert_invalid(stream.map(|_| ()), field, what);
    }

    // Tokenize and Abort validate too.
    assert_invalid(
        client.tokenize(pb::TokenizeRequest::default()).await,
        "input",
        "tokenize without input",
    );
    assert_invalid(
        client
            .tokenize(pb::TokenizeRequest {
                text: Some("a".into()),
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: "b".into(),
                }],
            })
            .await,
        "input",
        "tokenize with text and messages",
    );
    assert_invalid(
        client
            .tokenize(pb::TokenizeRequest {
                text: Some(String::new()),
                messages: vec![],
            })
            .await,
        "text",
        "tokenize an empty text",
    );
    assert_invalid(
        client
            .tokenize(pb::TokenizeRequest {
                text: None,
                messages: vec![pb::ChatMessage {
                    role: "robot".into(),
                    content: "b".into(),
                }],
            })
            .await,
        "messages.role",
        "tokenize an unknown role",
    );
    assert_invalid(
        client.abort(pb::AbortRequest::default()).await,
        "request_id",
        "abort without an id",
    );
    let r = client
        .abort(pb::AbortRequest {
            request_id: "nobody".into(),
        })
        .await
        .unwrap();
    assert!(!r.into_inner().found);

    // Odd but valid text is fine: control characters, invalid-looking escapes, emoji.
    let odd = client
        .generate(text_request("\u{0}\u{1b}[31m🦀 \u{202e}", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(odd.completions.len(), 1);

    // A malformed grpc-timeout header is ignored, not fatal.
    let mut req = Request::new(text_request("Hello", 2));
    req.metadata_mut()
        .insert("grpc-timeout", "soon".parse().unwrap());
    client.generate(req).await.unwrap();

    // Nothing was queued or leaked, and the server still serves.
    let text = server.wait_idle().await;
    assert!(text.contains("kvserve_requests_total"), "{text}");
    client.generate(ok()).await.unwrap();
    server.stop().await;
}

/// A KV pool smaller than `max_model_len`: the engine caps `max_model_len` to what the pool
/// holds, so a request that could never fit is refused at once instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_can_never_fit_the_pool_is_refused_at_once() {
    let mut config = config();
    config.max_model_len = Some(2048);
    // 8 blocks of 16 slots (SmolLM2: 30 layers x 3 KV heads x 64 dims x fp16 x K+V).
    config.kv_cache_memory = Some(8 * 16 * 30 * 3 * 64 * 2 * 2);
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.num_blocks, 8);
    assert!(info.max_model_len <= 8 * 16 + 1, "{info:?}");

    let too_big = text_request("Hello", 1000);
    assert_invalid(
        client.generate(too_big.clone()).await,
        "max_tokens",
        "unary",
    );
    assert_invalid(
        client.generate_stream(too_big).await.map(|_| ()),
        "max_tokens",
        "stream",
    );
    // What fits still runs.
    let r = client
        .generate(text_request("Hello", 8))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.completions[0].token_ids.is_empty());

    // The bench driver: a workload that cannot fit is an error, one that fits is measured.
    let workload = |input_len, output_len| serve_grpc::bench::Workload {
        kind: serve_grpc::bench::WorkloadKind::Fixed {
            input_len,
            output_len,
        },
        num_requests: 3,
        seed: 1,
    };
    let err = serve_grpc::bench::run(&server.engine, &workload(32, 1000))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            serve_grpc::bench::BenchError::Workload(serve_grpc::bench::WorkloadError::TooLong {
                index: 0,
                ..
            })
        ),
        "{err:?}"
    );
    let report = serve_grpc::bench::run(&server.engine, &workload(16, 4))
        .await
        .unwrap();
    assert_eq!(report.stats.output_tokens, 12);
    assert_eq!(report.stats.prompt_tokens, 48);
    assert_eq!(report.stats.ttft.count, 3);
    assert!(report.to_string().contains("| output tokens/s"));

    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_is_bounded_and_ids_are_unique() {
    let mut config = config();
    config.max_queued_requests = 2;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;

    let mut a = client
        .generate_stream(long_request(Some("dup")))
        .await
        .unwrap()
        .into_inner();
    a.message().await.unwrap().unwrap();
    // A live id cannot be reused.
    let err = client
        .generate(long_request(Some("dup")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let mut b = client
        .generate_stream(long_request(None))
        .await
        .unwrap()
        .into_inner();
    b.message().await.unwrap().unwrap();
    // Full: refused at once, on both calls.
    let err = client.generate(text_request("Hi", 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = client
        .generate_stream(text_request("Hi", 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Cancelling both frees the slots and the blocks.
    drop(a);
    drop(b);
    server.wait_idle().await;
    client.generate(text_request("Hi", 2)).await.unwrap();
    // The id is free again once its request ended.
    client.generate(text_request("Hi", 2)).await.unwrap();
    let mut again = text_request("Hi", 2);
    again.request_id = Some("dup".into());
    client.generate(again).await.unwrap();
    server.wait_idle().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Cancellation, abort, deadlines
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_abort_and_deadline_free_the_blocks() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;

    // Client cancel mid-stream: the request is aborted and its blocks freed.
    let mut stream = client
        .generate_stream(long_request(None))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let text = server.metrics_text().await;
    assert!(gauge(&text, "kvserve_kv_blocks_used") > 0.0, "{text}");
    drop(stream);
    let text = server.wait_idle().await;
    assert!(
        text.contains("kvserve_requests_total{outcome=\"aborted\"}")
            || text.contains("kvserve_requests_total{outcome=\"cancelled\"}"),
        "{text}"
    );

    // A unary call cancelled by the client (its future dropped) is aborted as well.
    let mut unary_client = client.clone();
    let call = tokio::spawn(async move { unary_client.generate(long_request(None)).await });
    loop {
        let text = server.metrics_text().await;
        if gauge(&text, "kvserve_kv_blocks_used") > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    call.abort();
    server.wait_idle().await;

    // Abort by id: the stream ends with ABORTED, the blocks are freed, the id is free.
    let stream = client
        .generate_stream(long_request(Some("victim")))
        .await
        .unwrap()
        .into_inner();
    let mut stream = stream;
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.request_id, "victim");
    let found = client
        .abort(pb::AbortRequest {
            request_id: "victim".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .found;
    assert!(found);
    let (messages, end) = drain(stream).await;
    end.unwrap();
    let last = messages.last().unwrap();
    assert_eq!(last.finish_reason(), pb::FinishReason::Aborted);
    server.wait_idle().await;
    let found = client
        .abort(pb::AbortRequest {
            request_id: "victim".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .found;
    assert!(!found, "an ended request is not found");

    // Abort a unary call by id: it answers with what it had, finish ABORTED.
    let mut unary_client = client.clone();
    let call = tokio::spawn(async move {
        unary_client
            .generate(long_request(Some("unary-victim")))
            .await
    });
    loop {
        let found = client
            .abort(pb::AbortRequest {
                request_id: "unary-victim".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .found;
        if found {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = call.await.unwrap().unwrap().into_inner();
    assert_eq!(r.completions[0].finish_reason(), pb::FinishReason::Aborted);
    server.wait_idle().await;

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_calls_and_free_the_blocks() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;

    // A deadline on a stream: it ends DEADLINE_EXCEEDED after some tokens, blocks freed.
    let mut req = Request::new(long_request(None));
    req.set_timeout(Duration::from_millis(1500));
    let stream = client.generate_stream(req).await.unwrap().into_inner();
    let (_, end) = drain(stream).await;
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let text = server.wait_idle().await;
    assert!(
        text.contains("kvserve_requests_total{outcome=\"deadline\"}"),
        "{text}"
    );

    // A unary call past its deadline: the server answers DEADLINE_EXCEEDED. (tonic's Channel
    // enforces the deadline it sends and reports CANCELLED itself first, so this call goes
    // over a bare hyper connection, which only sends it.)
    let mut raw = raw_client(server.addr);
    let mut req = Request::new(long_request(None));
    req.set_timeout(Duration::from_millis(1500));
    let status = raw.generate(req).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    server.wait_idle().await;

    // A tonic client gives up at its own deadline and resets the call (CANCELLED) just as the
    // server's deadline expires: the cancel and the expiry race in the engine. Either way the
    // request ends, its blocks are freed, and the server keeps serving.
    for _ in 0..3 {
        let mut req = Request::new(long_request(None));
        req.set_timeout(Duration::from_millis(700));
        let status = client.generate(req).await.unwrap_err();
        assert!(
            matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
            "{status:?}"
        );
        server.wait_idle().await;
        client.generate(text_request("Hello", 2)).await.unwrap();
    }

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_streams_complete_and_leak_nothing() {
    let _serial = timing_sensitive().await;
    let server = TestServer::start(config()).await;
    let client = server.client().await;
    let mut calls = Vec::new();
    for i in 0..64u32 {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let req = pb::GenerateRequest {
                request_id: Some(format!("c{i}")),
                sampling: sampled(0.8, u64::from(i)),
                ignore_eos: true,
                ..text_request(&format!("Request number {i} says"), 8)
            };
            let stream = client.generate_stream(req).await?.into_inner();
            Ok::<_, Status>(drain(stream).await)
        }));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let (messages, end) = call.await.unwrap().unwrap();
        end.unwrap();
        let tokens: usize = messages.iter().map(|m| m.token_ids.len()).sum();
        assert_eq!(tokens, 8, "stream {i}");
        let last = messages.last().unwrap();
        assert_eq!(last.finish_reason(), pb::FinishReason::Length, "stream {i}");
        assert_eq!(last.usage.unwrap().completion_tokens, 8);
        assert!(messages.iter().all(|m| m.request_id == format!("c{i}")));
    }
    let text = server.wait_idle().await;
    assert_eq!(gauge(&text, "kvserve_kv_blocks_used"), 0.0);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Engine failure and shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_step_loop_is_not_serving_and_fails_requests_internal() {
    let (engine, faults) = faulty_engine(EngineConfig::default(), 64);
    let server = TestServer::start_engine(engine, Duration::from_secs(5)).await;
    let mut client = server.client().await;
    client.generate(text_request("Hello", 2)).await.unwrap();
    assert_eq!(server.health().await, ServingStatus::Serving);

    faults.panic.store(true, Ordering::Release);
    let stream = client
        .generate_stream(text_request("Hello", 4))
        .await
        .unwrap()
        .into_inner();
    let (_, end) = drain(stream).await;
    assert_eq!(end.unwrap_err().code(), Code::Internal);
    let err = client.generate(text_request("Hello", 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    let err = client
        .generate_stream(text_request("Hello", 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(server.health().await, ServingStatus::NotServing);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_admitting_drains_and_stops() {
    let _serial = timing_sensitive().await;
    let engine = Engine::start(config()).unwrap();
    let mut server = TestServer::start_engine(engine, Duration::from_secs(2)).await;
    let mut client = server.client().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    // A stream longer than the drain allows, and a short one that finishes within it.
    let mut long = client
        .generate_stream(long_request(None))
        .await
        .unwrap()
        .into_inner();
    long.message().await.unwrap().unwrap();
    let mut short = client
        .generate_stream(text_request("Hello", 6))
        .await
        .unwrap()
        .into_inner();
    // The short stream is running (admitted, prefilled) before the drain starts.
    let first = short.message().await.unwrap().unwrap();

    server.begin_shutdown();
    // Health turns NOT_SERVING (watchers are told, then the watch ends) ...
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    assert!(matches!(watch.message().await, Ok(None)));
    assert_eq!(
        health
            .check(HealthCheckRequest {
                service: String::new()
            })
            .await
            .unwrap()
            .into_inner()
            .status(),
        ServingStatus::NotServing
    );
    // ... new requests are refused while the open ones drain ...
    let err = client.generate(text_request("Hi", 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // ... the short stream completes, the long one is ended at the drain timeout.
    let (messages, end) = drain(short).await;
    end.unwrap();
    assert!(messages.last().unwrap_or(&first).usage.is_some());
    let (_, end) = drain(long).await;
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// A second, independent client: Python grpcio
// ---------------------------------------------------------------------------------------

fn python_with_grpcio() -> Option<&'static str> {
    let ok = std::process::Command::new("python3")
        .args([
            "-c",
            "import grpc, google.protobuf, grpc_reflection.v1alpha.proto_reflection_descriptor_database",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some("python3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client() {
    let Some(python) = python_with_grpcio() else {
        println!(
            "SKIPPED python_grpcio_client: python3 with grpcio, grpcio-reflection and protobuf \
             is not available (pip install grpcio grpcio-reflection protobuf)"
        );
        return;
    };
    let server = TestServer::start(config()).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/grpc_client.py");
    let output = tokio::process::Command::new(python)
        .arg(&script)
        .arg("--addr")
        .arg(server.addr.to_string())
        .arg("--check")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("python client: all checks passed"),
        "{stdout}"
    );
    server.wait_idle().await;
    server.stop().await;
}
