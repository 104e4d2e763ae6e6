//! Encoding and decoding against reference ids from HF `tokenizers` (fixtures made by
//! `data/tokenizer/gen_fixtures.py`), special tokens, and bad input.

mod tokenizer_support;

use std::collections::BTreeMap;

use model::gguf::GgufValue;
use model::tokenizer::{GgufTokenType, GgufVocab, Tokenizer, TokenizerError};
use tokenizer_support::{
    encode_cases, ids, read_json, small_vocab, smollm2, smollm2_metadata, smollm2_vocab,
};

/// Compares `tokenizer` with the reference ids of `cases`; returns the mismatches (printed).
fn mismatches(
    label: &str,
    tokenizer: &Tokenizer,
    cases: impl IntoIterator<Item = (String, Vec<u32>)>,
) -> (usize, usize) {
    let (mut total, mut bad) = (0, 0);
    for (text, want) in cases {
        total += 1;
        let got = tokenizer.encode(&text, true).expect("encode");
        if got != want {
            bad += 1;
            eprintln!("{label}: {text:?}\n  want {want:?}\n  got  {got:?}");
        }
    }
    eprintln!("{label}: {} of {total} texts match HF", total - bad);
    (total, bad)
}

#[test]
fn smollm2_encode_matches_hf() {
    let cases = encode_cases("smollm2_encode.json");
    assert!(cases.len() > 300);
    let (_, bad) = mismatches(
        "smollm",
        smollm2(),
        cases.into_iter().map(|c| (c.text, c.ids)),
    );
    assert_eq!(bad, 0);
}

#[test]
fn smollm2_decode_matches_hf() {
    let tok = smollm2();
    for case in encode_cases("smollm2_encode.json") {
        assert_eq!(tok.decode(&case.ids, false).expect("decode"), case.decoded);
        assert_eq!(
            tok.decode(&case.ids, true).expect("decode"),
            case.decoded_skip_special
        );
        // Byte-level BPE is lossless.
        assert_eq!(case.decoded, case.text);
    }
}

#[test]
fn other_pre_types_match_hf_chains() {
    let texts: Vec<String> = encode_cases("smollm2_encode.json")
        .into_iter()
        .map(|c| c.text)
        .collect();
    let reference = read_json("pretype_encode.json");
    for pre in ["llama-bpe", "qwen2", "gpt2"] {
        let mut vocab = smollm2_vocab();
        vocab.pre = Some(pre.to_owned());
        // Llama-3 would add BOS by default; the reference has no post-processor.
        vocab.add_bos_token = Some(false);
        let tokenizer = Tokenizer::from_gguf(&vocab).expect("from_gguf");
        let want = reference[pre].as_array().expect("ids lists");
        assert_eq!(want.len(), texts.len());
        let (_, bad) = mismatches(
            pre,
            &tokenizer,
            texts.iter().cloned().zip(want.iter().map(ids)),
        );
        assert_eq!(bad, 0, "{pre}");
    }
}

#[test]
fn pre_type_aliases_and_unknown_pre_type() {
    for (pre, same_as) in [
        ("starcoder", "smollm"),
        ("llama3", "llama-bpe"),
        ("llama-v3", "llama-bpe"),
        ("deepseek-r1-qwen", "qwen2"),
        ("gpt-2", "gpt2"),
        ("default", "gpt2"),
    ] {
        let build = |pre: &str| {
            let mut vocab = small_vocab(1200);
            vocab.pre = Some(pre.to_owned());
            vocab.add_bos_token = Some(false);
            Tokenizer::from_gguf(&vocab).expect("from_gguf")
        };
        let (a, b) = (build(pre), build(same_as));
        let text = "Hello  world 12345 it's\n\n  <|im_start|>x";
        assert_eq!(
            a.encode(text, true).ok(),
            b.encode(text, true).ok(),
            "{pre}"
        );
    }
    let mut vocab = small_vocab(1200);
    vocab.pre = None;
    assert!(
        Tokenizer::from_gguf(&vocab).is_ok(),
        "missing pre means default"
    );

    vocab.pre = Some("jais".to_owned());
    let err = Tokenizer::from_gguf(&vocab).expect_err("unknown pre type");
    assert!(
        matches!(&err, TokenizerError::UnsupportedPreTokenizer { pre } if pre == "jais"),
        "{err:?}"
    );
    assert!(err.to_string().contains("`jais`"), "{err}");
}

