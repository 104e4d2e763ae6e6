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
