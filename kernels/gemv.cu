// gemv.cu: linear layers for a few tokens (decode batches of M <= 8), where a GEMM library
// leaves bandwidth on the table: y[m][n] = sum_k x[m][k] * w[n][k] (+ bias[n]), the weight
// `[N][K]` row-major as PyTorch's Linear.
//
// Bound by streaming the weight once: each warp owns R consecutive rows (or a 1 / ksplit share
// of their K range: `ksplit` warps of a CTA split a row group's K and add their sums through
// shared memory, so short grids still keep enough bytes in flight) and reads them with 16-byte
// loads, kUnroll per lane and row in flight, evict-first (the weight is read once per step; x
// stays in L1); every token of the batch reuses each loaded chunk. f32 accumulation, a warp
// reduction per (row, token).
//
// Entry points (M = tokens):
//   gemv_M            y = x W^T (+ bias), rows split into up to three outputs (a fused Q/K/V
//                     weight writes q, k and v apart);
//   gemv_glu_M        act[j] = silu(gate) * up from rows j and inter + j of a stacked gate/up
//                     weight.
//
// Compiled per activation type: SCALAR (0 = half, 1 = bfloat16). K must be a multiple of 8
// and the weight 16-byte aligned (checked by the launcher).
#include "scalar.cuh"

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 2
#endif
// 16-byte weight loads in flight per lane and row: 2 read the DRAM better than 4 or 8 on an
// H200 (kernels/NOTES.md).
constexpr int kUnroll = GEMV_UNROLL;

// Two packed 16-bit values as f32.
__device__ __forceinline__ float2 pair_to_float2(unsigned v) {
#if SCALAR == 0
  __half2 h = *reinterpret_cast<__half2*>(&v);
  return __half22float2(h);
#else
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
#endif
}

// acc += dot(a, b) over 8 packed values each.
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b, float acc) {
  const unsigned av[4] = {a.x, a.y, a.z, a.w};
  const unsigned bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = pair_to_float2(av[i]);
    const float2 fb = pair_to_float2(bv[i]);
    acc = fmaf(fa.x, fb.x, acc);
    acc = fmaf(fa.y, fb.y, acc);
  }
  return acc;
}

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  const int4 v = __ldcs(reinterpret_cast<const int4*>(p));
  return make_uint4(v.x, v.y, v.z, v.w);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// acc[r][m] = sum over chunks [c_begin, c_end) of x[m] . rows[r] (8 values per chunk) for this
// warp's R rows (null rows are skipped: the last warp of an odd N). Every lane gets the full
// sums.
template <int M, int R>
__device__ __forceinline__ void rows_dot(const scalar_t* const (&rows)[R],
                                         const scalar_t* __restrict__ x, int chunks, int c_begin,
                                         int c_end, float (&acc)[R][M]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  const uint4* x4 = reinterpret_cast<const uint4*>(x);
  for (int c0 = c_begin + lane; c0 < c_end; c0 += 32 * kUnroll) {
    uint4 wv[R][kUnroll];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * 32;
        wv[r][u] = (rows[r] != nullptr && c < c_end)
                       ? load_stream(reinterpret_cast<const uint4*>(rows[r]) + c)
                       : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * 32;
      if (c < c_end) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const uint4 xv = __ldg(x4 + static_cast<long long>(m) * chunks + c);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r][m] = dot8(wv[r][u], xv, acc[r][m]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
}

// Adds the partial sums of the `ksplit` warps sharing a row group (consecutive warps of the
// CTA); the first of them returns true with the totals in `acc`. Every thread of the CTA
// must call it (it holds a barrier).
template <int M, int R>
__device__ __forceinline__ bool combine_parts(float (&acc)[R][M], int ksplit) {
  if (ksplit == 1) return true;
  __shared__ float partial[kWarps][R][M];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) partial[warp][r][m] = acc[r][m];
  }
  __syncthreads();
  if (warp % ksplit != 0) return false;
  for (int p = 1; p < ksplit; ++p)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] += partial[warp + p][r][m];
  return true;
}

// Rows per warp in the plain products: two when the batch is large enough that the x loads
// (from L1) would otherwise rival the weight loads.
template <int M>
struct PlainRows {
  static constexpr int value = M >= 3 ? 2 : 1;
};

