//! [`TensorParallelBackend`]: one [`Backend`] over the ranks of a tensor-parallel group, each
//! rank a thread that owns its sharded backend.
//!
//! One scheduler drives it as it drives any backend. Each call is a *step* sent to every rank
//! over a channel (an owned copy of the batch, shared by the ranks through an `Arc`); every
//! rank runs it on its own backend, the collectives inside keeping the ranks in lockstep (each
//! rank holds full logits rows after the vocab-parallel all-gather), and rank 0's result is
//! returned. The caller's logits buffer travels to rank 0 and back, so a step allocates only
//! the batch copy.
//!
//! Failure, never a hang:
//! * a rank that fails or panics aborts its group ([`GroupAbort`]), so ranks waiting in a
//!   collective return an error instead of waiting for it;
//! * the step then fails on the caller. When every rank failed on its own with an error that
//!   is not a collective's (a bad batch: the ranks fail alike before any collective, by the
//!   invariant of [`model::collective`]) the group is reset and the error is the step's, as
//!   on one rank. Anything else (a panic, a rank gone, ranks that disagree, a failed
//!   collective) means the ranks are out of lockstep: the backend is dead, the step fails with
//!   [`ModelError::Unrecoverable`] naming the rank and its error, and so does every later
//!   call, at once;
//! * a rank may not be able to answer at all: with NCCL on GPUs, the peers of a rank that
//!   failed before a collective spin in its kernel and block at their next stream
//!   synchronisation, and no abort reaches them from another thread. So once one rank has
//!   failed (or its thread is gone), the others get a grace period
//!   ([`TensorParallelBackend::set_failure_grace`], 10 s by default) to answer; those that do
//!   not are *stuck*, and the backend is dead, its error naming the failed rank and the stuck
//!   ones. An optional step timeout ([`TensorParallelBackend::set_step_timeout`], none by
//!   default) does the same for a step whose ranks hang with no failure at all (a peer
//!   process killed on another host);
//! * the replies come over one channel shared by the ranks, each tagged with its rank (a
//!   thread also says when it ends), so the caller notices a failure on any rank while the
//!   others are silent; while nothing has failed it blocks on that channel, with no polling;
//! * dropping the backend closes the channels and joins every rank thread that answered; a
//!   stuck one cannot be joined, so it is detached (left running, logged).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kv_block_manager::CopyOp;
use model::{Backend, ForwardBatch, KvCacheConfig, ModelConfig, ModelError, RowSampling};

use crate::{DistError, ThreadGroup};

/// The abort switch of a tensor-parallel group, as [`TensorParallelBackend`] needs it.
pub trait GroupAbort: Send + Sync + std::fmt::Debug {
    /// Makes every pending and later collective of the group fail, on every rank.
    fn abort(&self, reason: &str);

    /// Makes the group usable again after an abort; called only while no rank is inside a
    /// collective. Returns false when the transport cannot (the backend is then dead).
    fn reset(&self) -> bool;
}

impl GroupAbort for ThreadGroup {
    fn abort(&self, reason: &str) {
        ThreadGroup::abort(self, reason);
    }

    fn reset(&self) -> bool {
        ThreadGroup::reset(self);
        true
    }
}

/// A [`ForwardBatch`] that owns its data, to send to the rank threads.
#[derive(Debug)]
struct OwnedBatch {
    token_ids: Vec<u32>,
    positions: Vec<u32>,
    slot_mapping: Vec<i64>,
    seq_starts: Vec<u32>,
    block_tables: Vec<i32>,
    max_blocks: usize,
    context_lens: Vec<i32>,
    logits_indices: Vec<u32>,
}

impl OwnedBatch {
    fn new(b: &ForwardBatch<'_>) -> Self {
        Self {
            token_ids: b.token_ids.to_vec(),
            positions: b.positions.to_vec(),
            slot_mapping: b.slot_mapping.to_vec(),
            seq_starts: b.seq_starts.to_vec(),
            block_tables: b.block_tables.to_vec(),
            max_blocks: b.max_blocks,
            context_lens: b.context_lens.to_vec(),
            logits_indices: b.logits_indices.to_vec(),
        }
    }

    fn view(&self) -> ForwardBatch<'_> {
        ForwardBatch {
            token_ids: &self.token_ids,
            positions: &self.positions,
            slot_mapping: &self.slot_mapping,
            seq_starts: &self.seq_starts,
            block_tables: &self.block_tables,
            max_blocks: self.max_blocks,
            context_lens: &self.context_lens,
            logits_indices: &self.logits_indices,
        }
    }
}

