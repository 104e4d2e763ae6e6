// paged_attention_tc.cu: decode attention on tensor cores, for 16-bit KV caches of the
// activation type (bf16 KV with bf16 activations, fp16 with fp16), 8-bit ones (int8, fp8
// e4m3 / e5m2, one f32 scale per token and head) and int4 ones (a scale and min per group of
// channels). The default decode kernel for those caches (`KVSERVE_DECODE_KERNEL=split`
// forces paged_attention.cu); measured in BENCHMARKS.md.
//
// 8-bit codes are exact in bf16 and fp16, so the tiles hold codes and the scales are folded
// around the products: q . (s_k code_k) = s_k (q . code_k) scales each logit after the mma,
// and sum_t p_t (s_v,t code_v,t) = sum_t (p_t s_v,t) code_v,t scales P before it becomes the
// A operand (the softmax sum uses the unscaled p). fp8 runs the first body below (bytes
// converted one by one); int8 has its own, transposed body (after int4's paragraph).
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
// int8 (kv-quant's Int8: symmetric codes, one f32 scale per token and head) is transposed the
// same way, and both of its products are fp16 mma whatever the activation type: 0x6400 | (byte
// ^ 0x80) is the fp16 1152 + code, exact (one xor per 32-bit word, one prmt per pair; bf16
// has too few mantissa bits for it). q . K: A = K codes (rows g, g + 8: tokens; lane t reads
// its 16-byte chunks of a row with 128-bit loads, K rows unpadded and swizzled), B = q^T in
// fp16, k steps permuted so that word kKSteps t + s of a row is lane t's k step s (bytes 0, 2:
// k 2 t, 2 t + 1; bytes 1, 3: k 2 t + 8, 2 t + 9); bf16 q is scaled by a power of two per head
// (max |q| 2^sigma in [2^14, 2^15)), which makes it exact in fp16. logit = s_k (S' - 1152 Qsum)
// / 2^sigma. P . V: A = V^T codes by ldmatrix.x4.trans of the byte tile (a b16 element is two
// channels: lane (g, t) gets channels 2 g, 2 g + 1 of tokens 2 t, 2 t + 1) and the same prmt;
// B = fp16(p s_v f)^T (movmatrix), f a power of two per warp keeping p s_v f below 2^15 (lowered,
// with O rescaled, when a larger V scale arrives; undone at the end); sum_t B_t per head comes
// from one more mma (A = ones) and 1152 times it leaves O at the end. Checked lane by lane in
// kernels/experiments/tc_emulation.py (run_int8).
//
// Why: the first decode kernel (paged_attention.cu) is bound by latency and instructions per
// byte (12-23% occupancy, at most half the DRAM peak on an H200; kernels/NOTES.md). Here each
// warp streams its own tiles of 16 tokens through shared memory with cp.async, two stages deep
// (int8: three on sm_90; the next tiles' K and V are in flight while this one is used), and
// does the arithmetic of a tile in 32 mma.sync instructions: the GQA group's query heads are
// the rows of the A operand (padded to 16), so each K and V row is read once for the whole
// group.
//
// Grid (num_kv_heads, num_seqs, max_parts), block kThreads, as paged_decode_partition; one
// CTA per (KV head, sequence, partition); partitions of `partition_size` tokens (a multiple
// of kTile * kWarps) from the window's first token. A sequence with one partition gets `out`
// directly; otherwise every CTA writes its partial results (decode_reduce.cuh's format) and
// the last CTA of the (sequence, KV head) to finish merges them (GroupMerge) and writes `out`:
// no second launch. `counters` [num_seqs][num_kv_heads] (u32) count the finished partitions;
// they must be zero before the first launch, and each launch leaves them zero.
//
// Two entries, one body (decode_tc<kRope>): paged_decode_tc reads q rotated and the step's K
// and V from the cache; paged_decode_tc_rope (decode steps, PagedDecoder::run_with_rope) does
// rope_and_cache's work first (rope_and_cache_rows): each CTA rotates its group's q rows into
// shared memory and the CTA holding a sequence's new token writes that token's K and V (one
// KV head) into the cache before it loads its tiles: one launch fewer per layer.
#include "tc_common.cuh"
#include "cache_write.cuh"
#define KVS_NO_REDUCE_KERNEL  // the merge is this kernel's epilogue, not a second launch
#include "decode_reduce.cuh"

#ifndef GQA_GROUP
#error "GQA_GROUP must be defined"
#endif

#if KV_DTYPE == KVT_INT8
#define KVS_TC_INT8 1  // int8 codes: the transposed fp16 body
#else
#define KVS_TC_INT8 0
#endif

// 16-bit KV (of the activation type) runs the transposed body too (S^T = K q^T, O^T = V^T P^T
// with K and V^T loaded by ldmatrix straight from the tiles; a knob for measurements:
// -DKVS_TC_T16=0 runs the first body, with the GQA group as the padded rows of A).
#ifndef KVS_TC_T16
#define KVS_TC_T16 1
#endif
#if KVS_TC_T16 && (KVS_TC_CODES || KVS_TC_INT4 || KVS_TC_INT8)
#undef KVS_TC_T16
#define KVS_TC_T16 0
#endif

// Tiles in shared memory per warp for int8 (a knob for measurements:
// KVSERVE_KERNEL_DEFINES=-DKVS_TC_INT8_STAGES=2|3|4). Its tiles are half of bf16's bytes, so a
// third stage keeps about as many bytes in flight per warp as bf16's two; at d = 128 three
// stages are 26.4 KiB per CTA: 8 CTAs per SM on sm_90 (228 KiB), 5 on sm_80 (164 KiB), where
// the default stays 2 (8 CTAs).
#ifndef KVS_TC_INT8_STAGES
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KVS_TC_INT8_STAGES 3
#else
#define KVS_TC_INT8_STAGES 2
#endif
#endif

// Warps per CTA (a knob for measurements: KVSERVE_KERNEL_DEFINES=-DKVS_TC_WARPS=2|4). Each
// warp streams its own tiles. 4 warps put more loads in flight per SM without more
// partitions; 4-warp 16-bit CTAs (68 KiB at d = 128, above the 48 KiB of static shared
// memory) fit 3 to an SM, and with the host's one-wave plan they win at batch 1 (7-10%) but
// lose 64 x 1K (8%) and int4 at batch 256: 2 is the default (kernels/NOTES.md, "4 warps per
// CTA", "one-wave plan"). The tiles live in dynamic shared memory; the module exports its
// launch shape in `paged_decode_tc_launch` (below).
#ifndef KVS_TC_WARPS
#define KVS_TC_WARPS 2
#endif

// Warp specialization of the transposed 16-bit body (a knob for measurements:
// KVSERVE_KERNEL_DEFINES=-DKVS_TC_WS=1; kernels/NOTES.md, "a warp-specialized 16-bit body"):
// one producer warp streams the CTA's tiles into a ring of KVS_TC_WS_STAGES stages shared by
// KVS_TC_WS_CONSUMERS consumer warps (2 or 4), which take them round-robin and run the body's
// tile math unchanged; an mbarrier per stage says "full" (the producer's cp.async landed) and
// one "empty" (its consumer is done with it). Other bodies (8-bit, int4, -DKVS_TC_T16=0) and
// the shapes whose split-KV merge cannot spread over the CTA's threads (GroupMerge: d = 64,
// GQA 3 at 4 consumers) keep the per-warp streams: the define falls back at compile time.
#ifndef KVS_TC_WS
#define KVS_TC_WS 0
#endif
#ifndef KVS_TC_WS_CONSUMERS
#define KVS_TC_WS_CONSUMERS 2
#endif
#ifndef KVS_TC_WS_STAGES
#define KVS_TC_WS_STAGES (KVS_TC_WS_CONSUMERS == 2 ? 4 : 8)
#endif
#define KVS_WS_THREADS (32 * (KVS_TC_WS_CONSUMERS + 1))
#define KVS_WS_MERGE_COLS (GQA_GROUP * HEAD_DIM / 4)
#if KVS_TC_WS && (!KVS_TC_T16 || (KVS_WS_MERGE_COLS < KVS_WS_THREADS &&                 \
                                   KVS_WS_THREADS % (KVS_WS_THREADS / KVS_WS_MERGE_COLS) != 0))
#undef KVS_TC_WS
#define KVS_TC_WS 0
#endif

// TMA tile loader of the transposed 16-bit body (sm_90; on by default since session 10, when
// it measured 1-7% faster at most shapes: BENCHMARKS.md; KVSERVE_KERNEL_DEFINES=-DKVS_TC_TMA=0
// turns it off; kernels/NOTES.md, "a TMA tile loader"): each warp's
// tiles arrive by cp.async.bulk.tensor through two tensor maps the host encodes per cache
// (`k_map`, `v_map`: extra kernel parameters), unpadded and swizzled (128-byte swizzle), with
// a transaction-counted mbarrier per stage; blocks of fewer than 8 tokens take a cp.async
// loader into the same layout. KVS_TC_TMA_STAGES stages per warp. Other bodies, the
// warp-specialized one, and sm_80 ignore the define (compile-time fallback); the module says
// whether the kernel takes the maps in its launch shape (below).
#ifndef KVS_TC_TMA
#define KVS_TC_TMA 1
#endif
#if KVS_TC_TMA && (!KVS_TC_T16 || KVS_TC_WS || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 900)
#undef KVS_TC_TMA
#define KVS_TC_TMA 0
#endif
#ifndef KVS_TC_TMA_STAGES
#define KVS_TC_TMA_STAGES 2
#endif

