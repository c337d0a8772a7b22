// Quantized-cache decode (fp8 per-tensor, fp8_ds_mla) for few rows per sequence, sm80+:
// raw e4m3 bytes in shared memory, converted to fp16 in registers at the fragment load.
//
// The dequantize-then-compute kernels (tile_kernel.cuh) spend their time converting whole KV
// tiles through registers into a 16-bit copy in shared memory; at 16 rows per sequence (16
// heads, memory-bound) that made fp8 no faster than bf16 although it reads half the bytes.
// Here the cache bytes go to shared memory untouched (cp.async, STAGES deep) and each warp
// converts only the fragments it feeds to mma.sync m16n8k16 (fp16): e4m3 -> fp16 is exact and
// one packed instruction per two values. Q is scaled per row by a power of two into fp16 range
// (exact; undone on the scores).
//
// The k-dimension trick: an ldmatrix of raw e4m3 rows gives a thread four consecutive channels
// 4j .. 4j+3 of a token (b16 columns 2j, 2j+1 of the 8x8 b16 matrix), where the fp16 B
// fragment wants channels (2j, 2j+1) and (2j+8, 2j+9). Q K^T sums over channels, so the k16
// step uses a permuted channel order instead: logical (2j, 2j+1) = physical (4j, 4j+1),
// logical (2j+8, 2j+9) = physical (4j+2, 4j+3); the A fragment (a0, a2) of Q is then the
// 8 contiguous bytes Q[row][4j .. 4j+3] (one 64-bit shared load). For P V the tokens are the
// k-dimension: an ldmatrix.trans gives (token 2j: channels 2g, 2g+1; token 2j+1: the same);
// a byte permute makes (2j, 2j+1) pairs per channel, so one matrix feeds two n8 tiles, the even
// and the odd channels of 16 (their columns are mapped back in the epilogue).
//
// CTA = (row tile of 16, part of the device schedule, common/schedule.cuh); 8 warps, two CTAs
// per SM; per KV tile of 64 positions:
//   S     split over k: warp (kq = w % 4, th = w / 4) multiplies its channels (latent 128 kq ..
//         128 kq + 127 and RoPE 512 + 16 kq .. + 15: 9 k16 steps, Q fragments held in
//         registers for the whole segment) by tokens 32 th .. 32 th + 31; fp8_ds_mla: the
//         latent partial times the tokens' scale of tile kq, the bf16 RoPE step in T. The four
//         partials go through shared memory (over the Q staging area) and warp w sums those of
//         tokens 8w .. 8w+7. (Q re-read from shared memory by every warp every tile kept the
//         shared-memory pipe 79 % busy: 326 -> 252 us at b=128 S=8192 h=16 fp8 on the H100.)
//   max   row maxima (and, fp8_ds_mla, the tile's largest scale per scale tile) exchanged
//         through shared memory
//   P     exp2 of the scaled scores, fp16, to shared memory (fp8_ds_mla: four copies, P times
//         the token's scale of each scale tile, normalised by a power of two so they are <= 1)
//   O     warp w: output channels 64w .. 64w+63 += P V (4 k16 steps, 8 n8 tiles)
// Four barriers per tile. Positions past the segment's end are zero-filled by cp.async, so
// NaN bytes of unused cache slots never reach the tensor cores. Cache offsets are 64-bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../common/numeric.cuh"
#include "../../common/params.h"
#include "../../common/schedule.cuh"
#include "combine.cuh"
#include "config.h"
#include "tile_common.cuh"

