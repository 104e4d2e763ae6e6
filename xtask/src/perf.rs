//! `cargo xtask perf-gate`: the CPU performance gate of CI.
//!
//! Runs the criterion benchmarks of [`TARGETS`] with short settings ([`CRITERION_ARGS`]), turns
//! each benchmark's median time into a ratio to the calibration workload measured in the same
//! process, and compares those ratios with the committed baseline ([`DEFAULT_BASELINE`]).
//!
//! # Calibration
//!
//! Every gated bench target registers `benches/calibration.rs` (a fixed, deterministic CPU
//! workload: a small f32 matrix multiply, a hashing pass and a sort, about 50 µs) as its
//! benchmark `calibration`, so it runs in the same process, with the same build and criterion
//! settings, seconds before the benchmarks it calibrates. The gate compares
//! `ratio = median(benchmark) / median(calibration)`, never absolute times: a machine that is
//! uniformly 2× slower leaves the ratios unchanged, and the baseline recorded on one machine
//! stays meaningful on another of the same kind.
//!
//! # Tolerance
//!
//! A benchmark regresses when its ratio grows by more than [`TOLERANCE`] (25%) over the
//! baseline's: `current / baseline - 1 > 0.25`. Faster is never a failure (re-bless to lock in
//! a gain). Because the measurements are short (about 0.7 s a benchmark), a benchmark over the
//! line is measured again, with its calibration, up to [`REMEASURES`] times, and keeps its best
//! ratio: a transient hiccup of the machine rarely hits every run, a real regression does. The
//! baseline holds each benchmark's mean ratio over [`BLESS_PASSES`] full passes.
//! A benchmark in the baseline that did not run, or one that ran but has no baseline, fails
//! the gate too, with a message saying to re-bless.
//!
//! # Why criterion, read from its files
//!
//! The benches stay ordinary criterion benches (`cargo bench` keeps working as before); the
//! gate only shortens them from the command line (criterion's flags override the config in
//! `criterion_group!`) and reads each result from `new/benchmark.json` (the benchmark's full
//! id) and `new/estimates.json` (the median) under a private `CRITERION_HOME` per target,
//! wiped before each run, so no stale result from an earlier `cargo bench` is ever read and
//! each target's calibration is its own.
//!
//! `cargo xtask perf-gate --bless` rewrites the baseline (ratios, machine and date) from a
//! fresh run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

/// Largest accepted growth of a benchmark's ratio over its baseline (0.25 = 25% slower).
pub(crate) const TOLERANCE: f64 = 0.25;

/// The committed baseline, relative to the workspace root.
pub(crate) const DEFAULT_BASELINE: &str = "benches/perf-baseline.json";

/// How many times the gate measures again the benchmarks over the tolerance (each keeps its
/// best ratio): on a shared 2-core machine a single 0.5 s measurement swings by ±30% or more.
const REMEASURES: usize = 3;

/// Full passes when blessing (the baseline holds each benchmark's mean ratio).
const BLESS_PASSES: usize = 2;

/// The benchmark id of the calibration workload in every target (`benches/calibration.rs`).
const CALIBRATION: &str = "calibration";

/// The environment variable that makes one benchmark repeat its work 4 times
/// (`benches/calibration.rs`, `slowdown`).
const SLOW_ENV: &str = "KVSERVE_PERF_GATE_SLOW";

/// Version of the baseline file's layout.
const FORMAT: u64 = 1;

/// The cargo profile the gated benches are built in: `dev`, whose artifacts the CI test step
/// (`cargo test --workspace`) has already built, so the gate compiles only the four bench
/// binaries (a cold release build of their dependencies, model's included, takes about 5
/// minutes of 2 cores: more than the gate may add to CI). The crates they time are built with
/// `opt-level = 3` in `dev` (root `Cargo.toml`: kv-block-manager, kv-quant, scheduler, model);
/// debug assertions and overflow checks stay on, which the ratios and the baseline include.
/// The gate detects regressions; the figures of BENCHMARKS.md come from `cargo bench`.
const PROFILE: &str = "dev";

/// Criterion flags for the gate's runs: 0.2 s warm-up, 0.5 s of measurement, 10 samples (the
/// least criterion takes), 1,000 bootstrap resamples (the default 100,000 would cost more time
/// than the measurement), no plots, one line per benchmark.
pub(crate) const CRITERION_ARGS: &[&str] = &[
    "--warm-up-time",
    "0.2",
    "--measurement-time",
    "0.5",
    "--sample-size",
    "10",
    "--nresamples",
    "1000",
    "--noplot",
    "--format",
    "terse",
];

