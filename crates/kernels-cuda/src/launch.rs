//! Kernel launches through `cuLaunchKernelEx`, with programmatic dependent launch (PDL) on
//! Hopper and later.
//!
//! A decode step of a small batch is a chain of some 300 short kernels. Launched the plain way,
//! each one starts only after the previous one has fully finished: its CTAs are scheduled, its
//! first loads go out and wait on DRAM, while the previous kernel's tail leaves most SMs idle.
//! With PDL (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`) a kernel's CTAs may be
//! scheduled as soon as every CTA of the previous kernel has exited or called
//! `griddepcontrol.launch_dependents` (kernels leave it to the exit: measured faster, see
//! `kvs_launch_dependents()` in `kernels/scalar.cuh`); each kernel then runs
//! `griddepcontrol.wait` (`kvs_wait_prior()`), which returns once the previous kernel has
//! completed and its writes are visible, before it touches anything the previous kernels
//! write or read. What comes before the wait may only read memory no kernel of the chain
//! writes (the GEMV kernels prefetch their weights there).
//!
//! The contract is per kernel: a launch asks for PDL with [`Launch::dependent`] only for a
//! kernel whose every thread calls `kvs_wait_prior()` before its first access to such memory.
//! Because each kernel waits for the previous one to complete, and that one waited for its
//! own predecessor, a kernel past its wait sees every earlier kernel of the stream complete.
//! A kernel launched without the attribute waits for its predecessor the plain way.
//! `KVSERVE_PDL=0` turns PDL off; devices before sm_90 never use it.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::marker::PhantomData;

use cudarc::driver::sys::{
    CUdeviceptr, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig,
    CUresult, cuLaunchKernelEx,
};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DriverError, LaunchConfig,
};

use crate::device::Gpu;
use crate::error::{KernelError, Result};

/// One kernel argument as `cuLaunchKernelEx` wants it: a pointer to the value. Device
/// buffers are kept by value (their address) until the launch.
enum Arg<'a> {
    Value(*const c_void, PhantomData<&'a ()>),
    Device(CUdeviceptr),
}

/// A kernel launch being assembled: the function and its arguments, in the kernel's order.
pub(crate) struct Launch<'a> {
    gpu: &'a Gpu,
    func: &'a CudaFunction,
    args: Vec<Arg<'a>>,
    dependent: bool,
}

/// Something that can be passed to a kernel.
pub(crate) trait KernelArg<'a> {
    fn push(self, launch: &mut Launch<'a>);
}

macro_rules! scalar_args {
    ($($t:ty),*) => {$(
        impl<'a> KernelArg<'a> for &'a $t {
            fn push(self, launch: &mut Launch<'a>) {
                launch
                    .args
                    .push(Arg::Value(std::ptr::from_ref(self).cast(), PhantomData));
            }
        }
    )*};
}
scalar_args!(i32, u32, f32, i64, u64);

fn device<'a, T, P: DevicePtr<T>>(p: &P, launch: &mut Launch<'a>) {
    // Event tracking is off for the crate's context (device.rs): the guard does nothing.
    let (ptr, _guard) = p.device_ptr(launch.gpu.stream());
    launch.args.push(Arg::Device(ptr));
}

impl<'a, 'b: 'a, T> KernelArg<'a> for &'b CudaSlice<T> {
    fn push(self, launch: &mut Launch<'a>) {
        device(self, launch);
    }
}

impl<'a, T> KernelArg<'a> for &'a mut CudaSlice<T> {
    fn push(self, launch: &mut Launch<'a>) {
        device(&*self, launch);
    }
}

impl<'a, 'b: 'a, T> KernelArg<'a> for &'a CudaView<'b, T> {
    fn push(self, launch: &mut Launch<'a>) {
        device(self, launch);
    }
}

impl<'a, 'b: 'a, T> KernelArg<'a> for &'a mut CudaViewMut<'b, T> {
    fn push(self, launch: &mut Launch<'a>) {
        device(&*self, launch);
    }
}