namespace kvserve {

constexpr int kTile = 16;                    // tokens per tile (the mma K of the PV product)
#if KVS_TC_WS
constexpr int kWarps = KVS_TC_WS_CONSUMERS;  // consumer warps (accumulators; the warp merge's)
constexpr int kProducerWarps = 1;            // warp kWarps streams the tiles
#else
constexpr int kWarps = KVS_TC_WARPS;         // warps per CTA, each with its own tiles
constexpr int kProducerWarps = 0;
#endif
static_assert(kWarps == 2 || kWarps == 4, "2 or 4 warps per CTA");
constexpr int kThreads = 32 * (kWarps + kProducerWarps);
// Tiles in shared memory per warp (warp specialization: in the CTA's ring); the other dtypes'
// count is a knob for measurements too (KVSERVE_KERNEL_DEFINES=-DKVS_TC_STAGES=3).
#ifndef KVS_TC_STAGES
#define KVS_TC_STAGES 2
#endif
constexpr int kStages =
    KVS_TC_WS ? KVS_TC_WS_STAGES
              : (KVS_TC_INT8 ? KVS_TC_INT8_STAGES : (KVS_TC_TMA ? KVS_TC_TMA_STAGES : KVS_TC_STAGES));
static_assert(kStages >= 2, "one tile in use while the next one is in flight");
// Warp specialization: consumer c owns stages c, c + kWarps, ... (ws_stream_tiles' parity
// waits rely on it).
static_assert(!KVS_TC_WS || kStages % kWarps == 0, "whole stages per consumer");
constexpr bool kPow2Stages = (kStages & (kStages - 1)) == 0;
// Padded: no bank conflicts, 16-B aligned (TMA: unpadded, swizzled instead; tma_chunk_offset).
constexpr int kRowBytes = KVS_TC_TMA ? kValueRowBytes : kValueRowBytes + 16;
// K rows: int8 leaves them unpadded (its 128-bit loads are conflict-free through k_chunk).
constexpr int kKRowBytes = KVS_TC_INT8 ? kValueRowBytes : kRowBytes;
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
constexpr int kMinWarps = 16;  // warps per SM the registers are bounded for (<= 128 each)
#elif KVS_TC_INT8 || KVS_TC_T16
constexpr int kMTiles = HEAD_DIM / 16;         // mma M tiles (16 channels) of V^T P^T
constexpr int kChunksPerLane = HEAD_DIM / 64;  // K chunks a lane reads per row (q . K)
// Warp specialization: 15 warps (<= 136 registers each): 5 CTAs of 2 consumers and the
// producer, or 3 of 4 and the producer.
constexpr int kMinWarps = KVS_TC_WS ? 15 : 16;
#else
constexpr int kMinWarps = 12;  // <= 168 registers each
#endif
constexpr int kMinCtas = kMinWarps / (kWarps + kProducerWarps);

// One warp's shared memory (warp specialization: the CTA's ring, one for all its warps):
// kStages tiles of K and of V (rows of raw bytes), and for 8-bit codes their scales, for int4
// their (scale, min) rows.
struct WarpTiles {
  unsigned char k[kStages][kTile][kKRowBytes];
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

// The launch shape the host reads from the module (cuModuleGetGlobal) before launching
// `paged_decode_tc`: threads per CTA (warp specialization: with the producer warp), bytes of
// dynamic shared memory (the warps' tiles, also
// the space of the warp merge and of the split-KV merge), and the partition quantum (tokens a
// round of tiles covers: partitions should be multiples of it).
// A fourth word says whether the entry takes the TMA tensor maps (KVS_TC_TMA: 1) after its
// other parameters. TMA: the tiles start at the first 1024-byte boundary of the dynamic shared
// memory (the 128-byte swizzle repeats every 1024 bytes of shared address), hence 1024 bytes
// more than the tiles.
constexpr int kTilesBytes = (KVS_TC_WS ? 1 : kWarps) * static_cast<int>(sizeof(WarpTiles));
constexpr int kTmaAlign = 1024;
constexpr int kSmemBytes = kTilesBytes + (KVS_TC_TMA ? kTmaAlign : 0);
extern "C" __constant__ int paged_decode_tc_launch[4] = {kThreads, kSmemBytes, kTile * kWarps,
                                                         KVS_TC_TMA};
// The same for the entry with RoPE and the cache write folded in (`<entry>_launch`).
extern "C" __constant__ int paged_decode_tc_rope_launch[4] = {kThreads, kSmemBytes,
                                                              kTile * kWarps, KVS_TC_TMA};

// The 16-byte chunk of a K row's shared-memory copy that holds the row's chunk `col`. int8 at
// d = 128 (8 chunks, unpadded 128-byte rows): col ^ (row % 8), so that the two rows of a
// quarter warp's 128-bit loads in q . K (rows g and g + 1, chunks 2 t + j) hit distinct banks
// (at d = 64 two 64-byte rows fill the 32 banks as they are).
__device__ __forceinline__ int k_chunk(int row, int col) {
  return (KVS_TC_INT8 && kChunksPerRow == 8) ? col ^ (row & 7) : col;
}

#if KVS_TC_TMA
// TMA tiles (kTile rows of kValueRowBytes, unpadded, each stage's K and V tile at a multiple
// of 1024 bytes of shared address). The host's tensor map (2-D: HEAD_DIM elements by every
// row of the cache, 128-byte swizzle) has boxes of 64 channels (128 bytes) by kTmaBoxRows
// rows: box (b, h) of a tile, rows 8 b .. 8 b + 7 and channels 64 h .. 64 h + 63, lands at
// 1024 (kHalves b + h), row r % 8 in its 128-byte line r % 8, and the TMA engine stores the
// line's 16-byte chunk c at chunk c ^ (line address / 128 % 8) = c ^ (r % 8). So 16-byte
// chunk `chunk` (channels 8 chunk .. + 7) of row `row` of a tile is at the byte offset below.
// An ldmatrix 8x8 matrix (8 consecutive rows of one box at one chunk) then reads 8 distinct
// chunk positions of 8 lines: every bank once (kernels/experiments/tma_swizzle_emulation.py).
constexpr int kTmaBoxRows = 8;                 // rows per box: a box never spans two blocks
constexpr int kHalves = HEAD_DIM / 64;         // 128-byte boxes per row
constexpr int kTmaBoxBytes = kTmaBoxRows * kValueRowBytes;  // rows 8 b .. 8 b + 7, every half
static_assert(kValueRowBytes == 128 * kHalves, "16-bit rows of whole 128-byte lines");
static_assert(kTile == 2 * kTmaBoxRows, "two box rows per tile");
static_assert(sizeof(WarpTiles) % kTmaAlign == 0 && kTile * kValueRowBytes % kTmaAlign == 0,
              "every stage's K and V tile at a multiple of 1024 bytes");
__device__ __forceinline__ int tma_chunk_offset(int row, int chunk) {
  return (row / kTmaBoxRows) * kTmaBoxBytes + (chunk / 8) * 1024 + (row % 8) * 128 +
         (((chunk % 8) ^ (row % 8)) * 16);
}
#endif

#if !KVS_TC_INT4 && !KVS_TC_INT8
// Element `i` of a shared-memory row as the activation type (an fp8 code is exact in it).
__device__ __forceinline__ scalar_t element(const unsigned char* row, int i) {
#if KVS_TC_CODES
  return from_float(fp8_to_float(row[i]));
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

#if KVS_TC_INT8 || KVS_TC_T16
// Issues the cp.async copies of a tile's K and V rows into `stage`: lane r = lane % kTile
// gives `row` >= 0, the offset of row r's K row in k_cache (its V row: the same in v_cache),
// or -1 for a masked token, whose rows are zero-filled (from a valid address). The lanes
// copying a row's 16-byte chunks (8 lanes a row at d = 128) take its address by a shuffle and
// its liveness from a ballot. K chunks land swizzled (k_chunk).
__device__ __forceinline__ void copy_tile_rows(WarpTiles& w, int stage,
                                               const unsigned char* __restrict__ k_cache,
                                               const unsigned char* __restrict__ v_cache,
                                               long long row, int lane) {
  const unsigned live_rows = __ballot_sync(0xffffffffu, row >= 0);  // bit r: token t0 + r
  const unsigned long long k_row =
      reinterpret_cast<unsigned long long>(k_cache) + (row >= 0 ? row : 0);
  const unsigned long long v_minus_k =
      reinterpret_cast<unsigned long long>(v_cache) - reinterpret_cast<unsigned long long>(k_cache);
#pragma unroll
  for (int i = 0; i < kTile * kChunksPerRow / 32; ++i) {
    const int c = lane + 32 * i;
    const int row_i = c / kChunksPerRow, col = c % kChunksPerRow;
    const unsigned long long k_src = __shfl_sync(0xffffffffu, k_row, row_i) + col * 16;
    const int bytes = (live_rows >> row_i) & 1u ? 16 : 0;
#if KVS_TC_TMA
    // Blocks of fewer than kTmaBoxRows tokens: the TMA tiles' swizzled layout.
    const int dst = tma_chunk_offset(row_i, col);
    cp_async16(&w.k[stage][0][0] + dst, reinterpret_cast<const unsigned char*>(k_src), bytes);
    cp_async16(&w.v[stage][0][0] + dst, reinterpret_cast<const unsigned char*>(k_src + v_minus_k),
               bytes);
#else
    cp_async16(&w.k[stage][row_i][k_chunk(row_i, col) * 16],
               reinterpret_cast<const unsigned char*>(k_src), bytes);
    cp_async16(&w.v[stage][row_i][col * 16],
               reinterpret_cast<const unsigned char*>(k_src + v_minus_k), bytes);
#endif
  }
}
#endif

// Issues the copies of one tile (tokens t0 .. t0 + kTile) into `stage`; tokens outside
// [first, end) are zero-filled (their weight is 0, and 0 * garbage could be NaN).
__device__ __forceinline__ void load_tile(WarpTiles& w, int stage, int t0, int first, int end,
                                          const unsigned char* __restrict__ k_cache,
                                          const unsigned char* __restrict__ v_cache,
                                          const int* __restrict__ table, int block_shift,
                                          int block_size, int num_kv_heads,
                                          long long block_bytes, int head, int lane) {
#if KVS_TC_INT4
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
#elif KVS_TC_INT8 || KVS_TC_T16
  // One table lookup per lane: lane r = lane % kTile resolves token t0 + r (lanes r and r + 16
  // alike: for int8 they copy its K and its V scale); copy_tile_rows spreads the rows' chunks
  // over the lanes (a token outside [first, end) is zero-filled).
  const int r = lane % kTile;
  const int tok = t0 + r;
  const bool live = tok >= first && tok < end;
  const long long base = live ? static_cast<long long>(table[tok >> block_shift]) * block_bytes : 0;
  const int slot = head * block_size + (tok & (block_size - 1));
  copy_tile_rows(w, stage, k_cache, v_cache, live ? base + slot * kValueRowBytes : -1, lane);
#if KVS_TC_INT8
  const long long scale_src =
      live ? base + kv_scale_section_offset(KV_DTYPE, block_size, num_kv_heads, HEAD_DIM) +
                 slot * kScaleRowBytes
           : 0;
  if (lane < kTile) {
    cp_async4(&w.k_scale[stage][r], k_cache + scale_src, live ? 4 : 0);
  } else {
    cp_async4(&w.v_scale[stage][r], v_cache + scale_src, live ? 4 : 0);
  }
#endif
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
#if KVS_TC_CODES && !KVS_TC_INT8
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
#endif

#if KVS_TC_INT4 || KVS_TC_INT8 || KVS_TC_T16
// The transpose of an 8x8 matrix of 16-bit pairs across the warp: lane l holds row l / 4,
// columns 2 (l % 4), + 1 of M and receives the same of M^T.
__device__ __forceinline__ unsigned transpose8x8(unsigned x) {
  unsigned d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(x));
  return d;
}
#endif

#if KVS_TC_INT8

// D = A * B + D for one m16n8k16 tile of fp16 operands (whatever the activation type), f32
// accumulators.
__device__ __forceinline__ void mma_f16(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                        unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp16 values packed (lo in the low half), rounded to nearest.
__device__ __forceinline__ unsigned pack_half(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&h);
}

// Four int8 codes with their sign bits flipped: bytes code + 128.
__device__ __forceinline__ unsigned flip_codes(unsigned w) { return w ^ 0x80808080u; }

// Bytes 0 and 2 (kSel = 0x4240) or 1 and 3 (0x4341) of flipped codes `x` as an fp16 pair
// 0x64uu: 1024 + (code + 128), exact (fp16's spacing is 1 in [1024, 2048)).
template <unsigned kSel>
__device__ __forceinline__ unsigned code_pair(unsigned x) {
  return __byte_perm(x, 0x64646464u, kSel);
}
constexpr unsigned kSel02 = 0x4240u, kSel13 = 0x4341u;
constexpr float kCodeOffset = 1152.f;  // code_pair's value minus the code
constexpr unsigned kHalfOnes = 0x3C003C00u;  // fp16 (1, 1)

// The two values of a packed pair of the activation type as f32 (exact).
__device__ __forceinline__ float2 unpack_act(unsigned x) {
#if SCALAR == 0
  return __half22float2(*reinterpret_cast<const __half2*>(&x));
#else
  return make_float2(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
#endif
}
#endif

#if KVS_TC_INT4 || KVS_TC_INT8 || KVS_TC_T16
// The online-softmax step of a tile in the transposed bodies: st[2 h + e] is the logit (log2
// units, -inf if masked) of token g + 8 h for head 2 t + e of this lane (g = lane / 4, t =
// lane % 4). The head max is a shuffle over the 8 lanes of a column; m and l (this lane's
// tokens only) are updated; alpha[e] rescales the head's running sums, pr the tile's weights.
__device__ __forceinline__ void online_softmax_transposed(const float (&st)[4], float (&m)[2],
                                                          float (&l)[2], float (&alpha)[2],
                                                          float (&pr)[4]) {
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
}
// Rescales a transposed body's O^T accumulators: o[mt][0, 2] belong to head 2 t (factor r0),
// o[mt][1, 3] to head 2 t + 1 (r1).
__device__ __forceinline__ void rescale_transposed(float (&o)[kMTiles][4], float r0, float r1) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    o[mt][0] *= r0;
    o[mt][1] *= r1;
    o[mt][2] *= r0;
    o[mt][3] *= r1;
  }
}
// The warps' merge at the end of a transposed body: sums this lane's l (its tokens g) over the
// lanes g, publishes this warp's (m, l) of heads 2 t + e and sets mine[e], the factor that rescales the
// warp's O of head 2 t + e to the CTA's max. Returns o_sh [kWarps][8][HEAD_DIM] in the tiles'
// memory, free for the warps' outputs once every warp has passed the two barriers inside.
__device__ __forceinline__ float* merge_warps_transposed(WarpTiles* tiles, const float (&m)[2],
                                                         float (&l)[2],
                                                         float (&merge_m)[kWarps][8],
                                                         float (&merge_l)[kWarps][8], int warp,
                                                         int lane, float (&mine)[2]) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
#pragma unroll
    for (int x = 4; x < 32; x *= 2) l[e] += __shfl_xor_sync(0xffffffffu, l[e], x);
  }
  if (g == 0 && warp < kWarps) {  // (not the producer warp of warp specialization)
    merge_m[warp][2 * t] = m[0];
    merge_m[warp][2 * t + 1] = m[1];
    merge_l[warp][2 * t] = l[0];
    merge_l[warp][2 * t + 1] = l[1];
  }
  __syncthreads();
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float m_all = -INFINITY;
#pragma unroll
    for (int x = 0; x < kWarps; ++x) m_all = fmaxf(m_all, merge_m[x][2 * t + e]);
    mine[e] = m[e] == -INFINITY ? 0.f : exp2f(m[e] - m_all);
  }
  static_assert(kTilesBytes >= kWarps * 8 * HEAD_DIM * sizeof(float), "merge space");
  __syncthreads();  // everyone has read merge_*; the tiles are free
  return reinterpret_cast<float*>(&tiles[0].k[0][0][0]);
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
#if KVS_TC_TMA
  // TMA boxes are runs of rows inside one block: tiles start at a multiple of kTile tokens
  // (blocks are powers of two), and the tokens before p_start are masked (the previous
  // partition's, or before the window).
  const int tiles_from = pt.p_start & ~(kTile - 1);
