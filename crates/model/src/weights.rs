//! Model weights in CPU memory, loaded from any [`TensorSource`] (GGUF, safetensors) or
//! generated (dummy weights for benchmarks of large shapes), optionally as one tensor-parallel
//! shard.
//!
//! Sharding is Megatron-style: Q/K/V and gate/up are column-parallel (each rank holds its
//! query heads, KV heads and MLP channels), the output and down projections row-parallel (each
//! rank holds the matching input columns; their bias, if any, stays on rank 0), and the
//! embedding and LM head vocab-parallel (each rank holds a contiguous range of token rows, see
//! [`Shard::vocab_range`]). When the model has fewer KV heads than ranks, each rank holds the
//! one KV head its query heads read (replicated over the ranks that share it).
//!
//! Tensor names are llama.cpp's GGUF names (`blk.{i}.attn_q.weight`, ...); other sources map
//! their names onto these.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::cpu::{Linear, dequantize_row};
use crate::error::ModelError;
use crate::gguf::TensorView;
use crate::{DType, ModelConfig};

/// Something tensors can be read from, by GGUF name.
pub trait TensorSource {
    /// The tensor `name`: `Ok(None)` if the source has no such tensor.
    fn tensor(&self, name: &str) -> Result<Option<TensorView<'_>>, ModelError>;
}

impl TensorSource for HashMap<String, (DType, Vec<usize>, Vec<u8>)> {
    fn tensor(&self, name: &str) -> Result<Option<TensorView<'_>>, ModelError> {
        Ok(self
            .get_key_value(name)
            .map(|(name, (dtype, dims, bytes))| TensorView {
                name,
                dtype: *dtype,
                dims: dims.clone(),
                bytes,
            }))
    }
}

/// Which part of the model a tensor-parallel rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
}

impl Shard {
    /// The whole model (one rank).
    pub const FULL: Shard = Shard {
        rank: 0,
        world_size: 1,
    };

    /// This rank's rows of a vocabulary of `vocab_size` tokens in the vocab-parallel embedding
    /// and LM head: `rank * vocab_size / world_size` up to `(rank + 1) * vocab_size /
    /// world_size`. A vocabulary that does not divide evenly is fine: ranks differ by at most
    /// one row (loading refuses a vocabulary smaller than the world, which would leave a rank
    /// none). A rank outside the world gets an empty range at the end.
    pub fn vocab_range(&self, vocab_size: usize) -> std::ops::Range<usize> {
        let w = self.world_size.max(1);
        // In u128: `rank * vocab_size` must not overflow; the result is at most `vocab_size`.
        let at = |r: usize| (r.min(w) as u128 * vocab_size as u128 / w as u128) as usize;
        at(self.rank)..at(self.rank.saturating_add(1))
    }

    /// The most vocabulary rows any rank holds, `ceil(vocab_size / world_size)`: the length
    /// every rank pads its slice of a logits row to for the all-gather.
    pub fn vocab_rows_per_rank(&self, vocab_size: usize) -> usize {
        vocab_size.div_ceil(self.world_size.max(1))
    }
}

/// The per-rank shape of a (possibly sharded) model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalShape {
    /// Query heads on this rank.
    pub num_heads: usize,
    /// KV heads on this rank (replicated when the model has fewer KV heads than ranks).
    pub num_kv_heads: usize,
    /// MLP width on this rank.
    pub intermediate_size: usize,
    /// First token id of this rank's vocabulary rows (embedding and LM head).
    pub vocab_start: usize,
    /// Vocabulary rows on this rank ([`Shard::vocab_range`]).
    pub vocab_size: usize,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: Linear,
    pub(crate) wk: Linear,
    pub(crate) wv: Linear,
    pub(crate) wo: Linear,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) w_gate: Linear,
    pub(crate) w_up: Linear,
    pub(crate) w_down: Linear,
}

/// All weights of a model (or of one tensor-parallel shard of it).
#[derive(Debug, Clone)]
pub struct Weights {
    pub(crate) config: ModelConfig,
    pub(crate) shard: Shard,
    pub(crate) local: LocalShape,
    pub(crate) embedding: Linear,
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) final_norm: Vec<f32>,
    /// `None`: tied to the embedding.
    pub(crate) lm_head: Option<Linear>,
}

fn missing(name: &str) -> ModelError {
    ModelError::MissingTensor {
        name: name.to_owned(),
    }
}

fn bad(name: &str, reason: String) -> ModelError {
    ModelError::BadTensor {
        name: name.to_owned(),
        reason,
    }
}

