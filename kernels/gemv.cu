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
//                     weight;
//   *_tc_M            the same on tensor cores (below);
//   *_snorm_M         the same with the RMSNorm of the f32 residual stream folded into the
//                     input: x[m][i] = scalar_t(nweight[i] * (residual[m][i] * rinv[m])), rounded
//                     as elementwise.cu's norm_row rounds it, rinv[m] = rsqrt(sum_p
//                     partials[m][p] / K + eps) from the sums of squares a residual epilogue
//                     (next) left. Each warp issues its first weight loads before the PDL wait
//                     (the weights are constant); then the CTA adds the partials in one fixed
//                     order (the same in every CTA and kernel) and writes the normalized rows
//                     once into dynamic shared memory (M rows of stage_stride(K) values: the
//                     launcher sizes it), and the unchanged product loop reads x from there.
//   *_norm_M          the same input normalized in the loop instead: every warp reads the
//                     residual and the norm weight where it would have read x and normalizes
//                     each element as it loads it (no shared rows: the fallback where the rows
//                     do not fit in shared memory, and KVSERVE_NORM_STAGE=0). Same rinv, same
//                     roundings, same launch shape: bit for bit the *_snorm_M results.
// Epilogue of gemv_M / gemv_tc_M / their norm entries: with `res_out` null the rows go to
// their outputs; otherwise ("residual") residual[m][row] += float(scalar_t(y)) (the rounding of
// the unfused product + add_rms_norm), nothing else is stored, and each CTA writes the sum of
// squares of the new residual values it owns to part_out[m][blockIdx.x] (`gridDim.x` partials
// per token; every row is finished by exactly one warp of one CTA; no atomics: deterministic).
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

// Two values packed as 16-bit pair (`lo` first in memory).
__device__ __forceinline__ unsigned pack_pair(scalar_t lo, scalar_t hi) {
#if SCALAR == 0
  return static_cast<unsigned>(__half_as_ushort(lo)) |
         (static_cast<unsigned>(__half_as_ushort(hi)) << 16);
#else
  return static_cast<unsigned>(__bfloat16_as_ushort(lo)) |
         (static_cast<unsigned>(__bfloat16_as_ushort(hi)) << 16);
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

// ---------------------------------------------------------------------------------------
// Inputs. A source's at(m, off[, shared(off)]) returns x[m][off .. off + 7] packed (off a
// multiple of 8; shared(off) is what the tokens share at that offset, loaded once for all);
// token(m) is the source of token m alone (as its token 0), for the tensor-core kernels where
// a lane reads one token; unroll<M>() is the FMA kernels' weight loads in flight per lane and
// row with it.

// Rows of scalar_t, `[M][k]` in global memory (kShared false: read through L1 by __ldg) or
// `[M][k]` in shared memory (kShared true, k the padded row length: the staged rows).
template <bool kShared>
struct RowsSrc {
  const scalar_t* x;
  int k;
  struct Shared {};
  template <int M>
  static constexpr int unroll() { return kUnroll; }
  __device__ __forceinline__ Shared shared(long long) const { return {}; }
  __device__ __forceinline__ uint4 at(int m, long long off, Shared = {}) const {
    if constexpr (kShared)
      return *reinterpret_cast<const uint4*>(x + m * k + static_cast<int>(off));
    else
      return __ldg(reinterpret_cast<const uint4*>(x + static_cast<long long>(m) * k + off));
  }
  __device__ __forceinline__ RowsSrc token(int m) const {
    return {x + static_cast<long long>(m) * k, k};
  }
};
typedef RowsSrc<false> PlainSrc;
typedef RowsSrc<true> StagedSrc;

// scalar_t(w * (r * s)) for 8 consecutive values, r = (a, b), w packed: the rounding of
// elementwise.cu's norm_row (two f32 products, never contracted), shared by both normalized
// inputs so that they give the same bits.
__device__ __forceinline__ uint4 normalize8(const float4& a, const float4& b, const uint4& wv,
                                            float s) {
  const float2 w0 = pair_to_float2(wv.x), w1 = pair_to_float2(wv.y);
  const float2 w2 = pair_to_float2(wv.z), w3 = pair_to_float2(wv.w);
  return make_uint4(pack_pair(from_float(w0.x * (a.x * s)), from_float(w0.y * (a.y * s))),
                    pack_pair(from_float(w1.x * (a.z * s)), from_float(w1.y * (a.w * s))),
                    pack_pair(from_float(w2.x * (b.x * s)), from_float(w2.y * (b.y * s))),
                    pack_pair(from_float(w3.x * (b.z * s)), from_float(w3.y * (b.w * s))));
}

// The RMSNorm of the f32 residual rows `[M][k]` with the weight `w` `[k]`, rounded as
// norm_row does: scalar_t(w * (r * rinv)), computed as each chunk is loaded.
template <int M>
struct NormSrc {
  const float* res;
  const scalar_t* w;
  int k;
  float rinv[M];
  // Weight loads in flight per lane and row: fewer for many tokens, whose residual chunks
  // (8 registers per token) take the room.
  template <int>
  static constexpr int unroll() { return M > 4 ? 1 : kUnroll; }
  // What the tokens share at one offset: the norm weight's chunk.
  typedef uint4 Shared;
  __device__ __forceinline__ uint4 shared(long long off) const {
    return __ldg(reinterpret_cast<const uint4*>(w + off));
  }
  __device__ __forceinline__ uint4 at(int m, long long off) const {
    return at(m, off, shared(off));
  }
  __device__ __forceinline__ uint4 at(int m, long long off, const uint4& wv) const {
    const float4* r = reinterpret_cast<const float4*>(res + static_cast<long long>(m) * k + off);
    return normalize8(__ldg(r), __ldg(r + 1), wv, rinv[m]);
  }
  __device__ __forceinline__ NormSrc<1> token(int m) const {
    // A select chain, not a dynamically indexed (local-memory) array.
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < M; ++i)
      if (i == m) s = rinv[i];
    return {res + static_cast<long long>(m) * k, w, k, {s}};
  }
};