#else
  const int tiles_from = pt.p_start;
#endif
  const int tiles_total = (pt.p_end - tiles_from + kTile - 1) / kTile;
  pt.my_tiles = tiles_total > warp ? (tiles_total - warp + kWarps - 1) / kWarps : 0;
  pt.my_first = tiles_from + warp * kTile;
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
                                             Tile&& tile) {
  constexpr int kStride = kWarps * kTile;
  // Tiles 0 .. kStages - 2 first (a commit group each, empty past the warp's tiles); then
  // iteration i issues tile i + kStages - 1 into the stage tile i - 1 used, and waits for the
  // group of tile i. Stages by counters when kStages is not a power of two (i % kStages would
  // be a multiply-shift sequence).
  if (pt.my_tiles > 0) {
    load_tile(w, 0, pt.my_first, pt.p_start, pt.p_end, k_cache, v_cache, table, block_shift,
              block_size, num_kv_heads, block_bytes, head, lane);
  }
  cp_async_commit();
#pragma unroll
  for (int s = 1; s < kStages - 1; ++s) {
    if (s < pt.my_tiles) {
      load_tile(w, s, pt.my_first + s * kStride, pt.p_start, pt.p_end, k_cache, v_cache, table,
                block_shift, block_size, num_kv_heads, block_bytes, head, lane);
    }
    cp_async_commit();
  }
  int use = 0, fill = kStages - 1;  // (not power of two) the stages of tiles i, i + kStages - 1
  for (int i = 0; i < pt.my_tiles; ++i) {
    if (i + kStages - 1 < pt.my_tiles) {
      const int stage = kPow2Stages ? (i + kStages - 1) % kStages : fill;
      load_tile(w, stage, pt.my_first + (i + kStages - 1) * kStride, pt.p_start, pt.p_end,
                k_cache, v_cache, table, block_shift, block_size, num_kv_heads, block_bytes,
                head, lane);
    }
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // this tile's group is complete (later ones may be in flight)
    __syncwarp();
    tile(kPow2Stages ? i % kStages : use, pt.my_first + i * kStride);
    __syncwarp();  // the stage is read before a later iteration refills it
    if (!kPow2Stages) {
      use = use + 1 == kStages ? 0 : use + 1;
      fill = fill + 1 == kStages ? 0 : fill + 1;
    }
  }
  cp_async_wait<0>();
}

