//! [`GenerationBackend`] for the real engine.

use std::future::Future;
use std::time::Duration;

use engine::{
    EngineError, EngineHandle, EngineStats, GenerateRequest, Health, ModelInfo, Prompt,
    ResponseStream, StreamDelta,
};

use crate::backend::{DeltaStream, GenerationBackend};

impl GenerationBackend for EngineHandle {
    type Stream = ResponseStream;

    fn generate(&self, request: GenerateRequest) -> Result<ResponseStream, EngineError> {
        EngineHandle::generate(self, request)
    }

    fn abort(&self, request_id: &str) -> bool {
        EngineHandle::abort(self, request_id)
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        EngineHandle::tokenize(self, prompt)
    }

    fn model_info(&self) -> ModelInfo {
        EngineHandle::model_info(self).clone()
    }

    fn health(&self) -> Health {
        EngineHandle::health(self)
    }

    fn metrics_text(&self) -> String {
        EngineHandle::metrics_text(self)
    }

    fn stats(&self) -> EngineStats {
        EngineHandle::stats(self)
    }

    fn shutdown(&self, timeout: Duration) {
        EngineHandle::shutdown(self, timeout);
    }
}

impl DeltaStream for ResponseStream {
    fn request_id(&self) -> &str {
        ResponseStream::request_id(self)
    }

    fn next(&mut self) -> impl Future<Output = Option<Result<StreamDelta, EngineError>>> + Send {
        ResponseStream::next(self)
    }
}
