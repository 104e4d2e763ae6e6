//! Adaptive speculation: how many tokens to propose for each sequence, each step.
//!
//! Speculation trades compute for latency: the target verifies `k + 1` positions per sequence
//! instead of one. While the batch is small the target forward is memory-bound and the extra
//! positions are nearly free; in a large batch it is compute-bound, and rejected drafts are
//! pure waste (vLLM and SGLang slow down by 1.4–1.8× at high load without adapting). So the
//! controller shrinks `k` as the batch grows, turns speculation off past a batch size, and
//! proposes only as far as drafts are likely to be accepted.

use kv_block_manager::SeqId;
use rustc_hash::FxHashMap;

use super::SpecError;

/// Largest `max_k` a [`SpecController`] accepts.
pub const MAX_K: usize = 64;

/// Settings of a [`SpecController`]. The batch thresholds depend on the hardware and model
/// (where the target forward turns compute-bound); the defaults suit a mid-size GPU model.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecControllerConfig {
    /// Most tokens proposed per sequence and step (1..=[`MAX_K`]).
    pub max_k: usize,
    /// Batches of at most this many running sequences get `max_k`; larger ones less.
    pub shrink_batch_size: usize,
    /// Batches larger than this do not speculate at all (≥ `shrink_batch_size`).
    pub disable_batch_size: usize,
    /// A draft position is proposed only while its estimated probability of being accepted is at
    /// least this, in (0, 1]; a sequence whose next draft falls below it stops speculating.
    pub min_acceptance: f64,
    /// Weight of the newest verification in the moving averages, in (0, 1].
    pub ewma_alpha: f64,
    /// A sequence that stopped speculating gets a one-token probe once this many steps (≥ 1)
    /// have passed since its last verification.
    pub probe_interval: u64,
    /// Acceptance rate assumed before any verification, in [0, 1]: the starting point of the
    /// global estimate, which is the prior of every new sequence.
    pub initial_acceptance: f64,
}

impl Default for SpecControllerConfig {
    /// `max_k` 4, shrinking above 16 running sequences and off above 64, `min_acceptance` 0.3,
    /// `ewma_alpha` 0.2, a probe every 16 steps, initial acceptance 0.7.
    fn default() -> Self {
        Self {
            max_k: 4,
            shrink_batch_size: 16,
            disable_batch_size: 64,
            min_acceptance: 0.3,
            ewma_alpha: 0.2,
            probe_interval: 16,
            initial_acceptance: 0.7,
        }
    }
}

/// Chooses `k` per sequence and step, from the batch size and the acceptance observed.
///
/// The policy, deterministic:
/// 1. **Batch size.** With `b` running sequences: `max_k` while `b ≤ shrink_batch_size`, 0 when
///    `b > disable_batch_size`, and in between `k_b = 1 + ⌊(max_k − 1)(disable − b) / (disable
///    − shrink)⌋`, falling linearly from `max_k` to 1.
/// 2. **Acceptance.** Each sequence keeps an estimate `a` of the probability that a draft is
///    accepted given the ones before it were (drafts are accepted as a prefix, so under a
///    constant per-token rate the number accepted is geometric): exponentially weighted sums of
///    accepted drafts `S` and of trials `T` (accepted drafts plus one if a draft was rejected),
///    `a = S / T`, which does not depend on the `k` that was used. Draft `j` is accepted with
///    probability about `a^j`, so `k_a` is the largest `j ≤ max_k` with `a^j ≥
///    min_acceptance`.
/// 3. **Probes.** `k_a = 0` turns the sequence's speculation off; once `probe_interval` steps
///    have passed since its last verification it gets `k_a = 1` for one step, whose result
///    moves the estimate, so a sequence whose text became predictable turns back on.
/// 4. `k = min(k_b, k_a)`.
///
/// A new sequence starts from the global estimate (the same averages over every verification
/// of every sequence, starting at `initial_acceptance`) with the weight of one trial.
///
/// The caller advances the clock with [`next_step`](Self::next_step) once per scheduler step,
/// asks [`k_for`](Self::k_for) for each decoding sequence, reports each verification with
/// [`record`](Self::record), and calls [`forget`](Self::forget) when a sequence ends.
#[derive(Debug, Clone)]
pub struct SpecController {
    config: SpecControllerConfig,
    step: u64,
    global: Estimate,
    seqs: FxHashMap<SeqId, SeqState>,
}

