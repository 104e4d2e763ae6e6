//! `cargo xtask ci`: the CI checks, in order, failing fast.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Flags of `cargo xtask ci`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Skip `cargo test` (for local iteration).
    #[arg(long)]
    skip_tests: bool,
    /// Skip `cargo clippy` (for local iteration).
    #[arg(long)]
    skip_clippy: bool,
    /// Skip the CPU perf gate (`cargo xtask perf-gate`), the last step (for local iteration:
    /// it builds four bench binaries and runs for about 2 minutes).
    #[arg(long)]
    no_perf: bool,
    /// Also run the fuzz smoke: clippy over the fuzz crate, then each fuzz target over its seed corpus. Off by default: it
    /// builds the fuzz crate with the nightly toolchain, about 14 minutes from clean on 2 cores
    /// (the fuzz regressions are ordinary tests of the test step). Skips by itself, with a
    /// message, when `cargo +nightly fuzz` is missing.
    #[arg(long)]
    fuzz: bool,
}

/// What a step does.
#[derive(Debug)]
enum Job {
    /// `cargo <args>`, with extra environment variables.
    Cargo {
        args: &'static [&'static str],
        env: Vec<(&'static str, String)>,
    },
    /// `cargo xtask deps`, called in-process.
    Deps,
    /// `cargo xtask perf-gate`, called in-process.
    PerfGate,
    /// The fuzz smoke ([`crate::fuzz::smoke`]), called in-process.
    FuzzSmoke,
}

#[derive(Debug)]
struct Step {
    name: &'static str,
    job: Job,
    skip: bool,
}