// A load of what the previous kernel wrote (the partial sums), for code inlined after weight
// loads issued before the PDL wait: volatile asm with a memory clobber, so the compiler keeps
// it after the wait (it hoisted __ldg, i.e. ld.global.nc of `const __restrict__` data, above
// griddepcontrol.wait: seen in the SASS). Plain ld.global: cached in L1.
__device__ __forceinline__ float load_prior(const float* p) {
  float v;
  asm volatile("ld.global.f32 %0, [%1];\n" : "=f"(v) : "l"(p) : "memory");
  return v;
}

// rinv[m] = rsqrt(sum_p partials[m][p] / k + eps) for every token, the sum in one fixed order:
// thread i adds p = i, i + kThreads, ...; then the lanes of each warp; then the warps in
// order. The same in every CTA of every kernel (all have kThreads threads), so every consumer
// of one residual scales a token by the same rinv. Every thread of the CTA must call it (it
// holds barriers).
// This form returns the CTA's shared copy of the M scales (valid after its last barrier);
// the next gives them in registers.
template <int M>
__device__ __forceinline__ const float* norm_scales_shared(const float* __restrict__ partials,
                                                           int count, int k, float eps) {
  __shared__ float part[kWarps][M];
  __shared__ float scale[M];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float s[M];
#pragma unroll
  for (int m = 0; m < M; ++m) s[m] = 0.f;
#pragma unroll 4
  for (int i = threadIdx.x; i < count; i += kThreads)
#pragma unroll
    for (int m = 0; m < M; ++m)
      s[m] += load_prior(partials + static_cast<long long>(m) * count + i);
#pragma unroll
  for (int m = 0; m < M; ++m) s[m] = warp_sum(s[m]);
  if (lane == 0)
#pragma unroll
    for (int m = 0; m < M; ++m) part[warp][m] = s[m];
  __syncthreads();
  if (threadIdx.x < M) {
    float total = 0.f;
    for (int p = 0; p < kWarps; ++p) total += part[p][threadIdx.x];
    scale[threadIdx.x] = rsqrtf(total / k + eps);
  }
  __syncthreads();
  return scale;
}

template <int M>
__device__ __forceinline__ void norm_scales(const float* __restrict__ partials, int count, int k,
                                            float eps, float (&rinv)[M]) {
  const float* scale = norm_scales_shared<M>(partials, count, k, eps);
#pragma unroll
  for (int m = 0; m < M; ++m) rinv[m] = scale[m];
}

// ---------------------------------------------------------------------------------------
// Programmatic dependent launch (scalar.cuh, crates/kernels-cuda/src/launch.rs): the CTA
// waits for the previous kernel (nothing it reads or writes past this point, but the
// weights, may be touched earlier) and lets the next kernel's CTAs be scheduled.
__device__ __forceinline__ void wait_prior_kernel() {
  kvs_wait_prior();
  kvs_launch_dependents();
}

// ---------------------------------------------------------------------------------------
// Normalized rows staged in shared memory (the *_snorm_M entries).

// The dynamic shared memory of a CTA (0 bytes but in the *_snorm_M entries).
extern __shared__ __align__(16) unsigned char gemv_stage[];

// Values per staged row: k padded so that consecutive rows start 64 bytes apart modulo 128
// (the tensor-core loop's lanes g and g + 1 then read x at the same offset of two rows from
// different banks); gemv.rs's `stage_stride` is the same formula.
__device__ __forceinline__ int stage_stride(int k) {
  static_assert(sizeof(scalar_t) == 2, "two-byte activations");
  return k + ((192 - (2 * k) % 128) % 128) / 2;
}

// Bytes of the M staged rows (a multiple of 16); the residual slots follow them. The CTA's
// dynamic shared memory is stage_rows_bytes<M>(stride) + kStageSlotBytes (gemv.rs's
// `stage_bytes`).
template <int M>
__device__ __forceinline__ int stage_rows_bytes(int stride) {
  return M * stride * static_cast<int>(sizeof(scalar_t));
}

