//! Kernel sources (embedded in the binary), their variants, and compilation by NVRTC with an
//! on-disk cache.
//!
//! **Why NVRTC at run time** (not cubins shipped by a build step): the build machine and CI
//! have no CUDA toolkit, a kernel is specialized per (KV dtype, head_dim, GQA group,
//! activation type) and only the few a model uses are ever needed, and compiling on the
//! device targets its exact architecture (`sm_90a` on Hopper). A variant compiles in a few
//! hundred milliseconds once; the cubin is cached on disk, keyed by the source text, the
//! options and NVRTC's version, so later starts only load it. CI compiles every variant for
//! sm_80 and sm_90 with NVRTC from PyPI ([`compile_variant`] with an explicit arch) and reports
//! registers and spills.

use std::fmt;
use std::hash::Hasher;
use std::path::{Path, PathBuf};

use kv_quant::KvCacheDtype;
use rustc_hash::FxHasher;

use crate::error::{KernelError, Result};
use crate::ffi;

/// The kernel sources, embedded at build time: `(file name, text)`.
const SOURCES: &[(&str, &str)] = &[
    (
        "kv_layout.cuh",
        include_str!("../../../kernels/kv_layout.cuh"),
    ),
    ("scalar.cuh", include_str!("../../../kernels/scalar.cuh")),
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    (
        "tc_common.cuh",
        include_str!("../../../kernels/tc_common.cuh"),
    ),
    (
        "decode_reduce.cuh",
        include_str!("../../../kernels/decode_reduce.cuh"),
    ),
    (
        "cache_write.cuh",
        include_str!("../../../kernels/cache_write.cuh"),
    ),
    (
        "paged_attention.cu",
        include_str!("../../../kernels/paged_attention.cu"),
    ),
    (
        "paged_attention_tc.cu",
        include_str!("../../../kernels/paged_attention_tc.cu"),
    ),
    (
        "paged_prefill_tc.cu",
        include_str!("../../../kernels/paged_prefill_tc.cu"),
    ),
    ("cache.cu", include_str!("../../../kernels/cache.cu")),
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
    ),
    ("sampling.cu", include_str!("../../../kernels/sampling.cu")),
    ("gemv.cu", include_str!("../../../kernels/gemv.cu")),
];

/// Activation type of q, k, v and attention output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scalar {
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl Scalar {
    fn code(self) -> u32 {
        match self {
            Self::F16 => 0,
            Self::Bf16 => 1,
        }
    }
}

/// The kernel source files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Program {
    /// `paged_attention.cu`: decode attention (`paged_decode_partition`, `paged_decode_reduce`).
    PagedAttention,
    /// `paged_attention_tc.cu`: decode attention on tensor cores (`paged_decode_tc`, which
    /// merges its partitions itself), for 16-bit KV of the activation type, int8, fp8 and
    /// int4: the default for those.
    PagedAttentionTc,
    /// `paged_prefill_tc.cu`: prefill / chunked-prefill attention on tensor cores
    /// (`paged_prefill_tc`), for the KV dtypes of [`Variant::tensor_core_prefill`].
    PagedPrefillTc,
    /// `cache.cu`: `reshape_and_cache`.
    Cache,
    /// `elementwise.cu`: embedding gather, RMSNorm (with the residual add), RoPE, SiLU·up.
    /// Depends on the activation type only.
    Elementwise,
    /// `sampling.cu`: logits processing and sampling (`sample_rows`). Depends on the
    /// activation type (of the logits) only.
    Sampling,
    /// `gemv.cu`: linear layers for decode batches of at most 8 tokens (`gemv_M`,
    /// `gemv_glu_M`). Depends on the activation type only.
    Gemv,
}

impl Program {
    fn file(self) -> &'static str {
        match self {
            Self::PagedAttention => "paged_attention.cu",
            Self::PagedAttentionTc => "paged_attention_tc.cu",
            Self::PagedPrefillTc => "paged_prefill_tc.cu",
            Self::Cache => "cache.cu",
            Self::Elementwise => "elementwise.cu",
            Self::Sampling => "sampling.cu",
            Self::Gemv => "gemv.cu",
        }
    }
}

