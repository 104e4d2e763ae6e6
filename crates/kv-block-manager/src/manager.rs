//! [`BlockManager`]: the verbs over sequences and their block tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::batch::{BlockTableMatrix, CopyOp, PAD_BLOCK, RowState, StepSlots};
use crate::pool::{BlockPool, BlockState};
use crate::prefix::{ChainLink, PrefixCache, Registration};
use crate::{BlockId, BlockManagerConfig, BlockManagerError, InvariantViolation, SeqId};

/// Marks a logical block released by the sliding window.
const RELEASED: u32 = u32::MAX;

/// The longest sequence the kernels can index (context lengths are `i32`).
pub const MAX_SEQUENCE_LEN: usize = i32::MAX as usize;

type Result<T, E = BlockManagerError> = std::result::Result<T, E>;

/// Where a sequence's blocks live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Location {
    Gpu,
    Cpu,
}

// Layout: a decode append touches only the first cache line (the token vector, counts, flags and
// the tail block: not the block vector); a matrix update also the second. Counts are `u32`: lengths are capped at
// `MAX_SEQUENCE_LEN` (i32::MAX) and block counts by the pool size, so every `as u32` here is
// exact.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
struct Sequence {
    /// Every token known: the prompt and what was appended since.
    tokens: Vec<u32>,
    /// Logical block -> physical block in the pool of `location`; [`RELEASED`] for the
    /// `num_released` leading blocks the sliding window dropped.
    blocks: Vec<u32>,
    /// Leading tokens that have a KV slot. The rest are pending (prompt tokens not yet prefilled).
    num_slotted: u32,
    num_released: u32,
    /// The last block while `tail_writable` (so a decode append reads no block vector).
    tail: u32,
    location: Location,
    /// The last block is known to be exclusively owned and uncached, so appending into it needs
    /// neither a copy nor an uncache. `false` only means "check".
    tail_writable: bool,
    /// Registration stopped at `chain.len()` (hash collision, or a block released unregistered).
    chain_broken: bool,
    // -- second cache line --
    /// The matrix (0: none) and update call this sequence was last synced by.
    sync: SyncMark,
    namespace: Option<Arc<str>>,
    /// Cache chain of the leading full blocks registered so far.
    chain: Vec<ChainLink>,
    /// The row it was written to by that call.
    synced_row: u32,
    /// First logical block whose entry changed since the last matrix update (new blocks, a
    /// copy-on-write replacement, a swap); window releases and truncations are found by
    /// comparing lengths instead.
    dirty_from: u32,
}

/// The live sequences, in a dense `Vec` found through a small id -> index map: the map's
/// 16-byte entries stay in cache even for large batches, and each sequence is one record.
#[derive(Clone, Default)]
struct Sequences {
    index: FxHashMap<SeqId, u32>,
    ids: Vec<SeqId>,
    seqs: Vec<Sequence>,
    /// Where [`get_mut`](Self::get_mut) looks first.
    cursor: u32,
}

// The cursor is a lookup hint, not state: left out, so that equal managers print equally.
impl std::fmt::Debug for Sequences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequences")
            .field("index", &self.index)
            .field("ids", &self.ids)
            .field("seqs", &self.seqs)
            .finish_non_exhaustive()
    }
}

impl Sequences {
    fn get(&self, id: &SeqId) -> Option<&Sequence> {
        self.index.get(id).map(|&i| &self.seqs[i as usize])
    }

    /// Index of `id`, trying `hint` (where it was before) first.
    fn find(&self, id: SeqId, hint: Option<u32>) -> Option<u32> {
        match hint {
            Some(i) if self.ids.get(i as usize) == Some(&id) => Some(i),
            _ => self.index.get(&id).copied(),
        }
    }

    fn at_mut(&mut self, index: u32) -> &mut Sequence {
        &mut self.seqs[index as usize]
    }

    /// Tries the record after the last one got this way first: a caller walking its batch in
    /// the order the sequences were added (a scheduler's decode pass) then reads the id
    /// vector front to back instead of probing the hash table at random.
    fn get_mut(&mut self, id: &SeqId) -> Option<&mut Sequence> {
        let i = self.find(*id, Some(self.cursor))?;
        self.cursor = i + 1;
        Some(&mut self.seqs[i as usize])
    }

    fn contains_key(&self, id: &SeqId) -> bool {
        self.index.contains_key(id)
    }

    /// Adds a sequence whose id is not present (callers check first).
    fn insert(&mut self, id: SeqId, s: Sequence) {
        debug_assert!(!self.index.contains_key(&id));
        // Each record is 128 bytes: memory runs out long before u32::MAX sequences.
        self.index.insert(id, self.seqs.len() as u32);
        self.ids.push(id);
        self.seqs.push(s);
    }

    fn remove(&mut self, id: &SeqId) -> Option<Sequence> {
        let i = self.index.remove(id)? as usize;
        let s = self.seqs.swap_remove(i);
        self.ids.swap_remove(i);
        if let Some(&moved) = self.ids.get(i) {
            self.index.insert(moved, i as u32);
        }
        Some(s)
    }

    fn len(&self) -> usize {
        self.seqs.len()
    }

    fn iter(&self) -> impl Iterator<Item = (&SeqId, &Sequence)> {
        self.ids.iter().zip(&self.seqs)
    }

    fn values(&self) -> impl Iterator<Item = &Sequence> {
        self.seqs.iter()
    }
}

