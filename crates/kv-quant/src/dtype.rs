//! [`KvCacheDtype`]: the storage formats of the KV cache, their names and
//! their stable per-block tags.

use std::fmt;
use std::str::FromStr;

use crate::KvQuantError;

/// Channels per int4 quantization group (one `(scale, min)` pair each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Int4GroupSize {
    /// One group per head: the group size is the layout's `head_dim`
    /// (resolved by [`BlockLayout::new`](crate::BlockLayout::new)). Written `int4`.
    #[default]
    HeadDim,
    /// 32 channels per group. Written `int4-g32`.
    G32,
    /// 64 channels per group. Written `int4-g64`.
    G64,
    /// 128 channels per group. Written `int4-g128`.
    G128,
}

impl Int4GroupSize {
    /// The explicit group size, or `None` for [`Int4GroupSize::HeadDim`].
    pub const fn size(self) -> Option<usize> {
        match self {
            Self::HeadDim => None,
            Self::G32 => Some(32),
            Self::G64 => Some(64),
            Self::G128 => Some(128),
        }
    }

    /// The group size for a head of `head_dim` channels.
    pub const fn resolve(self, head_dim: usize) -> usize {
        match self.size() {
            Some(g) => g,
            None => head_dim,
        }
    }

    /// The explicit group size `32`, `64` or `128`.
    ///
    /// # Errors
    /// [`KvQuantError::UnsupportedGroupSize`] for any other value.
    pub const fn from_size(group_size: usize) -> Result<Self, KvQuantError> {
        match group_size {
            32 => Ok(Self::G32),
            64 => Ok(Self::G64),
            128 => Ok(Self::G128),
            _ => Err(KvQuantError::UnsupportedGroupSize { group_size }),
        }
    }
}

/// How K and V values are stored in the paged cache.
///
/// See the [`layout`](crate::layout) module for the byte layout of each.
///
/// | dtype | value | scales (per token, per kv head) |
/// |---|---|---|
/// | `fp16` / `bf16` | 2 bytes, as is | none |
/// | `int8` | `i8` in `-127..=127`, symmetric | one `f32` scale |
/// | `int4[-gG]` | 4-bit code `0..=15`, two per byte, asymmetric | one `f16` `(scale, min)` pair per group of `G` channels |
/// | `fp8_e4m3` / `fp8_e5m2` | 8-bit float code, saturating | one `f32` scale |
///
/// Strings (`FromStr`, case-insensitive, `Display` writes the canonical
/// form): `fp16`, `bf16`, `int8`, `int4` (group = head_dim), `int4-g32`,
/// `int4-g64`, `int4-g128`, `fp8` (alias of `fp8_e4m3`), `fp8_e4m3`,
/// `fp8_e5m2`.
///
/// ```
/// use kv_quant::{Int4GroupSize, KvCacheDtype};
///
/// let d: KvCacheDtype = "int4-g64".parse()?;
/// assert_eq!(d, KvCacheDtype::Int4 { group_size: Int4GroupSize::G64 });
/// assert_eq!(d.to_string(), "int4-g64");
/// assert_eq!(KvCacheDtype::from_tag(d.tag())?, d);
/// assert_eq!("fp8".parse::<KvCacheDtype>()?, KvCacheDtype::Fp8E4m3);
/// assert!("int3".parse::<KvCacheDtype>().is_err());
/// # Ok::<(), kv_quant::KvQuantError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvCacheDtype {
    /// IEEE binary16, stored as is.
    Fp16,
    /// bfloat16, stored as is.
    Bf16,
    /// Symmetric int8 with one `f32` scale per (token, kv head).
    Int8,
    /// Asymmetric 4-bit with an `f16` `(scale, min)` pair per group.
    Int4 {
        /// Channels per group.
        group_size: Int4GroupSize,
    },
    /// FP8 E4M3 (max 448, no infinities), saturating, one `f32` scale per
    /// (token, kv head).
    Fp8E4m3,
    /// FP8 E5M2 (max 57344), saturating, one `f32` scale per (token, kv head).
    Fp8E5m2,
}

impl KvCacheDtype {
    /// Every dtype, in tag order (`ALL[i].tag() == i`).
    pub const ALL: [Self; 9] = [
        Self::Fp16,
        Self::Bf16,
        Self::Int8,
        Self::Int4 {
            group_size: Int4GroupSize::HeadDim,
        },
        Self::Int4 {
            group_size: Int4GroupSize::G32,
        },
        Self::Int4 {
            group_size: Int4GroupSize::G64,
        },
        Self::Int4 {
            group_size: Int4GroupSize::G128,
        },
        Self::Fp8E4m3,
        Self::Fp8E5m2,
    ];

    /// A small, stable integer naming this dtype, for per-block dtype tags
    /// (precision tiering) and the CUDA header's `KV_DTYPE_*` constants.
    ///
    /// The numbering is part of the layout contract: it is never reordered,
    /// only appended to.
    pub const fn tag(self) -> u8 {
        match self {
            Self::Fp16 => 0,
            Self::Bf16 => 1,
            Self::Int8 => 2,
            Self::Int4 { group_size } => match group_size {
                Int4GroupSize::HeadDim => 3,
                Int4GroupSize::G32 => 4,
                Int4GroupSize::G64 => 5,
                Int4GroupSize::G128 => 6,
            },
            Self::Fp8E4m3 => 7,
            Self::Fp8E5m2 => 8,
        }
    }

