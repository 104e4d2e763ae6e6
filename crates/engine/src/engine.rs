//! Starting an engine: loading the model, sizing the KV pool, building the scheduler (and
//! speculative decoding), spawning the step loop.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dist::{
    CommCollective, DistConfig, GroupAbort, NcclCommunicator, Rendezvous, TensorParallelBackend,
    ThreadGroup,
};
use model::HostCollective as _;

use kv_block_manager::{BlockManager, BlockManagerConfig, SUPPORTED_BLOCK_SIZES};
use kv_quant::KvCacheDtype;
use model::{
    Backend, CpuBackend, CudaBackend, DType, Gpu, KvCacheConfig, LoadedModel, LocalShape,
    ModelConfig, ModelError, Shard, Tokenizer, Weights,
};
use scheduler::spec::{
    DraftModelConfig, DraftModelProposer, MAX_K, NgramConfig, NgramProposer, Proposer,
    SpecController, SpecControllerConfig,
};
use scheduler::{Scheduler, SchedulerConfig, Speculation};

use crate::api::{Device, EngineConfig, EngineError, ModelInfo, ModelSource, SpeculativeMode};
use crate::handle::{EngineHandle, Shared};
use crate::validate::RequestBounds;
use crate::worker::Worker;

/// KV-cache bytes on the CPU when [`EngineConfig::kv_cache_memory`] is not set: 256 MiB
/// (about 11,600 tokens of the default model in fp16).
pub const DEFAULT_CPU_KV_CACHE_MEMORY: u64 = 256 << 20;

/// The KV-cache format when [`EngineConfig::kv_cache_dtype`] is not set (on the CPU).
pub const DEFAULT_CPU_KV_CACHE_DTYPE: KvCacheDtype = KvCacheDtype::Fp16;

/// The KV-cache format when [`EngineConfig::kv_cache_dtype`] is not set, on a GPU: the CUDA
/// backend's activation type (as vLLM's `auto` is the model's dtype). fp16 KV under bf16
/// activations runs the CUDA-core decode kernel, not the tensor-core one (kernels-cuda's
/// `DecodeKernel`): on the 8B shape that made `auto` several times slower per step.
pub const DEFAULT_GPU_KV_CACHE_DTYPE: KvCacheDtype = KvCacheDtype::Bf16;

/// Starts engines. See the [crate docs](crate).
#[derive(Debug)]
pub struct Engine;

fn startup(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Startup(format!("{what}: {e}"))
}

fn bad_config(field: &str, reason: impl std::fmt::Display) -> EngineError {
    EngineError::Startup(format!("invalid config `{field}`: {reason}"))
}

/// The KV cache a model gets under `config`: `kv_cache_memory` (or
/// [`DEFAULT_CPU_KV_CACHE_MEMORY`]) divided by the bytes of one block over every layer
/// (`kv_quant::bytes_per_block × num_layers`), and `swap_space` divided the same way for the
/// CPU swap pool. Under tensor parallelism this is one rank's cache: a block holds the rank's
/// local KV heads, and each rank gets the whole budget.
///
/// # Errors
/// [`EngineError::Startup`] naming the field when the block layout is invalid, the budget
/// holds no block, or the model does not shard over `tensor_parallel_size` ranks.
pub fn kv_cache_config(
    config: &EngineConfig,
    model: &ModelConfig,
) -> Result<KvCacheConfig, EngineError> {
    if !SUPPORTED_BLOCK_SIZES.contains(&config.block_size) {
        return Err(bad_config(
            "block_size",
            format!(
                "is {}, must be one of {SUPPORTED_BLOCK_SIZES:?}",
                config.block_size
            ),
        ));
    }
    let dtype = config.kv_cache_dtype.unwrap_or(DEFAULT_CPU_KV_CACHE_DTYPE);
    let kv_heads = rank_shape(config, model, 0)?.num_kv_heads;
    let per_layer = kv_quant::bytes_per_block(dtype, config.block_size, kv_heads, model.head_dim)
        .map_err(|e| bad_config("block_size / kv_cache_dtype", e))?;
    let per_block = (per_layer as u64)
        .checked_mul(model.num_layers as u64)
        .filter(|&b| b > 0)
        .ok_or_else(|| bad_config("block_size", "a KV block's size overflows"))?;
    let budget = config
        .kv_cache_memory
        .unwrap_or(DEFAULT_CPU_KV_CACHE_MEMORY);
    // Slots are i32 in the kernels: the block manager refuses more.
    let max_blocks = (i32::MAX as u64) / config.block_size.max(1) as u64;
    let num_blocks = (budget / per_block).min(max_blocks);
    if num_blocks == 0 {
        return Err(bad_config(
            "kv_cache_memory",
            format!("{budget} bytes hold no KV block of {per_block} bytes"),
        ));
    }
    let num_cpu_blocks = (config.swap_space / per_block).min(max_blocks);
    Ok(KvCacheConfig {
        num_blocks: num_blocks as usize,
        block_size: config.block_size,
        dtype,
        num_cpu_blocks: num_cpu_blocks as usize,
    })
}

