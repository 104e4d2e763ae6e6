//! The gate's decision (pure) and its failure modes; plus one end-to-end run where a
//! deliberately slowed benchmark must fail the gate.

use super::*;

fn map(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|&(k, v)| (k.to_owned(), v)).collect()
}

#[test]
fn within_tolerance_passes_and_faster_is_fine() {
    let base = map(&[("codecs/encode/int8", 1.0), ("schedule/x", 2.0)]);
    // +24% and -50%.
    let now = map(&[("codecs/encode/int8", 1.24), ("schedule/x", 1.0)]);
    let c = compare(&base, &now);
    assert_eq!(c.rows.len(), 2);
    assert!(c.missing.is_empty() && c.new.is_empty());
    assert_eq!(c.regressions(TOLERANCE).count(), 0);
    c.verdict(TOLERANCE).unwrap();
}

#[test]
fn regression_beyond_tolerance_fails_and_names_the_benchmark() {
    let base = map(&[("codecs/encode/int8", 1.0), ("schedule/x", 2.0)]);
    let now = map(&[("codecs/encode/int8", 1.26), ("schedule/x", 2.0)]);
    let c = compare(&base, &now);
    let regressed: Vec<_> = c.regressions(TOLERANCE).map(|r| r.id.as_str()).collect();
    assert_eq!(regressed, ["codecs/encode/int8"]);
    let err = format!("{:#}", c.verdict(TOLERANCE).unwrap_err());
    assert!(err.contains("codecs/encode/int8 is +26.0%"), "{err}");
    assert!(err.contains("more than 25%"), "{err}");
    assert!(c.table(TOLERANCE).contains("REGRESSED"));
    // The same run passes at a looser tolerance.
    c.verdict(0.3).unwrap();
}

#[test]
fn tolerance_boundary_is_exclusive() {
    let row = Row {
        id: "a/b".into(),
        baseline: 4.0,
        current: 5.0,
    };
    assert!((row.change() - 0.25).abs() < 1e-12);
    assert!(!row.regressed(0.25));
    assert!(row.regressed(0.2499));
}

#[test]
fn missing_and_new_benchmarks_fail_with_a_clear_message() {
    let base = map(&[("codecs/a", 1.0), ("codecs/gone", 1.0)]);
    let now = map(&[("codecs/a", 1.0), ("codecs/added", 1.0)]);
    let c = compare(&base, &now);
    assert_eq!(c.missing, ["codecs/gone"]);
    assert_eq!(c.new, ["codecs/added"]);
    let err = format!("{:#}", c.verdict(TOLERANCE).unwrap_err());
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
/// it. Builds the kv-quant bench in release (shared with `cargo xtask perf-gate` in CI).
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
    assert!(err.contains("regressed by more than 25%"), "{err}");
    assert!(err.contains("codecs/encode/int8"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn remeasures_keep_the_best_ratio() {
    let mut best = map(&[("a/x", 2.0), ("a/y", 1.0)]);
    keep_better(&mut best, map(&[("a/x", 1.5), ("a/y", 3.0), ("a/z", 4.0)]));
    assert_eq!(best, map(&[("a/x", 1.5), ("a/y", 1.0), ("a/z", 4.0)]));
}
