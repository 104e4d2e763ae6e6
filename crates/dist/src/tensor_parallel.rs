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
//! Ranks on other nodes ([`TensorParallelBackend::spawn_multi_node`]): each other node is
//! one member of the backend's [`RankSet`], a proxy thread (`remote.rs`) that sends the
//! node's copy of every step over TCP and posts one tagged reply per world rank of the node,
//! so everything below holds for them too; a node whose connection breaks has its ranks
//! *lost*, a failure that kills the backend.
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

use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kv_block_manager::CopyOp;
use model::{Backend, ForwardBatch, KvCacheConfig, ModelConfig, ModelError, RowSampling};

use crate::step_wire::FailureKind;
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
pub(crate) struct OwnedBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub slot_mapping: Vec<i64>,
    pub seq_starts: Vec<u32>,
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
    pub context_lens: Vec<i32>,
    pub logits_indices: Vec<u32>,
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
pub(crate) struct OwnedRow {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub history: Vec<u32>,
    pub uniform: f64,
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
pub(crate) enum CopyKind {
    Blocks,
    SwapOut,
    SwapIn,
}

/// One step, as sent to every rank.
#[derive(Debug)]
pub(crate) enum Job {
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
    /// Reset the group of a remote node's ranks after a step they all refused alike (sent to
    /// proxies only; a local rank answers done).
    ResetGroup,
}

impl Job {
    /// Another rank's copy of the step (sharing the batch; a forward gets an empty logits
    /// buffer).
    pub(crate) fn share(&self) -> Self {
        match self {
            Self::Forward { batch, .. } => Self::Forward {
                batch: Arc::clone(batch),
                out: Vec::new(),
            },
            Self::ForwardSampled {
                batch,
                rows,
                sample_vocab,
            } => Self::ForwardSampled {
                batch: Arc::clone(batch),
                rows: Arc::clone(rows),
                sample_vocab: *sample_vocab,
            },
            Self::Copy { kind, copies } => Self::Copy {
                kind: *kind,
                copies: Arc::clone(copies),
            },
            Self::ResetGroup => Self::ResetGroup,
        }
    }
}

/// A rank's answer to a step.
#[derive(Debug)]
pub(crate) enum Reply {
    Logits(Vec<f32>),
    Tokens(Vec<Option<u32>>),
    Done,
}

/// How a rank failed a step (or its construction).
#[derive(Debug)]
pub(crate) enum Failure {
    /// Its backend returned an error.
    Error(ModelError),
    /// Its backend panicked; the rank thread has ended.
    Panic(String),
    /// A rank of another node did not succeed, as its node (or the loss of its node) says.
    Remote { kind: FailureKind, message: String },
}

impl Failure {
    /// Whether the rank failed on its own rather than because a collective failed (which
    /// happens to the ranks waiting for a failed one).
    pub(crate) fn is_own(&self) -> bool {
        match self {
            Self::Error(e) => !matches!(e, ModelError::Collective { .. }),
            Self::Panic(_) => true,
            Self::Remote { kind, .. } => {
                !matches!(kind, FailureKind::Collective | FailureKind::Stuck)
            }
        }
    }

