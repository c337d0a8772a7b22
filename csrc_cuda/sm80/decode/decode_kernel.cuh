// Generic sm80+ absorbed-MLA decode: mma.sync m16n8k16 + cp.async, split-KV.
//
// Variant kLegacy (32 x 32 tiles, 115 KB: two CTAs on an A100/H100 SM); the faster variants
// for Hopper-sized shared memory are in tile_kernel.cuh.
// One CTA = (split s, row tile, sequence b). The rows of sequence b are its (query token j,
// head h) pairs in order j * H + h; a CTA takes BM = 32 consecutive rows, so one KV tile in
// shared memory serves all of its heads (and, for multi-token queries, several tokens).
// 8 warps. Per KV tile of BN = 32 tokens:
//   S = Q K^T    warp (wm = w & 1, wn = w >> 1) computes rows 16 wm.., columns 8 wn..
//   softmax      row maxima exchanged through shared memory (online, base 2)
//   O += P V     warp (wm, wc = w >> 1) owns rows 16 wm.., output columns 128 wc..
// KV tiles are double-buffered: 16-bit caches by cp.async, fp8 caches through registers
// (loaded a tile ahead, converted to the 16-bit compute type when stored to shared memory).
// fp8 (per-tensor): values are converted exactly; k_scale is applied to the scores and
// the output. fp8_ds_mla: values are dequantized with their tile scale.
// Offsets into the cache are 64-bit. Positions past a split's end are never read.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../common/check.h"
#include "../../common/numeric.cuh"
#include "../../common/params.h"
#include "../../common/persistent_launch.h"
#include "combine.cuh"
#include "config.h"
#include "tile_common.cuh"
#include "tile_kernel.cuh"

namespace portmla {
namespace sm80 {

template <typename T, int FMT>
__global__ void __launch_bounds__(kThreads, 2) mla_decode_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sKV = sQ + kBM * kSRow;
  T* sP = sKV + 2 * kBN * kSRow;
  float* sRed = reinterpret_cast<float*>(sP + kBM * kPRow);  // [4][kBM]

  const int split = blockIdx.x;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int H = p.num_heads;

  CtaRows cta;
  if (!cta_rows<kBM>(p, cta)) return;  // whole CTA, before any barrier
  const int t0 = cta.t0, rows = cta.rows, m0 = cta.m0, kv_lo = cta.kv_lo, kv_hi = cta.kv_hi;
  const int* bt = p.block_table + static_cast<int64_t>(b) * p.bt_stride;
  const int bs = p.block_size;
  const int n_tiles = (kv_hi - kv_lo + kBN - 1) / kBN;

  const int wm = warp & 1, wn = warp >> 1;
  // The two rows this thread holds in the S and O fragments.
  int last_pos[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    last_pos[h2] = cta.last_pos(m0 + 16 * wm + (lane >> 2) + 8 * h2, H);
  }

  load_q_tile<T, kBM, kThreads>(p, cta, sQ, tid);

  const unsigned char* cache = static_cast<const unsigned char*>(p.kv_cache);
  constexpr int kElem = FMT == kKv16 ? 2 : 1;  // bytes per storage element
  auto token_ptr = [&](int pos) -> const unsigned char* {
    const int blk = bt[pos / bs];
    const int off = pos % bs;
    return cache + (static_cast<int64_t>(blk) * p.page_stride + static_cast<int64_t>(off) * p.token_stride) * kElem;
  };

  // ---- KV producers
  using Kv = KvTile<T, FMT, kBN, kThreads>;
  uint4 pre[Kv::kIters];  // fp8 paths only; unused registers vanish for 16-bit caches
  float pre_scale[Kv::kIters];
  (void)pre;
  (void)pre_scale;
  auto entry = [&](int pos, int) { return token_ptr(pos); };
  auto issue_16 = [&](int tile_start, int stage) {  // cp.async path
    Kv::issue_16(sKV + stage * kBN * kSRow, tile_start, kv_hi, tid, entry);
  };
  auto fetch_8 = [&](int tile_start) {  // fp8 paths: global -> registers
    Kv::fetch_8(pre, pre_scale, tile_start, kv_hi, tid, entry);
  };
  auto store_8 = [&](int stage) {  // fp8 paths: registers -> shared, converted to T
    Kv::store_8(sKV + stage * kBN * kSRow, pre, pre_scale, tid);
  };

