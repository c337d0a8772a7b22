// Hopper (sm_90a) decode for few rows per sequence with an fp8 / fp8_ds_mla cache: the narrow
// kernel's transposed products (the KV tile on wgmma's M side, the 16 query rows on N) with
// the tile's raw e4m3 bytes in shared memory and both KV operands taken from registers
// (wgmma RS), converted there from e4m3 to fp16 (exact, one instruction per two values). No
// 16-bit copy of the tile is ever written, so a stage holds 36 KB (fp8) / 41 KB (fp8_ds_mla)
// and two CTAs share an SM; the mma.sync quantized kernel (sm80/decode/quant_kernel.cuh) spent
// its time on 16-row tensor tiles, this one on m64 n16 wgmma.
//
// Per KV tile of 64 positions (one warpgroup, 128 threads; warp w, lane (g, j) = (lane / 4,
// lane % 4); positions / channels of the A fragments: rows 16 w + g, 16 w + g + 8):
//   S^T [64 x 16] = K Q^T: 36 k-steps, A = K rows from registers. A thread's fragment columns
//       (2j, 2j+1, 2j+8, 2j+9) of k-step k are 4 consecutive bytes of the entry: in a 128-byte
//       latent box, k-steps 4h .. 4h+3 of thread j are the 16-byte unit 2j + h (one 128-bit
//       load per row gives four k-steps); the RoPE likewise. Q K^T sums over channels, so Q is
//       stored in that permuted channel order (nq_logical_*), scaled per row by a power of two
//       into fp16 (exact; undone on the scores). fp8_ds_mla: each latent box (= scale tile) into
//       its own accumulator, summed times the positions' scales; the bf16 RoPE on bf16 wgmma.
//   max column maxima (the narrow kernel's)
//   P^T exp2 of the scaled scores as fp16, a 16 x 64 swizzled chunk
//   O^T [512 x 16] += V^T P^T: 4 k-steps of 16 positions, 8 m64 tiles; A = V^T from registers:
//       one 64-bit load per (position, fragment row R) gives channels 8R .. 8R+7, which are
//       row R of m-tiles 0..7 (channel = 8R + m-tile; mapped back in the epilogue); a byte
//       permute pairs two positions per channel. fp8_ds_mla: warp w's channels are exactly
//       scale tile w, so its fragments take the positions' scale of tile w (times a power of two
//       that brings the tile's largest into [0.5, 1); O rescaled exactly when it changes).
// Stages: the four 128-byte-swizzled latent boxes [64][128] (the raw map) and a tail box
// [64][64 (fp8 RoPE) or 144 (fp8_ds_mla scales + bf16 RoPE)] (unswizzled map); two stages,
// warp 0 issues tile i + 2 (lane 0; its pages read a tile ahead by the warp's lanes) once every
// thread has read tile i's bytes. Positions past the
// segment's end are masked out of S^T and zeroed in the V fragments (unused slots may hold NaN).
#pragma once

#include "../../sm80/decode/quant_kernel.cuh"  // pow2_normaliser
#include "narrow_kernel.cuh"

