//! Hugging Face model directories: `config.json`, tokenizer files and `*.safetensors` weights.
//!
//! [`SafetensorsDir::open`] memory-maps every weight file of a directory (one
//! `model.safetensors`, or the shards named by `model.safetensors.index.json`), checks each
//! header with the `safetensors` crate, and indexes the tensors by their Hugging Face names.
//! [`SafetensorsDir::tensor`] returns a [`TensorView`] borrowing the bytes from the map, with
//! dims in GGML order (the safetensors shape reversed: `[out, in]` becomes `[in, out]`).
//!
//! `config.json` and `tokenizer_config.json` are read as text only; parsing them is the job of
//! [`crate::config`] and [`crate::tokenizer`].
//!
//! ```no_run
//! use model::safetensors::SafetensorsDir;
//!
//! let dir = SafetensorsDir::open("models/SmolLM2-135M-Instruct".as_ref())?;
//! let wq = dir.tensor("model.layers.0.self_attn.q_proj.weight")?;
//! println!("{} {:?}", wq.dtype, wq.dims); // [in, out]
//! # Ok::<(), model::safetensors::SafetensorsError>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::DType;
use crate::gguf::TensorView;
use crate::gguf::mmap::FileBytes;

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the tokenizer (Hugging Face `tokenizers` format).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of the tokenizer configuration (holds the chat template).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// Why a safetensors directory could not be opened, or a tensor could not be returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SafetensorsError {
    /// A file or the directory could not be read.
    #[error("cannot read {path:?}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The directory holds no `*.safetensors` file (and no index).
    #[error("no *.safetensors files in {dir:?}")]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// `model.safetensors.index.json` is not valid JSON.
    #[error("invalid index {path:?}: {source}")]
    IndexJson {
        /// The index file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The index is valid JSON but not a `{"weight_map": {tensor: file}}` object.
    #[error("invalid index {path:?}: {reason}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The index names a shard that is not a plain file name (e.g. `../x` or `a/b`).
    #[error("index {index:?} names shard {shard:?}, which is not a plain file name")]
    BadShardName {
        /// The index file.
        index: PathBuf,
        /// The shard name.
        shard: String,
    },
    /// The index names a shard file that does not exist.
    #[error("index {index:?} maps {tensor:?} to shard {shard:?}, which is missing")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard's file name.
        shard: String,
        /// A tensor the index puts in it.
        tensor: String,
    },
    /// The index puts a tensor in a shard that does not hold it.
    #[error("index maps {tensor:?} to {shard:?}, which does not hold it")]
    TensorNotInShard {
        /// The tensor.
        tensor: String,
        /// The shard file.
        shard: PathBuf,
    },
    /// A safetensors file whose header is invalid (bad length, bad JSON, bad offsets, ...).
    #[error("invalid safetensors file {path:?}: {source}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What the `safetensors` crate found.
        #[source]
        source: SafeTensorError,
    },
    /// Two weight files hold a tensor of the same name (unsharded directories only).
    #[error("tensor {tensor:?} is in both {first:?} and {second:?}")]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// The first file holding it.
        first: PathBuf,
        /// The second.
        second: PathBuf,
    },
    /// No tensor of that name.
    #[error("no tensor named {name:?}")]
    TensorNotFound {
        /// The name asked for.
        name: String,
    },
    /// A tensor whose element type kvserve does not support (only F32, F16, BF16).
    #[error("tensor {tensor:?} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The tensor.
        tensor: String,
        /// The safetensors dtype name.
        dtype: String,
    },
}

/// One mapped weight file.
struct WeightFile {
    path: PathBuf,
    bytes: FileBytes,
}

/// Where one tensor is.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    /// Safetensors order (row-major, last dimension contiguous).
    shape: Vec<usize>,
    /// Absolute byte range in its file.
    range: Range<usize>,
}

/// A Hugging Face model directory with its weights memory-mapped.
///
/// The weight files must not be modified or truncated while a `SafetensorsDir` maps them.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<WeightFile>,
    tensors: BTreeMap<String, Entry>,
    config_json: Option<String>,
    tokenizer_config_json: Option<String>,
    tokenizer_json_path: Option<PathBuf>,
}

