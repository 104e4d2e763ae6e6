//! The GGUF reader: round trips through a tiny test-only writer, every error case, hostile
//! inputs (huge lengths and counts must fail fast without allocating), truncation and
//! corruption never panicking, and the real default model when it has been fetched.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use model::DType;
use model::gguf::{GgufError, GgufFile, GgufValue, MAX_ARRAY_DEPTH};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// A tiny GGUF writer (tests only).

const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => T_U8,
        GgufValue::I8(_) => T_I8,
        GgufValue::U16(_) => T_U16,
        GgufValue::I16(_) => T_I16,
        GgufValue::U32(_) => T_U32,
        GgufValue::I32(_) => T_I32,
        GgufValue::F32(_) => T_F32,
        GgufValue::Bool(_) => T_BOOL,
        GgufValue::String(_) => T_STRING,
        GgufValue::Array(_) => T_ARRAY,
        GgufValue::U64(_) => T_U64,
        GgufValue::I64(_) => T_I64,
        GgufValue::F64(_) => T_F64,
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// The payload of `v` (without its type id).
fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            put_u32(out, items.first().map_or(T_U8, type_id));
            put_u64(out, items.len() as u64);
            for item in items {
                put_value(out, item);
            }
        }
    }
}

struct TestTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    data: Vec<u8>,
}

/// Builds GGUF files in memory.
struct Builder {
    version: u32,
    alignment: usize,
    kvs: Vec<(String, GgufValue)>,
    tensors: Vec<TestTensor>,
}

/// A built file and where its parts are.
struct Built {
    bytes: Vec<u8>,
    /// Offset of the data section (end of header plus padding).
    data_offset: usize,
}

impl Builder {
    fn new(version: u32) -> Self {
        Self {
            version,
            alignment: 32,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn kv(mut self, key: &str, v: GgufValue) -> Self {
        if key == "general.alignment"
            && let Some(a) = v.as_u64()
        {
            self.alignment = a as usize;
        }
        self.kvs.push((key.to_owned(), v));
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> Self {
        self.tensors.push(TestTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ggml_type,
            data,
        });
        self
    }

    fn build(&self) -> Built {
        let mut out = b"GGUF".to_vec();
        put_u32(&mut out, self.version);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.kvs.len() as u64);
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            put_u32(&mut out, type_id(v));
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, t.ggml_type);
            put_u64(&mut out, offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(self.alignment as u64);
        }
        out.resize(out.len().next_multiple_of(self.alignment), 0);
        let data_offset = out.len();
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(out.len().next_multiple_of(self.alignment), 0);
        }
        Built {
            bytes: out,
            data_offset,
        }
    }
}

/// Header bytes (magic, version, counts) with nothing after them.
fn raw_header(version: u32, tensor_count: u64, kv_count: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    put_u32(&mut out, version);
    put_u64(&mut out, tensor_count);
    put_u64(&mut out, kv_count);
    out
}

