//! End to end on tiny random Hugging Face checkpoints: each directory of `tests/data/tiny_hf/`
//! (made by `scripts/golden/make_tiny_hf.py`: config.json as transformers 5 writes it,
//! safetensors weights, a byte-level BPE tokenizer.json) is loaded with [`load_hf_dir`] and run
//! on the CPU backend through the paged KV cache, and its logits at every position of two
//! 20-token sequences are compared with those of HF transformers (f32, eager attention) stored
//! in the directory's `golden.json`.
//!
//! | variant | what it exercises |
//! | --- | --- |
//! | `llama3` | untied LM head, Llama 3 rope scaling (`rope_type: llama3`, original context 64, so the kept, smoothed and divided frequency bands all occur), rope_theta 5e5, bf16 |
//! | `qwen2` | Q/K/V biases, rope_theta 1e6, bf16 |
//! | `mistral` | sliding window 8 (the sequences are 20 tokens), bf16 |
//! | `llama_tied_sharded` | tied embeddings, f16, two safetensors shards + index |
//!
//! Each variant runs as one prefill, token by token, in chunks of 3, and as a mixed batch (both
//! sequences in the same forward passes, one in chunks of 11, the other of 3), over 8-token
//! blocks (the window releases blocks). Error = max |ours − golden| over all positions and the
//! whole vocabulary of a sequence, divided by the sequence's max |golden| (3.6 to 9.4).
//!
//! Tolerances, with the largest error measured over the four variants:
//!
//! | KV cache | tolerance | measured |
//! | --- | --- | --- |
//! | fp16 | 4e-3 | 1.9e-3 |
//! | bf16 | 2e-2 | 8.8e-3 |
//! | int8 | 8e-2 | 3.7e-2 |
//!
//! The weights are exact in f32 (bf16/f16 upcast), so the KV cache is the only rounding: with
//! transformers' K and V rounded to fp16 as well, its logits and ours agree within 1.6e-4
//! (checked once by hand). The four ways of running agree within 1e-5 (they are bit-identical
//! now). Negative controls: the same weights with the feature under test removed from a copy of
//! `config.json` (the llama3 scaling, rope_theta, the Q/K/V biases, the sliding window) must
//! move the error above 0.3 (measured 0.72 to 1.4), so each feature is really checked; and the
//! llama3 model must give the same logits with a pre-transformers-5 config (`rope_theta` and
//! `rope_scaling` instead of `rope_parameters`).
//!
//! The tensor-parallel shards (ranks 0 and 1 of 2) of every variant load with the expected
//! local shape and run; world sizes that do not divide the model are refused.
#![allow(clippy::unwrap_used)]

mod batched;

use std::fs;
use std::path::{Path, PathBuf};

use kv_quant::KvCacheDtype;
use model::generate::SequenceRunner;
use model::{
    Architecture, CpuBackend, KvCacheConfig, LocalShape, ModelError, RopeScaling, Shard,
    load_hf_dir,
};
use serde::Deserialize;
use serde_json::Value;

const VARIANTS: [&str; 4] = ["llama3", "qwen2", "mistral", "llama_tied_sharded"];
const BLOCK_SIZE: usize = 8;

/// Largest relative error allowed with each KV dtype (see the module doc).
fn tol(kv: KvCacheDtype) -> f32 {
    match kv {
        KvCacheDtype::Fp16 => 4e-3,
        KvCacheDtype::Bf16 => 2e-2,
        _ => 8e-2,
    }
}

/// A negative control must move the relative error above this.
const CONTROL_MIN_ERR: f32 = 0.3;

/// Largest relative difference allowed between ways of running the same sequence.
const SPREAD_TOL: f32 = 1e-5;

#[derive(Deserialize)]
struct Golden {
    vocab_size: usize,
    text: String,
    text_ids: Vec<u32>,
    sequences: Vec<GoldenSequence>,
}

#[derive(Deserialize)]
struct GoldenSequence {
    token_ids: Vec<u32>,
    logits_shape: [usize; 2],
    logits_f32le_b64: String,
}

impl GoldenSequence {
    fn logits(&self) -> Vec<f32> {
        let bytes = base64_decode(&self.logits_f32le_b64);
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(v.len(), self.logits_shape[0] * self.logits_shape[1]);
        assert_eq!(self.logits_shape[0], self.token_ids.len());
        v
    }
}

