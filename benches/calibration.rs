//! The perf gate's calibration workload (`cargo xtask perf-gate`, `xtask/src/perf.rs`).
//!
//! Every gated bench target includes this file (`#[path = "../../../benches/calibration.rs"]
//! mod calibration;`) and registers [`bench`] first, before its own benchmarks, so the
//! calibration is built with the same profile and measured by criterion in the same way. The
//! gate runs the binary once per benchmark (calibration, then that benchmark) and once more for
//! the calibration alone, and compares each benchmark as a ratio `median(bench) / mean of the
//! calibration medians right before and after it`, which cancels most of a machine's speed
//! (clock, turbo, a busy neighbour) out of the figure.
//!
//! The workload is fixed and deterministic, and mixes the three kinds of work the gated
//! benchmarks do, so that a machine that is slower at one of them moves both sides of the
//! ratio: a 48×48 f32 matrix multiply (float throughput, like the codecs and the decode), an
//! xorshift/FNV hashing pass over 16 KiB (integer ALU, like the block hashes), and sorting 1024
//! pseudo-random `u32` (branches and memory, like the scheduler's bookkeeping). About 50 µs.
//! Changing it changes every ratio: re-bless the baseline (`cargo xtask perf-gate --bless`).

use std::hint::black_box;

use criterion::Criterion;

/// The benchmark id the gate looks for in every target.
pub(crate) const CALIBRATION_ID: &str = "calibration";

/// Environment variable naming one benchmark id to slow down (see [`slowdown`]).
pub(crate) const SLOW_ENV: &str = "KVSERVE_PERF_GATE_SLOW";

const N: usize = 48;
const HASH_BYTES: usize = 16 * 1024;
const SORT_LEN: usize = 1024;

/// Registers the calibration workload as the benchmark `calibration`.
pub(crate) fn bench(c: &mut Criterion) {
    let mut state = Workload::new();
    c.bench_function(CALIBRATION_ID, |b| b.iter(|| black_box(state.run())));
}

/// How many times the benchmark `id` should repeat its work: 4 when the environment variable
/// [`SLOW_ENV`] names `id`, else 1. The gate's end-to-end test uses it to build a deliberately
/// slowed benchmark and check that the gate fails.
#[allow(dead_code, reason = "only the targets with a slowed benchmark call it")]
pub(crate) fn slowdown(id: &str) -> usize {
    match std::env::var(SLOW_ENV) {
        Ok(slow) if slow == id => 4,
        _ => 1,
    }
}

struct Workload {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    bytes: Vec<u8>,
    keys: Vec<u32>,
    sorted: Vec<u32>,
}

impl Workload {
    fn new() -> Self {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        Self {
            a: (0..N * N)
                .map(|_| (next() % 1000) as f32 / 500.0 - 1.0)
                .collect(),
            b: (0..N * N)
                .map(|_| (next() % 1000) as f32 / 500.0 - 1.0)
                .collect(),
            c: vec![0.0; N * N],
            bytes: (0..HASH_BYTES).map(|_| next() as u8).collect(),
            keys: (0..SORT_LEN).map(|_| next() as u32).collect(),
            sorted: Vec::with_capacity(SORT_LEN),
        }
    }

    /// One pass of the workload; returns a checksum so nothing is optimised away.
    fn run(&mut self) -> u64 {
        // Matrix multiply, i-k-j order (vectorises over j).
        self.c.fill(0.0);
        for i in 0..N {
            for k in 0..N {
                let aik = black_box(self.a[i * N + k]);
                let (row, b) = (&mut self.c[i * N..(i + 1) * N], &self.b[k * N..(k + 1) * N]);
                for (c, &b) in row.iter_mut().zip(b) {
                    *c += aik * b;
                }
            }
        }
        // FNV-1a with an xorshift mix every 8 bytes.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for chunk in black_box(&self.bytes).chunks_exact(8) {
            for &byte in chunk {
                h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
            h ^= h >> 29;
        }
        // Sort a copy of the keys (unstable: pdqsort, branchy).
        self.sorted.clear();
        self.sorted.extend_from_slice(black_box(&self.keys));
        self.sorted.sort_unstable();
        h ^ u64::from(self.sorted[SORT_LEN / 2]) ^ self.c[N * N / 2].to_bits() as u64
    }
}