#if KVS_TC_TMA
// Zeroes the V rows of the tile of tokens t0 .. t0 + kTile in `stage` whose tokens are outside
// [p_start, p_end): their weights are 0, but the TMA boxes brought whatever the cache holds
// there (unwritten slots, another partition's tokens), or nothing (a box skipped: the stage's
// previous tile), and 0 * NaN is NaN in the P . V mma. K rows need nothing: their logits are
// replaced by -inf (a select), whatever the products. Physical 128-byte line P of a tile holds
// row 8 (P / (8 kHalves)) + P % 8 (tma_chunk_offset). The stores are generic-proxy writes to
// memory a later TMA overwrites: each lane fences the proxies after its stores (ordered before
// the next issue by the __syncwarp below and the one after the tile's math).
__device__ __forceinline__ void tma_zero_masked_v(WarpTiles& w, int stage, int t0, int p_start,
                                                  int p_end, int lane) {
  constexpr int kChunks = kTile * kValueRowBytes / 16;
  static_assert(kChunks % 32 == 0, "whole chunks per lane");
  unsigned char* v = &w.v[stage][0][0];
#pragma unroll
  for (int i = 0; i < kChunks / 32; ++i) {
    const int c = lane + 32 * i;
    const int line = c / 8;
    const int tok = t0 + (line / (8 * kHalves)) * 8 + line % 8;
    if (tok < p_start || tok >= p_end) {
      *reinterpret_cast<uint4*>(v + 16 * c) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  fence_proxy_async_shared();
  __syncwarp();
}

// Streams this warp's tiles of `pt` through its kStages stages by TMA, as stream_tiles does
// by cp.async: `tile(stage, t0)` computes with the tile of tokens t0 .. t0 + kTile.
//
// Loads. With blocks of kTmaBoxRows (8) tokens or more, a tile is two boxes of 8 rows, each a
// run of consecutive rows of one block (tiles start at multiples of kTile: partition_of), so
// row t0 + 8 b is cache row table[(t0 + 8 b) >> block_shift] * num_kv_heads * block_size +
// head * block_size + (t0 + 8 b) % block_size (16-bit blocks are their value rows and nothing
// else: the host checks block_bytes against that). Per box and half (64 channels) one TMA of
// K and one of V, issued by lane 0; a box with no token in [p_start, p_end) is skipped (its
// block may be outside the cache: table entries before the window or past the context are not
// checked), and its rows masked. Lanes b = 0, 1 look up box b's block one tile ahead (the
// next issue's), so the lookup's latency hides behind the wait and the math. With smaller
// blocks every lane copies its chunks by cp.async into the same swizzled layout (load_tile,
// copy_tile_rows; masked rows zero-filled there).
//
// Protocol. full[warp][s] completes phase r when round r of stage s has landed: TMA, 1
// arrival a phase (lane 0's arrive.expect_tx of the bytes it issues; the copies' complete_tx
// brings the count to zero); cp.async, 32 (each lane's cp.async.mbarrier.arrive.noinc when
// its copies have landed). Tile i uses stage i % kStages in round i / kStages; the stage is
// reissued (tile i + kStages) only after tile i's math, so a barrier is never more than one
// phase ahead of the parity waited for. Masked V rows are zeroed after the wait (TMA only).
//
// Proxies (TMA writes shared memory through the async proxy). RAW: the mbarrier wait makes
// the TMA's writes visible to the waiting lanes. WAR: the stage is reissued after __syncwarp
// following the tile's math, whose ldmatrix reads have completed (their values fed the mma
// before the barrier); as in CUTLASS's TMA pipelines, no proxy fence. WAW: the zeroing
// stores fence the proxies (tma_zero_masked_v), as do paged_decode_tc_rope's prologue (q
// rows in the tiles' memory, the new token in the cache) before its barrier and every lane
// after its last tile (the merge writes the tiles next). Every tile issued is waited for, so
// nothing is in flight when the warps merge through the tiles.
template <class Tile>
__device__ __forceinline__ void tma_stream_tiles(WarpTiles& w, const Partition& pt,
                                                 const TensorMap* k_map, const TensorMap* v_map,
                                                 const unsigned char* __restrict__ k_cache,
                                                 const unsigned char* __restrict__ v_cache,
                                                 const int* __restrict__ table, int block_shift,
                                                 int block_size, int num_kv_heads,
                                                 long long block_bytes, int head, int warp,
                                                 int lane, Tile&& tile) {
  __shared__ unsigned long long full[kWarps][kStages];
  unsigned long long* bar = full[warp];
  const bool use_tma = block_size >= kTmaBoxRows;  // uniform over the launch
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) mbarrier_init(&bar[s], use_tma ? 1u : 32u);
    fence_mbarrier_init();
  }
  __syncwarp();
  constexpr int kStride = kWarps * kTile;
  const int block_rows = num_kv_heads * block_size;
  const int head_row = head * block_size;
  // Box (lane & 1)'s first cache row in the tile of tokens t0 .., or -1 when the box holds no
  // token in [p_start, p_end) (TMA only).
  const auto box_row = [&](int t0) -> int {
    const int t = t0 + kTmaBoxRows * (lane & 1);
    if (t >= pt.p_end || t + kTmaBoxRows <= pt.p_start) return -1;
    return table[t >> block_shift] * block_rows + head_row + (t & (block_size - 1));
  };
  // Issues the tile of tokens t0 .. into `stage` (TMA: `row` from box_row(t0)).
  const auto issue = [&](int stage, int t0, int row) {
    if (use_tma) {
      const int row1 = __shfl_sync(0xffffffffu, row, 1);
      if (lane == 0) {
        const unsigned boxes = (row >= 0 ? 1u : 0u) + (row1 >= 0 ? 1u : 0u);
        mbarrier_arrive_expect_tx(&bar[stage], boxes * 2u * kTmaBoxBytes);
        const unsigned k_dst = static_cast<unsigned>(__cvta_generic_to_shared(&w.k[stage][0][0]));
        const unsigned v_dst = static_cast<unsigned>(__cvta_generic_to_shared(&w.v[stage][0][0]));
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const int r = b == 0 ? row : row1;
          if (r < 0) continue;
#pragma unroll
          for (int h = 0; h < kHalves; ++h) {
            const unsigned off = b * kTmaBoxBytes + h * 1024;
            tma_load_2d(k_dst + off, k_map, 64 * h, r, &bar[stage]);
            tma_load_2d(v_dst + off, v_map, 64 * h, r, &bar[stage]);
          }
        }
      }
    } else {
      load_tile(w, stage, t0, pt.p_start, pt.p_end, k_cache, v_cache, table, block_shift,
                block_size, num_kv_heads, block_bytes, head, lane);
      cp_async_mbarrier_arrive(&bar[stage]);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages; ++s) {
    if (s < pt.my_tiles) {
      const int t0 = pt.my_first + s * kStride;
      issue(s, t0, use_tma ? box_row(t0) : -1);
    }
  }
  int stage = 0;
  unsigned phase = 0;
  for (int i = 0; i < pt.my_tiles; ++i) {
    const int t0 = pt.my_first + i * kStride;
    const int t_next = t0 + kStages * kStride;
    const bool refill = i + kStages < pt.my_tiles;
    const int next_row = use_tma && refill ? box_row(t_next) : -1;  // in flight meanwhile
    mbarrier_wait(&bar[stage], phase);
    __syncwarp();
    if (use_tma && (t0 < pt.p_start || t0 + kTile > pt.p_end)) {
      tma_zero_masked_v(w, stage, t0, pt.p_start, pt.p_end, lane);
    }
    tile(stage, t0);
    __syncwarp();  // every lane's reads of the stage are done before it is reissued
    if (refill) issue(stage, t_next, next_row);
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1u;
    }
  }
  // The warps' merge writes the tiles' memory next (generic proxy) where TMA wrote last.
  fence_proxy_async_shared();
}
#endif

