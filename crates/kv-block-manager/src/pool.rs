//! A fixed pool of physical blocks with reference counts.
//!
//! Key properties:
//! - Each block is in exactly one state: free (no content worth keeping), in use (reference count
//!   above zero) or evictable (count zero, but its content is in the prefix cache).
//! - Free blocks sit on a stack (`Vec`), evictable ones on an intrusive doubly linked LRU list
//!   threaded through two index arrays: allocate, release, revive and evict are all O(1) and never
//!   allocate memory.
//! - Allocation prefers free blocks; it evicts the least recently released cached block only
//!   when no free block is left.

use crate::BlockId;

const NIL: u32 = u32::MAX;

/// The state of one physical block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// Not referenced, content irrelevant, on the free stack.
    Free,
    /// Referenced by at least one block table.
    InUse,
    /// Not referenced, content cached, on the LRU list.
    Evictable,
}

/// A block handed out by [`BlockPool::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Allocation {
    pub(crate) block: BlockId,
    /// The block was taken from the evictable list: its cache entry must be dropped.
    pub(crate) evicted: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct BlockPool {
    ref_counts: Vec<u32>,
    states: Vec<BlockState>,
    /// Whether the block's content is registered in the prefix cache.
    cached: Vec<bool>,
    prev: Vec<u32>,
    next: Vec<u32>,
    free: Vec<u32>,
    lru_head: u32,
    lru_tail: u32,
    num_evictable: usize,
}

impl BlockPool {
    pub(crate) fn new(num_blocks: usize) -> Self {
        // Config validation keeps num_blocks below i32::MAX, so ids fit in u32 and never hit NIL.
        let ids = 0..u32::try_from(num_blocks).unwrap_or(NIL - 1);
        Self {
            ref_counts: vec![0; num_blocks],
            states: vec![BlockState::Free; num_blocks],
            cached: vec![false; num_blocks],
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            // Reversed so that block 0 is handed out first: allocation order is easy to read in tests.
            free: ids.rev().collect(),
            lru_head: NIL,
            lru_tail: NIL,
            num_evictable: 0,
        }
    }

    pub(crate) fn num_total(&self) -> usize {
        self.states.len()
    }

    pub(crate) fn num_free(&self) -> usize {
        self.free.len()
    }

    pub(crate) fn num_evictable(&self) -> usize {
        self.num_evictable
    }

    pub(crate) fn num_in_use(&self) -> usize {
        self.num_total() - self.num_free() - self.num_evictable
    }

    /// Blocks an allocation can get: free plus evictable.
    pub(crate) fn num_available(&self) -> usize {
        self.free.len() + self.num_evictable
    }

    pub(crate) fn contains(&self, block: BlockId) -> bool {
        block.index() < self.states.len()
    }

