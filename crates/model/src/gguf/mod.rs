//! GGUF files: metadata and tensors, memory-mapped.
//!
//! [`GgufFile::open`] maps a file read-only and parses its header (GGUF v2 and v3,
//! little-endian): metadata into typed [`GgufValue`]s, tensor infos, alignment and the place of
//! the data section. Tensor data is never copied: [`GgufFile::tensor`] returns a
//! [`TensorView`] borrowing the tensor's bytes from the map.
//!
//! All input is treated as hostile. Every length and count is checked against the bytes left
//! before anything is allocated for it, every tensor must lie inside the file, aligned and
//! without overlapping another, and every failure is a typed [`GgufError`], never a panic.
//! Tensors of GGML types kvserve does not support stay listed in [`GgufFile::tensor_infos`];
//! only asking for one with [`GgufFile::tensor`] fails.
//!
//! ```no_run
//! use model::gguf::GgufFile;
//!
//! let file = GgufFile::open("model.gguf".as_ref())?;
//! let layers = file.get_u64("llama.block_count");
//! let wq = file.tensor("blk.0.attn_q.weight")?;
//! println!("{layers:?} layers; {} is {} {:?}, {} bytes", wq.name, wq.dtype, wq.dims, wq.bytes.len());
//! # Ok::<(), model::gguf::GgufError>(())
//! ```

mod error;
pub(crate) mod mmap;
mod parse;
mod value;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::Path;

pub use error::GgufError;
pub use value::GgufValue;

use crate::DType;
use mmap::FileBytes;

/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// Most dimensions a tensor may have.
pub const MAX_DIMS: u32 = 4;

/// Deepest nesting of metadata arrays (an array of scalars has depth 1).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Most metadata values (keys plus array elements, nested ones included) a file may hold.
///
/// Each value takes 32 bytes in memory however few it takes in the file, so this bounds the
/// memory a hostile file can make the reader use (about 512 MiB). Real files hold far fewer:
/// a 256k-token vocabulary with scores, token types and merges is about a million.
pub const MAX_METADATA_VALUES: usize = 1 << 24;

/// A GGUF file: parsed header plus the mapped bytes.
///
/// The file must not be modified or truncated while a `GgufFile` maps it (see
/// [`GgufFile::open`]).
pub struct GgufFile {
    bytes: FileBytes,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: usize,
    data_offset: usize,
}

/// Where one tensor is and what it holds, as the file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    offset: u64,
    n_elements: u64,
    n_bytes: Option<u64>,
    /// Absolute byte range in the file; `Some` exactly when the layout of the type is known.
    range: Option<Range<usize>>,
}

impl TensorInfo {
    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its dimensions, GGML order (`dims[0]` is contiguous); at most [`MAX_DIMS`].
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    /// Its GGML type id, as stored.
    pub fn ggml_type(&self) -> u32 {
        self.ggml_type
    }

    /// Its element type, if kvserve supports the GGML type.
    pub fn dtype(&self) -> Option<DType> {
        DType::from_ggml_type(self.ggml_type)
    }

    /// Offset of its data from the start of the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of elements (product of the dims).
    pub fn n_elements(&self) -> u64 {
        self.n_elements
    }

    /// Size of its data in bytes, if the layout of its GGML type is known (all types ggml
    /// stores in files, supported by kvserve or not).
    pub fn n_bytes(&self) -> Option<u64> {
        self.n_bytes
    }
}

/// A tensor's data, borrowed from the file it lives in.
#[derive(Clone, PartialEq, Eq)]
pub struct TensorView<'a> {
    /// The tensor's name in its file.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Dimensions, GGML order: `dims[0]` is contiguous; a linear layer with `in` inputs and
    /// `out` outputs has `[in, out]`.
    pub dims: Vec<usize>,
    /// Exactly the tensor's bytes. Not necessarily aligned to the element type beyond what
    /// the file guarantees (GGUF: the file's alignment from the start of the map).
    pub bytes: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements (product of the dims).
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

impl fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorView")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("dims", &self.dims)
            .field("bytes", &format_args!("[{} bytes]", self.bytes.len()))
            .finish()
    }
}

impl GgufFile {
    /// Maps the file at `path` read-only and parses its header.
    ///
    /// The file must not be modified or truncated while the returned `GgufFile` (or any
    /// [`TensorView`] from it) is alive: its bytes are read straight from the map. Replace
    /// model files by renaming a new file over them, as the fetcher does.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let bytes = FileBytes::open(path).map_err(|source| GgufError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(bytes)
    }

    /// Parses a GGUF file held in memory (tests, fuzzing, bytes from elsewhere).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(FileBytes::from_vec(bytes))
    }

    fn parse(bytes: FileBytes) -> Result<Self, GgufError> {
        let header = parse::parse(&bytes)?;
        Ok(Self {
            bytes,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name: header.by_name,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `key` as an unsigned integer (any non-negative integer type).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// `key` as a `u32` (any non-negative integer type that fits).
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key)?.as_u32()
    }

    /// `key` as a float (any float or integer type).
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    /// `key` as a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// `key` as an array.
    pub fn get_array(&self, key: &str) -> Option<&[GgufValue]> {
        self.get(key)?.as_array()
    }

    /// `general.architecture` (e.g. `"llama"`), the prefix of the model's hyperparameter keys.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// The alignment of tensor data (`general.alignment`, default [`DEFAULT_ALIGNMENT`]).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Offset of the data section from the start of the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Length of the whole file in bytes.
    pub fn file_len(&self) -> usize {
        self.bytes.len()
    }

    /// All tensor infos, in file order, unsupported types included.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The tensor `name`, borrowing its bytes from the file.
    ///
    /// Fails if there is no such tensor or its GGML type is not supported by kvserve.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::TensorNotFound {
                name: name.to_owned(),
            })?;
        let unsupported = || GgufError::UnsupportedTensorType {
            tensor: info.name.clone(),
            ggml_type: info.ggml_type,
        };
        let dtype = info.dtype().ok_or_else(unsupported)?;
        // The parser filled in the range of every tensor of a known layout and checked it
        // against the file; the checks below cannot fail, but must not panic either.
        let out_of_bounds = || GgufError::TensorOutOfBounds {
            tensor: info.name.clone(),
            start: info.range.as_ref().map_or(u64::MAX, |r| r.start as u64),
            end: info.range.as_ref().map_or(u64::MAX, |r| r.end as u64),
            file_len: self.bytes.len() as u64,
        };
        let bytes = info
            .range
            .clone()
            .and_then(|r| self.bytes.get(r))
            .ok_or_else(out_of_bounds)?;
        let dims = info
            .dims
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| GgufError::SizeOverflow {
                tensor: info.name.clone(),
                dims: info.dims.clone(),
            })?;
        Ok(TensorView {
            name: &info.name,
            dtype,
            dims,
            bytes,
        })
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("architecture", &self.architecture())
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("bytes", &self.bytes)
            .finish()
    }
}
