//! A draft model: a second, smaller model with its own paged KV cache proposes the tokens.

use kv_block_manager::{
    BlockManager, BlockManagerConfig, BlockManagerError, BlockManagerStats, BlockTableMatrix,
    SeqId, StepSlots,
};
use model::generate::argmax;
use model::{Backend, ForwardBatch};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHashMap;

use super::verify::sample_weighted;
use super::{Proposal, ProposeRequest, Proposer, SpecError, validate_requests};

/// Settings of a [`DraftModelProposer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftModelConfig {
    /// Seed of the sampling RNGs (one ChaCha8 stream per sequence, numbered by its id, so a
    /// sequence's drafts do not depend on what it is batched with).
    pub seed: u64,
    /// Most new tokens of one sequence per draft forward pass when catching up with a history
    /// (a new prompt, say); at least 1.
    pub prefill_chunk: usize,
}

impl Default for DraftModelConfig {
    /// Seed 0, chunks of 512 tokens.
    fn default() -> Self {
        Self {
            seed: 0,
            prefill_chunk: 512,
        }
    }
}

/// Proposes with a draft model that runs on its own [`Backend`] and KV cache.
///
/// Per sequence it keeps the KV of the tokens it has seen. Each [`propose`](Proposer::propose):
/// 1. **Catch up.** The cached tokens are compared with the history given (O(history) per
///    sequence); the cache is truncated to the common prefix (`BlockManager::truncate`: the
///    blocks of rejected drafts are released, nothing is copied) and the rest of the history is
///    run through the draft model, `prefill_chunk` tokens per sequence per forward pass, all
///    sequences batched. Usually the rest is the accepted drafts the cache lacks plus the
///    target's token: one short chunk.
/// 2. **Draft.** The first draft comes from the catch-up's last logits; then up to `k − 1`
///    single-token forward passes, batched across the sequences still drafting, each feeding the
///    previous draft. At temperature 0 the draft is the argmax (a point mass: `draft_probs` is
///    `None`); otherwise it is sampled from `softmax(logits / temperature)`, and those
///    probabilities are returned as the draft rows.
///
/// The last draft is never fed, so a sequence's cache ends one draft short; the next call's
/// catch-up sorts that out. A draft model must share the target's vocabulary (the verifier
/// checks the rows' length).
///
/// Memory: the draft cache is the backend's [`KvCacheConfig`](model::KvCacheConfig) (no prefix
/// caching, no swap; the model's sliding window). A sequence that cannot get blocks, or whose
/// cache cannot be rolled back past the window, is dropped and re-prefilled: when the cache is
/// full its proposal is empty (or stops short), never an error. Sequences stay cached between
/// calls until [`release`](Proposer::release)d, so size the cache for the running batch.
///
/// On an error of the draft backend every sequence of the call is dropped from the draft cache
/// (it is re-prefilled next time) and the error is returned.
pub struct DraftModelProposer {
    backend: Box<dyn Backend>,
    blocks: BlockManager,
    config: DraftModelConfig,
    /// The sequences with KV in the draft cache, and their sampling RNGs.
    rngs: FxHashMap<SeqId, ChaCha8Rng>,
    scratch: Scratch,
}

impl std::fmt::Debug for DraftModelProposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DraftModelProposer")
            .field("config", &self.config)
            .field("blocks", &self.blocks.stats())
            .field("num_sequences", &self.rngs.len())
            .finish_non_exhaustive()
    }
}

/// Buffers of one forward pass, reused across passes.
#[derive(Debug, Default)]
struct Scratch {
    step: StepSlots,
    matrix: BlockTableMatrix,
    seqs: Vec<SeqId>,
    token_ids: Vec<u32>,
    positions: Vec<u32>,
    seq_starts: Vec<u32>,
    logits_indices: Vec<u32>,
    /// For each row of logits: the entry of `active` it belongs to.
    rows: Vec<usize>,
    logits: Vec<f32>,
}

/// One sequence being drafted for in the current call.
#[derive(Debug)]
struct Active {
    /// Index of the request.
    request: usize,
    /// History tokens already fed to the draft model.
    fed: usize,
    /// Still drafting (false: finished, or dropped for lack of memory).
    live: bool,
}

/// Whether a block-manager error means "no room for this sequence now" rather than a bug.
fn is_capacity(e: &BlockManagerError) -> bool {
    matches!(
        e,
        BlockManagerError::OutOfBlocks { .. } | BlockManagerError::SequenceTooLong { .. }
    )
}