    /// Whether its backend refused the step with an error of its own (not a panic, not a
    /// collective, not a lost rank): what every rank does alike with a bad batch.
    pub(crate) fn is_own_error(&self) -> bool {
        match self {
            Self::Error(e) => !matches!(e, ModelError::Collective { .. }),
            Self::Remote { kind, .. } => *kind == FailureKind::Error,
            Self::Panic(_) => false,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Error(e) => write!(f, "failed: {e}"),
            Self::Panic(m) => write!(f, "panicked: {m}"),
            Self::Remote { kind, message } => match kind {
                FailureKind::Error | FailureKind::Collective => write!(f, "failed: {message}"),
                FailureKind::Panic => write!(f, "panicked: {message}"),
                FailureKind::Gone => write!(f, "is gone: {message}"),
                FailureKind::Stuck => write!(f, "did not answer: {message}"),
                FailureKind::Lost => write!(f, "is lost: {message}"),
            },
        }
    }
}

/// What a rank thread sends to the caller, tagged with its rank.
#[derive(Debug)]
pub(crate) enum Message {
    /// Its answer to the step.
    Answer(Result<Reply, Failure>),
    /// Its thread is ending (sent on every exit path, unwinding included).
    Ended,
}

/// Sends [`Message::Ended`] for each of its ranks when dropped, i.e. when its thread (a
/// rank's, or a remote node's proxy) ends however it ends.
pub(crate) struct Farewell {
    ranks: Range<usize>,
    pub(crate) messages: Sender<(usize, Message)>,
}

impl Drop for Farewell {
    fn drop(&mut self) {
        for rank in self.ranks.clone() {
            let _ = self.messages.send((rank, Message::Ended));
        }
    }
}

/// Where every thread of a [`RankSet`] reports once its ranks are built (or failed to).
pub(crate) type Ready = Sender<(usize, Result<Option<RankInfo>, Failure>)>;

/// What became of one rank in one step.
#[derive(Debug)]
pub(crate) enum Outcome {
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
pub(crate) enum Waited {
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
pub(crate) struct RankInfo {
    config: ModelConfig,
    kv: KvCacheConfig,
    device: String,
    samples_on_device: bool,
}

/// One thread of a [`RankSet`]: a local rank, or the proxy of a remote node's ranks (its
/// replies come over the set's channel).
#[derive(Debug)]
struct Member {
    /// The world ranks it answers for.
    ranks: Range<usize>,
    jobs: Sender<Job>,
    thread: JoinHandle<()>,
    /// It did not answer a step in time: a local rank's thread may never end, so it is not
    /// joined; a proxy's connection is shut down, which releases it.
    stuck: bool,
    /// A remote node's connection (a clone of its proxy's).
    connection: Option<TcpStream>,
}

/// A remote node as [`RankSet::start`] takes it.
#[derive(Debug)]
pub(crate) struct RemoteNode {
    pub node: usize,
    pub ranks: Range<usize>,
    pub stream: TcpStream,
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
        Job::ResetGroup => Ok(Reply::Done),
    }
}

/// Whether every rank refused the step with an error of its own (a bad batch), which leaves
/// the ranks in lockstep.
fn all_refused_alike(outcomes: &[Outcome]) -> bool {
    outcomes
        .iter()
        .all(|o| matches!(o, Outcome::Answered(Err(f)) if f.is_own_error()))
}

/// A rank thread: builds its backend, reports, then runs steps until its channel closes or
/// it panics.
fn rank_main<B: Backend>(
    rank: usize,
    group: &dyn GroupAbort,
    build: impl FnOnce() -> Result<B, ModelError>,
    ready: &Ready,
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

/// The threads behind a tensor-parallel backend, or behind the ranks a node serves: local rank
/// threads and proxies of remote nodes, with one tagged reply channel. It sends a step to
/// every member and collects every rank's outcome (the failure grace and the step timeout
/// bound the wait); what the outcomes mean is its owner's business.
#[derive(Debug)]
pub(crate) struct RankSet {
    members: Vec<Member>,
    /// The world rank of the first outcome.
    first: usize,
    /// The world ranks it answers for.
    size: usize,
    /// Every rank's replies, tagged with the world rank.
    replies: Receiver<(usize, Message)>,
    pub(crate) group: Arc<dyn GroupAbort>,
    /// How long the other ranks may take to answer once one has failed.
    pub(crate) failure_grace: Duration,
    /// How long a whole step may take, if limited.
    pub(crate) step_timeout: Option<Duration>,
}

impl RankSet {
    /// Starts a thread per rank of `local` (calling `build(rank)` there) and a proxy per
    /// remote node (whose ranks must follow `local`'s, in order), and waits until every rank
    /// is built. Returns rank 0's info when rank 0 is local.
    pub(crate) fn start<B, F>(
        local: Range<usize>,
        remotes: Vec<RemoteNode>,
        group: Arc<dyn GroupAbort>,
        build: F,
    ) -> Result<(Self, Option<RankInfo>), DistError>
    where
        B: Backend + 'static,
        F: Fn(usize) -> Result<B, ModelError> + Send + Sync + 'static,
    {
        let first = local.start;
        let size = local.len() + remotes.iter().map(|r| r.ranks.len()).sum::<usize>();
        let build = Arc::new(build);
        let (ready_tx, ready_rx) = channel();
        let (replies_tx, replies_rx) = channel();
        let mut set = Self {
            members: Vec::with_capacity(local.len() + remotes.len()),
            first,
            size,
            replies: replies_rx,
            group: Arc::clone(&group),
            failure_grace: DEFAULT_FAILURE_GRACE,
            step_timeout: None,
        };
        let fail = |mut set: Self, rank: usize, message: String| {
            group.abort(&format!("tensor-parallel rank {rank} failed {message}"));
            set.release_remotes();
            Err(DistError::Rank { rank, message })
        };
        for rank in local {
            let (jobs_tx, jobs_rx) = channel();
            let (build, rank_group, ready) =
                (Arc::clone(&build), Arc::clone(&group), ready_tx.clone());
            let farewell = Farewell {
                ranks: rank..rank + 1,
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
                Ok(thread) => set.members.push(Member {
                    ranks: rank..rank + 1,
                    jobs: jobs_tx,
                    thread,
                    stuck: false,
                    connection: None,
                }),
                Err(e) => return fail(set, rank, format!("starting its thread: {e}")),
            }
        }
        for remote in remotes {
            let rank = remote.ranks.start;
            let connection = match remote.stream.try_clone() {
                Ok(c) => c,
                Err(e) => {
                    return fail(set, rank, format!("cloning its node's connection: {e}"));
                }
            };
            let (jobs_tx, jobs_rx) = channel();
            let ready = ready_tx.clone();
            let farewell = Farewell {
                ranks: remote.ranks.clone(),
                messages: replies_tx.clone(),
            };
            let ranks = remote.ranks.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("kvserve-tp-node-{}", remote.node))
                .spawn(move || {
                    let farewell = farewell;
                    crate::remote::proxy_main(remote, &ready, &jobs_rx, &farewell.messages);
                });
            match spawned {
                Ok(thread) => set.members.push(Member {
                    ranks,
                    jobs: jobs_tx,
                    thread,
                    stuck: false,
                    connection: Some(connection),
                }),
                Err(e) => return fail(set, rank, format!("starting its node's proxy: {e}")),
            }
        }
        drop(ready_tx);
        let mut info = None;
        let mut failures = Vec::new();
        let mut reported = 0;
        for _ in 0..size {
            match ready_rx.recv() {
                Ok((_, Ok(i))) => {
                    reported += 1;
                    info = info.or(i);
                }
                Ok((rank, Err(f))) => failures.push((rank, f)),
                Err(_) => break, // a thread ended without reporting: counted below
            }
        }
        let first_failure = failures
            .iter()
            .find(|(_, f)| f.is_own())
            .or(failures.first())
            .map(|(rank, f)| (*rank, f.to_string()));
        match first_failure {
            None if reported == size => Ok((set, info)),
            failure => {
                group.abort("the tensor-parallel group failed to start");
                set.release_remotes();
                let (rank, message) =
                    failure.unwrap_or((first, "a rank thread ended without reporting".to_owned()));
                Err(DistError::Rank { rank, message })
            }
        }
    }

    /// Marks every proxy stuck, so that dropping the set shuts its connection down (a proxy
    /// may be waiting for a node's answer that will not come).
    fn release_remotes(&mut self) {
        for member in &mut self.members {
            member.stuck |= member.connection.is_some();
        }
    }

    /// The world ranks it answers for.
    pub(crate) fn ranks(&self) -> Range<usize> {
        self.first..self.first + self.size
    }

    /// Sends a step to every member (`job(rank)` makes the copy of the member whose first
    /// world rank is `rank`) and collects every rank's outcome, in world-rank order from
    /// [`ranks`](Self::ranks)'s start; also the limit that ended the wait, if one did.
    pub(crate) fn run(
        &mut self,
        mut job: impl FnMut(usize) -> Job,
    ) -> (Vec<Outcome>, Option<Waited>) {
        let mut outcomes: Vec<Option<Outcome>> = (0..self.size).map(|_| None).collect();
        let mut gone = None;
        for member in &self.members {
            // A member whose thread is gone never answers: its channel is closed.
            if member.jobs.send(job(member.ranks.start)).is_err() {
                for rank in member.ranks.clone() {
                    outcomes[rank - self.first] = Some(Outcome::Gone);
                }
                gone = gone.or(Some(member.ranks.start));
            }
        }
        if let Some(gone) = gone {
            // Its peers would wait for it in their first collective.
            self.group
                .abort(&format!("tensor-parallel rank {gone} is gone"));
        }
        let waited = self.collect(&mut outcomes);
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Stuck))
            .collect();
        for member in &mut self.members {
            member.stuck = member
                .ranks
                .clone()
                .any(|r| matches!(outcomes[r - self.first], Outcome::Stuck));
        }
        (outcomes, waited)
    }

