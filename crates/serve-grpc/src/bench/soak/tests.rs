#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

//! The soak's plan, metrics parsing and verdict, and short soaks against a real server on
//! loopback (the tiny dummy Llama of the bench tests).

use engine::EngineConfig;

use super::*;
use crate::bench::plot::tests::PNG_SIGNATURE;
use crate::bench::serve::tests::{Altered, TestServer};
use crate::bench::tests::tiny_engine;

fn plan(duration_ms: u64) -> SoakPlan {
    SoakPlan {
        duration: Duration::from_millis(duration_ms),
        load_phase: Duration::from_millis(1500),
        idle_phase: Duration::from_millis(700),
        sample_every: Duration::from_millis(250),
        request_rate: RequestRate::new(25.0).unwrap(),
        max_concurrency: 8,
        max_output_len: 10,
        max_prompt_len: 40,
        max_rss_growth: 256 << 20,
        seed: 3,
    }
}

fn sample(t_s: f64, rss_mib: u64, fds: u64, kv: u64) -> Sample {
    Sample {
        t_s,
        phase: Phase::Idle,
        rss_bytes: Some(rss_mib << 20),
        open_fds: Some(fds),
        threads: Some(9),
        kv_blocks_used: kv,
        running: 0,
        waiting: 0,
        client_in_flight: 0,
        ended: 0,
    }
}

fn points(rss_mib: &[u64]) -> Vec<IdlePoint> {
    rss_mib
        .iter()
        .enumerate()
        .map(|(i, &r)| IdlePoint {
            phase: i,
            sample: sample(60.0 * (i + 1) as f64, r, 20, 0),
        })
        .collect()
}

#[test]
fn the_verdict_ignores_the_warm_up_and_catches_growth_and_leftovers() {
    // The first load phase grows memory (allocator pools, caches): not a leak.
    let v = judge(&points(&[100, 180, 181, 179, 182]), 0, 32 << 20);
    assert!(v.passed, "{v:?}");
    assert_eq!(v.rss_baseline, Some(180 << 20));
    assert_eq!(v.rss_growth, Some(2 << 20));
    assert!(v.rss_slope_mib_per_hour.unwrap().abs() < 60.0);
    // Growing memory at every idle point is.
    let v = judge(&points(&[100, 180, 200, 220, 240]), 0, 32 << 20);
    assert!(!v.passed);
    assert!(v.failures[0].contains("grew by 60.0 MiB"), "{v:?}");
    assert!(v.rss_slope_mib_per_hour.unwrap() > 1000.0);
    // KV blocks left at idle, file descriptors that pile up, unexpected endings.
    let mut p = points(&[100, 180, 180]);
    p[2].sample.kv_blocks_used = 3;
    p[2].sample.open_fds = Some(20 + FD_SLACK + 1);
    let v = judge(&p, 2, 32 << 20);
    assert!(!v.passed);
    let all = v.failures.join("\n");
    assert!(all.contains("2 requests ended unexpectedly"), "{all}");
    assert!(
        all.contains("idle phase 2") && all.contains("3 KV blocks used"),
        "{all}"
    );
    assert!(
        all.contains("open file descriptors at idle grew from 20"),
        "{all}"
    );
    // No idle point at all is a failure, not a pass.
    assert!(!judge(&[], 0, 32 << 20).passed);
    // Without process metrics (not Linux) the rest is still judged.
    let mut p = points(&[1, 1]);
    for q in &mut p {
        q.sample.rss_bytes = None;
        q.sample.open_fds = None;
    }
    let v = judge(&p, 0, 0);
    assert!(v.passed && v.rss_growth.is_none(), "{v:?}");
}

