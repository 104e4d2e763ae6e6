//! The step loop: one thread that owns the scheduler and the backend.
//!
//! Each iteration takes the commands waiting (new requests, aborts, shutdown), then runs one
//! step: `schedule` → swap-out, swap-in and copy-on-write copies → `forward` → sampling (and
//! speculative verification) → `update` → detokenization, stop strings and the stream deltas.
//! With nothing to do it blocks on the command channel. A failed forward fails that batch's
//! requests (`fail_step`) and the loop goes on; a backend that cannot run any more
//! (`ModelError::Unrecoverable`: a dead tensor-parallel group), a failed block copy (the KV
//! contents can no longer be trusted) or a panic kills the loop: health turns `NotServing` and every request
//! fails.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use model::{Backend, ForwardBatch, ModelError, RowSampling, Tokenizer};
use scheduler::spec::{verify_greedy, verify_stochastic};
use scheduler::{
    FinishReason as SchedFinish, RejectReason, RequestId, SampleOutput, ScheduledSeq, Scheduler,
    SchedulerError, SchedulerOutput, SeqResult,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::api::{
    EngineError, EngineStats, FinishReason, SamplingParams, StepShapes, StreamDelta, TokenLogprob,
    Usage,
};
use crate::handle::{Command, NewRequest, Shared, StreamItem, lock, state};
use crate::metrics::outcome;
use crate::sampling::{
    SampleRng, apply_repetition_penalty, argmax, log_softmax, probabilities, sample_token,
    top_logprobs,
};
use crate::text::TextStream;

/// A failed forward's message for the requests of its step, or [`Fatal`] when the backend
/// cannot run any more (a dead tensor-parallel group): retrying every step would fail each
/// batch forever, so the loop dies and health turns `NotServing`.
fn forward_failed(e: ModelError) -> Result<String, Fatal> {
    match e {
        ModelError::Unrecoverable(_) => Err(Fatal(format!("forward pass failed: {e}"))),
        e => Ok(format!("forward pass failed: {e}")),
    }
}

/// An error after which the loop cannot go on.
#[derive(Debug)]
pub(crate) struct Fatal(pub(crate) String);

/// One completion (sample) of a request.
#[derive(Debug)]
struct CompletionState {
    text: TextStream,
    rng: SampleRng,
    /// Tokens generated so far (for the repetition penalty).
    output: Vec<u32>,
    /// Log-probabilities of the tokens sampled this step, until the step's output arrives.
    logprobs: Vec<TokenLogprob>,
    finished: Option<FinishReason>,
    last_token_at: Option<Instant>,
}

/// A live request.
#[derive(Debug)]
struct ReqState {
    request_id: String,
    tx: UnboundedSender<StreamItem>,
    prompt: Vec<u32>,
    params: SamplingParams,
    logprobs: usize,
    stop: Vec<String>,
    completions: Vec<CompletionState>,
    arrival: Instant,
    /// The request's deadline: an abort after it (a client or service backstop that gave up
    /// while a long step ran) is counted as a deadline, not an abort.
    deadline: Option<Instant>,
    first_token_at: Option<Instant>,
    cached_prompt_tokens: Option<usize>,
    completion_tokens: usize,
    /// The error that ends the stream instead of the usage delta.
    terminal: Option<EngineError>,
}

impl ReqState {
    fn usage(&self) -> Usage {
        let c = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Usage {
            prompt_tokens: c(self.prompt.len()),
            completion_tokens: c(self.completion_tokens),
            cached_prompt_tokens: c(self.cached_prompt_tokens.unwrap_or(0)),
        }
    }

    fn outcome(&self) -> &'static str {
        match &self.terminal {
            Some(EngineError::DeadlineExceeded) => return outcome::DEADLINE,
            Some(EngineError::Unavailable(_)) => return outcome::SHUTDOWN,
            Some(_) => return outcome::ERROR,
            None => {}
        }
        let any = |r| self.completions.iter().any(|c| c.finished == Some(r));
        if any(FinishReason::Error) {
            outcome::ERROR
        } else if any(FinishReason::Deadline) {
            outcome::DEADLINE
        } else if any(FinishReason::Aborted) {
            if self.deadline.is_some_and(|d| d <= Instant::now()) {
                outcome::DEADLINE
            } else {
                outcome::ABORTED
            }
        } else if any(FinishReason::Length) {
            outcome::LENGTH
        } else {
            outcome::STOP
        }
    }
}

