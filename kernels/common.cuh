// common.cuh: helpers shared by kvserve's KV-cache kernels (KV dequantization; the
// activation type comes from scalar.cuh).
//
// Every kernel source is compiled by NVRTC with these macros set by the launcher
// (crates/kernels-cuda): SCALAR (0 = half, 1 = bfloat16: the activation type of q, k, v and
// out), KV_DTYPE (a KV_DTYPE_* tag of kv_layout.cuh), HEAD_DIM and, for attention, GQA_GROUP
// (query heads per KV head). One compiled module per combination.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kv_layout.cuh"
#include "scalar.cuh"

// The dtype tags as preprocessor numbers (the kv_layout.cuh constants are C++ variables,
// which `#if` would silently read as 0), pinned to them.
#define KVT_FP16 0
#define KVT_BF16 1
#define KVT_INT8 2
#define KVT_FP8_E4M3 7
#define KVT_FP8_E5M2 8
static_assert(KVT_FP16 == kvserve::kv_layout::KV_DTYPE_FP16, "tag");
static_assert(KVT_BF16 == kvserve::kv_layout::KV_DTYPE_BF16, "tag");
static_assert(KVT_INT8 == kvserve::kv_layout::KV_DTYPE_INT8, "tag");
static_assert(KVT_FP8_E4M3 == kvserve::kv_layout::KV_DTYPE_FP8_E4M3, "tag");
static_assert(KVT_FP8_E5M2 == kvserve::kv_layout::KV_DTYPE_FP8_E5M2, "tag");
#define KVT_IS_FP8 (KV_DTYPE == KVT_FP8_E4M3 || KV_DTYPE == KVT_FP8_E5M2)
#define KVT_IS_INT4 (KV_DTYPE >= 3 && KV_DTYPE <= 6)

// NVRTC has no <math.h>.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#ifndef KV_DTYPE
#error "KV_DTYPE must be defined (a kv_layout.cuh dtype tag)"
#endif
#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif

namespace kvserve {

using namespace kv_layout;

constexpr int kValueRowBytes = kv_value_row_bytes(KV_DTYPE, HEAD_DIM);
constexpr int kScaleRowBytes = kv_scale_row_bytes(KV_DTYPE, HEAD_DIM);
constexpr int kGroupSize = kv_group_size(KV_DTYPE, HEAD_DIM);
constexpr bool kIsInt4 = kv_dtype_is_int4(KV_DTYPE);
static_assert(kValueRowBytes > 0, "unknown KV_DTYPE");
static_assert(HEAD_DIM % 32 == 0, "HEAD_DIM must be a multiple of 32");

// Channels one thread handles in a K or V row: 8, so that every dtype's chunk is whole bytes
// and an int4 group (>= 32 channels) never splits a chunk.
constexpr int kChunk = 8;
// Bytes of one chunk of a row: 16 (fp16/bf16), 8 (int8/fp8), 4 (int4).
constexpr int kChunkBytes = kValueRowBytes / (HEAD_DIM / kChunk);

// Raw bytes of one chunk, loaded with one vector load.
template <int N>
struct ChunkBits;
template <>
struct ChunkBits<16> {
  uint4 v;
};
template <>
struct ChunkBits<8> {
  uint2 v;
};
template <>
struct ChunkBits<4> {
  unsigned int v;
};
typedef ChunkBits<kChunkBytes> chunk_t;

__device__ __forceinline__ chunk_t load_chunk(const unsigned char* p) {
  chunk_t c;
  c.v = *reinterpret_cast<const decltype(c.v)*>(p);
  return c;
}

__device__ __forceinline__ float fp8_to_float(unsigned char code) {
#if KV_DTYPE == KVT_FP8_E5M2
  __half_raw h = __nv_cvt_fp8_to_halfraw(code, __NV_E5M2);
#else
  __half_raw h = __nv_cvt_fp8_to_halfraw(code, __NV_E4M3);
#endif
  return __half2float(__half(h));
}

// 32-bit word `i` of a chunk (`i` is a compile-time constant after unrolling: no local
// memory, no address taken).
__device__ __forceinline__ unsigned int chunk_word(const ChunkBits<16>& c, int i) {
  return i == 0 ? c.v.x : i == 1 ? c.v.y : i == 2 ? c.v.z : c.v.w;
}
__device__ __forceinline__ unsigned int chunk_word(const ChunkBits<8>& c, int i) {
  return i == 0 ? c.v.x : c.v.y;
}
__device__ __forceinline__ unsigned int chunk_word(const ChunkBits<4>& c, int) { return c.v; }

// The chunk's 8 values before the per-row (int8, fp8) or per-group (int4) scaling:
// x = raw * scale (+ min for int4). fp16/bf16 values are final.
__device__ __forceinline__ void chunk_raw(const chunk_t& c, float (&x)[kChunk]) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
#if KV_DTYPE == KVT_FP16 || KV_DTYPE == KVT_BF16
    const unsigned int w = chunk_word(c, i / 2);
    const unsigned short h = static_cast<unsigned short>((i & 1) ? (w >> 16) : (w & 0xffffu));
#if KV_DTYPE == KVT_FP16
    x[i] = __half2float(__ushort_as_half(h));
#else
    x[i] = __bfloat162float(__ushort_as_bfloat16(h));
#endif
#elif KV_DTYPE == KVT_INT8 || KVT_IS_FP8
    const unsigned int b = (chunk_word(c, i / 4) >> (8 * (i % 4))) & 0xffu;
#if KV_DTYPE == KVT_INT8
    x[i] = static_cast<float>(static_cast<signed char>(b));
#else
    x[i] = fp8_to_float(static_cast<unsigned char>(b));
#endif
#else  // int4: channel i is nibble i (byte i/2, low nibble for even i)
    static_assert(kIsInt4, "unknown KV_DTYPE");
    x[i] = static_cast<float>((chunk_word(c, 0) >> (4 * i)) & 0xfu);
#endif
  }
}

// The scaling of the chunk starting at `channel` of a (head, slot) row: {scale, min} with
// x = raw * scale + min ({1, 0} for fp16/bf16).
__device__ __forceinline__ float2 chunk_scale(const unsigned char* scale_row, int channel) {
#if KV_DTYPE == KVT_FP16 || KV_DTYPE == KVT_BF16
  return make_float2(1.f, 0.f);
#elif KV_DTYPE == KVT_INT8 || KV_DTYPE == KVT_FP8_E4M3 || KV_DTYPE == KVT_FP8_E5M2
  return make_float2(*reinterpret_cast<const float*>(scale_row), 0.f);
#else
  static_assert(kIsInt4, "unknown KV_DTYPE");
  const __half2 p =
      *reinterpret_cast<const __half2*>(scale_row + (channel / kGroupSize) * KV_INT4_PARAM_BYTES);
  return __half22float2(p);
#endif
}

}  // namespace kvserve