#if KVS_TC_WS
// Warp specialization: streams the partition's tiles through the CTA's ring `ring` of kStages
// stages. Warp kWarps is the producer; warp c < kWarps, a consumer, gets tiles c, c + kWarps,
// c + 2 kWarps, ... and calls `tile(stage, t0)` for each, as stream_tiles does. Every thread of
// the CTA calls this (a barrier inside, after the mbarriers' initialization).
//
// Protocol. Tile i (tokens t0 = p_start + kTile i ..) goes into stage s = i % kStages in round
// r = i / kStages. full[s] (32 arrivals a phase: the producer's lanes, each by
// cp.async.mbarrier.arrive.noinc once its cp.async of the tile have landed) completes its
// phase r when tile i is in the stage; empty[s] (1 arrival: lane 0 of the tile's consumer,
// after a __syncwarp that orders the warp's reads of the stage before it) completes its phase
// r when tile i has been used. The producer issues tile i after waiting for phase r - 1 of
// empty[s] (r >= 1: tile i - kStages, the stage's previous tile, used); tile i's consumer
// waits for phase r of full[s] before reading. Invariants:
//  - phases are waited for by parity, which is unambiguous only if the barrier is in phase r
//    (pending) or r + 1 (phase r completed) when phase r is waited for: a wait for parity 1
//    on a barrier still in phase 0 returns at once. Behind: kStages % kWarps == 0, so stage s
//    always has the same consumer, which waited for phase r - 1 of full[s] (its previous tile
//    there) before it waits for phase r; the producer waits for phase r - 1 of empty[s] after
//    issuing round r - 1 of the stage, whose own wait saw phase r - 2 complete. Ahead: full[s]
//    cannot complete phase r + 1 before tile i's consumer released phase r of empty[s] (the
//    producer waits for it first), which it does after its wait; empty[s] cannot complete
//    phase r before the producer issued round r (its consumer waits for full[s]'s phase r
//    first), which it does after its wait for phase r - 1.
//  - each stage round has exactly one writer (the producer, once) and one reader (the
//    consumer of tile i); stage s is rewritten only after its reader's release (no WAR), and
//    read only after every lane's copies of it landed (no RAW); cp.async are generic-proxy
//    writes, so the mbarrier's release / acquire order them (no proxy fence).
//  - no deadlock: the producer's waits need tiles < i - kStages + 1 used; a consumer's, tile
//    i issued; tiles are issued in order and each consumer uses its tiles in order, so the
//    lowest unissued or unused tile can always make progress.
//  - every tile issued is used, so when the consumers leave, every copy has landed: the
//    tiles' memory is free for the warp merge after the barrier that follows.
// Masked tokens (past p_end, in the last tile only: p_start is the first token of a tile) are
// zero-filled by cp.async (src-size 0). The producer looks up the block of tile i + 1's
// tokens before waiting for tile i's stage, so the lookup's latency overlaps the wait.
template <class Tile>
__device__ __forceinline__ void ws_stream_tiles(WarpTiles& ring, const Partition& pt,
                                                const unsigned char* __restrict__ k_cache,
                                                const unsigned char* __restrict__ v_cache,
                                                const int* __restrict__ table, int block_shift,
                                                int block_size, long long block_bytes,
                                                int head, int warp, int lane, Tile&& tile) {
  __shared__ unsigned long long full[kStages], empty[kStages];
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 32);
      mbarrier_init(&empty[s], 1);
    }
  }
  __syncthreads();
  const int num_tiles = (pt.p_end - pt.p_start + kTile - 1) / kTile;
  if (warp == kWarps) {
    // Lane r = lane % kTile resolves token t0 + r (lanes r and r + 16 alike).
    const int r = lane % kTile;
    int block = r < pt.p_end - pt.p_start ? table[(pt.p_start + r) >> block_shift] : 0;
    int stage = 0;
    unsigned round = 0;
    for (int i = 0; i < num_tiles; ++i) {
      const int tok = pt.p_start + i * kTile + r;
      const int next = tok + kTile < pt.p_end ? table[(tok + kTile) >> block_shift] : 0;
      if (round > 0) mbarrier_wait(&empty[stage], (round - 1) & 1u);
      const int slot = head * block_size + (tok & (block_size - 1));
      const long long row = tok < pt.p_end ? static_cast<long long>(block) * block_bytes +
                                                 static_cast<long long>(slot) * kValueRowBytes
                                           : -1;
      copy_tile_rows(ring, stage, k_cache, v_cache, row, lane);
      cp_async_mbarrier_arrive(&full[stage]);
      block = next;
      if (++stage == kStages) {
        stage = 0;
        ++round;
      }
    }
    cp_async_wait<0>();
  } else {
    int stage = warp;  // tile `warp`: round 0 (kStages is a multiple of kWarps)
    unsigned round = 0;
    for (int i = warp; i < num_tiles; i += kWarps) {
      mbarrier_wait(&full[stage], round & 1u);
      tile(stage, pt.p_start + i * kTile);
      __syncwarp();  // every lane's reads of the stage before the release
      if (lane == 0) mbarrier_arrive(&empty[stage]);
      stage += kWarps;
      if (stage >= kStages) {
        stage -= kStages;
        ++round;
      }
    }
  }
}
#endif

// The angles of the folded RoPE: pair i's (sin, cos) from a table in shared memory that the
// CTA filled with rope_angle (the same bits as AngleOf computes them one by one).
struct AngleTable {
  const float2* angles;
  __device__ __forceinline__ float2 operator()(int i) const { return angles[i]; }
};

// rope_and_cache's work, folded into the attention kernel (paged_decode_tc_rope, from
// PagedDecoder::run_with_rope): q and the new token's k and v arrive as the Q/K/V product left
// them. Every CTA rotates its GQA group's query rows itself, into the tiles' memory, and
// returns them ([GQA_GROUP][HEAD_DIM], read by the body's q loads instead of q; the caller
// must barrier once every warp has its q fragments, before the tiles are loaded over them),
// or nullptr for a CTA past its sequence's partitions (it has nothing to do). The CTA whose
// partition holds the context's last token (the new one, at position ctx - 1, in slot
// slot_mapping[seq]; -1: padding, nothing written) also rotates the new token's K row of its
// KV head and writes it, quantized, and its V row into that slot. Both with cache.cu's own
// rotate_row and write_row, and angles from rope_angle once per pair: bit for bit
// rope_and_cache's q and cache bytes. Warps take rows round robin, K and V first.
//
// It runs first in the kernel and reads its indices anew (blockIdx, threadIdx, the context
// length): nothing it derives is kept in registers into the attention's main loop (which runs
// at the register cap at d = 128; derived from the same values, the body's partition and
// addresses made the GQA 7-8 variants spill).
//
// Visibility: the K/V stores are weak generic-proxy writes; the barrier at the end makes them
// performed relative to every thread of the CTA (PTX barrier semantics), and the tiles are
// read afterwards by cp.async, which PTX treats as a weak memory operation in the generic
// proxy too (unlike cp.async.bulk / TMA, the async proxy): so the tile holding the new token
// sees its bytes without a proxy fence. No other CTA reads that slot in this launch: the
// other partitions of the sequence end before ctx - 1, and other sequences' tables never
// hold a block this sequence writes (the caller's contract: one new token per sequence, in a
// block of its own).
__device__ __forceinline__ const scalar_t* rope_and_cache_rows(
    WarpTiles* tiles, const scalar_t* __restrict__ q, unsigned char* __restrict__ k_cache,
    unsigned char* __restrict__ v_cache, const scalar_t* __restrict__ new_k,
    const scalar_t* __restrict__ new_v, const int* __restrict__ positions,
    const float* __restrict__ inv_freq, const long long* __restrict__ slot_mapping,
    int interleaved, const int* __restrict__ context_lens, int window, int partition_size,
    int max_parts, int num_kv_heads, int block_size, int block_shift, long long block_bytes) {
  const int head = fresh_ctaid_x(), seq = fresh_ctaid_y(), part = fresh_ctaid_z();
  const int warp = fresh_tid() / 32, lane = fresh_tid() % 32;
  // Every global load first, so that their latencies overlap: the context length, position
  // and slot, and this warp's rows (row r: -2 the new K, -1 the new V, 0.. the query rows;
  // warps take them round robin).
  const int ctx = context_lens[seq];
  const float pos = static_cast<float>(positions[seq]);
  const long long new_slot = slot_mapping[seq];
  constexpr int kRowsPerWarp = (GQA_GROUP + 2 + kWarps - 1) / kWarps;
  float x[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int r = warp + j * kWarps - 2;
    if (r >= GQA_GROUP) break;
    const scalar_t* src =
        r >= 0 ? q + (static_cast<long long>(seq) * num_kv_heads * GQA_GROUP +
                      head * GQA_GROUP + r) * HEAD_DIM
               : (r == -2 ? new_k : new_v) +
                     (static_cast<long long>(seq) * num_kv_heads + head) * HEAD_DIM;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) x[j][i] = to_float(src[lane * kPerLane + i]);
  }
  const Partition pt = partition_of(ctx, window, part, partition_size, max_parts, 0);
  if (part >= pt.num_parts) return nullptr;
  const long long slot = part == pt.num_parts - 1 ? new_slot : -1;  // written by this CTA
  scalar_t* q_rot = reinterpret_cast<scalar_t*>(tiles);
  float2* angles = reinterpret_cast<float2*>(q_rot + GQA_GROUP * HEAD_DIM);
  static_assert(kTilesBytes >= GQA_GROUP * HEAD_DIM * sizeof(scalar_t) +
                                   HEAD_DIM / 2 * sizeof(float2),
                "rotated q rows and angles fit the tiles");
  static_assert(kThreads >= HEAD_DIM / 2, "a pair per thread");
  const int tid = fresh_tid();
  if (tid < HEAD_DIM / 2) angles[tid] = rope_angle(pos, inv_freq[tid]);
  __syncthreads();  // the angles are in
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int r = warp + j * kWarps - 2;
    if (r >= GQA_GROUP) break;
    if (r < 0 && slot < 0) continue;  // K and V only where this CTA writes them
    scalar_t y[kPerLane];
    if (r != -1) rotate_row(x[j], y, AngleTable{angles}, lane, interleaved);
    if (r >= 0) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) q_rot[r * HEAD_DIM + lane * kPerLane + i] = y[i];
    } else {
      if (r == -2) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) x[j][i] = to_float(y[i]);  // rounded as rope stores k
      }
      unsigned char* base = (r == -2 ? k_cache : v_cache) + (slot >> block_shift) * block_bytes;
      write_row(base, head, static_cast<int>(slot & (block_size - 1)), block_size, num_kv_heads,
                lane, x[j]);
    }
  }
  __syncthreads();  // the rotated rows and the new token's K and V are in
  return q_rot;
}

