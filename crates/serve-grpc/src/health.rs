//! `grpc.health.v1.Health`, answered from the engine's state at the time of each call.
//!
//! `SERVING` only while the server is not shutting down and the engine's step loop runs:
//! the server never reports `SERVING` while nothing can generate. The overall health (`""`)
//! and `kvserve.v1.Generation` are known; other names are `NOT_FOUND` (`SERVICE_UNKNOWN` in
//! `Watch`), as the health protocol says.

use std::sync::Arc;
use std::time::Duration;

use engine::Health;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_server::Health as HealthApi;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::backend::GenerationBackend;
use crate::pb::generation_server::SERVICE_NAME;
use crate::state::ServerState;

/// How often a `Watch` stream looks at the engine's health (shutdown is noticed at once).
const WATCH_POLL: Duration = Duration::from_millis(250);

/// The health service over a [`GenerationBackend`].
#[derive(Debug, Clone)]
pub(crate) struct HealthService<B> {
    backend: B,
    state: Arc<ServerState>,
}

impl<B: GenerationBackend> HealthService<B> {
    pub(crate) fn new(backend: B, state: Arc<ServerState>) -> Self {
        Self { backend, state }
    }

    /// The status of `service` now; `None` for a service this server does not know.
    fn status_of(&self, service: &str) -> Option<ServingStatus> {
        if !service.is_empty() && service != SERVICE_NAME {
            return None;
        }
        if self.state.is_shutting_down() || self.backend.health() == Health::NotServing {
            Some(ServingStatus::NotServing)
        } else {
            Some(ServingStatus::Serving)
        }
    }
}

fn response(status: Option<ServingStatus>) -> HealthCheckResponse {
    let status = match status {
        None => WireStatus::ServiceUnknown,
        Some(ServingStatus::Serving) => WireStatus::Serving,
        Some(ServingStatus::NotServing) => WireStatus::NotServing,
        Some(ServingStatus::Unknown) => WireStatus::Unknown,
    };
    HealthCheckResponse {
        status: status.into(),
    }
}

/// One `Watch` call: sends the status, then each change; ends once the server is shutting
/// down (after sending `NOT_SERVING`), so it never holds a graceful shutdown up.
struct WatchCall<B> {
    health: HealthService<B>,
    service: String,
    last: Option<Option<ServingStatus>>,
    shutdown: watch::Receiver<bool>,
    done: bool,
}

impl<B: GenerationBackend> WatchCall<B> {
    async fn next_message(mut self) -> Option<(Result<HealthCheckResponse, Status>, Self)> {
        loop {
            if self.done {
                return None;
            }
            let now = self.health.status_of(&self.service);
            if self.last != Some(now) {
                self.last = Some(now);
                self.done = self.health.state.is_shutting_down();
                return Some((Ok(response(now)), self));
            }
            tokio::select! {
                changed = self.shutdown.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = tokio::time::sleep(WATCH_POLL) => {}
            }
        }
    }
}

#[tonic::async_trait]
impl<B: GenerationBackend> HealthApi for HealthService<B> {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match self.status_of(&service) {
            None => Err(Status::not_found(format!("unknown service {service:?}"))),
            status => Ok(Response::new(response(status))),
        }
    }

    type WatchStream = BoxStream<'static, Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let call = WatchCall {
            health: self.clone(),
            service: request.into_inner().service,
            last: None,
            shutdown: self.state.subscribe(),
            done: false,
        };
        Ok(Response::new(
            stream::unfold(call, WatchCall::next_message).boxed(),
        ))
    }
}
