//! The tokenizer of the real default model file (skipped when it has not been fetched).

mod tokenizer_support;

use model::gguf::GgufFile;
use model::tokenizer::{ChatMessage, GgufVocab, Tokenizer};
use tokenizer_support::{encode_cases, smollm2_vocab};

#[test]
fn default_model_tokenizer_matches_fixtures() {
    let path = model::fetch::default_model_path();
    if !path.is_file() {
        eprintln!(
            "skipped: default model not found at {} (run `cargo xtask fetch-model`)",
            path.display()
        );
        return;
    }
    let file = GgufFile::open(&path).expect("open default model");
    let vocab = GgufVocab::from_metadata(|key| file.get(key)).expect("tokenizer metadata");
    // The committed fixture is this file's tokenizer metadata.
    assert_eq!(vocab, smollm2_vocab());

    let tok = Tokenizer::from_gguf(&vocab).expect("from_gguf");
    for case in encode_cases("smollm2_encode.json").iter().take(80) {
        assert_eq!(tok.encode(&case.text, true).expect("encode"), case.ids);
    }
    let prompt = tok
        .apply_chat_template(&[ChatMessage::user("What is 2+2?")], true)
        .expect("chat template");
    assert!(prompt.ends_with("<|im_start|>assistant\n"));
}
