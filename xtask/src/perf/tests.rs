//! The gate's decision (pure) and its failure modes; plus one end-to-end run where a
//! deliberately slowed benchmark must fail the gate.

use super::*;

fn map(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|&(k, v)| (k.to_owned(), v)).collect()
}

#[test]
fn within_tolerance_passes_and_faster_is_fine() {
    let base = map(&[("codecs/encode/int8", 1.0), ("schedule/x", 2.0)]);
    // +49% and -50%.
    let now = map(&[("codecs/encode/int8", 1.49), ("schedule/x", 1.0)]);
    let c = compare(&base, &now);
    assert_eq!(c.rows.len(), 2);
    assert!(c.missing.is_empty() && c.new.is_empty());
    assert_eq!(c.regressions().count(), 0);
    c.verdict().unwrap();
}

#[test]
fn regression_beyond_tolerance_fails_and_names_the_benchmark() {
    let base = map(&[("codecs/encode/int8", 1.0), ("schedule/x", 2.0)]);
    let now = map(&[("codecs/encode/int8", 1.51), ("schedule/x", 2.0)]);
    let c = compare(&base, &now);
    let regressed: Vec<_> = c.regressions().map(|r| r.id.as_str()).collect();
    assert_eq!(regressed, ["codecs/encode/int8"]);
    let err = format!("{:#}", c.verdict().unwrap_err());
    assert!(
        err.contains("codecs/encode/int8 is +51.0%, over its 50% tolerance"),
        "{err}"
    );
    assert!(c.table().contains("REGRESSED"));
    // The same run passes at a looser tolerance.
    let mut loose = c.clone();
    loose.rows.iter_mut().for_each(|r| r.tolerance = 0.6);
    loose.verdict().unwrap();
}

#[test]
fn the_cpu_decode_has_its_own_wider_tolerance() {
    let base = map(&[
        ("cpu_decode/cpu_decode/x/batch1", 400.0),
        ("codecs/encode/int8", 1.0),
    ]);
    // Both +75%: over the line for the codec, within it for the decode.
    let now = map(&[
        ("cpu_decode/cpu_decode/x/batch1", 700.0),
        ("codecs/encode/int8", 1.75),
    ]);
    let c = compare(&base, &now);
    let regressed: Vec<_> = c.regressions().map(|r| r.id.as_str()).collect();
    assert_eq!(regressed, ["codecs/encode/int8"]);
    assert_eq!(
        tolerance_of("cpu_decode/cpu_decode/x/batch1"),
        DECODE_TOLERANCE
    );
    assert_eq!(tolerance_of("schedule/x"), TOLERANCE);
    // A 4x slowdown of the decode still fails.
    let c = compare(&base, &map(&[("cpu_decode/cpu_decode/x/batch1", 1600.0)]));
    let err = format!("{:#}", c.verdict().unwrap_err());
    assert!(err.contains("+300.0%, over its 100% tolerance"), "{err}");
}

#[test]
fn tolerance_boundary_is_exclusive() {
    let row = Row {
        id: "a/b".into(),
        baseline: 4.0,
        current: 5.0,
        tolerance: 0.25,
    };
    assert!((row.change() - 0.25).abs() < 1e-12);
    assert!(!row.regressed());
    let tighter = Row {
        tolerance: 0.2499,
        ..row
    };
    assert!(tighter.regressed());
}

#[test]
fn missing_and_new_benchmarks_fail_with_a_clear_message() {
    let base = map(&[("codecs/a", 1.0), ("codecs/gone", 1.0)]);
    let now = map(&[("codecs/a", 1.0), ("codecs/added", 1.0)]);
    let c = compare(&base, &now);
    assert_eq!(c.missing, ["codecs/gone"]);
    assert_eq!(c.new, ["codecs/added"]);
    let err = format!("{:#}", c.verdict().unwrap_err());
    assert!(err.contains("in the baseline did not run"), "{err}");
    assert!(err.contains("codecs/gone"), "{err}");
    assert!(err.contains("have no baseline"), "{err}");
    assert!(err.contains("codecs/added"), "{err}");
    assert!(err.contains("--bless"), "{err}");
}

