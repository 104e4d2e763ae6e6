//! Loading a model from a GGUF file or an HF directory: configuration, weights and tokenizer.

use std::path::Path;

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gguf::{GgufFile, TensorView};
use crate::safetensors::SafetensorsDir;
use crate::tokenizer::{GgufVocab, Tokenizer};
use crate::weights::{Shard, TensorSource, Weights};

/// A model ready to run: its weights (with the configuration) and its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    /// Weights and configuration.
    pub weights: Weights,
    /// Tokenizer and chat template.
    pub tokenizer: Tokenizer,
}

impl TensorSource for GgufFile {
    fn tensor(&self, name: &str) -> Result<Option<TensorView<'_>>, ModelError> {
        if self.tensor_info(name).is_none() {
            return Ok(None);
        }
        Ok(Some(GgufFile::tensor(self, name)?))
    }
}

/// The HF checkpoint name of a tensor named `gguf` in llama.cpp's scheme.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_owned());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let (tensor, suffix) = tensor.rsplit_once('.')?;
    let hf = match tensor {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

impl TensorSource for SafetensorsDir {
    fn tensor(&self, name: &str) -> Result<Option<TensorView<'_>>, ModelError> {
        match hf_name(name) {
            Some(hf) if self.contains(&hf) => Ok(Some(SafetensorsDir::tensor(self, &hf)?)),
            _ => Ok(None),
        }
    }
}

/// The weights of `shard` alone (no tokenizer) from a GGUF file or, for a directory, an HF
/// checkpoint: what each rank of a tensor-parallel group loads for itself.
pub fn load_weights(path: &Path, shard: Shard) -> Result<Weights, ModelError> {
    if path.is_dir() {
        hf_weights(&SafetensorsDir::open(path)?, shard)
    } else {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(|k| file.get(k))?;
        Weights::load(&config, &file, shard)
    }
}

/// The weights of `shard` of an opened HF checkpoint, configured by its `config.json`.
fn hf_weights(files: &SafetensorsDir, shard: Shard) -> Result<Weights, ModelError> {
    let text = files
        .config_json()
        .ok_or_else(|| ModelError::MissingTensor {
            name: "config.json".into(),
        })?;
    let config = ModelConfig::from_hf_json(text)?;
    Weights::load(&config, files, shard)
}

/// Loads a GGUF model file: configuration from its metadata, weights (as `shard`), and the
/// tokenizer built from its vocabulary.
pub fn load_gguf(path: &Path, shard: Shard) -> Result<LoadedModel, ModelError> {
    let file = GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(|k| file.get(k))?;
    let weights = Weights::load(&config, &file, shard)?;
    let tokenizer = Tokenizer::from_gguf(&GgufVocab::from_metadata(|k| file.get(k))?)?;
    Ok(LoadedModel { weights, tokenizer })
}

/// Loads an HF model directory: `config.json`, `*.safetensors` and `tokenizer.json`.
pub fn load_hf_dir(dir: &Path, shard: Shard) -> Result<LoadedModel, ModelError> {
    let files = SafetensorsDir::open(dir)?;
    let weights = hf_weights(&files, shard)?;
    let tokenizer_path = files
        .tokenizer_json_path()
        .ok_or_else(|| ModelError::MissingTensor {
            name: "tokenizer.json".into(),
        })?;
    let mut tokenizer = Tokenizer::from_file(&tokenizer_path)?;
    if let Some(config) = files.tokenizer_config_json() {
        tokenizer = tokenizer.with_hf_config(&config)?;
    }
    Ok(LoadedModel { weights, tokenizer })
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn maps_gguf_names_to_hf_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.bias").as_deref(),
            Some("model.layers.3.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("blk.12.ffn_down.weight").as_deref(),
            Some("model.layers.12.mlp.down_proj.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.1.unknown.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn load_weights_refuses_missing_and_junk_inputs() {
        use super::load_weights;
        use crate::weights::Shard;
        let dir = std::env::temp_dir().join(format!("kvserve-load-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let shard = Shard {
            rank: 1,
            world_size: 2,
        };
        assert!(load_weights(&dir.join("missing.gguf"), shard).is_err());
        let junk = dir.join("junk.gguf");
        std::fs::write(&junk, b"GGUF\x03\x00\x00\x00 not a model").unwrap();
        assert!(load_weights(&junk, shard).is_err());
        // A directory without config.json or safetensors.
        assert!(load_weights(&dir, shard).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn local_shape_names_what_does_not_divide() {
        use crate::config::ModelConfig;
        use crate::weights::{LocalShape, Shard};
        let c = ModelConfig::tiny(100);
        let shape = LocalShape::new(
            &c,
            Shard {
                rank: 1,
                world_size: 2,
            },
        )
        .unwrap();
        assert_eq!((shape.num_heads, shape.num_kv_heads), (2, 1));
        assert_eq!((shape.vocab_start, shape.vocab_size), (50, 50));
        let err = LocalShape::new(
            &c,
            Shard {
                rank: 0,
                world_size: 3,
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("4 query heads over 3 ranks"),
            "{err}"
        );
        assert!(
            LocalShape::new(
                &c,
                Shard {
                    rank: 2,
                    world_size: 2
                }
            )
            .is_err()
        );
        assert!(
            LocalShape::new(
                &c,
                Shard {
                    rank: 0,
                    world_size: 0
                }
            )
            .is_err()
        );
    }
}
