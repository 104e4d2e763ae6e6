//! Q4_K and Q6_K tensors through the public API, on a GGUF written by the Python `gguf`
//! package (`tests/data/kquant/`, made by `scripts/golden/make_kquant.py`): the reader's tensor
//! infos and views (types, GGML dims, 144/210-byte super-blocks of 256 values), and
//! [`Linear::from_raw`], which takes them and converts them for the CPU kernels (to Q8_0).
//!
//! The dequantized values are not reachable through the public API (`Linear` converts K-quants
//! to Q8_0 on load and does not expose its weights), so the exact comparison with
//! `gguf.quants.dequantize` is the unit test `k_quant_dequantization_matches_gguf_python` in
//! `src/cpu/tests.rs`, on the same files.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use model::cpu::Linear;
use model::{DType, GgufFile, ModelError};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    tensors: Vec<ExpectedTensor>,
}

#[derive(Deserialize)]
struct ExpectedTensor {
    name: String,
    ggml_type: String,
    ggml_type_id: u32,
    dims: Vec<usize>,
    n_bytes: usize,
    expected_f32_bits: Vec<u32>,
}

fn data(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kquant")
        .join(file)
}

fn expected() -> Expected {
    serde_json::from_str(&std::fs::read_to_string(data("kquant_expected.json")).unwrap()).unwrap()
}

fn dtype_of(t: &ExpectedTensor) -> DType {
    match t.ggml_type.as_str() {
        "Q4_K" => DType::Q4K,
        "Q6_K" => DType::Q6K,
        other => panic!("unexpected type {other}"),
    }
}

#[test]
fn reader_sees_k_quant_tensors_as_written() {
    let file = GgufFile::open(&data("kquant.gguf")).unwrap();
    let e = expected();
    assert_eq!(file.tensor_infos().len(), e.tensors.len());
    for t in &e.tensors {
        let dtype = dtype_of(t);
        let (cols, rows) = (t.dims[0], t.dims[1]);
        assert_eq!(
            (dtype.block_len(), dtype.block_bytes()),
            (256, if dtype == DType::Q4K { 144 } else { 210 })
        );
        assert_eq!(DType::from_ggml_type(t.ggml_type_id), Some(dtype));
        let info = file.tensor_info(&t.name).unwrap();
        assert_eq!(info.ggml_type(), t.ggml_type_id);
        assert_eq!(info.dtype(), Some(dtype));
        assert_eq!(info.dims(), [cols as u64, rows as u64]);
        assert_eq!(info.n_bytes(), Some(t.n_bytes as u64));
        let view = file.tensor(&t.name).unwrap();
        assert_eq!((view.dtype, view.dims.as_slice()), (dtype, &t.dims[..]));
        assert_eq!(view.bytes.len(), t.n_bytes);
        assert_eq!(dtype.row_bytes(cols), Some(t.n_bytes / rows));
        assert_eq!(dtype.row_bytes(cols - 32), None, "not whole super-blocks");
        assert_eq!(t.expected_f32_bits.len(), cols * rows);
    }
}

#[test]
fn linear_layers_take_k_quant_rows() {
    let file = GgufFile::open(&data("kquant.gguf")).unwrap();
    for t in &expected().tensors {
        let view = file.tensor(&t.name).unwrap();
        let (cols, rows) = (t.dims[0], t.dims[1]);
        let l = Linear::from_raw(&t.name, view.dtype, cols, rows, view.bytes, None).unwrap();
        assert_eq!((l.in_features(), l.out_features()), (cols, rows));
        // The CPU kernels have no K-quant path: rows are re-encoded as Q8_0 on load.
        assert_eq!(l.dtype(), DType::Q8_0);
        assert_eq!(l.to_f32().dtype(), DType::F32);
        // Sizes that do not match are refused with the tensor's name.
        let bad = [
            Linear::from_raw(&t.name, view.dtype, cols - 32, rows, view.bytes, None),
            Linear::from_raw(&t.name, view.dtype, cols, rows + 1, view.bytes, None),
            Linear::from_raw(
                &t.name,
                view.dtype,
                cols,
                rows,
                &view.bytes[..view.bytes.len() - 1],
                None,
            ),
            Linear::from_raw(&t.name, view.dtype, cols, rows, view.bytes, Some(vec![0.0])),
        ];
        for r in bad {
            assert!(
                matches!(&r, Err(ModelError::BadTensor { name, .. }) if *name == t.name),
                "{}: {r:?}",
                t.name
            );
        }
    }
}
