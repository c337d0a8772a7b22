// Hopper (sm_90a) absorbed-MLA decode for 16-bit caches: TMA tile loads through a two-stage
// mbarrier pipeline, wgmma for S = Q K^T and O += P V, split-KV by the device schedule of
// common/schedule.cuh (persistent parts; the pieces of cut sequences merged by LSE after).
//
// CTA = (row tile of 64, part); the part's segments (a sequence's run of KV tiles) one after
// the other. Rows of a sequence are its (query token j, head h) pairs in order j * H + h, so
// one KV tile in shared memory serves 64 of them. Row tiles of the same part are neighbours in
// the grid and walk the same tiles, so their KV reads meet in L2.
// Two consumer warpgroups (256 threads), per KV tile of 64 positions:
//   S    warpgroup w: S[:, 32w .. 32w+32) = Q K^T (m64 n32, 36 k-steps, operands in smem)
//   max  row maxima of the two halves exchanged through shared memory (named barrier)
//   P    exp2 of the scaled scores, bf16/fp16, written to one 64x64 swizzled smem tile
//   O    warpgroup w: O[:, 256w .. 256w+256) += P V (m64 n256, 4 k-steps; V is the first 512
//        columns of the same KV tile, read MN-major)
// Thread 0 issues the TMA loads of tile i + 2 once both warpgroups are done with tile i.
//
// Shared memory: every operand is a stack of 64-row x 128-byte chunks with the 128-byte
// swizzle (what TMA writes and what the GMMA descriptors read): Q (9 chunks), two KV stages
// (9 chunks each: 8 latent + 1 rope), P (1 chunk) = 229,376 bytes + barriers and row data.
// Cache pages: any block size with 64 % block_size == 0 (>= 16) or block_size % 64 == 0; a
// tile is 64 / block_size TMA boxes per chunk, or one box inside a larger page.
// Positions past the segment's end inside a loaded tile are masked out of S and their V rows
// are zeroed in shared memory before O += P V (unused cache slots may hold NaN).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../common/numeric.cuh"
#include "../../common/params.h"
#include "../../common/schedule.cuh"
#include "../../sm80/decode/combine.cuh"
#include "../../sm80/decode/config.h"
#include "../../sm80/decode/tile_common.cuh"
#include "hopper_ptx.cuh"