    pub(crate) fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block.index()]
    }

    pub(crate) fn state(&self, block: BlockId) -> BlockState {
        self.states[block.index()]
    }

    pub(crate) fn is_cached(&self, block: BlockId) -> bool {
        self.cached[block.index()]
    }

    /// Takes a free block, or else evicts the least recently released cached one.
    pub(crate) fn allocate(&mut self) -> Option<Allocation> {
        let (index, evicted) = if let Some(index) = self.free.pop() {
            (index, false)
        } else if self.lru_head != NIL {
            let index = self.lru_head;
            self.unlink(index);
            self.cached[index as usize] = false;
            (index, true)
        } else {
            return None;
        };
        let i = index as usize;
        self.states[i] = BlockState::InUse;
        self.ref_counts[i] = 1;
        Some(Allocation {
            block: BlockId(index),
            evicted,
        })
    }

    /// Adds a reference; an evictable block comes back into use.
    pub(crate) fn retain(&mut self, block: BlockId) {
        let i = block.index();
        match self.states[i] {
            BlockState::InUse => {}
            BlockState::Evictable => {
                self.unlink(block.0);
                self.states[i] = BlockState::InUse;
            }
            BlockState::Free => {
                debug_assert!(false, "retain of free block {block}");
                return;
            }
        }
        self.ref_counts[i] += 1;
    }

    /// Drops a reference. At zero the block becomes evictable (cached) or free.
    pub(crate) fn release(&mut self, block: BlockId) {
        let i = block.index();
        debug_assert_eq!(
            self.states[i],
            BlockState::InUse,
            "release of unused block {block}"
        );
        if self.states[i] != BlockState::InUse {
            return;
        }
        self.ref_counts[i] -= 1;
        if self.ref_counts[i] > 0 {
            return;
        }
        if self.cached[i] {
            self.states[i] = BlockState::Evictable;
            self.push_lru_tail(block.0);
        } else {
            self.states[i] = BlockState::Free;
            self.free.push(block.0);
        }
    }

    /// Marks an in-use block as holding (or no longer holding) cached content.
    pub(crate) fn set_cached(&mut self, block: BlockId, cached: bool) {
        debug_assert_eq!(self.states[block.index()], BlockState::InUse);
        self.cached[block.index()] = cached;
    }

    /// Drops a block's cached status: an evictable block becomes free, an in-use one stays in use.
    pub(crate) fn forget_cached(&mut self, block: BlockId) {
        let i = block.index();
        self.cached[i] = false;
        if self.states[i] == BlockState::Evictable {
            self.unlink(block.0);
            self.states[i] = BlockState::Free;
            self.free.push(block.0);
        }
    }

    fn unlink(&mut self, index: u32) {
        let i = index as usize;
        let (prev, next) = (self.prev[i], self.next[i]);
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.next[prev as usize] = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.prev[next as usize] = prev;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.num_evictable -= 1;
    }

    fn push_lru_tail(&mut self, index: u32) {
        let i = index as usize;
        self.prev[i] = self.lru_tail;
        self.next[i] = NIL;
        if self.lru_tail == NIL {
            self.lru_head = index;
        } else {
            self.next[self.lru_tail as usize] = index;
        }
        self.lru_tail = index;
        self.num_evictable += 1;
    }

    /// The evictable blocks, least recently released first.
    pub(crate) fn lru_order(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut cursor = self.lru_head;
        std::iter::from_fn(move || {
            if cursor == NIL {
                return None;
            }
            let block = BlockId(cursor);
            cursor = self.next[cursor as usize];
            Some(block)
        })
    }

    /// Checks the pool's own bookkeeping (not the reference counts, which the manager checks
    /// against the block tables).
    pub(crate) fn check(&self) -> Result<(), String> {
        let lru: Vec<BlockId> = self.lru_order().take(self.num_total() + 1).collect();
        if lru.len() != self.num_evictable {
            return Err(format!(
                "LRU list has {} blocks, counter says {}",
                lru.len(),
                self.num_evictable
            ));
        }
        let mut seen = vec![0u8; self.num_total()];
        for &b in &self.free {
            seen[b as usize] += 1;
        }
        for b in &lru {
            seen[b.index()] += 2;
        }
        for (i, &state) in self.states.iter().enumerate() {
            let (rc, cached) = (self.ref_counts[i], self.cached[i]);
            let ok = match state {
                BlockState::Free => rc == 0 && !cached && seen[i] == 1,
                BlockState::Evictable => rc == 0 && cached && seen[i] == 2,
                BlockState::InUse => rc > 0 && seen[i] == 0,
            };
            if !ok {
                return Err(format!(
                    "block {i}: state {state:?}, ref count {rc}, cached {cached}, listed {}",
                    seen[i]
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_free_blocks_before_evicting() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate().unwrap();
        assert_eq!(
            a,
            Allocation {
                block: BlockId(0),
                evicted: false
            }
        );
        pool.set_cached(a.block, true);
        pool.release(a.block);
        assert_eq!(pool.state(a.block), BlockState::Evictable);
        let b = pool.allocate().unwrap();
        let c = pool.allocate().unwrap();
        assert!(!b.evicted && !c.evicted);
        let d = pool.allocate().unwrap();
        assert_eq!(
            d,
            Allocation {
                block: BlockId(0),
                evicted: true
            }
        );
        assert!(pool.allocate().is_none());
        pool.check().unwrap();
    }

    #[test]
    fn lru_evicts_least_recently_released_and_revives() {
        let mut pool = BlockPool::new(4);
        let blocks: Vec<_> = (0..4).map(|_| pool.allocate().unwrap().block).collect();
        for &b in &blocks {
            pool.set_cached(b, true);
        }
        for &b in &[blocks[2], blocks[0], blocks[3], blocks[1]] {
            pool.release(b);
        }
        pool.retain(blocks[0]);
        assert_eq!(
            pool.lru_order().collect::<Vec<_>>(),
            vec![blocks[2], blocks[3], blocks[1]]
        );
        assert_eq!(pool.num_evictable(), 3);
        assert_eq!(pool.allocate().unwrap().block, blocks[2]);
        pool.check().unwrap();
    }
}
