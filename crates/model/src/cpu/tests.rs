//! The CPU backend against a dense, cache-free reference forward written for clarity, and
//! against itself across chunkings; plus bad batches.

use kv_quant::KvCacheDtype;

use super::*;
use crate::DType;
use crate::generate::SequenceRunner;

mod tensor_parallel;

fn tiny_config() -> ModelConfig {
    ModelConfig::tiny(96)
}

fn backend(config: &ModelConfig, dtype: DType, kv: KvCacheDtype) -> CpuBackend {
    let weights = Weights::dummy(config, dtype, 7).unwrap();
    CpuBackend::new(
        weights,
        KvCacheConfig {
            num_blocks: 64,
            block_size: 8,
            dtype: kv,
            num_cpu_blocks: 8,
        },
    )
    .unwrap()
}

fn dense(l: &Linear) -> Vec<f32> {
    let mut w = vec![0.0; l.in_features() * l.out_features()];
    for (r, row) in w.chunks_exact_mut(l.in_features()).enumerate() {
        l.dequantize_row_into(r, row);
    }
    w
}

fn matvec(w: &[f32], x: &[f32], out: usize) -> Vec<f32> {
    let k = x.len();
    (0..out)
        .map(|r| {
            w[r * k..(r + 1) * k]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

/// Teacher-forced next-token logits at every position, recomputing everything densely.
fn reference_logits(weights: &Weights, tokens: &[u32]) -> Vec<Vec<f32>> {
    let c = weights.config();
    let (h, d, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let inv = c.rope_inv_freqs();
    let t = tokens.len();
    let mut x: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&id| {
            let mut row = vec![0.0; h];
            weights.embedding.dequantize_row_into(id as usize, &mut row);
            row
        })
        .collect();
    let norm = |v: &[f32], w: &[f32]| {
        let mut o = vec![0.0; v.len()];
        rms_norm(v, w, c.rms_norm_eps, &mut o);
        o
    };
    for lw in &weights.layers {
        let (wq, wk, wv, wo) = (dense(&lw.wq), dense(&lw.wk), dense(&lw.wv), dense(&lw.wo));
        let (wg, wu, wd) = (dense(&lw.w_gate), dense(&lw.w_up), dense(&lw.w_down));
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (p, xt) in x.iter().enumerate() {
            let n = norm(xt, &lw.attn_norm);
            let biased = |mut y: Vec<f32>, l: &Linear| {
                for (a, b) in y.iter_mut().zip(l.bias().unwrap_or(&[])) {
                    *a += b;
                }
                y
            };
            let mut q = biased(matvec(&wq, &n, nh * d), &lw.wq);
            let mut k = biased(matvec(&wk, &n, nkv * d), &lw.wk);
            rope(&mut q, &[p as u32], d, &inv, c.rope_style);
            rope(&mut k, &[p as u32], d, &inv, c.rope_style);
            qs.push(q);
            ks.push(k);
            vs.push(biased(matvec(&wv, &n, nkv * d), &lw.wv));
        }
        for p in 0..t {
            let start = c.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w));
            let mut attn = vec![0.0f32; nh * d];
            for head in 0..nh {
                let g = head / (nh / nkv);
                let q = &qs[p][head * d..(head + 1) * d];
                let scores: Vec<f32> = (start..=p)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][g * d..(g + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, w) in (start..=p).zip(&e) {
                    for i in 0..d {
                        attn[head * d + i] += w / z * vs[j][g * d + i];
                    }
                }
            }
            let o = matvec(&wo, &attn, h);
            for (a, b) in x[p].iter_mut().zip(&o) {
                *a += b;
            }
        }
        for xt in &mut x {
            let n = norm(xt, &lw.ffn_norm);
            let g = matvec(&wg, &n, c.intermediate_size);
            let u = matvec(&wu, &n, c.intermediate_size);
            let a: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (xv, dv) in xt.iter_mut().zip(matvec(&wd, &a, h)) {
                *xv += dv;
            }
        }
    }
    let head = dense(weights.lm_head.as_ref().unwrap_or(&weights.embedding));
    x.iter()
        .map(|xt| matvec(&head, &norm(xt, &weights.final_norm), c.vocab_size))
        .collect()
}

fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

const TOKENS: [u32; 21] = [
    5, 17, 3, 88, 42, 42, 7, 1, 0, 95, 60, 61, 62, 9, 30, 31, 2, 77, 4, 50, 12,
];

fn run(b: &mut CpuBackend, chunk: usize) -> Vec<f32> {
    SequenceRunner::new(b)
        .unwrap()
        .feed(&TOKENS, chunk, true)
        .unwrap()
}

#[test]
fn matches_dense_reference_with_f32_weights() {
    for kv in [KvCacheDtype::Fp16, KvCacheDtype::Bf16, KvCacheDtype::Int8] {
        let mut b = backend(&tiny_config(), DType::F32, kv);
        let want = reference_logits(b.weights(), &TOKENS);
        let got = run(&mut b, 64);
        let tol = if kv == KvCacheDtype::Int8 { 3e-2 } else { 1e-2 };
        for (p, w) in want.iter().enumerate() {
            let err = max_rel_err(&got[p * 96..(p + 1) * 96], w);
            assert!(err < tol, "{kv}: position {p}: relative error {err}");
        }
    }
}

#[test]
fn matches_dense_reference_with_quantized_weights() {
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        let mut b = backend(&tiny_config(), dtype, KvCacheDtype::Fp16);
        let want = reference_logits(b.weights(), &TOKENS);
        let got = run(&mut b, 64);
        for (p, w) in want.iter().enumerate() {
            let err = max_rel_err(&got[p * 96..(p + 1) * 96], w);
            assert!(err < 5e-2, "{dtype}: position {p}: relative error {err}");
        }
    }
}