/// Which matrix update last wrote a sequence's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct SyncMark {
    matrix: u64,
    pass: u64,
}

// The layout above: exactly two cache lines.
const _: () = assert!(std::mem::size_of::<Sequence>() == 128);

impl Sequence {
    fn live_blocks(&self) -> impl DoubleEndedIterator<Item = BlockId> + '_ {
        self.blocks[self.released()..].iter().map(|&b| BlockId(b))
    }

    /// Tokens with a slot.
    fn slotted(&self) -> usize {
        self.num_slotted as usize
    }

    /// Leading blocks released by the window.
    fn released(&self) -> usize {
        self.num_released as usize
    }

    fn pending(&self) -> usize {
        self.tokens.len() - self.slotted()
    }
}

/// Whether an allocation of some number of blocks can be admitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocStatus {
    /// Enough blocks are free (or evictable) above the watermark.
    Ok,
    /// Not now; it may fit once running sequences finish.
    Later,
    /// Never: it needs more blocks than the pool holds above the watermark.
    Never,
}

/// What the prefix cache holds for a prompt, from [`BlockManager::prefix_match`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixMatch {
    /// Leading prompt tokens whose KV is cached (a whole number of blocks, always less than
    /// the prompt's length: the last token is computed to get logits).
    pub num_cached_tokens: usize,
    /// Blocks that admitting the whole prompt would take from the free and evictable ones
    /// (cached blocks still in use by other sequences cost nothing).
    pub blocks_needed: usize,
}

/// Counters and gauges of a [`BlockManager`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockManagerStats {
    /// GPU blocks in the pool.
    pub total_blocks: usize,
    /// GPU blocks holding nothing.
    pub free_blocks: usize,
    /// GPU blocks referenced by at least one sequence.
    pub used_blocks: usize,
    /// GPU blocks referenced by no sequence but kept for prefix caching.
    pub evictable_blocks: usize,
    /// Blocks registered in the prefix cache (in use or evictable).
    pub cached_blocks: usize,
    /// CPU swap blocks in the pool.
    pub cpu_total_blocks: usize,
    /// CPU swap blocks holding nothing.
    pub cpu_free_blocks: usize,
    /// Live sequences.
    pub num_sequences: usize,
    /// Prefix-cache lookups (one per added sequence, when caching is on).
    pub prefix_queries: u64,
    /// Prompt tokens looked up.
    pub prefix_query_tokens: u64,
    /// Prompt tokens found in the cache.
    pub prefix_hit_tokens: u64,
    /// Token slots in used GPU blocks (`used_blocks * block_size`).
    pub slots_allocated: usize,
    /// Tokens held in GPU blocks, summed over sequences (a block shared by `k` sequences counts
    /// its tokens `k` times, so this can exceed `slots_allocated`).
    pub tokens_stored: usize,
}

/// The paged KV-cache block manager. See the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct BlockManager {
    config: BlockManagerConfig,
    storage: Storage,
    seqs: Sequences,
    prefix_queries: u64,
    prefix_query_tokens: u64,
    prefix_hit_tokens: u64,
    sync_passes: u64,
}

/// Identifies block-table matrices (0 means "not yet used").
static NEXT_MATRIX_ID: AtomicU64 = AtomicU64::new(1);

fn lookup_seq(seqs: &Sequences, seq: SeqId) -> Result<&Sequence> {
    seqs.get(&seq)
        .ok_or(BlockManagerError::UnknownSequence { seq })
}

fn on_gpu(seq: SeqId, s: &Sequence) -> Result<()> {
    match s.location {
        Location::Gpu => Ok(()),
        Location::Cpu => Err(BlockManagerError::SwappedOut { seq }),
    }
}

fn check_len(seq: SeqId, requested: usize) -> Result<()> {
    if requested > MAX_SEQUENCE_LEN {
        return Err(BlockManagerError::SequenceTooLong {
            seq,
            requested,
            max: MAX_SEQUENCE_LEN,
        });
    }
    Ok(())
}

/// A sequence's context length for the kernels (at most `MAX_SEQUENCE_LEN == i32::MAX`).
fn context_len(s: &Sequence) -> i32 {
    s.slotted() as i32
}

/// Writes `s`'s table into its matrix row: whole, or, given the row's state at the last sync,
/// only what changed since.
fn write_row(row: &mut [i32], s: &Sequence, previous: Option<RowState>) {
    // Block ids are below i32::MAX (checked by the config), so `as i32` is exact.
    let from = match previous {
        None => {
            row.fill(PAD_BLOCK);
            s.released()
        }
        Some(prev) => {
            if prev.released < s.released() {
                row[prev.released..s.released()].fill(PAD_BLOCK);
            }
            if prev.len > s.blocks.len() {
                row[s.blocks.len()..prev.len].fill(PAD_BLOCK);
            }
            (s.dirty_from as usize)
                .max(s.released())
                .min(s.blocks.len())
        }
    };
    for (dst, &b) in row[from..s.blocks.len()].iter_mut().zip(&s.blocks[from..]) {
        *dst = b as i32;
    }
}

/// Allocates a block from `pool`, dropping the cache entry of an evicted block.
fn allocate(pool: &mut BlockPool, cache: &mut Option<PrefixCache>) -> Result<BlockId> {
    let a = pool
        .allocate()
        .ok_or(BlockManagerError::OutOfBlocks { needed: 1, free: 0 })?;
    if a.evicted
        && let Some(cache) = cache
    {
        cache.uncache(a.block);
    }
    Ok(a.block)
}

