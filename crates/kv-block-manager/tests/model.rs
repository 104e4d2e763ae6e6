//! Model-based property test: random operation streams against a simple reference model that
//! also simulates the contents of every block.
//!
//! The harness plays the backend: it executes each step's copy-on-write and swap copies and
//! writes, at each new token's slot, a fingerprint of the token *and its whole prefix* (what a
//! real K/V vector depends on). Reading every sequence back through its block table then checks
//! copy-on-write, swapping and prefix-cache reuse on content, not just on counts.
#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

use std::collections::{BTreeMap, BTreeSet};

use kv_block_manager::{
    BlockId, BlockManager, BlockManagerConfig, BlockManagerError, BlockTableMatrix, PAD_BLOCK,
    SUPPORTED_BLOCK_SIZES, SeqId, StepSlots,
};
use proptest::prelude::*;

const NUM_SEQ_IDS: u8 = 6;

#[derive(Debug, Clone)]
enum Op {
    Add {
        seq: u8,
        base: u8,
        prefix_len: u16,
        suffix: Vec<u32>,
        namespace: u8,
    },
    Prefill {
        seq: u8,
        chunk: u16,
    },
    Append {
        seq: u8,
        tokens: Vec<u32>,
    },
    Fork {
        parent: u8,
        child: u8,
    },
    Free {
        seq: u8,
    },
    Truncate {
        seq: u8,
        drop: u8,
    },
    SwapOut {
        seqs: Vec<u8>,
    },
    SwapIn {
        seqs: Vec<u8>,
    },
    ResetPrefixCache,
}

fn op() -> impl Strategy<Value = Op> {
    let seq = || 0..NUM_SEQ_IDS;
    let tokens = |max| prop::collection::vec(0u32..3, 1..max);
    prop_oneof![
        3 => (seq(), 0u8..3, 0u16..90, prop::collection::vec(0u32..3, 0..10), 0u8..3).prop_map(
            |(seq, base, prefix_len, suffix, namespace)| Op::Add { seq, base, prefix_len, suffix, namespace }
        ),
        4 => (seq(), 1u16..40).prop_map(|(seq, chunk)| Op::Prefill { seq, chunk }),
        5 => (seq(), tokens(5)).prop_map(|(seq, tokens)| Op::Append { seq, tokens }),
        2 => (seq(), seq()).prop_map(|(parent, child)| Op::Fork { parent, child }),
        2 => seq().prop_map(|seq| Op::Free { seq }),
        1 => (seq(), 0u8..12).prop_map(|(seq, drop)| Op::Truncate { seq, drop }),
        1 => prop::collection::vec(seq(), 1..3).prop_map(|seqs| Op::SwapOut { seqs }),
        1 => prop::collection::vec(seq(), 1..3).prop_map(|seqs| Op::SwapIn { seqs }),
        1 => Just(Op::ResetPrefixCache),
    ]
}

fn config() -> impl Strategy<Value = BlockManagerConfig> {
    (
        prop::sample::select(&SUPPORTED_BLOCK_SIZES[..2]),
        2usize..24,
        0usize..10,
        prop::bool::weighted(0.8),
        prop::option::weighted(0.3, 4usize..40),
    )
        .prop_map(|(block_size, gpu, cpu, caching, window)| {
            let mut c = BlockManagerConfig::new(gpu);
            c.block_size = block_size;
            c.num_cpu_blocks = cpu;
            c.enable_prefix_caching = caching;
            c.sliding_window = window;
            c
        })
}

/// Three long prompts that random prompts take prefixes of, so prefixes are shared often.
fn base_prompt(base: u8) -> Vec<u32> {
    (0..90u32)
        .map(|i| (i * 7 + u32::from(base) * 13) % 5)
        .collect()
}

fn namespace(n: u8) -> Option<String> {
    match n {
        0 => None,
        n => Some(format!("ns-{n}")),
    }
}

/// What a K/V vector depends on: the namespace, the token and every token before it.
fn fingerprints(namespace: &Option<String>, tokens: &[u32]) -> Vec<u64> {
    let mut h = namespace
        .as_ref()
        .map_or(17, |n| n.len() as u64 * 0x9e37_79b9 + 1);
    tokens
        .iter()
        .map(|&t| {
            h = (h ^ u64::from(t))
                .wrapping_mul(0x0100_0000_01b3)
                .rotate_left(17)
                ^ 0x5bd1;
            h
        })
        .collect()
}

