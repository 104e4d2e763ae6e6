// paged_attention_tc.cu: decode attention on tensor cores, for 16-bit KV caches of the
// activation type (bf16 KV with bf16 activations, fp16 with fp16), 8-bit ones (int8, fp8
// e4m3 / e5m2, one f32 scale per token and head) and int4 ones (a scale and min per group of
// channels). The default decode kernel for those caches (`KVSERVE_DECODE_KERNEL=split`
// forces paged_attention.cu); measured in BENCHMARKS.md.
//
// 8-bit codes are exact in bf16 and fp16, so the tiles hold codes and the scales are folded
// around the products: q . (s_k code_k) = s_k (q . code_k) scales each logit after the mma,
// and sum_t p_t (s_v,t code_v,t) = sum_t (p_t s_v,t) code_v,t scales P before it becomes the
// A operand (the softmax sum uses the unscaled p).
//
// int4 (kv-quant's Int4 layouts: two codes 0..15 per byte, a half2 (scale, min) per group of
// G = 32, 64, 128 or head_dim channels; x = code * s + m) has its own body in the kernel: the
// products are transposed, S^T = K q^T and O^T = V^T P^T, so the 16 rows of A are tokens
// (q . K) and channels (P . V), and the 8 columns of B the GQA group's query heads: no
// zero-padded rows (16 mma per tile instead of 32), and each lane converts the (scale, min)
// of two tokens instead of four. The tiles hold the packed nibbles and their (scale, min)
// rows; lanes turn the nibbles of a 32-bit word into fragments (nibble_pair: 1 + code / 16 in
// bf16 / fp16, exact, one shift and one lop3 per pair). The channel order of each 16-channel
// k step is permuted (the same for q and K: q . K is unchanged) so that word 4 j + t of a K
// row holds lane t's channels of k steps 2 j and 2 j + 1: k step 2 j + h, lane t: channels
// c0, c0 + 4 (k 2 t, 2 t + 1) and c0 + 1, c0 + 5 (k 2 t + 8, 2 t + 9), c0 = 32 j + 8 t + 2 h.
// A group is a run of whole k steps, so S_g = K_g q_g^T comes from its own mma chain, and
// the (scale, min) fold after it:
//   logit = sum_g s_g (16 S_g - 16 Qsum_g) + m_g Qsum_g,  Qsum_g = sum_{c in g} q_c
// (Qsum per head and group computed once per CTA). P . V: A fragments are exact codes
// (code_pair) of channel 32 b + 4 g + i, lane g reading half g % 2 of word 4 b + g / 2 of its
// four token rows (byte_perm puts two tokens' halves side by side): one group per m tile. B
// = (p s_g)^T per group (the int8 rule; movmatrix transposes the S^T fragments into B
// fragments), and sum_t p_t m_t,g is kept per head and group (rescaled like O) and added to
// the group's channels at the end. Checked lane by lane in kernels/experiments/tc_emulation.py.
//
// Why: the first decode kernel (paged_attention.cu) is bound by latency and instructions per
// byte (12-23% occupancy, at most half the DRAM peak on an H200; kernels/NOTES.md). Here each
// warp streams its own tiles of 16 tokens through shared memory with cp.async, two stages deep
// (the next tile's K and V are in flight while this one is used), and does the arithmetic of
// a tile in 32 mma.sync instructions: the GQA group's query heads are the rows of the A
// operand (padded to 16), so each K and V row is read once for the whole group.
//
// Grid (num_kv_heads, num_seqs, max_parts), block kThreads, as paged_decode_partition; one
// CTA per (KV head, sequence, partition); partitions of `partition_size` tokens (a multiple
// of kTile * kWarps) from the window's first token. A sequence with one partition gets `out`
// directly; otherwise every CTA writes its partial results (decode_reduce.cuh's format) and
// the last CTA of the (sequence, KV head) to finish merges them (GroupMerge) and writes `out`:
// no second launch. `counters` [num_seqs][num_kv_heads] (u32) count the finished partitions;
// they must be zero before the first launch, and each launch leaves them zero.
#include "tc_common.cuh"
#define KVS_NO_REDUCE_KERNEL  // the merge is this kernel's epilogue, not a second launch
#include "decode_reduce.cuh"

#ifndef GQA_GROUP
#error "GQA_GROUP must be defined"
#endif