// Asynchronous copies of the residual into shared memory (cp.async, sm_80+): in flight
// without holding registers. The memory clobbers keep the compiler from moving this thread's
// shared-memory reads of a slot across the wait, or any of it above the PDL wait.
__device__ __forceinline__ void copy_async16(unsigned dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void copy_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Residual slices (8 f32 values) each thread has in flight while the CTA adds the partial
// sums: at M = 1 and K = 4096 all of them (512 slices, 256 threads, 2 each), so the residual
// and the sums come in one L2 round trip; more slices go through the same slots, kStageSlots
// copies ahead. Each slot is 32 bytes of shared memory per thread behind the staged rows.
constexpr int kStageSlots = 2;
constexpr int kStageSlotBytes = kStageSlots * kThreads * 32;

// xs[m * stride + i] = scalar_t(nw[i] * (res[m][i] * rinv[m])) for the M rows of k values
// (normalize8's rounding), rinv from norm_scales_shared; then a barrier. Slice j of thread i
// is (token, 8 values) number i + j * kThreads: each thread copies its slices' residual into
// its own slots (cp.async, halves of 16 bytes at thread-consecutive addresses: no bank
// conflicts), normalizes them from there with the norm weight (__ldg: constant, shared by the
// CTAs of an SM in L1) and writes the scalar_t rows; no barrier until the rows are complete.
// `slots` is kStageSlotBytes of shared memory. Every thread of the CTA must call it, after
// the PDL wait (the residual and the partials are the previous kernel's).
template <int M>
__device__ __forceinline__ void stage_normalized(scalar_t* xs, int stride, unsigned char* slots,
                                                 const float* __restrict__ res,
                                                 const scalar_t* __restrict__ nw,
                                                 const float* __restrict__ partials, int count,
                                                 int k, float eps) {
  const int slices = k / 8, items = M * slices;
  const int per_thread = (items + kThreads - 1) / kThreads;
  // Half q of slot p of this thread: a shared-memory address.
  const unsigned slot0 =
      static_cast<unsigned>(__cvta_generic_to_shared(slots)) + threadIdx.x * 16;
  const auto half = [&](int p, int q) { return slot0 + (p * 2 + q) * kThreads * 16; };
  // Slice j of this thread: token m, 8-value slice s; false past the last.
  const auto where = [&](int j, int& m, int& s) {
    const int i = threadIdx.x + j * kThreads;
    m = M == 1 ? 0 : i / slices;
    s = i - m * slices;
    return i < items;
  };
  // Slice j into slot j % kStageSlots, then a commit (empty past the last slice, so that
  // every thread has committed the same groups).
  const auto fetch = [&](int j) {
    int m, s;
    if (where(j, m, s)) {
      const float* r = res + static_cast<long long>(m) * k + 8 * s;
      const int p = j % kStageSlots;
      copy_async16(half(p, 0), r);
      copy_async16(half(p, 1), r + 4);
    }
    copy_commit();
  };
#pragma unroll
  for (int j = 0; j < kStageSlots; ++j) fetch(j);
  const float* scale = norm_scales_shared<M>(partials, count, k, eps);
  for (int j0 = 0; j0 < per_thread; j0 += kStageSlots) {
#pragma unroll
    for (int p = 0; p < kStageSlots; ++p) {
      const int j = j0 + p;
      // Groups complete in order: slice j's is done once at most kStageSlots - 1 are
      // pending.
      copy_wait<kStageSlots - 1>();
      int m, s;
      if (where(j, m, s)) {
        const uint4 w = __ldg(reinterpret_cast<const uint4*>(nw) + s);
        float4 a, b;
        asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                     : "=f"(a.x), "=f"(a.y), "=f"(a.z), "=f"(a.w)
                     : "r"(half(p, 0))
                     : "memory");
        asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                     : "=f"(b.x), "=f"(b.y), "=f"(b.z), "=f"(b.w)
                     : "r"(half(p, 1))
                     : "memory");
        *reinterpret_cast<uint4*>(xs + m * stride + 8 * s) = normalize8(a, b, w, scale[m]);
      }
      // The slot's reads are done (their values are stored above): refill it.
      fetch(j + kStageSlots);
    }
  }
  copy_wait<0>();
  __syncthreads();
}

// What a product loop runs once its first weight loads are in flight (before any of them is
// used): nothing for the plain and in-loop-normalized entries, which waited for the previous
// kernel before the loop.
struct NoPrologue {
  static constexpr bool kPreload = false;
  __device__ __forceinline__ void operator()() const {}
};

// The *_snorm_M entries' prologue: the PDL wait, then the normalized rows into shared
// memory. The product loops issue their first weight loads before it, so those come from
// DRAM while the previous kernel drains and while this CTA adds the partials and builds its
// rows.
template <int M>
struct StageNorm {
  static constexpr bool kPreload = true;
  const float* res;
  const scalar_t* nw;
  const float* partials;
  int count, k;
  float eps;
  __device__ __forceinline__ StagedSrc src() const {
    return {reinterpret_cast<const scalar_t*>(gemv_stage), stage_stride(k)};
  }
  __device__ __forceinline__ void operator()() const {
    wait_prior_kernel();
    const int stride = stage_stride(k);
    stage_normalized<M>(reinterpret_cast<scalar_t*>(gemv_stage), stride,
                        gemv_stage + stage_rows_bytes<M>(stride), res, nw, partials, count, k,
                        eps);
  }
};

