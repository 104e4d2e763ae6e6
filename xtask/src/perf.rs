//! `cargo xtask perf-gate`: the CPU performance gate of CI (the last step of `cargo xtask ci`).
//!
//! Runs the criterion benchmarks of [`TARGETS`] with short settings ([`CRITERION_ARGS`]), turns
//! each benchmark's median time into a ratio to a calibration workload measured right before
//! and right after it, and compares those ratios with the committed baseline
//! ([`DEFAULT_BASELINE`]).
//!
//! # Calibration, next to each benchmark
//!
//! Every gated bench target registers `benches/calibration.rs` (a fixed, deterministic CPU
//! workload: a small f32 matrix multiply, a hashing pass and a sort, about 50–100 µs) as its
//! first benchmark, `calibration`. The gate compares `median(benchmark) / median(calibration)`,
//! never absolute times: a machine that is uniformly 2× slower leaves the ratios unchanged.
//!
//! What matters is that the calibration sees the machine the benchmark saw. On a shared
//! machine the speed drifts within seconds (another build starts, a neighbour finishes), so a
//! single calibration per target, measured once before a minute of benchmarks, skews every
//! ratio measured after the drift. The gate therefore runs the bench binary once per
//! benchmark, with criterion's filter `^(calibration|<id>)$`, and then once more with
//! `^calibration$` only; in time order a target's run is
//!
//! ```text
//! cal₀ b₁ | cal₁ b₂ | … | calₙ₋₁ bₙ | calₙ        (| = a new process)
//! ```
//!
//! and `ratio(bᵢ) = median(bᵢ) / mean(median(calᵢ₋₁), median(calᵢ))`: the mean of the
//! calibrations measured immediately before and after it, each within about a second of it
//! ([`bracketed_ratios`]). A drift that is linear over those two seconds cancels exactly.
//! The calibration before is in the benchmark's process, the one after in the next process
//! (same binary, same build): the bracket costs one calibration per benchmark, not two.
//! The bench binaries are run directly (their paths come from cargo's build messages), so a
//! process costs a few milliseconds more than the work it times.
//!
//! # One thread
//!
//! The bench processes run with `RAYON_NUM_THREADS=1`. The calibration is single-threaded;
//! the CPU decode is not (rayon splits its matmuls), so with two threads its ratio measured
//! how free the *second* core was: a batch-8 step swung between 800 and 1400 calibrations
//! from one pass to the next on this 2-core machine. With one thread both sides of the ratio
//! need one core, and the gate still sees every change to the work a step does; what it no
//! longer sees is a change in how well that work splits across threads.
//!
//! # The CPU decode
//!
//! A SmolLM2-135M decode step streams about 80 MB of weights, more than the 4 MB L2 and most
//! of the 105 MB L3 this VM shares with the host's other guests; the calibration lives in L1.
//! How much of the weights stay in L3 depends on the neighbours, so the decode's ratio moves
//! with them whatever the calibration does: on 2026-12-03 single measurements of the batch-1
//! step ranged from 400 to 877 calibrations and of batch 8 from 1262 to 3620 (baseline 412
//! and 1743), and a check with the 25% tolerance failed batch 8 in all four measurements
//! without any change. The `cpu_decode` target therefore has its own tolerance,
//! [`DECODE_TOLERANCE`] (100%): it catches a decode that got 2× slower (the slowed-benchmark
//! test is 4×), not a 60% one; the other 42 benchmarks, which fit in L2, have [`TOLERANCE`].
//!
//! # Tolerance, and why the gate does not fail without a regression
//!
//! A benchmark regresses when its ratio grows by more than its target's tolerance
//! ([`TOLERANCE`], 50%, for all but the CPU decode) over the baseline's:
//! `current / baseline - 1 > 0.5`. The issue suggested 25%; on this shared 2-core machine the
//! best of four bracketed measurements still reached +24.7% without any change (2026-12-03,
//! BENCHMARKS.md), which leaves no margin, so the gate states 50%: a 1.5× slowdown of any
//! benchmark fails it, noise of the size measured does not. Faster is never a failure (re-bless to lock in
//! a gain). A red CI without a regression blocks everyone, so a benchmark fails the gate only
//! when it is over the line in **every** one of 1 + [`REMEASURES`] (4) measurements, each with
//! its own fresh calibration bracket: after the first pass, the benchmarks over the line are
//! measured again (only those, in the same bracketed way), in up to [`REMEASURES`] rounds at
//! least [`ROUND_GAP`] (15 s) apart, and each keeps its best ratio. The false-failure reasoning:
//!
//! - A disturbance that slows the machine uniformly slows the calibrations either side as much
//!   as the benchmark, and cancels out of the ratio (drift over the bracket cancels too).
//! - A disturbance that slows one benchmark more than its calibrations (a neighbour busy for a
//!   second, or one that hurts a cache-bound benchmark more than the calibration: on this
//!   machine a guest elsewhere on the host moved the calibration from 60 to 105 µs for ~15 s
//!   at a local load average near 1, and moved single ratios by up to ±30%) must then hit the
//!   same benchmark in four measurements spread over at least 45 s.
//! - If one measurement is falsely over the line with probability p and the rounds were
//!   independent, a benchmark would fail falsely with p⁴: 6·10⁻⁶ for p = 5%, about 3·10⁻⁴ for
//!   the 44 benchmarks together. They are not fully independent (a disturbance can last
//!   minutes), which is why there are four and why they are spread out.
//!
//! A real slowdown is over the line every time: the gate's own test slows one benchmark 4×
//! (`KVSERVE_PERF_GATE_SLOW`) and must see it fail. The baseline holds each benchmark's median
//! ratio over [`BLESS_PASSES`] (3) full passes (a typical measurement: neither a lucky one nor
//! one a disturbed pass pulled off). A benchmark in the baseline that did not run, or one that
//! ran but has no baseline, fails the gate too, with a message saying to re-bless.
//!
//! # Time
//!
//! A benchmark costs about 1.6 s (its calibration and itself, each 0.2 s of warm-up and 0.5 s
//! of measurement, plus criterion's analysis); the CPU decode ones more (a one-thread batch-8
//! step is about 0.25 s, and building the dummy SmolLM2 weights takes seconds). One pass over
//! the 44 benchmarks takes about 100 s on this 2-core machine (BENCHMARKS.md has measured
//! runs: 104–188 s in all, re-measurements included); a re-measurement round costs the same per
//! benchmark, for the benchmarks over the line only, plus at most 15 s of waiting. The worst
//! case (every benchmark over the line in every round: a failing run anyway) is 4 passes and
//! 45 s, about 7.5 minutes. Building the four bench binaries in
//! the dev profile after CI's test step takes about 45 s more; blessing is 3 passes.
//!
//! # Why criterion, read from its files
//!
//! The benches stay ordinary criterion benches (`cargo bench` keeps working as before); the
//! gate only shortens them from the command line (criterion's flags override the config in
//! `criterion_group!`), lists them (`--list`), and reads each result from
//! `new/benchmark.json` (the benchmark's full id) and `new/estimates.json` (the median) under a
//! private `CRITERION_HOME` per target, wiped before each process, so no stale result from an
//! earlier run is ever read.
//!
//! `cargo xtask perf-gate --bless` rewrites the baseline (ratios, machine and date) from a
//! fresh run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

