// paged_attention_tc.cu: decode attention on tensor cores, for 16-bit KV caches of the
// activation type (bf16 KV with bf16 activations, fp16 with fp16) and 8-bit ones (int8, fp8
// e4m3 / e5m2, one f32 scale per token and head). The default decode kernel for those
// caches (`KVSERVE_DECODE_KERNEL=split` forces paged_attention.cu); measured in BENCHMARKS.md.
//
// 8-bit codes are exact in bf16 and fp16, so the tiles hold codes and the scales are folded
// around the products: q . (s_k code_k) = s_k (q . code_k) scales each logit after the mma,
// and sum_t p_t (s_v,t code_v,t) = sum_t (p_t s_v,t) code_v,t scales P before it becomes the
// A operand (the softmax sum uses the unscaled p).
//
// Why: the first decode kernel (paged_attention.cu) is bound by latency and instructions per
// byte (12-23% occupancy, at most half the DRAM peak on an H200; kernels/NOTES.md). Here each
// warp streams its own tiles of 16 tokens through shared memory with cp.async, two stages deep
// (the next tile's K and V are in flight while this one is used), and does the arithmetic of
// a tile in 32 mma.sync instructions: the GQA group's query heads are the rows of the A
// operand (padded to 16), so each K and V row is read once for the whole group.
//
// Same contract as paged_decode_partition: grid (num_kv_heads, num_seqs, max_parts), block
// kThreads; one CTA per (KV head, sequence, partition); partitions of `partition_size` tokens
// (a multiple of kTile * kWarps) from the window's first token; writes `out` when the
// sequence has one partition, else the partial results the merge (decode_reduce.cuh) reads.
#include "common.cuh"

#ifndef GQA_GROUP
#error "GQA_GROUP must be defined"
#endif

