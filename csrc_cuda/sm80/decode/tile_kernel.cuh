// Generic sm80+ absorbed-MLA decode, tile kernel (variants kNarrow / kWide of config.h).
//
// One CTA = (split s, row tile, sequence b); rows of sequence b are its (query token j, head h)
// pairs in order j * H + h, BM of them per CTA, so one KV tile in shared memory serves them all.
// Split s covers KV positions [s * split_chunk, (s + 1) * split_chunk): every split does the same
// amount of work whatever the sequence lengths (splits past a sequence's end only mark their
// partial LSE empty), so CTAs balance over the SMs without any device-side scheduling.
// 8 warps, per KV tile of BN tokens:
//   S = Q K^T   warp (wr, wt): rows 16 wr.., tokens TN wt.. (two accumulator chains per tile)
//   softmax     row maxima of the WT token groups exchanged through shared memory (base 2);
//               every thread keeps the running max of the rows it needs (identical updates)
//   O += P V    warp w: all BM rows x output columns 64 w.. (P read from shared memory)
// Three barriers per tile; no trailing barrier (a stage is refilled only after the next
// tile's first barrier, when every warp is done with it).
// 16-bit caches: cp.async, kStages deep. fp8 / fp8_ds_mla: 16-byte global loads of the next
// tile into registers, converted to the compute type when stored to the other of two buffers.
// Offsets into the cache are 64-bit. Positions past a split's end are never read.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../../common/numeric.cuh"
#include "../../common/params.h"
#include "config.h"
#include "tile_common.cuh"

