// cache_write.cuh: the device functions of a cache write that cache.cu (reshape_and_cache,
// rope_and_cache) and the decode attention's folded RoPE + cache write (paged_attention_tc.cu,
// PagedDecoder::run_with_rope) share, so that both quantize and rotate with the same code:
// write_row (one (head, slot) row, quantized with exactly kv-quant's rules) and rotate_row
// (RoPE of one head row held by a warp).
//
// A warp holds a row: lane l has channels [l * kPerLane, (l + 1) * kPerLane).
#pragma once

#include "common.cuh"

namespace kvserve {

constexpr int kPerLane = HEAD_DIM / 32;

// The smallest float s with s * qmax >= absmax whose product stays finite (kv-quant's
// symmetric_scale).
__device__ __forceinline__ float symmetric_scale(float absmax, float qmax) {
  float s = absmax / qmax;
  if (s * qmax < absmax) s = nextafterf(s, INFINITY);
  while (!isfinite(s * qmax)) s = nextafterf(s, -INFINITY);
  return s;
}

__device__ __forceinline__ float warp_max(float x, int width) {
  for (int o = width / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_min(float x, int width) {
  for (int o = width / 2; o > 0; o /= 2) x = fminf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Writes one row (x: this lane's kPerLane values) at (head, slot) of the block at `base`.
__device__ __forceinline__ void write_row(unsigned char* __restrict__ base, int head, int slot,
                                          int block_size, int num_kv_heads, int lane,
                                          const float (&x)[kPerLane]) {
  unsigned char* vals = base + kv_value_offset(KV_DTYPE, block_size, HEAD_DIM, head, slot);
  unsigned char* params =
      base + kv_scale_offset(KV_DTYPE, block_size, num_kv_heads, HEAD_DIM, head, slot);
  const int c0 = lane * kPerLane;
#if KV_DTYPE == KVT_FP16
  __half* h = reinterpret_cast<__half*>(vals);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) h[c0 + i] = __float2half_rn(x[i]);
#elif KV_DTYPE == KVT_BF16
  __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(vals);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) h[c0 + i] = __float2bfloat16_rn(x[i]);
#elif KV_DTYPE == KVT_INT8 || KV_DTYPE == KVT_FP8_E4M3 || KV_DTYPE == KVT_FP8_E5M2
  // The scale comes from the finite values only.
  float absmax = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    if (isfinite(x[i])) absmax = fmaxf(absmax, fabsf(x[i]));
  absmax = warp_max(absmax, 32);
#if KV_DTYPE == KVT_INT8
  const float qmax = static_cast<float>(KV_INT8_MAX_CODE);
#elif KV_DTYPE == KVT_FP8_E4M3
  const float qmax = KV_FP8_E4M3_MAX;
#else
  const float qmax = KV_FP8_E5M2_MAX;
#endif
  const float scale = symmetric_scale(absmax, qmax);
  if (lane == 0) *reinterpret_cast<float*>(params) = scale;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    unsigned char code = 0;
    if (scale != 0.f && !isnan(x[i])) {
      const float t = x[i] / scale;
#if KV_DTYPE == KVT_INT8
      code = static_cast<unsigned char>(
          static_cast<signed char>(__float2int_rn(fminf(fmaxf(t, -qmax), qmax))));
#elif KV_DTYPE == KVT_FP8_E4M3
      code = __nv_cvt_float_to_fp8(t, __NV_SATFINITE, __NV_E4M3);
#else
      code = __nv_cvt_float_to_fp8(t, __NV_SATFINITE, __NV_E5M2);
#endif
    }
    vals[c0 + i] = code;
  }
#else  // int4: per group of kGroupSize channels, (scale, min) in f16, x = code * scale + min
  static_assert(kIsInt4, "unknown KV_DTYPE");
  constexpr int kLanesPerGroup = kGroupSize / kPerLane;
  static_assert(kGroupSize % kPerLane == 0 && kLanesPerGroup <= 32, "int4 group vs lanes");
  float lo = INFINITY, hi = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (isfinite(x[i])) {
      lo = fminf(lo, x[i]);
      hi = fmaxf(hi, x[i]);
    }
  }
  lo = warp_min(lo, kLanesPerGroup);
  hi = warp_max(hi, kLanesPerGroup);
  __half scale16 = __float2half_rn(0.f), min16 = __float2half_rn(0.f);
  if (lo <= hi) {
    lo = fminf(fmaxf(lo, -KV_INT4_RANGE_MAX), KV_INT4_RANGE_MAX);
    hi = fminf(fmaxf(hi, -KV_INT4_RANGE_MAX), KV_INT4_RANGE_MAX);
    min16 = __float2half_rd(lo);
    // In double so the span is not rounded before the upward f16 rounding (as kv-quant).
    const double span = static_cast<double>(hi) - static_cast<double>(__half2float(min16));
    scale16 = __float2half_ru(__double2float_ru(span / 15.0));
  }
  const float scale = __half2float(scale16), mn = __half2float(min16);
  if (lane % kLanesPerGroup == 0) {
    __half2 p;
    p.x = scale16;
    p.y = min16;
    *reinterpret_cast<__half2*>(params + (c0 / kGroupSize) * KV_INT4_PARAM_BYTES) = p;
  }
  const float qmax = static_cast<float>(KV_INT4_MAX_CODE);
#pragma unroll
  for (int i = 0; i < kPerLane; i += 2) {
    int c[2] = {0, 0};
    if (scale != 0.f) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float v = isnan(x[i + j]) ? 0.f : x[i + j];
        c[j] = __float2int_rn(fminf(fmaxf((v - mn) / scale, 0.f), qmax));
      }
    }
    vals[(c0 + i) / 2] = static_cast<unsigned char>(c[0] | (c[1] << 4));
  }