namespace kvserve {

constexpr int kTile = 16;                    // tokens per tile (the mma K of the PV product)
constexpr int kWarps = 2;                    // warps per CTA, each with its own tiles
constexpr int kThreads = 32 * kWarps;
constexpr int kStages = 2;                   // tiles in shared memory per warp
constexpr int kRowBytes = kValueRowBytes + 16;  // padded: no bank conflicts, 16-B aligned
constexpr int kKSteps = HEAD_DIM / 16;          // mma K steps of q . k
constexpr int kNTiles = HEAD_DIM / 8;           // mma N tiles of p . V
constexpr int kChunksPerRow = kValueRowBytes / 16;  // 16-byte cp.async chunks per row
static_assert(GQA_GROUP <= 8, "the query heads fill rows 0..7 of A (int4: the columns of B)");
static_assert(kTile * kChunksPerRow % 32 == 0, "whole chunks per lane");
#if KVS_TC_INT4
constexpr int kGroups = HEAD_DIM / kGroupSize;   // (scale, min) pairs per row
constexpr int kStepsPerGroup = kGroupSize / 16;  // mma K steps of q . k per group
constexpr int kMTiles = HEAD_DIM / 16;           // mma M tiles (16 channels) of V^T P^T
static_assert(kGroupSize % 32 == 0, "a group is whole pairs of k steps (whole K words)");
static_assert(kScaleRowBytes == 4 * kGroups, "a half2 per group");
constexpr int kMinCtas = 8;  // CTAs per SM the registers are bounded for (<= 128 each)
#else
constexpr int kMinCtas = 6;
#endif

// One warp's shared memory: kStages tiles of K and of V (rows of raw bytes), and for 8-bit
// codes their scales, for int4 their (scale, min) rows.
struct WarpTiles {
  unsigned char k[kStages][kTile][kRowBytes];
  unsigned char v[kStages][kTile][kRowBytes];
#if KVS_TC_CODES
  float k_scale[kStages][kTile];
  float v_scale[kStages][kTile];
#endif
#if KVS_TC_INT4
  __half2 k_param[kStages][kTile][kGroups];  // 16-byte aligned: k and v are multiples of 16
  __half2 v_param[kStages][kTile][kGroups];
#endif
};

// KVSERVE_KERNEL_DEFINES=-DKVS_TC_BULK=1 (sm_90+, 16-bit KV): each tile's rows arrive by
// 1-D bulk copies (the TMA engine, one 256-byte copy per K or V row into the padded rows,
// completion counted on an mbarrier per stage) instead of cp.async: an A/B of the loader
// (kernels/NOTES.md, "Decode bf16 bandwidth").
#if !defined(KVS_TC_BULK) || KVS_TC_CODES || KVS_TC_INT4 || !defined(__CUDA_ARCH__) || \
    __CUDA_ARCH__ < 900
#undef KVS_TC_BULK
#define KVS_TC_BULK 0
#endif

#if KVS_TC_BULK
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(unsigned long long* bar) {
  asm volatile("mbarrier.init.shared.b64 [%0], 1;\n" ::"r"(smem_u32(bar)) : "memory");
}
// The one arrival of the phase, announcing `bytes` of bulk copies that complete it.
__device__ __forceinline__ void mbar_expect(unsigned long long* bar, unsigned bytes) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared.b64 st, [%0], %1;\n}\n" ::"r"(
                   smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes,
                                          unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  unsigned done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  }
}
#endif

#if !KVS_TC_INT4
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
#endif

