//! What the CPU tests of the tensor-parallel backend share: a tiny dummy Llama, its sharded
//! CPU ranks, a backend that fails, panics or blocks on demand, and a prompt.
#![allow(dead_code, clippy::unwrap_used)]

use std::hash::{DefaultHasher, Hash, Hasher};

use dist::ThreadGroup;
use kv_block_manager::CopyOp;
use model::{
    Backend, CpuBackend, DType, ForwardBatch, HostCollective, KvCacheConfig, ModelConfig,
    ModelError, RowSampling, Shard, Weights,
};

pub(crate) const VOCAB: usize = 300;

pub(crate) fn cache() -> KvCacheConfig {
    KvCacheConfig {
        num_blocks: 8,
        block_size: 16,
        dtype: "fp16".parse().unwrap(),
        num_cpu_blocks: 2,
    }
}

/// The tiny model for a group of `world` ranks: as `ModelConfig::tiny` up to 2 ranks; above,
/// twice the heads and MLP width, so that each rank's slices stay whole 32-value blocks.
pub(crate) fn model_config(world: usize) -> ModelConfig {
    let mut config = ModelConfig::tiny(VOCAB);
    if world > 2 {
        config.num_heads *= 2;
        config.num_kv_heads *= 2;
        config.hidden_size *= 2;
        config.intermediate_size *= 2;
    }
    config
}

/// `shard` of the tiny model of its group's size.
pub(crate) fn weights(shard: Shard) -> Weights {
    Weights::dummy_shard(&model_config(shard.world_size), DType::Q8_0, 3, shard).unwrap()
}

/// The whole tiny model of a group of `world` ranks, to compare the group with.
pub(crate) fn full_weights(world: usize) -> Weights {
    Weights::dummy_shard(&model_config(world), DType::Q8_0, 3, Shard::FULL).unwrap()
}

/// What a rank does on its `n`th forward (counting from 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Fault {
    None,
    Fail(usize),
    Panic(usize),
    /// Blocks for ever, as an NCCL rank spinning in a collective its failed peer never joins
    /// (the thread is parked: nothing wakes it, and the test binary exits regardless).
    Block(usize),
}

/// A sharded CPU rank that fails, panics or blocks for ever on its `n`th forward. Its
/// sampled forwards and block copies first check, through its group, that every rank got
/// the very same inputs (a digest of them, all-gathered), so inputs that travelled over a
/// wire are compared with rank 0's.
#[derive(Debug)]
pub(crate) struct Faulty {
    inner: CpuBackend,
    member: ThreadGroup,
    fault: Fault,
    forwards: usize,
}

/// The sharded CPU rank of `member`'s rank, with `fault`.
pub(crate) fn faulty(member: &ThreadGroup, fault: Fault) -> Result<Faulty, ModelError> {
    let inner = CpuBackend::new_sharded(
        weights(member.shard()),
        cache(),
        std::sync::Arc::new(member.clone()),
    )?;
    Ok(Faulty {
        inner,
        member: member.clone(),
        fault,
        forwards: 0,
    })
}

fn digest_batch(b: &ForwardBatch<'_>, h: &mut DefaultHasher) {
    (b.token_ids, b.positions, b.slot_mapping, b.seq_starts).hash(h);
    (
        b.block_tables,
        b.max_blocks,
        b.context_lens,
        b.logits_indices,
    )
        .hash(h);
}

impl Faulty {
    /// Fails on every rank unless every rank's digest is this one's.
    fn same_on_every_rank(&self, what: &str, digest: u64) -> Result<(), ModelError> {
        // Four 16-bit pieces: exact in f32.
        let mine: Vec<f32> = (0..4)
            .map(|i| ((digest >> (16 * i)) & 0xffff) as f32)
            .collect();
        let mut all = Vec::new();
        self.member.all_gather(&mine, &mut all)?;
        if all.chunks(4).all(|c| c == mine.as_slice()) {
            Ok(())
        } else {
            Err(ModelError::ShardMismatch {
                what: format!("{what} inputs"),
                expected: format!("{mine:?} on every rank"),
                got: format!("{all:?}"),
            })
        }
    }

