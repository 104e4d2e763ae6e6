//! Named scenarios with their step traces, and the outputs checked against the fake model's
//! plain greedy decoding.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Harness, bm_config, prompt};
use scheduler::{FinishReason, PreemptionMode, Request, RequestId, SchedulerConfig};

fn config(budget: usize, max_seqs: usize) -> SchedulerConfig {
    let mut c = SchedulerConfig::new(4096);
    c.max_num_batched_tokens = budget;
    c.max_num_seqs = max_seqs;
    c
}

fn req(id: u64, prompt_len: usize, max_tokens: usize) -> Request {
    let mut r = Request::new(RequestId(id), prompt(prompt_len, id as u32), max_tokens);
    r.ignore_eos = true;
    r
}

/// Compares a scenario's step trace with `tests/golden/<name>.trace` (rewritten when
/// `KVSERVE_BLESS=1`).
fn check_trace(name: &str, h: &Harness) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.trace"));
    let got = h.trace.join("\n") + "\n";
    if std::env::var_os("KVSERVE_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with KVSERVE_BLESS=1 to create it)",
            path.display()
        )
    });
    assert_eq!(
        got, want,
        "step trace of {name} changed (KVSERVE_BLESS=1 to accept)"
    );
}

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
    h.assert_all_free();
}

#[test]
fn chunked_prefill_then_decode_first() {
    let mut h = Harness::new(config(8, 4), bm_config(64, 8));
    let reqs = [req(0, 20, 3), req(1, 5, 2)];
    for r in &reqs {
        h.add(r.clone());
    }
    h.run_to_end(20);
    assert_eq!(
        h.trace,
        [
            "1: r0/0 prefill 0..8",
            "2: r0/0 prefill 8..16",
            // The rest of r0's prompt, then r1 gets the remaining budget.
            "3: r0/0 prefill 16..20 | r1/0 prefill 0..4",
            // Decodes first: r0 decodes, r1 finishes its prompt.
            "4: r0/0 decode 20..21 | r1/0 prefill 4..5",
            "5: r0/0 decode 21..22 | r1/0 decode 5..6",
        ]
    );
    check_outputs(&h, &reqs);
}

#[test]
fn prefix_hit_counts_as_computed() {
    let mut h = Harness::new(config(64, 4), bm_config(64, 8));
    let a = req(0, 20, 2);
    let mut b = req(1, 20, 2);
    b.prompt = a.prompt.clone();
    h.add(a.clone());
    h.run_to_end(10);
    h.add(b.clone());
    h.run_to_end(10);
    // The second request computes only from the first uncached block on (16 = 2 full blocks).
    assert_eq!(h.trace[2], "3: r1/0 prefill 16..20");
    check_trace("prefix_hit", &h);
    check_outputs(&h, &[a, b]);
}

#[test]
fn preemption_by_recompute_keeps_outputs_exact() {
    // 6 blocks of 8 slots: three sequences growing to 30 tokens (4 blocks each) cannot all fit.
    let mut h = Harness::new(config(64, 8), bm_config(6, 8));
    let reqs: Vec<Request> = (0..3).map(|i| req(i, 10, 20)).collect();
    for r in &reqs {
        h.add(r.clone());
    }
    h.run_to_end(200);
    assert!(h.sched.stats().num_preemptions > 0, "{:?}", h.trace);
    assert!(h.trace.iter().any(|l| l.contains("preempt")));
    check_trace("preempt_recompute", &h);
    check_outputs(&h, &reqs);
}

#[test]
fn preemption_by_swap_keeps_outputs_exact() {
    let mut bm = bm_config(6, 8);
    bm.num_cpu_blocks = 32;
    let mut c = config(64, 8);
    c.preemption_mode = PreemptionMode::Swap;
    let mut h = Harness::new(c, bm);
    let reqs: Vec<Request> = (0..3).map(|i| req(i, 10, 20)).collect();
    for r in &reqs {
        h.add(r.clone());
    }
    h.run_to_end(200);
    assert!(
        h.trace.iter().any(|l| l.contains("swap_out")),
        "{:?}",
        h.trace
    );
    assert!(
        h.trace.iter().any(|l| l.contains("swap_in")),
        "{:?}",
        h.trace
    );
    check_trace("preempt_swap", &h);
    check_outputs(&h, &reqs);
}

