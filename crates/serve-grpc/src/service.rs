//! The `kvserve.v1.Generation` service.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::{EngineError, Health, StreamDelta};
use futures_util::stream::{self, BoxStream, StreamExt};
use tonic::{Request, Response, Status};

use crate::backend::{DeltaStream, GenerationBackend};
use crate::convert::{self, Collector};
use crate::deadline;
use crate::pb;
use crate::pb::generation_server::Generation;
use crate::state::ServerState;
use crate::status::{EngineState, to_status};

/// How long after a call's deadline the service stops waiting for the engine to end it. The
/// engine ends a request at its deadline (`DEADLINE_EXCEEDED`, blocks freed); this is only a
/// backstop in case it does not.
const DEADLINE_BACKSTOP: Duration = Duration::from_secs(2);

/// `kvserve.v1.Generation` over a [`GenerationBackend`].
#[derive(Debug, Clone)]
pub(crate) struct GenerationService<B> {
    backend: B,
    state: Arc<ServerState>,
}

impl<B: GenerationBackend> GenerationService<B> {
    pub(crate) fn new(backend: B, state: Arc<ServerState>) -> Self {
        Self { backend, state }
    }

    fn engine_state(&self) -> EngineState {
        if !self.state.is_shutting_down() && self.backend.health() == Health::NotServing {
            EngineState::Dead
        } else {
            EngineState::Up
        }
    }

    fn status(&self, err: &EngineError) -> Status {
        let status = to_status(err, self.engine_state());
        match status.code() {
            tonic::Code::Internal => tracing::warn!(error = %err, "request failed"),
            _ => tracing::debug!(error = %err, code = ?status.code(), "request refused"),
        }
        status
    }

    /// New work is taken only while the server is not shutting down and the engine runs.
    fn check_admitting(&self) -> Result<(), Status> {
        if self.state.is_shutting_down() {
            return Err(Status::unavailable("the server is shutting down"));
        }
        if self.backend.health() == Health::NotServing {
            tracing::warn!("refusing a request: the engine is not serving");
            return Err(Status::internal(
                "the engine is not running (its step loop stopped)",
            ));
        }
        Ok(())
    }

    /// Validates and submits a generation request (off the async workers: tokenizing a long
    /// prompt takes a while).
    async fn start(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<(B::Stream, Option<Instant>), Status> {
        let deadline = deadline::deadline(request.metadata(), Instant::now());
        self.check_admitting()?;
        let request = convert::generate_request(request.into_inner(), deadline)
            .map_err(|e| self.status(&e))?;
        let backend = self.backend.clone();
        match tokio::task::spawn_blocking(move || backend.generate(request)).await {
            Ok(Ok(stream)) => {
                tracing::debug!(request_id = stream.request_id(), "request accepted");
                Ok((stream, deadline))
            }
            Ok(Err(err)) => Err(self.status(&err)),
            Err(join) => {
                tracing::error!(error = %join, "the generate task failed");
                Err(Status::internal("the engine failed to take the request"))
            }
        }
    }
}

/// The stream's next delta, or `DeadlineExceeded` if the engine has not ended the request
/// shortly after its deadline.
async fn next_delta<S: DeltaStream>(
    stream: &mut S,
    deadline: Option<Instant>,
) -> Option<Result<StreamDelta, EngineError>> {
    match deadline.and_then(|d| d.checked_add(DEADLINE_BACKSTOP)) {
        None => stream.next().await,
        Some(at) => tokio::time::timeout_at(at.into(), stream.next())
            .await
            .unwrap_or(Some(Err(EngineError::DeadlineExceeded))),
    }
}

/// The state of one `GenerateStream` call. Dropping it (the client went away, cancelled, or
/// the call ended) drops the engine stream, which aborts the request if it is unfinished.
struct StreamCall<B: GenerationBackend> {
    service: GenerationService<B>,
    stream: B::Stream,
    request_id: String,
    deadline: Option<Instant>,
    done: bool,
}

impl<B: GenerationBackend> StreamCall<B> {
    async fn next_message(mut self) -> Option<(Result<pb::GenerateStreamResponse, Status>, Self)> {
        if self.done {
            return None;
        }
        let item = match next_delta(&mut self.stream, self.deadline).await? {
            Ok(delta) => convert::stream_response(&self.request_id, delta),
            Err(err) => Err(err),
        };
        let item = item.map_err(|err| {
            self.done = true;
            self.service.status(&err)
        });
        Some((item, self))
    }
}

#[tonic::async_trait]
impl<B: GenerationBackend> Generation for GenerationService<B> {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let (mut stream, deadline) = self.start(request).await?;
        let mut collector = Collector::default();
        while let Some(item) = next_delta(&mut stream, deadline).await {
            item.and_then(|delta| collector.push(delta))
                .map_err(|err| self.status(&err))?;
        }
        Ok(Response::new(
            collector.finish(stream.request_id().to_owned()),
        ))
    }

    type GenerateStreamStream = BoxStream<'static, Result<pb::GenerateStreamResponse, Status>>;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (stream, deadline) = self.start(request).await?;
        let call = StreamCall {
            service: self.clone(),
            request_id: stream.request_id().to_owned(),
            stream,
            deadline,
            done: false,
        };
        Ok(Response::new(
            stream::unfold(call, StreamCall::next_message).boxed(),
        ))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.check_admitting()?;
        let prompt = convert::tokenize_prompt(request.into_inner()).map_err(|e| self.status(&e))?;
        let backend = self.backend.clone();
        match tokio::task::spawn_blocking(move || backend.tokenize(&prompt)).await {
            Ok(Ok(token_ids)) => Ok(Response::new(pb::TokenizeResponse { token_ids })),
            Ok(Err(err)) => Err(self.status(&err)),
            Err(join) => {
                tracing::error!(error = %join, "the tokenize task failed");
                Err(Status::internal("tokenization failed"))
            }
        }
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let id = convert::abort_request_id(request.into_inner()).map_err(|e| self.status(&e))?;
        let found = self.backend.abort(&id);
        tracing::debug!(request_id = id, found, "abort");
        Ok(Response::new(pb::AbortResponse { found }))
    }

    async fn get_model_info(
        &self,
        _request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        Ok(Response::new(convert::model_info(
            self.backend.model_info(),
        )))
    }
}
