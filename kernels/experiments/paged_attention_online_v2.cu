// paged_attention.cu: decode attention over the paged, optionally quantized KV cache.
//
// One query token per sequence. Split-KV (flash-decoding): the context of a sequence is cut
// into partitions of `partition_size` tokens, one CTA per (KV head, sequence, partition), so a
// single long sequence still fills the GPU; a second kernel merges the partitions. GQA: a CTA
// owns one KV head and computes all GQA_GROUP query heads of its group, so each K and V row is
// read from memory once. Rows are found through the block table and dequantized in registers
// (kv_layout.cuh); softmax in f32 (base 2). A sliding window (window > 0) keeps the last
// `window` tokens of the context.
//
// One pass: a row is read by kLanesPerToken lanes (kChannels channels each, one vector load);
// each such lane group keeps its own online softmax (running max, sum, and accumulator) over
// the tokens it reads, so K and V rows of several tokens are in flight at once and no barrier
// separates the logits from the weighted sum. Lane groups, then warps, are merged at the end.
//
// Layouts (all contiguous): q, out [num_seqs][num_heads][HEAD_DIM] (scalar_t);
// block_tables [num_seqs][max_blocks] (int); context_lens [num_seqs] (int); k_cache,
// v_cache: num_blocks blocks of `block_bytes` each (one layer); tmp_out
// [num_seqs][num_heads][max_parts][HEAD_DIM], max_logits (base 2) and exp_sums
// [num_seqs][num_heads][max_parts] (float).
#include "common.cuh"

#ifndef GQA_GROUP
#error "GQA_GROUP must be defined"
#endif

namespace kvserve {

constexpr int G = GQA_GROUP;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// Channels per lane: a 16-byte load where the accumulator (G x channels floats) fits.
constexpr int kMaxByLoad = 32 / kChannelBytesX2;  // 8 (2-byte), 16 (1-byte), 32 (int4)
constexpr int kMaxByRegs = G <= 1 ? 32 : G <= 2 ? 16 : 8;
constexpr int kChannelsWanted = kMaxByLoad < kMaxByRegs ? kMaxByLoad : kMaxByRegs;
// At least 8 (whole words) and at most a row.
constexpr int kChannels = kChannelsWanted > HEAD_DIM ? HEAD_DIM : kChannelsWanted;
constexpr int kLanesPerToken = HEAD_DIM / kChannels;
static_assert(kChannels >= 8 && HEAD_DIM % kChannels == 0, "channels per lane");
static_assert(kLanesPerToken <= 32 && 32 % kLanesPerToken == 0, "lanes per token");
constexpr int kTokensPerWarp = 32 / kLanesPerToken;
constexpr int kTokensPerIter = kWarps * kTokensPerWarp;
constexpr int kUnroll = 4;  // rows (of K and of V) in flight per lane
// Resident CTAs per SM the register budget is cut for: 4 (at most 128 registers) unless the
// accumulator and q (2 x G x kChannels floats) need more.
constexpr int kMinBlocks = (G >= 5 || (G >= 2 && kChannels >= 16)) ? 2 : 4;
constexpr float kLog2e = 1.4426950408889634f;

typedef Chunk<kChannels> chunk_t;

struct Row {
  chunk_t bits;
  float2 scale;
};

// This lane's chunk of token `t`'s row in `cache` (zeros when `valid` is false).
__device__ __forceinline__ Row load_row(const unsigned char* __restrict__ cache,
                                        const int* __restrict__ table, int t, bool valid,
                                        int block_shift, int block_size, int num_kv_heads,
                                        long long block_bytes, int head, int chunk) {
  Row r;
  if (!valid) {
    r.bits = zero_chunk<kChannels>();
    r.scale = make_float2(0.f, 0.f);
    return r;
  }
  const int block = __ldg(table + (t >> block_shift));
  const int slot = t & (block_size - 1);
  const unsigned char* base = cache + static_cast<long long>(block) * block_bytes;
  r.bits = load_chunk<kChannels>(base + kv_value_offset(KV_DTYPE, block_size, HEAD_DIM, head, slot) +
                                 chunk * chunk_t::kBytes);
  r.scale = chunk_scale(
      base + kv_scale_offset(KV_DTYPE, block_size, num_kv_heads, HEAD_DIM, head, slot),
      chunk * kChannels);
  return r;
}

// Online-softmax state of one lane group, for every query head of the group.
struct State {
  float m[G];               // running max of the logits (base 2)
  float l[G];               // running sum of 2^(logit - m)
  float acc[G][kChannels];  // running sum of 2^(logit - m) * v, this lane's channels
};

// Folds `other` (m, l, acc) into `s`.
__device__ __forceinline__ void merge(State& s, const float (&om)[G], const float (&ol)[G],
                                      const float (&oacc)[G][kChannels]) {
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float m = fmaxf(s.m[g], om[g]);
    // exp2(-inf - -inf) would be NaN: an empty side contributes nothing.
    const float a = s.m[g] == -INFINITY ? 0.f : exp2f(s.m[g] - m);
    const float b = om[g] == -INFINITY ? 0.f : exp2f(om[g] - m);
    s.m[g] = m;
    s.l[g] = s.l[g] * a + ol[g] * b;
#pragma unroll
    for (int i = 0; i < kChannels; ++i) s.acc[g][i] = s.acc[g][i] * a + oacc[g][i] * b;
  }
}

}  // namespace kvserve