impl<'a> Launch<'a> {
    /// Appends the address `offset` bytes into `base` (a range of a shared buffer).
    pub(crate) fn push_device_offset(&mut self, base: &CudaSlice<u8>, offset: usize) {
        // Event tracking is off for the crate's context (device.rs): the guard does nothing.
        let (ptr, _guard) = base.device_ptr(self.gpu.stream());
        self.args.push(Arg::Device(ptr + offset as CUdeviceptr));
    }

    /// A launch of `func` on the crate's stream.
    pub(crate) fn new(gpu: &'a Gpu, func: &'a CudaFunction) -> Self {
        Self {
            gpu,
            func,
            args: Vec::with_capacity(24),
            dependent: false,
        }
    }

    /// Appends an argument.
    pub(crate) fn arg<A: KernelArg<'a>>(&mut self, a: A) -> &mut Self {
        a.push(self);
        self
    }

    /// Declares that every thread of the kernel calls `kvs_wait_prior()` before it touches
    /// memory an earlier kernel writes or reads (see the module's documentation): the launch
    /// may then overlap the previous kernel's tail where the device allows it.
    pub(crate) fn dependent(&mut self) -> &mut Self {
        self.dependent = true;
        self
    }

    /// Queues the kernel.
    ///
    /// # Safety
    /// The arguments must be the kernel's parameters, in order and of matching types; every
    /// buffer must be large enough for what the kernel reads and writes at `cfg`; for
    /// [`Launch::dependent`], the kernel must honour the contract above.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        self.gpu.context().bind_to_thread()?;
        let mut ptrs: Vec<*mut c_void> = self
            .args
            .iter()
            .map(|a| match a {
                Arg::Value(p, _) => p.cast_mut(),
                Arg::Device(d) => std::ptr::from_ref(d).cast_mut().cast(),
            })
            .collect();
        let mut attr = CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        };
        let pdl = self.dependent && self.gpu.pdl();
        let config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.gpu.stream().cu_stream(),
            attrs: if pdl {
                &raw mut attr
            } else {
                std::ptr::null_mut()
            },
            numAttrs: u32::from(pdl),
        };
        // SAFETY: `config` and `attr` live until the call returns; `ptrs` holds one pointer
        // per kernel parameter (the caller's contract), each to a value that outlives the
        // call: scalars borrowed for 'a, device addresses in `self.args`, which is not
        // touched while `ptrs` is alive. The function belongs to a module the Gpu keeps
        // loaded. The driver copies the parameters before returning.
        let r = unsafe {
            cuLaunchKernelEx(
                &raw const config,
                self.func.cu_function(),
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        match r {
            CUresult::CUDA_SUCCESS => Ok(()),
            e => Err(DriverError(e).into()),
        }
    }
}

/// A CUtensorMap passed by value as a kernel parameter (`const __grid_constant__ TensorMap` in
/// kernels/tc_common.cuh): 128 opaque bytes from `cuTensorMapEncodeTiled`.
#[repr(C, align(64))]
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct TensorMapArg {
    opaque: [u64; 16],
}

impl TensorMapArg {
    /// All zeros: what a TMA-capable kernel gets where it does not use its maps (the decode
    /// kernel with blocks of fewer than [`TMA_BOX_ROWS`] tokens loads by cp.async instead).
    pub(crate) const UNUSED: Self = Self { opaque: [0; 16] };
}

impl std::fmt::Debug for TensorMapArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TensorMapArg(..)")
    }
}

impl<'a> KernelArg<'a> for &'a TensorMapArg {
    fn push(self, launch: &mut Launch<'a>) {
        launch
            .args
            .push(Arg::Value(std::ptr::from_ref(self).cast(), PhantomData));
    }
}

/// Rows of one TMA box of the decode kernel's 16-bit tiles (`kTmaBoxRows` in
/// kernels/paged_attention_tc.cu): a box is a run of consecutive rows of one block, so blocks
/// must hold at least this many tokens for the TMA loader.
pub(crate) const TMA_BOX_ROWS: u32 = 8;
/// Elements (16-bit) of the box's inner dimension: 128 bytes, the span of the 128-byte swizzle.
pub(crate) const TMA_BOX_COLS: u32 = 64;

