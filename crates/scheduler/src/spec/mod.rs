//! Speculative decoding: cheap proposals of the next `k` tokens, verified by the target model
//! in one forward pass.
//!
//! A decode step of a speculating sequence runs the target model over its last token plus the
//! `k` proposed tokens (`k + 1` positions, one forward), and keeps the longest prefix of the
//! proposal that the target agrees with, plus one token of the target's own. Every step emits at
//! least one token, and the emitted tokens have exactly the target's distribution (greedy: the
//! same tokens as plain decoding), so speculation changes speed only, never output.
//!
//! What it owns:
//! - [`Proposer`]: who proposes. [`NgramProposer`] looks the sequence's last n-gram up in its
//!   own history (prompt-lookup decoding, no model); [`DraftModelProposer`] runs a smaller model
//!   with its own paged KV cache and block manager.
//! - Verification: [`verify_greedy`] (longest prefix equal to the target's argmax, plus one
//!   corrected or bonus token) and [`verify_stochastic`] (rejection sampling of Leviathan et al.
//!   and Chen et al.: accept a draft `x` with probability `min(1, p(x) / q(x))`, on rejection
//!   sample from `normalize(max(0, p − q))`, bonus token from the last target row when every
//!   draft is accepted).
//! - [`SpecController`]: how many tokens to propose per sequence; fewer (or none) when the batch
//!   is large or the sequence's drafts are rarely accepted, with periodic probes so a sequence
//!   that stopped speculating can start again.
//!
//! What it does not own: the target forward pass and the KV rollback of the target's cache. The
//! scheduler appends the `k` proposed tokens to the sequence's block table, runs the verifying
//! forward, and after verification truncates the block table to the tokens kept
//! (`kv_block_manager::BlockManager::truncate`): rejected tokens' slots are released, nothing is
//! copied.
//!
//! # One step, for one sequence
//!
//! ```
//! use kv_block_manager::SeqId;
//! use scheduler::spec::{
//!     NgramConfig, NgramProposer, Proposal, ProposeRequest, Proposer, SpecController,
//!     SpecControllerConfig, verify_greedy,
//! };
//!
//! let mut proposer = NgramProposer::new(NgramConfig { min_n: 1, max_n: 3 })?;
//! let mut controller = SpecController::new(SpecControllerConfig::default())?;
//! let seq = SeqId(7);
//! let mut history: Vec<u32> = vec![5, 6, 7, 8, 9, 5, 6];
//!
//! controller.next_step();
//! let k = controller.k_for(seq, 1); // one running sequence
//! assert_eq!(k, 3); // the default prior acceptance 0.7: 0.7³ ≥ 0.3 > 0.7⁴
//! let mut proposals: Vec<Proposal> = Vec::new();
//! proposer.propose(
//!     &[ProposeRequest { seq, tokens: &history, k, temperature: 0.0 }],
//!     &mut proposals,
//! )?;
//! assert_eq!(proposals[0].tokens, [7, 8, 9]); // what followed the earlier "5 6"
//!
//! // The target runs [6, 7, 8, 9] in one forward; say its argmax rows are these:
//! let target_argmax = [7, 8, 4, 0];
//! let verified = verify_greedy(&proposals[0].tokens, &target_argmax)?;
//! assert_eq!(verified.tokens, [7, 8, 4]); // two drafts accepted, then the target's token
//! controller.record(seq, proposals[0].tokens.len(), verified.num_accepted_drafts)?;
//! history.extend_from_slice(&verified.tokens);
//! // The scheduler truncates the block table to the history's length (minus the newest token,
//! // which has no KV yet), and at the end: `proposer.release(seq); controller.forget(seq);`
//! # Ok::<(), scheduler::spec::SpecError>(())
//! ```

mod controller;
mod draft;
mod error;
mod ngram;
mod verify;

pub use controller::{MAX_K, SpecController, SpecControllerConfig};
pub use draft::{DraftModelConfig, DraftModelProposer};
pub use error::SpecError;
pub use ngram::{MAX_NGRAM, NgramConfig, NgramProposer};
pub use verify::{PROB_SUM_TOLERANCE, Verified, verify_greedy, verify_stochastic};

use kv_block_manager::SeqId;

/// One sequence the scheduler wants proposals for.
#[derive(Debug, Clone, Copy)]
pub struct ProposeRequest<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// Its whole known token history: the prompt and every token generated (accepted) so far.
    /// Must not be empty.
    pub tokens: &'a [u32],
    /// Most tokens to propose (0: none).
    pub k: usize,
    /// The sequence's sampling temperature: 0 for greedy decoding, else > 0 (finite).
    pub temperature: f32,
}

/// What a [`Proposer`] proposes for one sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Proposal {
    /// At most `k` proposed tokens, in order (possibly none: then the sequence decodes one
    /// token as usual).
    pub tokens: Vec<u32>,
    /// The draft distribution each token was sampled from: `tokens.len()` rows of
    /// `vocab_size` probabilities. `None` means a point mass on each proposed token (greedy
    /// drafts, n-gram lookups).
    pub draft_probs: Option<Vec<Vec<f32>>>,
}

/// Proposes the next tokens of many sequences at once.
///
/// The scheduler calls [`propose`](Self::propose) once per step for the sequences it chose to
/// speculate on, with each sequence's whole accepted history, and [`release`](Self::release)
/// when a sequence finishes, is preempted or aborted. A proposer that keeps per-sequence state
/// (an index, a KV cache) brings it up to date from the history it is given, so rejected
/// proposals need no separate notification: the next history simply does not contain them.
///
/// Proposals only affect speed: verification keeps the output exact whatever is proposed, as
/// long as a proposed token was drawn from the `draft_probs` it reports.
pub trait Proposer: Send + std::fmt::Debug {
    /// Clears `out` and pushes one [`Proposal`] per request, in order. On error `out` is empty.
    fn propose(
        &mut self,
        requests: &[ProposeRequest<'_>],
        out: &mut Vec<Proposal>,
    ) -> Result<(), SpecError>;

    /// Forgets everything about `seq` (a no-op for an unknown sequence).
    fn release(&mut self, seq: SeqId);
}

/// Checks what every proposer needs of a batch of requests: non-empty histories, valid
/// temperatures, each sequence at most once.
fn validate_requests(requests: &[ProposeRequest<'_>]) -> Result<(), SpecError> {
    let mut seen = rustc_hash::FxHashSet::default();
    for r in requests {
        if r.tokens.is_empty() {
            return Err(SpecError::InvalidRequest {
                seq: r.seq,
                field: "tokens",
                reason: "the token history is empty".into(),
            });
        }
        if !(r.temperature.is_finite() && r.temperature >= 0.0) {
            return Err(SpecError::InvalidRequest {
                seq: r.seq,
                field: "temperature",
                reason: format!("is {}, must be finite and >= 0", r.temperature),
            });
        }
        if !seen.insert(r.seq) {
            return Err(SpecError::InvalidRequest {
                seq: r.seq,
                field: "seq",
                reason: "appears more than once in the batch".into(),
            });
        }
    }
    Ok(())
}