// ---------------------------------------------------------------------------------------
// Epilogues, shared by the f32-FMA and the tensor-core kernels.

// Where the rows of a product go: rows [0, n0) to y0 ([M][n0]), [n0, n01) to y1
// ([M][n01 - n0]), [n01, n) to y2 ([M][n - n01]); or, with `residual` not null, added to the
// residual stream ([M][n], f32), with the CTA's sums of squares into `partials`.
struct Out {
  scalar_t* y0;
  scalar_t* y1;
  scalar_t* y2;
  float* residual;
  float* partials;
  const scalar_t* bias;
  int n0, n01, n;
};

// Output (token m, row) of a product whose f32 sum is `acc`: the bias added, rounded to
// scalar_t, then stored into its output, or added to the residual stream. Returns the new
// residual value (0 when storing).
__device__ __forceinline__ float store_row(const Out& o, int m, int row, float acc) {
  float v = acc;
  if (o.bias != nullptr) v += to_float(o.bias[row]);
  const scalar_t y = from_float(v);
  if (o.residual != nullptr) {
    float* r = o.residual + static_cast<long long>(m) * o.n + row;
    const float updated = *r + to_float(y);
    *r = updated;
    return updated;
  }
  if (row < o.n0)
    o.y0[static_cast<long long>(m) * o.n0 + row] = y;
  else if (row < o.n01)
    o.y1[static_cast<long long>(m) * (o.n01 - o.n0) + (row - o.n0)] = y;
  else
    o.y2[static_cast<long long>(m) * (o.n - o.n01) + (row - o.n01)] = y;
  return 0.f;
}

// y[m][j] = silu(g) * u with the gate and up sums each rounded to scalar_t first (as the
// unfused GEMM + silu_mul path).
__device__ __forceinline__ void store_glu(scalar_t* y, int inter, int m, int j, float gate,
                                          float up) {
  const float g = to_float(from_float(gate));
  const float u = to_float(from_float(up));
  y[static_cast<long long>(m) * inter + j] = from_float(g / (1.f + __expf(-g)) * u);
}

// The residual epilogue's sums of squares: lane m < M of every warp holds the sum over the
// rows the warp stored for token m (`owner`: the warp stored rows; the others add 0). Thread m
// of the CTA writes the CTA's total, warps added in order, to partials[m][blockIdx.x]. Every
// thread of the CTA must call it (it holds a barrier).
template <int M>
__device__ __forceinline__ void write_partials(float* __restrict__ partials, float ss,
                                               bool owner) {
  __shared__ float part[kWarps][M];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane < M) part[warp][lane] = owner ? ss : 0.f;
  __syncthreads();
  if (threadIdx.x < M) {
    float total = 0.f;
    for (int p = 0; p < kWarps; ++p) total += part[p][threadIdx.x];
    partials[static_cast<long long>(threadIdx.x) * gridDim.x + blockIdx.x] = total;
  }
}

// ---------------------------------------------------------------------------------------
// f32-FMA kernels (one warp per row group).

// wv[r][u] = chunk c0 + 32u of row r (zeros past c_end or for a null row): one lane's weight
// loads of one step of rows_dot.
template <int R, int U>
__device__ __forceinline__ void load_rows(const scalar_t* const (&rows)[R], int c0, int c_end,
                                          uint4 (&wv)[R][U]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * 32;
      wv[r][u] = (rows[r] != nullptr && c < c_end)
                     ? load_stream(reinterpret_cast<const uint4*>(rows[r]) + c)
                     : make_uint4(0, 0, 0, 0);
    }
}

// acc[r][m] += x[m] . wv[r][u] over the chunks c0 + 32u below c_end.
template <int M, int R, int U, class Src>
__device__ __forceinline__ void fold_rows(const uint4 (&wv)[R][U], const Src& src, int c0,
                                          int c_end, float (&acc)[R][M]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + u * 32;
    if (c < c_end) {
      const auto sv = src.shared(static_cast<long long>(c) * 8);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = src.at(m, static_cast<long long>(c) * 8, sv);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][m] = dot8(wv[r][u], xv, acc[r][m]);
      }
    }
  }
}

