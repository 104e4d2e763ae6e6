//! The crate's single error type.

/// Everything that can go wrong in `kv-quant`.
///
/// Every public function validates its arguments and returns one of these
/// instead of panicking. Variants carry the offending values as structured
/// fields so callers can react (or log) without parsing messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvQuantError {
    /// A dtype string did not name a known KV-cache dtype.
    #[error(
        "unknown KV-cache dtype {input:?}; expected one of: fp16, bf16, int8, int4, \
         int4-g32, int4-g64, int4-g128, fp8 (= fp8_e4m3), fp8_e5m2"
    )]
    UnknownDtype {
        /// The string that failed to parse.
        input: String,
    },

    /// An int4 group size other than 32, 64 or 128 was requested.
    #[error(
        "unsupported int4 group size {group_size}; supported: 32, 64, 128 \
         (or plain \"int4\" for one group per head, i.e. group size = head_dim)"
    )]
    UnsupportedGroupSize {
        /// The requested group size.
        group_size: usize,
    },

    /// A per-block dtype tag did not name a known dtype.
    #[error("unknown KV-cache dtype tag {tag}; known tags are 0..={max}")]
    UnknownDtypeTag {
        /// The tag that was read.
        tag: u8,
        /// The largest tag this version knows.
        max: u8,
    },

    /// A layout dimension was zero.
    #[error("{field} must be at least 1, got 0")]
    ZeroDimension {
        /// Which dimension (`"block_size"`, `"num_kv_heads"` or `"head_dim"`).
        field: &'static str,
    },

    /// `head_dim` is not a multiple of the int4 group size.
    #[error("head_dim {head_dim} is not a multiple of the int4 group size {group_size}")]
    HeadDimNotMultipleOfGroup {
        /// The head dimension.
        head_dim: usize,
        /// The resolved int4 group size.
        group_size: usize,
    },

    /// The resolved int4 group size is odd (only possible with plain `int4`
    /// and an odd `head_dim`): two 4-bit values share a byte, so a group must
    /// hold an even number of channels.
    #[error(
        "int4 group size {group_size} is odd; two 4-bit values share a byte, \
         so a group must have an even number of channels"
    )]
    OddInt4Group {
        /// The resolved (odd) group size.
        group_size: usize,
    },

    /// One block of this geometry would exceed [`MAX_KV_BLOCK_BYTES`](crate::MAX_KV_BLOCK_BYTES)
    /// (kernels compute in-block offsets in 32-bit signed integers).
    #[error(
        "layout too large: one K or V block of block_size {block_size}, num_kv_heads \
         {num_kv_heads}, head_dim {head_dim} would exceed {max} bytes"
    )]
    LayoutTooLarge {
        /// Slots per block.
        block_size: usize,
        /// KV heads.
        num_kv_heads: usize,
        /// Channels per head.
        head_dim: usize,
        /// The limit in bytes.
        max: usize,
    },

    /// A slice argument has the wrong length.
    #[error("{what}: expected length {expected}, got {got}")]
    LengthMismatch {
        /// Which argument (`"block"`, `"x"`, `"out"`, `"q"` or `"acc"`).
        what: &'static str,
        /// The length the layout requires.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },

    /// A slot index is not below `block_size`.
    #[error("slot {slot} out of range for block_size {block_size}")]
    SlotOutOfRange {
        /// The slot that was passed.
        slot: usize,
        /// Slots per block.
        block_size: usize,
    },

    /// A slot range is reversed or extends past `block_size`.
    #[error("slot range {start}..{end} is not within 0..{block_size}")]
    SlotRangeOutOfRange {
        /// Range start.
        start: usize,
        /// Range end (exclusive).
        end: usize,
        /// Slots per block.
        block_size: usize,
    },

    /// A KV-head index is not below `num_kv_heads`.
    #[error("kv head {head} out of range for num_kv_heads {num_kv_heads}")]
    HeadOutOfRange {
        /// The head that was passed.
        head: usize,
        /// KV heads in the layout.
        num_kv_heads: usize,
    },
}
