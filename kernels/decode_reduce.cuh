// decode_reduce.cuh: the merge of split-KV decode attention, shared by the decode kernels
// (paged_attention.cu, paged_attention_tc.cu), which write the same partial results:
// tmp_out [num_seqs][num_heads][max_parts][HEAD_DIM] (the partition's weighted sum of V rows,
// unnormalized, relative to its max logit), max_logits and exp_sums
// [num_seqs][num_heads][max_parts] (the max logit and the sum of exp(logit - max)).
//
// Two forms of the same arithmetic: out = sum_p w_p tmp_out_p / sum_p w_p exp_sums_p with
// w_p = exp(max_logits_p - max_p' max_logits_p') (partition_weight):
// - paged_decode_reduce, a second launch (the split kernel, paged_attention.cu);
// - GroupMerge, run by the last CTA of a (sequence, KV head) to finish inside the tensor-core
//   kernel (paged_attention_tc.cu), which defines KVS_NO_REDUCE_KERNEL: no second launch.
#pragma once
#include "common.cuh"

namespace kvserve {

// The weight of a partition whose max logit is `m` in a merge whose max is `gmax` (0 when
// nothing finite has been seen: no NaN from -inf - -inf).
__device__ __forceinline__ float partition_weight(float m, float gmax) {
  return gmax == -INFINITY ? 0.f : __expf(m - gmax);
}

// Loads of partial results written by other CTAs of the same launch: through L2 only
// (ld.global.cg: no L1 line filled before they were written can answer), and `volatile`, so
// the compiler keeps them after the atomic and fence that order them (it may move an asm
// without side effects). Predicated: when `live` is false nothing is read and `otherwise`
// (zeros for float4) comes back, so a batch of loads needs no branch.
__device__ __forceinline__ float load_l2(const float* p, bool live, float otherwise) {
  float x = otherwise;
  asm volatile(
      "{\n .reg .pred lp;\n setp.ne.b32 lp, %1, 0;\n @lp ld.global.cg.f32 %0, [%2];\n}\n"
      : "+f"(x)
      : "r"(static_cast<int>(live)), "l"(p));
  return x;
}

__device__ __forceinline__ float4 load_l2(const float4* p, bool live) {
  float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
  asm volatile(
      "{\n .reg .pred lp;\n setp.ne.b32 lp, %4, 0;\n"
      " @lp ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%5];\n}\n"
      : "+f"(x.x), "+f"(x.y), "+f"(x.z), "+f"(x.w)
      : "r"(static_cast<int>(live)), "l"(p));
  return x;
}

// threadIdx.x, blockIdx.x and blockIdx.y read anew (volatile): values computed from them
// before a kernel's main loop are then not kept in registers through that loop for the merge
// after it (at d = 128 that cost the main loop 6-12 registers, 7 -> 6 CTAs per SM for fp8).
__device__ __forceinline__ int fresh_tid() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
  return t;
}

__device__ __forceinline__ int fresh_ctaid_x() {
  int t;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(t));
  return t;
}

__device__ __forceinline__ int fresh_ctaid_y() {
  int t;
  asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(t));
  return t;
}

__device__ __forceinline__ int fresh_ctaid_z() {
  int t;
  asm volatile("mov.u32 %0, %%ctaid.z;\n" : "=r"(t));
  return t;
}

