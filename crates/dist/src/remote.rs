//! Ranks on other nodes: node 0's [`TensorParallelBackend`](crate::TensorParallelBackend)
//! sends each step's plan over TCP to every other node, where [`serve_remote_ranks`] runs it
//! on the node's ranks.
//!
//! One connection per node, the one the rendezvous opened
//! ([`RendezvousHost::serve_keep`](crate::RendezvousHost::serve_keep) /
//! [`Rendezvous::join_keep`](crate::Rendezvous::join_keep)), carries length-prefixed
//! little-endian frames of at most [`MAX_STEP_FRAME`](crate::MAX_STEP_FRAME) bytes (the
//! layout is documented in `step_wire.rs`): the node first answers *ready* once every local rank is
//! built (or names the rank that failed), then, for every step node 0 sends, runs it on
//! every local rank and answers once (done, or each rank that did not succeed and how). Logits
//! never travel: rank 0 lives on node 0 and every rank holds full rows anyway. Tensors never
//! travel here either: the collectives between the ranks are the backends' (NCCL across hosts
//! in production; the loopback tests share one in-process `ThreadGroup`).
//!
//! On node 0 a proxy thread per node takes the node's copy of each step from a channel, writes
//! it, reads the answer and posts one tagged reply per world rank of the node on the backend's
//! reply channel, so the backend settles a step, its failure grace and its step timeout
//! exactly as with local ranks. A connection that breaks, or an answer that is not one, makes
//! those ranks *lost*: the backend is dead with an error naming them and the node.

use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};

use model::{Backend, ModelError};

use crate::step_wire::{
    Answer, Command, FailureKind, FrameError, RankFailure, decode_answer, decode_command,
    encode_answer, encode_job, encode_shutdown, read_step_frame, write_step_frame,
};
use crate::tensor_parallel::{
    Failure, GroupAbort, Job, Message, Outcome, RankSet, Ready, RemoteNode, Reply, Waited,
};
use crate::{DistConfig, DistError};

/// Reads one answer of the node serving `ranks`, checking that every rank it names is one of
/// them, once.
fn read_answer(stream: &mut TcpStream, ranks: &Range<usize>) -> Result<Answer, String> {
    let payload = read_step_frame(stream).map_err(|e| e.to_string())?;
    let answer = decode_answer(&payload).map_err(|e| format!("bad answer: {e}"))?;
    if let Answer::Failed(failures) = &answer {
        for (i, f) in failures.iter().enumerate() {
            if !ranks.contains(&f.rank) || failures[..i].iter().any(|g| g.rank == f.rank) {
                return Err(format!(
                    "bad answer: `failures.rank` {} is not a rank of the node ({ranks:?}) or is \
                     named twice",
                    f.rank
                ));
            }
        }
    }
    Ok(answer)
}

/// Each rank's result of a step (or of being built), from the node's answer.
fn per_rank<T>(
    ranks: &Range<usize>,
    failures: &[RankFailure],
    ok: impl Fn() -> T,
) -> Vec<(usize, Result<T, Failure>)> {
    ranks
        .clone()
        .map(|rank| match failures.iter().find(|f| f.rank == rank) {
            Some(f) => (
                rank,
                Err(Failure::Remote {
                    kind: f.kind,
                    message: f.message.clone(),
                }),
            ),
            None => (rank, Ok(ok())),
        })
        .collect()
}