/// A gated bench target: `cargo bench -p <package> --bench <bench>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub package: &'static str,
    pub bench: &'static str,
}

/// The gated bench targets: block manager step bookkeeping, scheduler step, KV-quant codecs,
/// CPU decode of SmolLM2 (shape of SmolLM2-135M, dummy Q4_1 weights).
pub(crate) const TARGETS: &[Target] = &[
    Target {
        package: "kv-block-manager",
        bench: "block_manager",
    },
    Target {
        package: "scheduler",
        bench: "schedule",
    },
    Target {
        package: "kv-quant",
        bench: "codecs",
    },
    Target {
        package: "model",
        bench: "cpu_decode",
    },
];

/// Flags of `cargo xtask perf-gate`.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct Options {
    /// Rewrite the baseline from this run (ratios, machine, date) instead of comparing.
    #[arg(long, alias = "save-baseline")]
    bless: bool,
    /// The baseline file [default: benches/perf-baseline.json].
    #[arg(long, value_name = "FILE")]
    baseline: Option<PathBuf>,
    /// Run only this bench target (repeatable): block_manager, schedule, codecs, cpu_decode.
    /// Baseline entries of the other targets are then not checked.
    #[arg(long = "bench", value_name = "TARGET")]
    benches: Vec<String>,
    /// Run only the benchmarks whose id matches this regex (criterion's filter; the
    /// calibration always runs). Baseline entries that did not run are then not checked.
    #[arg(long, value_name = "REGEX")]
    filter: Option<String>,
    /// Make the benchmark with this id (e.g. `encode/int8`) do its work 4 times, to see the
    /// gate fail (tests the gate itself).
    #[arg(long, value_name = "ID")]
    slow: Option<String>,
    /// Where the criterion results go (default: `<target dir>/perf-gate`).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