/// Reads a 1-D tensor of `len` values as f32.
fn vector(src: &dyn TensorSource, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let t = src.tensor(name)?.ok_or_else(|| missing(name))?;
    if t.dims.iter().product::<usize>() != len || t.dtype.is_quantized() {
        return Err(bad(
            name,
            format!(
                "expected {len} F32/F16/BF16 values, got {} {:?}",
                t.dtype, t.dims
            ),
        ));
    }
    let expected = t.dtype.row_bytes(len).unwrap_or(usize::MAX);
    if t.bytes.len() != expected {
        return Err(bad(
            name,
            format!("{} bytes, expected {expected}", t.bytes.len()),
        ));
    }
    let mut out = vec![0.0; len];
    dequantize_row(t.dtype, t.bytes, &mut out);
    Ok(out)
}

/// Reads a weight matrix of `out` rows by `inp` columns (GGML dims `[inp, out]`).
fn matrix(
    src: &dyn TensorSource,
    name: &str,
    inp: usize,
    out: usize,
    bias: Option<Vec<f32>>,
) -> Result<Linear, ModelError> {
    let t = src.tensor(name)?.ok_or_else(|| missing(name))?;
    if t.dims != [inp, out] {
        return Err(bad(
            name,
            format!("dims {:?}, expected [{inp}, {out}]", t.dims),
        ));
    }
    Linear::from_raw(name, t.dtype, inp, out, t.bytes, bias)
}

impl Weights {
    /// Loads every weight of `config` from `src`, keeping only `shard`'s part (column-parallel
    /// Q/K/V/gate/up, row-parallel output and down projections, vocab-parallel embedding and
    /// LM head; see the module docs). A model whose heads, KV heads, MLP width or vocabulary
    /// cannot be split over `shard.world_size` ranks is refused with
    /// [`ModelError::Unsupported`].
    pub fn load(
        config: &ModelConfig,
        src: &dyn TensorSource,
        shard: Shard,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let local = local_shape(config, shard)?;
        let (h, q, kv, inter) = (
            config.hidden_size,
            config.q_size(),
            config.kv_size(),
            config.intermediate_size,
        );
        let vocab_rows = |l: Linear| {
            if shard.world_size == 1 {
                l
            } else {
                l.slice_rows(shard.vocab_range(config.vocab_size))
            }
        };
        let embedding = vocab_rows(matrix(
            src,
            "token_embd.weight",
            h,
            config.vocab_size,
            None,
        )?);
        let lm_head = match src.tensor("output.weight")? {
            Some(_) => Some(vocab_rows(matrix(
                src,
                "output.weight",
                h,
                config.vocab_size,
                None,
            )?)),
            None => None,
        };
        let mut config = config.clone();
        config.tie_word_embeddings = lm_head.is_none();
        let layers = (0..config.num_layers)
            .map(|i| {
                let name = |t: &str| format!("blk.{i}.{t}");
                let bias = |t: &str, len| -> Result<Option<Vec<f32>>, ModelError> {
                    if config.qkv_bias {
                        vector(src, &name(t), len).map(Some)
                    } else {
                        Ok(None)
                    }
                };
                let full = LayerWeights {
                    attn_norm: vector(src, &name("attn_norm.weight"), h)?,
                    wq: matrix(src, &name("attn_q.weight"), h, q, bias("attn_q.bias", q)?)?,
                    wk: matrix(src, &name("attn_k.weight"), h, kv, bias("attn_k.bias", kv)?)?,
                    wv: matrix(src, &name("attn_v.weight"), h, kv, bias("attn_v.bias", kv)?)?,
                    wo: matrix(src, &name("attn_output.weight"), q, h, None)?,
                    ffn_norm: vector(src, &name("ffn_norm.weight"), h)?,
                    w_gate: matrix(src, &name("ffn_gate.weight"), h, inter, None)?,
                    w_up: matrix(src, &name("ffn_up.weight"), h, inter, None)?,
                    w_down: matrix(src, &name("ffn_down.weight"), inter, h, None)?,
                };
                Ok(shard_layer(&config, &local, shard, full))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            final_norm: vector(src, "output_norm.weight", h)?,
            config,
            shard,
            local,
            embedding,
            layers,
            lm_head,
        })
    }

    /// Random weights of `config`'s shape (seeded, deterministic), stored as `dtype` (F32,
    /// Q8_0, Q4_0 or Q4_1), like vLLM's `load_format=dummy`: for speed measurements only.
    pub fn dummy(config: &ModelConfig, dtype: DType, seed: u64) -> Result<Self, ModelError> {
        Self::dummy_shard(config, dtype, seed, Shard::FULL)
    }

