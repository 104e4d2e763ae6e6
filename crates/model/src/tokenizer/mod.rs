//! Tokenizer, chat template and incremental detokenizer.
//!
//! [`Tokenizer`] wraps Hugging Face's `tokenizers` crate. It is built either from a
//! `tokenizer.json` ([`Tokenizer::from_file`], optionally with the model's
//! `tokenizer_config.json`, [`Tokenizer::with_hf_config`]) or from the tokenizer metadata of a
//! GGUF file ([`GgufVocab`] → [`Tokenizer::from_gguf`]), which rebuilds the BPE model, the
//! pre-tokenizer chain HF uses for that model family, the special tokens and the byte-level
//! decoder, so that ids match the model's own `tokenizer.json`.
//!
//! - [`ChatTemplate`] renders the model's Jinja chat template with `minijinja`, configured like
//!   transformers' `apply_chat_template` (`trim_blocks`, `lstrip_blocks`, Python string methods,
//!   `raise_exception`, a Python-compatible `tojson`).
//! - [`IncrementalDetokenizer`] turns a stream of generated ids into text chunks that never split
//!   a UTF-8 character and whose concatenation is exactly the full decode.
//!
//! Special tokens written in the text (`<|im_start|>`) are always parsed as special tokens, as
//! in HF `tokenizers`; `add_special_tokens` only controls the BOS/EOS the tokenizer adds around
//! the text.
//!
//! ```no_run
//! use model::tokenizer::{ChatMessage, IncrementalDetokenizer, Tokenizer};
//!
//! let tokenizer = Tokenizer::from_file("tokenizer.json")?;
//! let prompt = tokenizer.apply_chat_template(&[ChatMessage::user("Hi!")], true)?;
//! let ids = tokenizer.encode(&prompt, false)?;
//! let mut detok = IncrementalDetokenizer::new(true);
//! for id in [19556u32, 905] {
//!     print!("{}", detok.push(&tokenizer, id)?);
//! }
//! print!("{}", detok.finish(&tokenizer)?);
//! # let _ = ids;
//! # Ok::<(), model::tokenizer::TokenizerError>(())
//! ```

mod chat;
mod detokenizer;
mod gguf_vocab;
mod hf_config;

use std::fmt;
use std::path::{Path, PathBuf};

use tokenizers::PostProcessor;

pub use chat::{ChatMessage, ChatTemplate};
pub use detokenizer::IncrementalDetokenizer;
pub use gguf_vocab::{GgufTokenType, GgufVocab, SUPPORTED_GGUF_PRE_TOKENIZERS};

/// Texts of tokens that end a turn or a generation in common chat models. A special token with
/// one of these texts is added to [`Tokenizer::eos_token_ids`] (as llama.cpp does).
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<EOT>",
    "<|return|>",
    "<｜end▁of▁sentence｜>",
];