/// What sampling needs to know about the model.
#[derive(Debug, Clone, Copy)]
struct Vocab {
    /// Length of a logits row.
    row: usize,
    /// Ids at or past this are never sampled (the tokenizer cannot decode them).
    sample: usize,
}

/// Cumulative counters already added to the metrics.
#[derive(Debug, Default)]
struct Seen {
    prefix_queries: u64,
    prefix_hits: u64,
    preemptions: u64,
    spec_proposed: u64,
    spec_accepted: u64,
}

/// The step loop's state.
pub(crate) struct Worker {
    sched: Scheduler,
    backend: Box<dyn Backend + Send>,
    tokenizer: Arc<Tokenizer>,
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    requests: HashMap<RequestId, ReqState>,
    vocab: Vocab,
    logits: Vec<f32>,
    draining: Option<Instant>,
    seen: Seen,
    timing: StepTiming,
}

/// Where the step loop's time went (steps that ran a batch), for [`EngineStats`].
#[derive(Debug, Clone, Copy, Default)]
struct StepTiming {
    /// Whole steps: scheduling, the forward pass, sampling and the outputs.
    step: Duration,
    /// The scheduler's part.
    schedule: Duration,
    /// The backend's forward pass (with on-device sampling).
    forward: Duration,
    /// The forward passes by kind and batch size.
    shapes: StepShapes,
    /// When the step running now started: stats published in the middle of a step (a request
    /// ending) count its time so far, so that they never show more forward than step time.
    current: Option<Instant>,
}

impl StepTiming {
    /// Counts a step's forward pass.
    fn forward_done(&mut self, out: &SchedulerOutput, took: Duration) {
        self.forward += took;
        let prefill = out.seqs.iter().any(|s| s.is_prefill);
        self.shapes
            .record(prefill, out.seqs.len(), out.token_ids.len(), micros(took));
    }
}

impl Worker {
    pub(crate) fn new(
        sched: Scheduler,
        backend: Box<dyn Backend + Send>,
        tokenizer: Arc<Tokenizer>,
        shared: Arc<Shared>,
        rx: Receiver<Command>,
        sample_vocab: usize,
    ) -> Self {
        let row = backend.config().vocab_size;
        Self {
            sched,
            backend,
            tokenizer,
            shared,
            rx,
            requests: HashMap::new(),
            vocab: Vocab {
                row,
                sample: sample_vocab.min(row),
            },
            logits: Vec::new(),
            draining: None,
            seen: Seen::default(),
            timing: StepTiming::default(),
        }
    }

