//! The async side: [`EngineHandle`] (submit, abort, tokenize, health, stats, metrics,
//! shutdown) and [`ResponseStream`], both talking to the step loop through channels.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use model::Tokenizer;
use scheduler::RequestId;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{
    Completion, EngineError, EngineStats, FinishReason, GenerateOutput, GenerateRequest, Health,
    ModelInfo, Prompt, StreamDelta, Usage,
};
use crate::metrics::{Metrics, outcome};
use crate::validate::{self, RequestBounds, ValidRequest};

/// One message of a response stream.
pub(crate) type StreamItem = Result<StreamDelta, EngineError>;

/// What the handle asks of the step loop.
#[derive(Debug)]
pub(crate) enum Command {
    /// Queue a validated request.
    Add(Box<NewRequest>),
    /// Abort a request (`cancelled`: its stream was dropped, nobody listens).
    Abort { rid: RequestId, cancelled: bool },
    /// Stop admitting, drain for up to `timeout`, then abort the rest and stop.
    Shutdown { timeout: Duration },
}

/// A request on its way to the step loop.
#[derive(Debug)]
pub(crate) struct NewRequest {
    pub(crate) rid: RequestId,
    pub(crate) request_id: String,
    pub(crate) valid: ValidRequest,
    pub(crate) tx: tokio::sync::mpsc::UnboundedSender<StreamItem>,
    pub(crate) arrival: Instant,
}

/// Life cycle of the step loop.
pub(crate) mod state {
    pub(crate) const SERVING: u8 = 0;
    pub(crate) const DRAINING: u8 = 1;
    pub(crate) const STOPPED: u8 = 2;
    pub(crate) const DEAD: u8 = 3;
}

/// State shared by the handles and the step loop.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) state: AtomicU8,
    /// Why the loop died.
    pub(crate) dead_reason: Mutex<Option<String>>,
    /// Live requests: caller's id → internal id.
    live: Mutex<HashMap<String, RequestId>>,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) stats: Mutex<EngineStats>,
    pub(crate) metrics: Metrics,
    next_rid: AtomicU64,
}

/// Locks a mutex, ignoring poisoning (the data are plain maps and counters, consistent after
/// any panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            state: AtomicU8::new(state::SERVING),
            dead_reason: Mutex::new(None),
            live: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            stats: Mutex::new(EngineStats::default()),
            metrics: Metrics::new(),
            next_rid: AtomicU64::new(1),
        }
    }

    /// Forgets a finished request: its id may be reused, and it no longer counts in flight.
    pub(crate) fn release(&self, request_id: &str) {
        if lock(&self.live).remove(request_id).is_some() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Forgets every request (the loop is gone).
    pub(crate) fn release_all(&self) {
        let mut live = lock(&self.live);
        let n = live.len();
        live.clear();
        self.in_flight.fetch_sub(n, Ordering::AcqRel);
    }

    fn unavailable(&self) -> Option<EngineError> {
        match self.state.load(Ordering::Acquire) {
            state::SERVING => None,
            state::DEAD => Some(EngineError::Unavailable(format!(
                "the step loop died: {}",
                lock(&self.dead_reason).as_deref().unwrap_or("unknown")
            ))),
            _ => Some(EngineError::Unavailable(
                "the engine is shutting down".into(),
            )),
        }
    }
}

/// The engine's handle: cheap to clone, `Send + Sync`. See the [crate docs](crate).
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    shared: Arc<Shared>,
    cmd: Sender<Command>,
    tokenizer: Arc<Tokenizer>,
    info: ModelInfo,
    bounds: RequestBounds,
    max_queued_requests: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("model", &self.inner.info.model)
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

impl EngineHandle {
    pub(crate) fn new(
        shared: Arc<Shared>,
        cmd: Sender<Command>,
        tokenizer: Arc<Tokenizer>,
        info: ModelInfo,
        bounds: RequestBounds,
        max_queued_requests: usize,
        thread: JoinHandle<()>,
    ) -> Self {
        Self {
            inner: Arc::new(HandleInner {
                shared,
                cmd,
                tokenizer,
                info,
                bounds,
                max_queued_requests,
                thread: Mutex::new(Some(thread)),
            }),
        }
    }