#[derive(Debug, Clone)]
struct RefSeq {
    tokens: Vec<u32>,
    slotted: usize,
    on_gpu: bool,
    namespace: Option<String>,
}

struct Harness {
    m: BlockManager,
    refs: BTreeMap<u8, RefSeq>,
    gpu_mem: Vec<Option<u64>>,
    cpu_mem: Vec<Option<u64>>,
    block_size: usize,
    window: Option<usize>,
    step: StepSlots,
    /// A matrix kept across operations and patched incrementally.
    persistent: BlockTableMatrix,
}

impl Harness {
    fn new(config: BlockManagerConfig) -> Self {
        let bs = config.block_size;
        Self {
            gpu_mem: vec![None; config.num_gpu_blocks * bs],
            cpu_mem: vec![None; config.num_cpu_blocks * bs],
            block_size: bs,
            window: config.sliding_window,
            m: BlockManager::new(config).unwrap(),
            refs: BTreeMap::new(),
            step: StepSlots::default(),
            persistent: BlockTableMatrix::default(),
        }
    }

    /// Calls `f`; if it fails, checks that the manager is exactly as before and returns the error.
    fn call<T>(
        &mut self,
        f: impl FnOnce(&mut BlockManager, &mut StepSlots) -> Result<T, BlockManagerError>,
    ) -> Result<T, BlockManagerError> {
        let before = format!("{:?}", self.m);
        self.step.clear();
        let result = f(&mut self.m, &mut self.step);
        if result.is_err() {
            assert_eq!(
                format!("{:?}", self.m),
                before,
                "a failed call changed the state"
            );
        }
        result
    }

    fn copy_block(
        from: &[Option<u64>],
        to: &mut [Option<u64>],
        src: BlockId,
        dst: BlockId,
        bs: usize,
    ) {
        let src = &from[src.index() * bs..][..bs];
        to[dst.index() * bs..][..bs].copy_from_slice(src);
    }

    /// Plays one step of the backend: copies first, then the new tokens' K/V.
    fn execute_step(&mut self, seq: u8, first_position: usize) {
        let bs = self.block_size;
        for c in &self.step.copies {
            let snapshot = self.gpu_mem.clone();
            Self::copy_block(&snapshot, &mut self.gpu_mem, c.src, c.dst, bs);
        }
        let r = &self.refs[&seq];
        let fps = fingerprints(&r.namespace, &r.tokens);
        for (i, &slot) in self.step.slot_mapping.iter().enumerate() {
            self.gpu_mem[usize::try_from(slot).unwrap()] = Some(fps[first_position + i]);
        }
    }

