// decode_schedule_kernel: the device-side split schedule of common/schedule.cuh, one block.
// Two block-wide scans over the sequences: units before each sequence, then the partial slots
// of the sequences that part boundaries cut. 64-bit unit counts (long sequences x big batches).
// It also zeroes the last-piece merge's counters (DecodeParams::sched_arrive) when given.
// With DecodeParams::sched_prefetch the grid has more blocks: each redoes the first scan (it only
// reads seq_lens) and prefetches the first KV tiles of its share of the parts into L2, so that
// HBM works while the decode kernel launches and walks to them. One block's bulk prefetches
// leave its SM at ~240 GB/s (H100: 19 MB of first tiles took one block 78 us), so one part a
// block; block 0 writes the schedule and prefetches nothing.
#include "../../common/check.h"
#include "../../common/schedule.cuh"

namespace portmla {
namespace {

// Inclusive scan of v over the block (blockDim.x = kScheduleThreads); *total = the block's sum.
__device__ int64_t block_scan(int64_t v, int64_t* warp_sums, int64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t x = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += x;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t x = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += x;
    }
    if (lane < warps) warp_sums[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v += warp_sums[warp - 1];
  *total = warp_sums[warps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return v;
}

// Bytes of one cache entry (a token's latent and RoPE) in p's format (portmla/kv_formats.py).
__device__ __forceinline__ int64_t entry_bytes(const DecodeParams& p) {
  if (p.kv_format == kKvDsMla) return p.kv_lora_rank + p.kv_lora_rank / 32 + 2 * p.rope_dim;
  return static_cast<int64_t>(p.kv_lora_rank + p.rope_dim) * (p.kv_format == kKv16 ? 2 : 1);
}

// L2 prefetch of the entries of positions [t0, t1) of the sequence whose block-table row is bt:
// the row's pages read kPrefetchPages at a time (independent loads), then one bulk prefetch per page
// run where a page's entries are back to back, else one per entry. Pages outside the cache and
// addresses off 16 bytes are skipped (a prefetch is only a hint).
__device__ void prefetch_positions_l2(const DecodeParams& p, const int32_t* bt, int64_t t0,
                                      int64_t t1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kPrefetchPages = 2;
  const int64_t esz = p.kv_format == kKv16 ? 2 : 1, row = entry_bytes(p);
  const int64_t ps = p.page_stride * esz, ts = p.token_stride * esz, bs = p.block_size;
  const unsigned char* kv = static_cast<const unsigned char*>(p.kv_cache);
  for (int64_t j0 = t0 / bs; j0 * bs < t1; j0 += kPrefetchPages) {
    int64_t page[kPrefetchPages];
#pragma unroll
    for (int k = 0; k < kPrefetchPages; ++k) page[k] = (j0 + k) * bs < t1 ? bt[j0 + k] : -1;
#pragma unroll
    for (int k = 0; k < kPrefetchPages; ++k) {
      if (page[k] < 0 || page[k] >= p.num_blocks) continue;
      const int64_t a = max(t0, (j0 + k) * bs), e = min(t1, (j0 + k + 1) * bs);
      const unsigned char* base = kv + page[k] * ps + (a - (j0 + k) * bs) * ts;
      const bool whole = ts == row;
      for (int64_t i = 0; i < (whole ? 1 : e - a); ++i) {
        const unsigned char* at = base + i * ts;
        const int64_t bytes = whole ? (e - a) * row : row;
        if ((reinterpret_cast<uintptr_t>(at) & 15) == 0 && (bytes & 15) == 0) {
          asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(at),
                       "r"(static_cast<uint32_t>(bytes))
                       : "memory");
        }
      }
    }
  }
#endif
}

// Blocks of the schedule kernel: block 0 and, with a prefetch budget, one a part (only while the
// first scan's values fit one pass: num_seqs <= kScheduleThreads).
int schedule_blocks(const DecodeParams& p) {
  return p.sched_prefetch > 0 && p.num_seqs <= kScheduleThreads ? 1 + p.num_parts : 1;
}

// Blocks 1.. : the thread of sequence b (its units [c0, c1)) prefetches the first tiles of the
// parts that start there (part k at unit k T) and belong to this block (k % (blocks - 1) + 1),
// up to the budget's bytes a part. A part that starts in a sequence's fixed units begins with
// its tile 0; one that starts in a sequence without tiles prefetches nothing.
__device__ void prefetch_part_starts(const DecodeParams& p, int64_t per_part, int b, int64_t c0,
                                     int64_t c1) {
  const int64_t first = c0 + p.sched_fixed, row = entry_bytes(p);
  if (c1 <= first) return;
  const int64_t budget_tiles = (p.sched_prefetch + kSchedTile * row - 1) / (kSchedTile * row);
  const int64_t len = p.seq_lens[b];
  const int32_t* bt = p.block_table + static_cast<int64_t>(b) * p.bt_stride;
  for (int64_t k = (c0 + per_part - 1) / per_part; k * per_part < c1 && k < p.num_parts; ++k) {
    if (k % (gridDim.x - 1) + 1 != blockIdx.x) continue;
    const int64_t lo = k * per_part;
    const int64_t i_lo = lo > first ? lo - first : 0;
    const int64_t i_hi = min(min(c1, lo + per_part) - first, i_lo + budget_tiles);
    prefetch_positions_l2(p, bt, i_lo * kSchedTile, min(i_hi * kSchedTile, len));
  }
}

__global__ void __launch_bounds__(kScheduleThreads) decode_schedule_kernel(const DecodeParams p) {
  __shared__ int64_t warp_sums[32];
  const int B = p.num_seqs, F = p.sched_fixed;
  const bool lead = blockIdx.x == 0;
  if (lead && p.sched_arrive != nullptr) {  // the last-piece merge's counters (params.h: kTailArrive)
    const int64_t n = static_cast<int64_t>(B) * ((static_cast<int64_t>(p.max_query_len) *
                                                 p.num_heads + 15) / 16);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) p.sched_arrive[i] = 0;
  }
  int64_t carry = 0, total = 0, own_lo = 0, own_hi = 0;  // units of sequence threadIdx.x (one pass)
  if (lead && threadIdx.x == 0) p.sched_cum[0] = 0;
  for (int base = 0; base < B; base += blockDim.x) {
    const int b = base + threadIdx.x;
    const int64_t v = b < B ? sched_tiles(p, b) + F : 0;
    const int64_t incl = block_scan(v, warp_sums, &total);
    if (lead && b < B) p.sched_cum[b + 1] = carry + incl;
    own_lo = carry + incl - v;
    own_hi = carry + incl;
    carry += total;
  }
  const int64_t per_part = sched_per_part(carry, p.num_parts);
  if (!lead) {  // schedule_blocks: num_seqs <= blockDim.x, so own_lo / own_hi are this thread's
    if (threadIdx.x < B) prefetch_part_starts(p, per_part, threadIdx.x, own_lo, own_hi);
    return;
  }
  if (threadIdx.x == 0) p.sched_cum[B + 1] = per_part;
  __syncthreads();  // sched_cum (global) is read back by other threads below
  carry = 0;
  int64_t cuts = 0;
  for (int base = 0; base < B; base += blockDim.x) {
    const int b = base + threadIdx.x;
    int64_t pieces = 1;
    if (b < B) {
      const int64_t first = p.sched_cum[b] + F;
      pieces = sched_pieces(first, p.sched_cum[b + 1] - first, per_part);
    }
    const bool cut = b < B && pieces > 1;
    const int64_t v = cut ? pieces : 0;
    const int64_t incl = block_scan(v, warp_sums, &total);
    int64_t cut_total = 0;
    const int64_t cut_incl = block_scan(cut ? 1 : 0, warp_sums, &cut_total);
    if (b < B) {
      p.sched_piece[2 * b] = cut ? static_cast<int32_t>(carry + incl - v) : -1;
      p.sched_piece[2 * b + 1] = static_cast<int32_t>(pieces);
    }
    if (cut) p.sched_cut[cuts + cut_incl] = b;  // 1 + (cut sequences before b)
    carry += total;
    cuts += cut_total;
  }
  if (threadIdx.x == 0) p.sched_cut[0] = static_cast<int32_t>(cuts);
}

}  // namespace

cudaError_t launch_decode_schedule(const DecodeParams& p, cudaStream_t stream) {
  if (p.num_parts < 1 || p.sched_fixed < 1 || p.sched_cum == nullptr || p.sched_piece == nullptr ||
      p.sched_cut == nullptr) {
    return cudaErrorInvalidValue;
  }
  decode_schedule_kernel<<<schedule_blocks(p), kScheduleThreads, 0, stream>>>(p);
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace portmla