namespace portmla {
namespace sm80 {
namespace quant {

constexpr int kQM = kQuantRows;          // rows per CTA (16)
constexpr int kQN = kQuantTokens;        // KV positions per tile (64, the schedule's unit)
constexpr int kQThreads = kQuantThreads;  // 8 warps
// cp.async stages: 2 lets two CTAs share an SM (fp8 96 KB, fp8_ds_mla 114 KB of shared memory).
// H100: 4 stages with one CTA per SM was 1.1x slower (csrc_cuda/NOTES.md).
constexpr int kQStages = 2;
static_assert(kQN == kSchedTile && kQM == 16 && kQThreads == 256, "the kernel is written for these");
constexpr int kQRow = kD + 8;            // Q row pitch in fp16 elements (1168 bytes: conflict-free)
constexpr int kQPRow = kQN + 8;           // P row pitch (144 bytes: conflict-free ldmatrix)
constexpr int kSPitch = kQN + 8;         // partial-score row pitch in fp32 (288 bytes: conflict-free)
constexpr int kNopeBytes = kL;           // e4m3 latent part of an entry (512)

// Shared-memory layout per format / stage count (byte offsets, all 16-byte aligned).
template <int FMT, int STAGES>
struct Layout {
  static constexpr bool kDs = FMT == kKvDsMla;
  static constexpr int kRopeBytes = kDs ? 2 * kR : kR;  // per token: bf16 (ds) or e4m3 RoPE
  static constexpr int kRopeChunks = kRopeBytes / 16;   // 8 or 4
  static constexpr int kScaleBytes = kDs ? 16 : 0;      // 4 fp32 tile scales (ds)
  static constexpr int kPCopies = kDs ? 4 : 1;
  static constexpr int kNope = 0;                       // [64 tokens][512], 128-byte swizzle
  static constexpr int kRope = kQN * kNopeBytes;        // [64 tokens][kRopeBytes]
  static constexpr int kScale = kRope + kQN * kRopeBytes;  // [64 tokens][4] fp32 (ds)
  static constexpr int kStage = kScale + kQN * kScaleBytes;
  static constexpr int kQ = 0;                          // [16][kQRow] fp16 (ds RoPE: T)
  static constexpr int kKv = kQ + kQM * kQRow * 2;
  static constexpr int kP = kKv + STAGES * kStage;      // [kPCopies][16][kQPRow] fp16
  static constexpr int kOff = kP + kPCopies * kQM * kQPRow * 2;  // int64 [STAGES][64]
  static constexpr int kRed = kOff + STAGES * kQN * 8;  // fp32 [16 rows][8 warps]
  static constexpr int kGmax = kRed + kQM * 8 * 4;      // fp32 [8 warps][4] (ds)
  static constexpr int kQInv = kGmax + 8 * 4 * 4;       // fp32 [16]
  static constexpr int kSched = kQInv + kQM * 4;        // SchedTable (small batches)
  static constexpr int kBytes = kSched + static_cast<int>(sizeof(SchedTable));
  static_assert(kStage % 16 == 0 && kKv % 16 == 0 && kP % 16 == 0 && kOff % 16 == 0 &&
                    kSched % 16 == 0, "align");
  // Two CTAs per SM on sm_90 (228 KB, 1 KB reserved per CTA), the launch bounds' assumption.
  static_assert(STAGES > 2 || kBytes <= 115712, "two CTAs per SM");
  static_assert(4 * kQM * kSPitch * 4 <= kKv - kQ, "the partial scores fit the Q staging area");
};

// Byte offset of 16-byte chunk c of token t: latent rows (32 chunks) and 128-byte RoPE rows
// with the XOR swizzle over 8 chunks; 64-byte e4m3 RoPE rows XOR (t / 2) % 4 (four chunks
// a row, two rows per 128 bytes). Eight consecutive tokens at one chunk hit eight different
// 16-byte bank groups in every case (conflict-free ldmatrix, both plain and .trans).
__device__ __forceinline__ int nope_off(int t, int c) { return t * kNopeBytes + ((c ^ (t & 7)) << 4); }
template <int FMT>
__device__ __forceinline__ int rope_off(int t, int c) {
  if constexpr (FMT == kKvDsMla) return t * 128 + ((c ^ (t & 7)) << 4);
  else return t * 64 + ((c ^ ((t >> 1) & 3)) << 4);
}

__device__ __forceinline__ uint32_t byte_perm(uint32_t x, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, %2;\n" : "=r"(r) : "r"(x), "r"(sel));
  return r;
}

__device__ __forceinline__ uint2 lds64(const unsigned char* p) {
  return *reinterpret_cast<const uint2*>(p);
}

// bf16x2 -> T x2 (identity for bf16).
template <typename T>
__device__ __forceinline__ uint32_t bf16x2_to(uint32_t v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return v;
  } else {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
    return pack2<T>(f.x, f.y);
  }
}

// 2^-(E+1) for x = 1.m * 2^E (x * result in [0.5, 1)); 1 for x == 0. x >= 0, finite.
__device__ __forceinline__ float pow2_normaliser(float x) {
  const int e = (__float_as_int(x) >> 23) & 0xff;
  if (x <= 0.f) return 1.f;
  const int k = min(max(126 - e, -126), 127);  // exponent of the result
  return pow2i(k);
}

}  // namespace quant

template <typename T, int FMT>
__global__ void __launch_bounds__(quant::kQThreads, 2)
    mla_decode_quant_kernel(const DecodeParams p) {
  using namespace quant;
  constexpr int STAGES = kQStages;
  using Lay = Layout<FMT, STAGES>;
  constexpr bool kDs = FMT == kKvDsMla;
  static_assert(STAGES >= 2 && STAGES <= 4 && (STAGES & (STAGES - 1)) == 0, "2 or 4 stages");
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* sQ = smem + Lay::kQ;
  float* sS = reinterpret_cast<float*>(smem + Lay::kQ);  // [4][16][kSPitch] partial scores, per tile
  unsigned char* sP = smem + Lay::kP;
  int64_t* sOff = reinterpret_cast<int64_t*>(smem + Lay::kOff);
  float* sRed = reinterpret_cast<float*>(smem + Lay::kRed);
  float* sGmax = reinterpret_cast<float*>(smem + Lay::kGmax);
  float* sQInv = reinterpret_cast<float*>(smem + Lay::kQInv);
  SchedTable& sched = *reinterpret_cast<SchedTable*>(smem + Lay::kSched);

  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, j = lane & 3;  // fragment row / column group
  const int part = blockIdx.y, m_tile = blockIdx.x;
  const int H = p.num_heads;
  const unsigned char* kv = static_cast<const unsigned char*>(p.kv_cache);
  float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  float out_scale = 1.f;
  if constexpr (FMT == kKvFp8) {
    const float ks = *p.k_scale;
    scale_log2 *= ks;
    out_scale = ks;
  }

  if (sched_inline(p)) {
    sched_fill_cta(p, sched, w, lane);
    __syncthreads();
  }
  PartWalker walk;
  walk.init(p, sched, part);
  Segment seg;
  while (walk.next(p, sched, seg)) {
    CtaRows c;
    if (!seq_rows<kQM>(p, c, m_tile, seg.b)) continue;  // the same for every thread
    {
      const int kv_end = c.kv_hi;
      c.kv_lo = seg.tile_lo * kQN;
      c.kv_hi = static_cast<int>(
          min(static_cast<int64_t>(kv_end), static_cast<int64_t>(seg.tile_hi) * kQN));
      if (c.kv_hi < c.kv_lo) c.kv_hi = c.kv_lo;
    }
    const int n_tiles = (c.kv_hi - c.kv_lo + kQN - 1) / kQN;
    const int32_t* bt = p.block_table + static_cast<int64_t>(seg.b) * p.bt_stride;

    // Byte offset of position pos's entry (-1 past kv_hi). Threads t < 64 STAGES: the first
    // STAGES tiles; threads t < 64 keep the page of tile STAGES in a register (used at the end
    // of the first tile, so its load latency hides behind that tile).
    auto entry_off = [&](int pos, int page) -> int64_t {
      return static_cast<int64_t>(page) * p.page_stride +
             static_cast<int64_t>(pos % p.block_size) * p.token_stride;
    };
    auto page_of = [&](int pos) -> int { return pos < c.kv_hi ? bt[pos / p.block_size] : 0; };
    if (tid < kQN * STAGES) {
      const int pos = c.kv_lo + tid;  // tile tid / 64, row tid % 64
      sOff[tid] = pos < c.kv_hi ? entry_off(pos, page_of(pos)) : -1;
    }
    int next_page = tid < kQN ? page_of(c.kv_lo + STAGES * kQN + tid) : 0;

    // Q rows -> fp16, scaled per row by a power of two (fp8_ds_mla: the RoPE part stays T).
    {
      const int r = tid >> 4, l16 = tid & 15, gr = c.m0 + r;
      const T* q = static_cast<const T*>(p.q) + (gr < c.rows ? c.q_offset(p, gr) : 0);
      uint4 v[5];
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 5; ++i) {
        const int ch = l16 + 16 * i;  // 8-element chunk, 72 a row
        v[i] = make_uint4(0, 0, 0, 0);
        if (ch < kD / 8 && gr < c.rows) v[i] = *reinterpret_cast<const uint4*>(q + ch * 8);
        if (ch < kD / 8 && (!kDs || ch < kL / 8)) amax = fmaxf(amax, amax8<T>(v[i]));
      }
      float qs, qinv;
      pow2_row_scale_lanes<16>(amax, qs, qinv);
#pragma unroll
      for (int i = 0; i < 5; ++i) {
        const int ch = l16 + 16 * i;
        if (ch >= kD / 8) continue;
        const uint4 o = !kDs || ch < kL / 8 ? scale8_to<__half, T>(v[i], qs) : v[i];
        *reinterpret_cast<uint4*>(sQ + (r * kQRow + ch * 8) * 2) = o;
      }
      if (l16 == 0) sQInv[r] = qinv;
    }
    __syncthreads();

    // cp.async of tile `it` into its stage: latent rows, RoPE rows, (ds) scales.
    auto issue = [&](int it) {
      if (it < n_tiles) {
        const int st = it & (STAGES - 1);
        unsigned char* base = smem + Lay::kKv + st * Lay::kStage;
        const int64_t* off = sOff + st * kQN;
#pragma unroll
        for (int k = 0; k < kQN / 8; ++k) {  // 64 tokens x 32 chunks: warp w token w + 8k
          const int t = w + 8 * k;
          const int64_t o = off[t];
          cp_async16_zfill(base + Lay::kNope + nope_off(t, lane), kv + (o < 0 ? 0 : o) + 16 * lane,
                           o >= 0);
        }
#pragma unroll
        for (int k = 0; k < kQN * Lay::kRopeChunks / kQThreads; ++k) {
          const int i = tid + kQThreads * k;
          const int t = i / Lay::kRopeChunks, ch = i % Lay::kRopeChunks;
          const int64_t o = off[t];
          cp_async16_zfill(base + Lay::kRope + rope_off<FMT>(t, ch),
                           kv + (o < 0 ? 0 : o) + kNopeBytes + Lay::kScaleBytes + 16 * ch, o >= 0);
        }
        if constexpr (kDs) {
          if (tid < kQN) {
            const int64_t o = off[tid];
            cp_async16_zfill(base + Lay::kScale + 16 * tid, kv + (o < 0 ? 0 : o) + kNopeBytes,
                             o >= 0);
          }
        }
      }
      cp_async_commit();  // empty past the last tile: the group count stays uniform
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s);

    const int last0 = c.last_pos(c.m0 + g, H), last1 = c.last_pos(c.m0 + g + 8, H);
    const float qinv0 = sQInv[g], qinv1 = sQInv[g + 8];
    // This warp's k-range of Q as mma A fragments: latent k-steps 8 kq .. 8 kq + 7 (channels
    // 128 kq ..) and RoPE k-step kq (channels 512 + 16 kq ..): e4m3 caches in the permuted
    // order, fp8_ds_mla's bf16 RoPE in the standard one (T).
    const int kq = w & 3, th = w >> 2;
    uint32_t qf[9][4];
#pragma unroll
    for (int i = 0; i < 9; ++i) {
      if (i < 8 || !kDs) {
        const int ch0 = (i < 8 ? 128 * kq + 16 * i : kL + 16 * kq) + 4 * j;
        const uint2 lo = lds64(sQ + (g * kQRow + ch0) * 2), hi = lds64(sQ + ((g + 8) * kQRow + ch0) * 2);
        qf[i][0] = lo.x;
        qf[i][1] = hi.x;
        qf[i][2] = lo.y;
        qf[i][3] = hi.y;
      } else {
        const int col = kL + 16 * kq + 2 * j;
        auto q32 = [&](int row, int cc) { return *reinterpret_cast<const uint32_t*>(sQ + (row * kQRow + cc) * 2); };
        qf[i][0] = q32(g, col);
        qf[i][1] = q32(g + 8, col);
        qf[i][2] = q32(g, col + 8);
        qf[i][3] = q32(g + 8, col + 8);
      }
    }
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float pw_prev = 1.f;  // ds: the power of two P of this warp's scale tile was scaled by
    float o[2][4][4];     // [32-channel half][E0, O0, E1, O1][fragment]
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[x][n][e] = 0.f;

    for (int it = 0; it < n_tiles; ++it) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // tile it visible; every warp is done with tile it - 1
      issue(it + STAGES - 1);
      const int st = it & (STAGES - 1);
      const unsigned char* base = smem + Lay::kKv + st * Lay::kStage;
      const int tile_start = c.kv_lo + it * kQN;

      // ---- S, split over k: warp (kq, th) takes tokens 32 th .. 32 th + 31 (4 n8 tiles) over its
      // channels (Q fragments in registers); the four partials meet in shared memory (sS, over
      // the Q staging area), where warp w sums those of tokens 8w .. 8w+7.
      {
        float acc[4][4];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int tok = 32 * th + 8 * nt + (lane & 7);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t r[4];
            ldmatrix_x4(r, base + Lay::kNope + nope_off(tok, 8 * kq + 4 * h + (lane >> 3)));
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              mma_16816<__half>(acc[nt], qf[4 * h + i], e4m3x2_lo_to_h2(r[i]), e4m3x2_hi_to_h2(r[i]));
            }
          }
        }
        if constexpr (!kDs) {  // e4m3 RoPE k-step kq, one matrix per n8 tile
          uint32_t r[4];
          ldmatrix_x4(r, base + Lay::kRope + rope_off<FMT>(32 * th + 8 * (lane >> 3) + (lane & 7), kq));
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            mma_16816<__half>(acc[nt], qf[8], e4m3x2_lo_to_h2(r[nt]), e4m3x2_hi_to_h2(r[nt]));
          }
        } else {
          // latent partial times the tokens' scale of tile kq and Q's row factor, then the bf16
          // RoPE k-step kq (two matrices per n8 tile) on top, in T
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            const int t0 = 32 * th + 8 * nt + 2 * j;
            const float* sc0 = reinterpret_cast<const float*>(base + Lay::kScale + 16 * t0);
            const float a = sc0[kq], b = sc0[4 + kq];
            acc[nt][0] *= a * qinv0;
            acc[nt][1] *= b * qinv0;
            acc[nt][2] *= a * qinv1;
            acc[nt][3] *= b * qinv1;
          }