// Issues the copies of one tile (tokens t0 .. t0 + kTile) into `stage`; tokens outside
// [first, end) are zero-filled (their weight is 0, and 0 * garbage could be NaN).
__device__ __forceinline__ void load_tile(WarpTiles& w, int stage, int t0, int first, int end,
                                          const unsigned char* __restrict__ k_cache,
                                          const unsigned char* __restrict__ v_cache,
                                          const int* __restrict__ table, int block_shift,
                                          int block_size, int num_kv_heads,
                                          long long block_bytes, int head, int lane,
                                          unsigned long long* bar) {
#if KVS_TC_BULK
  // Lane r < kTile copies K row r, lane kTile + r V row r; a row outside [first, end) is
  // zeroed by its lane instead (0 * garbage could be NaN). Lane 0 announces the live bytes.
  const int row = lane % kTile;
  const long long off = row_offset(table, t0 + row, first, end, block_shift, block_size,
                                   num_kv_heads, block_bytes, head, false);
  const unsigned live = __ballot_sync(0xffffffffu, off >= 0);
  if (lane == 0) mbar_expect(bar, __popc(live) * kValueRowBytes);
  __syncwarp();
  unsigned char* dst = lane < kTile ? w.k[stage][row] : w.v[stage][row];
  if (off >= 0) {
    bulk_copy(dst, (lane < kTile ? k_cache : v_cache) + off, kValueRowBytes, bar);
  } else {
#pragma unroll
    for (int c = 0; c < kChunksPerRow; ++c) {
      reinterpret_cast<uint4*>(dst)[c] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
#elif KVS_TC_INT4
  // The lanes of a token's first two chunks also fetch its K (col 0) and V (col 1) (scale,
  // min) row, from the block base they computed: one table lookup per row and lane.
  static_assert(kChunksPerRow >= 2, "a K and a V lane per row");
#pragma unroll
  for (int i = 0; i < kTile * kChunksPerRow / 32; ++i) {
    const int c = lane + 32 * i;
    const int row = c / kChunksPerRow, col = c % kChunksPerRow;
    const int t = t0 + row;
    const bool live = t >= first && t < end;
    const int slot = head * block_size + (t & (block_size - 1));
    const long long base = live ? static_cast<long long>(table[t >> block_shift]) * block_bytes : 0;
    const long long value = base + slot * kValueRowBytes + col * 16;
    cp_async16(&w.k[stage][row][col * 16], k_cache + value, live ? 16 : 0);
    cp_async16(&w.v[stage][row][col * 16], v_cache + value, live ? 16 : 0);
    const long long param =
        base + kv_scale_section_offset(KV_DTYPE, block_size, num_kv_heads, HEAD_DIM) +
        slot * kScaleRowBytes;
    if (col < 2) {
      const unsigned char* cache = col == 0 ? k_cache : v_cache;
      __half2* dst = col == 0 ? &w.k_param[stage][row][0] : &w.v_param[stage][row][0];
      cp_async_ca<kScaleRowBytes>(dst, cache + param, live ? kScaleRowBytes : 0);
    }
  }
#else
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
#endif
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

#if KVS_TC_INT4
// The two values of a packed pair of the activation type, summed in f32.
__device__ __forceinline__ float pair_sum(unsigned x) {
#if SCALAR == 0
  return __half2float(__ushort_as_half(static_cast<unsigned short>(x & 0xffffu))) +
         __half2float(__ushort_as_half(static_cast<unsigned short>(x >> 16)));
#else
  return __uint_as_float(x << 16) + __uint_as_float(x & 0xffff0000u);
#endif
}

// The transpose of an 8x8 matrix of 16-bit pairs across the warp: lane l holds row l / 4,
// columns 2 (l % 4), + 1 of M and receives the same of M^T.
__device__ __forceinline__ unsigned transpose8x8(unsigned x) {
  unsigned d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(x));
  return d;
}
#endif

// Sums the warps' outputs (o_sh [kWarps][8][HEAD_DIM], each already rescaled to the CTA's
// max of its head) and writes `out` (a single partition) or the partial results the merge
// reads. Thread i writes channel i % HEAD_DIM of heads i / HEAD_DIM,
// i / HEAD_DIM + kThreads / HEAD_DIM, ...
__device__ __forceinline__ void write_output(scalar_t* __restrict__ out,
                                             float* __restrict__ tmp_out,
                                             float* __restrict__ max_logits,
                                             float* __restrict__ exp_sums, const float* o_sh,
                                             const float (&merge_m)[kWarps][8],
                                             const float (&merge_l)[kWarps][8], int seq,
                                             int head, int part, int num_heads, int max_parts,
                                             bool single) {
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

// The tokens [p_start, p_end) of a CTA's partition (partitions of `partition_size` tokens from
// the window's first token) and this warp's tiles of them: the kWarps warps interleave, tile
// i of the warp starts at my_first + i * kWarps * kTile.
struct Partition {
  int num_parts, p_start, p_end, my_tiles, my_first;
};

//
// partition_size <= 0: sized on the device, per sequence, for a grid of max_parts partitions
// (the launcher fixes the grid, e.g. for a CUDA graph): the sequence's attended tokens over
// max_parts, rounded up to kTile * kWarps, so that its partitions always fit the grid (a
// short context uses fewer; CTAs past them return). The merge uses the same count.
__device__ __forceinline__ Partition partition_of(int ctx, int window, int part,
                                                  int partition_size, int max_parts, int warp) {
  Partition pt;
  const int first = (window > 0 && ctx > window) ? ctx - window : 0;
  if (partition_size <= 0) {
    constexpr int kQuantum = kTile * kWarps;
    const int per_part = (ctx - first + max_parts - 1) / max_parts;
    partition_size = max(kQuantum, (per_part + kQuantum - 1) / kQuantum * kQuantum);
  }
  pt.num_parts = (ctx - first + partition_size - 1) / partition_size;
  pt.p_start = first + part * partition_size;
  pt.p_end = min(ctx, pt.p_start + partition_size);
  const int tiles_total = (pt.p_end - pt.p_start + kTile - 1) / kTile;
  pt.my_tiles = tiles_total > warp ? (tiles_total - warp + kWarps - 1) / kWarps : 0;
  pt.my_first = pt.p_start + warp * kTile;
  return pt;
}

// Streams this warp's tiles of `pt` through its kStages stages: `tile(stage, t0)` computes
// with the tile of tokens t0 .. t0 + kTile while the next one's copies are in flight.
template <class Tile>
__device__ __forceinline__ void stream_tiles(WarpTiles& w, const Partition& pt,
                                             const unsigned char* __restrict__ k_cache,
                                             const unsigned char* __restrict__ v_cache,
                                             const int* __restrict__ table, int block_shift,
                                             int block_size, int num_kv_heads,
                                             long long block_bytes, int head, int lane,
                                             unsigned long long* bars, Tile&& tile) {
  constexpr int kStride = kWarps * kTile;
  if (pt.my_tiles > 0) {
    load_tile(w, 0, pt.my_first, pt.p_start, pt.p_end, k_cache, v_cache, table, block_shift,
              block_size, num_kv_heads, block_bytes, head, lane, &bars[0]);
  }
  cp_async_commit();
  for (int i = 0; i < pt.my_tiles; ++i) {
    if (i + 1 < pt.my_tiles) {
      load_tile(w, (i + 1) % kStages, pt.my_first + (i + 1) * kStride, pt.p_start, pt.p_end,
                k_cache, v_cache, table, block_shift, block_size, num_kv_heads, block_bytes,
                head, lane, &bars[(i + 1) % kStages]);
    }
#if KVS_TC_BULK
    // Use k of stage s completes the barrier's phase k: parity k % 2.
    mbar_wait(&bars[i % kStages], (i / kStages) & 1);
#else
    cp_async_commit();
    cp_async_wait<1>();  // this tile's group is complete (the next one may be in flight)
#endif
    __syncwarp();
    tile(i % kStages, pt.my_first + i * kStride);
    __syncwarp();  // the stage is read before the next iteration refills it
  }
  cp_async_wait<0>();
}

}  // namespace kvserve

using namespace kvserve;

extern "C" __global__ void __launch_bounds__(kThreads, kMinCtas)
    paged_decode_tc(scalar_t* __restrict__ out, float* __restrict__ tmp_out,
                    float* __restrict__ max_logits, float* __restrict__ exp_sums,
                    const scalar_t* __restrict__ q, const unsigned char* __restrict__ k_cache,
                    const unsigned char* __restrict__ v_cache,
                    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                    float scale, int num_kv_heads, int block_size, int block_shift,
                    long long block_bytes, int max_blocks, int partition_size, int max_parts,
                    int window, unsigned* __restrict__ counters) {
  __shared__ __align__(16) WarpTiles tiles[kWarps];
  __shared__ float merge_m[kWarps][8];
  __shared__ float merge_l[kWarps][8];
  __shared__ __align__(8) unsigned long long tile_bars[kWarps][kStages];  // KVS_TC_BULK only
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();

  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Partition pt =
      partition_of(context_lens[seq], window, part, partition_size, max_parts, warp);
  if (part >= pt.num_parts) return;
  const int p_start = pt.p_start, p_end = pt.p_end;
  const int* table = block_tables + static_cast<long long>(seq) * max_blocks;
  const int num_heads = num_kv_heads * GQA_GROUP;
#if KVS_TC_BULK
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) mbar_init(&tile_bars[warp][s]);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncwarp();
#endif
#if !KVS_TC_INT4
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
  stream_tiles(w, pt, k_cache, v_cache, table, block_shift, block_size, num_kv_heads,
               block_bytes, head, lane, tile_bars[warp], [&](int stage, int t0) {
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
  });

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
#else  // int4: the transposed products (see the top of the file)
  // Fragment coordinates: rows g and g + 8 of A and of D, column g of B; columns 2 t, 2 t + 1
  // of D (query heads 2 t + e, e = 0, 1).
  const int g = lane / 4, t = lane % 4;

  // B of K q^T: q^T, column g = query head head * GQA_GROUP + g (zero past the group), k steps
  // in the permuted channel order; Qsum of heads 2 t + e per group (and 16 Qsum).
  unsigned qb[kKSteps][2];
  float qsum[2][kGroups], qsum16[2][kGroups];
  {
    const bool live = g < GQA_GROUP;
    const scalar_t* qrow =
        q + (static_cast<long long>(seq) * num_heads + head * GQA_GROUP + (live ? g : 0)) *
                HEAD_DIM;
    float mine[kGroups];
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp) mine[grp] = 0.f;
#pragma unroll
    for (int s = 0; s < kKSteps; ++s) {
      const int c0 = 32 * (s / 2) + 8 * t + 2 * (s % 2);
      qb[s][0] = live ? pack(qrow[c0], qrow[c0 + 4]) : 0u;
      qb[s][1] = live ? pack(qrow[c0 + 1], qrow[c0 + 5]) : 0u;
      mine[s / kStepsPerGroup] += pair_sum(qb[s][0]) + pair_sum(qb[s][1]);
    }
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp) {
      float x = mine[grp];  // head g's sum over the quad's channels
      x += __shfl_xor_sync(0xffffffffu, x, 1);
      x += __shfl_xor_sync(0xffffffffu, x, 2);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        qsum[e][grp] = __shfl_sync(0xffffffffu, x, 4 * (2 * t + e));
        qsum16[e][grp] = 16.f * qsum[e][grp];
      }
    }
  }
  const float scale2 = scale * kLog2e;  // logits in log2 units: exp2 below

  // Online softmax state of heads 2 t + e (log2 units; l and msum over this lane's tokens
  // only, summed over the lanes g at the end) and O^T: o[mt][2 h + e] = O[head 2 t + e]
  // [channel 32 (mt / 2) + 4 g + 2 (mt % 2) + h] (h = 0: row g, 1: row g + 8 of m tile mt).
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float msum[2][kGroups];  // sum_t p_t m_t,g
  float o[kMTiles][4];
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp) msum[0][grp] = msum[1][grp] = 0.f;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

  WarpTiles& w = tiles[warp];
  stream_tiles(w, pt, k_cache, v_cache, table, block_shift, block_size, num_kv_heads,
               block_bytes, head, lane, tile_bars[warp], [&](int stage, int t0) {
    // S^T = K q^T, per group: rows g, g + 8 are tokens t0 + g, t0 + g + 8 (A from the nibbles
    // of their K words 4 j + t); st[2 h + e]: token t0 + g + 8 h, head 2 t + e.
    const unsigned* k_lo = reinterpret_cast<const unsigned*>(w.k[stage][g]);
    const unsigned* k_hi = reinterpret_cast<const unsigned*>(w.k[stage][g + 8]);
    float st[4];
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = grp * kStepsPerGroup / 2; j < (grp + 1) * kStepsPerGroup / 2; ++j) {
        const unsigned x = k_lo[4 * j + t], y = k_hi[4 * j + t];
        const unsigned a0[4] = {nibble_pair<0>(x), nibble_pair<0>(y), nibble_pair<1>(x),
                                nibble_pair<1>(y)};
        mma(acc, a0, qb[2 * j][0], qb[2 * j][1]);
        const unsigned a1[4] = {nibble_pair<2>(x), nibble_pair<2>(y), nibble_pair<3>(x),
                                nibble_pair<3>(y)};
        mma(acc, a1, qb[2 * j + 1][0], qb[2 * j + 1][1]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float2 sm = __half22float2(w.k_param[stage][g + 8 * h][grp]);  // scale, min
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = fmaf(sm.y, qsum[e][grp], grp == 0 ? 0.f : st[2 * h + e]);
          st[2 * h + e] = fmaf(sm.x, fmaf(16.f, acc[2 * h + e], -qsum16[e][grp]), x);
        }
      }
    }
    // Mask, log2 units, and the online softmax of heads 2 t + e over the lanes g.
    float alpha[2], pr[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int tok = t0 + g + 8 * h;
      const bool live = tok >= p_start && tok < p_end;
      st[2 * h] = live ? st[2 * h] * scale2 : -INFINITY;
      st[2 * h + 1] = live ? st[2 * h + 1] * scale2 : -INFINITY;
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float tile_max = fmaxf(st[e], st[2 + e]);
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 4));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 8));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 16));
      const float m_new = fmaxf(m[e], tile_max);
      // A head that has seen only masked tokens keeps m = -inf: no rescale, weights 0.
      alpha[e] = m_new == -INFINITY ? 1.f : exp2_approx(m[e] - m_new);
      pr[e] = m_new == -INFINITY ? 0.f : exp2_approx(st[e] - m_new);
      pr[2 + e] = m_new == -INFINITY ? 0.f : exp2_approx(st[2 + e] - m_new);
      l[e] = l[e] * alpha[e] + pr[e] + pr[2 + e];
      m[e] = m_new;
    }
    // Rescale O and the min sums only when a head's max moved somewhere in the warp (after
    // the first tiles it rarely does; alpha is exactly 1 otherwise).
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        o[mt][0] *= alpha[0];
        o[mt][1] *= alpha[1];
        o[mt][2] *= alpha[0];
        o[mt][3] *= alpha[1];
      }
