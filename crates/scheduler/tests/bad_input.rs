//! Bad input at every public entry point of the scheduler: a typed error, never a panic, and
//! the state unchanged (compared through `Debug` of the scheduler and its block manager);
//! afterwards the correct call still works and the outputs stay exact.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Harness, bm_config, prompt};
use kv_block_manager::{BlockManager, SeqId};
use scheduler::spec::{
    Proposal, ProposeRequest, Proposer, SpecController, SpecControllerConfig, SpecError,
};
use scheduler::{
    FinishReason, Policy, RejectReason, Request, RequestId, Scheduler, SchedulerConfig,
    SchedulerError, SeqResult, Speculation,
};

fn config(budget: usize, max_seqs: usize) -> SchedulerConfig {
    let mut c = SchedulerConfig::new(128);
    c.max_num_batched_tokens = budget;
    c.max_num_seqs = max_seqs;
    c.vocab_size = Some(1000);
    c
}

fn req(id: u64, prompt_len: usize, max_tokens: usize) -> Request {
    let mut r = Request::new(RequestId(id), prompt(prompt_len, id as u32), max_tokens);
    r.ignore_eos = true;
    r
}

/// Everything observable about the scheduler's state (queues, stats, the block manager's
/// sequences and pool), plus the tokens of the given sequences.
fn state(s: &Scheduler, seqs: &[SeqId]) -> String {
    let tokens: Vec<Option<&[u32]>> = seqs.iter().map(|&q| s.seq_tokens(q)).collect();
    format!(
        "{s:?}\n{:?}\n{tokens:?}\n{}",
        s.block_manager(),
        s.num_requests()
    )
}

/// Checks every finished sample of `reqs` against the fake model's greedy reference.
fn check_outputs(h: &Harness, reqs: &[Request]) {
    for r in reqs {
        for sample in 0..r.n {
            let got = &h.outputs[&(r.id, sample)];
            assert_eq!(
                got,
                &h.reference(&r.prompt, sample, r.max_tokens),
                "{} sample {sample}",
                r.id
            );
            assert_eq!(h.finished[&(r.id, sample)], FinishReason::Length);
        }
    }
}

