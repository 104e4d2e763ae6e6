//! Prints the attention-level relative error of every KV-cache dtype:
//! `‖o_quant − o_f64‖₂ / ‖o_f64‖₂` for softmax(q·Kᵀ/√d)·V over 512 tokens,
//! Gaussian K/V/q, with and without outlier channels (3, 17, 42 of K and V
//! scaled ×20), head_dim 64 and 128, mean and max over 16 queries.
//!
//! `cargo run -p kv-quant --example attention_error --release`

#![allow(clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use kv_quant::{KvCacheDtype, KvQuantError};

fn main() -> Result<(), KvQuantError> {
    println!(
        "softmax(q·Kᵀ/√d)·V, {} tokens, block_size {}, {} queries; relative L2 error vs f64 (mean / max)\n",
        common::TOKENS,
        common::BLOCK_SIZE,
        common::QUERIES
    );
    println!("| dtype | d=64 Gaussian | d=64 outliers ×20 | d=128 Gaussian | d=128 outliers ×20 |");
    println!("|---|---|---|---|---|");
    let cases = [
        common::standard_case(64, false),
        common::standard_case(64, true),
        common::standard_case(128, false),
        common::standard_case(128, true),
    ];
    for dtype in KvCacheDtype::ALL {
        let mut row = format!("| `{dtype}` |");
        for case in &cases {
            match common::attention_rel_err(case, dtype, common::BLOCK_SIZE) {
                Ok((mean, max)) => row += &format!(" {mean:.2e} / {max:.2e} |"),
                // e.g. int4-g128 with head_dim 64.
                Err(KvQuantError::HeadDimNotMultipleOfGroup { .. }) => row += " n/a |",
                Err(e) => return Err(e),
            }
        }
        println!("{row}");
    }

    println!("\nK reconstruction error ‖K − K̂‖₂ / ‖K‖₂ (decode_slots), same data\n");
    println!("| dtype | d=64 Gaussian | d=64 outliers ×20 | d=128 Gaussian | d=128 outliers ×20 |");
    println!("|---|---|---|---|---|");
    for dtype in KvCacheDtype::ALL {
        let mut row = format!("| `{dtype}` |");
        for case in &cases {
            match k_reconstruction_error(case, dtype) {
                Ok(e) => row += &format!(" {e:.2e} |"),
                Err(KvQuantError::HeadDimNotMultipleOfGroup { .. }) => row += " n/a |",
                Err(e) => return Err(e),
            }
        }
        println!("{row}");
    }
    Ok(())
}

fn k_reconstruction_error(case: &common::Case, dtype: KvCacheDtype) -> Result<f64, KvQuantError> {
    let cache = common::quantize(case, dtype, common::BLOCK_SIZE)?;
    let bs = common::BLOCK_SIZE;
    let mut k_hat = vec![0.0f32; case.k.len()];
    for (block, out) in cache
        .k_blocks
        .iter()
        .zip(k_hat.chunks_mut(bs * case.head_dim))
    {
        let slots = out.len() / case.head_dim;
        kv_quant::decode_slots(&cache.layout, block, 0..slots, out)?;
    }
    let reference: Vec<f64> = case.k.iter().map(|&x| f64::from(x)).collect();
    Ok(common::rel_err(&k_hat, &reference))
}
