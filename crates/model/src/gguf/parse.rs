//! Parsing of the GGUF header: metadata, tensor infos and the data section's place.
//!
//! Every length and count read from the file is checked against the bytes left before anything
//! is allocated for it, so a hostile file cannot make the reader allocate more than a small
//! multiple of its own size (bounded further by [`MAX_METADATA_VALUES`]).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use super::{
    DEFAULT_ALIGNMENT, GgufError, GgufValue, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_METADATA_VALUES,
    TensorInfo,
};

/// The magic bytes every GGUF file starts with.
const MAGIC: [u8; 4] = *b"GGUF";

/// Fewest bytes a metadata key/value can take: key length (8), type (4), a one-byte value.
const MIN_KV_BYTES: usize = 8 + 4 + 1;

/// Fewest bytes a tensor info can take: name length (8), n_dims (4), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;

/// A parsed header.
#[derive(Debug)]
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) metadata: BTreeMap<String, GgufValue>,
    pub(crate) tensors: Vec<TensorInfo>,
    pub(crate) by_name: HashMap<String, usize>,
    pub(crate) alignment: usize,
    pub(crate) data_offset: usize,
}

/// `(block_len, block_bytes)` of a GGML type id, for every type whose layout is known
/// (supported or not), so that bounds can be checked for all tensors of a file.
///
/// Q8_1 (9) is absent on purpose: it is a compute-only type never stored in files, and its
/// size differs between ggml versions.
pub(crate) fn ggml_type_layout(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        _ => return None,
    })
}