/// The part of `model` that tensor-parallel rank `rank` holds (the whole model at size 1).
fn rank_shape(
    config: &EngineConfig,
    model: &ModelConfig,
    rank: usize,
) -> Result<LocalShape, EngineError> {
    let shard = Shard {
        rank,
        world_size: config.tensor_parallel_size,
    };
    LocalShape::new(model, shard).map_err(|e| {
        bad_config(
            "tensor_parallel_size",
            format!(
                "the model does not shard over {} ranks: {e}",
                shard.world_size
            ),
        )
    })
}

/// The seed of [`ModelSource::Dummy`]'s weights.
const DUMMY_SEED: u64 = 0;

/// A model's weights, or only its shape for dummy weights made where they will run (on the
/// GPU, generated there).
enum ModelWeights {
    Loaded(Box<Weights>),
    Dummy(ModelConfig),
}

impl ModelWeights {
    fn config(&self) -> &ModelConfig {
        match self {
            Self::Loaded(w) => w.config(),
            Self::Dummy(c) => c,
        }
    }
}

/// A loaded model's parts.
fn loaded((model, name): (LoadedModel, String)) -> (ModelWeights, Tokenizer, String) {
    (
        ModelWeights::Loaded(Box::new(model.weights)),
        model.tokenizer,
        name,
    )
}

/// [`ModelSource::Dummy`]: the shape in `path` (a `config.json`, or a directory holding one),
/// the directory's `tokenizer.json` (and `tokenizer_config.json`) when present, else a
/// synthetic tokenizer. The name is the directory's.
fn load_dummy(path: &Path) -> Result<(ModelWeights, Tokenizer, String), EngineError> {
    let (dir, file) = if path.is_dir() {
        (path.to_owned(), path.join("config.json"))
    } else {
        let dir = path.parent().map_or_else(|| ".".into(), Path::to_owned);
        (dir, path.to_owned())
    };
    let what = || format!("dummy weights of {}", file.display());
    let text = std::fs::read_to_string(&file).map_err(|e| startup(&what(), e))?;
    let shape = ModelConfig::from_hf_json(&text).map_err(|e| startup(&what(), e))?;
    shape.validate().map_err(|e| startup(&what(), e))?;
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        let mut t =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| startup(&what(), e))?;
        if let Ok(c) = std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            t = t.with_hf_config(&c).map_err(|e| startup(&what(), e))?;
        }
        t
    } else {
        Tokenizer::synthetic(shape.vocab_size).map_err(|e| startup(&what(), e))?
    };
    let name = std::fs::canonicalize(&dir)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "dummy".to_owned());
    Ok((
        ModelWeights::Dummy(shape),
        tokenizer,
        format!("{name} (dummy weights)"),
    ))
}

/// Loads a GGUF file or an HF directory; the name is the file stem or the directory name.
fn load_path(path: &Path) -> Result<(LoadedModel, String), EngineError> {
    load_shard(path, Shard::FULL)
}

/// [`load_path`], keeping `shard`'s weights.
fn load_shard(path: &Path, shard: Shard) -> Result<(LoadedModel, String), EngineError> {
    let loaded = if path.is_dir() {
        model::load_hf_dir(path, shard)
    } else {
        model::load_gguf(path, shard)
    }
    .map_err(|e| {
        let what = if shard.world_size > 1 {
            format!(
                "loading {} as rank {} of {} (tensor_parallel_size)",
                path.display(),
                shard.rank,
                shard.world_size
            )
        } else {
            format!("loading {}", path.display())
        };
        startup(&what, e)
    })?;
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    }
    .map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok((loaded, name))
}

