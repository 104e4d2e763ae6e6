//! The kvserve engine: model + block manager + scheduler in a step loop on its own thread,
//! behind an async handle.
//!
//! [`Engine::start`] loads the model, sizes the KV pool from a memory budget and starts the
//! step loop; the returned [`EngineHandle`] (cheap to clone) submits requests, each answered by
//! a [`ResponseStream`] of [`StreamDelta`]s, aborts them (dropping the stream aborts too),
//! tokenizes, and reports health, model info, stats and metrics.
//!
//! What it owns:
//! - the step loop (one `std::thread`): commands from the handles, then `schedule` → block
//!   copies → `forward` → [`sampling`] (and speculative verification) → `update` → text;
//! - validation: every bad field is an [`EngineError::InvalidArgument`] naming it, returned by
//!   [`EngineHandle::generate`] before anything is queued;
//! - [`sampling`]: greedy, temperature, top-k, top-p, min-p, repetition penalty, per-request
//!   seeds (one random stream per completion, so a seeded request gets the same tokens whatever
//!   it is batched with), top-N log-probabilities;
//! - text: incremental detokenization (never half a UTF-8 character), stop strings matched on
//!   the text across token boundaries and excluded;
//! - admission (`max_queued_requests` → [`EngineError::Overloaded`]), aborts, deadlines,
//!   graceful shutdown, health, and Prometheus metrics ([`EngineHandle::metrics_text`]).
//!
//! # Example
//!
//! ```no_run
//! use engine::{Engine, EngineConfig, GenerateRequest, Prompt};
//!
//! # async fn run() -> Result<(), engine::EngineError> {
//! let engine = Engine::start(EngineConfig::default())?;
//! let mut req = GenerateRequest::new(Prompt::Text("The capital of France is".into()));
//! req.max_tokens = Some(16);
//! let mut stream = engine.generate(req)?;
//! while let Some(delta) = stream.next().await {
//!     print!("{}", delta?.text);
//! }
//! engine.shutdown(std::time::Duration::from_secs(5));
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod api;
mod engine;
mod handle;
mod metrics;
pub mod sampling;
mod text;
mod validate;
mod worker;

pub use api::{
    Completion, DEFAULT_SHUTDOWN_TIMEOUT, Device, EngineConfig, EngineError, EngineStats,
    FinishReason, GenerateOutput, GenerateRequest, Health, Limits, Message, ModelInfo, ModelSource,
    Prompt, STEP_CLASS_LIMITS, SamplingParams, SpeculativeMode, StepClass, StepShapes, StreamDelta,
    TokenLogprob, Usage,
};
pub use engine::{
    DEFAULT_CPU_KV_CACHE_DTYPE, DEFAULT_CPU_KV_CACHE_MEMORY, DEFAULT_GPU_KV_CACHE_DTYPE, Engine,
    kv_cache_config,
};
pub use handle::{EngineHandle, ResponseStream};
/// The KV-cache formats ([`EngineConfig::kv_cache_dtype`]), from `kv-quant`.
pub use kv_quant::KvCacheDtype;
/// Preemption modes ([`EngineConfig::preemption_mode`]), from the scheduler.
pub use scheduler::PreemptionMode;
pub use validate::{RequestBounds, validate_request};
