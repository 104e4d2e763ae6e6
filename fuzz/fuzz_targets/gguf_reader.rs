//! The GGUF reader on arbitrary bytes: header parsing, every tensor view, the model
//! configuration and the tokenizer vocabulary read from the metadata. Errors are fine; a panic,
//! an abort or an allocation beyond `-rss_limit_mb` is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::tokenizer::GgufVocab;
use model::{GgufFile, ModelConfig, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for info in file.tensor_infos() {
        if let Ok(view) = file.tensor(info.name()) {
            assert!(view.bytes.len() <= file.file_len());
        }
    }
    let _ = ModelConfig::from_gguf(|key| file.get(key));
    if let Ok(vocab) = GgufVocab::from_metadata(|key| file.get(key)) {
        let _ = Tokenizer::from_gguf(&vocab);
    }
});
