//! `TensorParallelBackend` over `ThreadGroup` and sharded CPU backends of a tiny dummy Llama:
//! the same logits as one rank, failures that end in errors (never a hang), construction
//! errors, a bad batch that leaves the group usable, and ranks stuck for good (as NCCL ranks
//! are when a peer fails before a collective) that end the step after a grace period.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dist::{DistError, GroupAbort, TensorParallelBackend, ThreadGroup};
use kv_block_manager::{BlockId, CopyOp};
use model::{Backend, CpuBackend, HostCollective, ModelError, Shard};

use common::{Fault, VOCAB, cache, faulty, prompt, weights};

/// One rank of the tiny model per fault, rank `r` getting `faults[r]`.
fn spawn(faults: &[Fault]) -> Result<TensorParallelBackend, DistError> {
    let members = ThreadGroup::new(faults.len())?;
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let faults = faults.to_vec();
    TensorParallelBackend::spawn(faults.len(), group, move |rank| {
        faulty(&members[rank], faults[rank])
    })
}

#[test]
fn two_ranks_give_the_logits_of_one() {
    let mut one = CpuBackend::new(weights(Shard::FULL), cache()).unwrap();
    let mut want = Vec::new();
    one.forward(&prompt().batch(), &mut want).unwrap();
    let mut tp = spawn(&[Fault::None; 2]).unwrap();
    assert_eq!(tp.world_size(), 2);
    assert_eq!(tp.kv_cache_config(), cache());
    assert_eq!(tp.config().vocab_size, VOCAB);
    assert!(tp.device().contains("x 2"), "{}", tp.device());
    let mut got = Vec::new();
    for _ in 0..2 {
        tp.forward(&prompt().batch(), &mut got).unwrap();
        assert_eq!(got.len(), VOCAB);
        let diff = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-3, "max |logit difference| {diff}");
    }
    // Block copies reach every rank (nothing to compare, but they must succeed).
    let op = CopyOp {
        src: BlockId(0),
        dst: BlockId(1),
    };
    tp.copy_blocks(&[op]).unwrap();
    tp.swap_out(&[op]).unwrap();
    tp.swap_in(&[CopyOp {
        src: BlockId(1),
        dst: BlockId(2),
    }])
    .unwrap();
}

#[test]
fn a_bad_batch_fails_the_step_alike_and_the_group_goes_on() {
    let mut tp = spawn(&[Fault::None; 2]).unwrap();
    let mut bad = prompt();
    bad.tokens[0] = VOCAB as u32; // outside the vocabulary: every rank refuses it
    let mut logits = Vec::new();
    let err = tp.forward(&bad.batch(), &mut logits).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InvalidBatch {
                field: "token_ids",
                ..
            }
        ),
        "{err}"
    );
    assert!(tp.dead_reason().is_none());
    tp.forward(&prompt().batch(), &mut logits).unwrap();
    assert_eq!(logits.len(), VOCAB);
}

/// Runs one good step on `tp`, then one that must kill it with an error containing every
/// one of `words`; checks that later calls fail at once and that dropping it returns.
fn assert_dies_with(mut tp: TensorParallelBackend, words: &[&str]) -> String {
    let mut logits = Vec::new();
    tp.forward(&prompt().batch(), &mut logits).unwrap();
    let err = tp.forward(&prompt().batch(), &mut logits).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ModelError::Unrecoverable(_)), "{message}");
    for word in words {
        assert!(message.contains(word), "no {word:?} in {message}");
    }
    // Every later call fails at once with the same reason.
    for _ in 0..2 {
        let again = tp.forward(&prompt().batch(), &mut logits).unwrap_err();
        assert_eq!(again.to_string(), message);
    }
    let copy = tp
        .copy_blocks(&[CopyOp {
            src: BlockId(0),
            dst: BlockId(1),
        }])
        .unwrap_err();
    assert!(matches!(copy, ModelError::Unrecoverable(_)), "{copy}");
    assert_eq!(
        tp.dead_reason().map(str::to_owned),
        Some(message.replace("the backend cannot run any more: ", ""))
    );
    drop(tp); // joins every rank thread that is not stuck
    message
}

/// Rank 1 of 2 gets `fault`; its peer, released by the group's abort, answers at once.
fn assert_dies(fault: Fault, words: &str) {
    let tp = spawn(&[Fault::None, fault]).unwrap_or_else(|e| panic!("{e}"));
    let message = assert_dies_with(tp, &["rank 1", words]);
    assert!(!message.contains("did not answer"), "{message}");
}