using namespace kvserve;

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks)
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
  const int head = blockIdx.x;  // KV head
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int ctx = context_lens[seq];
  const int first = (window > 0 && ctx > window) ? ctx - window : 0;
  const int num_parts = (ctx - first + partition_size - 1) / partition_size;
  if (part >= num_parts) return;
  const int start = first + part * partition_size;
  const int end = min(start + partition_size, ctx);

  const int num_heads = num_kv_heads * G;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int chunk = lane % kLanesPerToken;    // which channels of a row
  const int row_lane = lane / kLanesPerToken;  // which token of the warp's group
  const int* table = block_tables + static_cast<long long>(seq) * max_blocks;

  // This lane's channels of each query head of the group, pre-scaled to base-2 logits.
  float qr[G][kChannels];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const scalar_t* qh = q + (static_cast<long long>(seq) * num_heads + head * G + g) * HEAD_DIM +
                         chunk * kChannels;
#pragma unroll
    for (int i = 0; i < kChannels; ++i) qr[g][i] = to_float(qh[i]) * (softmax_scale * kLog2e);
  }

  State st;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    st.m[g] = -INFINITY;
    st.l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < kChannels; ++i) st.acc[g][i] = 0.f;
  }

  // The loop bound is uniform across the CTA (the shuffles below need every lane); tokens
  // past the end are masked.
  for (int base = start; base < end; base += kTokensPerIter * kUnroll) {
    const int t0 = base + warp * kTokensPerWarp + row_lane;
    // Issue every load of the tile (K and V rows) before using any.
    Row kr[kUnroll], vr[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * kTokensPerIter;
      kr[u] = load_row(k_cache, table, t, t < end, block_shift, block_size, num_kv_heads,
                       block_bytes, head, chunk);
      vr[u] = load_row(v_cache, table, t, t < end, block_shift, block_size, num_kv_heads,
                       block_bytes, head, chunk);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool valid = t0 + u * kTokensPerIter < end;
      float k[kChannels], v[kChannels];
      chunk_raw(kr[u].bits, k);
      chunk_raw(vr[u].bits, v);
#pragma unroll
      for (int i = 0; i < kChannels; ++i) v[i] = fmaf(v[i], vr[u].scale.x, vr[u].scale.y);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float dot = 0.f, qsum = 0.f;
#pragma unroll
        for (int i = 0; i < kChannels; ++i) {
          dot = fmaf(qr[g][i], k[i], dot);
          if (kIsInt4) qsum += qr[g][i];
        }
        float s = dot * kr[u].scale.x;
        if (kIsInt4) s = fmaf(qsum, kr[u].scale.y, s);
#pragma unroll
        for (int o = kLanesPerToken / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (!valid) continue;  // uniform within the lane group
        if (s > st.m[g]) {
          // A new maximum: rescale what was summed so far (rare after the first tokens).
          const float r = exp2f(st.m[g] - s);  // 0 for the first token (m = -inf)
          st.l[g] *= r;
#pragma unroll
          for (int i = 0; i < kChannels; ++i) st.acc[g][i] *= r;
          st.m[g] = s;
        }
        const float p = exp2f(s - st.m[g]);
        st.l[g] += p;
#pragma unroll
        for (int i = 0; i < kChannels; ++i) st.acc[g][i] = fmaf(p, v[i], st.acc[g][i]);
      }
    }
  }

  // Merge the lane groups of the warp (lanes with the same channels).