/// A reading position in the file, with bounds-checked primitive reads.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let truncated = || GgufError::Truncated {
            offset: self.pos as u64,
            what,
            needed: n as u64,
            available: self.remaining() as u64,
        };
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length field followed by that many bytes; the length is checked against the bytes
    /// left before anything is read.
    fn string(&mut self, what: &'static str, key: Option<&str>) -> Result<String, GgufError> {
        let offset = self.offset();
        let len = self.u64(what)?;
        let remaining = self.remaining();
        let n = usize::try_from(len)
            .ok()
            .filter(|&n| n <= remaining)
            .ok_or_else(|| GgufError::LengthTooLarge {
                offset,
                what,
                key: key.map(str::to_owned),
                len,
                remaining: remaining as u64,
            })?;
        let bytes = self.take(n, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
}

/// GGUF metadata value type ids.
mod value_type {
    pub(super) const U8: u32 = 0;
    pub(super) const I8: u32 = 1;
    pub(super) const U16: u32 = 2;
    pub(super) const I16: u32 = 3;
    pub(super) const U32: u32 = 4;
    pub(super) const I32: u32 = 5;
    pub(super) const F32: u32 = 6;
    pub(super) const BOOL: u32 = 7;
    pub(super) const STRING: u32 = 8;
    pub(super) const ARRAY: u32 = 9;
    pub(super) const U64: u32 = 10;
    pub(super) const I64: u32 = 11;
    pub(super) const F64: u32 = 12;
}

/// Fewest bytes one value of type `ty` takes in the file, or `None` for an unknown type.
fn min_value_bytes(ty: u32) -> Option<usize> {
    use value_type::*;
    Some(match ty {
        U8 | I8 | BOOL => 1,
        U16 | I16 => 2,
        U32 | I32 | F32 => 4,
        U64 | I64 | F64 => 8,
        STRING => 8,
        ARRAY => 4 + 8,
        _ => return None,
    })
}

/// Reading state of the metadata section.
struct ValueReader<'a, 'k> {
    cursor: &'a mut Cursor<'k>,
    key: &'a str,
    /// Values that may still be created (array elements included).
    budget: &'a mut usize,
    /// The budget at the start, for errors.
    limit: usize,
}

impl ValueReader<'_, '_> {
    fn bad_type(&self, offset: u64, got: u32) -> GgufError {
        GgufError::BadValueType {
            offset,
            key: self.key.to_owned(),
            got,
        }
    }

    /// One value of type `ty`; `depth` is the number of arrays around it.
    fn value(&mut self, ty: u32, type_offset: u64, depth: usize) -> Result<GgufValue, GgufError> {
        use value_type::*;
        const WHAT: &str = "metadata value";
        let c = &mut *self.cursor;
        Ok(match ty {
            U8 => GgufValue::U8(u8::from_le_bytes(c.array(WHAT)?)),
            I8 => GgufValue::I8(i8::from_le_bytes(c.array(WHAT)?)),
            U16 => GgufValue::U16(u16::from_le_bytes(c.array(WHAT)?)),
            I16 => GgufValue::I16(i16::from_le_bytes(c.array(WHAT)?)),
            U32 => GgufValue::U32(u32::from_le_bytes(c.array(WHAT)?)),
            I32 => GgufValue::I32(i32::from_le_bytes(c.array(WHAT)?)),
            F32 => GgufValue::F32(f32::from_le_bytes(c.array(WHAT)?)),
            U64 => GgufValue::U64(u64::from_le_bytes(c.array(WHAT)?)),
            I64 => GgufValue::I64(i64::from_le_bytes(c.array(WHAT)?)),
            F64 => GgufValue::F64(f64::from_le_bytes(c.array(WHAT)?)),
            BOOL => {
                let offset = c.offset();
                match c.array::<1>(WHAT)? {
                    [0] => GgufValue::Bool(false),
                    [1] => GgufValue::Bool(true),
                    [got] => {
                        return Err(GgufError::InvalidBool {
                            offset,
                            key: self.key.to_owned(),
                            got,
                        });
                    }
                }
            }
            STRING => GgufValue::String(c.string("string", Some(self.key))?),
            ARRAY => self.array(depth)?,
            _ => return Err(self.bad_type(type_offset, ty)),
        })
    }

    /// An array (its header is at the cursor); `depth` is the number of arrays around it.
    fn array(&mut self, depth: usize) -> Result<GgufValue, GgufError> {
        let header_offset = self.cursor.offset();
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::ArrayTooDeep {
                offset: header_offset,
                key: self.key.to_owned(),
                max_depth: MAX_ARRAY_DEPTH,
            });
        }
        let elem_ty = self.cursor.u32("array element type")?;
        let min_bytes =
            min_value_bytes(elem_ty).ok_or_else(|| self.bad_type(header_offset, elem_ty))?;
        let len_offset = self.cursor.offset();
        let len = self.cursor.u64("array length")?;
        let remaining = self.cursor.remaining();
        let n = usize::try_from(len)
            .ok()
            .filter(|&n| n <= remaining / min_bytes)
            .ok_or_else(|| GgufError::LengthTooLarge {
                offset: len_offset,
                what: "array",
                key: Some(self.key.to_owned()),
                len,
                remaining: remaining as u64,
            })?;
        *self.budget = self
            .budget
            .checked_sub(n)
            .ok_or_else(|| GgufError::TooManyValues {
                offset: header_offset,
                key: self.key.to_owned(),
                limit: self.limit,
            })?;
        // `n` is bounded by the bytes left (each element takes at least `min_bytes`).
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            let elem_offset = self.cursor.offset();
            items.push(self.value(elem_ty, elem_offset, depth + 1)?);
        }
        Ok(GgufValue::Array(items))
    }
}

/// Checks a count from the header against the bytes left, at `min_bytes` per item.
fn check_count(
    count: u64,
    what: &'static str,
    remaining: usize,
    min_bytes: usize,
) -> Result<usize, GgufError> {
    let max = remaining / min_bytes;
    usize::try_from(count)
        .ok()
        .filter(|&n| n <= max)
        .ok_or(GgufError::CountTooLarge {
            what,
            count,
            max: max as u64,
        })
}

/// Parses the header of a GGUF file and checks every tensor's place in the data section.
pub(crate) fn parse(bytes: &[u8]) -> Result<Header, GgufError> {
    parse_with_value_limit(bytes, MAX_METADATA_VALUES)
}

