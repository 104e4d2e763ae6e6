//! A step's metadata through one copy: the host writes every array (token ids, positions,
//! slots, row picks, block tables, context lengths) into a page-locked staging area, checked
//! as [`Indices::new`] and [`DecodeMetadata::new`] check them, and one asynchronous copy puts
//! the whole area into a device buffer allocated once. The arrays' device addresses depend only
//! on the order and lengths of the pushes, so a step of the same shape finds them where the
//! last one did: what a CUDA graph replay needs (its kernels keep the addresses they were
//! captured with).
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, PinnedHostSlice};

use crate::attention::{CheckedDecodeBatch, DecodeMetadata};
use crate::device::Gpu;
use crate::error::{Result, bad};
use crate::indices::{DeviceArray, Index, Indices, u32_to_i32};

const WHAT: &str = "step staging";
/// Every array starts at a multiple of this many bytes.
const ALIGN: usize = 16;

/// A page-locked host area and a device buffer of the same size, filled in order by the
/// `push_*` methods and copied over by [`StepStaging::upload`].
///
/// The host side is written only after the previous upload has finished (an event recorded
/// after each copy is waited on by [`StepStaging::begin`]), so a step may be staged while the
/// last one still runs.
#[derive(Debug)]
pub struct StepStaging {
    host: PinnedHostSlice<u8>,
    dev: Arc<CudaSlice<u8>>,
    /// Bytes pushed since [`StepStaging::begin`].
    used: usize,
    /// Recorded after the last upload.
    uploaded: Option<CudaEvent>,
}

impl StepStaging {
    /// An area of `bytes` bytes on both sides (allocated now, never again).
    ///
    /// # Errors
    /// Driver errors.
    pub fn new(gpu: &Gpu, bytes: usize) -> Result<Self> {
        let bytes = bytes.max(ALIGN);
        Ok(Self {
            host: gpu.alloc_pinned(bytes)?,
            dev: Arc::new(gpu.stream().alloc_zeros::<u8>(bytes)?),
            used: 0,
            uploaded: None,
        })
    }

    /// Bytes of staging `arrays` (element counts and sizes) take: what [`StepStaging::new`]
    /// needs for pushes of those lengths.
    pub fn bytes_for(arrays: &[(usize, usize)]) -> usize {
        arrays
            .iter()
            .map(|&(n, size)| (n * size).next_multiple_of(ALIGN))
            .sum()
    }

    /// Starts a step: waits for the last upload to have left the host area, forgets the
    /// pushes.
    ///
    /// # Errors
    /// Driver errors.
    pub fn begin(&mut self) -> Result<()> {
        if let Some(e) = &self.uploaded {
            e.synchronize()?;
        }
        self.used = 0;
        Ok(())
    }

    /// Writes `values` at the next aligned offset of the host area; returns the offset.
    fn push<I: Index>(&mut self, values: &[I]) -> Result<usize> {
        let bytes = std::mem::size_of_val(values);
        let offset = self.used.next_multiple_of(ALIGN);
        if offset + bytes > self.host.len() {
            return Err(bad(
                WHAT,
                format!(
                    "{bytes} more bytes at offset {offset} do not fit the {} staged",
                    self.host.len()
                ),
            ));
        }
        // The last upload is done (begin() waited on it): no cudarc event of this slice is
        // pending, so this does not block.
        let host = self.host.as_mut_slice()?;
        // SAFETY: `I` is a plain integer (`Index`: i32 or i64), so its bytes are initialized
        // and any alignment of the destination bytes is fine for a byte copy.
        let src = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), bytes) };
        host[offset..offset + bytes].copy_from_slice(src);
        self.used = offset + bytes;
        Ok(offset)
    }

    /// Stages `values` as indices (one element is kept for an empty array, as
    /// [`Indices::new`] does).
    ///
    /// # Errors
    /// [`crate::KernelError::BadArgument`] when the area is full.
    pub fn push_indices<I: Index>(&mut self, values: &[I]) -> Result<Indices<I>> {
        let offset = if values.is_empty() {
            self.push::<I>(&[I::default()])?
        } else {
            self.push(values)?
        };
        Ok(Indices::shared(self.dev.clone(), offset, values))
    }

    /// Stages `values` as 32-bit indices, as [`Indices::from_u32`] checks them.
    ///
    /// # Errors
    /// As [`Indices::from_u32`]; the area full.
    pub fn push_u32(&mut self, values: &[u32], what: &'static str) -> Result<Indices<i32>> {
        self.push_indices(&u32_to_i32(values, what)?)
    }

    /// Stages decode metadata, checked as [`DecodeMetadata::new`] checks it.
    ///
    /// # Errors
    /// As [`DecodeMetadata::new`]; the area full.
    pub fn push_decode_metadata(
        &mut self,
        block_tables: &[i32],
        max_blocks: usize,
        context_lens: &[i32],
        block_size: usize,
        num_blocks: usize,
        window: Option<usize>,
    ) -> Result<DecodeMetadata> {
        let checked = CheckedDecodeBatch::new(
            block_tables,
            max_blocks,
            context_lens,
            block_size,
            num_blocks,
            window,
        )?;
        let tables = self.push(block_tables)?;
        let ctx = self.push(context_lens)?;
        Ok(checked.with_device(
            DeviceArray::Shared {
                base: self.dev.clone(),
                offset: tables,
            },
            DeviceArray::Shared {
                base: self.dev.clone(),
                offset: ctx,
            },
        ))
    }

    /// Copies what was pushed to the device: one asynchronous copy on the device's stream
    /// (kernels queued after it see the values).
    ///
    /// # Errors
    /// Driver errors.
    pub fn upload(&mut self, gpu: &Gpu) -> Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        let stream = gpu.stream();
        stream.context().bind_to_thread()?;
        let host = self.host.as_slice()?;
        let (dst, _guard) = self.dev.device_ptr(stream);
        // SAFETY: `dst` is the device buffer, at least as long as the host area (same size at
        // new()); the host area is page-locked and is not written again before the event
        // recorded below has completed (begin() waits on it) nor freed before (dropping a
        // PinnedHostSlice while a copy is pending is what the event also guards: `self` owns
        // both and drop order puts no copy in flight past a synchronize the caller does at
        // the end of each step).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst, &host[..self.used], stream.cu_stream())
        }?;
        let event = match self.uploaded.take() {
            Some(e) => e,
            None => stream.context().new_event(None)?,
        };
        event.record(stream)?;
        self.uploaded = Some(event);
        Ok(())
    }
}
