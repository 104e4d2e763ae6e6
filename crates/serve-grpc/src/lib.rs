//! The kvserve gRPC front end: the `kvserve.v1.Generation` service (tonic), health, server
//! reflection, Prometheus `/metrics`, and the `kvserve` binary (`serve`, `generate`, `bench`,
//! `bench-serve`).
//!
//! What it owns:
//! - [`pb`]: the protobuf messages and tonic client/server generated from
//!   `proto/kvserve/v1/kvserve.proto` (compiled by protox at build time: no system `protoc`);
//! - the edge validation of requests into the engine's typed [`engine::GenerateRequest`] (only
//!   what the protocol alone can see: which prompt fields are set, absent optional fields, the
//!   `grpc-timeout` deadline), and the single mapping from
//!   [`engine::EngineError`] to `tonic::Status`;
//! - [`serve`]: gRPC and `/metrics` listeners, health that follows the engine, graceful
//!   shutdown;
//! - [`bench`](mod@bench): the offline benchmark over the engine and [`bench::serve`], the gRPC load
//!   generator against a running server (Poisson arrivals, a concurrency limit, rate sweeps,
//!   errors counted by code, JSON and a PNG plot);
//! - [`cli`]: the `kvserve` command line.
//!
//! The service runs over the [`GenerationBackend`] trait, which [`engine::EngineHandle`]
//! implements.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = engine::Engine::start(engine::EngineConfig::default())?;
//! let grpc = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! let shutdown = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! serve_grpc::serve(engine, grpc, None, shutdown, &serve_grpc::ServeOptions::default()).await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod backend;
pub mod bench;
pub mod cli;
mod convert;
mod deadline;
mod engine_impl;
mod health;
pub mod pb;
mod process;
mod server;
mod service;
mod state;
mod status;

pub use backend::{DeltaStream, GenerationBackend};
pub use convert::generate_request_from_pb;
pub use server::{METRICS_CONTENT_TYPE, ServeError, ServeOptions, serve};
