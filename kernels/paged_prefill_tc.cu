// paged_prefill_tc.cu: prefill and chunked-prefill attention over the paged KV cache on tensor
// cores (flash-attention-2 style), for the caches the tensor-core decode kernel reads: 16-bit
// KV of the activation type, int8 and fp8 e4m3 / e5m2 (one f32 scale per token and head).
//
// A variable-length batch: sequence s has query_len = query_starts[s + 1] - query_starts[s]
// new tokens (rows query_starts[s] .. of q and out, `[tokens][num_heads][HEAD_DIM]`), already
// written into the cache with RoPE applied, the last at position context_lens[s] - 1. Query
// token i sits at position p = context_len - query_len + i and attends to the cache positions
// t with p - window < t <= p (no lower bound without a window).
//
// Rows of the A operand are (query token, query head of the GQA group) pairs, row
// R = i * GQA_GROUP + g, so a K/V tile in shared memory serves every query head of its KV head
// and kBlockM / GQA_GROUP query tokens. One CTA per (work item, KV head); a work item is
// (sequence, first row) of kBlockM consecutive rows of one sequence, listed by the host
// heaviest first (crates/kernels-cuda/src/prefill.rs). Each of the kWarps warps owns 16 rows
// for the whole CTA: its q fragments, online-softmax state (f32, log2 units) and O accumulators
// stay in registers; S = q . K^T and O += P . V are mma.m16n8k16 with B fragments from
// ldmatrix (.trans for V), and S's accumulators become P's A fragments without shuffles.
//
// The CTA walks the key tiles (kBlockN tokens, aligned to multiples of kBlockN) from the first
// one its earliest row's window reaches to the one holding its last row's position: tiles past
// the causal diagonal are never loaded. K/V tiles stream through two cp.async stages; tokens
// outside the CTA's range are zero-filled. A warp skips the arithmetic of a tile that none of
// its rows attends to and skips the mask where all its rows attend to the whole tile.
//
// 8-bit caches: tiles arrive as codes, then the CTA converts them to the activation type in a
// third buffer (8-bit codes are exact in bf16 and fp16) and the per-token scales fold around
// the products as in paged_attention_tc.cu: each logit is scaled by s_k after q . K, and P is
// scaled by s_v before it becomes the A operand (the softmax sum uses the unscaled p).
#include "tc_common.cuh"

#if KVS_TC_INT4
#error "int4 KV has no prefill kernel (its tokens attend through paged_attention_tc.cu)"
#endif
#ifndef GQA_GROUP
#error "GQA_GROUP must be defined"
#endif

