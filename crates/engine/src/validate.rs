//! Request validation: a [`GenerateRequest`] becomes a [`ValidRequest`] or an
//! [`EngineError::InvalidArgument`] naming the field, before anything is queued.

use std::time::Instant;

use model::{ChatMessage, Tokenizer, TokenizerError};

use crate::{EngineError, GenerateRequest, Limits, Prompt, SamplingParams};

/// Roles a chat message may have.
pub(crate) const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Longest caller-chosen request id, in bytes.
pub(crate) const MAX_REQUEST_ID_LEN: usize = 256;

/// What requests are checked against: the engine builds one from its configuration and model;
/// fuzzers and tests build their own for [`validate_request`].
#[derive(Debug, Clone)]
pub struct RequestBounds {
    /// Per-request limits ([`EngineConfig::limits`](crate::EngineConfig::limits)).
    pub limits: Limits,
    /// Token ids must be below this (the smaller of the model's and the tokenizer's
    /// vocabularies).
    pub vocab_size: usize,
    /// Prompt plus output, at most.
    pub max_model_len: usize,
    /// Sequences the scheduler runs at once (`n` may not exceed it).
    pub max_num_seqs: usize,
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub(crate) struct ValidRequest {
    pub(crate) request_id: Option<String>,
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) sampling: SamplingParams,
    /// The request's seed, or a random one.
    pub(crate) seed: u64,
    pub(crate) stop: Vec<String>,
    pub(crate) stop_token_ids: Vec<u32>,
    pub(crate) ignore_eos: bool,
    pub(crate) n: usize,
    pub(crate) logprobs: usize,
    pub(crate) deadline: Option<Instant>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// Checks `req` exactly as [`EngineHandle::generate`](crate::EngineHandle::generate) does
/// before queueing it, without an engine, and returns its prompt's token ids.
///
/// For fuzzers and tests of the request path (the gRPC front end converts its messages with
/// `serve_grpc::generate_request_from_pb` first).
///
/// # Errors
/// [`EngineError::InvalidArgument`] naming the field, or [`EngineError::DeadlineExceeded`].
pub fn validate_request(
    req: &GenerateRequest,
    tokenizer: &Tokenizer,
    bounds: &RequestBounds,
) -> Result<Vec<u32>, EngineError> {
    validate(req, tokenizer, bounds).map(|valid| valid.prompt)
}

/// Checks every field of `req` and tokenizes its prompt.
pub(crate) fn validate(
    req: &GenerateRequest,
    tokenizer: &Tokenizer,
    b: &RequestBounds,
) -> Result<ValidRequest, EngineError> {
    if let Some(id) = &req.request_id {
        if id.is_empty() {
            return Err(invalid("request_id", "is empty"));
        }
        if id.len() > MAX_REQUEST_ID_LEN {
            return Err(invalid(
                "request_id",
                format!("has {} bytes, at most {MAX_REQUEST_ID_LEN}", id.len()),
            ));
        }
    }
    check_sampling(&req.sampling)?;
    let max_n = b
        .limits
        .max_n
        .min(u32::try_from(b.max_num_seqs).unwrap_or(u32::MAX));
    let n = req.n.max(1);
    if n > max_n {
        return Err(invalid("n", format!("is {n}, at most {max_n}")));
    }
    if req.stop.len() > b.limits.max_stop_strings {
        return Err(invalid(
            "stop",
            format!(
                "has {} strings, at most {}",
                req.stop.len(),
                b.limits.max_stop_strings
            ),
        ));
    }
    for (i, s) in req.stop.iter().enumerate() {
        if s.is_empty() {
            return Err(invalid("stop", format!("string {i} is empty")));
        }
        if s.len() > b.limits.max_stop_string_len {
            return Err(invalid(
                "stop",
                format!(
                    "string {i} has {} bytes, at most {}",
                    s.len(),
                    b.limits.max_stop_string_len
                ),
            ));
        }
    }
    if req.stop_token_ids.len() > b.limits.max_stop_token_ids {
        return Err(invalid(
            "stop_token_ids",
            format!(
                "has {} ids, at most {}",
                req.stop_token_ids.len(),
                b.limits.max_stop_token_ids
            ),
        ));
    }
    if let Some((i, &t)) = req
        .stop_token_ids
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= b.vocab_size)
    {
        return Err(invalid(
            "stop_token_ids",
            format!(
                "id {t} (index {i}) is outside the vocabulary of {}",
                b.vocab_size
            ),
        ));
    }
    if req.logprobs > b.limits.max_logprobs {
        return Err(invalid(
            "logprobs",
            format!("is {}, at most {}", req.logprobs, b.limits.max_logprobs),
        ));
    }
    if req.max_tokens == Some(0) {
        return Err(invalid("max_tokens", "must be at least 1"));
    }
    if req.deadline.is_some_and(|d| d <= Instant::now()) {
        return Err(EngineError::DeadlineExceeded);
    }