/// Token positions to blocks and offsets. Block sizes are powers of two, so this is shifts and
/// masks: a hardware division costs more than the rest of a decode append.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    shift: u32,
}

impl Geometry {
    fn new(block_size: usize) -> Self {
        debug_assert!(block_size.is_power_of_two());
        Self {
            shift: block_size.trailing_zeros(),
        }
    }

    /// Blocks that hold `tokens` tokens.
    fn blocks_for(self, tokens: usize) -> usize {
        (tokens >> self.shift) + usize::from(!self.is_block_start(tokens))
    }

    /// Full blocks among `tokens` tokens (the logical block of position `tokens`).
    fn full_blocks(self, tokens: usize) -> usize {
        tokens >> self.shift
    }

    fn size(self) -> usize {
        1 << self.shift
    }

    fn offset(self, position: usize) -> usize {
        position & ((1 << self.shift) - 1)
    }

    fn is_block_start(self, position: usize) -> bool {
        self.offset(position) == 0
    }
}

/// The pools and the prefix cache: everything a sequence's blocks live in.
#[derive(Debug, Clone)]
struct Storage {
    geo: Geometry,
    window: Option<usize>,
    gpu: BlockPool,
    cpu: BlockPool,
    cache: Option<PrefixCache>,
}

impl Storage {
    /// Index of the first logical block the token at `position` still needs, and how many of
    /// the blocks before it would become allocatable if released.
    pub(crate) fn window_release_plan(&self, s: &Sequence, position: usize) -> (usize, usize) {
        let Some(window) = self.window else {
            return (s.released(), 0);
        };
        let first_needed = (position + 1).saturating_sub(window);
        let upto = self
            .geo
            .full_blocks(first_needed)
            .min(s.blocks.len())
            .max(s.released());
        let freed = s.blocks[s.released()..upto]
            .iter()
            .filter(|&&b| self.gpu.ref_count(BlockId(b)) == 1)
            .count();
        (upto, freed)
    }

    /// Releases the blocks the token at `position` (and every later one) no longer attends to.
    fn release_out_of_window(&mut self, s: &mut Sequence, position: usize) {
        let (upto, _) = self.window_release_plan(s, position);
        while s.released() < upto {
            let i = s.released();
            self.gpu.release(BlockId(s.blocks[i]));
            s.blocks[i] = RELEASED;
            s.num_released += 1;
            if s.chain.len() <= i {
                // Released before it was registered: the chain can never reach past it.
                s.chain_broken = true;
            }
        }
    }

    /// New GPU blocks needed to give `n` more tokens of `s` a slot (copy-on-write included).
    fn blocks_needed_for(&self, s: &Sequence, n: usize) -> usize {
        let mut needed = self.geo.blocks_for(s.slotted() + n) - s.blocks.len();
        if n > 0 && !s.tail_writable && !self.geo.is_block_start(s.slotted()) {
            let last = BlockId(s.blocks[s.blocks.len() - 1]);
            if self.gpu.ref_count(last) > 1 {
                needed += 1;
            }
        }
        needed
    }

    /// The decode fast path: one token into a tail block known to be writable and not full,
    /// with no window to slide. Returns `false` (having done nothing) when it does not apply.
    fn append_in_tail(&self, s: &mut Sequence, token: u32, out: &mut StepSlots) -> bool {
        let position = s.slotted();
        if !s.tail_writable || self.window.is_some() || self.geo.is_block_start(position) {
            return false;
        }
        debug_assert_eq!(s.blocks.last(), Some(&s.tail));
        s.tokens.push(token);
        let slot = ((s.tail as usize) << self.geo.shift) + self.geo.offset(position);
        out.slot_mapping.push(slot as i64);
        s.num_slotted += 1;
        true
    }

    /// Appends `appended` to the known tokens of `s`, then gives slots to its next `n` pending
    /// tokens. Checks capacity before changing anything.
    fn grow(
        &mut self,
        s: &mut Sequence,
        appended: &[u32],
        n: usize,
        out: &mut StepSlots,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let needed = self.blocks_needed_for(s, n);
        let (_, releasable) = self.window_release_plan(s, s.slotted());
        let free = self.gpu.num_available() + releasable;
        if needed > free {
            return Err(BlockManagerError::OutOfBlocks { needed, free });
        }
        if let [token] = appended {
            s.tokens.push(*token);
        } else {
            s.tokens.extend_from_slice(appended);
        }
        let start = s.slotted();
        self.release_out_of_window(s, start);
        self.grow_unchecked(s, n, out)
    }

