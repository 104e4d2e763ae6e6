//! Model configuration: the shape of a Llama-family network, read from GGUF metadata or an HF
//! `config.json`, or taken from a preset.

use serde::Deserialize;

use crate::gguf::GgufValue;

/// Errors in a model configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required key is missing.
    #[error("model config: missing `{key}`")]
    Missing {
        /// The key (GGUF metadata key or config.json field).
        key: String,
    },
    /// A key has the wrong type or an invalid value.
    #[error("model config: `{key}` {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The architecture is not a Llama-family one kvserve supports.
    #[error("model config: unsupported architecture `{0}` (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    /// `config.json` is not valid JSON of the expected shape.
    #[error("model config: config.json: {0}")]
    Json(String),
}

/// The model families kvserve runs. SmolLM2 and Llama 2/3 are `Llama`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2, Llama 3, SmolLM2 and other `LlamaForCausalLM` models.
    Llama,
    /// Mistral (Llama with a sliding attention window).
    Mistral,
    /// Qwen2 (Llama with biases on the Q, K and V projections).
    Qwen2,
}

/// How rotary embeddings pair the channels of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Channels `(2i, 2i + 1)` rotate together: llama.cpp's layout for Llama GGUF files, whose
    /// Q and K rows were permuted at conversion.
    Interleaved,
    /// Channels `(i, i + d/2)` rotate together ("rotate half"): HF checkpoints, and GGUF files of
    /// NeoX-style models such as Qwen2.
    HalfSplit,
}

/// Llama 3 rope scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeScaling {
    /// Scale factor of the low frequencies.
    pub factor: f32,
    /// Wavelength ratio below which frequencies are scaled fully.
    pub low_freq_factor: f32,
    /// Wavelength ratio above which frequencies are kept.
    pub high_freq_factor: f32,
    /// Context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
}