namespace portmla {
namespace sm80 {

template <typename T, int FMT, class C>
__global__ void __launch_bounds__(256, 1) mla_decode_tile_kernel(const DecodeParams p) {
  constexpr int BM = C::kBM, BN = C::kBN, NB = C::kv_bufs(FMT == kKv16);
  constexpr int kThr = C::kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sKV = sQ + BM * kSRow;
  T* sP = sKV + NB * BN * kSRow;
  float* sRed = reinterpret_cast<float*>(sP + BM * C::kPRow);  // [kWT][BM]
  int64_t* sTok = reinterpret_cast<int64_t*>(sRed + C::kWT * BM);  // [2][BN] byte offsets

  const int split = blockIdx.x;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int H = p.num_heads;

  // The CTA's rows / split (here) and the KV producers (below) are the same logic as
  // tile_common.cuh's cta_rows() and KvTile, kept written out: through those helpers ptxas
  // (nvcc 13.0) gives this kernel 2-10 more registers (narrow; csrc_cuda/NOTES.md).
  int t0, nq;
  if (p.query_start_loc != nullptr) {
    t0 = p.query_start_loc[b];
    nq = p.query_start_loc[b + 1] - t0;
  } else {
    t0 = b;
    nq = 1;
  }
  const int rows = nq * H;
  const int m0 = blockIdx.y * BM;
  if (m0 >= rows) return;  // whole CTA, before any barrier
  const int seq_len = p.seq_lens[b];
  const int* bt = p.block_table + static_cast<int64_t>(b) * p.bt_stride;
  const int bs = p.block_size;
  const int bs_shift = (bs & (bs - 1)) == 0 ? __ffs(bs) - 1 : -1;

  // Positions any row of this tile may see: [0, kv_end). Row (j, h) sees 0 .. seq_len - nq + j.
  const int j_last = (min(m0 + BM, rows) - 1) / H;
  const int kv_end = max(0, seq_len - nq + j_last + 1);
  const int S = p.num_splits;
  int kv_lo = 0, kv_hi = kv_end;
  if (S > 1) {
    const int64_t lo = static_cast<int64_t>(split) * p.split_chunk;
    if (lo >= kv_end) {  // whole CTA, before any barrier
      mark_empty_split(p, split, t0, m0, rows, BM);
      return;
    }
    kv_lo = static_cast<int>(lo);
    kv_hi = static_cast<int>(min(static_cast<int64_t>(kv_end), lo + p.split_chunk));
  }
  const int n_tiles = (kv_hi - kv_lo + BN - 1) / BN;

  const int wr = warp % C::kWR, wt = warp / C::kWR;
  // S-fragment rows of this thread (tile-local) and the last position each may see.
  int rq[2], last_pos[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    rq[h2] = 16 * wr + (lane >> 2) + 8 * h2;
    const int g = m0 + rq[h2];
    last_pos[h2] = g < rows ? seq_len - nq + g / H : INT32_MAX;
  }

  CtaRows cta{t0, nq, rows, m0, seq_len, kv_lo, kv_hi};
  load_q_tile<T, BM, kThr>(p, cta, sQ, tid);  // cp.async group 0

  const unsigned char* cache = static_cast<const unsigned char*>(p.kv_cache);
  constexpr int kElem = FMT == kKv16 ? 2 : 1;  // bytes per storage element
  auto token_off = [&](int pos) -> int64_t {  // byte offset of position pos's entry
    int blk, off;
    if (bs_shift >= 0) {
      blk = bt[pos >> bs_shift];
      off = pos & (bs - 1);
    } else {
      blk = bt[pos / bs];
      off = pos % bs;
    }
    return (static_cast<int64_t>(blk) * p.page_stride + static_cast<int64_t>(off) * p.token_stride) *
           kElem;
  };
  // Tiles are requested LA tiles ahead. The byte offsets of a tile's entries are looked up in
  // the block table one iteration before its request (so the request does not wait on that
  // load) and kept in sTok; offs == nullptr: look them up now (prologue).
  constexpr int LA = FMT == kKv16 ? C::kStages - 1 : 1;
  auto entry = [&](int pos, int r, const int64_t* offs) -> const unsigned char* {
    return cache + (offs != nullptr ? offs[r] : token_off(pos));
  };

  // ---- KV producers
  constexpr int kChunks = KvFmt<FMT>::kChunks;
  constexpr int kIters = (BN * kChunks + kThr - 1) / kThr;
  uint4 pre[FMT == kKv16 ? 1 : kIters];  // fp8 paths only
  float pre_scale[FMT == kKvDsMla ? kIters : 1];
  (void)pre;
  (void)pre_scale;

  auto issue_16 = [&](int tile_start, int buf, const int64_t* offs) {  // cp.async path
    T* dst0 = sKV + buf * BN * kSRow;
#pragma unroll
    for (int k = 0; k < kIters; ++k) {
      const int c = tid + k * kThr;
      if (BN * kChunks % kThr == 0 || c < BN * kChunks) {
        const int r = c / kChunks, ch = c % kChunks;
        const int pos = tile_start + r;
        T* dst = dst0 + r * kSRow + ch * 8;
        if (pos < kv_hi) {
          cp_async16(dst, entry(pos, r, offs) + ch * 16);
        } else {
          *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
        }
      }
    }
  };
  auto fetch_8 = [&](int tile_start, const int64_t* offs) {  // fp8 paths: global -> registers
    if constexpr (FMT != kKv16) {
#pragma unroll
      for (int k = 0; k < kIters; ++k) {
        const int c = tid + k * kThr;
        pre[k] = make_uint4(0, 0, 0, 0);
        if constexpr (FMT == kKvDsMla) pre_scale[k] = 0.f;
        if (BN * kChunks % kThr == 0 || c < BN * kChunks) {
          const int r = c / kChunks, ch = c % kChunks;
          const int pos = tile_start + r;
          if (pos < kv_hi) {
            const unsigned char* e = entry(pos, r, offs);
            if constexpr (FMT == kKvFp8) {
              pre[k] = __ldg(reinterpret_cast<const uint4*>(e + ch * 16));
            } else {
              if (ch < kL / 16) {
                pre[k] = __ldg(reinterpret_cast<const uint4*>(e + ch * 16));
                pre_scale[k] = __ldg(reinterpret_cast<const float*>(e + kL + (ch / 8) * 4));
              } else {
                pre[k] = __ldg(reinterpret_cast<const uint4*>(e + kL + 4 * (kL / 128) +
                                                               (ch - kL / 16) * 16));
              }
            }
          }
        }
      }
    }
  };
  auto store_8 = [&](int buf) {  // fp8 paths: registers -> shared, converted to T
    if constexpr (FMT != kKv16) {
      T* dst0 = sKV + buf * BN * kSRow;
#pragma unroll
      for (int k = 0; k < kIters; ++k) {
        const int c = tid + k * kThr;
        if (BN * kChunks % kThr == 0 || c < BN * kChunks) {
          const int r = c / kChunks, ch = c % kChunks;
          const uint32_t w[4] = {pre[k].x, pre[k].y, pre[k].z, pre[k].w};
          if (FMT == kKvFp8 || ch < kL / 16) {
            float sc = 1.f;
            if constexpr (FMT == kKvDsMla) sc = pre_scale[k];
            uint32_t o[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float2 lo = fp8x2_e4m3_to_float2(static_cast<uint16_t>(w[i] & 0xffffu));
              const float2 hi = fp8x2_e4m3_to_float2(static_cast<uint16_t>(w[i] >> 16));
              o[2 * i] = pack2<T>(lo.x * sc, lo.y * sc);
              o[2 * i + 1] = pack2<T>(hi.x * sc, hi.y * sc);
            }
            uint4* dst = reinterpret_cast<uint4*>(dst0 + r * kSRow + ch * 16);
            dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
            dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
          } else {  // ds_mla rope: 8 bf16 -> 8 T
            uint4 v = pre[k];
            if constexpr (!std::is_same<T, __nv_bfloat16>::value) {
              uint32_t o[4];
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const __nv_bfloat162 x = *reinterpret_cast<const __nv_bfloat162*>(&w[i]);
                const float2 f = __bfloat1622float2(x);
                o[i] = pack2<T>(f.x, f.y);
              }
              v = make_uint4(o[0], o[1], o[2], o[3]);
            }
            *reinterpret_cast<uint4*>(dst0 + r * kSRow + kL + (ch - kL / 16) * 8) = v;
          }
        }
      }
    }
  };

