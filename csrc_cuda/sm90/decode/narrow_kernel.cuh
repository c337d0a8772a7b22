// Hopper (sm_90a) decode for few rows per sequence (16-head TP8 shards: memory-bound) and 16-bit
// caches: both products transposed, so the KV tile is wgmma's M side and the 16 query rows
// its N side.
//
// The single-tile kernel (hopper_kernel.cuh) puts the query rows on M, which is 64 on wgmma:
// with 16 rows three quarters of its tensor work and of its Q tile (72 KB of 229) are padding,
// and at 16 heads its per-tile work (~2.5 us of tensor time at full rate) came close to the
// tile's HBM time (~3.2 us at 3 TB/s), so a stage was refilled late. Here, per KV tile of 64
// positions (one warpgroup, 128 threads):
//   S^T  [64 positions x 16 rows] = K Q^T: m64 n16, 36 k-steps, A = the KV tile (K-major), B =
//        the Q rows (16 x 576, K-major)
//   max  column maxima: 8 lanes of a quad column, then the 4 warps through shared memory
//   P^T  exp2 of the scaled scores -> a 16 x 64 swizzled P chunk ([row][position])
//   O^T  [512 x 16] += V^T P^T: 8 m64 tiles (one per 64-channel chunk of V, read MN-major),
//        4 k-steps each, B = P (K-major)
// Thread 0 issues the TMA loads of tile i + 2 once tile i is done (two stages, as the
// single-tile kernel; the tile's tensor work is a quarter of that kernel's).
// Shared memory: two KV stages (9 chunks of 64 positions x 128 bytes each), Q (9 chunks of 16
// rows x 128 bytes), P (one such chunk), all 128-byte swizzled = 167,936 bytes + row data.
// The epilogue stages the 16 output rows (normalised, T) over Q and stores them a 16-byte piece
// a thread (rows of 1 KB: whole sectors).
#pragma once

#include "hopper_kernel.cuh"
#include "narrow_trace.cuh"

namespace portmla {
namespace sm90 {

constexpr int kNM = 16;                // rows per CTA (wgmma N)
constexpr int kNThreads = 128;         // one warpgroup
constexpr int kNChunk = kNM * 128;     // bytes of a 16-row x 128-byte swizzled chunk (Q, P)
constexpr int kNOutPitch = 2 * sm80::kL + 16;  // bytes of a staged output row (conflict-free)
static_assert(kNM * kNOutPitch <= kChunks * kNChunk, "the staged output fits over Q");
static_assert(kNThreads / 32 * sm80::kTailScratchFloats * 4 <= kTileBytes,
              "the tail merge's scratch fits a KV stage");

struct alignas(1024) NarrowSmem {
  unsigned char kv[kStages][kTileBytes];
  unsigned char q[kChunks * kNChunk];  // Q rows; the epilogue's staged output rows
  unsigned char p[kNChunk];
  float red[4][kNM];  // per-warp column maxima, then column sums
  uint64_t full[kStages];
  SchedTable sched;
};
constexpr int kNarrowSmemBytes = static_cast<int>(sizeof(NarrowSmem)) + 1024;
static_assert(kNarrowSmemBytes <= 227 * 1024, "more than an sm_90 CTA may have");

// Byte offset of 16-bit element (row r < 16, column c) in a stack of 16-row swizzled chunks.
__device__ __forceinline__ uint32_t swz16(int r, int c) {
  const int cc = c & 63;
  return static_cast<uint32_t>((c >> 6) * kNChunk + r * 128 +
                               ((((cc >> 3) ^ (r & 7)) << 4) | ((cc & 7) << 1)));
}

// The m64 n16 accumulator layout: this thread's column e (0..3) is CTA row
// narrow_col(e, lane) (2j, 2j + 1, 8 + 2j, 9 + 2j); value i of a fragment lies in column
// narrow_e(i), at position (or channel) 16 w + g + 8 ((i >> 1) & 1) of the m64 tile.
__device__ __forceinline__ int narrow_col(int e, int lane) { return 2 * (lane & 3) + (e & 1) + 8 * (e >> 1); }
__device__ __forceinline__ int narrow_e(int i) { return (i & 1) | ((i >> 2) << 1); }

// Online softmax over a tile's columns (query rows), shared by the narrow kernels. Before the
// barrier: this thread's partial column maxima `mx` (of its masked, base-2 scores) over the 8
// lanes of a column (g8 = lane / 4), published to red[w].
__device__ __forceinline__ void narrow_publish_max(float (&mx)[4], float (&red)[4][kNM], int w,
                                                   int lane, int g8) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
#pragma unroll
    for (int o2 = 4; o2 < 32; o2 <<= 1) mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], o2));
  }
  if (g8 == 0) {
#pragma unroll
    for (int e = 0; e < 4; ++e) red[w][narrow_col(e, lane)] = mx[e];
  }
}

