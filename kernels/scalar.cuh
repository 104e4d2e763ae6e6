// scalar.cuh: the activation type every kernel is compiled for, SCALAR (0 = half,
// 1 = bfloat16), as scalar_t with its conversions to and from f32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef SCALAR
#error "SCALAR must be defined (0 = half, 1 = bfloat16)"
#endif

#if SCALAR == 0
typedef __half scalar_t;
__device__ __forceinline__ float to_float(scalar_t x) { return __half2float(x); }
__device__ __forceinline__ scalar_t from_float(float x) { return __float2half_rn(x); }
#else
typedef __nv_bfloat16 scalar_t;
__device__ __forceinline__ float to_float(scalar_t x) { return __bfloat162float(x); }
__device__ __forceinline__ scalar_t from_float(float x) { return __float2bfloat16_rn(x); }
#endif

// Programmatic dependent launch (crates/kernels-cuda/src/launch.rs). A kernel launched as
// "dependent" calls kvs_wait_prior() in every thread before it touches memory an earlier
// kernel of the stream writes or reads; before it, only read what no kernel writes (weights).
// kvs_launch_dependents() marks where the next kernel's CTAs may be scheduled before this one
// finishes (they still wait for its completion at their own kvs_wait_prior()). Both are no-ops
// before sm_90 and for kernels launched the plain way.
__device__ __forceinline__ void kvs_wait_prior() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// The trigger is left to each CTA's exit by default: the next grid is scheduled as this one
// drains. Measured on an H200 (kernels/NOTES.md): against a trigger right after the wait, the
// 8B step at batch 8 went 5.80 -> 5.29 ms and attention_bench 16 x 4K 93.9 -> 75.8 us (the
// waiting CTAs of the next grid no longer take SM slots from a running single-wave grid), and
// nothing got slower. KVSERVE_KERNEL_DEFINES=-DKVS_EARLY_TRIGGER brings the early trigger back
// for A/B measurements.
__device__ __forceinline__ void kvs_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(KVS_EARLY_TRIGGER)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The rotary embedding of one channel pair (x0, x1) by the angle pos * freq, as the CPU
// backend computes it: the f32 product, then an accurate sin/cos. The roundings are spelled
// out with _rn intrinsics (never contracted by the compiler), so every kernel that rotates
// (`rope` in elementwise.cu, `rope_and_cache` in cache.cu, the decode attention's folded
// RoPE in paged_attention_tc.cu) gives the same bits. rope_angle is (sin, cos) of the angle
// (a kernel may compute it once per pair and reuse it for every head); rotate_by rotates by
// it.
__device__ __forceinline__ float2 rope_angle(float pos, float freq) {
  float s, c;
  sincosf(__fmul_rn(pos, freq), &s, &c);
  return make_float2(s, c);
}
__device__ __forceinline__ float2 rotate_by(float x0, float x1, float2 sc) {
  return make_float2(__fmaf_rn(x0, sc.y, -__fmul_rn(x1, sc.x)),
                     __fmaf_rn(x0, sc.x, __fmul_rn(x1, sc.y)));
}
__device__ __forceinline__ float2 rotate_pair(float x0, float x1, float pos, float freq) {
  return rotate_by(x0, x1, rope_angle(pos, freq));
}