/// `cargo xtask perf-gate`.
pub(crate) fn run(options: &Options) -> Result<()> {
    let start = Instant::now();
    let root = crate::workspace_root();
    let baseline_path = options
        .baseline
        .clone()
        .unwrap_or_else(|| root.join(DEFAULT_BASELINE));
    let targets = select_targets(&options.benches)?;
    let partial = !options.benches.is_empty() || options.filter.is_some();
    ensure!(
        !(options.bless && partial && options.baseline.is_none()),
        "bless the committed baseline with every target and no filter (or give `--baseline FILE`)"
    );
    // Read the baseline before building anything: a missing or corrupt one fails at once.
    let baseline = if options.bless {
        None
    } else {
        Some(Baseline::read(&baseline_path)?)
    };
    let work_dir = match &options.work_dir {
        Some(dir) => dir.clone(),
        None => target_dir()?.join("perf-gate"),
    };

    build(&targets)?;
    let mut current = BTreeMap::new();
    let mut calibration_ns = BTreeMap::new();
    // A baseline is the mean of two full passes (a typical measurement, not a lucky one: the
    // gate compares its first pass with it); the gate makes one.
    let passes = if options.bless { BLESS_PASSES } else { 1 };
    for _ in 0..passes {
        for target in &targets {
            let filter = options
                .filter
                .as_ref()
                .map(|f| format!("^{CALIBRATION}$|{f}"));
            let run = run_target(target, filter.as_deref(), options, &work_dir)?;
            *calibration_ns.entry(target.bench.to_owned()).or_insert(0.0) +=
                run.calibration_ns / passes as f64;
            for (id, ratio) in run.ratios {
                *current.entry(id).or_insert(0.0) += ratio / passes as f64;
            }
        }
    }

    let Some(baseline) = baseline else {
        let baseline = Baseline {
            machine: machine(),
            date: today(),
            calibration_ns,
            ratios: current,
        };
        baseline.write(&baseline_path)?;
        print!("{}", baseline.table());
        println!(
            "perf-gate: wrote {} benchmarks to {} in {:.0}s",
            baseline.ratios.len(),
            baseline_path.display(),
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    };

    // Only the entries of the targets (and filter) that ran are expected.
    let filtered = options.filter.is_some();
    let expected: BTreeMap<String, f64> = baseline
        .ratios
        .iter()
        .filter(|(id, _)| targets.iter().any(|t| owns(t, id)))
        .filter(|(id, _)| !filtered || current.contains_key(*id))
        .map(|(id, r)| (id.clone(), *r))
        .collect();
    let mut comparison = compare(&expected, &current);
    for attempt in 1..=REMEASURES {
        let regressed: Vec<String> = comparison
            .regressions(TOLERANCE)
            .map(|r| r.id.clone())
            .collect();
        if regressed.is_empty() {
            break;
        }
        println!(
            "perf-gate: {} benchmark(s) over the tolerance, measuring them again \
             ({attempt}/{REMEASURES}): {}",
            regressed.len(),
            regressed.join(", ")
        );
        for target in targets
            .iter()
            .filter(|t| regressed.iter().any(|id| owns(t, id)))
        {
            let ids = regressed
                .iter()
                .filter_map(|id| id.strip_prefix(&format!("{}/", target.bench)))
                .map(regex_escape)
                .collect::<Vec<_>>();
            let filter = format!("^({CALIBRATION}|{})$", ids.join("|"));
            let again = run_target(target, Some(&filter), options, &work_dir)?;
            keep_better(&mut current, again.ratios);
        }
        comparison = compare(&expected, &current);
    }
    print!("{}", comparison.table(TOLERANCE));
    println!(
        "perf-gate: baseline {} ({}, {}), {:.0}s",
        baseline_path.display(),
        baseline.machine,
        baseline.date,
        start.elapsed().as_secs_f64()
    );
    comparison.verdict(TOLERANCE)
}

/// Merges `ratios` into `best`, keeping the smaller (better) ratio of each benchmark.
fn keep_better(best: &mut BTreeMap<String, f64>, ratios: BTreeMap<String, f64>) {
    for (id, ratio) in ratios {
        let r = best.entry(id).or_insert(ratio);
        *r = r.min(ratio);
    }
}

/// The targets named by `--bench` (all when none is).
fn select_targets(names: &[String]) -> Result<Vec<Target>> {
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    names
        .iter()
        .map(|name| {
            TARGETS
                .iter()
                .find(|t| t.bench == name)
                .copied()
                .with_context(|| {
                    let known: Vec<_> = TARGETS.iter().map(|t| t.bench).collect();
                    format!(
                        "no gated bench target `{name}` (known: {})",
                        known.join(", ")
                    )
                })
        })
        .collect()
}

/// Whether the benchmark `id` (`<bench>/<criterion id>`) belongs to `target`.
fn owns(target: &Target, id: &str) -> bool {
    id.strip_prefix(target.bench)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// The cargo target directory.
fn target_dir() -> Result<PathBuf> {
    let meta = crate::metadata(&["--no-deps"])?;
    let dir = meta["target_directory"]
        .as_str()
        .context("metadata: no `target_directory`")?;
    Ok(PathBuf::from(dir))
}

/// `cargo bench` in the gate's profile, with the workspace's feature set (as the test step).
fn cargo_bench() -> std::process::Command {
    let mut cmd = crate::cargo();
    cmd.args(["bench", "--locked", "--workspace", "--profile", PROFILE]);
    cmd
}

/// Builds every bench binary in one cargo call (cargo compiles them in parallel).
fn build(targets: &[Target]) -> Result<()> {
    let mut cmd = cargo_bench();
    cmd.arg("--no-run");
    for t in targets {
        cmd.args(["--bench", t.bench]);
    }
    crate::run_cmd(cmd)
}

/// What one bench process measured.
#[derive(Debug)]
struct TargetRun {
    /// Median of the calibration workload, in ns.
    calibration_ns: f64,
    /// `<bench>/<criterion id>` → median / calibration median.
    ratios: BTreeMap<String, f64>,
}

/// Runs one bench target with the gate's criterion settings and reads its results.
fn run_target(
    target: &Target,
    filter: Option<&str>,
    options: &Options,
    work_dir: &Path,
) -> Result<TargetRun> {
    let home = work_dir.join(target.bench);
    if home.exists() {
        std::fs::remove_dir_all(&home)
            .with_context(|| format!("could not clear {}", home.display()))?;
    }
    let mut cmd = cargo_bench();
    cmd.args(["--bench", target.bench, "--"])
        .args(CRITERION_ARGS)
        .args(filter)
        .env("CRITERION_HOME", &home);
    match &options.slow {
        Some(id) => cmd.env(SLOW_ENV, id),
        None => cmd.env_remove(SLOW_ENV),
    };
    println!("\nperf-gate: {} ({})", target.bench, target.package);
    crate::run_cmd(cmd)?;

    let medians = read_medians(&home)?;
    let calibration_ns = *medians.get(CALIBRATION).with_context(|| {
        format!(
            "bench target `{}` ran no `{CALIBRATION}` benchmark: it must register \
             `calibration::bench` (benches/calibration.rs)",
            target.bench
        )
    })?;
    ensure!(
        calibration_ns > 0.0,
        "bench target `{}`: calibration median is {calibration_ns} ns",
        target.bench
    );
    let ratios = medians
        .into_iter()
        .filter(|(id, _)| id != CALIBRATION)
        .map(|(id, ns)| (format!("{}/{id}", target.bench), ns / calibration_ns))
        .collect();
    Ok(TargetRun {
        calibration_ns,
        ratios,
    })
}

/// Criterion's results under `home`: full benchmark id → median time per iteration (ns), from
/// every `<id dir>/new/{benchmark,estimates}.json`.
fn read_medians(home: &Path) -> Result<BTreeMap<String, f64>> {
    let mut files = Vec::new();
    find_benchmark_files(home, &mut files)?;
    let mut medians = BTreeMap::new();
    for file in files {
        let dir = file.parent().context("benchmark.json has no parent")?;
        let id = read_json(&file)?["full_id"]
            .as_str()
            .with_context(|| format!("{}: no `full_id`", file.display()))?
            .to_owned();
        let estimates = dir.join("estimates.json");
        let median = read_json(&estimates)?["median"]["point_estimate"]
            .as_f64()
            .with_context(|| format!("{}: no `median.point_estimate`", estimates.display()))?;
        medians.insert(id, median);
    }
    Ok(medians)
}

fn find_benchmark_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            find_benchmark_files(&path, out)?;
        } else if path.file_name().is_some_and(|n| n == "benchmark.json")
            && path
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n == "new")
        {
            out.push(path);
        }
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// `s` with the regex metacharacters escaped (benchmark ids in criterion's filter).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The committed baseline: ratios to the calibration, and where and when they were measured.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Baseline {
    pub machine: String,
    pub date: String,
    /// Calibration median per bench target, in ns (for information: not compared).
    pub calibration_ns: BTreeMap<String, f64>,
    /// `<bench>/<criterion id>` → median / calibration median.
    pub ratios: BTreeMap<String, f64>,
}