  // ---- prologue: tile 0 -> stage 0
  if (n_tiles > 0) {
    if constexpr (FMT == kKv16) {
      issue_16(kv_lo, 0);
      cp_async_commit();
    } else {
      fetch_8(kv_lo);
      store_8(0);
    }
  }

  float scale_log2, out_scale;
  softmax_scales<FMT>(p, scale_log2, out_scale);

  float acc[16][4];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    const int tile_start = kv_lo + it * kBN;
    const bool has_next = it + 1 < n_tiles;
    if constexpr (FMT == kKv16) {
      if (has_next) issue_16(tile_start + kBN, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      if (has_next) fetch_8(tile_start + kBN);
      cp_async_wait<0>();  // the Q tile
    }
    __syncthreads();
    const T* sK = sKV + stage * kBN * kSRow;

    // ---- S = Q K^T : 16 rows x 8 columns per warp
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    {
      const T* qa = sQ + (16 * wm + (lane & 15)) * kSRow + (lane >> 4) * 8;
      const T* kb = sK + (8 * wn + (lane & 7)) * kSRow + (lane >> 3) * 8;
#pragma unroll
      for (int kk = 0; kk < kD; kk += 32) {
        uint32_t a0[4], a1[4], bb[4];
        ldmatrix_x4(a0, qa + kk);
        ldmatrix_x4(a1, qa + kk + 16);
        ldmatrix_x4(bb, kb + kk);
        mma_16816<T>(s, a0, bb[0], bb[1]);
        mma_16816<T>(s, a1, bb[2], bb[3]);
      }
    }
    // ---- scale, mask, row max
    float mx[2];
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int pos = tile_start + 8 * wn + 2 * (lane & 3) + i;
        float v = s[2 * h2 + i] * scale_log2;
        if (pos >= kv_hi || pos > last_pos[h2]) v = -INFINITY;
        s[2 * h2 + i] = v;
      }
      mx[h2] = quad_max(fmaxf(s[2 * h2], s[2 * h2 + 1]));
    }
    if ((lane & 3) == 0) {
      sRed[wn * kBM + 16 * wm + (lane >> 2)] = mx[0];
      sRed[wn * kBM + 16 * wm + (lane >> 2) + 8] = mx[1];
    }
    __syncthreads();
    float alpha[2];
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int r = 16 * wm + (lane >> 2) + 8 * h2;
      float tm = fmaxf(fmaxf(sRed[r], sRed[kBM + r]), fmaxf(sRed[2 * kBM + r], sRed[3 * kBM + r]));
      const float m_new = fmaxf(m_run[h2], tm);
      if (m_new == -INFINITY) {
        alpha[h2] = 1.f;
        s[2 * h2] = s[2 * h2 + 1] = 0.f;
      } else {
        alpha[h2] = exp2f(m_run[h2] - m_new);  // m_run = -inf -> 0
        s[2 * h2] = exp2f(s[2 * h2] - m_new);
        s[2 * h2 + 1] = exp2f(s[2 * h2 + 1] - m_new);
      }
      m_run[h2] = m_new;
      l_run[h2] = l_run[h2] * alpha[h2] + s[2 * h2] + s[2 * h2 + 1];
      *reinterpret_cast<uint32_t*>(sP + r * kPRow + 8 * wn + 2 * (lane & 3)) =
          pack2<T>(s[2 * h2], s[2 * h2 + 1]);
    }
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) scale_rows(acc, h2, alpha[h2]);
    __syncthreads();

    // ---- O += P V : 16 rows x 128 columns per warp
    {
      const int wc = warp >> 1;
      const T* pa = sP + (16 * wm + (lane & 15)) * kPRow + (lane >> 4) * 8;
      const T* vb = sK + ((lane & 7) + ((lane >> 3) & 1) * 8) * kSRow + 128 * wc + (lane >> 4) * 8;
#pragma unroll
      for (int kk = 0; kk < kBN; kk += 16) {
        uint32_t a[4];
        ldmatrix_x4(a, pa + kk);
#pragma unroll
        for (int n2 = 0; n2 < 8; ++n2) {
          uint32_t bb[4];
          ldmatrix_x4_trans(bb, vb + kk * kSRow + n2 * 16);
          mma_16816<T>(acc[2 * n2], a, bb[0], bb[1]);
          mma_16816<T>(acc[2 * n2 + 1], a, bb[2], bb[3]);
        }
      }
    }
    if constexpr (FMT != kKv16) {
      if (has_next) store_8(stage ^ 1);
    }
    __syncthreads();
  }
  cp_async_wait<0>();  // nothing may stay in flight at exit (empty splits never waited)

  // ---- row sums across the 4 warps that share the rows
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) l_run[h2] = quad_sum(l_run[h2]);
  __syncthreads();  // sRed reads of the last tile are done
  if ((lane & 3) == 0) {
    sRed[wn * kBM + 16 * wm + (lane >> 2)] = l_run[0];
    sRed[wn * kBM + 16 * wm + (lane >> 2) + 8] = l_run[1];
  }
  __syncthreads();

  const int wc = warp >> 1;
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int r = 16 * wm + (lane >> 2) + 8 * h2;
    const int g = m0 + r;
    if (g >= rows) continue;
    const float l = sRed[r] + sRed[kBM + r] + sRed[2 * kBM + r] + sRed[3 * kBM + r];
    store_out_row<T>(p, acc, h2, l, m_run[h2], out_scale, split, t0 + g / H, g % H,
                     128 * wc + 2 * (lane & 3), wc == 0 && (lane & 3) == 0);
  }
}