/// A [`RowSampling`] that owns its history.
#[derive(Debug)]
struct OwnedRow {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    history: Vec<u32>,
    uniform: f64,
}

impl OwnedRow {
    fn new(r: &RowSampling<'_>) -> Self {
        Self {
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            min_p: r.min_p,
            repetition_penalty: r.repetition_penalty,
            history: r.history.to_vec(),
            uniform: r.uniform,
        }
    }

    fn view(&self) -> RowSampling<'_> {
        RowSampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            history: &self.history,
            uniform: self.uniform,
        }
    }
}

/// Which block copy.
#[derive(Debug, Clone, Copy)]
enum CopyKind {
    Blocks,
    SwapOut,
    SwapIn,
}

/// One step, as sent to every rank.
#[derive(Debug)]
enum Job {
    /// A forward pass; `out` is the buffer to fill (the caller's, on rank 0).
    Forward {
        batch: Arc<OwnedBatch>,
        out: Vec<f32>,
    },
    /// A forward pass with sampling on the device.
    ForwardSampled {
        batch: Arc<OwnedBatch>,
        rows: Arc<Vec<OwnedRow>>,
        sample_vocab: usize,
    },
    /// Block copies.
    Copy {
        kind: CopyKind,
        copies: Arc<Vec<CopyOp>>,
    },
}

/// A rank's answer to a step.
#[derive(Debug)]
enum Reply {
    Logits(Vec<f32>),
    Tokens(Vec<Option<u32>>),
    Done,
}

/// How a rank failed a step (or its construction).
#[derive(Debug)]
enum Failure {
    /// Its backend returned an error.
    Error(ModelError),
    /// Its backend panicked; the rank thread has ended.
    Panic(String),
}

impl Failure {
    /// Whether the rank failed on its own rather than because a collective failed (which
    /// happens to the ranks waiting for a failed one).
    fn is_own(&self) -> bool {
        !matches!(self, Self::Error(ModelError::Collective { .. }))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Error(e) => write!(f, "failed: {e}"),
            Self::Panic(m) => write!(f, "panicked: {m}"),
        }
    }
}

/// What a rank thread sends to the caller, tagged with its rank.
#[derive(Debug)]
enum Message {
    /// Its answer to the step.
    Answer(Result<Reply, Failure>),
    /// Its thread is ending (sent on every exit path, unwinding included).
    Ended,
}

/// Sends [`Message::Ended`] when dropped, i.e. when its rank thread ends however it ends.
struct Farewell {
    rank: usize,
    messages: Sender<(usize, Message)>,
}

impl Drop for Farewell {
    fn drop(&mut self) {
        let _ = self.messages.send((self.rank, Message::Ended));
    }
}

/// What became of one rank in one step.
#[derive(Debug)]
enum Outcome {
    /// It answered.
    Answered(Result<Reply, Failure>),
    /// Its thread is gone.
    Gone,
    /// It did not answer in time (blocked in a collective that will never complete?).
    Stuck,
}

impl Outcome {
    fn failed(&self) -> bool {
        !matches!(self, Self::Answered(Ok(_)))
    }
}

/// Which limit ended the wait for the last replies of a step.
#[derive(Debug, Clone, Copy)]
enum Waited {
    /// The grace after a rank's failure.
    Grace(Duration),
    /// The step timeout.
    StepTimeout(Duration),
}

impl std::fmt::Display for Waited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Grace(d) => write!(f, "within {d:?} of the failure"),
            Self::StepTimeout(d) => write!(f, "within the step timeout of {d:?}"),
        }
    }
}

/// What rank 0 reports once built.
#[derive(Debug)]
struct RankInfo {
    config: ModelConfig,
    kv: KvCacheConfig,
    device: String,
    samples_on_device: bool,
}

/// One rank thread, as the backend sees it (its replies come over the backend's channel).
#[derive(Debug)]
struct Rank {
    jobs: Sender<Job>,
    thread: JoinHandle<()>,
    /// It did not answer a step in time: its thread may never end, so it is not joined.
    stuck: bool,
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Runs `f`, turning an error or a panic into a [`Failure`] that has aborted the group.
fn guarded<T>(
    rank: usize,
    group: &dyn GroupAbort,
    f: impl FnOnce() -> Result<T, ModelError>,
) -> Result<T, Failure> {
    let failure = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) => Failure::Error(e),
        Err(panic) => Failure::Panic(panic_message(&*panic)),
    };
    group.abort(&format!("tensor-parallel rank {rank} {failure}"));
    Err(failure)
}