/// A remote node's proxy on node 0: reads its ready answer, then sends it every step that
/// comes over `jobs` and posts each of its ranks' replies; when `jobs` closes, tells the node
/// to shut down.
pub(crate) fn proxy_main(
    remote: RemoteNode,
    ready: &Ready,
    jobs: &Receiver<Job>,
    replies: &Sender<(usize, Message)>,
) {
    let RemoteNode {
        node,
        ranks,
        mut stream,
    } = remote;
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "an unknown address".to_owned(), |a| a.to_string());
    let lost = |why: &str| Failure::Remote {
        kind: FailureKind::Lost,
        message: format!("node {node} ({peer}): {why}"),
    };
    match read_answer(&mut stream, &ranks) {
        Ok(Answer::Ready) => {
            for rank in ranks.clone() {
                let _ = ready.send((rank, Ok(None)));
            }
        }
        Ok(Answer::Failed(failures)) => {
            for (rank, result) in per_rank(&ranks, &failures, || None) {
                let _ = ready.send((rank, result));
            }
            return;
        }
        other => {
            let why = match other {
                Err(why) => format!("waiting for its ranks to be built: {why}"),
                Ok(_) => "answered `done` before `ready`".to_owned(),
            };
            for rank in ranks.clone() {
                let _ = ready.send((rank, Err(lost(&why))));
            }
            return;
        }
    }
    while let Ok(job) = jobs.recv() {
        let answer = encode_job(&job)
            .and_then(|frame| write_step_frame(&mut stream, &frame))
            .map_err(|e| format!("sending the step: {e}"))
            .and_then(|()| read_answer(&mut stream, &ranks));
        let results = match answer {
            Ok(Answer::Done) => per_rank(&ranks, &[], || Reply::Done),
            Ok(Answer::Failed(failures)) => per_rank(&ranks, &failures, || Reply::Done),
            other => {
                let why = match other {
                    Err(why) => why,
                    Ok(_) => "answered `ready` to a step".to_owned(),
                };
                for rank in ranks.clone() {
                    let _ = replies.send((rank, Message::Answer(Err(lost(&why)))));
                }
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        };
        for (rank, result) in results {
            if replies.send((rank, Message::Answer(result))).is_err() {
                return;
            }
        }
    }
    // Best effort: the node may be gone already.
    let _ = write_step_frame(&mut stream, &encode_shutdown());
    let _ = stream.shutdown(Shutdown::Both);
}

/// What the node answers for its ranks' outcomes (`first` is the first one's world rank).
fn answer_of(outcomes: &[Outcome], first: usize, waited: Option<Waited>) -> Answer {
    let failures: Vec<RankFailure> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, outcome)| {
            let (kind, message) = match outcome {
                Outcome::Answered(Ok(_)) => return None,
                Outcome::Answered(Err(Failure::Error(e @ ModelError::Collective { .. }))) => {
                    (FailureKind::Collective, e.to_string())
                }
                Outcome::Answered(Err(Failure::Error(e))) => (FailureKind::Error, e.to_string()),
                Outcome::Answered(Err(Failure::Panic(m))) => (FailureKind::Panic, m.clone()),
                Outcome::Answered(Err(Failure::Remote { kind, message })) => {
                    (*kind, message.clone())
                }
                Outcome::Gone => (FailureKind::Gone, "its thread is gone".to_owned()),
                Outcome::Stuck => (
                    FailureKind::Stuck,
                    format!(
                        "{} on its node (stuck in a collective?)",
                        waited.map_or_else(|| "no answer".to_owned(), |w| w.to_string())
                    ),
                ),
            };
            Some(RankFailure {
                rank: first + i,
                kind,
                message,
            })
        })
        .collect();
    if failures.is_empty() {
        Answer::Done
    } else {
        Answer::Failed(failures)
    }
}