/// One compiled specialization of a kernel source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Variant {
    /// The source.
    pub program: Program,
    /// Activation type.
    pub scalar: Scalar,
    /// KV-cache storage format.
    pub dtype: KvCacheDtype,
    /// Channels per head.
    pub head_dim: usize,
    /// Query heads per KV head (attention only; 0 for other programs).
    pub gqa_group: usize,
}

/// Head dimensions the kernels are built for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Largest GQA group the decode kernel keeps in registers.
pub const MAX_GQA_GROUP: usize = 8;

impl Variant {
    /// The elementwise kernels for `scalar` (KV dtype and head_dim do not apply).
    pub fn elementwise(scalar: Scalar) -> Self {
        Variant {
            program: Program::Elementwise,
            scalar,
            dtype: KvCacheDtype::Fp16,
            head_dim: 0,
            gqa_group: 0,
        }
    }

    /// The sampling kernel for logits of type `scalar`.
    pub fn sampling(scalar: Scalar) -> Self {
        Variant {
            program: Program::Sampling,
            ..Self::elementwise(scalar)
        }
    }

    /// The small-batch linear layers for activations of type `scalar`.
    pub fn gemv(scalar: Scalar) -> Self {
        Variant {
            program: Program::Gemv,
            ..Self::elementwise(scalar)
        }
    }

    /// Whether the variant depends on the activation type only.
    fn scalar_only(&self) -> bool {
        matches!(
            self.program,
            Program::Elementwise | Program::Sampling | Program::Gemv
        )
    }

    /// Whether the variant is specialized per GQA group (the attention kernels).
    fn has_gqa(&self) -> bool {
        matches!(
            self.program,
            Program::PagedAttention | Program::PagedAttentionTc | Program::PagedPrefillTc
        )
    }

    /// Whether the tensor-core decode kernel exists for this activation type and KV dtype
    /// (16-bit KV of the activation type; int8, fp8 and int4 with either).
    pub fn tensor_core_decode(scalar: Scalar, dtype: KvCacheDtype) -> bool {
        Self::tensor_core_prefill(scalar, dtype) || matches!(dtype, KvCacheDtype::Int4 { .. })
    }

    /// Whether the tensor-core prefill kernel exists for this activation type and KV dtype
    /// (16-bit KV of the activation type; int8 and fp8 with either; not int4).
    pub fn tensor_core_prefill(scalar: Scalar, dtype: KvCacheDtype) -> bool {
        matches!(
            (scalar, dtype),
            (Scalar::F16, KvCacheDtype::Fp16)
                | (Scalar::Bf16, KvCacheDtype::Bf16)
                | (
                    _,
                    KvCacheDtype::Int8 | KvCacheDtype::Fp8E4m3 | KvCacheDtype::Fp8E5m2
                )
        )
    }

    /// Compiler options selecting this variant.
    fn defines(&self) -> Vec<String> {
        if self.scalar_only() {
            return vec![format!("-DSCALAR={}", self.scalar.code())];
        }
        let mut d = vec![
            format!("-DSCALAR={}", self.scalar.code()),
            format!("-DKV_DTYPE={}", self.dtype.tag()),
            format!("-DHEAD_DIM={}", self.head_dim),
        ];
        if self.has_gqa() {
            d.push(format!("-DGQA_GROUP={}", self.gqa_group));
        }
        d
    }

    /// Every variant a model with these activations, KV dtype, head_dim and GQA group (query
    /// heads per KV head on one device) can launch: what [`crate::Gpu::preload`] compiles
    /// before the first step.
    pub fn for_model(
        scalar: Scalar,
        dtype: KvCacheDtype,
        head_dim: usize,
        gqa_group: usize,
    ) -> Vec<Variant> {
        let attention = |program| Variant {
            program,
            scalar,
            dtype,
            head_dim,
            gqa_group,
        };
        let mut v = vec![
            Variant::elementwise(scalar),
            Variant::sampling(scalar),
            Variant::gemv(scalar),
            Variant {
                gqa_group: 0,
                ..attention(Program::Cache)
            },
            attention(Program::PagedAttention),
        ];
        if Self::tensor_core_decode(scalar, dtype) {
            v.push(attention(Program::PagedAttentionTc));
        }
        if Self::tensor_core_prefill(scalar, dtype) {
            v.push(attention(Program::PagedPrefillTc));
        }
        v
    }

