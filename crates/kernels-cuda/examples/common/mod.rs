//! What the attention benchmarks share (`mod common;` in each): the device line, cache and
//! query contents, and event timing.

#![allow(dead_code, unreachable_pub)]

use half::bf16;
use kernels_cuda::Gpu;
use kernels_cuda::cudarc::driver::sys::CUevent_flags;

/// The device, opened, after printing what it is.
pub fn open_gpu() -> Gpu {
    let gpu = Gpu::new(0).unwrap();
    println!(
        "device: {} ({}, {} SMs)",
        gpu.name(),
        gpu.arch(),
        gpu.num_sms()
    );
    gpu
}

/// `n` cache bytes: pseudo-random, never all zero, every 6-bit pattern (any code is a valid
/// value; scales are finite or not, which does not change the memory traffic).
pub fn cache_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| ((i as u64).wrapping_mul(0x9e37_79b9) >> 13) as u8 & 0x3f)
        .collect()
}

/// `n` query values in [-0.75, 0.75].
pub fn query(n: usize) -> Vec<bf16> {
    (0..n)
        .map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) / 64.0))
        .collect()
}

/// Median µs per call of `f` over `rounds` timed rounds of `reps` back-to-back calls (after
/// one untimed round); `f` gets the call's index within its round.
pub fn median_us(gpu: &Gpu, rounds: usize, reps: usize, mut f: impl FnMut(usize)) -> f64 {
    let stream = gpu.stream().clone();
    (0..reps).for_each(&mut f);
    stream.synchronize().unwrap();
    let mut times = Vec::new();
    for _ in 0..rounds {
        let start = gpu
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        let end = gpu
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        start.record(&stream).unwrap();
        (0..reps).for_each(&mut f);
        end.record(&stream).unwrap();
        end.synchronize().unwrap();
        times.push(f64::from(start.elapsed_ms(&end).unwrap()) * 1e3 / reps as f64);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}
