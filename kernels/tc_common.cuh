// tc_common.cuh: what the tensor-core attention kernels (paged_attention_tc.cu and
// paged_prefill_tc.cu) share: how a KV dtype reaches the tensor cores (KVS_TC_CODES), packing
// into 16-bit pairs, the mma.m16n8k16 and ldmatrix wrappers, the cp.async and mbarrier
// helpers, and where a token's row lives in the paged cache.
#pragma once

#include "common.cuh"

namespace kvserve {

#if KV_DTYPE == KVT_INT8 || KVT_IS_FP8
#define KVS_TC_CODES 1  // 8-bit codes with one f32 scale per (token, head)
#define KVS_TC_INT4 0
constexpr int kBytes = 1;
#elif KVT_IS_INT4
#define KVS_TC_CODES 0
#define KVS_TC_INT4 1  // packed nibbles with a half2 (scale, min) per group of channels
#else
static_assert(KV_DTYPE == (SCALAR == 0 ? KVT_FP16 : KVT_BF16),
              "16-bit KV must be of the activation type");
#define KVS_TC_CODES 0
#define KVS_TC_INT4 0
constexpr int kBytes = 2;
#endif
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ unsigned pack(scalar_t lo, scalar_t hi) {
  const unsigned short a = *reinterpret_cast<const unsigned short*>(&lo);
  const unsigned short b = *reinterpret_cast<const unsigned short*>(&hi);
  return static_cast<unsigned>(a) | (static_cast<unsigned>(b) << 16);
}

__device__ __forceinline__ unsigned pack_float(float lo, float hi) {
  return pack(from_float(lo), from_float(hi));
}

#if SCALAR == 0
#define KVS_MMA_TYPE "f16"
#else
#define KVS_MMA_TYPE "bf16"
#endif

// D = A * B + D for one m16n8k16 tile, f32 accumulators.
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                    unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." KVS_MMA_TYPE "." KVS_MMA_TYPE
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 matrices of 16-bit elements from shared memory; lane l gives the address of row
// l % 8 of matrix l / 8 and receives, of matrix i, in r[i] the elements (row l / 4, columns
// 2 (l % 4), + 1) (with .trans: (rows 2 (l % 4), + 1, column l / 4)).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Copies 16 bytes global -> shared asynchronously; `bytes` 0 writes zeros instead.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(bytes));
}

// Copies N (4, 8 or 16) bytes global -> shared asynchronously; `bytes` 0 writes zeros
// instead.
template <int N>
__device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem, int bytes) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async copies 4, 8 or 16 bytes");
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem), "n"(N),
               "r"(bytes));
}

// Copies 4 bytes global -> shared asynchronously; `bytes` 0 writes zeros instead.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, int bytes) {
  cp_async_ca<4>(smem, gmem, bytes);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// mbarriers in shared memory (sm_80 and later), for producer / consumer pipelines. A phase
// completes when `count` arrivals (init) have happened; waits name the phase by its parity.
__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, unsigned count) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(a), "r"(count) : "memory");
}

// One arrival (release semantics at CTA scope: this thread's earlier shared-memory accesses
// happen before the phase completes).
__device__ __forceinline__ void mbarrier_arrive(unsigned long long* bar) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared.b64 st, [%0];\n}\n" ::"r"(a)
               : "memory");
}

// One arrival, made when every cp.async this thread issued before it has landed (.noinc: it
// counts as one of the `count` arrivals of the phase, with no arrive of the thread's own).
__device__ __forceinline__ void cp_async_mbarrier_arrive(unsigned long long* bar) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(a) : "memory");
}

// Waits until the phase of parity `parity` has completed (acquire at CTA scope: what the
// arrivals released, and cp.async data they tracked, is visible after it). The barrier must
// not be more than one phase past it (the pipelines' invariants guarantee that).
__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, unsigned parity) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  unsigned done;
  do {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(a), "r"(parity)
        : "memory");
#else
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(a), "r"(parity)
        : "memory");
#endif
  } while (!done);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// TMA (sm_90): tensor maps, transaction-counted mbarriers, proxy fences.

