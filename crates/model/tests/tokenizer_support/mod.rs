//! Fixtures shared by the `tokenizer_*` test suites (see `data/tokenizer/gen_fixtures.py`).
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::OnceLock;

use model::gguf::GgufValue;
use model::tokenizer::{GgufVocab, Tokenizer};
use serde_json::Value;

/// The fixture folder.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer")
}

/// Reads a fixture file as JSON.
pub fn read_json(name: &str) -> Value {
    let path = data_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A JSON value as the GGUF reader would type it.
fn to_gguf(key: &str, v: &Value) -> GgufValue {
    match v {
        Value::Bool(b) => GgufValue::Bool(*b),
        Value::String(s) => GgufValue::String(s.clone()),
        Value::Number(n) if key == "tokenizer.ggml.token_type" => {
            GgufValue::I32(n.as_i64().and_then(|x| i32::try_from(x).ok()).expect("i32"))
        }
        Value::Number(n) => {
            GgufValue::U32(n.as_u64().and_then(|x| u32::try_from(x).ok()).expect("u32"))
        }
        Value::Array(items) => GgufValue::Array(items.iter().map(|x| to_gguf(key, x)).collect()),
        other => panic!("unexpected metadata value {other}"),
    }
}

/// The tokenizer metadata of SmolLM2-135M-Instruct's GGUF, as the GGUF reader returns it.
pub fn smollm2_metadata() -> &'static BTreeMap<String, GgufValue> {
    static META: OnceLock<BTreeMap<String, GgufValue>> = OnceLock::new();
    META.get_or_init(|| {
        let path = data_dir().join("smollm2_vocab.json.gz");
        let file = std::fs::File::open(&path).expect("vocab fixture");
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .expect("gunzip vocab fixture");
        let Value::Object(map) = serde_json::from_str(&text).expect("vocab fixture JSON") else {
            panic!("vocab fixture is not an object");
        };
        map.iter()
            .map(|(k, v)| (k.clone(), to_gguf(k, v)))
            .collect()
    })
}

/// [`GgufVocab`] of SmolLM2-135M-Instruct.
pub fn smollm2_vocab() -> GgufVocab {
    let meta = smollm2_metadata();
    GgufVocab::from_metadata(|k| meta.get(k)).expect("vocab fixture parses")
}

/// The SmolLM2 tokenizer built from the GGUF fixture (built once per test binary).
pub fn smollm2() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_gguf(&smollm2_vocab()).expect("from_gguf"))
}

/// Ids of a JSON array.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()).expect("id"))
        .collect()
}

/// One text of `smollm2_encode.json` with its reference results.
#[derive(Debug, Clone)]
pub struct EncodeCase {
    pub text: String,
    pub ids: Vec<u32>,
    pub decoded: String,
    pub decoded_skip_special: String,
}

/// The cases of an `*_encode.json` fixture.
pub fn encode_cases(name: &str) -> Vec<EncodeCase> {
    read_json(name)["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| EncodeCase {
            text: c["text"].as_str().expect("text").to_owned(),
            ids: ids(&c["ids"]),
            decoded: c["decoded"].as_str().expect("decoded").to_owned(),
            decoded_skip_special: c["decoded_skip_special"]
                .as_str()
                .expect("decoded")
                .to_owned(),
        })
        .collect()
}

/// SmolLM2's vocabulary cut to its first `n` tokens, with the merges that stay valid: builds
/// fast, for tests of behaviour rather than of ids.
pub fn small_vocab(n: usize) -> GgufVocab {
    let mut vocab = smollm2_vocab();
    vocab.tokens.truncate(n);
    vocab.token_types.truncate(n);
    let known: std::collections::HashSet<&str> = vocab.tokens.iter().map(String::as_str).collect();
    let merges = vocab
        .merges
        .iter()
        .filter(|m| {
            m.split_once(' ').is_some_and(|(a, b)| {
                known.contains(a) && known.contains(b) && known.contains(format!("{a}{b}").as_str())
            })
        })
        .cloned()
        .collect();
    vocab.merges = merges;
    vocab
}
