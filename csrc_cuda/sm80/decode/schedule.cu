// decode_schedule_kernel: the device-side split schedule of common/schedule.cuh, one block.
// Two block-wide scans over the sequences: units before each sequence, then the partial slots
// of the sequences that part boundaries cut. 64-bit unit counts (long sequences x big batches).
// It also zeroes the last-piece merge's counters (DecodeParams::sched_arrive) when given.
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

__global__ void __launch_bounds__(kScheduleThreads) decode_schedule_kernel(const DecodeParams p) {
  __shared__ int64_t warp_sums[32];
  const int B = p.num_seqs, F = p.sched_fixed;
  if (p.sched_arrive != nullptr) {  // the last-piece merge's counters (params.h: kTailArrive)
    const int64_t n = static_cast<int64_t>(B) * ((static_cast<int64_t>(p.max_query_len) *
                                                 p.num_heads + 15) / 16);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) p.sched_arrive[i] = 0;
  }
  int64_t carry = 0, total = 0;
  if (threadIdx.x == 0) p.sched_cum[0] = 0;
  for (int base = 0; base < B; base += blockDim.x) {
    const int b = base + threadIdx.x;
    const int64_t v = b < B ? sched_tiles(p, b) + F : 0;
    const int64_t incl = block_scan(v, warp_sums, &total);
    if (b < B) p.sched_cum[b + 1] = carry + incl;
    carry += total;
  }
  const int64_t per_part = sched_per_part(carry, p.num_parts);
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
  decode_schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(p);
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace portmla
