// cache.cu: writing new K/V rows into the paged cache (reshape_and_cache), quantizing on the
// fly with exactly the rules of kv-quant's CPU encoder (the reference; tests compare bytes), and
// the same write fused with the rotary embedding of q and k (rope_and_cache).
//
// grid (num_tokens, num_kv_heads): warp 0 of a CTA writes the K row, warp 1 the V row of one
// (token, KV head); rope_and_cache's further warps rotate query heads. Lane l holds channels
// [l * kPerLane, (l + 1) * kPerLane) of a row.
// q: [num_tokens][num_q_heads][HEAD_DIM], k, v: [num_tokens][num_kv_heads][HEAD_DIM]
// (scalar_t); slot_mapping [num_tokens] (int64, block * block_size + offset; negative = skip
// the token's K and V).
#include "cache_write.cuh"

using namespace kvserve;

extern "C" __global__ void __launch_bounds__(64)
    reshape_and_cache(unsigned char* __restrict__ k_cache, unsigned char* __restrict__ v_cache,
                      const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                      const long long* __restrict__ slot_mapping, int num_kv_heads,
                      int block_size, int block_shift, long long block_bytes) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const int token = blockIdx.x;
  const int head = blockIdx.y;
  const long long slot = slot_mapping[token];
  if (slot < 0) return;
  const int is_v = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const long long block = slot >> block_shift;
  const int offset = static_cast<int>(slot & (block_size - 1));
  const scalar_t* src = (is_v ? v : k) +
                        (static_cast<long long>(token) * num_kv_heads + head) * HEAD_DIM +
                        lane * kPerLane;
  float x[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) x[i] = to_float(src[i]);
  unsigned char* base = (is_v ? v_cache : k_cache) + block * block_bytes;
  write_row(base, head, offset, block_size, num_kv_heads, lane, x);
}

// Query-head warps of a rope_and_cache CTA at most (the launcher picks
// min(ceil(num_q_heads / num_kv_heads), kMaxQueryWarps)).
constexpr int kMaxQueryWarps = 8;

// rope followed by reshape_and_cache in one launch, with the same results bit for bit: q is
// rotated in place; k is rotated, rounded to scalar_t (as rope stores it) and written into the
// cache with v, while the k buffer itself is left as it was (attention reads K from the cache).
// grid (num_tokens, num_kv_heads), block 32 * (2 + query warps) threads: warp 0 the K row and
// warp 1 the V row of (token, KV head) blockIdx.y, as reshape_and_cache (nothing for a negative
// slot); the other warps rotate query heads blockIdx.y + j * num_kv_heads (j = 0, 1, ...; any
// num_q_heads works), one head per warp at a time, whatever the slot.
extern "C" __global__ void __launch_bounds__(32 * (2 + kMaxQueryWarps), 1)
    rope_and_cache(scalar_t* __restrict__ q, unsigned char* __restrict__ k_cache,
                   unsigned char* __restrict__ v_cache, const scalar_t* __restrict__ k,
                   const scalar_t* __restrict__ v, const int* __restrict__ positions,
                   const float* __restrict__ inv_freq, const long long* __restrict__ slot_mapping,
                   int num_q_heads, int num_kv_heads, int interleaved, int block_size,
                   int block_shift, long long block_bytes) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const int token = blockIdx.x;
  const int head = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float x[kPerLane];
  scalar_t y[kPerLane];
  if (warp >= 2) {
    const float pos = static_cast<float>(positions[token]);
    const int step = (blockDim.x / 32 - 2) * num_kv_heads;
    for (int h = head + (warp - 2) * num_kv_heads; h < num_q_heads; h += step) {
      scalar_t* row =
          q + (static_cast<long long>(token) * num_q_heads + h) * HEAD_DIM + lane * kPerLane;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) x[i] = to_float(row[i]);
      rotate_row(x, y, AngleOf{pos, inv_freq}, lane, interleaved);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) row[i] = y[i];
    }
    return;
  }
  const long long slot = slot_mapping[token];
  if (slot < 0) return;
  const int is_v = warp;
  const long long block = slot >> block_shift;
  const int offset = static_cast<int>(slot & (block_size - 1));
  const scalar_t* src = (is_v ? v : k) +
                        (static_cast<long long>(token) * num_kv_heads + head) * HEAD_DIM +
                        lane * kPerLane;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) x[i] = to_float(src[i]);
  if (!is_v) {
    rotate_row(x, y, AngleOf{static_cast<float>(positions[token]), inv_freq}, lane, interleaved);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) x[i] = to_float(y[i]);
  }
  unsigned char* base = (is_v ? v_cache : k_cache) + block * block_bytes;
  write_row(base, head, offset, block_size, num_kv_heads, lane, x);
}
