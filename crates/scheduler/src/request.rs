//! Requests, step plans and step results.

use std::fmt;
use std::ops::Range;
use std::time::Instant;

use kv_block_manager::{BlockTableMatrix, CopyOp, SeqId};

/// A request's id, chosen by the caller (the engine maps its string ids to these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// What the scheduler needs to know about a generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Caller-chosen id, unique among live requests.
    pub id: RequestId,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Output tokens per sample at most.
    pub max_tokens: usize,
    /// Parallel samples: the prompt is prefilled once and its blocks are shared by `n`
    /// sequences (copy-on-write).
    pub n: usize,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// Token ids that end a sample (reported as [`FinishReason::StopToken`]).
    pub stop_token_ids: Vec<u32>,
    /// Lower runs first under [`Policy::Priority`](crate::Policy::Priority).
    pub priority: i32,
    /// Finish with [`FinishReason::Deadline`] if still unfinished at this instant.
    pub deadline: Option<Instant>,
    /// Prefix-cache namespace: requests only share cached blocks within one (tenants, LoRA
    /// adapters).
    pub cache_namespace: Option<String>,
    /// Sampling temperature (0 = greedy): speculative proposers draft at this temperature.
    pub temperature: f32,
}

impl Request {
    /// A greedy request for one sample of at most `max_tokens` tokens after `prompt`.
    pub fn new(id: RequestId, prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            id,
            prompt,
            max_tokens,
            n: 1,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            priority: 0,
            deadline: None,
            cache_namespace: None,
            temperature: 0.0,
        }
    }
}

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` generated, or `max_model_len` reached.
    Length,
    /// An EOS token was generated.
    Eos,
    /// One of the request's stop token ids was generated (the id).
    StopToken(u32),
    /// The engine matched a stop string on the text ([`Scheduler::finish`](crate::Scheduler::finish)).
    StopString,
    /// The request's deadline passed.
    Deadline,
    /// Aborted by the caller.
    Aborted,
    /// The step that computed it failed ([`Scheduler::fail_step`](crate::Scheduler::fail_step)).
    Error,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledSeq {
    /// The sequence.
    pub seq: SeqId,
    /// Its request.
    pub request: RequestId,
    /// Which of the request's samples it is (0 for the first, and for the shared prompt).
    pub sample: usize,
    /// Its tokens in the batch: `token_ids[tokens]`, at positions `positions[tokens]`.
    pub tokens: Range<usize>,
    /// Whether these tokens are (part of) a prompt, not a decode step.
    pub is_prefill: bool,
    /// Rows of the logits returned for it (`logits_indices[logits]`): none for a prompt chunk
    /// that is not the last, one to sample the next token, or `1 + draft_tokens.len()` when
    /// speculating.
    pub logits: Range<usize>,
    /// Tokens to sample from the first logits row: the request's `n` when this step completes
    /// the shared prompt of a request with `n > 1` (the scheduler forks the other samples when
    /// the results come back), else 1.
    pub num_samples: usize,
    /// Draft tokens being verified (the batch holds them after the sequence's last token).
    pub draft_tokens: Vec<u32>,
    /// The draft distribution of each draft token (`None`: a point mass, as for n-gram or
    /// greedy drafts).
    pub draft_probs: Option<Vec<Vec<f32>>>,
}

/// A sequence that ended, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedSeq {
    /// The sequence.
    pub seq: SeqId,
    /// Its request.
    pub request: RequestId,
    /// Which sample it is.
    pub sample: usize,
    /// Why it ended.
    pub reason: FinishReason,
}

/// One step's plan: what the backend computes, as the flat arrays of a forward batch.
#[derive(Debug, Clone, Default)]
pub struct SchedulerOutput {
    /// Step number (from 1).
    pub step: u64,
    /// The sequences of the batch, decodes first, in the order of the rows below.
    pub seqs: Vec<ScheduledSeq>,
    /// Input token of every batch token.
    pub token_ids: Vec<u32>,
    /// Position of every batch token.
    pub positions: Vec<u32>,
    /// KV-cache slot of every batch token.
    pub slot_mapping: Vec<i64>,
    /// `seqs[i]`'s tokens are `seq_starts[i]..seq_starts[i + 1]`.
    pub seq_starts: Vec<u32>,
    /// Block tables and context lengths, one row per entry of `seqs`.
    pub block_tables: BlockTableMatrix,
    /// Batch tokens whose logits are needed, in `seqs` order.
    pub logits_indices: Vec<u32>,
    /// Copy-on-write block copies to run before the forward pass.
    pub copies: Vec<CopyOp>,
    /// GPU -> CPU copies of sequences swapped out this step (run before the forward pass).
    pub swap_out: Vec<CopyOp>,
    /// CPU -> GPU copies of sequences swapped in this step (run before the forward pass).
    pub swap_in: Vec<CopyOp>,
    /// Sequences preempted this step (recomputed or swapped later; nothing for the caller to
    /// do but the copies).
    pub preempted: Vec<SeqId>,
    /// Sequences that ended while scheduling (deadlines): their blocks are already free.
    pub finished: Vec<FinishedSeq>,
}

impl SchedulerOutput {
    /// Whether there is nothing to compute.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Tokens computed in this step.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

/// What the engine sampled for one scheduled sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqResult {
    /// The sequence.
    pub seq: SeqId,
    /// New tokens: none for a prompt chunk that is not the last; `num_samples` tokens (one per
    /// sample) when the step completed a prompt; otherwise the accepted draft tokens followed
    /// by one sampled token (just the sampled token without speculation).
    pub tokens: Vec<u32>,
}

/// A step's new tokens for one sample: inline up to four (one per step without speculation),
/// so that a large batch's update allocates nothing per sequence.
pub type NewTokens = smallvec::SmallVec<[u32; 4]>;

/// New tokens of one sample, from [`Scheduler::update`](crate::Scheduler::update).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleOutput {
    /// The request.
    pub request: RequestId,
    /// Which sample.
    pub sample: usize,
    /// Its sequence.
    pub seq: SeqId,
    /// Tokens appended to its output this step (those after a stop token are dropped).
    pub new_tokens: NewTokens,
    /// Set when the sample ended (its blocks are already free).
    pub finished: Option<FinishReason>,
}