// acc[r][m] = sum over chunks [c_begin, c_end) of x[m] . rows[r] (8 values per chunk) for this
// warp's R rows (null rows are skipped: the last warp of an odd N). Every lane gets the full
// sums. `pro` runs once, with the first step's weight loads in flight (Pro::kPreload), before
// `src` is read; every thread of the CTA calls it.
template <int M, int R, class Src, class Pro = NoPrologue>
__device__ __forceinline__ void rows_dot(const scalar_t* const (&rows)[R], const Src& src,
                                         int c_begin, int c_end, float (&acc)[R][M],
                                         const Pro& pro = Pro{}) {
  constexpr int U = Src::template unroll<M>();
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  int c0 = c_begin + lane;
  if constexpr (Pro::kPreload) {
    uint4 wv[R][U];
    load_rows<R, U>(rows, c0, c_end, wv);
    pro();
    fold_rows<M, R, U>(wv, src, c0, c_end, acc);
    c0 += 32 * U;
  }
  for (; c0 < c_end; c0 += 32 * U) {
    uint4 wv[R][U];
    load_rows<R, U>(rows, c0, c_end, wv);
    fold_rows<M, R, U>(wv, src, c0, c_end, acc);
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

// y = x W^T (+ bias) over o.n rows of K = 8 * chunks, into `o`. grid
// (ceil(n / (kWarps / ksplit * R))), block kThreads.
template <int M, class Src, class Pro = NoPrologue>
__device__ __forceinline__ void gemv_impl(const Out& o, const scalar_t* __restrict__ w,
                                          const Src& src, int k, int ksplit,
                                          const Pro& pro = Pro{}) {
  constexpr int R = PlainRows<M>::value;
  const int n = o.n;
  const int chunks = k / 8;
  const Share sh = share_of(chunks, ksplit);
  const int first = sh.group * R;
  const scalar_t* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    rows[r] = first + r < n ? w + static_cast<long long>(first + r) * k : nullptr;
  float acc[R][M];
  rows_dot<M, R>(rows, src, sh.c_begin, sh.c_end, acc, pro);
  const bool owner = combine_parts<M, R>(acc, ksplit);
  const int lane = threadIdx.x % 32;
  // Lane m stores token m's rows (every lane holds every sum), and sums their squares.
  float ss = 0.f;
  if (owner) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m)
        if (lane == m && first + r < n) {
          const float v = store_row(o, m, first + r, acc[r][m]);
          ss = fmaf(v, v, ss);
        }
  }
  if (o.residual != nullptr) write_partials<M>(o.partials, ss, owner);
}

// act = silu(gate) * up over `inter` row pairs (gate row j, up row inter + j). grid
// (ceil(inter / (kWarps / ksplit))), block kThreads.
template <int M, class Src, class Pro = NoPrologue>
__device__ __forceinline__ void gemv_glu_impl(scalar_t* __restrict__ y,
                                              const scalar_t* __restrict__ w, const Src& src,
                                              int inter, int k, int ksplit,
                                              const Pro& pro = Pro{}) {
  const int chunks = k / 8;
  const Share sh = share_of(chunks, ksplit);
  const int j = sh.group;
  const scalar_t* rows[2] = {j < inter ? w + static_cast<long long>(j) * k : nullptr,
                             j < inter ? w + static_cast<long long>(inter + j) * k : nullptr};
  float acc[2][M];
  rows_dot<M, 2>(rows, src, sh.c_begin, sh.c_end, acc, pro);
  if (!combine_parts<M, 2>(acc, ksplit) || j >= inter) return;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < M; ++m)
    if (lane == m) store_glu(y, inter, m, j, acc[0][m], acc[1][m]);
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

// Chunk c + u of the T tiles' A fragments (rows lo[i], hi[i]; zeros past c_end or the rows).
template <int T, int U>
__device__ __forceinline__ void load_a(const scalar_t* const (&lo)[T],
                                       const scalar_t* const (&hi)[T], int c, int u, int c_end,
                                       uint4 (&a_lo)[U][T], uint4 (&a_hi)[U][T]) {
  const bool in = c + u < c_end;
  const long long off = static_cast<long long>(c + u) * 32;
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int i = 0; i < T; ++i) {
    a_lo[u][i] = in && lo[i] ? load_stream(reinterpret_cast<const uint4*>(lo[i] + off)) : zero;
    a_hi[u][i] = in && hi[i] ? load_stream(reinterpret_cast<const uint4*>(hi[i] + off)) : zero;
  }
}

// d[i] += the products of U chunks of tile i's A fragments with the x fragments b.
template <int T, int U>
__device__ __forceinline__ void mma_chunks(float (&d)[T][4], const uint4 (&a_lo)[U][T],
                                           const uint4 (&a_hi)[U][T], const uint4 (&b)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int i = 0; i < T; ++i) {
      mma_16816(d[i], a_lo[u][i].x, a_hi[u][i].x, a_lo[u][i].y, a_hi[u][i].y, b[u].x, b[u].y);
      mma_16816(d[i], a_lo[u][i].z, a_hi[u][i].z, a_lo[u][i].w, a_hi[u][i].w, b[u].z, b[u].w);
    }
}