    fn grow_unchecked(&mut self, s: &mut Sequence, n: usize, out: &mut StepSlots) -> Result<()> {
        let start = s.slotted();
        if !s.tail_writable && !self.geo.is_block_start(start) {
            let i = s.blocks.len() - 1;
            let last = BlockId(s.blocks[i]);
            if self.gpu.ref_count(last) > 1 {
                // Shared partial block: write into a private copy.
                let dst = allocate(&mut self.gpu, &mut self.cache)?;
                out.copies.push(CopyOp { src: last, dst });
                self.gpu.release(last);
                s.blocks[i] = dst.0;
                s.dirty_from = s.dirty_from.min(i as u32);
            } else if self.gpu.is_cached(last) {
                // Exclusive but cached (a truncated full block): its cached content is about to
                // be overwritten.
                if let Some(cache) = &mut self.cache {
                    cache.uncache(last);
                }
                self.gpu.set_cached(last, false);
            }
        }
        let end = start + n;
        s.dirty_from = s.dirty_from.min(s.blocks.len() as u32);
        while s.blocks.len() < self.geo.blocks_for(end) {
            let b = allocate(&mut self.gpu, &mut self.cache)?;
            s.blocks.push(b.0);
        }
        // The tail is now a fresh block, a private copy, or checked exclusive and uncached.
        s.tail_writable = true;
        s.tail = s.blocks.last().copied().unwrap_or(RELEASED);
        // Consecutive positions of one block have consecutive slots: extend block by block.
        out.slot_mapping.reserve(n);
        let mut p = start;
        while p < end {
            let block = s.blocks[self.geo.full_blocks(p)] as usize;
            let first = (block << self.geo.shift) + self.geo.offset(p);
            let len = (self.geo.size() - self.geo.offset(p)).min(end - p);
            out.slot_mapping
                .extend((first..first + len).map(|slot| slot as i64));
            p += len;
        }
        s.num_slotted = end as u32;
        Ok(())
    }
}

impl BlockManager {
    /// Validates `config` and builds an empty manager.
    pub fn new(config: BlockManagerConfig) -> Result<Self> {
        config.validate()?;
        let cache = config
            .enable_prefix_caching
            .then(|| PrefixCache::new(config.num_gpu_blocks, config.block_size));
        Ok(Self {
            storage: Storage {
                geo: Geometry::new(config.block_size),
                window: config.sliding_window,
                gpu: BlockPool::new(config.num_gpu_blocks),
                cpu: BlockPool::new(config.num_cpu_blocks),
                cache,
            },
            seqs: Sequences::default(),
            config,
            prefix_queries: 0,
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
            sync_passes: 0,
        })
    }

