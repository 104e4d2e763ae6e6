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
//! * dropping the backend closes the channels and joins every rank thread.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

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

/// What rank 0 reports once built.
#[derive(Debug)]
struct RankInfo {
    config: ModelConfig,
    kv: KvCacheConfig,
    device: String,
    samples_on_device: bool,
}

/// One rank thread, as the backend sees it.
#[derive(Debug)]
struct Rank {
    jobs: Sender<Job>,
    replies: Receiver<Result<Reply, Failure>>,
    thread: JoinHandle<()>,
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
    replies: &Sender<Result<Reply, Failure>>,
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
        if replies.send(reply).is_err() || died {
            return;
        }
    }
}

/// A [`Backend`] over the ranks of a tensor-parallel group: one thread per rank, each owning
/// its sharded backend; every call goes to every rank and rank 0's result comes back. A rank
/// that fails or panics aborts the group ([`GroupAbort`]), so no rank is left waiting, and the
/// backend is dead from then on unless every rank refused the same step.
#[derive(Debug)]
pub struct TensorParallelBackend {
    ranks: Vec<Rank>,
    group: Arc<dyn GroupAbort>,
    info: RankInfo,
    /// Why the backend is dead; every call fails at once with it.
    dead: Option<String>,
}

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
        let mut ranks = Vec::with_capacity(world_size);
        for rank in 0..world_size {
            let (jobs_tx, jobs_rx) = channel();
            let (replies_tx, replies_rx) = channel();
            let (build, rank_group, ready) =
                (Arc::clone(&build), Arc::clone(&group), ready_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("kvserve-tp-rank-{rank}"))
                .spawn(move || {
                    rank_main(
                        rank,
                        &*rank_group,
                        || build(rank),
                        &ready,
                        &jobs_rx,
                        &replies_tx,
                    );
                });
            match spawned {
                Ok(thread) => ranks.push(Rank {
                    jobs: jobs_tx,
                    replies: replies_rx,
                    thread,
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
                group,
                info,
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

    /// Sends a step to every rank (`job(rank)` makes its copy) and collects every reply.
    fn step(&mut self, what: &str, mut job: impl FnMut(usize) -> Job) -> Result<Reply, ModelError> {
        if let Some(why) = &self.dead {
            return Err(ModelError::Unrecoverable(why.clone()));
        }
        let mut sent = Vec::with_capacity(self.ranks.len());
        for (r, rank) in self.ranks.iter().enumerate() {
            sent.push(rank.jobs.send(job(r)).is_ok());
        }
        if let Some(gone) = sent.iter().position(|ok| !ok) {
            // Its peers would wait for it in their first collective.
            self.group
                .abort(&format!("tensor-parallel rank {gone} is gone"));
        }
        let mut replies = Vec::with_capacity(self.ranks.len());
        for (rank, ok) in self.ranks.iter().zip(sent) {
            // A rank whose thread is gone never answers: its channel is closed.
            let reply = if ok { rank.replies.recv().ok() } else { None };
            replies.push(reply);
        }
        self.settle(what, replies)
    }

    /// Rank 0's reply when every rank succeeded; otherwise the step's error, and the backend
    /// dead unless every rank failed alike on its own.
    fn settle(
        &mut self,
        what: &str,
        replies: Vec<Option<Result<Reply, Failure>>>,
    ) -> Result<Reply, ModelError> {
        if replies.iter().all(|r| matches!(r, Some(Ok(_)))) {
            let mut replies = replies.into_iter();
            return match replies.next() {
                Some(Some(Ok(reply))) => Ok(reply),
                _ => Err(ModelError::Unrecoverable("no rank 0".into())),
            };
        }
        let consistent = replies
            .iter()
            .all(|r| matches!(r, Some(Err(f @ Failure::Error(_))) if f.is_own()));
        if consistent && self.group.reset() {
            // Every rank refused the step alike (a bad batch): not a lockstep failure.
            return match replies.into_iter().next() {
                Some(Some(Err(Failure::Error(e)))) => Err(e),
                _ => Err(ModelError::Unrecoverable("no rank 0".into())),
            };
        }
        let described: Vec<String> = replies
            .iter()
            .enumerate()
            .filter_map(|(rank, r)| match r {
                None => Some(format!("rank {rank} is gone")),
                Some(Err(f)) if f.is_own() => Some(format!("rank {rank} {f}")),
                _ => None,
            })
            .collect();
        let cause = if described.is_empty() {
            replies
                .iter()
                .enumerate()
                .find_map(|(rank, r)| match r {
                    Some(Err(f)) => Some(format!("rank {rank} {f}")),
                    _ => None,
                })
                .unwrap_or_else(|| "the ranks disagreed".to_owned())
        } else {
            described.join("; ")
        };
        let why = format!("tensor-parallel {what}: {cause}");
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

fn join_all(ranks: Vec<Rank>) {
    for rank in ranks {
        drop(rank.jobs);
        drop(rank.replies);
        if rank.thread.join().is_err() {
            tracing::error!("a tensor-parallel rank thread panicked outside its guard");
        }
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