// d[T][4] += W[tile T rows] . x over the chunks [c_begin, c_end) (32 values each) for T tiles
// of 16 rows starting at rows[T] (rows past n zero; tokens past M zero). d[T] holds C(row g,
// tokens 2t, 2t + 1) and C(row g + 8, tokens 2t, 2t + 1) of tile T. `pro` as in rows_dot:
// once, with the first step's weight (A) loads in flight, before `src` is read.
template <int M, int T, class Src, class Pro = NoPrologue>
__device__ __forceinline__ void tiles_dot(const scalar_t* __restrict__ w, const int (&tile_row)[T],
                                          int n, const Src& src, int k, int c_begin, int c_end,
                                          float (&d)[T][4], const Pro& pro = Pro{}) {
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
  // This lane's token (B column g); lanes past the batch load nothing.
  const bool has_token = g < M;
  const auto xs = src.token(has_token ? g : 0);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  // 32-wide chunks in flight: 4 for one tile (4 KB per warp), 2 for two.
  constexpr int U = 4 / T;
  int c = c_begin;
  if constexpr (Pro::kPreload) {
    // The first step as in the loop below, with the PDL wait and the staging between the
    // weight loads and the x loads.
    uint4 a_lo[U][T], a_hi[U][T], b[U];
#pragma unroll
    for (int u = 0; u < U; ++u) load_a<T, U>(lo, hi, c, u, c_end, a_lo, a_hi);
    pro();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in = c + u < c_end;
      b[u] = in && has_token ? xs.at(0, static_cast<long long>(c + u) * 32 + 8 * t) : zero;
    }
    mma_chunks<T, U>(d, a_lo, a_hi, b);
    c += U;
  }
  for (; c < c_end; c += U) {
    uint4 a_lo[U][T], a_hi[U][T], b[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      load_a<T, U>(lo, hi, c, u, c_end, a_lo, a_hi);
      const bool in = c + u < c_end;
      b[u] = in && has_token ? xs.at(0, static_cast<long long>(c + u) * 32 + 8 * t) : zero;
    }
    mma_chunks<T, U>(d, a_lo, a_hi, b);
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
template <int M, class Src, class Pro = NoPrologue>
__device__ __forceinline__ void gemv_tc_impl(const Out& o, const scalar_t* __restrict__ w,
                                             const Src& src, int k, int ksplit,
                                             const Pro& pro = Pro{}) {
  const int n = o.n;
  const int chunks = k / 32;
  const Share sh = share_of(chunks, ksplit);
  const int tile_row[1] = {sh.group * 16};
  float d[1][4];
  tiles_dot<M, 1>(w, tile_row, n, src, k, sh.c_begin, sh.c_end, d, pro);
  const bool owner = combine_tiles<1>(d, ksplit);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // ss[p]: sum of squares of the new residual values of token 2t + p in this lane's rows.
  float ss[2] = {0.f, 0.f};
  if (owner) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = tile_row[0] + g + (j >= 2 ? 8 : 0);
      const int m = 2 * t + (j & 1);
      if (m >= M || row >= n) continue;
      const float v = store_row(o, m, row, d[0][j]);
      ss[j & 1] = fmaf(v, v, ss[j & 1]);
    }
  }
  if (o.residual != nullptr) {
    // Sum over the 8 row pairs g (lanes t, t + 4, ..., t + 28); then lane m < M takes token
    // m's from lane m / 2 (g = 0, t = m / 2).
#pragma unroll
    for (int off = 4; off < 32; off *= 2) {
      ss[0] += __shfl_xor_sync(0xffffffffu, ss[0], off);
      ss[1] += __shfl_xor_sync(0xffffffffu, ss[1], off);
    }
    const float even = __shfl_sync(0xffffffffu, ss[0], lane / 2);
    const float odd = __shfl_sync(0xffffffffu, ss[1], lane / 2);
    write_partials<M>(o.partials, (lane & 1) ? odd : even, owner);
  }
}

// act = silu(gate) * up as gemv_glu_impl, tiles of 16 gate rows and their 16 up rows per
// warp group. grid (ceil(ceil(inter / 16) / (kWarps / ksplit))), block kThreads.
template <int M, class Src, class Pro = NoPrologue>
__device__ __forceinline__ void gemv_glu_tc_impl(scalar_t* __restrict__ y,
                                                 const scalar_t* __restrict__ w, const Src& src,
                                                 int inter, int k, int ksplit,
                                                 const Pro& pro = Pro{}) {
  const int chunks = k / 32;
  const Share sh = share_of(chunks, ksplit);
  const int j0 = sh.group * 16;
  // The bound inter + limit stops the up tile at the last pair; gate rows past `inter` (a
  // partial last tile) read up rows, whose results are dropped below.
  const int tile_row[2] = {j0, inter + j0};
  float d[2][4];
  const int limit = min(inter, j0 + 16);
  tiles_dot<M, 2>(w, tile_row, inter + limit, src, k, sh.c_begin, sh.c_end, d, pro);
  if (!combine_tiles<2>(d, ksplit)) return;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int row = j0 + g + (j >= 2 ? 8 : 0);
    const int m = 2 * t + (j & 1);
    if (m >= M || row >= inter) continue;
    store_glu(y, inter, m, row, d[0][j], d[1][j]);
  }
}

