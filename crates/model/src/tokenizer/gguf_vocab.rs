//! The tokenizer metadata of a GGUF file, and the HF tokenizer rebuilt from it.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{Result, TokenizerError};
use crate::gguf::GgufValue;

/// The `tokenizer.ggml.pre` values [`super::Tokenizer::from_gguf`] supports.
pub const SUPPORTED_GGUF_PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt2",
    "gpt-2",
    "smollm",
    "starcoder",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "qwen2",
    "deepseek-r1-qwen",
];

/// Llama-3's pattern (its `tokenizer.json`'s `Split`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pattern (Llama-3's with single digits).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The type of a GGUF token (`tokenizer.ggml.token_type`, llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufTokenType {
    /// 1: an ordinary vocabulary token.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token (`<|im_start|>`): special, dropped by `skip_special_tokens`.
    Control,
    /// 4: a user-defined token: matched in text as one token, kept when decoding.
    UserDefined,
    /// 5: an unused slot.
    Unused,
    /// 6: a byte token (`<0x0A>`, SentencePiece byte fallback).
    Byte,
    /// Any other value (0 is "undefined" in llama.cpp).
    Other(i64),
}

impl From<i64> for GgufTokenType {
    fn from(v: i64) -> Self {
        match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            other => Self::Other(other),
        }
    }
}

/// The tokenizer part of a GGUF file's metadata (keys `tokenizer.ggml.*` and
/// `tokenizer.chat_template`), read into plain fields.
///
/// Build it with [`GgufVocab::from_metadata`] from any metadata map, e.g.
/// `GgufVocab::from_metadata(|key| metadata.get(key))`.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE), `llama` (SentencePiece), ...
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer type (`smollm`, `llama-bpe`, `qwen2`, ...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token texts by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token (all [`GgufTokenType::Normal`] if absent).
    pub token_types: Vec<GgufTokenType>,
    /// `tokenizer.ggml.merges`: BPE merges by rank, `"left right"`.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (end of turn).
    pub eot_token_id: Option<u32>,
    /// `tokenizer.ggml.eom_token_id` (end of message).
    pub eom_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unknown_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos_token: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

impl GgufVocab {
    /// Reads the tokenizer metadata through `get`, which looks a key up in the file's
    /// metadata (`|key| metadata.get(key)` for a map). Checks types, per-token array lengths
    /// and that special token ids are tokens; does not check merges (see
    /// [`super::Tokenizer::from_gguf`]).
    pub fn from_metadata<'m>(get: impl Fn(&str) -> Option<&'m GgufValue>) -> Result<Self> {
        let model = required_str(&get, KEY_MODEL)?.to_owned();
        let pre = optional_str(&get, KEY_PRE)?.map(str::to_owned);
        let tokens = string_array(&get, KEY_TOKENS)?
            .ok_or(TokenizerError::MissingMetadata { key: KEY_TOKENS })?;
        let n = tokens.len();
        let token_types = match get(KEY_TOKEN_TYPE) {
            None => vec![GgufTokenType::Normal; n],
            Some(value) => {
                let items = value.as_array().ok_or(TokenizerError::InvalidMetadata {
                    key: KEY_TOKEN_TYPE,
                    expected: "an array of integers",
                })?;
                if items.len() != n {
                    return Err(TokenizerError::MetadataLength {
                        key: KEY_TOKEN_TYPE,
                        expected: n,
                        got: items.len(),
                    });
                }
                items
                    .iter()
                    .map(|v| {
                        as_i64(v)
                            .map(GgufTokenType::from)
                            .ok_or(TokenizerError::InvalidMetadata {
                                key: KEY_TOKEN_TYPE,
                                expected: "an array of integers",
                            })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let merges = string_array(&get, KEY_MERGES)?.unwrap_or_default();
        let id = |key: &'static str| -> Result<Option<u32>> {
            let Some(value) = get(key) else {
                return Ok(None);
            };
            let id = value.as_u64().ok_or(TokenizerError::InvalidMetadata {
                key,
                expected: "a non-negative integer",
            })?;
            match u32::try_from(id) {
                Ok(id) if (id as usize) < n => Ok(Some(id)),
                _ => Err(TokenizerError::SpecialTokenOutOfRange {
                    key,
                    id,
                    vocab_size: n,
                }),
            }
        };
        let flag = |key: &'static str| -> Result<Option<bool>> {
            get(key)
                .map(|v| {
                    v.as_bool().ok_or(TokenizerError::InvalidMetadata {
                        key,
                        expected: "a bool",
                    })
                })
                .transpose()
        };
        Ok(Self {
            model,
            pre,
            token_types,
            merges,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            eot_token_id: id("tokenizer.ggml.eot_token_id")?,
            eom_token_id: id("tokenizer.ggml.eom_token_id")?,
            unknown_token_id: id("tokenizer.ggml.unknown_token_id")?,
            padding_token_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos_token: flag("tokenizer.ggml.add_bos_token")?,
            add_eos_token: flag("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix")?,
            chat_template: optional_str(&get, KEY_CHAT_TEMPLATE)?.map(str::to_owned),
            tokens,
        })
    }
}

fn as_i64(v: &GgufValue) -> Option<i64> {
    match *v {
        GgufValue::I8(x) => Some(x.into()),
        GgufValue::I16(x) => Some(x.into()),
        GgufValue::I32(x) => Some(x.into()),
        GgufValue::I64(x) => Some(x),
        _ => v.as_u64().and_then(|x| i64::try_from(x).ok()),
    }
}

fn optional_str<'m>(
    get: &impl Fn(&str) -> Option<&'m GgufValue>,
    key: &'static str,
) -> Result<Option<&'m str>> {
    get(key)
        .map(|v| {
            v.as_str().ok_or(TokenizerError::InvalidMetadata {
                key,
                expected: "a string",
            })
        })
        .transpose()
}