fn sample_baseline() -> Baseline {
    Baseline {
        machine: "linux x86_64, test CPU, 2 threads".into(),
        date: "2026-12-02".into(),
        calibration_ns: map(&[("codecs", 50_000.0)]),
        ratios: map(&[("codecs/encode/int8", 0.5), ("codecs/decode/fp16", 0.25)]),
    }
}

#[test]
fn baseline_round_trips() {
    let b = sample_baseline();
    assert_eq!(Baseline::parse(&b.to_json()).unwrap(), b);
}

#[test]
fn corrupt_baselines_are_errors_not_panics() {
    let good: Value = serde_json::from_str(&sample_baseline().to_json()).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v.to_string()
    };
    let cases = [
        ("{not json".to_owned(), "not valid JSON"),
        ("[]".to_owned(), "no `format`"),
        (with(&|v| v["format"] = json!(99)), "format 99"),
        (with(&|v| v["ratios"] = json!({})), "`ratios` is empty"),
        (with(&|v| v["ratios"] = json!([1])), "no `ratios` object"),
        (
            with(&|v| v["ratios"]["codecs/encode/int8"] = json!("fast")),
            "`ratios.codecs/encode/int8` is not a positive number",
        ),
        (
            with(&|v| v["ratios"]["codecs/encode/int8"] = json!(-1.0)),
            "not a positive number",
        ),
        (with(&|v| v["machine"] = json!(null)), "no `machine`"),
    ];
    for (text, want) in cases {
        let err = format!("{:#}", Baseline::parse(&text).unwrap_err());
        assert!(err.contains(want), "{text}: {err}");
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvserve-perf-gate-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn missing_or_corrupt_baseline_file_says_how_to_bless() {
    let dir = temp_dir("files");
    let err = format!("{:#}", Baseline::read(&dir.join("nope.json")).unwrap_err());
    assert!(err.contains("not found"), "{err}");
    assert!(err.contains("cargo xtask perf-gate --bless"), "{err}");

    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"format\": 1,").unwrap();
    let err = format!("{:#}", Baseline::read(&bad).unwrap_err());
    assert!(err.contains("is corrupt"), "{err}");
    assert!(err.contains("cargo xtask perf-gate --bless"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_committed_baseline_parses_and_covers_every_target() {
    let b = Baseline::read(&crate::workspace_root().join(DEFAULT_BASELINE)).unwrap();
    for t in TARGETS {
        assert!(
            b.ratios.keys().any(|id| owns(t, id)),
            "no baseline entry for {}",
            t.bench
        );
        assert!(b.calibration_ns.contains_key(t.bench), "{}", t.bench);
    }
}

#[test]
fn target_selection_and_ownership() {
    assert_eq!(select_targets(&[]).unwrap().len(), TARGETS.len());
    let t = select_targets(&["codecs".into()]).unwrap();
    assert_eq!(t[0].package, "kv-quant");
    let err = format!("{:#}", select_targets(&["nope".into()]).unwrap_err());
    assert!(err.contains("no gated bench target `nope`"), "{err}");
    assert!(owns(&t[0], "codecs/encode/int8"));
    assert!(!owns(&t[0], "codecsx/encode/int8"));
    assert!(!owns(&t[0], "schedule/decode_step"));
}

#[test]
fn regex_escape_escapes_metacharacters() {
    assert_eq!(regex_escape("a/b_1"), "a/b_1");
    assert_eq!(regex_escape("x.y(2)+"), r"x\.y\(2\)\+");
}

#[test]
fn dates() {
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    assert_eq!(civil_from_days(20_789), (2026, 12, 2));
}

/// End to end through cargo, criterion and the files it writes: bless a baseline of one real
/// benchmark (`codecs`' `encode/int8`, plus the calibration), then run the gate against it with
/// that benchmark deliberately slowed (it does its work 4 times): the gate must fail and name
/// it. Builds the kv-quant bench in the gate's profile (shared with `cargo xtask perf-gate`
/// in CI). Each measurement is bracketed by calibrations as in the real gate, and the slowed
/// benchmark goes through every re-measurement round before it fails.
#[test]
fn a_deliberately_slowed_benchmark_fails_the_gate() {
    let dir = temp_dir("e2e");
    let options = Options {
        bless: true,
        baseline: Some(dir.join("baseline.json")),
        benches: vec!["codecs".into()],
        filter: Some("^encode/int8$".into()),
        slow: None,
        work_dir: Some(dir.join("criterion")),
        // The re-measurement rounds run as in CI, without the 15 s waits between them.
        round_gap: Some(Duration::ZERO),
    };
    run(&options).unwrap();
    let blessed = Baseline::read(&dir.join("baseline.json")).unwrap();
    assert_eq!(
        blessed.ratios.keys().collect::<Vec<_>>(),
        ["codecs/encode/int8"]
    );

    let slowed = Options {
        bless: false,
        slow: Some("encode/int8".into()),
        ..options
    };
    let err = format!("{:#}", run(&slowed).unwrap_err());
    assert!(err.contains("regressed beyond their tolerance"), "{err}");
    assert!(err.contains("over its 50% tolerance"), "{err}");
    assert!(err.contains("codecs/encode/int8"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn cal(ns: f64) -> Sample {
    Sample::Calibration(ns)
}

fn bench(id: &str, ns: f64) -> Sample {
    Sample::Benchmark(id.to_owned(), ns)
}

#[test]
fn each_benchmark_is_divided_by_the_mean_of_the_calibrations_either_side() {
    // The machine slows down steadily (calibration 100 → 120 → 60 µs): each benchmark is
    // divided by the calibrations next to it, so the drift cancels.
    let samples = [
        cal(100.0),
        bench("a", 55.0),
        cal(120.0),
        bench("b", 180.0),
        cal(60.0),
    ];
    let r = bracketed_ratios(&samples).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(
        r["a"],
        Bracket {
            ratio: 0.5,
            before_ns: Some(100.0),
            after_ns: Some(120.0)
        }
    );
    assert_eq!(r["b"].ratio, 2.0);
    assert_eq!(
        (r["b"].before_ns, r["b"].after_ns),
        (Some(120.0), Some(60.0))
    );
}

#[test]
fn a_benchmark_with_a_calibration_on_one_side_only_uses_that_one() {
    let r = bracketed_ratios(&[cal(100.0), bench("a", 50.0), bench("b", 300.0)]).unwrap();
    assert_eq!(r["a"].ratio, 0.5);
    assert_eq!(r["a"].after_ns, None);
    // The nearest calibration before `b` is the one before `a`.
    assert_eq!(r["b"].ratio, 3.0);
    let r = bracketed_ratios(&[bench("a", 50.0), cal(25.0)]).unwrap();
    assert_eq!(r["a"].ratio, 2.0);
    assert_eq!(r["a"].before_ns, None);
}

#[test]
fn missing_or_bad_calibrations_are_errors() {
    let err = format!("{:#}", bracketed_ratios(&[bench("a", 50.0)]).unwrap_err());
    assert!(err.contains("`a` has no calibration"), "{err}");
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let err = format!(
            "{:#}",
            bracketed_ratios(&[cal(bad), bench("a", 50.0), cal(100.0)]).unwrap_err()
        );
        assert!(err.contains("median of `calibration`"), "{bad}: {err}");
        let err = format!(
            "{:#}",
            bracketed_ratios(&[cal(100.0), bench("a", bad), cal(100.0)]).unwrap_err()
        );
        assert!(err.contains("median of `a`"), "{bad}: {err}");
    }
    let err = format!(
        "{:#}",
        bracketed_ratios(&[
            cal(1.0),
            bench("a", 1.0),
            cal(1.0),
            bench("a", 2.0),
            cal(1.0)
        ])
        .unwrap_err()
    );
    assert!(err.contains("`a` was measured twice"), "{err}");
    // No benchmark at all is not an error of the bracketing (the gate checks the set).
    assert!(bracketed_ratios(&[cal(1.0)]).unwrap().is_empty());
}

#[test]
fn list_output_is_parsed_and_checked() {
    let out = "calibration: benchmark\nencode/int8: benchmark\n\nencode/fp16: benchmark\n";
    assert_eq!(
        parse_list("codecs", out).unwrap(),
        ["encode/int8", "encode/fp16"]
    );
    // Only the calibration (a filter that matched nothing else) is an empty list.
    assert!(
        parse_list("codecs", "calibration: benchmark\n")
            .unwrap()
            .is_empty()
    );

    let cases = [
        ("encode/int8: benchmark\n", "lists no `calibration`"),
        ("", "lists no `calibration`"),
        (
            "calibration: benchmark\nwarning: something\n",
            "unexpected line in its `--list` output: \"warning: something\"",
        ),
        (
            "calibration: benchmark\na/very/long/id...: benchmark\n",
            "cut short by criterion",
        ),
    ];
    for (out, want) in cases {
        let err = format!("{:#}", parse_list("codecs", out).unwrap_err());
        assert!(err.contains(want), "{out:?}: {err}");
        assert!(err.contains("`codecs`"), "{out:?}: {err}");
    }
}

#[test]
fn a_process_must_report_exactly_the_calibration_and_its_benchmark() {
    let m = map(&[("calibration", 70_000.0), ("encode/int8", 17_000.0)]);
    assert_eq!(
        pair_medians("codecs", &m, Some("encode/int8")).unwrap(),
        (70_000.0, 17_000.0)
    );
    let only = map(&[("calibration", 70_000.0)]);
    assert_eq!(
        pair_medians("codecs", &only, None).unwrap(),
        (70_000.0, 70_000.0)
    );

    let err = format!(
        "{:#}",
        pair_medians("codecs", &map(&[("encode/int8", 1.0)]), Some("encode/int8")).unwrap_err()
    );
    assert!(err.contains("ran no `calibration`"), "{err}");
    let err = format!(
        "{:#}",
        pair_medians("codecs", &only, Some("encode/int8")).unwrap_err()
    );
    assert!(err.contains("`encode/int8` did not run"), "{err}");
    let err = format!("{:#}", pair_medians("codecs", &m, None).unwrap_err());
    assert!(err.contains("unexpected results for encode/int8"), "{err}");
}

/// Writes one criterion result folder (`<home>/<dir>/new/`) with the given file texts.
fn write_result(home: &Path, dir: &str, benchmark: Option<&str>, estimates: Option<&str>) {
    let new = home.join(dir).join("new");
    std::fs::create_dir_all(&new).unwrap();
    if let Some(text) = benchmark {
        std::fs::write(new.join("benchmark.json"), text).unwrap();
    }
    if let Some(text) = estimates {
        std::fs::write(new.join("estimates.json"), text).unwrap();
    }
}

#[test]
fn criterion_results_are_read_and_corrupt_ones_are_errors() {
    let good_estimates = r#"{"median": {"point_estimate": 1234.5}}"#;
    let dir = temp_dir("medians");
    write_result(
        &dir,
        "calibration",
        Some(r#"{"full_id": "calibration"}"#),
        Some(r#"{"median": {"point_estimate": 70000.0}}"#),
    );
    write_result(
        &dir,
        "encode/int8",
        Some(r#"{"full_id": "encode/int8"}"#),
        Some(good_estimates),
    );
    // A previous run's results (`base/`) are not read.
    let base = dir.join("encode/int8/base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(base.join("benchmark.json"), "{corrupt").unwrap();
    assert_eq!(
        read_medians(&dir).unwrap(),
        map(&[("calibration", 70_000.0), ("encode/int8", 1234.5)])
    );
    // No results at all: an empty map (the pairing then names what is missing).
    assert!(read_medians(&dir.join("nothing-here")).unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);

    let cases: [(Option<&str>, Option<&str>, &str); 6] = [
        (
            Some("{not json"),
            Some(good_estimates),
            "benchmark.json is not valid JSON",
        ),
        (Some(r#"{"id": 1}"#), Some(good_estimates), "no `full_id`"),
        (Some(r#"{"full_id": "x"}"#), None, "could not read"),
        (
            Some(r#"{"full_id": "x"}"#),
            Some(""),
            "estimates.json is not valid JSON",
        ),
        (
            Some(r#"{"full_id": "x"}"#),
            Some(r#"{"mean": {"point_estimate": 1.0}}"#),
            "no positive `median.point_estimate`",
        ),
        (
            Some(r#"{"full_id": "x"}"#),
            Some(r#"{"median": {"point_estimate": -3.0}}"#),
            "no positive `median.point_estimate`",
        ),
    ];
    for (i, (benchmark, estimates, want)) in cases.into_iter().enumerate() {
        let dir = temp_dir(&format!("corrupt-{i}"));
        write_result(&dir, "x", benchmark, estimates);
        let err = format!("{:#}", read_medians(&dir).unwrap_err());
        assert!(err.contains(want), "case {i}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn bench_executables_come_from_cargos_build_messages() {
    let artifact = |name: &str, kind: &str, exe: &str| {
        json!({
            "reason": "compiler-artifact",
            "manifest_path": format!("/ws/crates/{name}/Cargo.toml"),
            "target": {"name": name, "kind": [kind]},
            "executable": exe,
        })
        .to_string()
    };
    let messages = [
        "not json at all".to_owned(),
        json!({"reason": "build-finished", "success": true}).to_string(),
        artifact("codecs", "lib", "/t/wrong"),
        artifact("codecs", "bench", "/t/debug/deps/codecs-1234"),
        artifact("schedule", "bench", "/t/debug/deps/schedule-99"),
        "{\"truncated".to_owned(),
    ]
    .join("\n");
    let targets = select_targets(&["codecs".into(), "schedule".into()]).unwrap();
    let found = bench_binaries(&messages, &targets).unwrap();
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].target.bench, "codecs");
    assert_eq!(
        found[0].executable,
        PathBuf::from("/t/debug/deps/codecs-1234")
    );
    assert_eq!(found[0].package_dir, PathBuf::from("/ws/crates/codecs"));
    assert_eq!(found[1].target.bench, "schedule");

    let all = select_targets(&[]).unwrap();
    let err = format!("{:#}", bench_binaries(&messages, &all).unwrap_err());
    assert!(
        err.contains("no executable for bench target `block_manager`"),
        "{err}"
    );
    let err = format!("{:#}", bench_binaries("", &targets).unwrap_err());
    assert!(err.contains("`codecs` (package kv-quant)"), "{err}");
}

#[test]
fn the_baseline_is_the_median_of_the_passes() {
    let lists: BTreeMap<String, Vec<f64>> = [
        ("a/odd", vec![3.0, 1.0, 2.0]),
        ("a/disturbed", vec![1.0, 9.0, 1.1]),
        ("a/even", vec![4.0, 1.0]),
        ("a/one", vec![5.0]),
        ("a/none", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(
        medians_of(&lists),
        map(&[
            ("a/odd", 2.0),
            ("a/disturbed", 1.1),
            ("a/even", 2.5),
            ("a/one", 5.0)
        ])
    );
}

#[test]
fn remeasures_keep_the_best_ratio() {
    let mut best = map(&[("a/x", 2.0), ("a/y", 1.0)]);
    keep_better(&mut best, map(&[("a/x", 1.5), ("a/y", 3.0), ("a/z", 4.0)]));
    assert_eq!(best, map(&[("a/x", 1.5), ("a/y", 1.0), ("a/z", 4.0)]));
}
