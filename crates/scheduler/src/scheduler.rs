//! The scheduler: queues, the per-step plan, and the bookkeeping of step results.

use std::collections::VecDeque;
use std::time::Instant;

use kv_block_manager::{AllocStatus, BlockManager, SeqId, StepSlots};
use rustc_hash::{FxBuildHasher, FxHashMap, FxHashSet};

type FxIndexMap<K, V> = indexmap::IndexMap<K, V, FxBuildHasher>;

use crate::config::{Policy, PreemptionMode, SchedulerConfig};
use crate::error::{RejectReason, SchedulerError};
use crate::request::{
    FinishReason, FinishedSeq, NewTokens, Request, RequestId, SampleOutput, ScheduledSeq,
    SchedulerOutput, SeqResult,
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
    /// The last of `tokens` (so that a decode step reads no token vector).
    last: u32,
    prompt_len: usize,
    /// Leading tokens whose KV is computed (as of the last completed step).
    num_computed: usize,
    /// Tokens the block manager got with `add_sequence` (the prompt, or every known token when
    /// readmitted after a recompute preemption): they get slots chunk by chunk, as a prefill;
    /// tokens sampled after them are appended one step at a time.
    num_added: usize,
    status: Status,
    /// The step that last placed it in a batch (0: never).
    placed_step: u64,
    /// Steps scheduled before its request arrived (for priority aging).
    arrival_step: u64,
    /// Arrival order of its request, then sample: the FCFS rank.
    order: (u64, usize),
    /// Its request's stop conditions that `update` checks for every token (copied here so that
    /// a plain decode does not look the request up).
    stops: Stops,
}

/// A request's per-token stop conditions.
#[derive(Debug, Clone, Copy)]
struct Stops {
    max_tokens: usize,
    ignore_eos: bool,
    /// Whether the request has stop token ids (checked on the request).
    has_stop_ids: bool,
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
    /// done). The last chunk of a recomputation is one token too, but that token is already in
    /// the block manager: it is a prefill (no drafts).
    fn is_decode(&self) -> bool {
        self.pending() == 1 && self.num_computed >= self.num_added
    }
}

#[derive(Debug)]
struct RequestState {
    req: Request,
    /// Sequences of its samples, by sample index (one until the prompt is prefilled).
    seqs: Vec<SeqId>,
    unfinished: usize,
}

/// Known tokens a scheduled sequence computes (not counting drafts).
fn num_known(f: &ScheduledSeq) -> usize {
    f.tokens.len() - f.draft_tokens.len()
}