fn bytes_of(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A small valid file with metadata of every kind and tensors of several types.
fn small_file(version: u32) -> Built {
    Builder::new(version)
        .kv("general.architecture", GgufValue::String("llama".into()))
        .kv("llama.block_count", GgufValue::U32(2))
        .kv(
            "tokenizer.ggml.tokens",
            GgufValue::Array(vec![
                GgufValue::String("<s>".into()),
                GgufValue::String("hé".into()),
            ]),
        )
        .kv(
            "tokenizer.ggml.scores",
            GgufValue::Array(vec![GgufValue::F32(0.5), GgufValue::F32(-1.0)]),
        )
        .tensor(
            "a.weight",
            &[4, 3],
            0,
            f32_bytes(&[
                1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0,
            ]),
        )
        .tensor("b.weight", &[64, 2], 8, bytes_of(4 * 34, 1))
        .tensor("c.weight", &[32, 3], 3, bytes_of(3 * 20, 2))
        .tensor("d.weight", &[5], 1, bytes_of(10, 3))
        .build()
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(bytes)
}

fn parse_err(bytes: Vec<u8>) -> GgufError {
    match parse(bytes) {
        Ok(file) => panic!("expected an error, parsed {file:?}"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips.

fn all_value_kinds() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("u8", GgufValue::U8(250)),
        ("i8", GgufValue::I8(-7)),
        ("u16", GgufValue::U16(65000)),
        ("i16", GgufValue::I16(-30000)),
        ("u32", GgufValue::U32(4_000_000_000)),
        ("i32", GgufValue::I32(-2_000_000_000)),
        ("u64", GgufValue::U64(u64::MAX - 1)),
        ("i64", GgufValue::I64(i64::MIN + 1)),
        ("f32", GgufValue::F32(1.5e-5)),
        ("f64", GgufValue::F64(-2.25e300)),
        ("bool.t", GgufValue::Bool(true)),
        ("bool.f", GgufValue::Bool(false)),
        ("str", GgufValue::String("a string with ünïcode".into())),
        ("str.empty", GgufValue::String(String::new())),
        ("arr.empty", GgufValue::Array(vec![])),
        (
            "arr.i32",
            GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(-2)]),
        ),
        (
            "arr.bool",
            GgufValue::Array(vec![GgufValue::Bool(true), GgufValue::Bool(false)]),
        ),
        (
            "arr.nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)]),
                GgufValue::Array(vec![GgufValue::U8(3)]),
            ]),
        ),
    ]
}

#[test]
fn metadata_round_trips_for_v2_and_v3() {
    for version in [2, 3] {
        let mut b = Builder::new(version);
        for (k, v) in all_value_kinds() {
            b = b.kv(k, v);
        }
        let file = parse(b.build().bytes).expect("valid file");
        assert_eq!(file.version(), version);
        assert_eq!(file.metadata().len(), all_value_kinds().len());
        for (k, v) in all_value_kinds() {
            assert_eq!(file.get(k), Some(&v), "key {k}, version {version}");
        }
        assert!(file.tensor_infos().is_empty());
    }
}

#[test]
fn typed_getters() {
    let file = parse(small_file(3).bytes).expect("valid file");
    assert_eq!(file.architecture(), Some("llama"));
    assert_eq!(file.get_u64("llama.block_count"), Some(2));
    assert_eq!(file.get_u32("llama.block_count"), Some(2));
    assert_eq!(file.get_f64("llama.block_count"), Some(2.0));
    assert_eq!(file.get_str("llama.block_count"), None);
    assert_eq!(file.get_bool("missing"), None);
    let tokens = file.get("tokenizer.ggml.tokens").expect("tokens");
    assert_eq!(tokens.as_str_array(), Some(vec!["<s>", "hé"]));
    assert_eq!(tokens.type_name(), "ARRAY");
    assert_eq!(
        file.get_array("tokenizer.ggml.scores").map(<[_]>::len),
        Some(2)
    );
}

#[test]
fn tensors_round_trip() {
    for version in [2, 3] {
        let built = small_file(version);
        let file = parse(built.bytes.clone()).expect("valid file");
        assert_eq!(file.data_offset(), built.data_offset);
        assert_eq!(file.alignment(), 32);
        let names: Vec<_> = file.tensor_infos().iter().map(|t| t.name()).collect();
        assert_eq!(names, ["a.weight", "b.weight", "c.weight", "d.weight"]);

        let a = file.tensor("a.weight").expect("a");
        assert_eq!((a.dtype, a.dims.as_slice()), (DType::F32, &[4, 3][..]));
        assert_eq!(
            a.bytes,
            f32_bytes(&[
                1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0
            ])
        );
        assert_eq!(a.n_elements(), 12);

        let b = file.tensor("b.weight").expect("b");
        assert_eq!((b.dtype, b.dims.as_slice()), (DType::Q8_0, &[64, 2][..]));
        assert_eq!(b.bytes, bytes_of(4 * 34, 1));

        let c = file.tensor("c.weight").expect("c");
        assert_eq!((c.dtype, c.dims.as_slice()), (DType::Q4_1, &[32, 3][..]));
        assert_eq!(c.bytes, bytes_of(60, 2));

        let d = file.tensor("d.weight").expect("d");
        assert_eq!((d.dtype, d.dims.as_slice()), (DType::F16, &[5][..]));
        assert_eq!(d.bytes, bytes_of(10, 3));

        for info in file.tensor_infos() {
            let view = file.tensor(info.name()).expect("tensor");
            assert_eq!(Some(view.bytes.len() as u64), info.n_bytes());
            assert_eq!(info.dtype(), Some(view.dtype));
            assert_eq!(info.offset() % 32, 0);
            assert!(format!("{view:?}").contains("bytes"));
        }
        assert!(matches!(
            file.tensor("nope"),
            Err(GgufError::TensorNotFound { name }) if name == "nope"
        ));
    }
}