fn check_config(c: &EngineConfig) -> Result<(), EngineError> {
    if c.max_num_seqs == 0 {
        return Err(bad_config("max_num_seqs", "must be at least 1"));
    }
    if c.max_num_batched_tokens == 0 {
        return Err(bad_config("max_num_batched_tokens", "must be at least 1"));
    }
    if c.max_queued_requests == 0 {
        return Err(bad_config("max_queued_requests", "must be at least 1"));
    }
    if c.max_model_len.is_some_and(|l| l < 2) {
        return Err(bad_config("max_model_len", "must be at least 2"));
    }
    if !(c.gpu_memory_utilization > 0.0 && c.gpu_memory_utilization <= 1.0) {
        return Err(bad_config(
            "gpu_memory_utilization",
            format!("is {}, must be in (0, 1]", c.gpu_memory_utilization),
        ));
    }
    if c.speculative.is_some() && !(1..=MAX_K).contains(&c.num_speculative_tokens) {
        return Err(bad_config(
            "num_speculative_tokens",
            format!("is {}, must be in 1..={MAX_K}", c.num_speculative_tokens),
        ));
    }
    if c.limits.max_n == 0 {
        return Err(bad_config("limits.max_n", "must be at least 1"));
    }
    dist_config(c).validate().map_err(|e| {
        bad_config(
            "tensor_parallel_size / nnodes / node_rank / dist_init_addr",
            e,
        )
    })?;
    if c.nnodes > 1 && c.device == Device::Cpu {
        return Err(several_nodes_need_cuda(c.nnodes));
    }
    Ok(())
}

/// The distributed settings of `c`.
fn dist_config(c: &EngineConfig) -> DistConfig {
    DistConfig {
        tensor_parallel_size: c.tensor_parallel_size,
        nnodes: c.nnodes,
        node_rank: c.node_rank,
        dist_init_addr: c.dist_init_addr.clone(),
    }
}

fn several_nodes_need_cuda(nnodes: usize) -> EngineError {
    bad_config(
        "nnodes",
        format!(
            "{nnodes} nodes need CUDA GPUs (NCCL carries the collectives between hosts; on the \
             CPU every rank runs on this host: nnodes 1)"
        ),
    )
}

/// How long a node waits at the rendezvous for the others (they may be loading weights).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);

/// The GPU `device` asks for: none for the CPU; for `auto`, device 0 if it opens (else the
/// CPU, with one log line); for `cuda`, device 0 or an error saying why not.
fn select_device(device: Device) -> Result<Option<Gpu>, EngineError> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda => Gpu::new(0)
            .map(Some)
            .map_err(|e| bad_config("device", format!("cuda was asked for: {e}"))),
        Device::Auto => match Gpu::new(0) {
            Ok(gpu) => Ok(Some(gpu)),
            Err(e) => {
                tracing::info!("device auto: {e}; running on the CPU");
                Ok(None)
            }
        },
    }
}

/// Bytes of one rank's weights on its GPU (bf16; the whole model at `tensor_parallel_size` 1).
fn gpu_weight_bytes(config: &EngineConfig, m: &ModelConfig) -> Result<u64, EngineError> {
    let local = rank_shape(config, m, 0)?;
    let (h, d) = (m.hidden_size as u64, m.head_dim as u64);
    let attn = h * d * (2 * local.num_heads as u64 + 2 * local.num_kv_heads as u64);
    let mlp = 3 * h * local.intermediate_size as u64;
    let vocab = m.vocab_size.div_ceil(config.tensor_parallel_size.max(1)) as u64;
    let embed = vocab * h * if m.tie_word_embeddings { 1 } else { 2 };
    Ok(2 * (m.num_layers as u64 * (attn + mlp + 2 * h) + embed + h))
}

/// The KV budget on a GPU (each rank's GPU) when none is set: `gpu_memory_utilization` of the
/// device's memory, less the (rank's) weights and 1 GiB for activations and workspaces.
fn gpu_kv_budget(gpu: &Gpu, config: &EngineConfig, m: &ModelConfig) -> Result<u64, EngineError> {
    let total = gpu
        .context()
        .total_mem()
        .map_err(|e| startup("reading the GPU's memory size", e))? as u64;
    let usable = (total as f64 * config.gpu_memory_utilization) as u64;
    let weights = gpu_weight_bytes(config, m)?;
    let budget = usable.saturating_sub(weights).saturating_sub(1 << 30);
    if budget == 0 {
        return Err(bad_config(
            "gpu_memory_utilization",
            format!(
                "{usable} bytes of the GPU leave nothing for the KV cache after {weights} bytes of weights",
            ),
        ));
    }
    Ok(budget)
}