/// Runs one step on a rank's backend.
fn run_job(backend: &mut dyn Backend, job: Job) -> Result<Reply, ModelError> {
    match job {
        Job::Forward { batch, mut out } => {
            backend.forward(&batch.view(), &mut out)?;
            Ok(Reply::Logits(out))
        }
        Job::ForwardSampled {
            batch,
            rows,
            sample_vocab,
        } => {
            let rows: Vec<RowSampling<'_>> = rows.iter().map(OwnedRow::view).collect();
            let mut tokens = Vec::new();
            backend.forward_sampled(&batch.view(), &rows, sample_vocab, &mut tokens)?;
            Ok(Reply::Tokens(tokens))
        }
        Job::Copy { kind, copies } => {
            match kind {
                CopyKind::Blocks => backend.copy_blocks(&copies)?,
                CopyKind::SwapOut => backend.swap_out(&copies)?,
                CopyKind::SwapIn => backend.swap_in(&copies)?,
            }
            Ok(Reply::Done)
        }
    }
}

/// A rank thread: builds its backend, reports, then runs steps until its channel closes or
/// it panics.
fn rank_main<B: Backend>(
    rank: usize,
    group: &dyn GroupAbort,
    build: impl FnOnce() -> Result<B, ModelError>,
    ready: &Sender<(usize, Result<Option<RankInfo>, Failure>)>,
    jobs: &Receiver<Job>,
    replies: &Sender<(usize, Message)>,
) {
    let mut backend = match guarded(rank, group, build) {
        Ok(b) => b,
        Err(failure) => {
            let _ = ready.send((rank, Err(failure)));
            return;
        }
    };
    let info = (rank == 0).then(|| RankInfo {
        config: backend.config().clone(),
        kv: backend.kv_cache_config(),
        device: backend.device(),
        samples_on_device: backend.samples_on_device(),
    });
    if ready.send((rank, Ok(info))).is_err() {
        return;
    }
    // Non-zero ranks keep their own logits buffer (full rows: a copy of rank 0's).
    let mut spare = Vec::new();
    while let Ok(mut job) = jobs.recv() {
        if rank != 0
            && let Job::Forward { out, .. } = &mut job
        {
            *out = std::mem::take(&mut spare);
        }
        let result = guarded(rank, group, || run_job(&mut backend, job));
        let died = matches!(result, Err(Failure::Panic(_)));
        let reply = match result {
            Ok(Reply::Logits(out)) if rank != 0 => {
                spare = out;
                Ok(Reply::Done)
            }
            other => other,
        };
        if replies.send((rank, Message::Answer(reply))).is_err() || died {
            return;
        }
    }
}

/// A [`Backend`] over the ranks of a tensor-parallel group: one thread per rank, each owning
/// its sharded backend; every call goes to every rank and rank 0's result comes back. A rank
/// that fails or panics aborts the group ([`GroupAbort`]), so no rank is left waiting where the
/// transport allows it, and the backend is dead from then on unless every rank refused the same
/// step. Ranks that cannot be released (NCCL) get a grace period
/// ([`set_failure_grace`](Self::set_failure_grace)) before they are given up as stuck; a step
/// timeout ([`set_step_timeout`](Self::set_step_timeout)) covers ranks that hang with no failure.
#[derive(Debug)]
pub struct TensorParallelBackend {
    ranks: Vec<Rank>,
    /// Every rank's replies, tagged with the rank.
    replies: Receiver<(usize, Message)>,
    group: Arc<dyn GroupAbort>,
    info: RankInfo,
    /// How long the other ranks may take to answer once one has failed.
    failure_grace: Duration,
    /// How long a whole step may take, if limited.
    step_timeout: Option<Duration>,
    /// Why the backend is dead; every call fails at once with it.
    dead: Option<String>,
}

/// The default of [`TensorParallelBackend::set_failure_grace`].
const DEFAULT_FAILURE_GRACE: Duration = Duration::from_secs(10);

