// elementwise.cu: the per-token layers of a Llama step around the GEMMs and attention:
// embedding gather, residual add fused with RMSNorm, rotary embedding, SiLU(gate) * up.
//
// Compiled per activation type: SCALAR (0 = half, 1 = bfloat16). The residual stream is f32
// (so the sum of many layers does not accumulate bf16 rounding); everything else is scalar_t.
#include "scalar.cuh"

constexpr int kThreads = 256;
// RMSNorm: up to 1024 threads per row (the launcher sizes the CTA to the row), each keeping
// kNormPer values in registers between the sum of squares and the scaling, so every load
// is issued at once instead of one dependent round trip per loop iteration.
constexpr int kNormThreads = 1024;
constexpr int kNormPer = 8;

// Sum over the CTA (blockDim.x threads, a multiple of 32); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) t += partial[w];
    total = t;
  }
  __syncthreads();
  return total;
}

// residual[t] = table[ids[t] - start] (f32) when start <= ids[t] < start + rows, else 0: the
// table holds token ids start..start + rows (the whole vocabulary, or a tensor-parallel rank's
// rows of it; the ranks' zeros and rows then sum to the embedding). grid (num_tokens), block
// kThreads.
extern "C" __global__ void __launch_bounds__(kThreads)
    embedding_gather(float* __restrict__ residual, const scalar_t* __restrict__ table,
                     const int* __restrict__ ids, int hidden, int start, int rows) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const long long t = blockIdx.x;
  const int r = ids[t] - start;
  float* out = residual + t * hidden;
  if (r < 0 || r >= rows) {
    for (int i = threadIdx.x; i < hidden; i += kThreads) out[i] = 0.f;
    return;
  }
  const scalar_t* row = table + static_cast<long long>(r) * hidden;
  for (int i = threadIdx.x; i < hidden; i += kThreads) out[i] = to_float(row[i]);
}

// The vocab-parallel LM head's all-gathered logits, src [world][n][per_rank] (rank-major, each
// rank's rows padded to per_rank), into out [n][vocab]: rank r's first len_r values of row j
// land at out[j][start_r..], with start_r = r * vocab / world (Shard::vocab_range).
// grid (n, world), block kThreads.
extern "C" __global__ void __launch_bounds__(kThreads)
    unshard_vocab(scalar_t* __restrict__ out, const scalar_t* __restrict__ src, int n,
                  int per_rank, int vocab) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const long long j = blockIdx.x, r = blockIdx.y, world = gridDim.y;
  const long long start = r * vocab / world, end = (r + 1) * vocab / world;
  const scalar_t* from = src + (r * n + j) * per_rank;
  scalar_t* to = out + j * vocab + start;
  for (long long i = threadIdx.x; i < end - start; i += kThreads) to[i] = from[i];
}

// residual[t] += delta[t] (when delta is not null), then
// out[t] = weight * residual[t] / sqrt(mean(residual[t]^2) + eps). Values i = tid + j * blockDim
// for j < kNormPer stay in registers; rows longer than kNormPer * blockDim re-read the rest.
__device__ __forceinline__ void norm_row(scalar_t* __restrict__ out, float* __restrict__ residual,
                                         const scalar_t* __restrict__ delta,
                                         const scalar_t* __restrict__ weight, int hidden,
                                         float eps) {
  const long long base = static_cast<long long>(blockIdx.x) * hidden;
  const int tid = threadIdx.x, n = blockDim.x;
  float v[kNormPer];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kNormPer; ++j) {
    const int i = tid + j * n;
    v[j] = i < hidden ? residual[base + i] : 0.f;
  }
  if (delta != nullptr) {
#pragma unroll
    for (int j = 0; j < kNormPer; ++j) {
      const int i = tid + j * n;
      if (i < hidden) {
        v[j] += to_float(delta[base + i]);
        residual[base + i] = v[j];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kNormPer; ++j) ss = fmaf(v[j], v[j], ss);
  for (int i = tid + kNormPer * n; i < hidden; i += n) {
    float r = residual[base + i];
    if (delta != nullptr) {
      r += to_float(delta[base + i]);
      residual[base + i] = r;
    }
    ss = fmaf(r, r, ss);
  }
  const float inv = rsqrtf(block_sum(ss) / hidden + eps);
#pragma unroll
  for (int j = 0; j < kNormPer; ++j) {
    const int i = tid + j * n;
    if (i < hidden) out[base + i] = from_float(to_float(weight[i]) * (v[j] * inv));
  }
  for (int i = tid + kNormPer * n; i < hidden; i += n)
    out[base + i] = from_float(to_float(weight[i]) * (residual[base + i] * inv));
}

// out[t] = RMSNorm(residual[t]) * weight. grid (num_tokens), block a multiple of 32 up to
// kNormThreads.
extern "C" __global__ void __launch_bounds__(kNormThreads)
    rms_norm(scalar_t* __restrict__ out, float* __restrict__ residual,
             const scalar_t* __restrict__ weight, int hidden, float eps) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  norm_row(out, residual, nullptr, weight, hidden, eps);
}