    /// Runs the loop until shutdown (or until every handle and stream is gone), catching a
    /// panic or fatal error: then health turns `NotServing` and every request fails.
    pub(crate) fn run_guarded(mut self) {
        self.publish_stats();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.run()));
        let died = match result {
            Ok(Ok(())) => None,
            Ok(Err(Fatal(msg))) => Some(msg),
            Err(panic) => Some(
                panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .map_or_else(|| "panic".to_owned(), |m| format!("panic: {m}")),
            ),
        };
        let err = match &died {
            None => {
                self.shared.state.store(state::STOPPED, Ordering::Release);
                EngineError::Unavailable("the engine shut down".into())
            }
            Some(msg) => {
                tracing::error!(error = %msg, "the step loop died");
                *lock(&self.shared.dead_reason) = Some(msg.clone());
                self.shared.state.store(state::DEAD, Ordering::Release);
                EngineError::Internal(format!("the step loop died: {msg}"))
            }
        };
        // Nothing runs any more: fail what is left, then what is still queued.
        for (_, req) in self.requests.drain() {
            self.shared.metrics.request(if died.is_some() {
                outcome::ERROR
            } else {
                outcome::SHUTDOWN
            });
            let _ = req.tx.send(Err(err.clone()));
        }
        while let Ok(cmd) = self.rx.try_recv() {
            if let Command::Add(new) = cmd {
                self.shared.metrics.request(outcome::UNAVAILABLE);
                let _ = new.tx.send(Err(EngineError::Unavailable(err.to_string())));
            }
        }
        self.shared.release_all();
    }

    fn run(&mut self) -> Result<(), Fatal> {
        loop {
            if !self.sched.has_unfinished() {
                if self.draining.is_some() {
                    return Ok(());
                }
                self.publish_stats();
                match self.rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return Ok(()), // every handle and stream is gone
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.handle(cmd);
            }
            if let Some(deadline) = self.draining {
                if !self.sched.has_unfinished() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    let ids: Vec<RequestId> = self.requests.keys().copied().collect();
                    for rid in ids {
                        let _ = self.sched.abort(rid);
                        self.finish_request(
                            rid,
                            FinishReason::Aborted,
                            Some(EngineError::Unavailable(
                                "the engine shut down before the request finished".into(),
                            )),
                        );
                    }
                    self.publish_stats();
                    return Ok(());
                }
            }
            if !self.sched.has_unfinished() {
                continue;
            }
            if !self.step()? {
                // Nothing could be scheduled: wait briefly for a command rather than spin.
                if let Ok(cmd) = self.rx.recv_timeout(Duration::from_millis(1)) {
                    self.handle(cmd);
                }
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add(new) => self.add(*new),
            Command::Abort { rid, cancelled } => {
                tracing::debug!(request = %rid, cancelled, "abort");
                let _ = self.sched.abort(rid);
                self.finish_request(rid, FinishReason::Aborted, None);
                self.publish_stats();
            }
            Command::Shutdown { timeout } => {
                if self.draining.is_none() {
                    self.draining = Some(
                        Instant::now()
                            .checked_add(timeout)
                            .unwrap_or_else(far_future),
                    );
                }
            }
        }
    }

    fn add(&mut self, new: NewRequest) {
        let v = new.valid;
        let req = scheduler::Request {
            id: new.rid,
            prompt: v.prompt.clone(),
            max_tokens: v.max_tokens,
            n: v.n,
            ignore_eos: v.ignore_eos,
            stop_token_ids: v.stop_token_ids.clone(),
            priority: 0,
            deadline: v.deadline,
            cache_namespace: None,
            temperature: v.sampling.temperature,
        };
        if let Err(e) = self.sched.add_request(req) {
            self.shared.metrics.request(outcome::INVALID);
            self.shared.release(&new.request_id);
            let err = match e {
                SchedulerError::Rejected { reason, .. } => rejected(reason),
                other => EngineError::Internal(other.to_string()),
            };
            let _ = new.tx.send(Err(err));
            return;
        }
        self.shared
            .metrics
            .prompt_tokens
            .inc_by(v.prompt.len() as u64);
        let completions = (0..v.n)
            .map(|i| CompletionState {
                text: TextStream::new(&self.tokenizer, &v.prompt),
                rng: SampleRng::new(v.seed, u32::try_from(i).unwrap_or(u32::MAX)),
                output: Vec::new(),
                logprobs: Vec::new(),
                finished: None,
                last_token_at: None,
            })
            .collect();
        self.requests.insert(
            new.rid,
            ReqState {
                request_id: new.request_id,
                tx: new.tx,
                prompt: v.prompt,
                params: v.sampling,
                logprobs: v.logprobs,
                stop: v.stop,
                completions,
                arrival: new.arrival,
                deadline: v.deadline,
                first_token_at: None,
                cached_prompt_tokens: None,
                completion_tokens: 0,
                terminal: None,
            },
        );
    }

    /// Runs one step. Returns whether anything happened (a batch ran or requests ended).
    fn step(&mut self) -> Result<bool, Fatal> {
        let started = Instant::now();
        self.timing.current = Some(started);
        let ran = self.step_timed();
        self.timing.current = None;
        if *ran.as_ref().unwrap_or(&false) {
            self.timing.step += started.elapsed();
        }
        ran
    }

    fn step_timed(&mut self) -> Result<bool, Fatal> {
        let scheduling = Instant::now();
        let scheduled = self.sched.schedule(scheduling);
        let out = match scheduled {
            Ok(out) => out,
            Err(SchedulerError::Proposer(msg)) => {
                tracing::error!(error = %msg, "speculative proposer failed; speculation turned off");
                self.sched.set_speculation(None);
                return Ok(true);
            }
            Err(e) => return Err(Fatal(format!("scheduler: {e}"))),
        };
        let expired: Vec<RequestId> = out.finished.iter().map(|f| f.request).collect();
        for s in out.seqs.iter().filter(|s| s.is_prefill) {
            if let Some(r) = self.requests.get_mut(&s.request)
                && r.cached_prompt_tokens.is_none()
            {
                r.cached_prompt_tokens = out.positions.get(s.tokens.start).map(|&p| p as usize);
            }
        }
        let ran = !out.is_empty();
        if ran {
            self.timing.schedule += scheduling.elapsed();
        }
        let mut failures = Vec::new();
        let results = if ran {
            let copied = self
                .backend
                .swap_out(&out.swap_out)
                .and_then(|()| self.backend.swap_in(&out.swap_in))
                .and_then(|()| self.backend.copy_blocks(&out.copies));
            if let Err(e) = copied {
                return Err(Fatal(format!("KV block copy failed: {e}")));
            }
            let batch = ForwardBatch {
                token_ids: &out.token_ids,
                positions: &out.positions,
                slot_mapping: &out.slot_mapping,
                seq_starts: &out.seq_starts,
                block_tables: out.block_tables.block_tables(),
                max_blocks: out.block_tables.max_blocks(),
                context_lens: out.block_tables.context_lens(),
                logits_indices: &out.logits_indices,
            };
            let device = if self.backend.samples_on_device() {
                device_rows(&out.seqs, out.logits_indices.len(), &mut self.requests)
            } else {
                None
            };
            let forward = Instant::now();
            if let Some(rows) = device {
                let sampling: Vec<RowSampling<'_>> = rows.iter().map(DeviceRow::view).collect();
                let mut tokens = Vec::new();
                let r =
                    self.backend
                        .forward_sampled(&batch, &sampling, self.vocab.sample, &mut tokens);
                self.timing.forward_done(out, forward.elapsed());
                match r {
                    Ok(()) if tokens.len() == sampling.len() => Ok(out
                        .seqs
                        .iter()
                        .map(|s| device_result(s, &tokens, &mut failures))
                        .collect::<Vec<_>>()),
                    Ok(()) => Err(format!(
                        "the backend sampled {} tokens for {} rows",
                        tokens.len(),
                        sampling.len()
                    )),
                    Err(e) => Err(forward_failed(e)?),
                }
            } else {
                let r = self.backend.forward(&batch, &mut self.logits);
                self.timing.forward_done(out, forward.elapsed());
                match r {
                    Ok(()) if self.logits.len() == out.logits_indices.len() * self.vocab.row => {
                        Ok(out
                            .seqs
                            .iter()
                            .map(|s| {
                                sample_seq(
                                    s,
                                    &self.logits,
                                    self.vocab,
                                    &mut self.requests,
                                    &mut failures,
                                )
                            })
                            .collect::<Vec<_>>())
                    }
                    Ok(()) => Err(format!(
                        "the backend returned {} logits for {} rows of {}",
                        self.logits.len(),
                        out.logits_indices.len(),
                        self.vocab.row
                    )),
                    Err(e) => Err(forward_failed(e)?),
                }
            }
        } else {
            Ok(Vec::new())
        };
        for rid in dedup(expired.clone()) {
            self.finish_request(
                rid,
                FinishReason::Deadline,
                Some(EngineError::DeadlineExceeded),
            );
        }
        if !ran {
            // An empty plan is still a step in flight: close it (a scheduler that keeps none
            // for an empty plan answers StepOrder, which is fine).
            match self.sched.update(&[]) {
                Ok(_) | Err(SchedulerError::StepOrder(_)) => {}
                Err(e) => return Err(Fatal(format!("scheduler: {e}"))),
            }
            self.publish_stats();
            return Ok(!expired.is_empty());
        }
        match results {
            Ok(results) => match self.sched.update(&results) {
                Ok(outputs) => {
                    // Before any delta goes out: a client that reads one sees this step's
                    // blocks in the stats.
                    self.publish_stats();
                    for o in outputs {
                        self.apply(o);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "step results rejected by the scheduler");
                    self.fail_step(&format!("step results rejected: {e}"))?;
                }
            },
            Err(msg) => {
                tracing::error!(error = %msg, "step failed");
                self.fail_step(&msg)?;
            }
        }
        for (rid, msg) in failures {
            if self.requests.contains_key(&rid) {
                let _ = self.sched.abort(rid);
                self.finish_request(rid, FinishReason::Error, Some(EngineError::Internal(msg)));
            }
        }
        self.publish_stats();
        Ok(true)
    }

    /// Ends every request of the step in flight with an error; the loop goes on.
    fn fail_step(&mut self, msg: &str) -> Result<(), Fatal> {
        let finished = self
            .sched
            .fail_step()
            .map_err(|e| Fatal(format!("scheduler: {e}")))?;
        for rid in dedup(finished.iter().map(|f| f.request).collect()) {
            self.finish_request(
                rid,
                FinishReason::Error,
                Some(EngineError::Internal(msg.to_owned())),
            );
        }
        Ok(())
    }

    /// Turns one sample's new tokens into a delta: text, stop strings, finish.
    fn apply(&mut self, o: SampleOutput) {
        let Some(req) = self.requests.get_mut(&o.request) else {
            return;
        };
        let Some(c) = req.completions.get_mut(o.sample) else {
            return;
        };
        if c.finished.is_some() {
            return;
        }
        let logprobs = std::mem::take(&mut c.logprobs);
        let mut delta = empty_delta(o.sample);
        let mut stopped = false;
        let ends_on_stop_token = matches!(
            o.finished,
            Some(SchedFinish::Eos | SchedFinish::StopToken(_))
        );
        for (j, &t) in o.new_tokens.iter().enumerate() {
            delta.token_ids.push(t);
            c.output.push(t);
            if let Some(lp) = logprobs.get(j) {
                delta.logprobs.push(lp.clone());
            }
            // EOS and stop token ids end the completion without text.
            if ends_on_stop_token && j + 1 == o.new_tokens.len() {
                break;
            }
            let pushed = c.text.push(&self.tokenizer, t, &req.stop);
            delta.text.push_str(&pushed.text);
            if pushed.stopped {
                stopped = true;
                break;
            }
        }
        let now = Instant::now();
        let n_new = delta.token_ids.len();
        if n_new > 0 {
            req.completion_tokens += n_new;
            let m = &self.shared.metrics;
            m.generation_tokens.inc_by(n_new as u64);
            if req.first_token_at.is_none() {
                req.first_token_at = Some(now);
                m.time_to_first_token
                    .observe(now.duration_since(req.arrival).as_secs_f64());
            }
            if let Some(prev) = c.last_token_at {
                m.inter_token_latency
                    .observe(now.duration_since(prev).as_secs_f64());
            }
            c.last_token_at = Some(now);
        }
        let reason = if stopped {
            if o.finished.is_none() {
                // Frees its blocks now; the scheduler had no reason to stop it.
                let _ = self.sched.finish(o.seq, SchedFinish::StopString);
            }
            Some(FinishReason::Stop)
        } else {
            o.finished.map(finish_reason)
        };
        if let Some(r) = reason {
            if !stopped {
                delta
                    .text
                    .push_str(&c.text.finish(&self.tokenizer, &req.stop));
            }
            c.finished = Some(r);
            delta.finish_reason = Some(r);
        }
        self.emit(o.request, delta);
    }

    /// Ends every unfinished completion of `rid` with `reason`; `terminal` (if the request has
    /// none yet) ends the stream instead of the usage delta.
    fn finish_request(
        &mut self,
        rid: RequestId,
        reason: FinishReason,
        terminal: Option<EngineError>,
    ) {
        let Some(req) = self.requests.get_mut(&rid) else {
            return;
        };
        if req.terminal.is_none() {
            req.terminal = terminal;
        }
        let pending: Vec<usize> = (0..req.completions.len())
            .filter(|&i| req.completions[i].finished.is_none())
            .collect();
        for i in pending {
            let Some(req) = self.requests.get_mut(&rid) else {
                return;
            };
            let c = &mut req.completions[i];
            let mut delta = empty_delta(i);
            delta.text = c.text.finish(&self.tokenizer, &req.stop);
            c.finished = Some(reason);
            delta.finish_reason = Some(reason);
            self.emit(rid, delta);
        }
    }

    /// Sends a delta; the one that finishes the last completion also ends the request (usage,
    /// or its terminal error) and forgets it.
    fn emit(&mut self, rid: RequestId, mut delta: StreamDelta) {
        let Some(req) = self.requests.get(&rid) else {
            return;
        };
        if !req.completions.iter().all(|c| c.finished.is_some()) {
            if !delta.token_ids.is_empty()
                || !delta.text.is_empty()
                || delta.finish_reason.is_some()
            {
                let _ = req.tx.send(Ok(delta));
            }
            return;
        }
        let Some(mut req) = self.requests.remove(&rid) else {
            return;
        };
        // Bookkeeping first, so that a client reading the last delta sees the request gone;
        // the outcome is counted before the request leaves the in-flight count, so that whoever
        // sees it gone (no request in flight) also sees it counted.
        let m = &self.shared.metrics;
        m.request(req.outcome());
        m.e2e_latency.observe(req.arrival.elapsed().as_secs_f64());
        self.shared.release(&req.request_id);
        self.publish_stats();
        match req.terminal.take() {
            Some(err) => {
                let _ = req.tx.send(Ok(delta));
                let _ = req.tx.send(Err(err));
            }
            None => {
                delta.usage = Some(req.usage());
                let _ = req.tx.send(Ok(delta));
            }
        }
    }

    /// Publishes queue lengths and KV usage to [`Shared::stats`] and the metrics.
    fn publish_stats(&mut self) {
        let s = self.sched.stats();
        let b = self.sched.block_manager().stats();
        let last = *lock(&self.shared.stats);
        let stats = EngineStats {
            waiting: s.num_waiting,
            running: s.num_running,
            swapped: s.num_swapped,
            kv_blocks_used: b.used_blocks,
            kv_blocks_free: b.free_blocks + b.evictable_blocks,
            kv_blocks_total: b.total_blocks,
            kv_blocks_cached: b.cached_blocks,
            kv_blocks_used_peak: last.kv_blocks_used_peak.max(b.used_blocks),
            running_peak: last.running_peak.max(s.num_running),
            requests_in_flight: 0,
            steps: s.steps,
            preemptions: s.num_preemptions,
            prefix_query_tokens: b.prefix_query_tokens,
            prefix_hit_tokens: b.prefix_hit_tokens,
            spec_proposed_tokens: s.spec_proposed,
            spec_accepted_tokens: s.spec_accepted,
            step_micros: micros(
                self.timing.step + self.timing.current.map_or(Duration::ZERO, |s| s.elapsed()),
            ),
            schedule_micros: micros(self.timing.schedule),
            forward_micros: micros(self.timing.forward),
            step_shapes: self.timing.shapes,
        };
        *lock(&self.shared.stats) = stats;
        let m = &self.shared.metrics;
        let g = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        m.waiting.set(g(stats.waiting));
        m.running.set(g(stats.running));
        m.swapped.set(g(stats.swapped));
        m.kv_blocks_used.set(g(stats.kv_blocks_used));
        m.kv_blocks_free.set(g(stats.kv_blocks_free));
        m.kv_usage.set(if b.total_blocks > 0 {
            b.used_blocks as f64 / b.total_blocks as f64
        } else {
            0.0
        });
        let seen = &mut self.seen;
        let bump =
            |counter: &prometheus_client::metrics::counter::Counter, last: &mut u64, now: u64| {
                counter.inc_by(now.saturating_sub(*last));
                *last = (*last).max(now);
            };
        bump(
            &m.prefix_queries,
            &mut seen.prefix_queries,
            b.prefix_query_tokens,
        );
        bump(&m.prefix_hits, &mut seen.prefix_hits, b.prefix_hit_tokens);
        bump(&m.preemptions, &mut seen.preemptions, s.num_preemptions);
        bump(&m.spec_proposed, &mut seen.spec_proposed, s.spec_proposed);
        bump(&m.spec_accepted, &mut seen.spec_accepted, s.spec_accepted);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(60 * 60 * 24 * 365)
}

