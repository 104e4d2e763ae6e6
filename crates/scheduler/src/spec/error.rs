//! The error type of speculative decoding.

use kv_block_manager::{BlockManagerError, SeqId};
use model::ModelError;

/// Everything that can go wrong in proposing, verifying or controlling speculation. Each
/// variant names the offending field or argument.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// A configuration field is out of range.
    #[error("invalid speculative decoding config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A [`ProposeRequest`](super::ProposeRequest) is unusable.
    #[error("propose request for sequence {seq}: `{field}` {reason}")]
    InvalidRequest {
        /// The sequence of the request.
        seq: SeqId,
        /// The offending field of the request.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An argument has the wrong length.
    #[error("`{what}` has {got} entries, expected {expected}")]
    ShapeMismatch {
        /// The argument (and row, for rows of probabilities).
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A row of probabilities has the wrong length (every row must be as long as the first
    /// row of the target's).
    #[error("`{what}` row {row} has {got} entries, expected {expected} (the vocabulary size)")]
    RowLength {
        /// The argument.
        what: &'static str,
        /// The row.
        row: usize,
        /// The length required.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A token id is not below the vocabulary size.
    #[error("`{what}`[{index}] is token {token}, outside the vocabulary of {vocab_size}")]
    TokenOutOfVocab {
        /// The argument holding the token.
        what: &'static str,
        /// Its position in the argument.
        index: usize,
        /// The token id.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A probability is negative, NaN or infinite.
    #[error("`{what}` row {row}, token {token}: probability {value} is not finite and >= 0")]
    InvalidProbability {
        /// The argument.
        what: &'static str,
        /// The row.
        row: usize,
        /// The token (column).
        token: usize,
        /// The value found.
        value: f32,
    },
    /// A row of probabilities does not sum to 1 within
    /// [`PROB_SUM_TOLERANCE`](super::PROB_SUM_TOLERANCE).
    #[error("`{what}` row {row} sums to {sum}, not 1")]
    NotNormalized {
        /// The argument.
        what: &'static str,
        /// The row.
        row: usize,
        /// Its sum.
        sum: f64,
    },
    /// A draft token has probability 0 under the distribution it was supposedly drawn from.
    #[error("draft token {token} at position {position} has draft probability 0")]
    ImpossibleDraft {
        /// The position in the draft.
        position: usize,
        /// The token.
        token: u32,
    },
    /// `record` was told that more drafts were accepted than proposed.
    #[error("sequence {seq}: {accepted} drafts accepted out of {proposed} proposed")]
    InvalidRecord {
        /// The sequence.
        seq: SeqId,
        /// Drafts proposed.
        proposed: usize,
        /// Drafts accepted.
        accepted: usize,
    },
    /// The draft model returned logits that are not finite.
    #[error("sequence {seq}: the draft model's logits are not finite")]
    NonFiniteLogits {
        /// The sequence.
        seq: SeqId,
    },
    /// The draft model's forward pass failed.
    #[error("draft model: {0}")]
    Model(#[from] ModelError),
    /// The draft model's block manager refused an operation.
    #[error("draft model's KV blocks: {0}")]
    Blocks(#[from] BlockManagerError),
}