namespace portmla {
namespace sm90 {

constexpr int kBM = 64;                 // rows per CTA
constexpr int kBN = 64;                 // KV positions per tile
constexpr int kStages = 2;
constexpr int kThreads = 256;           // two consumer warpgroups
constexpr int kChunk = 64 * 128;        // bytes of one 64-row x 128-byte swizzled chunk
constexpr int kChunks = sm80::kD / 64;  // 9 per 576-wide row block
constexpr int kTileBytes = kChunks * kChunk;
static_assert(kThreads / 32 * sm80::kTailScratchFloats * 4 <= kTileBytes,
              "the tail merge's scratch fits a KV stage");

struct alignas(1024) Smem {
  unsigned char q[kTileBytes];
  unsigned char kv[kStages][kTileBytes];
  unsigned char p[kChunk];
  float red[2][kBM];  // per-warpgroup row maxima, then row sums
  uint64_t full[kStages];
  uint64_t q_full;  // Q tile loaded (p.q_tma)
  SchedTable sched;  // the schedule, small batches (common/schedule.cuh)
};
constexpr int kSmemBytes = static_cast<int>(sizeof(Smem)) + 1024;  // + base alignment slack
static_assert(kSmemBytes <= 227 * 1024, "more than an sm_90 CTA may have");

// Byte offset of 16-bit element (row r, column c) in a stack of swizzled chunks.
__device__ __forceinline__ uint32_t swz(int r, int c) {
  const int cc = c & 63;
  return static_cast<uint32_t>((c >> 6) * kChunk + r * 128 +
                               ((((cc >> 3) ^ (r & 7)) << 4) | ((cc & 7) << 1)));
}

// Q rows m0 .. m0 + 64 of the CTA through TMA (p.q_tma: `map` holds the queries as [T][H][576],
// boxes of 64 columns x min(H, 64) heads x max(1, 64 / H) tokens, 128-byte swizzle):
// issue_q_tma puts the 9 chunk boxes on `bar`; load_q_tma has thread `tid` 0 issue them and
// every calling thread wait for phase `phase`.
// Rows past the sequence's rows hold the next tokens' queries (zeros past the tensor): rows are
// independent in both products and those are never stored. The cp.async path below took 6-7 us
// a tile on the H100 while the producer's TMA stream ran (pair_trace spans).
__device__ __forceinline__ void issue_q_tma(const CUtensorMap* map, const DecodeParams& p,
                                            const sm80::CtaRows& c, unsigned char* dst,
                                            uint64_t* bar) {
  const int H = p.num_heads;
  mbar_arrive_expect_tx(bar, kTileBytes);
  for (int ch = 0; ch < kChunks; ++ch) {
    tma_load_3d(dst + ch * kChunk, map, bar, ch * 64, H >= kBM ? c.m0 % H : 0, c.t0 + c.m0 / H);
  }
}
__device__ __forceinline__ void load_q_tma(const CUtensorMap* map, const DecodeParams& p,
                                           const sm80::CtaRows& c, unsigned char* dst,
                                           uint64_t* bar, uint32_t phase, int tid) {
  if (tid == 0) issue_q_tma(map, p, c, dst, bar);
  mbar_wait(bar, phase);
}

// Q rows m0 .. m0 + kRows of the CTA -> swizzled chunks at `dst` (`at(row, column)`: the byte
// offset; rows past the sequence's rows are zero) by threads 0 .. kN - 1: cp.async issued and
// committed; the caller waits (cp_async_wait<0>, fence_proxy_async_smem, a barrier).
template <typename T, int kRows, int kN, class At>
__device__ __forceinline__ void issue_q_rows(const DecodeParams& p, const sm80::CtaRows& c,
                                             unsigned char* dst, int tid, At at) {
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < kRows * (sm80::kD / 8); i += kN) {
    const int r = i / (sm80::kD / 8), col = (i % (sm80::kD / 8)) * 8;
    const int g = c.m0 + r;
    unsigned char* d = dst + at(r, col);
    if (g < c.rows) {
      cp_async16(d, q + c.q_offset(p, g) + col);
    } else {
      *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
    }
  }
  cp_async_commit();
}

// The 64 rows of the CTA, waited for: visible to wgmma after the caller's barrier.
template <typename T>
__device__ __forceinline__ void load_q(const DecodeParams& p, const sm80::CtaRows& c,
                                       unsigned char* dst, int tid) {
  issue_q_rows<T, kBM, kThreads>(p, c, dst, tid, [](int r, int col) { return swz(r, col); });
  cp_async_wait<0>();
  fence_proxy_async_smem();
}

// Q rows m0 .. m0 + 64 -> fp16 swizzled chunks, each row times a power of two that puts its
// largest magnitude in [2^14, 2^15) (exact: bf16 has fewer mantissa bits than fp16, fp16 the
// same), its inverse -> q_inv[r]: bf16 / fp16 queries then meet fp16 keys (e4m3 cache values,
// exact in fp16) on the f16 wgmma. Threads 0 .. 255, 8 a row (9 of its 72 16-byte chunks each).
// kRopeBf16 (fp8_ds_mla, whose RoPE stays bf16 in the cache): the RoPE chunk as bf16 times the
// same power of two (exact), for the bf16 wgmma of the scores' RoPE part.
template <typename TQ, bool kRopeBf16 = false>
__device__ __forceinline__ void load_q_pow2(const DecodeParams& p, const sm80::CtaRows& c,
                                            unsigned char* dst, float* q_inv, int tid) {
  constexpr int kPer = sm80::kD / 8 / 8;  // chunks a thread
  const TQ* q = static_cast<const TQ*>(p.q);
  const int l8 = tid & 7;
#pragma unroll 1
  for (int r = tid >> 3; r < kBM; r += kThreads / 8) {
    const int g = c.m0 + r;
    const bool live = g < c.rows;
    const uint4* row = reinterpret_cast<const uint4*>(q + (live ? c.q_offset(p, g) : 0));
    uint4 v[kPer];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      v[i] = live ? __ldg(row + l8 + 8 * i) : make_uint4(0, 0, 0, 0);
      amax = fmaxf(amax, amax8<TQ>(v[i]));
    }
    float sc, inv;
    pow2_row_scale_lanes<8>(amax, sc, inv);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      *reinterpret_cast<uint4*>(dst + swz(r, 8 * (l8 + 8 * i))) =
          kRopeBf16 && i == kPer - 1 ? scale8_to<__nv_bfloat16, TQ>(v[i], sc)
                                     : scale8_to<__half, TQ>(v[i], sc);
    }
    if (l8 == 0) q_inv[r] = inv;
  }
  fence_proxy_async_smem();
}