// Where this warp works: its row group (index) and its share [c_begin, c_end) of the K
// chunks; `ksplit` consecutive warps share a group.
struct Share {
  int group, c_begin, c_end;
};

__device__ __forceinline__ Share share_of(int chunks, int ksplit) {
  const int warp = threadIdx.x / 32;
  const int part = warp % ksplit;
  const int per = (chunks + ksplit - 1) / ksplit;
  return {blockIdx.x * (kWarps / ksplit) + warp / ksplit, min(chunks, part * per),
          min(chunks, (part + 1) * per)};
}

// y = x W^T (+ bias) over n rows of K = 8 * chunks: rows [0, n0) go to y0 ([M][n0]), [n0, n01)
// to y1 ([M][n01 - n0]), [n01, n) to y2 ([M][n - n01]). grid (ceil(n / (kWarps / ksplit * R))),
// block kThreads.
template <int M>
__device__ __forceinline__ void gemv_impl(scalar_t* __restrict__ y0, scalar_t* __restrict__ y1,
                                          scalar_t* __restrict__ y2,
                                          const scalar_t* __restrict__ w,
                                          const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ bias, int n0, int n01,
                                          int n, int k, int ksplit) {
  constexpr int R = PlainRows<M>::value;
  const int chunks = k / 8;
  const Share sh = share_of(chunks, ksplit);
  const int first = sh.group * R;
  const scalar_t* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    rows[r] = first + r < n ? w + static_cast<long long>(first + r) * k : nullptr;
  float acc[R][M];
  rows_dot<M, R>(rows, x, chunks, sh.c_begin, sh.c_end, acc);
  if (!combine_parts<M, R>(acc, ksplit)) return;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = first + r;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (lane != m || row >= n) continue;
      float v = acc[r][m];
      if (bias != nullptr) v += to_float(bias[row]);
      if (row < n0)
        y0[static_cast<long long>(m) * n0 + row] = from_float(v);
      else if (row < n01)
        y1[static_cast<long long>(m) * (n01 - n0) + (row - n0)] = from_float(v);
      else
        y2[static_cast<long long>(m) * (n - n01) + (row - n01)] = from_float(v);
    }
  }
}