    fn sender(&self) -> Sender<Command> {
        self.inner.cmd.clone()
    }

    /// Validates `req` (synchronously: nothing is queued on error) and queues it.
    ///
    /// # Errors
    /// [`EngineError::InvalidArgument`] naming the field; [`EngineError::DuplicateId`];
    /// [`EngineError::Overloaded`] when [`EngineConfig::max_queued_requests`](crate::EngineConfig::max_queued_requests)
    /// requests are in flight; [`EngineError::Unavailable`] while shutting down or after the
    /// step loop died; [`EngineError::DeadlineExceeded`] for a deadline already past.
    pub fn generate(&self, req: GenerateRequest) -> Result<ResponseStream, EngineError> {
        let inner = &*self.inner;
        let metrics = &inner.shared.metrics;
        if let Some(e) = inner.shared.unavailable() {
            metrics.request(outcome::UNAVAILABLE);
            return Err(e);
        }
        let valid = validate::validate(&req, &inner.tokenizer, &inner.bounds).inspect_err(|e| {
            metrics.request(match e {
                EngineError::DeadlineExceeded => outcome::DEADLINE,
                _ => outcome::INVALID,
            });
        })?;
        let max = inner.max_queued_requests;
        if inner
            .shared
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            metrics.request(outcome::OVERLOADED);
            return Err(EngineError::Overloaded(max));
        }
        let rid = RequestId(inner.shared.next_rid.fetch_add(1, Ordering::Relaxed));
        let request_id = {
            let mut live = lock(&inner.shared.live);
            let id = match &valid.request_id {
                Some(id) if live.contains_key(id) => {
                    drop(live);
                    inner.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
                    metrics.request(outcome::INVALID);
                    return Err(EngineError::DuplicateId(id.clone()));
                }
                Some(id) => id.clone(),
                None => {
                    let mut id = format!("req-{}", rid.0);
                    while live.contains_key(&id) {
                        id.push('_');
                    }
                    id
                }
            };
            live.insert(id.clone(), rid);
            id
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cmd = self.sender();
        let new = NewRequest {
            rid,
            request_id: request_id.clone(),
            valid,
            tx,
            arrival: Instant::now(),
        };
        if cmd.send(Command::Add(Box::new(new))).is_err() {
            inner.shared.release(&request_id);
            metrics.request(outcome::UNAVAILABLE);
            return Err(inner
                .shared
                .unavailable()
                .unwrap_or_else(|| EngineError::Unavailable("the step loop stopped".into())));
        }
        Ok(ResponseStream {
            request_id,
            rid,
            rx,
            cmd,
            done: false,
        })
    }

    /// Aborts a live request by id, at the next step; its blocks are freed and its stream
    /// ends with [`FinishReason::Aborted`]. Returns false if no live request has this id.
    pub fn abort(&self, request_id: &str) -> bool {
        let Some(rid) = lock(&self.inner.shared.live).get(request_id).copied() else {
            return false;
        };
        self.sender()
            .send(Command::Abort {
                rid,
                cancelled: false,
            })
            .is_ok()
    }

    /// Tokenizes a prompt as [`generate`](Self::generate) would: text with the tokenizer's
    /// special tokens, messages through the chat template, token ids checked against the
    /// vocabulary.
    ///
    /// # Errors
    /// [`EngineError::InvalidArgument`] naming the field.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        validate::tokenize(prompt, &self.inner.tokenizer, self.inner.bounds.vocab_size)
    }

    /// What the engine serves.
    pub fn model_info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// [`Health::Serving`] while the step loop runs and admits requests.
    pub fn health(&self) -> Health {
        if self.inner.shared.state.load(Ordering::Acquire) == state::SERVING {
            Health::Serving
        } else {
            Health::NotServing
        }
    }

    /// Queue lengths and KV usage as of the step loop's last update.
    pub fn stats(&self) -> EngineStats {
        let mut s = *lock(&self.inner.shared.stats);
        s.requests_in_flight = self.inner.shared.in_flight.load(Ordering::Acquire);
        s
    }

    /// Every metric in the Prometheus text exposition format (names `kvserve_*`).
    pub fn metrics_text(&self) -> String {
        self.inner.shared.metrics.text()
    }

    /// Stops admitting ([`health`](Self::health) turns `NotServing`, `generate` returns
    /// [`EngineError::Unavailable`]), lets running and queued requests finish for up to
    /// `timeout`, aborts the rest (their streams end with `Unavailable`), and stops the step
    /// loop. Blocks until the loop has stopped (call it from a blocking context). Idempotent:
    /// later calls wait for the same stop.
    pub fn shutdown(&self, timeout: Duration) {
        let inner = &*self.inner;
        let _ = inner.shared.state.compare_exchange(
            state::SERVING,
            state::DRAINING,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        // A loop that already stopped has dropped its receiver: the send just fails.
        let _ = self.sender().send(Command::Shutdown { timeout });
        let mut thread = lock(&inner.thread);
        if let Some(t) = thread.take()
            && t.join().is_err()
        {
            tracing::error!("the step loop thread panicked outside its guard");
        }
    }
}

