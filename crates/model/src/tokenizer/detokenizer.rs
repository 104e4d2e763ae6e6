//! Streaming detokenization: generated ids in, finished text out.

use super::{Result, Tokenizer};

/// How many prompt tokens [`IncrementalDetokenizer::with_prompt`] keeps as context (as vLLM).
const PROMPT_CONTEXT_TOKENS: usize = 5;

const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// Turns a stream of token ids into text chunks.
///
/// A chunk never ends inside a UTF-8 character that later tokens complete: while the decoded
/// text ends with U+FFFD (an incomplete byte sequence, as byte-level BPE tokens can split a
/// character), nothing is emitted and the ids wait. The text of each step is found by decoding
/// a small window of ids (the previous chunk's ids as context, then the new ones) and removing
/// the decoded context, the prefix/read-offset technique of TGI and vLLM, so that decoders
/// whose output depends on neighbouring tokens (leading-space rules, merges) stay right. Memory
/// is bounded by that window, not by the sequence length.
///
/// The concatenation of all chunks and [`IncrementalDetokenizer::finish`] equals
/// [`Tokenizer::decode`] of all ids pushed (for a detokenizer made with
/// [`IncrementalDetokenizer::new`]).
///
/// The detokenizer holds no tokenizer; pass the same [`Tokenizer`] to every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncrementalDetokenizer {
    skip_special_tokens: bool,
    /// The window: `ids[..read]` is context already emitted, `ids[read..]` is not yet emitted.
    ids: Vec<u32>,
    read: usize,
    /// `decode(ids[..read])`.
    context_text: String,
}

impl IncrementalDetokenizer {
    /// A detokenizer for a stream that starts with no context.
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ids: Vec::new(),
            read: 0,
            context_text: String::new(),
        }
    }

    /// A detokenizer for the tokens generated after `prompt_ids`: the prompt's last tokens are
    /// context (not emitted), so the first generated token decodes as it does after the prompt.
    pub fn with_prompt(
        tokenizer: &Tokenizer,
        prompt_ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<Self> {
        tokenizer.check_ids(prompt_ids)?;
        let start = prompt_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS);
        let ids = prompt_ids[start..].to_vec();
        let context_text = tokenizer.decode_unchecked(&ids, skip_special_tokens)?;
        Ok(Self {
            skip_special_tokens,
            read: ids.len(),
            ids,
            context_text,
        })
    }

    /// Pushes one id and returns the text it completes (often empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.push_ids(tokenizer, &[id])
    }

    /// Pushes several ids and returns the text they complete (often empty). On error (an id
    /// not in the vocabulary) nothing is pushed.
    pub fn push_ids(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
        tokenizer.check_ids(ids)?;
        if ids.is_empty() {
            return Ok(String::new());
        }
        let before = self.ids.len();
        self.ids.extend_from_slice(ids);
        let text = match tokenizer.decode_unchecked(&self.ids, self.skip_special_tokens) {
            Ok(text) => text,
            Err(e) => {
                self.ids.truncate(before);
                return Err(e);
            }
        };
        if text.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let new_text = self.new_text(&text);
        if new_text.is_empty() {
            return Ok(String::new());
        }
        self.advance(tokenizer)?;
        Ok(new_text)
    }

    /// Flushes what is left: the text of the ids not emitted yet, with U+FFFD for a trailing
    /// incomplete character. The detokenizer can be used on afterwards.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let text = tokenizer.decode_unchecked(&self.ids, self.skip_special_tokens)?;
        let new_text = self.new_text(&text);
        self.advance(tokenizer)?;
        Ok(new_text)
    }

    /// The part of `text` (the decode of the whole window) after the context. If the context
    /// is not a prefix of `text` (a decoder that rewrites earlier text, or a prompt that ended
    /// inside a character), the text after the longest common prefix.
    fn new_text(&self, text: &str) -> String {
        if let Some(rest) = text.strip_prefix(self.context_text.as_str()) {
            return rest.to_owned();
        }
        let common = text
            .char_indices()
            .zip(self.context_text.chars())
            .find(|((_, a), b)| a != b)
            .map_or_else(|| text.len().min(self.context_text.len()), |((i, _), _)| i);
        text.get(common..).unwrap_or_default().to_owned()
    }

    /// Makes the not-yet-emitted ids the new context and drops the old context.
    fn advance(&mut self, tokenizer: &Tokenizer) -> Result<()> {
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.context_text = tokenizer.decode_unchecked(&self.ids, self.skip_special_tokens)?;
        Ok(())
    }
}