// y[m][j] = silu(g) * u with g = (x W^T)[m][j], u = (x W^T)[m][inter + j], each rounded to
// scalar_t first (as the unfused GEMM + silu_mul path). grid (ceil(inter / (kWarps / ksplit))),
// block kThreads.
template <int M>
__device__ __forceinline__ void gemv_glu_impl(scalar_t* __restrict__ y,
                                              const scalar_t* __restrict__ w,
                                              const scalar_t* __restrict__ x, int inter, int k,
                                              int ksplit) {
  const int chunks = k / 8;
  const Share sh = share_of(chunks, ksplit);
  const int j = sh.group;
  const scalar_t* rows[2] = {j < inter ? w + static_cast<long long>(j) * k : nullptr,
                             j < inter ? w + static_cast<long long>(inter + j) * k : nullptr};
  float acc[2][M];
  rows_dot<M, 2>(rows, x, chunks, sh.c_begin, sh.c_end, acc);
  if (!combine_parts<M, 2>(acc, ksplit) || j >= inter) return;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (lane != m) continue;
    const float g = to_float(from_float(acc[0][m]));
    const float u = to_float(from_float(acc[1][m]));
    y[static_cast<long long>(m) * inter + j] = from_float(g / (1.f + __expf(-g)) * u);
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core variant (gemv_tc_M, gemv_glu_tc_M): a warp computes a tile of 16 weight rows
// for all M <= 8 tokens with mma.m16n8k16 (weight rows as A, the tokens as the 8 columns of
// B), so its cost does not grow with the tokens the way the f32 FMAs above do. K order is
// permuted inside each 32-wide chunk so that every lane's operands are whole 16-byte loads:
// lane (g = lane / 4, t = lane % 4) loads k = base + 8t .. + 7 of rows g and g + 8 and of
// token g's x; the first mma takes k + 0..3 and the second k + 4..7 in the fragment slots
// (2t, 2t + 1, 2t + 8, 2t + 9) of A's rows and B's column: the same permutation on both
// sides, so the sums are the same.

#if SCALAR == 0
#define GEMV_MMA_TYPE "f16"
#else
#define GEMV_MMA_TYPE "bf16"
#endif

__device__ __forceinline__ void mma_16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                          unsigned a3, unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." GEMV_MMA_TYPE "." GEMV_MMA_TYPE
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d[T][4] += W[tile T rows] . x over the chunks [c_begin, c_end) (32 values each) for T tiles
// of 16 rows starting at rows[T] (rows past n zero; tokens past M zero). d[T] holds C(row g,
// tokens 2t, 2t + 1) and C(row g + 8, tokens 2t, 2t + 1) of tile T.
template <int M, int T>
__device__ __forceinline__ void tiles_dot(const scalar_t* __restrict__ w, const int (&tile_row)[T],
                                          int n, const scalar_t* __restrict__ x, int k,
                                          int c_begin, int c_end, float (&d)[T][4]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < T; ++i) d[i][0] = d[i][1] = d[i][2] = d[i][3] = 0.f;
  const scalar_t* lo[T];
  const scalar_t* hi[T];
#pragma unroll
  for (int i = 0; i < T; ++i) {
    const int r0 = tile_row[i] + g, r1 = tile_row[i] + g + 8;
    lo[i] = r0 < n ? w + static_cast<long long>(r0) * k + 8 * t : nullptr;
    hi[i] = r1 < n ? w + static_cast<long long>(r1) * k + 8 * t : nullptr;
  }
  const scalar_t* xg = g < M ? x + static_cast<long long>(g) * k + 8 * t : nullptr;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  // 32-wide chunks in flight: 4 for one tile (4 KB per warp), 2 for two.
  constexpr int U = 4 / T;
  for (int c = c_begin; c < c_end; c += U) {
    uint4 a_lo[U][T], a_hi[U][T], b[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in = c + u < c_end;
      const long long off = static_cast<long long>(c + u) * 32;
#pragma unroll
      for (int i = 0; i < T; ++i) {
        a_lo[u][i] = in && lo[i] ? load_stream(reinterpret_cast<const uint4*>(lo[i] + off)) : zero;
        a_hi[u][i] = in && hi[i] ? load_stream(reinterpret_cast<const uint4*>(hi[i] + off)) : zero;
      }
      b[u] = in && xg ? __ldg(reinterpret_cast<const uint4*>(xg + off)) : zero;
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < T; ++i) {
        mma_16816(d[i], a_lo[u][i].x, a_hi[u][i].x, a_lo[u][i].y, a_hi[u][i].y, b[u].x, b[u].y);
        mma_16816(d[i], a_lo[u][i].z, a_hi[u][i].z, a_lo[u][i].w, a_hi[u][i].w, b[u].z, b[u].w);
      }
  }
}

// Adds the fragments of the `ksplit` warps sharing a tile (consecutive warps of the CTA); the
// first returns true with the totals. Every thread of the CTA must call it.
template <int T>
__device__ __forceinline__ bool combine_tiles(float (&d)[T][4], int ksplit) {
  if (ksplit == 1) return true;
  __shared__ float partial[kWarps][T][4][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < T; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) partial[warp][i][j][lane] = d[i][j];
  __syncthreads();
  if (warp % ksplit != 0) return false;
  for (int p = 1; p < ksplit; ++p)
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) d[i][j] += partial[warp + p][i][j][lane];
  return true;
}

// y = x W^T (+ bias) as gemv_impl, a tile of 16 rows per warp group. grid
// (ceil(ceil(n / 16) / (kWarps / ksplit))), block kThreads.
template <int M>
__device__ __forceinline__ void gemv_tc_impl(scalar_t* __restrict__ y0, scalar_t* __restrict__ y1,
                                             scalar_t* __restrict__ y2,
                                             const scalar_t* __restrict__ w,
                                             const scalar_t* __restrict__ x,
                                             const scalar_t* __restrict__ bias, int n0, int n01,
                                             int n, int k, int ksplit) {
  const int chunks = k / 32;
  const Share sh = share_of(chunks, ksplit);
  const int tile_row[1] = {sh.group * 16};
  float d[1][4];
  tiles_dot<M, 1>(w, tile_row, n, x, k, sh.c_begin, sh.c_end, d);
  if (!combine_tiles<1>(d, ksplit)) return;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int row = tile_row[0] + g + (j >= 2 ? 8 : 0);
    const int m = 2 * t + (j & 1);
    if (m >= M || row >= n) continue;
    float v = d[0][j];
    if (bias != nullptr) v += to_float(bias[row]);
    if (row < n0)
      y0[static_cast<long long>(m) * n0 + row] = from_float(v);
    else if (row < n01)
      y1[static_cast<long long>(m) * (n01 - n0) + (row - n0)] = from_float(v);
    else
      y2[static_cast<long long>(m) * (n - n01) + (row - n01)] = from_float(v);
  }
}