    /// [`Weights::dummy`], keeping only `shard`'s part (the same values as the matching slices
    /// of the unsharded dummy model with the same seed).
    pub fn dummy_shard(
        config: &ModelConfig,
        dtype: DType,
        seed: u64,
        shard: Shard,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        if !matches!(dtype, DType::F32 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1) {
            return Err(ModelError::Unsupported(format!("dummy weights in {dtype}")));
        }
        let mut src: HashMap<String, (DType, Vec<usize>, Vec<u8>)> = HashMap::new();
        let (h, q, kv, inter) = (
            config.hidden_size,
            config.q_size(),
            config.kv_size(),
            config.intermediate_size,
        );
        let mut put_matrix = |name: String, inp: usize, out: usize| {
            let bytes = random_matrix(dtype, inp, out, seed ^ fxhash(&name));
            src.insert(name, (dtype, vec![inp, out], bytes));
        };
        put_matrix("token_embd.weight".into(), h, config.vocab_size);
        if !config.tie_word_embeddings {
            put_matrix("output.weight".into(), h, config.vocab_size);
        }
        for i in 0..config.num_layers {
            put_matrix(format!("blk.{i}.attn_q.weight"), h, q);
            put_matrix(format!("blk.{i}.attn_k.weight"), h, kv);
            put_matrix(format!("blk.{i}.attn_v.weight"), h, kv);
            put_matrix(format!("blk.{i}.attn_output.weight"), q, h);
            put_matrix(format!("blk.{i}.ffn_gate.weight"), h, inter);
            put_matrix(format!("blk.{i}.ffn_up.weight"), h, inter);
            put_matrix(format!("blk.{i}.ffn_down.weight"), inter, h);
        }
        let ones = |len: usize| {
            (
                DType::F32,
                vec![len],
                [1.0f32]
                    .repeat(len)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            )
        };
        for i in 0..config.num_layers {
            src.insert(format!("blk.{i}.attn_norm.weight"), ones(h));
            src.insert(format!("blk.{i}.ffn_norm.weight"), ones(h));
            if config.qkv_bias {
                // Random, not zero: a bias that is dropped or added twice must show.
                for (t, len) in [("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
                    let name = format!("blk.{i}.{t}");
                    let bytes = random_matrix(DType::F32, len, 1, seed ^ fxhash(&name));
                    src.insert(name, (DType::F32, vec![len], bytes));
                }
            }
        }
        src.insert("output_norm.weight".into(), ones(h));
        Self::load(config, &src, shard)
    }

    /// The same weights dequantized to f32 (see [`Linear::to_f32`]): the exact-math reference
    /// of the quantized kernels, four times the memory of Q8_0.
    pub fn to_f32(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| LayerWeights {
                attn_norm: l.attn_norm.clone(),
                wq: l.wq.to_f32(),
                wk: l.wk.to_f32(),
                wv: l.wv.to_f32(),
                wo: l.wo.to_f32(),
                ffn_norm: l.ffn_norm.clone(),
                w_gate: l.w_gate.to_f32(),
                w_up: l.w_up.to_f32(),
                w_down: l.w_down.to_f32(),
            })
            .collect();
        Self {
            config: self.config.clone(),
            shard: self.shard,
            local: self.local,
            embedding: self.embedding.to_f32(),
            layers,
            final_norm: self.final_norm.clone(),
            lm_head: self.lm_head.as_ref().map(Linear::to_f32),
        }
    }

    /// The model configuration (with `tie_word_embeddings` as found in the weights).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The shard these weights are.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The per-rank shape.
    pub fn local_shape(&self) -> LocalShape {
        self.local
    }
}

impl LocalShape {
    /// The part of `config` that `shard` holds.
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] naming what does not divide evenly over the ranks (query
    /// heads, KV heads, MLP width, vocabulary, quantization blocks), as loading does.
    pub fn new(config: &ModelConfig, shard: Shard) -> Result<Self, ModelError> {
        local_shape(config, shard)
    }
}