#[test]
fn parallel_samples_fork_the_prompt() {
    let mut h = Harness::new(config(64, 8), bm_config(32, 8));
    let mut r = req(0, 10, 5);
    r.n = 3;
    h.add(r.clone());
    h.step();
    assert_eq!(h.trace[0], "1: r0/0 prefill 0..10");
    // The prompt's blocks are shared: 2 blocks for 10 tokens, not 6.
    assert_eq!(h.sched.block_manager().stats().used_blocks, 2);
    h.step();
    // Three samples decode; the shared half-full last block is copied for two of them.
    assert_eq!(
        h.trace[1],
        "2: r0/0 decode 10..11 | r0/1 decode 10..11 | r0/2 decode 10..11 | cow 2"
    );
    h.run_to_end(20);
    check_trace("parallel_samples", &h);
    check_outputs(&h, &[r]);
}

/// A proposer that drafts the fake model's own tokens, except that every third draft is
/// wrong: accepts and rejects in a known pattern.
#[derive(Debug)]
struct Oracle {
    vocab: u32,
}

impl scheduler::spec::Proposer for Oracle {
    fn propose(
        &mut self,
        requests: &[scheduler::spec::ProposeRequest<'_>],
        out: &mut Vec<scheduler::spec::Proposal>,
    ) -> Result<(), scheduler::spec::SpecError> {
        out.clear();
        for r in requests {
            let mut h = r.tokens.to_vec();
            let mut tokens = Vec::new();
            for _ in 0..r.k {
                let mut t = common::next_token(&h, 0, self.vocab);
                if h.len() % 3 == 0 {
                    t = t % (self.vocab - 1) + 1;
                    if t == common::next_token(&h, 0, self.vocab) {
                        t = t % (self.vocab - 1) + 1;
                    }
                }
                h.push(t);
                tokens.push(t);
            }
            out.push(scheduler::spec::Proposal {
                tokens,
                draft_probs: None,
            });
        }
        Ok(())
    }

    fn release(&mut self, _seq: scheduler::SeqId) {}
}

fn speculation(proposer: Box<dyn scheduler::spec::Proposer>) -> scheduler::Speculation {
    let controller = scheduler::spec::SpecController::new(scheduler::spec::SpecControllerConfig {
        max_k: 3,
        min_acceptance: 0.01,
        ..Default::default()
    })
    .unwrap();
    scheduler::Speculation::new(proposer, controller)
}

#[test]
fn speculative_accept_and_reject_keep_outputs_exact() {
    let mut h = Harness::new(config(64, 4), bm_config(64, 8));
    h.sched
        .set_speculation(Some(speculation(Box::new(Oracle { vocab: h.vocab }))));
    let reqs = [req(0, 10, 12), req(1, 7, 9)];
    for r in &reqs {
        h.add(r.clone());
    }
    h.run_to_end(40);
    let st = h.sched.stats();
    assert!(
        st.spec_accepted > 0 && st.spec_accepted < st.spec_proposed,
        "{st:?}"
    );
    // Fewer steps than tokens: accepted drafts skip steps.
    assert!(h.trace.len() < 12, "{:#?}", h.trace);
    check_trace("speculative", &h);
    check_outputs(&h, &reqs);
}

#[test]
fn ngram_speculation_equals_plain_decoding() {
    let ngram =
        scheduler::spec::NgramProposer::new(scheduler::spec::NgramConfig { min_n: 1, max_n: 3 })
            .unwrap();
    let mut h = Harness::new(config(64, 8), bm_config(64, 8));
    h.vocab = 7; // a small vocabulary repeats, so n-gram lookups hit
    h.sched.set_speculation(Some(speculation(Box::new(ngram))));
    let reqs: Vec<Request> = (0..4)
        .map(|i| {
            let mut r = req(i, 12, 40);
            r.prompt = r.prompt.iter().map(|t| t % 6 + 1).collect();
            r
        })
        .collect();
    for r in &reqs {
        h.add(r.clone());
    }
    h.run_to_end(200);
    assert!(h.sched.stats().spec_accepted > 0, "{:?}", h.sched.stats());
    check_outputs(&h, &reqs);
}

#[test]
fn decodes_go_before_prompt_chunks_of_better_ranked_requests() {
    let mut c = config(8, 4);
    c.policy = scheduler::Policy::Priority { aging_steps: 1000 };
    let mut h = Harness::new(c, bm_config(64, 8));
    let low = {
        let mut r = req(0, 4, 6);
        r.priority = 5;
        r
    };
    h.add(low.clone());
    h.step();
    h.step();
    // A better-ranked request arrives with a long prompt: the low one's decode still comes
    // first in the batch and in the budget, the prompt gets the rest.
    let mut high = req(1, 30, 2);
    high.priority = -5;
    h.add(high.clone());
    h.step();
    assert_eq!(h.trace[2], "3: r0/0 decode 5..6 | r1/0 prefill 0..7");
    h.run_to_end(40);
    check_outputs(&h, &[low, high]);
}