#endif
}

// Rotates one head row (x: this lane's kPerLane values, the warp holding the row) by the
// angle of each channel pair i, pairs (2i, 2i + 1) when interleaved, else (i, i + HEAD_DIM /
// 2), and returns the results rounded to the activation type. `angle(i)` gives pair i's
// (sin, cos) as `rope_angle` (scalar.cuh) computes them: from the position and inv_freq
// directly (`AngleOf`, rope_and_cache), or from a table of them computed once per CTA (the
// decode attention's folded RoPE): the same bits.
//
// The arithmetic is `rotate_by` (scalar.cuh), the same as `rope` in elementwise.cu.
//
// Interleaved pairs lie within a lane (kPerLane is even); half-split pairs are lanes l and
// l + 16 (HEAD_DIM / 2 = 16 * kPerLane), exchanged with one shuffle per value.
template <class Angle>
__device__ __forceinline__ void rotate_row(const float (&x)[kPerLane], scalar_t (&y)[kPerLane],
                                           const Angle& angle, int lane, int interleaved) {
  if (interleaved) {
#pragma unroll
    for (int p = 0; p < kPerLane / 2; ++p) {
      const float2 r = rotate_by(x[2 * p], x[2 * p + 1], angle(lane * (kPerLane / 2) + p));
      y[2 * p] = from_float(r.x);
      y[2 * p + 1] = from_float(r.y);
    }
  } else {
    const bool first = lane < 16;  // holds x0 of its pairs (channels below HEAD_DIM / 2)
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, x[i], 16);
      const float2 sc = angle((lane % 16) * kPerLane + i);
      y[i] = from_float(first ? rotate_by(x[i], other, sc).x : rotate_by(other, x[i], sc).y);
    }
  }
}

// The angles of rope_and_cache: pair i's from the position and inv_freq[i].
struct AngleOf {
  float pos;
  const float* __restrict__ inv_freq;
  __device__ __forceinline__ float2 operator()(int i) const {
    return rope_angle(pos, inv_freq[i]);
  }
};

}  // namespace kvserve
