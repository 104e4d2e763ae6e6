//! A step's per-token index arrays (token ids, positions, KV slots, row picks) on the device,
//! uploaded once per step and checked once on the host: every layer's launch reuses them and
//! checks only their recorded range against its own bounds.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::device::Gpu;
use crate::error::{Result, bad};

/// An integer type an index array holds on the device.
pub trait Index: DeviceRepr + ValidAsZeroBits + Copy + Into<i64> + Unpin {}
impl Index for i32 {}
impl Index for i64 {}

/// Index values on the device, with their smallest and largest value known to the host.
#[derive(Debug)]
pub struct Indices<I: Index> {
    dev: CudaSlice<I>,
    len: usize,
    min: i64,
    max: i64,
}

impl<I: Index> Indices<I> {
    /// Uploads `values`.
    ///
    /// # Errors
    /// Driver errors.
    pub fn new(gpu: &Gpu, values: &[I]) -> Result<Self> {
        let (mut min, mut max) = (i64::MAX, i64::MIN);
        for &v in values {
            let v: i64 = v.into();
            min = min.min(v);
            max = max.max(v);
        }
        let stream = gpu.stream();
        // A zero-length device buffer cannot be allocated: keep one unused element.
        let dev = match values.first() {
            Some(_) => stream.clone_htod(values)?,
            None => stream.alloc_zeros::<I>(1)?,
        };
        Ok(Self {
            dev,
            len: values.len(),
            min,
            max,
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The smallest value (`i64::MAX` when empty).
    pub fn min(&self) -> i64 {
        self.min
    }

    /// The largest value (`i64::MIN` when empty).
    pub fn max(&self) -> i64 {
        self.max
    }

    pub(crate) fn device(&self) -> &CudaSlice<I> {
        &self.dev
    }
}

impl Indices<i32> {
    /// Uploads `values` as 32-bit indices (token ids, positions, rows).
    ///
    /// # Errors
    /// [`crate::KernelError::BadArgument`] naming `what` for a value above `i32::MAX`; driver
    /// errors.
    pub fn from_u32(gpu: &Gpu, values: &[u32], what: &'static str) -> Result<Self> {
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|&(_, &v)| v > i32::MAX as u32)
        {
            return Err(bad(what, format!("value {i} is {v}, above i32::MAX")));
        }
        let v: Vec<i32> = values.iter().map(|&v| v as i32).collect();
        Self::new(gpu, &v)
    }
}
