//! Hugging Face safetensors directories: single file, sharded, unsharded multi-file, and bad
//! inputs (corrupt headers, bad or dangling indexes).

use std::fs;
use std::path::Path;

use model::DType;
use model::safetensors::{SafetensorsDir, SafetensorsError};
use safetensors::Dtype;
use safetensors::tensor::TensorView as StView;

/// One tensor to write: name, dtype, safetensors shape, bytes.
type Spec = (&'static str, Dtype, Vec<usize>, Vec<u8>);

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn write_safetensors(path: &Path, tensors: &[Spec]) {
    let views: Vec<(&str, StView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                *name,
                StView::new(*dtype, shape.clone(), data).expect("consistent test tensor"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("serialize");
}

fn tensors_a() -> Vec<Spec> {
    vec![
        // A linear layer with 4 inputs and 3 outputs: safetensors shape [out, in].
        (
            "model.layers.0.q_proj.weight",
            Dtype::F32,
            vec![3, 4],
            pattern(48, 1),
        ),
        ("model.norm.weight", Dtype::F16, vec![4], pattern(8, 2)),
    ]
}

fn tensors_b() -> Vec<Spec> {
    vec![
        ("lm_head.weight", Dtype::BF16, vec![2, 2, 2], pattern(16, 3)),
        ("position_ids", Dtype::I64, vec![2], pattern(16, 4)),
    ]
}

fn write_index(dir: &Path, entries: &[(&str, &str)]) {
    let map: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(t, s)| ((*t).to_owned(), serde_json::Value::String((*s).to_owned())))
        .collect();
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map });
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
}

fn sharded_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_safetensors(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &tensors_a(),
    );
    write_safetensors(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &tensors_b(),
    );
    let mut entries = Vec::new();
    for (name, ..) in tensors_a() {
        entries.push((name, "model-00001-of-00002.safetensors"));
    }
    for (name, ..) in tensors_b() {
        entries.push((name, "model-00002-of-00002.safetensors"));
    }
    write_index(dir.path(), &entries);
    dir
}

fn open_err(dir: &Path) -> SafetensorsError {
    match SafetensorsDir::open(dir) {
        Ok(d) => panic!("expected an error, opened {d:?}"),
        Err(e) => e,
    }
}

/// Checks every tensor of `specs` in `dir`: dtype, reversed dims, exact bytes.
fn check_tensors(dir: &SafetensorsDir, specs: &[Spec]) {
    for (name, dtype, shape, data) in specs {
        let want = match dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                let e = dir.tensor(name).expect_err("unsupported dtype");
                assert!(
                    matches!(&e, SafetensorsError::UnsupportedDtype { tensor, dtype }
                        if tensor == name && *dtype == format!("{other:?}")),
                    "{e:?}"
                );
                continue;
            }
        };
        let t = dir.tensor(name).expect("tensor");
        assert_eq!(t.name, *name);
        assert_eq!(t.dtype, want);
        let reversed: Vec<usize> = shape.iter().rev().copied().collect();
        assert_eq!(t.dims, reversed, "{name}");
        assert_eq!(t.bytes, data.as_slice(), "{name}");
    }
}

#[test]
fn single_file_with_configs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut specs = tensors_a();
    specs.extend(tensors_b());
    write_safetensors(&dir.path().join("model.safetensors"), &specs);
    fs::write(dir.path().join("config.json"), r#"{"hidden_size": 4}"#).expect("config");
    fs::write(dir.path().join("tokenizer.json"), "{}").expect("tokenizer");
    fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{{ x }}"}"#,
    )
    .expect("tokenizer config");

    let st = SafetensorsDir::open(dir.path()).expect("open");
    check_tensors(&st, &specs);
    let q = st.tensor("model.layers.0.q_proj.weight").expect("q");
    assert_eq!(q.dims, [4, 3], "GGML order: [in, out]");

    let mut names: Vec<&str> = specs.iter().map(|s| s.0).collect();
    names.sort_unstable();
    assert_eq!(st.tensor_names().collect::<Vec<_>>(), names);
    assert!(st.contains("position_ids"));
    assert_eq!(st.weight_files().count(), 1);
    assert_eq!(st.config_json(), Some(r#"{"hidden_size": 4}"#));
    assert_eq!(
        st.tokenizer_json_path(),
        Some(dir.path().join("tokenizer.json"))
    );
    assert_eq!(
        st.tokenizer_config_json().as_deref(),
        Some(r#"{"chat_template": "{{ x }}"}"#)
    );
    assert!(matches!(
        st.tensor("missing"),
        Err(SafetensorsError::TensorNotFound { name }) if name == "missing"
    ));
}

#[test]
fn dir_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SafetensorsDir>();
    send_sync::<SafetensorsError>();
}

#[test]
fn sharded_with_index() {
    let dir = sharded_dir();
    let st = SafetensorsDir::open(dir.path()).expect("open");
    check_tensors(&st, &tensors_a());
    check_tensors(&st, &tensors_b());
    assert_eq!(st.weight_files().count(), 2);
    assert_eq!(st.tensor_names().count(), 4);
    assert_eq!(st.config_json(), None);
    assert_eq!(st.tokenizer_json_path(), None);
    assert_eq!(st.tokenizer_config_json(), None);
}

#[test]
fn index_exposes_only_mapped_tensors() {
    let dir = sharded_dir();
    write_index(
        dir.path(),
        &[("lm_head.weight", "model-00002-of-00002.safetensors")],
    );
    let st = SafetensorsDir::open(dir.path()).expect("open");
    assert_eq!(st.tensor_names().collect::<Vec<_>>(), ["lm_head.weight"]);
    assert_eq!(st.weight_files().count(), 1);
}

#[test]
fn unsharded_files_without_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_safetensors(&dir.path().join("a.safetensors"), &tensors_a());
    write_safetensors(&dir.path().join("b.safetensors"), &tensors_b());
    fs::write(dir.path().join("notes.txt"), "not weights").expect("write");
    let st = SafetensorsDir::open(dir.path()).expect("open");
    check_tensors(&st, &tensors_a());
    check_tensors(&st, &tensors_b());

    // The same tensor in two files.
    write_safetensors(&dir.path().join("c.safetensors"), &tensors_b());
    let e = open_err(dir.path());
    assert!(
        matches!(&e, SafetensorsError::DuplicateTensor { tensor, first, second }
            if tensors_b().iter().any(|t| t.0 == tensor)
                && first.ends_with("b.safetensors")
                && second.ends_with("c.safetensors")),
        "{e:?}"
    );
}