fn speculation(
    mode: &SpeculativeMode,
    config: &EngineConfig,
    target: &ModelConfig,
    kv: KvCacheConfig,
) -> Result<Speculation, EngineError> {
    let controller = SpecController::new(SpecControllerConfig {
        max_k: config.num_speculative_tokens,
        ..SpecControllerConfig::default()
    })
    .map_err(|e| bad_config("num_speculative_tokens", e))?;
    let proposer: Box<dyn Proposer> = match mode {
        SpeculativeMode::Ngram => Box::new(
            NgramProposer::new(NgramConfig::default()).map_err(|e| bad_config("speculative", e))?,
        ),
        SpeculativeMode::Draft(path) => {
            let (draft, _) = load_path(path)?;
            let dc = draft.weights.config();
            if dc.vocab_size != target.vocab_size {
                return Err(bad_config(
                    "speculative",
                    format!(
                        "the draft model's vocabulary has {} tokens, the target's {}",
                        dc.vocab_size, target.vocab_size
                    ),
                ));
            }
            // The draft cache holds as many blocks as the target's, in the same format.
            let cache = KvCacheConfig {
                num_cpu_blocks: 0,
                ..kv
            };
            let backend =
                CpuBackend::new(draft.weights, cache).map_err(|e| startup("draft model", e))?;
            Box::new(
                DraftModelProposer::new(Box::new(backend), DraftModelConfig::default())
                    .map_err(|e| startup("draft model", e))?,
            )
        }
    };
    Ok(Speculation::new(proposer, controller))
}

/// Where each rank of a tensor-parallel group gets its weights.
enum RankWeights {
    /// The shard of this node's first rank (`first_rank`), loaded while reading the
    /// tokenizer, until that rank takes it; the other ranks load theirs from the file.
    File {
        path: PathBuf,
        first_rank: usize,
        first: Mutex<Option<Box<Weights>>>,
    },
    /// Generated (the dummy model), each rank its own shard.
    Dummy(ModelConfig),
}

impl RankWeights {
    fn load(&self, shard: Shard) -> Result<Weights, ModelError> {
        match self {
            Self::File {
                path,
                first_rank,
                first,
            } => {
                let preloaded = if shard.rank == *first_rank {
                    first.lock().ok().and_then(|mut w| w.take())
                } else {
                    None
                };
                preloaded.map_or_else(|| model::load_weights(path, shard), |w| Ok(*w))
            }
            Self::Dummy(c) => Weights::dummy_shard(c, DType::Q8_0, DUMMY_SEED, shard),
        }
    }
}

/// Where each rank's weights come from, with the tokenizer, the model's name and its shape.
fn rank_sources(
    config: &EngineConfig,
) -> Result<(RankWeights, Tokenizer, String, ModelConfig), EngineError> {
    // This node's first rank (rank 0 on node 0).
    let dist = dist_config(config);
    let shard0 = Shard {
        rank: dist.local_ranks().start,
        world_size: config.tensor_parallel_size,
    };
    let path = match &config.model {
        ModelSource::Default => Some(
            model::ensure_default_model(&model::fetch::default_models_dir())
                .map_err(|e| startup("fetching the default model", e))?,
        ),
        ModelSource::Path(path) => Some(path.clone()),
        ModelSource::Dummy(_) => None,
    };
    let (source, tokenizer, name) = match (&config.model, path) {
        (ModelSource::Dummy(dir), _) => match load_dummy(dir)? {
            (ModelWeights::Dummy(c), tokenizer, name) => (RankWeights::Dummy(c), tokenizer, name),
            (ModelWeights::Loaded(_), ..) => {
                return Err(startup("dummy weights", "loaded real weights"));
            }
        },
        (_, Some(path)) => {
            // Loading checks first that the model shards evenly (the error names what does
            // not divide), before reading any weight.
            let (loaded, name) = load_shard(&path, shard0)?;
            let source = RankWeights::File {
                path,
                first_rank: shard0.rank,
                first: Mutex::new(Some(Box::new(loaded.weights))),
            };
            (source, loaded.tokenizer, name)
        }
        (_, None) => return Err(startup("loading the model", "no path")),
    };
    let shape = match &source {
        RankWeights::Dummy(c) => c.clone(),
        RankWeights::File { first, .. } => first
            .lock()
            .ok()
            .and_then(|w| w.as_ref().map(|w| w.config().clone()))
            .ok_or_else(|| startup("loading the model", "the first rank's weights are gone"))?,
    };
    // A shape that does not shard fails here, naming what does not divide.
    rank_shape(config, &shape, 0)?;
    Ok((source, tokenizer, name, shape))
}