namespace portmla {
namespace sm90 {

constexpr int kNQStages = 2;
constexpr int kNQLatent = 4 * kChunk;  // the four latent boxes of a stage

template <int FMT>
struct NQLayout {
  static constexpr bool kDs = FMT == kKvDsMla;
  static constexpr int kTail = kDs ? 144 : 64;  // tail box bytes a position (from entry byte 512)
  static constexpr int kStage = kNQLatent + kBN * kTail;
  static_assert(kStage % 1024 == 0, "stages keep the swizzle atoms' alignment");
};

template <int FMT>
struct alignas(1024) NarrowQuantSmem {
  unsigned char kv[kNQStages][NQLayout<FMT>::kStage];
  unsigned char q[kChunks * kNChunk];  // Q rows (permuted channels); the staged output rows
  unsigned char p[kNChunk];
  float red[4][kNM];
  float qinv[kNM];
  uint64_t full[kNQStages];
  SchedTable sched;
};
template <int FMT>
constexpr int narrow_quant_smem_bytes() {
  return static_cast<int>(sizeof(NarrowQuantSmem<FMT>)) + 1024;
}
// Two CTAs an SM (228 KB, 1 KB reserved a CTA): the launch bounds' assumption.
static_assert(narrow_quant_smem_bytes<kKvDsMla>() <= 115712 &&
                  narrow_quant_smem_bytes<kKvFp8>() <= 115712, "two CTAs an SM");
static_assert(kNThreads / 32 * sm80::kTailScratchFloats * 4 <= NQLayout<kKvFp8>::kStage,
              "the tail merge's scratch fits a stage");

// Logical k index (Q's column in shared memory) of the fragment pair (e0, e1) that holds
// physical channels ph, ph + 1 (ph % 4 == 0); ph + 2, ph + 3 go to that index + 8.
// e4m3 bytes (latent, fp8 RoPE): thread j's unit u = (k-steps a box / 4) j + k / 4.
__device__ __forceinline__ int nq_logical8(int ph) {
  if (ph < sm80::kL) {
    const int b = ph >> 7, u = (ph >> 4) & 7, m = (ph >> 2) & 3;
    return 16 * (8 * b + 4 * (u & 1) + m) + 2 * (u >> 1);
  }
  const int u = (ph - sm80::kL) >> 4, m = (ph >> 2) & 3;
  return 16 * (32 + m) + 2 * u;
}
// fp8_ds_mla's bf16 RoPE (v = ph - 512): thread j's 16-byte units 2j, 2j + 1, k-steps 2 (u % 2)
// and 2 (u % 2) + 1.
__device__ __forceinline__ int nq_logical16(int v) {
  const int u = v >> 3, half = (v >> 2) & 1;
  return 16 * (32 + 2 * (u & 1) + half) + 2 * (u >> 1);
}

__device__ __forceinline__ uint32_t prmt2(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}
__device__ __forceinline__ uint32_t h2lo(uint32_t v) { return e4m3x2_lo_to_h2(v); }
__device__ __forceinline__ uint32_t h2hi(uint32_t v) { return e4m3x2_hi_to_h2(v); }

// S^T A fragments of latent box b (k-steps 8b .. 8b + 7): a[4k + {0, 1, 2, 3}] = (row r0: e0 e1,
// row r0 + 8: e0 e1, row r0: e2 e3, row r0 + 8: e2 e3) of k-step k.
__device__ __forceinline__ void nq_k_box(const unsigned char* kv, int b, int r0, int j,
                                         uint32_t (&a)[32]) {
  const unsigned char* box = kv + b * kChunk;
  uint4 v[2][2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = r0 + 8 * rr;
      v[h][rr] = *reinterpret_cast<const uint4*>(box + r * 128 + (((2 * j + h) ^ (r & 7)) << 4));
    }
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const uint32_t wd[4] = {v[h][rr].x, v[h][rr].y, v[h][rr].z, v[h][rr].w};
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        a[4 * (4 * h + m) + rr] = h2lo(wd[m]);
        a[4 * (4 * h + m) + 2 + rr] = h2hi(wd[m]);
      }
    }
}

// The RoPE k-steps 32..35 (a[0..15]): fp8: e4m3 unit j of the 64-byte tail row; fp8_ds_mla: bf16
// units 2j, 2j + 1 of the 128 RoPE bytes after the 16 scale bytes (taken as they are).
template <int FMT>
__device__ __forceinline__ void nq_rope(const unsigned char* tail, int r0, int j, uint32_t (&a)[32]) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = r0 + 8 * rr;
    if constexpr (FMT == kKvDsMla) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4 v = *reinterpret_cast<const uint4*>(tail + r * 144 + 16 + 16 * (2 * j + h));
        a[4 * (2 * h) + rr] = v.x;
        a[4 * (2 * h) + 2 + rr] = v.y;
        a[4 * (2 * h + 1) + rr] = v.z;
        a[4 * (2 * h + 1) + 2 + rr] = v.w;
      }
    } else {
      const uint4 v = *reinterpret_cast<const uint4*>(tail + r * 64 + 16 * j);
      const uint32_t wd[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        a[4 * m + rr] = h2lo(wd[m]);
        a[4 * m + 2 + rr] = h2hi(wd[m]);
      }
    }
  }
}

