//! The `kvserve` binary as a process: `serve` drains and exits 0 on SIGTERM, `generate`
//! streams a completion, `bench` prints its table, and bad flags or a bad model fail cleanly.
#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serve_grpc::pb;
use serve_grpc::pb::generation_client::GenerationClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const KVSERVE: &str = env!("CARGO_BIN_EXE_kvserve");

fn model_path() -> PathBuf {
    model::fetch::ensure_default_model(&model::fetch::default_models_dir()).unwrap()
}

fn kvserve(args: &[&str]) -> Command {
    let mut cmd = Command::new(KVSERVE);
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Reads the server's log until a line containing `marker`; returns the line's last word.
async fn wait_for_log(
    lines: &mut tokio::io::Lines<BufReader<ChildStderr>>,
    marker: &str,
) -> String {
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            eprintln!("kvserve: {line}");
            if line.contains(marker) {
                return line.split_whitespace().last().unwrap().to_owned();
            }
        }
        panic!("kvserve exited before logging {marker:?}");
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .unwrap()
}

async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("kvserve exits")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_refuses_new_requests_and_exits_zero() {
    let model = model_path();
    let mut child = kvserve(&[
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--max-model-len",
        "512",
        "--kv-cache-memory",
        "32MiB",
        "--shutdown-timeout",
        "3s",
    ])
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = wait_for_log(&mut lines, "listening on").await;
    let metrics = wait_for_log(&mut lines, "metrics on").await;
    assert!(metrics.starts_with("http://127.0.0.1:"), "{metrics}");
    // Keep echoing the log (and keep the pipe drained).
    let log = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("kvserve: {line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    });

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = GenerationClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let check = || HealthCheckRequest {
        service: String::new(),
    };
    assert_eq!(
        health.check(check()).await.unwrap().into_inner().status(),
        ServingStatus::Serving
    );
    let request = pb::GenerateRequest {
        text: Some("Once upon a time".into()),
        max_tokens: Some(400),
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());

    // While the open stream drains: NOT_SERVING, and new requests are UNAVAILABLE.
    let mut seen_not_serving = false;
    for _ in 0..100 {
        let status = health.check(check()).await.unwrap().into_inner().status();
        if status == ServingStatus::NotServing {
            seen_not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen_not_serving);
    let err = client
        .generate(pb::GenerateRequest {
            text: Some("Hi".into()),
            max_tokens: Some(2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The stream runs until the drain timeout ends it; then the process exits 0.
    let mut got = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(m)) => got += m.token_ids.len(),
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    assert!(got > 0);
    if let Err(status) = end {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let status = wait_exit(&mut child).await;
    let log = log.await.unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_with_tensor_parallel_size_3() {
    let model = model_path();
    let mut child = kvserve(&[
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--tensor-parallel-size",
        "3",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--kv-cache-memory",
        "8MiB",
    ])
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = wait_for_log(&mut lines, "listening on").await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = GenerationClient::new(channel.clone());
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.device.contains("x 3"), "{}", info.device);
    let reply = client
        .generate(pb::GenerateRequest {
            text: Some("The capital of France is".into()),
            max_tokens: Some(8),
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.completions[0].token_ids.len(), 8);
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    child.start_kill().unwrap();
    wait_exit(&mut child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_an_idle_server_exits_zero() {
    let model = model_path();
    let mut child = kvserve(&[
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--kv-cache-memory",
        "16MiB",
    ])
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    wait_for_log(&mut lines, "metrics on").await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_for_log(&mut lines, "Ctrl-C received").await;
    wait_for_log(&mut lines, "server stopped").await;
    let status = wait_exit(&mut child).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_and_bench_print_their_output() {
    let model = model_path();
    let model = model.to_str().unwrap();
    let out = kvserve(&[
        "generate",
        "--model",
        model,
        "--device",
        "cpu",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
    ])
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Paris"), "{stdout}");

    let out = kvserve(&[
        "bench",
        "--model",
        model,
        "--device",
        "cpu",
        "--num-requests",
        "4",
        "--input-len",
        "16",
        "--output-len",
        "4",
    ])
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for row in ["| requests", "| output tokens/s", "| TTFT p50 / p90 / p99"] {
        assert!(stdout.contains(row), "{row}: {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_dummy_weights_and_saves_its_requests() {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/data/tiny_hf/llama3/config.json");
    let dir = std::env::temp_dir().join(format!("kvserve-dummy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (requests, report) = (dir.join("requests.json"), dir.join("report.json"));
    let out = kvserve(&[
        "bench",
        "--load-format",
        "dummy",
        "--model",
        config.to_str().unwrap(),
        "--device",
        "cpu",
        "--input-len",
        "24",
        "--output-len",
        "6",
        "--num-requests",
        "3",
        "--save-requests",
        requests.to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
    ])
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["meta"]["model"], "llama3 (dummy weights)");
    let saved: Vec<serve_grpc::bench::BenchRequest> =
        serde_json::from_str(&std::fs::read_to_string(&requests).unwrap()).unwrap();
    assert_eq!(saved.len(), 3);
    let outputs: u64 = saved.iter().map(|r| u64::from(r.output_len)).sum();
    assert_eq!(outputs, 18);
    assert_eq!(report["output_tokens"].as_u64(), Some(outputs));
    assert!(saved.iter().all(|r| r.prompt.iter().all(|&t| t < 300)));

    // --load-format dummy needs --model; a missing config is a clear error.
    let out = kvserve(&["bench", "--load-format", "dummy"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let missing = dir.join("missing.json");
    let out = kvserve(&[
        "bench",
        "--load-format",
        "dummy",
        "--model",
        missing.to_str().unwrap(),
        "--device",
        "cpu",
    ])
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing.json"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_models_fail_cleanly() {
    let dir = std::env::temp_dir().join(format!("kvserve-bad-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00 this is not a model").unwrap();
    let missing = dir.join("missing.gguf");
    let cases: Vec<(Vec<String>, Option<i32>)> = vec![
        (
            vec!["serve".into(), "--kv-cache-dtype".into(), "int3".into()],
            Some(2),
        ),
        (
            vec!["serve".into(), "--block-size".into(), "0".into()],
            Some(2),
        ),
        (vec!["frobnicate".into()], Some(2)),
        (
            vec![
                "serve".into(),
                "--model".into(),
                missing.display().to_string(),
            ],
            Some(1),
        ),
        (
            vec!["serve".into(), "--model".into(), junk.display().to_string()],
            Some(1),
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                model_path().display().to_string(),
                "--device".into(),
                "cpu".into(),
                "--prompt".into(),
                String::new(),
            ],
            Some(1),
        ),
        (
            vec![
                "serve".into(),
                "--model".into(),
                model_path().display().to_string(),
                "--device".into(),
                "cpu".into(),
                "--host".into(),
                "not a host".into(),
            ],
            Some(1),
        ),
        (
            vec![
                "serve".into(),
                "--nnodes".into(),
                "2".into(),
                "--tensor-parallel-size".into(),
                "2".into(),
                "--dist-init-addr".into(),
                "node0:29500".into(),
            ],
            Some(1),
        ),
        (
            vec![
                "serve".into(),
                "--model".into(),
                model_path().display().to_string(),
                "--device".into(),
                "cpu".into(),
                "--tensor-parallel-size".into(),
                "2".into(),
            ],
            Some(1),
        ),
    ];
    for (args, code) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = kvserve(&args).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), code, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?}: says why");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_serve_and_soak_fail_cleanly_on_a_bad_address_plan_or_output_path() {
    // A port nothing listens on (just freed).
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let dir = tempfile::tempdir().unwrap();
    let missing_dir = dir.path().join("missing/out.json");
    let missing = missing_dir.display().to_string();
    let cases: [(Vec<&str>, Option<i32>, &str); 8] = [
        (
            vec!["soak", "--addr", &addr, "--connect-timeout", "2s"],
            Some(1),
            &addr,
        ),
        (
            vec!["soak", "--metrics-url", "ftp://127.0.0.1:1/metrics"],
            Some(1),
            "ftp://127.0.0.1:1/metrics",
        ),
        (
            vec!["soak", "--addr", &addr, "--csv", &missing],
            Some(1),
            &missing,
        ),
        (
            vec!["soak", "--load-phase", "0s"],
            Some(1),
            "the load and idle phases",
        ),
        (
            vec!["bench-serve", "--addr", &addr, "--connect-timeout", "2s"],
            Some(1),
            &addr,
        ),
        // The output path is checked before connecting.
        (
            vec!["bench-serve", "--addr", &addr, "--json", &missing],
            Some(1),
            &missing,
        ),
        (
            vec!["bench-serve", "--addr", &addr, "--plot", &missing],
            Some(1),
            &missing,
        ),
        (
            vec!["bench-serve", "--max-concurrency", "0"],
            Some(2),
            "--max-concurrency",
        ),
    ];
    for (args, code, named) in cases {
        let out = kvserve(&args).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), code, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?} names {named}: {stderr}");
    }
}
