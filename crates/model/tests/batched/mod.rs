//! Shared by the model's integration tests: running a backend over a mixed batch.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use kv_block_manager::{BlockManager, BlockManagerConfig, BlockTableMatrix, SeqId, StepSlots};
use model::{Backend, ForwardBatch};

/// Logits of every position of every sequence; sequence `i` advances `chunks[i]` tokens per
/// forward pass, all sequences in the same passes.
pub fn run_batched(b: &mut dyn Backend, seqs: &[&[u32]], chunks: &[usize]) -> Vec<Vec<f32>> {
    let cache = b.kv_cache_config();
    let vocab = b.config().vocab_size;
    let mut config = BlockManagerConfig::new(cache.num_blocks);
    config.block_size = cache.block_size;
    config.enable_prefix_caching = false;
    config.sliding_window = b.config().sliding_window;
    config.watermark = 0.0;
    let mut blocks = BlockManager::new(config).unwrap();
    let ids: Vec<SeqId> = (0..seqs.len() as u64).map(SeqId).collect();
    for (&id, s) in ids.iter().zip(seqs) {
        blocks.add_sequence(id, s, None).unwrap();
    }
    let mut out = vec![Vec::new(); seqs.len()];
    let (mut step, mut matrix, mut logits) = (
        StepSlots::default(),
        BlockTableMatrix::default(),
        Vec::new(),
    );
    loop {
        step.clear();
        let (mut tokens, mut positions, mut starts, mut active) =
            (Vec::new(), Vec::new(), vec![0u32], Vec::new());
        for (i, s) in seqs.iter().enumerate() {
            let done = blocks.num_slotted_tokens(ids[i]).unwrap();
            if done == s.len() {
                continue;
            }
            let n = chunks[i].min(s.len() - done);
            blocks.allocate_slots(ids[i], n, &mut step).unwrap();
            tokens.extend_from_slice(&s[done..done + n]);
            positions.extend(done as u32..(done + n) as u32);
            starts.push(tokens.len() as u32);
            active.push(i);
        }
        if active.is_empty() {
            return out;
        }
        let active_ids: Vec<SeqId> = active.iter().map(|&i| ids[i]).collect();
        blocks
            .update_block_table_matrix(&active_ids, None, &mut matrix)
            .unwrap();
        let logits_indices: Vec<u32> = (0..tokens.len() as u32).collect();
        let batch = ForwardBatch {
            token_ids: &tokens,
            positions: &positions,
            slot_mapping: &step.slot_mapping,
            seq_starts: &starts,
            block_tables: matrix.block_tables(),
            max_blocks: matrix.max_blocks(),
            context_lens: matrix.context_lens(),
            logits_indices: &logits_indices,
        };
        b.copy_blocks(&step.copies).unwrap();
        b.forward(&batch, &mut logits).unwrap();
        for (k, &i) in active.iter().enumerate() {
            let rows = starts[k] as usize * vocab..starts[k + 1] as usize * vocab;
            out[i].extend_from_slice(&logits[rows]);
        }
    }
}
