//! Protobuf messages to and from the engine's plain Rust types.
//!
//! Only what the protocol alone can see is checked here (which prompt fields are present,
//! absent optional fields); every other rule (sampling ranges,
//! lengths, limits, vocabulary, chat roles) is the engine's, with the same field names.

use std::collections::BTreeMap;
use std::time::Instant;

use engine::{EngineError, FinishReason, Message, Prompt, SamplingParams, StreamDelta};

use crate::pb;

fn invalid(field: &'static str, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// `GenerateRequest` (proto) to the engine's request, with the deadline from the call.
pub(crate) fn generate_request(
    request: pb::GenerateRequest,
    deadline: Option<Instant>,
) -> Result<engine::GenerateRequest, EngineError> {
    let request_id = match request.request_id {
        Some(id) if id.is_empty() => None,
        id => id,
    };
    let prompt = prompt(
        "text, token_ids or messages",
        request.text,
        Some(request.token_ids),
        request.messages,
    )?;
    let sampling = request.sampling.map(sampling_params).unwrap_or_default();
    Ok(engine::GenerateRequest {
        request_id,
        prompt,
        max_tokens: request.max_tokens,
        sampling,
        stop: request.stop,
        stop_token_ids: request.stop_token_ids,
        ignore_eos: request.ignore_eos,
        n: request.n.max(1),
        logprobs: request.logprobs,
        deadline,
    })
}

/// `GenerateRequest` (proto) to the engine's request as the `Generate` service does, for
/// fuzzers and tests of the request path: then [`engine::validate_request`] checks it as the
/// engine does. No deadline.
///
/// # Errors
/// [`EngineError::InvalidArgument`] when no prompt kind, or more than one, is set.
pub fn generate_request_from_pb(
    request: pb::GenerateRequest,
) -> Result<engine::GenerateRequest, EngineError> {
    generate_request(request, None)
}

/// `TokenizeRequest` to the prompt it names.
pub(crate) fn tokenize_prompt(request: pb::TokenizeRequest) -> Result<Prompt, EngineError> {
    prompt("text or messages", request.text, None, request.messages)
}

/// The id named by `Abort`: not empty.
pub(crate) fn abort_request_id(request: pb::AbortRequest) -> Result<String, EngineError> {
    if request.request_id.is_empty() {
        return Err(invalid("request_id", "is empty"));
    }
    Ok(request.request_id)
}

/// Exactly one prompt kind among the fields present. An empty `token_ids` or `messages` list
/// is indistinguishable from an absent one on the wire, so it counts as absent; an empty
/// `text` is present (and then rejected by the engine as an empty prompt).
fn prompt(
    expected: &str,
    text: Option<String>,
    token_ids: Option<Vec<u32>>,
    messages: Vec<pb::ChatMessage>,
) -> Result<Prompt, EngineError> {
    let token_ids = token_ids.filter(|ids| !ids.is_empty());
    let mut present = Vec::new();
    if text.is_some() {
        present.push("text");
    }
    if token_ids.is_some() {
        present.push("token_ids");
    }
    if !messages.is_empty() {
        present.push("messages");
    }
    if present.len() > 1 {
        let reason = format!(
            "exactly one of {expected} may be set, got {}",
            present.join(" and ")
        );
        return Err(invalid("input", reason));
    }
    if let Some(text) = text {
        return Ok(Prompt::Text(text));
    }
    if let Some(ids) = token_ids {
        return Ok(Prompt::TokenIds(ids));
    }
    if messages.is_empty() {
        return Err(invalid("input", format!("one of {expected} is required")));
    }
    let messages = messages
        .into_iter()
        .map(|m| Message {
            role: m.role,
            content: m.content,
        })
        .collect();
    Ok(Prompt::Messages(messages))
}

/// Absent optional fields take the engine's defaults; present ones pass as they are, so an
/// explicit `top_p = 0` is rejected rather than read as "unset".
fn sampling_params(p: pb::SamplingParams) -> SamplingParams {
    let defaults = SamplingParams::default();
    SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p.unwrap_or(defaults.top_p),
        top_k: p.top_k,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty.unwrap_or(defaults.repetition_penalty),
        seed: p.seed,
    }
}