    fn copy(&mut self, kind: &str, c: &[CopyOp]) -> Result<(), ModelError> {
        let mut h = DefaultHasher::new();
        kind.hash(&mut h);
        for op in c {
            (op.src.0, op.dst.0).hash(&mut h);
        }
        self.same_on_every_rank(kind, h.finish())?;
        match kind {
            "copy" => self.inner.copy_blocks(c),
            "swap out" => self.inner.swap_out(c),
            _ => self.inner.swap_in(c),
        }
    }
}

impl Backend for Faulty {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn kv_cache_config(&self) -> KvCacheConfig {
        self.inner.kv_cache_config()
    }
    fn forward(&mut self, b: &ForwardBatch<'_>, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        self.forwards += 1;
        match self.fault {
            Fault::Fail(n) if n == self.forwards => {
                return Err(ModelError::Unsupported("injected failure".into()));
            }
            Fault::Panic(n) if n == self.forwards => panic!("injected panic"),
            Fault::Block(n) if n == self.forwards => loop {
                std::thread::park();
            },
            _ => {}
        }
        self.inner.forward(b, logits)
    }
    fn samples_on_device(&self) -> bool {
        true
    }
    /// Greedy over the first `sample_vocab` logits, once every rank is seen to have the same
    /// batch, rows and `sample_vocab`.
    fn forward_sampled(
        &mut self,
        b: &ForwardBatch<'_>,
        rows: &[RowSampling<'_>],
        sample_vocab: usize,
        tokens: &mut Vec<Option<u32>>,
    ) -> Result<(), ModelError> {
        let mut h = DefaultHasher::new();
        digest_batch(b, &mut h);
        for r in rows {
            (r.temperature.to_bits(), r.top_k, r.top_p.to_bits()).hash(&mut h);
            (r.min_p.to_bits(), r.repetition_penalty.to_bits()).hash(&mut h);
            (r.history, r.uniform.to_bits()).hash(&mut h);
        }
        sample_vocab.hash(&mut h);
        self.same_on_every_rank("sampled forward", h.finish())?;
        let mut logits = Vec::new();
        self.forward(b, &mut logits)?;
        *tokens = logits
            .chunks(VOCAB)
            .map(|row| argmax(&row[..sample_vocab]))
            .collect();
        Ok(())
    }
    fn copy_blocks(&mut self, c: &[CopyOp]) -> Result<(), ModelError> {
        self.copy("copy", c)
    }
    fn swap_out(&mut self, c: &[CopyOp]) -> Result<(), ModelError> {
        self.copy("swap out", c)
    }
    fn swap_in(&mut self, c: &[CopyOp]) -> Result<(), ModelError> {
        self.copy("swap in", c)
    }
}

/// The index of the largest value (`None` for an empty row).
pub(crate) fn argmax(row: &[f32]) -> Option<u32> {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
}

/// The largest absolute difference of two logits vectors.
pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A prompt of `n` tokens in block 0 (prefill) of one sequence.
pub(crate) struct Prompt {
    pub(crate) tokens: Vec<u32>,
    positions: Vec<u32>,
    slots: Vec<i64>,
    starts: Vec<u32>,
    table: Vec<i32>,
    lens: Vec<i32>,
    wanted: Vec<u32>,
}

impl Prompt {
    pub(crate) fn new(tokens: Vec<u32>) -> Self {
        let n = tokens.len();
        Self {
            positions: (0..n as u32).collect(),
            slots: (0..n as i64).collect(),
            starts: vec![0, n as u32],
            table: vec![0],
            lens: vec![n as i32],
            wanted: vec![n as u32 - 1],
            tokens,
        }
    }
    pub(crate) fn batch(&self) -> ForwardBatch<'_> {
        ForwardBatch {
            token_ids: &self.tokens,
            positions: &self.positions,
            slot_mapping: &self.slots,
            seq_starts: &self.starts,
            block_tables: &self.table,
            max_blocks: 1,
            context_lens: &self.lens,
            logits_indices: &self.wanted,
        }
    }
}

pub(crate) fn prompt() -> Prompt {
    Prompt::new(vec![5, 17, 42, 99, 7, 250, 3])
}
