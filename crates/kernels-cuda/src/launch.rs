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
use crate::error::Result;

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
