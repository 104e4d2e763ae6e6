//! A serving loop in miniature, driven only through kv-block-manager's public API: requests
//! sharing a system prompt, parallel sampling, a preemption by swap, speculative rollback, and
//! at the end an empty pool.
#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

use kv_block_manager::{
    AllocStatus, BlockManager, BlockManagerConfig, BlockManagerError, BlockTableMatrix, SeqId,
    StepSlots,
};

const SYSTEM_PROMPT_LEN: u32 = 64;

fn prompt(user: u32) -> Vec<u32> {
    (0..SYSTEM_PROMPT_LEN)
        .chain(1000 * user..1000 * user + 10)
        .collect()
}

#[test]
fn shared_prefix_parallel_sampling_swap_and_rollback() {
    let mut config = BlockManagerConfig::new(64);
    config.num_cpu_blocks = 16;
    let mut m = BlockManager::new(config).unwrap();
    let mut step = StepSlots::default();
    let mut matrix = BlockTableMatrix::default();

    // Request 1 prefills in two chunks (chunked prefill), then is cached.
    let p1 = prompt(1);
    assert_eq!(m.add_sequence(SeqId(1), &p1, None).unwrap(), 0);
    m.allocate_slots(SeqId(1), 40, &mut step).unwrap();
    m.cache_full_blocks(SeqId(1)).unwrap();
    m.allocate_slots(SeqId(1), p1.len() - 40, &mut step)
        .unwrap();
    m.cache_full_blocks(SeqId(1)).unwrap();
    assert_eq!(step.slot_mapping.len(), p1.len());

    // Request 2 shares the 64-token system prompt: four blocks need no prefill.
    let p2 = prompt(2);
    let hit = m.prefix_match(&p2, None);
    assert_eq!(hit.num_cached_tokens, 64);
    assert_eq!(m.can_allocate(hit.blocks_needed), AllocStatus::Ok);
    assert_eq!(m.add_sequence(SeqId(2), &p2, None).unwrap(), 64);
    step.clear();
    m.allocate_slots(SeqId(2), p2.len() - 64, &mut step)
        .unwrap();
    assert_eq!(step.slot_mapping.len(), 10);

    // Parallel sampling n = 3 for request 2: two forks share every block.
    m.fork(SeqId(2), SeqId(21)).unwrap();
    m.fork(SeqId(2), SeqId(22)).unwrap();
    let used_before = m.stats().used_blocks;

    let running = [SeqId(1), SeqId(2), SeqId(21), SeqId(22)];
    let mut copies = 0;
    for t in 0..20u32 {
        step.clear();
        for (i, &seq) in running.iter().enumerate() {
            m.append_tokens(seq, &[t * 10 + i as u32], &mut step)
                .unwrap();
        }
        copies += step.copies.len();
        m.update_block_table_matrix(&running, None, &mut matrix)
            .unwrap();
        assert_eq!(matrix.num_seqs(), 4);
        for &seq in &running {
            m.cache_full_blocks(seq).unwrap();
        }
    }
    // The shared partial tail is copied by the first two writers; the last one owns it alone.
    assert_eq!(copies, 2);
    assert!(m.stats().used_blocks > used_before);

    // Preempt the three samples of request 2 by swapping them out together, then back in.
    let group = [SeqId(2), SeqId(21), SeqId(22)];
    let out = m.swap_out(&group).unwrap();
    assert!(!out.is_empty());
    assert_eq!(
        m.append_tokens(SeqId(2), &[0], &mut step),
        Err(BlockManagerError::SwappedOut { seq: SeqId(2) })
    );
    let back = m.swap_in(&group).unwrap();
    assert_eq!(back.len(), out.len());

    // Speculative decoding on request 1: four draft tokens, two accepted.
    let len = m.num_slotted_tokens(SeqId(1)).unwrap();
    step.clear();
    m.append_tokens(SeqId(1), &[7, 7, 7, 7], &mut step).unwrap();
    m.truncate(SeqId(1), len + 2).unwrap();
    assert_eq!(m.num_slotted_tokens(SeqId(1)).unwrap(), len + 2);

    for seq in [SeqId(1), SeqId(2), SeqId(21), SeqId(22)] {
        m.free(seq).unwrap();
    }
    m.check_invariants().unwrap();
    let stats = m.stats();
    assert_eq!(stats.used_blocks, 0);
    assert_eq!(stats.cpu_free_blocks, stats.cpu_total_blocks);
    assert!(stats.evictable_blocks > 0, "finished prompts stay cached");
    assert_eq!(stats.prefix_hit_tokens, 64);

    // The cache outlives the requests that filled it.
    assert_eq!(m.prefix_match(&prompt(1), None).num_cached_tokens, 64);
}