#pragma unroll
          for (int pr = 0; pr < 2; ++pr) {
            uint32_t r[4];
            ldmatrix_x4(r, base + Lay::kRope +
                               rope_off<FMT>(32 * th + 8 * (2 * pr + (lane >> 4)) + (lane & 7),
                                             2 * kq + ((lane >> 3) & 1)));
            mma_16816<T>(acc[2 * pr], qf[8], bf16x2_to<T>(r[0]), bf16x2_to<T>(r[1]));
            mma_16816<T>(acc[2 * pr + 1], qf[8], bf16x2_to<T>(r[2]), bf16x2_to<T>(r[3]));
          }
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int col = 32 * th + 8 * nt + 2 * j;
          *reinterpret_cast<float2*>(sS + (kq * kQM + g) * kSPitch + col) = make_float2(acc[nt][0], acc[nt][1]);
          *reinterpret_cast<float2*>(sS + (kq * kQM + g + 8) * kSPitch + col) =
              make_float2(acc[nt][2], acc[nt][3]);
        }
      }
      __syncthreads();
      float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k4 = 0; k4 < 4; ++k4) {
        const float2 a = *reinterpret_cast<const float2*>(sS + (k4 * kQM + g) * kSPitch + 8 * w + 2 * j);
        const float2 b = *reinterpret_cast<const float2*>(sS + (k4 * kQM + g + 8) * kSPitch + 8 * w + 2 * j);
        s[0] += a.x;
        s[1] += a.y;
        s[2] += b.x;
        s[3] += b.y;
      }
      float sc[2][4];  // ds: the two tokens' scales per scale tile
      if constexpr (!kDs) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[e] *= e < 2 ? qinv0 : qinv1;
      } else {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const float4 v =
              *reinterpret_cast<const float4*>(base + Lay::kScale + 16 * (8 * w + 2 * j + k));
          sc[k][0] = v.x;
          sc[k][1] = v.y;
          sc[k][2] = v.z;
          sc[k][3] = v.w;
        }
      }
      // ---- Mask, base-2 scale, row maxima of this warp's 8 tokens.
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h2 = e >> 1;
        const int pos = tile_start + 8 * w + 2 * j + (e & 1);
        const bool ok = pos < c.kv_hi && pos <= (h2 ? last1 : last0);
        s[e] = ok ? s[e] * scale_log2 : -INFINITY;
        mx[h2] = fmaxf(mx[h2], s[e]);
      }
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) mx[h2] = quad_max(mx[h2]);
      if (j == 0) {
        sRed[g * 8 + w] = mx[0];
        sRed[(g + 8) * 8 + w] = mx[1];
      }
      if constexpr (kDs) {  // the tile's largest scale per scale tile (zero-filled past the end)
        float gm[4];
#pragma unroll
        for (int t4 = 0; t4 < 4; ++t4) gm[t4] = quad_max(fmaxf(sc[0][t4], sc[1][t4]));
        if (lane == 0) *reinterpret_cast<float4*>(sGmax + 4 * w) = make_float4(gm[0], gm[1], gm[2], gm[3]);
      }
      __syncthreads();

      // ---- Online softmax; P to shared memory.
      float alpha[2];
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const float4 a = *reinterpret_cast<const float4*>(sRed + (g + 8 * h2) * 8);
        const float4 b = *reinterpret_cast<const float4*>(sRed + (g + 8 * h2) * 8 + 4);
        const float mt = fmaxf(fmaxf(fmaxf(a.x, a.y), fmaxf(a.z, a.w)),
                               fmaxf(fmaxf(b.x, b.y), fmaxf(b.z, b.w)));
        const float m_new = fmaxf(m_run[h2], mt);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: no NaN
        alpha[h2] = exp2f(m_run[h2] - m_use);
        m_run[h2] = m_new;
        mx[h2] = m_use;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) s[e] = exp2f(s[e] - mx[e >> 1]);
      l_run[0] = l_run[0] * alpha[0] + s[0] + s[1];
      l_run[1] = l_run[1] * alpha[1] + s[2] + s[3];
      const int pcol = 8 * w + 2 * j;
      float o_alpha0 = alpha[0], o_alpha1 = alpha[1];
      if constexpr (!kDs) {
        *reinterpret_cast<uint32_t*>(sP + (g * kQPRow + pcol) * 2) = pack2<__half>(s[0], s[1]);
        *reinterpret_cast<uint32_t*>(sP + ((g + 8) * kQPRow + pcol) * 2) = pack2<__half>(s[2], s[3]);
      } else {
        float gmax[4] = {0.f, 0.f, 0.f, 0.f}, pw[4];
#pragma unroll
        for (int ww = 0; ww < 8; ++ww) {
          const float4 v = *reinterpret_cast<const float4*>(sGmax + 4 * ww);
          gmax[0] = fmaxf(gmax[0], v.x);
          gmax[1] = fmaxf(gmax[1], v.y);
          gmax[2] = fmaxf(gmax[2], v.z);
          gmax[3] = fmaxf(gmax[3], v.w);
        }
#pragma unroll
        for (int t4 = 0; t4 < 4; ++t4) {
          pw[t4] = pow2_normaliser(gmax[t4]);
          const float f0 = sc[0][t4] * pw[t4], f1 = sc[1][t4] * pw[t4];
          unsigned char* pp = sP + t4 * kQM * kQPRow * 2;
          *reinterpret_cast<uint32_t*>(pp + (g * kQPRow + pcol) * 2) = pack2<__half>(s[0] * f0, s[1] * f1);
          *reinterpret_cast<uint32_t*>(pp + ((g + 8) * kQPRow + pcol) * 2) =
              pack2<__half>(s[2] * f0, s[3] * f1);
        }
        // O of this warp's scale tile is kept times pw: rescale by the change of pw (exact).
        const int wt = w >> 1;  // (selects, not an indexed local array: no stack)
        const float mine = wt == 0 ? pw[0] : wt == 1 ? pw[1] : wt == 2 ? pw[2] : pw[3];
        o_alpha0 *= mine / pw_prev;
        o_alpha1 *= mine / pw_prev;
        pw_prev = mine;
      }
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          o[x][n][0] *= o_alpha0;
          o[x][n][1] *= o_alpha0;
          o[x][n][2] *= o_alpha1;
          o[x][n][3] *= o_alpha1;
        }
      __syncthreads();

      // ---- O[:, 64w ..] += P V: A = P (ldmatrix), B = raw V rows (ldmatrix.trans + permute).
      const unsigned char* pbase = sP + (kDs ? (w >> 1) * kQM * kQPRow * 2 : 0);
