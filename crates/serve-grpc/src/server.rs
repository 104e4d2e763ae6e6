//! Running the server: gRPC (Generation, health, reflection v1 and v1alpha) on one listener,
//! Prometheus `/metrics` on another, and the graceful shutdown.
//!
//! The gRPC routes are tonic's, served by hyper through `axum::serve` rather than tonic's
//! `transport::Server`: that server answers a unary call still running at its `grpc-timeout`
//! with `CANCELLED` ("Timeout expired"); here the service itself turns the header into the
//! engine request's deadline, so every call past its deadline ends `DEADLINE_EXCEEDED`, and
//! the request's blocks are freed by the engine.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::Routes;

use crate::backend::GenerationBackend;
use crate::health::HealthService;
use crate::pb;
use crate::service::GenerationService;
use crate::state::ServerState;

/// How long connections may stay open once the engine has drained, before the server stops
/// waiting for them.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not be built from the descriptor sets.
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// Serving failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// How the server behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// How long open requests may run on after the shutdown signal before they are ended.
    pub shutdown_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            shutdown_timeout: engine::DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

/// The gRPC services of one server as an axum router: `kvserve.v1.Generation`,
/// `grpc.health.v1.Health`, and server reflection v1 and v1alpha.
fn grpc_router<B: GenerationBackend>(
    backend: B,
    state: Arc<ServerState>,
) -> Result<axum::Router, ServeError> {
    let generation = pb::generation_server::GenerationServer::new(GenerationService::new(
        backend.clone(),
        Arc::clone(&state),
    ));
    let health =
        tonic_health::pb::health_server::HealthServer::new(HealthService::new(backend, state));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let routes = Routes::new(generation)
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    Ok(routes.prepare().into_axum_router())
}

/// `GET /metrics`: the engine's metrics, then the process's (`process_*`), in the Prometheus
/// text format.
fn metrics_router<B: GenerationBackend>(backend: B) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let backend = backend.clone();
            async move {
                (
                    [(CONTENT_TYPE, METRICS_CONTENT_TYPE)],
                    backend.metrics_text() + &crate::process::text(),
                )
            }
        }),
    )
}

/// Serves `backend` until `shutdown` resolves, then shuts down gracefully:
///
/// 1. health turns `NOT_SERVING` and new requests get `UNAVAILABLE`, while the listeners stay
///    open;
/// 2. the engine drains: open requests run on for up to [`ServeOptions::shutdown_timeout`],
///    then the rest are ended;
/// 3. the listeners close and open connections are given two more seconds to finish.
///
/// gRPC is served on `grpc` and, when given, `GET /metrics` on `metrics`.
pub async fn serve<B, F>(
    backend: B,
    grpc: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: F,
    options: &ServeOptions,
) -> Result<(), ServeError>
where
    B: GenerationBackend,
    F: Future<Output = ()> + Send + 'static,
{
    let state = Arc::new(ServerState::new());
    let router = grpc_router(backend.clone(), Arc::clone(&state))?;

    let (drained_tx, drained_rx) = watch::channel(false);
    let drained = move || {
        let mut rx = drained_rx.clone();
        async move {
            // An error means the drain task is gone: stop as well.
            let _ = rx.wait_for(|drained| *drained).await;
        }
    };
    let timeout = options.shutdown_timeout;
    let drain_backend = backend.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(
            ?timeout,
            "shutting down: health NOT_SERVING, new requests refused, draining open requests"
        );
        state.begin_shutdown();
        if let Err(err) = tokio::task::spawn_blocking(move || drain_backend.shutdown(timeout)).await
        {
            tracing::error!(error = %err, "the engine's shutdown failed");
        }
        tracing::info!("engine drained; closing the listeners");
        drained_tx.send_replace(true);
    });

    let grpc_listener = grpc.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
    });
    let grpc_server = axum::serve(grpc_listener, router)
        .with_graceful_shutdown(drained())
        .into_future();
    let metrics_server = async {
        match metrics {
            Some(listener) => {
                axum::serve(listener, metrics_router(backend))
                    .with_graceful_shutdown(drained())
                    .await
            }
            None => Ok(()),
        }
    };
    let servers = async { tokio::try_join!(grpc_server, metrics_server) };
    let grace = async {
        drained().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::select! {
        result = servers => {
            result?;
        }
        () = grace => {
            tracing::warn!(?CLOSE_GRACE, "connections still open after the drain; closing them");
        }
    }
    tracing::info!("server stopped");
    Ok(())
}
