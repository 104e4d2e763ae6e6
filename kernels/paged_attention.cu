// paged_attention.cu: decode attention over the paged, optionally quantized KV cache.
//
// One query token per sequence. Split-KV (flash-decoding): the context of a sequence is cut
// into partitions of `partition_size` tokens, one CTA per (KV head, sequence, partition), so a
// single long sequence still fills the GPU; a second kernel merges the partitions. GQA: a CTA
// owns one KV head and computes all GQA_GROUP query heads of its group, so each K and V row is
// read from memory once. Rows are found through the block table and dequantized in registers
// (kv_layout.cuh); softmax in f32. A sliding window (window > 0) keeps the last `window`
// tokens of the context.
//
// Layouts (all contiguous): q, out [num_seqs][num_heads][HEAD_DIM] (scalar_t);
// block_tables [num_seqs][max_blocks] (int); context_lens [num_seqs] (int); k_cache,
// v_cache: num_blocks blocks of `block_bytes` each (one layer); tmp_out
// [num_seqs][num_heads][max_parts][HEAD_DIM], max_logits and exp_sums
// [num_seqs][num_heads][max_parts] (float).
#include "common.cuh"

#ifndef GQA_GROUP
#error "GQA_GROUP must be defined"
#endif

namespace kvserve {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kLanesPerToken = HEAD_DIM / kChunk;  // lanes that share one row
static_assert(kLanesPerToken <= 32 && 32 % kLanesPerToken == 0, "HEAD_DIM / 8 must divide 32");
constexpr int kTokensPerWarp = 32 / kLanesPerToken;
constexpr int kTokensPerIter = kWarps * kTokensPerWarp;
// Rows in flight per thread: 8, but 2 for int4 (its registers go to dequantization) and 4 for
// GQA groups over 4 (their registers go to q and the accumulators); measured on an H200
// (kernels/NOTES.md). KV_UNROLL overrides it for tuning.
#ifdef KV_UNROLL
constexpr int kUnroll = KV_UNROLL;
#else
constexpr int kUnroll = kv_dtype_is_int4(KV_DTYPE) ? 2 : GQA_GROUP > 4 ? 4 : 8;
#endif
constexpr int G = GQA_GROUP;

struct Row {
  chunk_t bits;
  float2 scale;
};

// Loads this thread's chunk of token `t`'s row in `cache` (or zeros when `valid` is false).
__device__ __forceinline__ Row load_row(const unsigned char* __restrict__ cache,
                                        const int* __restrict__ table, int t, bool valid,
                                        int block_shift, int block_size, int num_kv_heads,
                                        long long block_bytes, int head, int chunk) {
  Row r;
  if (!valid) {
    r.bits.v = {};
    r.scale = make_float2(0.f, 0.f);
    return r;
  }
  const int block = table[t >> block_shift];
  const int slot = t & (block_size - 1);
  const unsigned char* base = cache + static_cast<long long>(block) * block_bytes;
  r.bits = load_chunk(base + kv_value_offset(KV_DTYPE, block_size, HEAD_DIM, head, slot) +
                      chunk * kChunkBytes);
  r.scale = chunk_scale(
      base + kv_scale_offset(KV_DTYPE, block_size, num_kv_heads, HEAD_DIM, head, slot),
      chunk * kChunk);
  return r;
}

// This thread's rows of one tile: tokens t, t + kTokensPerIter, ... (all loads issued
// before any is used).
__device__ __forceinline__ void load_tile(Row (&rows)[kUnroll],
                                          const unsigned char* __restrict__ cache,
                                          const int* __restrict__ table, int t, int end,
                                          int block_shift, int block_size, int num_kv_heads,
                                          long long block_bytes, int head, int chunk) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int tu = t + u * kTokensPerIter;
    rows[u] = load_row(cache, table, tu, tu < end, block_shift, block_size, num_kv_heads,
                       block_bytes, head, chunk);
  }
}

}  // namespace kvserve

using namespace kvserve;