#[test]
fn chunking_does_not_change_the_result() {
    let config = tiny_config();
    let one = run(&mut backend(&config, DType::Q4_1, KvCacheDtype::Fp16), 64);
    for chunk in [1, 3, 8] {
        let got = run(
            &mut backend(&config, DType::Q4_1, KvCacheDtype::Fp16),
            chunk,
        );
        assert!(max_rel_err(&got, &one) < 1e-5, "chunk {chunk}");
    }
}

#[test]
fn sliding_window_matches_reference() {
    let mut config = tiny_config();
    config.sliding_window = Some(5);
    let mut b = backend(&config, DType::F32, KvCacheDtype::Fp16);
    let want = reference_logits(b.weights(), &TOKENS);
    let got = run(&mut b, 4);
    for (p, w) in want.iter().enumerate() {
        assert!(
            max_rel_err(&got[p * 96..(p + 1) * 96], w) < 1e-2,
            "position {p}"
        );
    }
}

#[test]
fn interleaved_rope_and_biases_match_reference() {
    let mut config = tiny_config();
    config.rope_style = RopeStyle::Interleaved;
    config.qkv_bias = true;
    config.tie_word_embeddings = false;
    let mut b = backend(&config, DType::F32, KvCacheDtype::Fp16);
    let want = reference_logits(b.weights(), &TOKENS);
    let got = run(&mut b, 7);
    for (p, w) in want.iter().enumerate() {
        assert!(
            max_rel_err(&got[p * 96..(p + 1) * 96], w) < 1e-2,
            "position {p}"
        );
    }
}