/// Standard base64 (with `=` padding).
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("invalid base64 character {c:?}"),
        })
    };
    let chars: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(chars.len() * 3 / 4);
    for chunk in chars.chunks(4) {
        let acc = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | value(c) << (18 - 6 * i));
        for i in 0..chunk.len() - 1 {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn data_dir(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tiny_hf")
        .join(variant)
}

fn golden(variant: &str) -> Golden {
    let text = fs::read_to_string(data_dir(variant).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn backend(dir: &Path, shard: Shard, kv: KvCacheDtype) -> CpuBackend {
    let loaded = load_hf_dir(dir, shard).unwrap();
    CpuBackend::new(
        loaded.weights,
        KvCacheConfig {
            num_blocks: 32,
            block_size: BLOCK_SIZE,
            dtype: kv,
            num_cpu_blocks: 0,
        },
    )
    .unwrap()
}

/// Max |got − want| over everything, relative to max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// Teacher-forced logits of every position of `tokens`, fed `chunk` tokens per forward pass.
fn run_chunked(b: &mut CpuBackend, tokens: &[u32], chunk: usize) -> Vec<f32> {
    SequenceRunner::new(b)
        .unwrap()
        .feed(tokens, chunk, true)
        .unwrap()
}

/// What running a model every way found.
#[derive(Debug, Default)]
struct Errors {
    /// The largest relative error against the golden logits, and the run that had it.
    worst: (f32, String),
    /// The largest relative difference of any run from the one-pass prefill of the same
    /// sequence (how much the cache path, chunking and batching change the result).
    spread: f32,
}

/// Runs `dir`'s model with KV cache `kv` every way (one prefill, token by token, chunks of 3,
/// a mixed batch of both sequences) and compares each run with `variant`'s golden logits.
fn errors(variant: &str, dir: &Path, kv: KvCacheDtype) -> Errors {
    let g = golden(variant);
    let mut b = backend(dir, Shard::FULL, kv);
    let wants: Vec<Vec<f32>> = g.sequences.iter().map(GoldenSequence::logits).collect();
    let mut runs: Vec<(usize, String, Vec<f32>)> = Vec::new();
    for (s, seq) in g.sequences.iter().enumerate() {
        for chunk in [seq.token_ids.len(), 1, 3] {
            let got = run_chunked(&mut b, &seq.token_ids, chunk);
            runs.push((s, format!("sequence {s}, chunks of {chunk}"), got));
        }
    }
    let seqs: Vec<&[u32]> = g.sequences.iter().map(|s| &s.token_ids[..]).collect();
    for (s, got) in batched::run_batched(&mut b, &seqs, &[11, 3])
        .into_iter()
        .enumerate()
    {
        runs.push((s, format!("sequence {s}, mixed batch"), got));
    }
    let mut e = Errors::default();
    for (s, what, got) in &runs {
        let err = rel_err(got, &wants[*s]);
        assert!(err.is_finite(), "{variant} {kv} {what}: error {err}");
        if err > e.worst.0 {
            e.worst = (err, what.clone());
        }
        // The first run of each sequence is its one-pass prefill.
        let prefill = &runs.iter().find(|r| r.0 == *s).unwrap().2;
        e.spread = e.spread.max(rel_err(got, prefill));
    }
    e
}

#[test]
fn configs_are_read_as_transformers_reads_them() {
    let config = |v: &str| {
        load_hf_dir(&data_dir(v), Shard::FULL)
            .unwrap()
            .weights
            .config()
            .clone()
    };
    let c = config("llama3");
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(c.rope_theta, 500_000.0);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        })
    );
    assert!(!c.tie_word_embeddings && !c.qkv_bias && c.sliding_window.is_none());
    let c = config("qwen2");
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert!(c.qkv_bias && c.rope_scaling.is_none() && c.sliding_window.is_none());
    let c = config("mistral");
    assert_eq!(c.architecture, Architecture::Mistral);
    assert_eq!(c.sliding_window, Some(8));
    let c = config("llama_tied_sharded");
    assert!(c.tie_word_embeddings);
    for v in VARIANTS {
        let c = config(v);
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_layers),
            (64, 64, 2),
            "{v}"
        );
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16), "{v}");
        assert_eq!((c.vocab_size, c.rms_norm_eps), (300, 1e-5), "{v}");
    }
}

#[test]
fn tokenizers_match_the_python_tokenizer() {
    for v in VARIANTS {
        let g = golden(v);
        let loaded = load_hf_dir(&data_dir(v), Shard::FULL).unwrap();
        assert_eq!(loaded.tokenizer.vocab_size(), g.vocab_size, "{v}");
        assert_eq!(loaded.tokenizer.encode(&g.text, false).unwrap(), g.text_ids);
        assert_eq!(loaded.tokenizer.decode(&g.text_ids, false).unwrap(), g.text);
    }
}