#pragma unroll
  for (int o = kLanesPerToken; o < 32; o *= 2) {
    float om[G], ol[G], oacc[G][kChannels];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      om[g] = __shfl_xor_sync(0xffffffffu, st.m[g], o);
      ol[g] = __shfl_xor_sync(0xffffffffu, st.l[g], o);
#pragma unroll
      for (int i = 0; i < kChannels; ++i)
        oacc[g][i] = __shfl_xor_sync(0xffffffffu, st.acc[g][i], o);
    }
    merge(st, om, ol, oacc);
  }

  // Merge the warps through shared memory: [warp][g] (m, l) and [warp][g][HEAD_DIM] acc.
  __shared__ float s_m[kWarps][G];
  __shared__ float s_l[kWarps][G];
  __shared__ float s_acc[kWarps][G][HEAD_DIM];
  if (row_lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int i = 0; i < kChannels; ++i) s_acc[warp][g][chunk * kChannels + i] = st.acc[g][i];
      if (chunk == 0) {
        s_m[warp][g] = st.m[g];
        s_l[warp][g] = st.l[g];
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * HEAD_DIM; e += kThreads) {
    const int g = e / HEAD_DIM;
    const int d = e % HEAD_DIM;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_m[w][g]);
    float l = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = s_m[w][g] == -INFINITY ? 0.f : exp2f(s_m[w][g] - m);
      l = fmaf(s_l[w][g], f, l);
      acc = fmaf(s_acc[w][g][d], f, acc);
    }
    const long long qh = static_cast<long long>(seq) * num_heads + head * G + g;
    if (num_parts == 1) {
      out[qh * HEAD_DIM + d] = from_float(acc / l);
    } else {
      tmp_out[(qh * max_parts + part) * HEAD_DIM + d] = acc;
      if (d == 0) {
        max_logits[qh * max_parts + part] = m;
        exp_sums[qh * max_parts + part] = l;
      }
    }
  }
}

// Merges the partitions of every (sequence, query head) with more than one.
// grid (num_heads, num_seqs), block HEAD_DIM threads.
extern "C" __global__ void __launch_bounds__(HEAD_DIM)
    paged_decode_reduce(scalar_t* __restrict__ out, const float* __restrict__ tmp_out,
                        const float* __restrict__ max_logits, const float* __restrict__ exp_sums,
                        const int* __restrict__ context_lens, int num_heads, int partition_size,
                        int max_parts, int window) {
  const int qhead = blockIdx.x;
  const int seq = blockIdx.y;
  const int ctx = context_lens[seq];
  const int first = (window > 0 && ctx > window) ? ctx - window : 0;
  const int num_parts = (ctx - first + partition_size - 1) / partition_size;
  if (num_parts <= 1) return;
  const long long qh = static_cast<long long>(seq) * num_heads + qhead;
  const float* m = max_logits + qh * max_parts;
  const float* s = exp_sums + qh * max_parts;
  float gmax = -INFINITY;
  for (int p = 0; p < num_parts; ++p) gmax = fmaxf(gmax, m[p]);
  float total = 0.f;
  float acc = 0.f;
  const int d = threadIdx.x;
  for (int p = 0; p < num_parts; ++p) {
    const float w = exp2f(m[p] - gmax);
    total = fmaf(w, s[p], total);
    acc = fmaf(w, tmp_out[(qh * max_parts + p) * HEAD_DIM + d], acc);
  }
  out[qh * HEAD_DIM + d] = from_float(acc / total);
}