/// Exponentially weighted successes and trials.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Estimate {
    accepted: f64,
    trials: f64,
}

impl Estimate {
    fn rate(self) -> f64 {
        if self.trials > 0.0 {
            self.accepted / self.trials
        } else {
            0.0
        }
    }

    fn update(&mut self, alpha: f64, accepted: usize, trials: usize) {
        self.accepted = (1.0 - alpha) * self.accepted + alpha * accepted as f64;
        self.trials = (1.0 - alpha) * self.trials + alpha * trials as f64;
    }
}

#[derive(Debug, Clone, Copy)]
struct SeqState {
    estimate: Estimate,
    last_verified_step: u64,
}

impl SpecController {
    /// A controller with `config`, checked.
    pub fn new(config: SpecControllerConfig) -> Result<Self, SpecError> {
        let invalid = |field, reason: String| Err(SpecError::InvalidConfig { field, reason });
        if !(1..=MAX_K).contains(&config.max_k) {
            return invalid(
                "max_k",
                format!("is {}, must be in 1..={MAX_K}", config.max_k),
            );
        }
        if config.disable_batch_size < config.shrink_batch_size {
            return invalid(
                "disable_batch_size",
                format!(
                    "is {}, must be at least shrink_batch_size {}",
                    config.disable_batch_size, config.shrink_batch_size
                ),
            );
        }
        let in_unit =
            |v: f64, zero_ok: bool| v.is_finite() && v <= 1.0 && (v > 0.0 || (zero_ok && v == 0.0));
        if !in_unit(config.min_acceptance, false) {
            return invalid(
                "min_acceptance",
                format!("is {}, must be in (0, 1]", config.min_acceptance),
            );
        }
        if !in_unit(config.ewma_alpha, false) {
            return invalid(
                "ewma_alpha",
                format!("is {}, must be in (0, 1]", config.ewma_alpha),
            );
        }
        if config.probe_interval == 0 {
            return invalid("probe_interval", "must be at least 1".into());
        }
        if !in_unit(config.initial_acceptance, true) {
            return invalid(
                "initial_acceptance",
                format!("is {}, must be in [0, 1]", config.initial_acceptance),
            );
        }
        Ok(Self {
            global: Estimate {
                accepted: config.initial_acceptance,
                trials: 1.0,
            },
            config,
            step: 0,
            seqs: FxHashMap::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SpecControllerConfig {
        &self.config
    }

    /// Advances the step clock (once per scheduler step, before asking [`k_for`](Self::k_for)).
    pub fn next_step(&mut self) {
        self.step += 1;
    }

    /// How many tokens to propose for `seq` this step, with `running_batch_size` sequences
    /// running (0: decode it without speculation).
    pub fn k_for(&self, seq: SeqId, running_batch_size: usize) -> usize {
        let c = &self.config;
        let k_batch = if running_batch_size <= c.shrink_batch_size {
            c.max_k
        } else if running_batch_size > c.disable_batch_size {
            0
        } else {
            // shrink < b ≤ disable, so disable > shrink here.
            let span = c.disable_batch_size - c.shrink_batch_size;
            let left = c.disable_batch_size - running_batch_size;
            1 + (c.max_k - 1) * left / span
        };
        if k_batch == 0 {
            return 0;
        }
        let state = self.seqs.get(&seq);
        let rate = state.map_or(self.global.rate(), |s| s.estimate.rate());
        let mut k_accept = 0;
        let mut reach = 1.0;
        while k_accept < c.max_k {
            reach *= rate;
            if reach < c.min_acceptance {
                break;
            }
            k_accept += 1;
        }
        if k_accept == 0 {
            let since = state.map_or(u64::MAX, |s| self.step.saturating_sub(s.last_verified_step));
            if since >= c.probe_interval {
                k_accept = 1;
            }
        }
        k_batch.min(k_accept)
    }

    /// Records a verification of `seq`: `accepted` of `proposed` drafts were accepted. A call
    /// with nothing proposed changes nothing.
    pub fn record(
        &mut self,
        seq: SeqId,
        proposed: usize,
        accepted: usize,
    ) -> Result<(), SpecError> {
        if accepted > proposed {
            return Err(SpecError::InvalidRecord {
                seq,
                proposed,
                accepted,
            });
        }
        if proposed == 0 {
            return Ok(());
        }
        let trials = accepted + usize::from(accepted < proposed);
        let alpha = self.config.ewma_alpha;
        let prior = Estimate {
            accepted: self.global.rate(),
            trials: 1.0,
        };
        let state = self.seqs.entry(seq).or_insert(SeqState {
            estimate: prior,
            last_verified_step: self.step,
        });
        state.estimate.update(alpha, accepted, trials);
        state.last_verified_step = self.step;
        self.global.update(alpha, accepted, trials);
        Ok(())
    }

    /// Forgets `seq` (finished, preempted or aborted); a no-op for an unknown sequence.
    pub fn forget(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    /// The estimated per-draft acceptance probability of `seq` (the global one if unknown).
    pub fn acceptance(&self, seq: SeqId) -> f64 {
        self.seqs
            .get(&seq)
            .map_or(self.global.rate(), |s| s.estimate.rate())
    }

    /// The estimated per-draft acceptance probability over all sequences.
    pub fn global_acceptance(&self) -> f64 {
        self.global.rate()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const S: SeqId = SeqId(1);

    fn controller() -> SpecController {
        SpecController::new(SpecControllerConfig::default()).unwrap()
    }

    #[test]
    fn k_shrinks_with_the_batch_and_is_off_past_the_threshold() {
        let c = controller();
        let ks: Vec<usize> = (1..=80).map(|b| c.k_for(S, b)).collect();
        // Acceptance 0.7: 0.7^3 = 0.343 ≥ 0.3 > 0.7^4, so at most 3 even for a small batch.
        assert_eq!(ks[0], 3);
        assert!(ks.windows(2).all(|w| w[0] >= w[1]), "{ks:?}");
        assert_eq!(c.k_for(S, 64), 1);
        assert_eq!(c.k_for(S, 65), 0);
        assert_eq!(c.k_for(S, 10_000), 0);

        let mut full = controller();
        for _ in 0..50 {
            full.next_step();
            full.record(S, 4, 4).unwrap();
        }
        assert_eq!(full.k_for(S, 1), 4);
        assert_eq!(full.k_for(S, 16), 4);
        assert_eq!(full.k_for(S, 17), 3);
        assert_eq!(full.k_for(S, 40), 2);
        assert_eq!(full.k_for(S, 64), 1);
        assert_eq!(full.k_for(S, 65), 0);
    }

    #[test]
    fn k_shrinks_as_acceptance_falls_then_turns_off() {
        let mut c = controller();
        for _ in 0..30 {
            c.next_step();
            c.record(S, 4, 4).unwrap();
        }
        assert_eq!(c.k_for(S, 1), 4);
        let mut ks = Vec::new();
        // 20 steps: the sequence turns off before step 16, and its first probe comes
        // probe_interval steps later (tested below).
        for _ in 0..20 {
            c.next_step();
            let k = c.k_for(S, 1);
            ks.push(k);
            if k > 0 {
                c.record(S, k, 0).unwrap();
            }
        }
        assert!(ks.windows(2).all(|w| w[0] >= w[1]), "{ks:?}");
        assert_eq!(ks[0], 4);
        assert!(ks.contains(&2), "{ks:?}");
        assert_eq!(*ks.last().unwrap(), 0, "{ks:?}");
        assert!(c.acceptance(S) < 0.3);
    }

    #[test]
    fn a_sequence_that_turned_off_is_probed_and_turns_back_on() {
        let mut c = controller();
        for _ in 0..20 {
            c.next_step();
            c.record(S, 1, 0).unwrap();
        }
        // Off: no speculation for probe_interval − 1 steps, then a one-token probe.
        let mut probes = Vec::new();
        for step in 1..=48 {
            c.next_step();
            match c.k_for(S, 1) {
                0 => {}
                1 => {
                    probes.push(step);
                    c.record(S, 1, 0).unwrap(); // the probe fails
                }
                k => panic!("step {step}: k = {k} while off"),
            }
        }
        assert_eq!(probes, [16, 32, 48]);
        // A large batch overrides probing.
        for _ in 0..16 {
            c.next_step();
        }
        assert_eq!(c.k_for(S, 65), 0);
        assert_eq!(c.k_for(S, 1), 1);
        // Probes that succeed bring speculation back, up to max_k.
        let mut steps = 0;
        while c.k_for(S, 1) < 4 {
            c.next_step();
            steps += 1;
            let k = c.k_for(S, 1);
            if k > 0 {
                c.record(S, k, k).unwrap();
            }
            assert!(
                steps < 200,
                "never recovered: acceptance {}",
                c.acceptance(S)
            );
        }
    }

    #[test]
    fn new_sequences_start_from_the_global_estimate_and_forget_resets() {
        let mut c = controller();
        assert!((c.global_acceptance() - 0.7).abs() < 1e-12);
        for i in 0..40 {
            c.next_step();
            c.record(SeqId(i), 3, 0).unwrap();
        }
        assert!(c.global_acceptance() < 0.05);
        // A new sequence inherits the low prior: off, but probed at once (it has no history).
        assert_eq!(c.k_for(SeqId(1000), 1), 1);
        c.record(S, 4, 4).unwrap();
        for _ in 0..30 {
            c.record(S, 4, 4).unwrap();
        }
        assert_eq!(c.k_for(S, 1), 4);
        c.forget(S);
        c.forget(S);
        assert_eq!(c.acceptance(S), c.global_acceptance());
    }

    #[test]
    fn a_record_of_more_accepted_than_proposed_is_rejected_and_changes_nothing() {
        let mut c = controller();
        c.record(S, 2, 1).unwrap();
        let before = (c.acceptance(S), c.global_acceptance());
        match c.record(S, 2, 3) {
            Err(SpecError::InvalidRecord {
                proposed: 2,
                accepted: 3,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        c.record(S, 0, 0).unwrap();
        assert_eq!((c.acceptance(S), c.global_acceptance()), before);
    }

    #[test]
    fn bad_config_is_rejected() {
        let base = SpecControllerConfig::default();
        let cases: Vec<(&str, SpecControllerConfig)> = vec![
            (
                "max_k",
                SpecControllerConfig {
                    max_k: 0,
                    ..base.clone()
                },
            ),
            (
                "max_k",
                SpecControllerConfig {
                    max_k: MAX_K + 1,
                    ..base.clone()
                },
            ),
            (
                "disable_batch_size",
                SpecControllerConfig {
                    shrink_batch_size: 8,
                    disable_batch_size: 7,
                    ..base.clone()
                },
            ),
            (
                "min_acceptance",
                SpecControllerConfig {
                    min_acceptance: 0.0,
                    ..base.clone()
                },
            ),
            (
                "min_acceptance",
                SpecControllerConfig {
                    min_acceptance: 1.5,
                    ..base.clone()
                },
            ),
            (
                "min_acceptance",
                SpecControllerConfig {
                    min_acceptance: f64::NAN,
                    ..base.clone()
                },
            ),
            (
                "ewma_alpha",
                SpecControllerConfig {
                    ewma_alpha: 0.0,
                    ..base.clone()
                },
            ),
            (
                "ewma_alpha",
                SpecControllerConfig {
                    ewma_alpha: f64::INFINITY,
                    ..base.clone()
                },
            ),
            (
                "probe_interval",
                SpecControllerConfig {
                    probe_interval: 0,
                    ..base.clone()
                },
            ),
            (
                "initial_acceptance",
                SpecControllerConfig {
                    initial_acceptance: -0.1,
                    ..base.clone()
                },
            ),
        ];
        for (field, config) in cases {
            match SpecController::new(config) {
                Err(SpecError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // Equal thresholds are fine: max_k up to the threshold, 0 past it.
        let c = SpecController::new(SpecControllerConfig {
            shrink_batch_size: 8,
            disable_batch_size: 8,
            initial_acceptance: 1.0,
            ..base
        })
        .unwrap();
        assert_eq!((c.k_for(S, 8), c.k_for(S, 9)), (4, 0));
        assert_eq!(c.config().max_k, 4);
    }
}
