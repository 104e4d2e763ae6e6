//! Dense layers through cuBLAS (bf16/fp16 in and out, f32 accumulation).
#![allow(unsafe_code)]

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr};

use crate::attention::ActScalar;
use crate::device::Gpu;
use crate::error::{KernelError, Result, bad};
use crate::ffi;

/// A cuBLAS handle on the device's stream.
pub struct Blas {
    blas: CudaBlas,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").finish_non_exhaustive()
    }
}

impl Blas {
    /// A handle for `gpu`'s stream. cuBLAS is probed first (cudarc panics without it).
    ///
    /// # Errors
    /// [`KernelError::NoDevice`] without libcublas; cuBLAS errors.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        if !ffi::library_present("cublas") {
            return Err(KernelError::NoDevice("libcublas is not installed".into()));
        }
        let blas =
            CudaBlas::new(gpu.stream().clone()).map_err(|e| KernelError::Blas(e.to_string()))?;
        Ok(Self { blas })
    }

    /// `out[t][j] = Σ_i x[t][i] · w[j][i]`: a linear layer with the weight stored `[n][k]`
    /// row-major (as PyTorch's `Linear`), `x` `[tokens][k]`, `out` `[tokens][n]`. `w` may be a
    /// view (rows of a stacked weight).
    ///
    /// # Errors
    /// [`KernelError::BadArgument`] for sizes that do not fit; cuBLAS errors.
    pub fn linear<T: ActScalar, W: DevicePtr<T>>(
        &self,
        x: &CudaSlice<T>,
        w: &W,
        n: usize,
        k: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        const K: &str = "linear";
        if n == 0 || k == 0 || n > i32::MAX as usize || k > i32::MAX as usize {
            return Err(bad(K, format!("weight shape {n} x {k}")));
        }
        if w.len() != n * k || !x.len().is_multiple_of(k) {
            return Err(bad(
                K,
                format!(
                    "weight of {} values for {n} x {k}, x of {}",
                    w.len(),
                    x.len()
                ),
            ));
        }
        let tokens = x.len() / k;
        if tokens == 0 || tokens > i32::MAX as usize || out.len() != tokens * n {
            return Err(bad(
                K,
                format!("out of {} values, expected {tokens} x {n}", out.len()),
            ));
        }
        // Column-major view: out^T (n x tokens) = W (n x k, stored as k x n: transposed) ·
        // x^T (k x tokens).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: tokens as i32,
            k: k as i32,
            alpha: T::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: T::ZERO,
            ldc: n as i32,
        };
        // SAFETY: A is w (k x n column-major, lda = k: n * k values), B is x (k x tokens,
        // ldb = k: tokens * k values), C is out (n x tokens, ldc = n: tokens * n values), all
        // checked above; the three buffers are distinct (out is borrowed mutably).
        unsafe { self.blas.gemm(cfg, w, x, out) }.map_err(|e| KernelError::Blas(e.to_string()))
    }
}
