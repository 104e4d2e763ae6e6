//! One test (or a few) per public operation, bad arguments included: every error is typed and
//! leaves the manager exactly as it was.
#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

use kv_block_manager::{
    AllocStatus, BlockId, BlockManager, BlockManagerConfig, BlockManagerError, BlockTableMatrix,
    CopyOp, PAD_BLOCK, SeqId, StepSlots,
};

const S1: SeqId = SeqId(1);
const S2: SeqId = SeqId(2);
const S3: SeqId = SeqId(3);

fn manager(num_blocks: usize, block_size: usize) -> BlockManager {
    let mut config = BlockManagerConfig::new(num_blocks);
    config.block_size = block_size;
    config.watermark = 0.0;
    BlockManager::new(config).unwrap()
}

fn prompt(n: u32) -> Vec<u32> {
    (100..100 + n).collect()
}

/// Adds `seq` with `tokens` and prefills everything not cached; returns the step's slots.
fn prefill(m: &mut BlockManager, seq: SeqId, tokens: &[u32]) -> StepSlots {
    let cached = m.add_sequence(seq, tokens, None).unwrap();
    let mut step = StepSlots::default();
    m.allocate_slots(seq, tokens.len() - cached, &mut step)
        .unwrap();
    m.cache_full_blocks(seq).unwrap();
    step
}

/// Runs `f`, expects `err`, and checks that nothing changed.
fn assert_rejected(
    m: &mut BlockManager,
    err: BlockManagerError,
    f: impl FnOnce(&mut BlockManager) -> Result<(), BlockManagerError>,
) {
    let before = format!("{m:?}");
    let stats = m.stats();
    assert_eq!(f(m), Err(err));
    assert_eq!(m.stats(), stats);
    assert_eq!(format!("{m:?}"), before, "state changed by a rejected call");
    m.check_invariants().unwrap();
}