// V^T A fragments of k-step ks (positions 16 ks + 2j, +1, +8, +9): a[4 t + reg] for m-tile t,
// reg = (R0: positions 2j, 2j+1; R1: the same; R0: 2j+8, 2j+9; R1: the same) where R0 = 16 w + g,
// R1 = R0 + 8 and row R of m-tile t is channel 8 R + t (latent box w, bytes 8 g .. and 64 + 8 g ..).
__device__ __forceinline__ void nq_v_step(const unsigned char* kv, int ks, int w, int g, int j,
                                          uint32_t (&a)[32]) {
  const unsigned char* box = kv + w * kChunk;
  uint2 v[2][2][2];  // [position pair][row][position of the pair]
#pragma unroll
  for (int pp = 0; pp < 2; ++pp)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr)
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        const int pos = 16 * ks + 2 * j + 8 * pp + x, unit = 4 * rr + (g >> 1);
        v[pp][rr][x] = *reinterpret_cast<const uint2*>(box + pos * 128 + ((unit ^ (pos & 7)) << 4) +
                                                        8 * (g & 1));
      }
#pragma unroll
  for (int pp = 0; pp < 2; ++pp)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int reg = rr + 2 * pp;
      const uint2 w0 = v[pp][rr][0], w1 = v[pp][rr][1];
      const uint32_t c01 = prmt2(w0.x, w1.x, 0x5140), c23 = prmt2(w0.x, w1.x, 0x7362);
      const uint32_t c45 = prmt2(w0.y, w1.y, 0x5140), c67 = prmt2(w0.y, w1.y, 0x7362);
      a[0 + reg] = h2lo(c01);
      a[4 + reg] = h2hi(c01);
      a[8 + reg] = h2lo(c23);
      a[12 + reg] = h2hi(c23);
      a[16 + reg] = h2lo(c45);
      a[20 + reg] = h2hi(c45);
      a[24 + reg] = h2lo(c67);
      a[28 + reg] = h2hi(c67);
    }
}

template <class Atom, int N>
__device__ __forceinline__ void gmma_rs4(const uint32_t* a, uint64_t b, float (&d)[N]) {
  const uint32_t f[4] = {a[0], a[1], a[2], a[3]};
  gmma_rs<Atom>(f, b, d);
}

// The queries of rows m0 .. m0 + 16 -> fp16 at their permuted k index (swz16 chunks), each row
// times a power of two putting its largest latent (fp8: and RoPE) magnitude in [2^14, 2^15);
// fp8_ds_mla's RoPE part stays bf16, unscaled. qinv[r]: the inverse factor. 8 threads a row.
template <typename TQ, int FMT>
__device__ __forceinline__ void nq_load_q(const DecodeParams& p, const sm80::CtaRows& c,
                                          unsigned char* dst, float* qinv, int tid) {
  constexpr bool kDs = FMT == kKvDsMla;
  const int r = tid >> 3, l8 = tid & 7, gr = c.m0 + r;
  const TQ* q = static_cast<const TQ*>(p.q) + (gr < c.rows ? c.q_offset(p, gr) : 0);
  uint4 v[9];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 9; ++i) {
    const int ch = l8 + 8 * i;  // 8-value chunk (72 a row)
    v[i] = gr < c.rows ? *reinterpret_cast<const uint4*>(q + ch * 8) : make_uint4(0, 0, 0, 0);
    if (!kDs || ch < sm80::kL / 8) amax = fmaxf(amax, amax8<TQ>(v[i]));
  }
  float qs, qi;
  pow2_row_scale_lanes<8>(amax, qs, qi);