#pragma unroll
      for (int ks = 0; ks < kQN / 16; ++ks) {
        uint32_t pa[4];
        {
          const int i = lane >> 3;
          ldmatrix_x4(pa, pbase + (((lane & 7) + 8 * (i & 1)) * kQPRow + 16 * ks + 8 * (i >> 1)) * 2);
        }
        const int tv = 16 * ks + (lane & 7) + 8 * ((lane >> 3) & 1);  // the token this lane addresses
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          uint32_t r[4];
          ldmatrix_x4_trans(r, base + Lay::kNope + nope_off(tv, 4 * w + 2 * x + (lane >> 4)));
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t lo = byte_perm(r[2 * h], 0x3120), hi = byte_perm(r[2 * h + 1], 0x3120);
            mma_16816<__half>(o[x][2 * h], pa, e4m3x2_lo_to_h2(lo), e4m3x2_lo_to_h2(hi));
            mma_16816<__half>(o[x][2 * h + 1], pa, e4m3x2_hi_to_h2(lo), e4m3x2_hi_to_h2(hi));
          }
        }
      }

      // Offsets of tile it + STAGES into the stage-offset slot tile it used (read again only
      // after the next tile's first barrier); the page of the tile after it is loaded now.
      if (tid < kQN) {
        const int pos = c.kv_lo + (it + STAGES) * kQN + tid;
        sOff[st * kQN + tid] = pos < c.kv_hi ? entry_off(pos, next_page) : -1;
        next_page = page_of(pos + kQN);
      }
    }

    // ---- Epilogue: row sums over the quad and the 8 warps, then the rows (or partials).
    // (sRed's maxima were last read before the last tile's third barrier.)
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) l_run[h2] = quad_sum(l_run[h2]);
    if (j == 0) {
      sRed[g * 8 + w] = l_run[0];
      sRed[(g + 8) * 8 + w] = l_run[1];
    }
    __syncthreads();
    const float osc = kDs ? 1.f / pw_prev : out_scale;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int r = g + 8 * h2, gr = c.m0 + r;
      if (gr >= c.rows) continue;
      float l = 0.f;