    /// The configuration the manager was built with.
    pub fn config(&self) -> &BlockManagerConfig {
        &self.config
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    fn seq(&self, seq: SeqId) -> Result<&Sequence> {
        lookup_seq(&self.seqs, seq)
    }

    /// Walks the prefix cache along `prompt`, at most up to its second-to-last token.
    fn match_prefix(&self, prompt: &[u32], namespace: Option<&str>) -> Vec<ChainLink> {
        let Some(cache) = &self.storage.cache else {
            return Vec::new();
        };
        let bs = self.config.block_size;
        let max_blocks = prompt.len().saturating_sub(1) / bs;
        let mut chain: Vec<ChainLink> = Vec::with_capacity(max_blocks);
        for tokens in prompt.chunks_exact(bs).take(max_blocks) {
            match cache.lookup(chain.last().copied(), tokens, namespace) {
                Some(link) => chain.push(link),
                None => break,
            }
        }
        chain
    }

    /// What the prefix cache holds for `prompt` under `namespace`, without changing anything.
    pub fn prefix_match(&self, prompt: &[u32], namespace: Option<&str>) -> PrefixMatch {
        let chain = self.match_prefix(prompt, namespace);
        let revived = chain
            .iter()
            .filter(|l| self.storage.gpu.state(l.canonical.block) == BlockState::Evictable)
            .count();
        let bs = self.config.block_size;
        PrefixMatch {
            num_cached_tokens: chain.len() * bs,
            blocks_needed: prompt.len().div_ceil(bs) - chain.len() + revived,
        }
    }

    /// Whether `num_blocks` more GPU blocks can be handed out now, keeping the watermark free.
    pub fn can_allocate(&self, num_blocks: usize) -> AllocStatus {
        let watermark = self.config.watermark_blocks();
        let wanted = num_blocks.saturating_add(watermark);
        if wanted > self.storage.gpu.num_total() {
            AllocStatus::Never
        } else if wanted > self.storage.gpu.num_available() {
            AllocStatus::Later
        } else {
            AllocStatus::Ok
        }
    }

    /// Adds a sequence whose known tokens are `prompt`, reusing the longest cached prefix.
    ///
    /// Returns how many leading tokens already have their KV in the cache; they need no
    /// prefill. No new block is allocated here: prefill allocates with
    /// [`allocate_slots`](Self::allocate_slots), chunk by chunk.
    pub fn add_sequence(
        &mut self,
        seq: SeqId,
        prompt: &[u32],
        namespace: Option<&str>,
    ) -> Result<usize> {
        if self.seqs.contains_key(&seq) {
            return Err(BlockManagerError::DuplicateSequence { seq });
        }
        if prompt.is_empty() {
            return Err(BlockManagerError::EmptyPrompt { seq });
        }
        check_len(seq, prompt.len())?;
        let chain = self.match_prefix(prompt, namespace);
        if self.storage.cache.is_some() {
            self.prefix_queries += 1;
            self.prefix_query_tokens += prompt.len() as u64;
            self.prefix_hit_tokens += (chain.len() * self.config.block_size) as u64;
        }
        let blocks: Vec<u32> = chain.iter().map(|l| l.canonical.block.0).collect();
        for &b in &blocks {
            self.storage.gpu.retain(BlockId(b));
        }
        let mut s = Sequence {
            tokens: prompt.to_vec(),
            num_slotted: (blocks.len() * self.config.block_size) as u32,
            blocks,
            num_released: 0,
            location: Location::Gpu,
            namespace: namespace.map(Arc::from),
            chain,
            chain_broken: false,
            tail_writable: false,
            tail: RELEASED,
            dirty_from: 0,
            sync: SyncMark::default(),
            synced_row: 0,
        };
        let first_new = s.slotted();
        self.storage.release_out_of_window(&mut s, first_new);
        let cached = s.slotted();
        self.seqs.insert(seq, s);
        Ok(cached)
    }

    /// New GPU blocks that giving `num_tokens` more tokens of `seq` a slot would allocate,
    /// including a copy-on-write copy of a shared last block.
    pub fn blocks_needed(&self, seq: SeqId, num_tokens: usize) -> Result<usize> {
        let s = self.seq(seq)?;
        on_gpu(seq, s)?;
        Ok(self.storage.blocks_needed_for(s, num_tokens))
    }

    /// Gives slots to the next `num_tokens` pending tokens of `seq` (prompt tokens waiting for
    /// prefill), appending their slots to `out.slot_mapping` and any copy-on-write copy to
    /// `out.copies`. With a sliding window, blocks the new tokens no longer attend to are
    /// released first.
    pub fn allocate_slots(
        &mut self,
        seq: SeqId,
        num_tokens: usize,
        out: &mut StepSlots,
    ) -> Result<()> {
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(BlockManagerError::UnknownSequence { seq })?;
        on_gpu(seq, s)?;
        if num_tokens > s.pending() {
            return Err(BlockManagerError::NotEnoughPendingTokens {
                seq,
                requested: num_tokens,
                pending: s.pending(),
            });
        }
        self.storage.grow(s, &[], num_tokens, out)
    }

    /// Appends newly generated (or draft) `tokens` to `seq` and gives each a slot, as
    /// [`allocate_slots`](Self::allocate_slots) does. The prompt must be fully slotted.
    pub fn append_tokens(&mut self, seq: SeqId, tokens: &[u32], out: &mut StepSlots) -> Result<()> {
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(BlockManagerError::UnknownSequence { seq })?;
        on_gpu(seq, s)?;
        if s.pending() > 0 {
            return Err(BlockManagerError::PrefillIncomplete {
                seq,
                pending: s.pending(),
            });
        }
        check_len(seq, s.tokens.len().saturating_add(tokens.len()))?;
        if let [token] = tokens
            && self.storage.append_in_tail(s, *token, out)
        {
            return Ok(());
        }
        self.storage.grow(s, tokens, tokens.len(), out)
    }

    /// Registers the sequence's full, computed blocks in the prefix cache. Call it after the
    /// step that wrote their KV has run (and after any [`truncate`](Self::truncate) of rejected
    /// draft tokens). A no-op when prefix caching is off.
    pub fn cache_full_blocks(&mut self, seq: SeqId) -> Result<()> {
        let s = self.seq(seq)?;
        on_gpu(seq, s)?;
        let Some(cache) = &mut self.storage.cache else {
            return Ok(());
        };
        let Some(s) = self.seqs.get_mut(&seq) else {
            return Err(BlockManagerError::UnknownSequence { seq });
        };
        let bs = self.config.block_size;
        let full = s.slotted() / bs;
        while !s.chain_broken && s.chain.len() < full {
            let i = s.chain.len();
            if s.blocks[i] == RELEASED {
                s.chain_broken = true;
                break;
            }
            let block = BlockId(s.blocks[i]);
            let parent = s.chain.last().copied();
            let tokens = &s.tokens[i * bs..(i + 1) * bs];
            loop {
                match cache.register(block, parent, tokens, s.namespace.as_ref()) {
                    Registration::Cached(link) => {
                        self.storage.gpu.set_cached(block, true);
                        s.chain.push(link);
                        if i + 1 == s.blocks.len() {
                            s.tail_writable = false;
                        }
                    }
                    Registration::Duplicate(link) => s.chain.push(link),
                    Registration::Collision => s.chain_broken = true,
                    Registration::Orphan(orphan) => {
                        cache.uncache(orphan);
                        self.storage.gpu.forget_cached(orphan);
                        continue;
                    }
                }
                break;
            }
        }
        Ok(())
    }

    /// Drops every prefix-cache entry (after a weight update, say). Evictable blocks become
    /// free; blocks in use keep their content for their sequences but can no longer be found.
    /// Returns how many entries were dropped.
    pub fn reset_prefix_cache(&mut self) -> usize {
        let Some(cache) = &mut self.storage.cache else {
            return 0;
        };
        let mut dropped = 0;
        for i in 0..self.storage.gpu.num_total() {
            let b = BlockId(i as u32);
            if self.storage.gpu.is_cached(b) {
                cache.uncache(b);
                self.storage.gpu.forget_cached(b);
                dropped += 1;
            }
        }
        dropped
    }

    /// Makes `child` a copy of `parent` that shares all of its blocks (copy-on-write): used for
    /// parallel sampling (`n > 1`) and beam search.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        let p = self.seq(parent)?;
        on_gpu(parent, p)?;
        if self.seqs.contains_key(&child) {
            return Err(BlockManagerError::DuplicateSequence { seq: child });
        }
        let mut c = p.clone();
        if let Some(p) = self.seqs.get_mut(&parent) {
            p.tail_writable = false;
        }
        c.tail_writable = false;
        c.dirty_from = 0;
        c.sync = SyncMark::default();
        for b in c.live_blocks() {
            self.storage.gpu.retain(b);
        }
        self.seqs.insert(child, c);
        Ok(())
    }