/// Errors of tokenization, detokenization and chat templates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A tokenizer file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A `tokenizer.json` could not be parsed or is not a tokenizer `tokenizers` supports.
    #[error("cannot load tokenizer.json: {message}")]
    Load {
        /// What `tokenizers` reported.
        message: String,
    },
    /// A `tokenizer_config.json` is not valid.
    #[error("invalid tokenizer_config.json: {message}")]
    InvalidConfig {
        /// What is wrong.
        message: String,
    },
    /// A required GGUF tokenizer key is absent.
    #[error("GGUF tokenizer metadata `{key}` is missing")]
    MissingMetadata {
        /// The GGUF key.
        key: &'static str,
    },
    /// A GGUF tokenizer key has a value of the wrong type.
    #[error("GGUF tokenizer metadata `{key}` is not {expected}")]
    InvalidMetadata {
        /// The GGUF key.
        key: &'static str,
        /// What it should be.
        expected: &'static str,
    },
    /// A per-token GGUF array does not have one entry per token.
    #[error(
        "GGUF tokenizer metadata `{key}` has {got} entries, expected {expected} (one per token)"
    )]
    MetadataLength {
        /// The GGUF key.
        key: &'static str,
        /// The number of tokens.
        expected: usize,
        /// The array's length.
        got: usize,
    },
    /// A special token id in the GGUF metadata is not a token of the vocabulary.
    #[error(
        "GGUF tokenizer metadata `{key}` = {id} is outside the vocabulary of {vocab_size} tokens"
    )]
    SpecialTokenOutOfRange {
        /// The GGUF key.
        key: &'static str,
        /// The id it holds.
        id: u64,
        /// The number of tokens.
        vocab_size: usize,
    },
    /// The GGUF tokenizer model (`tokenizer.ggml.model`) is not supported.
    #[error(
        "GGUF tokenizer model `{model}` is not supported (supported: `gpt2`, byte-level BPE; \
         SentencePiece `llama` vocabularies are not supported yet)"
    )]
    UnsupportedModel {
        /// The model name.
        model: String,
    },
    /// The GGUF pre-tokenizer type (`tokenizer.ggml.pre`) is not supported.
    #[error(
        "GGUF pre-tokenizer `{pre}` is not supported (supported: {})",
        SUPPORTED_GGUF_PRE_TOKENIZERS.join(", ")
    )]
    UnsupportedPreTokenizer {
        /// The pre-tokenizer type.
        pre: String,
    },
    /// A BPE merge rule of the GGUF metadata is malformed.
    #[error("GGUF merge {index} `{merge}` is not two space-separated tokens")]
    InvalidMerge {
        /// Position of the merge in `tokenizer.ggml.merges`.
        index: usize,
        /// The merge rule.
        merge: String,
    },
    /// A BPE merge rule of the GGUF metadata names a token that is not in the vocabulary:
    /// one of its two parts, or their concatenation (the token it makes).
    #[error("GGUF merge {index} `{merge}`: `{token}` is not in the vocabulary")]
    MergeOutOfVocabulary {
        /// Position of the merge in `tokenizer.ggml.merges`.
        index: usize,
        /// The merge rule.
        merge: String,
        /// The missing token.
        token: String,
    },
    /// `tokenizers` rejected the tokenizer assembled from GGUF metadata.
    #[error("cannot build the tokenizer: {message}")]
    Build {
        /// What `tokenizers` reported.
        message: String,
    },
    /// A token id that is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownTokenId {
        /// The id.
        id: u32,
        /// The vocabulary size (ids are below it, though not every id below it need exist).
        vocab_size: usize,
    },
    /// Encoding failed inside `tokenizers`.
    #[error("cannot encode text: {message}")]
    Encode {
        /// What `tokenizers` reported.
        message: String,
    },
    /// Decoding failed inside `tokenizers`.
    #[error("cannot decode ids: {message}")]
    Decode {
        /// What `tokenizers` reported.
        message: String,
    },
    /// The tokenizer has no chat template.
    #[error("the tokenizer has no chat template")]
    NoChatTemplate,
    /// The chat template failed to compile or to render.
    ///
    /// `raised` is true when the template itself rejected the conversation with
    /// `raise_exception(message)` (a client error, e.g. roles that do not alternate); then
    /// `message` is exactly the template's message. Otherwise the template is broken or uses
    /// something the renderer does not support, and `message` is minijinja's description.
    #[error("chat template: {message}")]
    ChatTemplate {
        /// The error message.
        message: String,
        /// Whether the template called `raise_exception`.
        raised: bool,
        /// minijinja's error.
        #[source]
        source: minijinja::Error,
    },
}

/// The largest vocabulary [`Tokenizer::synthetic`] builds (16 Mi tokens; real models have
/// under 300 K).
pub const MAX_SYNTHETIC_VOCAB: usize = 1 << 24;