  // ---- prologue. cp.async groups: Q, then one per KV tile (tile k is group k + 1).
  if constexpr (FMT == kKv16) {
#pragma unroll
    for (int s = 0; s < C::kStages - 1; ++s) {
      if (s < n_tiles) issue_16(kv_lo + s * BN, s, nullptr);
      cp_async_commit();
    }
  } else {
    if (n_tiles > 0) {
      fetch_8(kv_lo, nullptr);
      store_8(0);
    }
  }
  if (tid < BN) {  // offsets of tile LA (read after the first barrier of the loop)
    const int pos = kv_lo + LA * BN + tid;
    sTok[tid] = pos < kv_hi ? token_off(pos) : 0;
  }

  float scale_log2, out_scale;
  softmax_scales<FMT>(p, scale_log2, out_scale);

  constexpr int MI = C::kMI;
  float acc[MI][8][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[mi][i][0] = acc[mi][i][1] = acc[mi][i][2] = acc[mi][i][3] = 0.f;
  float m_q[2] = {-INFINITY, -INFINITY};  // running max of the S rows rq[]
  float l_q[2] = {0.f, 0.f};              // this thread's part of their row sums
  float m_o[MI][2];                       // running max of the O rows 16 mi + (lane >> 2) + 8 h2
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) m_o[mi][0] = m_o[mi][1] = -INFINITY;

  int buf = 0;                    // buffer of tile it
  int fill = C::kStages - 1;      // 16-bit: buffer tile it + kStages - 1 goes to
  for (int it = 0; it < n_tiles; ++it) {
    const int tile_start = kv_lo + it * BN;
    if constexpr (FMT == kKv16) {
      cp_async_wait<C::kStages - 2>();  // Q and tile it have landed (this thread's copies)
    } else {
      cp_async_wait<0>();  // the Q tile
    }
    __syncthreads();  // B1: tile it visible to all; every warp is done with tile it - 1
    const int64_t* offs = sTok + (it & 1) * BN;
    if constexpr (FMT == kKv16) {
      if (it + LA < n_tiles) issue_16(tile_start + LA * BN, fill, offs);
      cp_async_commit();
      fill = fill + 1 == NB ? 0 : fill + 1;
    } else {
      if (it + 1 < n_tiles) fetch_8(tile_start + BN, offs);
    }
    // Block-table lookups for tile it + LA + 1, stored to sTok after this tile's work.
    int64_t next_off = 0;
    if (tid < BN) {
      const int pos = tile_start + (LA + 1) * BN + tid;
      if (pos < kv_hi) next_off = token_off(pos);
    }
    const T* sK = sKV + buf * BN * kSRow;

    // ---- S = Q K^T : 16 rows x TN tokens per warp, two chains (k mod 32 < 16, >= 16)
    float s[C::kNI][2][4];
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[ni][0][e] = s[ni][1][e] = 0.f;
    {
      const T* qa = sQ + (16 * wr + (lane & 15)) * kSRow + (lane >> 4) * 8;
      const T* kb = sK + (C::kTN * wt + (lane & 7)) * kSRow + (lane >> 3) * 8;
#pragma unroll
      for (int kk = 0; kk < kD; kk += 32) {
        uint32_t a0[4], a1[4];
        ldmatrix_x4(a0, qa + kk);
        ldmatrix_x4(a1, qa + kk + 16);
#pragma unroll
        for (int ni = 0; ni < C::kNI; ++ni) {
          uint32_t bb[4];
          ldmatrix_x4(bb, kb + ni * 8 * kSRow + kk);
          mma_16816<T>(s[ni][0], a0, bb[0], bb[1]);
          mma_16816<T>(s[ni][1], a1, bb[2], bb[3]);
        }
      }
    }
    // ---- scale, mask, row max of this warp's tokens
    float sv[C::kNI][4];
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h2 = e >> 1;
        const int pos = tile_start + C::kTN * wt + 8 * ni + 2 * (lane & 3) + (e & 1);
        float v = (s[ni][0][e] + s[ni][1][e]) * scale_log2;
        if (pos >= kv_hi || pos > last_pos[h2]) v = -INFINITY;
        sv[ni][e] = v;
        mx[h2] = fmaxf(mx[h2], v);
      }
    }
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) mx[h2] = quad_max(mx[h2]);
    if ((lane & 3) == 0) {
      sRed[wt * BM + rq[0]] = mx[0];
      sRed[wt * BM + rq[1]] = mx[1];
    }
    __syncthreads();  // B2: tile row maxima visible

    // ---- P = exp2(S - m_new) -> shared; this thread's row-sum parts
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      float tm = sRed[rq[h2]];
#pragma unroll
      for (int g = 1; g < C::kWT; ++g) tm = fmaxf(tm, sRed[g * BM + rq[h2]]);
      const float m_new = fmaxf(m_q[h2], tm);
      float alpha = 1.f, sum = 0.f;
