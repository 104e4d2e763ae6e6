//! [`ThreadGroup`]: a tensor-parallel group whose ranks are threads of one process, the
//! production [`HostCollective`] of the CPU backend.
//!
//! Every collective is a *round*: each rank deposits its buffer under one mutex, the last
//! rank to arrive publishes all of them, and every rank computes its result from the same
//! published buffers **in rank order** (a sum is `x_0 + x_1 + ... + x_{n-1}` on every rank,
//! never in arrival order), so the results are bit-identical across ranks, as the trait asks.
//!
//! Failure never hangs: [`ThreadGroup::abort`] (called by the tensor-parallel backend when a
//! rank fails or panics, and by a member's guard when its thread unwinds) makes every pending
//! and later collective of the group fail with the abort's reason, on every rank; an optional
//! timeout ([`ThreadGroup::with_timeout`]) aborts the group when a rank waits longer than it
//! for the others. Lengths are checked in every round: a rank whose buffer differs from the
//! others' fails the round on every rank, naming every rank's length.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use model::{HostCollective, ModelError, Shard};

use crate::DistError;

/// The shared state of one group.
#[derive(Debug, Default)]
struct State {
    /// This round's buffers, by rank.
    deposits: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// Completed rounds.
    round: u64,
    /// The buffers of the last completed round, by rank.
    published: Arc<Vec<Vec<f32>>>,
    /// Why the group was aborted; `None` while it is usable.
    aborted: Option<String>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Option<Duration>,
    state: Mutex<State>,
    done: Condvar,
}

/// One rank's member of a group of threads (cheap to clone; clones are the same member).
#[derive(Debug, Clone)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

fn failed(operation: &'static str, reason: String) -> ModelError {
    ModelError::Collective { operation, reason }
}

impl ThreadGroup {
    /// The members of a group of `world_size` ranks, by rank, with no timeout.
    ///
    /// # Errors
    /// [`DistError::Config`] (`tensor_parallel_size`) when `world_size` is 0 or above
    /// [`MAX_WORLD_SIZE`](crate::MAX_WORLD_SIZE).
    pub fn new(world_size: usize) -> Result<Vec<Self>, DistError> {
        Self::build(world_size, None)
    }

    /// [`ThreadGroup::new`], where a rank that waits longer than `timeout` in one collective
    /// aborts the group (so a rank stuck outside the collectives fails the others instead of
    /// hanging them).
    ///
    /// # Errors
    /// As [`ThreadGroup::new`]; also [`DistError::Config`] (`timeout`) for a zero timeout.
    pub fn with_timeout(world_size: usize, timeout: Duration) -> Result<Vec<Self>, DistError> {
        if timeout.is_zero() {
            return Err(DistError::config("timeout", "must be above zero"));
        }
        Self::build(world_size, Some(timeout))
    }

    fn build(world: usize, timeout: Option<Duration>) -> Result<Vec<Self>, DistError> {
        crate::DistConfig::single_node(world).validate()?;
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                deposits: vec![None; world],
                ..State::default()
            }),
            done: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| Self {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect())
    }

    /// The state; a poisoned lock (a rank panicked inside the group's own code, which does
    /// not panic) is recovered: the state is only ever changed whole under the lock.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes every pending and later collective of the group fail, on every rank, with
    /// `reason` (the first abort's reason is kept).
    pub fn abort(&self, reason: &str) {
        let mut s = self.lock();
        if s.aborted.is_none() {
            s.aborted = Some(reason.to_owned());
        }
        drop(s);
        self.shared.done.notify_all();
    }

    /// Why the group was aborted, if it was.
    pub fn aborted(&self) -> Option<String> {
        self.lock().aborted.clone()
    }

    /// Makes an aborted group usable again. Only sound when no rank is inside a collective
    /// (every rank has returned from the step that failed): a half-deposited round is
    /// dropped.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.aborted = None;
        s.arrived = 0;
        s.deposits.iter_mut().for_each(|d| *d = None);
    }

    /// Deposits `local` and returns every rank's buffer of this round, after checking that
    /// they all have `local`'s length.
    fn exchange(
        &self,
        operation: &'static str,
        local: &[f32],
    ) -> Result<Arc<Vec<Vec<f32>>>, ModelError> {
        let aborted = |why: &str| failed(operation, format!("the group was aborted: {why}"));
        let mut s = self.lock();
        if let Some(why) = &s.aborted {
            return Err(aborted(why));
        }
        s.deposits[self.rank] = Some(local.to_vec());
        s.arrived += 1;
        if s.arrived == self.shared.world {
            s.published = Arc::new(
                s.deposits
                    .iter_mut()
                    .map(|d| d.take().unwrap_or_default())
                    .collect(),
            );
            s.arrived = 0;
            s.round += 1;
            self.shared.done.notify_all();
        } else {
            let round = s.round;
            let deadline = self.shared.timeout.map(|t| (t, Instant::now() + t));
            while s.round == round && s.aborted.is_none() {
                s = match deadline {
                    None => self
                        .shared
                        .done
                        .wait(s)
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                    Some((timeout, at)) => {
                        let left = at.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            let why = format!(
                                "rank {} waited {timeout:?} in `{operation}` for the other ranks",
                                self.rank
                            );
                            s.aborted = Some(why);
                            self.shared.done.notify_all();
                            break;
                        }
                        self.shared
                            .done
                            .wait_timeout(s, left)
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0
                    }
                };
            }
            if s.round == round {
                let why = s.aborted.clone().unwrap_or_default();
                return Err(aborted(&why));
            }
        }
        // A rank that has taken this round's result may start the next round, but that round
        // cannot complete (and replace `published`) before every rank has deposited again.
        let all = Arc::clone(&s.published);
        drop(s);
        if all.iter().any(|d| d.len() != local.len()) {
            let lengths: Vec<usize> = all.iter().map(Vec::len).collect();
            return Err(failed(
                operation,
                format!("the ranks passed different lengths: {lengths:?}"),
            ));
        }
        Ok(all)
    }
}