/// Largest accepted growth of a benchmark's ratio over its baseline (0.5 = 50% slower), for
/// every target but the CPU decode.
pub(crate) const TOLERANCE: f64 = 0.5;

/// The CPU decode's tolerance (1.0 = 2× slower): see the module doc, "The CPU decode".
pub(crate) const DECODE_TOLERANCE: f64 = 1.0;

/// The committed baseline, relative to the workspace root.
pub(crate) const DEFAULT_BASELINE: &str = "benches/perf-baseline.json";

/// Re-measurement rounds for the benchmarks over the tolerance (each keeps its best ratio, so
/// a benchmark fails only when all 1 + `REMEASURES` measurements are over the line).
const REMEASURES: usize = 3;

/// The least time from the end of one measurement round to the start of the next re-measurement
/// round: a benchmark's measurements then span at least `REMEASURES` × this.
const ROUND_GAP: Duration = Duration::from_secs(15);

/// Full passes when blessing (the baseline holds each benchmark's median ratio).
const BLESS_PASSES: usize = 3;

/// The benchmark id of the calibration workload in every target (`benches/calibration.rs`).
const CALIBRATION: &str = "calibration";

/// The environment variable that makes one benchmark repeat its work 4 times
/// (`benches/calibration.rs`, `slowdown`).
const SLOW_ENV: &str = "KVSERVE_PERF_GATE_SLOW";