    /// Keeps only the first `num_tokens` tokens of `seq` (rollback of rejected draft tokens),
    /// releasing the blocks past them.
    pub fn truncate(&mut self, seq: SeqId, num_tokens: usize) -> Result<()> {
        let s = self.seq(seq)?;
        on_gpu(seq, s)?;
        let invalid = |reason: String| {
            Err(BlockManagerError::InvalidTruncate {
                seq,
                requested: num_tokens,
                reason,
            })
        };
        if num_tokens > s.tokens.len() {
            return invalid(format!("it has only {} tokens", s.tokens.len()));
        }
        if let Some(window) = self.config.sliding_window {
            let first_needed = (num_tokens + 1).saturating_sub(window);
            let first_live = s.released() * self.config.block_size;
            if first_needed < first_live {
                return invalid(format!(
                    "tokens before position {first_live} were released by the sliding window"
                ));
            }
        }
        let bs = self.config.block_size;
        let Some(s) = self.seqs.get_mut(&seq) else {
            return Err(BlockManagerError::UnknownSequence { seq });
        };
        s.tokens.truncate(num_tokens);
        s.tail_writable = false;
        s.num_slotted = s.slotted().min(num_tokens) as u32;
        let keep = s.slotted().div_ceil(bs);
        while s.blocks.len() > keep {
            if let Some(b) = s.blocks.pop() {
                self.storage.gpu.release(BlockId(b));
            }
        }
        let full = s.slotted() / bs;
        if full <= s.chain.len() {
            s.chain.truncate(full);
            s.chain_broken = false;
        }
        Ok(())
    }

