//! The fuzz smoke of `cargo xtask ci --fuzz`: each libFuzzer target of `fuzz/` run once over its
//! committed seed corpus (`-runs=0`: no mutation, a few seconds in all), when
//! `cargo +nightly fuzz` is available; otherwise a one-line skip. Long fuzzing runs are manual
//! (README.md, "Fuzzing"; results in RELIABILITY.md).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::Result;

/// The targets of `fuzz/Cargo.toml`, each with a seed corpus in `fuzz/corpus/<target>/`.
pub(crate) const TARGETS: [&str; 5] = [
    "gguf_reader",
    "safetensors_config",
    "chat_template",
    "generate_request",
    "kv_scheduler_ops",
];

/// `cargo +nightly <args>` from the workspace root, through the rustup proxy (the `cargo` that
/// runs xtask is the pinned stable one, which does not take `+nightly`), building into
/// `<target dir>/fuzz` so that nightly's instrumented builds never replace the stable ones.
fn nightly_cargo(args: &[&str]) -> Command {
    let root = crate::workspace_root();
    let target_dir = target_dir("fuzz");
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly")
        .args(args)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", target_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC");
    cmd
}

/// `<target dir>/<sub>`: the fuzz crate's builds stay apart from the workspace's.
fn target_dir(sub: &str) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::workspace_root().join("target"), PathBuf::from)
        .join(sub)
}

/// Whether `cargo +nightly fuzz` runs here.
fn available() -> bool {
    nightly_cargo(&["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Lints the fuzz crate (a workspace of its own, so the root's clippy step never sees it) with
/// the pinned stable toolchain, into `<target dir>/fuzz-clippy`; then builds every target (no
/// sanitizer: the code under test has no `unsafe`) and runs each over its seed corpus, failing
/// on the first crash. The second part skips, succeeding, without cargo-fuzz.
pub(crate) fn smoke() -> Result<()> {
    let clippy_dir = target_dir("fuzz-clippy");
    let mut clippy = crate::cargo();
    clippy
        .args([
            "clippy",
            "--manifest-path",
            "fuzz/Cargo.toml",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ])
        .env("CARGO_TARGET_DIR", clippy_dir);
    crate::run_cmd(clippy)?;
    if !available() {
        println!(
            "fuzz smoke skipped: `cargo +nightly fuzz` is not available \
             (rustup toolchain install nightly; cargo install cargo-fuzz --locked)"
        );
        return Ok(());
    }
    crate::run_cmd(nightly_cargo(&["fuzz", "build", "-s", "none"]))?;
    for target in TARGETS {
        let corpus = format!("fuzz/corpus/{target}");
        crate::run_cmd(nightly_cargo(&[
            "fuzz", "run", "-s", "none", target, &corpus, "--", "-runs=0",
        ]))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target has a seed corpus and a `[[bin]]` in fuzz/Cargo.toml, and vice versa.
    #[test]
    fn targets_match_the_fuzz_crate() {
        let root = crate::workspace_root().join("fuzz");
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(bins, TARGETS.len(), "fuzz/Cargo.toml has {bins} targets");
        for target in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target}"
            );
            let seeds =
                std::fs::read_dir(root.join("corpus").join(target)).map_or(0, |d| d.count());
            assert!(seeds > 0, "fuzz/corpus/{target} has no seed");
            assert!(
                root.join("fuzz_targets")
                    .join(format!("{target}.rs"))
                    .is_file(),
                "{target}.rs"
            );
        }
    }
}