#[test]
fn custom_alignment_is_used() {
    let built = Builder::new(3)
        .kv("general.alignment", GgufValue::U32(64))
        .tensor("x", &[3], 0, f32_bytes(&[1.0, 2.0, 3.0]))
        .tensor("y", &[2], 0, f32_bytes(&[4.0, 5.0]))
        .build();
    let file = parse(built.bytes).expect("valid");
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_offset() % 64, 0);
    assert_eq!(file.tensor_infos()[1].offset(), 64);
    assert_eq!(file.tensor("y").expect("y").bytes, f32_bytes(&[4.0, 5.0]));
}

#[test]
fn unsupported_types_only_fail_when_requested() {
    let built = Builder::new(3)
        .tensor("q5", &[32], 6, bytes_of(22, 0)) // Q5_0: known layout, not supported
        .tensor("weird", &[7], 200, vec![]) // unknown type id
        .tensor("ok", &[1], 0, f32_bytes(&[1.0]))
        .build();
    let file = parse(built.bytes).expect("file with unsupported types still opens");
    assert_eq!(file.tensor_infos().len(), 3);
    let q5 = file.tensor_info("q5").expect("listed");
    assert_eq!(
        (q5.ggml_type(), q5.dtype(), q5.n_bytes()),
        (6, None, Some(22))
    );
    let weird = file.tensor_info("weird").expect("listed");
    assert_eq!((weird.ggml_type(), weird.n_bytes()), (200, None));
    for (name, id) in [("q5", 6), ("weird", 200)] {
        assert!(matches!(
            file.tensor(name),
            Err(GgufError::UnsupportedTensorType { tensor, ggml_type }) if tensor == name && ggml_type == id
        ));
    }
    assert!(file.tensor("ok").is_ok());
}

#[test]
fn file_and_views_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<GgufFile>();
    send_sync::<model::gguf::TensorView<'static>>();
    send_sync::<GgufError>();
}