namespace kvserve {

constexpr int kWarps = 4;                               // warps per CTA, 16 rows each
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;                    // rows (token, head) per CTA
constexpr int kBlockN = HEAD_DIM == 64 ? 64 : 32;       // keys per tile
constexpr int kStages = 2;
constexpr int kRow16 = HEAD_DIM * 2 + 16;        // bytes of a 16-bit smem row: padded so the
                                                 // 8 rows of an ldmatrix hit distinct banks
constexpr int kChunksPerRow = HEAD_DIM * kBytes / 16;  // 16-byte cp.async chunks per row
constexpr int kKSteps = HEAD_DIM / 16;           // mma K steps of q . K^T
constexpr int kNTilesS = kBlockN / 8;            // mma N tiles of S (8 keys each)
constexpr int kKStepsPV = kBlockN / 16;          // mma K steps of P . V (16 keys each)
constexpr int kNTilesO = HEAD_DIM / 8;           // mma N tiles of O (8 channels each)
static_assert(GQA_GROUP >= 1 && GQA_GROUP <= 8, "GQA group 1..8");
static_assert(kBlockN * kChunksPerRow % kThreads == 0, "whole chunks per thread");
static_assert(2 * kBlockN <= kThreads, "one scale per thread");

struct Tiles {
#if KVS_TC_CODES
  // Codes as they arrive (two stages), their scales, and the tile in the activation type.
  static constexpr int kRowCodes = HEAD_DIM + 16;
  unsigned char kc[kStages][kBlockN][kRowCodes];
  unsigned char vc[kStages][kBlockN][kRowCodes];
  float k_scale[kStages][kBlockN];
  float v_scale[kStages][kBlockN];
  unsigned char k[1][kBlockN][kRow16];
  unsigned char v[1][kBlockN][kRow16];
#else
  unsigned char k[kStages][kBlockN][kRow16];
  unsigned char v[kStages][kBlockN][kRow16];
#endif
};
static_assert(sizeof(Tiles) <= 48 * 1024, "static shared memory");

// Issues the copies of the tile of keys t0 .. t0 + kBlockN into `stage`; tokens outside
// [lo, hi) are zero-filled (never read from the cache: their table entries may be padding).
__device__ __forceinline__ void load_tile(Tiles& sm, int stage, int t0, int lo, int hi,
                                          const unsigned char* __restrict__ k_cache,
                                          const unsigned char* __restrict__ v_cache,
                                          const int* __restrict__ table, int block_shift,
                                          int block_size, int num_kv_heads,
                                          long long block_bytes, int head) {
#pragma unroll
  for (int i = 0; i < kBlockN * kChunksPerRow / kThreads; ++i) {
    const int c = threadIdx.x + kThreads * i;
    const int row = c / kChunksPerRow, col = c % kChunksPerRow;
    const long long off = row_offset(table, t0 + row, lo, hi, block_shift, block_size,
                                     num_kv_heads, block_bytes, head, false);
    const long long src = off < 0 ? 0 : off + col * 16;
    const int bytes = off < 0 ? 0 : 16;
#if KVS_TC_CODES
    cp_async16(&sm.kc[stage][row][col * 16], k_cache + src, bytes);
    cp_async16(&sm.vc[stage][row][col * 16], v_cache + src, bytes);
#else
    cp_async16(&sm.k[stage][row][col * 16], k_cache + src, bytes);
    cp_async16(&sm.v[stage][row][col * 16], v_cache + src, bytes);
#endif
  }
#if KVS_TC_CODES
  // Threads 0 .. kBlockN - 1 fetch the K scales, the next kBlockN the V scales.
  const int tid = threadIdx.x;
  if (tid < 2 * kBlockN) {
    const int row = tid % kBlockN;
    const long long off = row_offset(table, t0 + row, lo, hi, block_shift, block_size,
                                     num_kv_heads, block_bytes, head, true);
    const long long src = off < 0 ? 0 : off;
    if (tid < kBlockN) {
      cp_async4(&sm.k_scale[stage][row], k_cache + src, off < 0 ? 0 : 4);
    } else {
      cp_async4(&sm.v_scale[stage][row], v_cache + src, off < 0 ? 0 : 4);
    }
  }
#endif
}

#if KVS_TC_CODES
// An 8-bit code as the activation type (exact).
__device__ __forceinline__ scalar_t code_value(unsigned b) {
#if KV_DTYPE == KVT_INT8
  return from_float(static_cast<float>(static_cast<signed char>(b & 0xffu)));
#else
  return from_float(fp8_to_float(static_cast<unsigned char>(b & 0xffu)));
#endif
}

// Four codes (a 32-bit word) as two packed pairs of the activation type.
__device__ __forceinline__ uint2 convert4(unsigned w) {
  return make_uint2(pack(code_value(w), code_value(w >> 8)),
                    pack(code_value(w >> 16), code_value(w >> 24)));
}

// The codes of `stage` as activation-type rows in sm.k[0] / sm.v[0]: 8 codes per thread
// and step.
__device__ __forceinline__ void convert_tile(Tiles& sm, int stage) {
  constexpr int kGroupsPerRow = HEAD_DIM / 8;
#pragma unroll
  for (int i = 0; i < kBlockN * kGroupsPerRow / kThreads; ++i) {
    const int c = threadIdx.x + kThreads * i;
    const int row = c / kGroupsPerRow, col = c % kGroupsPerRow;
    const uint2 kb = *reinterpret_cast<const uint2*>(&sm.kc[stage][row][col * 8]);
    const uint2 vb = *reinterpret_cast<const uint2*>(&sm.vc[stage][row][col * 8]);
    const uint2 k0 = convert4(kb.x), k1 = convert4(kb.y);
    const uint2 v0 = convert4(vb.x), v1 = convert4(vb.y);
    *reinterpret_cast<uint4*>(&sm.k[0][row][col * 16]) = make_uint4(k0.x, k0.y, k1.x, k1.y);
    *reinterpret_cast<uint4*>(&sm.v[0][row][col * 16]) = make_uint4(v0.x, v0.y, v1.x, v1.y);
  }
}
static_assert(kBlockN * (HEAD_DIM / 8) % kThreads == 0, "whole groups per thread");
#endif

}  // namespace kvserve