/// The CPU backend over `tensor_parallel_size` ranks: a [`TensorParallelBackend`] whose rank
/// threads each load their shard and build a sharded [`CpuBackend`] over one
/// [`ThreadGroup`], each with its own KV cache of its local KV heads.
fn tensor_parallel_cpu(
    config: &EngineConfig,
) -> Result<(Box<dyn Backend + Send>, Tokenizer, String), EngineError> {
    let tp = config.tensor_parallel_size;
    let (source, tokenizer, name, shape) = rank_sources(config)?;
    let kv = kv_cache_config(config, &shape)?;
    tracing::info!(
        ranks = tp,
        "tensor parallelism on the CPU: {} KV blocks of {} tokens ({}) per rank",
        kv.num_blocks,
        kv.block_size,
        kv.dtype
    );
    let members = ThreadGroup::new(tp).map_err(|e| bad_config("tensor_parallel_size", e))?;
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let backend = TensorParallelBackend::spawn(tp, group, move |rank| {
        let member = members
            .get(rank)
            .cloned()
            .ok_or_else(|| ModelError::Unsupported(format!("rank {rank} of a group of {tp}")))?;
        let weights = source.load(member.shard())?;
        CpuBackend::new_sharded(weights, kv, Arc::new(member))
    })
    .map_err(|e| startup("tensor-parallel ranks", e))?;
    Ok((Box::new(backend), tokenizer, name))
}

/// The KV cache of one GPU (of each rank's GPU): the configured dtype or the GPU default,
/// the configured budget or what `gpu_memory_utilization` leaves after the (rank's) weights.
fn gpu_kv_config(
    gpu: &Gpu,
    config: &EngineConfig,
    shape: &ModelConfig,
) -> Result<KvCacheConfig, EngineError> {
    let mut sized = config.clone();
    sized.kv_cache_dtype = sized.kv_cache_dtype.or(Some(DEFAULT_GPU_KV_CACHE_DTYPE));
    if sized.kv_cache_memory.is_none() {
        sized.kv_cache_memory = Some(gpu_kv_budget(gpu, config, shape)?);
    }
    kv_cache_config(&sized, shape)
}

/// The GPUs of this node's ranks, with their weights and KV cache: what every CUDA rank of
/// this node needs to start (from [`cuda_ranks`]).
struct CudaRanks {
    dist: DistConfig,
    source: RankWeights,
    kv: KvCacheConfig,
}

/// Checks this node has a GPU per local rank, reads the model (this node's first shard and
/// the tokenizer, returned with the model's name) and sizes each rank's KV cache on `gpu0`
/// (the node's first GPU).
fn cuda_ranks(
    config: &EngineConfig,
    gpu0: Gpu,
) -> Result<(CudaRanks, Tokenizer, String), EngineError> {
    let dist = dist_config(config);
    let local = dist.gpus_per_node();
    let visible = dist::local_gpu_count().map_err(|e| bad_config("device", e))?;
    if visible < local {
        return Err(bad_config(
            "tensor_parallel_size",
            format!(
                "{local} ranks on this node need {local} GPUs (one per rank), {visible} visible"
            ),
        ));
    }
    let (source, tokenizer, name, shape) = rank_sources(config)?;
    let kv = gpu_kv_config(&gpu0, config, &shape)?;
    tracing::info!(
        ranks = config.tensor_parallel_size,
        node = dist.node_rank,
        nodes = dist.nnodes,
        "tensor parallelism over {} GPUs ({local} on this node, {}): {} KV blocks of {} tokens ({}) per rank",
        config.tensor_parallel_size,
        gpu0.name(),
        kv.num_blocks,
        kv.block_size,
        kv.dtype
    );
    Ok((CudaRanks { dist, source, kv }, tokenizer, name))
}

