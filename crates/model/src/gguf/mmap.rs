//! Read-only file bytes, memory-mapped: the crate's one use of `unsafe`.
//!
//! Both weight loaders (GGUF and safetensors) map their files through [`FileBytes::open`];
//! tests and fuzzers hand in owned bytes with [`FileBytes::from_vec`].
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::path::Path;

use memmap2::Mmap;

/// The bytes of a whole file: memory-mapped, or owned.
pub(crate) enum FileBytes {
    /// A read-only map of a file.
    Mapped(Mmap),
    /// Bytes in memory (tests, fuzzing, files handed over by the caller).
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps the file at `path` read-only.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: `Mmap::map` is unsafe because the mapped bytes may change under us if the file
        // is modified (or truncated, which turns reads into SIGBUS) while it is mapped; Rust
        // assumes a `&[u8]` never changes. Weight files are immutable inputs of the server: the
        // contract of `GgufFile::open` / `SafetensorsDir::open` (documented there) is that the
        // file must not be modified or truncated while it is open. The model fetcher respects it
        // by replacing files with an atomic rename (the old inode stays intact) and never
        // writing into a published file. The map is read-only, so we never write through it.
        let map = unsafe { Mmap::map(&file)? };
        Ok(Self::Mapped(map))
    }

    /// Wraps bytes already in memory.
    pub(crate) fn from_vec(bytes: Vec<u8>) -> Self {
        Self::Owned(bytes)
    }
}

impl Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned(bytes) => bytes,
        }
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Self::Mapped(_) => "Mapped",
            Self::Owned(_) => "Owned",
        };
        write!(f, "FileBytes::{kind}({} bytes)", self.len())
    }
}