#pragma unroll
      for (int grp = 0; grp < kGroups; ++grp) {
        msum[0][grp] *= alpha[0];
        msum[1][grp] *= alpha[1];
      }
    }
    // O^T += V^T (P s_g)^T per group. B: P scaled by the tokens' V scales, packed as the
    // S^T fragments (rows: tokens g, g + 8; columns: heads 2 t, 2 t + 1) and transposed into
    // B fragments (rows: tokens 2 t, 2 t + 1 | 2 t + 8, 2 t + 9; column: head g). A: the codes
    // of channel 32 b + 4 g + i, tokens 2 t, 2 t + 1 (from half g % 2 of word 4 b + g / 2 of
    // both rows, side by side) and 2 t + 8, 2 t + 9.
    const unsigned* v0 = reinterpret_cast<const unsigned*>(w.v[stage][2 * t]);
    const unsigned* v1 = reinterpret_cast<const unsigned*>(w.v[stage][2 * t + 1]);
    const unsigned* v8 = reinterpret_cast<const unsigned*>(w.v[stage][2 * t + 8]);
    const unsigned* v9 = reinterpret_cast<const unsigned*>(w.v[stage][2 * t + 9]);
    const unsigned sel = (g & 1) ? 0x7632u : 0x5410u;
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp) {
      const float2 lo = __half22float2(w.v_param[stage][g][grp]);  // token t0 + g: scale, min
      const float2 hi = __half22float2(w.v_param[stage][g + 8][grp]);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        msum[e][grp] = fmaf(pr[e], lo.y, fmaf(pr[2 + e], hi.y, msum[e][grp]));
      }
      const unsigned b0 = transpose8x8(pack_float(pr[0] * lo.x, pr[1] * lo.x));
      const unsigned b1 = transpose8x8(pack_float(pr[2] * hi.x, pr[3] * hi.x));
