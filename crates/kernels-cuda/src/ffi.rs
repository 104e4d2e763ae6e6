//! The crate's only `unsafe` code besides kernel launches: probing for the CUDA libraries
//! before cudarc touches them (cudarc panics when one is missing), and the raw NVRTC calls
//! that return a cubin and the compiler's log (cudarc's safe wrapper returns PTX only).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char};

use cudarc::nvrtc::{result, sys};

/// Whether one of the names cudarc tries for `lib` (e.g. "cuda", "nvrtc") can be loaded.
pub(crate) fn library_present(lib: &str) -> bool {
    cudarc::get_lib_name_candidates(lib).iter().any(|name| {
        // SAFETY: loading the CUDA driver, NVRTC or NCCL runs only their own initializers, which
        // have no preconditions; the handle is dropped (unloaded) right away, and cudarc
        // loads the library again by the same name when it is first used.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// NVRTC's version, `(major, minor)`. Call only after [`library_present`]`("nvrtc")`.
pub(crate) fn nvrtc_version() -> Option<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both pointers are valid for writes of one c_int each.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    (r == sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// What one NVRTC compilation produced.
pub(crate) struct Compiled {
    /// The cubin (machine code for the real architecture asked for).
    pub(crate) cubin: Vec<u8>,
    /// The compiler's log (warnings, and ptxas's resource report with `-Xptxas -v`).
    pub(crate) log: String,
}

/// Compiles `src` (NUL-free) with `options` into a cubin. Call only after
/// [`library_present`]`("nvrtc")`. On failure, returns the log.
pub(crate) fn compile_cubin(src: &str, name: &str, options: &[String]) -> Result<Compiled, String> {
    let src = CString::new(src).map_err(|_| "source contains a NUL byte".to_string())?;
    let name = CString::new(name).map_err(|_| "name contains a NUL byte".to_string())?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| e.to_string())?;
    // SAFETY: `prog` was just created and is destroyed once, below; `src` and `name` outlive it.
    let compiled = unsafe { result::compile_program(prog, options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    let out = match compiled {
        Err(e) => Err(format!("{e}: {log}")),
        // SAFETY: as above; the program compiled, so it has a cubin.
        Ok(()) => unsafe { cubin(prog) }.map(|cubin| Compiled {
            cubin,
            log: log.clone(),
        }),
    };
    // SAFETY: as above; `prog` is not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// # Safety
/// `prog` must be a live, successfully compiled program.
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: `prog` is live (caller); `size` is valid for one write.
    let r = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(format!(
            "no cubin ({r:?}): compile for a real architecture (sm_XX)"
        ));
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds exactly the `size` bytes NVRTC reported.
    let r = unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast::<c_char>()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBIN: {r:?}"));
    }
    Ok(buf)
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}