#[test]
fn no_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("config.json"), "{}").expect("write");
    let e = open_err(dir.path());
    assert!(matches!(&e, SafetensorsError::NoWeights { .. }), "{e:?}");

    let e = open_err(&dir.path().join("does-not-exist"));
    assert!(matches!(&e, SafetensorsError::Io { .. }), "{e:?}");
}

#[test]
fn corrupt_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    write_safetensors(&path, &tensors_a());
    let good = fs::read(&path).expect("read");

    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push(("empty", Vec::new()));
    cases.push(("short", good[..5].to_vec()));
    let mut huge_len = good.clone();
    huge_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(("huge header length", huge_len));
    let mut bad_json = good.clone();
    bad_json[8] = b'[';
    cases.push(("bad json", bad_json));
    let mut truncated = good.clone();
    truncated.pop();
    cases.push(("truncated data", truncated));
    let mut extra = good.clone();
    extra.push(0);
    cases.push(("trailing byte", extra));

    for (what, bytes) in cases {
        // In memory (`from_bytes`, the fuzzers' entry) as on disk.
        let e = SafetensorsDir::from_bytes(bytes.clone()).expect_err(what);
        assert!(
            matches!(&e, SafetensorsError::BadHeader { path: p, .. } if p == Path::new("model.safetensors")),
            "{what} (in memory): {e:?}"
        );
        fs::write(&path, &bytes).expect("write");
        let e = open_err(dir.path());
        assert!(
            matches!(&e, SafetensorsError::BadHeader { path: p, .. } if *p == path),
            "{what}: {e:?}"
        );
    }
}

#[test]
fn single_file_from_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    let specs = tensors_a();
    write_safetensors(&path, &specs);
    let st = SafetensorsDir::from_bytes(fs::read(&path).expect("read")).expect("from_bytes");
    check_tensors(&st, &specs);
    assert_eq!(st.tensor_names().count(), specs.len());
    assert_eq!(st.dir(), Path::new(""));
    assert_eq!(st.config_json(), None);
    assert_eq!(st.tokenizer_json_path(), None);
}

#[test]
fn bad_indexes() {
    let dir = sharded_dir();

    // A shard that is not there.
    write_index(
        dir.path(),
        &[("x.weight", "model-00003-of-00003.safetensors")],
    );
    let e = open_err(dir.path());
    assert!(
        matches!(&e, SafetensorsError::MissingShard { shard, tensor, .. }
            if shard == "model-00003-of-00003.safetensors" && tensor == "x.weight"),
        "{e:?}"
    );

    // A tensor the named shard does not hold.
    write_index(
        dir.path(),
        &[("lm_head.weight", "model-00001-of-00002.safetensors")],
    );
    let e = open_err(dir.path());
    assert!(
        matches!(&e, SafetensorsError::TensorNotInShard { tensor, .. } if tensor == "lm_head.weight"),
        "{e:?}"
    );

    // Shard names that leave the directory.
    for shard in [
        "../model-00001-of-00002.safetensors",
        "/etc/passwd",
        "sub/x.safetensors",
    ] {
        write_index(dir.path(), &[("x", shard)]);
        let e = open_err(dir.path());
        assert!(
            matches!(&e, SafetensorsError::BadShardName { shard: s, .. } if s == shard),
            "{e:?}"
        );
    }

    let index = dir.path().join("model.safetensors.index.json");
    fs::write(&index, "{ not json").expect("write");
    let e = open_err(dir.path());
    assert!(matches!(&e, SafetensorsError::IndexJson { .. }), "{e:?}");

    for bad in [
        r#"{"metadata": {}}"#,
        r#"{"weight_map": {}}"#,
        r#"{"weight_map": {"x": 3}}"#,
        r#"[1, 2]"#,
    ] {
        fs::write(&index, bad).expect("write");
        let e = open_err(dir.path());
        assert!(
            matches!(&e, SafetensorsError::BadIndex { .. }),
            "{bad}: {e:?}"
        );
    }
}