#pragma unroll
      for (int b = grp * kGroupSize / 32; b < (grp + 1) * kGroupSize / 32; ++b) {
        const int wi = 4 * b + g / 2;
        const unsigned x = __byte_perm(v0[wi], v1[wi], sel);  // tokens 2 t, 2 t + 1
        const unsigned y = __byte_perm(v8[wi], v9[wi], sel);  // tokens 2 t + 8, 2 t + 9
        const unsigned a0[4] = {nibble_code<0>(x), nibble_code<1>(x), nibble_code<0>(y),
                                nibble_code<1>(y)};
        mma(o[2 * b], a0, b0, b1);
        const unsigned a1[4] = {nibble_code<2>(x), nibble_code<3>(x), nibble_code<2>(y),
                                nibble_code<3>(y)};
        mma(o[2 * b + 1], a1, b0, b1);
      }
    }
  });

  // Sums over the lanes g (the tokens), then the min terms join their groups' channels.
#pragma unroll
  for (int e = 0; e < 2; ++e) {
#pragma unroll
    for (int x = 4; x < 32; x *= 2) {
      l[e] += __shfl_xor_sync(0xffffffffu, l[e], x);
#pragma unroll
      for (int grp = 0; grp < kGroups; ++grp) {
        msum[e][grp] += __shfl_xor_sync(0xffffffffu, msum[e][grp], x);
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int grp = 32 * (mt / 2) / kGroupSize;
    o[mt][0] += msum[0][grp];
    o[mt][1] += msum[1][grp];
    o[mt][2] += msum[0][grp];
    o[mt][3] += msum[1][grp];
  }

  // Merge the warps as the other dtypes do: (m, l) per head, O through the tiles' memory.
  if (g == 0) {
    merge_m[warp][2 * t] = m[0];
    merge_m[warp][2 * t + 1] = m[1];
    merge_l[warp][2 * t] = l[0];
    merge_l[warp][2 * t + 1] = l[1];
  }
  __syncthreads();
  float mine[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float m_all = -INFINITY;
#pragma unroll
    for (int x = 0; x < kWarps; ++x) m_all = fmaxf(m_all, merge_m[x][2 * t + e]);
    mine[e] = m[e] == -INFINITY ? 0.f : exp2f(m[e] - m_all);
  }
  float* o_sh = reinterpret_cast<float*>(&tiles[0].k[0][0][0]);  // [kWarps][8][HEAD_DIM]
  static_assert(sizeof(tiles) >= kWarps * 8 * HEAD_DIM * sizeof(float), "merge space");
  __syncthreads();  // everyone has read merge_*; the tiles are free
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int ch = 32 * (mt / 2) + 4 * g + 2 * (mt % 2);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float* row = o_sh + (warp * 8 + 2 * t + e) * HEAD_DIM;
      row[ch] = o[mt][e] * mine[e];
      row[ch + 1] = o[mt][2 + e] * mine[e];
    }
  }