// residual[t] += delta[t]; out[t] = RMSNorm(residual[t]) * weight. grid (num_tokens), block a
// multiple of 32 up to kNormThreads.
extern "C" __global__ void __launch_bounds__(kNormThreads)
    add_rms_norm(scalar_t* __restrict__ out, float* __restrict__ residual,
                 const scalar_t* __restrict__ delta, const scalar_t* __restrict__ weight,
                 int hidden, float eps) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  norm_row(out, residual, delta, weight, hidden, eps);
}

// Rotates every head of q ([T][num_q_heads][head_dim]) and k ([T][num_kv_heads][head_dim]) in
// place by position * inv_freq[i] for each pair i: pairs (2i, 2i + 1) when interleaved, else
// (i, i + head_dim / 2). grid (num_tokens, num_q_heads + num_kv_heads), block head_dim / 2
// threads (one pair each; a CTA per head keeps every load of a step in flight at once).
extern "C" __global__ void __launch_bounds__(kThreads)
    rope(scalar_t* __restrict__ q, scalar_t* __restrict__ k, const int* __restrict__ positions,
         const float* __restrict__ inv_freq, int num_q_heads, int num_kv_heads, int head_dim,
         int interleaved) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const long long t = blockIdx.x;
  const int h = blockIdx.y;
  const int half = head_dim / 2;
  const float pos = static_cast<float>(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    scalar_t* x = h < num_q_heads ? q + (t * num_q_heads + h) * head_dim
                                  : k + (t * num_kv_heads + (h - num_q_heads)) * head_dim;
    const int a = interleaved ? 2 * i : i;
    const int b = interleaved ? 2 * i + 1 : i + half;
    const float2 r = rotate_pair(to_float(x[a]), to_float(x[b]), pos, inv_freq[i]);
    x[a] = from_float(r.x);
    x[b] = from_float(r.y);
  }
}

// out[t][i] = SiLU(gate_up[t][i]) * gate_up[t][inter + i]. grid (num_tokens, ceil(inter /
// (kThreads * kSiluVec))), block kThreads: each thread kSiluVec values through one 16-byte load
// of each half and one store (the launcher checks inter % kSiluVec == 0; silu_mul_scalar
// otherwise). A CTA per token alone left a decode step of 32 tokens 32 CTAs on 132 SMs, each
// thread walking the row with 2-byte loads: 33 us a layer on an H200 for 2.7 MB moved.
constexpr int kSiluVec = 16 / sizeof(scalar_t);

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.f + __expf(-g)) * u; }

extern "C" __global__ void __launch_bounds__(kThreads)
    silu_mul(scalar_t* __restrict__ out, const scalar_t* __restrict__ gate_up, int inter) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const long long t = blockIdx.x;
  const int i = (blockIdx.y * kThreads + threadIdx.x) * kSiluVec;
  if (i >= inter) return;
  const scalar_t* g = gate_up + t * 2 * inter;
  const uint4 gv = *reinterpret_cast<const uint4*>(g + i);
  const uint4 uv = *reinterpret_cast<const uint4*>(g + inter + i);
  const scalar_t* gs = reinterpret_cast<const scalar_t*>(&gv);
  const scalar_t* us = reinterpret_cast<const scalar_t*>(&uv);
  uint4 ov;
  scalar_t* os = reinterpret_cast<scalar_t*>(&ov);
#pragma unroll
  for (int k = 0; k < kSiluVec; ++k) os[k] = from_float(silu_times(to_float(gs[k]), to_float(us[k])));
  *reinterpret_cast<uint4*>(out + t * inter + i) = ov;
}

