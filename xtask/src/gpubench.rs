//! `cargo xtask bench --gpu`: kvserve against Hugging Face transformers on the GPU machine.
//!
//! The GPU machine has no cargo, so the command has two halves around one device call:
//!
//! 1. `cargo xtask bench --gpu` (here) builds the release `kvserve`, strips and gzips it into
//!    `.gpu/bin/kvserve.gz` (the device tool carries `.gpu`, at most 64 MiB) and prints the
//!    command to run there: `bash scripts/gpu_bench.sh "$OUT"`. That script runs `kvserve
//!    bench` on the Llama-3.1-8B shape with dummy weights (`benches/models/llama-3.1-8b`), saves
//!    the very requests it ran, runs `scripts/hf_bench.py` (transformers' `generate()` and its
//!    continuous batching) on them in the same call, and writes `gpu_bench.json` with the
//!    ratios.
//! 2. `cargo xtask bench --gpu --record DIR` (here, with the files the call brought back)
//!    appends those figures to `BENCHMARKS.md`, with the GPU's name and the date.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{cargo, run_cmd, workspace_root};

/// Builds and bundles `kvserve` for the GPU machine and prints what to run there.
pub(crate) fn bundle() -> Result<()> {
    let root = workspace_root();
    let mut build = cargo();
    build.args(["build", "--release", "-p", "serve-grpc", "--bin", "kvserve"]);
    run_cmd(build)?;
    let bin = root.join(".gpu/bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let dst = bin.join("kvserve");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
    std::fs::copy(target.join("release/kvserve"), &dst)
        .with_context(|| format!("copying kvserve to {}", dst.display()))?;
    let mut strip = Command::new("strip");
    strip.arg(&dst);
    run_cmd(strip).context("strip (binutils) shrinks the binary under the 64 MiB carry limit")?;
    let mut gzip = Command::new("gzip");
    gzip.args(["-9", "-f"]).arg(&dst);
    run_cmd(gzip)?;
    println!(
        "bundled {}.gz\n\
         on the GPU machine (device tool, carry [\".gpu\"]): bash scripts/gpu_bench.sh \"$OUT\"\n\
         then here: cargo xtask bench --gpu --record <the folder of gpu_bench.json>",
        dst.display()
    );
    Ok(())
}

/// Appends the figures of `dir/gpu_bench.json` to `BENCHMARKS.md`.
pub(crate) fn record(dir: &Path) -> Result<()> {
    let file = dir.join("gpu_bench.json");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let section = render(&text).with_context(|| format!("in {}", file.display()))?;
    let out = workspace_root().join("BENCHMARKS.md");
    let mut doc =
        std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    doc.push('\n');
    doc.push_str(&section);
    std::fs::write(&out, doc).with_context(|| format!("writing {}", out.display()))?;
    println!("appended to {}:\n\n{section}", out.display());
    Ok(())
}

/// The BENCHMARKS.md section of a `gpu_bench.json`.
pub(crate) fn render(json: &str) -> Result<String> {
    let v: Value = serde_json::from_str(json).context("gpu_bench.json is not JSON")?;
    let text = |key: &str| -> Result<&str> {
        v[key]
            .as_str()
            .with_context(|| format!("`{key}` is missing or not a string"))
    };
    let (gpu, date) = (text("gpu")?, text("date_utc")?);
    let runs = v["kvserve"]
        .as_object()
        .filter(|m| !m.is_empty())
        .context("`kvserve` holds no run")?;
    let hf = &v["hf"]["modes"];
    let hf_rate = |mode: &str| hf[mode]["output_tok_s"].as_f64();
    let ratio = |x: f64, y: Option<f64>| y.map_or("-".to_owned(), |y| format!("{:.1}×", x / y));
    let mut s = String::new();
    let day = date.get(..10).unwrap_or(date);
    writeln!(
        s,
        "## kvserve vs Hugging Face transformers, Llama-3.1-8B shape ({gpu}, {day})\n"
    )?;
    writeln!(
        s,
        "`cargo xtask bench --gpu`, then `bash scripts/gpu_bench.sh` on the GPU machine ({date}): \
         the ShareGPT-like workload (`kvserve bench --workload sharegpt`, seed 0), dummy bf16 \
         weights, the same requests for every engine.\n"
    )?;
    writeln!(
        s,
        "| engine | requests | output tok/s | TTFT p50 | TPOT p50 | vs HF generate() | vs HF generate_batch |"
    )?;
    writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for (kv, r) in runs {
        let num = |k: &str| -> Result<f64> {
            r[k].as_f64()
                .with_context(|| format!("kvserve run {kv}: `{k}` is missing"))
        };
        let tok_s = num("output_tok_s")?;
        writeln!(
            s,
            "| kvserve (KV {kv}) | {} | {tok_s:.0} | {:.0} ms | {:.1} ms | {} | {} |",
            num("requests")?,
            num("ttft_p50_ms")?,
            num("tpot_p50_ms")?,
            ratio(tok_s, hf_rate("generate")),
            ratio(tok_s, hf_rate("generate_batch")),
        )?;
    }
    for mode in ["generate", "generate_batch"] {
        if let (Some(tok_s), Some(n)) = (hf_rate(mode), hf[mode]["requests"].as_u64()) {
            writeln!(s, "| HF {mode} | {n} | {tok_s:.0} | | | | |")?;
        }
    }
    if let Some(flags) = v["kvserve_flags"].as_str().filter(|f| !f.is_empty()) {
        writeln!(s, "\nkvserve flags: `{flags}`.")?;
    }
    if let Some(version) = v["hf"]["transformers"].as_str() {
        writeln!(
            s,
            "\ntransformers {version}, torch {}.",
            v["hf"]["torch"].as_str().unwrap_or("?")
        )?;
    }
    if let Some(entries) = v["sweep"]["entries"].as_array() {
        let gib = v["sweep"]["kv_cache_memory"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 30);
        writeln!(
            s,
            "\nKV-dtype sweep at a {gib:.1} GiB KV budget (`KVS_SWEEP`), same workload:\n\n\
             | KV | blocks | sequences held | peak running | preemptions | output tok/s |\n\
             | --- | ---: | ---: | ---: | ---: | ---: |"
        )?;
        for e in entries {
            let cell = |k: &str| match &e[k] {
                Value::Null => "-".to_owned(),
                Value::String(t) => t.clone(),
                other => other.to_string(),
            };
            writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.0} |",
                cell("kv_cache_dtype"),
                cell("kv_blocks"),
                cell("kv_capacity_seqs"),
                cell("running_peak"),
                cell("preemptions"),
                e["output_tok_s"].as_f64().unwrap_or(f64::NAN)
            )?;
        }
    }
    if hf.as_object().is_none_or(|m| m.is_empty()) {
        bail!("no Hugging Face figures (hf.modes is empty): the ratios are the point of the run");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "gpu": "NVIDIA H200", "date_utc": "2026-12-03T05:00:00Z", "kvserve_flags": "--max-num-seqs 512",
      "kvserve": {"bf16": {"output_tok_s": 9000.0, "requests": 512, "elapsed_s": 10.0,
                           "ttft_p50_ms": 1500.0, "tpot_p50_ms": 20.0}},
      "hf": {"transformers": "5.17.0", "torch": "2.11",
             "modes": {"generate": {"requests": 128, "output_tok_s": 300.0},
                       "generate_batch": {"requests": 512, "output_tok_s": 1000.0}}},
      "sweep": {"kv_cache_memory": 8589934592, "entries": [
        {"kv_cache_dtype": "int8", "kv_blocks": 4000, "kv_capacity_seqs": 160,
         "running_peak": 150, "preemptions": 3, "output_tok_s": 5000.4}]}
    }"#;

    #[test]
    fn renders_the_table_with_ratios() {
        let s = render(SAMPLE).unwrap();
        assert!(s.contains("(NVIDIA H200, 2026-12-03)"), "{s}");
        assert!(
            s.contains("| kvserve (KV bf16) | 512 | 9000 | 1500 ms | 20.0 ms | 30.0× | 9.0× |"),
            "{s}"
        );
        assert!(s.contains("| HF generate | 128 | 300 |"), "{s}");
        assert!(s.contains("transformers 5.17.0"), "{s}");
        assert!(s.contains("kvserve flags: `--max-num-seqs 512`."), "{s}");
        assert!(s.contains("at a 8.0 GiB KV budget"), "{s}");
        assert!(s.contains("| int8 | 4000 | 160 | 150 | 3 | 5000 |"), "{s}");
    }

    #[test]
    fn bad_files_are_errors_naming_what_is_wrong() {
        for (json, want) in [
            ("not json", "not JSON"),
            (r#"{"date_utc": "x"}"#, "`gpu`"),
            (r#"{"gpu": "g", "date_utc": "d", "kvserve": {}}"#, "no run"),
            (
                r#"{"gpu": "g", "date_utc": "d", "kvserve": {"bf16": {"requests": 1}}}"#,
                "output_tok_s",
            ),
            (
                r#"{"gpu": "g", "date_utc": "d", "hf": {"modes": {}}, "kvserve": {"bf16":
                  {"output_tok_s": 1, "requests": 1, "ttft_p50_ms": 1, "tpot_p50_ms": 1}}}"#,
                "no Hugging Face figures",
            ),
        ] {
            let err = format!("{:#}", render(json).unwrap_err());
            assert!(err.contains(want), "{want}: {err}");
        }
        let err = format!("{:#}", record(Path::new("/nonexistent")).unwrap_err());
        assert!(err.contains("/nonexistent/gpu_bench.json"), "{err}");
    }
}