fn required_str<'m>(
    get: &impl Fn(&str) -> Option<&'m GgufValue>,
    key: &'static str,
) -> Result<&'m str> {
    optional_str(get, key)?.ok_or(TokenizerError::MissingMetadata { key })
}

fn string_array<'m>(
    get: &impl Fn(&str) -> Option<&'m GgufValue>,
    key: &'static str,
) -> Result<Option<Vec<String>>> {
    let Some(value) = get(key) else {
        return Ok(None);
    };
    let invalid = TokenizerError::InvalidMetadata {
        key,
        expected: "an array of strings",
    };
    let Some(items) = value.as_array() else {
        return Err(invalid);
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item.as_str() {
            Some(s) => out.push(s.to_owned()),
            None => return Err(invalid),
        }
    }
    Ok(Some(out))
}

/// The pre-tokenizer families of the supported `tokenizer.ggml.pre` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreFamily {
    /// GPT-2: `ByteLevel(use_regex = true)`, whose pattern is
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// SmolLM / StarCoder: `Digits(individual)` then GPT-2.
    DigitsGpt2,
    /// Llama 3: its `Split` regex then `ByteLevel(use_regex = false)`; BPE ignores merges for
    /// words that are whole tokens.
    Llama3,
    /// Qwen2: NFC, its `Split` regex then `ByteLevel(use_regex = false)`.
    Qwen2,
}

fn pre_family(pre: Option<&str>) -> Result<PreFamily> {
    match pre.unwrap_or("default") {
        "default" | "gpt2" | "gpt-2" => Ok(PreFamily::Gpt2),
        "smollm" | "starcoder" => Ok(PreFamily::DigitsGpt2),
        "llama3" | "llama-v3" | "llama-bpe" => Ok(PreFamily::Llama3),
        "qwen2" | "deepseek-r1-qwen" => Ok(PreFamily::Qwen2),
        other => Err(TokenizerError::UnsupportedPreTokenizer {
            pre: other.to_owned(),
        }),
    }
}