#pragma unroll
  for (int i = 0; i < 9; ++i) {
    const int ch = l8 + 8 * i;
    const TQ* e = reinterpret_cast<const TQ*>(&v[i]);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int ph = 8 * ch + 4 * hf;
      uint32_t lo, hi;
      int at;
      if (kDs && ph >= sm80::kL) {
        const uint32_t* wv = reinterpret_cast<const uint32_t*>(&v[i]);
        lo = wv[2 * hf];
        hi = wv[2 * hf + 1];
        at = nq_logical16(ph - sm80::kL);
      } else {
        lo = pack2<__half>(to_float(e[4 * hf]) * qs, to_float(e[4 * hf + 1]) * qs);
        hi = pack2<__half>(to_float(e[4 * hf + 2]) * qs, to_float(e[4 * hf + 3]) * qs);
        at = nq_logical8(ph);
      }
      *reinterpret_cast<uint32_t*>(dst + swz16(r, at)) = lo;
      *reinterpret_cast<uint32_t*>(dst + swz16(r, at + 8)) = hi;
    }
  }
  if (l8 == 0) qinv[r] = qi;
}

template <typename TQ, int FMT>
__global__ void __launch_bounds__(kNThreads, 2)
    mla_decode_hopper_narrow_quant_kernel(const __grid_constant__ CUtensorMap kv_map,
                                          const __grid_constant__ CUtensorMap tail_map,
                                          const DecodeParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Lay = NQLayout<FMT>;
  constexpr bool kDs = Lay::kDs;
  using AtomH = cute::SM90::GMMA::MMA_64x16x16_F32F16F16_RS<Major::K, Major::K>;
  using AtomB = cute::SM90::GMMA::MMA_64x16x16_F32BF16BF16_RS<Major::K, Major::K>;
  static_assert(!kDs || std::is_same<TQ, __nv_bfloat16>::value, "fp8_ds_mla: bf16 queries");
  extern __shared__ unsigned char smem_raw[];
  auto& sm = smem_aligned_1024<NarrowQuantSmem<FMT>>(smem_raw);
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g8 = lane >> 2, jq = lane & 3;
  const int part = blockIdx.y, m_tile = blockIdx.x;
  const int H = p.num_heads;
  const int r0 = 16 * w + g8;  // this thread's fragment rows r0, r0 + 8

  NT_DECL;
  NT_EV(0);
  if (tid == 0) {
    tma_prefetch_desc(&kv_map);
    tma_prefetch_desc(&tail_map);
    for (int s = 0; s < kNQStages; ++s) mbar_init(&sm.full[s], 1);
    mbar_init_fence();
  }
  sched_fill_cta(p, sm.sched, w, lane);
  __syncthreads();
  NT_EV(1);

  float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  float out_scale = 1.f;
  if constexpr (!kDs) {
    const float ks = *p.k_scale;
    scale_log2 *= ks;
    out_scale = ks;
  }
  const uint64_t q_desc = gmma_desc_sw128(sm.q, 16, 1024);
  const uint64_t p_desc = gmma_desc_sw128(sm.p, 16, 1024);
  const bool out16 = narrow_out16(p);
  const int box_rows = min(p.block_size, kBN);

  PartWalker walk;
  walk.init(p, sm.sched, part);
  Segment seg;
  ArriveList arrived;
  int g0 = 0;  // tiles of the earlier segments: tile g uses stage g % 2, phase (g / 2) % 2
  while (walk.next(p, sm.sched, seg)) {
    sm80::CtaRows c;
    if (!segment_rows<kNM>(p, seg, m_tile, c)) continue;  // the same for every thread
    NT_SEG(0);
    const int n_tiles = (c.kv_hi - c.kv_lo + kBN - 1) / kBN;
    const int32_t* bt = p.block_table + static_cast<int64_t>(seg.b) * p.bt_stride;
    const uint64_t l2_pol = kv_l2_policy(p.kv_l2_hint);
    // Warp 0, lane k: the page of box k of the tile at `start` (-1 past the boxes holding
    // positions < kv_hi). Read a tile before its issue, so the issue never waits on it.
    auto tile_pages = [&](int start) {
      const int pos = start + lane * box_rows;
      return lane * box_rows < kBN && pos < c.kv_hi ? bt[pos / p.block_size] : -1;
    };
    // Warp 0 (every lane; `pages` from tile_pages): the boxes of the tile at `start` into stage
    // st. Lane 0 issues.
    auto issue = [&](int st, int start, int pages) {
      const int left = c.kv_hi - start;
      const int n = min(kBN / box_rows, (left + box_rows - 1) / box_rows);
      unsigned char* dst = sm.kv[st];
      if (lane == 0) {
        mbar_arrive_expect_tx(&sm.full[st], static_cast<uint32_t>(n * box_rows * (4 * 128 + Lay::kTail)));
      }
      for (int k = 0; k < n; ++k) {
        const int page = __shfl_sync(0xffffffffu, pages, k);
        if (lane == 0) {
          const int in_page = (start + k * box_rows) % p.block_size;
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            tma_load_3d_hint(dst + b * kChunk + k * box_rows * 128, &kv_map, &sm.full[st], 128 * b,
                             in_page, page, l2_pol);
          }
          tma_load_3d_hint(dst + kNQLatent + k * box_rows * Lay::kTail, &tail_map, &sm.full[st],
                           sm80::kL, in_page, page, l2_pol);
        }
      }
    };
    if (w == 0) {  // both stages are free: the last tile's loads were read before a barrier
      const int pages0 = tile_pages(c.kv_lo), pages1 = tile_pages(c.kv_lo + kBN);
      for (int s = 0; s < kNQStages && s < n_tiles; ++s) {
        issue((g0 + s) & 1, c.kv_lo + s * kBN, s == 0 ? pages0 : pages1);
      }
    }
    narrow_arrive(p, sm.sched, tid, arrived);  // the previous segment's piece
    nq_load_q<TQ, FMT>(p, c, sm.q, sm.qinv, tid);
    fence_proxy_async_smem();
    __syncthreads();
    NT_SEG(1);

    int last[4];
    float qinv[4], m_run[4], l_run[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = narrow_col(e, lane);
      last[e] = c.last_pos(c.m0 + col, H);
      qinv[e] = sm.qinv[col];
      m_run[e] = -INFINITY;
      l_run[e] = 0.f;
    }
    float pw_prev = 1.f;  // fp8_ds_mla: warp w's O (scale tile w) is kept times pw_prev
    float o[8][8];
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int i = 0; i < 8; ++i) o[t][i] = 0.f;

    for (int it = 0; it < n_tiles; ++it) {
      const int g = g0 + it, st = g & 1;
      const int tile_start = c.kv_lo + it * kBN;
      const int valid = c.kv_hi - tile_start;  // positions of this tile in the segment
      const unsigned char* kv = sm.kv[st];
      const unsigned char* tail = kv + kNQLatent;
      NT_WARP(0, g);
      const bool refill = it + kNQStages < n_tiles;  // this stage takes tile it + 2 after it
      const int pages_next = w == 0 && refill ? tile_pages(tile_start + kNQStages * kBN) : -1;
      NT_WAIT_BEGIN();
      mbar_wait(&sm.full[st], (g >> 1) & 1);
      NT_WAIT_END(it == 0);
      NT_WARP(1, g);

      // ---- S^T = K Q^T: four latent boxes (8 k-steps each) and the RoPE (4), A from registers,
      // converting box b + 1 while box b's k-steps run.
      uint32_t a[2][32];
      float s[8];
      float acc[kDs ? 5 : 1][8];  // fp8_ds_mla: one a scale tile, one for the RoPE
#pragma unroll
      for (int x = 0; x < (kDs ? 5 : 1); ++x)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[x][i] = 0.f;
      nq_k_box(kv, 0, r0, jq, a[0]);
#pragma unroll
      for (int b = 0; b < 5; ++b) {
        float(&d)[8] = acc[kDs ? b : 0];
        fence_regs(d);
        if (b == 0) NT_WARP(2, g);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < (b < 4 ? 8 : 4); ++k) {
          const int kc = 8 * b + k;
          const uint64_t qd = desc_add(q_desc, (kc >> 2) * kNChunk + (kc & 3) * 32);
          if (kDs && b == 4) {
            gmma_rs4<AtomB>(&a[b & 1][4 * k], qd, d);
          } else {
            gmma_rs4<AtomH>(&a[b & 1][4 * k], qd, d);
          }
        }
        wgmma_commit();
        if (b < 4) {
          if (b >= 1) wgmma_wait<1>();  // box b - 1 (whose registers the next load reuses) done
          fence_regs(a[(b + 1) & 1]);
          if (b < 3) {
            nq_k_box(kv, b + 1, r0, jq, a[(b + 1) & 1]);
          } else {
            nq_rope<FMT>(tail, r0, jq, a[(b + 1) & 1]);
          }
        }
      }
      wgmma_wait<0>();
      NT_WARP(3, g);