/// One 16-bit KV cache as the decode kernel's TMA loader sees it: the layout's numbers, the
/// cache's blocks and bytes, and its device address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KvCacheGeometry {
    pub(crate) dtype: kv_quant::KvCacheDtype,
    pub(crate) head_dim: usize,
    pub(crate) block_size: usize,
    pub(crate) num_kv_heads: usize,
    /// Bytes of a (head, slot) value row.
    pub(crate) row_bytes: usize,
    /// Bytes of a block.
    pub(crate) block_bytes: usize,
    /// Blocks the kernel may address (the metadata's).
    pub(crate) num_blocks: usize,
    /// Bytes of the cache buffer.
    pub(crate) cache_bytes: usize,
    /// The buffer's device address.
    pub(crate) address: u64,
}

impl KvCacheGeometry {
    /// The geometry of a cache buffer of `cache_bytes` at `address` holding `num_blocks`
    /// blocks of `layout`.
    pub(crate) fn of(
        layout: &kv_quant::BlockLayout,
        num_blocks: usize,
        cache_bytes: usize,
        address: u64,
    ) -> Self {
        Self {
            dtype: layout.dtype(),
            head_dim: layout.head_dim(),
            block_size: layout.block_size(),
            num_kv_heads: layout.num_kv_heads(),
            row_bytes: layout.value_row_bytes(),
            block_bytes: layout.kv_block_bytes(),
            num_blocks,
            cache_bytes,
            address,
        }
    }
}

/// What `cuTensorMapEncodeTiled` gets for a [`KvCacheGeometry`]: a 2-D tensor of `head_dim`
/// elements (innermost) by every value row of the cache (row `block * num_kv_heads *
/// block_size + head * block_size + slot`, `row_bytes` apart), boxes of [`TMA_BOX_COLS`]
/// elements by [`TMA_BOX_ROWS`] rows, 128-byte swizzle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KvTensorMapShape {
    pub(crate) bf16: bool,
    pub(crate) address: u64,
    /// Elements per row, rows.
    pub(crate) dims: [u64; 2],
    /// Bytes between rows.
    pub(crate) row_stride: u64,
    /// Box: elements, rows.
    pub(crate) box_dims: [u32; 2],
}

/// The tensor map of one cache for the decode kernel's TMA loader, or `None` for blocks of
/// fewer than [`TMA_BOX_ROWS`] tokens (the kernel loads those by cp.async and ignores its maps).
///
/// # Errors
/// [`KernelError::Unsupported`] for what the loader cannot address: a dtype other than fp16 /
/// bf16, a head_dim not a multiple of 64, blocks padded beyond their rows (the rows would not
/// be one stride apart), more rows than a 32-bit signed coordinate, a buffer smaller than its
/// blocks, an address not 16-byte aligned.
pub(crate) fn kv_tensor_map_shape(
    kernel: &'static str,
    g: &KvCacheGeometry,
) -> Result<Option<KvTensorMapShape>> {
    use kv_quant::KvCacheDtype;
    let unsupported = |what: String| KernelError::Unsupported { kernel, what };
    let bf16 = match g.dtype {
        KvCacheDtype::Bf16 => true,
        KvCacheDtype::Fp16 => false,
        d => {
            return Err(unsupported(format!(
                "TMA tiles of a {d} cache (16-bit only)"
            )));
        }
    };
    if g.block_size < TMA_BOX_ROWS as usize {
        return Ok(None);
    }
    if g.head_dim == 0 || !g.head_dim.is_multiple_of(TMA_BOX_COLS as usize) {
        return Err(unsupported(format!(
            "TMA tiles of head_dim {} (a multiple of {TMA_BOX_COLS})",
            g.head_dim
        )));
    }
    if g.row_bytes != 2 * g.head_dim || !g.row_bytes.is_multiple_of(16) {
        return Err(unsupported(format!(
            "TMA tiles of {}-byte rows for head_dim {}",
            g.row_bytes, g.head_dim
        )));
    }
    let block_rows = g.num_kv_heads.saturating_mul(g.block_size);
    if block_rows == 0 || g.block_bytes != block_rows.saturating_mul(g.row_bytes) {
        return Err(unsupported(format!(
            "TMA tiles of {}-byte blocks ({} x {} rows of {} bytes: padded)",
            g.block_bytes, g.num_kv_heads, g.block_size, g.row_bytes
        )));
    }
    let rows = g.num_blocks.saturating_mul(block_rows);
    if rows == 0 || rows > i32::MAX as usize {
        return Err(unsupported(format!(
            "TMA tiles over {rows} cache rows (1..=2^31 - 1)"
        )));
    }
    if rows.saturating_mul(g.row_bytes) > g.cache_bytes {
        return Err(unsupported(format!(
            "TMA tiles over {rows} rows of {} bytes in a {}-byte cache",
            g.row_bytes, g.cache_bytes
        )));
    }
    if g.address == 0 || !g.address.is_multiple_of(16) {
        return Err(unsupported(format!(
            "TMA tiles of a cache at {:#x} (16-byte aligned)",
            g.address
        )));
    }
    Ok(Some(KvTensorMapShape {
        bf16,
        address: g.address,
        dims: [g.head_dim as u64, rows as u64],
        row_stride: g.row_bytes as u64,
        box_dims: [TMA_BOX_COLS, TMA_BOX_ROWS],
    }))
}

