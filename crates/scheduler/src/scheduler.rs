//! The scheduler: queues, the per-step plan, and the bookkeeping of step results.

use std::collections::VecDeque;
use std::time::Instant;

use kv_block_manager::{AllocStatus, BlockManager, SeqId, StepSlots};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::config::{Policy, PreemptionMode, SchedulerConfig};
use crate::error::{RejectReason, SchedulerError};
use crate::request::{
    FinishReason, FinishedSeq, Request, RequestId, SampleOutput, ScheduledSeq, SchedulerOutput,
    SeqResult,
};
use crate::speculation::{Candidate, Speculation};

/// Where a sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Not in the block manager: never admitted, or preempted by recompute.
    Waiting,
    /// In the block manager, on the GPU.
    Running,
    /// In the block manager, swapped out to the CPU pool.
    Swapped,
}

#[derive(Debug)]
struct SeqState {
    request: RequestId,
    sample: usize,
    /// Every known token: prompt, then output.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens whose KV is computed (as of the last completed step).
    num_computed: usize,
    status: Status,
    /// Step since which it has been waiting (for priority aging).
    waiting_since: u64,
    /// Arrival order of its request, then sample: the FCFS rank.
    order: (u64, usize),
}

impl SeqState {
    fn output_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens known but not computed (at least 1 for a live sequence: the last sampled token
    /// or the rest of the prompt).
    fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Whether the next step is a single decode token (the prompt, and any recomputation,
    /// done).
    fn is_decode(&self) -> bool {
        self.output_len() > 0 && self.pending() == 1
    }
}

#[derive(Debug)]
struct RequestState {
    req: Request,
    /// Sequences of its samples, by sample index (one until the prompt is prefilled).
    seqs: Vec<SeqId>,
    unfinished: usize,
}

/// What was scheduled for one sequence, kept until [`Scheduler::update`].
#[derive(Debug, Clone)]
struct InFlight {
    seq: SeqId,
    /// Known tokens computed by the step (not counting drafts).
    num_tokens: usize,
    drafts: Vec<u32>,
    num_samples: usize,
    /// Whether the step produces logits to sample from.
    samples: bool,
}

/// Counters and gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchedulerStats {
    /// Steps scheduled.
    pub steps: u64,
    /// Requests waiting for admission (their sequences).
    pub num_waiting: usize,
    /// Sequences holding GPU blocks.
    pub num_running: usize,
    /// Sequences swapped out to the CPU pool.
    pub num_swapped: usize,
    /// Preemptions so far (recompute and swap).
    pub num_preemptions: u64,
    /// Requests refused at admission.
    pub num_rejected: u64,
    /// Draft tokens proposed and accepted so far.
    pub spec_proposed: u64,
    /// Draft tokens accepted.
    pub spec_accepted: u64,
}

/// The iteration-level scheduler. See the [crate docs](crate).
pub struct Scheduler {
    config: SchedulerConfig,
    bm: BlockManager,
    requests: FxHashMap<RequestId, RequestState>,
    seqs: FxHashMap<SeqId, SeqState>,
    /// Admission queue, best rank first.
    waiting: VecDeque<SeqId>,
    /// Sequences with GPU blocks, best rank first.
    running: Vec<SeqId>,
    /// Swapped-out sequences, best rank first.
    swapped: VecDeque<SeqId>,
    next_seq: u64,
    next_arrival: u64,
    output: SchedulerOutput,
    in_flight: Option<Vec<InFlight>>,
    slots: StepSlots,
    spec: Option<Speculation>,
    stats: SchedulerStats,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.config)
            .field("waiting", &self.waiting)
            .field("running", &self.running)
            .field("swapped", &self.swapped)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler over `block_manager` (whose pool sizes, block size, prefix caching and
    /// sliding window it uses).
    ///
    /// # Errors
    /// [`SchedulerError::InvalidConfig`].
    pub fn new(
        config: SchedulerConfig,
        block_manager: BlockManager,
    ) -> Result<Self, SchedulerError> {
        config.validate()?;
        Ok(Self {
            config,
            bm: block_manager,
            requests: FxHashMap::default(),
            seqs: FxHashMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            swapped: VecDeque::new(),
            next_seq: 0,
            next_arrival: 0,
            output: SchedulerOutput::default(),
            in_flight: None,
            slots: StepSlots::default(),
            spec: None,
            stats: SchedulerStats::default(),
        })
    }

    /// Turns on speculative decoding (see [`crate::spec`]).
    pub fn set_speculation(&mut self, spec: Option<Speculation>) {
        self.spec = spec;
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The block manager (for its stats, or for tests).
    pub fn block_manager(&self) -> &BlockManager {
        &self.bm
    }

    /// Counters and queue lengths.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            num_waiting: self.waiting.len(),
            num_running: self.running.len(),
            num_swapped: self.swapped.len(),
            ..self.stats
        }
    }

