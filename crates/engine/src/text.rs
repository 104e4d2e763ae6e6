//! The text side of one completion: incremental detokenization and stop strings.
//!
//! Generated ids go through [`model::IncrementalDetokenizer`], so no chunk ever ends inside a
//! UTF-8 character. The decoded text then waits in a buffer while its end could still be the
//! start of a stop string: a stop string is matched on the text across token boundaries, and
//! neither it nor anything after it is ever emitted. Because the held-back part is exactly the
//! longest suffix that is a proper prefix of some stop string, a stop string can never begin
//! inside text already emitted, so only the buffer needs searching.

use model::{IncrementalDetokenizer, Tokenizer};

/// What the buffer allows after new text arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    /// A stop string starts at this byte: emit what is before it, drop the rest, stop.
    Stop(usize),
    /// No stop string: emit this many bytes, hold the rest back.
    Emit(usize),
}

/// Scans `pending` (text not emitted yet) for the stop strings (none empty).
pub(crate) fn scan(pending: &str, stops: &[String]) -> Scan {
    let first = stops.iter().filter_map(|s| pending.find(s.as_str())).min();
    if let Some(at) = first {
        return Scan::Stop(at);
    }
    // The longest suffix of `pending` that is a proper prefix of a stop string.
    let mut hold = 0;
    for s in stops {
        let longest = (s.len() - 1).min(pending.len());
        for k in (hold + 1..=longest).rev() {
            if s.is_char_boundary(k) && pending.ends_with(&s[..k]) {
                hold = k;
                break;
            }
        }
    }
    Scan::Emit(pending.len() - hold)
}

/// The text state of one completion.
#[derive(Debug)]
pub(crate) struct TextStream {
    detok: IncrementalDetokenizer,
    /// Decoded text not emitted yet.
    pending: String,
}

/// The text a pushed token releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pushed {
    /// Text to emit now.
    pub(crate) text: String,
    /// A stop string was matched: the completion ends here.
    pub(crate) stopped: bool,
}

impl TextStream {
    /// A stream for the tokens generated after `prompt` (its last tokens are decoding context).
    pub(crate) fn new(tokenizer: &Tokenizer, prompt: &[u32]) -> Self {
        let detok = IncrementalDetokenizer::with_prompt(tokenizer, prompt, true)
            .unwrap_or_else(|_| IncrementalDetokenizer::new(true));
        Self {
            detok,
            pending: String::new(),
        }
    }

    /// Decodes one generated token. A token the tokenizer cannot decode adds no text.
    pub(crate) fn push(&mut self, tokenizer: &Tokenizer, id: u32, stops: &[String]) -> Pushed {
        match self.detok.push(tokenizer, id) {
            Ok(text) => self.pending.push_str(&text),
            Err(e) => tracing::warn!(token = id, error = %e, "cannot decode a generated token"),
        }
        self.release(stops)
    }

    /// The completion ended for another reason: the held-back text, and any incomplete
    /// character as U+FFFD (up to a stop string, should the flush complete one).
    pub(crate) fn finish(&mut self, tokenizer: &Tokenizer, stops: &[String]) -> String {
        match self.detok.finish(tokenizer) {
            Ok(text) => self.pending.push_str(&text),
            Err(e) => tracing::warn!(error = %e, "cannot flush the detokenizer"),
        }
        let text = match scan(&self.pending, stops) {
            Scan::Stop(at) => self.pending[..at].to_owned(),
            Scan::Emit(_) => self.pending.clone(),
        };
        self.pending.clear();
        text
    }

    fn release(&mut self, stops: &[String]) -> Pushed {
        match scan(&self.pending, stops) {
            Scan::Stop(at) => {
                let text = self.pending[..at].to_owned();
                self.pending.clear();
                Pushed {
                    text,
                    stopped: true,
                }
            }
            Scan::Emit(n) => {
                let rest = self.pending.split_off(n);
                let text = std::mem::replace(&mut self.pending, rest);
                Pushed {
                    text,
                    stopped: false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Feeds `chunks` one at a time like decoded tokens; returns what was emitted and whether
    /// it stopped.
    fn feed(chunks: &[&str], stop: &[&str]) -> (String, bool) {
        let stop = stops(stop);
        let mut pending = String::new();
        let mut out = String::new();
        for c in chunks {
            pending.push_str(c);
            match scan(&pending, &stop) {
                Scan::Stop(at) => {
                    out.push_str(&pending[..at]);
                    return (out, true);
                }
                Scan::Emit(n) => {
                    out.push_str(&pending[..n]);
                    pending.drain(..n);
                }
            }
        }
        out.push_str(&pending);
        (out, false)
    }

    #[test]
    fn no_stop_strings_emits_everything() {
        assert_eq!(scan("hello", &[]), Scan::Emit(5));
        assert_eq!(feed(&["a", "b"], &[]), ("ab".into(), false));
    }

    #[test]
    fn a_stop_string_across_chunks_is_found_and_excluded() {
        assert_eq!(
            feed(&["Hello", " wo", "rld", "!"], &["world"]),
            ("Hello ".into(), true)
        );
        assert_eq!(
            feed(&["a", "S", "T", "O", "P", "b"], &["STOP"]),
            ("a".into(), true)
        );
        // The stop string in the middle of a chunk: what follows it is dropped too.
        assert_eq!(feed(&["abcSTOPdef"], &["STOP"]), ("abc".into(), true));
    }

    #[test]
    fn text_that_might_start_a_stop_string_is_held_back_then_released() {
        assert_eq!(scan("abc wo", &stops(&["world"])), Scan::Emit(4));
        assert_eq!(scan("abc w", &stops(&["world"])), Scan::Emit(4));
        assert_eq!(scan("abc x", &stops(&["world"])), Scan::Emit(5));
        // A false start is released once it cannot match any more.
        assert_eq!(
            feed(&["Hello", " wo", "nder"], &["world"]),
            ("Hello wonder".into(), false)
        );
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        assert_eq!(
            scan("xx END yy STOP", &stops(&["STOP", "END"])),
            Scan::Stop(3)
        );
        assert_eq!(
            feed(&["one\n", "two\n\n", "three"], &["\n\n", "two"]),
            ("one\n".into(), true)
        );
        // Holding back for the longest candidate among several.
        assert_eq!(scan("ab", &stops(&["b", "abc"])), Scan::Stop(1));
        assert_eq!(scan("xab", &stops(&["bz", "abc"])), Scan::Emit(1));
    }

    #[test]
    fn multibyte_stop_strings_hold_back_on_character_boundaries() {
        // "é" is two bytes; "日本" six.
        assert_eq!(scan("caf", &stops(&["café!"])), Scan::Emit(0));
        assert_eq!(scan("x日", &stops(&["日本"])), Scan::Emit(1));
        assert_eq!(feed(&["x", "日", "本", "y"], &["日本"]), ("x".into(), true));
        assert_eq!(feed(&["x", "日", "月"], &["日本"]), ("x日月".into(), false));
    }
}