/// Result of this module's operations.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// A tokenizer: text ↔ token ids, special tokens and the chat template of one model.
///
/// Cheap to share (`Send + Sync`; put it in an `Arc`); every method takes `&self`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// One past the largest id the tokenizer knows.
    vocab_size: usize,
    /// `known[id]`: the id has a token (a `tokenizer.json` may leave holes).
    known: Vec<bool>,
    bos_token_id: Option<u32>,
    /// Sorted, without duplicates.
    eos_token_ids: Vec<u32>,
    /// Prepend BOS / append EOS ourselves when `add_special_tokens` (the GGUF path, and
    /// `tokenizer.json`s without a post-processor that adds them).
    add_bos: bool,
    add_eos: bool,
    /// The EOS appended when `add_eos`.
    eos_for_add: Option<u32>,
    chat_template: Option<ChatTemplate>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a HF `tokenizer.json`.
    ///
    /// BOS/EOS come from the file's post-processor; EOS ids are the special tokens named in
    /// [`END_OF_TURN_TOKENS`]. Add the model's `tokenizer_config.json` with
    /// [`Tokenizer::with_hf_config`] for its chat template and its BOS/EOS tokens.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&bytes)
    }

    /// Loads a HF `tokenizer.json` from its bytes (see [`Tokenizer::from_file`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| TokenizerError::Load {
            message: e.to_string(),
        })?;
        let mut tokenizer = Self::from_inner(inner, None);
        tokenizer.eos_token_ids = tokenizer.end_of_turn_ids(None);
        Ok(tokenizer)
    }

    /// Applies a HF `tokenizer_config.json` (its text): the chat template (`chat_template`, a
    /// string or the `default` of a list of named templates), `bos_token` and `eos_token`
    /// (added to [`Tokenizer::eos_token_ids`]), and `add_bos_token` / `add_eos_token` when the
    /// `tokenizer.json` has no post-processor that adds special tokens itself.
    pub fn with_hf_config(mut self, config_json: &str) -> Result<Self> {
        let config = hf_config::HfTokenizerConfig::parse(config_json)?;
        let id_of = |field: &str, token: &Option<String>| -> Result<Option<u32>> {
            token
                .as_deref()
                .map(|t| {
                    self.inner
                        .token_to_id(t)
                        .ok_or_else(|| TokenizerError::InvalidConfig {
                            message: format!("{field} `{t}` is not in the vocabulary"),
                        })
                })
                .transpose()
        };
        let bos_id = id_of("bos_token", &config.bos_token)?;
        let eos_id = id_of("eos_token", &config.eos_token)?;
        if bos_id.is_some() {
            self.bos_token_id = bos_id;
        }
        self.eos_token_ids = self.end_of_turn_ids(eos_id);
        let post_processor_adds = self
            .inner
            .get_post_processor()
            .is_some_and(|p| p.added_tokens(false) > 0);
        if !post_processor_adds {
            self.add_bos = config.add_bos_token.unwrap_or(false) && self.bos_token_id.is_some();
            self.add_eos = config.add_eos_token.unwrap_or(false) && eos_id.is_some();
            self.eos_for_add = eos_id;
        }
        if let Some(source) = config.chat_template {
            self.chat_template = Some(ChatTemplate::new(
                source,
                config.bos_token.clone(),
                config.eos_token.clone(),
            )?);
        }
        Ok(self)
    }

    /// Builds the tokenizer from GGUF tokenizer metadata.
    ///
    /// Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the pre-tokenizer types
    /// in [`SUPPORTED_GGUF_PRE_TOKENIZERS`] (a missing `tokenizer.ggml.pre` means `default`,
    /// which is taken as GPT-2's pre-tokenizer). Each pre type gets the pre-tokenizer chain of
    /// its family's HF `tokenizer.json`. Control tokens become special tokens (parsed in text
    /// as one token, dropped by `skip_special_tokens`); user-defined tokens are parsed in text
    /// as one token but kept when decoding. `tokenizer.ggml.add_bos_token` /
    /// `add_eos_token` decide what `encode(_, true)` adds (default: BOS for the Llama-3 pre
    /// type only, as llama.cpp does). `tokenizer.ggml.add_space_prefix` does not apply to
    /// byte-level BPE and is ignored.
    ///
    /// Not supported yet: SentencePiece vocabularies (`model = "llama"`), which return
    /// [`TokenizerError::UnsupportedModel`]. A token text that appears twice keeps its first
    /// id for encoding; the later id cannot be decoded.
    pub fn from_gguf(vocab: &GgufVocab) -> Result<Self> {
        let (inner, known) = gguf_vocab::build(vocab)?;
        let bos = vocab.bos_token_id;
        let add_bos = vocab
            .add_bos_token
            .unwrap_or_else(|| gguf_vocab::adds_bos_by_default(vocab.pre.as_deref()))
            && bos.is_some();
        let add_eos = vocab.add_eos_token.unwrap_or(false) && vocab.eos_token_id.is_some();
        let token_text = |id: Option<u32>| id.and_then(|id| vocab.tokens.get(id as usize)).cloned();
        let chat_template = vocab
            .chat_template
            .as_ref()
            .map(|source| {
                ChatTemplate::new(
                    source.clone(),
                    token_text(vocab.bos_token_id),
                    token_text(vocab.eos_token_id),
                )
            })
            .transpose()?;
        let mut tokenizer = Self::from_inner(inner, Some(known));
        tokenizer.bos_token_id = bos;
        tokenizer.add_bos = add_bos;
        tokenizer.add_eos = add_eos;
        tokenizer.chat_template = chat_template;
        let mut eos: Vec<u32> = [vocab.eos_token_id, vocab.eot_token_id, vocab.eom_token_id]
            .into_iter()
            .flatten()
            .collect();
        eos.extend(tokenizer.end_of_turn_ids(None));
        eos.sort_unstable();
        eos.dedup();
        tokenizer.eos_for_add = vocab.eos_token_id;
        tokenizer.eos_token_ids = eos;
        Ok(tokenizer)
    }

    /// A stand-in tokenizer for models without one (dummy weights for benchmarks): token `i`
    /// is the word `t{i}`, text splits on whitespace (an unknown word becomes `t0`), and
    /// there is no BOS, EOS or chat template. Requests to such a model give token ids; its
    /// text is only a readable rendering of them.
    ///
    /// # Errors
    /// [`TokenizerError::Load`] for an empty vocabulary or one over [`MAX_SYNTHETIC_VOCAB`].
    pub fn synthetic(vocab_size: usize) -> Result<Self> {
        if vocab_size == 0 || vocab_size > MAX_SYNTHETIC_VOCAB {
            return Err(TokenizerError::Load {
                message: format!(
                    "a synthetic vocabulary of {vocab_size} tokens (1..={MAX_SYNTHETIC_VOCAB})"
                ),
            });
        }
        let vocab: serde_json::Map<String, serde_json::Value> = (0..vocab_size)
            .map(|i| (format!("t{i}"), serde_json::Value::from(i)))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": { "type": "WhitespaceSplit" },
            "post_processor": null,
            "decoder": null,
            "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "t0" },
        });
        let inner =
            tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| {
                TokenizerError::Load {
                    message: e.to_string(),
                }
            })?;
        Ok(Self::from_inner(inner, Some(vec![true; vocab_size])))
    }

    /// A tokenizer without BOS, EOS or template. `known[id]`: whether `id` has a token;
    /// computed from the vocabulary when `None`.
    fn from_inner(inner: tokenizers::Tokenizer, known: Option<Vec<bool>>) -> Self {
        let known = known.unwrap_or_else(|| {
            let vocab = inner.get_vocab(true);
            let size = vocab.values().max().map_or(0, |&max| max as usize + 1);
            let mut known = vec![false; size];
            for &id in vocab.values() {
                known[id as usize] = true;
            }
            known
        });
        let vocab_size = known.len();
        Self {
            inner,
            vocab_size,
            known,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            add_bos: false,
            add_eos: false,
            eos_for_add: None,
            chat_template: None,
        }
    }

    /// `extra` plus the ids of the special tokens named in [`END_OF_TURN_TOKENS`], sorted.
    fn end_of_turn_ids(&self, extra: Option<u32>) -> Vec<u32> {
        let added = self.inner.get_added_tokens_decoder();
        let mut ids: Vec<u32> = added
            .iter()
            .filter(|(_, token)| END_OF_TURN_TOKENS.contains(&token.content.as_str()))
            .map(|(&id, _)| id)
            .chain(extra)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Replaces the chat template (e.g. one given in the server's configuration).
    pub fn with_chat_template(mut self, template: ChatTemplate) -> Self {
        self.chat_template = Some(template);
        self
    }

    /// Encodes `text` into token ids.
    ///
    /// Special tokens written in `text` are parsed as special tokens. With
    /// `add_special_tokens`, the tokenizer's BOS/EOS are added as the model expects (for
    /// SmolLM2: nothing).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode {
                message: e.to_string(),
            })?;
        let ids = encoding.get_ids();
        if !add_special_tokens || !(self.add_bos || self.add_eos) {
            return Ok(ids.to_vec());
        }
        let mut out = Vec::with_capacity(ids.len() + 2);
        if self.add_bos
            && let Some(bos) = self.bos_token_id
        {
            out.push(bos);
        }
        out.extend_from_slice(ids);
        if self.add_eos
            && let Some(eos) = self.eos_for_add
        {
            out.push(eos);
        }
        Ok(out)
    }

    /// Decodes token ids into text. Byte sequences that are not valid UTF-8 become U+FFFD.
    ///
    /// With `skip_special_tokens`, special (control) tokens produce no text. An id that is not
    /// in the vocabulary is a [`TokenizerError::UnknownTokenId`].
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.decode_unchecked(ids, skip_special_tokens)
    }

    /// Decodes ids already checked with [`Tokenizer::check_ids`].
    fn decode_unchecked(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                message: e.to_string(),
            })
    }

    /// Checks that every id is in the vocabulary.
    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| !self.is_known(id)) {
            Some(&id) => Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    fn is_known(&self, id: u32) -> bool {
        self.known.get(id as usize).copied().unwrap_or(false)
    }

    /// One past the largest token id: the size the model's embedding and logits must have
    /// at least.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The BOS token id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// Ids that end a generation, sorted: the EOS token, the GGUF end-of-turn/end-of-message
    /// tokens, and the special tokens named in [`END_OF_TURN_TOKENS`] (for SmolLM2:
    /// `<|endoftext|>` 0 and `<|im_end|>` 2).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Whether `id` ends a generation (one of [`Tokenizer::eos_token_ids`]).
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.binary_search(&id).is_ok()
    }

    /// Whether `id` is a special token (dropped by `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_vocabulary()
            .simple_id_to_token(id)
            .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// The id of a token given its text as it is stored in the vocabulary (for byte-level BPE:
    /// `Ġ` for a space), or of a special token (`<|im_end|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary text of token `id` (byte-level form: `Ġworld`).
    pub fn id_to_token(&self, id: u32) -> Result<String> {
        self.inner
            .id_to_token(id)
            .ok_or(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size,
            })
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Renders a conversation with the model's chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat_template
            .as_ref()
            .ok_or(TokenizerError::NoChatTemplate)?
            .render(messages, add_generation_prompt)
    }

    /// The wrapped `tokenizers` tokenizer, for what this type does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<ChatTemplate>();
        assert_send_sync::<IncrementalDetokenizer>();
        assert_send_sync::<TokenizerError>();
    }

    #[test]
    fn synthetic_tokenizer_round_trips_ids() {
        let t = Tokenizer::synthetic(1000).unwrap();
        assert_eq!(t.vocab_size(), 1000);
        assert_eq!(t.bos_token_id(), None);
        assert!(t.eos_token_ids().is_empty());
        let ids = [5, 999, 0, 42];
        let text = t.decode(&ids, false).unwrap();
        assert_eq!(text, "t5 t999 t0 t42");
        assert_eq!(t.encode(&text, true).unwrap(), ids);
        // Unknown words become token 0; whitespace separates words.
        assert_eq!(t.encode("t7  hello\tt1000", false).unwrap(), [7, 0, 0]);
    }

    #[test]
    fn synthetic_tokenizer_refuses_bad_sizes() {
        for size in [0, MAX_SYNTHETIC_VOCAB + 1] {
            let err = Tokenizer::synthetic(size).unwrap_err();
            assert!(matches!(err, TokenizerError::Load { .. }), "{err}");
            assert!(err.to_string().contains(&size.to_string()), "{err}");
        }
    }
}
