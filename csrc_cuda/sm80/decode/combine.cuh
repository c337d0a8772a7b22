// The LSE merges of partial outputs: the helpers of the merge kernels (decode_kernel.cuh) and
// the pieces' merge a scheduled decode kernel runs itself at its end (tail_merge).
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../../common/numeric.cuh"
#include "../../common/params.h"
#include "../../common/schedule.cuh"
#include "config.h"
#include "tile_common.cuh"

namespace portmla {
namespace sm80 {

// Merge the splits of every (token, head) row by their LSE. One warp per (row, quarter of the
// 512 columns), so even a handful of rows spreads over the SMs; each lane owns one float4.
// Splits are visited in order (deterministic); the LSE maximum is read lane-parallel.
// kBatched false: one LSE then one partial load per split, an empty split (LSE -inf) not read
// (32 registers: many rows in flight, for merges of a few splits). true (a b=1 call merges 66
// pieces a row; 64 registers): each lane turns one LSE of a run of 32 into its weight, the
// warp broadcasts them split by split, and 8 partial-row loads are issued before any is used;
// an empty split's slot (inside the scratch) is read but a select, not a multiply, keeps its
// unwritten values out. H100, b=1 S=32768 h=128: merge 20.4 -> 7.6 us.
constexpr int kCombineWarpsPerRow = 4;

// A row's largest split LSE (lane-parallel reads, warp-wide result).
__device__ __forceinline__ float combine_max_lse(const float* lse_in, int64_t stride, int n,
                                                 int lane) {
  float mx = -INFINITY;
  for (int s = lane; s < n; s += 32) mx = fmaxf(mx, lse_in[s * stride]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  return mx;
}

// This lane's float4 of a row's weighted sum over splits first, first + step, .. < n (weights
// exp(lse - mx)), and the sum of those weights. `col`: the lane's 4 partial values (T) of split
// 0; split s's are `stride` rows further.
struct CombineAcc {
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float total = 0.f;
};

template <typename T, bool kBatched>
__device__ __forceinline__ CombineAcc combine_accumulate(const float* lse_in, const uint2* col,
                                                        int64_t stride, int n, float mx,
                                                        int first, int step, int lane) {
  CombineAcc r;
  const int64_t slot4 = stride * (kL / 4);  // 4-value groups from one split's row to the next
  if (mx == -INFINITY) return r;
  if (!kBatched) {
#pragma unroll 4
    for (int s = first; s < n; s += step) {
      const float ls = lse_in[s * stride];
      if (ls == -INFINITY) continue;  // an empty split: its partial output is not read
      const float w = expf(ls - mx);
      const float4 v = unpack4<T>(col[s * slot4]);
      r.total += w;
      r.acc.x += w * v.x;
      r.acc.y += w * v.y;
      r.acc.z += w * v.z;
      r.acc.w += w * v.w;
    }
    return r;
  }
  const int count = n > first ? (n - first + step - 1) / step : 0;  // splits first + step i
  for (int i0 = 0; i0 < count; i0 += 32) {
    const int mine = i0 + lane;
    const float w_lane = mine < count ? expf(lse_in[(first + mine * step) * stride] - mx) : 0.f;
    const int m = count - i0 < 32 ? count - i0 : 32;
    for (int j0 = 0; j0 < m; j0 += 8) {
      uint2 raw[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        raw[k] = j0 + k < m ? col[(first + (i0 + j0 + k) * step) * slot4] : make_uint2(0u, 0u);
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float w = __shfl_sync(0xffffffffu, w_lane, j0 + k);  // 0 past m (exp(-inf) = 0)
        const bool used = w > 0.f;
        const float4 v = unpack4<T>(raw[k]);
        r.total += w;
        r.acc.x = used ? fmaf(w, v.x, r.acc.x) : r.acc.x;
        r.acc.y = used ? fmaf(w, v.y, r.acc.y) : r.acc.y;
        r.acc.z = used ? fmaf(w, v.z, r.acc.z) : r.acc.z;
        r.acc.w = used ? fmaf(w, v.w, r.acc.w) : r.acc.w;
      }
    }
  }
  return r;
}

// The merged float4 (column 4 col4 ..) of output row (t, h); the LSE by one lane.
template <typename T>
__device__ __forceinline__ void combine_store(const DecodeParams& p, const CombineAcc& r, float mx,
                                              int t, int h, int col4, bool write_lse) {
  const float inv = r.total > 0.f ? 1.f / r.total : 0.f;
  T* o = static_cast<T*>(p.out) + static_cast<int64_t>(t) * p.out_stride_t +
         static_cast<int64_t>(h) * p.out_stride_h;
  uint2 v;
  v.x = pack2<T>(r.acc.x * inv, r.acc.y * inv);
  v.y = pack2<T>(r.acc.z * inv, r.acc.w * inv);
  *reinterpret_cast<uint2*>(o + 4 * col4) = v;
  if (p.lse != nullptr && write_lse) {
    p.lse[static_cast<int64_t>(t) * p.lse_stride_t + static_cast<int64_t>(h) * p.lse_stride_h] =
        r.total > 0.f ? mx + logf(r.total) : -INFINITY;
  }
}

// Partial row `row` of p.part_out as groups of 4 values (T).
template <typename T>
__device__ __forceinline__ const uint2* partial_row4(const DecodeParams& p, int64_t row) {
  return reinterpret_cast<const uint2*>(static_cast<const T*>(p.part_out) + row * kL);
}

// A row of a cut sequence (common/schedule.cuh): token t0 + row / H, head row % H; its n
// pieces' first partial row `first` (the next ones p.part_rows further).
struct PiecesRow {
  int t0, n;
  int64_t row, first;
};

// The row a merge kernel's thread serves: row (blockIdx.x % blocks_per_seq) * rows_per_block +
// row_in_block of cut sequence list entry blockIdx.x / blocks_per_seq; false past the cut list
// or the sequence's rows.
__device__ __forceinline__ bool pieces_row(const DecodeParams& p, int blocks_per_seq,
                                           int rows_per_block, int row_in_block, PiecesRow& r) {
  const int k = static_cast<int>(blockIdx.x / blocks_per_seq);
  if (k >= p.sched_cut[0]) return false;
  const int b = p.sched_cut[1 + k];
  int nq;
  seq_tokens(p, b, r.t0, nq);
  r.row = static_cast<int64_t>(blockIdx.x % blocks_per_seq) * rows_per_block + row_in_block;
  if (r.row >= static_cast<int64_t>(nq) * p.num_heads) return false;
  r.first = static_cast<int64_t>(p.sched_piece[2 * b]) * p.part_rows + r.row;
  r.n = p.sched_piece[2 * b + 1];
  return true;
}

// One warp merges kRows rows (any cut sequences; `ok`: which rows exist) over their pieces
// first, first + step, ..: lane l owns columns 8 l .. 8 l + 7 and 256 + 8 l .. 256 + 8 l + 7
// (16-byte loads through L2). Per run of 32 of those pieces, lane l reads the LSE of the l-th
// and kBatch pieces' values are loaded before the LSEs are used (one L2 round trip for a row
// of up to kBatch pieces), the next kBatch after those are summed. Pieces are summed in order
// (deterministic); a piece whose LSE is -inf (it saw no position of the row) adds nothing and
// its values are not used. `mx`: the largest LSE of the pieces summed (the sums are relative
// to it). The many-rows merge kernel (decode_kernel.cuh) and tail_merge use it.
template <int kRows>
struct RowsAcc {
  float mx[kRows], total[kRows], acc[kRows][16];
};

template <typename T, int kRows, int kBatch>
__device__ __forceinline__ void rows_accumulate(const DecodeParams& p,
                                                const PiecesRow (&pr)[kRows],
                                                const bool (&ok)[kRows], int first, int step,
                                                int lane, RowsAcc<kRows>& a) {
  const int64_t stride = p.part_rows;
  const float* lse_in[kRows];
  const uint4* row_in[kRows];
  int count[kRows];  // the row's pieces first + step i
  int most = 0;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int n = ok[r] ? pr[r].n : 0;
    const int64_t row = ok[r] ? pr[r].first : 0;
    lse_in[r] = p.part_lse + row;
    row_in[r] = reinterpret_cast<const uint4*>(static_cast<const T*>(p.part_out) + row * kL);
    count[r] = n > first ? (n - first + step - 1) / step : 0;
    most = count[r] > most ? count[r] : most;
    a.mx[r] = -INFINITY;
    a.total[r] = 0.f;
#pragma unroll
    for (int c = 0; c < 16; ++c) a.acc[r][c] = 0.f;
  }
  for (int c0 = 0; c0 < most; c0 += 32) {
    const int m = most - c0 < 32 ? most - c0 : 32;
    uint4 v[kBatch][kRows][2];
    auto load = [&](int j0) {  // pieces c0 + j0 .. c0 + j0 + kBatch - 1 of each row
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const int i = c0 + j0 + k;
          const bool here = j0 + k < m && i < count[r];
          const int64_t off = (first + static_cast<int64_t>(i) * step) * stride * (kL / 8);
          v[k][r][0] = here ? __ldcg(row_in[r] + off + lane) : make_uint4(0u, 0u, 0u, 0u);
          v[k][r][1] = here ? __ldcg(row_in[r] + off + 32 + lane) : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    };
    float w_lane[kRows];  // the LSE, then the weight, of the row's piece c0 + lane
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = c0 + lane;
      w_lane[r] = i < count[r] ? __ldcg(lse_in[r] + (first + static_cast<int64_t>(i) * step) * stride)
                               : -INFINITY;
    }
    load(0);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float cm = w_lane[r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
      const float nm = fmaxf(a.mx[r], cm);
      if (nm != a.mx[r] && a.mx[r] != -INFINITY) {  // a later run of 32 raised the maximum
        const float sc = expf(a.mx[r] - nm);
        a.total[r] *= sc;
#pragma unroll
        for (int c = 0; c < 16; ++c) a.acc[r][c] *= sc;
      }
      a.mx[r] = nm;
      w_lane[r] = w_lane[r] == -INFINITY ? 0.f : expf(w_lane[r] - nm);
    }
    for (int j0 = 0; j0 < m; j0 += kBatch) {
      if (j0 > 0) load(j0);
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        if (j0 + k >= m) break;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float w = __shfl_sync(0xffffffffu, w_lane[r], j0 + k);
          const bool used = w > 0.f;
          a.total[r] += w;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float4 x0 = unpack4<T>(make_uint2(v[k][r][h].x, v[k][r][h].y));
            const float4 x1 = unpack4<T>(make_uint2(v[k][r][h].z, v[k][r][h].w));
            const float x[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              a.acc[r][8 * h + e] = used ? fmaf(w, x[e], a.acc[r][8 * h + e]) : a.acc[r][8 * h + e];
            }
          }
        }
      }
    }
  }
}

