// Pieces shared by the two sm80+ decode kernels (decode_kernel.cuh: kLegacy;
// tile_kernel.cuh: kNarrow / kWide): which rows and KV positions a CTA owns, the Q tile load,
// the KV tile producers, quad reductions and the output / split-partial epilogue.
// Everything is inlined into the kernels; the tile constants are template arguments.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "../../common/numeric.cuh"
#include "../../common/params.h"
#include "config.h"

namespace portmla {
namespace sm80 {

// 16-byte chunks per cache entry, per KV format.
template <int FMT> struct KvFmt;
template <> struct KvFmt<kKv16> { static constexpr int kChunks = kChunks16; };          // 72
template <> struct KvFmt<kKvFp8> { static constexpr int kChunks = kD / 16; };            // 36
template <> struct KvFmt<kKvDsMla> { static constexpr int kChunks = kL / 16 + kR / 8; };  // 40

// A split with no positions: its rows' partial LSE is -inf, so the combine skips it.
__device__ __forceinline__ void mark_empty_split(const DecodeParams& p, int split, int t0, int m0,
                                                 int rows, int bm) {
  const int H = p.num_heads;
  for (int r = threadIdx.x; r < bm; r += blockDim.x) {
    const int g = m0 + r;
    if (g >= rows) break;
    const int t = t0 + g / H, h = g % H;
    p.part_lse[(static_cast<int64_t>(split) * p.num_tokens + t) * H + h] = -INFINITY;
  }
}

// The rows and KV positions of CTA (split blockIdx.x, row tile blockIdx.y, sequence blockIdx.z).
// Rows of sequence b are its (query token j, head h) pairs in order j * H + h.
struct CtaRows {
  int t0;            // first query token of the sequence
  int nq;            // its query tokens
  int rows;          // its rows (nq * H)
  int m0;            // first row of this CTA
  int seq_len;
  int kv_lo, kv_hi;  // KV positions of this split: [kv_lo, kv_hi)
  // Last position row g may see (causal); rows past the sequence's rows: INT32_MAX.
  __device__ __forceinline__ int last_pos(int g, int H) const {
    return g < rows ? seq_len - nq + g / H : INT32_MAX;
  }
  // Element offset of row g's query (token t0 + g / H, head g % H) in p.q.
  __device__ __forceinline__ int64_t q_offset(const DecodeParams& p, int g) const {
    return static_cast<int64_t>(t0 + g / p.num_heads) * p.q_stride_t +
           static_cast<int64_t>(g % p.num_heads) * p.q_stride_h;
  }
};

// Fills c for row tile m_tile of sequence b with every position its rows may see
// ([0, kv_end): row (j, h) sees 0 .. seq_len - nq + j); false: the sequence has no rows there.
// First query token and query tokens of sequence b (one each without query_start_loc).
__device__ __forceinline__ void seq_tokens(const DecodeParams& p, int b, int& t0, int& nq) {
  if (p.query_start_loc != nullptr) {
    t0 = p.query_start_loc[b];
    nq = p.query_start_loc[b + 1] - t0;
  } else {
    t0 = b;
    nq = 1;
  }
}

template <int BM>
__device__ __forceinline__ bool seq_rows(const DecodeParams& p, CtaRows& c, int m_tile, int b) {
  seq_tokens(p, b, c.t0, c.nq);
  c.rows = c.nq * p.num_heads;
  c.m0 = m_tile * BM;
  if (c.m0 >= c.rows) return false;
  c.seq_len = p.seq_lens[b];
  const int j_last = (min(c.m0 + BM, c.rows) - 1) / p.num_heads;
  c.kv_lo = 0;
  c.kv_hi = max(0, c.seq_len - c.nq + j_last + 1);
  return true;
}

// Fills c for (split, row tile, sequence b); false: the whole CTA has nothing to do (no rows,
// or a split past the positions its rows may see, whose partial LSE it has marked empty).
// Call before any barrier.
template <int BM>
__device__ __forceinline__ bool cta_rows(const DecodeParams& p, CtaRows& c, int split,
                                         int m_tile, int b) {
  if (!seq_rows<BM>(p, c, m_tile, b)) return false;
  if (p.num_splits > 1) {  // split s covers [s * split_chunk, (s + 1) * split_chunk)
    const int kv_end = c.kv_hi;
    const int64_t lo = static_cast<int64_t>(split) * p.split_chunk;
    if (lo >= kv_end) {
      mark_empty_split(p, split, c.t0, c.m0, c.rows, BM);
      return false;
    }
    c.kv_lo = static_cast<int>(lo);
    c.kv_hi = static_cast<int>(min(static_cast<int64_t>(kv_end), lo + p.split_chunk));
  }
  return true;
}

// The sm80 kernels' grid: (split, row tile, sequence).
template <int BM>
__device__ __forceinline__ bool cta_rows(const DecodeParams& p, CtaRows& c) {
  return cta_rows<BM>(p, c, blockIdx.x, blockIdx.y, blockIdx.z);
}

// Q rows m0 .. m0 + BM -> sQ (row pitch kSRow) by cp.async, one commit group; rows past the
// sequence's rows are zero.
template <typename T, int BM, int THREADS>
__device__ __forceinline__ void load_q_tile(const DecodeParams& p, const CtaRows& c, T* sQ,
                                            int tid) {
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < BM * kChunks16; i += THREADS) {
    const int r = i / kChunks16, ch = i % kChunks16;
    const int g = c.m0 + r;
    T* dst = sQ + r * kSRow + ch * 8;
    if (g < c.rows) {
      const T* src = q + c.q_offset(p, g) + ch * 8;
      cp_async16(dst, src);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
  cp_async_commit();
}

// Producers of one KV tile of BN positions [tile_start, tile_start + BN) into shared memory
// (row pitch kSRow, compute type T); positions >= kv_hi are zero (16-bit) or never read.
// entry(pos, r) -> the cache entry of position pos (tile row r). Thread tid (threadIdx.x)
// moves chunks tid + k * THREADS, k < kIters.
template <typename T, int FMT, int BN, int THREADS>
struct KvTile {
  static constexpr int kChunks = KvFmt<FMT>::kChunks;
  static constexpr int kIters = (BN * kChunks + THREADS - 1) / THREADS;
  static __device__ __forceinline__ bool in_tile(int c) {
    return BN * kChunks % THREADS == 0 || c < BN * kChunks;
  }

  // 16-bit caches: cp.async straight to shared memory (the caller commits).
  template <class Entry>
  static __device__ __forceinline__ void issue_16(T* dst0, int tile_start, int kv_hi, int tid,
                                                  Entry entry) {
#pragma unroll
    for (int k = 0; k < kIters; ++k) {
      const int c = tid + k * THREADS;
      if (in_tile(c)) {
        const int r = c / kChunks, ch = c % kChunks;
        const int pos = tile_start + r;
        T* dst = dst0 + r * kSRow + ch * 8;
        if (pos < kv_hi) {
          cp_async16(dst, entry(pos, r) + ch * 16);
        } else {
          *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
        }
      }
    }
  }

  // fp8 / fp8_ds_mla: global -> registers (pre; pre_scale: ds_mla tile scales).
  template <int NP, int NS, class Entry>
  static __device__ __forceinline__ void fetch_8(uint4 (&pre)[NP], float (&pre_scale)[NS],
                                                 int tile_start, int kv_hi, int tid,
                                                 Entry entry) {
    if constexpr (FMT != kKv16) {
#pragma unroll
      for (int k = 0; k < kIters; ++k) {
        const int c = tid + k * THREADS;
        pre[k] = make_uint4(0, 0, 0, 0);
        if constexpr (FMT == kKvDsMla) pre_scale[k] = 0.f;
        if (in_tile(c)) {
          const int r = c / kChunks, ch = c % kChunks;
          const int pos = tile_start + r;
          if (pos < kv_hi) {
            const unsigned char* e = entry(pos, r);
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
  }

  // fp8 / fp8_ds_mla: registers -> shared, converted to T (ds_mla: dequantized by the scale).
  template <int NP, int NS>
  static __device__ __forceinline__ void store_8(T* dst0, const uint4 (&pre)[NP],
                                                 const float (&pre_scale)[NS], int tid) {
    if constexpr (FMT != kKv16) {
#pragma unroll
      for (int k = 0; k < kIters; ++k) {
        const int c = tid + k * THREADS;
        if (in_tile(c)) {
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
  }
};

// Score scale (log2 domain) and output scale; fp8 (per-tensor) folds k_scale into both.
template <int FMT>
__device__ __forceinline__ void softmax_scales(const DecodeParams& p, float& scale_log2,
                                               float& out_scale) {
  scale_log2 = p.softmax_scale * 1.4426950408889634f;
  out_scale = 1.f;
  if constexpr (FMT == kKvFp8) {
    const float ks = *p.k_scale;
    scale_log2 *= ks;
    out_scale = ks;
  }
}

// Max / sum over the 4 lanes of a quad (the threads holding one mma fragment row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Multiply fragment row h2 (elements 2 h2, 2 h2 + 1) of NT accumulator tiles by alpha.
template <int NT>
__device__ __forceinline__ void scale_rows(float (&acc)[NT][4], int h2, float alpha) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    acc[nt][2 * h2] *= alpha;
    acc[nt][2 * h2 + 1] *= alpha;
  }
}

// A row's natural-log LSE from its base-2 running maximum m and row sum l (-inf: the row saw no
// position).
__device__ __forceinline__ float row_lse(float m, float l) {
  return l > 0.f ? (m + log2f(l)) * 0.6931471805599453f : -INFINITY;
}

// Row (token t, head h)'s LSE into p.lse (when the caller asked for it), or partial row
// part_row's (>= 0) into p.part_lse.
__device__ __forceinline__ void store_row_lse(const DecodeParams& p, int64_t part_row, int t,
                                              int h, float lse) {
  if (part_row >= 0) {
    p.part_lse[part_row] = lse;
  } else if (p.lse != nullptr) {
    p.lse[static_cast<int64_t>(t) * p.lse_stride_t + static_cast<int64_t>(h) * p.lse_stride_h] = lse;
  }
}

// Epilogue of one row (token t, head h): fragment row h2 of NT accumulator tiles, columns
// col + 8 nt (+1), divided by the row sum l (times out_scale); m is the row's running max
// (base 2). part_row < 0: T output (and LSE if asked); else the partial (T) + partial LSE
// (fp32) at row part_row of part_out / part_lse. lse_writer: the one thread that writes the
// row's LSE. kPaired: partials stored by quads as whole sectors (below); off, one 4-byte store
// a value pair (half sectors) for kernels where the exchange's registers made ptxas spill.
template <typename T, int NT, bool kPaired = true>
__device__ __forceinline__ void store_out_row_at(const DecodeParams& p, const float (&acc)[NT][4],
                                                 int h2, float l, float m, float out_scale,
                                                 int64_t part_row, int t, int h, int col,
                                                 bool lse_writer) {
  const float inv = l > 0.f ? out_scale / l : 0.f;
  // row_lse's and store_row_lse's work written out: through the helpers ptxas moved two spills
  // of the fp8 pair kernel into its HGMMA span (nvcc 13.0).
  const float lse = l > 0.f ? (m + log2f(l)) * 0.6931471805599453f : -INFINITY;
  T* o;
  if (part_row < 0) {
    o = static_cast<T*>(p.out) + static_cast<int64_t>(t) * p.out_stride_t +
        static_cast<int64_t>(h) * p.out_stride_h + col;
    if (p.lse != nullptr && lse_writer) {
      p.lse[static_cast<int64_t>(t) * p.lse_stride_t + static_cast<int64_t>(h) * p.lse_stride_h] = lse;
    }
  } else {
    o = static_cast<T*>(p.part_out) + part_row * kL + col;
    if (lse_writer) p.part_lse[part_row] = lse;
    if constexpr (kPaired) {
      // Lanes q, q ^ 1 of a quad (the same row) swap a pair of values so that each stores
      // four consecutive ones: q even columns 2q .. 2q + 3 of tile nt (even), q odd 2q - 2 ..
      // 2q + 1 of tile nt + 1. A quad's store is then 32 contiguous bytes (a whole sector),
      // with half the store instructions of the per-pair form below (4-byte stores, half
      // sectors: slower than fp32 pairs on an H100).
      static_assert(NT % 2 == 0, "tiles are paired");
      const int q = threadIdx.x & 3;
      const unsigned pair = 0x3u << (threadIdx.x & 30);  // this lane and its partner
      o -= 2 * (q & 1);
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        const uint32_t v0 = pack2<T>(acc[nt][2 * h2] * inv, acc[nt][2 * h2 + 1] * inv);
        const uint32_t v1 = pack2<T>(acc[nt + 1][2 * h2] * inv, acc[nt + 1][2 * h2 + 1] * inv);
        const uint32_t got = __shfl_xor_sync(pair, q & 1 ? v0 : v1, 1);
        *reinterpret_cast<uint2*>(o + (nt + (q & 1)) * 8) =
            q & 1 ? make_uint2(got, v1) : make_uint2(v0, got);
      }
      return;
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    *reinterpret_cast<uint32_t*>(o + nt * 8) =
        pack2<T>(acc[nt][2 * h2] * inv, acc[nt][2 * h2 + 1] * inv);
  }
}

// The same for the host-planned splits: one split writes the output, several the partials of
// split `split` (rows [split][token][head]).
template <typename T, int NT>
__device__ __forceinline__ void store_out_row(const DecodeParams& p, const float (&acc)[NT][4],
                                              int h2, float l, float m, float out_scale,
                                              int split, int t, int h, int col, bool lse_writer) {
  const int64_t row = p.num_splits == 1
                          ? -1
                          : (static_cast<int64_t>(split) * p.num_tokens + t) * p.num_heads + h;
  store_out_row_at<T>(p, acc, h2, l, m, out_scale, row, t, h, col, lse_writer);
}

}  // namespace sm80
}  // namespace portmla