/// Encodes `shape` (checked by [`kv_tensor_map_shape`]) with the driver.
///
/// # Errors
/// Driver errors (e.g. a device without tensor maps).
pub(crate) fn encode_kv_tensor_map(gpu: &Gpu, shape: &KvTensorMapShape) -> Result<TensorMapArg> {
    use cudarc::driver::sys::{
        CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
        CUtensorMapL2promotion, CUtensorMapSwizzle, cuTensorMapEncodeTiled,
    };
    gpu.context().bind_to_thread()?;
    let dtype = if shape.bf16 {
        CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    } else {
        CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    };
    let strides = [shape.row_stride];
    let element_strides = [1u32, 1];
    let mut map = CUtensorMap { opaque: [0; 16] };
    // SAFETY: `map` is a CUtensorMap (aligned as the driver requires) the call writes; the
    // arrays hold `tensorRank` (2) dims, box dims and element strides and 1 stride, and live
    // until it returns; the driver only encodes the address (nothing is read from it here).
    // kv_tensor_map_shape checked what the driver requires of the values (16-byte aligned
    // address and stride, dims <= 2^31 - 1, boxes of 128 bytes by 8 rows).
    let r = unsafe {
        cuTensorMapEncodeTiled(
            &raw mut map,
            dtype,
            2,
            shape.address as *mut c_void,
            shape.dims.as_ptr(),
            strides.as_ptr(),
            shape.box_dims.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    match r {
        CUresult::CUDA_SUCCESS => Ok(TensorMapArg { opaque: map.opaque }),
        e => Err(DriverError(e).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_quant::{BlockLayout, KvCacheDtype};

    /// A cache of `num_blocks` blocks of `layout` at a 256-byte aligned address.
    fn geometry(layout: &BlockLayout, num_blocks: usize) -> KvCacheGeometry {
        KvCacheGeometry::of(
            layout,
            num_blocks,
            num_blocks * layout.kv_block_bytes(),
            0x7f00_0000_0100,
        )
    }

    fn refused(g: &KvCacheGeometry) {
        let r = kv_tensor_map_shape("k", g);
        assert!(
            matches!(r, Err(KernelError::Unsupported { .. })),
            "{g:?}: {r:?}"
        );
    }

    #[test]
    fn kv_tensor_map_covers_every_row_of_a_16_bit_cache_in_128_byte_by_8_row_boxes() {
        for (dtype, bf16) in [(KvCacheDtype::Bf16, true), (KvCacheDtype::Fp16, false)] {
            for head_dim in [64, 128] {
                for block_size in [8, 16, 32, 1024] {
                    for kv_heads in [1, 3, 8] {
                        let l = BlockLayout::new(dtype, block_size, kv_heads, head_dim).unwrap();
                        // 16-bit blocks are their value rows, one stride apart.
                        assert_eq!(
                            l.kv_block_bytes(),
                            kv_heads * block_size * l.value_row_bytes()
                        );
                        let g = geometry(&l, 37);
                        let s = kv_tensor_map_shape("k", &g).unwrap().unwrap();
                        assert_eq!(
                            s,
                            KvTensorMapShape {
                                bf16,
                                address: g.address,
                                dims: [head_dim as u64, (37 * kv_heads * block_size) as u64],
                                row_stride: 2 * head_dim as u64,
                                box_dims: [64, 8],
                            }
                        );
                        // The box's inner dimension is the 128-byte swizzle span.
                        assert_eq!(s.box_dims[0] * 2, 128);
                        // Row block * rows per block + head * block_size + slot is at
                        // row * stride from the base: where kv_value_offset puts it.
                        let (b, h, slot) = (36, kv_heads - 1, block_size - 1);
                        let row = (b * kv_heads + h) * block_size + slot;
                        assert_eq!(
                            row as u64 * s.row_stride,
                            (b * l.kv_block_bytes() + l.value_offset(h, slot).unwrap()) as u64
                        );
                        assert!(row < s.dims[1] as usize);
                    }
                }
            }
        }
    }

    #[test]
    fn kv_tensor_map_is_skipped_for_blocks_under_a_box_and_refused_for_what_tma_cannot_address() {
        let l = BlockLayout::new(KvCacheDtype::Bf16, 16, 8, 128).unwrap();
        let good = geometry(&l, 100);
        assert!(kv_tensor_map_shape("k", &good).unwrap().is_some());
        // Blocks of 1, 2, 4 tokens: no map (the kernel's cp.async path).
        for bs in [1, 2, 4] {
            let small = BlockLayout::new(KvCacheDtype::Bf16, bs, 8, 128).unwrap();
            assert_eq!(
                kv_tensor_map_shape("k", &geometry(&small, 9)).unwrap(),
                None
            );
        }
        // Not 16-bit.
        for dtype in [KvCacheDtype::Int8, KvCacheDtype::Fp8E4m3] {
            let q = BlockLayout::new(dtype, 16, 8, 128).unwrap();
            refused(&geometry(&q, 4));
        }
        for bad in [
            // head_dim 96: the box's 64 elements do not divide a row.
            KvCacheGeometry {
                head_dim: 96,
                row_bytes: 192,
                block_bytes: 8 * 16 * 192,
                ..good
            },
            // Rows that are not 2 * head_dim bytes.
            KvCacheGeometry {
                row_bytes: 272,
                ..good
            },
            // Padded blocks: rows of consecutive blocks are not one stride apart.
            KvCacheGeometry {
                block_bytes: good.block_bytes + 16,
                ..good
            },
            // No blocks, or more rows than a 32-bit signed coordinate.
            KvCacheGeometry {
                num_blocks: 0,
                ..good
            },
            KvCacheGeometry {
                num_blocks: (1 << 31) / 128 + 1,
                cache_bytes: usize::MAX,
                ..good
            },
            // A buffer smaller than its blocks.
            KvCacheGeometry {
                cache_bytes: good.cache_bytes - 1,
                ..good
            },
            // Misaligned or null addresses.
            KvCacheGeometry {
                address: good.address + 8,
                ..good
            },
            KvCacheGeometry { address: 0, ..good },
            KvCacheGeometry {
                num_kv_heads: 0,
                ..good
            },
        ] {
            refused(&bad);
        }
        // The largest cache a 32-bit coordinate reaches: 2^31 - 1 rows is fine, one block more
        // is not.
        let max_blocks = i32::MAX as usize / 128;
        let edge = KvCacheGeometry {
            num_blocks: max_blocks,
            cache_bytes: usize::MAX,
            ..good
        };
        assert!(kv_tensor_map_shape("k", &edge).unwrap().is_some());
    }

    #[test]
    fn tensor_map_argument_is_128_bytes_aligned_to_64() {
        assert_eq!(std::mem::size_of::<TensorMapArg>(), 128);
        assert_eq!(std::mem::align_of::<TensorMapArg>(), 64);
        assert_eq!(
            std::mem::size_of::<cudarc::driver::sys::CUtensorMap>(),
            std::mem::size_of::<TensorMapArg>()
        );
    }
}