/// Version of the baseline file's layout and of what its ratios mean (2: the calibration
/// brackets each benchmark; 1 had one calibration per target).
const FORMAT: u64 = 2;

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
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Target {
    pub package: &'static str,
    pub bench: &'static str,
    /// Largest accepted growth of its benchmarks' ratios.
    pub tolerance: f64,
}

/// The gated bench targets: block manager step bookkeeping, scheduler step, KV-quant codecs,
/// CPU decode of SmolLM2 (shape of SmolLM2-135M, dummy Q4_1 weights).
pub(crate) const TARGETS: &[Target] = &[
    Target {
        package: "kv-block-manager",
        bench: "block_manager",
        tolerance: TOLERANCE,
    },
    Target {
        package: "scheduler",
        bench: "schedule",
        tolerance: TOLERANCE,
    },
    Target {
        package: "kv-quant",
        bench: "codecs",
        tolerance: TOLERANCE,
    },
    Target {
        package: "model",
        bench: "cpu_decode",
        tolerance: DECODE_TOLERANCE,
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
    /// The gap between re-measurement rounds (default [`ROUND_GAP`]; the gate's own tests
    /// shorten it).
    #[arg(skip)]
    round_gap: Option<Duration>,
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

    let binaries = build(&targets)?;
    let mut plan = Vec::new();
    for binary in &binaries {
        let ids = binary.list(options.filter.as_deref())?;
        plan.push((binary, ids));
    }
    let count: usize = plan.iter().map(|(_, ids)| ids.len()).sum();
    ensure!(
        count > 0,
        "no benchmark matches the filter `{}`",
        options.filter.as_deref().unwrap_or_default()
    );

    // A baseline is the median of three full passes (a typical measurement, neither a lucky
    // one nor one a disturbed pass pulled off); the gate compares its first pass with it.
    let passes = if options.bless { BLESS_PASSES } else { 1 };
    let mut ratio_passes: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut calibration_passes: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for pass in 1..=passes {
        println!("\nperf-gate: pass {pass}/{passes}, {count} benchmark(s)");
        for (binary, ids) in &plan {
            let run = binary.measure(ids, options, &work_dir)?;
            calibration_passes
                .entry(binary.target.bench.to_owned())
                .or_default()
                .push(run.calibration_ns);
            for (id, ratio) in run.ratios {
                ratio_passes.entry(id).or_default().push(ratio);
            }
        }
    }
    let mut current = medians_of(&ratio_passes);
    let calibration_ns = medians_of(&calibration_passes);

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
    let mut last_round = Instant::now();
    for attempt in 1..=REMEASURES {
        let regressed: Vec<String> = comparison.regressions().map(|r| r.id.clone()).collect();
        if regressed.is_empty() {
            break;
        }
        println!(
            "\nperf-gate: {} benchmark(s) over the tolerance, measuring them again \
             ({attempt}/{REMEASURES}): {}",
            regressed.len(),
            regressed.join(", ")
        );
        let gap = options.round_gap.unwrap_or(ROUND_GAP);
        let wait = gap.saturating_sub(last_round.elapsed());
        if !wait.is_zero() {
            println!(
                "perf-gate: waiting {:.0}s first (rounds are {:.0}s apart)",
                wait.as_secs_f64(),
                gap.as_secs_f64()
            );
            std::thread::sleep(wait);
        }
        for binary in &binaries {
            let prefix = format!("{}/", binary.target.bench);
            let ids: Vec<String> = regressed
                .iter()
                .filter_map(|id| id.strip_prefix(&prefix))
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let again = binary.measure(&ids, options, &work_dir)?;
                keep_better(&mut current, again.ratios);
            }
        }
        comparison = compare(&expected, &current);
        last_round = Instant::now();
    }
    print!("{}", comparison.table());
    println!(
        "perf-gate: baseline {} ({}, {}), {:.0}s",
        baseline_path.display(),
        baseline.machine,
        baseline.date,
        start.elapsed().as_secs_f64()
    );
    comparison.verdict()
}

