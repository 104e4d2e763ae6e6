//! Weight tensor element types, including the GGML block-quantized formats.
//!
//! Shapes follow GGML: `dims[0]` is the contiguous (innermost) dimension. A weight matrix of a
//! linear layer `y = W x` with `in` inputs and `out` outputs has `dims = [in, out]`: row `r`
//! (output `r`) is `in` contiguous elements.

use std::fmt;

/// Element type of a tensor. Quantized types store blocks of [`DType::block_len`] elements in
/// [`DType::block_bytes`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// GGML Q8_0: blocks of 32 as `f16 d` + 32 `i8`; `x = d * q`.
    Q8_0,
    /// GGML Q4_0: blocks of 32 as `f16 d` + 16 bytes of nibbles; `x = d * (q - 8)`.
    Q4_0,
    /// GGML Q4_1: blocks of 32 as `f16 d`, `f16 m` + 16 bytes of nibbles; `x = d * q + m`.
    Q4_1,
    /// GGML Q4_K: super-blocks of 256 (144 bytes).
    Q4K,
    /// GGML Q6_K: super-blocks of 256 (210 bytes).
    Q6K,
}

impl DType {
    /// The GGML type id of this type (as stored in GGUF tensor infos).
    pub fn ggml_type(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 8,
            DType::Q4K => 12,
            DType::Q6K => 14,
            DType::BF16 => 30,
        }
    }

    /// The type with GGML type id `id`, if supported.
    pub fn from_ggml_type(id: u32) -> Option<Self> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            12 => DType::Q4K,
            14 => DType::Q6K,
            30 => DType::BF16,
            _ => return None,
        })
    }

    /// Elements per block (1 for plain types).
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => 32,
            DType::Q4K | DType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q4K => 144,
            DType::Q6K => 210,
        }
    }

    /// Bytes of a row of `len` elements, or `None` if `len` is not a whole number of blocks
    /// (or the size overflows).
    pub fn row_bytes(self, len: usize) -> Option<usize> {
        if !len.is_multiple_of(self.block_len()) {
            return None;
        }
        (len / self.block_len()).checked_mul(self.block_bytes())
    }

    /// Whether the type is block-quantized.
    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q4K => "Q4_K",
            DType::Q6K => "Q6_K",
        };
        f.write_str(name)
    }
}