impl HostCollective for ThreadGroup {
    fn shard(&self) -> Shard {
        Shard {
            rank: self.rank,
            world_size: self.shared.world,
        }
    }

    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), ModelError> {
        let all = self.exchange("all_reduce_sum", x)?;
        // In rank order on every rank: the same additions in the same order, bit-identical.
        x.fill(0.0);
        for d in all.iter() {
            for (a, b) in x.iter_mut().zip(d) {
                *a += b;
            }
        }
        Ok(())
    }

    fn all_gather(&self, local: &[f32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        let all = self.exchange("all_gather", local)?;
        out.clear();
        out.reserve(local.len() * all.len());
        for d in all.iter() {
            out.extend_from_slice(d);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on one thread per member; results by rank. A panicking rank aborts the group.
    fn run<T: Send>(
        members: Vec<ThreadGroup>,
        f: impl Fn(ThreadGroup) -> T + Sync,
    ) -> Vec<std::thread::Result<T>> {
        let f = &f;
        std::thread::scope(|scope| {
            let handles: Vec<_> = members
                .into_iter()
                .map(|m| {
                    scope.spawn(move || {
                        let guard = m.clone();
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(m)));
                        if r.is_err() {
                            guard.abort("a rank panicked");
                        }
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(Err))
                .collect()
        })
    }

    #[test]
    fn sums_and_gathers_in_rank_order_and_rounds_do_not_mix() {
        let results = run(ThreadGroup::new(3).unwrap(), |g| {
            let r = g.shard().rank as f32;
            let mut x = vec![r, 10.0 * r];
            g.all_reduce_sum(&mut x)?;
            let mut out = Vec::new();
            g.all_gather(&[r, -r], &mut out)?;
            let mut y = vec![1.0];
            g.all_reduce_sum(&mut y)?;
            Ok::<_, ModelError>((x, out, y))
        });
        for r in results {
            let (x, out, y) = r.unwrap().unwrap();
            assert_eq!(x, [3.0, 30.0]);
            assert_eq!(out, [0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
            assert_eq!(y, [3.0]);
        }
    }

    #[test]
    fn the_sum_is_bit_identical_on_every_rank() {
        // Values whose float sum depends on the order: every rank must see the same bits.
        let values = [1.0e8_f32, 1.0, -1.0e8, 1.0e-3];
        let results = run(ThreadGroup::new(4).unwrap(), |g| {
            let mut sums = Vec::new();
            for round in 0..50 {
                let mut x = [values[(g.shard().rank + round) % 4]];
                g.all_reduce_sum(&mut x)?;
                sums.push(x[0].to_bits());
            }
            Ok::<_, ModelError>(sums)
        });
        let sums: Vec<Vec<u32>> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
    }

    #[test]
    fn mismatched_lengths_fail_on_every_rank() {
        let results = run(ThreadGroup::new(2).unwrap(), |g| {
            let mut x = vec![0.0; 2 + g.shard().rank];
            g.all_reduce_sum(&mut x)
        });
        for r in results {
            let r = r.unwrap();
            assert!(
                matches!(&r, Err(ModelError::Collective { operation: "all_reduce_sum", reason }) if reason.contains("different lengths: [2, 3]")),
                "{r:?}"
            );
        }
    }

    #[test]
    fn a_panicking_rank_aborts_the_waiting_ones() {
        let results = run(ThreadGroup::new(3).unwrap(), |g| {
            if g.shard().rank == 1 {
                panic!("rank 1 fails");
            }
            let mut x = [1.0];
            g.all_reduce_sum(&mut x)
        });
        assert!(results[1].is_err());
        for r in [&results[0], &results[2]] {
            let r = r.as_ref().unwrap();
            assert!(
                matches!(r, Err(ModelError::Collective { reason, .. }) if reason.contains("a rank panicked")),
                "{r:?}"
            );
        }
    }

    #[test]
    fn an_aborted_group_fails_at_once_and_reset_makes_it_usable() {
        let members = ThreadGroup::new(2).unwrap();
        members[0].abort("rank 0 failed: test");
        assert_eq!(members[1].aborted().as_deref(), Some("rank 0 failed: test"));
        let mut x = [1.0];
        let err = members[1].all_reduce_sum(&mut x).unwrap_err().to_string();
        assert!(err.contains("rank 0 failed: test"), "{err}");
        members[0].reset();
        assert_eq!(members[1].aborted(), None);
        let results = run(members, |g| {
            let mut x = [2.0];
            g.all_reduce_sum(&mut x).map(|()| x[0])
        });
        for r in results {
            assert_eq!(r.unwrap().unwrap(), 4.0);
        }
    }

    #[test]
    fn a_rank_that_never_comes_times_the_others_out() {
        let members = ThreadGroup::with_timeout(2, Duration::from_millis(50)).unwrap();
        let mut x = [1.0];
        // Rank 1 never enters: rank 0 gives up instead of waiting forever.
        let err = members[0].all_reduce_sum(&mut x).unwrap_err().to_string();
        assert!(err.contains("waited"), "{err}");
        assert!(members[1].aborted().is_some());
    }

    #[test]
    fn bad_group_sizes_are_refused() {
        assert!(matches!(
            ThreadGroup::new(0),
            Err(DistError::Config {
                field: "tensor_parallel_size",
                ..
            })
        ));
        assert!(matches!(
            ThreadGroup::with_timeout(2, Duration::ZERO),
            Err(DistError::Config {
                field: "timeout",
                ..
            })
        ));
    }
}