impl TensorParallelBackend {
    /// Starts `world_size` rank threads; rank `r`'s thread calls `build(r)` and keeps the
    /// backend it returns (built there, it never moves: a backend holding a thread-bound
    /// communicator works). `group` is the abort switch of the group the backends'
    /// collectives use. Every rank builds at the same time (sharded backends meet in a
    /// construction handshake).
    ///
    /// # Errors
    /// [`DistError::Config`] (`tensor_parallel_size`) for 0 ranks; [`DistError::Rank`] naming
    /// the first rank that failed on its own (an error or a panic of `build`, or a thread
    /// that could not start); the group is aborted so no rank is left waiting, and every
    /// thread is joined before this returns.
    pub fn spawn<B, F>(
        world_size: usize,
        group: Arc<dyn GroupAbort>,
        build: F,
    ) -> Result<Self, DistError>
    where
        B: Backend + 'static,
        F: Fn(usize) -> Result<B, ModelError> + Send + Sync + 'static,
    {
        crate::DistConfig::single_node(world_size).validate()?;
        let build = Arc::new(build);
        let (ready_tx, ready_rx) = channel();
        let (replies_tx, replies_rx) = channel();
        let mut ranks = Vec::with_capacity(world_size);
        for rank in 0..world_size {
            let (jobs_tx, jobs_rx) = channel();
            let (build, rank_group, ready) =
                (Arc::clone(&build), Arc::clone(&group), ready_tx.clone());
            let farewell = Farewell {
                rank,
                messages: replies_tx.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("kvserve-tp-rank-{rank}"))
                .spawn(move || {
                    let farewell = farewell; // the whole guard: dropped when the thread ends
                    rank_main(
                        rank,
                        &*rank_group,
                        || build(rank),
                        &ready,
                        &jobs_rx,
                        &farewell.messages,
                    );
                });
            match spawned {
                Ok(thread) => ranks.push(Rank {
                    jobs: jobs_tx,
                    thread,
                    stuck: false,
                }),
                Err(e) => {
                    let message = format!("starting its thread: {e}");
                    group.abort(&format!("tensor-parallel rank {rank} failed {message}"));
                    join_all(ranks);
                    return Err(DistError::Rank { rank, message });
                }
            }
        }
        drop(ready_tx);
        let mut info = None;
        let mut failures = Vec::new();
        for _ in 0..world_size {
            match ready_rx.recv() {
                Ok((_, Ok(Some(i)))) => info = Some(i),
                Ok((_, Ok(None))) => {}
                Ok((rank, Err(f))) => failures.push((rank, f)),
                Err(_) => break, // a thread ended without reporting: counted below
            }
        }
        let first = failures
            .iter()
            .find(|(_, f)| f.is_own())
            .or(failures.first())
            .map(|(rank, f)| (*rank, f.to_string()));
        match (info, first) {
            (Some(info), None) if ranks.len() == world_size => Ok(Self {
                ranks,
                replies: replies_rx,
                group,
                info,
                failure_grace: DEFAULT_FAILURE_GRACE,
                step_timeout: None,
                dead: None,
            }),
            (_, failure) => {
                group.abort("the tensor-parallel group failed to start");
                join_all(ranks);
                let (rank, message) =
                    failure.unwrap_or((0, "a rank thread ended without reporting".to_owned()));
                Err(DistError::Rank { rank, message })
            }
        }
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// Why the backend is dead (a rank failed out of lockstep), if it is.
    pub fn dead_reason(&self) -> Option<&str> {
        self.dead.as_deref()
    }

    /// How long the other ranks may take to answer a step once one rank has failed (or its
    /// thread is gone); 10 s by default. A rank that has not answered by then is taken to be
    /// stuck in a collective (an NCCL rank cannot be released from another thread): the
    /// backend is dead, and dropping it leaves that rank's thread running.
    ///
    /// # Errors
    /// [`DistError::Config`] (`failure_grace`) for a zero grace.
    pub fn set_failure_grace(&mut self, grace: Duration) -> Result<(), DistError> {
        if grace.is_zero() {
            return Err(DistError::config("failure_grace", "must be above zero"));
        }
        self.failure_grace = grace;
        Ok(())
    }

    /// The longest a step may take, or `None` (the default) for no limit. A step whose ranks
    /// have not all answered within it makes the backend dead, naming the ranks that did not
    /// (a rank that hangs without failing, e.g. its peer process killed on another host).
    ///
    /// # Errors
    /// [`DistError::Config`] (`step_timeout`) for a zero timeout.
    pub fn set_step_timeout(&mut self, timeout: Option<Duration>) -> Result<(), DistError> {
        if timeout.is_some_and(|t| t.is_zero()) {
            return Err(DistError::config("step_timeout", "must be above zero"));
        }
        self.step_timeout = timeout;
        Ok(())
    }

    /// Sends a step to every rank (`job(rank)` makes its copy) and collects every reply.
    fn step(&mut self, what: &str, mut job: impl FnMut(usize) -> Job) -> Result<Reply, ModelError> {
        if let Some(why) = &self.dead {
            return Err(ModelError::Unrecoverable(why.clone()));
        }
        let mut outcomes = Vec::with_capacity(self.ranks.len());
        for (r, rank) in self.ranks.iter().enumerate() {
            // A rank whose thread is gone never answers: its channel is closed.
            let sent = rank.jobs.send(job(r)).is_ok();
            outcomes.push((!sent).then_some(Outcome::Gone));
        }
        if let Some(gone) = outcomes.iter().position(Option::is_some) {
            // Its peers would wait for it in their first collective.
            self.group
                .abort(&format!("tensor-parallel rank {gone} is gone"));
        }
        let waited = self.collect(&mut outcomes);
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Stuck))
            .collect();
        for (rank, outcome) in self.ranks.iter_mut().zip(&outcomes) {
            rank.stuck = matches!(outcome, Outcome::Stuck);
        }
        self.settle(what, outcomes, waited)
    }

    /// Fills `outcomes` (`None`: no answer yet) from the ranks' messages until every rank has
    /// answered, or one has failed and the grace has passed since, or the step timeout has
    /// passed. Until a rank fails (and with no step timeout) it blocks on the channel, no
    /// polling. Returns the limit that ended the wait, if one did.
    fn collect(&self, outcomes: &mut [Option<Outcome>]) -> Option<Waited> {
        let start = Instant::now();
        let step_end = self
            .step_timeout
            .map(|t| (start + t, Waited::StepTimeout(t)));
        let grace = self.failure_grace;
        let mut grace_end = outcomes
            .iter()
            .flatten()
            .any(Outcome::failed)
            .then(|| (start + grace, Waited::Grace(grace)));
        while outcomes.iter().any(Option::is_none) {
            let limit = match (grace_end, step_end) {
                (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                (a, b) => a.or(b),
            };
            let received = match limit {
                None => self
                    .replies
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
                Some((end, _)) => self
                    .replies
                    .recv_timeout(end.saturating_duration_since(Instant::now())),
            };
            let (rank, message) = match received {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => return limit.map(|(_, waited)| waited),
                Err(RecvTimeoutError::Disconnected) => {
                    // Every rank thread has ended (each said so first, but be safe).
                    for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
                        *outcome = Some(Outcome::Gone);
                    }
                    return None;
                }
            };
            let Some(slot) = outcomes.get_mut(rank) else {
                continue;
            };
            if slot.is_some() {
                continue; // the thread of a rank that answered is ending (after a panic)
            }
            let outcome = match message {
                Message::Answer(answer) => Outcome::Answered(answer),
                Message::Ended => Outcome::Gone,
            };
            if outcome.failed() && grace_end.is_none() {
                grace_end = Some((Instant::now() + grace, Waited::Grace(grace)));
            }
            *slot = Some(outcome);
        }
        None
    }

    /// Rank 0's reply when every rank succeeded; otherwise the step's error, and the backend
    /// dead unless every rank failed alike on its own.
    fn settle(
        &mut self,
        what: &str,
        outcomes: Vec<Outcome>,
        waited: Option<Waited>,
    ) -> Result<Reply, ModelError> {
        if !outcomes.iter().any(Outcome::failed) {
            return match outcomes.into_iter().next() {
                Some(Outcome::Answered(Ok(reply))) => Ok(reply),
                _ => Err(ModelError::Unrecoverable("no rank 0".into())),
            };
        }
        let consistent = outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Answered(Err(f @ Failure::Error(_))) if f.is_own()));
        if consistent && self.group.reset() {
            // Every rank refused the step alike (a bad batch): not a lockstep failure.
            return match outcomes.into_iter().next() {
                Some(Outcome::Answered(Err(Failure::Error(e)))) => Err(e),
                _ => Err(ModelError::Unrecoverable("no rank 0".into())),
            };
        }
        let mut causes: Vec<String> = outcomes
            .iter()
            .enumerate()
            .filter_map(|(rank, o)| match o {
                Outcome::Gone => Some(format!("rank {rank} is gone")),
                Outcome::Answered(Err(f)) if f.is_own() => Some(format!("rank {rank} {f}")),
                _ => None,
            })
            .collect();
        let stuck: Vec<String> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Outcome::Stuck))
            .map(|(rank, _)| rank.to_string())
            .collect();
        if causes.is_empty() {
            let first = outcomes.iter().enumerate().find_map(|(rank, o)| match o {
                Outcome::Answered(Err(f)) => Some(format!("rank {rank} {f}")),
                _ => None,
            });
            match first {
                Some(first) => causes.push(first),
                None if stuck.is_empty() => causes.push("the ranks disagreed".to_owned()),
                None => {}
            }
        }
        if !stuck.is_empty() {
            let who = match stuck.as_slice() {
                [one] => format!("rank {one}"),
                many => format!("ranks {}", many.join(", ")),
            };
            let waited = waited.map_or_else(String::new, |w| format!(" {w}"));
            causes.push(format!(
                "{who} did not answer{waited} (stuck in a collective?)"
            ));
        }
        let why = format!("tensor-parallel {what}: {}", causes.join("; "));
        self.group.abort(&why);
        tracing::error!(error = %why, "the tensor-parallel group is dead");
        self.dead = Some(why.clone());
        Err(ModelError::Unrecoverable(why))
    }

    fn copy(&mut self, kind: CopyKind, copies: &[CopyOp]) -> Result<(), ModelError> {
        if copies.is_empty() {
            return match &self.dead {
                Some(why) => Err(ModelError::Unrecoverable(why.clone())),
                None => Ok(()),
            };
        }
        let copies = Arc::new(copies.to_vec());
        self.step("block copy", |_| Job::Copy {
            kind,
            copies: Arc::clone(&copies),
        })
        .map(|_| ())
    }
}

