//! KV-cache storage formats for kvserve: `fp16`, `bf16`, `int8`, `int4` and
//! `fp8` (E4M3 / E5M2), and the byte layout of a KV block.
//!
//! This crate **owns**:
//!
//! * the dtypes ([`KvCacheDtype`]): their names, parsing, and the stable
//!   one-byte tags used as per-block dtype tags for precision tiering;
//! * the block layout ([`BlockLayout`], [`bytes_per_block`], and the
//!   [`layout`] module, which documents it byte by byte): the contract
//!   between the block pool, the CPU kernels and the CUDA kernels, rendered
//!   for the latter as `kernels/kv_layout.cuh` by [`render_cuda_header`];
//! * the CPU reference codecs: [`encode_token`] (quantize one token's K or V
//!   for all heads into a block slot), [`decode_slots`] (dequantize slots to
//!   f32), and the fused helpers the attention kernels mirror, [`dot_k`]
//!   (`q · dequant(k)` straight from the codes) and [`axpy_v`]
//!   (`acc += w · dequant(v)`).
//!
//! It is pure, synchronous, deterministic, `unsafe`-free Rust. Every public
//! function validates its arguments and returns [`KvQuantError`] rather than
//! panicking. Rounding, non-finite inputs and error bounds are documented on
//! the [`codec`] module.
//!
//! # Example
//!
//! ```
//! use kv_quant::{BlockLayout, KvCacheDtype, bytes_per_block, decode_slots, dot_k, encode_token};
//!
//! // Size the pool: K + V bytes of one block id, for one layer.
//! let per_layer = bytes_per_block(KvCacheDtype::Int8, 16, 8, 128)?;
//! assert_eq!(per_layer, 2 * 16896);
//!
//! // One K block: 16 slots, 2 kv heads of 64 channels, int8.
//! let layout = BlockLayout::new("int8".parse()?, 16, 2, 64)?;
//! let mut k_block = vec![0u8; layout.kv_block_bytes()];
//!
//! // Write one token (both heads, [head][dim]) into slot 3.
//! let k: Vec<f32> = (0..layout.values_per_token()).map(|i| (i as f32 * 0.37).sin()).collect();
//! encode_token(&layout, &mut k_block, 3, &k)?;
//!
//! // Read it back: within half a quantization step (1/127 of the head's max |x|).
//! let mut k_hat = vec![0.0f32; layout.values_per_token()];
//! decode_slots(&layout, &k_block, 3..4, &mut k_hat)?;
//! for (a, b) in k.iter().zip(&k_hat) {
//!     assert!((a - b).abs() <= 0.5 / 127.0 + 1e-6);
//! }
//!
//! // Attention logit for head 1 straight from the int8 codes.
//! let q = vec![0.125f32; 64];
//! let logit = dot_k(&layout, &k_block, 3, 1, &q)?;
//! let exact: f32 = q.iter().zip(&k[64..]).map(|(a, b)| a * b).sum();
//! assert!((logit - exact).abs() < 1e-2);
//!
//! // Bad input is an error, not a panic.
//! assert!(encode_token(&layout, &mut k_block, 16, &k).is_err());
//! # Ok::<(), kv_quant::KvQuantError>(())
//! ```
//!
//! # Design notes
//!
//! * **FP8 conversions are our own**, not the `float8` crate's: `float8`
//!   (a port of NVIDIA's `cuda_fp8.hpp`, i.e. exactly what the CUDA kernels
//!   will do) converts through `f64` with branches, which LLVM cannot
//!   vectorize: per value it measured ~5× slower to encode and ~8× slower to
//!   decode than ours on the build machine. Ours are branch-free and
//!   are checked against `float8` bit for bit: all 256 codes for decoding,
//!   every rounding boundary plus random inputs for encoding in the normal
//!   test run, and all 2³² `f32` inputs in an `#[ignore]`d test
//!   (`cargo test -p kv-quant --release -- --ignored`, ~1 min). `float8` is
//!   a dev-dependency only.
//! * **`f16` / `bf16` decoding** is also our own branch-free code (checked
//!   against `half` for all 65536 codes); encoding uses `half` (its slice
//!   conversion uses F16C when the CPU has it).
//! * **int4 zero point** is stored in value space, as `min` (the value of
//!   code 0), next to an f16 `scale`: `x̂ = code·scale + min` is one FMA on
//!   the GPU and needs no integer zero-point rounding, so the error bound is
//!   a clean `scale/2`. The group size is a closed enum
//!   ([`Int4GroupSize`]): unsupported sizes are unrepresentable after
//!   parsing, and every dtype has a tag.
//! * **int4 [`dot_k`]** dequantizes each code in registers and accumulates
//!   `q·k̂`, rather than the factored `scale·Σq·code + min·Σq`: with groups
//!   of 32 the per-group horizontal sums cost more than the two extra flops
//!   per value, and the result then equals `q ·` [`decode_slots`] up to
//!   summation order.

#![warn(missing_docs)]

pub mod codec;
mod convert;
mod dtype;
mod error;
mod header;
pub mod layout;

pub use codec::{axpy_v, decode_head, decode_slots, dot_k, encode_token};
pub use dtype::{Int4GroupSize, KvCacheDtype};
pub use error::KvQuantError;
pub use header::render_cuda_header;
pub use layout::{BlockLayout, MAX_KV_BLOCK_BYTES, SECTION_ALIGN, bytes_per_block};