fn dedup(mut ids: Vec<RequestId>) -> Vec<RequestId> {
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn empty_delta(index: usize) -> StreamDelta {
    StreamDelta {
        index: u32::try_from(index).unwrap_or(u32::MAX),
        text: String::new(),
        token_ids: Vec::new(),
        logprobs: Vec::new(),
        finish_reason: None,
        usage: None,
    }
}

fn finish_reason(r: SchedFinish) -> FinishReason {
    match r {
        SchedFinish::Length => FinishReason::Length,
        SchedFinish::Eos | SchedFinish::StopToken(_) | SchedFinish::StopString => {
            FinishReason::Stop
        }
        SchedFinish::Deadline => FinishReason::Deadline,
        SchedFinish::Aborted => FinishReason::Aborted,
        SchedFinish::Error => FinishReason::Error,
    }
}

/// The engine's error for a request the scheduler refused (validation catches these first;
/// this is the backstop).
pub(crate) fn rejected(reason: RejectReason) -> EngineError {
    let field = match &reason {
        RejectReason::EmptyPrompt | RejectReason::PromptTooLong { .. } => "prompt",
        RejectReason::ZeroMaxTokens | RejectReason::NeverFits { .. } => "max_tokens",
        RejectReason::BadN { .. } => "n",
        RejectReason::TokenOutOfVocab { .. } => "prompt.token_ids",
        RejectReason::DuplicateRequest(_) => {
            return EngineError::Internal(reason.to_string());
        }
    };
    EngineError::InvalidArgument {
        field,
        reason: reason.to_string(),
    }
}

/// One logits row to sample on the device, owning what its [`RowSampling`] borrows.
#[derive(Debug)]
struct DeviceRow {
    params: SamplingParams,
    /// Prompt and output so far, only when the repetition penalty applies.
    history: Vec<u32>,
    uniform: f64,
}

impl DeviceRow {
    fn view(&self) -> RowSampling<'_> {
        let p = &self.params;
        RowSampling {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            history: &self.history,
            uniform: self.uniform,
        }
    }
}