    /// Whether any request is unfinished.
    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Live requests.
    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    /// The known tokens (prompt and output) of a live sequence.
    pub fn seq_tokens(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.tokens.as_slice())
    }

    /// Checks `req` and queues it.
    ///
    /// # Errors
    /// [`SchedulerError::Rejected`] with the reason; nothing is queued then.
    pub fn add_request(&mut self, req: Request) -> Result<(), SchedulerError> {
        if let Err(reason) = self.check_request(&req) {
            self.stats.num_rejected += 1;
            return Err(SchedulerError::Rejected {
                request: req.id,
                reason,
            });
        }
        let seq = self.new_seq_id();
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.seqs.insert(
            seq,
            SeqState {
                request: req.id,
                sample: 0,
                tokens: req.prompt.clone(),
                prompt_len: req.prompt.len(),
                num_computed: 0,
                status: Status::Waiting,
                waiting_since: self.stats.steps,
                order: (arrival, 0),
            },
        );
        self.requests.insert(
            req.id,
            RequestState {
                seqs: vec![seq],
                unfinished: 1,
                req,
            },
        );
        self.waiting.push_back(seq);
        Ok(())
    }

    fn check_request(&self, req: &Request) -> Result<(), RejectReason> {
        let c = &self.config;
        if self.requests.contains_key(&req.id) {
            return Err(RejectReason::DuplicateRequest(req.id));
        }
        if req.prompt.is_empty() {
            return Err(RejectReason::EmptyPrompt);
        }
        if req.max_tokens == 0 {
            return Err(RejectReason::ZeroMaxTokens);
        }
        if req.n == 0 || req.n > c.max_num_seqs {
            return Err(RejectReason::BadN {
                n: req.n,
                max: c.max_num_seqs,
            });
        }
        if let Some(vocab) = c.vocab_size
            && let Some(&token) = req.prompt.iter().find(|&&t| t as usize >= vocab)
        {
            return Err(RejectReason::TokenOutOfVocab {
                token,
                vocab_size: vocab,
            });
        }
        if req.prompt.len() >= c.max_model_len {
            return Err(RejectReason::PromptTooLong {
                prompt_len: req.prompt.len(),
                max_model_len: c.max_model_len,
            });
        }
        // The longest this request's sequence gets: its KV holds all tokens but the last.
        let longest = (req.prompt.len() + req.max_tokens).min(c.max_model_len) - 1;
        let bc = self.bm.config();
        let mut blocks = longest.div_ceil(bc.block_size);
        if let Some(w) = bc.sliding_window {
            blocks = blocks.min(w.div_ceil(bc.block_size) + 1);
        }
        if self.bm.can_allocate(blocks) == AllocStatus::Never {
            let pool = bc.num_gpu_blocks - (bc.num_gpu_blocks as f64 * bc.watermark) as usize;
            return Err(RejectReason::NeverFits {
                blocks_needed: blocks,
                pool_blocks: pool,
            });
        }
        Ok(())
    }

    fn new_seq_id(&mut self) -> SeqId {
        self.next_seq += 1;
        SeqId(self.next_seq)
    }

    /// Aborts request `id` wherever it is (queued, running, swapped, or in the step in
    /// flight, whose results for it are then ignored), freeing its blocks. Returns its
    /// unfinished samples.
    ///
    /// # Errors
    /// [`SchedulerError::UnknownRequest`].
    pub fn abort(&mut self, id: RequestId) -> Result<Vec<FinishedSeq>, SchedulerError> {
        let seqs = self
            .requests
            .get(&id)
            .ok_or(SchedulerError::UnknownRequest(id))?
            .seqs
            .clone();
        let mut out = Vec::new();
        for seq in seqs {
            if self.seqs.contains_key(&seq) {
                out.push(self.finish_seq(seq, FinishReason::Aborted)?);
            }
        }
        Ok(out)
    }

    /// Ends one sample (`seq`) with `reason`, e.g. [`FinishReason::StopString`] when the
    /// engine matched a stop string on its text. Its blocks are freed.
    ///
    /// # Errors
    /// [`SchedulerError::NotScheduled`] if `seq` is not live.
    pub fn finish(
        &mut self,
        seq: SeqId,
        reason: FinishReason,
    ) -> Result<FinishedSeq, SchedulerError> {
        if !self.seqs.contains_key(&seq) {
            return Err(SchedulerError::NotScheduled(seq));
        }
        self.finish_seq(seq, reason)
    }

    /// The step in flight failed: every request with a sequence in it ends with
    /// [`FinishReason::Error`] (all its samples), and their blocks are freed. Other requests
    /// are untouched.
    ///
    /// # Errors
    /// [`SchedulerError::StepOrder`] if no step is in flight.
    pub fn fail_step(&mut self) -> Result<Vec<FinishedSeq>, SchedulerError> {
        let flight = self.in_flight.take().ok_or(SchedulerError::StepOrder(
            "fail_step without a step in flight",
        ))?;
        let mut requests: Vec<RequestId> = flight
            .iter()
            .filter_map(|f| self.seqs.get(&f.seq).map(|s| s.request))
            .collect();
        requests.dedup();
        let mut out = Vec::new();
        for r in requests {
            let Some(state) = self.requests.get(&r) else {
                continue;
            };
            for seq in state.seqs.clone() {
                if self.seqs.contains_key(&seq) {
                    out.push(self.finish_seq(seq, FinishReason::Error)?);
                }
            }
        }
        Ok(out)
    }

    /// Removes a live sequence from everything, freeing its blocks.
    fn finish_seq(
        &mut self,
        seq: SeqId,
        reason: FinishReason,
    ) -> Result<FinishedSeq, SchedulerError> {
        let Some(s) = self.seqs.remove(&seq) else {
            return Err(SchedulerError::NotScheduled(seq));
        };
        match s.status {
            Status::Waiting => self.waiting.retain(|&q| q != seq),
            Status::Running => self.running.retain(|&q| q != seq),
            Status::Swapped => self.swapped.retain(|&q| q != seq),
        }
        if s.status != Status::Waiting {
            self.bm.free(seq)?;
        }
        if let Some(spec) = &mut self.spec {
            spec.forget(seq);
        }
        if let Some(r) = self.requests.get_mut(&s.request) {
            r.unfinished -= 1;
            if r.unfinished == 0 {
                self.requests.remove(&s.request);
            }
        }
        Ok(FinishedSeq {
            seq,
            request: s.request,
            sample: s.sample,
            reason,
        })
    }

    /// Rank key: lower is better.
    fn rank(&self, seq: SeqId) -> (i64, u64, usize) {
        let Some(s) = self.seqs.get(&seq) else {
            return (i64::MAX, u64::MAX, usize::MAX);
        };
        let priority = match self.config.policy {
            Policy::Fcfs => 0,
            Policy::Priority { aging_steps } => {
                let base = self
                    .requests
                    .get(&s.request)
                    .map_or(0, |r| i64::from(r.req.priority));
                let aged = if s.status == Status::Waiting {
                    ((self.stats.steps - s.waiting_since) / aging_steps) as i64
                } else {
                    0
                };
                base - aged
            }
        };
        (priority, s.order.0, s.order.1)
    }

    /// Plans the next step. `now` is checked against request deadlines.
    ///
    /// Running sequences come first, in rank order: each decoding sequence computes one token
    /// (plus its draft tokens when speculating), each sequence still in its prompt a chunk;
    /// when blocks run out the lowest-ranked running sequences are preempted. Then, if nothing
    /// was preempted, swapped-out sequences come back, and then waiting requests are admitted
    /// in rank order while the token budget, `max_num_seqs` and the free blocks (above the
    /// watermark) allow; admission stops at the first request that does not fit, so none is
    /// overtaken.
    ///
    /// # Errors
    /// [`SchedulerError::StepOrder`] if the previous step's results were not passed to
    /// [`update`](Self::update) (or [`fail_step`](Self::fail_step)); the step plan is then
    /// unchanged. [`SchedulerError::Proposer`] if the speculative proposer fails (the step is
    /// not scheduled; the next call retries).
    pub fn schedule(&mut self, now: Instant) -> Result<&SchedulerOutput, SchedulerError> {
        if self.in_flight.is_some() {
            return Err(SchedulerError::StepOrder(
                "schedule called before the previous step's update",
            ));
        }
        self.stats.steps += 1;
        let mut out = std::mem::take(&mut self.output);
        clear_output(&mut out);
        out.step = self.stats.steps;
        self.slots.clear();
        let mut flight = Vec::new();

        self.expire_deadlines(now, &mut out)?;
        if matches!(self.config.policy, Policy::Priority { .. }) {
            let mut w: Vec<SeqId> = self.waiting.drain(..).collect();
            w.sort_by_key(|&s| self.rank(s));
            self.waiting = w.into();
        }

        let mut budget = self.config.max_num_batched_tokens;
        let drafts = match self.spec.as_mut() {
            Some(spec) => {
                let max_len = self.config.max_model_len;
                let candidates: Vec<Candidate<'_>> = self
                    .running
                    .iter()
                    .take(self.config.max_num_seqs)
                    .filter_map(|&q| {
                        let s = self.seqs.get(&q)?;
                        let r = self.requests.get(&s.request)?;
                        // Drafts plus the bonus token stay within max_tokens and max_model_len.
                        let max_k = (r.req.max_tokens.saturating_sub(s.output_len() + 1))
                            .min(max_len.saturating_sub(s.tokens.len() + 1));
                        s.is_decode().then_some(Candidate {
                            seq: q,
                            tokens: &s.tokens,
                            temperature: r.req.temperature,
                            max_k,
                        })
                    })
                    .collect();
                spec.propose(&candidates, self.running.len())
                    .map_err(|e| SchedulerError::Proposer(e.to_string()))?
            }
            None => FxHashMap::default(),
        };

        // 1. Running sequences, best first; victims come from the end.
        let mut preempted_any = false;
        let mut i = 0;
        while i < self.running.len() {
            if flight.len() >= self.config.max_num_seqs || budget == 0 {
                break;
            }
            let seq = self.running[i];
            let Some(s) = self.seqs.get(&seq) else {
                i += 1;
                continue;
            };
            let decode = s.is_decode();
            let mut draft = if decode {
                drafts.get(&seq).cloned().unwrap_or_default()
            } else {
                Vec::new()
            };
            let chunk = if decode {
                draft.truncate(budget - 1);
                1
            } else {
                self.chunk(s.pending(), budget)
            };
            let new_tokens = chunk + draft.len();
            // Preempt from the end until the blocks fit (possibly this sequence itself).
            let mut fits = true;
            loop {
                let need = self.bm.blocks_needed(seq, new_tokens)?;
                if need <= self.bm.num_available_blocks() {
                    break;
                }
                let Some(&victim) = self.running.last() else {
                    fits = false;
                    break;
                };
                self.preempt(victim, &mut out)?;
                preempted_any = true;
                if victim == seq {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            self.place(seq, chunk, draft, &mut out, &mut flight)?;
            budget -= new_tokens;
            i += 1;
        }

        // 2. Swapped-out sequences come back (only in a step without preemption).
        while !preempted_any && budget > 0 && flight.len() < self.config.max_num_seqs {
            let Some(&seq) = self.swapped.front() else {
                break;
            };
            let blocks = self.swap_in_blocks(seq)?;
            if self.bm.can_allocate(blocks + 1) != AllocStatus::Ok {
                break;
            }
            out.swap_in.extend(self.bm.swap_in(&[seq])?);
            self.swapped.pop_front();
            self.set_status(seq, Status::Running);
            self.insert_running(seq);
            let Some(s) = self.seqs.get(&seq) else {
                continue;
            };
            let chunk = if s.is_decode() {
                1
            } else {
                self.chunk(s.pending(), budget)
            };
            if self.bm.blocks_needed(seq, chunk)? > self.bm.num_available_blocks() {
                break;
            }
            self.place(seq, chunk, Vec::new(), &mut out, &mut flight)?;
            budget -= chunk;
        }

        // 3. Admission, strictly in rank order.
        while !preempted_any
            && self.swapped.is_empty()
            && budget > 0
            && flight.len() < self.config.max_num_seqs
            && self.running.len() < self.config.max_num_seqs
        {
            let Some(&seq) = self.waiting.front() else {
                break;
            };
            let Some(s) = self.seqs.get(&seq) else {
                self.waiting.pop_front();
                continue;
            };
            let ns = self
                .requests
                .get(&s.request)
                .and_then(|r| r.req.cache_namespace.clone());
            let m = self.bm.prefix_match(&s.tokens, ns.as_deref());
            let chunk = self.chunk(s.tokens.len() - m.num_cached_tokens, budget);
            let bs = self.bm.block_size();
            let cached_blocks = m.num_cached_tokens / bs;
            let revived = m
                .blocks_needed
                .saturating_sub(s.tokens.len().div_ceil(bs) - cached_blocks);
            let blocks = revived + (m.num_cached_tokens + chunk).div_ceil(bs) - cached_blocks;
            if self.bm.can_allocate(blocks) != AllocStatus::Ok {
                break;
            }
            let cached = self.bm.add_sequence(seq, &s.tokens, ns.as_deref())?;
            self.waiting.pop_front();
            let chunk = self.chunk(s.tokens.len() - cached, budget);
            if let Some(s) = self.seqs.get_mut(&seq) {
                s.num_computed = cached;
                s.status = Status::Running;
            }
            self.insert_running(seq);
            self.place(seq, chunk, Vec::new(), &mut out, &mut flight)?;
            budget -= chunk;
        }

        // 4. The batch's block tables, in batch order.
        let order: Vec<SeqId> = out.seqs.iter().map(|s| s.seq).collect();
        out.seq_starts.push(0);
        out.seq_starts
            .extend(out.seqs.iter().map(|s| s.tokens.end as u32));
        self.bm
            .update_block_table_matrix(&order, None, &mut out.block_tables)?;
        out.slot_mapping.extend_from_slice(&self.slots.slot_mapping);
        out.copies.extend_from_slice(&self.slots.copies);
        self.output = out;
        self.in_flight = Some(flight);
        Ok(&self.output)
    }

    /// The prompt chunk for `pending` tokens with `budget` left.
    fn chunk(&self, pending: usize, budget: usize) -> usize {
        let cap = self.config.max_prefill_chunk.unwrap_or(usize::MAX);
        pending.min(budget).min(cap)
    }

    /// Blocks `seq` (swapped out) needs to come back.
    fn swap_in_blocks(&self, seq: SeqId) -> Result<usize, SchedulerError> {
        Ok(self
            .bm
            .block_table(seq)?
            .iter()
            .filter(|b| b.is_some())
            .count())
    }

    fn set_status(&mut self, seq: SeqId, status: Status) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.status = status;
            if status == Status::Waiting {
                s.waiting_since = self.stats.steps;
            }
        }
    }

    fn insert_running(&mut self, seq: SeqId) {
        let key = self.rank(seq);
        let at = self.running.partition_point(|&q| self.rank(q) <= key);
        self.running.insert(at, seq);
    }

    /// Preempts running `seq` (swap if configured and possible, else recompute).
    fn preempt(&mut self, seq: SeqId, out: &mut SchedulerOutput) -> Result<(), SchedulerError> {
        self.running.retain(|&q| q != seq);
        self.stats.num_preemptions += 1;
        out.preempted.push(seq);
        if let Some(spec) = &mut self.spec {
            spec.forget(seq);
        }
        if self.config.preemption_mode == PreemptionMode::Swap
            && let Ok(copies) = self.bm.swap_out(&[seq])
        {
            out.swap_out.extend(copies);
            self.set_status(seq, Status::Swapped);
            let key = self.rank(seq);
            let at = self.swapped.partition_point(|&q| self.rank(q) <= key);
            self.swapped.insert(at, seq);
            return Ok(());
        }
        self.bm.free(seq)?;
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.num_computed = 0;
        }
        self.set_status(seq, Status::Waiting);
        let key = self.rank(seq);
        let at = self.waiting.partition_point(|&q| self.rank(q) <= key);
        self.waiting.insert(at, seq);
        Ok(())
    }

    /// Gives slots to `chunk` known tokens (and `draft`) of running `seq` and adds it to the
    /// batch.
    fn place(
        &mut self,
        seq: SeqId,
        chunk: usize,
        draft: Vec<u32>,
        out: &mut SchedulerOutput,
        flight: &mut Vec<InFlight>,
    ) -> Result<(), SchedulerError> {
        let Some(s) = self.seqs.get(&seq) else {
            return Err(SchedulerError::NotScheduled(seq));
        };
        let start = s.num_computed;
        let known = &s.tokens[start..start + chunk];
        if self.bm.tokens(seq)?.len() > start {
            // Prompt (or recomputed) tokens the manager already holds: give them slots.
            debug_assert!(draft.is_empty());
            self.bm.allocate_slots(seq, chunk, &mut self.slots)?;
        } else {
            // A decode: the last sampled token, then any drafts.
            let mut append = known.to_vec();
            append.extend_from_slice(&draft);
            self.bm.append_tokens(seq, &append, &mut self.slots)?;
        }
        let first = out.token_ids.len();
        out.token_ids.extend_from_slice(known);
        out.token_ids.extend_from_slice(&draft);
        let n = chunk + draft.len();
        out.positions.extend((start..start + n).map(|p| p as u32));
        let completes = start + chunk == s.tokens.len();
        let logits_first = out.logits_indices.len();
        if completes {
            // The last known token's logits, then one row per draft token.
            let last = first + chunk - 1;
            out.logits_indices
                .extend((last..last + 1 + draft.len()).map(|t| t as u32));
        }
        let first_sampling = completes && s.output_len() == 0;
        let num_samples = match self.requests.get(&s.request) {
            Some(r) if first_sampling && r.seqs.len() == 1 => r.req.n,
            _ => 1,
        };
        let draft_probs = self
            .spec
            .as_ref()
            .and_then(|sp| sp.draft_probs(seq, draft.len()));
        out.seqs.push(ScheduledSeq {
            seq,
            request: s.request,
            sample: s.sample,
            tokens: first..first + n,
            is_prefill: !s.is_decode(),
            logits: logits_first..out.logits_indices.len(),
            num_samples,
            draft_tokens: draft.clone(),
            draft_probs,
        });
        flight.push(InFlight {
            seq,
            num_tokens: chunk,
            drafts: draft,
            num_samples,
            samples: completes,
        });
        Ok(())
    }

    fn expire_deadlines(
        &mut self,
        now: Instant,
        out: &mut SchedulerOutput,
    ) -> Result<(), SchedulerError> {
        let expired: Vec<RequestId> = self
            .requests
            .values()
            .filter(|r| r.req.deadline.is_some_and(|d| d <= now))
            .map(|r| r.req.id)
            .collect();
        for id in expired {
            let Some(r) = self.requests.get(&id) else {
                continue;
            };
            for seq in r.seqs.clone() {
                if self.seqs.contains_key(&seq) {
                    out.finished
                        .push(self.finish_seq(seq, FinishReason::Deadline)?);
                }
            }
        }
        Ok(())
    }

    /// Takes the sampled tokens of the step in flight: appends them, rolls back rejected draft
    /// tokens, forks the samples of `n > 1` requests, checks the stop conditions and frees
    /// what finished. `results` has one entry per scheduled sequence (in any order; entries
    /// of sequences aborted since the step was scheduled are ignored).
    ///
    /// # Errors
    /// [`SchedulerError::StepOrder`] without a step in flight; [`SchedulerError::NotScheduled`]
    /// or [`SchedulerError::BadResult`] for results that do not fit the plan — checked before
    /// anything changes, and the step stays in flight (fix the results, or
    /// [`fail_step`](Self::fail_step)).
    pub fn update(&mut self, results: &[SeqResult]) -> Result<Vec<SampleOutput>, SchedulerError> {
        let Some(flight) = self.in_flight.as_ref() else {
            return Err(SchedulerError::StepOrder("update without a step in flight"));
        };
        let plan: FxHashMap<SeqId, &InFlight> = flight.iter().map(|f| (f.seq, f)).collect();
        let mut seen = FxHashSet::default();
        for r in results {
            let Some(f) = plan.get(&r.seq) else {
                return Err(SchedulerError::NotScheduled(r.seq));
            };
            if !seen.insert(r.seq) {
                return Err(bad(r.seq, "appears twice".into()));
            }
            if !self.seqs.contains_key(&r.seq) {
                continue; // aborted meanwhile
            }
            check_result(f, r)?;
        }
        if let Some(f) = flight
            .iter()
            .find(|f| !seen.contains(&f.seq) && self.seqs.contains_key(&f.seq))
        {
            return Err(bad(f.seq, "no result for a scheduled sequence".into()));
        }
        let Some(flight) = self.in_flight.take() else {
            return Err(SchedulerError::StepOrder("update without a step in flight"));
        };
        let by_seq: FxHashMap<SeqId, &SeqResult> = results.iter().map(|r| (r.seq, r)).collect();
        let mut outputs = Vec::new();
        for f in &flight {
            let (Some(r), true) = (by_seq.get(&f.seq), self.seqs.contains_key(&f.seq)) else {
                continue;
            };
            self.apply(f, r, &mut outputs)?;
        }
        Ok(outputs)
    }

    fn apply(
        &mut self,
        f: &InFlight,
        r: &SeqResult,
        outputs: &mut Vec<SampleOutput>,
    ) -> Result<(), SchedulerError> {
        let seq = f.seq;
        let Some(s) = self.seqs.get_mut(&seq) else {
            return Ok(());
        };
        s.num_computed += f.num_tokens;
        if !f.samples {
            self.bm.cache_full_blocks(seq)?;
            return Ok(());
        }
        // Accepted drafts have valid KV; drop the rejected ones' slots.
        let accepted = if f.num_samples > 1 {
            0
        } else {
            r.tokens.len() - 1
        };
        if !f.drafts.is_empty() {
            let keep = s.num_computed + accepted;
            s.num_computed = keep;
            self.bm.truncate(seq, keep)?;
            self.stats.spec_proposed += f.drafts.len() as u64;
            self.stats.spec_accepted += accepted as u64;
            if let Some(spec) = &mut self.spec {
                spec.record(seq, f.drafts.len(), accepted)
                    .map_err(|e| SchedulerError::Proposer(e.to_string()))?;
            }
        }
        self.bm.cache_full_blocks(seq)?;
        // The other samples fork the prompt's blocks before any sample can finish.
        let mut samples = vec![(seq, r.tokens[0])];
        for (i, &t) in r.tokens.iter().enumerate().take(f.num_samples).skip(1) {
            let child = self.new_seq_id();
            self.bm.fork(seq, child)?;
            let Some(parent) = self.seqs.get(&seq) else {
                return Err(bad(seq, "vanished while forking".into()));
            };
            let state = SeqState {
                request: parent.request,
                sample: i,
                tokens: parent.tokens.clone(),
                prompt_len: parent.prompt_len,
                num_computed: parent.num_computed,
                status: Status::Running,
                waiting_since: parent.waiting_since,
                order: (parent.order.0, i),
            };
            let request = parent.request;
            self.seqs.insert(child, state);
            if let Some(rs) = self.requests.get_mut(&request) {
                rs.seqs.push(child);
                rs.unfinished += 1;
            }
            self.insert_running(child);
            samples.push((child, t));
        }
        if f.num_samples > 1 {
            for (q, t) in samples {
                self.push_tokens(q, &[t], outputs)?;
            }
        } else {
            self.push_tokens(seq, &r.tokens, outputs)?;
        }
        Ok(())
    }

    /// Appends sampled tokens to `seq`'s output, stopping at the first stop condition.
    fn push_tokens(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        outputs: &mut Vec<SampleOutput>,
    ) -> Result<(), SchedulerError> {
        let Some(s) = self.seqs.get_mut(&seq) else {
            return Ok(());
        };
        let Some(r) = self.requests.get(&s.request) else {
            return Ok(());
        };
        let mut finished = None;
        let mut new_tokens = Vec::with_capacity(tokens.len());
        for &t in tokens {
            s.tokens.push(t);
            new_tokens.push(t);
            if r.req.stop_token_ids.contains(&t) {
                finished = Some(FinishReason::StopToken(t));
            } else if !r.req.ignore_eos && self.config.eos_token_ids.contains(&t) {
                finished = Some(FinishReason::Eos);
            } else if s.output_len() >= r.req.max_tokens
                || s.tokens.len() >= self.config.max_model_len
            {
                finished = Some(FinishReason::Length);
            }
            if finished.is_some() {
                break;
            }
        }
        let (request, sample) = (s.request, s.sample);
        if let Some(reason) = finished {
            self.finish_seq(seq, reason)?;
        }
        outputs.push(SampleOutput {
            request,
            sample,
            seq,
            new_tokens,
            finished,
        });
        Ok(())
    }
}

