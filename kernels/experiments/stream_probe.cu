// stream_probe.cu: how fast can the decode kernel's access pattern stream a paged KV cache,
// with no attention arithmetic? An experiment (kernels/NOTES.md), not part of the crate:
//
//   nvcc -O3 -arch=sm_90a -o /tmp/stream_probe kernels/experiments/stream_probe.cu && /tmp/stream_probe
//
// The cache is laid out as kv-quant's bf16 layout with the Llama-3-8B decode shape: blocks of
// 16 tokens, 8 KV heads, head_dim 128: per block and head 4 KiB of K and 4 KiB of V. One CTA
// per (KV head, sequence, partition of 1,024 tokens), as paged_decode_tc's plan picks at
// 16 x 4K and 64 x 4K; each warp streams its own 16-token tiles (K and V of one block and
// head), the warps of a CTA interleaving tiles. Loaders:
//   cpasync  cp.async.cg 16 B per lane (the decode kernel's), S stages per warp;
//   bulk     cp.async.bulk (TMA, 1-D) of each 4 KiB row block, lane 0 issuing, an mbarrier per
//            stage, S stages per warp;
//   bulk-rows  one 256-byte bulk copy per token row (lanes 0..15), into padded rows;
//   ldg      16-byte loads into registers (no shared memory), two tiles in flight per warp.
// Each tile is "used" by summing one word per lane (so nothing is optimized away), so the
// figures are the loaders' ceilings for this pattern. Reported: median of 20 launches, TB/s of
// K + V bytes, next to a device-to-device cudaMemcpy (read + write bytes / time).
#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>
#endif

#define CHECK(x)                                                                    \
  do {                                                                              \
    cudaError_t e = (x);                                                            \
    if (e != cudaSuccess) {                                                         \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

constexpr int kHeads = 8, kBlock = 16, kRow = 256;    // bytes per token row (d 128 bf16)
constexpr int kTileBytes = kBlock * kRow;             // 4 KiB: one block of one head
constexpr long long kBlockBytes = 1LL * kHeads * kTileBytes;  // 32 KiB per block (K or V)
constexpr int kBlocksPerSeq = 4096 / kBlock;          // 4K context

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Tile i of this warp: block index within the sequence.
__device__ __forceinline__ int tile_block(int part, int part_tiles, int warp, int warps, int i) {
  return part * part_tiles + warp + i * warps;
}

template <int S>
__global__ void probe_cpasync(const unsigned char* __restrict__ k, const unsigned char* __restrict__ v,
                              const int* __restrict__ table, float* out, int warps, int part_tiles) {
  extern __shared__ __align__(128) unsigned char sm[];
  const int head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* my = sm + static_cast<size_t>(warp) * S * 2 * kTileBytes;
  const int tiles = part_tiles / warps;
  auto issue = [&](int i) {
    const int blk = table[seq * kBlocksPerSeq + tile_block(part, part_tiles, warp, warps, i)];
    const long long base = blk * kBlockBytes + head * kTileBytes;
    unsigned char* dk = my + (i % S) * 2 * kTileBytes;
    unsigned char* dv = dk + kTileBytes;
#pragma unroll
    for (int c = 0; c < kTileBytes / 16 / 32; ++c) {
      const int off = (lane + 32 * c) * 16;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dk + off)), "l"(k + base + off));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dv + off)), "l"(v + base + off));
    }
  };
  float acc = 0.f;
  for (int i = 0; i < S - 1 && i < tiles; ++i) {
    issue(i);
    asm volatile("cp.async.commit_group;\n");
  }
  for (int i = 0; i < tiles; ++i) {
    if (i + S - 1 < tiles) issue(i + S - 1);
    asm volatile("cp.async.commit_group;\n");
    asm volatile("cp.async.wait_group %0;\n" ::"n"(S - 1));
    __syncwarp();
    const unsigned char* t = my + (i % S) * 2 * kTileBytes;
    acc += reinterpret_cast<const float*>(t)[lane * 31] + reinterpret_cast<const float*>(t + kTileBytes)[lane * 29];
    __syncwarp();
  }
  if (acc == 12345.f) out[0] = acc;
}

// mbarrier and 1-D bulk-copy (TMA) wrappers, sm_90.
__device__ __forceinline__ void mbar_init_all(unsigned long long* bars, int n) {
  for (int s = 0; s < n; ++s) asm volatile("mbarrier.init.shared.b64 [%0], 1;\n" ::"r"(smem_addr(&bars[s])));
  asm volatile("fence.mbarrier_init.release.cluster;\n");
}
__device__ __forceinline__ void mbar_expect(unsigned b, unsigned bytes) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared.b64 st, [%0], %1;\n}\n" ::"r"(b), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, unsigned b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(b)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned b, unsigned parity) {
  unsigned done = 0;
  while (!done) {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(b), "r"(parity)
                 : "memory");
  }
}