// Row r of `a` (row pr) normalised into the output (and its LSE, lane 0).
template <typename T, int kRows>
__device__ __forceinline__ void rows_store(const DecodeParams& p, const PiecesRow& pr, int r,
                                           const RowsAcc<kRows>& a, int lane) {
  const int g = static_cast<int>(pr.row);
#pragma unroll
  for (int q = 0; q < 4; ++q) {  // groups 2 lane (+ 1) (+ 64): columns 8 lane (+ 4) (+ 256)
    CombineAcc c;
    c.acc = make_float4(a.acc[r][4 * q], a.acc[r][4 * q + 1], a.acc[r][4 * q + 2],
                        a.acc[r][4 * q + 3]);
    c.total = a.total[r];
    combine_store<T>(p, c, a.mx[r], pr.t0 + g / p.num_heads, g % p.num_heads,
                     2 * lane + (q & 1) + 64 * (q >> 1), lane == 0 && q == 0);
  }
}

// The pieces' merge of one row tile of a cut sequence b by the CTA that stored its last piece
// (p.tail_merge == kTailArrive): rows c.m0 .. c.m0 + kTileRows - 1 below c.rows, warp w those
// at w + kWarps i, kBatch pieces of each of its rows in flight, pieces summed in order
// (deterministic). Reads the schedule only.
template <typename T, int kWarps, int kTileRows, int kBatch>
__device__ __forceinline__ void merge_tile_rows(const DecodeParams& p, const SchedTable& t, int b,
                                                const CtaRows& c, int warp, int lane) {
  constexpr int kRows = kTileRows / kWarps;
  static_assert(kRows * kWarps == kTileRows, "whole rows a warp");
  const int n = sched_piece_at(p, t, 2 * b + 1);
  const int64_t base = static_cast<int64_t>(sched_piece_at(p, t, 2 * b)) * p.part_rows;
  PiecesRow pr[kRows];
  bool ok[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int g = c.m0 + warp + kWarps * r;
    ok[r] = g < c.rows;
    pr[r].t0 = c.t0;
    pr[r].n = n;
    pr[r].row = g;
    pr[r].first = base + g;
  }
  RowsAcc<kRows> a;
  rows_accumulate<T, kRows, kBatch>(p, pr, ok, 0, 1, lane, a);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (ok[r]) rows_store<T, kRows>(p, pr[r], r, a, lane);
  }
}