#[test]
fn invalid_configs_are_rejected() {
    let bm = || BlockManager::new(bm_config(16, 8)).unwrap();
    type Break = fn(&mut SchedulerConfig);
    let cases: [(&str, Break); 6] = [
        ("max_num_batched_tokens", |c| c.max_num_batched_tokens = 0),
        ("max_num_seqs", |c| c.max_num_seqs = 0),
        ("max_model_len", |c| c.max_model_len = 0),
        ("max_model_len", |c| c.max_model_len = 1),
        ("max_prefill_chunk", |c| c.max_prefill_chunk = Some(0)),
        ("policy", |c| c.policy = Policy::Priority { aging_steps: 0 }),
    ];
    for (field, break_it) in cases {
        let mut c = SchedulerConfig::new(64);
        break_it(&mut c);
        match Scheduler::new(c, bm()) {
            Err(SchedulerError::InvalidConfig { field: f, reason }) => {
                assert_eq!(f, field);
                assert!(!reason.is_empty());
                let msg = SchedulerError::InvalidConfig { field: f, reason }.to_string();
                assert!(msg.contains(field), "{msg}");
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    // The smallest valid values.
    let mut c = SchedulerConfig::new(2);
    c.max_num_batched_tokens = 1;
    c.max_num_seqs = 1;
    c.max_prefill_chunk = Some(1);
    c.policy = Policy::Priority { aging_steps: 1 };
    c.vocab_size = Some(0);
    assert!(Scheduler::new(c, bm()).is_ok());
}

#[test]
fn every_reject_reason_queues_nothing() {
    // 8 blocks of 8 tokens: a sequence fits if its KV (all tokens but the last) takes at most
    // 64 slots.
    let mut c = config(64, 4);
    c.max_model_len = 100;
    let mut h = Harness::new(c, bm_config(8, 8));
    h.add(req(1, 10, 5));
    h.step();
    let with = |f: fn(&mut Request)| {
        let mut r = req(2, 10, 5);
        f(&mut r);
        r
    };
    let cases = [
        (with(|r| r.prompt.clear()), RejectReason::EmptyPrompt),
        (with(|r| r.max_tokens = 0), RejectReason::ZeroMaxTokens),
        (with(|r| r.n = 0), RejectReason::BadN { n: 0, max: 4 }),
        (with(|r| r.n = 5), RejectReason::BadN { n: 5, max: 4 }),
        (
            with(|r| r.prompt[3] = 1000),
            RejectReason::TokenOutOfVocab {
                token: 1000,
                vocab_size: 1000,
            },
        ),
        (
            with(|r| r.prompt = vec![1; 100]),
            RejectReason::PromptTooLong {
                prompt_len: 100,
                max_model_len: 100,
            },
        ),
        (
            with(|r| r.prompt = vec![1; 130]),
            RejectReason::PromptTooLong {
                prompt_len: 130,
                max_model_len: 100,
            },
        ),
        (
            // 60 + 6 tokens: KV for 65 tokens needs 9 blocks.
            with(|r| {
                r.prompt = vec![1; 60];
                r.max_tokens = 6;
            }),
            RejectReason::NeverFits {
                blocks_needed: 9,
                pool_blocks: 8,
            },
        ),
        (
            with(|r| r.id = RequestId(1)),
            RejectReason::DuplicateRequest(RequestId(1)),
        ),
    ];
    let live = [SeqId(1)];
    for (i, (r, reason)) in cases.into_iter().enumerate() {
        let before = state(&h.sched, &live);
        let rejected = h.sched.stats().num_rejected;
        let id = r.id;
        let err = h.sched.add_request(r).unwrap_err();
        assert_eq!(
            err,
            SchedulerError::Rejected {
                request: id,
                reason: reason.clone()
            },
            "case {i}"
        );
        assert!(!err.to_string().is_empty());
        assert_eq!(h.sched.stats().num_rejected, rejected + 1);
        // Nothing queued: the same state but the rejection counter.
        let after = state(&h.sched, &live).replace(
            &format!("num_rejected: {}", rejected + 1),
            &format!("num_rejected: {rejected}"),
        );
        assert_eq!(after, before, "case {i} ({reason:?}) changed the state");
    }
    // At the limit: KV for exactly 64 tokens (60 + 5 - 1) fits, and a prompt one token shorter
    // than max_model_len is accepted (it ends by length at max_model_len).
    let fits = with(|r| {
        r.prompt = vec![2; 60];
        r.max_tokens = 5;
    });
    let mut long = req(3, 99, 1);
    long.prompt = vec![3; 99];
    let mut h2 = Harness::new(config(64, 4), bm_config(16, 8));
    h2.sched.add_request(long.clone()).unwrap();
    h2.run_to_end(10);
    assert_eq!(h2.finished[&(RequestId(3), 0)], FinishReason::Length);
    h.add(fits.clone());
    h.run_to_end(100);
    check_outputs(&h, &[req(1, 10, 5), fits]);
    h.assert_all_free();
}

#[test]
fn never_fits_counts_the_watermark_and_the_window() {
    // 10 blocks of 8 with a 10% watermark: 9 usable.
    let mut bm = bm_config(10, 8);
    bm.watermark = 0.1;
    let mut h = Harness::new(config(64, 4), bm.clone());
    h.sched.add_request(req(0, 40, 33)).unwrap(); // 72 KV tokens = 9 blocks
    assert_eq!(
        h.sched.add_request(req(1, 40, 34)).unwrap_err(),
        SchedulerError::Rejected {
            request: RequestId(1),
            reason: RejectReason::NeverFits {
                blocks_needed: 10,
                pool_blocks: 9
            }
        }
    );
    h.run_to_end(100);
    check_outputs(&h, &[req(0, 40, 33)]);
    // With a window of 16 a sequence holds at most 3 blocks, whatever its length.
    bm.sliding_window = Some(16);
    let mut h = Harness::new(config(64, 4), bm);
    let long = req(2, 100, 27);
    h.add(long.clone());
    h.run_to_end(200);
    check_outputs(&h, &[long]);
    h.assert_all_free();
}

/// Proposes `k` copies of token 7 for every sequence.
#[derive(Debug)]
struct Sevens;

impl Proposer for Sevens {
    fn propose(
        &mut self,
        requests: &[ProposeRequest<'_>],
        out: &mut Vec<Proposal>,
    ) -> Result<(), SpecError> {
        out.clear();
        out.extend(requests.iter().map(|r| Proposal {
            tokens: vec![7; r.k],
            draft_probs: None,
        }));
        Ok(())
    }

    fn release(&mut self, _seq: SeqId) {}
}

fn speculation(proposer: Box<dyn Proposer>) -> Speculation {
    let controller = SpecController::new(SpecControllerConfig {
        max_k: 2,
        min_acceptance: 0.01,
        ..Default::default()
    })
    .unwrap();
    Speculation::new(proposer, controller)
}

#[test]
fn bad_results_leave_the_step_in_flight_and_the_state_unchanged() {
    let mut c = config(64, 8);
    c.max_prefill_chunk = Some(4);
    let mut h = Harness::new(c, bm_config(32, 8));
    h.sched.set_speculation(Some(speculation(Box::new(Sevens))));
    // Updating before any step.
    assert!(matches!(
        h.sched.update(&[]),
        Err(SchedulerError::StepOrder(_))
    ));
    let mut reqs = vec![req(0, 3, 10), req(1, 10, 4)];
    h.add(reqs[0].clone());
    h.add(reqs[1].clone());
    h.step();
    let mut pair = req(2, 3, 4);
    pair.n = 2;
    h.add(pair.clone());
    reqs.push(pair);

    // The step under test: r0 decodes with 2 drafts, r1 computes a prompt chunk that samples
    // nothing, r2 completes its prompt and samples its 2 samples.
    let (out, histories) = h.plan();
    assert_eq!(
        h.trace[1],
        "2: r0/0 decode 3..6+2draft | r1/0 prefill 4..8 | r2/0 prefill 0..3"
    );
    let [decode, chunk, pair] = [0, 1, 2].map(|i| out.seqs[i].seq);
    assert_eq!(out.seqs[2].num_samples, 2);
    h.kv.run(&out, &histories);
    let good = h.model_results(&out, &histories);
    let seqs: Vec<SeqId> = out.seqs.iter().map(|s| s.seq).collect();
    let before = state(&h.sched, &seqs);
    let plan = format!("{:?}", h.sched.schedule(h.now).unwrap_err());
    assert!(plan.contains("StepOrder"), "{plan}");

    let with = |seq: SeqId, tokens: Vec<u32>| -> Vec<SeqResult> {
        good.iter()
            .map(|r| {
                if r.seq == seq {
                    SeqResult {
                        seq,
                        tokens: tokens.clone(),
                    }
                } else {
                    r.clone()
                }
            })
            .collect()
    };
    let mut unknown = good.clone();
    unknown.push(SeqResult {
        seq: SeqId(999),
        tokens: vec![1],
    });
    let mut duplicate = good.clone();
    duplicate.push(good[0].clone());
    let missing = good[1..].to_vec();
    let wrong_draft = if good[0].tokens[0] == 8 { 9 } else { 8 };
    let cases: Vec<(&str, Vec<SeqResult>, SchedulerError)> = vec![
        (
            "unknown sequence",
            unknown,
            SchedulerError::NotScheduled(SeqId(999)),
        ),
        ("duplicate entry", duplicate, bad(decode)),
        ("missing entry", missing, bad(decode)),
        (
            "tokens for a chunk that samples none",
            with(chunk, vec![5]),
            bad(chunk),
        ),
        ("one token for two samples", with(pair, vec![5]), bad(pair)),
        (
            "three tokens for two samples",
            with(pair, vec![5, 6, 7]),
            bad(pair),
        ),
        ("no token for a decode", with(decode, vec![]), bad(decode)),
        (
            "accepted tokens that differ from the drafts",
            with(decode, vec![wrong_draft, 5]),
            bad(decode),
        ),
        (
            "more tokens than drafts + 1",
            with(decode, vec![7, 7, 5, 5]),
            bad(decode),
        ),
        ("empty results", vec![], bad(decode)),
    ];
    for (what, results, want) in cases {
        let err = h.sched.update(&results).unwrap_err();
        match (&err, &want) {
            (
                SchedulerError::BadResult { seq, reason },
                SchedulerError::BadResult { seq: want_seq, .. },
            ) => {
                assert_eq!(seq, want_seq, "{what}: {reason}");
                assert!(!reason.is_empty());
            }
            _ => assert_eq!(err, want, "{what}"),
        }
        assert_eq!(state(&h.sched, &seqs), before, "{what} changed the state");
        // Still in flight.
        assert!(matches!(
            h.sched.schedule(h.now),
            Err(SchedulerError::StepOrder(_))
        ));
    }
    // The correct results still work, in any order, and everything ends exactly.
    let mut reversed = good.clone();
    reversed.reverse();
    let samples = h.sched.update(&reversed).unwrap();
    h.record(&samples);
    assert!(matches!(
        h.sched.update(&good),
        Err(SchedulerError::StepOrder(_))
    ));
    h.run_to_end(100);
    check_outputs(&h, &reqs);
    h.assert_all_free();
}

fn bad(seq: SeqId) -> SchedulerError {
    SchedulerError::BadResult {
        seq,
        reason: String::new(),
    }
}

#[test]
fn abort_and_finish_of_unknown_ids_change_nothing() {
    let mut h = Harness::new(config(64, 4), bm_config(16, 8));
    let r = req(0, 5, 3);
    h.add(r.clone());
    h.step();
    let before = state(&h.sched, &[SeqId(1)]);
    assert_eq!(
        h.sched.abort(RequestId(42)).unwrap_err(),
        SchedulerError::UnknownRequest(RequestId(42))
    );
    assert_eq!(
        h.sched
            .finish(SeqId(42), FinishReason::StopString)
            .unwrap_err(),
        SchedulerError::NotScheduled(SeqId(42))
    );
    assert!(matches!(
        h.sched.fail_step(),
        Err(SchedulerError::StepOrder(_))
    ));
    assert_eq!(state(&h.sched, &[SeqId(1)]), before);
    h.run_to_end(10);
    check_outputs(&h, &[r]);
    // Ids of finished requests and sequences are unknown too.
    assert_eq!(
        h.sched.abort(RequestId(0)).unwrap_err(),
        SchedulerError::UnknownRequest(RequestId(0))
    );
    assert_eq!(
        h.sched
            .finish(SeqId(1), FinishReason::StopString)
            .unwrap_err(),
        SchedulerError::NotScheduled(SeqId(1))
    );
    h.assert_all_free();
}

#[test]
fn finish_with_a_stop_string_frees_the_sample() {
    let mut h = Harness::new(config(64, 4), bm_config(16, 8));
    let r = req(0, 5, 10);
    h.add(r.clone());
    h.step();
    h.step();
    let f = h.sched.finish(SeqId(1), FinishReason::StopString).unwrap();
    assert_eq!(
        (f.request, f.sample, f.reason),
        (r.id, 0, FinishReason::StopString)
    );
    assert!(!h.sched.has_unfinished());
    assert_eq!(h.outputs[&(r.id, 0)], h.reference(&r.prompt, 0, 2));
    h.assert_all_free();
}

#[test]
fn fail_step_ends_the_requests_in_it_and_nothing_else() {
    // Budget 3: r0's three samples and r1 cannot all decode in one step.
    let mut h = Harness::new(config(3, 8), bm_config(32, 8));
    let mut r0 = req(0, 5, 8);
    r0.n = 3;
    let r1 = req(1, 2, 8);
    h.add(r0.clone());
    h.step(); // r0's prompt, forked into 3 samples
    h.add(r1.clone());
    h.step();
    h.step();
    let (out, _histories) = h.plan();
    let in_step: Vec<String> = out
        .seqs
        .iter()
        .map(|s| format!("{}/{}", s.request, s.sample))
        .collect();
    // r0's three samples fill the budget; r1, running, is not in the step.
    assert_eq!(in_step, ["r0/0", "r0/1", "r0/2"], "{:?}", h.trace);
    assert!(h.sched.stats().num_running >= 4);
    // The copies ran, the forward pass failed.
    h.kv.copy_blocks(&out);
    let mut failed = h.sched.fail_step().unwrap();
    failed.sort_by_key(|f| f.sample);
    assert_eq!(failed.len(), 3);
    for (i, f) in failed.iter().enumerate() {
        assert_eq!(
            (f.request, f.sample, f.reason),
            (r0.id, i, FinishReason::Error)
        );
    }
    h.record_finished(&failed);
    assert_eq!(h.sched.num_requests(), 1);
    // Only r1's blocks are left; the next step is not blocked.
    let st = h.sched.block_manager().stats();
    assert_eq!(st.num_sequences, 1, "{st:?}");
    assert!(matches!(
        h.sched.fail_step(),
        Err(SchedulerError::StepOrder(_))
    ));
    h.run_to_end(50);
    check_outputs(&h, &[r1]);
    h.assert_all_free();
}

#[test]
fn fail_step_with_a_waiting_sample_fails_the_whole_request() {
    // Budget 2: r0's third sample waits while its first two are in the failed step.
    let mut h = Harness::new(config(2, 8), bm_config(32, 8));
    let mut r0 = req(0, 2, 8);
    r0.n = 3;
    let r1 = req(1, 4, 3);
    h.add(r0.clone());
    h.step();
    let (out, _) = h.plan();
    assert_eq!(h.trace[1], "2: r0/0 decode 2..3 | r0/1 decode 2..3 | cow 2");
    h.add(r1.clone());
    h.kv.copy_blocks(&out);
    let failed = h.sched.fail_step().unwrap();
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(failed.iter().all(|f| f.reason == FinishReason::Error));
    h.run_to_end(50);
    check_outputs(&h, &[r1]);
    h.assert_all_free();
}

#[test]
fn abort_in_flight_ignores_the_result() {
    let mut h = Harness::new(config(64, 8), bm_config(32, 8));
    let a = req(0, 6, 6);
    let b = req(1, 9, 6);
    let mut c = req(2, 4, 6);
    c.n = 2;
    for r in [&a, &b, &c] {
        h.add(r.clone());
    }
    h.step();
    h.step();
    let (out, histories) = h.plan();
    h.kv.run(&out, &histories);
    let results = h.model_results(&out, &histories);
    // Abort a while its step is in flight; end one sample of c with a stop string.
    let aborted = h.sched.abort(a.id).unwrap();
    assert_eq!(aborted.len(), 1);
    assert_eq!(aborted[0].reason, FinishReason::Aborted);
    h.record_finished(&aborted);
    let c1 = out
        .seqs
        .iter()
        .find(|s| s.request == c.id && s.sample == 1)
        .unwrap()
        .seq;
    let stopped = h.sched.finish(c1, FinishReason::StopString).unwrap();
    h.record_finished(&[stopped]);
    // Their results are ignored, whether given or not.
    let samples = h.sched.update(&results).unwrap();
    assert!(
        samples.iter().all(|s| s.request != a.id && s.seq != c1),
        "{samples:?}"
    );
    h.record(&samples);
    h.run_to_end(50);
    check_outputs(&h, std::slice::from_ref(&b));
    // Two tokens before the aborted step; the third is dropped.
    assert_eq!(h.outputs[&(a.id, 0)], h.reference(&a.prompt, 0, 2));
    assert_eq!(h.outputs[&(c.id, 0)], h.reference(&c.prompt, 0, 6));
    assert_eq!(h.finished[&(c.id, 1)], FinishReason::StopString);
    h.assert_all_free();

    // The same with the aborted sequence's result left out.
    let mut h = Harness::new(config(64, 8), bm_config(32, 8));
    h.add(a.clone());
    h.add(b.clone());
    h.step();
    let (out, histories) = h.plan();
    h.kv.run(&out, &histories);
    let results = h.model_results(&out, &histories);
    h.sched.abort(a.id).unwrap();
    let without_a: Vec<SeqResult> = results
        .into_iter()
        .filter(|r| r.seq != out.seqs[0].seq)
        .collect();
    let samples = h.sched.update(&without_a).unwrap();
    h.record(&samples);
    h.run_to_end(50);
    check_outputs(&h, &[b]);
    h.assert_all_free();
}

/// A proposer that fails on demand.
#[derive(Debug)]
struct Flaky {
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proposer for Flaky {
    fn propose(
        &mut self,
        requests: &[ProposeRequest<'_>],
        out: &mut Vec<Proposal>,
    ) -> Result<(), SpecError> {
        out.clear();
        if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(SpecError::InvalidRequest {
                seq: requests[0].seq,
                field: "tokens",
                reason: "injected failure".into(),
            });
        }
        out.extend(requests.iter().map(|_| Proposal::default()));
        Ok(())
    }

    fn release(&mut self, _seq: SeqId) {}
}

/// Regression: `schedule` expired deadlines before asking the proposer; when the proposer
/// failed, the step was dropped with the deadline finishes in it, and the caller never learned
/// that those requests had ended. Fixed: drafts are proposed before anything changes.
#[test]
fn a_failing_proposer_loses_no_deadline() {
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut h = Harness::new(config(64, 8), bm_config(32, 8));
    h.sched
        .set_speculation(Some(speculation(Box::new(Flaky { fail: fail.clone() }))));
    let mut a = req(0, 5, 20);
    a.deadline = Some(h.now + Duration::from_secs(1));
    let b = req(1, 5, 20);
    h.add(a.clone());
    h.add(b.clone());
    h.step();
    h.step();
    fail.store(true, std::sync::atomic::Ordering::Relaxed);
    h.now += Duration::from_secs(2);
    let before = state(&h.sched, &[SeqId(1), SeqId(2)]);
    let err = h.sched.schedule(h.now).unwrap_err();
    assert!(matches!(err, SchedulerError::Proposer(_)), "{err:?}");
    // Nothing changed but the step counter.
    let after = state(&h.sched, &[SeqId(1), SeqId(2)]);
    assert_eq!(after.replace("steps: 3", "steps: 2"), before);
    fail.store(false, std::sync::atomic::Ordering::Relaxed);
    h.step();
    assert_eq!(h.finished[&(a.id, 0)], FinishReason::Deadline);
    h.run_to_end(50);
    check_outputs(&h, &[b]);
    h.assert_all_free();
}

/// Regression: a request with a temperature the proposer refuses (NaN, negative, infinite)
/// made every `schedule` fail with a proposer error once it decoded, for every request. Fixed:
/// such a sequence is decoded without drafts.
#[test]
fn a_bad_temperature_does_not_stall_speculation() {
    let ngram =
        scheduler::spec::NgramProposer::new(scheduler::spec::NgramConfig { min_n: 1, max_n: 3 })
            .unwrap();
    let mut h = Harness::new(config(64, 8), bm_config(32, 8));
    h.sched.set_speculation(Some(speculation(Box::new(ngram))));
    let mut reqs = Vec::new();
    for (i, t) in [f32::NAN, -1.0, f32::INFINITY, 0.0].into_iter().enumerate() {
        let mut r = req(i as u64, 6, 12);
        r.temperature = t;
        h.add(r.clone());
        reqs.push(r);
    }
    h.run_to_end(100);
    check_outputs(&h, &reqs);
    h.assert_all_free();
}

#[test]
fn deadlines_in_the_past_end_requests_before_they_run() {
    let mut h = Harness::new(config(64, 8), bm_config(32, 8));
    let mut a = req(0, 5, 4);
    a.n = 2;
    a.deadline = Some(h.now - Duration::from_millis(1));
    let b = req(1, 5, 4);
    h.add(a.clone());
    h.add(b.clone());
    let out = h.sched.schedule(h.now).unwrap().clone();
    assert_eq!(out.finished.len(), 1, "{:?}", out.finished);
    assert_eq!(out.finished[0].reason, FinishReason::Deadline);
    assert_eq!(out.seqs.len(), 1);
    h.record_finished(&out.finished);
    // Finish the step by hand (the harness's step() schedules itself).
    h.kv.run(&out, std::slice::from_ref(&b.prompt));
    let results = vec![SeqResult {
        seq: out.seqs[0].seq,
        tokens: vec![common::next_token(&b.prompt, 0, h.vocab)],
    }];
    let samples = h.sched.update(&results).unwrap();
    h.record(&samples);
    h.run_to_end(20);
    check_outputs(&h, &[b]);
    h.assert_all_free();
}