// The tensor maps of the TMA loader (KVS_TC_TMA): the last two parameters of both entries.
#if KVS_TC_TMA
#define KVS_TMA_PARAMS \
  , const __grid_constant__ TensorMap k_map, const __grid_constant__ TensorMap v_map
#define KVS_TMA_ARGS , &k_map, &v_map
#define KVS_TMA_DECL , const TensorMap* k_map, const TensorMap* v_map
#else
#define KVS_TMA_PARAMS
#define KVS_TMA_ARGS
#define KVS_TMA_DECL
#endif

// The kernel (both entries below). kRope: rope_and_cache's work folded in
// (paged_decode_tc_rope): new_k .. interleaved are its inputs; otherwise they are unused.
template <bool kRope>
__device__ __forceinline__ void decode_tc(
    scalar_t* __restrict__ out, float* __restrict__ tmp_out, float* __restrict__ max_logits,
    float* __restrict__ exp_sums, const scalar_t* __restrict__ q,
    unsigned char* __restrict__ k_cache, unsigned char* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens, float scale,
    int num_kv_heads, int block_size, int block_shift, long long block_bytes, int max_blocks,
    int partition_size, int max_parts, int window, unsigned* __restrict__ counters,
    const scalar_t* __restrict__ new_k, const scalar_t* __restrict__ new_v,
    const int* __restrict__ positions, const float* __restrict__ inv_freq,
    const long long* __restrict__ slot_mapping, int interleaved KVS_TMA_DECL) {
  extern __shared__ __align__(16) unsigned char dynamic_smem[];  // kSmemBytes
#if KVS_TC_TMA
  // The tiles from the first 1024-byte boundary (kSmemBytes leaves room for it).
  const unsigned smem_base = static_cast<unsigned>(__cvta_generic_to_shared(dynamic_smem));
  WarpTiles* tiles =
      reinterpret_cast<WarpTiles*>(dynamic_smem + ((kTmaAlign - smem_base % kTmaAlign) % kTmaAlign));
#else
  WarpTiles* tiles = reinterpret_cast<WarpTiles*>(dynamic_smem);
#endif
  __shared__ float merge_m[kWarps][8];
  __shared__ float merge_l[kWarps][8];
  kvs_wait_prior();  // PDL (scalar.cuh)
  kvs_launch_dependents();

  // kRope: the group's query rows rotated by this CTA, which also writes the new token's K
  // and V when its partition holds it (rope_and_cache_rows; the tiles' memory holds the rows
  // until every warp has its q fragments: `rotated` barriers below).
  constexpr bool rotated = kRope;
  const scalar_t* q_rot = nullptr;
  if (rotated) {
    q_rot = rope_and_cache_rows(tiles, q, k_cache, v_cache, new_k, new_v, positions, inv_freq,
                                slot_mapping, interleaved, context_lens, window, partition_size,
                                max_parts, num_kv_heads, block_size, block_shift, block_bytes);
    if (q_rot == nullptr) return;
  }

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
  const scalar_t* q_group =
      rotated ? q_rot : q + (static_cast<long long>(seq) * num_heads + head * GQA_GROUP) * HEAD_DIM;
#if KVS_TC_T16
  // Fragment coordinates: rows g and g + 8 of A and of D, column g of B; columns 2 t, 2 t + 1
  // of D (query heads 2 t + e, e = 0, 1).
  const int g = lane / 4, t = lane % 4;
  const float scale2 = scale * kLog2e;  // logits in log2 units: exp2 below

  // B of K q^T: q^T, column g = query head head * GQA_GROUP + g (zero past the group); k step
  // s: channels 16 s + 2 t, + 1 (b0) and 16 s + 2 t + 8, + 9 (b1).
  unsigned qb[kKSteps][2];
  {
    const bool live = g < GQA_GROUP;
    const unsigned* qrow =
        reinterpret_cast<const unsigned*>(q_group + (live ? g : 0) * HEAD_DIM);
#pragma unroll
    for (int s = 0; s < kKSteps; ++s) {
      qb[s][0] = live ? qrow[8 * s + t] : 0u;
      qb[s][1] = live ? qrow[8 * s + t + 4] : 0u;
    }
  }
#if KVS_TC_TMA
  // The rotated q rows and angles in the tiles' memory, and the new token's K and V in the
  // cache, are generic-proxy writes that TMA (the async proxy) overwrites / reads next.
  if (rotated) fence_proxy_async();
#endif
  if (rotated) __syncthreads();  // every warp has its q fragments: the tiles are free

  // Online softmax state of heads 2 t + e (log2 units; l over this lane's tokens only, summed
  // over the lanes g at the end) and O^T: o[mt][2 h + e] = O[head 2 t + e][channel 16 mt + g +
  // 8 h].
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kMTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

#if KVS_TC_WS
  WarpTiles& w = tiles[0];  // the CTA's ring, filled by the producer warp
#else
  WarpTiles& w = tiles[warp];
#endif
  // This lane's ldmatrix row: of K (A of S^T, not transposed), matrix lane / 8 is tokens
  // 8 ((lane / 8) % 2) .. + 7 of channels 8 (lane / 16) .. + 7 of a k step; of V (A of O^T,
  // transposed), tokens 8 (lane / 16) .. + 7 of channels 8 ((lane / 8) % 2) .. + 7 of an m tile.
  // Padded rows (kRowBytes = 17 x 16 B): the 8 rows of a matrix are on distinct banks.
#if KVS_TC_TMA
  // TMA tiles (tma_chunk_offset): K row (lane & 7) + 8 ((lane >> 3) & 1), chunk 2 ks +
  // (lane >> 4) is at box row ((lane >> 3) & 1), half ks / 4, line lane & 7, chunk position
  // (2 (ks % 4) + (lane >> 4)) ^ (lane & 7) = 2 (ks % 4) ^ ((lane >> 4) ^ (lane & 7)) (2 (ks %
  // 4) is even): the lane's base holds (lane >> 4) ^ (lane & 7) in address bits 4-6 and
  // tc_addr flips bits 5-6 by 2 (ks % 4) (nothing else of the address touches bits 4-6: the
  // tiles are 1024-byte aligned, lines 128). V alike with (lane >> 3) & 1 and lane >> 4
  // exchanged, m tile mt for ks.
  const unsigned k_lane =
      static_cast<unsigned>(__cvta_generic_to_shared(&w.k[0][0][0])) +
      ((lane >> 3) & 1) * kTmaBoxBytes + (lane & 7) * 128 + (((lane >> 4) ^ (lane & 7)) << 4);
  const unsigned v_lane =
      static_cast<unsigned>(__cvta_generic_to_shared(&w.v[0][0][0])) + (lane >> 4) * kTmaBoxBytes +
      (lane & 7) * 128 + ((((lane >> 3) & 1) ^ (lane & 7)) << 4);
  // The address of 16-channel step j (K: k step; V: m tile) from a lane's base.
  const auto tc_addr = [](unsigned base, int j) {
    return (base + (j / 4) * 1024) ^ static_cast<unsigned>(32 * (j % 4));
  };
#else
  const unsigned k_lane = static_cast<unsigned>(__cvta_generic_to_shared(
      &w.k[0][(lane & 7) + 8 * ((lane >> 3) & 1)][16 * (lane >> 4)]));
  const unsigned v_lane = static_cast<unsigned>(__cvta_generic_to_shared(
      &w.v[0][(lane & 7) + 8 * (lane >> 4)][16 * ((lane >> 3) & 1)]));
  const auto tc_addr = [](unsigned base, int j) { return base + 32 * j; };
#endif
  const auto tile = [&](int stage, int t0) {
    // S^T = K q^T: acc[x][2 h + e] is token t0 + g + 8 h, head 2 t + e, over the k steps of
    // parity x (two chains of dependent mma, half as long as one).
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const unsigned k_addr = k_lane + stage * static_cast<unsigned>(sizeof(w.k[0]));
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      unsigned a[4];
      ldmatrix_x4(a, tc_addr(k_addr, ks));
      mma(acc[ks % 2], a, qb[ks][0], qb[ks][1]);
    }
    float st[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int tok = t0 + g + 8 * h;
      const bool live = tok >= p_start && tok < p_end;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float x = acc[0][2 * h + e] + acc[1][2 * h + e];
        st[2 * h + e] = live ? x * scale2 : -INFINITY;
      }
    }
    float alpha[2], pr[4];
    online_softmax_transposed(st, m, l, alpha, pr);
    // Rescale O only when a head's max moved somewhere in the warp (alpha is exactly 1
    // otherwise).
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
      rescale_transposed(o, alpha[0], alpha[1]);
    }
    // O^T += V^T P^T: B = P^T, the S^T fragments (rows: tokens g, g + 8; columns: heads 2 t,
    // 2 t + 1) packed and transposed into B fragments (rows: tokens 2 t, 2 t + 1 | 2 t + 8,
    // 2 t + 9; column: head g). A: ldmatrix.x4.trans of the V tile, one per m tile.
    const unsigned b0 = transpose8x8(pack_float(pr[0], pr[1]));
    const unsigned b1 = transpose8x8(pack_float(pr[2], pr[3]));
    const unsigned v_addr = v_lane + stage * static_cast<unsigned>(sizeof(w.v[0]));
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      unsigned a[4];
      ldmatrix_x4_trans(a, tc_addr(v_addr, mt));
      mma(o[mt], a, b0, b1);
    }
  };