/// The median of each list (the mean of the middle two for an even count); empty lists are
/// left out.
fn medians_of(lists: &BTreeMap<String, Vec<f64>>) -> BTreeMap<String, f64> {
    lists
        .iter()
        .filter(|(_, xs)| !xs.is_empty())
        .map(|(id, xs)| {
            let mut xs = xs.clone();
            xs.sort_by(f64::total_cmp);
            let mid = xs.len() / 2;
            let median = if xs.len() % 2 == 0 {
                (xs[mid - 1] + xs[mid]) / 2.0
            } else {
                xs[mid]
            };
            (id.clone(), median)
        })
        .collect()
}

/// The tolerance of the benchmark `id`: its target's ([`TOLERANCE`] for an unknown target).
fn tolerance_of(id: &str) -> f64 {
    TARGETS
        .iter()
        .find(|t| owns(t, id))
        .map_or(TOLERANCE, |t| t.tolerance)
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

/// Builds every bench binary in one `cargo bench --no-run` (cargo compiles them in parallel),
/// in the gate's profile with the workspace's feature set (as the test step), and returns
/// where cargo put each.
fn build(targets: &[Target]) -> Result<Vec<BenchBinary>> {
    let mut cmd = crate::cargo();
    cmd.args(["bench", "--locked", "--workspace", "--profile", PROFILE])
        .args(["--no-run", "--message-format", "json-render-diagnostics"]);
    for t in targets {
        cmd.args(["--bench", t.bench]);
    }
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    ensure!(output.status.success(), "{cmd:?} failed: {}", output.status);
    let messages = String::from_utf8_lossy(&output.stdout);
    bench_binaries(&messages, targets)
}

/// The bench executables of `targets` in cargo's JSON build messages (`--message-format
/// json`): one `compiler-artifact` line with an `executable` per bench target.
fn bench_binaries(messages: &str, targets: &[Target]) -> Result<Vec<BenchBinary>> {
    let mut found: BTreeMap<String, (PathBuf, PathBuf)> = BTreeMap::new();
    for line in messages.lines().filter(|l| l.starts_with('{')) {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_bench = msg["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "bench"));
        if msg["reason"] != "compiler-artifact" || !is_bench {
            continue;
        }
        let (Some(name), Some(exe), Some(manifest)) = (
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
            msg["manifest_path"].as_str(),
        ) else {
            continue;
        };
        let dir = Path::new(manifest)
            .parent()
            .with_context(|| format!("bench `{name}`: manifest path {manifest} has no folder"))?;
        found.insert(name.to_owned(), (PathBuf::from(exe), dir.to_owned()));
    }
    targets
        .iter()
        .map(|&target| {
            let (executable, package_dir) = found.remove(target.bench).with_context(|| {
                format!(
                    "cargo built no executable for bench target `{}` (package {})",
                    target.bench, target.package
                )
            })?;
            Ok(BenchBinary {
                target,
                executable,
                package_dir,
            })
        })
        .collect()
}

/// A built bench target.
#[derive(Debug, Clone, PartialEq)]
struct BenchBinary {
    target: Target,
    executable: PathBuf,
    /// Its package's folder: the working directory `cargo bench` would give it.
    package_dir: PathBuf,
}

/// What one bracketed run of a target's benchmarks measured.
#[derive(Debug)]
struct TargetRun {
    /// Mean of every calibration median of the run, in ns.
    calibration_ns: f64,
    /// `<bench>/<criterion id>` → median / mean of the calibrations either side.
    ratios: BTreeMap<String, f64>,
}

impl BenchBinary {
    /// The criterion ids of the benchmarks to gate (the calibration left out), from the
    /// binary's `--list`, narrowed by `filter`.
    fn list(&self, filter: Option<&str>) -> Result<Vec<String>> {
        let mut cmd = self.command();
        cmd.args(["--list", "--format", "terse"]);
        if let Some(f) = filter {
            cmd.arg(format!("^{CALIBRATION}$|{f}"));
        }
        let stdout = self.output(cmd)?;
        parse_list(self.target.bench, &stdout)
    }

    /// Measures `ids` one process each (calibration, then the benchmark), then the
    /// calibration once more, and returns each benchmark's ratio to the mean of the
    /// calibrations before and after it.
    fn measure(&self, ids: &[String], options: &Options, work_dir: &Path) -> Result<TargetRun> {
        let bench = self.target.bench;
        println!(
            "perf-gate: {bench} ({}), {} benchmark(s)",
            self.target.package,
            ids.len()
        );
        let home = work_dir.join(bench);
        let mut samples = Vec::with_capacity(2 * ids.len() + 1);
        for id in ids {
            let medians = self.run_criterion(
                &format!("^({CALIBRATION}|{})$", regex_escape(id)),
                options,
                &home,
            )?;
            let (calibration, median) = pair_medians(bench, &medians, Some(id))?;
            samples.push(Sample::Calibration(calibration));
            samples.push(Sample::Benchmark(id.clone(), median));
        }
        let medians = self.run_criterion(&format!("^{CALIBRATION}$"), options, &home)?;
        samples.push(Sample::Calibration(pair_medians(bench, &medians, None)?.0));

        let brackets =
            bracketed_ratios(&samples).with_context(|| format!("bench target `{bench}`"))?;
        // In the order they ran: a line's calibration after is the next line's before.
        for (id, b) in ids.iter().filter_map(|id| Some((id, brackets.get(id)?))) {
            println!(
                "  {id:<60} ratio {:>9.4}  (calibration {:.1} → {:.1} µs)",
                b.ratio,
                b.before_ns.unwrap_or(f64::NAN) / 1e3,
                b.after_ns.unwrap_or(f64::NAN) / 1e3,
            );
        }
        let calibrations: Vec<f64> = samples
            .iter()
            .filter_map(|s| match s {
                Sample::Calibration(ns) => Some(*ns),
                Sample::Benchmark(..) => None,
            })
            .collect();
        Ok(TargetRun {
            calibration_ns: calibrations.iter().sum::<f64>() / calibrations.len() as f64,
            ratios: brackets
                .into_iter()
                .map(|(id, b)| (format!("{bench}/{id}"), b.ratio))
                .collect(),
        })
    }

    /// Runs the binary once with the gate's criterion settings and `filter`, in a freshly
    /// wiped `CRITERION_HOME`, and reads the medians it wrote.
    fn run_criterion(
        &self,
        filter: &str,
        options: &Options,
        home: &Path,
    ) -> Result<BTreeMap<String, f64>> {
        if home.exists() {
            std::fs::remove_dir_all(home)
                .with_context(|| format!("could not clear {}", home.display()))?;
        }
        let mut cmd = self.command();
        cmd.args(CRITERION_ARGS)
            .arg(filter)
            .env("CRITERION_HOME", home);
        match &options.slow {
            Some(id) => cmd.env(SLOW_ENV, id),
            None => cmd.env_remove(SLOW_ENV),
        };
        self.output(cmd)?;
        read_medians(home)
    }

    /// The binary in criterion's benchmark mode (`--bench`, as `cargo bench` passes it), in
    /// its package's folder, with one rayon thread (see the module doc, "One thread").
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.executable);
        cmd.current_dir(&self.package_dir)
            .arg("--bench")
            .env("RAYON_NUM_THREADS", "1");
        cmd
    }

    /// Runs `cmd` to completion and returns its stdout; a failure shows its output.
    fn output(&self, mut cmd: Command) -> Result<String> {
        let output = cmd
            .output()
            .with_context(|| format!("could not start {cmd:?}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "bench target `{}` failed ({}): {cmd:?}\n{stdout}{}",
                self.target.bench,
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(stdout)
    }
}

/// The benchmark ids in a bench binary's `--list --format terse` output (one `<id>:
/// benchmark` line each), without the calibration, which must be there.
fn parse_list(bench: &str, stdout: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut calibration = false;
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let id = line.strip_suffix(": benchmark").with_context(|| {
            format!("bench target `{bench}`: unexpected line in its `--list` output: {line:?}")
        })?;
        // Criterion cuts titles over 100 characters and appends "...": such an id cannot be
        // selected exactly.
        ensure!(
            !id.ends_with("..."),
            "bench target `{bench}`: benchmark id {id:?} is cut short by criterion (over 100 \
             characters): give it a shorter name"
        );
        if id == CALIBRATION {
            calibration = true;
        } else {
            ids.push(id.to_owned());
        }
    }
    ensure!(
        calibration,
        "bench target `{bench}` lists no `{CALIBRATION}` benchmark: it must register \
         `calibration::bench` (benches/calibration.rs) first"
    );
    Ok(ids)
}

/// The calibration median of one process's results, and the median of benchmark `id` when
/// one is expected; any other benchmark in the results is an error (the filter selects
/// exactly these).
fn pair_medians(
    bench: &str,
    medians: &BTreeMap<String, f64>,
    id: Option<&str>,
) -> Result<(f64, f64)> {
    let calibration = *medians.get(CALIBRATION).with_context(|| {
        format!(
            "bench target `{bench}` ran no `{CALIBRATION}` benchmark: it must register \
             `calibration::bench` (benches/calibration.rs)"
        )
    })?;
    let median = match id {
        Some(id) => *medians.get(id).with_context(|| {
            format!("bench target `{bench}`: benchmark `{id}` did not run (no result for it)")
        })?,
        None => calibration,
    };
    let extra: Vec<&str> = medians
        .keys()
        .map(String::as_str)
        .filter(|k| *k != CALIBRATION && Some(*k) != id)
        .collect();
    ensure!(
        extra.is_empty(),
        "bench target `{bench}`: unexpected results for {} (the filter should select only \
         `{CALIBRATION}` and {id:?})",
        extra.join(", ")
    );
    Ok((calibration, median))
}

/// One median, in the order the gate measured them.
#[derive(Debug, Clone, PartialEq)]
enum Sample {
    /// The calibration workload, ns.
    Calibration(f64),
    /// A benchmark (criterion id, without the target), ns.
    Benchmark(String, f64),
}

/// A benchmark's ratio and the calibrations it was divided by.
#[derive(Debug, Clone, PartialEq)]
struct Bracket {
    /// median / mean of the calibrations either side that exist.
    ratio: f64,
    /// The nearest calibration measured before it, ns.
    before_ns: Option<f64>,
    /// The nearest calibration measured after it, ns.
    after_ns: Option<f64>,
}

/// Each benchmark's median divided by the mean of the nearest calibration before it and the
/// nearest after it (only one of them when the other does not exist). A benchmark with no
/// calibration on either side, a benchmark measured twice, or a median that is not a positive
/// number is an error.
fn bracketed_ratios(samples: &[Sample]) -> Result<BTreeMap<String, Bracket>> {
    for s in samples {
        let (what, ns) = match s {
            Sample::Calibration(ns) => (CALIBRATION, *ns),
            Sample::Benchmark(id, ns) => (id.as_str(), *ns),
        };
        ensure!(
            ns.is_finite() && ns > 0.0,
            "median of `{what}` is {ns} ns, not a positive time"
        );
    }
    let calibration = |s: &Sample| match s {
        Sample::Calibration(ns) => Some(*ns),
        Sample::Benchmark(..) => None,
    };
    let mut out = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        let Sample::Benchmark(id, ns) = s else {
            continue;
        };
        let before_ns = samples[..i].iter().rev().find_map(calibration);
        let after_ns = samples[i + 1..].iter().find_map(calibration);
        let sides: Vec<f64> = before_ns.into_iter().chain(after_ns).collect();
        ensure!(
            !sides.is_empty(),
            "benchmark `{id}` has no calibration measured before or after it"
        );
        let mean = sides.iter().sum::<f64>() / sides.len() as f64;
        let bracket = Bracket {
            ratio: ns / mean,
            before_ns,
            after_ns,
        };
        ensure!(
            out.insert(id.clone(), bracket).is_none(),
            "benchmark `{id}` was measured twice in one run"
        );
    }
    Ok(out)
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
            .filter(|ns| ns.is_finite() && *ns > 0.0)
            .with_context(|| {
                format!(
                    "{}: no positive `median.point_estimate`",
                    estimates.display()
                )
            })?;
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
    /// Mean calibration median per bench target, in ns (for information: not compared).
    pub calibration_ns: BTreeMap<String, f64>,
    /// `<bench>/<criterion id>` → median / mean of the calibration medians either side.
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
            "what": "median time of each benchmark / mean of the medians of the calibration \
                     workload (benches/calibration.rs) measured right before and right after \
                     it; written by \
                     `cargo xtask perf-gate --bless`, compared by `cargo xtask perf-gate` \
                     (xtask/src/perf.rs) with a 50% tolerance (100% for cpu_decode)",
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
    /// Largest accepted [`Row::change`] (its target's).
    pub tolerance: f64,
}

