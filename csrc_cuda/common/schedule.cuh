// Device-side split schedule of the persistent decode kernels (the Hopper kernels).
//
// Computed on the device from seq_lens by decode_schedule_kernel on every call, so a CUDA graph
// replays it with whatever lengths the batch has now (nothing is read back to the host).
// Work is counted in units: a sequence costs one unit per KV tile of 64 positions plus
// p.sched_fixed units (its Q load and epilogue). The sequences' units are laid end to end and
// part k of p.num_parts takes units [k T, (k + 1) T) with T = ceil(total / num_parts): every
// part (one CTA per row tile) gets the same work whatever the mix of lengths. A sequence that a
// part boundary cuts is computed in pieces, each writing its partials (q's dtype) + LSE to its
// own slot; the others write the output directly. decode_combine_pieces merges the pieces.
//
//   sched_cum[b]      units before sequence b (b = 0 .. B), sched_cum[B + 1] = T
//   sched_piece[2 b]  first partial slot of sequence b, -1 when it is one piece
//   sched_piece[2b+1] its pieces
//   sched_cut[0]      how many sequences are cut, sched_cut[1 + k] the k-th of them (the merge's
//                     grid is sized by the bound min(num_seqs, num_parts - 1), not by num_seqs)
// Slots: a boundary adds one piece and makes at most one more sequence split, so the split
// sequences hold at most 2 (num_parts - 1) pieces.
//
// Small batches (num_seqs <= kSchedInlineSeqs) skip the schedule kernel: one warp of every
// decode CTA computes the same arrays into its shared memory (SchedTable, sched_fill_warp), and
// CTA (0, 0) also writes them to the scratch for the merge. That takes a launch and its gap
// (~4-5 us on an H100) off a call whose whole KV read is tens of microseconds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "params.h"

namespace portmla {

constexpr int kSchedTile = 64;  // positions per unit (the Hopper kernels' KV tile)

// KV tiles of sequence b (the last query token sees seq_len positions).
__device__ __forceinline__ int sched_tiles(const DecodeParams& p, int b) {
  const int len = p.seq_lens[b];
  return len > 0 ? static_cast<int>((static_cast<int64_t>(len) + kSchedTile - 1) / kSchedTile) : 0;
}

// T: units per part from the total (>= 1).
__host__ __device__ __forceinline__ int64_t sched_per_part(int64_t total, int num_parts) {
  return total > 0 ? (total + num_parts - 1) / num_parts : 1;
}

// Pieces of a sequence whose n KV tiles start at unit `first` (1 without tiles).
__host__ __device__ __forceinline__ int64_t sched_pieces(int64_t first, int64_t n,
                                                         int64_t per_part) {
  return n > 0 ? (first + n - 1) / per_part - first / per_part + 1 : 1;
}

// Sequences a schedule of num_parts parts can cut: each part boundary cuts at most one.
__host__ __device__ __forceinline__ int sched_max_cut(const DecodeParams& p) {
  return p.num_seqs < p.num_parts - 1 ? p.num_seqs : p.num_parts - 1;
}

// Whether the pieces' merge takes its many-rows form (sm80/decode/decode_kernel.cuh:
// launch_decode_combine_pieces): more than 2048 rows of cut sequences at most.
__host__ __device__ __forceinline__ bool pieces_many_rows(const DecodeParams& p) {
  return static_cast<int64_t>(p.max_query_len) * p.num_heads * sched_max_cut(p) > 2048;
}

// kTailCount (params.h): programmatic dependent launch of the merge kernel (sm_90+; no-ops
// below and when the kernel was not launched that way), and the count it polls.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// The piece counter (DecodeParams::sched_arrive) of sequence b and this CTA's row tile (the
// grid's x dimension), which the kTailArrive / kTailCount kernels count their stored pieces in.
__device__ __forceinline__ int* piece_counter(const DecodeParams& p, int b) {
  return p.sched_arrive + static_cast<int64_t>(b) * gridDim.x + blockIdx.x;
}
__device__ __forceinline__ int ld_acquire_gpu(const int* ptr) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// Up to this many sequences the decode kernels compute the schedule themselves.
constexpr int kSchedInlineSeqs = 32;
__host__ __device__ __forceinline__ bool sched_inline(const DecodeParams& p) {
  return p.num_seqs <= kSchedInlineSeqs;
}

// A CTA's copy of the schedule arrays (the layout of sched_cum / sched_piece) when sched_inline.
struct SchedTable {
  int64_t cum[kSchedInlineSeqs + 2];
  int32_t piece[2 * kSchedInlineSeqs];
};

// One whole warp (sched_inline): decode_schedule_kernel's arithmetic on a warp scan, into `t`;
// `publish`: also into the scratch arrays and sched_cut, which the pieces' merge reads.
__device__ __forceinline__ void sched_fill_warp(const DecodeParams& p, SchedTable& t,
                                                bool publish, int lane) {
  const int B = p.num_seqs, F = p.sched_fixed;
  const int64_t v = lane < B ? sched_tiles(p, lane) + F : 0;
  int64_t incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t x = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += x;
  }
  const int64_t per_part = sched_per_part(__shfl_sync(0xffffffffu, incl, 31), p.num_parts);
  const int64_t first = incl - v + F;
  const int pieces = lane < B ? static_cast<int>(sched_pieces(first, incl - first, per_part)) : 1;
  const bool cut = pieces > 1;
  const int w = cut ? pieces : 0;
  int w_incl = w;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int x = __shfl_up_sync(0xffffffffu, w_incl, o);
    if (lane >= o) w_incl += x;
  }
  const unsigned cuts = __ballot_sync(0xffffffffu, cut);
  const int32_t base = cut ? w_incl - w : -1;
  auto write = [&](int64_t* cum, int32_t* piece) {  // the layout of SchedTable / the scratch
    if (lane < B) {
      cum[lane + 1] = incl;
      piece[2 * lane] = base;
      piece[2 * lane + 1] = pieces;
    }
    if (lane == 0) {
      cum[0] = 0;
      cum[B + 1] = per_part;
    }
  };
  write(t.cum, t.piece);
  if (!publish) return;
  write(p.sched_cum, p.sched_piece);
  if (cut) p.sched_cut[1 + __popc(cuts & ((1u << lane) - 1u))] = lane;
  if (lane == 0) p.sched_cut[0] = __popc(cuts);
}

