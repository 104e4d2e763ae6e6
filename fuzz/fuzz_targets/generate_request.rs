//! The request path on arbitrary bytes: decoded by prost as a `GenerateRequest`, converted as
//! the gRPC service does (`serve_grpc::generate_request_from_pb`) and validated as the engine
//! does before queueing (`engine::validate_request`), against a synthetic tokenizer and small
//! bounds. A decode or validation error is fine; a panic is a bug, and so is an accepted
//! request that breaks the bounds it was checked against.
#![no_main]

use std::sync::OnceLock;

use engine::{Limits, RequestBounds, validate_request};
use libfuzzer_sys::fuzz_target;
use model::Tokenizer;
use prost::Message;
use serve_grpc::pb::GenerateRequest;

const VOCAB: usize = 512;
const MAX_MODEL_LEN: usize = 256;

fn tokenizer() -> Option<&'static Tokenizer> {
    static TOKENIZER: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| Tokenizer::synthetic(VOCAB).ok())
        .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = GenerateRequest::decode(data) else {
        return;
    };
    let Ok(request) = serve_grpc::generate_request_from_pb(request) else {
        return;
    };
    let Some(tokenizer) = tokenizer() else {
        return;
    };
    let bounds = RequestBounds {
        limits: Limits::default(),
        vocab_size: VOCAB,
        max_model_len: MAX_MODEL_LEN,
        max_num_seqs: 8,
    };
    if let Ok(prompt) = validate_request(&request, tokenizer, &bounds) {
        assert!(!prompt.is_empty());
        assert!(prompt.len() < MAX_MODEL_LEN);
        assert!(prompt.iter().all(|&id| (id as usize) < VOCAB));
        let max_tokens = request.max_tokens.map_or(0, |m| m as usize);
        assert!(prompt.len() + max_tokens <= MAX_MODEL_LEN);
        assert!(request.n.max(1) <= bounds.limits.max_n);
    }
});
