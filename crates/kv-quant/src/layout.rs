//! The byte layout of one KV-cache block: the contract between this crate,
//! the engine's block pool and the (CPU and CUDA) attention kernels.
//!
//! # Caches and blocks
//!
//! K and V live in **separate caches**: for every layer and every block id
//! there is one K block and one V block, both with the layout described here
//! (the codecs do not care which is which; [`dot_k`](crate::dot_k) is meant
//! for K blocks and [`axpy_v`](crate::axpy_v) for V blocks).
//! [`bytes_per_block`] is the K + V size of one block id for **one layer**;
//! the engine multiplies by `num_layers` to size its pool from a memory
//! budget.
//!
//! # One block
//!
//! A block holds `block_size` token slots for all `num_kv_heads` heads of one
//! layer. All multi-byte numbers are little-endian. Offsets are from the
//! start of the block:
//!
//! ```text
//! offset 0                      values   [num_kv_heads][block_size][value_row_bytes]
//! (pad to SECTION_ALIGN = 16)
//! scale_section_offset()        scales   [num_kv_heads][block_size][scale_row_bytes]   (empty for fp16/bf16)
//! (pad to SECTION_ALIGN = 16)
//! kv_block_bytes()
//! ```
//!
//! * **Values are head-major**: the `block_size` slots of one kv head are one
//!   contiguous chunk, so a kernel CTA (or CPU thread) that owns one kv head
//!   streams one contiguous range per block.
//!   `value_offset(head, slot) = (head * block_size + slot) * value_row_bytes`.
//! * **Scales are inline**, after the values, in the same order:
//!   `scale_offset(head, slot) = scale_section_offset + (head * block_size + slot) * scale_row_bytes`.
//! * Both sections start at a multiple of [`SECTION_ALIGN`] (16 bytes, one
//!   128-bit load), and the block size is padded to a multiple of it, so if
//!   the pool aligns block bases to 16 bytes (it should; 256 is better), every
//!   section is 16-byte aligned. A `(head, slot)` row is itself 16-byte
//!   aligned when `value_row_bytes` is a multiple of 16, i.e. whenever
//!   `head_dim` is a multiple of 32 (all common models).
//!
//! | dtype | one value row (`head_dim` = D) | one scale row | bytes / token / head |
//! |---|---|---|---|
//! | `fp16`, `bf16` | D × 2-byte float bits | (none) | 2·D |
//! | `int8` | D × `i8` code in `-127..=127` | one `f32` scale | D + 4 |
//! | `fp8_e4m3`, `fp8_e5m2` | D × fp8 code | one `f32` scale | D + 4 |
//! | `int4[-gG]` | D/2 bytes; byte `i` holds channel `2i` in its **low** nibble and `2i+1` in its high nibble | D/G pairs `(scale: f16, min: f16)`, 4 bytes each, scale first | D/2 + 4·D/G |
//!
//! For D = 128, `block_size` 16 and 8 kv heads (Llama-3-8B) one K (or V)
//! block is 32768 bytes in fp16, 16896 in int8/fp8 (1.94× smaller), 8704 in
//! int4 (group 128, 3.76×), 9216 in int4-g64 and 10240 in int4-g32 (3.2×).
//!
//! ## Decoding rules (what a kernel computes)
//!
//! * `fp16` / `bf16`: the value is the stored float.
//! * `int8`: `x̂ = code · scale`.
//! * `fp8_*`: `x̂ = fp8_to_float(code) · scale` (OCP E4M3FN / E5M2 bit
//!   patterns, as in CUDA's `__nv_fp8_e4m3` / `__nv_fp8_e5m2`).
//! * `int4`: `x̂ = code · scale + min` with the group's `(scale, min)`; `min`
//!   is the zero point expressed in value space (the value of code 0;
//!   `min = −zero_point · scale` in the integer-zero-point convention), which
//!   makes the dequantization one FMA and lets a dot product use
//!   `q·k̂ = scale · Σ qᵢ·codeᵢ + min · Σ qᵢ` per group.
//!
//! # Why inline scales (and not a parallel scale array)
//!
//! vLLM's per-token-head modes keep scales in a tensor parallel to the value
//! cache; LMDeploy stores them in the block after the values. We store them
//! inline because it makes a block **self-contained**:
//!
//! * copy-on-write block copies, CPU swap-out/in and prefix-cache transfers
//!   are one `memcpy` of `kv_block_bytes()` bytes, with no second array to
//!   keep in sync and no second index to get wrong;
//! * the pool needs one allocation and one pointer per cache, and kernels
//!   address a block's scales from the same base pointer as its values;
//! * precision tiering only needs a per-block dtype tag (below), not a
//!   per-dtype scale pool.
//!
//! The costs: a block is not a power-of-two size (irrelevant to a pool that
//! indexes blocks by id), and a kernel reads scales from a second region of
//! the block (it is adjacent and, per kv head, contiguous: one 64-byte line
//! for 16 slots of int8).
//!
//! Scale types: `int8`/`fp8` use an `f32` scale (4 bytes per token-head is
//! ~3% of a D = 128 row, and f32 keeps the scale itself exact to the
//! quantizer's choice). `int4` uses `f16` for `(scale, min)`, keeping the
//! overhead at 4 bytes per 16 value bytes for G = 32 (5 bits per value in all)
//! instead of 8 for `f32`; the quantizer rounds `min` down and `scale` up to
//! f16 so the grid still covers every finite value of the group, and the
//! error bound `|x − x̂| ≤ scale/2` holds with the *stored* scale.
//!
//! # Precision tiering (mixed dtypes in one sequence)
//!
//! Nothing in a block says which dtype it holds: the layout is a pure
//! function of `(dtype, block_size, num_kv_heads, head_dim)`. A sequence whose
//! blocks differ in dtype (e.g. cold blocks re-quantized to int4 while recent
//! ones stay fp16) is described by storing [`KvCacheDtype::tag`] (one byte,
//! stable numbering) next to each block id in the block table, with one pool
//! per dtype (block byte sizes differ by dtype). Re-quantizing a block is
//! [`decode_slots`](crate::decode_slots) from the old layout followed by
//! [`encode_token`](crate::encode_token) into a block of the new layout.
//!
//! # The CUDA side
//!
//! `kernels/kv_layout.cuh` is rendered from this module by
//! [`render_cuda_header`](crate::render_cuda_header) (dtype tags, alignment,
//! code ranges and the offset formulas as `constexpr` functions, plus
//! `static_assert`s pinning them to values computed here). A unit test fails
//! when the committed file is stale; `KVSERVE_BLESS=1 cargo test -p kv-quant`
//! rewrites it.