impl CudaRanks {
    /// What builds world rank `rank` on its thread: it opens its GPU (local index `rank -
    /// first local rank`), loads its shard (dummy weights: generated on its GPU), waits at a
    /// gate until every local rank has its GPU and weights (one that failed stops all before
    /// NCCL starts, so none waits in `ncclCommInitRank`), joins the NCCL group `id` and builds
    /// its sharded [`CudaBackend`].
    fn builder(
        self,
        id: dist::UniqueId,
    ) -> impl Fn(usize) -> Result<CudaBackend, ModelError> + Send + Sync + 'static {
        let Self { dist, source, kv } = self;
        let world = dist.tensor_parallel_size;
        let first = dist.local_ranks().start;
        let gate = dist::StartGate::new(dist.gpus_per_node());
        move |rank| {
            let shard = Shard {
                rank,
                world_size: world,
            };
            // Nothing may return before the gate: the other ranks wait there.
            let ready = Gpu::new(rank.saturating_sub(first))
                .map_err(ModelError::from)
                .and_then(|gpu| {
                    let weights = match &source {
                        RankWeights::Dummy(_) => None,
                        file => Some(file.load(shard)?),
                    };
                    Ok((gpu, weights))
                });
            let (gpu, weights) = gate.pass(ready, || ModelError::Collective {
                operation: "start",
                reason: "not started: another rank could not open its GPU or load its weights"
                    .into(),
            })?;
            let comm = CommCollective::join_nccl(&gpu, rank, world, &id)?;
            let collective = Box::new(comm);
            match (&source, weights) {
                (RankWeights::Dummy(c), _) => {
                    CudaBackend::dummy_sharded(c, kv, gpu, DUMMY_SEED, collective)
                }
                (_, Some(w)) => CudaBackend::new_sharded(&w, kv, gpu, collective),
                (_, None) => Err(ModelError::Unsupported("a rank without weights".into())),
            }
        }
    }
}

/// The CUDA backend over `tensor_parallel_size` GPUs: a [`TensorParallelBackend`] whose
/// rank threads each build a sharded [`CudaBackend`] ([`CudaRanks::builder`]). With several
/// nodes this is node 0: it makes the NCCL unique id, hands it to the other nodes at the
/// rendezvous (`dist_init_addr`) and drives their ranks over the connections it keeps.
fn tensor_parallel_cuda(
    config: &EngineConfig,
    gpu0: Gpu,
) -> Result<(Box<dyn Backend + Send>, Tokenizer, String), EngineError> {
    let (ranks, tokenizer, name) = cuda_ranks(config, gpu0)?;
    let dist = ranks.dist.clone();
    let id = NcclCommunicator::unique_id().map_err(|e| startup("NCCL", e))?;
    let group: Arc<dyn GroupAbort> = Arc::new(dist::NcclGroup::new());
    let backend = if dist.nnodes == 1 {
        TensorParallelBackend::spawn(dist.tensor_parallel_size, group, ranks.builder(id))
    } else {
        let addr = dist.dist_init_addr.clone().unwrap_or_default();
        tracing::info!("waiting at {addr} for {} more nodes", dist.nnodes - 1);
        let remotes = Rendezvous::for_config(&dist, RENDEZVOUS_TIMEOUT)
            .bind(addr.as_str())
            .and_then(|host| host.serve_keep(&id))
            .map_err(|e| startup("the rendezvous of the nodes (node 0)", e))?;
        TensorParallelBackend::spawn_multi_node(&dist, remotes, group, ranks.builder(id))
    }
    .map_err(|e| startup("tensor-parallel ranks", e))?;
    Ok((Box::new(backend), tokenizer, name))
}