#[test]
fn the_request_mix_follows_its_percentages_and_builds_valid_messages() {
    let p = plan(5000);
    let mut rng = SplitMix64(p.seed);
    let prefix: Vec<u32> = (0..SHARED_PREFIX_LEN).collect();
    let requests: Vec<SoakRequest> = (0..4000)
        .map(|i| SoakRequest::draw(i, &p, 1200, &prefix, &mut rng))
        .collect();
    for (kind, percent) in Kind::MIX {
        let n = requests.iter().filter(|r| r.kind == kind).count();
        let share = n as f64 / requests.len() as f64 * 100.0;
        assert!(
            (share - percent as f64).abs() < 2.5,
            "{kind:?}: {share}% for {percent}%"
        );
    }
    // Seed 3 (the soaks below) draws every kind within its first 24 requests.
    let mut rng = SplitMix64(p.seed);
    let first: std::collections::BTreeSet<Kind> = (0..24)
        .map(|i| SoakRequest::draw(i, &p, 1200, &prefix, &mut rng).kind)
        .collect();
    assert_eq!(first.len(), Kind::MIX.len(), "{first:?}");
    let shared = requests
        .iter()
        .filter(|r| r.chat.is_none() && r.prompt.starts_with(&prefix[..8]))
        .count();
    assert!(
        (1000..1500).contains(&shared),
        "{shared} of 4000 share the prefix"
    );
    for r in &requests {
        let m = r.message();
        assert!((4..=p.max_output_len).contains(&r.max_tokens));
        assert!((1..u64::from(r.max_tokens)).contains(&r.cut_after) || r.max_tokens == 1);
        assert!((50..=500).contains(&(r.deadline.as_millis() as u64)));
        assert!(m.ignore_eos && m.max_tokens == Some(r.max_tokens));
        if r.kind == Kind::Chat {
            assert!(m.token_ids.is_empty() && m.messages.len() == 1);
        } else {
            assert!(m.messages.is_empty());
            assert!((8..=p.max_prompt_len as usize).contains(&m.token_ids.len()));
            assert!(m.token_ids.iter().all(|&t| t < 1200));
        }
        assert_eq!(m.n, if r.kind == Kind::Parallel { 2 } else { 0 });
        assert_eq!(
            r.expected_tokens(),
            u64::from(r.max_tokens) * u64::from(m.n.max(1))
        );
    }
    let ids: std::collections::BTreeSet<&str> = requests.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), requests.len());
}

#[test]
fn plans_are_checked_and_cut_into_phases_that_end_idle() {
    let p = plan(5500);
    p.check().unwrap();
    let phases = p.phases();
    assert_eq!(phases.len(), 3, "{phases:?}");
    assert_eq!(phases[0], (p.load_phase, p.idle_phase));
    assert_eq!(phases[2], (Duration::from_millis(400), p.idle_phase));
    // 600 ms left is less than an idle phase: no third phase.
    assert_eq!(plan(5000).phases().len(), 2);
    // The last load phase is cut so that the run ends with a whole idle phase.
    let total: Duration = phases.iter().map(|(l, i)| *l + *i).sum();
    assert!(total <= p.duration, "{total:?}");
    assert_eq!(phases[2].1, p.idle_phase);
    let bad = |f: &dyn Fn(&mut SoakPlan), what: &str| {
        let mut q = plan(5000);
        f(&mut q);
        match q.check() {
            Err(SoakError::Plan(msg)) => assert!(msg.contains(what), "{msg}"),
            other => panic!("{other:?}"),
        }
    };
    bad(&|q| q.load_phase = Duration::ZERO, "phases");
    bad(&|q| q.idle_phase = Duration::ZERO, "phases");
    bad(&|q| q.sample_every = Duration::ZERO, "sample_every");
    bad(&|q| q.sample_every = Duration::from_secs(5), "sample_every");
    bad(&|q| q.duration = Duration::from_secs(1), "duration");
    bad(
        &|q| q.request_rate = RequestRate::new(f64::INFINITY).unwrap(),
        "finite",
    );
    bad(&|q| q.max_concurrency = 0, "max_concurrency");
    bad(&|q| q.max_output_len = 3, "max_output_len");
    bad(&|q| q.max_prompt_len = 2, "max_prompt_len");
}