/// Serves this node's ranks to node 0 over `stream` (the connection
/// [`Rendezvous::join_keep`](crate::Rendezvous::join_keep) returns): starts one thread per
/// local rank (world ranks `config.local_ranks()`), each calling `build(world_rank)` on its
/// thread as [`TensorParallelBackend::spawn`](crate::TensorParallelBackend::spawn) does, tells
/// node 0 when they are built (or which one failed), then runs every step node 0 sends on
/// every local rank and answers once per step, until node 0 says shut down or closes the
/// connection. `group` aborts the collectives of this node's ranks (a failing rank aborts it;
/// node 0 has it reset when every rank refused a step alike).
///
/// A local rank stuck in a collective keeps this call waiting for it (node 0 gives it up
/// after its failure grace and closes the connection; the step in flight still has to end).
///
/// # Errors
/// [`DistError::Config`] for a bad `config` or node 0's (`node_rank`: node 0 runs the
/// backend); [`DistError::Rank`] when a local rank failed to build (node 0 is told);
/// [`DistError::Protocol`] for a frame that is not a step (too long, unknown tag, truncated);
/// [`DistError::Io`] when the connection breaks (a clean close between steps is `Ok`).
pub fn serve_remote_ranks<B, F>(
    mut stream: TcpStream,
    config: &DistConfig,
    group: Arc<dyn GroupAbort>,
    build: F,
) -> Result<(), DistError>
where
    B: Backend + 'static,
    F: Fn(usize) -> Result<B, ModelError> + Send + Sync + 'static,
{
    config.validate()?;
    if config.is_host() {
        return Err(DistError::config(
            "node_rank",
            "0: node 0 runs the TensorParallelBackend; serve_remote_ranks runs on nodes 1 and up",
        ));
    }
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "node 0".to_owned(), |a| format!("node 0 ({a})"));
    let io = |what: &'static str| {
        let peer = peer.clone();
        move |source| DistError::Io {
            what,
            addr: peer,
            source,
        }
    };
    let mut set = match RankSet::start(config.local_ranks(), Vec::new(), group, build) {
        Ok((set, _)) => set,
        Err(e) => {
            let (rank, message) = match &e {
                DistError::Rank { rank, message } => (*rank, message.clone()),
                other => (config.local_ranks().start, other.to_string()),
            };
            // The message is a local failure's ("failed: ...", "panicked: ..."): node 0 says
            // it again in its own words.
            let (kind, message) = match message.strip_prefix("panicked: ") {
                Some(m) => (FailureKind::Panic, m),
                None => (
                    FailureKind::Error,
                    message.strip_prefix("failed: ").unwrap_or(&message),
                ),
            };
            let failed = Answer::Failed(vec![RankFailure {
                rank,
                kind,
                message: message.to_owned(),
            }]);
            let _ = encode_answer(&failed).and_then(|f| write_step_frame(&mut stream, &f));
            return Err(e);
        }
    };
    encode_answer(&Answer::Ready)
        .and_then(|f| write_step_frame(&mut stream, &f))
        .map_err(io("reporting ready to"))?;
    loop {
        let payload = match read_step_frame(&mut stream) {
            Ok(p) => p,
            Err(FrameError::Eof) => return Ok(()),
            Err(FrameError::Io(e)) if e.kind() != std::io::ErrorKind::UnexpectedEof => {
                return Err(io("reading a step from")(e));
            }
            Err(e) => {
                return Err(DistError::Protocol {
                    peer,
                    reason: format!("step: {e}"),
                });
            }
        };
        let job = match decode_command(&payload) {
            Ok(Command::Step(job)) => job,
            Ok(Command::Shutdown) => return Ok(()),
            Err(reason) => {
                return Err(DistError::Protocol {
                    peer,
                    reason: format!("step: {reason}"),
                });
            }
        };
        let answer = if matches!(job, Job::ResetGroup) {
            // Node 0 saw every rank refuse the last step alike: they are still in lockstep.
            if set.group.reset() {
                Answer::Done
            } else {
                Answer::Failed(
                    set.ranks()
                        .map(|rank| RankFailure {
                            rank,
                            kind: FailureKind::Error,
                            message: "its group cannot be reset".to_owned(),
                        })
                        .collect(),
                )
            }
        } else {
            let (outcomes, waited) = set.run(|_| job.share());
            answer_of(&outcomes, set.ranks().start, waited)
        };
        encode_answer(&answer)
            .and_then(|f| write_step_frame(&mut stream, &f))
            .map_err(io("answering a step to"))?;
    }
}