// Row tile m_tile (of BM rows) of segment s: its sequence's rows and the positions of the
// segment's tiles they may see (kv_lo == kv_hi: none, the epilogue writes the empty result). false: the
// sequence has no rows in this tile (nothing to compute or write).
template <int BM = kBM>
__device__ __forceinline__ bool segment_rows(const DecodeParams& p, const Segment& s, int m_tile,
                                             sm80::CtaRows& c) {
  if (!sm80::seq_rows<BM>(p, c, m_tile, s.b)) return false;
  const int kv_end = c.kv_hi;
  c.kv_lo = s.tile_lo * kBN;
  c.kv_hi = static_cast<int>(
      min(static_cast<int64_t>(kv_end), static_cast<int64_t>(s.tile_hi) * kBN));
  if (c.kv_hi < c.kv_lo) c.kv_hi = c.kv_lo;
  return true;
}

// Tile loads: issued by one thread. Positions [tile_start, min(tile_start + 64, kv_hi)).
// kHint: every box loaded with the L2 policy l2_pol (kv_l2_policy; no branch on it at the
// issue); else the plain load (the pair kernel: a runtime choice between the two forms made its
// producer warp 1-3 % slower, and it never takes evict_first at 128 heads).
template <bool kHint>
struct TileLoaderT {
  const CUtensorMap* map;
  const int32_t* bt;  // this sequence's block-table row
  int block_size;
  int rows;    // rows per TMA box: min(block_size, 64)
  int kv_hi;
  uint64_t l2_pol;  // kHint: kv_l2_policy(p.kv_l2_hint); else unused

  // One box of the tile.
  __device__ __forceinline__ void load(unsigned char* dst, uint64_t* bar, int col, int in_page,
                                       int page) const {
    if constexpr (kHint) {
      tma_load_3d_hint(dst, map, bar, col, in_page, page, l2_pol);
    } else {
      tma_load_3d(dst, map, bar, col, in_page, page);
    }
  }

  // TMA boxes (of `rows` positions) of the tile at `tile_start` that hold positions < kv_hi.
  __device__ __forceinline__ int pieces(int tile_start) const {
    const int left = kv_hi - tile_start;
    return left <= 0 ? 0 : min(kBN / rows, (left + rows - 1) / rows);
  }

  __device__ __forceinline__ void issue(unsigned char* dst, uint64_t* bar, int tile_start) const {
    int pg[4];
    pages(tile_start, pg);
    issue_pages(dst, bar, tile_start, pg);
  }

  // The pages of the tile at `tile_start` (read a tile ahead of issue_pages in the loops, so
  // that the issuing thread never waits on the block table there).
  __device__ __forceinline__ void pages(int tile_start, int (&pg)[4]) const {
    const int n = pieces(tile_start);
#pragma unroll
    for (int k = 0; k < 4; ++k) pg[k] = k < n ? bt[(tile_start + k * rows) / block_size] : 0;
  }

  // issue() with the pages from pages().
  __device__ __forceinline__ void issue_pages(unsigned char* dst, uint64_t* bar, int tile_start,
                                              const int (&pg)[4]) const {
    const int n = pieces(tile_start);
    mbar_arrive_expect_tx(bar, static_cast<uint32_t>(n * kChunks * rows * 128));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < n) {
        const int in_page = (tile_start + k * rows) % block_size;
#pragma unroll
        for (int ch = 0; ch < kChunks; ++ch) {
          load(dst + ch * kChunk + k * rows * 128, bar, ch * 64, in_page, pg[k]);
        }
      }
    }
  }
};
using TileLoader = TileLoaderT<true>;
using PlainTileLoader = TileLoaderT<false>;