// ---- The pieces' merge run by a scheduled decode kernel itself (kTailBarrier: a cooperative
// launch) instead of a merge kernel after it: no launch and no gap between the kernels, the
// merge spread over every CTA, and what each CTA merges looked up while it waits for the others.
// The rows of the cut sequences (cut list entry k, row j as k * part_rows + j, over the bound
// min(num_seqs, num_parts - 1) on cut sequences; rows past a sequence's own are skipped) are dealt
// to the CTAs in equal runs. Runs of at most kWarps / 2 rows (small batches: a few rows cut into
// many pieces): `split` = kWarps / run warps share a row, warp g of them summing its pieces g,
// g + split, .. (up to 8 in flight), and the first adds the others' sums in warp order (through
// shared memory). Longer runs: each warp merges kWideRows rows at a time (4 pieces of each in
// flight). A kernel calls merge_pieces_at_end (tail_prepare, the grid-wide barrier, tail_merge).
constexpr int kWideRows = 2;
constexpr int kTailStride = 19;                      // floats a lane in the scratch (odd: no bank conflicts)
constexpr int kTailScratchFloats = 32 * kTailStride;  // a warp's share of the scratch

// The k-th cut sequence (-1 past the list): from the CTA's schedule table when the kernel
// computed it (sched_inline), else from the schedule kernel's list. Whole warp.
__device__ __forceinline__ int cut_seq(const DecodeParams& p, const SchedTable& t, int k, int lane) {
  if (sched_inline(p)) {
    const bool cut = lane < p.num_seqs && t.piece[2 * lane + 1] > 1;
    const unsigned cuts = __ballot_sync(0xffffffffu, cut);
    return k < __popc(cuts) ? static_cast<int>(__fns(cuts, 0, k + 1)) : -1;
  }
  return k < p.sched_cut[0] ? p.sched_cut[1 + k] : -1;
}