use crate::{KvCacheDtype, KvQuantError};

/// Alignment in bytes of each section of a block and of the block size
/// (one 128-bit vector load).
pub const SECTION_ALIGN: usize = 16;

/// The largest one K or V block may be, in bytes: kernels compute in-block
/// offsets in 32-bit signed integers.
pub const MAX_KV_BLOCK_BYTES: usize = i32::MAX as usize;

/// Largest `int8` code magnitude (codes are symmetric, `-127..=127`).
pub const INT8_MAX_CODE: i32 = 127;

/// Largest `int4` code (codes are `0..=15`).
pub const INT4_MAX_CODE: i32 = 15;

/// Largest finite FP8 E4M3 value; `fp8_e4m3` scales map a token-head's
/// largest finite `|x|` to it.
pub const FP8_E4M3_MAX: f32 = 448.0;

/// Largest finite FP8 E5M2 value; `fp8_e5m2` scales map a token-head's
/// largest finite `|x|` to it.
pub const FP8_E5M2_MAX: f32 = 57344.0;

/// Largest finite `f16`; `int4` stores `(scale, min)` in f16, so int4 values
/// saturate at `±INT4_RANGE_MAX`.
pub const INT4_RANGE_MAX: f32 = 65504.0;

/// Bytes of one K block **plus** one V block of one layer:
/// `2 * BlockLayout::new(..)?.kv_block_bytes()`. Multiply by the number of
/// layers for the memory one block id costs.
///
/// ```
/// use kv_quant::{bytes_per_block, KvCacheDtype};
///
/// // Llama-3-8B geometry: 8 kv heads of 128 channels, 16 slots per block.
/// assert_eq!(bytes_per_block(KvCacheDtype::Fp16, 16, 8, 128)?, 65536);
/// assert_eq!(bytes_per_block(KvCacheDtype::Int8, 16, 8, 128)?, 2 * (16384 + 512));
/// assert_eq!(bytes_per_block("int4".parse()?, 16, 8, 128)?, 2 * (8192 + 512));
/// # Ok::<(), kv_quant::KvQuantError>(())
/// ```
///
/// # Errors
/// As [`BlockLayout::new`].
pub fn bytes_per_block(
    dtype: KvCacheDtype,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> Result<usize, KvQuantError> {
    let layout = BlockLayout::new(dtype, block_size, num_kv_heads, head_dim)?;
    // kv_block_bytes <= MAX_KV_BLOCK_BYTES = i32::MAX, so doubling cannot overflow.
    Ok(2 * layout.kv_block_bytes())
}

/// The validated layout of one K or V block (see the [module docs](self)).
///
/// ```
/// use kv_quant::{BlockLayout, KvCacheDtype};
///
/// let l = BlockLayout::new("int4-g32".parse()?, 16, 8, 128)?;
/// assert_eq!(l.group_size(), Some(32));
/// assert_eq!(l.bytes_per_token_per_head(), 64 + 4 * 4);
/// assert_eq!(l.value_offset(1, 2)?, (16 + 2) * 64);
/// assert_eq!(l.scale_offset(0, 0)?, l.scale_section_offset());
/// assert_eq!(l.scale_section_offset(), 8 * 16 * 64);
/// assert_eq!(l.kv_block_bytes(), 8 * 16 * (64 + 16));
/// # Ok::<(), kv_quant::KvQuantError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    dtype: KvCacheDtype,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    group_size: usize,
    value_row_bytes: usize,
    scale_row_bytes: usize,
    scale_section_offset: usize,
    kv_block_bytes: usize,
}