#[test]
fn llama3_pre_type_adds_bos_by_default() {
    let mut vocab = small_vocab(1200);
    vocab.pre = Some("llama-bpe".to_owned());
    vocab.add_bos_token = None;
    let tok = Tokenizer::from_gguf(&vocab).expect("from_gguf");
    let ids = tok.encode("Hello", false).expect("encode");
    assert_eq!(
        tok.encode("Hello", true).ok(),
        Some([&[1], &ids[..]].concat())
    );
}

#[test]
fn smollm2_special_tokens_and_ids() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[0, 2]);
    assert!(tok.is_eos(2) && tok.is_eos(0) && !tok.is_eos(1));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_id("Ġworld"), Some(905));
    assert_eq!(tok.token_to_id("no such token"), None);
    assert_eq!(tok.id_to_token(905).ok().as_deref(), Some("Ġworld"));
    assert!(tok.is_special(1) && tok.is_special(16) && !tok.is_special(17));

    // Special tokens in text are single tokens; SmolLM2 adds no BOS.
    let ids = tok
        .encode("<|im_start|>user\nhi<|im_end|>", true)
        .expect("encode");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.encode("hi", true).ok(), tok.encode("hi", false).ok());
    assert_eq!(
        tok.decode(&ids, true).ok().as_deref(),
        Some("user\nhi"),
        "skip_special_tokens drops control tokens"
    );
}

#[test]
fn round_trips() {
    let tok = smollm2();
    for text in [
        "",
        "plain",
        "  two leading spaces and trailing  ",
        "emoji 👨‍👩‍👧‍👦 🇺🇸 and CJK 漢字かなカナ한글",
        "digits 0123456789 ٣٤٥ １２３",
        "mixed <|im_start|>special<|im_end|> and <|not special|>",
        "control \u{0} \u{1b} \u{7f} and BOM \u{feff}",
    ] {
        let ids = tok.encode(text, false).expect("encode");
        assert_eq!(tok.decode(&ids, false).expect("decode"), text);
    }
}

#[test]
fn bad_ids_are_typed_errors() {
    let tok = smollm2();
    for bad in [49152, u32::MAX] {
        let err = tok.decode(&[19556, bad], false).expect_err("out of range");
        assert!(
            matches!(err, TokenizerError::UnknownTokenId { id, vocab_size: 49152 } if id == bad),
            "{err:?}"
        );
        assert!(matches!(
            tok.id_to_token(bad),
            Err(TokenizerError::UnknownTokenId { .. })
        ));
    }
    assert_eq!(tok.decode(&[], false).ok().as_deref(), Some(""));
}

fn metadata_with(
    edit: impl FnOnce(&mut BTreeMap<String, GgufValue>),
) -> Result<GgufVocab, TokenizerError> {
    let mut meta = smollm2_metadata().clone();
    edit(&mut meta);
    GgufVocab::from_metadata(|k| meta.get(k))
}

