//! What the service needs from an engine: [`GenerationBackend`], implemented by
//! [`engine::EngineHandle`] (and by fakes in tests).
//!
//! The service is written against this trait, not the concrete handle, so its protocol logic
//! (validation, status mapping, streaming, deadlines, health, shutdown) is tested without
//! loading a model, and the end-to-end tests run the real engine through the same code.

use std::future::Future;
use std::time::Duration;

use engine::{EngineError, EngineStats, GenerateRequest, Health, ModelInfo, Prompt, StreamDelta};

/// The engine as the gRPC service sees it. Cheap to clone (a handle).
pub trait GenerationBackend: Clone + Send + Sync + 'static {
    /// The output of one request.
    type Stream: DeltaStream;

    /// Validates `request` and queues it; errors are returned before anything is queued.
    /// May block briefly (tokenization): the service calls it off the async workers.
    fn generate(&self, request: GenerateRequest) -> Result<Self::Stream, EngineError>;

    /// Aborts the live request `request_id`; `false` when there is none.
    fn abort(&self, request_id: &str) -> bool;

    /// The token ids `prompt` becomes.
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError>;

    /// What is served.
    fn model_info(&self) -> ModelInfo;

    /// Whether the engine can generate now.
    fn health(&self) -> Health;

    /// Prometheus text exposition of the engine's metrics.
    fn metrics_text(&self) -> String;

    /// Queue lengths, KV usage and cumulative counters (`kvserve bench` reports their change
    /// over a run). Fakes that keep none return zeros.
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }

    /// Stops admitting, lets running requests finish for up to `timeout`, then ends the rest.
    /// Blocks.
    fn shutdown(&self, timeout: Duration);
}

/// The output stream of one request. Dropping it before its end aborts the request.
pub trait DeltaStream: Send + 'static {
    /// The request's id (the caller's, or one the engine made).
    fn request_id(&self) -> &str;

    /// The next delta; `None` after the last one.
    fn next(&mut self) -> impl Future<Output = Option<Result<StreamDelta, EngineError>>> + Send;
}