namespace kvserve {

constexpr int kTile = 16;                    // tokens per tile (the mma K of the PV product)
constexpr int kWarps = 2;                    // warps per CTA, each with its own tiles
constexpr int kThreads = 32 * kWarps;
constexpr int kStages = 2;                   // tiles in shared memory per warp
#if KV_DTYPE == KVT_INT8 || KVT_IS_FP8
#define KVS_TC_CODES 1  // 8-bit codes with one f32 scale per (token, head)
constexpr int kBytes = 1;
#else
static_assert(KV_DTYPE == (SCALAR == 0 ? KVT_FP16 : KVT_BF16),
              "16-bit KV must be of the activation type");
#define KVS_TC_CODES 0
constexpr int kBytes = 2;
#endif
constexpr int kRowBytes = HEAD_DIM * kBytes + 16;  // padded: no bank conflicts, 16-B aligned
constexpr int kKSteps = HEAD_DIM / 16;             // mma K steps of q . k
constexpr int kNTiles = HEAD_DIM / 8;              // mma N tiles of p . V
constexpr int kChunksPerRow = HEAD_DIM * kBytes / 16;  // 16-byte cp.async chunks per row
constexpr float kLog2e = 1.4426950408889634f;
static_assert(GQA_GROUP <= 8, "the query heads fill rows 0..7 of the A operand");
static_assert(kTile * kChunksPerRow % 32 == 0, "whole chunks per lane");

// One warp's shared memory: kStages tiles of K and of V (rows of raw bytes), and for 8-bit
// codes their scales.
struct WarpTiles {
  unsigned char k[kStages][kTile][kRowBytes];
  unsigned char v[kStages][kTile][kRowBytes];
#if KVS_TC_CODES
  float k_scale[kStages][kTile];
  float v_scale[kStages][kTile];
#endif
};

__device__ __forceinline__ unsigned pack(scalar_t lo, scalar_t hi) {
  const unsigned short a = *reinterpret_cast<const unsigned short*>(&lo);
  const unsigned short b = *reinterpret_cast<const unsigned short*>(&hi);
  return static_cast<unsigned>(a) | (static_cast<unsigned>(b) << 16);
}

__device__ __forceinline__ unsigned pack_float(float lo, float hi) {
  return pack(from_float(lo), from_float(hi));
}

// Element `i` of a shared-memory row as the activation type (an 8-bit code is exact in it).
__device__ __forceinline__ scalar_t element(const unsigned char* row, int i) {
#if KVS_TC_CODES
#if KV_DTYPE == KVT_INT8
  return from_float(static_cast<float>(static_cast<signed char>(row[i])));
#else
  return from_float(fp8_to_float(row[i]));
#endif
#else
  return reinterpret_cast<const scalar_t*>(row)[i];
#endif
}

// Elements i and i + 1 of a row, packed (i even).
__device__ __forceinline__ unsigned pair(const unsigned char* row, int i) {
#if KVS_TC_CODES
  return pack(element(row, i), element(row, i + 1));
#else
  return *reinterpret_cast<const unsigned*>(row + 2 * i);
#endif
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

// Copies 16 bytes global -> shared asynchronously; `bytes` 0 writes zeros instead.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(bytes));
}

// Copies 4 bytes global -> shared asynchronously; `bytes` 0 writes zeros instead.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, int bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Where token t's row of KV head `head` starts in a cache (values, or with `scales` the
// 8-bit codes' scale); -1 for a token outside [first, end).
__device__ __forceinline__ long long row_offset(const int* __restrict__ table, int t, int first,
                                                int end, int block_shift, int block_size,
                                                int num_kv_heads, long long block_bytes,
                                                int head, bool scales) {
  if (t < first || t >= end) return -1;
  const long long base = static_cast<long long>(table[t >> block_shift]) * block_bytes;
  const int slot = t & (block_size - 1);
  return base + (scales ? kv_scale_offset(KV_DTYPE, block_size, num_kv_heads, HEAD_DIM, head,
                                          slot)
                        : kv_value_offset(KV_DTYPE, block_size, HEAD_DIM, head, slot));
}

// Issues the copies of one tile (tokens t0 .. t0 + kTile) into `stage`; tokens outside
// [first, end) are zero-filled (their weight is 0, and 0 * garbage could be NaN).
__device__ __forceinline__ void load_tile(WarpTiles& w, int stage, int t0, int first, int end,
                                          const unsigned char* __restrict__ k_cache,
                                          const unsigned char* __restrict__ v_cache,
                                          const int* __restrict__ table, int block_shift,
                                          int block_size, int num_kv_heads,
                                          long long block_bytes, int head, int lane) {
#pragma unroll
  for (int i = 0; i < kTile * kChunksPerRow / 32; ++i) {
    const int c = lane + 32 * i;
    const int row = c / kChunksPerRow, col = c % kChunksPerRow;
    const long long off = row_offset(table, t0 + row, first, end, block_shift, block_size,
                                     num_kv_heads, block_bytes, head, false);
    const long long src = off < 0 ? 0 : off + col * 16;
    const int bytes = off < 0 ? 0 : 16;
    cp_async16(&w.k[stage][row][col * 16], k_cache + src, bytes);
    cp_async16(&w.v[stage][row][col * 16], v_cache + src, bytes);
  }
#if KVS_TC_CODES
  // Lanes 0..15 fetch the K scales of the tile's tokens, lanes 16..31 the V scales.
  const int row = lane % kTile;
  const long long off = row_offset(table, t0 + row, first, end, block_shift, block_size,
                                   num_kv_heads, block_bytes, head, true);
  const long long src = off < 0 ? 0 : off;
  if (lane < kTile) {
    cp_async4(&w.k_scale[stage][row], k_cache + src, off < 0 ? 0 : 4);
  } else {
    cp_async4(&w.v_scale[stage][row], v_cache + src, off < 0 ? 0 : 4);
  }
#endif
}

}  // namespace kvserve

using namespace kvserve;