// ---------------------------------------------------------------------------------------
// Programmatic dependent launch (scalar.cuh, crates/kernels-cuda/src/launch.rs). Before
// waiting for the previous kernel, each warp asks the L2 for the head of its share of its
// weight rows: the first `bytes` of [e0, e1) of rows [r, r + nrows) below `n`. The weights
// are never written while a step runs, so this may overlap the previous kernel, and the
// DRAM keeps streaming under the short kernels between products. Only the head: prefetching
// whole rows for every resident warp asked for more than the L2 holds, and the lines were
// evicted before their loads (GEMV-only step 3.8 -> 5.1 ms on an H200). Then the CTA waits
// (wait_prior_kernel).
__device__ __forceinline__ void prefetch_head(const scalar_t* w, int k, int r, int nrows, int n,
                                              int e0, int e1, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(GEMV_PREFETCH)
  const int len = min((e1 - e0) * static_cast<int>(sizeof(scalar_t)), bytes);
  if (len <= 0) return;
  const int lines = (len + 127) / 128;
  for (int i = threadIdx.x % 32; i < nrows * lines; i += 32) {
    const int row = r + i / lines;
    if (row >= n) break;
    const char* p = reinterpret_cast<const char*>(w + static_cast<long long>(row) * k + e0) +
                    (i % lines) * 128;
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
  }
#endif
}

// Per warp: its R rows (FMA products), its gate and up row (FMA gate/up), its tile of 16
// rows (tensor-core products) or its gate and up tiles; K shares as share_of.
template <int M>
__device__ __forceinline__ void plain_prologue(const scalar_t* w, int k, int n, int ksplit) {
  constexpr int R = PlainRows<M>::value;
  const Share sh = share_of(k / 8, ksplit);
  prefetch_head(w, k, sh.group * R, R, n, sh.c_begin * 8, sh.c_end * 8, 2048);
  wait_prior_kernel();
}

__device__ __forceinline__ void glu_prologue(const scalar_t* w, int k, int inter, int ksplit) {
  const Share sh = share_of(k / 8, ksplit);
  prefetch_head(w, k, sh.group, 1, inter, sh.c_begin * 8, sh.c_end * 8, 2048);
  if (sh.group < inter)
    prefetch_head(w, k, inter + sh.group, 1, 2 * inter, sh.c_begin * 8, sh.c_end * 8, 2048);
  wait_prior_kernel();
}

__device__ __forceinline__ void tc_prologue(const scalar_t* w, int k, int n, int ksplit) {
  const Share sh = share_of(k / 32, ksplit);
  prefetch_head(w, k, sh.group * 16, 16, n, sh.c_begin * 32, sh.c_end * 32, 256);
  wait_prior_kernel();
}

__device__ __forceinline__ void glu_tc_prologue(const scalar_t* w, int k, int inter,
                                                int ksplit) {
  const Share sh = share_of(k / 32, ksplit);
  const int j0 = sh.group * 16;
  prefetch_head(w, k, j0, 16, inter, sh.c_begin * 32, sh.c_end * 32, 256);
  if (j0 < inter)
    prefetch_head(w, k, inter + j0, 16, inter + min(inter, j0 + 16), sh.c_begin * 32,
                  sh.c_end * 32, 256);
  wait_prior_kernel();
}

// ---------------------------------------------------------------------------------------
// Entry points. Every product entry takes the same parameters (gemv.rs pushes one list):
// the outputs or the residual epilogue (res_out, part_out; null when storing), the weight,
// then the input: x for the plain entries, (nres, nweight, npart, ncount, eps) for the norm
// entries (the other unused and null). The *_snorm_M entries need
// stage_rows_bytes<M>(stage_stride(k)) + kStageSlotBytes bytes of dynamic shared memory;
// the others none.

// CTAs per SM the *_snorm_M entries are compiled for (__launch_bounds__). Left free, the
// staging prologue takes registers the product loop does not need (gemv_snorm_1 52 against
// gemv_1's 32: 4 CTAs per SM). FMA products of 1-2 tokens: 6 (40 registers; gemv_1 gets 8,
// gemv_2 6; 6 keep the 8B Q/K/V product's 768 CTAs in one wave on 132 SMs); FMA gate/up: 5
// at 1 token and 4 at 2 (48 / 64 registers, as gemv_glu_1 / _2); tensor cores: 3 (80, as
// gemv_tc_*) up to 6 tokens, 2 from 7, where shared memory allows no more (H200). Larger
// FMA batches (widths not a multiple of 32): 2, as their plain entries. family: 0 FMA
// product, 1 FMA gate/up, 2 tensor cores.
constexpr int staged_ctas(int family, int m) {
  return family == 0 ? (m <= 2 ? 6 : 2) : family == 1 ? (m == 1 ? 5 : m == 2 ? 4 : 2)
                                                    : (m <= 6 ? 3 : 2);
}

#define GEMV_PARAMS                                                                             \
  scalar_t *__restrict__ y0, scalar_t *__restrict__ y1, scalar_t *__restrict__ y2,             \
      float *__restrict__ res_out, float *__restrict__ part_out,                               \
      const scalar_t *__restrict__ w, const scalar_t *__restrict__ x,                          \
      const float *__restrict__ nres, const scalar_t *__restrict__ nweight,                    \
      const float *__restrict__ npart, int ncount, float eps, const scalar_t *__restrict__ bias, \
      int n0, int n01, int n, int k, int ksplit