impl SafetensorsDir {
    /// Opens the model directory `dir`: maps its weight files (sharded through
    /// `model.safetensors.index.json` if present, else `model.safetensors`, else every
    /// `*.safetensors` file), checks their headers and reads `config.json` and
    /// `tokenizer_config.json` as text if present.
    pub fn open(dir: &Path) -> Result<Self, SafetensorsError> {
        let index_path = dir.join(INDEX_FILE);
        let (files, tensors) = if index_path.is_file() {
            open_sharded(dir, &index_path)?
        } else {
            open_unsharded(dir)?
        };
        let tokenizer_json_path = Some(dir.join(TOKENIZER_FILE)).filter(|p| p.is_file());
        Ok(Self {
            dir: dir.to_owned(),
            files,
            tensors,
            config_json: read_optional(&dir.join(CONFIG_FILE))?,
            tokenizer_config_json: read_optional(&dir.join(TOKENIZER_CONFIG_FILE))?,
            tokenizer_json_path,
        })
    }

    /// A single-file checkpoint held in memory (tests, fuzzing): `bytes` is the content of a
    /// `model.safetensors` file, checked as [`open`](Self::open) checks one. There is no
    /// `config.json` or tokenizer; [`dir`](Self::dir) is empty and errors name the file
    /// `model.safetensors`.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, SafetensorsError> {
        let (file, entries) =
            index_weight_file(PathBuf::from(SINGLE_FILE), FileBytes::from_vec(bytes), 0)?;
        Ok(Self {
            dir: PathBuf::new(),
            files: vec![file],
            tensors: entries.into_iter().collect(),
            config_json: None,
            tokenizer_config_json: None,
            tokenizer_json_path: None,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The weight files, in the order they were opened.
    pub fn weight_files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// The Hugging Face names of all tensors, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether there is a tensor named `name` (of any dtype).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `hf_name`, borrowing its bytes from the mapped file; dims in GGML order.
    ///
    /// Fails if there is no such tensor or its dtype is not F32, F16 or BF16.
    pub fn tensor(&self, hf_name: &str) -> Result<TensorView<'_>, SafetensorsError> {
        let (name, entry) = self.tensors.get_key_value(hf_name).ok_or_else(|| {
            SafetensorsError::TensorNotFound {
                name: hf_name.to_owned(),
            }
        })?;
        let dtype = match entry.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(SafetensorsError::UnsupportedDtype {
                    tensor: name.clone(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        // Ranges were checked against the file by the safetensors crate when it was opened;
        // this lookup cannot fail, but must not panic either.
        let bytes = self
            .files
            .get(entry.file)
            .and_then(|f| f.bytes.get(entry.range.clone()))
            .ok_or_else(|| SafetensorsError::TensorNotFound {
                name: hf_name.to_owned(),
            })?;
        Ok(TensorView {
            name,
            dtype,
            dims: entry.shape.iter().rev().copied().collect(),
            bytes,
        })
    }

    /// The text of `config.json`, if the directory has one.
    pub fn config_json(&self) -> Option<&str> {
        self.config_json.as_deref()
    }

    /// The path of `tokenizer.json`, if the directory has one.
    pub fn tokenizer_json_path(&self) -> Option<PathBuf> {
        self.tokenizer_json_path.clone()
    }

    /// A copy of the text of `tokenizer_config.json` (which holds the chat template), if the
    /// directory has one.
    pub fn tokenizer_config_json(&self) -> Option<String> {
        self.tokenizer_config_json.clone()
    }
}

impl fmt::Debug for SafetensorsDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsDir")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.tensors.len())
            .field("config_json", &self.config_json.is_some())
            .field(
                "tokenizer_config_json",
                &self.tokenizer_config_json.is_some(),
            )
            .field("tokenizer_json_path", &self.tokenizer_json_path)
            .finish()
    }
}

type Opened = (Vec<WeightFile>, BTreeMap<String, Entry>);

/// Maps `path` and lists its tensors (name, entry with `file` = `file_index`).
fn open_weight_file(
    path: PathBuf,
    file_index: usize,
) -> Result<(WeightFile, Vec<(String, Entry)>), SafetensorsError> {
    let bytes = FileBytes::open(&path).map_err(|source| SafetensorsError::Io {
        path: path.clone(),
        source,
    })?;
    index_weight_file(path, bytes, file_index)
}

/// Lists the tensors of a weight file's `bytes` (name, entry with `file` = `file_index`);
/// `path` names it in errors.
fn index_weight_file(
    path: PathBuf,
    bytes: FileBytes,
    file_index: usize,
) -> Result<(WeightFile, Vec<(String, Entry)>), SafetensorsError> {
    let bad_header = |source| SafetensorsError::BadHeader {
        path: path.clone(),
        source,
    };
    // `read_metadata` is the parsing half of `SafeTensors::deserialize`: it checks the header
    // (length, JSON, dtypes, shapes, contiguous offsets covering exactly the rest of the file)
    // and returns it owned, so no borrow of the map has to be stored next to the map.
    let (header_len, metadata) = SafeTensors::read_metadata(&bytes).map_err(bad_header)?;
    let data_start = 8 + header_len;
    let mut entries = Vec::new();
    for name in metadata.offset_keys() {
        let Some(info) = metadata.info(&name) else {
            continue;
        };
        let (start, end) = info.data_offsets;
        let range = data_start.saturating_add(start)..data_start.saturating_add(end);
        if range.end > bytes.len() {
            // Cannot happen after `deserialize`; refuse rather than trust it.
            return Err(bad_header(SafeTensorError::InvalidOffset(name)));
        }
        entries.push((
            name,
            Entry {
                file: file_index,
                dtype: info.dtype,
                shape: info.shape.clone(),
                range,
            },
        ));
    }
    Ok((WeightFile { path, bytes }, entries))
}

/// A directory without an index: `model.safetensors`, or else every `*.safetensors` file.
fn open_unsharded(dir: &Path) -> Result<Opened, SafetensorsError> {
    let single = dir.join(SINGLE_FILE);
    let paths = if single.is_file() {
        vec![single]
    } else {
        let io_err = |source| SafetensorsError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err)? {
            let path = entry.map_err(io_err)?.path();
            if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        paths
    };
    if paths.is_empty() {
        return Err(SafetensorsError::NoWeights {
            dir: dir.to_owned(),
        });
    }
    let mut files = Vec::with_capacity(paths.len());
    let mut tensors: BTreeMap<String, Entry> = BTreeMap::new();
    for (index, path) in paths.into_iter().enumerate() {
        let (file, entries) = open_weight_file(path, index)?;
        files.push(file);
        for (name, entry) in entries {
            if let Some(previous) = tensors.get(&name) {
                return Err(SafetensorsError::DuplicateTensor {
                    tensor: name,
                    first: files[previous.file].path.clone(),
                    second: files[index].path.clone(),
                });
            }
            tensors.insert(name, entry);
        }
    }
    Ok((files, tensors))
}

/// A sharded directory: the index's `weight_map` says which shard holds each tensor. Only
/// the tensors the index names are exposed.
fn open_sharded(dir: &Path, index_path: &Path) -> Result<Opened, SafetensorsError> {
    let text = std::fs::read_to_string(index_path).map_err(|source| SafetensorsError::Io {
        path: index_path.to_owned(),
        source,
    })?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| SafetensorsError::IndexJson {
            path: index_path.to_owned(),
            source,
        })?;
    let bad_index = |reason: String| SafetensorsError::BadIndex {
        path: index_path.to_owned(),
        reason,
    };
    let weight_map = index
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| bad_index("no `weight_map` object".to_owned()))?;
    if weight_map.is_empty() {
        return Err(bad_index("`weight_map` is empty".to_owned()));
    }