/// [`parse`], with at most `max_values` metadata values (tests use a small limit).
fn parse_with_value_limit(bytes: &[u8], max_values: usize) -> Result<Header, GgufError> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.array::<4>("magic")?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic { got: magic });
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        v if v & 0xffff == 0 && (1..=3).contains(&v.swap_bytes()) => {
            return Err(GgufError::BigEndian {
                version: v.swap_bytes(),
            });
        }
        got => return Err(GgufError::UnsupportedVersion { got }),
    }
    let tensor_count = c.u64("tensor count")?;
    let kv_count = c.u64("metadata key count")?;
    let kv_count = check_count(kv_count, "metadata key", c.remaining(), MIN_KV_BYTES)?;
    check_count(tensor_count, "tensor", c.remaining(), MIN_TENSOR_INFO_BYTES)?;

    let mut metadata = BTreeMap::new();
    let mut budget = max_values;
    for _ in 0..kv_count {
        let key_offset = c.offset();
        let key = c.string("metadata key", None)?;
        let type_offset = c.offset();
        let ty = c.u32("metadata value type")?;
        budget = budget
            .checked_sub(1)
            .ok_or_else(|| GgufError::TooManyValues {
                offset: key_offset,
                key: key.clone(),
                limit: max_values,
            })?;
        let value = ValueReader {
            cursor: &mut c,
            key: &key,
            budget: &mut budget,
            limit: max_values,
        }
        .value(ty, type_offset, 0)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey {
                offset: key_offset,
                key,
            });
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(value) => value
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .and_then(|a| usize::try_from(a).ok())
            .ok_or_else(|| GgufError::BadAlignment {
                value: value.clone(),
            })?,
    };

    // Re-checked now that the metadata is read: this count sizes an allocation.
    let tensor_count = check_count(tensor_count, "tensor", c.remaining(), MIN_TENSOR_INFO_BYTES)?;
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut by_name = HashMap::with_capacity(tensor_count);
    for index in 0..tensor_count {
        let info_offset = c.offset();
        let info = tensor_info(&mut c, alignment)?;
        if by_name.contains_key(&info.name) {
            return Err(GgufError::DuplicateTensor {
                offset: info_offset,
                tensor: info.name,
            });
        }
        by_name.insert(info.name.clone(), index);
        tensors.push(info);
    }

    // The data section starts at the next multiple of the alignment. A file without tensors
    // may end before it.
    let data_offset = c
        .pos
        .checked_next_multiple_of(alignment)
        .unwrap_or(usize::MAX);
    locate_tensors(&mut tensors, data_offset, bytes.len())?;

    Ok(Header {
        version,
        metadata,
        tensors,
        by_name,
        alignment,
        data_offset,
    })
}

/// One tensor info; its byte range is filled in later by [`locate_tensors`].
fn tensor_info(c: &mut Cursor<'_>, alignment: usize) -> Result<TensorInfo, GgufError> {
    let name = c.string("tensor name", None)?;
    let dims_offset = c.offset();
    let n_dims = c.u32("tensor dimension count")?;
    if n_dims > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            offset: dims_offset,
            tensor: name,
            n_dims,
            max: MAX_DIMS,
        });
    }
    let mut dims = Vec::with_capacity(MAX_DIMS as usize);
    for _ in 0..n_dims {
        dims.push(c.u64("tensor dimension")?);
    }
    let ggml_type = c.u32("tensor type")?;
    let offset = c.u64("tensor offset")?;

    let overflow = |name: String, dims: Vec<u64>| GgufError::SizeOverflow { tensor: name, dims };
    let Some(n_elements) = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)) else {
        return Err(overflow(name, dims));
    };
    let n_bytes = match ggml_type_layout(ggml_type) {
        None => None,
        Some((block_len, block_bytes)) => {
            let dim0 = dims.first().copied().unwrap_or(1);
            if dim0 % block_len != 0 {
                return Err(GgufError::NotBlockMultiple {
                    tensor: name,
                    ggml_type,
                    dim0,
                    block_len,
                });
            }
            match (n_elements / block_len).checked_mul(block_bytes) {
                Some(n) => Some(n),
                None => return Err(overflow(name, dims)),
            }
        }
    };
    if offset % alignment as u64 != 0 {
        return Err(GgufError::MisalignedTensor {
            tensor: name,
            offset,
            alignment: alignment as u64,
        });
    }
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        n_elements,
        n_bytes,
        range: None,
    })
}