#[test]
fn logits_match_transformers() {
    for v in VARIANTS {
        for kv in [KvCacheDtype::Fp16, KvCacheDtype::Bf16, KvCacheDtype::Int8] {
            let e = errors(v, &data_dir(v), kv);
            let (err, what) = &e.worst;
            eprintln!(
                "{v} {kv}: max relative error {err:.2e} ({what}), spread {:.1e}",
                e.spread
            );
            assert!(
                *err <= tol(kv),
                "{v} with {kv} KV: relative error {err} > {} ({what})",
                tol(kv)
            );
            assert!(
                e.spread <= SPREAD_TOL,
                "{v} with {kv} KV: chunking or batching changes the logits by {}",
                e.spread
            );
        }
    }
}

/// A copy of `variant`'s directory with its `config.json` edited by `edit`.
fn with_config(variant: &str, edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(data_dir(variant)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let path = tmp.path().join("config.json");
    let mut config: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    tmp
}

#[test]
fn legacy_rope_keys_give_the_same_logits() {
    // Checkpoints saved before transformers 5 (e.g. Llama 3.x on the Hub) have `rope_theta`
    // and `rope_scaling` instead of `rope_parameters`.
    let dir = with_config("llama3", |c| {
        let mut rope = c["rope_parameters"].take();
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rope_theta"] = rope["rope_theta"].take();
        rope.as_object_mut().unwrap().remove("rope_theta");
        c["rope_scaling"] = rope;
    });
    let (err, what) = errors("llama3", dir.path(), KvCacheDtype::Fp16).worst;
    assert!(
        err <= tol(KvCacheDtype::Fp16),
        "legacy keys: {err} ({what})"
    );
}

#[test]
fn negative_controls_break_the_match() {
    type Edit = fn(&mut Value);
    let controls: [(&str, &str, Edit); 4] = [
        ("llama3", "llama3 rope scaling removed", |c| {
            c["rope_parameters"]["rope_type"] = "default".into();
        }),
        ("qwen2", "rope_theta 1e4 instead of 1e6", |c| {
            c["rope_parameters"]["rope_theta"] = 10_000.0.into();
        }),
        ("qwen2", "q/k/v biases ignored", |c| {
            c["attention_bias"] = false.into();
        }),
        ("mistral", "sliding window removed", |c| {
            c.as_object_mut().unwrap().remove("sliding_window");
        }),
    ];
    for (variant, what, edit) in controls {
        let dir = with_config(variant, edit);
        let g = golden(variant);
        let mut b = backend(dir.path(), Shard::FULL, KvCacheDtype::Fp16);
        let err = g
            .sequences
            .iter()
            .map(|s| rel_err(&run_chunked(&mut b, &s.token_ids, 5), &s.logits()))
            .fold(0.0f32, f32::max);
        eprintln!("{variant}, {what}: relative error {err:.3}");
        assert!(
            err > CONTROL_MIN_ERR,
            "{variant}, {what}: the logits still match (relative error {err})"
        );
    }
}

#[test]
fn tensor_parallel_shards_load_with_their_local_shapes() {
    for v in VARIANTS {
        let full = load_hf_dir(&data_dir(v), Shard::FULL).unwrap();
        for rank in 0..2 {
            let shard = Shard {
                rank,
                world_size: 2,
            };
            let loaded = load_hf_dir(&data_dir(v), shard).unwrap();
            let w = &loaded.weights;
            assert_eq!(w.shard(), shard);
            assert_eq!(
                w.local_shape(),
                LocalShape {
                    num_heads: 2,
                    num_kv_heads: 1,
                    intermediate_size: 32,
                    vocab_start: 150 * rank,
                    vocab_size: 150,
                },
                "{v} rank {rank}"
            );
            assert_eq!(w.config(), full.weights.config(), "{v} rank {rank}");
            // A shard alone computes partial sums: the single-rank backend refuses it (the
            // sharded forward, with the collectives, is tested in src/cpu/tests/).
            let refused = CpuBackend::new(
                loaded.weights,
                KvCacheConfig {
                    num_blocks: 8,
                    block_size: BLOCK_SIZE,
                    dtype: KvCacheDtype::Fp16,
                    num_cpu_blocks: 0,
                },
            );
            assert!(
                matches!(refused, Err(ModelError::ShardMismatch { .. })),
                "{v} rank {rank}: {refused:?}"
            );
        }
        for world_size in [3, 4] {
            let shard = Shard {
                rank: 0,
                world_size,
            };
            assert!(
                matches!(
                    load_hf_dir(&data_dir(v), shard),
                    Err(ModelError::Unsupported(_))
                ),
                "{v}: world size {world_size} must be refused"
            );
        }
    }
}
