//! The device: probing for it without panicking, its stream, and the compiled kernels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, PinnedHostSlice, sys};
use cudarc::nvrtc::Ptx;
use rustc_hash::FxHashMap;

use crate::compile::{CompiledVariant, Variant, compile_variant};
use crate::error::{KernelError, Result};
use crate::ffi;

/// One CUDA device with its stream and the kernel variants loaded so far.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: String,
    num_sms: usize,
    /// Programmatic dependent launch (launch.rs): sm_90 and later, unless `KVSERVE_PDL=0`.
    pdl: AtomicBool,
    /// Whether the device can do PDL at all (compute capability 9.0 or later).
    pdl_capable: bool,
    modules: Mutex<FxHashMap<Variant, Arc<CudaModule>>>,
    /// Function handles already looked up (a launch costs no `cuModuleGetFunction`), with the
    /// dynamic shared memory each has been allowed ([`Gpu::function_with_smem`]): a launch
    /// takes this one lock.
    functions: Mutex<FxHashMap<KernelKey, (CudaFunction, u32)>>,
    /// Kernels that export their launch shape, with that shape ([`Gpu::shaped_function`]): a
    /// launch takes this one lock.
    shaped: Mutex<FxHashMap<KernelKey, (CudaFunction, LaunchShape)>>,
    /// Shared memory per CTA (with the opt-in) and per SM, bytes.
    smem_limits: SmemLimits,
    /// The GEMV products normalize their input once per CTA into shared memory
    /// ([`Gpu::set_staged_norm`]; `KVSERVE_NORM_STAGE=0` turns it off).
    staged_norm: AtomicBool,
}

/// How much shared memory the device gives a CTA (with the opt-in attribute set) and an SM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SmemLimits {
    /// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`.
    pub per_block: usize,
    /// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR`.
    pub per_sm: usize,
}

/// A kernel: its variant and its name in the variant's module.
type KernelKey = (Variant, &'static str);

/// What a kernel's module says about how to launch it (`<kernel>_launch`, three `int`s in
/// constant memory): the kernel was compiled for exactly this block size and dynamic shared
/// memory, which depend on its variant's defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaunchShape {
    /// Threads per CTA.
    pub threads: u32,
    /// Bytes of dynamic shared memory per CTA.
    pub dynamic_smem: u32,
    /// The kernel's work quantum (for the decode kernel: tokens per round of its warps' tiles).
    pub quantum: u32,
    /// CTAs of this shape that fit one SM at once (the driver's occupancy calculation: its
    /// registers, threads and shared memory), at least 1.
    pub ctas_per_sm: u32,
    /// Whether the kernel takes TMA tensor maps after its other parameters (an optional fourth
    /// word, nonzero: the decode kernel built with `-DKVS_TC_TMA=1` for sm_90).
    pub tensor_maps: bool,
}

/// What [`Gpu::preload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Preloaded {
    /// Modules compiled by NVRTC.
    pub compiled: usize,
    /// Modules found in the disk cache.
    pub cached: usize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("name", &self.name)
            .field("arch", &self.arch)
            .field("num_sms", &self.num_sms)
            .finish_non_exhaustive()
    }
}

#[allow(unsafe_code)]
fn disable_event_tracking(ctx: &CudaContext) {
    // SAFETY: no buffer of this context exists yet, and the crate issues all its work on the
    // context's default stream, so stream order alone orders every access (cudarc's events
    // only matter for buffers used from several streams).
    unsafe { ctx.disable_event_tracking() };
}

/// Locks a map of loaded kernels. Only a panic while inserting poisons one, and its contents
/// stay valid.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the CUDA driver library can be loaded (it says nothing about devices).
pub fn driver_available() -> bool {
    ffi::library_present("cuda")
}

/// Whether NCCL can be loaded (cudarc panics on the first NCCL call when it cannot).
pub fn nccl_available() -> bool {
    ffi::library_present("nccl")
}

