//! Scheduler configuration.

use crate::error::SchedulerError;

/// What to do with a running sequence when the KV pool runs out of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreemptionMode {
    /// Free its blocks and put it back at the front of the waiting queue; its tokens (prompt and
    /// output so far) are prefilled again when it is readmitted (the prefix cache usually keeps
    /// most of them).
    #[default]
    Recompute,
    /// Move its blocks to the CPU swap pool and bring them back when blocks free up. Falls back
    /// to recompute when the swap pool is full.
    Swap,
}

/// The order in which requests are admitted and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// First come, first served.
    #[default]
    Fcfs,
    /// Lower [`Request::priority`](crate::Request::priority) first, then arrival. A request
    /// gains one priority level per `aging_steps` steps since its arrival (waiting, running or
    /// preempted), so none starves: it is overtaken only by requests that arrive less than
    /// `(its priority − theirs) · aging_steps` steps after it.
    Priority {
        /// Steps since arrival worth one priority level (at least 1).
        aging_steps: u64,
    },
}

/// How a [`Scheduler`](crate::Scheduler) batches. Build one with [`SchedulerConfig::new`] and
/// adjust fields; [`Scheduler::new`](crate::Scheduler::new) validates it.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Tokens computed per step, summed over the batch (decode tokens, speculative tokens and
    /// prefill chunks alike).
    pub max_num_batched_tokens: usize,
    /// Sequences in one step's batch (and running at once).
    pub max_num_seqs: usize,
    /// Longest sequence (prompt plus output) a request may reach.
    pub max_model_len: usize,
    /// Largest prompt chunk one sequence computes in a step (`None`: only the budget limits
    /// it). Smaller chunks keep decode latency steady while long prompts prefill.
    pub max_prefill_chunk: Option<usize>,
    /// What preemption does.
    pub preemption_mode: PreemptionMode,
    /// Admission order.
    pub policy: Policy,
    /// Token ids that end a sequence (unless the request sets `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// Vocabulary size: prompts with a token id at or past it are rejected at admission
    /// (`None`: not checked here).
    pub vocab_size: Option<usize>,
}

impl SchedulerConfig {
    /// Defaults in the spirit of vLLM: a budget of 2048 tokens per step, 256 sequences,
    /// recompute preemption, FCFS.
    pub fn new(max_model_len: usize) -> Self {
        Self {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_model_len,
            max_prefill_chunk: None,
            preemption_mode: PreemptionMode::Recompute,
            policy: Policy::Fcfs,
            eos_token_ids: Vec::new(),
            vocab_size: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SchedulerError> {
        let invalid = |field, reason: &str| {
            Err(SchedulerError::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.max_num_batched_tokens == 0 {
            return invalid("max_num_batched_tokens", "must be at least 1");
        }
        if self.max_num_seqs == 0 {
            return invalid("max_num_seqs", "must be at least 1");
        }
        if self.max_model_len < 2 {
            return invalid("max_model_len", "must be at least 2 (a prompt and a token)");
        }
        if self.max_prefill_chunk == Some(0) {
            return invalid("max_prefill_chunk", "must be at least 1 when set");
        }
        if let Policy::Priority { aging_steps: 0 } = self.policy {
            return invalid("policy", "aging_steps must be at least 1");
        }
        Ok(())
    }
}