#pragma unroll
      for (int x = 0; x < (kDs ? 5 : 1); ++x) fence_regs(acc[x]);
      fence_regs(a[0]);
      fence_regs(a[1]);

      // Scores (fp8_ds_mla: each latent box times the position's scale of that tile, + RoPE).
      if constexpr (kDs) {
        float4 sc[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int r = r0 + 8 * rr;
          sc[rr] = r < valid ? *reinterpret_cast<const float4*>(tail + r * 144)
                             : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float4 f = sc[(i >> 1) & 1];
          s[i] = (acc[0][i] * f.x + acc[1][i] * f.y + acc[2][i] * f.z + acc[3][i] * f.w) *
                     qinv[narrow_e(i)] +
                 acc[4][i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = acc[0][i] * qinv[narrow_e(i)];
      }

      // Mask, scale to base 2, column maxima over the tile's positions.
      float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int e = narrow_e(i);
        const int pos = tile_start + r0 + 8 * ((i >> 1) & 1);
        const bool ok = pos < c.kv_hi && pos <= last[e];
        s[i] = ok ? s[i] * scale_log2 : -INFINITY;
        mx[e] = fmaxf(mx[e], s[i]);
      }
      narrow_publish_max(mx, sm.red, w, lane, g8);
      // fp8_ds_mla: the tile's largest scale of scale tile w (positions past the end count 0).
      float pw = 1.f;
      if constexpr (kDs) {
        float m = 0.f;
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const int r = lane + 32 * x;
          if (r < valid) m = fmaxf(m, reinterpret_cast<const float*>(tail + r * 144)[w]);
        }
#pragma unroll
        for (int o2 = 1; o2 < 32; o2 <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o2));
        pw = sm80::quant::pow2_normaliser(m);
      }
      named_barrier(1, kNThreads);
      float alpha[4];
      narrow_update_max(sm.red, m_run, mx, alpha, lane);
      narrow_write_p<__half>(s, mx, alpha, l_run, sm.p, r0, lane);
      const float ratio = kDs ? pw / pw_prev : 1.f;  // exact: powers of two
      pw_prev = pw;