extern "C" __global__ void __launch_bounds__(kThreads, 6)
    paged_decode_tc(scalar_t* __restrict__ out, float* __restrict__ tmp_out,
                    float* __restrict__ max_logits, float* __restrict__ exp_sums,
                    const scalar_t* __restrict__ q, const unsigned char* __restrict__ k_cache,
                    const unsigned char* __restrict__ v_cache,
                    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                    float scale, int num_kv_heads, int block_size, int block_shift,
                    long long block_bytes, int max_blocks, int partition_size, int max_parts,
                    int window) {
  __shared__ __align__(16) WarpTiles tiles[kWarps];
  __shared__ float merge_m[kWarps][8];
  __shared__ float merge_l[kWarps][8];

  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ctx = context_lens[seq];
  const int first = (window > 0 && ctx > window) ? ctx - window : 0;
  const int num_parts = (ctx - first + partition_size - 1) / partition_size;
  if (part >= num_parts) return;
  const int p_start = first + part * partition_size;
  const int p_end = min(ctx, p_start + partition_size);
  const int* table = block_tables + static_cast<long long>(seq) * max_blocks;
  const int num_heads = num_kv_heads * GQA_GROUP;
  // Row r of the A operand is query head head * GQA_GROUP + r (r < GQA_GROUP), else zero.
  const int r = lane / 4;          // this lane's row (r + 8 is padding)
  const int kq = (lane % 4) * 2;   // this lane's first column within a k step / n tile
  const bool row_live = r < GQA_GROUP;

  // The A operand (q) for every k step: a[1] and a[3] (rows r + 8) stay zero.
  unsigned qa[kKSteps][4];
  {
    const scalar_t* qrow =
        q + (static_cast<long long>(seq) * num_heads + head * GQA_GROUP + (row_live ? r : 0)) *
                HEAD_DIM;
#pragma unroll
    for (int s = 0; s < kKSteps; ++s) {
      qa[s][0] = row_live ? pack(qrow[16 * s + kq], qrow[16 * s + kq + 1]) : 0u;
      qa[s][2] = row_live ? pack(qrow[16 * s + kq + 8], qrow[16 * s + kq + 9]) : 0u;
      qa[s][1] = 0u;
      qa[s][3] = 0u;
    }
  }
  const float scale2 = scale * kLog2e;  // logits in log2 units: exp2 below

  // Online softmax state of row r (in log2 units) and this lane's slice of the output row:
  // o[j][0..1] = O[r][8 j + kq .. + 1].
  float m = -INFINITY, l = 0.f;
  float o[kNTiles][2];
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) o[j][0] = o[j][1] = 0.f;

  WarpTiles& w = tiles[warp];
  // This warp's tiles: kWarps interleave over the partition.
  const int tiles_total = (p_end - p_start + kTile - 1) / kTile;
  const int my_tiles = tiles_total > warp ? (tiles_total - warp + kWarps - 1) / kWarps : 0;
  // Tile i of this warp starts at p_start + (warp + i * kWarps) * kTile.
  const int my_first = p_start + warp * kTile;
  constexpr int kStride = kWarps * kTile;
  if (my_tiles > 0) {
    load_tile(w, 0, my_first, p_start, p_end, k_cache, v_cache, table, block_shift,
              block_size, num_kv_heads, block_bytes, head, lane);
  }
  cp_async_commit();
  for (int i = 0; i < my_tiles; ++i) {
    const int stage = i % kStages;
    if (i + 1 < my_tiles) {
      load_tile(w, (i + 1) % kStages, my_first + (i + 1) * kStride, p_start, p_end, k_cache,
                v_cache, table, block_shift, block_size, num_kv_heads, block_bytes, head, lane);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile's group is complete (the next one may be in flight)
    __syncwarp();

    // S = q . K^T for the tile's 16 tokens: two n tiles of 8 tokens.
    float s[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      const unsigned char* krow = w.k[stage][8 * n + r];  // B[k][n] = K[token n][channel k]
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        mma(s[n], qa[ks], pair(krow, 16 * ks + kq), pair(krow, 16 * ks + kq + 8));
      }
    }
    // s[n][0..1]: row r, tokens t0 + 8 n + kq + {0, 1} (s[n][2..3]: padding rows).
    const int t0 = my_first + i * kStride;
    float tile_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int t = t0 + 8 * n + kq + c;
#if KVS_TC_CODES
        const float logit = s[n][c] * w.k_scale[stage][8 * n + kq + c];
#else
        const float logit = s[n][c];
#endif
        const float x = (t >= p_start && t < p_end) ? logit * scale2 : -INFINITY;
        s[n][c] = x;
        tile_max = fmaxf(tile_max, x);
      }
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float m_new = fmaxf(m, tile_max);
    // A row that has seen only masked tokens keeps m = -inf: no rescale, weights 0.
    const float alpha = m_new == -INFINITY ? 1.f : exp2f(m - m_new);
    float p[2][2];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        p[n][c] = m_new == -INFINITY ? 0.f : exp2f(s[n][c] - m_new);
        l = l * (n == 0 && c == 0 ? alpha : 1.f) + p[n][c];
      }
    }
    m = m_new;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      o[j][0] *= alpha;
      o[j][1] *= alpha;
    }
    // O += P . V: P (row r, the tile's 16 tokens) is the A operand of one k step.
    unsigned pa[4];