impl Engine {
    /// Loads the model ([`ModelSource::Default`]: the default model, fetched if missing; a
    /// path: a GGUF file or an HF directory), sizes the KV pool from the memory budget
    /// ([`kv_cache_config`]; on a GPU, what `gpu_memory_utilization` leaves after the weights),
    /// builds the backend `device` asks for and starts the step loop. With
    /// `tensor_parallel_size > 1` (CPU only for now) the backend is a
    /// [`dist::TensorParallelBackend`] of sharded CPU backends, one thread per rank, each
    /// loading its own shard and holding its own KV cache.
    ///
    /// # Errors
    /// [`EngineError::Startup`] naming what failed (config field, model file, fetch).
    pub fn start(config: EngineConfig) -> Result<EngineHandle, EngineError> {
        check_config(&config)?;
        // Before loading anything: a missing GPU fails fast.
        let gpu = select_device(config.device)?;
        if config.node_rank != 0 {
            return Err(bad_config(
                "node_rank",
                format!(
                    "node {} of {} serves its ranks to node 0, where the engine runs \
                     (Engine::serve_node; `kvserve serve` does it on that node)",
                    config.node_rank, config.nnodes
                ),
            ));
        }
        if config.tensor_parallel_size > 1 {
            let (backend, tokenizer, name) = match gpu {
                Some(gpu) => tensor_parallel_cuda(&config, gpu)?,
                None if config.nnodes > 1 => return Err(several_nodes_need_cuda(config.nnodes)),
                None => tensor_parallel_cpu(&config)?,
            };
            return Self::start_with_backend(config, backend, tokenizer, name);
        }
        let (weights, tokenizer, name) = match &config.model {
            ModelSource::Default => {
                let path = model::ensure_default_model(&model::fetch::default_models_dir())
                    .map_err(|e| startup("fetching the default model", e))?;
                loaded(load_path(&path)?)
            }
            ModelSource::Path(path) => loaded(load_path(path)?),
            ModelSource::Dummy(path) => load_dummy(path)?,
        };
        let shape = weights.config().clone();
        let backend: Box<dyn Backend + Send> = match gpu {
            Some(gpu) => {
                let kv = gpu_kv_config(&gpu, &config, &shape)?;
                tracing::info!(
                    "device: {} ({}), {} KV blocks of {} tokens ({})",
                    gpu.name(),
                    gpu.arch(),
                    kv.num_blocks,
                    kv.block_size,
                    kv.dtype
                );
                let backend = match &weights {
                    ModelWeights::Loaded(w) => CudaBackend::new(w, kv, gpu),
                    ModelWeights::Dummy(c) => CudaBackend::dummy(c, kv, gpu, DUMMY_SEED),
                };
                let backend = backend.map_err(|e| startup("the CUDA backend", e))?;
                let (kernels, took) = backend.preloaded();
                tracing::info!(
                    "CUDA kernels ready in {:.1} s ({} modules compiled, {} from the disk cache)",
                    took.as_secs_f64(),
                    kernels.compiled,
                    kernels.cached
                );
                Box::new(backend)
            }
            None => {
                let kv = kv_cache_config(&config, &shape)?;
                let weights = match weights {
                    ModelWeights::Loaded(w) => *w,
                    ModelWeights::Dummy(c) => Weights::dummy(&c, DType::Q8_0, DUMMY_SEED)
                        .map_err(|e| startup("dummy weights", e))?,
                };
                Box::new(CpuBackend::new(weights, kv).map_err(|e| startup("KV cache", e))?)
            }
        };
        Self::start_with_backend(config, backend, tokenizer, name)
    }

    /// Serves this node's tensor-parallel ranks to node 0 (a node other than 0 of several:
    /// `nnodes > 1`, `node_rank > 0`): joins the rendezvous at `dist_init_addr`, which gives
    /// the NCCL unique id and keeps the connection, builds the node's ranks on its GPUs (as
    /// node 0 builds its own, the model read from the same path on every node) and runs every
    /// step node 0's engine sends over that connection, until node 0 shuts down (`Ok`) or the
    /// connection breaks. Blocks for as long as it serves.
    ///
    /// # Errors
    /// [`EngineError::Startup`] naming the config field for node 0 or a single node (they
    /// run [`Engine::start`]), a node without CUDA GPUs or fewer GPUs than its ranks; naming
    /// the rendezvous, a rank that could not build, or the broken connection otherwise.
    pub fn serve_node(config: EngineConfig) -> Result<(), EngineError> {
        check_config(&config)?;
        if config.nnodes < 2 || config.node_rank == 0 {
            return Err(bad_config(
                "node_rank",
                format!(
                    "node {} of {} runs the engine (Engine::start), not a node's ranks",
                    config.node_rank, config.nnodes
                ),
            ));
        }
        let gpu =
            select_device(config.device)?.ok_or_else(|| several_nodes_need_cuda(config.nnodes))?;
        let (ranks, ..) = cuda_ranks(&config, gpu)?;
        let dist = ranks.dist.clone();
        let addr = dist.dist_init_addr.clone().unwrap_or_default();
        tracing::info!(
            "node {} of {}: joining the rendezvous at {addr}",
            dist.node_rank,
            dist.nnodes
        );
        let (id, stream) = Rendezvous::for_config(&dist, RENDEZVOUS_TIMEOUT)
            .join_keep(addr.as_str(), dist.node_rank)
            .map_err(|e| startup("the rendezvous of the nodes", e))?;
        let group: Arc<dyn GroupAbort> = Arc::new(dist::NcclGroup::new());
        dist::serve_remote_ranks(stream, &dist, group, ranks.builder(id))
            .map_err(|e| startup("serving this node's ranks to node 0", e))
    }

