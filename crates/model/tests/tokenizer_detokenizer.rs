//! The incremental detokenizer: chunks are whole characters and add up to the full decode.

mod tokenizer_support;

use model::tokenizer::{IncrementalDetokenizer, Tokenizer, TokenizerError};
use proptest::prelude::*;
use tokenizer_support::smollm2;

/// Streams `ids` through a fresh detokenizer in slices of `steps` (cycled), returning chunks.
fn stream(tok: &Tokenizer, ids: &[u32], steps: &[usize], skip_special_tokens: bool) -> Vec<String> {
    let mut detok = IncrementalDetokenizer::new(skip_special_tokens);
    let mut chunks = Vec::new();
    let mut rest = ids;
    let mut step = steps.iter().cycle();
    while !rest.is_empty() {
        let n = (*step.next().unwrap_or(&1)).clamp(1, rest.len());
        let (now, later) = rest.split_at(n);
        chunks.push(detok.push_ids(tok, now).expect("push"));
        rest = later;
    }
    chunks.push(detok.finish(tok).expect("finish"));
    chunks
}

/// Checks the detokenizer's contract on `ids`.
fn check(tok: &Tokenizer, ids: &[u32], steps: &[usize], skip: bool) -> Result<(), TestCaseError> {
    let full = tok.decode(ids, skip).expect("decode");
    let chunks = stream(tok, ids, steps, skip);
    let joined: String = chunks.concat();
    prop_assert_eq!(&joined, &full);
    // Every chunk but the flush is whole characters: a U+FFFD inside a chunk is one the full
    // decode has at that place (it is a String, so always valid UTF-8).
    let mut at = 0;
    for chunk in &chunks[..chunks.len() - 1] {
        prop_assert!(full[at..].starts_with(chunk.as_str()));
        at += chunk.len();
    }
    Ok(())
}

/// The ids of tokens whose bytes are not valid UTF-8 on their own (pieces of characters).
fn partial_char_ids(tok: &Tokenizer) -> Vec<u32> {
    (0..tok.vocab_size() as u32)
        .filter(|&id| {
            tok.decode(&[id], false)
                .is_ok_and(|s| s.contains('\u{FFFD}'))
        })
        .collect()
}

fn partial_ids() -> &'static [u32] {
    static IDS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    IDS.get_or_init(|| partial_char_ids(smollm2()))
}

#[test]
fn split_characters_wait_for_their_last_byte() {
    let tok = smollm2();
    // One emoji per token split: the byte-level pieces of 😀 (4 bytes) decode alone to U+FFFD.
    let ids = tok.encode("a😀b 漢字", false).expect("encode");
    let mut detok = IncrementalDetokenizer::new(false);
    let mut chunks = Vec::new();
    for &id in &ids {
        chunks.push(detok.push(tok, id).expect("push"));
    }
    chunks.push(detok.finish(tok).expect("finish"));
    assert_eq!(chunks.concat(), "a😀b 漢字");
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    assert!(chunks.len() > 2);
}

#[test]
fn incomplete_tail_is_flushed_as_replacement() {
    let tok = smollm2();
    let ids = tok.encode("x😀", false).expect("encode");
    let mut detok = IncrementalDetokenizer::new(false);
    let mut out = String::new();
    // Everything but the emoji's last piece.
    for &id in &ids[..ids.len() - 1] {
        out.push_str(&detok.push(tok, id).expect("push"));
    }
    assert_eq!(out, "x");
    let tail = detok.finish(tok).expect("finish");
    assert_eq!(tail, "\u{FFFD}");
    assert_eq!(detok.finish(tok).ok().as_deref(), Some(""));
}

#[test]
fn spaces_and_special_tokens() {
    let tok = smollm2();
    let ids = tok
        .encode("<|im_start|>assistant\n Hello  world<|im_end|>", false)
        .expect("encode");
    let chunks = stream(tok, &ids, &[1], true);
    assert_eq!(chunks.concat(), "assistant\n Hello  world");
    let chunks = stream(tok, &ids, &[1], false);
    assert_eq!(
        chunks.concat(),
        "<|im_start|>assistant\n Hello  world<|im_end|>"
    );
}

#[test]
fn with_prompt_emits_only_new_text() {
    let tok = smollm2();
    let prompt = tok
        .encode(
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .expect("encode");
    let answer = tok.encode("Hello there 👋", false).expect("encode");
    let mut detok = IncrementalDetokenizer::with_prompt(tok, &prompt, true).expect("prompt");
    let mut out = String::new();
    for &id in &answer {
        out.push_str(&detok.push(tok, id).expect("push"));
    }
    out.push_str(&detok.finish(tok).expect("finish"));
    assert_eq!(out, "Hello there 👋");
}

#[test]
fn prompt_ending_inside_a_character() {
    let tok = smollm2();
    let ids = tok.encode("x😀", false).expect("encode");
    let (prompt, rest) = ids.split_at(ids.len() - 1);
    let mut detok = IncrementalDetokenizer::with_prompt(tok, prompt, false).expect("prompt");
    // The character the prompt started is completed by the first generated token.
    assert_eq!(detok.push_ids(tok, rest).ok().as_deref(), Some("😀"));
    assert_eq!(detok.push(tok, 905).ok().as_deref(), Some(" world"));
}

#[test]
fn bad_ids_leave_the_detokenizer_unchanged() {
    let tok = smollm2();
    let mut detok = IncrementalDetokenizer::new(false);
    let hello = tok.encode("Hello", false).expect("encode");
    assert_eq!(detok.push_ids(tok, &hello).ok().as_deref(), Some("Hello"));
    let before = detok.clone();
    let err = detok.push_ids(tok, &[905, 49152]).expect_err("bad id");
    assert!(matches!(
        err,
        TokenizerError::UnknownTokenId { id: 49152, .. }
    ));
    assert_eq!(detok, before);
    assert!(IncrementalDetokenizer::with_prompt(tok, &[u32::MAX], false).is_err());
    assert_eq!(detok.push(tok, 905).ok().as_deref(), Some(" world"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Random ids from the whole vocabulary, mixed with pieces of characters and special
    /// tokens, pushed in random slice sizes.
    #[test]
    fn random_ids_stream_like_full_decode(
        picks in prop::collection::vec((0u8..4, any::<prop::sample::Index>()), 0..48),
        steps in prop::collection::vec(1usize..4, 1..4),
        skip in any::<bool>(),
    ) {
        let tok = smollm2();
        let partial = partial_ids();
        let ids: Vec<u32> = picks
            .iter()
            .map(|(kind, index)| match kind {
                0 => index.index(17) as u32,                          // special tokens
                1 => partial[index.index(partial.len())],             // pieces of characters
                _ => index.index(tok.vocab_size()) as u32,             // anything
            })
            .collect();
        check(tok, &ids, &steps, skip)?;
    }

    /// Real text (emoji, CJK, combining marks, spaces) encoded, then streamed one id at a time.
    #[test]
    fn encoded_text_streams_back(
        text in "(\\PC|[ \\n\\t]|😀|👍🏽|漢字|e\u{301}|<\\|im_end\\|>){0,24}",
        skip in any::<bool>(),
    ) {
        let tok = smollm2();
        let ids = tok.encode(&text, false).expect("encode");
        check(tok, &ids, &[1], skip)?;
        if !skip {
            prop_assert_eq!(stream(tok, &ids, &[1], false).concat(), text);
        }
    }
}