// After it: the tile's column maxima from the 4 warps' red[], the running maxima, the factor
// `alpha` the running sums and the output take, and in mx[e] the maximum the scores are taken
// against.
__device__ __forceinline__ void narrow_update_max(const float (&red)[4][kNM], float (&m_run)[4],
                                                  float (&mx)[4], float (&alpha)[4], int lane) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int col = narrow_col(e, lane);
    const float mt = fmaxf(fmaxf(red[0][col], red[1][col]), fmaxf(red[2][col], red[3][col]));
    const float m_new = fmaxf(m_run[e], mt);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: no NaN
    alpha[e] = exp2f(m_run[e] - m_use);
    m_run[e] = m_new;
    mx[e] = m_use;
  }
}

// P^T = exp2(s - mx) as TP into the 16 x 64 P chunk (value i: row narrow_col(narrow_e(i)),
// position r0 + 8 ((i >> 1) & 1)); l_run = l_run * alpha + the tile's column sums.
template <typename TP>
__device__ __forceinline__ void narrow_write_p(float (&s)[8], const float (&mx)[4],
                                               const float (&alpha)[4], float (&l_run)[4],
                                               unsigned char* p, int r0, int lane) {
  float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int e = narrow_e(i);
    s[i] = exp2f(s[i] - mx[e]);
    sum[e] += s[i];
    *reinterpret_cast<TP*>(p + swz16(narrow_col(e, lane), r0 + 8 * ((i >> 1) & 1))) = from_float<TP>(s[i]);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) l_run[e] = l_run[e] * alpha[e] + sum[e];
}

// The end of a segment, shared by the narrow kernels. Column sums over the 8 lanes of a column,
// then the 4 warps through red[] (whose maxima were last read before the last tile's second
// barrier); lane 0 of warp 0's quads stores the rows' LSEs; inv[e]: osc / the sum of this
// thread's column e (0 for an empty row).
__device__ __forceinline__ void narrow_row_sums(const DecodeParams& p, const sm80::CtaRows& c,
                                                int64_t prow0, float (&red)[4][kNM],
                                                const float (&m_run)[4], float (&l_run)[4],
                                                float osc, float (&inv)[4], int w, int lane) {
  const int H = p.num_heads, g8 = lane >> 2;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
#pragma unroll
    for (int o2 = 4; o2 < 32; o2 <<= 1) l_run[e] += __shfl_xor_sync(0xffffffffu, l_run[e], o2);
  }
  if (g8 == 0) {
#pragma unroll
    for (int e = 0; e < 4; ++e) red[w][narrow_col(e, lane)] = l_run[e];
  }
  __syncthreads();
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int col = narrow_col(e, lane), gr = c.m0 + col;
    const float l = red[0][col] + red[1][col] + red[2][col] + red[3][col];
    inv[e] = l > 0.f ? osc / l : 0.f;
    if (w == 0 && g8 == 0 && gr < c.rows) {
      sm80::store_row_lse(p, prow0 < 0 ? -1 : prow0 + gr, c.t0 + gr / H, gr % H,
                          sm80::row_lse(m_run[e], l));
    }
  }
}

// Whether the output rows allow 16-byte stores (partial rows always do): narrow_store_rows' out16.
__device__ __forceinline__ bool narrow_out16(const DecodeParams& p) {
  return (reinterpret_cast<uintptr_t>(p.out) % 16 == 0) && p.out_stride_t % 8 == 0 &&
         p.out_stride_h % 8 == 0;
}