#pragma unroll
      for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int i = 0; i < 8; ++i) o[t][i] *= alpha[narrow_e(i)] * ratio;
      fence_proxy_async_smem();
      named_barrier(1, kNThreads);  // P visible to wgmma; red[] read by every warp
      NT_WARP(4, g);

      // ---- O^T += V^T P^T: k-step ks converts while k-step ks - 1 runs.
      auto v_step = [&](int ks, uint32_t(&av)[32]) {
        nq_v_step(kv, ks, w, g8, jq, av);
        if constexpr (kDs) {  // times the positions' scales of tile w (and pw)
          uint32_t f2[2];
#pragma unroll
          for (int pp = 0; pp < 2; ++pp) {
            const int q0 = 16 * ks + 2 * jq + 8 * pp;
            const float s0 = q0 < valid ? reinterpret_cast<const float*>(tail + q0 * 144)[w] : 0.f;
            const float s1 = q0 + 1 < valid ? reinterpret_cast<const float*>(tail + (q0 + 1) * 144)[w] : 0.f;
            f2[pp] = pack2<__half>(s0 * pw, s1 * pw);
          }
#pragma unroll
          for (int x = 0; x < 32; ++x) {
            const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&av[x]),
                                      *reinterpret_cast<const __half2*>(&f2[(x >> 1) & 1]));
            av[x] = *reinterpret_cast<const uint32_t*>(&r);
          }
        }
        if (valid < kBN) {  // positions past the segment's end: zero (their bytes may be NaN)
          uint32_t mk[2];
#pragma unroll
          for (int pp = 0; pp < 2; ++pp) {
            const int q0 = 16 * ks + 2 * jq + 8 * pp;
            mk[pp] = (q0 < valid ? 0xffffu : 0u) | (q0 + 1 < valid ? 0xffff0000u : 0u);
          }
#pragma unroll
          for (int x = 0; x < 32; ++x) av[x] &= mk[(x >> 1) & 1];
        }
      };
      v_step(0, a[0]);
