//! A minimal single-sequence driver: feed tokens through a [`Backend`] with a private block
//! manager, and greedy or sampled generation. The engine replaces it for serving; tests,
//! examples and evaluations use it.

use kv_block_manager::{BlockManager, BlockManagerConfig, BlockTableMatrix, SeqId, StepSlots};

use crate::backend::{Backend, ForwardBatch};
use crate::error::ModelError;

const SEQ: SeqId = SeqId(0);

/// One sequence fed through a backend, chunk by chunk, over the paged cache.
pub struct SequenceRunner<'b> {
    backend: &'b mut dyn Backend,
    blocks: BlockManager,
    started: bool,
    step: StepSlots,
    matrix: BlockTableMatrix,
    positions: Vec<u32>,
    logits_indices: Vec<u32>,
    logits: Vec<f32>,
}

impl std::fmt::Debug for SequenceRunner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceRunner")
            .field("blocks", &self.blocks.stats())
            .finish_non_exhaustive()
    }
}

impl<'b> SequenceRunner<'b> {
    /// A runner over `backend`'s whole KV cache.
    pub fn new(backend: &'b mut dyn Backend) -> Result<Self, ModelError> {
        let cache = backend.kv_cache_config();
        let mut config = BlockManagerConfig::new(cache.num_blocks);
        config.block_size = cache.block_size;
        config.enable_prefix_caching = false;
        config.sliding_window = backend.config().sliding_window;
        config.watermark = 0.0;
        Ok(Self {
            blocks: BlockManager::new(config)?,
            backend,
            started: false,
            step: StepSlots::default(),
            matrix: BlockTableMatrix::default(),
            positions: Vec::new(),
            logits_indices: Vec::new(),
            logits: Vec::new(),
        })
    }

    /// Tokens fed so far.
    pub fn len(&self) -> usize {
        self.blocks.num_slotted_tokens(SEQ).unwrap_or(0)
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Feeds `tokens` after those fed before, `chunk` tokens per forward pass. Returns the
    /// next-token logits (`vocab_size` each) of every fed token if `all_logits`, else of the
    /// last one only.
    pub fn feed(
        &mut self,
        tokens: &[u32],
        chunk: usize,
        all_logits: bool,
    ) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() || chunk == 0 {
            return Err(ModelError::InvalidBatch {
                field: "token_ids",
                reason: "feed needs at least one token and a chunk size of at least one".into(),
            });
        }
        if !self.started {
            self.blocks.add_sequence(SEQ, tokens, None)?;
            self.started = true;
        }
        let mut out = Vec::new();
        let mut fed = 0;
        while fed < tokens.len() {
            let n = chunk.min(tokens.len() - fed);
            let first = self.len();
            self.step.clear();
            if self.blocks.tokens(SEQ)?.len() > first {
                self.blocks.allocate_slots(SEQ, n, &mut self.step)?;
            } else {
                self.blocks
                    .append_tokens(SEQ, &tokens[fed..fed + n], &mut self.step)?;
            }
            self.blocks
                .update_block_table_matrix(&[SEQ], None, &mut self.matrix)?;
            self.positions.clear();
            self.positions.extend((first..first + n).map(|p| p as u32));
            let last_chunk = fed + n == tokens.len();
            self.logits_indices.clear();
            if all_logits {
                self.logits_indices.extend(0..n as u32);
            } else if last_chunk {
                self.logits_indices.push(n as u32 - 1);
            }
            let batch = ForwardBatch {
                token_ids: &tokens[fed..fed + n],
                positions: &self.positions,
                slot_mapping: &self.step.slot_mapping,
                seq_starts: &[0, n as u32],
                block_tables: self.matrix.block_tables(),
                max_blocks: self.matrix.max_blocks(),
                context_lens: self.matrix.context_lens(),
                logits_indices: &self.logits_indices,
            };
            self.backend.copy_blocks(&self.step.copies)?;
            self.backend.forward(&batch, &mut self.logits)?;
            out.extend_from_slice(&self.logits);
            fed += n;
        }
        Ok(out)
    }
}

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Sample from softmax(logits / temperature), reproducibly from `seed`.
    Temperature {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Random seed.
        seed: u64,
    },
}

/// Options of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Generation stops after producing one of these.
    pub stop_tokens: Vec<u32>,
    /// Tokens per prefill forward pass.
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            sampling: Sampling::Greedy,
            stop_tokens: Vec::new(),
            prefill_chunk: 512,
        }
    }
}

/// Index of the largest logit (the first of equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates up to `options.max_new_tokens` tokens after `prompt`.
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    options: &GenerateOptions,
) -> Result<Vec<u32>, ModelError> {
    if let Sampling::Temperature { temperature, .. } = options.sampling
        && !(temperature.is_finite() && temperature > 0.0)
    {
        return Err(ModelError::Unsupported(format!(
            "temperature {temperature}"
        )));
    }
    let mut rng = match options.sampling {
        Sampling::Temperature { seed, .. } => seed | 1,
        Sampling::Greedy => 1,
    };
    let mut runner = SequenceRunner::new(backend)?;
    let mut logits = runner.feed(prompt, options.prefill_chunk.max(1), false)?;
    let mut out = Vec::with_capacity(options.max_new_tokens);
    while out.len() < options.max_new_tokens {
        let next = match options.sampling {
            Sampling::Greedy => argmax(&logits),
            Sampling::Temperature { temperature, .. } => {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                sample(
                    &logits,
                    temperature,
                    (rng >> 11) as f64 / (1u64 << 53) as f64,
                )
            }
        };
        out.push(next);
        if options.stop_tokens.contains(&next) || out.len() == options.max_new_tokens {
            break;
        }
        logits = runner.feed(&[next], 1, false)?;
    }
    Ok(out)
}

/// Inverse-CDF sample of softmax(logits / t) at uniform `u` in [0, 1).
fn sample(logits: &[f32], t: f32, u: f64) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| f64::from((l - max) / t).exp())
        .collect();
    let mut target = u * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        target -= w;
        if target < 0.0 {
            return i as u32;
        }
    }
    argmax(logits)
}