// A cut sequence as the merge reads it (a warp's cache of the last one looked up).
struct CutSeq {
  int k = -1;       // its entry in the cut list
  int t0, rows, n;  // first token, rows (tokens x heads: 0 past the list), pieces
  int64_t base;     // partial row of its piece 0, row 0
};

// Row x of the merge (x < hi, warp-uniform) through the warp's cache `c`.
__device__ __forceinline__ bool tail_row(const DecodeParams& p, const SchedTable& t, int64_t x,
                                         int64_t hi, int lane, CutSeq& c, PiecesRow& r) {
  if (x >= hi) return false;
  const int k = static_cast<int>(x / p.part_rows);
  if (k != c.k) {
    c.k = k;
    c.rows = 0;
    const int b = cut_seq(p, t, k, lane);
    if (b >= 0) {
      int nq;
      seq_tokens(p, b, c.t0, nq);
      c.rows = nq * p.num_heads;
      c.base = static_cast<int64_t>(sched_piece_at(p, t, 2 * b)) * p.part_rows;
      c.n = sched_piece_at(p, t, 2 * b + 1);
    }
  }
  const int64_t j = x % p.part_rows;
  if (j >= c.rows) return false;
  r.t0 = c.t0;
  r.n = c.n;
  r.row = j;
  r.first = c.base + j;
  return true;
}

// What a warp merges: the CTA's rows [lo, hi), `split` warps a row, the warp's first rows.
struct TailWork {
  int64_t lo, hi;
  int split;
  CutSeq cs[kWideRows];
  PiecesRow pr[kWideRows];
  bool ok[kWideRows];
};