#[test]
fn bad_batches_are_rejected_before_any_write() {
    let mut b = backend(&tiny_config(), DType::F32, KvCacheDtype::Fp16);
    let before = (b.device.k.clone(), b.device.v.clone());
    let ok = ForwardBatch {
        token_ids: &[1, 2],
        positions: &[0, 1],
        slot_mapping: &[8, 9],
        seq_starts: &[0, 2],
        block_tables: &[1, -1],
        max_blocks: 2,
        context_lens: &[2],
        logits_indices: &[1],
    };
    let mut logits = Vec::new();
    let cases: Vec<(&str, ForwardBatch<'_>)> = vec![
        (
            "positions",
            ForwardBatch {
                positions: &[0],
                ..ok
            },
        ),
        (
            "slot_mapping",
            ForwardBatch {
                slot_mapping: &[8],
                ..ok
            },
        ),
        (
            "seq_starts",
            ForwardBatch {
                seq_starts: &[0, 3],
                ..ok
            },
        ),
        (
            "seq_starts",
            ForwardBatch {
                seq_starts: &[1, 2],
                ..ok
            },
        ),
        (
            "context_lens",
            ForwardBatch {
                context_lens: &[],
                ..ok
            },
        ),
        (
            "block_tables",
            ForwardBatch {
                block_tables: &[1],
                ..ok
            },
        ),
        (
            "token_ids",
            ForwardBatch {
                token_ids: &[1, 96],
                ..ok
            },
        ),
        (
            "slot_mapping",
            ForwardBatch {
                slot_mapping: &[8, 64 * 8],
                ..ok
            },
        ),
        (
            "slot_mapping",
            ForwardBatch {
                slot_mapping: &[8, 17],
                ..ok
            },
        ),
        (
            "logits_indices",
            ForwardBatch {
                logits_indices: &[2],
                ..ok
            },
        ),
        (
            "positions",
            ForwardBatch {
                context_lens: &[1],
                ..ok
            },
        ),
        // Writes land in block 1, but attention would read the prefix from "block 64".
        (
            "block_tables",
            ForwardBatch {
                positions: &[8, 9],
                block_tables: &[64, 1],
                context_lens: &[10],
                ..ok
            },
        ),
        (
            "block_tables",
            ForwardBatch {
                positions: &[8, 9],
                block_tables: &[-1, 1],
                context_lens: &[10],
                ..ok
            },
        ),
    ];
    for (field, batch) in cases {
        match b.forward(&batch, &mut logits) {
            Err(ModelError::InvalidBatch { field: f, reason }) => assert_eq!(f, field, "{reason}"),
            other => panic!("{field}: expected InvalidBatch, got {other:?}"),
        }
    }
    assert!(
        b.device.k == before.0 && b.device.v == before.1,
        "a rejected batch wrote K/V"
    );
    b.forward(&ok, &mut logits).unwrap();
    assert_eq!(logits.len(), 96);
    let bad_copy = [kv_block_manager::CopyOp {
        src: kv_block_manager::BlockId(0),
        dst: kv_block_manager::BlockId(64),
    }];
    assert!(b.copy_blocks(&bad_copy).is_err());
    assert!(b.swap_out(&bad_copy).is_err());
    assert!(b.swap_in(&bad_copy).is_err());
}

#[test]
fn swap_round_trip_preserves_blocks() {
    use kv_block_manager::{BlockId, CopyOp};
    let mut b = backend(&tiny_config(), DType::F32, KvCacheDtype::Int8);
    run(&mut b, 64);
    let blocks = b.device.k[0].clone();
    b.swap_out(&[CopyOp {
        src: BlockId(0),
        dst: BlockId(3),
    }])
    .unwrap();
    b.copy_blocks(&[CopyOp {
        src: BlockId(5),
        dst: BlockId(0),
    }])
    .unwrap();
    b.swap_in(&[CopyOp {
        src: BlockId(3),
        dst: BlockId(0),
    }])
    .unwrap();
    assert_eq!(b.device.k[0], blocks);
}