/// Whether a GGUF without `tokenizer.ggml.add_bos_token` gets a BOS (llama.cpp's defaults).
pub(super) fn adds_bos_by_default(pre: Option<&str>) -> bool {
    matches!(pre_family(pre), Ok(PreFamily::Llama3))
}

fn split(pattern: &str) -> Result<PreTokenizerWrapper> {
    Split::new(
        SplitPattern::Regex(pattern.to_owned()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map(PreTokenizerWrapper::Split)
    .map_err(|e| TokenizerError::Build {
        message: e.to_string(),
    })
}

/// Builds the HF tokenizer of a GGUF vocabulary; also returns which ids have a token (all but
/// the later ids of a repeated text).
pub(super) fn build(vocab: &GgufVocab) -> Result<(tokenizers::Tokenizer, Vec<bool>)> {
    if vocab.model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel {
            model: vocab.model.clone(),
        });
    }
    let family = pre_family(vocab.pre.as_deref())?;

    let mut ids = Vocab::default();
    ids.reserve(vocab.tokens.len());
    let mut known = vec![false; vocab.tokens.len()];
    for (index, token) in vocab.tokens.iter().enumerate() {
        let id = u32::try_from(index).map_err(|_| TokenizerError::Build {
            message: format!("{} tokens do not fit u32 ids", vocab.tokens.len()),
        })?;
        // A repeated text keeps its first id.
        if let std::collections::hash_map::Entry::Vacant(slot) = ids.entry(token.clone()) {
            slot.insert(id);
            known[index] = true;
        }
    }
    let mut merges = Vec::with_capacity(vocab.merges.len());
    for (index, merge) in vocab.merges.iter().enumerate() {
        // As llama.cpp: split at the first space after the first character.
        let split_at = merge
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(i, _)| i);
        match split_at {
            Some(i) if i + 1 < merge.len() => {
                let (left, right) = (&merge[..i], &merge[i + 1..]);
                // Checked here, not left to `tokenizers`: its builder panics (slice index out
                // of range) on a merge whose concatenation is longer than every token
                // (found by the `gguf_reader` fuzz target).
                let joined = format!("{left}{right}");
                for token in [left, right, joined.as_str()] {
                    if !ids.contains_key(token) {
                        return Err(TokenizerError::MergeOutOfVocabulary {
                            index,
                            merge: merge.clone(),
                            token: token.to_owned(),
                        });
                    }
                }
                merges.push((left.to_owned(), right.to_owned()));
            }
            _ => {
                return Err(TokenizerError::InvalidMerge {
                    index,
                    merge: merge.clone(),
                });
            }
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(ids, merges)
        .ignore_merges(family == PreFamily::Llama3)
        .build()
        .map_err(|e| TokenizerError::Build {
            message: e.to_string(),
        })?;

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let pre_tokenizer = match family {
        PreFamily::Gpt2 => PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        PreFamily::DigitsGpt2 => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])),
        PreFamily::Llama3 => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(LLAMA3_PATTERN)?,
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])),
        PreFamily::Qwen2 => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(QWEN2_PATTERN)?,
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ])),
    };
    if family == PreFamily::Qwen2 {
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| TokenizerError::Build {
                message: e.to_string(),
            })?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (token, ty) in vocab.tokens.iter().zip(&vocab.token_types) {
        if token.is_empty() {
            continue;
        }
        match ty {
            GgufTokenType::Control => special.push(AddedToken::from(token.clone(), true)),
            GgufTokenType::UserDefined => {
                user_defined.push(AddedToken::from(token.clone(), false).normalized(false));
            }
            _ => {}
        }
    }
    let build_error = |e: tokenizers::Error| TokenizerError::Build {
        message: e.to_string(),
    };
    tokenizer.add_special_tokens(special).map_err(build_error)?;
    tokenizer.add_tokens(user_defined).map_err(build_error)?;
    Ok((tokenizer, known))
}