// Before the grid-wide barrier (only the schedule is read, which is final by then).
template <int kWarps>
__device__ __forceinline__ void tail_prepare(const DecodeParams& p, const SchedTable& t, int warp,
                                             int lane, TailWork& w) {
  const int64_t rows = static_cast<int64_t>(sched_max_cut(p)) * p.part_rows;
  const int64_t ctas = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const int64_t run = (rows + ctas - 1) / ctas;
  w.lo = (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * run;
  w.hi = rows < w.lo + run ? rows : w.lo + run;
  w.split = run <= kWarps / 2 ? kWarps / static_cast<int>(run) : 1;
  const int64_t x = w.split > 1 ? w.lo + warp / w.split : w.lo + static_cast<int64_t>(warp) * kWideRows;
#pragma unroll
  for (int r = 0; r < kWideRows; ++r) {
    w.ok[r] = (w.split == 1 || r == 0) && tail_row(p, t, x + r, w.hi, lane, w.cs[r], w.pr[r]);
  }
}

// After the barrier: every CTA's partials are stored. scratch: kWarps x kTailScratchFloats
// floats of shared memory the CTA no longer uses; cta_sync: a barrier of the kWarps warps.
// kBatch / kRowsBatch: pieces in flight of a shared row / of each of a warp's kWideRows rows
// (registers: 8 a piece a row).
template <typename T, int kWarps, int kBatch, int kRowsBatch, class CtaSync>
__device__ __forceinline__ void tail_merge(const DecodeParams& p, const SchedTable& t, TailWork& w,
                                           float* scratch, int warp, int lane, CtaSync cta_sync) {
  if (w.lo >= w.hi) return;  // the same for the whole CTA
  if (w.split > 1) {
    const int group = warp % w.split;
    PiecesRow pr[1] = {w.pr[0]};
    const bool ok[1] = {w.ok[0]};
    RowsAcc<1> a;
    if (ok[0]) rows_accumulate<T, 1, kBatch>(p, pr, ok, group, w.split, lane, a);
    float* mine = scratch + warp * kTailScratchFloats + lane * kTailStride;
    if (ok[0] && group > 0) {
#pragma unroll
      for (int c = 0; c < 16; ++c) mine[c] = a.acc[0][c];
      mine[16] = a.total[0];
      mine[17] = a.mx[0];
    }
    cta_sync();
    if (ok[0] && group == 0) {  // the groups' sums, each relative to its own maximum
      float mx = a.mx[0];
      for (int k = 1; k < w.split; ++k) mx = fmaxf(mx, mine[k * kTailScratchFloats + 17]);
      const float s0 = a.mx[0] == -INFINITY ? 0.f : expf(a.mx[0] - mx);
      a.total[0] *= s0;
#pragma unroll
      for (int c = 0; c < 16; ++c) a.acc[0][c] *= s0;
      for (int k = 1; k < w.split; ++k) {
        const float* o = mine + k * kTailScratchFloats;
        const float sk = o[17] == -INFINITY ? 0.f : expf(o[17] - mx);
#pragma unroll
        for (int c = 0; c < 16; ++c) a.acc[0][c] += sk * o[c];
        a.total[0] += sk * o[16];
      }
      a.mx[0] = mx;
      rows_store<T, 1>(p, pr[0], 0, a, lane);
    }
    return;
  }
  for (int64_t x = w.lo + static_cast<int64_t>(warp) * kWideRows; x < w.hi;
       x += kWarps * kWideRows) {
    if (x != w.lo + static_cast<int64_t>(warp) * kWideRows) {  // the first rows: tail_prepare
#pragma unroll
      for (int r = 0; r < kWideRows; ++r) w.ok[r] = tail_row(p, t, x + r, w.hi, lane, w.cs[r], w.pr[r]);
    }
    RowsAcc<kWideRows> a;
    rows_accumulate<T, kWideRows, kRowsBatch>(p, w.pr, w.ok, 0, 1, lane, a);
#pragma unroll
    for (int r = 0; r < kWideRows; ++r) {
      if (w.ok[r]) rows_store<T, kWideRows>(p, w.pr[r], r, a, lane);
    }
  }
}

// A scheduled decode kernel's end when p.tail_merge (cooperative launch): every CTA looks up its
// rows, waits for every CTA's partials at the grid-wide barrier (past_barrier(): a trace hook),
// then merges. Called by every thread still running.
template <typename T, int kWarps, int kBatch, int kRowsBatch, class CtaSync, class Hook>
__device__ __forceinline__ void merge_pieces_at_end(const DecodeParams& p, const SchedTable& t,
                                                    float* scratch, int warp, int lane,
                                                    CtaSync cta_sync, Hook past_barrier) {
  TailWork w;
  tail_prepare<kWarps>(p, t, warp, lane, w);
  cooperative_groups::this_grid().sync();
  past_barrier();
  tail_merge<T, kWarps, kBatch, kRowsBatch>(p, t, w, scratch, warp, lane, cta_sync);
}

}  // namespace sm80
}  // namespace portmla