#define GLU_PARAMS                                                                              \
  scalar_t *__restrict__ y, const scalar_t *__restrict__ w, const scalar_t *__restrict__ x,    \
      const float *__restrict__ nres, const scalar_t *__restrict__ nweight,                    \
      const float *__restrict__ npart, int ncount, float eps, int inter, int k, int ksplit

#define GEMV_ENTRY(M)                                                                          \
  extern "C" __global__ void __launch_bounds__(kThreads, 2) gemv_##M(GEMV_PARAMS) {           \
    plain_prologue<M>(w, k, n, ksplit);                                                        \
    const Out o{y0, y1, y2, res_out, part_out, bias, n0, n01, n};                              \
    gemv_impl<M>(o, w, PlainSrc{x, k}, k, ksplit);                                             \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, 2) gemv_norm_##M(GEMV_PARAMS) {      \
    plain_prologue<M>(w, k, n, ksplit);                                                        \
    const Out o{y0, y1, y2, res_out, part_out, bias, n0, n01, n};                              \
    NormSrc<M> src{nres, nweight, k, {}};                                                      \
    norm_scales<M>(npart, ncount, k, eps, src.rinv);                                           \
    gemv_impl<M>(o, w, src, k, ksplit);                                                        \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, staged_ctas(0, M))                    \
      gemv_snorm_##M(GEMV_PARAMS) {                                                            \
    const Out o{y0, y1, y2, res_out, part_out, bias, n0, n01, n};                              \
    const StageNorm<M> pro{nres, nweight, npart, ncount, k, eps};                              \
    gemv_impl<M>(o, w, pro.src(), k, ksplit, pro);                                             \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, 2) gemv_glu_##M(GLU_PARAMS) {        \
    glu_prologue(w, k, inter, ksplit);                                                         \
    gemv_glu_impl<M>(y, w, PlainSrc{x, k}, inter, k, ksplit);                                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, 2) gemv_glu_norm_##M(GLU_PARAMS) {   \
    glu_prologue(w, k, inter, ksplit);                                                         \
    NormSrc<M> src{nres, nweight, k, {}};                                                      \
    norm_scales<M>(npart, ncount, k, eps, src.rinv);                                           \
    gemv_glu_impl<M>(y, w, src, inter, k, ksplit);                                             \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, staged_ctas(1, M))                    \
      gemv_glu_snorm_##M(GLU_PARAMS) {                                                         \
    const StageNorm<M> pro{nres, nweight, npart, ncount, k, eps};                              \
    gemv_glu_impl<M>(y, w, pro.src(), inter, k, ksplit, pro);                                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, 2) gemv_tc_##M(GEMV_PARAMS) {        \
    tc_prologue(w, k, n, ksplit);                                                              \
    const Out o{y0, y1, y2, res_out, part_out, bias, n0, n01, n};                              \
    gemv_tc_impl<M>(o, w, PlainSrc{x, k}, k, ksplit);                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, 2) gemv_tc_norm_##M(GEMV_PARAMS) {   \
    tc_prologue(w, k, n, ksplit);                                                              \
    const Out o{y0, y1, y2, res_out, part_out, bias, n0, n01, n};                              \
    NormSrc<M> src{nres, nweight, k, {}};                                                      \
    norm_scales<M>(npart, ncount, k, eps, src.rinv);                                           \
    gemv_tc_impl<M>(o, w, src, k, ksplit);                                                     \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, staged_ctas(2, M))                    \
      gemv_tc_snorm_##M(GEMV_PARAMS) {                                                         \
    const Out o{y0, y1, y2, res_out, part_out, bias, n0, n01, n};                              \
    const StageNorm<M> pro{nres, nweight, npart, ncount, k, eps};                              \
    gemv_tc_impl<M>(o, w, pro.src(), k, ksplit, pro);                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, 2) gemv_glu_tc_##M(GLU_PARAMS) {     \
    glu_tc_prologue(w, k, inter, ksplit);                                                      \
    gemv_glu_tc_impl<M>(y, w, PlainSrc{x, k}, inter, k, ksplit);                               \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, 2) gemv_glu_tc_norm_##M(GLU_PARAMS) {\
    glu_tc_prologue(w, k, inter, ksplit);                                                      \
    NormSrc<M> src{nres, nweight, k, {}};                                                      \
    norm_scales<M>(npart, ncount, k, eps, src.rinv);                                           \
    gemv_glu_tc_impl<M>(y, w, src, inter, k, ksplit);                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads, staged_ctas(2, M))                    \
      gemv_glu_tc_snorm_##M(GLU_PARAMS) {                                                      \
    const StageNorm<M> pro{nres, nweight, npart, ncount, k, eps};                              \
    gemv_glu_tc_impl<M>(y, w, pro.src(), inter, k, ksplit, pro);                               \
  }

GEMV_ENTRY(1)
GEMV_ENTRY(2)
GEMV_ENTRY(3)
GEMV_ENTRY(4)
GEMV_ENTRY(5)
GEMV_ENTRY(6)
GEMV_ENTRY(7)
GEMV_ENTRY(8)