// One row's merge: n partial rows first_row + s * stride (outputs and LSEs) -> out row (t, h).
template <typename T, bool kBatched>
__device__ __forceinline__ void combine_row(const DecodeParams& p, int64_t first_row,
                                            int64_t stride, int n, int t, int h, int quarter,
                                            int lane) {
  const float* lse_in = p.part_lse + first_row;
  const float mx = combine_max_lse(lse_in, stride, n, lane);
  const int col4 = quarter * (kL / 4 / kCombineWarpsPerRow) + lane;  // 4-value group in the row
  const CombineAcc r = combine_accumulate<T, kBatched>(
      lse_in, partial_row4<T>(p, first_row) + col4, stride, n, mx, 0, 1, lane);
  combine_store<T>(p, r, mx, t, h, col4, lane == 0 && quarter == 0);
}

template <typename T, bool kBatched>
__global__ void __launch_bounds__(256) mla_decode_combine_kernel(const DecodeParams p) {
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_heads;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int64_t row = w / kCombineWarpsPerRow;
  if (row >= rows) return;
  combine_row<T, kBatched>(p, row, rows, p.num_splits,
                 static_cast<int>(row / p.num_heads), static_cast<int>(row % p.num_heads),
                 static_cast<int>(w % kCombineWarpsPerRow), threadIdx.x & 31);
}