#[test]
fn gguf_metadata_is_read_as_written() {
    let vocab = smollm2_vocab();
    assert_eq!(vocab.model, "gpt2");
    assert_eq!(vocab.pre.as_deref(), Some("smollm"));
    assert_eq!(vocab.tokens.len(), 49152);
    assert_eq!(vocab.merges.len(), 48900);
    assert_eq!(vocab.token_types[1], GgufTokenType::Control);
    assert_eq!(vocab.token_types[17], GgufTokenType::Normal);
    assert_eq!(
        (
            vocab.bos_token_id,
            vocab.eos_token_id,
            vocab.unknown_token_id
        ),
        (Some(1), Some(2), Some(0))
    );
    assert_eq!(vocab.padding_token_id, Some(2));
    assert_eq!(vocab.add_bos_token, Some(false));
    assert_eq!(vocab.add_space_prefix, Some(false));
    assert!(
        vocab
            .chat_template
            .as_deref()
            .is_some_and(|t| t.contains("<|im_start|>"))
    );
}

#[test]
fn bad_gguf_metadata_is_typed_errors() {
    let err = metadata_with(|m| {
        m.remove("tokenizer.ggml.tokens");
    });
    assert!(matches!(
        err,
        Err(TokenizerError::MissingMetadata {
            key: "tokenizer.ggml.tokens"
        })
    ));
    let err = metadata_with(|m| {
        m.remove("tokenizer.ggml.model");
    });
    assert!(matches!(err, Err(TokenizerError::MissingMetadata { .. })));
    let err = metadata_with(|m| {
        m.insert("tokenizer.ggml.model".into(), GgufValue::U32(1));
    });
    assert!(matches!(
        err,
        Err(TokenizerError::InvalidMetadata {
            key: "tokenizer.ggml.model",
            ..
        })
    ));
    let err = metadata_with(|m| {
        m.insert(
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(vec![GgufValue::I32(1); 3]),
        );
    });
    assert!(matches!(
        err,
        Err(TokenizerError::MetadataLength {
            expected: 49152,
            got: 3,
            ..
        })
    ));
    let err = metadata_with(|m| {
        m.insert(
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(vec![GgufValue::U8(1)]),
        );
    });
    assert!(matches!(err, Err(TokenizerError::InvalidMetadata { .. })));
    let err = metadata_with(|m| {
        m.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(49152));
    });
    assert!(matches!(
        err,
        Err(TokenizerError::SpecialTokenOutOfRange {
            id: 49152,
            vocab_size: 49152,
            ..
        })
    ));
    let err = metadata_with(|m| {
        m.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::I32(-1));
    });
    assert!(matches!(err, Err(TokenizerError::InvalidMetadata { .. })));
    let err = metadata_with(|m| {
        m.insert("tokenizer.ggml.add_bos_token".into(), GgufValue::U8(1));
    });
    assert!(matches!(err, Err(TokenizerError::InvalidMetadata { .. })));
}

#[test]
fn bad_gguf_vocabularies_are_typed_errors() {
    let mut vocab = small_vocab(1200);
    vocab.model = "llama".to_owned();
    assert!(matches!(
        Tokenizer::from_gguf(&vocab),
        Err(TokenizerError::UnsupportedModel { model }) if model == "llama"
    ));

    let mut vocab = small_vocab(1200);
    vocab.merges[7] = "nospace".to_owned();
    assert!(matches!(
        Tokenizer::from_gguf(&vocab),
        Err(TokenizerError::InvalidMerge { index: 7, .. })
    ));

    let mut vocab = small_vocab(1200);
    vocab.merges[3] = "Ġ notatoken".to_owned();
    assert!(matches!(
        Tokenizer::from_gguf(&vocab),
        Err(TokenizerError::MergeOutOfVocabulary { index: 3, token, .. }) if token == "notatoken"
    ));

    // Regression (fuzz target `gguf_reader`): a merge of two tokens whose concatenation is
    // longer than every token panicked inside `tokenizers`' BPE builder.
    let mut vocab = small_vocab(1200);
    let longest = vocab
        .tokens
        .iter()
        .max_by_key(|t| t.len())
        .cloned()
        .expect("tokens");
    vocab.merges[5] = format!("{longest} {longest}");
    assert!(matches!(
        Tokenizer::from_gguf(&vocab),
        Err(TokenizerError::MergeOutOfVocabulary { index: 5, token, .. })
            if token == format!("{longest}{longest}")
    ));

    let mut vocab = small_vocab(1200);
    vocab.chat_template = Some("{% if %}".to_owned());
    assert!(matches!(
        Tokenizer::from_gguf(&vocab),
        Err(TokenizerError::ChatTemplate { raised: false, .. })
    ));
}