#if KVS_TC_WS
  // The producer warp leaves with m = -inf, l = 0: it takes part in the merge's barriers only.
  ws_stream_tiles(w, pt, k_cache, v_cache, table, block_shift, block_size, block_bytes, head,
                  warp, lane, tile);
#elif KVS_TC_TMA
  tma_stream_tiles(w, pt, k_map, v_map, k_cache, v_cache, table, block_shift, block_size,
                   num_kv_heads, block_bytes, head, warp, lane, tile);
#else
  stream_tiles(w, pt, k_cache, v_cache, table, block_shift, block_size, num_kv_heads,
               block_bytes, head, lane, tile);
#endif

  // Merge the warps as the other bodies do: (m, l) per head, O through the tiles' memory.
  float mine[2];
  float* o_sh = merge_warps_transposed(tiles, m, l, merge_m, merge_l, warp, lane, mine);
  if (warp < kWarps) {  // (not the producer warp of warp specialization: it has no rows)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float* row = o_sh + (warp * 8 + 2 * t + e) * HEAD_DIM + g;
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        row[16 * mt] = o[mt][e] * mine[e];
        row[16 * mt + 8] = o[mt][2 + e] * mine[e];
      }
    }
  }
#elif !KVS_TC_INT4 && !KVS_TC_INT8
  // Row r of the A operand is query head head * GQA_GROUP + r (r < GQA_GROUP), else zero.
  const int r = lane / 4;          // this lane's row (r + 8 is padding)
  const int kq = (lane % 4) * 2;   // this lane's first column within a k step / n tile
  const bool row_live = r < GQA_GROUP;

  // The A operand (q) for every k step: a[1] and a[3] (rows r + 8) stay zero.
  unsigned qa[kKSteps][4];
  {
    const scalar_t* qrow = q_group + (row_live ? r : 0) * HEAD_DIM;
#pragma unroll
    for (int s = 0; s < kKSteps; ++s) {
      qa[s][0] = row_live ? pack(qrow[16 * s + kq], qrow[16 * s + kq + 1]) : 0u;
      qa[s][2] = row_live ? pack(qrow[16 * s + kq + 8], qrow[16 * s + kq + 9]) : 0u;
      qa[s][1] = 0u;
      qa[s][3] = 0u;
    }
  }
  if (rotated) __syncthreads();  // every warp has its q fragments: the tiles are free
  const float scale2 = scale * kLog2e;  // logits in log2 units: exp2 below

  // Online softmax state of row r (in log2 units) and this lane's slice of the output row:
  // o[j][0..1] = O[r][8 j + kq .. + 1].
  float m = -INFINITY, l = 0.f;
  float o[kNTiles][2];
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) o[j][0] = o[j][1] = 0.f;

  WarpTiles& w = tiles[warp];
  stream_tiles(w, pt, k_cache, v_cache, table, block_shift, block_size, num_kv_heads,
               block_bytes, head, lane, [&](int stage, int t0) {
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
  static_assert(kTilesBytes >= kWarps * 8 * HEAD_DIM * sizeof(float), "merge space");
  __syncthreads();  // everyone has read merge_*; the tiles are free
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    o_sh[(warp * 8 + r) * HEAD_DIM + 8 * j + kq] = o[j][0] * mine;
    o_sh[(warp * 8 + r) * HEAD_DIM + 8 * j + kq + 1] = o[j][1] * mine;
  }
#elif KVS_TC_INT4  // the transposed products (see the top of the file)
  // Fragment coordinates: rows g and g + 8 of A and of D, column g of B; columns 2 t, 2 t + 1
  // of D (query heads 2 t + e, e = 0, 1).
  const int g = lane / 4, t = lane % 4;

  // B of K q^T: q^T, column g = query head head * GQA_GROUP + g (zero past the group), k steps
  // in the permuted channel order; Qsum of heads 2 t + e per group (and 16 Qsum).
  unsigned qb[kKSteps][2];
  float qsum[2][kGroups], qsum16[2][kGroups];
  {
    const bool live = g < GQA_GROUP;
    const scalar_t* qrow = q_group + (live ? g : 0) * HEAD_DIM;
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
  if (rotated) __syncthreads();  // every warp has its q fragments: the tiles are free
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
               block_bytes, head, lane, [&](int stage, int t0) {
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
    online_softmax_transposed(st, m, l, alpha, pr);
    // Rescale O and the min sums only when a head's max moved somewhere in the warp (after
    // the first tiles it rarely does; alpha is exactly 1 otherwise).
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
      rescale_transposed(o, alpha[0], alpha[1]);
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

  // The min terms summed over the lanes g (the tokens; l is, in the merge below), then added
  // to their groups' channels.
#pragma unroll
  for (int e = 0; e < 2; ++e) {
#pragma unroll
    for (int x = 4; x < 32; x *= 2) {
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
  float mine[2];
  float* o_sh = merge_warps_transposed(tiles, m, l, merge_m, merge_l, warp, lane, mine);
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
#else  // int8: transposed like int4, both products fp16 mma (see the top of the file)
  // Fragment coordinates: rows g and g + 8 of A and of D, column g of B; columns 2 t, 2 t + 1
  // of D (query heads 2 t + e, e = 0, 1).
  const int g = lane / 4, t = lane % 4;

  // B of K q^T: q^T in fp16, column g = query head head * GQA_GROUP + g (zero past the group);
  // k step s holds lane t's channels 4 (kKSteps t + s) + {0, 2} (b0: k 2 t, 2 t + 1) and
  // + {1, 3} (b1: k 2 t + 8, 2 t + 9). bf16 q is multiplied by qf = 2^sigma of its head (max
  // |q| qf in [2^14, 2^15); qf within [2^-114, 2^99]): a bf16 value so scaled is exact in fp16
  // unless it is below max |q| 2^-31. fp16 q is used as is. Per head 2 t + e: qoff = 1152 Qsum
  // (of the scaled q: the codes' offset) and qscale = scale log2(e) / qf.
  unsigned qb[kKSteps][2];
  float qoff[2], qscale[2];
  const float scale2 = scale * kLog2e;  // logits in log2 units: exp2 below
  {
    const bool live = g < GQA_GROUP;
    const uint2* qrow = reinterpret_cast<const uint2*>(q_group + (live ? g : 0) * HEAD_DIM);
    float x[kKSteps][4];
    float amax = 0.f;
#pragma unroll
    for (int s = 0; s < kKSteps; ++s) {
      const uint2 u = live ? qrow[kKSteps * t + s] : make_uint2(0u, 0u);  // channels 4 (..) + 0..3
      const float2 lo = unpack_act(u.x), hi = unpack_act(u.y);
      x[s][0] = lo.x;
      x[s][1] = lo.y;
      x[s][2] = hi.x;
      x[s][3] = hi.y;
      amax = fmaxf(amax, fmaxf(fmaxf(fabsf(lo.x), fabsf(lo.y)), fmaxf(fabsf(hi.x), fabsf(hi.y))));
    }
#if SCALAR == 0
    const float qf = 1.f;
    (void)amax;
#else
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    const unsigned expo = max((__float_as_uint(amax) >> 23) & 0xffu, 42u);
    const float qf = __uint_as_float((268u - expo) << 23);      // 2^(141 - expo)
    const float inv_qf = __uint_as_float((expo - 14u) << 23);  // 2^(expo - 141)
#endif
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < kKSteps; ++s) {
      const float a0 = x[s][0] * qf, a1 = x[s][1] * qf, a2 = x[s][2] * qf, a3 = x[s][3] * qf;
      qb[s][0] = pack_half(a0, a2);
      qb[s][1] = pack_half(a1, a3);
      sum += (a0 + a1) + (a2 + a3);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);  // head g's Qsum over the quad's channels
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      qoff[e] = kCodeOffset * __shfl_sync(0xffffffffu, sum, 4 * (2 * t + e));
#if SCALAR == 0
      qscale[e] = scale2;
#else
      qscale[e] = scale2 * __shfl_sync(0xffffffffu, inv_qf, 4 * (2 * t + e));
#endif
    }
  }
  if (rotated) __syncthreads();  // every warp has its q fragments: the tiles are free

  // Online softmax state of heads 2 t + e (log2 units; l over this lane's tokens only, summed
  // over the lanes g at the end) and O^T scaled by f: o[2 b + x][2 h + e] = f O[head 2 t + e]
  // [channel 32 b + 16 h + 2 g + x] plus 1152 vsum[e], vsum[e] = sum_t B_t of head 2 t + e
  // (vsum[2 + e]: the zero rows of its A). f = 2^126 until the first tile's V scales lower it.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kMTiles][4];
  float vsum[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned fbits = 253u << 23;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

  WarpTiles& w = tiles[warp];
  // This lane's ldmatrix row of a V tile: matrix lane / 8 is tokens 8 (lane / 16) .. + 7 of
  // chunk 2 b + (lane / 8) % 2 (b: the 32-channel block).
  const unsigned v_lane = static_cast<unsigned>(__cvta_generic_to_shared(
      &w.v[0][(lane & 7) + 8 * (lane >> 4)][16 * ((lane >> 3) & 1)]));
  stream_tiles(w, pt, k_cache, v_cache, table, block_shift, block_size, num_kv_heads,
               block_bytes, head, lane, [&](int stage, int t0) {
    // S^T = K q^T: rows g, g + 8 are tokens t0 + g, t0 + g + 8, lane t's K chunks
    // kChunksPerLane t + j of them (k_chunk: the same swizzle for both rows); A = 1152 + code.
    // acc[2 h + e]: token t0 + g + 8 h, head 2 t + e.
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < kChunksPerLane; ++j) {
      const int col = 16 * k_chunk(g, kChunksPerLane * t + j);
      const uint4 x = *reinterpret_cast<const uint4*>(&w.k[stage][g][col]);
      const uint4 y = *reinterpret_cast<const uint4*>(&w.k[stage][g + 8][col]);
      const unsigned xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const unsigned xf = flip_codes(xs[i]), yf = flip_codes(ys[i]);
        const unsigned a[4] = {code_pair<kSel02>(xf), code_pair<kSel02>(yf),
                               code_pair<kSel13>(xf), code_pair<kSel13>(yf)};
        mma_f16(acc, a, qb[4 * j + i][0], qb[4 * j + i][1]);
      }
    }
    // The offset and scales, the mask, log2 units; then the online softmax of heads 2 t + e
    // over the lanes g (as int4).
    float st[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sk = w.k_scale[stage][g + 8 * h];
      const int tok = t0 + g + 8 * h;
      const bool live = tok >= p_start && tok < p_end;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        st[2 * h + e] = live ? (acc[2 * h + e] - qoff[e]) * (sk * qscale[e]) : -INFINITY;
      }
    }
    float alpha[2], pr[4];
    online_softmax_transposed(st, m, l, alpha, pr);
    // f: the largest power of two with f max s_v < 2^15 over the warp's tokens so far, so that
    // B = p s_v f (p <= 1) is a normal fp16 value or a negligible one (fp16 has 5 exponent
    // bits; the scales f32's 8). Lowered (and O rescaled) only when a tile brings a V scale of a
    // higher binade than any before: f_new = min(f, 2^(141 - exponent(max s_v))).
    const float sv0 = w.v_scale[stage][g], sv1 = w.v_scale[stage][g + 8];
    float smax = fmaxf(sv0, sv1);
    smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 4));
    smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 8));
    smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 16));
    const unsigned fnew = min(fbits, (268u << 23) - (__float_as_uint(smax) & 0x7f800000u));
    // Rescale O and vsum only when a head's max moved somewhere in the warp or f moved (after
    // the first tiles both are rare; alpha is exactly 1 otherwise). f_new / f = f_new times
    // 1 / f (bits (254 << 23) - fbits, f in [2^-113, 2^126]): exact, or 0 below f32's range.
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f) || fnew != fbits) {
      const float ratio = __uint_as_float(fnew) * __uint_as_float((254u << 23) - fbits);
      const float r0 = alpha[0] * ratio, r1 = alpha[1] * ratio;
      rescale_transposed(o, r0, r1);
      vsum[0] *= r0;
      vsum[1] *= r1;
      fbits = fnew;
    }
    // O^T += V^T B: B = fp16(p s_v f) packed as the S^T fragments (rows: tokens g, g + 8;
    // columns: heads 2 t, 2 t + 1) and transposed into B fragments (rows: tokens 2 t, 2 t + 1
    // | 2 t + 8, 2 t + 9; column: head g); vsum += ones B. A: ldmatrix.x4.trans of the codes:
    // y[i] = channels 32 b + 16 (i % 2) + 2 g, + 1 of tokens 2 t, 2 t + 1 (+ 8 for i >= 2),
    // bytes 0, 2 of the flipped word the first channel's pair (m tile 2 b, rows g | g + 8),
    // bytes 1, 3 the second's (m tile 2 b + 1).
    const float f = __uint_as_float(fbits);
    const float s0 = sv0 * f, s1 = sv1 * f;
    const unsigned b0 = transpose8x8(pack_half(pr[0] * s0, pr[1] * s0));
    const unsigned b1 = transpose8x8(pack_half(pr[2] * s1, pr[3] * s1));
    {
      const unsigned ones[4] = {kHalfOnes, 0u, kHalfOnes, 0u};  // rows 0..7 of A
      mma_f16(vsum, ones, b0, b1);
    }
    const unsigned v_addr = v_lane + stage * static_cast<unsigned>(sizeof(w.v[0]));