// act = silu(gate) * up as gemv_glu_impl, tiles of 16 gate rows and their 16 up rows per
// warp group. grid (ceil(ceil(inter / 16) / (kWarps / ksplit))), block kThreads.
template <int M>
__device__ __forceinline__ void gemv_glu_tc_impl(scalar_t* __restrict__ y,
                                                 const scalar_t* __restrict__ w,
                                                 const scalar_t* __restrict__ x, int inter,
                                                 int k, int ksplit) {
  const int chunks = k / 32;
  const Share sh = share_of(chunks, ksplit);
  const int j0 = sh.group * 16;
  // The bound inter + limit stops the up tile at the last pair; gate rows past `inter` (a
  // partial last tile) read up rows, whose results are dropped below.
  const int tile_row[2] = {j0, inter + j0};
  float d[2][4];
  const int limit = min(inter, j0 + 16);
  tiles_dot<M, 2>(w, tile_row, inter + limit, x, k, sh.c_begin, sh.c_end, d);
  if (!combine_tiles<2>(d, ksplit)) return;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int row = j0 + g + (j >= 2 ? 8 : 0);
    const int m = 2 * t + (j & 1);
    if (m >= M || row >= inter) continue;
    const float gv = to_float(from_float(d[0][j]));
    const float uv = to_float(from_float(d[1][j]));
    y[static_cast<long long>(m) * inter + row] = from_float(gv / (1.f + __expf(-gv)) * uv);
  }
}

#define GEMV_ENTRY(M)                                                                          \
  extern "C" __global__ void __launch_bounds__(kThreads, 2)                                   \
      gemv_##M(scalar_t* __restrict__ y0, scalar_t* __restrict__ y1, scalar_t* __restrict__ y2, \
               const scalar_t* __restrict__ w, const scalar_t* __restrict__ x,                \
               const scalar_t* __restrict__ bias, int n0, int n01, int n, int k, int ksplit) { \
    gemv_impl<M>(y0, y1, y2, w, x, bias, n0, n01, n, k, ksplit);                              \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, 2)                                   \
      gemv_glu_##M(scalar_t* __restrict__ y, const scalar_t* __restrict__ w,                  \
                   const scalar_t* __restrict__ x, int inter, int k, int ksplit) {            \
    gemv_glu_impl<M>(y, w, x, inter, k, ksplit);                                              \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, 2)                                   \
      gemv_tc_##M(scalar_t* __restrict__ y0, scalar_t* __restrict__ y1,                       \
                  scalar_t* __restrict__ y2, const scalar_t* __restrict__ w,                  \
                  const scalar_t* __restrict__ x, const scalar_t* __restrict__ bias, int n0,  \
                  int n01, int n, int k, int ksplit) {                                         \
    gemv_tc_impl<M>(y0, y1, y2, w, x, bias, n0, n01, n, k, ksplit);                           \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, 2)                                   \
      gemv_glu_tc_##M(scalar_t* __restrict__ y, const scalar_t* __restrict__ w,               \
                      const scalar_t* __restrict__ x, int inter, int k, int ksplit) {         \
    gemv_glu_tc_impl<M>(y, w, x, inter, k, ksplit);                                           \
  }

GEMV_ENTRY(1)
GEMV_ENTRY(2)
GEMV_ENTRY(3)
GEMV_ENTRY(4)
GEMV_ENTRY(5)
GEMV_ENTRY(6)
GEMV_ENTRY(7)
GEMV_ENTRY(8)