impl DraftModelProposer {
    /// A proposer running `backend` (its whole KV cache is the draft cache).
    pub fn new(backend: Box<dyn Backend>, config: DraftModelConfig) -> Result<Self, SpecError> {
        if config.prefill_chunk == 0 {
            return Err(SpecError::InvalidConfig {
                field: "prefill_chunk",
                reason: "must be at least 1".into(),
            });
        }
        let cache = backend.kv_cache_config();
        let mut blocks = BlockManagerConfig::new(cache.num_blocks);
        blocks.block_size = cache.block_size;
        blocks.enable_prefix_caching = false;
        blocks.sliding_window = backend.config().sliding_window;
        blocks.watermark = 0.0;
        Ok(Self {
            blocks: BlockManager::new(blocks)?,
            backend,
            config,
            rngs: FxHashMap::default(),
            scratch: Scratch::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> DraftModelConfig {
        self.config
    }

    /// The tokens of `seq` whose KV the draft cache holds (`None`: nothing cached).
    pub fn cached_tokens(&self, seq: SeqId) -> Option<&[u32]> {
        self.rngs
            .contains_key(&seq)
            .then(|| self.blocks.tokens(seq).ok())
            .flatten()
    }

    /// Block usage of the draft cache.
    pub fn kv_stats(&self) -> BlockManagerStats {
        self.blocks.stats()
    }

    /// Drops `seq`'s cache and RNG.
    fn drop_seq(&mut self, seq: SeqId) {
        if self.rngs.remove(&seq).is_some() {
            // Known to the manager whenever it has an RNG; nothing else can fail.
            let _ = self.blocks.free(seq);
        }
    }

    /// Makes the cache of `seq` a prefix of `tokens` that leaves at least the last token to
    /// feed; returns how many tokens are cached.
    fn catch_up_start(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, SpecError> {
        if self.rngs.contains_key(&seq) {
            let cached = self.blocks.tokens(seq)?;
            let common = cached
                .iter()
                .zip(tokens)
                .take_while(|(a, b)| a == b)
                .count();
            let keep = common.min(tokens.len() - 1);
            if keep == cached.len() {
                return Ok(keep);
            }
            if keep > 0 && self.blocks.truncate(seq, keep).is_ok() {
                return Ok(keep);
            }
            // Nothing in common, or the window released what the rollback would need.
            self.drop_seq(seq);
        }
        self.blocks.add_sequence(seq, tokens, None)?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(seq.0);
        self.rngs.insert(seq, rng);
        Ok(0)
    }

    /// Gives slots to the next `tokens` of `seq` (pending prompt tokens, or new ones).
    fn slot(&mut self, seq: SeqId, tokens: &[u32]) -> Result<(), BlockManagerError> {
        if self.blocks.tokens(seq)?.len() > self.blocks.num_slotted_tokens(seq)? {
            self.blocks
                .allocate_slots(seq, tokens.len(), &mut self.scratch.step)
        } else {
            self.blocks
                .append_tokens(seq, tokens, &mut self.scratch.step)
        }
    }

    /// Runs the forward pass over what the scratch holds (`scratch.seqs` in batch order).
    fn forward(&mut self) -> Result<(), SpecError> {
        let s = &mut self.scratch;
        self.blocks
            .update_block_table_matrix(&s.seqs, None, &mut s.matrix)?;
        let batch = ForwardBatch {
            token_ids: &s.token_ids,
            positions: &s.positions,
            slot_mapping: &s.step.slot_mapping,
            seq_starts: &s.seq_starts,
            block_tables: s.matrix.block_tables(),
            max_blocks: s.matrix.max_blocks(),
            context_lens: s.matrix.context_lens(),
            logits_indices: &s.logits_indices,
        };
        self.backend.copy_blocks(&s.step.copies)?;
        self.backend.forward(&batch, &mut s.logits)?;
        Ok(())
    }

    fn clear_scratch(&mut self) {
        let s = &mut self.scratch;
        s.step.clear();
        s.seqs.clear();
        s.token_ids.clear();
        s.positions.clear();
        s.seq_starts.clear();
        s.seq_starts.push(0);
        s.logits_indices.clear();
        s.rows.clear();
    }

    /// Adds `tokens` of sequence `active[a]` to the scratch batch, starting at position
    /// `first`; `want_logits`: of its last token. Returns false (and drops the sequence) when
    /// it cannot get slots.
    fn push_tokens(
        &mut self,
        seq: SeqId,
        a: usize,
        tokens: &[u32],
        first: usize,
        want_logits: bool,
    ) -> Result<bool, SpecError> {
        if let Err(e) = self.slot(seq, tokens) {
            return if is_capacity(&e) {
                Ok(false)
            } else {
                Err(e.into())
            };
        }
        let s = &mut self.scratch;
        s.seqs.push(seq);
        s.token_ids.extend_from_slice(tokens);
        s.positions
            .extend((first..first + tokens.len()).map(|p| p as u32));
        s.seq_starts.push(s.token_ids.len() as u32);
        if want_logits {
            s.logits_indices.push(s.token_ids.len() as u32 - 1);
            s.rows.push(a);
        }
        Ok(true)
    }

    /// Samples one draft per row of logits into the rows' proposals.
    fn sample_rows(
        &mut self,
        requests: &[ProposeRequest<'_>],
        active: &[Active],
        out: &mut [Proposal],
    ) -> Result<(), SpecError> {
        let vocab = self.backend.config().vocab_size;
        let s = &self.scratch;
        for (row, &a) in s.rows.iter().enumerate() {
            let r = &requests[active[a].request];
            let logits =
                s.logits
                    .get(row * vocab..(row + 1) * vocab)
                    .ok_or(SpecError::ShapeMismatch {
                        what: "draft logits",
                        expected: s.rows.len() * vocab,
                        got: s.logits.len(),
                    })?;
            if !logits.iter().all(|l| l.is_finite()) {
                return Err(SpecError::NonFiniteLogits { seq: r.seq });
            }
            let proposal = &mut out[active[a].request];
            if r.temperature == 0.0 {
                proposal.tokens.push(argmax(logits));
                continue;
            }
            let Some(rng) = self.rngs.get_mut(&r.seq) else {
                continue;
            };
            let probs = softmax(logits, r.temperature);
            let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
            let token = sample_weighted(vocab, total, rng.random::<f64>(), |i| f64::from(probs[i]));
            proposal.tokens.push(token as u32);
            proposal
                .draft_probs
                .get_or_insert_with(Vec::new)
                .push(probs);
        }
        Ok(())
    }

    /// The body of `propose`, after validation; on error the caller drops the call's sequences.
    fn run(
        &mut self,
        requests: &[ProposeRequest<'_>],
        active: &mut Vec<Active>,
        out: &mut [Proposal],
    ) -> Result<(), SpecError> {
        for (i, r) in requests.iter().enumerate() {
            if r.k == 0 {
                continue;
            }
            match self.catch_up_start(r.seq, r.tokens) {
                Ok(fed) => active.push(Active {
                    request: i,
                    fed,
                    live: true,
                }),
                Err(SpecError::Blocks(e)) if is_capacity(&e) => self.drop_seq(r.seq),
                Err(e) => return Err(e),
            }
        }
        // Catch up, in rounds of at most `prefill_chunk` tokens per sequence.
        loop {
            self.clear_scratch();
            for a in 0..active.len() {
                let r = &requests[active[a].request];
                let fed = active[a].fed;
                if !active[a].live || fed == r.tokens.len() {
                    continue;
                }
                let n = self.config.prefill_chunk.min(r.tokens.len() - fed);
                let last = fed + n == r.tokens.len();
                if self.push_tokens(r.seq, a, &r.tokens[fed..fed + n], fed, last)? {
                    active[a].fed += n;
                } else {
                    active[a].live = false;
                    self.drop_seq(r.seq);
                }
            }
            if self.scratch.seqs.is_empty() {
                break;
            }
            self.forward()?;
            self.sample_rows(requests, active, out)?;
        }
        // Draft: one token per pass for every sequence that wants more.
        loop {
            self.clear_scratch();
            for a in 0..active.len() {
                let r = &requests[active[a].request];
                let drafted = &out[active[a].request].tokens;
                let Some(&last) = drafted.last() else {
                    continue;
                };
                if !active[a].live || drafted.len() >= r.k {
                    continue;
                }
                let position = r.tokens.len() + drafted.len() - 1;
                if !self.push_tokens(r.seq, a, &[last], position, true)? {
                    // Out of blocks: keep the drafts so far and the cache as it is.
                    active[a].live = false;
                }
            }
            if self.scratch.seqs.is_empty() {
                break;
            }
            self.forward()?;
            self.sample_rows(requests, active, out)?;
        }
        Ok(())
    }
}

/// `softmax(logits / temperature)` in f32, computed in f64.
fn softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let t = f64::from(temperature);
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - f64::from(max)) / t).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|&v| (v / sum) as f32).collect()
}

impl Proposer for DraftModelProposer {
    fn propose(
        &mut self,
        requests: &[ProposeRequest<'_>],
        out: &mut Vec<Proposal>,
    ) -> Result<(), SpecError> {
        out.clear();
        validate_requests(requests)?;
        let vocab = self.backend.config().vocab_size;
        for r in requests {
            if let Some((i, &t)) = r
                .tokens
                .iter()
                .enumerate()
                .find(|(_, t)| **t as usize >= vocab)
            {
                return Err(SpecError::InvalidRequest {
                    seq: r.seq,
                    field: "tokens",
                    reason: format!(
                        "token {t} at position {i} is outside the draft model's vocabulary of {vocab}"
                    ),
                });
            }
        }
        out.resize_with(requests.len(), Proposal::default);
        let mut active = Vec::with_capacity(requests.len());
        if let Err(e) = self.run(requests, &mut active, out) {
            for a in &active {
                self.drop_seq(requests[a.request].seq);
            }
            out.clear();
            return Err(e);
        }
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        self.drop_seq(seq);
    }
}
