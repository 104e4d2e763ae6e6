//! The chat-template path on arbitrary text: a template compiled with `ChatTemplate::new`,
//! rendered over arbitrary messages through a synthetic tokenizer's `apply_chat_template`, and
//! the result encoded and decoded.
//!
//! Input layout (readable seeds): `template \0 bos \0 eos \0 messages`, where messages are
//! `role \x1f content` records separated by `\x1e`; a missing part is empty (an empty `bos` or
//! `eos` is undefined in the template). Non-UTF-8 bytes are replaced.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::tokenizer::ChatTemplate;
use model::{ChatMessage, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\0');
    let template = parts.next().unwrap_or_default();
    let special = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
    let bos = special(parts.next());
    let eos = special(parts.next());
    let messages: Vec<ChatMessage> = parts
        .next()
        .unwrap_or_default()
        .split('\x1e')
        .filter(|record| !record.is_empty())
        .map(|record| {
            let (role, content) = record.split_once('\x1f').unwrap_or(("user", record));
            ChatMessage::new(role, content)
        })
        .collect();
    let Ok(template) = ChatTemplate::new(template, bos, eos) else {
        return;
    };
    let Ok(tokenizer) = Tokenizer::synthetic(64) else {
        return;
    };
    let tokenizer = tokenizer.with_chat_template(template);
    for add_generation_prompt in [false, true] {
        let Ok(rendered) = tokenizer.apply_chat_template(&messages, add_generation_prompt) else {
            continue;
        };
        if let Ok(ids) = tokenizer.encode(&rendered, true) {
            assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
            let _ = tokenizer.decode(&ids, false);
        }
    }
});