    fn apply(&mut self, op: &Op) {
        let bs = self.block_size;
        match op {
            Op::Add {
                seq,
                base,
                prefix_len,
                suffix,
                namespace: ns,
            } => {
                let mut prompt = base_prompt(*base);
                prompt.truncate(usize::from(*prefix_len));
                prompt.extend(suffix);
                let ns = namespace(*ns);
                let predicted = self.m.prefix_match(&prompt, ns.as_deref());
                let result = self
                    .call(|m, _| m.add_sequence(SeqId(u64::from(*seq)), &prompt, ns.as_deref()));
                match result {
                    Ok(cached) => {
                        assert!(!self.refs.contains_key(seq));
                        assert_eq!(
                            cached, predicted.num_cached_tokens,
                            "prefix_match disagrees"
                        );
                        assert!(cached % bs == 0 && cached < prompt.len());
                        self.refs.insert(
                            *seq,
                            RefSeq {
                                tokens: prompt,
                                slotted: cached,
                                on_gpu: true,
                                namespace: ns,
                            },
                        );
                    }
                    Err(BlockManagerError::DuplicateSequence { .. }) => {
                        assert!(self.refs.contains_key(seq))
                    }
                    Err(BlockManagerError::EmptyPrompt { .. }) => assert!(prompt.is_empty()),
                    Err(e) => panic!("add: {e}"),
                }
            }
            Op::Prefill { seq, chunk } => {
                let pending = self.refs.get(seq).map_or(0, |r| r.tokens.len() - r.slotted);
                let n = pending.min(usize::from(*chunk));
                let id = SeqId(u64::from(*seq));
                match self.call(|m, step| m.allocate_slots(id, n, step)) {
                    Ok(()) => self.after_growth(*seq, n),
                    Err(e) => self.expect_common_error(*seq, &e),
                }
            }
            Op::Append { seq, tokens } => {
                let id = SeqId(u64::from(*seq));
                match self.call(|m, step| m.append_tokens(id, tokens, step)) {
                    Ok(()) => {
                        let r = self.refs.get_mut(seq).unwrap();
                        assert_eq!(r.slotted, r.tokens.len());
                        r.tokens.extend(tokens);
                        self.after_growth(*seq, tokens.len());
                        if let (Some(w), 1) = (self.window, tokens.len()) {
                            let live = self.m.block_table(id).unwrap().iter().flatten().count();
                            assert!(
                                live <= w.div_ceil(bs) + 1,
                                "{live} blocks held with window {w}"
                            );
                        }
                    }
                    Err(BlockManagerError::PrefillIncomplete { pending, .. }) => {
                        let r = &self.refs[seq];
                        assert_eq!(pending, r.tokens.len() - r.slotted);
                    }
                    Err(e) => self.expect_common_error(*seq, &e),
                }
            }
            Op::Fork { parent, child } => {
                let (p, c) = (SeqId(u64::from(*parent)), SeqId(u64::from(*child)));
                match self.call(|m, _| m.fork(p, c)) {
                    Ok(()) => {
                        assert!(!self.refs.contains_key(child));
                        let copy = self.refs[parent].clone();
                        self.refs.insert(*child, copy);
                    }
                    Err(BlockManagerError::DuplicateSequence { seq }) => {
                        assert_eq!(seq, c);
                        assert!(
                            self.refs.contains_key(child)
                                && self.refs.get(parent).is_some_and(|r| r.on_gpu)
                        );
                    }
                    Err(e) => self.expect_common_error(*parent, &e),
                }
            }
            Op::Free { seq } => {
                let id = SeqId(u64::from(*seq));
                match self.call(|m, _| m.free(id)) {
                    Ok(()) => assert!(self.refs.remove(seq).is_some()),
                    Err(e) => self.expect_common_error(*seq, &e),
                }
            }
            Op::Truncate { seq, drop } => {
                let id = SeqId(u64::from(*seq));
                let len = self.refs.get(seq).map_or(0, |r| r.tokens.len());
                let new_len = len.saturating_sub(usize::from(*drop));
                match self.call(|m, _| m.truncate(id, new_len)) {
                    Ok(()) => {
                        let r = self.refs.get_mut(seq).unwrap();
                        r.tokens.truncate(new_len);
                        r.slotted = r.slotted.min(new_len);
                    }
                    Err(BlockManagerError::InvalidTruncate { .. }) => {
                        let w = self
                            .window
                            .expect("only a sliding window refuses a shorter length");
                        let released = self
                            .m
                            .block_table(id)
                            .unwrap()
                            .iter()
                            .take_while(|b| b.is_none())
                            .count();
                        assert!((new_len + 1).saturating_sub(w) < released * bs);
                    }
                    Err(e) => self.expect_common_error(*seq, &e),
                }
            }
            Op::SwapOut { seqs } | Op::SwapIn { seqs } => {
                let out = matches!(op, Op::SwapOut { .. });
                let ids: Vec<SeqId> = seqs.iter().map(|&s| SeqId(u64::from(s))).collect();
                let result = self.call(|m, _| {
                    if out {
                        m.swap_out(&ids)
                    } else {
                        m.swap_in(&ids)
                    }
                });
                match result {
                    Ok(copies) => {
                        let bs = self.block_size;
                        for c in copies {
                            if out {
                                Self::copy_block(
                                    &self.gpu_mem,
                                    &mut self.cpu_mem,
                                    c.src,
                                    c.dst,
                                    bs,
                                );
                            } else {
                                Self::copy_block(
                                    &self.cpu_mem,
                                    &mut self.gpu_mem,
                                    c.src,
                                    c.dst,
                                    bs,
                                );
                            }
                        }
                        for s in seqs {
                            let r = self.refs.get_mut(s).unwrap();
                            assert_eq!(r.on_gpu, out);
                            r.on_gpu = !out;
                        }
                    }
                    Err(BlockManagerError::DuplicateInBatch { seq }) => {
                        assert!(seqs.iter().filter(|&&s| SeqId(u64::from(s)) == seq).count() > 1);
                    }
                    Err(BlockManagerError::OutOfCpuBlocks { .. }) => assert!(out),
                    Err(BlockManagerError::OutOfBlocks { .. }) => assert!(!out),
                    Err(BlockManagerError::NotSwappedOut { seq }) => {
                        assert!(!out && self.refs[&(seq.0 as u8)].on_gpu);
                    }
                    Err(e) => {
                        let seq = seqs
                            .iter()
                            .copied()
                            .find(|s| !self.refs.contains_key(s) || self.refs[s].on_gpu != out);
                        self.expect_common_error(seq.unwrap_or(seqs[0]), &e);
                    }
                }
            }
            Op::ResetPrefixCache => {
                self.m.reset_prefix_cache();
                assert_eq!(self.m.stats().cached_blocks, 0);
                assert_eq!(self.m.stats().evictable_blocks, 0);
            }
        }
    }

