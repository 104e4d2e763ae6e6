//! Tests only: a tensor-parallel group whose ranks are threads of one process, exchanging
//! buffers under a mutex. Every operation is a round: each rank deposits its buffer, the last
//! one to arrive publishes all of them, and every rank computes its result from the same
//! published buffers in rank order (so results are bit-identical across ranks, as the trait
//! asks). A rank that panics aborts the group ([`run_ranks`]), so the others return an error
//! instead of waiting forever.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::HostCollective;
use crate::error::ModelError;
use crate::weights::Shard;

#[derive(Debug, Default)]
struct State {
    /// This round's buffers, by rank.
    deposits: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// Completed rounds.
    round: u64,
    /// The buffers of the last completed round, by rank.
    published: Arc<Vec<Vec<f32>>>,
    aborted: bool,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    state: Mutex<State>,
    done: Condvar,
}

/// One rank's member of a thread group.
#[derive(Debug, Clone)]
pub(crate) struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

fn failed(operation: &'static str, reason: String) -> ModelError {
    ModelError::Collective { operation, reason }
}

impl ThreadGroup {
    /// The members of a group of `world` ranks, by rank.
    pub(crate) fn new(world: usize) -> Vec<Self> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                deposits: vec![None; world],
                ..State::default()
            }),
            done: Condvar::new(),
        });
        (0..world)
            .map(|rank| Self {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    fn lock(&self, operation: &'static str) -> Result<MutexGuard<'_, State>, ModelError> {
        self.shared
            .state
            .lock()
            .map_err(|_| failed(operation, "a rank panicked holding the group".into()))
    }

    /// Makes every pending and future operation of the group fail.
    pub(crate) fn abort(&self) {
        if let Ok(mut s) = self.shared.state.lock() {
            s.aborted = true;
        }
        self.shared.done.notify_all();
    }

    /// Deposits `local` and returns every rank's buffer of this round, after checking that
    /// they all have `local`'s length.
    fn exchange(
        &self,
        operation: &'static str,
        local: &[f32],
    ) -> Result<Arc<Vec<Vec<f32>>>, ModelError> {
        let aborted = || failed(operation, "the group was aborted".into());
        let mut s = self.lock(operation)?;
        if s.aborted {
            return Err(aborted());
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
            s = self
                .shared
                .done
                .wait_while(s, |s| s.round == round && !s.aborted)
                .map_err(|_| failed(operation, "a rank panicked holding the group".into()))?;
            if s.round == round {
                return Err(aborted());
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
        for d in all.iter() {
            out.extend_from_slice(d);
        }
        Ok(())
    }
}

/// Aborts the group when its rank's thread unwinds.
struct AbortOnPanic(ThreadGroup);

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort();
        }
    }
}

/// Runs `f` on `world` threads, one per rank, each with its member of a fresh group; returns
/// the results by rank. A panic in any rank aborts the group (the others' collectives fail)
/// and is re-raised here once every thread has ended.
pub(crate) fn run_ranks<T: Send>(world: usize, f: impl Fn(ThreadGroup) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|member| {
                scope.spawn(move || {
                    let _guard = AbortOnPanic(member.clone());
                    f(member)
                })
            })
            .collect();
        let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        joined
            .into_iter()
            .map(|r| r.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sum_and_gather_in_rank_order() {
        let results = run_ranks(3, |g| {
            let r = g.shard().rank as f32;
            let mut x = vec![r, 10.0 * r];
            g.all_reduce_sum(&mut x)?;
            let mut out = Vec::new();
            g.all_gather(&[r, -r], &mut out)?;
            // A second round right after the first must not mix the rounds' buffers.
            let mut y = vec![1.0];
            g.all_reduce_sum(&mut y)?;
            Ok::<_, ModelError>((x, out, y))
        });
        for r in results {
            let (x, out, y) = r.unwrap();
            assert_eq!(x, [3.0, 30.0]);
            assert_eq!(out, [0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
            assert_eq!(y, [3.0]);
        }
    }

    #[test]
    fn mismatched_lengths_fail_on_every_rank() {
        let results = run_ranks(2, |g| {
            let mut x = vec![0.0; 2 + g.shard().rank];
            g.all_reduce_sum(&mut x)
        });
        for r in results {
            assert!(
                matches!(&r, Err(ModelError::Collective { operation: "all_reduce_sum", reason }) if reason.contains("different lengths: [2, 3]")),
                "{r:?}"
            );
        }
    }

    #[test]
    fn a_panicking_rank_aborts_the_others() {
        let caught = std::panic::catch_unwind(|| {
            run_ranks(2, |g| {
                if g.shard().rank == 1 {
                    panic!("rank 1 fails");
                }
                let mut x = [1.0];
                g.all_reduce_sum(&mut x)
            })
        });
        // Rank 0 returned (with an error) instead of waiting forever, so the panic came back.
        assert!(caught.is_err());
    }
}