/// Whether a scheduled sequence samples (the step completes its known tokens).
fn samples(f: &ScheduledSeq) -> bool {
    !f.logits.is_empty()
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
    /// Live sequences in a dense vector (admission order, so a pass over the running list
    /// walks memory mostly forward) behind a small id -> index table.
    seqs: FxIndexMap<SeqId, SeqState>,
    /// Admission queue, best rank first.
    waiting: VecDeque<SeqId>,
    /// Sequences with GPU blocks, best rank first.
    running: Vec<SeqId>,
    /// Sequences that running requests with `n > 1` will fork when their prompts complete
    /// (`n - 1` each): seats under `max_num_seqs` that admission keeps for them.
    reserved_forks: usize,
    /// Swapped-out sequences, best rank first.
    swapped: VecDeque<SeqId>,
    /// No live request has a deadline before this (`None`: none has one). It may be earlier
    /// than the earliest live deadline (requests end); `schedule` then rescans.
    next_deadline: Option<Instant>,
    next_seq: u64,
    next_arrival: u64,
    output: SchedulerOutput,
    /// A step was scheduled and awaits its `update`: `output.seqs` is its plan.
    in_flight: bool,
    /// Reused from step to step: the batch order.
    order: Vec<SeqId>,
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
            seqs: FxIndexMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved_forks: 0,
            swapped: VecDeque::new(),
            next_deadline: None,
            next_seq: 0,
            next_arrival: 0,
            output: SchedulerOutput::default(),
            in_flight: false,
            order: Vec::new(),
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
        if let Some(d) = req.deadline {
            self.next_deadline = Some(self.next_deadline.map_or(d, |n| n.min(d)));
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
                last: req.prompt.last().copied().unwrap_or_default(),
                prompt_len: req.prompt.len(),
                num_computed: 0,
                num_added: req.prompt.len(),
                status: Status::Waiting,
                placed_step: 0,
                arrival_step: self.stats.steps,
                order: (arrival, 0),
                stops: Stops {
                    max_tokens: req.max_tokens,
                    ignore_eos: req.ignore_eos,
                    has_stop_ids: !req.stop_token_ids.is_empty(),
                },
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
        if !self.in_flight {
            return Err(SchedulerError::StepOrder(
                "fail_step without a step in flight",
            ));
        }
        self.in_flight = false;
        let mut requests: Vec<RequestId> = self
            .output
            .seqs
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
        let Some(s) = self.seqs.swap_remove(&seq) else {
            return Err(SchedulerError::NotScheduled(seq));
        };
        match s.status {
            Status::Waiting => self.waiting.retain(|&q| q != seq),
            Status::Running => {
                self.running.retain(|&q| q != seq);
                let reserve = self
                    .requests
                    .get(&s.request)
                    .map_or(0, |r| fork_reserve(&s, r));
                self.reserved_forks = self.reserved_forks.saturating_sub(reserve);
            }
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
    ///
    /// Under [`Policy::Priority`] a request gains one priority level per `aging_steps` steps
    /// since its arrival, in every state (waiting, running, swapped, and across preemptions):
    /// its effective priority at step `t` is `priority − (t − arrival) / aging_steps`, so the
    /// order between two requests does not change with `t` and is that of the fixed key
    /// `priority · aging_steps + arrival`. A request is therefore overtaken only by requests
    /// that arrived less than `(its priority − theirs) · aging_steps` steps after it: none
    /// starves, and the queues stay sorted without re-ranking.
    fn rank(&self, seq: SeqId) -> (i128, u64, usize) {
        let Some(s) = self.seqs.get(&seq) else {
            return (i128::MAX, u64::MAX, usize::MAX);
        };
        let key = match self.config.policy {
            Policy::Fcfs => 0,
            Policy::Priority { aging_steps } => {
                let base = self
                    .requests
                    .get(&s.request)
                    .map_or(0, |r| i128::from(r.req.priority));
                base * i128::from(aging_steps) + i128::from(s.arrival_step)
            }
        };
        (key, s.order.0, s.order.1)
    }

    /// Plans the next step. `now` is checked against request deadlines.
    ///
    /// Running sequences come first: decoding ones (one token each, plus draft tokens when
    /// speculating), then those still in their prompt (a chunk each), each pass in rank order;
    /// when blocks run out the lowest-ranked running sequences not yet placed are preempted. Then, if nothing
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
        if self.in_flight {
            return Err(SchedulerError::StepOrder(
                "schedule called before the previous step's update",
            ));
        }
        self.stats.steps += 1;
        let mut out = std::mem::take(&mut self.output);
        clear_output(&mut out);
        out.step = self.stats.steps;
        self.slots.clear();

        // Drafts first: if the proposer fails, nothing has changed yet (deadlines expired
        // here would otherwise be lost with the step).
        let mut drafts = match self.spec.as_mut() {
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
                        // A temperature the proposer refuses would fail every step.
                        let t = r.req.temperature;
                        let valid = t.is_finite() && t >= 0.0;
                        (s.is_decode() && valid).then_some(Candidate {
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

        self.expire_deadlines(now, &mut out)?;
        if matches!(self.config.policy, Policy::Priority { .. }) {
            let mut w: Vec<SeqId> = self.waiting.drain(..).collect();
            w.sort_by_key(|&s| self.rank(s));
            self.waiting = w.into();
        }

        let mut budget = self.config.max_num_batched_tokens;

        // 1. Running sequences: decodes first, then prompt chunks, each pass in rank order.
        // Victims come from the end of the running list, skipping what this step placed.
        let mut preempted_any = false;
        let mut prompts_running = false;
        for decodes in [true, false] {
            if !decodes && !prompts_running {
                break;
            }
            let mut i = 0;
            let mut hint = 0;
            while i < self.running.len() {
                if out.seqs.len() >= self.config.max_num_seqs || budget == 0 {
                    break;
                }
                let seq = self.running[i];
                let Some((index, s)) = self.find_seq(seq, hint) else {
                    i += 1;
                    continue;
                };
                hint = index + 1;
                let decode = s.is_decode();
                if decode != decodes || s.placed_step == out.step {
                    prompts_running |= !decode;
                    i += 1;
                    continue;
                }
                let mut draft = if decode && !drafts.is_empty() {
                    drafts.remove(&seq).unwrap_or_default()
                } else {
                    Vec::new()
                };
                let chunk = if decode {
                    draft.truncate(budget.min(self.window_cap(s.num_computed)) - 1);
                    1
                } else {
                    self.chunk(s.num_computed, s.pending(), budget)
                };
                let new_tokens = chunk + draft.len();
                // Preempt until the blocks fit (possibly this sequence itself).
                let mut fits = true;
                while !self.fits(seq, new_tokens)? {
                    let Some(victim) = self.victim(out.step) else {
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
                self.place(seq, index, chunk, draft, &mut out)?;
                budget -= new_tokens;
                i += 1;
            }
        }

        // 2. Swapped-out sequences come back (only in a step without preemption).
        while !preempted_any && budget > 0 && out.seqs.len() < self.config.max_num_seqs {
            let Some(&seq) = self.swapped.front() else {
                break;
            };
            // Its blocks and one to grow into, above the watermark. A sequence that can never
            // get that much (it held more than the pool above the watermark, or all of it with
            // its last block full: possible when it shared blocks or grew past the watermark
            // while running) comes back when nothing else runs and its blocks are free.
            let blocks = self.swap_in_blocks(seq)?;
            let fits = match self.bm.can_allocate(blocks + 1) {
                AllocStatus::Ok => true,
                AllocStatus::Later => false,
                AllocStatus::Never => {
                    self.running.is_empty() && blocks <= self.bm.num_available_blocks()
                }
            };
            if !fits {
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
                self.chunk(s.num_computed, s.pending(), budget)
            };
            if !self.fits(seq, chunk)? {
                break;
            }
            self.place(seq, 0, chunk, Vec::new(), &mut out)?;
            budget -= chunk;
        }

        // 3. Admission, strictly in rank order.
        while !preempted_any
            && self.swapped.is_empty()
            && budget > 0
            && out.seqs.len() < self.config.max_num_seqs
            && self.running.len() < self.config.max_num_seqs
        {
            let Some(&seq) = self.waiting.front() else {
                break;
            };
            let Some(s) = self.seqs.get(&seq) else {
                self.waiting.pop_front();
                continue;
            };
            // A request with `n > 1` forks into `n` running sequences when its prompt
            // completes: admit it only if they all fit under `max_num_seqs`, next to the
            // running ones and the forks they will make.
            let samples = 1 + self
                .requests
                .get(&s.request)
                .map_or(0, |r| fork_reserve(s, r));
            if self.running.len() + self.reserved_forks + samples > self.config.max_num_seqs {
                break;
            }
            let ns = self
                .requests
                .get(&s.request)
                .and_then(|r| r.req.cache_namespace.clone());
            let m = self.bm.prefix_match(&s.tokens, ns.as_deref());
            let cached = m.num_cached_tokens;
            let chunk = self.chunk(cached, s.tokens.len() - cached, budget);
            let bs = self.bm.block_size();
            let cached_blocks = cached / bs;
            let mut revived = m
                .blocks_needed
                .saturating_sub(s.tokens.len().div_ceil(bs) - cached_blocks);
            if let Some(w) = self.bm.config().sliding_window {
                // Cached blocks before the window are released again at once: at most the
                // ones inside it are taken from the pool.
                let first_kept = ((cached + 1).saturating_sub(w) / bs).min(cached_blocks);
                revived = revived.min(cached_blocks - first_kept);
            }
            let blocks = revived + (cached + chunk).div_ceil(bs) - cached_blocks;
            if self.bm.can_allocate(blocks) != AllocStatus::Ok {
                break;
            }
            let cached = self.bm.add_sequence(seq, &s.tokens, ns.as_deref())?;
            self.waiting.pop_front();
            let chunk = self.chunk(cached, s.tokens.len() - cached, budget);
            if let Some(s) = self.seqs.get_mut(&seq) {
                s.num_computed = cached;
                s.num_added = s.tokens.len();
                s.status = Status::Running;
            }
            self.insert_running(seq);
            self.place(seq, 0, chunk, Vec::new(), &mut out)?;
            budget -= chunk;
        }

        // 4. The batch's block tables, in batch order.
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(out.seqs.iter().map(|s| s.seq));
        out.seq_starts.push(0);
        out.seq_starts
            .extend(out.seqs.iter().map(|s| s.tokens.end as u32));
        self.bm
            .update_block_table_matrix(&order, None, &mut out.block_tables)?;
        self.order = order;
        out.slot_mapping.extend_from_slice(&self.slots.slot_mapping);
        out.copies.extend_from_slice(&self.slots.copies);
        self.output = out;
        self.in_flight = true;
        Ok(&self.output)
    }

    /// `seq`'s index in `seqs` and its state, trying index `hint` first: a pass over the
    /// running list then mostly reads `seqs` front to back instead of probing its table.
    fn find_seq(&self, seq: SeqId, hint: usize) -> Option<(usize, &SeqState)> {
        find_index(&self.seqs, seq, hint).map(|i| (i, &self.seqs[i]))
    }

    /// The prompt chunk from position `start` for `pending` tokens with `budget` left.
    fn chunk(&self, start: usize, pending: usize, budget: usize) -> usize {
        let cap = self.config.max_prefill_chunk.unwrap_or(usize::MAX);
        pending.min(budget).min(cap).min(self.window_cap(start))
    }

    /// With a sliding window, the most tokens from position `start` that one step can give
    /// slots to while the sequence holds at most the pool above the watermark: the blocks of
    /// the step span from the first one the window keeps to the last new token, and a chunk
    /// that needed more than the pool would never fit (at least 1; unlimited without a
    /// window). Admission guarantees that a single token always fits.
    fn window_cap(&self, start: usize) -> usize {
        let bc = self.bm.config();
        let Some(w) = bc.sliding_window else {
            return usize::MAX;
        };
        let usable = bc.num_gpu_blocks - (bc.num_gpu_blocks as f64 * bc.watermark) as usize;
        let first_kept = (start + 1).saturating_sub(w) / bc.block_size;
        ((first_kept + usable) * bc.block_size)
            .saturating_sub(start)
            .max(1)
    }

    /// Whether `num_tokens` more tokens of running `seq` get slots from the blocks available
    /// now (counting those its sliding window releases first).
    fn fits(&self, seq: SeqId, num_tokens: usize) -> Result<bool, SchedulerError> {
        let available = self.bm.num_available_blocks();
        // At most the blocks the tokens span, plus a copy of a shared last block.
        if num_tokens.div_ceil(self.bm.block_size()) < available {
            return Ok(true);
        }
        let need = self.bm.blocks_needed(seq, num_tokens)?;
        if need <= available {
            return Ok(true);
        }
        Ok(need <= available + self.window_releasable(seq)?)
    }

    /// With a sliding window, the blocks of `seq` that its next step releases (those before
    /// the window of its next token that no other sequence holds): they count as available
    /// for that step. 0 without a window.
    fn window_releasable(&self, seq: SeqId) -> Result<usize, SchedulerError> {
        let Some(w) = self.bm.config().sliding_window else {
            return Ok(0);
        };
        let next = self.bm.num_slotted_tokens(seq)?;
        let first_kept = (next + 1).saturating_sub(w) / self.bm.block_size();
        let mut releasable = 0;
        for b in self.bm.block_table(seq)?.iter().take(first_kept).flatten() {
            if self.bm.ref_count(*b)? == 1 {
                releasable += 1;
            }
        }
        Ok(releasable)
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
        }
    }

    fn insert_running(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.get(&seq)
            && let Some(r) = self.requests.get(&s.request)
        {
            self.reserved_forks += fork_reserve(s, r);
        }
        let key = self.rank(seq);
        let at = self.running.partition_point(|&q| self.rank(q) <= key);
        self.running.insert(at, seq);
    }

    /// Preempts running `seq` (swap if configured and possible, else recompute).
    fn preempt(&mut self, seq: SeqId, out: &mut SchedulerOutput) -> Result<(), SchedulerError> {
        self.running.retain(|&q| q != seq);
        if let Some(s) = self.seqs.get(&seq)
            && let Some(r) = self.requests.get(&s.request)
        {
            self.reserved_forks = self.reserved_forks.saturating_sub(fork_reserve(s, r));
        }
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
    /// The lowest-ranked running sequence not yet placed in step `step`.
    fn victim(&self, step: u64) -> Option<SeqId> {
        self.running
            .iter()
            .rev()
            .find(|q| self.seqs.get(*q).is_some_and(|s| s.placed_step != step))
            .copied()
    }

    /// Gives `seq` (at index `hint` of `seqs`, if it is still there) slots for its next `chunk`
    /// known tokens and its `draft`, and adds it to the batch.
    fn place(
        &mut self,
        seq: SeqId,
        hint: usize,
        chunk: usize,
        draft: Vec<u32>,
        out: &mut SchedulerOutput,
    ) -> Result<(), SchedulerError> {
        let Some((_, s)) = find_seq_mut(&mut self.seqs, seq, hint) else {
            return Err(SchedulerError::NotScheduled(seq));
        };
        s.placed_step = out.step;
        let s = &*s;
        let start = s.num_computed;
        let known = if chunk == 1 && start + 1 == s.tokens.len() {
            std::slice::from_ref(&s.last)
        } else {
            &s.tokens[start..start + chunk]
        };
        // The manager holds the tokens added with the sequence; later ones are appended.
        debug_assert_eq!(
            self.bm.tokens(seq).map(|t| t.len() > start).ok(),
            Some(start < s.num_added)
        );
        if start < s.num_added {
            // Prompt (or recomputed) tokens the manager already holds: give them slots.
            debug_assert!(draft.is_empty());
            self.bm.allocate_slots(seq, chunk, &mut self.slots)?;
        } else if draft.is_empty() {
            // A decode: the last sampled token.
            self.bm.append_tokens(seq, known, &mut self.slots)?;
        } else {
            // A speculative decode: the last sampled token, then the drafts.
            let mut append = known.to_vec();
            append.extend_from_slice(&draft);
            self.bm.append_tokens(seq, &append, &mut self.slots)?;
        }
        let first = out.token_ids.len();
        let n = chunk + draft.len();
        if let [token] = known
            && draft.is_empty()
        {
            // A plain decode (most of a large batch): no slice copies, no range iterators.
            out.token_ids.push(*token);
            out.positions.push(start as u32);
        } else {
            out.token_ids.extend_from_slice(known);
            out.token_ids.extend_from_slice(&draft);
            out.positions.extend((start..start + n).map(|p| p as u32));
        }
        let completes = start + chunk == s.tokens.len();
        let logits_first = out.logits_indices.len();
        if completes {
            // The last known token's logits, then one row per draft token.
            let last = first + chunk - 1;
            out.logits_indices
                .extend((last..last + 1 + draft.len()).map(|t| t as u32));
        }
        let first_sampling = completes && s.output_len() == 0;
        let num_samples = match first_sampling.then(|| self.requests.get(&s.request)) {
            Some(Some(r)) if r.seqs.len() == 1 => r.req.n,
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
            draft_tokens: draft,
            draft_probs,
        });
        Ok(())
    }

    fn expire_deadlines(
        &mut self,
        now: Instant,
        out: &mut SchedulerOutput,
    ) -> Result<(), SchedulerError> {
        if self.next_deadline.is_none_or(|d| d > now) {
            return Ok(());
        }
        let expired: Vec<RequestId> = self
            .requests
            .values()
            .filter(|r| r.req.deadline.is_some_and(|d| d <= now))
            .map(|r| r.req.id)
            .collect();
        self.next_deadline = self
            .requests
            .values()
            .filter_map(|r| r.req.deadline.filter(|&d| d > now))
            .min();
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
        if !self.in_flight {
            return Err(SchedulerError::StepOrder("update without a step in flight"));
        }
        // The plan is the step's output (moved out while `apply` changes the scheduler).
        let out = std::mem::take(&mut self.output);
        let updated = self.update_plan(&out.seqs, results);
        self.output = out;
        updated
    }

    fn update_plan(
        &mut self,
        flight: &[ScheduledSeq],
        results: &[SeqResult],
    ) -> Result<Vec<SampleOutput>, SchedulerError> {
        // The usual case: one result per scheduled sequence, in batch order.
        if results.len() == flight.len() && results.iter().zip(flight).all(|(r, f)| r.seq == f.seq)
        {
            let mut hint = 0;
            for (r, f) in results.iter().zip(flight) {
                if let Some((index, _)) = self.find_seq(r.seq, hint) {
                    hint = index + 1;
                    check_result(f, r)?;
                }
            }
            self.in_flight = false;
            let mut outputs = Vec::with_capacity(flight.len());
            let mut hint = 0;
            for (f, r) in flight.iter().zip(results) {
                hint = self.apply(f, r, hint, &mut outputs)? + 1;
            }
            return Ok(outputs);
        }
        let plan: FxHashMap<SeqId, &ScheduledSeq> = flight.iter().map(|f| (f.seq, f)).collect();
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
        self.in_flight = false;
        let by_seq: FxHashMap<SeqId, &SeqResult> = results.iter().map(|r| (r.seq, r)).collect();
        let mut outputs = Vec::new();
        for f in flight {
            let (Some(r), true) = (by_seq.get(&f.seq), self.seqs.contains_key(&f.seq)) else {
                continue;
            };
            self.apply(f, r, 0, &mut outputs)?;
        }
        Ok(outputs)
    }

    /// Applies one sequence's result; returns its index in `seqs` (where it was found, from
    /// `hint` on).
    fn apply(
        &mut self,
        f: &ScheduledSeq,
        r: &SeqResult,
        hint: usize,
        outputs: &mut Vec<SampleOutput>,
    ) -> Result<usize, SchedulerError> {
        let seq = f.seq;
        let Some((index, s)) = find_seq_mut(&mut self.seqs, seq, hint) else {
            return Ok(hint);
        };
        let computed_before = s.num_computed;
        s.num_computed += num_known(f);
        let bs = self.bm.block_size();
        if !samples(f) {
            if s.num_computed / bs != computed_before / bs {
                self.bm.cache_full_blocks(seq)?;
            }
            return Ok(index);
        }
        // Accepted drafts have valid KV; drop the rejected ones' slots.
        let accepted = if f.num_samples > 1 {
            0
        } else {
            r.tokens.len() - 1
        };
        if !f.draft_tokens.is_empty() {
            let keep = s.num_computed + accepted;
            s.num_computed = keep;
            self.bm.truncate(seq, keep)?;
            self.stats.spec_proposed += f.draft_tokens.len() as u64;
            self.stats.spec_accepted += accepted as u64;
            if let Some(spec) = &mut self.spec {
                spec.record(seq, f.draft_tokens.len(), accepted)
                    .map_err(|e| SchedulerError::Proposer(e.to_string()))?;
            }
        }
        // Only a step that filled a block has one to register (the manager keeps up with
        // every earlier one).
        if s.num_computed / bs != computed_before / bs {
            self.bm.cache_full_blocks(seq)?;
        }
        // The other samples fork the prompt's blocks before any sample can finish; the seats
        // reserved for them are taken now.
        if f.num_samples > 1
            && let Some(rs) = self.requests.get(&s.request)
        {
            self.reserved_forks = self.reserved_forks.saturating_sub(fork_reserve(s, rs));
        }
        if f.num_samples <= 1 {
            self.push_tokens(seq, index, &r.tokens, outputs)?;
            return Ok(index);
        }
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
                last: parent.last,
                prompt_len: parent.prompt_len,
                num_computed: parent.num_computed,
                num_added: parent.num_added,
                status: Status::Running,
                placed_step: 0,
                arrival_step: parent.arrival_step,
                order: (parent.order.0, i),
                stops: parent.stops,
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
        for (q, t) in samples {
            self.push_tokens(q, index, &[t], outputs)?;
        }
        Ok(index)
    }

    /// Appends sampled tokens to `seq`'s output, stopping at the first stop condition.
    fn push_tokens(
        &mut self,
        seq: SeqId,
        hint: usize,
        tokens: &[u32],
        outputs: &mut Vec<SampleOutput>,
    ) -> Result<(), SchedulerError> {
        let Some((_, s)) = find_seq_mut(&mut self.seqs, seq, hint) else {
            return Ok(());
        };
        let stops = s.stops;
        let stop_ids: &[u32] = if stops.has_stop_ids {
            match self.requests.get(&s.request) {
                Some(r) => &r.req.stop_token_ids,
                None => return Ok(()),
            }
        } else {
            &[]
        };
        let mut finished = None;
        let mut new_tokens = NewTokens::new();
        for &t in tokens {
            s.tokens.push(t);
            s.last = t;
            new_tokens.push(t);
            if stop_ids.contains(&t) {
                finished = Some(FinishReason::StopToken(t));
            } else if !stops.ignore_eos && self.config.eos_token_ids.contains(&t) {
                finished = Some(FinishReason::Eos);
            } else if s.output_len() >= stops.max_tokens
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

/// Sequences a running sequence's request will still fork (`n - 1` until its prompt
/// completes, then 0).
fn fork_reserve(s: &SeqState, r: &RequestState) -> usize {
    if r.seqs.len() == 1 && s.output_len() == 0 {
        r.req.n - 1
    } else {
        0
    }
}

/// Index of `seq` in `seqs`, trying `hint` first (see [`Scheduler::find_seq`]).
fn find_index(seqs: &FxIndexMap<SeqId, SeqState>, seq: SeqId, hint: usize) -> Option<usize> {
    match seqs.get_index(hint) {
        Some((&q, _)) if q == seq => Some(hint),
        _ => seqs.get_index_of(&seq),
    }
}

/// As [`Scheduler::find_seq`], for changing the state (a function of the map alone, so the
/// scheduler's other fields stay free to borrow).
fn find_seq_mut(
    seqs: &mut FxIndexMap<SeqId, SeqState>,
    seq: SeqId,
    hint: usize,
) -> Option<(usize, &mut SeqState)> {
    let i = find_index(seqs, seq, hint)?;
    seqs.get_index_mut(i).map(|(_, s)| (i, s))
}

fn bad(seq: SeqId, reason: String) -> SchedulerError {
    SchedulerError::BadResult { seq, reason }
}

fn check_result(f: &ScheduledSeq, r: &SeqResult) -> Result<(), SchedulerError> {
    let n = r.tokens.len();
    if !samples(f) {
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
    if n == 0 || n > f.draft_tokens.len() + 1 {
        return Err(bad(
            r.seq,
            format!(
                "{n} tokens; expected 1..={} (accepted drafts + 1)",
                f.draft_tokens.len() + 1
            ),
        ));
    }
    if r.tokens[..n - 1] != f.draft_tokens[..n - 1] {
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
