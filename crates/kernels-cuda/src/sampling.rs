//! Logits processing and sampling on the device (`kernels/sampling.cu`): one token per row of
//! logits, with the engine's pipeline (repetition penalty, greedy or temperature, top-k,
//! top-p, min-p, inverse-CDF draw at a uniform number the caller draws from the request's own
//! random stream). Only the chosen tokens come back to the host, not the logits.
#![allow(unsafe_code)]

use cudarc::driver::{CudaSlice, LaunchConfig};

use crate::attention::ActScalar;
use crate::compile::Variant;
use crate::device::Gpu;
use crate::error::{KernelError, Result, bad};
use crate::launch::Launch;

const KERNEL: &str = "sample_rows";
/// Threads per row (the kernel's `kThreads`).
const THREADS: u32 = 1024;
/// Largest row the history bitmap fits in shared memory for (the 48 KiB default, less the
/// kernel's static shared memory).
pub const MAX_SAMPLING_VOCAB: usize = 8 * (44 * 1024);

/// How one row is sampled. The same meaning and limits as the engine's `SamplingParams`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling<'a> {
    /// Softmax temperature, finite and `>= 0`; 0 is greedy (`uniform` unused).
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: u32,
    /// Nucleus mass in `(0, 1]`.
    pub top_p: f32,
    /// Drop tokens below `min_p` times the top probability, in `[0, 1]`.
    pub min_p: f32,
    /// Repetition penalty, finite and `> 0` (1: none), over the ids of `history`.
    pub repetition_penalty: f32,
    /// Token ids the penalty applies to (duplicates allowed; ignored when the penalty is 1).
    pub history: &'a [u32],
    /// The draw, uniform in `[0, 1)`.
    pub uniform: f64,
}

impl RowSampling<'_> {
    /// Checks the parameters' ranges; the error names the first one out of range.
    ///
    /// # Errors
    /// A description such as `"top_p 1.5"`.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            Err(format!("temperature {}", self.temperature))
        } else if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            Err(format!("top_p {}", self.top_p))
        } else if !(0.0..=1.0).contains(&self.min_p) {
            Err(format!("min_p {}", self.min_p))
        } else if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            Err(format!("repetition_penalty {}", self.repetition_penalty))
        } else if !(0.0..1.0).contains(&self.uniform) {
            Err(format!("uniform {}", self.uniform))
        } else if self.top_k > i32::MAX as u32 {
            Err(format!("top_k {}", self.top_k))
        } else {
            Ok(())
        }
    }
}

/// Samples one token per row of `logits` (`[rows.len()][vocab]`): ids at or past
/// `sample_vocab` are never drawn (padding of the LM head). `None` for a row without a finite
/// logit. Synchronizes: the tokens are on the host when it returns.
///
/// # Errors
/// [`KernelError::BadArgument`] for sizes that do not fit or parameters out of range (checked
/// before launching), [`KernelError::Unsupported`] for a vocabulary over
/// [`MAX_SAMPLING_VOCAB`]; compile and driver errors.
pub fn sample_rows<T: ActScalar>(
    gpu: &Gpu,
    logits: &CudaSlice<T>,
    vocab: usize,
    sample_vocab: usize,
    rows: &[RowSampling<'_>],
) -> Result<Vec<Option<u32>>> {
    if vocab == 0 || sample_vocab == 0 {
        return Err(bad(
            KERNEL,
            format!("vocab {vocab}, sample_vocab {sample_vocab}"),
        ));
    }
    if vocab > MAX_SAMPLING_VOCAB {
        return Err(KernelError::Unsupported {
            kernel: KERNEL,
            what: format!("a vocabulary of {vocab} (at most {MAX_SAMPLING_VOCAB})"),
        });
    }
    // More rows than sampled may follow (padded batches of CUDA graphs): they are not read.
    if logits.len() < rows.len() * vocab || !logits.len().is_multiple_of(vocab) {
        return Err(bad(
            KERNEL,
            format!("{} logits for {} rows of {vocab}", logits.len(), rows.len()),
        ));
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    if rows.len() > i32::MAX as usize {
        return Err(bad(KERNEL, format!("{} rows", rows.len())));
    }
    let mut params = Vec::with_capacity(4 * rows.len());
    let mut top_k = Vec::with_capacity(rows.len());
    let mut uniform = Vec::with_capacity(rows.len());
    let mut offsets = Vec::with_capacity(rows.len() + 1);
    let mut ids: Vec<i32> = Vec::new();
    offsets.push(0i32);
    for (i, r) in rows.iter().enumerate() {
        r.check()
            .map_err(|reason| bad(KERNEL, format!("row {i}: {reason}")))?;
        params.extend([r.temperature, r.top_p, r.min_p, r.repetition_penalty]);
        top_k.push(r.top_k as i32);
        uniform.push(r.uniform);
        if r.repetition_penalty != 1.0 {
            // Ids outside the row are skipped by the kernel; clamp huge ones into "outside".
            ids.extend(r.history.iter().map(|&t| t.min(i32::MAX as u32) as i32));
        }
        let end = i32::try_from(ids.len())
            .map_err(|_| bad(KERNEL, format!("{} history ids in one call", ids.len())))?;
        offsets.push(end);
    }
    if ids.is_empty() {
        ids.push(0); // a device buffer cannot be empty; no offset points at it
    }
    let stream = gpu.stream();
    let params = stream.clone_htod(&params)?;
    let top_k = stream.clone_htod(&top_k)?;
    let uniform = stream.clone_htod(&uniform)?;
    let offsets = stream.clone_htod(&offsets)?;
    let ids = stream.clone_htod(&ids)?;
    let mut out = stream.alloc_zeros::<i32>(rows.len())?;
    let f = gpu.function(&Variant::sampling(T::SCALAR), KERNEL)?;
    let vocab_i = vocab as i32;
    let sample_vocab_i = sample_vocab.min(vocab) as i32;
    let cfg = LaunchConfig {
        grid_dim: (rows.len() as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: (4 * vocab.div_ceil(32)) as u32,
    };
    let mut launch = Launch::new(gpu, &f);
    launch
        .arg(&mut out)
        .arg(logits)
        .arg(&params)
        .arg(&top_k)
        .arg(&uniform)
        .arg(&offsets)
        .arg(&ids)
        .arg(&vocab_i)
        .arg(&sample_vocab_i);
    // SAFETY: matches `sample_rows` in kernels/sampling.cu: logits hold rows x vocab values,
    // params 4 per row, top_k, uniform and out one per row, offsets rows + 1 increasing
    // entries into ids (checked or built above); the bitmap of ceil(vocab / 32) words fits
    // the default shared memory (vocab <= MAX_SAMPLING_VOCAB).
    // The kernel calls kvs_wait_prior() before touching any buffer (PDL).
    unsafe { launch.dependent().launch(cfg) }?;
    let out = stream.clone_dtoh(&out)?;
    Ok(out.into_iter().map(|t| u32::try_from(t).ok()).collect())
}
