//! Errors of the scheduler.

use kv_block_manager::{BlockManagerError, SeqId};

use crate::RequestId;

/// Why a request was refused at admission. Nothing is queued when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// `max_tokens` is 0.
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    /// `n` is 0 or larger than the scheduler runs at once.
    #[error("n = {n} parallel samples; must be 1..={max}")]
    BadN {
        /// Requested samples.
        n: usize,
        /// `max_num_seqs`.
        max: usize,
    },
    /// The prompt alone reaches the model's length limit (no room for one token).
    #[error("the prompt has {prompt_len} tokens; max_model_len is {max_model_len}")]
    PromptTooLong {
        /// Prompt tokens.
        prompt_len: usize,
        /// The limit.
        max_model_len: usize,
    },
    /// Prompt plus `max_tokens` needs more KV blocks than the whole pool holds (above the
    /// watermark): it could never finish, so it is refused instead of queued forever.
    #[error(
        "prompt + max_tokens needs {blocks_needed} KV blocks; the pool has {pool_blocks} (above the watermark)"
    )]
    NeverFits {
        /// Blocks the longest sequence of the request would hold.
        blocks_needed: usize,
        /// Blocks admission can ever use.
        pool_blocks: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfVocab {
        /// The id.
        token: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// A request with this id is already queued or running.
    #[error("request {0} already exists")]
    DuplicateRequest(RequestId),
}

/// Errors of the [`Scheduler`](crate::Scheduler).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    /// A configuration field is out of range.
    #[error("invalid scheduler config: {field} {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The request was refused at admission.
    #[error("request {request} rejected: {reason}")]
    Rejected {
        /// The request.
        request: RequestId,
        /// Why.
        reason: RejectReason,
    },
    /// No such request is queued or running.
    #[error("unknown request {0}")]
    UnknownRequest(RequestId),
    /// A step result names a sequence that was not in the last step's batch (or was aborted).
    #[error("sequence {0} was not scheduled in the last step")]
    NotScheduled(SeqId),
    /// A step result does not fit what was scheduled.
    #[error("bad result for sequence {seq}: {reason}")]
    BadResult {
        /// The sequence.
        seq: SeqId,
        /// What is wrong.
        reason: String,
    },
    /// `update` was called without a step in flight, or `schedule` with one.
    #[error("{0}")]
    StepOrder(&'static str),
    /// The speculative proposer failed.
    #[error("speculative proposer: {0}")]
    Proposer(String),
    /// The block manager refused an operation the scheduler believed valid: a bug, reported
    /// instead of panicking.
    #[error("block manager: {0}")]
    BlockManager(#[from] BlockManagerError),
}