#[test]
fn opens_from_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("small.gguf");
    std::fs::write(&path, small_file(3).bytes).expect("write");
    let file = GgufFile::open(&path).expect("open");
    assert_eq!(file.tensor("c.weight").expect("c").bytes, bytes_of(60, 2));
    assert!(format!("{file:?}").contains("Mapped"));
    assert!(matches!(
        GgufFile::open(&dir.path().join("missing.gguf")),
        Err(GgufError::Io { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Errors, one by one.

#[test]
fn bad_magic_and_versions() {
    let mut bytes = small_file(3).bytes;
    bytes[0] = b'X';
    assert!(matches!(parse_err(bytes), GgufError::BadMagic { got } if &got == b"XGUF"));

    for version in [1, 4, 0, u32::MAX] {
        let e = parse_err(raw_header(version, 0, 0));
        assert!(
            matches!(&e, GgufError::UnsupportedVersion { got } if *got == version),
            "{e:?}"
        );
    }
    for version in [2u32, 3] {
        let e = parse_err(raw_header(version.swap_bytes(), 0, 0));
        assert!(
            matches!(&e, GgufError::BigEndian { version: v } if *v == version),
            "{e:?}"
        );
    }
    // An empty v2/v3 file is fine.
    assert!(parse(raw_header(3, 0, 0)).is_ok());
}

/// A header announcing one key, followed by `key` and the raw value bytes.
fn one_kv(key: &str, ty: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = raw_header(3, 0, 1);
    put_str(&mut out, key);
    put_u32(&mut out, ty);
    out.extend_from_slice(payload);
    out
}

#[test]
fn bad_value_types() {
    let e = parse_err(one_kv("k", 13, &[0; 16]));
    assert!(
        matches!(&e, GgufError::BadValueType { key, got: 13, offset: 33 } if key == "k"),
        "{e:?}"
    );

    // An array of an unknown element type.
    let mut payload = Vec::new();
    put_u32(&mut payload, 99);
    put_u64(&mut payload, 1);
    let e = parse_err(one_kv("arr", T_ARRAY, &payload));
    assert!(
        matches!(&e, GgufError::BadValueType { got: 99, .. }),
        "{e:?}"
    );

    let e = parse_err(one_kv("flag", T_BOOL, &[2]));
    assert!(matches!(&e, GgufError::InvalidBool { got: 2, .. }), "{e:?}");
}

#[test]
fn deep_array_nesting_is_rejected() {
    let mut payload = Vec::new();
    for _ in 0..MAX_ARRAY_DEPTH + 5 {
        put_u32(&mut payload, T_ARRAY);
        put_u64(&mut payload, 1);
    }
    let e = parse_err(one_kv("deep", T_ARRAY, &payload));
    assert!(
        matches!(&e, GgufError::ArrayTooDeep { key, .. } if key == "deep"),
        "{e:?}"
    );

    // Exactly at the limit is fine.
    let mut v = GgufValue::Array(vec![GgufValue::U8(7)]);
    for _ in 1..MAX_ARRAY_DEPTH {
        v = GgufValue::Array(vec![v]);
    }
    let file = parse(Builder::new(3).kv("ok", v.clone()).build().bytes).expect("at the limit");
    assert_eq!(file.get("ok"), Some(&v));
}

/// Asserts that parsing fails quickly (no huge allocation or loop).
fn fails_fast(bytes: Vec<u8>) -> GgufError {
    let start = Instant::now();
    let e = parse_err(bytes);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    e
}

#[test]
fn huge_lengths_and_counts_fail_fast() {
    // A string of length u64::MAX.
    let e = fails_fast(one_kv("s", T_STRING, &u64::MAX.to_le_bytes()));
    assert!(
        matches!(
            &e,
            GgufError::LengthTooLarge {
                what: "string",
                len: u64::MAX,
                ..
            }
        ),
        "{e:?}"
    );

    // A key of length 2^40.
    let mut bytes = raw_header(3, 0, 1);
    put_u64(&mut bytes, 1 << 40);
    bytes.extend_from_slice(&[0; 32]);
    let e = fails_fast(bytes);
    assert!(
        matches!(
            &e,
            GgufError::LengthTooLarge {
                what: "metadata key",
                ..
            }
        ),
        "{e:?}"
    );

    // Arrays of 2^62 elements, of every element type.
    for ty in [T_U8, T_U64, T_STRING, T_ARRAY, T_BOOL] {
        let mut payload = Vec::new();
        put_u32(&mut payload, ty);
        put_u64(&mut payload, 1 << 62);
        payload.extend_from_slice(&[0; 64]);
        let e = fails_fast(one_kv("a", T_ARRAY, &payload));
        assert!(
            matches!(&e, GgufError::LengthTooLarge { what: "array", len, .. } if *len == 1 << 62),
            "{e:?}"
        );
    }

    // An array just one element longer than the bytes left.
    let mut payload = Vec::new();
    put_u32(&mut payload, T_U32);
    put_u64(&mut payload, 5);
    payload.extend_from_slice(&[0; 16]);
    let e = fails_fast(one_kv("a", T_ARRAY, &payload));
    assert!(
        matches!(
            &e,
            GgufError::LengthTooLarge {
                len: 5,
                remaining: 16,
                ..
            }
        ),
        "{e:?}"
    );

    // kv and tensor counts of 2^60.
    let e = fails_fast(raw_header(3, 0, 1 << 60));
    assert!(
        matches!(
            &e,
            GgufError::CountTooLarge {
                what: "metadata key",
                ..
            }
        ),
        "{e:?}"
    );
    let e = fails_fast(raw_header(3, 1 << 60, 0));
    assert!(
        matches!(&e, GgufError::CountTooLarge { what: "tensor", .. }),
        "{e:?}"
    );
    let e = fails_fast(raw_header(2, u64::MAX, u64::MAX));
    assert!(matches!(&e, GgufError::CountTooLarge { .. }), "{e:?}");
}

#[test]
fn huge_tensors_fail_fast() {
    // 2^40 F32 elements: 4 TiB of data in a tiny file.
    let e = fails_fast(
        Builder::new(3)
            .tensor("big", &[1 << 20, 1 << 20], 0, vec![])
            .build()
            .bytes,
    );
    assert!(
        matches!(&e, GgufError::TensorOutOfBounds { tensor, .. } if tensor == "big"),
        "{e:?}"
    );

    // Dims whose product overflows u64.
    let e = fails_fast(
        Builder::new(3)
            .tensor("ovf", &[1 << 32, 1 << 32, 2], 0, vec![])
            .build()
            .bytes,
    );
    assert!(
        matches!(&e, GgufError::SizeOverflow { tensor, .. } if tensor == "ovf"),
        "{e:?}"
    );

    // Element count fits, byte size does not.
    let e = fails_fast(
        Builder::new(3)
            .tensor("ovf", &[1 << 62, 2], 0, vec![])
            .build()
            .bytes,
    );
    assert!(matches!(&e, GgufError::SizeOverflow { .. }), "{e:?}");

    // An offset near u64::MAX.
    let b = Builder::new(3).tensor("far", &[1], 0, f32_bytes(&[1.0]));
    let e = fails_fast(set_tensor_offset(&b, 0, u64::MAX - 31));
    assert!(matches!(&e, GgufError::TensorOutOfBounds { .. }), "{e:?}");
}

#[test]
fn tensor_info_errors() {
    let e = parse_err(
        Builder::new(3)
            .tensor("five", &[1, 1, 1, 1, 1], 0, f32_bytes(&[0.0]))
            .build()
            .bytes,
    );
    assert!(
        matches!(&e, GgufError::TooManyDims { tensor, n_dims: 5, max: 4, .. } if tensor == "five"),
        "{e:?}"
    );

    let e = parse_err(
        Builder::new(3)
            .tensor("t", &[1], 0, f32_bytes(&[0.0]))
            .tensor("t", &[1], 0, f32_bytes(&[0.0]))
            .build()
            .bytes,
    );
    assert!(
        matches!(&e, GgufError::DuplicateTensor { tensor, .. } if tensor == "t"),
        "{e:?}"
    );

    // Q8_0 rows must be whole blocks of 32.
    let e = parse_err(
        Builder::new(3)
            .tensor("q", &[33, 2], 8, bytes_of(200, 0))
            .build()
            .bytes,
    );
    assert!(
        matches!(&e, GgufError::NotBlockMultiple { tensor, ggml_type: 8, dim0: 33, block_len: 32 } if tensor == "q"),
        "{e:?}"
    );
}

#[test]
fn duplicate_keys_and_bad_alignment() {
    let e = parse_err(
        Builder::new(3)
            .kv("k", GgufValue::U8(1))
            .kv("k", GgufValue::U8(2))
            .build()
            .bytes,
    );
    assert!(
        matches!(&e, GgufError::DuplicateKey { key, .. } if key == "k"),
        "{e:?}"
    );

    for bad in [
        GgufValue::U32(0),
        GgufValue::U32(48),
        GgufValue::I32(-32),
        GgufValue::String("32".into()),
    ] {
        let mut b = Builder::new(3).kv("general.alignment", bad.clone());
        b.alignment = 32;
        let e = parse_err(b.build().bytes);
        assert!(
            matches!(&e, GgufError::BadAlignment { value } if *value == bad),
            "{e:?}"
        );
    }
}

/// Rewrites the offset field of tensor info `index` in a file built by [`Builder`].
fn set_tensor_offset(b: &Builder, index: usize, offset: u64) -> Vec<u8> {
    let mut bytes = b.build().bytes;
    // Walk to the tensor infos: re-serialize the header part to find the field.
    let mut header = raw_header(b.version, b.tensors.len() as u64, b.kvs.len() as u64);
    for (k, v) in &b.kvs {
        put_str(&mut header, k);
        put_u32(&mut header, type_id(v));
        put_value(&mut header, v);
    }
    for (i, t) in b.tensors.iter().enumerate() {
        put_str(&mut header, &t.name);
        put_u32(&mut header, t.dims.len() as u32);
        for &d in &t.dims {
            put_u64(&mut header, d);
        }
        put_u32(&mut header, t.ggml_type);
        if i == index {
            let at = header.len();
            bytes[at..at + 8].copy_from_slice(&offset.to_le_bytes());
            return bytes;
        }
        put_u64(&mut header, 0);
    }
    panic!("no tensor {index}");
}

#[test]
fn tensor_placement_errors() {
    let b = Builder::new(3)
        .tensor("x", &[16], 0, f32_bytes(&[1.0; 16]))
        .tensor("y", &[16], 0, f32_bytes(&[2.0; 16]));

    let e = parse_err(set_tensor_offset(&b, 1, 4));
    assert!(
        matches!(&e, GgufError::MisalignedTensor { tensor, offset: 4, alignment: 32 } if tensor == "y"),
        "{e:?}"
    );

    let e = parse_err(set_tensor_offset(&b, 1, 32));
    assert!(
        matches!(&e, GgufError::OverlappingTensors { first, second } if first == "x" && second == "y"),
        "{e:?}"
    );

    let e = parse_err(set_tensor_offset(&b, 1, 1 << 20));
    assert!(
        matches!(&e, GgufError::TensorOutOfBounds { tensor, .. } if tensor == "y"),
        "{e:?}"
    );

    // Data cut short by a single byte.
    let mut bytes = b.build().bytes;
    bytes.pop();
    let e = parse_err(bytes);
    assert!(
        matches!(&e, GgufError::TensorOutOfBounds { tensor, .. } if tensor == "y"),
        "{e:?}"
    );

    // Zero-sized tensors may share an offset with anything.
    let file = parse(
        Builder::new(3)
            .tensor("empty", &[0, 4], 0, vec![])
            .tensor("x", &[1], 0, f32_bytes(&[1.0]))
            .build()
            .bytes,
    )
    .expect("empty tensor");
    assert!(file.tensor("empty").expect("empty").bytes.is_empty());
}

#[test]
fn truncation_at_every_offset_is_an_error() {
    for version in [2, 3] {
        let bytes = small_file(version).bytes;
        let file = parse(bytes.clone()).expect("valid");
        // Everything up to the end of the last tensor's data is needed (the padding after it
        // is not).
        let data_end = file
            .tensor_infos()
            .iter()
            .map(|t| file.data_offset() + t.offset() as usize + t.n_bytes().unwrap_or(0) as usize)
            .max()
            .expect("tensors");
        for len in 0..data_end {
            let r = parse(bytes[..len].to_vec());
            assert!(
                r.is_err(),
                "prefix of {len} bytes of {} parsed",
                bytes.len()
            );
        }
    }
}

#[test]
fn corrupting_any_header_byte_never_panics() {
    let built = small_file(3);
    for at in 0..built.data_offset {
        for value in [0x00, 0xff, 0x80, 0x01, 0x7f] {
            let mut bytes = built.bytes.clone();
            bytes[at] ^= value;
            let _ = parse(bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Committed data: the first 8 KiB of the real model, truncated and corrupted.

fn data_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/gguf")
        .join(name)
}

#[test]
fn truncated_real_header_is_a_typed_error() {
    let e = GgufFile::open(&data_file("truncated_header.gguf")).expect_err("truncated");
    assert!(
        matches!(&e, GgufError::LengthTooLarge { what: "array", key: Some(key), len: 49152, offset: 1099, .. }
            if key == "tokenizer.ggml.tokens"),
        "{e:?}"
    );
}

#[test]
fn corrupted_real_header_is_a_typed_error() {
    let e = GgufFile::open(&data_file("corrupted_header.gguf")).expect_err("corrupted");
    assert!(
        matches!(&e, GgufError::BadValueType { key, got: 0xee, offset: 482 } if key == "llama.block_count"),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The real default model, when it has been fetched (`cargo xtask fetch-model`).

#[test]
fn real_default_model_if_present() {
    let path = model::fetch::default_model_path();
    if !path.is_file() {
        eprintln!(
            "skipping: {} not found (run `cargo xtask fetch-model`)",
            path.display()
        );
        return;
    }
    let file = GgufFile::open(&path).expect("the default model parses");
    assert_eq!(file.version(), 3);
    assert_eq!(file.tensor_infos().len(), 272);
    assert_eq!(file.metadata().len(), 33);
    assert_eq!(file.architecture(), Some("llama"));
    assert_eq!(file.get_u64("llama.block_count"), Some(30));
    assert_eq!(
        file.get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_str_array)
            .map(|t| t.len()),
        Some(49152)
    );

    let embd = file.tensor("token_embd.weight").expect("token_embd");
    assert_eq!(
        (embd.dtype, embd.dims.as_slice()),
        (DType::Q8_0, &[576, 49152][..])
    );
    let wq = file.tensor("blk.0.attn_q.weight").expect("attn_q");
    assert_eq!(
        (wq.dtype, wq.dims.as_slice()),
        (DType::Q4_1, &[576, 576][..])
    );

    let mut counts = std::collections::HashMap::new();
    for info in file.tensor_infos() {
        let t = file.tensor(info.name()).expect("every tensor is supported");
        let rows: usize = t.dims[1..].iter().product();
        let expected = t.dtype.row_bytes(t.dims[0]).expect("whole blocks") * rows;
        assert_eq!(t.bytes.len(), expected, "{}", t.name);
        *counts.entry(t.dtype).or_insert(0) += 1;
    }
    assert_eq!(counts.get(&DType::Q4_1), Some(&210));
    assert_eq!(counts.get(&DType::F32), Some(&61));
    assert_eq!(counts.get(&DType::Q8_0), Some(&1));
}

// ---------------------------------------------------------------------------------------------
// Property tests: no input makes the reader panic.

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(bytes);
    }

    #[test]
    fn random_bytes_after_a_valid_prefix_never_panic(
        version in 2u32..=3,
        tensor_count in 0u64..4,
        kv_count in 0u64..4,
        tail in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = raw_header(version, tensor_count, kv_count);
        bytes.extend_from_slice(&tail);
        let _ = parse(bytes);
    }

    #[test]
    fn mutations_of_a_valid_file_never_panic(
        version in 2u32..=3,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = small_file(version).bytes;
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(file) = parse(bytes) {
            // Whatever parsed must be consistent: every listed tensor is either returned with
            // exactly its bytes or refused with a typed error.
            for info in file.tensor_infos() {
                if let Ok(view) = file.tensor(info.name()) {
                    prop_assert_eq!(Some(view.bytes.len() as u64), info.n_bytes());
                }
            }
        }
    }
}