/// The shape of a Llama-family network.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: fewer than `num_heads`; MQA: 1).
    pub num_kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and the LM head).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Channel pairing of RoPE (depends on where the weights came from).
    pub rope_style: RopeStyle,
    /// Llama 3 frequency scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Sliding attention window (Mistral), in tokens.
    pub sliding_window: Option<usize>,
    /// Q, K and V projections have biases (Qwen2).
    pub qkv_bias: bool,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// SmolLM2-135M(-Instruct), the default model.
    pub fn smollm2_135m() -> Self {
        Self {
            architecture: Architecture::Llama,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_style: RopeStyle::Interleaved,
            rope_scaling: None,
            max_position_embeddings: 8192,
            sliding_window: None,
            qkv_bias: false,
            tie_word_embeddings: true,
        }
    }

    /// A tiny Llama (2 layers, hidden 64, 4 query / 2 KV heads of 16, MLP 128, tied
    /// embeddings) with `vocab_size` tokens: for tests and examples with dummy weights.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            architecture: Architecture::Llama,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::HalfSplit,
            rope_scaling: None,
            max_position_embeddings: 256,
            sliding_window: None,
            qkv_bias: false,
            tie_word_embeddings: true,
        }
    }

    /// Llama-3.1-8B, for benchmarks of a large shape with dummy weights.
    pub fn llama31_8b() -> Self {
        Self {
            architecture: Architecture::Llama,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            vocab_size: 128_256,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_style: RopeStyle::HalfSplit,
            rope_scaling: Some(RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            max_position_embeddings: 131_072,
            sliding_window: None,
            qkv_bias: false,
            tie_word_embeddings: false,
        }
    }

    /// Width of the Q projection output (`num_heads * head_dim`).
    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the K (or V) projection output (`num_kv_heads * head_dim`).
    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Checks that the shape is consistent and within what the kernels support.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                reason,
            })
        };
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return invalid(key, "must be positive".into());
            }
            if v > 1 << 24 {
                return invalid(key, format!("is {v}, implausibly large"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return invalid(
                "num_kv_heads",
                format!(
                    "{} does not divide num_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return invalid(
                "head_dim",
                format!("is {}, must be even for RoPE", self.head_dim),
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return invalid("rms_norm_eps", format!("is {}", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return invalid("rope_theta", format!("is {}", self.rope_theta));
        }
        if self.sliding_window == Some(0) {
            return invalid("sliding_window", "must be positive".into());
        }
        if let Some(s) = self.rope_scaling
            && !(s.factor.is_finite()
                && s.factor >= 1.0
                && s.low_freq_factor > 0.0
                && s.high_freq_factor > s.low_freq_factor
                && s.original_max_position_embeddings > 0)
        {
            return invalid(
                "rope_scaling",
                format!("{s:?} is not a valid llama3 scaling"),
            );
        }
        Ok(())
    }

    /// Reads the configuration from GGUF metadata (`get` looks a key up).
    pub fn from_gguf<'a>(get: impl Fn(&str) -> Option<&'a GgufValue>) -> Result<Self, ConfigError> {
        let arch_name = get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| ConfigError::Missing {
                key: "general.architecture".into(),
            })?
            .to_owned();
        let architecture = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => return Err(ConfigError::UnsupportedArchitecture(other.to_owned())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let uint = |k: &str| -> Result<usize, ConfigError> {
            let full = key(k);
            let v = get(&full).ok_or_else(|| ConfigError::Missing { key: full.clone() })?;
            v.as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or(ConfigError::Invalid {
                    key: full,
                    reason: format!("is {v:?}, not an unsigned integer"),
                })
        };
        let opt_uint = |k: &str| get(&key(k)).and_then(GgufValue::as_u64);
        let float = |k: &str, default: f32| -> Result<f32, ConfigError> {
            match get(&key(k)) {
                None => Ok(default),
                Some(v) => v.as_f64().map(|f| f as f32).ok_or(ConfigError::Invalid {
                    key: key(k),
                    reason: format!("is {v:?}, not a number"),
                }),
            }
        };
        let hidden_size = uint("embedding_length")?;
        let num_heads = uint("attention.head_count")?;
        let num_kv_heads = opt_uint("attention.head_count_kv").map_or(Ok(num_heads), |v| {
            usize::try_from(v).map_err(|_| bad_int(&key("attention.head_count_kv")))
        })?;
        let head_dim =
            match opt_uint("attention.key_length").or_else(|| opt_uint("rope.dimension_count")) {
                Some(v) => usize::try_from(v).map_err(|_| bad_int(&key("attention.key_length")))?,
                None if num_heads > 0 => hidden_size / num_heads,
                None => 0,
            };
        let vocab_size = match opt_uint("vocab_size") {
            Some(v) => usize::try_from(v).map_err(|_| bad_int(&key("vocab_size")))?,
            None => get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(<[GgufValue]>::len)
                .ok_or_else(|| ConfigError::Missing {
                    key: key("vocab_size"),
                })?,
        };
        let rope_scaling = match get(&key("rope.scaling.type")).and_then(GgufValue::as_str) {
            Some("llama3") => Some(RopeScaling {
                factor: float("rope.scaling.factor", 8.0)?,
                low_freq_factor: float("rope.scaling.low_freq_factor", 1.0)?,
                high_freq_factor: float("rope.scaling.high_freq_factor", 4.0)?,
                original_max_position_embeddings: uint("rope.scaling.original_context_length")?,
            }),
            _ => None,
        };
        let config = Self {
            architecture,
            hidden_size,
            intermediate_size: uint("feed_forward_length")?,
            num_layers: uint("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_theta: float("rope.freq_base", 10_000.0)?,
            rope_style: match architecture {
                Architecture::Llama | Architecture::Mistral => RopeStyle::Interleaved,
                Architecture::Qwen2 => RopeStyle::HalfSplit,
            },
            rope_scaling,
            max_position_embeddings: uint("context_length")?,
            sliding_window: opt_uint("attention.sliding_window")
                .and_then(|w| usize::try_from(w).ok())
                .filter(|&w| w > 0),
            qkv_bias: architecture == Architecture::Qwen2,
            // Refined by the loader: tied exactly when the file has no `output.weight`.
            tie_word_embeddings: true,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the configuration from an HF `config.json` text.
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        let c: HfConfig =
            serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let architecture = match c.model_type.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => return Err(ConfigError::UnsupportedArchitecture(other.to_owned())),
        };
        // transformers >= 5 writes `rope_parameters` (type, theta and scaling together);
        // earlier versions `rope_theta` and `rope_scaling`. "default" is plain RoPE.
        let rope = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
        let rope_type = rope.and_then(|s| s.rope_type.as_deref().or(s.kind.as_deref()));
        let rope_scaling = match rope {
            Some(s)
                if rope_type == Some("default") || (rope_type.is_none() && s.factor.is_none()) =>
            {
                None
            }
            Some(s) if rope_type == Some("llama3") => Some(RopeScaling {
                factor: s.factor.unwrap_or(8.0),
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: s
                    .original_max_position_embeddings
                    .unwrap_or(8192),
            }),
            Some(_) => {
                return Err(ConfigError::Invalid {
                    key: if c.rope_parameters.is_some() {
                        "rope_parameters".into()
                    } else {
                        "rope_scaling".into()
                    },
                    reason: format!("type {rope_type:?} is not supported (only llama3)"),
                });
            }
            None => None,
        };
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let head_dim = c.head_dim.unwrap_or(
            c.hidden_size
                .checked_div(c.num_attention_heads)
                .unwrap_or(0),
        );
        let sliding_window = match architecture {
            Architecture::Qwen2 if !c.use_sliding_window.unwrap_or(false) => None,
            // Qwen2 windows only the layers from `max_window_layers` on (transformers'
            // `layer_types`): all of them, none of them, or a mix we do not run.
            Architecture::Qwen2 => match c.max_window_layers {
                Some(m) if m >= c.num_hidden_layers => None,
                Some(0) | None => c.sliding_window.filter(|&w| w > 0),
                Some(m) => {
                    return Err(ConfigError::Invalid {
                        key: "max_window_layers".into(),
                        reason: format!(
                            "{m} of {} layers without the sliding window: mixed layers are not supported",
                            c.num_hidden_layers
                        ),
                    });
                }
            },
            _ => c.sliding_window.filter(|&w| w > 0),
        };
        let config = Self {
            architecture,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope
                .and_then(|r| r.rope_theta)
                .or(c.rope_theta)
                .unwrap_or(10_000.0),
            rope_style: RopeStyle::HalfSplit,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(4096),
            sliding_window,
            qkv_bias: c
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }

    /// Inverse frequencies of RoPE for channel pair `i` of `head_dim / 2`, with Llama 3
    /// scaling applied.
    pub fn rope_inv_freqs(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let freq =
                    1.0 / f64::from(self.rope_theta).powf(2.0 * i as f64 / self.head_dim as f64);
                let Some(s) = self.rope_scaling else {
                    return freq as f32;
                };
                let old = s.original_max_position_embeddings as f64;
                let low_wavelen = old / f64::from(s.low_freq_factor);
                let high_wavelen = old / f64::from(s.high_freq_factor);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let factor = f64::from(s.factor);
                let scaled = if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / factor
                } else {
                    let smooth = (old / wavelen - f64::from(s.low_freq_factor))
                        / f64::from(s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * freq / factor + smooth * freq
                };
                scaled as f32
            })
            .collect()
    }
}

fn bad_int(key: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: "does not fit in usize".into(),
    }
}

/// The fields of an HF `config.json` that kvserve reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    /// transformers >= 5: `rope_theta` and the scaling fields in one object.
    rope_parameters: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Only in `rope_parameters`.
    rope_theta: Option<f32>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn smollm2_metadata() -> BTreeMap<String, GgufValue> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v| {
            m.insert(k.to_owned(), v);
        };
        put("general.architecture", GgufValue::String("llama".into()));
        put("llama.block_count", GgufValue::U32(30));
        put("llama.context_length", GgufValue::U32(8192));
        put("llama.embedding_length", GgufValue::U32(576));
        put("llama.feed_forward_length", GgufValue::U32(1536));
        put("llama.attention.head_count", GgufValue::U32(9));
        put("llama.attention.head_count_kv", GgufValue::U32(3));
        put("llama.rope.freq_base", GgufValue::F32(100_000.0));
        put(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        );
        put("llama.vocab_size", GgufValue::U32(49152));
        put("llama.rope.dimension_count", GgufValue::U32(64));
        m
    }

    #[test]
    fn reads_smollm2_from_gguf_metadata() {
        let m = smollm2_metadata();
        let c = ModelConfig::from_gguf(|k| m.get(k)).unwrap();
        assert_eq!(c, ModelConfig::smollm2_135m());
    }

    #[test]
    fn gguf_errors_name_the_key() {
        let mut m = smollm2_metadata();
        m.remove("llama.block_count");
        assert_eq!(
            ModelConfig::from_gguf(|k| m.get(k)),
            Err(ConfigError::Missing {
                key: "llama.block_count".into()
            })
        );
        let mut m = smollm2_metadata();
        m.insert("llama.attention.head_count_kv".into(), GgufValue::U32(2));
        assert!(matches!(
            ModelConfig::from_gguf(|k| m.get(k)),
            Err(ConfigError::Invalid { key, .. }) if key == "num_kv_heads"
        ));
        let mut m = smollm2_metadata();
        m.insert(
            "llama.block_count".into(),
            GgufValue::String("thirty".into()),
        );
        assert!(matches!(
            ModelConfig::from_gguf(|k| m.get(k)),
            Err(ConfigError::Invalid { key, .. }) if key == "llama.block_count"
        ));
        let mut m = smollm2_metadata();
        m.insert(
            "general.architecture".into(),
            GgufValue::String("gpt2".into()),
        );
        assert_eq!(
            ModelConfig::from_gguf(|k| m.get(k)),
            Err(ConfigError::UnsupportedArchitecture("gpt2".into()))
        );
    }

    #[test]
    fn qwen2_window_follows_max_window_layers() {
        let qwen = |extra: &str| {
            format!(
                r#"{{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,
                "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,
                "vocab_size":300,"sliding_window":8,"use_sliding_window":true{extra}}}"#
            )
        };
        let window =
            |extra: &str| ModelConfig::from_hf_json(&qwen(extra)).map(|c| c.sliding_window);
        assert_eq!(window(r#","max_window_layers":4"#), Ok(None));
        assert_eq!(window(r#","max_window_layers":28"#), Ok(None));
        assert_eq!(window(r#","max_window_layers":0"#), Ok(Some(8)));
        assert_eq!(window(""), Ok(Some(8)));
        assert!(matches!(
            window(r#","max_window_layers":2"#),
            Err(ConfigError::Invalid { key, .. }) if key == "max_window_layers"
        ));
    }

    #[test]
    fn reads_hf_configs() {
        let llama3 = r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
            "vocab_size":128256,"rms_norm_eps":1e-5,"rope_theta":500000.0,
            "max_position_embeddings":131072,"tie_word_embeddings":false,
            "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#;
        assert_eq!(
            ModelConfig::from_hf_json(llama3).unwrap(),
            ModelConfig::llama31_8b()
        );
        let mistral = r#"{"model_type":"mistral","hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
            "vocab_size":32000,"sliding_window":4096}"#;
        let c = ModelConfig::from_hf_json(mistral).unwrap();
        assert_eq!(
            (c.architecture, c.sliding_window),
            (Architecture::Mistral, Some(4096))
        );
        let qwen = r#"{"model_type":"qwen2","hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,
            "vocab_size":151936,"sliding_window":32768,"use_sliding_window":false,
            "tie_word_embeddings":true}"#;
        let c = ModelConfig::from_hf_json(qwen).unwrap();
        assert!(c.qkv_bias && c.tie_word_embeddings && c.sliding_window.is_none());
        assert_eq!(c.head_dim, 64);
    }

    #[test]
    fn reads_transformers_5_rope_parameters() {
        // transformers >= 5 writes rope_theta and the scaling into `rope_parameters`.
        let llama3 = r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
            "vocab_size":128256,"rms_norm_eps":1e-5,"max_position_embeddings":131072,
            "tie_word_embeddings":false,"rope_parameters":{"factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192,
            "rope_theta":500000.0,"rope_type":"llama3"}}"#;
        assert_eq!(
            ModelConfig::from_hf_json(llama3).unwrap(),
            ModelConfig::llama31_8b()
        );
        let qwen = r#"{"model_type":"qwen2","hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,
            "vocab_size":151936,"rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"}}"#;
        let c = ModelConfig::from_hf_json(qwen).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (1_000_000.0, None));
        let yarn = qwen.replace(r#""default""#, r#""yarn""#);
        assert!(matches!(
            ModelConfig::from_hf_json(&yarn),
            Err(ConfigError::Invalid { key, .. }) if key == "rope_parameters"
        ));
    }

    #[test]
    fn hf_errors_are_typed() {
        assert!(matches!(
            ModelConfig::from_hf_json("{"),
            Err(ConfigError::Json(_))
        ));
        assert!(matches!(
            ModelConfig::from_hf_json(r#"{"model_type":"bert"}"#),
            Err(ConfigError::Json(_))
        ));
        let zero = r#"{"model_type":"llama","hidden_size":0,"intermediate_size":1,
            "num_hidden_layers":1,"num_attention_heads":1,"vocab_size":1}"#;
        assert!(matches!(
            ModelConfig::from_hf_json(zero),
            Err(ConfigError::Invalid { key, .. }) if key == "hidden_size"
        ));
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let c = ModelConfig::llama31_8b();
        let plain = ModelConfig {
            rope_scaling: None,
            ..c.clone()
        }
        .rope_inv_freqs();
        let scaled = c.rope_inv_freqs();
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn the_committed_llama31_8b_config_is_the_builtin_shape() {
        let text = include_str!("../../../benches/models/llama-3.1-8b/config.json");
        let c = ModelConfig::from_hf_json(text).unwrap();
        assert_eq!(c, ModelConfig::llama31_8b());
    }
}