#pragma unroll
      for (int t = 0; t < 8; ++t) fence_regs(o[t]);
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        wgmma_fence();
#pragma unroll
        for (int t = 0; t < 8; ++t) gmma_rs4<AtomH>(&a[ks & 1][4 * t], desc_add(p_desc, ks * 32), o[t]);
        wgmma_commit();
        if (ks < 3) {
          if (ks >= 1) wgmma_wait<1>();
          fence_regs(a[(ks + 1) & 1]);
          v_step(ks + 1, a[(ks + 1) & 1]);
        }
      }
      named_barrier(1, kNThreads);  // every thread has read the stage's bytes
      if (w == 0 && refill) issue(st, tile_start + kNQStages * kBN, pages_next);
      wgmma_wait<0>();
#pragma unroll
      for (int t = 0; t < 8; ++t) fence_regs(o[t]);
      fence_regs(a[0]);
      fence_regs(a[1]);
      NT_WARP(5, g);
    }
    g0 += n_tiles;
    NT_SEG(3);

    const int64_t prow0 = seg.slot < 0 ? -1 : static_cast<int64_t>(seg.slot) * p.part_rows;
    float inv[4];
    narrow_row_sums(p, c, prow0, sm.red, m_run, l_run, kDs ? 1.f / pw_prev : out_scale, inv, w, lane);
    // M-tile t's fragment value i is channel 8 (r0 + 8 ((i >> 1) & 1)) + t.
    narrow_finish_rows<TQ>(p, c, prow0, o, inv, sm.q, out16, tid, lane,
                           [&](int t, int i) { return 8 * (r0 + 8 * ((i >> 1) & 1)) + t; });
    narrow_piece_stored(p, seg, arrived);
    NT_SEG(4);
    NT_SEG_END();
  }
  NT_EV(27);
  NT_FINISH();
  narrow_merge_at_end<TQ>(p, sm.sched, arrived, sm.red, sm.kv[0], w, lane, tid);
#else
  __trap();  // built without sm_90a device code: the launcher never selects this kernel
#endif
}

}  // namespace sm90
}  // namespace portmla