// The 16 staged output rows (`staged`, kNOutPitch bytes apart) -> the output (or the partial
// rows when prow0 >= 0), 16 bytes a thread (4-byte stores where the output rows are not 16-byte
// aligned: out16 false), then a CTA barrier (the staging area is Q's).
template <typename T>
__device__ __forceinline__ void narrow_store_rows(const DecodeParams& p, const sm80::CtaRows& c,
                                                  int64_t prow0, const unsigned char* staged,
                                                  bool out16, int tid) {
  const int H = p.num_heads;
  const int n_rows = min(kNM, c.rows - c.m0);
  for (int idx = tid; idx < n_rows * (sm80::kL / 8); idx += kNThreads) {
    const int r = idx / (sm80::kL / 8), piece = idx % (sm80::kL / 8);
    const int gr = c.m0 + r;
    const uint4 v = *reinterpret_cast<const uint4*>(staged + r * kNOutPitch + 16 * piece);
    if (prow0 >= 0) {
      *reinterpret_cast<uint4*>(static_cast<T*>(p.part_out) + (prow0 + gr) * sm80::kL + 8 * piece) = v;
    } else {
      T* dst = static_cast<T*>(p.out) + static_cast<int64_t>(c.t0 + gr / H) * p.out_stride_t +
               static_cast<int64_t>(gr % H) * p.out_stride_h + 8 * piece;
      if (out16) {
        *reinterpret_cast<uint4*>(dst) = v;
      } else {
        uint32_t* d = reinterpret_cast<uint32_t*>(dst);
        d[0] = v.x;
        d[1] = v.y;
        d[2] = v.z;
        d[3] = v.w;
      }
    }
  }
  __syncthreads();  // the staged rows are read before the next segment's Q lands there
}

// A segment's normalised output (fragment t's value i: row narrow_col(narrow_e(i)), channel
// chan(t, i), times inv of its column) staged over Q, then stored (narrow_store_rows).
template <typename T, class Chan>
__device__ __forceinline__ void narrow_finish_rows(const DecodeParams& p, const sm80::CtaRows& c,
                                                   int64_t prow0, const float (&o)[8][8],
                                                   const float (&inv)[4], unsigned char* staged,
                                                   bool out16, int tid, int lane, Chan chan) {
#pragma unroll
  for (int t = 0; t < 8; ++t) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int e = narrow_e(i);
      *reinterpret_cast<T*>(staged + narrow_col(e, lane) * kNOutPitch + 2 * chan(t, i)) =
          from_float<T>(o[t][i] * inv[e]);
    }
  }
  __syncthreads();
  narrow_store_rows<T>(p, c, prow0, staged, out16, tid);
}

// kTailArrive (params.h): the pieces' merge of each row tile of a cut sequence by the CTA that
// stores its last piece, with no grid barrier. A stored piece is counted in by one thread
// (fence, then the count: a grid barrier's arrival, the rows stored before a CTA barrier) at
// the next segment's start once its loads are issued, or after the loop: counted at the
// segment's end by thread 0, the fence and the atomic's round trip held up the next segment's
// loads (H100: fixed-length rows 2-3 us slower). The CTA that counts a row tile's last piece
// merges the pieces after its own loop (narrow_merge_at_end; a merge inside the loop cost the
// 16-bit kernel's HGMMA loop its uniform registers, 134 R2UR). A part holds at most two pieces
// of cut sequences (its first and its last segment).
constexpr int kArriveThread = kNThreads - 32;  // warp 3's lane 0 (warp 0 issues the loads)

struct ArriveList {
  int pending = -1;      // the cut sequence of a stored piece not counted yet (every thread)
  int b0 = -1, b1 = -1;  // kArriveThread: sequences whose last piece this CTA stored
};

// At a segment's end, after its rows are stored (every thread).
__device__ __forceinline__ void narrow_piece_stored(const DecodeParams& p, const Segment& seg,
                                                    ArriveList& a) {
  if (p.tail_merge == kTailArrive && seg.slot >= 0) a.pending = seg.b;
}

// The pending piece counted in (every thread; after a CTA barrier that follows its store).
__device__ __forceinline__ void narrow_arrive(const DecodeParams& p, const SchedTable& t, int tid,
                                              ArriveList& a) {
  const int b = a.pending;
  if (b < 0) return;
  a.pending = -1;
  if (tid != kArriveThread) return;
  __threadfence();  // the CTA's partial rows (stored before a CTA barrier) before the count
  if (atomicAdd(piece_counter(p, b), 1) == sched_piece_at(p, t, 2 * b + 1) - 1) {
    if (a.b0 < 0) a.b0 = b;
    else a.b1 = b;
  }
}

