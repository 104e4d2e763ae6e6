//! Content-addressed cache of full blocks, for automatic prefix caching.
//!
//! A full block's key is a hash of (its parent block's key, its token ids); the first block of a
//! sequence hashes its namespace (a cache salt, a LoRA name) instead of a parent. Two prompts
//! therefore share block `i` only if they share all tokens up to the end of block `i` and the
//! namespace.
//!
//! The 64-bit hash only finds candidates. A hit is accepted only when the candidate's stored
//! token ids are equal to the block's, and its parent is the very block matched one step before
//! (same id and same *generation*, which is bumped whenever a block leaves the cache), and, for a
//! first block, the namespace strings are equal. By induction a hit therefore holds exactly the
//! tokens asked for after exactly the prefix asked for: a hash collision can cost a cache hit but
//! never returns a block with different content.

use std::sync::Arc;

use rustc_hash::FxHashMap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::BlockId;

/// A cache identity: a block id together with the generation of its cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockRef {
    pub(crate) block: BlockId,
    pub(crate) generation: u32,
}

/// The link of a sequence's full block into the cache chain: its hash and the cached block that
/// holds its content (the block itself, or an identical one registered first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChainLink {
    pub(crate) hash: u64,
    pub(crate) canonical: BlockRef,
}

#[derive(Debug, Clone)]
struct Entry {
    hash: u64,
    parent: Option<BlockRef>,
    /// Only for first blocks (`parent == None`).
    namespace: Option<Arc<str>>,
}

/// The outcome of [`PrefixCache::register`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Registration {
    /// The block now holds (or already held) the cache entry for this content.
    Cached(ChainLink),
    /// Another block already holds identical content; it stays the canonical copy.
    Duplicate(ChainLink),
    /// A different content owns this hash (a 64-bit collision): the chain cannot continue.
    Collision,
    /// The hash is held by an orphan: a block whose parent has left the cache, so nothing can
    /// reach it any more. The caller drops that block's entry and registers again.
    Orphan(BlockId),
}

/// Seed of a sequence's first block: the namespace, if any.
pub(crate) fn root_seed(namespace: Option<&str>) -> u64 {
    namespace.map_or(0, |ns| xxh3_64_with_seed(ns.as_bytes(), 1))
}