/// How a delta's finish reason ends the call: `Ok(reason)` for one the client is told in a
/// message, `Err` for one that ends the call with a status.
pub(crate) fn finish_reason(reason: Option<FinishReason>) -> Result<pb::FinishReason, EngineError> {
    match reason {
        None => Ok(pb::FinishReason::Unspecified),
        Some(FinishReason::Length) => Ok(pb::FinishReason::Length),
        Some(FinishReason::Stop) => Ok(pb::FinishReason::Stop),
        Some(FinishReason::Aborted) => Ok(pb::FinishReason::Aborted),
        Some(FinishReason::Deadline) => Err(EngineError::DeadlineExceeded),
        Some(FinishReason::Error) => Err(EngineError::Internal(
            "the engine failed while computing this request".to_owned(),
        )),
    }
}

pub(crate) fn logprobs(logprobs: Vec<engine::TokenLogprob>) -> Vec<pb::TokenLogprob> {
    logprobs
        .into_iter()
        .map(|lp| pb::TokenLogprob {
            token_id: lp.token_id,
            logprob: lp.logprob,
            top: lp
                .top
                .into_iter()
                .map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob })
                .collect(),
        })
        .collect()
}

pub(crate) fn usage(usage: engine::Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cached_prompt_tokens: usage.cached_prompt_tokens,
    }
}

pub(crate) fn model_info(info: engine::ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo {
        model: info.model,
        max_model_len: info.max_model_len,
        vocab_size: info.vocab_size,
        kv_cache_dtype: info.kv_cache_dtype,
        block_size: info.block_size,
        num_blocks: info.num_blocks,
        device: info.device,
    }
}

/// What a server said it serves, as the engine's type (the client side of `GetModelInfo`).
pub(crate) fn model_info_from_pb(info: pb::ModelInfo) -> engine::ModelInfo {
    engine::ModelInfo {
        model: info.model,
        max_model_len: info.max_model_len,
        vocab_size: info.vocab_size,
        kv_cache_dtype: info.kv_cache_dtype,
        block_size: info.block_size,
        num_blocks: info.num_blocks,
        device: info.device,
    }
}

/// One streamed message from one engine delta.
pub(crate) fn stream_response(
    request_id: &str,
    delta: StreamDelta,
) -> Result<pb::GenerateStreamResponse, EngineError> {
    let finish_reason = finish_reason(delta.finish_reason)?;
    Ok(pb::GenerateStreamResponse {
        request_id: request_id.to_owned(),
        index: delta.index,
        text: delta.text,
        token_ids: delta.token_ids,
        finish_reason: finish_reason.into(),
        usage: delta.usage.map(usage),
        logprobs: logprobs(delta.logprobs),
    })
}

/// Accumulates a request's deltas into the unary `GenerateResponse`.
#[derive(Debug, Default)]
pub(crate) struct Collector {
    completions: BTreeMap<u32, pb::Completion>,
    usage: Option<pb::Usage>,
}

impl Collector {
    pub(crate) fn push(&mut self, delta: StreamDelta) -> Result<(), EngineError> {
        let reason = finish_reason(delta.finish_reason)?;
        let completion = self
            .completions
            .entry(delta.index)
            .or_insert_with(|| pb::Completion {
                index: delta.index,
                ..Default::default()
            });
        completion.text.push_str(&delta.text);
        completion.token_ids.extend_from_slice(&delta.token_ids);
        completion.logprobs.extend(logprobs(delta.logprobs));
        if reason != pb::FinishReason::Unspecified {
            completion.finish_reason = reason.into();
        }
        if let Some(u) = delta.usage {
            self.usage = Some(usage(u));
        }
        Ok(())
    }