template <typename T>
cudaError_t launch_decode_combine(const DecodeParams& p, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(p.num_tokens) * p.num_heads * kCombineWarpsPerRow;
  const unsigned blocks = static_cast<unsigned>((warps + 7) / 8);
  if (p.num_splits > 8) {
    mla_decode_combine_kernel<T, true><<<blocks, 256, 0, stream>>>(p);
  } else {
    mla_decode_combine_kernel<T, false><<<blocks, 256, 0, stream>>>(p);
  }
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

// The device schedule's merge (common/schedule.cuh). Few rows: 4 warps per (cut sequence, row),
// one row per block (a small batch's rows still spread over the SMs); many rows: the wide form
// (mla_decode_combine_pieces_wide_kernel). The grid covers the bound on cut sequences
// (min(num_seqs, num_parts - 1), from the schedule's list), not every sequence: the others
// wrote their output.
constexpr int kPiecesRowThreads = 32 * kCombineWarpsPerRow;

template <typename T>
__global__ void __launch_bounds__(kPiecesRowThreads)
    mla_decode_combine_pieces_kernel(const DecodeParams p, int blocks_per_seq) {
  PiecesRow r;
  if (!pieces_row(p, blocks_per_seq, 1, 0, r)) return;
  combine_row<T, true>(p, r.first, p.part_rows, r.n,
                           r.t0 + static_cast<int>(r.row / p.num_heads),
                           static_cast<int>(r.row % p.num_heads),
                           static_cast<int>(threadIdx.x >> 5) % kCombineWarpsPerRow,
                           threadIdx.x & 31);
}

// The many-pieces form (a few sequences cut by many parts: b=1, b=8): one row per block of
// kPieceGroups x 4 warps; warp (group g, quarter q) sums the pieces g, g + kPieceGroups, .. of
// its quarter of the columns (the batched loop), and the groups' sums are added in group
// order through shared memory (deterministic). Four times the loads in flight of one group:
// the merge is latency-bound there (b=1 S=32768 h=128: 66 pieces x 128 rows, 17 MB).
constexpr int kPieceGroups = 4;
constexpr int kSplitPieces = 8;  // parts per cut sequence from which the merge splits over pieces
constexpr int kPiecesSplitThreads = kPieceGroups * kPiecesRowThreads;

template <typename T>
__global__ void __launch_bounds__(kPiecesSplitThreads)
    mla_decode_combine_pieces_split_kernel(const DecodeParams p, int blocks_per_seq) {
  __shared__ float4 s_acc[kPieceGroups - 1][kPiecesRowThreads];
  __shared__ float s_total[kPieceGroups - 1][kPiecesRowThreads];
  PiecesRow pr;
  if (!pieces_row(p, blocks_per_seq, 1, 0, pr)) return;  // the same for the whole block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int quarter = warp % kCombineWarpsPerRow, group = warp / kCombineWarpsPerRow;
  const float* lse_in = p.part_lse + pr.first;
  const float mx = combine_max_lse(lse_in, p.part_rows, pr.n, lane);
  const int col4 = quarter * (kL / 4 / kCombineWarpsPerRow) + lane;
  CombineAcc r = combine_accumulate<T, true>(lse_in, partial_row4<T>(p, pr.first) + col4,
                                             p.part_rows, pr.n, mx, group, kPieceGroups, lane);
  const int slot = threadIdx.x % kPiecesRowThreads;  // (quarter, lane)
  if (group > 0) {
    s_acc[group - 1][slot] = r.acc;
    s_total[group - 1][slot] = r.total;
  }
  __syncthreads();
  if (group > 0) return;
#pragma unroll
  for (int g = 0; g < kPieceGroups - 1; ++g) {
    const float4 a = s_acc[g][slot];
    r.acc.x += a.x;
    r.acc.y += a.y;
    r.acc.z += a.z;
    r.acc.w += a.w;
    r.total += s_total[g][slot];
  }
  combine_store<T>(p, r, mx, pr.t0 + static_cast<int>(pr.row / p.num_heads),
                   static_cast<int>(pr.row % p.num_heads), col4, lane == 0 && quarter == 0);
}

// The many-rows form (large batches: many cut sequences of 2-3 pieces each): one warp merges
// kWideRows rows at a time (rows_accumulate, two pieces of each in flight). H100, 128q1s4k
// h128: 65 cut sequences x 128 rows x 2 pieces.
constexpr int kWideWarps = 8;  // warps a block
constexpr int kWideBlockRows = kWideRows * kWideWarps;

// kCounted (params.h: kTailCount): launched as the decode kernel's programmatic dependent, so
// it may run before the decode kernel ends. A block's rows lie in one 64-row tile of one cut
// sequence: thread 0 waits until the decode kernel counted all of that tile's pieces stored
// (sched_arrive[b x tiles + row / 64]; decode CTAs never wait for a merge block, and all of
// them had started before this grid could launch, so the wait ends). The schedule arrays were
// written by the schedule kernel, which ended before the decode kernel began.
template <typename T, bool kCounted>
__device__ __forceinline__ void combine_pieces_wide(const DecodeParams& p, int blocks_per_seq,
                                                    int tiles) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if constexpr (kCounted) {
    const int k = static_cast<int>(blockIdx.x / blocks_per_seq);
    if (k >= p.sched_cut[0]) return;
    const int b = p.sched_cut[1 + k];
    int t0, nq;
    seq_tokens(p, b, t0, nq);
    const int64_t row0 = static_cast<int64_t>(blockIdx.x % blocks_per_seq) * kWideBlockRows;
    if (row0 >= static_cast<int64_t>(nq) * p.num_heads) return;  // the same for the whole block
    if (threadIdx.x == 0) {
      const int* count = p.sched_arrive + static_cast<int64_t>(b) * tiles + row0 / kCountRows;
      const int n = p.sched_piece[2 * b + 1];
      while (ld_acquire_gpu(count) < n) __nanosleep(256);
    }
    __syncthreads();  // the pieces' rows (read through L2 below) after the count
  }
  PiecesRow pr[kWideRows];
  bool ok[kWideRows];
#pragma unroll
  for (int r = 0; r < kWideRows; ++r) {
    ok[r] = pieces_row(p, blocks_per_seq, kWideBlockRows, warp * kWideRows + r, pr[r]);
  }
  if (!ok[0]) return;
  RowsAcc<kWideRows> a;
  rows_accumulate<T, kWideRows, 2>(p, pr, ok, 0, 1, lane, a);
#pragma unroll
  for (int r = 0; r < kWideRows; ++r) {
    if (ok[r]) rows_store<T, kWideRows>(p, pr[r], r, a, lane);
  }
}