/// Hash of a full block, chained on its parent's hash (or the root seed).
pub(crate) fn block_hash(parent_hash: u64, tokens: &[u32]) -> u64 {
    // A block holds at most 64 tokens: hash their little-endian bytes from a stack buffer.
    let mut bytes = [0u8; 64 * 4];
    let n = tokens.len().min(64);
    for (chunk, t) in bytes.chunks_exact_mut(4).zip(&tokens[..n]) {
        chunk.copy_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(&bytes[..n * 4], parent_hash)
}

#[derive(Debug, Clone)]
pub(crate) struct PrefixCache {
    block_size: usize,
    map: FxHashMap<u64, BlockId>,
    entries: Vec<Option<Entry>>,
    generations: Vec<u32>,
    /// Token ids of every cached block, `block_size` per block.
    tokens: Vec<u32>,
}

impl PrefixCache {
    pub(crate) fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            map: FxHashMap::default(),
            entries: vec![None; num_blocks],
            generations: vec![0; num_blocks],
            tokens: vec![0; num_blocks * block_size],
        }
    }

    pub(crate) fn block_ref(&self, block: BlockId) -> BlockRef {
        BlockRef {
            block,
            generation: self.generations[block.index()],
        }
    }

    fn stored_tokens(&self, block: BlockId) -> &[u32] {
        let start = block.index() * self.block_size;
        &self.tokens[start..start + self.block_size]
    }

    fn matches(
        &self,
        block: BlockId,
        parent: Option<ChainLink>,
        tokens: &[u32],
        namespace: Option<&str>,
    ) -> bool {
        let Some(entry) = &self.entries[block.index()] else {
            return false;
        };
        entry.parent == parent.map(|p| p.canonical)
            && (parent.is_some() || entry.namespace.as_deref() == namespace)
            && self.stored_tokens(block) == tokens
    }

    /// The cached block holding `tokens` right after the prefix ending in `parent`.
    pub(crate) fn lookup(
        &self,
        parent: Option<ChainLink>,
        tokens: &[u32],
        namespace: Option<&str>,
    ) -> Option<ChainLink> {
        let seed = parent.map_or_else(|| root_seed(namespace), |p| p.hash);
        let hash = block_hash(seed, tokens);
        let &block = self.map.get(&hash)?;
        self.matches(block, parent, tokens, namespace)
            .then(|| ChainLink {
                hash,
                canonical: self.block_ref(block),
            })
    }

    /// Registers `block`, which holds `tokens` after the prefix ending in `parent`.
    pub(crate) fn register(
        &mut self,
        block: BlockId,
        parent: Option<ChainLink>,
        tokens: &[u32],
        namespace: Option<&Arc<str>>,
    ) -> Registration {
        let ns = namespace.map(|n| &**n);
        let seed = parent.map_or_else(|| root_seed(ns), |p| p.hash);
        let hash = block_hash(seed, tokens);
        if let Some(&owner) = self.map.get(&hash) {
            let link = ChainLink {
                hash,
                canonical: self.block_ref(owner),
            };
            return if owner == block {
                Registration::Cached(link)
            } else if self.matches(owner, parent, tokens, ns) {
                Registration::Duplicate(link)
            } else if self.is_orphan(owner) {
                Registration::Orphan(owner)
            } else {
                Registration::Collision
            };
        }
        if self.entries[block.index()].is_some() {
            // The block is cached under another key: its content belongs to another chain.
            return Registration::Collision;
        }
        self.map.insert(hash, block);
        self.entries[block.index()] = Some(Entry {
            hash,
            parent: parent.map(|p| p.canonical),
            namespace: if parent.is_none() {
                namespace.cloned()
            } else {
                None
            },
        });
        let start = block.index() * self.block_size;
        self.tokens[start..start + self.block_size].copy_from_slice(tokens);
        Registration::Cached(ChainLink {
            hash,
            canonical: self.block_ref(block),
        })
    }

    /// Drops the block's cache entry, if any, and starts a new generation for it so that every
    /// chain link naming the old content stops matching.
    pub(crate) fn uncache(&mut self, block: BlockId) {
        if let Some(entry) = self.entries[block.index()].take() {
            if self.map.get(&entry.hash) == Some(&block) {
                self.map.remove(&entry.hash);
            }
            self.generations[block.index()] = self.generations[block.index()].wrapping_add(1);
        }
    }

    /// Whether the block's cached parent has since left the cache.
    fn is_orphan(&self, block: BlockId) -> bool {
        matches!(&self.entries[block.index()],
            Some(Entry { parent: Some(p), .. }) if self.generations[p.block.index()] != p.generation)
    }

    pub(crate) fn is_cached(&self, block: BlockId) -> bool {
        self.entries[block.index()].is_some()
    }

    pub(crate) fn num_cached(&self) -> usize {
        self.map.len()
    }

    /// Checks that the hash map and the per-block entries agree.
    pub(crate) fn check(&self) -> Result<(), String> {
        for (&hash, &block) in &self.map {
            match &self.entries[block.index()] {
                Some(e) if e.hash == hash => {}
                other => return Err(format!("map {hash:#x} -> block {block}, entry {other:?}")),
            }
        }
        let num_entries = self.entries.iter().filter(|e| e.is_some()).count();
        if num_entries != self.map.len() {
            return Err(format!(
                "{num_entries} cache entries but {} map keys",
                self.map.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_parent_tokens_and_namespace() {
        let t = [1, 2, 3, 4];
        assert_ne!(block_hash(0, &t), block_hash(1, &t));
        assert_ne!(block_hash(0, &t), block_hash(0, &[1, 2, 3, 5]));
        assert_ne!(root_seed(None), root_seed(Some("tenant-a")));
        assert_ne!(root_seed(Some("a")), root_seed(Some("b")));
        assert_eq!(block_hash(7, &t), block_hash(7, &t));
    }

    #[test]
    fn forged_hash_entry_is_rejected_by_content_check() {
        let mut cache = PrefixCache::new(2, 4);
        let link = match cache.register(BlockId(0), None, &[1, 2, 3, 4], None) {
            Registration::Cached(link) => link,
            other => panic!("{other:?}"),
        };
        // Simulate a collision: a different token block that maps to the same hash.
        let forged = block_hash(root_seed(None), &[9, 9, 9, 9]);
        cache.map.insert(forged, BlockId(0));
        assert_eq!(cache.lookup(None, &[9, 9, 9, 9], None), None);
        assert_eq!(cache.lookup(None, &[1, 2, 3, 4], None), Some(link));
        // A namespace mismatch on a first block is a miss even with equal tokens.
        assert_eq!(cache.lookup(None, &[1, 2, 3, 4], Some("x")), None);
    }

    #[test]
    fn uncache_bumps_generation_and_orphans_children() {
        let mut cache = PrefixCache::new(3, 2);
        let Registration::Cached(root) = cache.register(BlockId(0), None, &[1, 2], None) else {
            panic!()
        };
        let Registration::Cached(child) = cache.register(BlockId(1), Some(root), &[3, 4], None)
        else {
            panic!()
        };
        assert_eq!(cache.lookup(Some(root), &[3, 4], None), Some(child));
        cache.uncache(BlockId(0));
        // Same content re-registered in the same block id: the generation differs, so the old
        // child (whose parent link names generation 0) must not match.
        let Registration::Cached(root2) = cache.register(BlockId(0), None, &[1, 2], None) else {
            panic!()
        };
        assert_ne!(root2.canonical, root.canonical);
        assert_eq!(cache.lookup(Some(root2), &[3, 4], None), None);
        // Registering the same content again finds the orphan and asks for its removal.
        assert_eq!(
            cache.register(BlockId(2), Some(root2), &[3, 4], None),
            Registration::Orphan(BlockId(1))
        );
        cache.uncache(BlockId(1));
        assert!(matches!(
            cache.register(BlockId(2), Some(root2), &[3, 4], None),
            Registration::Cached(_)
        ));
        cache.check().unwrap();
    }
}