// The pieces' merge at the end of a narrow kernel, after its segment loop (every thread).
// kTailArrive: the last segment's piece counted in, then the row tiles whose last piece this CTA
// counted (their list in two ints of `red`, free by then). kTailBarrier (cooperative launch):
// sm80::merge_pieces_at_end, `scratch` a free KV stage.
template <typename T>
__device__ __forceinline__ void narrow_merge_at_end(const DecodeParams& p, const SchedTable& t,
                                                    ArriveList& mine, float (&red)[4][kNM],
                                                    unsigned char* scratch, int w, int lane,
                                                    int tid) {
  if (p.tail_merge == kTailArrive) {
    int* list = reinterpret_cast<int*>(&red[0][0]);
    narrow_arrive(p, t, tid, mine);
    if (tid == kArriveThread) {
      __threadfence();  // the other pieces' rows are read after the counts that saw them stored
      list[0] = mine.b0;
      list[1] = mine.b1;
    }
    __syncthreads();
    for (int k = 0; k < 2; ++k) {
      const int b = list[k];
      sm80::CtaRows c;
      if (b >= 0 && sm80::seq_rows<kNM>(p, c, blockIdx.x, b)) {
        sm80::merge_tile_rows<T, kNThreads / 32, kNM, 2>(p, t, b, c, w, lane);
      }
    }
    NT_EV(29);
  } else if (p.tail_merge == kTailBarrier) {
    sm80::merge_pieces_at_end<T, kNThreads / 32, 8, 4>(p, t, reinterpret_cast<float*>(scratch), w,
                                                       lane, [] { __syncthreads(); },
                                                       [] { NT_EV(28); });
    NT_EV(29);
  }
}