fn bad(seq: SeqId, reason: String) -> SchedulerError {
    SchedulerError::BadResult { seq, reason }
}

fn check_result(f: &InFlight, r: &SeqResult) -> Result<(), SchedulerError> {
    let n = r.tokens.len();
    if !f.samples {
        if n != 0 {
            return Err(bad(
                r.seq,
                format!("{n} tokens for a prompt chunk that samples none"),
            ));
        }
        return Ok(());
    }
    if f.num_samples > 1 {
        if n != f.num_samples {
            return Err(bad(
                r.seq,
                format!(
                    "{n} tokens; the step samples {} (one per sample)",
                    f.num_samples
                ),
            ));
        }
        return Ok(());
    }
    if n == 0 || n > f.drafts.len() + 1 {
        return Err(bad(
            r.seq,
            format!(
                "{n} tokens; expected 1..={} (accepted drafts + 1)",
                f.drafts.len() + 1
            ),
        ));
    }
    if r.tokens[..n - 1] != f.drafts[..n - 1] {
        return Err(bad(r.seq, "accepted tokens differ from the drafts".into()));
    }
    Ok(())
}

fn clear_output(out: &mut SchedulerOutput) {
    out.seqs.clear();
    out.token_ids.clear();
    out.positions.clear();
    out.slot_mapping.clear();
    out.seq_starts.clear();
    out.logits_indices.clear();
    out.copies.clear();
    out.swap_out.clear();
    out.swap_in.clear();
    out.preempted.clear();
    out.finished.clear();
}
