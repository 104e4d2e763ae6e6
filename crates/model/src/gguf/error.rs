//! The errors of the GGUF reader.

use std::io;
use std::path::PathBuf;

use super::GgufValue;

/// Why a GGUF file could not be read, or a tensor could not be returned.
///
/// Offsets are byte offsets from the start of the file, pointing at the item that is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read GGUF file {path:?}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file ends inside an item.
    #[error(
        "GGUF file truncated at offset {offset}: {what} needs {needed} bytes, {available} left"
    )]
    Truncated {
        /// Offset of the item.
        offset: u64,
        /// What was being read.
        what: &'static str,
        /// Bytes the item needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file: magic is {got:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The first four bytes.
        got: [u8; 4],
    },
    /// A big-endian GGUF file (only little-endian files are supported).
    #[error("big-endian GGUF files (version {version}) are not supported")]
    BigEndian {
        /// The version, read big-endian.
        version: u32,
    },
    /// A GGUF version other than 2 or 3.
    #[error("unsupported GGUF version {got} (expected 2 or 3)")]
    UnsupportedVersion {
        /// The version in the header.
        got: u32,
    },
    /// A metadata value type id that GGUF does not define.
    #[error("metadata key {key:?} at offset {offset}: unknown value type {got}")]
    BadValueType {
        /// Offset of the type id.
        offset: u64,
        /// The key whose value it is.
        key: String,
        /// The type id.
        got: u32,
    },
    /// A bool that is neither 0 nor 1.
    #[error("metadata key {key:?} at offset {offset}: invalid bool byte {got}")]
    InvalidBool {
        /// Offset of the byte.
        offset: u64,
        /// The key whose value it is.
        key: String,
        /// The byte.
        got: u8,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`](super::MAX_ARRAY_DEPTH).
    #[error("metadata key {key:?} at offset {offset}: arrays nested deeper than {max_depth}")]
    ArrayTooDeep {
        /// Offset of the innermost array header.
        offset: u64,
        /// The key whose value it is.
        key: String,
        /// The nesting limit.
        max_depth: usize,
    },
    /// A string or array length larger than the bytes left in the file could hold.
    #[error(
        "{what} at offset {offset}{}: length {len} cannot fit in the {remaining} bytes left",
        key.as_deref().map(|k| format!(" (key {k:?})")).unwrap_or_default()
    )]
    LengthTooLarge {
        /// Offset of the length field.
        offset: u64,
        /// What the length is of (`"string"`, `"array"`).
        what: &'static str,
        /// The metadata key being read, if any.
        key: Option<String>,
        /// The length read.
        len: u64,
        /// Bytes left after the length field.
        remaining: u64,
    },
    /// A tensor or metadata count larger than the file could hold.
    #[error("{what} count {count} is larger than the file could hold (at most {max})")]
    CountTooLarge {
        /// `"tensor"` or `"metadata key"`.
        what: &'static str,
        /// The count in the header.
        count: u64,
        /// The most the remaining bytes could hold.
        max: u64,
    },
    /// More metadata values (array elements included) than
    /// [`MAX_METADATA_VALUES`](super::MAX_METADATA_VALUES).
    #[error("metadata key {key:?} at offset {offset}: more than {limit} metadata values in all")]
    TooManyValues {
        /// Offset of the array header that went over.
        offset: u64,
        /// The key being read.
        key: String,
        /// The limit.
        limit: usize,
    },
    /// The same metadata key twice.
    #[error("metadata key {key:?} appears twice (second at offset {offset})")]
    DuplicateKey {
        /// Offset of the second occurrence.
        offset: u64,
        /// The key.
        key: String,
    },
    /// `general.alignment` is not a non-zero power of two that fits in `usize`.
    #[error("general.alignment must be a non-zero power of two, got {value:?}")]
    BadAlignment {
        /// The value found.
        value: GgufValue,
    },
    /// A tensor with more than four dimensions.
    #[error("tensor {tensor:?} at offset {offset}: {n_dims} dimensions (at most {max})")]
    TooManyDims {
        /// Offset of the dimension count.
        offset: u64,
        /// The tensor.
        tensor: String,
        /// The dimension count.
        n_dims: u32,
        /// The limit (4).
        max: u32,
    },
    /// The same tensor name twice.
    #[error("tensor {tensor:?} appears twice (second at offset {offset})")]
    DuplicateTensor {
        /// Offset of the second tensor info.
        offset: u64,
        /// The tensor.
        tensor: String,
    },
    /// The element count or byte size of a tensor overflows.
    #[error("tensor {tensor:?}: size of dims {dims:?} overflows")]
    SizeOverflow {
        /// The tensor.
        tensor: String,
        /// Its dims.
        dims: Vec<u64>,
    },
    /// The contiguous dimension of a block-quantized tensor is not a whole number of blocks.
    #[error(
        "tensor {tensor:?} (ggml type {ggml_type}): dims[0] = {dim0} is not a multiple of the block length {block_len}"
    )]
    NotBlockMultiple {
        /// The tensor.
        tensor: String,
        /// Its GGML type id.
        ggml_type: u32,
        /// Its contiguous dimension.
        dim0: u64,
        /// The block length of its type.
        block_len: u64,
    },
    /// A tensor offset that is not a multiple of the file's alignment.
    #[error(
        "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        /// The tensor.
        tensor: String,
        /// Its offset, relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// Tensor data that runs past the end of the file.
    #[error(
        "tensor {tensor:?}: data bytes {start}..{end} run past the end of the file ({file_len} bytes)"
    )]
    TensorOutOfBounds {
        /// The tensor.
        tensor: String,
        /// Absolute start of its data (saturated at `u64::MAX`).
        start: u64,
        /// Absolute end of its data (saturated at `u64::MAX`).
        end: u64,
        /// File length.
        file_len: u64,
    },
    /// Two tensors whose data overlap.
    #[error("tensors {first:?} and {second:?} overlap")]
    OverlappingTensors {
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
    },
    /// A tensor of a GGML type kvserve does not support (the file itself is fine).
    #[error("tensor {tensor:?} has unsupported ggml type {ggml_type}")]
    UnsupportedTensorType {
        /// The tensor.
        tensor: String,
        /// Its GGML type id.
        ggml_type: u32,
    },
    /// No tensor of that name.
    #[error("no tensor named {name:?}")]
    TensorNotFound {
        /// The name asked for.
        name: String,
    },
}