#[test]
fn config_rejects_bad_fields() {
    type Mutation = fn(&mut BlockManagerConfig);
    let cases: Vec<(Mutation, &str)> = vec![
        (|c| c.block_size = 0, "block_size"),
        (|c| c.block_size = 12, "block_size"),
        (|c| c.block_size = 128, "block_size"),
        (|c| c.num_gpu_blocks = 0, "num_gpu_blocks"),
        (|c| c.num_gpu_blocks = usize::MAX, "num_gpu_blocks"),
        (|c| c.num_cpu_blocks = 1 << 40, "num_cpu_blocks"),
        (|c| c.sliding_window = Some(0), "sliding_window"),
        (|c| c.watermark = 1.0, "watermark"),
        (|c| c.watermark = -0.5, "watermark"),
        (|c| c.watermark = f64::NAN, "watermark"),
    ];
    for (mutate, field) in cases {
        let mut config = BlockManagerConfig::new(8);
        mutate(&mut config);
        match BlockManager::new(config) {
            Err(BlockManagerError::InvalidConfig { field: f, reason }) => {
                assert_eq!(f, field, "{reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
    }
    for block_size in [8, 16, 32, 64] {
        let mut config = BlockManagerConfig::new(8);
        config.block_size = block_size;
        assert!(BlockManager::new(config).is_ok());
    }
}

#[test]
fn error_messages_name_what_was_wrong() {
    let err = BlockManagerError::OutOfBlocks { needed: 3, free: 1 };
    assert_eq!(err.to_string(), "out of KV blocks: 3 needed, 1 free");
    let err = BlockManagerError::UnknownSequence { seq: SeqId(7) };
    assert_eq!(err.to_string(), "unknown sequence 7");
}

#[test]
fn add_sequence_rejects_duplicates_and_empty_prompts() {
    let mut m = manager(8, 8);
    m.add_sequence(S1, &prompt(3), None).unwrap();
    assert_rejected(
        &mut m,
        BlockManagerError::DuplicateSequence { seq: S1 },
        |m| m.add_sequence(S1, &prompt(5), None).map(drop),
    );
    assert_rejected(&mut m, BlockManagerError::EmptyPrompt { seq: S2 }, |m| {
        m.add_sequence(S2, &[], None).map(drop)
    });
}

#[test]
fn slots_follow_the_block_table_and_blocks_come_on_demand() {
    let mut m = manager(8, 8);
    assert_eq!(m.add_sequence(S1, &prompt(10), None).unwrap(), 0);
    assert_eq!(m.stats().used_blocks, 0, "no block before the first slot");
    let mut step = StepSlots::default();
    m.allocate_slots(S1, 4, &mut step).unwrap();
    assert_eq!(step.slot_mapping, vec![0, 1, 2, 3]);
    m.allocate_slots(S1, 6, &mut step).unwrap();
    assert_eq!(step.slot_mapping, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(
        m.block_table(S1).unwrap(),
        vec![Some(BlockId(0)), Some(BlockId(1))]
    );
    // Tokens 10..16 fill block 1 without a new block; token 16 needs block 2.
    step.clear();
    for t in 0..6 {
        m.append_tokens(S1, &[t], &mut step).unwrap();
        assert_eq!(m.stats().used_blocks, 2);
    }
    m.append_tokens(S1, &[6], &mut step).unwrap();
    assert_eq!(m.stats().used_blocks, 3);
    assert_eq!(step.slot_mapping, vec![10, 11, 12, 13, 14, 15, 16]);
    assert!(step.copies.is_empty());
    assert_eq!(m.num_slotted_tokens(S1).unwrap(), 17);
    assert_eq!(m.tokens(S1).unwrap().len(), 17);
    let stats = m.stats();
    assert_eq!((stats.slots_allocated, stats.tokens_stored), (24, 17));
    m.check_invariants().unwrap();
}

#[test]
fn allocate_slots_rejects_bad_requests() {
    let mut m = manager(2, 8);
    let mut step = StepSlots::default();
    assert_rejected(
        &mut m,
        BlockManagerError::UnknownSequence { seq: S1 },
        |m| m.allocate_slots(S1, 1, &mut step),
    );
    m.add_sequence(S1, &prompt(20), None).unwrap();
    assert_rejected(
        &mut m,
        BlockManagerError::NotEnoughPendingTokens {
            seq: S1,
            requested: 21,
            pending: 20,
        },
        |m| m.allocate_slots(S1, 21, &mut step),
    );
    // 20 tokens need 3 blocks; the pool has 2.
    assert_rejected(
        &mut m,
        BlockManagerError::OutOfBlocks { needed: 3, free: 2 },
        |m| m.allocate_slots(S1, 20, &mut step),
    );
    assert!(step.slot_mapping.is_empty());
    m.allocate_slots(S1, 0, &mut step).unwrap();
    assert!(step.slot_mapping.is_empty());
}

#[test]
fn append_tokens_rejects_bad_requests() {
    let mut m = manager(2, 8);
    let mut step = StepSlots::default();
    assert_rejected(
        &mut m,
        BlockManagerError::UnknownSequence { seq: S1 },
        |m| m.append_tokens(S1, &[1], &mut step),
    );
    m.add_sequence(S1, &prompt(12), None).unwrap();
    assert_rejected(
        &mut m,
        BlockManagerError::PrefillIncomplete {
            seq: S1,
            pending: 12,
        },
        |m| m.append_tokens(S1, &[1], &mut step),
    );
    m.allocate_slots(S1, 12, &mut step).unwrap();
    // Blocks hold 16 slots; appending 5 more needs a third block.
    assert_rejected(
        &mut m,
        BlockManagerError::OutOfBlocks { needed: 1, free: 0 },
        |m| m.append_tokens(S1, &[1, 2, 3, 4, 5], &mut step),
    );
    assert_eq!(
        m.tokens(S1).unwrap(),
        prompt(12).as_slice(),
        "rejected tokens not recorded"
    );
    m.append_tokens(S1, &[1, 2, 3, 4], &mut step).unwrap();
    m.append_tokens(S1, &[], &mut step).unwrap();
    assert_eq!(m.num_slotted_tokens(S1).unwrap(), 16);
}

#[test]
fn fork_shares_blocks_and_copies_on_first_write_to_shared_partial_block() {
    let mut m = manager(8, 8);
    prefill(&mut m, S1, &prompt(10));
    m.fork(S1, S2).unwrap();
    let table = m.block_table(S1).unwrap();
    assert_eq!(table, m.block_table(S2).unwrap());
    assert_eq!(m.ref_count(BlockId(0)).unwrap(), 2);
    assert_eq!(m.ref_count(BlockId(1)).unwrap(), 2);
    assert_eq!(m.stats().used_blocks, 2);

    // The child writes first: its partial last block is copied.
    let mut step = StepSlots::default();
    m.append_tokens(S2, &[7], &mut step).unwrap();
    assert_eq!(
        step.copies,
        vec![CopyOp {
            src: BlockId(1),
            dst: BlockId(2)
        }]
    );
    assert_eq!(step.slot_mapping, vec![2 * 8 + 2]);
    assert_eq!(
        m.block_table(S2).unwrap(),
        vec![Some(BlockId(0)), Some(BlockId(2))]
    );
    assert_eq!(m.ref_count(BlockId(1)).unwrap(), 1);
    // The full block 0 stays shared; the parent now owns block 1 alone and writes in place.
    step.clear();
    m.append_tokens(S1, &[8], &mut step).unwrap();
    assert!(step.copies.is_empty());
    assert_eq!(step.slot_mapping, vec![8 + 2]);
    assert_eq!(m.ref_count(BlockId(0)).unwrap(), 2);
    m.check_invariants().unwrap();
}

#[test]
fn fork_of_full_last_block_needs_no_copy() {
    let mut m = manager(8, 8);
    prefill(&mut m, S1, &prompt(16));
    m.fork(S1, S2).unwrap();
    let mut step = StepSlots::default();
    m.append_tokens(S2, &[1], &mut step).unwrap();
    assert!(step.copies.is_empty());
    assert_eq!(m.blocks_needed(S1, 1).unwrap(), 1);
}

#[test]
fn fork_rejects_bad_arguments() {
    let mut m = manager(8, 8);
    prefill(&mut m, S1, &prompt(4));
    prefill(&mut m, S2, &prompt(4));
    m.free(S2).unwrap();
    assert_rejected(
        &mut m,
        BlockManagerError::UnknownSequence { seq: S2 },
        |m| m.fork(S2, S3),
    );
    assert_rejected(
        &mut m,
        BlockManagerError::DuplicateSequence { seq: S1 },
        |m| m.fork(S1, S1),
    );
    m.swap_out(&[S1]).unwrap_err(); // no CPU pool configured
    assert_rejected(
        &mut m,
        BlockManagerError::DuplicateSequence { seq: S1 },
        |m| m.fork(S3, S1).or(m.fork(S1, S1)),
    );
}

#[test]
fn double_free_is_a_typed_error() {
    let mut m = manager(8, 8);
    prefill(&mut m, S1, &prompt(12));
    m.free(S1).unwrap();
    assert_rejected(
        &mut m,
        BlockManagerError::UnknownSequence { seq: S1 },
        |m| m.free(S1),
    );
    let stats = m.stats();
    assert_eq!(stats.used_blocks, 0);
    assert_eq!(
        stats.free_blocks + stats.evictable_blocks,
        stats.total_blocks
    );
}

#[test]
fn prefix_cache_reuses_full_blocks_but_never_the_last_token() {
    let mut m = manager(16, 8);
    let p = prompt(24); // exactly three blocks
    prefill(&mut m, S1, &p);
    // Whole prompt cached, but its last token must be computed: only two blocks hit.
    assert_eq!(m.add_sequence(S2, &p, None).unwrap(), 16);
    assert_eq!(
        m.block_table(S2).unwrap(),
        vec![Some(BlockId(0)), Some(BlockId(1))]
    );
    // A longer prompt with the same start hits all three.
    let mut longer = p.clone();
    longer.push(5);
    assert_eq!(m.add_sequence(S3, &longer, None).unwrap(), 24);
    // A different token inside block 1 stops the match after block 0.
    let mut other = p.clone();
    other[9] = 0;
    assert_eq!(m.prefix_match(&other, None).num_cached_tokens, 8);
    let stats = m.stats();
    assert_eq!(stats.prefix_queries, 3);
    assert_eq!(stats.prefix_query_tokens, 24 + 24 + 25);
    assert_eq!(stats.prefix_hit_tokens, 16 + 24);
    assert_eq!(m.ref_count(BlockId(0)).unwrap(), 3);
    m.check_invariants().unwrap();
}

#[test]
fn prefix_cache_respects_namespaces() {
    let mut m = manager(16, 8);
    let p = prompt(20);
    let cached = m.add_sequence(S1, &p, Some("tenant-a")).unwrap();
    let mut step = StepSlots::default();
    m.allocate_slots(S1, p.len() - cached, &mut step).unwrap();
    m.cache_full_blocks(S1).unwrap();
    assert_eq!(m.prefix_match(&p, Some("tenant-a")).num_cached_tokens, 16);
    assert_eq!(m.prefix_match(&p, Some("tenant-b")).num_cached_tokens, 0);
    assert_eq!(m.prefix_match(&p, None).num_cached_tokens, 0);
}

#[test]
fn blocks_are_cached_only_after_cache_full_blocks() {
    let mut m = manager(16, 8);
    let p = prompt(20);
    m.add_sequence(S1, &p, None).unwrap();
    let mut step = StepSlots::default();
    m.allocate_slots(S1, 20, &mut step).unwrap();
    assert_eq!(
        m.prefix_match(&p, None).num_cached_tokens,
        0,
        "KV not computed yet"
    );
    m.cache_full_blocks(S1).unwrap();
    assert_eq!(m.prefix_match(&p, None).num_cached_tokens, 16);
    assert_eq!(m.stats().cached_blocks, 2);
}

#[test]
fn freed_cached_blocks_are_evictable_and_reused_last_lru_first() {
    let mut m = manager(4, 8);
    prefill(&mut m, S1, &prompt(24)); // blocks 0, 1, 2 cached
    m.free(S1).unwrap();
    let stats = m.stats();
    assert_eq!(
        (stats.free_blocks, stats.evictable_blocks, stats.used_blocks),
        (1, 3, 0)
    );
    // A new unrelated sequence takes the free block first, then evicts the sequence's *last*
    // block (released first), keeping the reusable prefix.
    let mut step = StepSlots::default();
    m.add_sequence(S2, &[1; 16], None).unwrap();
    m.allocate_slots(S2, 16, &mut step).unwrap();
    assert_eq!(
        m.block_table(S2).unwrap(),
        vec![Some(BlockId(3)), Some(BlockId(2))]
    );
    assert_eq!(m.prefix_match(&prompt(24), None).num_cached_tokens, 16);
    // A hit revives evictable blocks.
    let hit = m.prefix_match(&prompt(24), None);
    assert_eq!(hit.blocks_needed, 3, "one new block plus two revived");
    assert_eq!(m.add_sequence(S3, &prompt(24), None).unwrap(), 16);
    assert_eq!(m.stats().evictable_blocks, 0);
    m.check_invariants().unwrap();
}

#[test]
fn prefix_caching_can_be_disabled() {
    let mut config = BlockManagerConfig::new(16);
    config.enable_prefix_caching = false;
    let mut m = BlockManager::new(config).unwrap();
    prefill(&mut m, S1, &prompt(40));
    assert_eq!(m.add_sequence(S2, &prompt(40), None).unwrap(), 0);
    m.free(S1).unwrap();
    assert_eq!(m.stats().evictable_blocks, 0);
    assert_eq!(m.stats().prefix_queries, 0);
}

#[test]
fn sliding_window_bounds_blocks_held() {
    let mut config = BlockManagerConfig::new(16);
    config.block_size = 8;
    config.sliding_window = Some(20);
    let mut m = BlockManager::new(config).unwrap();
    prefill(&mut m, S1, &prompt(3));
    let bound = 20usize.div_ceil(8) + 1;
    let mut step = StepSlots::default();
    for t in 0..500 {
        m.append_tokens(S1, &[t], &mut step).unwrap();
        let live = m.block_table(S1).unwrap().iter().flatten().count();
        assert!(live <= bound, "{live} blocks held, bound {bound}");
        // The newest token's window (its position and the 19 before) is still mapped.
        let n = m.num_slotted_tokens(S1).unwrap();
        let table = m.block_table(S1).unwrap();
        for p in n.saturating_sub(20)..n {
            assert!(table[p / 8].is_some(), "position {p} of {n} unmapped");
        }
    }
    assert!(m.stats().used_blocks <= bound);
    let mut batch = BlockTableMatrix::default();
    m.block_table_matrix(&[S1], None, &mut batch).unwrap();
    let row = batch.row(0).unwrap();
    assert_eq!(row.len(), 503usize.div_ceil(8));
    assert_eq!(row[0], PAD_BLOCK, "released blocks are padding");
    assert!(row[row.len() - 1] >= 0);
    // Rolling back into released blocks is refused.
    assert!(matches!(
        m.truncate(S1, 100),
        Err(BlockManagerError::InvalidTruncate { requested: 100, .. })
    ));
    m.truncate(S1, 500).unwrap();
    m.check_invariants().unwrap();
}

#[test]
fn truncate_rolls_back_and_releases_blocks() {
    let mut m = manager(8, 8);
    prefill(&mut m, S1, &prompt(6));
    let mut step = StepSlots::default();
    m.append_tokens(S1, &[1, 2, 3, 4, 5, 6, 7], &mut step)
        .unwrap(); // 13 tokens, 2 blocks
    assert_eq!(m.stats().used_blocks, 2);
    m.truncate(S1, 8).unwrap();
    assert_eq!(m.stats().used_blocks, 1);
    assert_eq!(
        m.tokens(S1).unwrap(),
        prompt(6).iter().chain(&[1, 2]).copied().collect::<Vec<_>>()
    );
    assert_rejected(
        &mut m,
        BlockManagerError::InvalidTruncate {
            seq: S1,
            requested: 9,
            reason: "it has only 8 tokens".into(),
        },
        |m| m.truncate(S1, 9),
    );
    assert_rejected(
        &mut m,
        BlockManagerError::UnknownSequence { seq: S2 },
        |m| m.truncate(S2, 1),
    );
    m.truncate(S1, 0).unwrap();
    assert_eq!(m.stats().used_blocks, 0);
}

#[test]
fn writing_into_a_truncated_cached_block_uncaches_or_copies_it() {
    let mut m = manager(8, 8);
    prefill(&mut m, S1, &prompt(17));
    assert_eq!(m.stats().cached_blocks, 2);
    // Roll back into the cached block 1 and write different tokens: exclusive, so uncached.
    m.truncate(S1, 12).unwrap();
    let mut step = StepSlots::default();
    m.append_tokens(S1, &[9], &mut step).unwrap();
    assert!(step.copies.is_empty());
    assert_eq!(m.stats().cached_blocks, 1);
    assert_eq!(m.prefix_match(&prompt(17), None).num_cached_tokens, 8);

    // Shared through the prefix cache: copied instead.
    let mut m = manager(8, 8);
    prefill(&mut m, S1, &prompt(17));
    assert_eq!(m.add_sequence(S2, &prompt(17), None).unwrap(), 16);
    m.truncate(S1, 12).unwrap();
    step.clear();
    m.append_tokens(S1, &[9], &mut step).unwrap();
    assert_eq!(step.copies.len(), 1);
    assert_eq!(m.prefix_match(&prompt(17), None).num_cached_tokens, 16);
    m.check_invariants().unwrap();
}

#[test]
fn swap_out_and_in_moves_shared_blocks_once() {
    let mut config = BlockManagerConfig::new(8);
    config.block_size = 8;
    config.num_cpu_blocks = 4;
    let mut m = BlockManager::new(config).unwrap();
    prefill(&mut m, S1, &prompt(12));
    m.fork(S1, S2).unwrap();
    let copies = m.swap_out(&[S1, S2]).unwrap();
    assert_eq!(
        copies.len(),
        2,
        "two distinct blocks, shared by both sequences"
    );
    assert!(m.is_swapped_out(S1).unwrap() && m.is_swapped_out(S2).unwrap());
    let stats = m.stats();
    assert_eq!((stats.used_blocks, stats.cpu_free_blocks), (0, 2));
    let cpu_table = m.block_table(S1).unwrap();
    assert_eq!(cpu_table, m.block_table(S2).unwrap());

    let mut step = StepSlots::default();
    assert_rejected(&mut m, BlockManagerError::SwappedOut { seq: S1 }, |m| {
        m.append_tokens(S1, &[1], &mut step)
    });
    assert_rejected(&mut m, BlockManagerError::SwappedOut { seq: S1 }, |m| {
        m.fork(S1, S3)
    });
    assert_rejected(&mut m, BlockManagerError::SwappedOut { seq: S1 }, |m| {
        m.swap_out(&[S1]).map(drop)
    });
    let mut batch = BlockTableMatrix::default();
    assert_rejected(&mut m, BlockManagerError::SwappedOut { seq: S2 }, |m| {
        m.block_table_matrix(&[S2], None, &mut batch)
    });

    let back = m.swap_in(&[S1, S2]).unwrap();
    assert_eq!(back.len(), 2);
    for c in &back {
        assert!(copies.iter().any(|o| o.dst == c.src));
    }
    assert_eq!(m.block_table(S1).unwrap(), m.block_table(S2).unwrap());
    assert_eq!(m.stats().cpu_free_blocks, 4);
    assert_rejected(&mut m, BlockManagerError::NotSwappedOut { seq: S1 }, |m| {
        m.swap_in(&[S1]).map(drop)
    });
    // Copy-on-write still works after the round trip.
    m.append_tokens(S2, &[3], &mut step).unwrap();
    assert_eq!(step.copies.len(), 1);
    m.check_invariants().unwrap();
}

#[test]
fn swap_rejects_bad_batches() {
    let mut config = BlockManagerConfig::new(8);
    config.block_size = 8;
    config.num_cpu_blocks = 1;
    let mut m = BlockManager::new(config).unwrap();
    prefill(&mut m, S1, &prompt(12));
    assert_rejected(
        &mut m,
        BlockManagerError::OutOfCpuBlocks { needed: 2, free: 1 },
        |m| m.swap_out(&[S1]).map(drop),
    );
    assert_rejected(
        &mut m,
        BlockManagerError::DuplicateInBatch { seq: S1 },
        |m| m.swap_out(&[S1, S1]).map(drop),
    );
    assert_rejected(
        &mut m,
        BlockManagerError::UnknownSequence { seq: S2 },
        |m| m.swap_out(&[S1, S2]).map(drop),
    );
    // Freeing a swapped-out sequence returns its CPU blocks.
    prefill(&mut m, S2, &prompt(3));
    m.swap_out(&[S2]).unwrap();
    assert_eq!(m.stats().cpu_free_blocks, 0);
    m.free(S2).unwrap();
    assert_eq!(m.stats().cpu_free_blocks, 1);
}

#[test]
fn swap_in_fails_cleanly_when_the_gpu_is_full() {
    let mut config = BlockManagerConfig::new(2);
    config.block_size = 8;
    config.num_cpu_blocks = 2;
    let mut m = BlockManager::new(config).unwrap();
    prefill(&mut m, S1, &prompt(12));
    m.swap_out(&[S1]).unwrap();
    prefill(&mut m, S2, &prompt(9));
    assert_rejected(
        &mut m,
        BlockManagerError::OutOfBlocks { needed: 2, free: 0 },
        |m| m.swap_in(&[S1]).map(drop),
    );
}

#[test]
fn block_table_matrix_pads_and_checks_width() {
    let mut m = manager(16, 8);
    prefill(&mut m, S1, &prompt(20));
    prefill(&mut m, S2, &[1, 2, 3]);
    let mut batch = BlockTableMatrix::default();
    m.block_table_matrix(&[S1, S2], None, &mut batch).unwrap();
    assert_eq!((batch.num_seqs(), batch.max_blocks()), (2, 3));
    assert_eq!(batch.block_tables(), &[0, 1, 2, 3, PAD_BLOCK, PAD_BLOCK]);
    assert_eq!(batch.context_lens(), &[20, 3]);
    assert_eq!(batch.row(1), Some(&[3, PAD_BLOCK, PAD_BLOCK][..]));
    assert_eq!(batch.row(2), None);
    m.block_table_matrix(&[S2], Some(4), &mut batch).unwrap();
    assert_eq!(batch.block_tables(), &[3, PAD_BLOCK, PAD_BLOCK, PAD_BLOCK]);
    assert_rejected(
        &mut m,
        BlockManagerError::TableTooWide {
            seq: S1,
            needed: 3,
            max_blocks: 2,
        },
        |m| m.block_table_matrix(&[S1], Some(2), &mut batch),
    );
    assert_rejected(
        &mut m,
        BlockManagerError::UnknownSequence { seq: S3 },
        |m| m.block_table_matrix(&[S1, S3], None, &mut batch),
    );
    m.block_table_matrix(&[], None, &mut batch).unwrap();
    assert_eq!((batch.num_seqs(), batch.block_tables().len()), (0, 0));
}

#[test]
fn can_allocate_keeps_the_watermark() {
    let mut config = BlockManagerConfig::new(100);
    config.watermark = 0.1;
    let mut m = BlockManager::new(config).unwrap();
    assert_eq!(m.can_allocate(90), AllocStatus::Ok);
    assert_eq!(m.can_allocate(91), AllocStatus::Never);
    assert_eq!(m.can_allocate(usize::MAX), AllocStatus::Never);
    prefill(&mut m, S1, &prompt(16 * 50));
    assert_eq!(m.can_allocate(40), AllocStatus::Ok);
    assert_eq!(m.can_allocate(41), AllocStatus::Later);
}

#[test]
fn queries_reject_unknown_ids() {
    let m = manager(4, 8);
    assert_eq!(
        m.ref_count(BlockId(4)),
        Err(BlockManagerError::UnknownBlock {
            block: BlockId(4),
            num_blocks: 4
        })
    );
    assert_eq!(m.ref_count(BlockId(3)), Ok(0));
    let unknown = Err(BlockManagerError::UnknownSequence { seq: S1 });
    assert_eq!(m.tokens(S1), unknown.clone().map(|()| &[][..]));
    assert_eq!(m.num_slotted_tokens(S1), unknown.clone().map(|()| 0));
    assert_eq!(m.is_swapped_out(S1), unknown.clone().map(|()| false));
    assert_eq!(m.block_table(S1), unknown.clone().map(|()| vec![]));
    assert_eq!(m.blocks_needed(S1, 1), unknown.clone().map(|()| 0));
    let mut m = m;
    assert_eq!(m.cache_full_blocks(S1), unknown);
}

#[test]
fn update_block_table_matrix_patches_rows_and_rejects_bad_batches() {
    let mut m = manager(32, 8);
    prefill(&mut m, S1, &prompt(20));
    prefill(&mut m, S2, &prompt(3));
    let mut matrix = BlockTableMatrix::default();
    m.update_block_table_matrix(&[S1, S2], None, &mut matrix)
        .unwrap();
    assert_eq!(matrix.block_tables(), &[0, 1, 2, 3, PAD_BLOCK, PAD_BLOCK]);

    // Growth past the width widens the matrix; a sequence listed twice gets two equal rows.
    let mut step = StepSlots::default();
    m.append_tokens(S2, &(0..30).collect::<Vec<_>>(), &mut step)
        .unwrap();
    m.update_block_table_matrix(&[S2, S1, S2], None, &mut matrix)
        .unwrap();
    assert_eq!(matrix.max_blocks(), 6);
    assert_eq!(matrix.row(0), matrix.row(2));
    assert_eq!(matrix.context_lens(), &[33, 20, 33]);
    let mut fresh = BlockTableMatrix::default();
    m.block_table_matrix(&[S2, S1, S2], Some(6), &mut fresh)
        .unwrap();
    assert_eq!(matrix.block_tables(), fresh.block_tables());

    // Bad batches: typed errors, no block, table or count changed (only the marks of which
    // rows are current may have moved, which the next update relies on).
    let stats = m.stats();
    let tables = (m.block_table(S1).unwrap(), m.block_table(S2).unwrap());
    assert_eq!(
        m.update_block_table_matrix(&[S1, S3], None, &mut matrix),
        Err(BlockManagerError::UnknownSequence { seq: S3 })
    );
    assert_eq!(
        m.update_block_table_matrix(&[S1, S2], Some(4), &mut matrix),
        Err(BlockManagerError::TableTooWide {
            seq: S2,
            needed: 5,
            max_blocks: 4
        })
    );
    assert_eq!(m.stats(), stats);
    assert_eq!(
        (m.block_table(S1).unwrap(), m.block_table(S2).unwrap()),
        tables
    );
    m.check_invariants().unwrap();
    // The matrix is still right after the failures.
    m.update_block_table_matrix(&[S2, S1, S2], None, &mut matrix)
        .unwrap();
    m.block_table_matrix(&[S2, S1, S2], Some(matrix.max_blocks()), &mut fresh)
        .unwrap();
    assert_eq!(matrix.block_tables(), fresh.block_tables());

    // A matrix handed to another manager never mistakes its sequences for the rows it holds.
    let mut other = manager(32, 8);
    prefill(&mut other, S1, &[9; 20]);
    prefill(&mut other, S2, &[9; 33]);
    other
        .update_block_table_matrix(&[S2, S1, S2], None, &mut matrix)
        .unwrap();
    other
        .block_table_matrix(&[S2, S1, S2], Some(matrix.max_blocks()), &mut fresh)
        .unwrap();
    assert_eq!(matrix.block_tables(), fresh.block_tables());
}
