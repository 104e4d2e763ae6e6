//! Configuration of a [`BlockManager`](crate::BlockManager).

use crate::BlockManagerError;

/// Block sizes (token slots per block) the kernels are built for.
pub const SUPPORTED_BLOCK_SIZES: [usize; 4] = [8, 16, 32, 64];

/// The default number of token slots per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// How a [`BlockManager`](crate::BlockManager) is laid out. Fields are public; build one with
/// [`BlockManagerConfig::new`] and adjust what you need, then [`BlockManager::new`](crate::BlockManager::new)
/// validates it.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockManagerConfig {
    /// Physical KV blocks on the GPU.
    pub num_gpu_blocks: usize,
    /// Physical blocks of the CPU swap pool (0 disables swapping).
    pub num_cpu_blocks: usize,
    /// Token slots per block: one of [`SUPPORTED_BLOCK_SIZES`].
    pub block_size: usize,
    /// Keep full blocks in a content-addressed cache for reuse by later sequences.
    pub enable_prefix_caching: bool,
    /// Sliding attention window `W`: a token attends to itself and the `W - 1` tokens before it.
    /// Blocks entirely outside the window are released.
    pub sliding_window: Option<usize>,
    /// Fraction of GPU blocks that admission keeps free for running sequences, in `[0, 1)`.
    pub watermark: f64,
}

impl BlockManagerConfig {
    /// A config with `num_gpu_blocks` blocks and defaults elsewhere: block size 16, no swap pool,
    /// prefix caching on, no sliding window, 1% watermark.
    pub fn new(num_gpu_blocks: usize) -> Self {
        Self {
            num_gpu_blocks,
            num_cpu_blocks: 0,
            block_size: DEFAULT_BLOCK_SIZE,
            enable_prefix_caching: true,
            sliding_window: None,
            watermark: 0.01,
        }
    }

    /// Watermark in blocks.
    pub(crate) fn watermark_blocks(&self) -> usize {
        // A floor of a fraction of the pool: truncation is intended.
        (self.watermark * self.num_gpu_blocks as f64) as usize
    }

    pub(crate) fn validate(&self) -> Result<(), BlockManagerError> {
        let invalid =
            |field, reason: String| Err(BlockManagerError::InvalidConfig { field, reason });
        if !SUPPORTED_BLOCK_SIZES.contains(&self.block_size) {
            return invalid(
                "block_size",
                format!(
                    "is {}, must be one of {SUPPORTED_BLOCK_SIZES:?}",
                    self.block_size
                ),
            );
        }
        if self.num_gpu_blocks == 0 {
            return invalid("num_gpu_blocks", "must be at least 1".into());
        }
        // Slots (block * block_size + offset) and block ids are handed to kernels as i32/i64;
        // keep every slot index within i32 so both fit.
        let max_blocks = i32::MAX as usize / self.block_size;
        for (field, n) in [
            ("num_gpu_blocks", self.num_gpu_blocks),
            ("num_cpu_blocks", self.num_cpu_blocks),
        ] {
            if n > max_blocks {
                return invalid(
                    field,
                    format!(
                        "is {n}, more than {max_blocks} blocks of {} slots",
                        self.block_size
                    ),
                );
            }
        }
        if self.sliding_window == Some(0) {
            return invalid("sliding_window", "must be at least 1 token".into());
        }
        if !(0.0..1.0).contains(&self.watermark) {
            return invalid(
                "watermark",
                format!("is {}, must be in [0, 1)", self.watermark),
            );
        }
        Ok(())
    }
}