impl Gpu {
    /// Opens device `ordinal`. Never panics on a machine without CUDA: the driver library is
    /// probed before cudarc touches it.
    ///
    /// # Errors
    /// [`KernelError::NoDevice`] without a driver or without that device.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_available() {
            return Err(KernelError::NoDevice(
                "the CUDA driver library (libcuda) is not installed".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| KernelError::NoDevice(format!("cuInit/cuDeviceGetCount: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(KernelError::NoDevice(format!(
                "device {ordinal} asked for, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // Everything of this crate runs on one stream, in order: cudarc's per-buffer events
        // (for synchronizing buffers shared across streams) would only add two driver calls
        // per buffer argument to every launch.
        disable_event_tracking(&ctx);
        let (major, minor) = ctx.compute_capability()?;
        // Hopper's arch-specific features (wgmma, setmaxnreg) need the "a" target.
        let arch = if (major, minor) == (9, 0) {
            "sm_90a".to_string()
        } else {
            format!("sm_{major}{minor}")
        };
        let num_sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            .max(1) as usize;
        let name = ctx.name()?;
        // A stream of our own, not the legacy default stream: only such a stream can be
        // captured into a CUDA graph (the legacy stream refuses capture).
        let stream = ctx.new_stream()?;
        let pdl_capable = major >= 9;
        let pdl = pdl_capable && std::env::var("KVSERVE_PDL").as_deref() != Ok("0");
        let smem = |a| -> Result<usize> { Ok(ctx.attribute(a)?.max(0) as usize) };
        let smem_limits = SmemLimits {
            per_block: smem(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )?,
            per_sm: smem(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )?,
        };
        let staged_norm = std::env::var("KVSERVE_NORM_STAGE").as_deref() != Ok("0");
        Ok(Self {
            ctx,
            stream,
            name,
            arch,
            num_sms,
            pdl: AtomicBool::new(pdl),
            pdl_capable,
            modules: Mutex::new(FxHashMap::default()),
            functions: Mutex::new(FxHashMap::default()),
            shaped: Mutex::new(FxHashMap::default()),
            smem_limits,
            staged_norm: AtomicBool::new(staged_norm),
        })
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture kernels are compiled for, e.g. "sm_90a".
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Streaming multiprocessors.
    pub fn num_sms(&self) -> usize {
        self.num_sms
    }

    /// Whether launches marked dependent overlap their predecessor (launch.rs).
    pub fn pdl(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
    }

    /// Turns programmatic dependent launch off (or back on, where the device has it): for
    /// A/B measurements and tests.
    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(on && self.pdl_capable, Ordering::Relaxed);
    }

    /// Whether the GEMV products over a normalized input ([`crate::GemvInput::Normalized`])
    /// build the normalized rows once per CTA in shared memory, with their first weight
    /// loads in flight (where the rows fit; the default), or normalize each element as they
    /// load it. Both give the same bits.
    pub fn staged_norm(&self) -> bool {
        self.staged_norm.load(Ordering::Relaxed)
    }

    /// Chooses the normalized GEMV input's variant (see [`Gpu::staged_norm`]): for A/B
    /// measurements and tests (`KVSERVE_NORM_STAGE=0` turns staging off at construction).
    pub fn set_staged_norm(&self, on: bool) {
        self.staged_norm.store(on, Ordering::Relaxed);
    }

    /// Shared memory per CTA and per SM.
    pub(crate) fn smem_limits(&self) -> SmemLimits {
        self.smem_limits
    }

    /// The stream every launch of this crate goes to. cudarc's cross-stream event tracking is
    /// off for this context: put all work on buffers these kernels touch on this stream (or
    /// synchronize other streams yourself).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// `len` bytes of zeroed page-locked host memory: copies between it and the device run
    /// at full PCIe/NVLink-C2C speed and asynchronously (the swap space of the KV cache).
    ///
    /// # Errors
    /// Driver errors (`len == 0` is refused by the driver).
    #[allow(unsafe_code)]
    pub fn alloc_pinned(&self, len: usize) -> Result<PinnedHostSlice<u8>> {
        // SAFETY: the memory is uninitialized until the write below, and nothing reads it
        // before: the pointer is used only through `write_bytes`, which covers all `len`
        // bytes of the fresh allocation (no work has been queued on it, so the synchronize
        // inside `as_mut_ptr` returns at once).
        unsafe {
            let mut host = self.ctx.alloc_pinned_with_flags::<u8>(len, 0)?;
            std::ptr::write_bytes(host.as_mut_ptr()?, 0, len);
            Ok(host)
        }
    }

    /// Kernel `name` of `variant`, compiling (or loading from the disk cache) on first use;
    /// later calls return the handle looked up the first time.
    pub(crate) fn function(&self, variant: &Variant, name: &'static str) -> Result<CudaFunction> {
        self.function_with_smem(variant, name, 0)
    }

    /// Kernel `name` of `variant` (as [`Gpu::function`]), allowed `bytes` of dynamic shared
    /// memory: where that and its static shared memory pass the default 48 KiB the function's
    /// limit is raised, once per size (the first launch at a size must not be inside a graph
    /// capture).
    ///
    /// # Errors
    /// Compile and driver errors; [`KernelError::Unsupported`] for more than a CTA may have.
    pub(crate) fn function_with_smem(
        &self,
        variant: &Variant,
        name: &'static str,
        bytes: usize,
    ) -> Result<CudaFunction> {
        let key = (*variant, name);
        let bytes32 =
            u32::try_from(bytes).map_err(|_| self.too_much_smem(variant, name, bytes, 0))?;
        let cached = lock(&self.functions).get(&key).cloned();
        let (f, allowed) = match cached {
            Some((f, allowed)) if allowed >= bytes32 => return Ok(f),
            Some(entry) => entry,
            None => (self.load_function(variant, name)?, 0),
        };
        if allowed < bytes32 {
            self.allow_dynamic_smem(&f, variant, name, bytes)?;
        }
        let mut functions = lock(&self.functions);
        let entry = functions.entry(key).or_insert_with(|| (f.clone(), 0));
        entry.1 = entry.1.max(bytes32);
        Ok(f)
    }

    /// Compiles (or loads from the disk cache) and loads the modules of `variants` that are
    /// not loaded yet, compiling in parallel (NVRTC compiles on several threads at once), so
    /// that no later step stops to compile: a first compile of a module takes seconds, and a
    /// step that needs it waits for it. Returns how many modules were compiled and how many
    /// came from the disk cache.
    ///
    /// # Errors
    /// The first compile or driver error (modules compiled before it stay loaded).
    pub fn preload(&self, variants: &[Variant]) -> Result<Preloaded> {
        let missing: Vec<Variant> = {
            let modules = lock(&self.modules);
            let mut v: Vec<Variant> = Vec::new();
            for x in variants {
                if !modules.contains_key(x) && !v.contains(x) {
                    v.push(*x);
                }
            }
            v
        };
        let arch = self.arch.as_str();
        let compiled: Vec<Result<CompiledVariant>> = std::thread::scope(|s| {
            let handles: Vec<_> = missing
                .iter()
                .map(|v| (v, s.spawn(move || compile_variant(v, arch))))
                .collect();
            handles
                .into_iter()
                .map(|(v, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(KernelError::Compile {
                            kernel: v.to_string(),
                            options: String::new(),
                            log: "the compiling thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let mut done = Preloaded::default();
        for (variant, c) in missing.iter().zip(compiled) {
            let c = c?;
            if c.cached {
                done.cached += 1;
            } else {
                done.compiled += 1;
            }
            let m = self.ctx.load_module(Ptx::from_binary(c.cubin))?;
            lock(&self.modules).entry(*variant).or_insert(m);
        }
        Ok(done)
    }

    /// Looks `name` up in `variant`'s module, compiling (or loading from the disk cache) the
    /// module on first use.
    fn load_function(&self, variant: &Variant, name: &'static str) -> Result<CudaFunction> {
        let module = {
            let mut modules = lock(&self.modules);
            match modules.get(variant) {
                Some(m) => m.clone(),
                None => {
                    let compiled = compile_variant(variant, &self.arch)?;
                    if !compiled.cached {
                        tracing::debug!("compiled {variant} for {}", self.arch);
                    }
                    let m = self.ctx.load_module(Ptx::from_binary(compiled.cubin))?;
                    modules.insert(*variant, m.clone());
                    m
                }
            }
        };
        Ok(module.load_function(name)?)
    }

    /// Lets `f` launch with `bytes` of dynamic shared memory: the limit on static plus dynamic
    /// shared memory is 48 KiB unless the function's dynamic limit is raised (up to the
    /// device's opt-in maximum less the function's static shared memory), so it is raised
    /// wherever the sum passes 48 KiB.
    ///
    /// # Errors
    /// [`KernelError::Unsupported`] where the sum exceeds what a CTA may have; driver errors.
    fn allow_dynamic_smem(
        &self,
        f: &CudaFunction,
        variant: &Variant,
        name: &'static str,
        bytes: usize,
    ) -> Result<()> {
        let fixed = f.shared_size_bytes()?.max(0) as usize;
        if fixed + bytes > self.smem_limits.per_block {
            return Err(self.too_much_smem(variant, name, bytes, fixed));
        }
        if fixed + bytes > 48 * 1024 {
            let dynamic = i32::try_from(bytes)
                .map_err(|_| self.too_much_smem(variant, name, bytes, fixed))?;
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic,
            )?;
        }
        Ok(())
    }

    fn too_much_smem(
        &self,
        variant: &Variant,
        name: &'static str,
        bytes: usize,
        fixed: usize,
    ) -> KernelError {
        KernelError::Unsupported {
            kernel: name,
            what: format!(
                "{variant}: {bytes} bytes of dynamic and {fixed} of static shared memory per CTA \
                 (the device allows {})",
                self.smem_limits.per_block
            ),
        }
    }

    /// Kernel `name` of `variant` with the launch shape its module exports as `<name>_launch`
    /// (three or four `int`s; read once, with a synchronous copy: the first call must not be inside a graph
    /// capture), its dynamic shared-memory limit raised to that size where it and the static
    /// shared memory pass the default 48 KiB.
    ///
    /// # Errors
    /// Compile and driver errors; [`KernelError::Unsupported`] for a shape the device cannot
    /// launch (more shared memory than a CTA may have).
    pub(crate) fn shaped_function(
        &self,
        variant: &Variant,
        name: &'static str,
    ) -> Result<(CudaFunction, LaunchShape)> {
        if let Some((f, shape)) = lock(&self.shaped).get(&(*variant, name)) {
            return Ok((f.clone(), *shape));
        }
        let f = self.function(variant, name)?;
        let module =
            lock(&self.modules)
                .get(variant)
                .cloned()
                .ok_or_else(|| KernelError::Unsupported {
                    kernel: name,
                    what: format!("{variant}: its module is not loaded"),
                })?;
        let symbol = format!("{name}_launch");
        let bytes = {
            let global = module.get_global(&symbol, &self.stream)?;
            self.stream.clone_dtoh(&global)?
        };
        let word = |i: usize| -> Result<u32> {
            bytes
                .get(4 * i..4 * i + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| KernelError::Unsupported {
                    kernel: name,
                    what: format!(
                        "{variant}: {symbol} of {} bytes (12 or 16 expected)",
                        bytes.len()
                    ),
                })
        };
        let mut shape = LaunchShape {
            threads: word(0)?,
            dynamic_smem: word(1)?,
            quantum: word(2)?,
            ctas_per_sm: 1,
            tensor_maps: bytes.len() >= 16 && word(3)? != 0,
        };
        self.allow_dynamic_smem(&f, variant, name, shape.dynamic_smem as usize)?;
        shape.ctas_per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(
                shape.threads,
                shape.dynamic_smem as usize,
                None,
            )?
            .max(1);
        lock(&self.shaped).insert((*variant, name), (f.clone(), shape));
        Ok((f, shape))
    }
}