    /// Bookkeeping after `n` tokens of `seq` got slots: run the step, then cache full blocks.
    fn after_growth(&mut self, seq: u8, n: usize) {
        let first = self.refs[&seq].slotted;
        assert_eq!(self.step.slot_mapping.len(), n);
        self.execute_step(seq, first);
        self.refs.get_mut(&seq).unwrap().slotted += n;
        let id = SeqId(u64::from(seq));
        // Every position the step's first token attends to must still be mapped.
        let window_start = self.window.map_or(0, |w| (first + 1).saturating_sub(w));
        let table = self.m.block_table(id).unwrap();
        for p in window_start..first + n {
            assert!(
                table[p / self.block_size].is_some(),
                "position {p} released too early"
            );
        }
        self.m.cache_full_blocks(id).unwrap();
    }

    /// Errors any verb may give: unknown sequence, swapped out, out of blocks.
    fn expect_common_error(&self, seq: u8, e: &BlockManagerError) {
        match e {
            BlockManagerError::UnknownSequence { seq: s } => {
                assert!(!self.refs.contains_key(&(s.0 as u8)), "{e}");
            }
            BlockManagerError::SwappedOut { seq: s } => {
                assert!(!self.refs[&(s.0 as u8)].on_gpu, "{e}")
            }
            BlockManagerError::OutOfBlocks { needed, free } => assert!(needed > free, "{e}"),
            _ => panic!("sequence {seq}: unexpected error {e}"),
        }
    }

    /// The incrementally patched matrix must equal a full rebuild, row for row.
    fn check_matrix(&mut self, fixed_width: Option<usize>) {
        let on_gpu: Vec<SeqId> = self
            .refs
            .iter()
            .filter(|(_, r)| r.on_gpu)
            .map(|(&s, _)| SeqId(u64::from(s)))
            .collect();
        self.m
            .update_block_table_matrix(&on_gpu, fixed_width, &mut self.persistent)
            .unwrap();
        let mut fresh = BlockTableMatrix::default();
        self.m
            .block_table_matrix(&on_gpu, Some(self.persistent.max_blocks()), &mut fresh)
            .unwrap();
        assert_eq!(self.persistent.block_tables(), fresh.block_tables());
        assert_eq!(self.persistent.context_lens(), fresh.context_lens());
        for (i, id) in on_gpu.iter().enumerate() {
            let r = &self.refs[&(id.0 as u8)];
            assert_eq!(fresh.context_lens()[i] as usize, r.slotted);
            let table = self.m.block_table(*id).unwrap();
            for (j, &b) in fresh.row(i).unwrap().iter().enumerate() {
                let expected = table
                    .get(j)
                    .copied()
                    .flatten()
                    .map_or(PAD_BLOCK, |b| b.0 as i32);
                assert_eq!(b, expected, "row {i} column {j}");
            }
        }
    }