    let prompt = tokenize(&req.prompt, tokenizer, b.vocab_size)?;
    if prompt.len() >= b.max_model_len {
        return Err(invalid(
            "prompt",
            format!(
                "has {} tokens; max_model_len is {} (prompt plus at least one generated token)",
                prompt.len(),
                b.max_model_len
            ),
        ));
    }
    let room = b.max_model_len - prompt.len();
    let max_tokens = match req.max_tokens {
        None => room,
        Some(m) => {
            // Checked: `u32::MAX` must not wrap.
            let total = prompt.len().checked_add(m as usize);
            if total.is_none_or(|t| t > b.max_model_len) {
                return Err(invalid(
                    "max_tokens",
                    format!(
                        "is {m}; with the prompt's {} tokens it exceeds max_model_len {} \
                         (at most {room})",
                        prompt.len(),
                        b.max_model_len
                    ),
                ));
            }
            m as usize
        }
    };
    Ok(ValidRequest {
        request_id: req.request_id.clone(),
        prompt,
        max_tokens,
        sampling: req.sampling,
        seed: req.sampling.seed.unwrap_or_else(rand::random),
        stop: req.stop.clone(),
        stop_token_ids: req.stop_token_ids.clone(),
        ignore_eos: req.ignore_eos,
        n: n as usize,
        logprobs: req.logprobs as usize,
        deadline: req.deadline,
    })
}

fn check_sampling(s: &SamplingParams) -> Result<(), EngineError> {
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err(invalid(
            "sampling.temperature",
            format!("is {}, must be finite and >= 0", s.temperature),
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(invalid(
            "sampling.top_p",
            format!("is {}, must be in (0, 1]", s.top_p),
        ));
    }
    if !(0.0..=1.0).contains(&s.min_p) {
        return Err(invalid(
            "sampling.min_p",
            format!("is {}, must be in [0, 1]", s.min_p),
        ));
    }
    if !(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0) {
        return Err(invalid(
            "sampling.repetition_penalty",
            format!("is {}, must be finite and > 0", s.repetition_penalty),
        ));
    }
    Ok(())
}

/// Tokenizes a prompt as `generate` does: text with the tokenizer's special tokens, messages
/// through the chat template (generation prompt added), token ids as they are (checked).
pub(crate) fn tokenize(
    prompt: &Prompt,
    tokenizer: &Tokenizer,
    vocab_size: usize,
) -> Result<Vec<u32>, EngineError> {
    let ids = match prompt {
        Prompt::Text(text) => {
            if text.is_empty() {
                return Err(invalid("prompt.text", "is empty"));
            }
            let ids = tokenizer
                .encode(text, true)
                .map_err(|e| invalid("prompt.text", e.to_string()))?;
            if ids.is_empty() {
                return Err(invalid("prompt.text", "is empty after tokenization"));
            }
            ids
        }
        Prompt::TokenIds(ids) => {
            if ids.is_empty() {
                return Err(invalid("prompt.token_ids", "is empty"));
            }
            ids.clone()
        }
        Prompt::Messages(messages) => {
            if messages.is_empty() {
                return Err(invalid("prompt.messages", "is empty"));
            }
            if let Some((i, m)) = messages
                .iter()
                .enumerate()
                .find(|(_, m)| !CHAT_ROLES.contains(&m.role.as_str()))
            {
                return Err(invalid(
                    "prompt.messages.role",
                    format!(
                        "message {i} has role {:?}; expected one of {}",
                        m.role,
                        CHAT_ROLES.join(", ")
                    ),
                ));
            }
            let chat: Vec<ChatMessage> = messages
                .iter()
                .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                .collect();
            let text = tokenizer
                .apply_chat_template(&chat, true)
                .map_err(|e| match e {
                    TokenizerError::NoChatTemplate => {
                        invalid("prompt.messages", "the model has no chat template")
                    }
                    TokenizerError::ChatTemplate {
                        message,
                        raised: true,
                        ..
                    } => invalid("prompt.messages", message),
                    other => EngineError::Internal(format!("chat template: {other}")),
                })?;
            let ids = tokenizer
                .encode(&text, false)
                .map_err(|e| invalid("prompt.messages", e.to_string()))?;
            if ids.is_empty() {
                return Err(invalid("prompt.messages", "is empty after tokenization"));
            }
            ids
        }
    };
    if let Some((i, &t)) = ids
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= vocab_size)
    {
        let field = match prompt {
            Prompt::TokenIds(_) => "prompt.token_ids",
            Prompt::Text(_) => "prompt.text",
            Prompt::Messages(_) => "prompt.messages",
        };
        return Err(invalid(
            field,
            format!("token id {t} (index {i}) is outside the vocabulary of {vocab_size}"),
        ));
    }
    Ok(ids)
}