/// The step's rows for sampling on the device, when every sequence of the step can be: one
/// plain token per logits row (no `n > 1` fan-out, no drafts to verify, no log-probabilities,
/// which need the logits on the host). Each row's uniform number comes from its completion's
/// stream, drawn only at temperature > 0 as the host path draws it, so a seeded request gets
/// the same numbers on either path. `None` (nothing drawn): sample on the host.
fn device_rows(
    seqs: &[ScheduledSeq],
    num_rows: usize,
    requests: &mut HashMap<RequestId, ReqState>,
) -> Option<Vec<DeviceRow>> {
    let plain = seqs.iter().all(|s| {
        s.logits.is_empty()
            || (s.logits.len() == 1
                && s.num_samples <= 1
                && s.draft_tokens.is_empty()
                && requests
                    .get(&s.request)
                    .is_some_and(|r| r.logprobs == 0 && s.sample < r.completions.len()))
    });
    let with_rows = seqs.iter().filter(|s| !s.logits.is_empty());
    if !plain
        || num_rows == 0
        || with_rows.clone().count() != num_rows
        || with_rows.clone().any(|s| s.logits.end > num_rows)
    {
        return None;
    }
    let mut rows: Vec<Option<DeviceRow>> = (0..num_rows).map(|_| None).collect();
    for s in with_rows {
        let req = requests.get_mut(&s.request)?;
        let params = req.params;
        let c = req.completions.get_mut(s.sample)?;
        let history = if params.repetition_penalty == 1.0 {
            Vec::new()
        } else {
            req.prompt.iter().chain(&c.output).copied().collect()
        };
        let uniform = if params.temperature > 0.0 {
            c.rng.uniform()
        } else {
            0.0
        };
        *rows.get_mut(s.logits.start)? = Some(DeviceRow {
            params,
            history,
            uniform,
        });
    }
    // Every row belongs to one sequence (the scheduler's plan); a gap would be a bug there.
    rows.into_iter().collect()
}