    /// Every variant the crate can launch (what CI compiles).
    pub fn all() -> Vec<Variant> {
        let mut v = Vec::new();
        for scalar in [Scalar::F16, Scalar::Bf16] {
            v.push(Variant::elementwise(scalar));
            v.push(Variant::sampling(scalar));
            v.push(Variant::gemv(scalar));
            for dtype in KvCacheDtype::ALL {
                for head_dim in HEAD_DIMS {
                    // e.g. int4 groups of 128 channels need head_dim >= 128.
                    if kv_quant::BlockLayout::new(dtype, 16, 1, head_dim).is_err() {
                        continue;
                    }
                    v.push(Variant {
                        program: Program::Cache,
                        scalar,
                        dtype,
                        head_dim,
                        gqa_group: 0,
                    });
                    for gqa_group in 1..=MAX_GQA_GROUP {
                        v.push(Variant {
                            program: Program::PagedAttention,
                            scalar,
                            dtype,
                            head_dim,
                            gqa_group,
                        });
                        let tc = |program| Variant {
                            program,
                            scalar,
                            dtype,
                            head_dim,
                            gqa_group,
                        };
                        if Self::tensor_core_decode(scalar, dtype) {
                            v.push(tc(Program::PagedAttentionTc));
                        }
                        if Self::tensor_core_prefill(scalar, dtype) {
                            v.push(tc(Program::PagedPrefillTc));
                        }
                    }
                }
            }
        }
        v
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scalar_only() {
            return write!(f, "{} [{:?}]", self.program.file(), self.scalar);
        }
        write!(
            f,
            "{} [{:?} kv={} d={}",
            self.program.file(),
            self.scalar,
            self.dtype,
            self.head_dim
        )?;
        if self.has_gqa() {
            write!(f, " gqa={}", self.gqa_group)?;
        }
        write!(f, "]")
    }
}

/// A compiled variant.
#[derive(Debug, Clone)]
pub struct CompiledVariant {
    /// Machine code for the architecture it was compiled for.
    pub cubin: Vec<u8>,
    /// NVRTC's log: ptxas's report (registers, shared memory, spills) and any warnings.
    pub log: String,
    /// Whether it came from the disk cache.
    pub cached: bool,
}

/// `src` with our own `#include "x"` lines replaced by the embedded files (each once).
fn expand(file: &str, seen: &mut Vec<&'static str>) -> Result<String> {
    let (name, text) = SOURCES
        .iter()
        .find(|(n, _)| *n == file)
        .copied()
        .ok_or_else(|| KernelError::Compile {
            kernel: file.into(),
            options: String::new(),
            log: "no such embedded source".into(),
        })?;
    if seen.contains(&name) {
        return Ok(String::new());
    }
    seen.push(name);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let inc = line
            .trim()
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'));
        match inc {
            Some(inc) => out.push_str(&expand(inc, seen)?),
            None if line.trim() == "#pragma once" => {}
            None => out.push_str(line),
        }
        out.push('\n');
    }
    Ok(out)
}