#pragma unroll
    for (int b = 0; b < HEAD_DIM / 32; ++b) {
      unsigned y[4];
      ldmatrix_x4_trans(y, v_addr + 32 * b);
#pragma unroll
      for (int i = 0; i < 4; ++i) y[i] = flip_codes(y[i]);
      const unsigned a0[4] = {code_pair<kSel02>(y[0]), code_pair<kSel02>(y[1]),
                              code_pair<kSel02>(y[2]), code_pair<kSel02>(y[3])};
      mma_f16(o[2 * b], a0, b0, b1);
      const unsigned a1[4] = {code_pair<kSel13>(y[0]), code_pair<kSel13>(y[1]),
                              code_pair<kSel13>(y[2]), code_pair<kSel13>(y[3])};
      mma_f16(o[2 * b + 1], a1, b0, b1);
    }
  });

  // Merge the warps as the other dtypes do: (m, l) per head, O through the tiles' memory, with
  // the codes' offset taken out and f undone (1 / f: bits (254 << 23) - fbits, a normal f32).
  float mine[2];
  float* o_sh = merge_warps_transposed(tiles, m, l, merge_m, merge_l, warp, lane, mine);
  const float inv_f = __uint_as_float((254u << 23) - fbits);
  mine[0] *= inv_f;
  mine[1] *= inv_f;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const float off = kCodeOffset * vsum[e];
    float* row = o_sh + (warp * 8 + 2 * t + e) * HEAD_DIM + 2 * g;
#pragma unroll
    for (int b = 0; b < HEAD_DIM / 32; ++b) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        *reinterpret_cast<float2*>(row + 32 * b + 16 * h) =
            make_float2((o[2 * b][2 * h + e] - off) * mine[e],
                        (o[2 * b + 1][2 * h + e] - off) * mine[e]);
      }
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
  static_assert(kTilesBytes >= Merge::kSmemFloats * sizeof(float), "merge scratch");
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

}  // namespace kvserve

using namespace kvserve;

// The parameters both entries share, in their order, and the same as arguments.
#define KVS_DECODE_TC_PARAMS                                                                  \
  scalar_t* __restrict__ out, float* __restrict__ tmp_out, float* __restrict__ max_logits,    \
      float* __restrict__ exp_sums, const scalar_t* __restrict__ q,                           \
      unsigned char* __restrict__ k_cache, unsigned char* __restrict__ v_cache,               \
      const int* __restrict__ block_tables, const int* __restrict__ context_lens, float scale, \
      int num_kv_heads, int block_size, int block_shift, long long block_bytes,               \
      int max_blocks, int partition_size, int max_parts, int window,                          \
      unsigned* __restrict__ counters
#define KVS_DECODE_TC_ARGS                                                                    \
  out, tmp_out, max_logits, exp_sums, q, k_cache, v_cache, block_tables, context_lens, scale, \
      num_kv_heads, block_size, block_shift, block_bytes, max_blocks, partition_size,         \
      max_parts, window, counters

// Decode attention over the cache (q rotated, the step's K and V already written).
extern "C" __global__ void __launch_bounds__(kThreads, kMinCtas)
    paged_decode_tc(KVS_DECODE_TC_PARAMS KVS_TMA_PARAMS) {
  decode_tc<false>(KVS_DECODE_TC_ARGS, nullptr, nullptr, nullptr, nullptr, nullptr,
                   0 KVS_TMA_ARGS);
}

// The same with rope_and_cache's work folded in (PagedDecoder::run_with_rope): q unrotated,
// new_k and new_v ([num_seqs][num_kv_heads][HEAD_DIM], k unrotated) not yet in the cache; each
// sequence's single new token at position positions[seq] = context_lens[seq] - 1 goes into
// slot slot_mapping[seq] (negative: nothing written) of the block its table gives that
// position; inv_freq [HEAD_DIM / 2]; interleaved: pairs (2i, 2i + 1), else (i, i + HEAD_DIM / 2).
extern "C" __global__ void __launch_bounds__(kThreads, kMinCtas)
    paged_decode_tc_rope(KVS_DECODE_TC_PARAMS, const scalar_t* __restrict__ new_k,
                         const scalar_t* __restrict__ new_v, const int* __restrict__ positions,
                         const float* __restrict__ inv_freq,
                         const long long* __restrict__ slot_mapping,
                         int interleaved KVS_TMA_PARAMS) {
  decode_tc<true>(KVS_DECODE_TC_ARGS, new_k, new_v, positions, inv_freq, slot_mapping,
                  interleaved KVS_TMA_ARGS);
}