    /// Removes `seq`, releasing its blocks (GPU or CPU). Cached blocks stay evictable; the
    /// sequence's last blocks are released first so that they are evicted before its first ones.
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(BlockManagerError::UnknownSequence { seq })?;
        let pool = match s.location {
            Location::Gpu => &mut self.storage.gpu,
            Location::Cpu => &mut self.storage.cpu,
        };
        for b in s.live_blocks().rev() {
            pool.release(b);
        }
        Ok(())
    }

    /// Moves the blocks of `seqs` (a group that may share blocks, such as the samples of one
    /// request) to the CPU pool. Returns GPU -> CPU copies to run before the next forward pass.
    pub fn swap_out(&mut self, seqs: &[SeqId]) -> Result<Vec<CopyOp>> {
        self.migrate(seqs, Location::Gpu)
    }

    /// Moves the blocks of swapped-out `seqs` back to the GPU. Returns CPU -> GPU copies to run
    /// before the next forward pass. Blocks come back uncached.
    pub fn swap_in(&mut self, seqs: &[SeqId]) -> Result<Vec<CopyOp>> {
        self.migrate(seqs, Location::Cpu)
    }

    fn migrate(&mut self, seqs: &[SeqId], from: Location) -> Result<Vec<CopyOp>> {
        let mut distinct = FxHashSet::default();
        let mut seen = FxHashSet::default();
        for &seq in seqs {
            let s = self.seq(seq)?;
            if !seen.insert(seq) {
                return Err(BlockManagerError::DuplicateInBatch { seq });
            }
            match (from, s.location) {
                (Location::Gpu, Location::Cpu) => {
                    return Err(BlockManagerError::SwappedOut { seq });
                }
                (Location::Cpu, Location::Gpu) => {
                    return Err(BlockManagerError::NotSwappedOut { seq });
                }
                _ => {}
            }
            distinct.extend(s.live_blocks());
        }
        let needed = distinct.len();
        let (src, dst, to) = match from {
            Location::Gpu => (&mut self.storage.gpu, &mut self.storage.cpu, Location::Cpu),
            Location::Cpu => (&mut self.storage.cpu, &mut self.storage.gpu, Location::Gpu),
        };
        let free = dst.num_available();
        if needed > free {
            return Err(match to {
                Location::Cpu => BlockManagerError::OutOfCpuBlocks { needed, free },
                Location::Gpu => BlockManagerError::OutOfBlocks { needed, free },
            });
        }
        let mut mapping: FxHashMap<BlockId, BlockId> = FxHashMap::default();
        let mut copies = Vec::with_capacity(needed);
        for &seq in seqs {
            let Some(s) = self.seqs.get_mut(&seq) else {
                return Err(BlockManagerError::UnknownSequence { seq });
            };
            for j in s.released()..s.blocks.len() {
                let old = BlockId(s.blocks[j]);
                let new = match mapping.get(&old) {
                    Some(&new) => {
                        dst.retain(new);
                        new
                    }
                    None => {
                        let new = allocate(dst, &mut self.storage.cache)?;
                        mapping.insert(old, new);
                        copies.push(CopyOp { src: old, dst: new });
                        new
                    }
                };
                src.release(old);
                s.blocks[j] = new.0;
            }
            s.location = to;
            s.dirty_from = 0;
            s.tail_writable = false;
        }
        Ok(copies)
    }

    /// The width a matrix for `seqs` needs; checks that every sequence is on the GPU and fits.
    fn batch_width(&self, seqs: &[SeqId], fixed_width: Option<usize>) -> Result<usize> {
        let mut width = 0;
        for &seq in seqs {
            let s = self.seq(seq)?;
            on_gpu(seq, s)?;
            if let Some(max_blocks) = fixed_width
                && s.blocks.len() > max_blocks
            {
                return Err(BlockManagerError::TableTooWide {
                    seq,
                    needed: s.blocks.len(),
                    max_blocks,
                });
            }
            width = width.max(s.blocks.len());
        }
        Ok(fixed_width.unwrap_or(width))
    }

    /// Fills `out` from scratch with the block tables and context lengths of `seqs`, in order.
    ///
    /// The matrix is as wide as the widest table, or exactly `fixed_width` columns when given
    /// (for shapes captured in CUDA graphs). For a step loop prefer
    /// [`update_block_table_matrix`](Self::update_block_table_matrix), which patches rows.
    pub fn block_table_matrix(
        &self,
        seqs: &[SeqId],
        fixed_width: Option<usize>,
        out: &mut BlockTableMatrix,
    ) -> Result<()> {
        let width = self.batch_width(seqs, fixed_width)?;
        out.reshape(0, width);
        out.reshape(seqs.len(), width);
        let (tables, lens, _) = out.parts_mut();
        for (i, &seq) in seqs.iter().enumerate() {
            let s = self.seq(seq)?;
            write_row(&mut tables[i * width..(i + 1) * width], s, None);
            lens[i] = context_len(s);
        }
        Ok(())
    }

    /// Brings `out` up to date with the tables of `seqs`, in order, patching only what changed
    /// since `out` was last updated (O(batch) for a decode step instead of O(batch x blocks)).
    ///
    /// A row is rewritten whole when it held another sequence before, or when the sequence was
    /// last synced into another matrix; every other row gets its new blocks, a copy-on-write
    /// replacement, padding for blocks the window released or a truncation dropped. Without
    /// `fixed_width`, the width grows (at least doubling) when a table outgrows it.
    ///
    /// On error (an unknown or swapped-out sequence, a table wider than `fixed_width`) no block,
    /// table or count changes; `out` holds correct rows for the sequences before the offending
    /// one, and the next successful update brings the rest up to date.
    pub fn update_block_table_matrix(
        &mut self,
        seqs: &[SeqId],
        fixed_width: Option<usize>,
        out: &mut BlockTableMatrix,
    ) -> Result<()> {
        if out.id() == 0 {
            // Unique across managers, so a matrix moved to another manager never mistakes that
            // manager's sequences for the rows it holds.
            out.set_id(NEXT_MATRIX_ID.fetch_add(1, Ordering::Relaxed));
        }
        let mut width = fixed_width.unwrap_or(out.max_blocks());
        loop {
            self.sync_passes += 1;
            out.reshape(seqs.len(), width);
            match self.sync_rows(seqs, fixed_width, width, out)? {
                None => return Ok(()),
                // A table outgrew the matrix: widen and start over (every row is rewritten).
                Some(wider) => width = wider,
            }
        }
    }

    /// One pass of [`update_block_table_matrix`](Self::update_block_table_matrix) over a matrix
    /// of `width` columns; returns the width to retry with when a table does not fit.
    fn sync_rows(
        &mut self,
        seqs: &[SeqId],
        fixed_width: Option<usize>,
        width: usize,
        out: &mut BlockTableMatrix,
    ) -> Result<Option<usize>> {
        let mark = SyncMark {
            matrix: out.id(),
            pass: self.sync_passes,
        };
        let (tables, lens, rows) = out.parts_mut();
        for (i, (&seq, state)) in seqs.iter().zip(rows.iter_mut()).enumerate() {
            // The row remembers where the sequence was stored: usually no hash lookup.
            let same_seq = state.seq == Some(seq);
            let index = self
                .seqs
                .find(seq, same_seq.then_some(state.index))
                .ok_or(BlockManagerError::UnknownSequence { seq })?;
            let s = self.seqs.at_mut(index);
            on_gpu(seq, s)?;
            if s.blocks.len() > width {
                return match fixed_width {
                    Some(max_blocks) => Err(BlockManagerError::TableTooWide {
                        seq,
                        needed: s.blocks.len(),
                        max_blocks,
                    }),
                    None => Ok(Some(s.blocks.len().max(2 * width))),
                };
            }
            if s.sync == mark {
                // Listed twice: copy the row written for its first occurrence.
                let first = s.synced_row as usize;
                tables.copy_within(first * width..(first + 1) * width, i * width);
            } else {
                let previous = (same_seq && s.sync.matrix == mark.matrix).then_some(*state);
                let unchanged = previous.is_some_and(|p| {
                    p.len == s.blocks.len()
                        && p.released == s.released()
                        && s.dirty_from as usize >= p.len
                });
                if !unchanged {
                    write_row(&mut tables[i * width..(i + 1) * width], s, previous);
                }
                s.dirty_from = s.blocks.len() as u32;
                s.sync = mark;
                s.synced_row = i as u32;
            }
            lens[i] = context_len(s);
            *state = RowState {
                seq: Some(seq),
                index,
                len: s.blocks.len(),
                released: s.released(),
            };
        }
        Ok(None)
    }

    /// The physical blocks of `seq`'s table, `None` for blocks released by the sliding window.
    /// The ids name GPU blocks, or CPU blocks while the sequence is swapped out.
    pub fn block_table(&self, seq: SeqId) -> Result<Vec<Option<BlockId>>> {
        let s = self.seq(seq)?;
        Ok(s.blocks
            .iter()
            .map(|&b| (b != RELEASED).then_some(BlockId(b)))
            .collect())
    }

    /// The tokens known for `seq`: its prompt and everything appended.
    pub fn tokens(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(seq)?.tokens)
    }

    /// Leading tokens of `seq` that have a KV slot (its context length for the kernels).
    pub fn num_slotted_tokens(&self, seq: SeqId) -> Result<usize> {
        Ok(self.seq(seq)?.slotted())
    }

    /// Whether `seq` is swapped out to the CPU pool.
    pub fn is_swapped_out(&self, seq: SeqId) -> Result<bool> {
        Ok(self.seq(seq)?.location == Location::Cpu)
    }

    /// Reference count of GPU block `block`.
    pub fn ref_count(&self, block: BlockId) -> Result<u32> {
        if !self.storage.gpu.contains(block) {
            return Err(BlockManagerError::UnknownBlock {
                block,
                num_blocks: self.storage.gpu.num_total(),
            });
        }
        Ok(self.storage.gpu.ref_count(block))
    }

    /// GPU blocks that an allocation can take now (free plus evictable).
    pub fn num_available_blocks(&self) -> usize {
        self.storage.gpu.num_available()
    }

    /// A snapshot of counters and gauges.
    pub fn stats(&self) -> BlockManagerStats {
        let bs = self.config.block_size;
        let tokens_stored = self
            .seqs
            .values()
            .filter(|s| s.location == Location::Gpu)
            .map(|s| s.slotted() - (s.released() * bs).min(s.slotted()))
            .sum();
        BlockManagerStats {
            total_blocks: self.storage.gpu.num_total(),
            free_blocks: self.storage.gpu.num_free(),
            used_blocks: self.storage.gpu.num_in_use(),
            evictable_blocks: self.storage.gpu.num_evictable(),
            cached_blocks: self
                .storage
                .cache
                .as_ref()
                .map_or(0, PrefixCache::num_cached),
            cpu_total_blocks: self.storage.cpu.num_total(),
            cpu_free_blocks: self.storage.cpu.num_free(),
            num_sequences: self.seqs.len(),
            prefix_queries: self.prefix_queries,
            prefix_query_tokens: self.prefix_query_tokens,
            prefix_hit_tokens: self.prefix_hit_tokens,
            slots_allocated: self.storage.gpu.num_in_use() * bs,
            tokens_stored,
        }
    }

    /// Checks every internal invariant; meant for tests and fuzzers (it is O(blocks + tokens)).
    ///
    /// - each pool's free, in-use and evictable sets partition it, and the counters agree;
    /// - every block's reference count equals the number of block tables that hold it;
    /// - a block is cached exactly when the prefix cache has an entry for it;
    /// - every table has `ceil(slotted / block_size)` entries and no more slotted tokens than
    ///   known tokens.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let fail = |msg: String| Err(InvariantViolation(msg));
        for (name, pool) in [("gpu", &self.storage.gpu), ("cpu", &self.storage.cpu)] {
            if let Err(e) = pool.check() {
                return fail(format!("{name} pool: {e}"));
            }
        }
        let mut gpu_refs = vec![0u32; self.storage.gpu.num_total()];
        let mut cpu_refs = vec![0u32; self.storage.cpu.num_total()];
        let bs = self.config.block_size;
        for (id, s) in self.seqs.iter() {
            if s.slotted() > s.tokens.len() || s.blocks.len() != s.slotted().div_ceil(bs) {
                return fail(format!(
                    "sequence {id}: {} slotted of {} tokens in {} blocks",
                    s.slotted(),
                    s.tokens.len(),
                    s.blocks.len()
                ));
            }
            if s.blocks[..s.released()].iter().any(|&b| b != RELEASED) {
                return fail(format!("sequence {id}: released block still named"));
            }
            if s.tail_writable
                && let Some(&tail) = s.blocks.last()
            {
                let tail = BlockId(tail);
                let pool = match s.location {
                    Location::Gpu => &self.storage.gpu,
                    Location::Cpu => &self.storage.cpu,
                };
                if tail.0 == RELEASED || pool.ref_count(tail) != 1 || pool.is_cached(tail) {
                    return fail(format!(
                        "sequence {id}: tail {tail} marked writable but is not"
                    ));
                }
            }
            let refs = match s.location {
                Location::Gpu => &mut gpu_refs,
                Location::Cpu => &mut cpu_refs,
            };
            for b in s.live_blocks() {
                match refs.get_mut(b.index()) {
                    Some(r) => *r += 1,
                    None => return fail(format!("sequence {id}: block {b} out of range")),
                }
            }
        }
        for (name, pool, refs) in [
            ("gpu", &self.storage.gpu, &gpu_refs),
            ("cpu", &self.storage.cpu, &cpu_refs),
        ] {
            for (i, &r) in refs.iter().enumerate() {
                let b = BlockId(i as u32);
                if pool.ref_count(b) != r {
                    return fail(format!(
                        "{name} block {b}: ref count {} but {r} tables hold it",
                        pool.ref_count(b)
                    ));
                }
            }
        }
        if let Some(cache) = &self.storage.cache {
            if let Err(e) = cache.check() {
                return fail(format!("prefix cache: {e}"));
            }
            for i in 0..self.storage.gpu.num_total() {
                let b = BlockId(i as u32);
                if self.storage.gpu.is_cached(b) != cache.is_cached(b) {
                    return fail(format!("block {b}: pool and prefix cache disagree"));
                }
            }
        }
        Ok(())
    }
}