#[test]
fn a_failing_rank_kills_the_group_with_an_error_not_a_hang() {
    assert_dies(Fault::Fail(2), "injected failure");
}

#[test]
fn a_panicking_rank_kills_the_group_with_an_error_not_a_hang() {
    assert_dies(Fault::Panic(2), "injected panic");
}

/// Rank `stuck` blocks for good on the second step while the other rank gets `fault`: the
/// step ends once the grace has passed, naming both ranks.
fn assert_dies_past_a_stuck_rank(stuck: usize, fault: Fault, words: &str) {
    let mut faults = [fault; 2];
    faults[stuck] = Fault::Block(2);
    let failed = 1 - stuck;
    let mut tp = spawn(&faults).unwrap();
    tp.set_failure_grace(Duration::from_millis(200)).unwrap();
    assert_dies_with(
        tp,
        &[
            &format!("rank {failed} "),
            words,
            &format!("rank {stuck} did not answer within 200ms of the failure"),
            "stuck in a collective?",
        ],
    );
}

#[test]
fn a_failing_rank_next_to_a_stuck_one_kills_the_group_after_the_grace() {
    assert_dies_past_a_stuck_rank(0, Fault::Fail(2), "injected failure");
    assert_dies_past_a_stuck_rank(1, Fault::Fail(2), "injected failure");
}

#[test]
fn a_panicking_rank_next_to_a_stuck_one_kills_the_group_after_the_grace() {
    assert_dies_past_a_stuck_rank(0, Fault::Panic(2), "injected panic");
    assert_dies_past_a_stuck_rank(1, Fault::Panic(2), "injected panic");
}

#[test]
fn ranks_that_hang_without_failing_kill_the_group_at_the_step_timeout() {
    let mut tp = spawn(&[Fault::Block(2); 2]).unwrap();
    tp.set_step_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert_dies_with(
        tp,
        &["ranks 0, 1 did not answer within the step timeout of 200ms"],
    );
}

#[test]
fn the_grace_and_the_step_timeout_must_be_above_zero() {
    let mut tp = spawn(&[Fault::None; 2]).unwrap();
    assert!(matches!(
        tp.set_failure_grace(Duration::ZERO),
        Err(DistError::Config {
            field: "failure_grace",
            ..
        })
    ));
    assert!(matches!(
        tp.set_step_timeout(Some(Duration::ZERO)),
        Err(DistError::Config {
            field: "step_timeout",
            ..
        })
    ));
    tp.set_step_timeout(None).unwrap();
    tp.set_step_timeout(Some(Duration::from_secs(60))).unwrap();
    tp.set_failure_grace(Duration::from_secs(1)).unwrap();
    // Settings that do not end a healthy step.
    let mut logits = Vec::new();
    tp.forward(&prompt().batch(), &mut logits).unwrap();
    assert_eq!(logits.len(), VOCAB);
}

#[test]
fn construction_errors_name_the_rank() {
    assert!(matches!(
        spawn(&[]),
        Err(DistError::Config {
            field: "tensor_parallel_size",
            ..
        })
    ));
    // Rank 1 fails to build; rank 0, waiting in the handshake, is released.
    let members = ThreadGroup::new(2).unwrap();
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let built = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&built);
    let result = TensorParallelBackend::spawn(2, group, move |rank| {
        if rank == 1 {
            return Err(ModelError::Unsupported("no weights for rank 1".into()));
        }
        let member = members[rank].clone();
        let b = CpuBackend::new_sharded(weights(member.shard()), cache(), Arc::new(member));
        counter.fetch_add(1, Ordering::Relaxed);
        b
    });
    match result {
        Err(DistError::Rank { rank: 1, message }) => {
            assert!(message.contains("no weights for rank 1"), "{message}");
        }
        other => panic!("expected rank 1's error, got {other:?}"),
    }
    assert_eq!(built.load(Ordering::Relaxed), 1);
    // A build that panics is an error too.
    let members = ThreadGroup::new(2).unwrap();
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let result = TensorParallelBackend::spawn(2, group, move |rank| {
        assert!(rank == 0, "rank {rank} cannot start");
        let member = members[rank].clone();
        CpuBackend::new_sharded(weights(member.shard()), cache(), Arc::new(member))
    });
    match result {
        Err(DistError::Rank { rank: 1, message }) => {
            assert!(message.contains("rank 1 cannot start"), "{message}");
        }
        other => panic!("expected rank 1's panic, got {other:?}"),
    }
}