#endif
  __syncthreads();
  write_output(out, tmp_out, max_logits, exp_sums, o_sh, merge_m, merge_l, seq, head, part,
               num_heads, max_parts, pt.num_parts == 1);
  if (pt.num_parts == 1) return;

  // Split-KV merge without a second launch: the last CTA of this (sequence, KV head) to finish
  // merges every partition of the group. Release: each thread's fence makes its partials
  // visible at device scope (in L2) before the barrier, and thread 0 counts the CTA after both
  // (its own fence orders the count after what the barrier made it observe). Acquire: the CTA
  // whose count completes the set fences after reading the counter, and the merge reads the
  // partials through L2 (GroupMerge's load_l2) after the barrier that follows. The last CTA
  // also puts the counter back to 0 for the next launch (no other CTA touches it after its
  // count), so the counters stay zero between launches and need no memset.
  // 16-byte loads in flight per thread: 16 at d = 128 (8B, batch 1: 33 partitions of 4 x 128
  // channels, 5 rounds of loads); 8 at d = 64 (half the bytes; 16 would take the d = 64
  // variants from ~95 to ~127 registers, 10 -> 8 CTAs per SM).
  using Merge = GroupMerge<kThreads, GQA_GROUP, HEAD_DIM >= 128 ? 16 : 8>;
  static_assert(sizeof(tiles) >= Merge::kSmemFloats * sizeof(float), "merge scratch");
  __threadfence();
  __syncthreads();  // also: every thread has read o_sh, the merge may reuse the tiles
  // (seq, head) anew: not kept in registers through the main loop (fresh_tid).
  const int m_head = fresh_ctaid_x(), m_seq = fresh_ctaid_y();
  bool last = false;
  if (threadIdx.x == 0) {
    __threadfence();
    unsigned* counter = counters + static_cast<long long>(m_seq) * num_kv_heads + m_head;
    last = atomicAdd(counter, 1u) == static_cast<unsigned>(pt.num_parts - 1);
    if (last) {
      atomicExch(counter, 0u);
      __threadfence();
    }
  }
  if (!__syncthreads_or(last)) return;
  Merge::run(out, tmp_out, max_logits, exp_sums,
             static_cast<long long>(m_seq) * num_heads + m_head * GQA_GROUP, pt.num_parts,
             max_parts, reinterpret_cast<float*>(&tiles[0].k[0][0][0]));
}