using namespace kvserve;

// grid (num_work_items * num_kv_heads), block kThreads. `work` holds (sequence, first row)
// pairs; blockIdx.x = item * num_kv_heads + KV head.
extern "C" __global__ void __launch_bounds__(kThreads, 2)
    paged_prefill_tc(scalar_t* __restrict__ out, const scalar_t* __restrict__ q,
                     const unsigned char* __restrict__ k_cache,
                     const unsigned char* __restrict__ v_cache,
                     const int* __restrict__ block_tables, const int* __restrict__ query_starts,
                     const int* __restrict__ context_lens, const int* __restrict__ work,
                     float scale, int num_kv_heads, int block_size, int block_shift,
                     long long block_bytes, int max_blocks, int window) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  __shared__ __align__(16) Tiles sm;

  const int head = blockIdx.x % num_kv_heads;
  const int item = blockIdx.x / num_kv_heads;
  const int seq = work[2 * item];
  const int row0 = work[2 * item + 1];
  const int q_start = query_starts[seq];
  const int q_len = query_starts[seq + 1] - q_start;
  const int ctx = context_lens[seq];
  const int rows = q_len * GQA_GROUP;         // rows of this sequence
  const int p0 = ctx - q_len;                 // position of query token 0
  const int* table = block_tables + static_cast<long long>(seq) * max_blocks;
  const int num_heads = num_kv_heads * GQA_GROUP;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Keys the CTA's rows attend to: [lo, hi).
  const int cta_last = min(row0 + kBlockM, rows) - 1;
  const int lo = window > 0 ? max(0, p0 + row0 / GQA_GROUP - window + 1) : 0;
  const int hi = p0 + cta_last / GQA_GROUP + 1;
  const int tile_first = lo / kBlockN;
  const int num_tiles = (hi - 1) / kBlockN + 1 - tile_first;

  // This warp's rows wr0 .. wr_last (valid ones) and their positions.
  const int wr0 = row0 + 16 * warp;
  const bool warp_rows = wr0 < rows;
  const int wr_last = min(wr0 + 15, rows - 1);
  const int wpos_lo = p0 + wr0 / GQA_GROUP;
  const int wpos_hi = p0 + wr_last / GQA_GROUP;
  // A tile [t0, t0 + kBlockN) is attended by some row of the warp when t0 <= wpos_hi and
  // t0 + kBlockN - 1 >= first key of wpos_lo; by all of its rows, entirely, when
  // t0 + kBlockN - 1 <= wpos_lo and t0 >= first key of wpos_hi.
  const int wfirst_lo = window > 0 ? wpos_lo - window + 1 : 0;
  const int wfirst_hi = window > 0 ? wpos_hi - window + 1 : 0;

  // This lane's rows: g = lane / 4 and g + 8 of the warp's 16 (the mma fragment rows).
  const int g = lane / 4, tq = lane % 4;
  int pos[2], first[2];
  unsigned qa[kKSteps][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = wr0 + g + 8 * h;
    const bool live = r < rows;
    pos[h] = p0 + r / GQA_GROUP;
    first[h] = window > 0 ? pos[h] - window + 1 : 0;
    const long long qh =
        static_cast<long long>(q_start + (live ? r / GQA_GROUP : 0)) * num_heads +
        head * GQA_GROUP + r % GQA_GROUP;
    const unsigned* qrow = reinterpret_cast<const unsigned*>(q + qh * HEAD_DIM);
    // A fragment: a[h] = row g + 8 h, columns 2 tq, + 1; a[2 + h] = columns 8 + 2 tq, + 1.
#pragma unroll
    for (int s = 0; s < kKSteps; ++s) {
      qa[s][h] = live ? qrow[8 * s + tq] : 0u;
      qa[s][2 + h] = live ? qrow[8 * s + 4 + tq] : 0u;
    }
  }
  const float scale2 = scale * kLog2e;  // logits in log2 units: exp2 below

  // Online softmax state of the lane's two rows (log2 units; l is this lane's part of the
  // row sum) and its O fragments: o[j][2 h + c] = O[row g + 8 h][8 j + 2 tq + c].
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kNTilesO][4];
#pragma unroll
  for (int j = 0; j < kNTilesO; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  // ldmatrix addresses of this lane (byte offsets within a tile). K (B of q . K^T, not
  // transposed): matrix i = lane / 8 covers keys 8 (i / 2) + lane % 8, channels 8 (i % 2) +
  // 0..7, i.e. b0, b1 of key n tile 2 np and b0, b1 of n tile 2 np + 1. V (B of P . V,
  // transposed): matrix i covers keys 8 (i % 2) + lane % 8, channels 8 (i / 2) + 0..7, i.e.
  // b0, b1 of channel n tile 2 jp and b0, b1 of n tile 2 jp + 1.
  const int mi = lane / 8, mr = lane % 8;
  const unsigned k_lane = (8 * (mi / 2) + mr) * kRow16 + 16 * (mi % 2);
  const unsigned v_lane = (8 * (mi % 2) + mr) * kRow16 + 16 * (mi / 2);

  load_tile(sm, 0, tile_first * kBlockN, lo, hi, k_cache, v_cache, table, block_shift,
            block_size, num_kv_heads, block_bytes, head);
  cp_async_commit();
  for (int it = 0; it < num_tiles; ++it) {
    const int stage = it % kStages;
    const int t0 = (tile_first + it) * kBlockN;
    if (it + 1 < num_tiles) {
      // The stage it refills was last read in iteration it - 1, before its closing barrier.
      load_tile(sm, (it + 1) % kStages, t0 + kBlockN, lo, hi, k_cache, v_cache, table,
                block_shift, block_size, num_kv_heads, block_bytes, head);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile's group is complete (the next one may be in flight)
    __syncthreads();
#if KVS_TC_CODES
    convert_tile(sm, stage);
    __syncthreads();
    const unsigned k_base = static_cast<unsigned>(__cvta_generic_to_shared(&sm.k[0][0][0]));
    const unsigned v_base = static_cast<unsigned>(__cvta_generic_to_shared(&sm.v[0][0][0]));
#else
    const unsigned k_base = static_cast<unsigned>(__cvta_generic_to_shared(&sm.k[stage][0][0]));
    const unsigned v_base = static_cast<unsigned>(__cvta_generic_to_shared(&sm.v[stage][0][0]));
#endif
    const bool attended = warp_rows && t0 <= wpos_hi && t0 + kBlockN - 1 >= wfirst_lo;
    if (attended) {
      // S = q . K^T: 16 rows x kBlockN keys.
      float s[kNTilesS][4];
#pragma unroll
      for (int n = 0; n < kNTilesS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
        for (int np = 0; np < kNTilesS / 2; ++np) {
          unsigned b[4];
          ldmatrix_x4(b, k_base + k_lane + np * 16 * kRow16 + ks * 32);
          mma(s[2 * np], qa[ks], b[0], b[1]);
          mma(s[2 * np + 1], qa[ks], b[2], b[3]);
        }
      }
      // s[n][2 h + c]: row g + 8 h, key t0 + 8 n + 2 tq + c. Scale (and s_k), mask, row max.
      const bool full = t0 + kBlockN - 1 <= wpos_lo && t0 >= wfirst_hi;
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kNTilesS; ++n) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int key = 8 * n + 2 * tq + c;
#if KVS_TC_CODES
          const float ks_ = sm.k_scale[stage][key] * scale2;
#else
          const float ks_ = scale2;
#endif
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float x = s[n][2 * h + c] * ks_;
            if (!full) {
              const int t = t0 + key;
              x = (t <= pos[h] && t >= first[h]) ? x : -INFINITY;
            }
            s[n][2 * h + c] = x;
            tile_max[h] = fmaxf(tile_max[h], x);
          }
        }
      }
      float alpha[2], m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
        const float m_new = fmaxf(m[h], tile_max[h]);
        // A row that has seen only masked keys keeps m = -inf: its weights are exp2(-inf) = 0.
        m_use[h] = m_new == -INFINITY ? 0.f : m_new;
        alpha[h] = exp2f(m[h] - m_use[h]);
        m[h] = m_new;
        l[h] *= alpha[h];
      }
