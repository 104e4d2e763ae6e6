// sampling.cu: logits processing and sampling on the device, one CTA per row of logits.
//
// The pipeline is the engine's (crates/engine/src/sampling.rs, Hugging Face's order):
// repetition penalty over the row's history, ids at or past `sample_vocab` masked, then
// greedy (temperature 0: the argmax, lowest id among equals) or: top-k (exactly the k highest
// logits, ties to the lower id), softmax at the temperature, top-p (the most likely tokens,
// highest first and lower id first among equals, until their mass reaches top_p of the
// total, the crossing token included), min-p (weights below min_p times the top weight
// dropped), and an inverse-CDF draw in id order at the row's uniform number, which the host
// draws from the completion's own random stream (so a seeded request draws the same numbers
// as on the CPU path).
//
// Determinism: every sum is of fixed-point integers (weights in [0, 1] scaled by 2^40) and
// every selection is by integer histograms or ordered scans, so a row gives the same token
// whatever the scheduling of threads. NaN logits are impossible, +inf the largest float.
//
// Compiled per activation type: SCALAR (0 = half, 1 = bfloat16), the logits' type.
#include "scalar.cuh"

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kMassScale = 1099511627776.f;  // 2^40
constexpr float kFltMax = 3.402823466e38f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// An unsigned key with the order of the float (larger float, larger key).
__device__ __forceinline__ unsigned key_of(float x) {
  const unsigned b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct Row {
  const scalar_t* logits;
  const unsigned* seen;  // history bitmap (shared memory)
  float penalty;
  int sample_vocab;
  // The processed logit of token i: penalty, mask, NaN as -inf, +inf as the largest float.
  __device__ __forceinline__ float value(int i) const { return process(i, to_float(logits[i])); }
  // The same for token i's raw logit x.
  __device__ __forceinline__ float process(int i, float x) const {
    if (i >= sample_vocab) return neg_inf();
    if (penalty != 1.f && ((seen[i >> 5] >> (i & 31)) & 1u)) {
      // fmaxf returns the other operand for NaN, as Rust's f32::max does on the CPU path.
      x = x > 0.f ? x / penalty : fmaxf(x * penalty, -kFltMax);
    }
    if (isnan(x)) return neg_inf();
    return fminf(x, kFltMax);
  }
};

// Calls f(i, row.value(i)) for every i < n, in no particular order, over the CTA: 16-byte loads
// of 8 logits, 2 per thread in flight, when the row is 16-byte aligned (one dependent load
// per 8 logits instead of per logit).
template <typename F>
__device__ __forceinline__ void for_each_value(const Row& row, int n, F f) {
  constexpr int kPer = 16 / sizeof(scalar_t), kUnroll = 2;
  int done = 0;
  if (reinterpret_cast<unsigned long long>(row.logits) % 16 == 0) {
    const int chunks = n / kPer;
    const uint4* p = reinterpret_cast<const uint4*>(row.logits);
    for (int c0 = threadIdx.x; c0 < chunks; c0 += kThreads * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * kThreads;
        if (c < chunks) v[u] = __ldg(p + c);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * kThreads;
        if (c < chunks) {
          const scalar_t* e = reinterpret_cast<const scalar_t*>(&v[u]);
#pragma unroll
          for (int j = 0; j < kPer; ++j) f(c * kPer + j, row.process(c * kPer + j, to_float(e[j])));
        }
      }
    }
    done = chunks * kPer;
  }
  for (int i = done + threadIdx.x; i < n; i += kThreads) f(i, row.value(i));
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const unsigned long long y = __shfl_xor_sync(kFull, v, o);
    v = y > v ? y : v;
  }
  return v;
}