// A decode CTA's share of the in-kernel schedule, called by every thread with its warp and
// lane: warp 1 fills `t` when sched_inline (CTA (0, 0) also the scratch); the caller's CTA
// barrier then makes it visible. (Warp and lane from the caller: recomputing them here from
// threadIdx made ptxas spill 48 B in the quantized-cache kernel.)
__device__ __forceinline__ void sched_fill_cta(const DecodeParams& p, SchedTable& t, int warp,
                                               int lane) {
  if (warp == 1 && sched_inline(p)) {
    sched_fill_warp(p, t, blockIdx.x == 0 && blockIdx.y == 0, lane);
  }
}

// The schedule's arrays, from the CTA's table (sched_inline) or the scratch.
__device__ __forceinline__ int64_t sched_cum_at(const DecodeParams& p, const SchedTable& t, int i) {
  return sched_inline(p) ? t.cum[i] : p.sched_cum[i];
}
__device__ __forceinline__ int sched_piece_at(const DecodeParams& p, const SchedTable& t, int i) {
  return sched_inline(p) ? t.piece[i] : p.sched_piece[i];
}

// The part of one sequence a part computes.
struct Segment {
  int b;                 // sequence
  int tile_lo, tile_hi;  // its KV tiles [tile_lo, tile_hi)
  int slot;              // partial slot, -1: this part writes the sequence's output
};

// Walks the segments of one part in sequence order. Every thread that needs them keeps its
// own walker (a producer warp and the consumers step through the same list). `t`: the CTA's
// SchedTable (filled before the CTA barrier that precedes init when sched_inline).
struct PartWalker {
  int64_t per_part;  // units per part (T)
  int part, b;       // lo / hi recomputed from these: fewer registers held across a segment

  __device__ __forceinline__ void init(const DecodeParams& p, const SchedTable& t, int part_) {
    part = part_;
    per_part = sched_cum_at(p, t, p.num_seqs + 1);
    const int64_t lo = part * per_part;
    int l = 0, r = p.num_seqs;  // the first sequence whose units reach past lo
    while (l < r) {
      const int m = (l + r) >> 1;
      if (sched_cum_at(p, t, m + 1) > lo) r = m;
      else l = m + 1;
    }
    b = l;
  }

  __device__ __forceinline__ bool next(const DecodeParams& p, const SchedTable& t, Segment& s) {
    const int64_t lo = part * per_part, hi = lo + per_part;
    for (; b < p.num_seqs; ++b) {
      const int64_t c = sched_cum_at(p, t, b);
      if (c >= hi) return false;
      const int64_t first = c + p.sched_fixed;  // unit of tile 0
      const int64_t n = sched_cum_at(p, t, b + 1) - first;
      int64_t i_lo = 0, i_hi = 0;
      if (n == 0) {
        if (c < lo) continue;  // owned by the part its fixed units start in
      } else {
        i_lo = lo > first ? lo - first : 0;
        i_hi = hi - first < n ? hi - first : n;
        if (i_lo >= i_hi) continue;
      }
      s.b = b;
      s.tile_lo = static_cast<int>(i_lo);
      s.tile_hi = static_cast<int>(i_hi);
      const int base = sched_piece_at(p, t, 2 * b);
      s.slot = base < 0 ? -1 : base + part - static_cast<int>(first / per_part);
      ++b;
      return true;
    }
    return false;
  }
};

// One block (kScheduleThreads) fills sched_cum / sched_piece (not launched when
// sched_inline); then the decode kernel and decode_combine_pieces run (stream order).
constexpr int kScheduleThreads = 1024;
cudaError_t launch_decode_schedule(const DecodeParams& p, cudaStream_t stream);

}  // namespace portmla