/// Closes every rank's job channel and joins its thread, except a stuck one's: that one is
/// detached (it may never end), and the count of those is logged.
fn join_all(ranks: Vec<Rank>) {
    let mut left_running = 0;
    for rank in ranks {
        drop(rank.jobs);
        if rank.stuck {
            left_running += 1;
            drop(rank.thread);
        } else if rank.thread.join().is_err() {
            tracing::error!("a tensor-parallel rank thread panicked outside its guard");
        }
    }
    if left_running > 0 {
        tracing::error!(
            threads = left_running,
            "{left_running} tensor-parallel rank threads were left running: stuck in a \
             collective, they cannot be joined"
        );
    }
}

impl Drop for TensorParallelBackend {
    fn drop(&mut self) {
        join_all(std::mem::take(&mut self.ranks));
    }
}

impl Backend for TensorParallelBackend {
    fn config(&self) -> &ModelConfig {
        &self.info.config
    }

    fn kv_cache_config(&self) -> KvCacheConfig {
        self.info.kv
    }

    fn device(&self) -> String {
        format!(
            "{} x {} (tensor parallel)",
            self.info.device,
            self.ranks.len()
        )
    }

    fn forward(
        &mut self,
        batch: &ForwardBatch<'_>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let owned = Arc::new(OwnedBatch::new(batch));
        let mut buffer = Some(std::mem::take(logits));
        let reply = self.step("forward", |rank| Job::Forward {
            batch: Arc::clone(&owned),
            out: if rank == 0 {
                buffer.take().unwrap_or_default()
            } else {
                Vec::new()
            },
        })?;
        match reply {
            Reply::Logits(out) => {
                *logits = out;
                Ok(())
            }
            _ => Err(ModelError::Unrecoverable(
                "rank 0 answered a forward without logits".into(),
            )),
        }
    }

    fn samples_on_device(&self) -> bool {
        self.info.samples_on_device
    }

    fn forward_sampled(
        &mut self,
        batch: &ForwardBatch<'_>,
        rows: &[RowSampling<'_>],
        sample_vocab: usize,
        tokens: &mut Vec<Option<u32>>,
    ) -> Result<(), ModelError> {
        let owned = Arc::new(OwnedBatch::new(batch));
        let rows = Arc::new(rows.iter().map(OwnedRow::new).collect::<Vec<_>>());
        let reply = self.step("forward", |_| Job::ForwardSampled {
            batch: Arc::clone(&owned),
            rows: Arc::clone(&rows),
            sample_vocab,
        })?;
        match reply {
            Reply::Tokens(t) => {
                *tokens = t;
                Ok(())
            }
            _ => Err(ModelError::Unrecoverable(
                "rank 0 answered a sampled forward without tokens".into(),
            )),
        }
    }

    fn copy_blocks(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        self.copy(CopyKind::Blocks, copies)
    }

    fn swap_out(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        self.copy(CopyKind::SwapOut, copies)
    }

    fn swap_in(&mut self, copies: &[CopyOp]) -> Result<(), ModelError> {
        self.copy(CopyKind::SwapIn, copies)
    }
}