/// Folders searched for the CUDA headers (cuda_fp16.h, ...), in order.
fn header_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("KVSERVE_CUDA_INCLUDE") {
        dirs.push(PathBuf::from(d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            dirs.push(Path::new(&d).join("include"));
        }
    }
    // Next to an nvcc on PATH (the GPU machine's toolkit).
    if let Some(path) = std::env::var_os("PATH") {
        for p in std::env::split_paths(&path) {
            if p.join("nvcc").is_file() {
                dirs.push(p.join("../include"));
            }
        }
    }
    for d in ["/usr/local/cuda/include", "/usr/local/cuda-13.0/include"] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

fn find_headers() -> Result<PathBuf> {
    let dirs = header_dirs();
    dirs.iter()
        .find(|d| d.join("cuda_fp16.h").is_file())
        .cloned()
        .ok_or_else(|| KernelError::NoHeaders {
            searched: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KVSERVE_KERNEL_CACHE") {
        return (!d.is_empty()).then(|| PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(Path::new(&d).join("kvserve/kernels"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/kvserve/kernels"))
}

/// Whether NVRTC can be loaded on this machine.
pub fn nvrtc_available() -> bool {
    ffi::library_present("nvrtc")
}

/// Compiles `variant` for `arch` (e.g. `"sm_90a"`, `"sm_80"`), through the disk cache
/// (`KVSERVE_KERNEL_CACHE`, default `~/.cache/kvserve/kernels`; empty disables it).
///
/// # Errors
/// [`KernelError::NoCompiler`] without NVRTC, [`KernelError::NoHeaders`] without the CUDA
/// headers, [`KernelError::Compile`] with NVRTC's log.
pub fn compile_variant(variant: &Variant, arch: &str) -> Result<CompiledVariant> {
    compile_with(variant, arch, cache_dir())
}

/// As [`compile_variant`], bypassing the disk cache (always compiles; CI's check).
///
/// # Errors
/// As [`compile_variant`].
pub fn compile_fresh(variant: &Variant, arch: &str) -> Result<CompiledVariant> {
    compile_with(variant, arch, None)
}

fn compile_with(variant: &Variant, arch: &str, cache: Option<PathBuf>) -> Result<CompiledVariant> {
    if !nvrtc_available() {
        return Err(KernelError::NoCompiler(
            "libnvrtc not found (put its folder on LD_LIBRARY_PATH)".into(),
        ));
    }
    let include = find_headers()?;
    let src = expand(variant.program.file(), &mut Vec::new())?;
    let mut options = variant.defines();
    options.extend([
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-default-device".into(),
        // kv_layout.cuh declares constants a given kernel does not use.
        "--diag-suppress=177".into(),
        "-Xptxas".into(),
        "-v".into(),
        format!("--include-path={}", include.display()),
    ]);
    // A tuning knob: extra `-D...` options for every kernel (e.g. `-DKV_UNROLL=8`).
    if let Ok(extra) = std::env::var("KVSERVE_KERNEL_DEFINES") {
        options.extend(
            extra
                .split_whitespace()
                .filter(|o| o.starts_with("-D"))
                .map(str::to_owned),
        );
    }
    let version = ffi::nvrtc_version().unwrap_or((0, 0));
    let key = {
        let mut h = FxHasher::default();
        h.write(src.as_bytes());
        for o in &options {
            h.write(o.as_bytes());
            h.write_u8(0);
        }
        h.write_i32(version.0);
        h.write_i32(version.1);
        h.finish()
    };
    let path = cache.map(|d| d.join(format!("{key:016x}.cubin")));
    if let Some(p) = &path
        && let Ok(cubin) = std::fs::read(p)
        && !cubin.is_empty()
    {
        return Ok(CompiledVariant {
            cubin,
            log: String::new(),
            cached: true,
        });
    }
    let compiled = ffi::compile_cubin(&src, variant.program.file(), &options).map_err(|log| {
        KernelError::Compile {
            kernel: variant.to_string(),
            options: options.join(" "),
            log,
        }
    })?;
    if let Some(p) = &path {
        // A cache that cannot be written only costs a recompilation next time.
        let write = p
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                std::fs::write(&tmp, &compiled.cubin)?;
                std::fs::rename(&tmp, p)
            });
        if let Err(e) = write {
            tracing::debug!("kernel cache {}: {e}", p.display());
        }
    }
    Ok(CompiledVariant {
        cubin: compiled.cubin,
        log: compiled.log,
        cached: false,
    })
}

/// Registers, spill bytes and stack frame of each kernel in a ptxas report (`-Xptxas -v`).
pub fn resource_summary(log: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().unwrap_or("").to_string();
        } else if line.contains("bytes stack frame") || line.contains("Used ") {
            out.push(format!(
                "{current}: {}",
                line.trim().trim_start_matches("ptxas info    : ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_are_expanded_once() {
        let src = expand("paged_attention.cu", &mut Vec::new()).unwrap();
        assert!(!src.contains("#include \""));
        assert_eq!(src.matches("namespace kv_layout {").count(), 1);
        assert!(src.contains("paged_decode_partition"));
    }

    #[test]
    fn unknown_source_is_an_error() {
        assert!(expand("nope.cu", &mut Vec::new()).is_err());
    }

    #[test]
    fn every_variant_has_distinct_options() {
        let all = Variant::all();
        // int4-g128 has no head_dim 64 variant; one elementwise, one sampling and one gemv
        // variant per scalar; tensor-core decode and prefill for four KV dtypes per scalar (its
        // 16-bit one, int8, fp8), tensor-core decode also for the four int4 ones (seven
        // (dtype, head_dim) pairs).
        assert_eq!(
            all.len(),
            2 * ((KvCacheDtype::ALL.len() * HEAD_DIMS.len() - 1) * (1 + MAX_GQA_GROUP)
                + 3
                + 2 * 4 * HEAD_DIMS.len() * MAX_GQA_GROUP
                + 7 * MAX_GQA_GROUP)
        );
        let mut opts: Vec<_> = all
            .iter()
            .map(|v| (v.program, v.defines().join(" ")))
            .collect();
        opts.sort_by(|a, b| a.1.cmp(&b.1));
        opts.dedup();
        assert_eq!(opts.len(), all.len());
    }

    #[test]
    fn int4_decodes_on_tensor_cores_without_a_prefill_kernel() {
        for scalar in [Scalar::F16, Scalar::Bf16] {
            for dtype in KvCacheDtype::ALL {
                let decode = Variant::tensor_core_decode(scalar, dtype);
                let prefill = Variant::tensor_core_prefill(scalar, dtype);
                if matches!(dtype, KvCacheDtype::Int4 { .. }) {
                    assert!(decode && !prefill, "{dtype}");
                } else {
                    assert_eq!(decode, prefill, "{dtype}");
                }
            }
        }
        // 16-bit KV of the other type runs the split kernel.
        assert!(!Variant::tensor_core_decode(
            Scalar::Bf16,
            KvCacheDtype::Fp16
        ));
    }

    #[test]
    fn a_model_preloads_only_variants_ci_compiles() {
        let all = Variant::all();
        let programs = |v: &[Variant]| v.iter().map(|v| v.program).collect::<Vec<_>>();
        // Llama-3.1-8B on one device, bf16 KV: every program, the tensor-core ones too.
        let bf16 = Variant::for_model(Scalar::Bf16, KvCacheDtype::Bf16, 128, 4);
        assert_eq!(
            programs(&bf16),
            [
                Program::Elementwise,
                Program::Sampling,
                Program::Gemv,
                Program::Cache,
                Program::PagedAttention,
                Program::PagedAttentionTc,
                Program::PagedPrefillTc
            ]
        );
        // int4 has no prefill kernel; 16-bit KV of the other type has neither tensor-core one.
        let int4 = KvCacheDtype::Int4 {
            group_size: kv_quant::Int4GroupSize::G32,
        };
        assert!(
            !programs(&Variant::for_model(Scalar::Bf16, int4, 128, 3))
                .contains(&Program::PagedPrefillTc)
        );
        let fp16 = programs(&Variant::for_model(Scalar::Bf16, KvCacheDtype::Fp16, 64, 3));
        assert!(!fp16.contains(&Program::PagedAttentionTc) && fp16.len() == 5);
        for dtype in KvCacheDtype::ALL {
            for v in Variant::for_model(Scalar::Bf16, dtype, 128, 3) {
                assert!(
                    all.contains(&v),
                    "{v} is not among the variants CI compiles"
                );
            }
        }
    }

    #[test]
    fn resource_report_is_parsed() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90'\nptxas info    : Function properties for k\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\nptxas info    : Used 40 registers, used 0 barriers";
        let s = resource_summary(log);
        assert_eq!(s.len(), 2);
        assert!(s[1].starts_with("k: Used 40 registers"));
    }
}