// The merge of every partition of one (sequence, KV head): the kGroup query heads
// qh0 .. qh0 + kGroup - 1 (rows of tmp_out etc.), num_parts >= 2 partitions, by one CTA of
// kThreads threads, all of which call run(). On the critical path (it starts when the last
// partition is done), so it is built for loads in flight:
// - statistics, per chunk of kPartsPerChunk partitions: warp w takes heads w, w + kWarps, ...;
//   each lane loads the (max, sum) of kPerLane partitions of each of its heads at once, then
//   shuffles give the chunk's max and weighted sum; the weights go to shared memory. Chunks
//   merge online (the running max moves: the sums so far are scaled by alpha), so any number
//   of partitions fits in fixed shared memory; up to kPartsPerChunk it is one pass.
// - weighted sums: the group's outputs as kCols float4 columns (head g, channels 4 j ..
//   4 j + 3), kColsPerThread per thread; with fewer columns than threads, kSlices threads share
//   a column (partitions interleaved) and add up through shared memory at the end. Each thread
//   keeps kLoads independent 16-byte loads in flight (kUnroll partitions of each of its
//   columns; the caller picks kLoads against its register budget), from one address per
//   column (the partitions' offsets are immediates).
// Checked thread by thread without a GPU: kernels/experiments/merge_emulation.py.
// `smem`: kSmemFloats floats of shared memory, 16-byte aligned, free for the merge.
template <int kThreads, int kGroup, int kLoads>
struct GroupMerge {
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kPerLane = 4;
  static constexpr int kPartsPerChunk = 32 * kPerLane;
  static constexpr int kWStride = kPartsPerChunk + 1;  // heads' weight rows in different banks
  static constexpr int kHeadsPerWarp = (kGroup + kWarps - 1) / kWarps;
  static constexpr int kQuads = HEAD_DIM / 4;
  static constexpr int kCols = kGroup * kQuads;
  static constexpr int kSlices = kCols >= kThreads ? 1 : kThreads / kCols;
  static constexpr int kColThreads = kThreads / kSlices;
  static constexpr int kColsPerThread = (kCols + kColThreads - 1) / kColThreads;
  static constexpr int kUnroll = kColsPerThread >= kLoads ? 1 : kLoads / kColsPerThread;
  // Shared memory: the slices' partial sums (float4, first: aligned), the weights, alpha and
  // the running totals per head.
  static constexpr int kSmemRed = 4 * kThreads;
  static constexpr int kSmemFloats = kSmemRed + kGroup * kWStride + 2 * kGroup;
  static_assert(kThreads % 32 == 0 && kGroup >= 1, "whole warps");
  static_assert(kSlices == 1 || kColsPerThread == 1, "slices share single columns");
  static_assert(kSlices * kColThreads == kThreads, "every thread has a slice");