template <typename T, bool kCounted>
__global__ void __launch_bounds__(32 * kWideWarps)
    mla_decode_combine_pieces_wide_kernel(const DecodeParams p, int blocks_per_seq, int tiles) {
  combine_pieces_wide<T, kCounted>(p, blocks_per_seq, tiles);
  // kCounted: this grid must not end before the decode grid, whose other rows the next kernel
  // in the stream reads: one block waits for it (griddepcontrol.wait) before it exits.
  if (kCounted && blockIdx.x == 0) pdl_wait();
}

// counted: the decode kernel took kTailCount (tail_count_taken; then many_rows holds): the wide
// form launched as its programmatic dependent, polling the pieces' counts.
template <typename T>
cudaError_t launch_decode_combine_pieces(const DecodeParams& p, cudaStream_t stream,
                                         bool counted = false) {
  const int64_t per_seq = static_cast<int64_t>(p.max_query_len) * p.num_heads;
  const bool many_rows = pieces_many_rows(p);
  if (counted && !many_rows) return cudaErrorInvalidValue;
  // Few rows (small batches, whose sequences the parts cut into many pieces): one row per block
  // and the batched merge, split over the pieces when they are many (num_parts / cut sequences
  // >= kSplitPieces; b=1 S=32768 h=128: 48.8 -> 47.5 us; with 2-3 pieces, 128q1s8k h16, the
  // split form cost 10-14 us: H100 run at a106c19).
  // Many rows (large batches: a cut sequence has 2-3 pieces): the wide form, kWideBlockRows rows
  // a block (H100, same build, merge kernel 128q1s4k h128 13.4 -> 11.6 us, 32q1s4k 9.2 -> 8.0;
  // on the 16-head rows, which take the few-rows forms, it was no faster: 6.8 -> 6.5 and
  // 4.9 -> 6.4 us). The plain loop it replaced had 4 warps a row, 8-byte loads.
  const bool split = !many_rows && p.num_parts >= kSplitPieces * sched_max_cut(p);
  const int per_block = many_rows ? kWideBlockRows : 1;
  const int64_t per_seq_blocks = (per_seq + per_block - 1) / per_block;
  const int64_t blocks = per_seq_blocks * sched_max_cut(p);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  if (blocks == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(blocks);
  const int bps = static_cast<int>(per_seq_blocks);
  if (counted) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(32 * kWideWarps);
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    PORTMLA_RETURN_IF_ERROR(cudaLaunchKernelEx(
        &cfg, mla_decode_combine_pieces_wide_kernel<T, true>, p, bps, count_tiles(p)));
  } else if (many_rows) {
    mla_decode_combine_pieces_wide_kernel<T, false>
        <<<grid, 32 * kWideWarps, 0, stream>>>(p, bps, 0);
  } else if (split) {
    mla_decode_combine_pieces_split_kernel<T><<<grid, kPiecesSplitThreads, 0, stream>>>(p, bps);
  } else {
    mla_decode_combine_pieces_kernel<T><<<grid, kPiecesRowThreads, 0, stream>>>(p, bps);
  }
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t launch_decode_kernel(Kernel kernel, int smem, int rows_per_cta, int threads,
                                 const DecodeParams& p, cudaStream_t stream) {
  PORTMLA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int m_tiles = (p.max_query_len * p.num_heads + rows_per_cta - 1) / rows_per_cta;
  dim3 grid(p.num_splits, m_tiles, p.num_seqs);
  kernel<<<grid, threads, smem, stream>>>(p);
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename T, int FMT>
cudaError_t run_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0 || p.num_tokens == 0 || p.num_heads == 0) return cudaSuccess;
  if (p.num_splits > 1 && p.split_chunk < 1) return cudaErrorInvalidValue;
  constexpr bool kv16 = FMT == kKv16;
  switch (p.variant) {
    case kLegacy:
      PORTMLA_RETURN_IF_ERROR(launch_decode_kernel(mla_decode_kernel<T, FMT>, decode_smem_bytes(),
                                                   kBM, kThreads, p, stream));
      break;
    case kNarrow:
      PORTMLA_RETURN_IF_ERROR(launch_decode_kernel(mla_decode_tile_kernel<T, FMT, NarrowCfg>,
                                                   NarrowCfg::smem_bytes(kv16), NarrowCfg::kBM,
                                                   NarrowCfg::kThreads, p, stream));
      break;
    case kWide:
      PORTMLA_RETURN_IF_ERROR(launch_decode_kernel(mla_decode_tile_kernel<T, FMT, WideCfg>,
                                                   WideCfg::smem_bytes(kv16), WideCfg::kBM,
                                                   WideCfg::kThreads, p, stream));
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (p.num_splits > 1) return launch_decode_combine<T>(p, stream);
  return cudaSuccess;
}

// Instantiated one per source file (decode_<dtype>_<format>.cu).
extern template cudaError_t run_decode<__nv_bfloat16, kKv16>(const DecodeParams&, cudaStream_t);
extern template cudaError_t run_decode<__nv_bfloat16, kKvFp8>(const DecodeParams&, cudaStream_t);
extern template cudaError_t run_decode<__nv_bfloat16, kKvDsMla>(const DecodeParams&, cudaStream_t);
extern template cudaError_t run_decode<__half, kKv16>(const DecodeParams&, cudaStream_t);
extern template cudaError_t run_decode<__half, kKvFp8>(const DecodeParams&, cudaStream_t);
extern template cudaError_t run_decode<__half, kKvDsMla>(const DecodeParams&, cudaStream_t);

}  // namespace sm80
}  // namespace portmla