impl Baseline {
    /// Reads and checks a baseline file; every failure says what to do.
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let bless = "record one with `cargo xtask perf-gate --bless`";
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("perf baseline {} not found: {bless}", path.display())
            }
            Err(e) => {
                return Err(e).with_context(|| format!("could not read {}", path.display()));
            }
        };
        Self::parse(&text).with_context(|| {
            format!(
                "perf baseline {} is corrupt: fix it or {bless}",
                path.display()
            )
        })
    }

    pub(crate) fn parse(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("not valid JSON")?;
        let format = v["format"].as_u64().context("no `format` number")?;
        ensure!(format == FORMAT, "format {format}, expected {FORMAT}");
        let string = |key: &str| {
            v[key]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("no `{key}` string"))
        };
        let numbers = |key: &str| -> Result<BTreeMap<String, f64>> {
            let map = v[key]
                .as_object()
                .with_context(|| format!("no `{key}` object"))?;
            map.iter()
                .map(|(id, x)| {
                    let x = x
                        .as_f64()
                        .filter(|x| x.is_finite() && *x > 0.0)
                        .with_context(|| format!("`{key}.{id}` is not a positive number: {x}"))?;
                    Ok((id.clone(), x))
                })
                .collect()
        };
        let ratios = numbers("ratios")?;
        ensure!(!ratios.is_empty(), "`ratios` is empty");
        Ok(Self {
            machine: string("machine")?,
            date: string("date")?,
            calibration_ns: numbers("calibration_ns")?,
            ratios,
        })
    }

    pub(crate) fn to_json(&self) -> String {
        let v = json!({
            "format": FORMAT,
            "what": "median time of each benchmark / median time of the calibration workload \
                     (benches/calibration.rs) in the same process; written by \
                     `cargo xtask perf-gate --bless`, compared by `cargo xtask perf-gate` \
                     (xtask/src/perf.rs) with a 25% tolerance",
            "machine": self.machine,
            "date": self.date,
            "profile": PROFILE,
            "criterion_args": CRITERION_ARGS.join(" "),
            "calibration_ns": self.calibration_ns,
            "ratios": self.ratios,
        });
        let mut text = serde_json::to_string_pretty(&v).unwrap_or_default();
        text.push('\n');
        text
    }

    fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, self.to_json())
            .with_context(|| format!("could not write {}", path.display()))
    }

    fn table(&self) -> String {
        let mut out =
            String::from("\nbenchmark                                              ratio\n");
        for (id, r) in &self.ratios {
            let _ = writeln!(out, "{id:<52} {r:>8.4}");
        }
        out
    }
}