impl Row {
    /// Relative change of the ratio: +0.30 is 30% slower than the baseline.
    pub(crate) fn change(&self) -> f64 {
        self.current / self.baseline - 1.0
    }

    pub(crate) fn regressed(&self) -> bool {
        self.change() > self.tolerance
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
                tolerance: tolerance_of(id),
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
    pub(crate) fn regressions(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.regressed())
    }

    /// Ok when no benchmark regressed beyond its tolerance and the benchmark sets match; else
    /// an error listing every problem.
    pub(crate) fn verdict(&self) -> Result<()> {
        let mut problems = Vec::new();
        let regressions: Vec<String> = self
            .regressions()
            .map(|r| {
                format!(
                    "{} is {:+.1}%, over its {:.0}% tolerance (ratio {:.4}, baseline {:.4})",
                    r.id,
                    100.0 * r.change(),
                    100.0 * r.tolerance,
                    r.current,
                    r.baseline
                )
            })
            .collect();
        if !regressions.is_empty() {
            problems.push(format!(
                "{} benchmark(s) regressed beyond their tolerance:\n  {}",
                regressions.len(),
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
    pub(crate) fn table(&self) -> String {
        let mut out = format!(
            "\n{:<52} {:>9} {:>9} {:>8}\n",
            "benchmark", "baseline", "now", "change"
        );
        for r in &self.rows {
            let flag = if r.regressed() { "  REGRESSED" } else { "" };
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
