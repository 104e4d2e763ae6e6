//! `cargo xtask profile`: Nsight Compute (ncu) on the decode-attention kernels, summarized.
//!
//! It runs `attention_bench --quick --profile` (one warm-up and one measured launch per batch
//! × context × KV dtype) under `ncu --csv`, collecting a few metrics per launch, and prints a
//! table: kernel, grid, registers, time, DRAM bytes read, achieved read bandwidth and its share
//! of the device's peak, achieved occupancy. On the GPU machine (no cargo) pass the prebuilt
//! bench with `--bin`; elsewhere it builds it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Flags of `cargo xtask profile`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// The attention bench binary (default: build `kernels-cuda`'s `attention_bench` example).
    #[arg(long, value_name = "PATH")]
    bin: Option<PathBuf>,
    /// The ncu executable.
    #[arg(long, default_value = "ncu")]
    ncu: String,
    /// Only kernels whose name matches this regex.
    #[arg(long, default_value = "paged_decode")]
    kernel: String,
}

/// What ncu collects per launch.
const METRICS: &[&str] = &[
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
    "launch__grid_size",
];

pub(crate) fn run(o: &Options) -> Result<()> {
    let bin = match &o.bin {
        Some(b) => b.clone(),
        None => {
            let mut build = crate::cargo();
            build.args([
                "build",
                "--release",
                "-p",
                "kernels-cuda",
                "--example",
                "attention_bench",
            ]);
            crate::run_cmd(build)?;
            crate::workspace_root().join("target/release/examples/attention_bench")
        }
    };
    let mut ncu = Command::new(&o.ncu);
    ncu.args(["--csv", "--page", "raw", "--metrics", &METRICS.join(",")])
        .arg("--kernel-name")
        .arg(format!("regex:{}", o.kernel))
        .arg(&bin)
        .args(["--quick", "--profile"]);
    println!("running {ncu:?}");
    let out = ncu
        .output()
        .with_context(|| format!("running {} (is Nsight Compute installed?)", o.ncu))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "ncu failed ({}):\n{}\n{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rows = parse(&stdout)?;
    if rows.is_empty() {
        bail!("ncu profiled no kernel matching {:?}:\n{stdout}", o.kernel);
    }
    print!("{}", table(&rows));
    Ok(())
}

/// One profiled launch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Launch {
    kernel: String,
    grid: f64,
    registers: f64,
    /// Seconds.
    time: f64,
    dram_read: f64,
    dram_pct: f64,
    occupancy_pct: f64,
}

/// The launches in ncu's `--csv --page raw` output: a header row of metric names, a row of
/// units, then one row per launch (lines before the header are the application's output).
pub(crate) fn parse(text: &str) -> Result<Vec<Launch>> {
    let start = text
        .find("\"ID\",")
        .context("no ncu CSV header (\"ID\", ...) in the output")?;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(&text.as_bytes()[start..]);
    let header = reader.headers()?.clone();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("ncu output has no column {name}"))
    };
    let kernel = col("Kernel Name")?;
    let cols: Vec<usize> = METRICS.iter().map(|m| col(m)).collect::<Result<_>>()?;
    let mut records = reader.records();
    let units = records.next().context("no units row")??;
    let unit = |i: usize| units.get(cols[i]).unwrap_or("").to_owned();
    let (time_unit, bytes_unit) = (unit(0), unit(1));
    let mut out = Vec::new();
    for r in records {
        let r = r?;
        let num = |i: usize| -> Result<f64> {
            let v = r.get(cols[i]).unwrap_or("").replace(',', "");
            v.parse::<f64>()
                .with_context(|| format!("{} = {v:?}", METRICS[i]))
        };
        out.push(Launch {
            kernel: r.get(kernel).unwrap_or("?").to_owned(),
            time: num(0)? * scale(&time_unit)?,
            dram_read: num(1)? * scale(&bytes_unit)?,
            dram_pct: num(2)?,
            occupancy_pct: num(3)?,
            registers: num(4)?,
            grid: num(5)?,
        });
    }
    Ok(out)
}

/// The factor of an ncu unit to seconds or bytes.
fn scale(unit: &str) -> Result<f64> {
    Ok(match unit {
        "nsecond" | "ns" => 1e-9,
        "usecond" | "us" => 1e-6,
        "msecond" | "ms" => 1e-3,
        "second" | "s" => 1.0,
        "byte" => 1.0,
        "Kbyte" | "KB" => 1e3,
        "Mbyte" | "MB" => 1e6,
        "Gbyte" | "GB" => 1e9,
        other => bail!("unknown ncu unit {other:?}"),
    })
}

/// A Markdown table of the launches.
pub(crate) fn table(rows: &[Launch]) -> String {
    let mut s = String::from(
        "| kernel | grid | regs | µs | DRAM read MB | read GB/s | DRAM % of peak | occupancy % |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for l in rows {
        let name = l.kernel.split('(').next().unwrap_or(&l.kernel);
        s.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {:.1} | {:.2} | {:.0} | {:.1} | {:.1} |\n",
            l.grid,
            l.registers,
            l.time * 1e6,
            l.dram_read / 1e6,
            l.dram_read / l.time.max(1e-12) / 1e9,
            l.dram_pct,
            l.occupancy_pct
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "| 1 | 4096 | bf16 | (profiled) | | |\n==PROF== Disconnected\n\"ID\",\"Process ID\",\"Process Name\",\"Host Name\",\"Kernel Name\",\"Context\",\"Stream\",\"Block Size\",\"Grid Size\",\"Device\",\"CC\",\"dram__bytes_read.sum\",\"dram__throughput.avg.pct_of_peak_sustained_elapsed\",\"gpu__time_duration.sum\",\"launch__grid_size\",\"launch__registers_per_thread\",\"sm__warps_active.avg.pct_of_peak_sustained_active\"\n\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"Mbyte\",\"%\",\"usecond\",\"\",\"register/thread\",\"%\"\n\"0\",\"123\",\"attention_bench\",\"127.0.0.1\",\"paged_decode_partition\",\"1\",\"7\",\"(128, 1, 1)\",\"(8, 1, 16)\",\"0\",\"9.0\",\"16.78\",\"35.2\",\"20.5\",\"128\",\"64\",\"12.1\"\n";

    #[test]
    fn ncu_csv_is_summarized() {
        let rows = parse(SAMPLE).unwrap();
        assert_eq!(rows.len(), 1);
        let l = &rows[0];
        assert_eq!(l.kernel, "paged_decode_partition");
        assert!((l.time - 20.5e-6).abs() < 1e-12);
        assert!((l.dram_read - 16.78e6).abs() < 1.0);
        assert_eq!((l.grid, l.registers), (128.0, 64.0));
        let t = table(&rows);
        assert!(
            t.contains("| paged_decode_partition | 128 | 64 | 20.5 | 16.78 | 819 | 35.2 | 12.1 |"),
            "{t}"
        );
    }

    #[test]
    fn bad_ncu_output_is_an_error() {
        assert!(parse("no csv here").is_err());
        let missing = "\"ID\",\"Kernel Name\"\n\"\",\"\"\n";
        assert!(parse(missing).is_err());
        let bad_unit = SAMPLE.replace("usecond", "fortnight");
        assert!(parse(&bad_unit).is_err());
    }
}
