//! Iteration-level scheduling for kvserve.
//!
//! Every step, [`Scheduler::schedule`] decides which sequences run and how many tokens each
//! computes (running decodes first, then chunks of prompts, within one token budget), and
//! returns a [`SchedulerOutput`]: the flattened batch the backend runs, with its slot mapping,
//! block tables and copy lists. [`Scheduler::update`] takes the sampled tokens back, checks the
//! stop conditions and frees finished sequences. The crate is pure, synchronous and
//! deterministic over `kv-block-manager`: it never touches KV data or a model (but the draft
//! model of speculative decoding, behind the [`spec::Proposer`] trait).

pub mod spec;

mod config;
mod error;
mod request;
mod scheduler;
mod speculation;

pub use config::{Policy, PreemptionMode, SchedulerConfig};
pub use error::{RejectReason, SchedulerError};
pub use request::{
    FinishReason, FinishedSeq, NewTokens, Request, RequestId, SampleOutput, ScheduledSeq,
    SchedulerOutput, SeqResult,
};
pub use scheduler::{Scheduler, SchedulerStats};
pub use speculation::Speculation;

pub use kv_block_manager::SeqId;