/// A sequence's result from the tokens sampled on the device.
fn device_result(
    s: &ScheduledSeq,
    tokens: &[Option<u32>],
    failures: &mut Vec<(RequestId, String)>,
) -> SeqResult {
    if s.logits.is_empty() {
        return no_tokens(s);
    }
    let token = tokens.get(s.logits.start).copied().flatten();
    sampled(s, token.map(|t| vec![t]), 1, failures)
}

/// The result of a sequence that wanted no logits this step (a prompt chunk short of its end).
fn no_tokens(s: &ScheduledSeq) -> SeqResult {
    SeqResult {
        seq: s.seq,
        tokens: Vec::new(),
    }
}

/// The result of a sequence's sampling: its tokens, or (`None`: the model gave no finite
/// logit) `count` placeholder tokens with the request recorded as failed.
fn sampled(
    s: &ScheduledSeq,
    tokens: Option<Vec<u32>>,
    count: usize,
    failures: &mut Vec<(RequestId, String)>,
) -> SeqResult {
    let tokens = tokens.unwrap_or_else(|| {
        failures.push((
            s.request,
            "the model returned logits with no finite value".into(),
        ));
        vec![0; count]
    });
    SeqResult { seq: s.seq, tokens }
}

/// A row of logits ready for sampling: ids past the sampling vocabulary masked, the repetition
/// penalty applied over `history`. `None` when nothing needs changing (use the raw row).
fn processed_row(
    raw: &[f32],
    vocab: Vocab,
    params: &SamplingParams,
    history: &[&[u32]],
) -> Option<Vec<f32>> {
    if vocab.sample >= raw.len() && params.repetition_penalty == 1.0 {
        return None;
    }
    let mut l = raw.to_vec();
    for x in l.iter_mut().skip(vocab.sample) {
        *x = f32::NEG_INFINITY;
    }
    apply_repetition_penalty(&mut l, history, params.repetition_penalty);
    Some(l)
}