#pragma unroll
      for (int ww = 0; ww < 8; ++ww) l += sRed[r * 8 + ww];
      const float inv = l > 0.f ? osc / l : 0.f;
      const int t = c.t0 + gr / H, hh = gr % H;
      const int64_t prow = seg.slot < 0 ? -1 : static_cast<int64_t>(seg.slot) * p.part_rows + gr;
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int col = 64 * w + 32 * x + 16 * hf + 4 * j;  // channels col .. col + 3
          const float v0 = o[x][2 * hf][2 * h2] * inv, v1 = o[x][2 * hf + 1][2 * h2] * inv;
          const float v2 = o[x][2 * hf][2 * h2 + 1] * inv, v3 = o[x][2 * hf + 1][2 * h2 + 1] * inv;
          T* dst = prow < 0 ? static_cast<T*>(p.out) + static_cast<int64_t>(t) * p.out_stride_t +
                                  static_cast<int64_t>(hh) * p.out_stride_h + col
                            : static_cast<T*>(p.part_out) + prow * kL + col;
          *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<T>(v0, v1), pack2<T>(v2, v3));
        }
      if (w == 0 && j == 0) store_row_lse(p, prow, t, hh, row_lse(m_run[h2], l));
    }
  }
  if (p.tail_merge == kTailBarrier) {  // cooperative launch
    static_assert(kQThreads / 32 * kTailScratchFloats * 4 <= STAGES * Lay::kStage,
                  "the tail merge's scratch fits the KV stages");
    cp_async_wait<0>();
    merge_pieces_at_end<T, kQThreads / 32, 4, 2>(p, sched, reinterpret_cast<float*>(smem + Lay::kKv),
                                                 w, lane, [] { __syncthreads(); }, [] {});
  }
}

}  // namespace sm80
}  // namespace portmla