    pub(crate) fn finish(self, request_id: String) -> pb::GenerateResponse {
        pb::GenerateResponse {
            request_id,
            completions: self.completions.into_values().collect(),
            usage: self.usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: EngineError) -> &'static str {
        match err {
            EngineError::InvalidArgument { field, .. } => field,
            other => panic!("not an invalid argument: {other:?}"),
        }
    }

    #[test]
    fn model_info_round_trips_through_the_proto() {
        let info = engine::ModelInfo {
            model: "m".into(),
            max_model_len: 64,
            vocab_size: 100,
            kv_cache_dtype: "int8".into(),
            block_size: 16,
            num_blocks: 7,
            device: "cuda:1".into(),
        };
        assert_eq!(model_info_from_pb(model_info(info.clone())), info);
    }

    fn text_request(text: &str) -> pb::GenerateRequest {
        pb::GenerateRequest {
            text: Some(text.to_owned()),
            ..Default::default()
        }
    }

    #[test]
    fn generate_request_from_pb_converts_and_refuses() {
        let ok = generate_request_from_pb(text_request("hi")).unwrap();
        assert_eq!(ok.prompt, Prompt::Text("hi".into()));
        assert_eq!(ok.deadline, None);
        let err = generate_request_from_pb(pb::GenerateRequest::default()).unwrap_err();
        assert_eq!(field_of(err), "input");
    }

    #[test]
    fn exactly_one_prompt_kind() {
        let none = pb::GenerateRequest::default();
        let err = generate_request(none, None).unwrap_err();
        assert!(err.to_string().contains("is required"), "{err}");
        assert_eq!(field_of(err), "input");

        let two = pb::GenerateRequest {
            token_ids: vec![1, 2],
            ..text_request("hi")
        };
        let err = generate_request(two, None).unwrap_err();
        assert!(err.to_string().contains("text and token_ids"), "{err}");

        let three = pb::GenerateRequest {
            token_ids: vec![1],
            messages: vec![pb::ChatMessage::default()],
            ..text_request("")
        };
        let err = generate_request(three, None).unwrap_err();
        assert!(
            err.to_string().contains("text and token_ids and messages"),
            "{err}"
        );

        let ids = pb::GenerateRequest {
            token_ids: vec![5, 6],
            ..Default::default()
        };
        let r = generate_request(ids, None).unwrap();
        assert_eq!(r.prompt, Prompt::TokenIds(vec![5, 6]));

        // An empty text is a (bad) prompt for the engine to reject, not "no input".
        let r = generate_request(text_request(""), None).unwrap();
        assert_eq!(r.prompt, Prompt::Text(String::new()));

        let chat = pb::GenerateRequest {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            ..Default::default()
        };
        let r = generate_request(chat, None).unwrap();
        assert_eq!(
            r.prompt,
            Prompt::Messages(vec![Message {
                role: "user".into(),
                content: "hi".into()
            }])
        );
    }

    #[test]
    fn tokenize_needs_exactly_one_of_text_or_messages() {
        let err = tokenize_prompt(pb::TokenizeRequest::default()).unwrap_err();
        assert_eq!(field_of(err), "input");
        let both = pb::TokenizeRequest {
            text: Some("a".into()),
            messages: vec![pb::ChatMessage::default()],
        };
        assert_eq!(field_of(tokenize_prompt(both).unwrap_err()), "input");
        let text = pb::TokenizeRequest {
            text: Some("a".into()),
            messages: vec![],
        };
        assert_eq!(tokenize_prompt(text).unwrap(), Prompt::Text("a".into()));
    }