/// Fills in each tensor's absolute byte range and checks that it lies inside the file and
/// overlaps no other tensor.
fn locate_tensors(
    tensors: &mut [TensorInfo],
    data_offset: usize,
    file_len: usize,
) -> Result<(), GgufError> {
    for info in tensors.iter_mut() {
        let start = (data_offset as u64).checked_add(info.offset);
        // A tensor of unknown layout still must start inside the file.
        let end = match info.n_bytes {
            Some(n) => start.and_then(|s| s.checked_add(n)),
            None => start,
        };
        let range = match (start, end) {
            (Some(s), Some(e)) if e <= file_len as u64 => s as usize..e as usize,
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: info.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len: file_len as u64,
                });
            }
        };
        if info.n_bytes.is_some() {
            info.range = Some(range);
        }
    }
    check_overlaps(tensors)
}

/// Errors if the byte ranges of two (non-empty) tensors overlap.
fn check_overlaps(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut ranges: Vec<(Range<usize>, usize)> = tensors
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.range.clone().filter(|r| !r.is_empty()).map(|r| (r, i)))
        .collect();
    ranges.sort_unstable_by_key(|(r, _)| (r.start, r.end));
    for pair in ranges.windows(2) {
        let [(a, ia), (b, ib)] = pair else { continue };
        if b.start < a.end {
            return Err(GgufError::OverlappingTensors {
                first: tensors[*ia].name.clone(),
                second: tensors[*ib].name.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn layouts_agree_with_dtype() {
        for id in 0..64 {
            if let Some(dtype) = DType::from_ggml_type(id) {
                let (len, bytes) = ggml_type_layout(id).expect("supported types have a layout");
                assert_eq!(len, dtype.block_len() as u64, "{dtype}");
                assert_eq!(bytes, dtype.block_bytes() as u64, "{dtype}");
            }
        }
    }

    #[test]
    fn cursor_reads_are_bounds_checked() {
        let mut c = Cursor {
            bytes: &[1, 0, 0, 0, 9],
            pos: 0,
        };
        assert_eq!(c.u32("x").ok(), Some(1));
        let err = c.u32("y").expect_err("only one byte left");
        assert!(matches!(
            err,
            GgufError::Truncated {
                offset: 4,
                needed: 4,
                available: 1,
                ..
            }
        ));
    }

    #[test]
    fn huge_string_length_is_rejected_before_reading() {
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let mut c = Cursor {
            bytes: &bytes,
            pos: 0,
        };
        let err = c.string("string", None).expect_err("too long");
        assert!(matches!(
            err,
            GgufError::LengthTooLarge {
                len: u64::MAX,
                remaining: 3,
                ..
            }
        ));
    }

    /// A v3 header with one key holding an array of `n` u8 values, then one more u8 key.
    fn file_with_u8_array(n: usize) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&2u64.to_le_bytes());
        for (key, ty) in [("arr", value_type::ARRAY), ("x", value_type::U8)] {
            out.extend_from_slice(&(key.len() as u64).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&ty.to_le_bytes());
            if ty == value_type::ARRAY {
                out.extend_from_slice(&value_type::U8.to_le_bytes());
                out.extend_from_slice(&(n as u64).to_le_bytes());
                out.extend(std::iter::repeat_n(7u8, n));
            } else {
                out.push(1);
            }
        }
        out
    }

    #[test]
    fn metadata_value_budget() {
        let bytes = file_with_u8_array(100);
        // 2 keys + 100 elements.
        assert!(parse_with_value_limit(&bytes, 102).is_ok());
        let err = parse_with_value_limit(&bytes, 101).expect_err("one over the limit");
        assert!(
            matches!(&err, GgufError::TooManyValues { key, limit: 101, .. } if key == "x"),
            "{err:?}"
        );
        let err = parse_with_value_limit(&bytes, 50).expect_err("array over the limit");
        assert!(
            matches!(&err, GgufError::TooManyValues { key, limit: 50, offset: 39 } if key == "arr"),
            "{err:?}"
        );
    }

    #[test]
    fn counts_are_bounded_by_remaining_bytes() {
        assert_eq!(check_count(3, "tensor", 72, 24).ok(), Some(3));
        assert!(matches!(
            check_count(4, "tensor", 72, 24),
            Err(GgufError::CountTooLarge { max: 3, .. })
        ));
        assert!(check_count(1 << 60, "metadata key", 100, 13).is_err());
    }
}
