//! [`StartGate`]: the ranks of one host meet before starting NCCL.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};

/// A barrier the ranks of one host pass before joining an NCCL group: each rank says whether
/// it is ready (its GPU opened, its weights loaded), and when one is not, every rank stops
/// before `ncclCommInitRank`, which would otherwise wait for the missing rank for good.
#[derive(Debug)]
pub struct StartGate {
    barrier: Barrier,
    failed: AtomicBool,
}

impl StartGate {
    /// A gate for `ranks` ranks (each must [`pass`](Self::pass) it exactly once).
    pub fn new(ranks: usize) -> Self {
        Self {
            barrier: Barrier::new(ranks),
            failed: AtomicBool::new(false),
        }
    }

    /// Waits until every rank has reached the gate with its `ready` result; then returns it
    /// when every rank was ready. A rank that was not gets its own error back; the others get
    /// `not_started()`, so the first cause stays the one reported.
    ///
    /// # Errors
    /// This rank's error, or `not_started()` when another rank was not ready.
    pub fn pass<T, E>(&self, ready: Result<T, E>, not_started: impl FnOnce() -> E) -> Result<T, E> {
        if ready.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        self.barrier.wait();
        let value = ready?;
        if self.failed.load(Ordering::SeqCst) {
            return Err(not_started());
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ready: &[bool]) -> Vec<Result<usize, String>> {
        let gate = StartGate::new(ready.len());
        std::thread::scope(|s| {
            let ranks: Vec<_> = ready
                .iter()
                .enumerate()
                .map(|(rank, &ok)| {
                    let gate = &gate;
                    s.spawn(move || {
                        let mine = if ok {
                            Ok(rank)
                        } else {
                            Err(format!("rank {rank} failed"))
                        };
                        gate.pass(mine, || "not started".to_owned())
                    })
                })
                .collect();
            ranks
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|_| Err("panicked".into())))
                .collect()
        })
    }

    #[test]
    fn every_rank_passes_when_all_are_ready() {
        assert_eq!(run(&[true, true, true]), vec![Ok(0), Ok(1), Ok(2)]);
    }

    #[test]
    fn one_rank_not_ready_stops_them_all_with_its_own_cause() {
        assert_eq!(
            run(&[true, false, true]),
            vec![
                Err("not started".to_owned()),
                Err("rank 1 failed".to_owned()),
                Err("not started".to_owned())
            ]
        );
    }
}