extern "C" __global__ void __launch_bounds__(kThreads, 4)
    paged_decode_partition(scalar_t* __restrict__ out, float* __restrict__ tmp_out,
                           float* __restrict__ max_logits, float* __restrict__ exp_sums,
                           const scalar_t* __restrict__ q,
                           const unsigned char* __restrict__ k_cache,
                           const unsigned char* __restrict__ v_cache,
                           const int* __restrict__ block_tables,
                           const int* __restrict__ context_lens, float softmax_scale,
                           int num_kv_heads, int block_size, int block_shift,
                           long long block_bytes, int max_blocks, int partition_size,
                           int max_parts, int window) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const int head = blockIdx.x;  // KV head
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int ctx = context_lens[seq];
  const int first = (window > 0 && ctx > window) ? ctx - window : 0;
  const int num_parts = (ctx - first + partition_size - 1) / partition_size;
  if (part >= num_parts) return;
  const int start = first + part * partition_size;
  const int end = min(start + partition_size, ctx);
  const int n = end - start;

  const int num_heads = num_kv_heads * G;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int chunk = lane % kLanesPerToken;    // which 8 channels of a row
  const int row_lane = lane / kLanesPerToken;  // which token of the warp's group
  const int* table = block_tables + static_cast<long long>(seq) * max_blocks;

  extern __shared__ float smem[];
  float* logits = smem;                      // [G][partition_size]
  float* reduce = smem + G * partition_size;  // [G][HEAD_DIM]
  __shared__ float s_max[G];
  __shared__ float s_sum[G];

  // This thread's 8 channels of each query head of the group, pre-scaled.
  float qr[G][kChunk];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const scalar_t* qh =
        q + (static_cast<long long>(seq) * num_heads + head * G + g) * HEAD_DIM + chunk * kChunk;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) qr[g][i] = to_float(qh[i]) * softmax_scale;
  }

  // 1. Logits: each row read once, dotted with every query head of the group.
  for (int t0 = start; t0 < end; t0 += kTokensPerIter * kUnroll) {
    Row rows[kUnroll];
    load_tile(rows, k_cache, table, t0 + warp * kTokensPerWarp + row_lane, end, block_shift,
              block_size, num_kv_heads, block_bytes, head, chunk);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * kTokensPerIter + warp * kTokensPerWarp + row_lane;
      float x[kChunk];
      chunk_raw(rows[u].bits, x);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float dot = 0.f, qsum = 0.f;
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          dot = fmaf(qr[g][i], x[i], dot);
          if (kIsInt4) qsum += qr[g][i];
        }
        float part_dot = dot * rows[u].scale.x;
        if (kIsInt4) part_dot = fmaf(qsum, rows[u].scale.y, part_dot);
#pragma unroll
        for (int o = kLanesPerToken / 2; o > 0; o /= 2)
          part_dot += __shfl_xor_sync(0xffffffffu, part_dot, o);
        if (chunk == 0 && t < end) logits[g * partition_size + (t - start)] = part_dot;
      }
    }
  }
  __syncthreads();

  // 2. Softmax over the partition, one warp per query head.
  for (int g = warp; g < G; g += kWarps) {
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, logits[g * partition_size + i]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float s = 0.f;
    for (int i = lane; i < n; i += 32) {
      const float e = __expf(logits[g * partition_size + i] - m);
      logits[g * partition_size + i] = e;
      s += e;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) {
      s_max[g] = m;
      s_sum[g] = s;
    }
  }
  __syncthreads();

  // 3. Weighted sum of V rows, each read once for the whole group.
  float acc[G][kChunk];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < kChunk; ++i) acc[g][i] = 0.f;
  for (int t0 = start; t0 < end; t0 += kTokensPerIter * kUnroll) {
    Row rows[kUnroll];
    load_tile(rows, v_cache, table, t0 + warp * kTokensPerWarp + row_lane, end, block_shift,
              block_size, num_kv_heads, block_bytes, head, chunk);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * kTokensPerIter + warp * kTokensPerWarp + row_lane;
      if (t >= end) continue;
      float x[kChunk];
      chunk_raw(rows[u].bits, x);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) x[i] = fmaf(x[i], rows[u].scale.x, rows[u].scale.y);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float w = logits[g * partition_size + (t - start)];
#pragma unroll
        for (int i = 0; i < kChunk; ++i) acc[g][i] = fmaf(w, x[i], acc[g][i]);
      }
    }
  }
  // Sum over the rows of a warp (lanes with the same chunk), then over warps in order.
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
#pragma unroll
      for (int o = kLanesPerToken; o < 32; o *= 2)
        acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w && row_lane == 0) {
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          float* r = &reduce[g * HEAD_DIM + chunk * kChunk + i];
          *r = (w == 0 ? 0.f : *r) + acc[g][i];
        }
    }
    __syncthreads();
  }

  // 4. Out: normalized when the partition is the whole context, else partial for the merge.
  for (int e = threadIdx.x; e < G * HEAD_DIM; e += kThreads) {
    const int g = e / HEAD_DIM;
    const int d = e % HEAD_DIM;
    const long long qh = static_cast<long long>(seq) * num_heads + head * G + g;
    if (num_parts == 1) {
      out[qh * HEAD_DIM + d] = from_float(reduce[e] / s_sum[g]);
    } else {
      tmp_out[(qh * max_parts + part) * HEAD_DIM + d] = reduce[e];
    }
  }
  if (num_parts > 1 && threadIdx.x < G) {
    const long long qh = static_cast<long long>(seq) * num_heads + head * G + threadIdx.x;
    max_logits[qh * max_parts + part] = s_max[threadIdx.x];
    exp_sums[qh * max_parts + part] = s_sum[threadIdx.x];
  }
}

#include "decode_reduce.cuh"