// Warp-wide block-table prefetch for two tiles: lane j < 8 returns the page of piece j % 4
// of the tile starting at (j < 4 ? start0 : start1), 0 where there is none. Loaded early,
// read at issue time through issue_part_warp's shuffles, so the TMA issue never waits on it.
template <class Loader>
__device__ __forceinline__ int prefetch_pages(const Loader& ld, int start0, int start1, int lane) {
  const int start = lane < 4 ? start0 : start1, k = lane & 3;
  const int pos = start + k * ld.rows;
  return lane < 8 && pos < ld.kv_hi && k * ld.rows < kBN ? ld.bt[pos / ld.block_size] : 0;
}

// TMA boxes of a tile (n of them, `box(j, col, ch)`: box j's first column and its chunk),
// loaded by a whole warp with the pages from prefetch_pages (`slot` 0: its first tile, 4: its
// second); completes `bar` once. Lane 0 issues; with kLanes the warp's lanes issue one box each
// (box t = k n + j of piece k in lane t % 32; at most 4 pieces x 9 boxes).
template <bool kLanes = false, class Loader, class Box>
__device__ __forceinline__ void issue_boxes_warp(const Loader& ld, unsigned char* dst,
                                                 uint64_t* bar, int tile_start, int n, Box box,
                                                 int pages, int slot, int lane) {
  const int pieces = ld.pieces(tile_start);
  if (lane == 0) {
    mbar_arrive_expect_tx(bar, static_cast<uint32_t>(pieces * n * ld.rows * 128));
  }
  if constexpr (kLanes) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int t = lane + 32 * r, k = min(t / n, kBN / 16 - 1);
      const int page = __shfl_sync(0xffffffffu, pages, slot + k);
      if (t < pieces * n) {
        int col, ch;
        box(t - k * n, col, ch);
        ld.load(dst + ch * kChunk + k * ld.rows * 128, bar, col,
                (tile_start + k * ld.rows) % ld.block_size, page);
      }
    }
  } else {
    for (int k = 0; k < pieces; ++k) {
      const int page = __shfl_sync(0xffffffffu, pages, slot + k);
      if (lane == 0) {
        const int in_page = (tile_start + k * ld.rows) % ld.block_size;
        for (int j = 0; j < n; ++j) {
          int col, ch;
          box(j, col, ch);
          ld.load(dst + ch * kChunk + k * ld.rows * 128, bar, col, in_page, page);
        }
      }
    }
  }
}

// One part of a 16-bit tile: the 4 latent chunks from `c0` (columns 64 c0 ..), plus the rope
// chunk 8 when `rope`.
template <bool kLanes = false>
__device__ __forceinline__ void issue_part_warp(const PlainTileLoader& ld, unsigned char* dst,
                                                uint64_t* bar, int tile_start, int c0, bool rope,
                                                int pages, int slot, int lane) {
  issue_boxes_warp<kLanes>(ld, dst, bar, tile_start, rope ? 5 : 4,
                   [c0](int j, int& col, int& ch) {
                     ch = j < 4 ? c0 + j : kChunks - 1;
                     col = ch * 64;
                   },
                   pages, slot, lane);
}

// Whether a CTA of row tile `m_tile` prefetches its KV tiles into L2: the row tiles of a part
// read the same tiles, and one prefetch of each is enough. With every row tile prefetching,
// the L2's partition fabric ran at ~89 % of its peak at 128 heads (ncu, 128q1s4k; 46 % with one
// prefetching row tile) and the bf16 128-head rows were 5-7 % slower (NOTES.md, twelfth session).
__device__ __forceinline__ bool prefetches_l2(int m_tile) { return m_tile == 0; }

// L2 prefetch of the boxes at columns col(0) .. col(n - 1) of the tile at `tile_start` by a
// whole warp (pages from prefetch_pages, `slot` as in issue_boxes_warp); lane 0 issues.
// Nothing when the tile does not exist.
template <class Col>
__device__ __forceinline__ void prefetch_boxes_l2(const PlainTileLoader& ld, int tile_start, int n,
                                                  Col col, int pages, int slot, int lane) {
  const int pieces = ld.pieces(tile_start);
  for (int k = 0; k < pieces; ++k) {
    const int page = __shfl_sync(0xffffffffu, pages, slot + k);
    if (lane == 0) {
      const int in_page = (tile_start + k * ld.rows) % ld.block_size;
      for (int j = 0; j < n; ++j) tma_prefetch_l2_3d(ld.map, col(j), in_page, page);
    }
  }
}

