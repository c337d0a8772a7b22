// Device-side split schedule of the persistent decode kernels (the Hopper kernels).
//
// Computed on the device from seq_lens by decode_schedule_kernel on every call, so a CUDA graph
// replays it with whatever lengths the batch has now (nothing is read back to the host).
// Work is counted in units: a sequence costs one unit per KV tile of 64 positions plus
// p.sched_fixed units (its Q load and epilogue). The sequences' units are laid end to end and
// part k of p.num_parts takes units [k T, (k + 1) T) with T = ceil(total / num_parts): every
// part (one CTA per row tile) gets the same work whatever the mix of lengths. A sequence that a
// part boundary cuts is computed in pieces, each writing fp32 partials + LSE to its own slot;
// the others write the output directly. decode_combine_pieces merges the pieces.
//
//   sched_cum[b]      units before sequence b (b = 0 .. B), sched_cum[B + 1] = T
//   sched_piece[2 b]  first partial slot of sequence b, -1 when it is one piece
//   sched_piece[2b+1] its pieces
//   sched_cut[0]      how many sequences are cut, sched_cut[1 + k] the k-th of them (the merge's
//                     grid is sized by the bound min(num_seqs, num_parts - 1), not by num_seqs)
// Slots: a boundary adds one piece and makes at most one more sequence split, so the split
// sequences hold at most 2 (num_parts - 1) pieces.
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

// The part of one sequence a part computes.
struct Segment {
  int b;                 // sequence
  int tile_lo, tile_hi;  // its KV tiles [tile_lo, tile_hi)
  int slot;              // partial slot, -1: this part writes the sequence's output
};

// Walks the segments of one part in sequence order. Every thread that needs them keeps its
// own walker (a producer warp and the consumers step through the same list).
struct PartWalker {
  int64_t per_part;  // units per part (T)
  int part, b;       // lo / hi recomputed from these: fewer registers held across a segment

  __device__ __forceinline__ void init(const DecodeParams& p, int part_) {
    part = part_;
    per_part = p.sched_cum[p.num_seqs + 1];
    const int64_t lo = part * per_part;
    int l = 0, r = p.num_seqs;  // the first sequence whose units reach past lo
    while (l < r) {
      const int m = (l + r) >> 1;
      if (p.sched_cum[m + 1] > lo) r = m;
      else l = m + 1;
    }
    b = l;
  }

  __device__ __forceinline__ bool next(const DecodeParams& p, Segment& s) {
    const int64_t lo = part * per_part, hi = lo + per_part;
    for (; b < p.num_seqs; ++b) {
      const int64_t c = p.sched_cum[b];
      if (c >= hi) return false;
      const int64_t first = c + p.sched_fixed;  // unit of tile 0
      const int64_t n = p.sched_cum[b + 1] - first;
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
      const int base = p.sched_piece[2 * b];
      s.slot = base < 0 ? -1 : base + part - static_cast<int>(first / per_part);
      ++b;
      return true;
    }
    return false;
  }
};

// One block (kScheduleThreads) fills sched_cum / sched_piece; then the decode kernel and
// decode_combine_pieces run (stream order).
constexpr int kScheduleThreads = 1024;
cudaError_t launch_decode_schedule(const DecodeParams& p, cudaStream_t stream);

}  // namespace portmla
