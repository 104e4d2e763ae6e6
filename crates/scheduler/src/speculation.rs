//! Speculative decoding wired into the scheduler: a [`Proposer`] and the [`SpecController`]
//! that picks each sequence's number of draft tokens.

use kv_block_manager::SeqId;
use rustc_hash::FxHashMap;

use crate::spec::{Proposal, ProposeRequest, Proposer, SpecController, SpecError};

/// A sequence the scheduler may speculate on this step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate<'a> {
    pub(crate) seq: SeqId,
    pub(crate) tokens: &'a [u32],
    pub(crate) temperature: f32,
    /// Most draft tokens its limits allow (`max_tokens`, `max_model_len`).
    pub(crate) max_k: usize,
}

/// Speculative decoding for a [`Scheduler`](crate::Scheduler): the proposer, the controller,
/// and the drafts of the step being planned.
#[derive(Debug)]
pub struct Speculation {
    proposer: Box<dyn Proposer>,
    controller: SpecController,
    probs: FxHashMap<SeqId, Vec<Vec<f32>>>,
    proposals: Vec<Proposal>,
}

impl Speculation {
    /// Speculation with `proposer`, its draft lengths chosen by `controller`.
    pub fn new(proposer: Box<dyn Proposer>, controller: SpecController) -> Self {
        Self {
            proposer,
            controller,
            probs: FxHashMap::default(),
            proposals: Vec::new(),
        }
    }

    /// The controller (acceptance statistics).
    pub fn controller(&self) -> &SpecController {
        &self.controller
    }

    /// Drafts for the candidates the controller picks, given `batch` running sequences.
    pub(crate) fn propose(
        &mut self,
        candidates: &[Candidate<'_>],
        batch: usize,
    ) -> Result<FxHashMap<SeqId, Vec<u32>>, SpecError> {
        self.probs.clear();
        self.controller.next_step();
        let requests: Vec<ProposeRequest<'_>> = candidates
            .iter()
            .filter_map(|c| {
                let k = self.controller.k_for(c.seq, batch).min(c.max_k);
                (k > 0).then_some(ProposeRequest {
                    seq: c.seq,
                    tokens: c.tokens,
                    k,
                    temperature: c.temperature,
                })
            })
            .collect();
        let mut drafts = FxHashMap::default();
        if requests.is_empty() {
            return Ok(drafts);
        }
        self.proposer.propose(&requests, &mut self.proposals)?;
        for (r, p) in requests.iter().zip(self.proposals.drain(..)) {
            if p.tokens.is_empty() {
                continue;
            }
            let mut tokens = p.tokens;
            tokens.truncate(r.k);
            if let Some(mut probs) = p.draft_probs {
                probs.truncate(tokens.len());
                self.probs.insert(r.seq, probs);
            }
            drafts.insert(r.seq, tokens);
        }
        Ok(drafts)
    }

    /// The draft distributions of `seq`'s drafts in the step being planned (`None`: point
    /// masses), cut to `len` rows.
    pub(crate) fn draft_probs(&self, seq: SeqId, len: usize) -> Option<Vec<Vec<f32>>> {
        self.probs.get(&seq).map(|p| p[..len.min(p.len())].to_vec())
    }

    pub(crate) fn record(
        &mut self,
        seq: SeqId,
        proposed: usize,
        accepted: usize,
    ) -> Result<(), SpecError> {
        self.controller.record(seq, proposed, accepted)
    }

    pub(crate) fn forget(&mut self, seq: SeqId) {
        self.controller.forget(seq);
        self.proposer.release(seq);
    }
}