/// Heads and MLP width held by `shard`, checking that the model divides evenly.
fn local_shape(config: &ModelConfig, shard: Shard) -> Result<LocalShape, ModelError> {
    let Shard {
        rank,
        world_size: w,
    } = shard;
    let unsupported = |what: String| Err(ModelError::Unsupported(what));
    if w == 0 || rank >= w {
        return unsupported(format!("shard rank {rank} of world size {w}"));
    }
    if !config.num_heads.is_multiple_of(w) {
        return unsupported(format!("{} query heads over {w} ranks", config.num_heads));
    }
    if config.num_kv_heads >= w && !config.num_kv_heads.is_multiple_of(w) {
        return unsupported(format!("{} KV heads over {w} ranks", config.num_kv_heads));
    }
    // Replicated KV heads: each rank's query heads must all read one KV head, which holds
    // when the ranks are a multiple of the KV heads.
    if config.num_kv_heads < w && !w.is_multiple_of(config.num_kv_heads) {
        return unsupported(format!(
            "{} KV heads replicated over {w} ranks (the ranks must be a multiple of the KV \
             heads, so that each rank's query heads share one)",
            config.num_kv_heads
        ));
    }
    if config.vocab_size < w {
        return unsupported(format!(
            "a vocabulary of {} tokens over {w} ranks (each rank needs at least one)",
            config.vocab_size
        ));
    }
    if !config.intermediate_size.is_multiple_of(w) {
        return unsupported(format!(
            "MLP width {} over {w} ranks",
            config.intermediate_size
        ));
    }
    let local = LocalShape {
        num_heads: config.num_heads / w,
        num_kv_heads: (config.num_kv_heads / w).max(1),
        intermediate_size: config.intermediate_size / w,
        vocab_start: shard.vocab_range(config.vocab_size).start,
        vocab_size: shard.vocab_range(config.vocab_size).len(),
    };
    // Row-parallel slices (of the output and down projections) must fall on whole blocks of
    // the quantized formats (32 values).
    if w > 1
        && !((local.num_heads * config.head_dim).is_multiple_of(32)
            && local.intermediate_size.is_multiple_of(32))
    {
        return unsupported(format!(
            "shards of {} attention channels / {} MLP channels are not whole 32-value blocks",
            local.num_heads * config.head_dim,
            local.intermediate_size
        ));
    }
    Ok(local)
}

/// Keeps `shard`'s slice of a full layer. Row-parallel slices must fall on quantization
/// blocks; when they do not, loading fails earlier in [`local_shape`]'s callers' checks.
fn shard_layer(
    config: &ModelConfig,
    local: &LocalShape,
    shard: Shard,
    full: LayerWeights,
) -> LayerWeights {
    if shard.world_size == 1 {
        return full;
    }
    let d = config.head_dim;
    let r = shard.rank;
    let q_rows = r * local.num_heads * d..(r + 1) * local.num_heads * d;
    let kv_head = if config.num_kv_heads >= shard.world_size {
        r * local.num_kv_heads
    } else {
        // Replicated: the KV head of this rank's query heads.
        r * local.num_heads / (config.num_heads / config.num_kv_heads)
    };
    let kv_rows = kv_head * d..(kv_head + local.num_kv_heads) * d;
    let inter = r * local.intermediate_size..(r + 1) * local.intermediate_size;
    LayerWeights {
        attn_norm: full.attn_norm,
        wq: full.wq.slice_rows(q_rows.clone()),
        wk: full.wk.slice_rows(kv_rows.clone()),
        wv: full.wv.slice_rows(kv_rows),
        wo: full.wo.slice_cols(q_rows, r == 0),
        ffn_norm: full.ffn_norm,
        w_gate: full.w_gate.slice_rows(inter.clone()),
        w_up: full.w_up.slice_rows(inter.clone()),
        w_down: full.w_down.slice_cols(inter, r == 0),
    }
}

/// FNV-1a of `s`: stable across processes and builds (seeds, configuration fingerprints).
pub(crate) fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `out` rows of `inp` random values in ±1/sqrt(inp), stored as `dtype`.
fn random_matrix(dtype: DType, inp: usize, out: usize, seed: u64) -> Vec<u8> {
    let row_bytes = dtype.row_bytes(inp).unwrap_or(0);
    let amp = 1.0 / (inp as f32).sqrt();
    let mut data = vec![0u8; row_bytes * out];
    data.par_chunks_mut(row_bytes.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let mut s = seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            match dtype {
                DType::F32 => {
                    for v in row.chunks_exact_mut(4) {
                        let x = (next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                        v.copy_from_slice(&(x * amp).to_le_bytes());
                    }
                }
                _ => {
                    let header = dtype.block_bytes() - if dtype == DType::Q8_0 { 32 } else { 16 };
                    for block in row.chunks_exact_mut(dtype.block_bytes()) {
                        let (head, codes) = block.split_at_mut(header);
                        let (d, m) = match dtype {
                            DType::Q8_0 => (amp / 127.0, None),
                            DType::Q4_0 => (amp / 8.0, None),
                            _ => (2.0 * amp / 15.0, Some(-amp)),
                        };
                        head[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                        if let Some(m) = m {
                            head[2..4].copy_from_slice(&half::f16::from_f32(m).to_le_bytes());
                        }
                        for c in codes.chunks_mut(8) {
                            let bytes = next().to_le_bytes();
                            c.copy_from_slice(&bytes[..c.len()]);
                        }
                    }
                }
            }
        });
    data
}