// A whole 16-bit tile: its 9 chunks.
__device__ __forceinline__ void prefetch_tile_l2(const PlainTileLoader& ld, int tile_start,
                                                 int pages, int slot, int lane) {
  prefetch_boxes_l2(ld, tile_start, kChunks, [](int j) { return 64 * j; }, pages, slot, lane);
}

// Zeroes rows [valid, 64) of the 8 latent (V) chunks of a KV stage: positions past the segment's
// end may hold NaN, and 0 * NaN is NaN in P V. `t` is the thread's index among `n` writers.
__device__ __forceinline__ void zero_v_rows(unsigned char* kv, int valid, int t, int n) {
  for (int i = t; i < (kBN - valid) * 64; i += n) {
    const int r = valid + i / 64, piece = i % 64;
    *reinterpret_cast<uint4*>(kv + (piece / 8) * kChunk + r * 128 + (piece % 8) * 16) =
        make_uint4(0, 0, 0, 0);
  }
}

// S (+)= Q K^T over kN 64-column chunks from chunk c0 (4 k-steps each); with `init` the first
// k-step overwrites S. Issue only: the caller fences, commits and waits.
template <class Atom, int kN, int N>
__device__ __forceinline__ void qk_chunks(uint64_t q_desc, uint64_t k_desc, float (&s)[N], int c0,
                                          bool init) {
#pragma unroll
  for (int kc = 0; kc < 4 * kN; ++kc) {
    const uint32_t off = (c0 + (kc >> 2)) * kChunk + (kc & 3) * 32;
    gmma<Atom>(desc_add(q_desc, off), desc_add(k_desc, off), s, !(init && kc == 0));
  }
}

// O += P V over a tile's 64 positions (4 k-steps), P from a swizzled smem chunk; one
// committed group.
template <class Atom>
__device__ __forceinline__ void pv_ss(uint64_t p_desc, uint64_t v_desc, float (&o)[128]) {
  fence_regs(o);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    gmma<Atom>(desc_add(p_desc, ks * 32), desc_add(v_desc, ks * 16 * 128), o, true);
  }
  wgmma_commit();
}

// The same with P in registers (A fragments: k-step ks uses pk[4 ks .. 4 ks + 3]).
template <class Atom>
__device__ __forceinline__ void pv_rs(uint32_t (&pk)[16], uint64_t v_desc,
                                      float (&o)[128]) {
  fence_regs(o);
  fence_regs(pk);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    const uint32_t a[4] = {pk[4 * ks], pk[4 * ks + 1], pk[4 * ks + 2], pk[4 * ks + 3]};
    gmma_rs<Atom>(a, desc_add(v_desc, ks * 16 * 128), o);
  }
  wgmma_commit();
}

// Epilogue, first half: this thread's row sums summed over its quad and published to
// red[wg] (the caller then syncs both warpgroups).
__device__ __forceinline__ void share_row_sums(float (&l_run)[2], float (&red)[2][kBM], int wg,
                                               int r0, int lane) {
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    l_run[h2] += __shfl_xor_sync(0xffffffffu, l_run[h2], 1);
    l_run[h2] += __shfl_xor_sync(0xffffffffu, l_run[h2], 2);
  }
  if ((lane & 3) == 0) {
    red[wg][r0] = l_run[0];
    red[wg][r0 + 8] = l_run[1];
  }
}