    fn check(&self) {
        self.m.check_invariants().unwrap();
        let bs = self.block_size;
        let stats = self.m.stats();
        assert_eq!(
            stats.free_blocks + stats.used_blocks + stats.evictable_blocks,
            stats.total_blocks
        );
        let mut gpu_refs: BTreeMap<BlockId, u32> = BTreeMap::new();
        for (&seq, r) in &self.refs {
            let id = SeqId(u64::from(seq));
            assert_eq!(self.m.tokens(id).unwrap(), r.tokens.as_slice());
            assert_eq!(self.m.num_slotted_tokens(id).unwrap(), r.slotted);
            assert_eq!(self.m.is_swapped_out(id).unwrap(), !r.on_gpu);
            let table = self.m.block_table(id).unwrap();
            assert_eq!(table.len(), r.slotted.div_ceil(bs));
            let needed_from = self.window.map_or(0, |w| (r.slotted + 1).saturating_sub(w));
            let fps = fingerprints(&r.namespace, &r.tokens);
            let mem = if r.on_gpu {
                &self.gpu_mem
            } else {
                &self.cpu_mem
            };
            for p in 0..r.slotted {
                match table[p / bs] {
                    Some(b) => assert_eq!(
                        mem[b.index() * bs + p % bs],
                        Some(fps[p]),
                        "seq {seq} position {p}"
                    ),
                    None => assert!(
                        p < needed_from,
                        "seq {seq}: position {p} in the window but released"
                    ),
                }
            }
            if r.on_gpu {
                for b in table.into_iter().flatten() {
                    *gpu_refs.entry(b).or_default() += 1;
                }
            }
        }
        for i in 0..stats.total_blocks {
            let b = BlockId(i as u32);
            assert_eq!(
                self.m.ref_count(b).unwrap(),
                gpu_refs.get(&b).copied().unwrap_or(0),
                "block {b}"
            );
        }
        assert_eq!(
            stats.used_blocks,
            gpu_refs.len(),
            "used blocks are exactly the referenced ones"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_every_invariant(config in config(), ops in prop::collection::vec(op(), 1..80)) {
        let mut h = Harness::new(config);
        for op in &ops {
            h.apply(op);
            h.check();
            h.check_matrix(None);
        }
        let seqs: BTreeSet<u8> = h.refs.keys().copied().collect();
        for seq in seqs {
            h.m.free(SeqId(u64::from(seq))).unwrap();
        }
        h.refs.clear();
        h.check();
        let stats = h.m.stats();
        prop_assert_eq!(stats.used_blocks, 0);
        prop_assert_eq!(stats.free_blocks + stats.evictable_blocks, stats.total_blocks);
        prop_assert_eq!(stats.cpu_free_blocks, stats.cpu_total_blocks);
    }
}

/// The property test must actually reach the interesting paths; this deterministic stream
/// makes sure prefix hits, copy-on-write and eviction all happen and stay correct on content.
#[test]
fn shared_prefix_stream_hits_copies_and_evicts() {
    let mut config = BlockManagerConfig::new(6);
    config.block_size = 8;
    config.num_cpu_blocks = 4;
    let mut h = Harness::new(config);
    let ops = [
        Op::Add {
            seq: 0,
            base: 0,
            prefix_len: 20,
            suffix: vec![],
            namespace: 0,
        },
        Op::Prefill { seq: 0, chunk: 20 },
        Op::Add {
            seq: 1,
            base: 0,
            prefix_len: 20,
            suffix: vec![1],
            namespace: 0,
        },
        Op::Prefill { seq: 1, chunk: 20 },
        Op::Fork {
            parent: 1,
            child: 2,
        },
        Op::Append {
            seq: 2,
            tokens: vec![2],
        },
        Op::Append {
            seq: 1,
            tokens: vec![1],
        },
        Op::Free { seq: 0 },
        Op::Free { seq: 1 },
        Op::SwapOut { seqs: vec![2] },
        Op::Add {
            seq: 3,
            base: 1,
            prefix_len: 40,
            suffix: vec![],
            namespace: 1,
        },
        Op::Prefill { seq: 3, chunk: 40 },
        Op::Free { seq: 3 },
        Op::SwapIn { seqs: vec![2] },
        Op::Append {
            seq: 2,
            tokens: vec![0, 1, 2],
        },
    ];
    for op in &ops {
        h.apply(op);
        h.check();
        h.check_matrix(Some(16));
    }
    let stats = h.m.stats();
    assert_eq!(stats.prefix_hit_tokens, 16);
    assert!(stats.evictable_blocks > 0);
}