fn token_logprob(raw: &[f32], token: u32, top: usize) -> TokenLogprob {
    let lp = log_softmax(raw);
    TokenLogprob {
        token_id: token,
        logprob: lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top: top_logprobs(&lp, top),
    }
}

/// Samples one scheduled sequence's tokens from its logits rows: none for a prompt chunk,
/// `num_samples` tokens (one per sample, each with its own random stream) when a prompt of an
/// `n > 1` request completes, else the verified drafts plus one token. A row without a finite
/// logit records a failure for the request and returns a placeholder of the right shape.
fn sample_seq(
    s: &ScheduledSeq,
    logits: &[f32],
    vocab: Vocab,
    requests: &mut HashMap<RequestId, ReqState>,
    failures: &mut Vec<(RequestId, String)>,
) -> SeqResult {
    if s.logits.is_empty() {
        return no_tokens(s);
    }
    let row = |i: usize| {
        let r = s.logits.start + i;
        logits
            .get(r * vocab.row..(r + 1) * vocab.row)
            .unwrap_or(&[])
    };
    let tokens = requests
        .get_mut(&s.request)
        .and_then(|req| sample_for(s, &row, vocab, req));
    sampled(s, tokens, s.num_samples.max(1), failures)
}

fn sample_for<'a>(
    s: &ScheduledSeq,
    row: &impl Fn(usize) -> &'a [f32],
    vocab: Vocab,
    req: &mut ReqState,
) -> Option<Vec<u32>> {
    let params = req.params;
    let top = req.logprobs;
    let prompt = &req.prompt;
    // The first sampling of an n > 1 request: one draw per sample from the shared row.
    if s.num_samples > 1 {
        let raw = row(0);
        let mut tokens = Vec::with_capacity(s.num_samples);
        for c in req.completions.iter_mut().take(s.num_samples) {
            let l = processed_row(raw, vocab, &params, &[prompt, &c.output]);
            let t = sample_token(l.as_deref().unwrap_or(raw), &params, &mut c.rng)?;
            if top > 0 {
                c.logprobs = vec![token_logprob(raw, t, top)];
            }
            tokens.push(t);
        }
        return (tokens.len() == s.num_samples).then_some(tokens);
    }
    let c = req.completions.get_mut(s.sample)?;
    let drafts = &s.draft_tokens;
    let tokens = if drafts.is_empty() {
        let raw = row(0);
        let l = processed_row(raw, vocab, &params, &[prompt, &c.output]);
        vec![sample_token(
            l.as_deref().unwrap_or(raw),
            &params,
            &mut c.rng,
        )?]
    } else {
        verify(s, row, vocab, &params, prompt, c)?
    };
    c.logprobs = if top > 0 {
        tokens
            .iter()
            .enumerate()
            .map(|(j, &t)| token_logprob(row(j), t, top))
            .collect()
    } else {
        Vec::new()
    };
    Some(tokens)
}

