//! Every kernel compiles for sm_80 and sm_90 with NVRTC, and ptxas reports no spills. Needs
//! NVRTC and the CUDA headers, not a GPU: `.ci/run` installs them from PyPI
//! (nvidia-cuda-nvrtc, nvidia-cuda-runtime) and sets `LD_LIBRARY_PATH` and
//! `KVSERVE_CUDA_INCLUDE`; elsewhere the test says it skipped. It compiles each kernel for
//! every KV dtype, head_dim and activation type, and the attention kernels (decode and prefill)
//! for every GQA group with bf16 activations over bf16, int8 and int4-g32 KV at d = 128 (the
//! tensor-core decode kernel's int4 body has its own register budget)
//! (`KVSERVE_NVRTC_ALL=1`: every variant).
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::time::Instant;

use kernels_cuda::compile::{Variant, compile_fresh, nvrtc_available, resource_summary};
use kernels_cuda::{KernelError, Program, Scalar};
use kv_quant::{Int4GroupSize, KvCacheDtype};

fn selected() -> Vec<Variant> {
    let all = Variant::all();
    if std::env::var_os("KVSERVE_NVRTC_ALL").is_some() {
        return all;
    }
    all.into_iter()
        .filter(|v| {
            !matches!(
                v.program,
                Program::PagedAttention | Program::PagedAttentionTc | Program::PagedPrefillTc
            ) || v.gqa_group == 4
                || (v.scalar == Scalar::Bf16
                    && matches!(
                        v.dtype,
                        KvCacheDtype::Int8
                            | KvCacheDtype::Bf16
                            | KvCacheDtype::Int4 {
                                group_size: Int4GroupSize::G32
                            }
                    )
                    && v.head_dim == 128)
        })
        .collect()
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    if !nvrtc_available() {
        eprintln!("SKIPPED: libnvrtc not found (LD_LIBRARY_PATH); .ci/run installs it from PyPI");
        return;
    }
    let variants = selected();
    let start = Instant::now();
    // Every (arch, variant) compiles independently: spread them over the cores (NVRTC is
    // thread-safe), which keeps this test, the longest of the suite, short on CI's 2 cores.
    let jobs: Vec<(&str, &Variant)> = ["sm_80", "sm_90"]
        .into_iter()
        .flat_map(|arch| variants.iter().map(move |v| (arch, v)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let jobs = &jobs;
                scope.spawn(move || {
                    jobs.iter()
                        .skip(t)
                        .step_by(threads)
                        .map(|&(arch, v)| (arch, v, compile_fresh(v, arch)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut spills = Vec::new();
    for (arch, v, result) in results {
        let c = match result {
            Ok(c) => c,
            Err(KernelError::NoHeaders { searched }) => {
                eprintln!("SKIPPED: no CUDA headers (searched {searched})");
                return;
            }
            Err(e) => panic!("{v} for {arch}: {e}"),
        };
        assert!(!c.cubin.is_empty(), "{v} {arch}: empty cubin");
        for line in resource_summary(&c.log) {
            if line.contains("bytes stack frame") && !line.contains(" 0 bytes spill stores") {
                spills.push(format!("{arch} {v}: {line}"));
            }
            if arch == "sm_90" && v.dtype == KvCacheDtype::Int8 && v.scalar == Scalar::Bf16 {
                eprintln!("{arch} {v}: {line}");
            }
        }
    }
    eprintln!(
        "compiled {} variants x 2 archs in {:.1} s on {threads} threads",
        variants.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(spills.is_empty(), "register spills:\n{}", spills.join("\n"));
}
