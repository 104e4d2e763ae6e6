//! The Hugging Face loaders on arbitrary bytes: a `model.safetensors` file (header, then every
//! tensor view) and the same bytes as `config.json` text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::{ModelConfig, SafetensorsDir};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(config) = ModelConfig::from_hf_json(text)
    {
        // A configuration the loader accepts must be one the model code can use.
        let _ = config.rope_inv_freqs();
    }
    let Ok(dir) = SafetensorsDir::from_bytes(data.to_vec()) else {
        return;
    };
    let names: Vec<String> = dir.tensor_names().map(str::to_owned).collect();
    for name in names {
        if let Ok(view) = dir.tensor(&name) {
            assert!(view.bytes.len() <= data.len());
        }
    }
});