template <typename T>
__global__ void __launch_bounds__(kNThreads, 1)
    mla_decode_hopper_narrow_kernel(const __grid_constant__ CUtensorMap kv_map,
                                    const __grid_constant__ CUtensorMap q_map,
                                    const DecodeParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using G = Gmma<T>;
  extern __shared__ unsigned char smem_raw[];
  NarrowSmem& sm = smem_aligned_1024<NarrowSmem>(smem_raw);
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g8 = lane >> 2;
  const int part = blockIdx.y, m_tile = blockIdx.x;
  const int H = p.num_heads;
  (void)q_map;

  NT_DECL;
  NT_EV(0);
  if (tid == 0) {
    tma_prefetch_desc(&kv_map);
    for (int s = 0; s < kStages; ++s) mbar_init(&sm.full[s], 1);
    mbar_init_fence();
  }
  sched_fill_cta(p, sm.sched, w, lane);
  __syncthreads();
  NT_EV(1);

  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const uint64_t q_desc = gmma_desc_sw128(sm.q, 16, 1024);
  const uint64_t p_desc = gmma_desc_sw128(sm.p, 16, 1024);
  const bool out16 = narrow_out16(p);

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
    const TileLoader ld{&kv_map, p.block_table + static_cast<int64_t>(seg.b) * p.bt_stride,
                        p.block_size, min(p.block_size, kBN), c.kv_hi,
                        kv_l2_policy(p.kv_l2_hint)};
    // Warp 0 issues the tiles' boxes (lane 0) with pages read a tile before the issue.
    auto issue = [&](int st, int start, int pages, int slot) {
      issue_boxes_warp(ld, sm.kv[st], &sm.full[st], start, kChunks,
                       [](int j, int& col, int& ch) {
                         ch = j;
                         col = 64 * j;
                       },
                       pages, slot, lane);
    };
    if (w == 0) {  // both stages are free: the last tile ended with a CTA barrier
      const int pages = prefetch_pages(ld, c.kv_lo, c.kv_lo + kBN, lane);
      for (int s = 0; s < kStages && s < n_tiles; ++s) {
        issue((g0 + s) & (kStages - 1), c.kv_lo + s * kBN, pages, 4 * s);
      }
    }
    issue_q_rows<T, kNM, kNThreads>(p, c, sm.q, tid, [](int r, int col) { return swz16(r, col); });
    narrow_arrive(p, sm.sched, tid, arrived);  // the previous segment's piece
    cp_async_wait<0>();
    fence_proxy_async_smem();
    __syncthreads();
    NT_SEG(1);

    int last[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) last[e] = c.last_pos(c.m0 + narrow_col(e, lane), H);
    float m_run[4], l_run[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      m_run[e] = -INFINITY;
      l_run[e] = 0.f;
    }
    float o[8][8];
#pragma unroll
    for (int ch = 0; ch < 8; ++ch)
#pragma unroll
      for (int i = 0; i < 8; ++i) o[ch][i] = 0.f;

    for (int it = 0; it < n_tiles; ++it) {
      const int g = g0 + it, st = g & (kStages - 1);
      const int tile_start = c.kv_lo + it * kBN;
      unsigned char* kv = sm.kv[st];
      const bool refill = it + kStages < n_tiles;  // this stage takes tile it + 2 after it
      int pages_next[4];  // thread 0: the pages of tile it + 2, read a tile before its issue
      if (tid == 0 && refill) ld.pages(tile_start + kStages * kBN, pages_next);
      NT_WAIT_BEGIN();
      mbar_wait(&sm.full[st], (g / kStages) & 1);
      NT_WAIT_END(it == 0);

      // S^T = K Q^T over 576 = 9 chunks x 4 k-steps.
      float s[8];
      {
        const uint64_t k_desc = gmma_desc_sw128(kv, 16, 1024);
        fence_regs(s);
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < 4 * kChunks; ++kc) {
          gmma<typename G::SNarrow>(desc_add(k_desc, (kc >> 2) * kChunk + (kc & 3) * 32),
                                    desc_add(q_desc, (kc >> 2) * kNChunk + (kc & 3) * 32), s,
                                    kc != 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);
      }

      // Mask, scale to base 2, column maxima over the tile's positions.
      float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int e = narrow_e(i);
        const int pos = tile_start + 16 * w + g8 + 8 * ((i >> 1) & 1);
        const bool ok = pos < c.kv_hi && pos <= last[e];
        s[i] = ok ? s[i] * scale_log2 : -INFINITY;
        mx[e] = fmaxf(mx[e], s[i]);
      }
      narrow_publish_max(mx, sm.red, w, lane, g8);
      named_barrier(1, kNThreads);
      float alpha[4];
      narrow_update_max(sm.red, m_run, mx, alpha, lane);
      narrow_write_p<T>(s, mx, alpha, l_run, sm.p, 16 * w + g8, lane);
#pragma unroll
      for (int ch = 0; ch < 8; ++ch)
#pragma unroll
        for (int i = 0; i < 8; ++i) o[ch][i] *= alpha[narrow_e(i)];
      // A tile past the segment's end: zero its V rows there (NaN * 0 = NaN in P V).
      const int valid = c.kv_hi - tile_start;
      if (valid < kBN) zero_v_rows(kv, valid, tid, kNThreads);
      fence_proxy_async_smem();
      named_barrier(1, kNThreads);  // P and the zeroed rows visible; red[] read by every warp

      // O^T += V^T P^T: 8 chunks x 4 k-steps of 16 positions.
      {
        const uint64_t v_desc = gmma_desc_sw128(kv, kChunk, 1024);
#pragma unroll
        for (int ch = 0; ch < 8; ++ch) fence_regs(o[ch]);
        wgmma_fence();
#pragma unroll
        for (int ch = 0; ch < 8; ++ch) {
#pragma unroll
          for (int ks = 0; ks < 4; ++ks) {
            gmma<typename G::ONarrow>(desc_add(v_desc, ch * kChunk + ks * 16 * 128),
                                      desc_add(p_desc, ks * 32), o[ch], true);
          }
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int ch = 0; ch < 8; ++ch) fence_regs(o[ch]);
      }
      __syncthreads();  // the stage and P are free
      if (tid == 0 && refill) ld.issue_pages(kv, &sm.full[st], tile_start + kStages * kBN, pages_next);
    }
    g0 += n_tiles;
    NT_SEG(3);

    const int64_t prow0 = seg.slot < 0 ? -1 : static_cast<int64_t>(seg.slot) * p.part_rows;
    float inv[4];
    narrow_row_sums(p, c, prow0, sm.red, m_run, l_run, 1.f, inv, w, lane);
    // Chunk ch's fragment value i is channel 64 ch + 16 w + g8 + 8 ((i >> 1) & 1).
    narrow_finish_rows<T>(p, c, prow0, o, inv, sm.q, out16, tid, lane, [&](int ch, int i) {
      return 64 * ch + 16 * w + g8 + 8 * ((i >> 1) & 1);
    });
    narrow_piece_stored(p, seg, arrived);
    NT_SEG(4);
    NT_SEG_END();
  }
  NT_EV(27);
  NT_FINISH();
  narrow_merge_at_end<T>(p, sm.sched, arrived, sm.red, sm.kv[0], w, lane, tid);
#else
  __trap();  // built without sm_90a device code: the launcher never selects this kernel
#endif
}

}  // namespace sm90
}  // namespace portmla