  __device__ static void run(scalar_t* __restrict__ out, const float* __restrict__ tmp_out,
                             const float* __restrict__ max_logits,
                             const float* __restrict__ exp_sums, long long qh0, int num_parts,
                             int max_parts, float* smem) {
    float4* red_sh = reinterpret_cast<float4*>(smem);
    float* w_sh = smem + kSmemRed;  // [kGroup][kWStride]
    float* alpha_sh = w_sh + kGroup * kWStride;
    float* total_sh = alpha_sh + kGroup;
    const int tid = fresh_tid();
    const int warp = tid / 32, lane = tid % 32;

    // This thread's columns: float4 c % kQuads of head col_head[k], in slice `slice`.
    const int slice = tid / kColThreads;
    const int ct = tid % kColThreads;
    const float4* col_ptr[kColsPerThread];
    int col_head[kColsPerThread];
    bool col_live[kColsPerThread];
    float4 acc[kColsPerThread];
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      const int c = ct + k * kColThreads;
      col_live[k] = c < kCols;
      col_head[k] = col_live[k] ? c / kQuads : 0;
      col_ptr[k] = reinterpret_cast<const float4*>(
                       tmp_out + (qh0 + col_head[k]) * max_parts * HEAD_DIM) +
                   c % kQuads;
      acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    // Running max and total of this warp's heads (the same in every lane).
    float run_max[kHeadsPerWarp], run_total[kHeadsPerWarp];
#pragma unroll
    for (int i = 0; i < kHeadsPerWarp; ++i) {
      run_max[i] = -INFINITY;
      run_total[i] = 0.f;
    }

#pragma unroll 1
    for (int base = 0; base < num_parts; base += kPartsPerChunk) {
      const int n = min(kPartsPerChunk, num_parts - base);
      if (base > 0) __syncthreads();  // the previous chunk's weights and alphas are read
      // Statistics: every load first, then the shuffles.
      float m[kHeadsPerWarp][kPerLane], s[kHeadsPerWarp][kPerLane];
#pragma unroll
      for (int i = 0; i < kHeadsPerWarp; ++i) {
        const int g = warp + kWarps * i;
        // One address per head and array; the partitions' offsets are immediates.
        const long long at = (qh0 + (g < kGroup ? g : 0)) * max_parts + base + lane;
        const float* mp = max_logits + at;
        const float* sp = exp_sums + at;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          const bool live = g < kGroup && lane + 32 * k < n;
          m[i][k] = load_l2(mp + 32 * k, live, -INFINITY);
          s[i][k] = load_l2(sp + 32 * k, live, 0.f);
        }
      }
#pragma unroll
      for (int i = 0; i < kHeadsPerWarp; ++i) {
        const int g = warp + kWarps * i;
        if (g >= kGroup) continue;  // warp-uniform
        float cmax = m[i][0];
#pragma unroll
        for (int k = 1; k < kPerLane; ++k) cmax = fmaxf(cmax, m[i][k]);
#pragma unroll
        for (int o = 16; o > 0; o /= 2) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, o));
        const float new_max = fmaxf(run_max[i], cmax);
        const float alpha = partition_weight(run_max[i], new_max);
        float part = 0.f;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          const float w = partition_weight(m[i][k], new_max);  // 0 past the last partition
          part = fmaf(w, s[i][k], part);
          w_sh[g * kWStride + lane + 32 * k] = w;
        }
#pragma unroll
        for (int o = 16; o > 0; o /= 2) part += __shfl_xor_sync(0xffffffffu, part, o);
        run_total[i] = fmaf(run_total[i], alpha, part);
        run_max[i] = new_max;
        if (lane == 0) {
          alpha_sh[g] = alpha;
          total_sh[g] = run_total[i];
        }
      }
      __syncthreads();
      // Weighted sums of this chunk's partial outputs, kLoads loads in flight per thread.
#pragma unroll
      for (int k = 0; k < kColsPerThread; ++k) {
        const float a = alpha_sh[col_head[k]];
        acc[k].x *= a;
        acc[k].y *= a;
        acc[k].z *= a;
        acc[k].w *= a;
      }
#pragma unroll 1
      for (int j0 = slice; j0 < n; j0 += kSlices * kUnroll) {
        float4 v[kColsPerThread][kUnroll];
#pragma unroll
        for (int k = 0; k < kColsPerThread; ++k) {
          const float4* at = col_ptr[k] + static_cast<long long>(base + j0) * kQuads;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            v[k][u] = load_l2(at + u * kSlices * kQuads, col_live[k] && j0 + u * kSlices < n);
          }
        }
#pragma unroll
        for (int k = 0; k < kColsPerThread; ++k) {
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int p = j0 + u * kSlices;
            const float w = p < n ? w_sh[col_head[k] * kWStride + p] : 0.f;
            acc[k].x = fmaf(w, v[k][u].x, acc[k].x);
            acc[k].y = fmaf(w, v[k][u].y, acc[k].y);
            acc[k].z = fmaf(w, v[k][u].z, acc[k].z);
            acc[k].w = fmaf(w, v[k][u].w, acc[k].w);
          }
        }
      }
    }

    if constexpr (kSlices > 1) {
      if (slice > 0) red_sh[tid] = acc[0];
      __syncthreads();
      if (slice == 0) {
#pragma unroll
        for (int x = 1; x < kSlices; ++x) {
          const float4 r = red_sh[ct + x * kColThreads];
          acc[0].x += r.x;
          acc[0].y += r.y;
          acc[0].z += r.z;
          acc[0].w += r.w;
        }
      }
    }
    if (slice != 0) return;
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      if (!col_live[k]) continue;
      const float total = total_sh[col_head[k]];
      const float inv = total > 0.f ? 1.f / total : 0.f;
      scalar_t* o = out + (qh0 + col_head[k]) * HEAD_DIM + 4 * ((ct + k * kColThreads) % kQuads);
      o[0] = from_float(acc[k].x * inv);
      o[1] = from_float(acc[k].y * inv);
      o[2] = from_float(acc[k].z * inv);
      o[3] = from_float(acc[k].w * inv);
    }
  }
};

}  // namespace kvserve