    // Shard file name -> tensors the index puts there.
    let mut by_shard: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (tensor, shard) in weight_map {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad_index(format!("shard of {tensor:?} is not a string")))?;
        by_shard.entry(shard).or_default().insert(tensor);
    }

    let mut files = Vec::with_capacity(by_shard.len());
    let mut tensors = BTreeMap::new();
    for (file_index, (shard, names)) in by_shard.into_iter().enumerate() {
        if !is_plain_file_name(shard) {
            return Err(SafetensorsError::BadShardName {
                index: index_path.to_owned(),
                shard: shard.to_owned(),
            });
        }
        let path = dir.join(shard);
        if !path.is_file() {
            return Err(SafetensorsError::MissingShard {
                index: index_path.to_owned(),
                shard: shard.to_owned(),
                tensor: names.first().copied().unwrap_or_default().to_owned(),
            });
        }
        let (file, entries) = open_weight_file(path, file_index)?;
        let mut entries: BTreeMap<String, Entry> = entries.into_iter().collect();
        for name in names {
            let entry = entries
                .remove(name)
                .ok_or_else(|| SafetensorsError::TensorNotInShard {
                    tensor: name.to_owned(),
                    shard: file.path.clone(),
                })?;
            tensors.insert(name.to_owned(), entry);
        }
        files.push(file);
    }
    Ok((files, tensors))
}

/// Whether `name` is one normal path component (no separators, `.`, `..` or root).
fn is_plain_file_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(_)), None)
    ) && !name.contains(['/', '\\'])
}

/// The text of `path`, or `None` if it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, SafetensorsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SafetensorsError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_file_names() {
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        for bad in ["", ".", "..", "../x.safetensors", "a/b", "/abs", "a\\b"] {
            assert!(!is_plain_file_name(bad), "{bad:?}");
        }
    }
}