#if KVS_TC_CODES
    const float* vs = w.v_scale[stage];
    pa[0] = pack_float(p[0][0] * vs[kq], p[0][1] * vs[kq + 1]);  // tokens kq, kq + 1
    pa[2] = pack_float(p[1][0] * vs[8 + kq], p[1][1] * vs[9 + kq]);
#else
    pa[0] = pack_float(p[0][0], p[0][1]);  // tokens kq, kq + 1
    pa[2] = pack_float(p[1][0], p[1][1]);  // tokens 8 + kq, 8 + kq + 1
#endif
    pa[1] = 0u;
    pa[3] = 0u;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      // B[k][n] = V[token k][channel 8 j + n], n = lane / 4.
      const int ch = 8 * j + r;
      const unsigned b0 = pack(element(w.v[stage][kq], ch), element(w.v[stage][kq + 1], ch));
      const unsigned b1 =
          pack(element(w.v[stage][kq + 8], ch), element(w.v[stage][kq + 9], ch));
      float acc[4] = {o[j][0], o[j][1], 0.f, 0.f};
      mma(acc, pa, b0, b1);
      o[j][0] = acc[0];
      o[j][1] = acc[1];
    }
    __syncwarp();  // the stage is read before the next iteration refills it
  }
  cp_async_wait<0>();

  // Row sums: this lane holds part of row r's l (its 4 tokens per tile).
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);

  // Merge the warps: warp w's (m, l, O) rescaled to the CTA max. O goes through the K tiles'
  // shared memory (every warp is past its loop after the barrier).
  if (lane % 4 == 0) {
    merge_m[warp][r] = m;
    merge_l[warp][r] = l;
  }
  __syncthreads();
  float m_all = -INFINITY;
#pragma unroll
  for (int x = 0; x < kWarps; ++x) m_all = fmaxf(m_all, merge_m[x][r]);
  const float mine = m == -INFINITY ? 0.f : exp2f(m - m_all);
  float* o_sh = reinterpret_cast<float*>(&tiles[0].k[0][0][0]);  // [kWarps][8][HEAD_DIM]
  static_assert(sizeof(WarpTiles) >= kWarps * 8 * HEAD_DIM * sizeof(float), "merge space");
  __syncthreads();  // everyone has read merge_*; the tiles are free
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    o_sh[(warp * 8 + r) * HEAD_DIM + 8 * j + kq] = o[j][0] * mine;
    o_sh[(warp * 8 + r) * HEAD_DIM + 8 * j + kq + 1] = o[j][1] * mine;
  }
  __syncthreads();
  // Thread i writes channel i % HEAD_DIM of heads i / HEAD_DIM, i / HEAD_DIM + kThreads /
  // HEAD_DIM, ...
  const bool single = num_parts == 1;
  const float inv_log2e = 1.f / kLog2e;
  for (int idx = threadIdx.x; idx < GQA_GROUP * HEAD_DIM; idx += kThreads) {
    const int g = idx / HEAD_DIM, c = idx % HEAD_DIM;
    float acc = 0.f;
#pragma unroll
    for (int x = 0; x < kWarps; ++x) acc += o_sh[(x * 8 + g) * HEAD_DIM + c];
    float mg = -INFINITY, lg = 0.f;
#pragma unroll
    for (int x = 0; x < kWarps; ++x) mg = fmaxf(mg, merge_m[x][g]);
#pragma unroll
    for (int x = 0; x < kWarps; ++x) {
      const float mx = merge_m[x][g];
      lg += mx == -INFINITY ? 0.f : merge_l[x][g] * exp2f(mx - mg);
    }
    const long long qh = static_cast<long long>(seq) * num_heads + head * GQA_GROUP + g;
    if (single) {
      out[qh * HEAD_DIM + c] = from_float(lg > 0.f ? acc / lg : 0.f);
    } else {
      tmp_out[(qh * max_parts + part) * HEAD_DIM + c] = acc;
      if (c == 0) {
        max_logits[qh * max_parts + part] = mg * inv_log2e;  // natural units for the merge
        exp_sums[qh * max_parts + part] = lg;
      }
    }
  }
}

#include "decode_reduce.cuh"