impl Step {
    fn cargo(name: &'static str, args: &'static [&'static str]) -> Self {
        let job = Job::Cargo {
            args,
            env: Vec::new(),
        };
        Step {
            name,
            job,
            skip: false,
        }
    }

    /// The step as a shell command line, for the header.
    fn command_line(&self) -> String {
        match &self.job {
            Job::Cargo { args, env } => {
                let env = env.iter().map(|(k, v)| format!("{k}='{v}' "));
                format!("{}cargo {}", env.collect::<String>(), args.join(" "))
            }
            Job::Deps => "cargo xtask deps (in-process)".to_owned(),
            Job::PerfGate => "cargo xtask perf-gate (in-process)".to_owned(),
            Job::FuzzSmoke => {
                "cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings; \
                 cargo +nightly fuzz run <target> fuzz/corpus/<target> -- -runs=0 (each target)"
                    .to_owned()
            }
        }
    }

    fn run(&self) -> Result<()> {
        match &self.job {
            Job::Cargo { args, env } => {
                let mut cmd = crate::cargo();
                cmd.args(*args).envs(env.iter().map(|(k, v)| (k, v)));
                crate::run_cmd(cmd)
            }
            Job::Deps => crate::deps::run(),
            Job::PerfGate => crate::perf::run(&crate::perf::Options::default()),
            Job::FuzzSmoke => crate::fuzz::smoke(),
        }
    }
}

/// The CI steps, in the order they run.
fn steps(options: &Options) -> Vec<Step> {
    // Keep any RUSTDOCFLAGS the caller set, and deny warnings on top.
    let mut rustdocflags = std::env::var("RUSTDOCFLAGS").unwrap_or_default();
    rustdocflags = format!("{rustdocflags} -D warnings")
        .trim_start()
        .to_owned();
    vec![
        Step::cargo("fmt", &["fmt", "--all", "--", "--check"]),
        Step {
            skip: options.skip_clippy,
            ..Step::cargo(
                "clippy",
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--locked",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
        },
        Step {
            name: "test",
            job: Job::Cargo {
                args: &["test", "--workspace", "--locked"],
                // NVRTC from PyPI, so kernels-cuda's compile check runs (no GPU needed).
                env: if options.skip_tests {
                    Vec::new()
                } else {
                    nvrtc_env()
                },
            },
            skip: options.skip_tests,
        },
        Step {
            name: "deps",
            job: Job::Deps,
            skip: false,
        },
        Step {
            name: "doc",
            job: Job::Cargo {
                args: &["doc", "--workspace", "--no-deps", "--locked"],
                env: vec![("RUSTDOCFLAGS", rustdocflags)],
            },
            skip: false,
        },
        Step {
            name: "fuzz",
            job: Job::FuzzSmoke,
            skip: !options.fuzz,
        },
        // Last (`--no-perf` skips it): it builds four bench binaries in the dev profile (about
        // 45 s once the test step has built their dependencies) and runs each benchmark next
        // to its own calibrations (about 2 minutes; xtask/src/perf.rs states the bounds).
        Step {
            name: "perf",
            job: Job::PerfGate,
            skip: options.no_perf,
        },
    ]
}

/// Runs the CI steps in order; stops at the first failure, naming the step.
pub(crate) fn run(options: &Options) -> Result<()> {
    let start = Instant::now();
    let steps = steps(options);
    let mut timings: Vec<(&str, Option<Duration>)> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let n = format!("[{}/{}]", i + 1, steps.len());
        if step.skip {
            let why = match step.job {
                Job::FuzzSmoke => {
                    " (the nightly fuzz build takes ~14 min on 2 cores: `cargo xtask ci --fuzz` \
                     runs it; the fuzz regression tests ran in the test step)"
                }
                _ => "",
            };
            println!("\n==> {n} {}: skipped{why}", step.name);
            timings.push((step.name, None));
            continue;
        }
        println!("\n==> {n} {}: {}", step.name, step.command_line());
        let step_start = Instant::now();
        let result = step.run();
        let elapsed = step_start.elapsed();
        if result.is_err() {
            println!(
                "<== {n} {} FAILED after {:.1}s",
                step.name,
                elapsed.as_secs_f64()
            );
        }
        result.with_context(|| format!("ci step `{}` failed", step.name))?;
        println!("<== {n} {} ok in {:.1}s", step.name, elapsed.as_secs_f64());
        timings.push((step.name, Some(elapsed)));
    }

    println!("\nci summary:");
    for (name, elapsed) in timings {
        match elapsed {
            Some(t) => println!("  {name:<8} ok       {:>7.1}s", t.as_secs_f64()),
            None => println!("  {name:<8} skipped"),
        }
    }
    println!(
        "  {:<8} ok       {:>7.1}s",
        "total",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// NVRTC and the CUDA headers, installed from PyPI into `target/nvrtc` (once), as the
/// environment kernels-cuda's compile check reads. Empty (the check then says it skipped)
/// when they cannot be had: no python3/pip, or no registry.
fn nvrtc_env() -> Vec<(&'static str, String)> {
    let dir = crate::workspace_root().join("target/nvrtc");
    let lib = dir.join("nvidia/cu13/lib");
    let include = dir.join("nvidia/cu13/include");
    if !lib.join("libnvrtc.so.13").is_file() || !include.join("cuda_fp16.h").is_file() {
        println!(
            "installing NVRTC 13.0 and the CUDA headers from PyPI into {}",
            dir.display()
        );
        let status = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-deps", "--upgrade", "--target"])
            .arg(&dir)
            .args(["nvidia-cuda-nvrtc==13.0.*", "nvidia-cuda-runtime==13.0.*"])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            println!("NVRTC could not be installed: the kernel compile check will be skipped");
            return Vec::new();
        }
    }
    let mut path = lib.display().to_string();
    if let Ok(old) = std::env::var("LD_LIBRARY_PATH")
        && !old.is_empty()
    {
        path = format!("{path}:{old}");
    }
    vec![
        ("LD_LIBRARY_PATH", path),
        ("KVSERVE_CUDA_INCLUDE", include.display().to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test step skipped: building its environment would install NVRTC with pip.
    fn options(no_perf: bool) -> Options {
        Options {
            skip_tests: true,
            skip_clippy: false,
            no_perf,
            fuzz: false,
        }
    }

    fn skipped(steps: &[Step]) -> Vec<&str> {
        steps.iter().filter(|s| s.skip).map(|s| s.name).collect()
    }

    #[test]
    fn the_perf_gate_is_the_last_step_and_on_by_default() {
        let steps = steps(&options(false));
        let last = steps.last().map(|s| (s.name, &s.job, s.skip));
        assert!(
            matches!(last, Some(("perf", Job::PerfGate, false))),
            "{last:?}"
        );
        assert_eq!(steps.iter().filter(|s| s.name == "perf").count(), 1);
        assert_eq!(skipped(&steps), ["test", "fuzz"]);
    }

    #[test]
    fn no_perf_skips_the_perf_gate() {
        assert_eq!(skipped(&steps(&options(true))), ["test", "fuzz", "perf"]);
    }

    #[test]
    fn the_fuzz_smoke_runs_before_the_perf_gate_only_when_asked() {
        let names: Vec<&str> = steps(&options(false)).iter().map(|s| s.name).collect();
        assert_eq!(names[names.len() - 2..], ["fuzz", "perf"]);
        let fuzz = Options {
            fuzz: true,
            ..options(false)
        };
        assert_eq!(skipped(&steps(&fuzz)), ["test"]);
    }
}