    /// Starts the step loop over a prebuilt backend and tokenizer (tests: tiny models, fault
    /// injection). The KV pool is the backend's ([`Backend::kv_cache_config`]): the config's
    /// `device`, `block_size`, `kv_cache_dtype`, `kv_cache_memory` and `swap_space` are not
    /// used.
    ///
    /// # Errors
    /// [`EngineError::Startup`] naming the config field.
    pub fn start_with_backend(
        config: EngineConfig,
        backend: Box<dyn Backend + Send>,
        tokenizer: Tokenizer,
        model_name: String,
    ) -> Result<EngineHandle, EngineError> {
        check_config(&config)?;
        let model = backend.config().clone();
        let kv = backend.kv_cache_config();
        let mut bmc = BlockManagerConfig::new(kv.num_blocks);
        bmc.num_cpu_blocks = kv.num_cpu_blocks;
        bmc.block_size = kv.block_size;
        bmc.enable_prefix_caching = config.enable_prefix_caching;
        bmc.sliding_window = model.sliding_window;
        // What admission can ever use: the pool above the watermark (as the scheduler's
        // NeverFits check counts it).
        let watermark = (bmc.watermark * kv.num_blocks as f64) as usize;
        let pool_blocks = kv.num_blocks.saturating_sub(watermark);
        let fits_window = model
            .sliding_window
            .is_some_and(|w| w.div_ceil(kv.block_size.max(1)) < pool_blocks);
        // A sequence of L tokens holds KV for L - 1 of them.
        let pool_len = if fits_window {
            usize::MAX
        } else {
            pool_blocks.saturating_mul(kv.block_size).saturating_add(1)
        };
        let wanted = config
            .max_model_len
            .unwrap_or(model.max_position_embeddings);
        let max_model_len = wanted.min(pool_len).min(u32::MAX as usize);
        if max_model_len < wanted {
            tracing::warn!(
                wanted,
                max_model_len,
                "max_model_len capped to what the KV pool holds"
            );
        }
        if max_model_len < 2 {
            return Err(bad_config(
                "kv_cache_memory",
                format!(
                    "the KV pool ({} blocks of {} slots) holds no sequence",
                    kv.num_blocks, kv.block_size
                ),
            ));
        }
        let bm = BlockManager::new(bmc).map_err(|e| startup("KV pool", e))?;
        let vocab = model.vocab_size.min(tokenizer.vocab_size());
        let mut sc = SchedulerConfig::new(max_model_len);
        sc.max_num_batched_tokens = config.max_num_batched_tokens;
        sc.max_num_seqs = config.max_num_seqs;
        sc.preemption_mode = config.preemption_mode;
        sc.eos_token_ids = tokenizer.eos_token_ids().to_vec();
        sc.vocab_size = Some(vocab);
        let mut sched = Scheduler::new(sc, bm).map_err(|e| startup("scheduler", e))?;
        if let Some(mode) = &config.speculative {
            sched.set_speculation(Some(speculation(mode, &config, &model, kv)?));
        }
        let info = ModelInfo {
            model: model_name,
            max_model_len: max_model_len as u32,
            vocab_size: u32::try_from(model.vocab_size).unwrap_or(u32::MAX),
            kv_cache_dtype: kv.dtype.to_string(),
            block_size: u32::try_from(kv.block_size).unwrap_or(u32::MAX),
            num_blocks: u32::try_from(kv.num_blocks).unwrap_or(u32::MAX),
            device: backend.device(),
        };
        let bounds = RequestBounds {
            limits: config.limits,
            vocab_size: vocab,
            max_model_len,
            max_num_seqs: config.max_num_seqs,
        };
        let tokenizer = Arc::new(tokenizer);
        let shared = Arc::new(Shared::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = Worker::new(
            sched,
            backend,
            Arc::clone(&tokenizer),
            Arc::clone(&shared),
            rx,
            vocab,
        );
        let thread = std::thread::Builder::new()
            .name("kvserve-step-loop".into())
            .spawn(move || worker.run_guarded())
            .map_err(|e| startup("spawning the step loop", e))?;
        Ok(EngineHandle::new(
            shared,
            tx,
            tokenizer,
            info,
            bounds,
            config.max_queued_requests,
            thread,
        ))
    }
}