#ifndef KVS_NO_REDUCE_KERNEL
// Merges the partitions of every (sequence, query head) with more than one.
// grid (num_heads, num_seqs), block HEAD_DIM threads (thread = channel).
//
// Latency-bound, so nothing waits on a chain of loads: the partitions' maxima are read in
// parallel (a block max), then per chunk of HEAD_DIM partitions their weights go to shared
// memory and each thread sums its channel of the chunk's partial outputs with 8 independent
// loads in flight (the first version walked the partitions one dependent load at a time:
// 10.8 us for 32 partitions on an H200).
extern "C" __global__ void __launch_bounds__(HEAD_DIM)
    paged_decode_reduce(scalar_t* __restrict__ out, const float* __restrict__ tmp_out,
                        const float* __restrict__ max_logits, const float* __restrict__ exp_sums,
                        const int* __restrict__ context_lens, int num_heads, int partition_size,
                        int max_parts, int window) {
  __shared__ float warp_max[HEAD_DIM / 32];
  __shared__ float weight[HEAD_DIM];
  __shared__ float weighted_sum[HEAD_DIM];
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const int qhead = blockIdx.x;
  const int seq = blockIdx.y;
  const int ctx = context_lens[seq];
  const int first = (window > 0 && ctx > window) ? ctx - window : 0;
  const int num_parts = (ctx - first + partition_size - 1) / partition_size;
  if (num_parts <= 1) return;
  const long long qh = static_cast<long long>(seq) * num_heads + qhead;
  const float* m = max_logits + qh * max_parts;
  const float* s = exp_sums + qh * max_parts;
  const int d = threadIdx.x;
  float gmax = -INFINITY;
  for (int p = d; p < num_parts; p += HEAD_DIM) gmax = fmaxf(gmax, m[p]);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) gmax = fmaxf(gmax, __shfl_xor_sync(0xffffffffu, gmax, o));
  if (d % 32 == 0) warp_max[d / 32] = gmax;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < HEAD_DIM / 32; ++w) gmax = fmaxf(gmax, warp_max[w]);
  float total = 0.f;
  float acc = 0.f;
  const float* t = tmp_out + qh * max_parts * HEAD_DIM + d;
  for (int base = 0; base < num_parts; base += HEAD_DIM) {
    const int n = min(HEAD_DIM, num_parts - base);
    __syncthreads();  // the previous chunk's weights are read
    if (d < n) {
      const float w = kvserve::partition_weight(m[base + d], gmax);
      weight[d] = w;
      weighted_sum[d] = w * s[base + d];
    }
    __syncthreads();
    const float* tb = t + static_cast<long long>(base) * HEAD_DIM;
    int j = 0;
    for (; j + 8 <= n; j += 8) {
      float v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = tb[(j + k) * HEAD_DIM];
#pragma unroll
      for (int k = 0; k < 8; ++k) acc = fmaf(weight[j + k], v[k], acc);
    }
    for (; j < n; ++j) acc = fmaf(weight[j], tb[j * HEAD_DIM], acc);
    for (int k = 0; k < n; ++k) total += weighted_sum[k];
  }
  out[qh * HEAD_DIM + d] = from_float(acc / total);
}
#endif  // KVS_NO_REDUCE_KERNEL