#[test]
fn tensor_parallel_shards_reassemble_the_full_layer() {
    // Q4_1 weights, 2 ranks: column-parallel outputs concatenate, row-parallel outputs add up.
    let mut config = tiny_config();
    config.num_heads = 4;
    config.num_kv_heads = 2;
    config.head_dim = 16;
    let full = Weights::dummy(&config, DType::Q4_1, 3).unwrap();
    let shards: Vec<Weights> = (0..2)
        .map(|rank| {
            Weights::dummy_shard(
                &config,
                DType::Q4_1,
                3,
                crate::Shard {
                    rank,
                    world_size: 2,
                },
            )
            .unwrap()
        })
        .collect();
    let x: Vec<f32> = (0..config.hidden_size)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let mut act = Activations::default();
    act.resize(1, config.hidden_size);
    act.f32.copy_from_slice(&x);
    act.prepare();
    let (mut y, mut tmp) = (Vec::new(), Vec::new());
    let lf = &full.layers[0];
    lf.wq.forward(&act, &mut y, &mut tmp);
    let mut parts = Vec::new();
    for s in &shards {
        assert_eq!(s.local_shape().num_heads, 2);
        assert_eq!(s.local_shape().num_kv_heads, 1);
        let mut part = Vec::new();
        s.layers[0].wq.forward(&act, &mut part, &mut tmp);
        parts.extend(part);
    }
    assert_eq!(
        parts, y,
        "column-parallel Q shards concatenate to the full Q"
    );
    // Row-parallel: the down projection's input is split; partial outputs sum to the full one.
    let inter = config.intermediate_size;
    let h: Vec<f32> = (0..inter).map(|i| (i as f32 * 0.11).cos()).collect();
    let mut act = Activations::default();
    act.resize(1, inter);
    act.f32.copy_from_slice(&h);
    act.prepare();
    lf.w_down.forward(&act, &mut y, &mut tmp);
    let mut sum = vec![0.0f32; config.hidden_size];
    for (rank, s) in shards.iter().enumerate() {
        let half = inter / 2;
        let mut a = Activations::default();
        a.resize(1, half);
        a.f32.copy_from_slice(&h[rank * half..(rank + 1) * half]);
        a.prepare();
        let mut part = Vec::new();
        s.layers[0].w_down.forward(&a, &mut part, &mut tmp);
        for (acc, p) in sum.iter_mut().zip(part) {
            *acc += p;
        }
    }
    let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (a, b) in sum.iter().zip(&y) {
        assert!(
            (a - b).abs() <= 1e-3 * scale,
            "row-parallel shards: {a} vs {b}"
        );
    }
    // A model that does not divide evenly is refused.
    let mut odd = tiny_config();
    odd.num_heads = 3;
    odd.num_kv_heads = 1;
    assert!(matches!(
        Weights::dummy_shard(
            &odd,
            DType::Q4_1,
            3,
            crate::Shard {
                rank: 0,
                world_size: 2
            }
        ),
        Err(ModelError::Unsupported(_))
    ));
}

/// Q4_K and Q6_K dequantization against `gguf.quants.dequantize` (the Python `gguf` package),
/// bit for bit, on the blocks of `tests/data/kquant/` (made by `scripts/golden/make_kquant.py`):
/// random super-blocks and edge ones (every packed scale bit set, near-maximal, zero and
/// subnormal f16 super-scales, negative scales). Not reachable through the public API, where
/// K-quants are re-encoded as Q8_0 on load; `tests/kquant_gguf.rs` covers the reader's side.
#[test]
fn k_quant_dequantization_matches_gguf_python() {
    #[derive(serde::Deserialize)]
    struct Expected {
        tensors: Vec<ExpectedTensor>,
    }
    #[derive(serde::Deserialize)]
    struct ExpectedTensor {
        name: String,
        dims: [usize; 2],
        expected_f32_bits: Vec<u32>,
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kquant");
    let text = std::fs::read_to_string(dir.join("kquant_expected.json")).unwrap();
    let expected: Expected = serde_json::from_str(&text).unwrap();
    let file = crate::GgufFile::open(&dir.join("kquant.gguf")).unwrap();
    let mut checked = Vec::new();
    for t in &expected.tensors {
        let view = file.tensor(&t.name).unwrap();
        let [cols, rows] = t.dims;
        let row_bytes = view.dtype.row_bytes(cols).unwrap();
        let mut got = vec![0.0f32; cols];
        for r in 0..rows {
            dequantize_row(
                view.dtype,
                &view.bytes[r * row_bytes..(r + 1) * row_bytes],
                &mut got,
            );
            let want = &t.expected_f32_bits[r * cols..(r + 1) * cols];
            for (i, (g, &w)) in got.iter().zip(want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w,
                    "{} row {r} element {i}: got {g}, expected {}",
                    t.name,
                    f32::from_bits(w)
                );
            }
        }
        checked.push(view.dtype);
    }
    assert_eq!(checked, [DType::Q4K, DType::Q6K]);
}