#pragma unroll
      for (int ni = 0; ni < C::kNI; ++ni) {
        float p0 = 0.f, p1 = 0.f;
        if (m_new != -INFINITY) {
          p0 = exp2f(sv[ni][2 * h2] - m_new);
          p1 = exp2f(sv[ni][2 * h2 + 1] - m_new);
        }
        sum += p0 + p1;
        *reinterpret_cast<uint32_t*>(sP + rq[h2] * C::kPRow + C::kTN * wt + 8 * ni +
                                     2 * (lane & 3)) = pack2<T>(p0, p1);
      }
      if (m_new != -INFINITY) alpha = exp2f(m_q[h2] - m_new);  // m_q = -inf -> 0
      m_q[h2] = m_new;
      l_q[h2] = l_q[h2] * alpha + sum;
    }
    // ---- rescale O rows by the same factors (same inputs, same operations)
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int r = 16 * mi + (lane >> 2) + 8 * h2;
        float tm = sRed[r];
#pragma unroll
        for (int g = 1; g < C::kWT; ++g) tm = fmaxf(tm, sRed[g * BM + r]);
        const float m_new = fmaxf(m_o[mi][h2], tm);
        const float alpha = m_new != -INFINITY ? exp2f(m_o[mi][h2] - m_new) : 1.f;
        m_o[mi][h2] = m_new;
        scale_rows(acc[mi], h2, alpha);
      }
    }
    __syncthreads();  // B3: P visible

    // ---- O += P V : BM rows x 64 columns per warp
    {
      const T* pa = sP + (lane & 15) * C::kPRow + (lane >> 4) * 8;
      const T* vb = sK + ((lane & 7) + ((lane >> 3) & 1) * 8) * kSRow + C::kOC * warp +
                    (lane >> 4) * 8;
#pragma unroll
      for (int kk = 0; kk < BN; kk += 16) {
        uint32_t a[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) ldmatrix_x4(a[mi], pa + mi * 16 * C::kPRow + kk);
#pragma unroll
        for (int n2 = 0; n2 < C::kOC / 16; ++n2) {
          uint32_t bb[4];
          ldmatrix_x4_trans(bb, vb + kk * kSRow + n2 * 16);
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) {
            mma_16816<T>(acc[mi][2 * n2], a[mi], bb[0], bb[1]);
            mma_16816<T>(acc[mi][2 * n2 + 1], a[mi], bb[2], bb[3]);
          }
        }
      }
    }
    if constexpr (FMT != kKv16) {
      if (it + 1 < n_tiles) store_8(buf ^ 1);  // read by tile it - 1, done before B1
    }
    if (tid < BN) sTok[((it + 1) & 1) * BN + tid] = next_off;  // read after the next B1
    buf = buf + 1 == NB ? 0 : buf + 1;
  }
  cp_async_wait<0>();  // nothing may stay in flight at exit

  // ---- row sums: quad, then the WT warps sharing the rows (through shared memory)
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) l_q[h2] = quad_sum(l_q[h2]);
  __syncthreads();  // sRed reads of the last tile are done
  if ((lane & 3) == 0) {
    sRed[wt * BM + rq[0]] = l_q[0];
    sRed[wt * BM + rq[1]] = l_q[1];
  }
  __syncthreads();

#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int r = 16 * mi + (lane >> 2) + 8 * h2;
      const int g = m0 + r;
      if (g >= rows) continue;
      float l = 0.f;
#pragma unroll
      for (int w = 0; w < C::kWT; ++w) l += sRed[w * BM + r];
      store_out_row<T>(p, acc[mi], h2, l, m_o[mi][h2], out_scale, split, t0 + g / H, g % H,
                       C::kOC * warp + 2 * (lane & 3), warp == 0 && (lane & 3) == 0);
    }
  }
}

}  // namespace sm80
}  // namespace portmla