#pragma unroll
      for (int j = 0; j < kNTilesO; ++j) {
        o[j][0] *= alpha[0];
        o[j][1] *= alpha[0];
        o[j][2] *= alpha[1];
        o[j][3] *= alpha[1];
      }
#pragma unroll
      for (int n = 0; n < kNTilesS; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float p = exp2f(s[n][c] - m_use[c / 2]);
          l[c / 2] += p;
          s[n][c] = p;
        }
      }
      // O += P . V: the S fragments of key n tiles 2 kk and 2 kk + 1 are the A fragment of
      // k step kk (a0: row g, keys 16 kk + 2 tq, + 1; a1: row g + 8; a2, a3: keys + 8).
#pragma unroll
      for (int kk = 0; kk < kKStepsPV; ++kk) {
        unsigned pa[4];
#if KVS_TC_CODES
        const float2 vs0 =
            *reinterpret_cast<const float2*>(&sm.v_scale[stage][16 * kk + 2 * tq]);
        const float2 vs1 =
            *reinterpret_cast<const float2*>(&sm.v_scale[stage][16 * kk + 8 + 2 * tq]);
#else
        const float2 vs0 = make_float2(1.f, 1.f), vs1 = vs0;
#endif
        pa[0] = pack_float(s[2 * kk][0] * vs0.x, s[2 * kk][1] * vs0.y);
        pa[1] = pack_float(s[2 * kk][2] * vs0.x, s[2 * kk][3] * vs0.y);
        pa[2] = pack_float(s[2 * kk + 1][0] * vs1.x, s[2 * kk + 1][1] * vs1.y);
        pa[3] = pack_float(s[2 * kk + 1][2] * vs1.x, s[2 * kk + 1][3] * vs1.y);
#pragma unroll
        for (int jp = 0; jp < kNTilesO / 2; ++jp) {
          unsigned b[4];
          ldmatrix_x4_trans(b, v_base + v_lane + kk * 16 * kRow16 + jp * 32);
          mma(o[2 * jp], pa, b[0], b[1]);
          mma(o[2 * jp + 1], pa, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage (and the converted tile)
  }
  cp_async_wait<0>();

  // Row sums over the quad, then O / l in the activation type.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    const int r = wr0 + g + 8 * h;
    if (r >= rows) continue;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    const long long qh = static_cast<long long>(q_start + r / GQA_GROUP) * num_heads +
                         head * GQA_GROUP + r % GQA_GROUP;
    unsigned* orow = reinterpret_cast<unsigned*>(out + qh * HEAD_DIM);
#pragma unroll
    for (int j = 0; j < kNTilesO; ++j) {
      orow[4 * j + tq] = pack_float(o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
    }
  }
}