    /// Makes the group usable again after a step every rank refused alike: this node's
    /// (`GroupAbort::reset`), then every remote node's (each resets its own, told through its
    /// proxy). False when one cannot (or its node is lost).
    pub(crate) fn reset_group(&mut self) -> bool {
        if !self.group.reset() {
            return false;
        }
        let mut outcomes: Vec<Option<Outcome>> = (0..self.size).map(|_| None).collect();
        for member in &self.members {
            let sent = member.connection.is_some() && member.jobs.send(Job::ResetGroup).is_ok();
            if !sent {
                for rank in member.ranks.clone() {
                    outcomes[rank - self.first] = Some(if member.connection.is_some() {
                        Outcome::Gone
                    } else {
                        Outcome::Answered(Ok(Reply::Done))
                    });
                }
            }
        }
        self.collect(&mut outcomes);
        outcomes
            .iter()
            .all(|o| matches!(o, Some(Outcome::Answered(Ok(_)))))
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
                    // Every thread has ended (each said so first, but be safe).
                    for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
                        *outcome = Some(Outcome::Gone);
                    }
                    return None;
                }
            };
            let Some(slot) = rank
                .checked_sub(self.first)
                .and_then(|i| outcomes.get_mut(i))
            else {
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
}

/// Closes every member's job channel and joins its thread, except a stuck local rank's:
/// that one is detached (it may never end), and the count of those is logged. A stuck
/// proxy's connection is shut down first, which ends its wait.
impl Drop for RankSet {
    fn drop(&mut self) {
        let mut left_running = 0;
        for member in std::mem::take(&mut self.members) {
            drop(member.jobs);
            if let Some(connection) = &member.connection
                && member.stuck
            {
                let _ = connection.shutdown(Shutdown::Both);
            } else if member.stuck {
                left_running += 1;
                drop(member.thread);
                continue;
            }
            if member.thread.join().is_err() {
                tracing::error!("a tensor-parallel thread panicked outside its guard");
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
}

/// A [`Backend`] over the ranks of a tensor-parallel group: one thread per local rank, each
/// owning its sharded backend, and a proxy per other node ([`spawn_multi_node`]); every call
/// goes to every rank and rank 0's result comes back. A rank that fails or panics aborts the
/// group ([`GroupAbort`]), so no rank is left waiting where the transport allows it, and the
/// backend is dead from then on unless every rank refused the same step. Ranks that cannot be
/// released (NCCL) get a grace period ([`set_failure_grace`](Self::set_failure_grace)) before
/// they are given up as stuck; a step timeout ([`set_step_timeout`](Self::set_step_timeout))
/// covers ranks that hang with no failure.
///
/// [`spawn_multi_node`]: Self::spawn_multi_node
#[derive(Debug)]
pub struct TensorParallelBackend {
    set: RankSet,
    info: RankInfo,
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
        Self::from_set(RankSet::start(0..world_size, Vec::new(), group, build)?)
    }

    /// Node 0 of several: starts this node's ranks (`config.local_ranks()`, one thread each
    /// as [`spawn`](Self::spawn)) and drives the ranks of every other node over its
    /// connection, `remotes[n - 1]` being node `n`'s (as
    /// [`RendezvousHost::serve_keep`](crate::RendezvousHost::serve_keep) returns them),
    /// where [`serve_remote_ranks`](crate::serve_remote_ranks) runs. Each remote node gets a
    /// proxy thread that sends it every step and turns its one answer into one reply per
    /// world rank, so failures, the grace and the step timeout work as with local ranks. A
    /// connection that breaks makes the backend dead (its ranks are lost); dropping the
    /// backend tells every node to shut down and closes the connections.
    ///
    /// `group` aborts the collectives of this node's ranks; the collectives across nodes are
    /// the backends' business (NCCL in production).
    ///
    /// # Errors
    /// [`DistError::Config`] for a bad `config`, one that is not node 0's (`node_rank`) or
    /// `remotes` not one per other node (`nnodes`); [`DistError::Rank`] naming the first rank
    /// (local or remote) that failed to build, or whose node was lost before it was ready.
    pub fn spawn_multi_node<B, F>(
        config: &crate::DistConfig,
        remotes: Vec<TcpStream>,
        group: Arc<dyn GroupAbort>,
        build: F,
    ) -> Result<Self, DistError>
    where
        B: Backend + 'static,
        F: Fn(usize) -> Result<B, ModelError> + Send + Sync + 'static,
    {
        config.validate()?;
        if !config.is_host() {
            return Err(DistError::config(
                "node_rank",
                format!(
                    "{}: the tensor-parallel backend runs on node 0; other nodes run \
                     serve_remote_ranks",
                    config.node_rank
                ),
            ));
        }
        if remotes.len() + 1 != config.nnodes {
            return Err(DistError::config(
                "nnodes",
                format!(
                    "nnodes = {} needs {} connections (one per other node), got {}",
                    config.nnodes,
                    config.nnodes - 1,
                    remotes.len()
                ),
            ));
        }
        let per_node = config.gpus_per_node();
        let remotes = remotes
            .into_iter()
            .enumerate()
            .map(|(i, stream)| RemoteNode {
                node: i + 1,
                ranks: (i + 1) * per_node..(i + 2) * per_node,
                stream,
            })
            .collect();
        Self::from_set(RankSet::start(config.local_ranks(), remotes, group, build)?)
    }

    fn from_set((set, info): (RankSet, Option<RankInfo>)) -> Result<Self, DistError> {
        match info {
            Some(info) => Ok(Self {
                set,
                info,
                dead: None,
            }),
            None => Err(DistError::Rank {
                rank: 0,
                message: "rank 0 did not report its configuration".into(),
            }),
        }
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.set.size
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
        self.set.failure_grace = grace;
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
        self.set.step_timeout = timeout;
        Ok(())
    }

    /// Sends a step to every rank (`job(rank)` makes its copy) and collects every reply.
    fn step(&mut self, what: &str, job: impl FnMut(usize) -> Job) -> Result<Reply, ModelError> {
        if let Some(why) = &self.dead {
            return Err(ModelError::Unrecoverable(why.clone()));
        }
        let (outcomes, waited) = self.set.run(job);
        self.settle(what, outcomes, waited)
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
        if all_refused_alike(&outcomes) && self.set.reset_group() {
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
        self.set.group.abort(&why);
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

impl Backend for TensorParallelBackend {
    fn config(&self) -> &ModelConfig {
        &self.info.config
    }

    fn kv_cache_config(&self) -> KvCacheConfig {
        self.info.kv
    }

    fn device(&self) -> String {
        format!("{} x {} (tensor parallel)", self.info.device, self.set.size)
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
