//! Attention-level accuracy: softmax(q·Kᵀ/√d)·V with K/V stored in each
//! dtype and read through `dot_k`/`axpy_v`, against f64 on the original data.
//! `cargo run -p kv-quant --example attention_error --release` prints the
//! full table (recorded in BENCH_NOTES.md).

// Helpers outside `#[test]` fns unwrap too (clippy.toml only exempts tests).
#![allow(clippy::unwrap_used)]

mod common;

use kv_quant::{Int4GroupSize, KvCacheDtype};

/// Asserted upper bounds on the mean relative error over the queries:
/// `(Gaussian, Gaussian with outlier channels ×20)`, about 1.5–2× the
/// measured values (the data and arithmetic are deterministic).
fn bounds(dtype: KvCacheDtype) -> (f64, f64) {
    match dtype {
        KvCacheDtype::Fp16 => (6e-4, 3e-3),
        KvCacheDtype::Bf16 => (5e-3, 2e-2),
        KvCacheDtype::Int8 => (2e-2, 0.2),
        KvCacheDtype::Fp8E4m3 => (6e-2, 0.15),
        KvCacheDtype::Fp8E5m2 => (0.12, 0.3),
        KvCacheDtype::Int4 {
            group_size: Int4GroupSize::G32,
        } => (0.2, 1.2),
        KvCacheDtype::Int4 { .. } => (0.25, 2.0),
    }
}

fn check(head_dim: usize) {
    let plain = common::standard_case(head_dim, false);
    let outliers = common::standard_case(head_dim, true);
    let mut means = Vec::new();
    for dtype in KvCacheDtype::ALL {
        let Ok((g_mean, g_max)) = common::attention_rel_err(&plain, dtype, common::BLOCK_SIZE)
        else {
            // int4-g128 does not fit head_dim 64.
            assert_eq!(
                !head_dim.is_multiple_of(128),
                dtype.name() == "int4-g128",
                "{dtype}"
            );
            continue;
        };
        let (o_mean, o_max) =
            common::attention_rel_err(&outliers, dtype, common::BLOCK_SIZE).unwrap();
        eprintln!(
            "d={head_dim} {dtype}: {g_mean:.2e}/{g_max:.2e}  outliers {o_mean:.2e}/{o_max:.2e}"
        );
        let (g_bound, o_bound) = bounds(dtype);
        assert!(
            g_mean <= g_bound,
            "{dtype} d={head_dim}: {g_mean} > {g_bound}"
        );
        assert!(
            o_mean <= o_bound,
            "{dtype} d={head_dim} outliers: {o_mean} > {o_bound}"
        );
        assert!(g_max.is_finite() && o_max.is_finite());
        means.push((dtype.name(), g_mean, o_mean));
    }
    let get = |name: &str| {
        means
            .iter()
            .find(|m| m.0 == name)
            .map(|m| (m.1, m.2))
            .unwrap()
    };
    // The expected ordering of precision.
    assert!(get("fp16").0 < get("bf16").0);
    assert!(get("bf16").0 < get("int8").0);
    assert!(get("int8").0 < get("fp8_e4m3").0);
    assert!(get("fp8_e4m3").0 < get("fp8_e5m2").0);
    assert!(get("fp8_e5m2").0 < get("int4").0);
    // Smaller int4 groups isolate outlier channels.
    assert!(get("int4-g32").1 < get("int4").1);
    // FP8 loses 4x to int8 on plain Gaussian data but its relative precision
    // keeps it level with int8 once outlier channels stretch the scale.
    assert!(get("fp8_e4m3").1 < get("int8").1 * 1.5);
}

#[test]
fn attention_accuracy_head_dim_64() {
    check(64);
}

#[test]
fn attention_accuracy_head_dim_128() {
    check(128);
}

#[test]
fn fused_attention_matches_dequantize_then_attend() {
    // dot_k/axpy_v must compute the same thing as decode_slots + f32 math.
    let case = common::make_case(7, 64, 64, 2, &common::OUTLIERS, 20.0);
    for dtype in KvCacheDtype::ALL {
        let Ok(cache) = common::quantize(&case, dtype, 16) else {
            continue;
        };
        let l = cache.layout;
        let mut k_hat = vec![0.0f32; case.k.len()];
        let mut v_hat = vec![0.0f32; case.v.len()];
        for (b, (kb, vb)) in cache.k_blocks.iter().zip(&cache.v_blocks).enumerate() {
            let span = b * 16 * 64..(b + 1) * 16 * 64;
            kv_quant::decode_slots(&l, kb, 0..16, &mut k_hat[span.clone()]).unwrap();
            kv_quant::decode_slots(&l, vb, 0..16, &mut v_hat[span]).unwrap();
        }
        let dequantized = common::Case {
            k: k_hat,
            v: v_hat,
            ..case.clone()
        };
        for q in case.queries.chunks_exact(64) {
            let want = common::attention_f64(&dequantized, q);
            let got = common::attention_quantized(&cache, case.tokens, q).unwrap();
            let e = common::rel_err(&got, &want);
            assert!(e < 2e-5, "{dtype}: fused vs dequantized {e}");
        }
    }
}