#[test]
fn metrics_text_parses_by_name_and_skips_what_is_not_a_sample() {
    let text = "# HELP kvserve_kv_blocks_used KV blocks.\n# TYPE kvserve_kv_blocks_used gauge\n\
        kvserve_kv_blocks_used 7\nkvserve_requests_total{outcome=\"stop\"} 3\n\
        kvserve_requests_total{outcome=\"length\"} 4\nprocess_resident_memory_bytes 1.5e8\n\
        garbage\nname_without_value \nbad_value x\n\n";
    let m = parse_metrics(text);
    assert_eq!(m["kvserve_kv_blocks_used"], 7.0);
    assert_eq!(m["kvserve_requests_total"], 3.0, "the first sample wins");
    assert_eq!(m["process_resident_memory_bytes"], 1.5e8);
    assert!(!m.contains_key("garbage") && !m.contains_key("bad_value"));
    assert_eq!(
        dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "hello world"
    );
    assert_eq!(dechunk("zz\r\nhello"), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_metrics_urls_and_unreachable_metrics_are_clear_errors() {
    for (url, what) in [
        ("https://127.0.0.1:9464/metrics", "only http://"),
        ("127.0.0.1:9464/metrics", "only http://"),
        ("http://127.0.0.1/metrics", "no port"),
        ("http://127.0.0.1:0/metrics", "not valid"),
        ("http://127.0.0.1:99999/metrics", "not valid"),
        ("http://:80/metrics", "not valid"),
    ] {
        match MetricsEndpoint::new(url) {
            Err(SoakError::MetricsUrl { reason, .. }) => {
                assert!(reason.contains(what), "{url}: {reason}")
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    assert_eq!(
        MetricsEndpoint::new("http://127.0.0.1:9/").unwrap().path,
        "/"
    );
    assert_eq!(
        MetricsEndpoint::new("http://127.0.0.1:9").unwrap().path,
        "/metrics"
    );
    // Nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let m = MetricsEndpoint::new(&format!("http://{closed}/metrics")).unwrap();
    assert!(matches!(m.scrape().await, Err(SoakError::Scrape { .. })));
    // A server that answers 404 on that path, and a soak that cannot read its metrics refuses
    // to start.
    let server = TestServer::start(tiny_engine(EngineConfig::default(), 64).unwrap()).await;
    let m = MetricsEndpoint::new(&format!("http://{}/nowhere", server.metrics)).unwrap();
    match m.scrape().await {
        Err(SoakError::Scrape { reason, .. }) => assert!(reason.contains("404"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let target = server.target().await;
    match run(&target, &m, &plan(3000), |_| {}).await {
        Err(SoakError::Scrape { .. }) => {}
        other => panic!("{other:?}"),
    }
    // A plan that does not fit the model is refused before anything is sent.
    let good = MetricsEndpoint::new(&format!("http://{}/metrics", server.metrics)).unwrap();
    let mut huge = plan(3000);
    huge.max_prompt_len = 1 << 30;
    assert!(matches!(
        run(&target, &good, &huge, |_| {}).await,
        Err(SoakError::Plan(msg)) if msg.contains("max_model_len")
    ));
    server.stop().await;
}

/// A short soak of every kind of request against a real server passes, returns every block,
/// and writes CSV, JSON that parses back, and a PNG.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_against_a_real_server_passes_and_leaves_nothing_behind() {
    let engine = tiny_engine(EngineConfig::default(), 256).unwrap();
    let server = TestServer::start(engine.clone()).await;
    let target = server.target().await;
    let metrics = MetricsEndpoint::new(&format!("http://{}/metrics", server.metrics)).unwrap();
    let mut seen = 0usize;
    let report = run(&target, &metrics, &plan(4500), |_| seen += 1)
        .await
        .unwrap();
    assert!(report.verdict.passed, "{report}");
    assert_eq!(report.idle_points.len(), 2, "{report}");
    assert_eq!(
        seen,
        report.samples.len() - 1,
        "the first scrape is before the load"
    );
    assert!(report.samples.iter().any(|s| s.phase == Phase::Load));
    // Every kind ran and ended as it may.
    let sent: u64 = report.endings.values().flat_map(|e| e.values()).sum();
    assert_eq!(sent, report.sent);
    // Seed 3 draws every kind within its first 24 requests (the mix test below).
    assert!(report.sent >= 24, "{report}");
    // Every load phase sends (at 25 req/s for 1.5 s, about 37 requests when nothing waits
    // on the concurrency limit); the arrival process goes on across phases.
    assert_eq!(report.sent_per_phase.len(), 2);
    assert_eq!(report.sent_per_phase.iter().sum::<u64>(), report.sent);
    for &n in &report.sent_per_phase {
        assert!(n >= 8, "{:?}: {report}", report.sent_per_phase);
    }
    for kind in [
        "stream", "unary", "chat", "parallel", "dropped", "aborted", "deadline",
    ] {
        assert!(report.endings.contains_key(kind), "{kind}: {report}");
    }
    assert!(
        report.endings["dropped"].contains_key("dropped"),
        "{report}"
    );
    assert!(report.first_unexpected.is_empty(), "{report}");
    if cfg!(target_os = "linux") {
        assert!(report.samples.iter().all(|s| s.rss_bytes.is_some()));
    }
    assert_eq!(engine.stats().kv_blocks_used, 0);
    assert_eq!(engine.stats().requests_in_flight, 0);
    let table = report.to_string();
    assert!(
        table.contains("verdict: PASSED") && table.contains("| idle phase |"),
        "{table}"
    );
    // Outputs.
    let dir = tempfile::tempdir().unwrap();
    let csv = report.csv();
    assert_eq!(csv.lines().count(), report.samples.len() + 1);
    assert!(csv.starts_with("t_s,phase,rss_mib"));
    let json_path = dir.path().join("soak.json");
    crate::bench::serve::write_json(&json_path, &report).unwrap();
    let back: SoakReport =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(back.sent, report.sent);
    assert_eq!(back.idle_points.len(), report.idle_points.len());
    assert_eq!(back.plan, report.plan);
    let png = dir.path().join("soak.png");
    crate::bench::plot::write_soak_png(&png, &report).unwrap();
    assert!(std::fs::read(&png).unwrap().starts_with(&PNG_SIGNATURE));
    let bad = crate::bench::plot::write_soak_png(dir.path(), &report).unwrap_err();
    assert!(bad.to_string().contains("directory"), "{bad}");
    let mut empty = report.clone();
    empty.samples.clear();
    assert_eq!(
        crate::bench::plot::write_soak_png(&png, &empty),
        Err(crate::bench::plot::PlotError::Empty)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_fails_when_blocks_stay_used_at_idle() {
    let engine = tiny_engine(EngineConfig::default(), 256).unwrap();
    let server = TestServer::start(Altered {
        engine,
        one_short: false,
        // `/metrics` says blocks stay used: the soak must fail, naming it.
        metrics_prefix: "kvserve_kv_blocks_used 5\n",
    })
    .await;
    let target = server.target().await;
    let metrics = MetricsEndpoint::new(&format!("http://{}/metrics", server.metrics)).unwrap();
    let mut p = plan(2300);
    p.request_rate = RequestRate::new(10.0).unwrap();
    let report = run(&target, &metrics, &p, |_| {}).await.unwrap();
    assert!(!report.verdict.passed);
    assert!(
        report.verdict.failures[0].contains("5 KV blocks used"),
        "{:?}",
        report.verdict
    );
    assert!(report.to_string().contains("verdict: FAILED"));
    server.stop().await;
}

#[test]
fn a_failed_request_task_is_an_unexpected_ending() {
    let mut tally = Tally::default();
    tally.record(Kind::Dropped, Ending::Expected("dropped"));
    tally.unexpected_task("task 3 panicked");
    assert_eq!(tally.unexpected, 1);
    assert_eq!(tally.endings["client"]["task_failed"], 1);
    assert_eq!(tally.endings["dropped"]["dropped"], 1);
    assert!(tally.first_unexpected[0].contains("task 3 panicked"));
    assert!(!judge(&points(&[1, 1]), tally.unexpected, 0).passed);
}