const fn align_up(n: usize) -> Option<usize> {
    match n.checked_add(SECTION_ALIGN - 1) {
        Some(v) => Some(v / SECTION_ALIGN * SECTION_ALIGN),
        None => None,
    }
}

impl BlockLayout {
    /// Validates the geometry and computes the layout.
    ///
    /// # Errors
    /// * [`KvQuantError::ZeroDimension`] if `block_size`, `num_kv_heads` or
    ///   `head_dim` is 0;
    /// * for int4: [`KvQuantError::HeadDimNotMultipleOfGroup`] if the group
    ///   size does not divide `head_dim`, [`KvQuantError::OddInt4Group`] if
    ///   the resolved group size is odd (plain `int4` with an odd `head_dim`);
    /// * [`KvQuantError::LayoutTooLarge`] if one block would exceed
    ///   [`MAX_KV_BLOCK_BYTES`].
    pub fn new(
        dtype: KvCacheDtype,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self, KvQuantError> {
        for (field, v) in [
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ] {
            if v == 0 {
                return Err(KvQuantError::ZeroDimension { field });
            }
        }
        let too_large = KvQuantError::LayoutTooLarge {
            block_size,
            num_kv_heads,
            head_dim,
            max: MAX_KV_BLOCK_BYTES,
        };
        let (group_size, value_row_bytes, scale_row_bytes) = match dtype {
            KvCacheDtype::Fp16 | KvCacheDtype::Bf16 => (
                head_dim,
                head_dim.checked_mul(2).ok_or(too_large.clone())?,
                0,
            ),
            KvCacheDtype::Int8 | KvCacheDtype::Fp8E4m3 | KvCacheDtype::Fp8E5m2 => {
                (head_dim, head_dim, 4)
            }
            KvCacheDtype::Int4 { group_size } => {
                let g = group_size.resolve(head_dim);
                if !head_dim.is_multiple_of(g) {
                    return Err(KvQuantError::HeadDimNotMultipleOfGroup {
                        head_dim,
                        group_size: g,
                    });
                }
                if !g.is_multiple_of(2) {
                    return Err(KvQuantError::OddInt4Group { group_size: g });
                }
                (g, head_dim / 2, (head_dim / g) * 4)
            }
        };
        let rows = block_size
            .checked_mul(num_kv_heads)
            .ok_or(too_large.clone())?;
        let values_bytes = rows.checked_mul(value_row_bytes).ok_or(too_large.clone())?;
        let scale_section_offset = align_up(values_bytes).ok_or(too_large.clone())?;
        let scales_bytes = rows.checked_mul(scale_row_bytes).ok_or(too_large.clone())?;
        let kv_block_bytes = scale_section_offset
            .checked_add(scales_bytes)
            .and_then(align_up)
            .ok_or(too_large.clone())?;
        if kv_block_bytes > MAX_KV_BLOCK_BYTES {
            return Err(too_large);
        }
        Ok(Self {
            dtype,
            block_size,
            num_kv_heads,
            head_dim,
            group_size,
            value_row_bytes,
            scale_row_bytes,
            scale_section_offset,
            kv_block_bytes,
        })
    }

    /// The storage dtype.
    pub const fn dtype(&self) -> KvCacheDtype {
        self.dtype
    }

    /// Token slots per block.
    pub const fn block_size(&self) -> usize {
        self.block_size
    }

    /// KV heads per slot.
    pub const fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    /// Channels per head.
    pub const fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The resolved int4 group size (`Some(G)` for int4, `None` otherwise).
    pub const fn group_size(&self) -> Option<usize> {
        match self.dtype {
            KvCacheDtype::Int4 { .. } => Some(self.group_size),
            _ => None,
        }
    }

    /// `f32` values of one token for all heads (`num_kv_heads * head_dim`):
    /// the length of [`encode_token`](crate::encode_token)'s input.
    pub const fn values_per_token(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Bytes of one `(head, slot)` value row.
    pub const fn value_row_bytes(&self) -> usize {
        self.value_row_bytes
    }

    /// Bytes of one `(head, slot)` scale row (0 for fp16/bf16).
    pub const fn scale_row_bytes(&self) -> usize {
        self.scale_row_bytes
    }

    /// Bytes one token costs per kv head in one K or V block, values plus
    /// scales, excluding section padding.
    pub const fn bytes_per_token_per_head(&self) -> usize {
        self.value_row_bytes + self.scale_row_bytes
    }

    /// Offset of the scale section (the values' size rounded up to
    /// [`SECTION_ALIGN`]). For fp16/bf16 the scale section is empty.
    pub const fn scale_section_offset(&self) -> usize {
        self.scale_section_offset
    }

    /// Bytes of one K (or one V) block, padded to [`SECTION_ALIGN`].
    pub const fn kv_block_bytes(&self) -> usize {
        self.kv_block_bytes
    }

    /// Byte offset of the value row of `(head, slot)` in a block.
    ///
    /// # Errors
    /// [`KvQuantError::HeadOutOfRange`] / [`KvQuantError::SlotOutOfRange`].
    pub fn value_offset(&self, head: usize, slot: usize) -> Result<usize, KvQuantError> {
        self.check_head_slot(head, slot)?;
        Ok(self.row_index(head, slot) * self.value_row_bytes)
    }

    /// Byte offset of the scale row of `(head, slot)` in a block. For
    /// fp16/bf16 rows are empty and this is [`scale_section_offset`](Self::scale_section_offset).
    ///
    /// # Errors
    /// [`KvQuantError::HeadOutOfRange`] / [`KvQuantError::SlotOutOfRange`].
    pub fn scale_offset(&self, head: usize, slot: usize) -> Result<usize, KvQuantError> {
        self.check_head_slot(head, slot)?;
        Ok(self.scale_section_offset + self.row_index(head, slot) * self.scale_row_bytes)
    }

    pub(crate) const fn row_index(&self, head: usize, slot: usize) -> usize {
        head * self.block_size + slot
    }

    pub(crate) fn check_head(&self, head: usize) -> Result<(), KvQuantError> {
        if head >= self.num_kv_heads {
            return Err(KvQuantError::HeadOutOfRange {
                head,
                num_kv_heads: self.num_kv_heads,
            });
        }
        Ok(())
    }

    pub(crate) fn check_head_slot(&self, head: usize, slot: usize) -> Result<(), KvQuantError> {
        self.check_head(head)?;
        if slot >= self.block_size {
            return Err(KvQuantError::SlotOutOfRange {
                slot,
                block_size: self.block_size,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Int4GroupSize;

    fn int4(g: Int4GroupSize) -> KvCacheDtype {
        KvCacheDtype::Int4 { group_size: g }
    }

    #[test]
    fn llama3_8b_sizes() {
        let cases = [
            (KvCacheDtype::Fp16, 256, 32768, 32768),
            (KvCacheDtype::Bf16, 256, 32768, 32768),
            (KvCacheDtype::Int8, 132, 16384, 16896),
            (KvCacheDtype::Fp8E4m3, 132, 16384, 16896),
            (KvCacheDtype::Fp8E5m2, 132, 16384, 16896),
            (int4(Int4GroupSize::HeadDim), 68, 8192, 8704),
            (int4(Int4GroupSize::G128), 68, 8192, 8704),
            (int4(Int4GroupSize::G64), 72, 8192, 9216),
            (int4(Int4GroupSize::G32), 80, 8192, 10240),
        ];
        for (dtype, per_token_head, scale_off, block) in cases {
            let l = BlockLayout::new(dtype, 16, 8, 128).unwrap();
            assert_eq!(l.bytes_per_token_per_head(), per_token_head, "{dtype}");
            assert_eq!(l.scale_section_offset(), scale_off, "{dtype}");
            assert_eq!(l.kv_block_bytes(), block, "{dtype}");
            assert_eq!(bytes_per_block(dtype, 16, 8, 128).unwrap(), 2 * block);
        }
    }

    #[test]
    fn sections_are_aligned_and_rows_tile() {
        for dtype in KvCacheDtype::ALL {
            for (bs, h, d) in [(1, 1, 2), (3, 5, 10), (16, 8, 128), (7, 3, 64), (32, 1, 96)] {
                let Ok(l) = BlockLayout::new(dtype, bs, h, d) else {
                    assert!(matches!(
                        dtype,
                        KvCacheDtype::Int4 { group_size } if group_size.size().is_some_and(|g| d % g != 0)
                    ));
                    continue;
                };
                assert_eq!(l.scale_section_offset() % SECTION_ALIGN, 0);
                assert_eq!(l.kv_block_bytes() % SECTION_ALIGN, 0);
                let last_v = l.value_offset(h - 1, bs - 1).unwrap() + l.value_row_bytes();
                assert_eq!(last_v, bs * h * l.value_row_bytes());
                assert!(last_v <= l.scale_section_offset());
                assert!(l.scale_section_offset() - last_v < SECTION_ALIGN);
                let last_s = l.scale_offset(h - 1, bs - 1).unwrap() + l.scale_row_bytes();
                assert!(last_s <= l.kv_block_bytes());
                assert!(l.kv_block_bytes() - last_s < SECTION_ALIGN);
                assert_eq!(
                    l.value_offset(1 % h, 0).unwrap(),
                    (1 % h) * bs * l.value_row_bytes()
                );
            }
        }
    }

    #[test]
    fn accessors() {
        let l = BlockLayout::new(int4(Int4GroupSize::HeadDim), 4, 2, 96).unwrap();
        assert_eq!(l.dtype(), int4(Int4GroupSize::HeadDim));
        assert_eq!((l.block_size(), l.num_kv_heads(), l.head_dim()), (4, 2, 96));
        assert_eq!(l.group_size(), Some(96));
        assert_eq!(l.values_per_token(), 192);
        assert_eq!(l.value_row_bytes(), 48);
        assert_eq!(l.scale_row_bytes(), 4);
        let l = BlockLayout::new(KvCacheDtype::Int8, 4, 2, 96).unwrap();
        assert_eq!(l.group_size(), None);
        let l = BlockLayout::new(KvCacheDtype::Bf16, 4, 2, 96).unwrap();
        assert_eq!(l.scale_row_bytes(), 0);
        assert_eq!(l.scale_offset(1, 3).unwrap(), l.scale_section_offset());
        assert_eq!(l.kv_block_bytes(), l.scale_section_offset());
    }

    #[test]
    fn rejects_bad_geometry() {
        use KvQuantError as E;
        let d = KvCacheDtype::Int8;
        assert_eq!(
            BlockLayout::new(d, 0, 8, 128),
            Err(E::ZeroDimension {
                field: "block_size"
            })
        );
        assert_eq!(
            BlockLayout::new(d, 16, 0, 128),
            Err(E::ZeroDimension {
                field: "num_kv_heads"
            })
        );
        assert_eq!(
            BlockLayout::new(d, 16, 8, 0),
            Err(E::ZeroDimension { field: "head_dim" })
        );
        assert_eq!(
            BlockLayout::new(int4(Int4GroupSize::G32), 16, 8, 48),
            Err(E::HeadDimNotMultipleOfGroup {
                head_dim: 48,
                group_size: 32
            })
        );
        assert_eq!(
            BlockLayout::new(int4(Int4GroupSize::G128), 16, 8, 64),
            Err(E::HeadDimNotMultipleOfGroup {
                head_dim: 64,
                group_size: 128
            })
        );
        assert_eq!(
            BlockLayout::new(int4(Int4GroupSize::HeadDim), 16, 8, 63),
            Err(E::OddInt4Group { group_size: 63 })
        );
        for dtype in KvCacheDtype::ALL {
            for (bs, h, d) in [
                (usize::MAX, 1, 128),
                (1 << 16, 1 << 16, 128),
                (1, 1, usize::MAX - 1),
                (1, 1, 1 << 40),
            ] {
                let r = BlockLayout::new(dtype, bs, h, d);
                assert!(
                    matches!(
                        r,
                        Err(E::LayoutTooLarge { .. } | E::HeadDimNotMultipleOfGroup { .. })
                    ),
                    "{dtype} {bs} {h} {d}: {r:?}"
                );
                assert!(bytes_per_block(dtype, bs, h, d).is_err());
            }
        }
        assert!(matches!(
            bytes_per_block(d, 16, 8, 0),
            Err(E::ZeroDimension { field: "head_dim" })
        ));
    }

    #[test]
    fn largest_allowed_block() {
        // Exactly at the limit is fine; one section-alignment more is not.
        let max_rows = MAX_KV_BLOCK_BYTES / 16;
        let l = BlockLayout::new(KvCacheDtype::Fp16, max_rows, 1, 8).unwrap();
        assert!(l.kv_block_bytes() <= MAX_KV_BLOCK_BYTES);
        assert!(BlockLayout::new(KvCacheDtype::Fp16, max_rows + 1, 1, 8).is_err());
    }

    #[test]
    fn offsets_reject_out_of_range() {
        let l = BlockLayout::new(KvCacheDtype::Fp8E4m3, 16, 4, 64).unwrap();
        assert_eq!(
            l.value_offset(4, 0),
            Err(KvQuantError::HeadOutOfRange {
                head: 4,
                num_kv_heads: 4
            })
        );
        assert_eq!(
            l.value_offset(0, 16),
            Err(KvQuantError::SlotOutOfRange {
                slot: 16,
                block_size: 16
            })
        );
        assert_eq!(
            l.scale_offset(9, 0),
            Err(KvQuantError::HeadOutOfRange {
                head: 9,
                num_kv_heads: 4
            })
        );
        assert_eq!(
            l.scale_offset(0, 99),
            Err(KvQuantError::SlotOutOfRange {
                slot: 99,
                block_size: 16
            })
        );
        assert_eq!(l.value_offset(3, 15), Ok((3 * 16 + 15) * 64));
        assert_eq!(l.scale_offset(3, 15), Ok(4 * 16 * 64 + (3 * 16 + 15) * 4));
    }
}