/// Speculative verification against the target's processed distribution.
fn verify<'a>(
    s: &ScheduledSeq,
    row: &impl Fn(usize) -> &'a [f32],
    vocab: Vocab,
    params: &SamplingParams,
    prompt: &[u32],
    c: &mut CompletionState,
) -> Option<Vec<u32>> {
    let drafts = &s.draft_tokens;
    let rows: Vec<Vec<f32>> = (0..=drafts.len())
        .map(|i| {
            let raw = row(i);
            processed_row(raw, vocab, params, &[prompt, &c.output, &drafts[..i]])
                .unwrap_or_else(|| raw.to_vec())
        })
        .collect();
    let verified = if params.temperature <= 0.0 {
        let argmaxes = rows
            .iter()
            .map(|r| argmax(r))
            .collect::<Option<Vec<u32>>>()?;
        verify_greedy(drafts, &argmaxes)
    } else {
        let probs = rows
            .iter()
            .map(|r| probabilities(r, params))
            .collect::<Option<Vec<Vec<f32>>>>()?;
        verify_stochastic(drafts, s.draft_probs.as_deref(), &probs, c.rng.rng())
    };
    match verified {
        Ok(v) => Some(v.tokens),
        Err(e) => {
            // Malformed draft rows: reject every draft, sample from the first row.
            tracing::warn!(error = %e, "speculative verification failed; drafts rejected");
            Some(vec![sample_token(&rows[0], params, &mut c.rng)?])
        }
    }
}