// A CUtensorMap as a kernel parameter (`const __grid_constant__`): 128 opaque bytes, encoded on
// the host by cuTensorMapEncodeTiled (the driver header is not available to NVRTC).
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

// Makes the mbarrier initializations of this thread visible to the async proxy (the TMA
// engine's complete_tx) before the barriers are used.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also expects `bytes` more bytes of transactions (complete_tx) in the current
// phase: the phase completes when every arrival has been made and every byte has landed.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(a), "r"(bytes)
               : "memory");
}

// Copies the box of `map` at coordinates (c0, c1) (innermost first, in elements) into shared
// memory at `dst` (the map's swizzle applied), completing its bytes on `bar`.
__device__ __forceinline__ void tma_load_2d(unsigned dst, const TensorMap* map, int c0, int c1,
                                            unsigned long long* bar) {
  const unsigned b = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
      "{%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(b)
      : "memory");
}

// Orders this thread's earlier generic-proxy accesses to shared memory before later
// async-proxy (TMA) accesses (and the reverse).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The same for every state space (global memory too).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async;\n" ::: "memory");
}
#endif

#if KVS_TC_INT4
// Nibbles I and I + 4 of `w` (bits 4 I and 16 + 4 I) as a packed pair of the activation type,
// each 1 + nibble / 16 (exact in bf16 and fp16): the nibble lands in the top four mantissa
// bits of 1.0 (one shift and one mask-or).
template <int I>
__device__ __forceinline__ unsigned nibble_pair(unsigned w) {
#if SCALAR == 0
  constexpr int kShift = 4 * I - 6;  // fp16: 10 mantissa bits, 1.0 = 0x3C00
  constexpr unsigned kMask = 0x03C003C0u, kOne = 0x3C003C00u;
#else
  constexpr int kShift = 4 * I - 3;  // bf16: 7 mantissa bits, 1.0 = 0x3F80
  constexpr unsigned kMask = 0x00780078u, kOne = 0x3F803F80u;
#endif
  unsigned x;
  if constexpr (kShift >= 0) {
    x = w >> kShift;
  } else {
    x = w << -kShift;
  }
  // (x & kMask) | kOne in one lop3 (the compiler splits it in two otherwise).
  unsigned d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(d) : "r"(x), "n"(kMask), "n"(kOne));
  return d;
}

// Nibbles I and I + 4 of `w` as a packed pair of the activation type holding the codes
// themselves (exact): the nibble goes into the lowest mantissa bits of 2^7 (bf16) or 2^10
// (fp16), where the spacing is 1, and that power of two is subtracted (one packed fma).
template <int I>
__device__ __forceinline__ unsigned nibble_code(unsigned w) {
#if SCALAR == 0
  constexpr unsigned kBase = 0x64006400u, kOne = 0x3C003C00u, kMinusBase = 0xE400E400u;
#else
  constexpr unsigned kBase = 0x43004300u, kOne = 0x3F803F80u, kMinusBase = 0xC300C300u;
#endif
  unsigned x;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n"
      : "=r"(x)
      : "r"(w >> (4 * I)), "n"(0x000F000Fu), "n"(kBase));
  unsigned d;
#if SCALAR == 0
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(x), "r"(kOne), "r"(kMinusBase));
#else
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(x), "r"(kOne), "r"(kMinusBase));
#endif
  return d;
}
#endif

// 2^x, approximate (MUFU.EX2, results below 2^-126 flushed to 0; 2^-inf = 0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Where token t's row of KV head `head` starts in a cache (values, or with `scales` its
// scale row); -1 for a token outside [lo, hi).
__device__ __forceinline__ long long row_offset(const int* __restrict__ table, int t, int lo,
                                                int hi, int block_shift, int block_size,
                                                int num_kv_heads, long long block_bytes,
                                                int head, bool scales) {
  if (t < lo || t >= hi) return -1;
  const long long base = static_cast<long long>(table[t >> block_shift]) * block_bytes;
  const int slot = t & (block_size - 1);
  return base + (scales ? kv_scale_offset(KV_DTYPE, block_size, num_kv_heads, HEAD_DIM, head,
                                          slot)
                        : kv_value_offset(KV_DTYPE, block_size, HEAD_DIM, head, slot));
}

}  // namespace kvserve