// Epilogue, second half: warpgroup wg's 256 output columns of this thread's two rows, or the
// segment's partials (slot >= 0), normalised by both warpgroups' row sums (kPaired:
// store_out_row_at).
template <typename T, bool kPaired = true>
__device__ __forceinline__ void store_rows(const DecodeParams& p, const sm80::CtaRows& c,
                                           const float (&o)[128], const float (&red)[2][kBM],
                                           const float (&m_run)[2], int slot, int wg, int r0,
                                           int lane, float out_scale = 1.f) {
  const int H = p.num_heads;
  const auto& acc = *reinterpret_cast<const float(*)[32][4]>(o);
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int r = r0 + 8 * h2, g = c.m0 + r;
    if (g >= c.rows) continue;
    const float l = red[0][r] + red[1][r];
    const float m = m_run[h2] == -INFINITY ? 0.f : m_run[h2];
    sm80::store_out_row_at<T, 32, kPaired>(p, acc, h2, l, m, out_scale,
                                           slot < 0 ? -1 : slot * p.part_rows + g, c.t0 + g / H,
                                           g % H, 256 * wg + 2 * (lane & 3),
                                           wg == 0 && (lane & 3) == 0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_hopper_kernel(const __grid_constant__ CUtensorMap kv_map,
                             const __grid_constant__ CUtensorMap q_map, const DecodeParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using G = Gmma<T>;
  extern __shared__ unsigned char smem_raw[];
  Smem& sm = smem_aligned_1024<Smem>(smem_raw);
  const int tid = threadIdx.x, wg = tid >> 7, wq = (tid >> 5) & 3, lane = tid & 31;
  const int part = blockIdx.y, m_tile = blockIdx.x;
  const int H = p.num_heads;

  if (tid == 0) {
    tma_prefetch_desc(&kv_map);
    for (int s = 0; s < kStages; ++s) mbar_init(&sm.full[s], 1);
    mbar_init(&sm.q_full, 1);
    mbar_init_fence();
  }
  sched_fill_cta(p, sm.sched, tid >> 5, lane);
  __syncthreads();

  // This thread's two rows (accumulator layout of wgmma m64: warp wq owns rows 16 wq ..).
  const int r0 = 16 * wq + (lane >> 2);
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const uint64_t q_desc = gmma_desc_sw128(sm.q, 16, 1024);
  const uint64_t p_desc = gmma_desc_sw128(sm.p, 16, 1024);

  PartWalker walk;
  walk.init(p, sm.sched, part);
  Segment seg;
  int g0 = 0;  // tiles of the earlier segments: tile g uses stage g % 2, phase (g / 2) % 2
  uint32_t q_loads = 0;  // Q tiles loaded through TMA (q_full's phase)
  while (walk.next(p, sm.sched, seg)) {
    sm80::CtaRows c;
    if (!segment_rows(p, seg, m_tile, c)) continue;  // the same for every thread
    const int n_tiles = (c.kv_hi - c.kv_lo + kBN - 1) / kBN;
    const TileLoader ld{&kv_map, p.block_table + static_cast<int64_t>(seg.b) * p.bt_stride,
                        p.block_size, min(p.block_size, kBN), c.kv_hi,
                        kv_l2_policy(p.kv_l2_hint)};
    if (tid == 0) {  // Q and both stages are free: the last tile ended with a CTA barrier
      if (p.q_tma) issue_q_tma(&q_map, p, c, sm.q, &sm.q_full);
      for (int s = 0; s < kStages && s < n_tiles; ++s) {
        const int st = (g0 + s) & (kStages - 1);
        ld.issue(sm.kv[st], &sm.full[st], c.kv_lo + s * kBN);
      }
    }
    if (p.q_tma) {
      mbar_wait(&sm.q_full, q_loads++ & 1);
    } else {
      load_q<T>(p, c, sm.q, tid);
    }
    __syncthreads();

    const int last0 = c.last_pos(c.m0 + r0, H), last1 = c.last_pos(c.m0 + r0 + 8, H);
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;

    for (int it = 0; it < n_tiles; ++it) {
      const int g = g0 + it, st = g & (kStages - 1);
      const int tile_start = c.kv_lo + it * kBN;
      unsigned char* kv = sm.kv[st];
      const bool refill = it + kStages < n_tiles;  // this stage takes tile it + 2 after it
      int pages_next[4];  // thread 0: the pages of tile it + 2, read a tile before its issue
      if (tid == 0 && refill) ld.pages(tile_start + kStages * kBN, pages_next);
      mbar_wait(&sm.full[st], (g / kStages) & 1);

      // S[:, 32 wg ..] = Q K^T over 576 = 9 chunks x 4 k-steps.
      float s[16];
      {
        const uint64_t k_desc = gmma_desc_sw128(kv + wg * 32 * 128, 16, 1024);
        fence_regs(s);
        wgmma_fence();
        qk_chunks<typename G::S, kChunks>(q_desc, k_desc, s, 0, true);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);
      }

      // Mask, scale to base 2, row maxima of this half.
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int h2 = (i >> 1) & 1;
        const int pos = tile_start + wg * 32 + 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
        const bool ok = pos < c.kv_hi && pos <= (h2 ? last1 : last0);
        s[i] = ok ? s[i] * scale_log2 : -INFINITY;
        mx[h2] = fmaxf(mx[h2], s[i]);
      }
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 1));
        mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 2));
      }
      if ((lane & 3) == 0) {
        sm.red[wg][r0] = mx[0];
        sm.red[wg][r0 + 8] = mx[1];
      }
      named_barrier(1, kThreads);
      float alpha[2];
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const float other = sm.red[wg ^ 1][r0 + 8 * h2];
        const float m_new = fmaxf(m_run[h2], fmaxf(mx[h2], other));
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: no NaN
        alpha[h2] = exp2f(m_run[h2] - m_use);
        m_run[h2] = m_new;
        mx[h2] = m_use;
      }
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int h2 = (i >> 1) & 1;
        s[i] = exp2f(s[i] - mx[h2]);
        sum[h2] += s[i];
      }
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) l_run[h2] = l_run[h2] * alpha[h2] + sum[h2];
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] *= alpha[(i >> 1) & 1];

      // P (this warpgroup's 32 columns) -> the swizzled P chunk.
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = wg * 32 + 8 * j + 2 * (lane & 3);
        *reinterpret_cast<uint32_t*>(sm.p + swz(r0, col)) = pack2<T>(s[4 * j], s[4 * j + 1]);
        *reinterpret_cast<uint32_t*>(sm.p + swz(r0 + 8, col)) =
            pack2<T>(s[4 * j + 2], s[4 * j + 3]);
      }
      // A tile past the segment's end: zero the V rows this warpgroup reads (NaN * 0 = NaN).
      const int valid = c.kv_hi - tile_start;
      if (valid < kBN) {
        const int t = tid & 127;
        for (int i = t; i < (kBN - valid) * 4 * 8; i += 128) {
          const int r = valid + i / 32, piece = i % 32;  // 4 chunks x 8 16-byte pieces per row
          *reinterpret_cast<uint4*>(kv + (4 * wg + piece / 8) * kChunk + r * 128 +
                                    (piece % 8) * 16) = make_uint4(0, 0, 0, 0);
        }
      }
      fence_proxy_async_smem();
      named_barrier(2, kThreads);

      // O[:, 256 wg ..] += P V over the tile's 64 positions (4 k-steps).
      {
        const uint64_t v_desc = gmma_desc_sw128(kv + 4 * wg * kChunk, kChunk, 1024);
        pv_ss<typename G::O>(p_desc, v_desc, o);
        wgmma_wait<0>();
        fence_regs(o);
      }
      // Both warpgroups are done with this stage and with P: refill the stage.
      __syncthreads();
      if (tid == 0 && refill) ld.issue_pages(kv, &sm.full[st], tile_start + kStages * kBN, pages_next);
    }
    g0 += n_tiles;

    // Row sums: quad reduction, then the two halves through shared memory. The next
    // segment's Q load and red[] writes come after its CTA barrier.
    share_row_sums(l_run, sm.red, wg, r0, lane);
    __syncthreads();
    store_rows<T>(p, c, o, sm.red, m_run, seg.slot, wg, r0, lane);
  }
  if (p.tail_merge == kTailBarrier) {  // cooperative launch
    sm80::merge_pieces_at_end<T, kThreads / 32, 8, 4>(p, sm.sched, reinterpret_cast<float*>(sm.kv[0]),
                                                      tid >> 5, lane, [] { __syncthreads(); }, [] {});
  }
#else
  __trap();  // built without sm_90a device code: the launcher never selects this kernel
#endif
}

}  // namespace sm90
}  // namespace portmla