// Sum (or max) over the CTA; every thread gets it. `scratch`: kWarps values.
__device__ unsigned long long block_sum(unsigned long long v, unsigned long long* scratch) {
  v = warp_sum(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  unsigned long long t = 0;
  for (int w = 0; w < kWarps; ++w) t += scratch[w];
  return t;
}

__device__ unsigned long long block_max(unsigned long long v, unsigned long long* scratch) {
  v = warp_max(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  unsigned long long t = 0;
  for (int w = 0; w < kWarps; ++w) t = scratch[w] > t ? scratch[w] : t;
  return t;
}

// Exclusive prefix sum over the threads in order; `total` gets the sum of all.
__device__ unsigned long long block_exclusive_scan(unsigned long long v,
                                                   unsigned long long* scratch,
                                                   unsigned long long* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned long long x = v;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const unsigned long long y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  unsigned long long before = 0, all = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += scratch[w];
    all += scratch[w];
  }
  *total = all;
  return before + x - v;
}

__device__ __forceinline__ unsigned long long mass_of(float w) {
  return static_cast<unsigned long long>(w * kMassScale);
}

// The candidate sets of a row, as thresholds: token i is kept when its key is above
// `key_k`, or equal with id <= `tie_k` (top-k), and likewise for top-p; and its weight is at
// least `min_w` (min-p).
struct Cut {
  unsigned key_k;
  int tie_k;
  unsigned key_p;
  int tie_p;
  float min_w;
};

__device__ __forceinline__ bool in_k(const Cut& c, unsigned key, int i) {
  return key > c.key_k || (key == c.key_k && i <= c.tie_k);
}
__device__ __forceinline__ bool in_p(const Cut& c, unsigned key, int i) {
  return key > c.key_p || (key == c.key_p && i <= c.tie_p);
}

// The id of the `need`-th token (1-based, in id order) with key == `key` among those `pred`
// keeps; n when there are fewer. Threads own contiguous chunks of ids.
template <typename Pred>
__device__ int tie_cutoff(const Row& row, int n, unsigned key, unsigned long long need, Pred pred,
                          unsigned long long* scratch, int* result) {
  const int chunk = (n + kThreads - 1) / kThreads;
  const int lo = min(n, static_cast<int>(threadIdx.x) * chunk), hi = min(n, lo + chunk);
  unsigned long long mine = 0;
  for (int i = lo; i < hi; ++i) {
    const float x = row.value(i);
    if (key_of(x) == key && pred(x, i)) ++mine;
  }
  if (threadIdx.x == 0) *result = n;
  unsigned long long total;
  const unsigned long long before = block_exclusive_scan(mine, scratch, &total);
  // (the scan's barriers order the write of *result above before the one below)
  if (before < need && need <= before + mine) {
    unsigned long long seen = before;
    for (int i = lo; i < hi; ++i) {
      const float x = row.value(i);
      if (key_of(x) == key && pred(x, i) && ++seen == need) {
        *result = i;
        break;
      }
    }
  }
  __syncthreads();
  return *result;
}

// Draws one token per row. grid (rows), block kThreads, dynamic shared memory
// 4 * ceil(vocab / 32) bytes (the history bitmap).
//   params: [rows][4] = temperature, top_p, min_p, repetition penalty
//   top_k: [rows] (0: all); uniform: [rows] in [0, 1)
//   history: ids of row r at history_ids[history_offsets[r] .. history_offsets[r + 1]]
//   out: [rows] token, -1 when the row has no finite logit
extern "C" __global__ void __launch_bounds__(kThreads)
    sample_rows(int* __restrict__ out, const scalar_t* __restrict__ logits,
                const float* __restrict__ params, const int* __restrict__ top_k,
                const double* __restrict__ uniform, const int* __restrict__ history_offsets,
                const int* __restrict__ history_ids, int vocab, int sample_vocab) {
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();
  extern __shared__ unsigned seen[];
  __shared__ unsigned long long scratch[kWarps];
  __shared__ unsigned long long hist[256];
  __shared__ int shared_int;
  __shared__ unsigned shared_key;
  __shared__ unsigned long long shared_rem;

  const int r = blockIdx.x;
  const int tid = threadIdx.x;
  const float temperature = params[4 * r], top_p = params[4 * r + 1];
  const float min_p = params[4 * r + 2], penalty = params[4 * r + 3];
  const int words = (vocab + 31) / 32;
  for (int w = tid; w < words; w += kThreads) seen[w] = 0u;
  __syncthreads();
  if (penalty != 1.f) {
    for (int j = history_offsets[r] + tid; j < history_offsets[r + 1]; j += kThreads) {
      const int id = history_ids[j];
      if (id >= 0 && id < vocab) atomicOr(&seen[id >> 5], 1u << (id & 31));
    }
  }
  __syncthreads();
  const Row row{logits + static_cast<long long>(r) * vocab, seen, penalty, sample_vocab};
  const int n = min(vocab, sample_vocab);
  const unsigned neg_inf_key = key_of(neg_inf());

  // The best token: highest key, lowest id among equals.
  unsigned long long best = 0;
  unsigned long long finite = 0;
  for_each_value(row, n, [&](int i, float x) {
    const unsigned key = key_of(x);
    const unsigned long long packed =
        (static_cast<unsigned long long>(key) << 32) | (0xffffffffu - static_cast<unsigned>(i));
    best = packed > best ? packed : best;
    finite += key != neg_inf_key;
  });
  best = block_max(best, scratch);
  finite = block_sum(finite, scratch);
  if (finite == 0) {
    if (tid == 0) out[r] = -1;
    return;
  }
  if (!(temperature > 0.f)) {
    if (tid == 0) out[r] = static_cast<int>(0xffffffffu - static_cast<unsigned>(best & 0xffffffffu));
    return;
  }
  const float max_logit = row.value(static_cast<int>(0xffffffffu - static_cast<unsigned>(best & 0xffffffffu)));

  // Top-k: the key of the k-th largest and how many of its ties (lowest ids) are kept.
  Cut cut{neg_inf_key, -1, neg_inf_key, -1, 0.f};  // every finite token
  const int k = top_k[r];
  if (k > 0 && static_cast<unsigned long long>(k) < finite) {
    unsigned prefix = 0, mask = 0;
    unsigned long long rem = static_cast<unsigned long long>(k);
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += kThreads) hist[b] = 0;
      __syncthreads();
      for_each_value(row, n, [&](int, float x) {
        const unsigned key = key_of(x);
        if (key != neg_inf_key && (key & mask) == prefix)
          atomicAdd(&hist[(key >> shift) & 255u], 1ull);
      });
      __syncthreads();
      if (tid == 0) {
        unsigned long long acc = 0;
        int b = 255;
        for (; b > 0; --b) {
          if (acc + hist[b] >= rem) break;
          acc += hist[b];
        }
        shared_int = b;
        shared_rem = rem - acc;
      }
      __syncthreads();
      prefix |= static_cast<unsigned>(shared_int) << shift;
      mask |= 255u << shift;
      rem = shared_rem;
      __syncthreads();
    }
    cut.key_k = prefix;
    cut.tie_k = tie_cutoff(
        row, n, prefix, rem, [](float, int) { return true; }, scratch, &shared_int);
  }

  // Softmax weights of the top-k candidates, as fixed-point masses.
  const float inv_t = 1.f / temperature;
  auto weight = [&](float x) { return __expf((x - max_logit) * inv_t); };
  unsigned long long total = 0;
  for_each_value(row, n, [&](int i, float x) {
    const unsigned key = key_of(x);
    if (key != neg_inf_key && in_k(cut, key, i)) total += mass_of(weight(x));
  });
  total = block_sum(total, scratch);

  // Top-p: the smallest set of the most likely tokens whose mass reaches top_p of the total.
  if (top_p < 1.f) {
    const unsigned long long target = static_cast<unsigned long long>(
        static_cast<double>(top_p) * static_cast<double>(total));
    unsigned prefix = 0, mask = 0;
    unsigned long long rem = target > 0 ? target : 1;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += kThreads) hist[b] = 0;
      __syncthreads();
      for_each_value(row, n, [&](int i, float x) {
        const unsigned key = key_of(x);
        if (key != neg_inf_key && in_k(cut, key, i) && (key & mask) == prefix)
          atomicAdd(&hist[(key >> shift) & 255u], mass_of(weight(x)));
      });
      __syncthreads();
      if (tid == 0) {
        unsigned long long acc = 0;
        int b = 255;
        for (; b > 0; --b) {
          if (hist[b] > 0 && acc + hist[b] >= rem) break;
          acc += hist[b];
        }
        shared_int = b;
        shared_rem = rem > acc ? rem - acc : 1;
      }
      __syncthreads();
      prefix |= static_cast<unsigned>(shared_int) << shift;
      mask |= 255u << shift;
      rem = shared_rem;
      __syncthreads();
    }
    // Ties at the crossing key all weigh the same: as many as reach the target, lowest ids.
    const float tie_x = __uint_as_float((prefix & 0x80000000u) ? (prefix & 0x7fffffffu) : ~prefix);
    const unsigned long long w = mass_of(weight(tie_x));
    const unsigned long long need = w > 0 ? (rem + w - 1) / w : ~0ull;
    cut.key_p = prefix;
    cut.tie_p = tie_cutoff(
        row, n, prefix, need,
        [&](float x, int i) { return in_k(cut, key_of(x), i); }, scratch, &shared_int);
  }

  // Min-p: the top weight is exp(0) = 1, always kept.
  cut.min_w = min_p;

  // Inverse CDF in id order over what is kept, at uniform * total kept mass.
  const int chunk = (n + kThreads - 1) / kThreads;
  const int lo = min(n, tid * chunk), hi = min(n, lo + chunk);
  auto kept_mass = [&](int i) -> unsigned long long {
    const float x = row.value(i);
    const unsigned key = key_of(x);
    if (key == neg_inf_key || !in_k(cut, key, i) || !in_p(cut, key, i)) return 0;
    const float w = weight(x);
    return w >= cut.min_w ? mass_of(w) : 0;
  };
  unsigned long long mine = 0;
  int last_mine = -1;
  for (int i = lo; i < hi; ++i) {
    const unsigned long long m = kept_mass(i);
    mine += m;
    if (m > 0) last_mine = i;
  }
  unsigned long long kept_total;
  const unsigned long long before = block_exclusive_scan(mine, scratch, &kept_total);
  const double u = uniform[r];
  unsigned long long target = static_cast<unsigned long long>(u * static_cast<double>(kept_total));
  if (target >= kept_total) target = kept_total > 0 ? kept_total - 1 : 0;
  if (tid == 0) shared_int = -1;
  __syncthreads();
  if (mine > 0 && before <= target && target < before + mine) {
    unsigned long long cum = before;
    for (int i = lo; i < hi; ++i) {
      cum += kept_mass(i);
      if (cum > target) {
        shared_int = i;
        break;
      }
    }
  }
  __syncthreads();
  int token = shared_int;
  if (token < 0) {
    // Nothing kept with mass (every weight under 2^-40 of the top): the last kept token, else
    // the best one.
    const unsigned long long last = block_max(static_cast<unsigned long long>(last_mine + 1), scratch);
    token = last > 0 ? static_cast<int>(last - 1)
                     : static_cast<int>(0xffffffffu - static_cast<unsigned>(best & 0xffffffffu));
  }
  if (tid == 0) out[r] = token;
}
