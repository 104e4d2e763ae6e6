//! A step's per-token index arrays (token ids, positions, KV slots, row picks) on the device,
//! uploaded once per step and checked once on the host: every layer's launch reuses them and
//! checks only their recorded range against its own bounds. Indices either own their device
//! buffer ([`Indices::new`]) or live in a [`StepStaging`](crate::StepStaging) area, uploaded
//! with the step's other metadata in one copy into a fixed device buffer (CUDA graphs).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::device::Gpu;
use crate::error::{Result, bad};
use crate::launch::{KernelArg, Launch};

/// An integer type an index array holds on the device.
pub trait Index: DeviceRepr + ValidAsZeroBits + Copy + Default + Into<i64> + Unpin {}
impl Index for i32 {}
impl Index for i64 {}

/// Values of type `I` on the device: a buffer of their own, or a range of a shared byte
/// buffer (a staging area's device side, kept alive by the `Arc`).
#[derive(Debug)]
pub(crate) enum DeviceArray<I> {
    Owned(CudaSlice<I>),
    Shared {
        base: Arc<CudaSlice<u8>>,
        /// Byte offset of the first value (a multiple of `align_of::<I>()`).
        offset: usize,
    },
}

impl<I> DeviceArray<I> {
    /// The array as a kernel argument (its device address).
    pub(crate) fn arg(&self) -> DeviceArrayArg<'_, I> {
        DeviceArrayArg(self)
    }
}

/// A [`DeviceArray`] passed to a kernel.
pub(crate) struct DeviceArrayArg<'b, I>(&'b DeviceArray<I>);

impl<'a, 'b: 'a, I> KernelArg<'a> for DeviceArrayArg<'b, I> {
    fn push(self, launch: &mut Launch<'a>) {
        match self.0 {
            DeviceArray::Owned(s) => s.push(launch),
            DeviceArray::Shared { base, offset } => launch.push_device_offset(base, *offset),
        }
    }
}

/// Index values on the device, with their smallest and largest value known to the host.
#[derive(Debug)]
pub struct Indices<I: Index> {
    dev: DeviceArray<I>,
    len: usize,
    min: i64,
    max: i64,
}

/// The smallest and largest of `values` (`(i64::MAX, i64::MIN)` when empty).
pub(crate) fn range<I: Index>(values: &[I]) -> (i64, i64) {
    let (mut min, mut max) = (i64::MAX, i64::MIN);
    for &v in values {
        let v: i64 = v.into();
        min = min.min(v);
        max = max.max(v);
    }
    (min, max)
}

impl<I: Index> Indices<I> {
    /// Uploads `values`.
    ///
    /// # Errors
    /// Driver errors.
    pub fn new(gpu: &Gpu, values: &[I]) -> Result<Self> {
        let (min, max) = range(values);
        let stream = gpu.stream();
        // A zero-length device buffer cannot be allocated: keep one unused element.
        let dev = match values.first() {
            Some(_) => stream.clone_htod(values)?,
            None => stream.alloc_zeros::<I>(1)?,
        };
        Ok(Self {
            dev: DeviceArray::Owned(dev),
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

    /// Indices over values already placed in a staging area (`values` are the host copy).
    pub(crate) fn shared(base: Arc<CudaSlice<u8>>, offset: usize, values: &[I]) -> Self {
        let (min, max) = range(values);
        Self {
            dev: DeviceArray::Shared { base, offset },
            len: values.len(),
            min,
            max,
        }
    }

    pub(crate) fn device(&self) -> DeviceArrayArg<'_, I> {
        self.dev.arg()
    }
}

/// `values` as 32-bit indices, or which one is above `i32::MAX`.
pub(crate) fn u32_to_i32(values: &[u32], what: &'static str) -> Result<Vec<i32>> {
    if let Some((i, v)) = values
        .iter()
        .enumerate()
        .find(|&(_, &v)| v > i32::MAX as u32)
    {
        return Err(bad(what, format!("value {i} is {v}, above i32::MAX")));
    }
    Ok(values.iter().map(|&v| v as i32).collect())
}

impl Indices<i32> {
    /// Uploads `values` as 32-bit indices (token ids, positions, rows).
    ///
    /// # Errors
    /// [`crate::KernelError::BadArgument`] naming `what` for a value above `i32::MAX`; driver
    /// errors.
    pub fn from_u32(gpu: &Gpu, values: &[u32], what: &'static str) -> Result<Self> {
        Self::new(gpu, &u32_to_i32(values, what)?)
    }
}