/// The output of one request, delta by delta. Dropping it before the end aborts the request
/// (its blocks are freed at the next step).
#[derive(Debug)]
pub struct ResponseStream {
    request_id: String,
    rid: RequestId,
    rx: UnboundedReceiver<StreamItem>,
    cmd: Sender<Command>,
    done: bool,
}

impl ResponseStream {
    /// The request's id (the caller's, or one the engine made).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    fn on_item(&mut self, item: Option<StreamItem>) -> Option<StreamItem> {
        if self.done {
            return None;
        }
        match item {
            Some(Ok(delta)) => {
                if delta.usage.is_some() {
                    self.done = true;
                }
                Some(Ok(delta))
            }
            Some(Err(e)) => {
                self.done = true;
                Some(Err(e))
            }
            None => {
                self.done = true;
                Some(Err(EngineError::Internal(
                    "the engine stopped before the request finished".into(),
                )))
            }
        }
    }

    /// The next delta; `None` after the last one (the one carrying `usage`). An `Err` ends the
    /// stream: [`EngineError::Internal`] (the engine failed), [`EngineError::DeadlineExceeded`]
    /// or [`EngineError::Unavailable`] (shutdown). Every completion has had its final delta
    /// (with a `finish_reason`) before such an error.
    pub async fn next(&mut self) -> Option<Result<StreamDelta, EngineError>> {
        if self.done {
            return None;
        }
        let item = self.rx.recv().await;
        self.on_item(item)
    }

    /// [`next`](Self::next) for synchronous code. Panics if called from inside an async
    /// runtime (tokio's rule for blocking receives); use `next().await` there.
    pub fn blocking_next(&mut self) -> Option<Result<StreamDelta, EngineError>> {
        if self.done {
            return None;
        }
        let item = self.rx.blocking_recv();
        self.on_item(item)
    }

    /// Drains the stream into the whole output.
    ///
    /// # Errors
    /// The error that ended the stream.
    pub async fn collect(mut self) -> Result<GenerateOutput, EngineError> {
        let mut acc = Collector::default();
        while let Some(item) = self.next().await {
            acc.add(item?);
        }
        Ok(acc.finish(self.request_id.clone()))
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.cmd.send(Command::Abort {
                rid: self.rid,
                cancelled: true,
            });
        }
    }
}

/// Accumulates deltas into completions.
#[derive(Debug, Default)]
struct Collector {
    completions: BTreeMap<u32, Completion>,
    usage: Usage,
}

impl Collector {
    fn add(&mut self, d: StreamDelta) {
        let c = self
            .completions
            .entry(d.index)
            .or_insert_with(|| Completion {
                index: d.index,
                text: String::new(),
                token_ids: Vec::new(),
                finish_reason: FinishReason::Error,
                logprobs: Vec::new(),
            });
        c.text.push_str(&d.text);
        c.token_ids.extend_from_slice(&d.token_ids);
        c.logprobs.extend(d.logprobs);
        if let Some(r) = d.finish_reason {
            c.finish_reason = r;
        }
        if let Some(u) = d.usage {
            self.usage = u;
        }
    }

    fn finish(self, request_id: String) -> GenerateOutput {
        GenerateOutput {
            request_id,
            completions: self.completions.into_values().collect(),
            usage: self.usage,
        }
    }
}