    #[test]
    fn optional_fields_keep_explicit_zeros() {
        let r = generate_request(text_request("x"), None).unwrap();
        assert_eq!(r.max_tokens, None);
        assert_eq!(r.sampling, SamplingParams::default());
        assert_eq!(r.n, 1, "n = 0 means 1");
        assert_eq!(r.request_id, None);

        let explicit = pb::GenerateRequest {
            max_tokens: Some(0),
            request_id: Some(String::new()),
            n: 3,
            sampling: Some(pb::SamplingParams {
                temperature: 0.7,
                top_p: Some(0.0),
                repetition_penalty: Some(0.0),
                seed: Some(0),
                ..Default::default()
            }),
            ..text_request("x")
        };
        let r = generate_request(explicit, None).unwrap();
        assert_eq!(r.max_tokens, Some(0), "explicit 0 reaches the engine");
        assert_eq!(r.request_id, None, "an empty id means none");
        assert_eq!(r.n, 3);
        assert_eq!(r.sampling.top_p, 0.0);
        assert_eq!(r.sampling.repetition_penalty, 0.0);
        assert_eq!(r.sampling.seed, Some(0));
        assert_eq!(r.sampling.temperature, 0.7);

        // Absent top_p / repetition_penalty in a present message take the defaults.
        let partial = pb::GenerateRequest {
            sampling: Some(pb::SamplingParams {
                temperature: 1.0,
                ..Default::default()
            }),
            ..text_request("x")
        };
        let r = generate_request(partial, None).unwrap();
        assert_eq!(r.sampling.top_p, 1.0);
        assert_eq!(r.sampling.repetition_penalty, 1.0);
    }

    #[test]
    fn abort_needs_an_id() {
        let empty = pb::AbortRequest::default();
        assert_eq!(field_of(abort_request_id(empty).unwrap_err()), "request_id");
        let id = pb::AbortRequest {
            request_id: "a".into(),
        };
        assert_eq!(abort_request_id(id).unwrap(), "a");
    }

    fn delta(index: u32, text: &str, finish: Option<FinishReason>) -> StreamDelta {
        StreamDelta {
            index,
            text: text.to_owned(),
            token_ids: vec![index + 10],
            logprobs: vec![engine::TokenLogprob {
                token_id: index + 10,
                logprob: -0.5,
                top: vec![(index + 10, -0.5), (3, -1.5)],
            }],
            finish_reason: finish,
            usage: None,
        }
    }

    #[test]
    fn collector_orders_completions_and_keeps_usage() {
        let mut c = Collector::default();
        c.push(delta(1, "b", None)).unwrap();
        c.push(delta(0, "a", None)).unwrap();
        c.push(delta(0, "c", Some(FinishReason::Stop))).unwrap();
        let mut last = delta(1, "d", Some(FinishReason::Length));
        last.usage = Some(engine::Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_prompt_tokens: 1,
        });
        c.push(last).unwrap();
        let r = c.finish("id".into());
        assert_eq!(r.request_id, "id");
        assert_eq!(r.completions.len(), 2);
        assert_eq!(r.completions[0].text, "ac");
        assert_eq!(r.completions[0].token_ids, [10, 10]);
        assert_eq!(r.completions[0].finish_reason(), pb::FinishReason::Stop);
        assert_eq!(r.completions[1].text, "bd");
        assert_eq!(r.completions[1].finish_reason(), pb::FinishReason::Length);
        assert_eq!(r.completions[1].logprobs[0].top[1].token_id, 3);
        assert_eq!(r.usage.unwrap().completion_tokens, 4);
    }

    #[test]
    fn deadline_and_error_finishes_end_the_call() {
        let mut c = Collector::default();
        assert_eq!(
            c.push(delta(0, "a", Some(FinishReason::Deadline))),
            Err(EngineError::DeadlineExceeded)
        );
        assert!(matches!(
            stream_response("r", delta(0, "a", Some(FinishReason::Error))),
            Err(EngineError::Internal(_))
        ));
        let ok = stream_response("r", delta(0, "a", Some(FinishReason::Aborted))).unwrap();
        assert_eq!(ok.finish_reason(), pb::FinishReason::Aborted);
        assert_eq!(ok.request_id, "r");
    }
}