#[test]
fn user_defined_tokens_are_kept_when_skipping_special() {
    let mut vocab = small_vocab(1200);
    // Make `<filename>` (id 6) user-defined instead of control.
    vocab.token_types[6] = GgufTokenType::UserDefined;
    let tok = Tokenizer::from_gguf(&vocab).expect("from_gguf");
    let ids = tok
        .encode("a<filename>b<file_sep>c", false)
        .expect("encode");
    assert!(ids.contains(&6) && ids.contains(&5), "{ids:?}");
    assert_eq!(
        tok.decode(&ids, true).ok().as_deref(),
        Some("a<filename>bc")
    );
    assert!(!tok.is_special(6));
}

#[test]
fn from_file_matches_hf() {
    let dir = tokenizer_support::data_dir();
    let tok = Tokenizer::from_file(dir.join("tiny_tokenizer.json")).expect("from_file");
    // Without tokenizer_config.json: EOS from the known end-of-turn tokens, no template.
    assert_eq!(tok.eos_token_ids(), &[0, 2]);
    assert_eq!(tok.bos_token_id(), None);
    assert!(matches!(
        tok.apply_chat_template(&[], false),
        Err(TokenizerError::NoChatTemplate)
    ));
    let config = std::fs::read_to_string(dir.join("tiny_tokenizer_config.json")).expect("config");
    let tok = tok.with_hf_config(&config).expect("config applies");
    assert_eq!(tok.vocab_size(), 1200);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[0, 2]);
    assert!(tok.chat_template().is_some());

    let cases = encode_cases("tiny_encode.json");
    let (_, bad) = mismatches(
        "tiny tokenizer.json",
        &tok,
        cases.iter().map(|c| (c.text.clone(), c.ids.clone())),
    );
    assert_eq!(bad, 0);
    for case in &cases {
        assert_eq!(
            tok.decode(&case.ids, false).ok().as_ref(),
            Some(&case.decoded)
        );
        assert_eq!(
            tok.decode(&case.ids, true).ok().as_ref(),
            Some(&case.decoded_skip_special)
        );
    }
    assert!(matches!(
        tok.decode(&[1200], false),
        Err(TokenizerError::UnknownTokenId { id: 1200, .. })
    ));
}

#[test]
fn hf_config_adds_bos_eos_without_post_processor() {
    let dir = tokenizer_support::data_dir();
    let tok = Tokenizer::from_file(dir.join("tiny_tokenizer.json")).expect("from_file");
    let tok = tok
        .with_hf_config(
            r#"{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                "add_bos_token": true, "add_eos_token": true}"#,
        )
        .expect("config");
    let ids = tok.encode("a", true).expect("encode");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.encode("a", false).ok().map(|v| v.len()), Some(1));

    let tok = Tokenizer::from_file(dir.join("tiny_tokenizer.json")).expect("from_file");
    assert!(matches!(
        tok.with_hf_config(r#"{"eos_token": "<nope>"}"#),
        Err(TokenizerError::InvalidConfig { .. })
    ));
}

#[test]
fn bad_files_are_typed_errors() {
    let dir = tokenizer_support::data_dir();
    assert!(matches!(
        Tokenizer::from_file(dir.join("does_not_exist.json")),
        Err(TokenizerError::Io { .. })
    ));
    assert!(matches!(
        Tokenizer::from_json(b"{\"model\": 3}"),
        Err(TokenizerError::Load { .. })
    ));
    assert!(matches!(
        Tokenizer::from_json(b"not json"),
        Err(TokenizerError::Load { .. })
    ));
}