/// One benchmark in both the baseline and the current run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub id: String,
    pub baseline: f64,
    pub current: f64,
}

impl Row {
    /// Relative change of the ratio: +0.30 is 30% slower than the baseline.
    pub(crate) fn change(&self) -> f64 {
        self.current / self.baseline - 1.0
    }

    pub(crate) fn regressed(&self, tolerance: f64) -> bool {
        self.change() > tolerance
    }
}

/// The baseline against the current run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Comparison {
    /// Benchmarks in both, sorted by id.
    pub rows: Vec<Row>,
    /// In the baseline, not run now.
    pub missing: Vec<String>,
    /// Run now, not in the baseline.
    pub new: Vec<String>,
}

/// Compares current ratios with the baseline's (the pass/fail decision is
/// [`Comparison::verdict`]).
pub(crate) fn compare(
    baseline: &BTreeMap<String, f64>,
    current: &BTreeMap<String, f64>,
) -> Comparison {
    let rows = baseline
        .iter()
        .filter_map(|(id, &b)| {
            current.get(id).map(|&c| Row {
                id: id.clone(),
                baseline: b,
                current: c,
            })
        })
        .collect();
    let missing = baseline
        .keys()
        .filter(|id| !current.contains_key(*id))
        .cloned()
        .collect();
    let new = current
        .keys()
        .filter(|id| !baseline.contains_key(*id))
        .cloned()
        .collect();
    Comparison { rows, missing, new }
}

impl Comparison {
    pub(crate) fn regressions(&self, tolerance: f64) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(move |r| r.regressed(tolerance))
    }

    /// Ok when no benchmark regressed beyond `tolerance` and the benchmark sets match; else an
    /// error listing every problem.
    pub(crate) fn verdict(&self, tolerance: f64) -> Result<()> {
        let mut problems = Vec::new();
        let regressions: Vec<String> = self
            .regressions(tolerance)
            .map(|r| {
                format!(
                    "{} is {:+.1}% (ratio {:.4}, baseline {:.4})",
                    r.id,
                    100.0 * r.change(),
                    r.current,
                    r.baseline
                )
            })
            .collect();
        if !regressions.is_empty() {
            problems.push(format!(
                "{} benchmark(s) regressed by more than {:.0}%:\n  {}",
                regressions.len(),
                100.0 * tolerance,
                regressions.join("\n  ")
            ));
        }
        if !self.missing.is_empty() {
            problems.push(format!(
                "{} benchmark(s) in the baseline did not run (renamed or removed? re-bless with \
                 `cargo xtask perf-gate --bless`):\n  {}",
                self.missing.len(),
                self.missing.join("\n  ")
            ));
        }
        if !self.new.is_empty() {
            problems.push(format!(
                "{} benchmark(s) have no baseline (new? re-bless with \
                 `cargo xtask perf-gate --bless`):\n  {}",
                self.new.len(),
                self.new.join("\n  ")
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        bail!("perf gate failed: {}", problems.join("\n"))
    }

    /// A table of every benchmark, for the log.
    pub(crate) fn table(&self, tolerance: f64) -> String {
        let mut out = format!(
            "\n{:<52} {:>9} {:>9} {:>8}\n",
            "benchmark", "baseline", "now", "change"
        );
        for r in &self.rows {
            let flag = if r.regressed(tolerance) {
                "  REGRESSED"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{:<52} {:>9.4} {:>9.4} {:>+7.1}%{flag}",
                r.id,
                r.baseline,
                r.current,
                100.0 * r.change()
            );
        }
        for id in &self.missing {
            let _ = writeln!(out, "{id:<52} missing (in the baseline, not run)");
        }
        for id in &self.new {
            let _ = writeln!(out, "{id:<52} new (not in the baseline)");
        }
        out
    }
}

/// The machine, in words: OS, arch, CPU model and thread count.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let threads = std::thread::available_parallelism().map_or(0, usize::from);
    format!(
        "{} {}, {cpu}, {threads} threads",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// Today's UTC date, `YYYY-MM-DD`.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests;