// Splits the fused Q/K/V product of a step: q[t] = qkv[t][0, nq), k[t] = qkv[t][nq, nq + nkv),
// v[t] = qkv[t][nq + nkv, nq + 2 nkv), each plus its part of `bias` (the same stacked layout)
// when `bias` is not null. grid (num_tokens, ceil((nq + 2 nkv) / (kThreads * kSiluVec))), block
// kThreads: kSiluVec values per thread through 16-byte accesses (nq and nkv are multiples of
// kSiluVec: the launcher checks, so no vector straddles two outputs).
extern "C" __global__ void __launch_bounds__(kThreads)
    split_qkv(scalar_t* __restrict__ q, scalar_t* __restrict__ k, scalar_t* __restrict__ v,
              const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ bias, int nq,
              int nkv) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const long long t = blockIdx.x;
  const int width = nq + 2 * nkv;
  const int i = (blockIdx.y * kThreads + threadIdx.x) * kSiluVec;
  if (i >= width) return;
  uint4 x = *reinterpret_cast<const uint4*>(qkv + t * width + i);
  if (bias != nullptr) {
    const uint4 b = *reinterpret_cast<const uint4*>(bias + i);
    scalar_t* xs = reinterpret_cast<scalar_t*>(&x);
    const scalar_t* bs = reinterpret_cast<const scalar_t*>(&b);
#pragma unroll
    for (int j = 0; j < kSiluVec; ++j) xs[j] = from_float(to_float(xs[j]) + to_float(bs[j]));
  }
  scalar_t* dst;
  if (i < nq) {
    dst = q + t * nq + i;
  } else if (i < nq + nkv) {
    dst = k + t * nkv + (i - nq);
  } else {
    dst = v + t * nkv + (i - nq - nkv);
  }
  *reinterpret_cast<uint4*>(dst) = x;
}

// As silu_mul, one value per thread (any inter). grid (num_tokens, ceil(inter / kThreads)).
extern "C" __global__ void __launch_bounds__(kThreads)
    silu_mul_scalar(scalar_t* __restrict__ out, const scalar_t* __restrict__ gate_up, int inter) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const long long t = blockIdx.x;
  const int i = blockIdx.y * kThreads + threadIdx.x;
  if (i >= inter) return;
  const scalar_t* g = gate_up + t * 2 * inter;
  out[t * inter + i] = from_float(silu_times(to_float(g[i]), to_float(g[inter + i])));
}


// out[j] = src[rows[j]], rows of `width` values. grid (num_rows), block kThreads.
extern "C" __global__ void __launch_bounds__(kThreads)
    gather_rows(scalar_t* __restrict__ out, const scalar_t* __restrict__ src,
                const int* __restrict__ rows, int width) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const long long j = blockIdx.x;
  const scalar_t* row = src + static_cast<long long>(rows[j]) * width;
  for (int i = threadIdx.x; i < width; i += kThreads) out[j * width + i] = row[i];
}

// out[i] = lo + (hi - lo) * u_i, u_i uniform in [0, 1) from a hash of (seed, i): dummy weights
// of a real shape, generated on the device (like vLLM's load_format=dummy). Grid-stride.
extern "C" __global__ void __launch_bounds__(kThreads)
    fill_uniform(scalar_t* __restrict__ out, long long n, unsigned long long seed, float lo,
                 float hi) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const long long stride = static_cast<long long>(gridDim.x) * kThreads;
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += stride) {
    // splitmix64 of seed + i.
    unsigned long long z = seed + static_cast<unsigned long long>(i) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.f / 16777216.f);
    out[i] = from_float(lo + (hi - lo) * u);
  }
}

// Copy-on-write block copies within one cache: block pairs[2j] -> block pairs[2j + 1], whole
// blocks of `block_bytes` (16-byte vectors when that divides it). grid (num_pairs), block
// kThreads. Pairs must not chain within a call (no destination is also a source).
extern "C" __global__ void __launch_bounds__(kThreads)
    copy_blocks(unsigned char* __restrict__ cache, const long long* __restrict__ pairs,
                long long block_bytes) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const long long src = pairs[2 * blockIdx.x] * block_bytes;
  const long long dst = pairs[2 * blockIdx.x + 1] * block_bytes;
  if (block_bytes % 16 == 0) {
    const int4* s = reinterpret_cast<const int4*>(cache + src);
    int4* d = reinterpret_cast<int4*>(cache + dst);
    for (long long i = threadIdx.x; i < block_bytes / 16; i += kThreads) d[i] = s[i];
  } else {
    for (long long i = threadIdx.x; i < block_bytes; i += kThreads) cache[dst + i] = cache[src + i];
  }
}

// x[t] += bias for every token t (Qwen2's Q/K/V biases). grid (num_tokens), block kThreads.
extern "C" __global__ void __launch_bounds__(kThreads)
    add_bias(scalar_t* __restrict__ x, const scalar_t* __restrict__ bias, int width) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  const long long t = blockIdx.x;
  for (int i = threadIdx.x; i < width; i += kThreads)
    x[t * width + i] = from_float(to_float(x[t * width + i]) + to_float(bias[i]));
}
