// decode_reduce.cuh: the merge of split-KV decode attention, shared by the decode kernels
// (paged_attention.cu, paged_attention_tc.cu), which write the same partial results:
// tmp_out [num_seqs][num_heads][max_parts][HEAD_DIM] (the partition's weighted sum of V rows,
// unnormalized, relative to its max logit), max_logits and exp_sums
// [num_seqs][num_heads][max_parts] (the max logit and the sum of exp(logit - max)).
#pragma once
#include "common.cuh"

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
      const float w = __expf(m[base + d] - gmax);
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