    /// The dtype whose [`tag`](Self::tag) is `tag`.
    ///
    /// # Errors
    /// [`KvQuantError::UnknownDtypeTag`] for a tag no dtype has.
    pub const fn from_tag(tag: u8) -> Result<Self, KvQuantError> {
        let idx = tag as usize;
        if idx < Self::ALL.len() {
            Ok(Self::ALL[idx])
        } else {
            Err(KvQuantError::UnknownDtypeTag {
                tag,
                max: (Self::ALL.len() - 1) as u8,
            })
        }
    }

    /// The canonical name (what `Display` writes and `FromStr` reads).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Int4 { group_size } => match group_size {
                Int4GroupSize::HeadDim => "int4",
                Int4GroupSize::G32 => "int4-g32",
                Int4GroupSize::G64 => "int4-g64",
                Int4GroupSize::G128 => "int4-g128",
            },
            Self::Fp8E4m3 => "fp8_e4m3",
            Self::Fp8E5m2 => "fp8_e5m2",
        }
    }

    /// Whether values are quantized with per-token-head scales (everything
    /// but `fp16` and `bf16`).
    pub const fn is_quantized(self) -> bool {
        !matches!(self, Self::Fp16 | Self::Bf16)
    }
}

impl fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvCacheDtype {
    type Err = KvQuantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "fp8" {
            return Ok(Self::Fp8E4m3);
        }
        if let Some(dtype) = Self::ALL.into_iter().find(|d| d.name() == lower) {
            return Ok(dtype);
        }
        // `int4-g<digits>` with an unsupported size gets the more specific error.
        if let Some(digits) = lower.strip_prefix("int4-g")
            && !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
        {
            let group_size = digits.parse::<usize>().unwrap_or(usize::MAX);
            return Err(KvQuantError::UnsupportedGroupSize { group_size });
        }
        Err(KvQuantError::UnknownDtype {
            input: s.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_stable_and_dense() {
        let expected = [
            ("fp16", 0),
            ("bf16", 1),
            ("int8", 2),
            ("int4", 3),
            ("int4-g32", 4),
            ("int4-g64", 5),
            ("int4-g128", 6),
            ("fp8_e4m3", 7),
            ("fp8_e5m2", 8),
        ];
        for (i, (name, tag)) in expected.into_iter().enumerate() {
            let d: KvCacheDtype = name.parse().unwrap();
            assert_eq!(d.tag(), tag, "{name}");
            assert_eq!(KvCacheDtype::ALL[i], d);
            assert_eq!(KvCacheDtype::from_tag(tag).unwrap(), d);
        }
    }

    #[test]
    fn from_tag_rejects_unknown() {
        for tag in 9..=u8::MAX {
            assert_eq!(
                KvCacheDtype::from_tag(tag),
                Err(KvQuantError::UnknownDtypeTag { tag, max: 8 })
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for d in KvCacheDtype::ALL {
            assert_eq!(d.to_string().parse::<KvCacheDtype>().unwrap(), d);
            assert_eq!(d.to_string(), d.name());
        }
    }

    #[test]
    fn parse_aliases_and_case() {
        assert_eq!(
            "fp8".parse::<KvCacheDtype>().unwrap(),
            KvCacheDtype::Fp8E4m3
        );
        assert_eq!(
            " FP16 ".parse::<KvCacheDtype>().unwrap(),
            KvCacheDtype::Fp16
        );
        assert_eq!(
            "Int4-G128".parse::<KvCacheDtype>().unwrap(),
            KvCacheDtype::Int4 {
                group_size: Int4GroupSize::G128
            }
        );
    }

    #[test]
    fn parse_rejects_bad_strings() {
        for bad in [
            "", "fp32", "int3", "int4-", "int4-g", "int4g32", "fp8-e4m3", "e4m3", "auto",
        ] {
            assert_eq!(
                bad.parse::<KvCacheDtype>(),
                Err(KvQuantError::UnknownDtype {
                    input: bad.to_owned()
                }),
                "{bad:?}"
            );
        }
        assert_eq!(
            "int4-g48".parse::<KvCacheDtype>(),
            Err(KvQuantError::UnsupportedGroupSize { group_size: 48 })
        );
        assert_eq!(
            "int4-g99999999999999999999999".parse::<KvCacheDtype>(),
            Err(KvQuantError::UnsupportedGroupSize {
                group_size: usize::MAX
            })
        );
        let msg = "int3".parse::<KvCacheDtype>().unwrap_err().to_string();
        assert!(msg.contains("int3") && msg.contains("fp8_e5m2"), "{msg}");
    }

    #[test]
    fn group_size_helpers() {
        assert_eq!(Int4GroupSize::from_size(32), Ok(Int4GroupSize::G32));
        assert_eq!(Int4GroupSize::from_size(64), Ok(Int4GroupSize::G64));
        assert_eq!(Int4GroupSize::from_size(128), Ok(Int4GroupSize::G128));
        for bad in [0, 1, 16, 48, 256] {
            assert_eq!(
                Int4GroupSize::from_size(bad),
                Err(KvQuantError::UnsupportedGroupSize { group_size: bad })
            );
        }
        assert_eq!(Int4GroupSize::HeadDim.resolve(96), 96);
        assert_eq!(Int4GroupSize::G32.resolve(96), 32);
        assert_eq!(Int4GroupSize::HeadDim.size(), None);
        assert_eq!(Int4GroupSize::default(), Int4GroupSize::HeadDim);
    }

    #[test]
    fn quantized_flag() {
        assert!(!KvCacheDtype::Fp16.is_quantized());
        assert!(!KvCacheDtype::Bf16.is_quantized());
        assert!(KvCacheDtype::Int8.is_quantized());
        assert!(KvCacheDtype::Fp8E5m2.is_quantized());
    }
}
