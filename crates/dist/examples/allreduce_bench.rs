//! All-reduce (sum, bf16, in place) latency and bandwidth over the GPUs of this host, one
//! thread and one NCCL rank per GPU, through [`dist::Communicator`]; `scripts/allreduce_torch.py`
//! measures `torch.distributed.all_reduce` the same way for comparison.
//!
//! Per size (8 KiB … 64 MiB by default, ×2 steps): one checked all-reduce of ones (each
//! element must come back as the number of GPUs), `--warmup` untimed calls, then `--repeats`
//! timed batches of `--iters` back-to-back calls (the ranks start each batch together at a
//! barrier; a batch ends with a stream sync; its time / `--iters` is one sample). The table
//! shows the median sample of the slowest rank, the algorithm bandwidth `size / time` and the
//! bus bandwidth `algbw × 2(n−1)/n`, as nccl-tests defines them (GB = 10⁹ bytes).
//!
//! `NCCL_NVLS_ENABLE=0 allreduce_bench [--gpus N] [--min-size 8KiB] [--max-size 64MiB]
//! [--factor 2] [--warmup 5] [--iters 20] [--repeats 10]`
#![allow(clippy::print_stdout, missing_docs)]

use std::error::Error;
use std::process::ExitCode;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use clap::Parser;
use dist::{Communicator, NcclCommunicator};
use half::bf16;

#[derive(Debug, Parser)]
#[command(about = "NCCL all-reduce latency and bus bandwidth over this host's GPUs")]
struct Args {
    /// GPUs (ranks) to use; default: every visible GPU.
    #[arg(long)]
    gpus: Option<usize>,
    /// Smallest message, in bytes (suffixes KiB, MiB, GiB).
    #[arg(long, default_value = "8KiB", value_parser = parse_size)]
    min_size: usize,
    /// Largest message, in bytes.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    max_size: usize,
    /// Step between sizes (2 or 4: powers of two or four).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=16))]
    factor: u32,
    /// Untimed all-reduces per size.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// All-reduces per timed batch.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Timed batches per size (the median is reported).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    repeats: u32,
}

/// `8KiB`, `64MiB`, `1GiB`, `4096`: bytes.
fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: usize = number
        .parse()
        .map_err(|_| format!("`{s}`: expected a number of bytes, as 8KiB or 65536"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        other => return Err(format!("`{s}`: unknown unit `{other}` (B, KiB, MiB, GiB)")),
    };
    number
        .checked_mul(scale)
        .filter(|&bytes| bytes >= 2 && bytes % 2 == 0)
        .ok_or_else(|| format!("`{s}`: not a positive even number of bytes (bf16 elements)"))
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// One rank's median time per all-reduce, per size.
fn run_rank(
    gpu: &kernels_cuda::Gpu,
    comm: &NcclCommunicator,
    args: &Args,
    sizes: &[usize],
    barrier: &Barrier,
) -> Result<Vec<Duration>, String> {
    let s = gpu.stream();
    let world = comm.world_size() as f32;
    let mut medians = Vec::with_capacity(sizes.len());
    for &bytes in sizes {
        let elems = bytes / 2;
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", human(bytes));
        let mut buf = s.clone_htod(&vec![bf16::ONE; elems]).map_err(|e| err(&e))?;
        comm.all_reduce_sum(&mut buf).map_err(|e| err(&e))?;
        let back = s.clone_dtoh(&buf).map_err(|e| err(&e))?;
        if let Some(i) = back.iter().position(|v| v.to_f32() != world) {
            return Err(err(&format!(
                "element {i} is {} after the all-reduce of ones, expected {world}",
                back[i]
            )));
        }
        s.memset_zeros(&mut buf).map_err(|e| err(&e))?;
        for _ in 0..args.warmup {
            comm.all_reduce_sum(&mut buf).map_err(|e| err(&e))?;
        }
        s.synchronize().map_err(|e| err(&e))?;
        let mut samples = Vec::with_capacity(args.repeats as usize);
        for _ in 0..args.repeats {
            barrier.wait();
            let start = Instant::now();
            for _ in 0..args.iters {
                comm.all_reduce_sum(&mut buf).map_err(|e| err(&e))?;
            }
            s.synchronize().map_err(|e| err(&e))?;
            samples.push(start.elapsed() / args.iters);
        }
        medians.push(median(samples));
    }
    Ok(medians)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("allreduce_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    if args.min_size > args.max_size {
        return Err(format!(
            "--min-size {} is above --max-size {}",
            human(args.min_size),
            human(args.max_size)
        )
        .into());
    }
    let gpus = match args.gpus {
        Some(n) => n,
        None => dist::local_gpu_count()?,
    };
    let mut sizes = vec![args.min_size];
    while let Some(next) = sizes
        .last()
        .and_then(|&s| s.checked_mul(args.factor as usize))
        .filter(|&s| s <= args.max_size)
    {
        sizes.push(next);
    }
    let barrier = Barrier::new(gpus);
    let ranks = NcclCommunicator::run_on_local_gpus(gpus, |gpu, comm| {
        run_rank(&gpu, &comm, &args, &sizes, &barrier)
            .map(|medians| (gpu.name().to_string(), medians))
    })?;
    let ranks: Vec<(String, Vec<Duration>)> = ranks
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.map_err(|e| format!("rank {rank}: {e}")))
        .collect::<Result<_, _>>()?;
    let name = ranks.first().map(|(name, _)| name.as_str()).unwrap_or("?");
    let bus_factor = 2.0 * (gpus as f64 - 1.0) / gpus as f64;
    println!(
        "dist all-reduce (NCCL through cudarc), bf16 sum in place, {gpus} × {name}, \
         median of {} batches of {} calls after {} warm-up",
        args.repeats, args.iters, args.warmup
    );
    println!();
    println!("| size | latency µs (median) | algbw GB/s | busbw GB/s |");
    println!("| ---: | ---: | ---: | ---: |");
    for (i, &bytes) in sizes.iter().enumerate() {
        let time = ranks.iter().map(|(_, r)| r[i]).max().unwrap_or_default();
        let secs = time.as_secs_f64().max(f64::MIN_POSITIVE);
        let algbw = bytes as f64 / secs / 1e9;
        println!(
            "| {} | {:.1} | {:.2} | {:.2} |",
            human(bytes),
            secs * 1e6,
            algbw,
            algbw * bus_factor
        );
    }
    Ok(())
}
