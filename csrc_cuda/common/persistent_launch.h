// Launch of a persistent scheduled decode kernel, cooperatively when it merges the pieces
// itself (DecodeParams::tail_merge: a grid-wide barrier needs every CTA resident at once, which
// a cooperative launch guarantees and checks). Host code only.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <utility>

#include "check.h"
#include "params.h"
#include "schedule.cuh"

namespace portmla {

// Whether `ctas` CTAs of kKernel (threads, dynamic shared memory smem) fit on the current
// device at once, and the device takes cooperative launches. The occupancy is computed once
// per kernel and device (a kernel's block shape and shared memory never change).
template <auto kKernel>
bool all_resident(int threads, int smem, int64_t ctas) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> fits[kMaxDevices];  // 0 unknown, else CTAs the device holds + 1
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return false;
  if (fits[dev].load(std::memory_order_relaxed) == 0) {
    int sms = 0, coop = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, threads, smem) !=
            cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    fits[dev].store(1 + (coop ? sms * per_sm : 0), std::memory_order_relaxed);
  }
  return ctas <= fits[dev].load(std::memory_order_relaxed) - 1;
}

// Rows of cut sequences a CTA may merge at the end (sm80/decode/combine.cuh: tail_merge) up to
// which the kernel merges them itself: one round of an 8-warp kernel's warps, two rows each (two
// rounds for the narrow Hopper kernel's 4 warps). H100 A/B (graph
// replays, same build, two rounds): the 16-head rows gain 1-3 us (128q1s8k 447.1 -> 443.8-444.0
// us, 15.5 rows a CTA; 64q1s32k 819.8-820.3 -> 818.4-819.2; fp8 128q1s8k 249.1-251.3 ->
// 247.6-248.4), b=1 / b=8 are even (one row a CTA: the grid barrier's ~2 us and the merge's
// ~4.8 us against the merge kernel's launch gap and 5.4 us), the 128-head large batches (63 rows
// a CTA) lose 7-20 us (128q1s4k 311.2-311.7 -> 319.0-319.2): the merge kernel's 64 warps an SM
// keep more loads in flight than a decode CTA's 8.
constexpr int64_t kTailMaxRowsPerCta = 16;

// The TailMerge of the last launch_persistent (last_tail_merge(): a test hook).
inline std::atomic<int> g_last_tail_merge{kTailOff};

// The in-kernel merges a scheduled kernel takes (launch_persistent's `takes`).
enum TailTakes : int { kTakesNone = 0, kTakesArrive = 1, kTakesCount = 2 };

// Rows per CTA of the kernel that counts its pieces (the pair kernel's 64-row tile): the merge
// kernel's counter of cut sequence b, row r is sched_arrive[b x count_tiles(p) + r / 64].
constexpr int kCountRows = 64;
inline int count_tiles(const DecodeParams& p) {
  return static_cast<int>((static_cast<int64_t>(p.max_query_len) * p.num_heads + kCountRows - 1) /
                          kCountRows);
}

// Whether a kernel that takes kTailCount does (the launcher reports it to the caller, which
// then launches the merge kernel polling the counts): the merge asked for and the schedule
// kernel run (it zeroes the counters), one query token a sequence, the merge kernel's many-rows
// form, and more rows to merge than the grid-barrier merge takes (where that one applies it runs
// instead, no merge kernel at all). One token: H100, 128 heads, paired with the plain merge
// kernel over three calls, medians of 5-9 graph-replay medians, us: 128q1s4k 306.0 vs 311.7 (every
// sample), 64q1s16k 565.0 vs 578.9, 128q1s8k 566.8 vs 574.1 varlen and 562 vs 550.5 fixed; two
// tokens (128q2s4k, four row tiles) 577.5 vs 560.3: slower there, so not taken.
inline bool tail_count_taken(const DecodeParams& p) {
  const int64_t ctas = static_cast<int64_t>(count_tiles(p)) * p.num_parts;
  return p.tail_merge && p.tail_count && p.max_query_len == 1 && p.num_parts > 1 &&
         !sched_inline(p) && p.sched_arrive != nullptr && pieces_many_rows(p) &&
         sched_max_cut(p) * p.part_rows > kTailMaxRowsPerCta * ctas;
}

// Launches kKernel<<<grid, threads, smem, stream>>>(args..., p') where p' is p with tail_merge
// set to the merge the kernel runs itself when one was asked for (p.tail_merge) and some
// sequence can be cut (num_parts > 1); *took is the TailMerge it took (kTailOff and kTailCount:
// the caller runs the merge kernel). took == nullptr: never. kTailArrive where the kernel takes
// it (`takes`), the schedule kernel ran (it zeroes the counters: not sched_inline) and
// p.sched_arrive is given; kTailCount where the kernel takes it and tail_count_taken (the caller
// launches the merge kernel as this kernel's programmatic dependent); else kTailBarrier where
// the rows to merge come to at most kTailMaxRowsPerCta a CTA and the grid fits at once (then
// cooperatively).
template <auto kKernel, typename... Args>
cudaError_t launch_persistent(dim3 grid, int threads, int smem, cudaStream_t stream,
                              const DecodeParams& p, int* took, int takes, Args&&... args) {
  DecodeParams pl = p;
  const int64_t ctas = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  const bool wanted = took != nullptr && p.tail_merge && p.num_parts > 1;
  pl.tail_merge = kTailOff;
  if (wanted && (takes & kTakesArrive) && !sched_inline(p) && p.sched_arrive != nullptr) {
    pl.tail_merge = kTailArrive;
  } else if (wanted && (takes & kTakesCount) && tail_count_taken(p)) {
    pl.tail_merge = kTailCount;
  } else if (wanted && sched_max_cut(p) * p.part_rows <= kTailMaxRowsPerCta * ctas &&
             all_resident<kKernel>(threads, smem, ctas)) {
    pl.tail_merge = kTailBarrier;
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = pl.tail_merge == kTailBarrier ? attr : nullptr;
  cfg.numAttrs = pl.tail_merge == kTailBarrier ? 1 : 0;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kKernel, std::forward<Args>(args)..., pl);
  const int mode = e == cudaSuccess ? pl.tail_merge : kTailOff;
  g_last_tail_merge.store(mode, std::memory_order_relaxed);
  if (took != nullptr) *took = mode;
  return e;
}

// A scheduled decode kernel over its whole grid: rows_per_cta rows of a sequence a CTA (row
// tiles on x), p.num_parts parts (y; each CTA walks its part's segments), `smem` bytes of
// dynamic shared memory opted in to; launched by launch_persistent with args..., p'
// (`takes`: the in-kernel merges the kernel takes, TailTakes).
template <auto kKernel, typename... Args>
cudaError_t launch_scheduled(int rows_per_cta, int threads, int smem, cudaStream_t stream,
                            const DecodeParams& p, int* took, int takes, Args&&... args) {
  PORTMLA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int m_tiles = (p.max_query_len * p.num_heads + rows_per_cta - 1) / rows_per_cta;
  PORTMLA_RETURN_IF_ERROR(launch_persistent<kKernel>(dim3(m_tiles, p.num_parts), threads, smem,
                                                     stream, p, took, takes,
                                                     std::forward<Args>(args)...));
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace portmla