template <int S>
__global__ void probe_bulk(const unsigned char* __restrict__ k, const unsigned char* __restrict__ v,
                           const int* __restrict__ table, float* out, int warps, int part_tiles) {
  extern __shared__ __align__(128) unsigned char sm[];
  __shared__ __align__(8) unsigned long long bar[8][S];
  const int head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* my = sm + static_cast<size_t>(warp) * S * 2 * kTileBytes;
  const int tiles = part_tiles / warps;
  if (lane == 0) mbar_init_all(bar[warp], S);
  __syncwarp();
  auto issue = [&](int i) {
    if (lane != 0) return;
    const int blk = table[seq * kBlocksPerSeq + tile_block(part, part_tiles, warp, warps, i)];
    const long long base = blk * kBlockBytes + head * kTileBytes;
    unsigned char* dk = my + (i % S) * 2 * kTileBytes;
    const unsigned b = smem_addr(&bar[warp][i % S]);
    mbar_expect(b, 2 * kTileBytes);
    bulk_copy(dk, k + base, kTileBytes, b);
    bulk_copy(dk + kTileBytes, v + base, kTileBytes, b);
  };
  float acc = 0.f;
  for (int i = 0; i < S - 1 && i < tiles; ++i) issue(i);
  for (int i = 0; i < tiles; ++i) {
    if (i + S - 1 < tiles) issue(i + S - 1);
    mbar_wait(smem_addr(&bar[warp][i % S]), (i / S) & 1);
    const unsigned char* t = my + (i % S) * 2 * kTileBytes;
    acc += reinterpret_cast<const float*>(t)[lane * 31] + reinterpret_cast<const float*>(t + kTileBytes)[lane * 29];
    __syncwarp();  // every lane has read the stage before lane 0 refills it
  }
  if (acc == 12345.f) out[0] = acc;
}

// As probe_bulk, but one 256-byte bulk copy per token row, into rows padded to 272 bytes (the
// decode kernel's conflict-free layout): lanes 0..15 each copy their row of K and of V.
constexpr int kPadRow = kRow + 16;
constexpr int kPadTile = kBlock * kPadRow;

template <int S>
__global__ void probe_bulkrow(const unsigned char* __restrict__ k, const unsigned char* __restrict__ v,
                              const int* __restrict__ table, float* out, int warps, int part_tiles) {
  extern __shared__ __align__(128) unsigned char sm[];
  __shared__ __align__(8) unsigned long long bar[8][S];
  const int head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* my = sm + static_cast<size_t>(warp) * S * 2 * kPadTile;
  const int tiles = part_tiles / warps;
  if (lane == 0) mbar_init_all(bar[warp], S);
  __syncwarp();
  auto issue = [&](int i) {
    const unsigned b = smem_addr(&bar[warp][i % S]);
    if (lane == 0) {
      mbar_expect(b, 2 * kTileBytes);
    }
    __syncwarp();
    if (lane < kBlock) {
      const int blk = table[seq * kBlocksPerSeq + tile_block(part, part_tiles, warp, warps, i)];
      const long long src = blk * kBlockBytes + head * kTileBytes + lane * kRow;
      unsigned char* dk = my + (i % S) * 2 * kPadTile + lane * kPadRow;
      bulk_copy(dk, k + src, kRow, b);
      bulk_copy(dk + kPadTile, v + src, kRow, b);
    }
  };
  float acc = 0.f;
  for (int i = 0; i < S - 1 && i < tiles; ++i) issue(i);
  for (int i = 0; i < tiles; ++i) {
    if (i + S - 1 < tiles) issue(i + S - 1);
    mbar_wait(smem_addr(&bar[warp][i % S]), (i / S) & 1);
    const unsigned char* t = my + (i % S) * 2 * kPadTile;
    acc += reinterpret_cast<const float*>(t)[lane * 31] + reinterpret_cast<const float*>(t + kPadTile)[lane * 29];
    __syncwarp();
  }
  if (acc == 12345.f) out[0] = acc;
}

__global__ void probe_ldg(const unsigned char* __restrict__ k, const unsigned char* __restrict__ v,
                          const int* __restrict__ table, float* out, int warps, int part_tiles) {
  const int head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tiles = part_tiles / warps;
  float acc = 0.f;
  for (int i = 0; i < tiles; i += 2) {
    uint4 x[2][2][kTileBytes / 16 / 32];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int blk = table[seq * kBlocksPerSeq + tile_block(part, part_tiles, warp, warps, min(i + j, tiles - 1))];
      const long long base = blk * kBlockBytes + head * kTileBytes;
#pragma unroll
      for (int c = 0; c < kTileBytes / 16 / 32; ++c) {
        const int off = (lane + 32 * c) * 16;
        x[j][0][c] = __ldcs(reinterpret_cast<const uint4*>(k + base + off));
        x[j][1][c] = __ldcs(reinterpret_cast<const uint4*>(v + base + off));
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int c = 0; c < kTileBytes / 16 / 32; ++c) acc += __int_as_float(x[j][0][c].x ^ x[j][1][c].w);
  }
  if (acc == 12345.f) out[0] = acc;
}

#ifdef __CUDACC_RTC__
template __global__ void probe_cpasync<2>(const unsigned char*, const unsigned char*, const int*, float*, int, int);
template __global__ void probe_cpasync<4>(const unsigned char*, const unsigned char*, const int*, float*, int, int);
template __global__ void probe_bulk<2>(const unsigned char*, const unsigned char*, const int*, float*, int, int);
template __global__ void probe_bulk<4>(const unsigned char*, const unsigned char*, const int*, float*, int, int);
template __global__ void probe_bulkrow<2>(const unsigned char*, const unsigned char*, const int*, float*, int, int);
#else
using Kernel = void (*)(const unsigned char*, const unsigned char*, const int*, float*, int, int);

static float time_us(Kernel kern, dim3 grid, int warps, int part_tiles, size_t smem, const unsigned char* k,
                     const unsigned char* v, const int* table, float* out) {
  if (smem > 0) {
    CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int r = 0; r < 23; ++r) {
    CHECK(cudaEventRecord(a));
    kern<<<grid, 32 * warps, smem>>>(k, v, table, out, warps, part_tiles);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaGetLastError());
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (r >= 3) t.push_back(ms * 1e3f);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const int max_seqs = 64;
  const long long cache = 1LL * max_seqs * kBlocksPerSeq * kBlockBytes;
  unsigned char *k, *v, *src, *dst;
  int* table;
  float* out;
  CHECK(cudaMalloc(&k, cache));
  CHECK(cudaMalloc(&v, cache));
  CHECK(cudaMemset(k, 0, cache));
  CHECK(cudaMemset(v, 0, cache));
  CHECK(cudaMalloc(&out, 4));
  std::vector<int> h(max_seqs * kBlocksPerSeq);
  for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<int>(i);
  CHECK(cudaMalloc(&table, h.size() * 4));
  CHECK(cudaMemcpy(table, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  {
    const size_t n = 2ull << 30;
    CHECK(cudaMalloc(&src, n));
    CHECK(cudaMalloc(&dst, n));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    std::vector<float> t;
    for (int r = 0; r < 9; ++r) {
      CHECK(cudaEventRecord(a));
      CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice));
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    std::printf("copy: %.3f TB/s (read + write)\n", 2.0 * n / (t[4] * 1e-3) / 1e12);
    CHECK(cudaFree(src));
    CHECK(cudaFree(dst));
  }
  std::printf("| seqs | partition | loader | warps/CTA | stages | smem KiB/CTA | us | TB/s |\n| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n");
  for (int seqs : {16, 64}) {
    for (int part_tokens : {1024, 512, 256}) {
      const int part_tiles = part_tokens / kBlock;
      const dim3 grid(kHeads, seqs, 4096 / part_tokens);
      const double bytes = 2.0 * seqs * kBlocksPerSeq * kBlockBytes;
      auto report = [&](const char* name, int warps, int stages, size_t smem, float us) {
        std::printf("| %d | %d | %s | %d | %d | %zu | %.1f | %.2f |\n", seqs, part_tokens, name, warps, stages,
                    smem / 1024, us, bytes / (us * 1e-6) / 1e12);
      };
      for (int warps : {2, 4}) {
        const struct {
          int s;
          Kernel c, b, r;
        } variants[] = {{2, probe_cpasync<2>, probe_bulk<2>, probe_bulkrow<2>},
                        {4, probe_cpasync<4>, probe_bulk<4>, probe_bulkrow<4>}};
        for (const auto& x : variants) {
          const size_t smem = static_cast<size_t>(warps) * x.s * 2 * kTileBytes;
          report("cpasync", warps, x.s, smem, time_us(x.c, grid, warps, part_tiles, smem, k, v, table, out));
          report("bulk", warps, x.s, smem, time_us(x.b, grid, warps, part_tiles, smem, k, v, table, out));
          if (part_tokens == 1024) {
            const size_t smem_rows = static_cast<size_t>(warps) * x.s * 2 * kPadTile;
            report("bulk-rows", warps, x.s, smem_rows, time_us(x.r, grid, warps, part_tiles, smem_rows, k, v, table, out));
          }
        }
        report("ldg", warps, 2, 0, time_us(probe_ldg, grid, warps, part_tiles, 0, k, v, table, out));
      }
    }
  }
  return 0;
}
#endif
