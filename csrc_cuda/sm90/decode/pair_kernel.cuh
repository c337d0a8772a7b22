// Hopper (sm_90a) absorbed-MLA decode, "pair" schedule: KV tiles are taken two at a time (a in
// stage 0, b in stage 1) and each of the two consumer warpgroups computes the whole 64 x 64
// score tile of one of them, so one warpgroup's softmax runs while the other's GEMMs keep the
// tensor cores busy (the product order of FlashMLA's 2025-04 "seesaw" write-up; our code). The
// output O (64 x 512, fp32) is split by columns: warpgroup 0 keeps O_L (columns 0..255),
// warpgroup 1 O_R (256..511), 128 registers each. A third, producer warpgroup (one warp; 40
// registers, the consumers 232 through setmaxnreg) issues every TMA load and (in the first row
// tile's CTA: prefetches_l2) prefetches the next pair's tiles into L2, so no consumer ever waits
// on a TMA issue or a block-table read.
//
// Per pair, with m the running row max shared by both warpgroups (base-2 scaled scores):
//   WG0  S_a = Q K_a^T (m64 n64, 36 k-steps); m_a = max(m, rowmax S_a) -> smem, arrive hand A;
//        P_a = exp2(S_a - m_a); O_L = O_L 2^(m - m_a) + P_a V_a[:, :256] (A = P_a in registers);
//        wait hand B (m_b, P_b); P_a 2^(m_a - m_b) -> stage 0's rope chunk (dead since S_a),
//        arrive hand C; O_L = O_L 2^(m_a - m_b) + P_b V_b[:, :256]
//   WG1  S_b = Q K_b^T; wait hand A; m_b = max(m_a, rowmax S_b); P_b = exp2(S_b - m_b) -> its
//        own smem chunk, m_b -> smem, arrive hand B; O_R = O_R 2^(m - m_b) + P_b V_b[:, 256:]
//        (A = P_b in registers); wait hand C; O_R += P_a' V_a[:, 256:]
// Row sums: each warpgroup sums the P it computed, both kept at the current max; added at the end.
//
// Stages are loaded in two parts (part 0 = chunks 0..3, part 1 = chunks 4..7 + rope), each
// with a `full` (TMA bytes) and an `empty` mbarrier; the warpgroup that reads a part last
// releases it (its 4 warps arrive), and the producer refills it with the next pair's tile:
//   stage 0: part 0 after WG0's O_L += P_a V_a, part 1 after WG1's O_R += P_a' V_a
//   stage 1: part 1 after WG1's O_R += P_b V_b, part 0 after WG0's O_L += P_b V_b
// (the first and third as soon as their product completes, before the warpgroup waits at
// barrier B / C: 3-5 % faster at 128 heads on an H200 than releasing after those waits).
// S consumes its stage's parts in the order they are released.
#pragma once

#include <type_traits>

#include "hopper_kernel.cuh"
#include "pair_fp8_fill.cuh"

namespace portmla {
namespace sm90 {

struct alignas(1024) PairSmem {
  unsigned char q[kTileBytes];
  unsigned char kv[kStages][kTileBytes];
  unsigned char p_b[kChunk];  // P of tile b (WG1 -> WG0's O_L += P_b V_b)
  float m_a[kBM];     // running max after tile a (WG0 -> WG1)
  float m_b[kBM];     // after tile b (WG1 -> WG0)
  float red[2][kBM];  // row sums of the two warpgroups (epilogue)
  uint64_t full[kStages][2];   // part loaded (TMA bytes; quantized: the producer's copies)
  uint64_t empty[kStages][2];  // part released by the warpgroup that reads it last
  float q_inv[kBM];            // quantized caches: the inverse power-of-two scale of each Q row
  int ds_exp[kStages][4];      // fp8_ds_mla: k of each expanding warp's tokens (M = 2^k)
  uint64_t q_full;             // Q tile loaded (p.q_tma)
  uint64_t hand[5];            // the consumers' handoffs (kHandA ..)
  SchedTable sched;            // the schedule, small batches (common/schedule.cuh)
};
constexpr int kPairSmemBytes = static_cast<int>(sizeof(PairSmem)) + 1024;
static_assert(kPairSmemBytes <= 227 * 1024, "more than an sm_90 CTA may have");

#if defined(PORTMLA_PAIR_TRACE)  // timeline of one CTA (scripts/pair_trace.cu), never in the module
__device__ long long g_pair_trace[2][64][12];
#define PAIR_TRACE(ev)                                                                   \
  do {                                                                                   \
    if (blockIdx.x == 0 && blockIdx.y == PORTMLA_PAIR_TRACE && (tid & 127) == 0 &&       \
        used[0] < 64)                                                                    \
      g_pair_trace[wg][used[0]][ev] = clock64();                                         \
  } while (0)
// The CTA's prologue / epilogue per segment: globaltimer (ns, comparable across SMs) and
// clock64 (for the SM clock) per warpgroup leader; segments past the 8th share the last row.
__device__ unsigned long long g_pair_span[3][8][10];
__device__ long long g_pair_span_clk[3][8][10];
#define PAIR_SPAN_SEG(sg, ev)                                                                 \
  do {                                                                                        \
    if (blockIdx.x == 0 && blockIdx.y == PORTMLA_PAIR_TRACE && (threadIdx.x & 127) == 0) {    \
      unsigned long long t;                                                                   \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));                                   \
      const int sgi = min(static_cast<int>(sg), 7);                                           \
      g_pair_span[threadIdx.x >> 7][sgi][ev] = t;                                             \
      g_pair_span_clk[threadIdx.x >> 7][sgi][ev] = clock64();                                 \
    }                                                                                         \
  } while (0)
#define PAIR_SPAN(ev) PAIR_SPAN_SEG(0, ev)
// Every CTA's entry (ev 0), its consumers' end (1), past the tail merge's grid barrier (2), its
// tail merge done (3) (thread 0): launch skew and tail.
__device__ unsigned long long g_pair_cta[2][256][4];
#define PAIR_CTA(ev)                                                                          \
  do {                                                                                        \
    if (threadIdx.x == 0 && blockIdx.y < 256) {                                               \
      unsigned long long t;                                                                   \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));                                   \
      g_pair_cta[blockIdx.x & 1][blockIdx.y][ev] = t;                                         \
    }                                                                                         \
  } while (0)
#else
#define PAIR_CTA(ev)
#define PAIR_TRACE(ev)
#define PAIR_SPAN(ev)
#define PAIR_SPAN_SEG(sg, ev)
#endif

// scripts/pair_trace.cu's compute-only mode (-DPORTMLA_PAIR_NO_LOAD, never in the module): the
// producer loads each stage part once (the CTA's first pair) and afterwards only arrives on its
// `full` barrier once the part is released, so every later tile computes on the data already in
// shared memory: the pair loop's time with its data waits reduced to the handoff itself.
#if defined(PORTMLA_PAIR_NO_LOAD)
constexpr bool kPairNoLoad = true;
#else
constexpr bool kPairNoLoad = false;
#endif
// -DPORTMLA_PAIR_NO_LOAD_TILE1 (trace builds only): the same for the CTAs of row tile 1 alone,
// so that at 128 heads each KV tile crosses from L2 to the SMs once instead of twice while the
// traced CTA (row tile 0) still streams its tiles: what the L2 -> SM traffic costs a pair.
#if defined(PORTMLA_PAIR_NO_LOAD_TILE1)
constexpr bool kPairNoLoadTile1 = true;
#else
constexpr bool kPairNoLoadTile1 = false;
#endif

// The L2 prefetch of the next pair's tiles only where a TMA box holds at least this many rows
// (block sizes): with 16-row boxes a tile takes 36 loads and as many prefetches, and the
// producer warp's TMA issue bound the pair loop. H100, same call, graph-replay medians, us,
// prefetch always / only from these rows: 128q1s4k h128 bf16 block 16 553.8 / 448.5, 32q1s4k
// block 16 153.4 / 130.2, fp8 block 16 516.8 / 449.3, fp8 block 32 389.7 / 375.5; bf16 block
// 32 383.2 with it / 387.2 without (kept), block 64 unchanged (304).
template <int FMT>
constexpr int kPrefetchMinRows = FMT == kKv16 ? 32 : 64;

constexpr int kPairThreads = 384;  // consumer warpgroups 0, 1 and the producer warpgroup 2
// setmaxnreg moves registers within what the launch gave the CTA (384 x 168): an inc past that
// pool never returns (the kernel hangs), so 128 x 40 + 256 x 232 must not exceed it.
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= kPairThreads * 168, "register pool");

// The consumers' handoffs are mbarriers (PairSmem::hand) that every thread of the writing
// warpgroup(s) arrives on: A, B, C complete once a pair, R and F once a segment. (Named
// barriers order the same accesses, but compute-sanitizer's racecheck does not follow
// bar.arrive, nor the bar.sync at a segment's start between one segment's reads of red and
// the next one's writes: scripts/racecheck_handoffs.cu, NOTES.md. An mbarrier there instead
// made ptxas spill 40 B in the fp8 consumers, so F, in the epilogue, orders those.)
constexpr int kHandA = 0;  // m_a ready (WG0 arrives, WG1 waits)
constexpr int kHandB = 1;  // m_b and P_b ready (WG1 arrives, WG0 waits)
constexpr int kHandC = 2;  // P_a at m_b ready (WG0 arrives, WG1 waits)
constexpr int kHandR = 3;  // both warpgroups' row sums in red (both arrive and wait)
constexpr int kHandF = 4;  // red read (both arrive; waited before the next segment's writes)
constexpr int kBarQ = 5;   // the segment's Q loaded (256 consumer threads, bar.sync)
constexpr int kBarTail = 6;  // the consumers inside the tail merge (sm80::tail_merge)
static_assert(sizeof(PairSmem::hand) == (kHandF + 1) * sizeof(uint64_t), "one mbarrier each");
constexpr int kBarOwn0 = 3;  // warpgroup-local barriers after zeroing V rows
// kTailCount: the consumer thread that counts a stored piece in (not thread 0, which issues the
// next segment's Q load).
constexpr int kCountThread = kThreads - 1;
constexpr int kRope = kChunks - 1;

// 2^(m_old - m_new) for the O / row-sum rescale; 0 while nothing was seen (m_old = -inf).
__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : fast_exp2(m_old - m_new);
}

// O rows *= sc (this thread's two rows); skipped when no row of the warp changes (sc == 1).
__device__ __forceinline__ void scale_rows(float (&o)[128], const float (&sc)[2]) {
  if (!__any_sync(0xffffffffu, sc[0] != 1.f || sc[1] != 1.f)) return;
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] *= sc[(i >> 1) & 1];
}

// Waits for this warpgroup's P V product (P from registers `pk`), then frees the stage part
// it read: one arrival per warp on `empty`.
__device__ __forceinline__ void release_after_pv(float (&o)[128], uint32_t (&pk)[16],
                                                 uint64_t* empty, int lane) {
  wgmma_wait<0>();
  fence_regs(o);
  fence_regs(pk);
  if (lane == 0) mbar_arrive(empty);
}

// The raw scores of a 64 x 64 tile (accumulator layout) -> P = exp2(s * scale - m) in place, row sums added
// to `sum`, and P packed as wgmma A fragments: k-step kk uses pk[4 kk .. 4 kk + 3]. kWeighted
// (fp8_ds_mla): the sums take P times wsum[w] in the columns of expanding warp w's tokens.
template <typename T, bool kWeighted = false>
__device__ __forceinline__ void softmax_pack(float (&s)[32], const float (&scale_log2)[2],
                                             const float (&m)[2], float (&sum)[2],
                                             uint32_t (&pk)[16], const float* wsum = nullptr) {
  float use[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) use[h2] = m[h2] == -INFINITY ? 0.f : m[h2];
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int h2 = (i >> 1) & 1;
    s[i] = fast_exp2(fmaf(s[i], scale_log2[h2], -use[h2]));
    if constexpr (kWeighted) {
      sum[h2] = fmaf(s[i], wsum[i >> 3], sum[h2]);
    } else {
      sum[h2] += s[i];
    }
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) pk[i] = pack2<T>(s[2 * i], s[2 * i + 1]);
}

// fp8_ds_mla on fp16 operands (pair_fp8_fill.cuh): the raw scores of a tile whose latent values
// were stored over M_w = 2^k_w (kx: k of expanding warp w, whose tokens are columns 16 w ..
// 16 w + 15, i.e. s[8 w .. 8 w + 7]) -> s M_w sl2 + k_w in place: the base-2 scaled score plus
// k_w, so that exp2 of it minus the row max is P x M_w (the P V operand, which meets the
// values over M_w). wsum[w] = 2^-k_w takes the row sums back to P.
__device__ __forceinline__ void ds_unscale_scores(float (&s)[32], const int* kx,
                                                  const float (&sl2)[2], float (&wsum)[4]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const float mw = pow2i(kx[w]), kf = static_cast<float>(kx[w]);
    wsum[w] = pow2i(-kx[w]);
    const float c0 = sl2[0] * mw, c1 = sl2[1] * mw;
#pragma unroll
    for (int i = 8 * w; i < 8 * w + 8; ++i) s[i] = fmaf(s[i], (i & 2) ? c1 : c0, kf);
  }
}

// P (packed, accumulator order: pk[2 j + h2] = row r0 + 8 h2, columns 8 j + 2 (lane % 4) ..)
// -> a 64 x 64 swizzled chunk (the A operand of the other warpgroup's P V).
__device__ __forceinline__ void store_p(unsigned char* chunk, const uint32_t (&pk)[16], int r0,
                                        int lane) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int col = 8 * j + 2 * (lane & 3);
    *reinterpret_cast<uint32_t*>(chunk + swz(r0, col)) = pk[2 * j];
    *reinterpret_cast<uint32_t*>(chunk + swz(r0 + 8, col)) = pk[2 * j + 1];
  }
}

// The producer's TMA loop (16-bit caches, and quantized ones with p.kv_tma): one warp issues
// every load, lanes 0..7 holding the block-table pages of the two tiles in flight, and (in row
// tile 0's CTA: prefetches_l2) prefetches the next pair's tiles into L2. It runs ahead into the
// next segment while the consumers finish this one.
template <int FMT, bool kLanes = false, class Smem>
__device__ __forceinline__ void produce_tma(const CUtensorMap* map, const DecodeParams& p,
                                            Smem& sm, PartWalker& walk, int m_tile, int lane) {
  int fills[kStages] = {0, 0};  // loads of each stage so far
  Segment seg;
  while (walk.next(p, sm.sched, seg)) {
    sm80::CtaRows c;
    if (!segment_rows(p, seg, m_tile, c)) continue;
    const int n_tiles = (c.kv_hi - c.kv_lo + kBN - 1) / kBN;
    const PlainTileLoader ld{map, p.block_table + static_cast<int64_t>(seg.b) * p.bt_stride,
                             p.block_size, min(p.block_size, kBN), c.kv_hi, 0};
    int pages = prefetch_pages(ld, c.kv_lo, c.kv_lo + kBN, lane);
    PAIR_SPAN(1);
    for (int ta = 0; ta < n_tiles; ta += 2) {
      const int pages_next = prefetch_pages(ld, c.kv_lo + (ta + 2) * kBN,
                                            c.kv_lo + (ta + 3) * kBN, lane);
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // the order the consumers release the parts in a pair
        const auto [st, half] = release_slot(j);
        if (ta + st >= n_tiles) continue;
        if (fills[st] > 0) mbar_wait(&sm.empty[st][half], (fills[st] - 1) & 1);
        if ((kPairNoLoad || (kPairNoLoadTile1 && m_tile == 1)) && fills[st] > 0) {
          if (lane == 0) mbar_arrive(&sm.full[st][half]);
          continue;
        }
        const int start = c.kv_lo + (ta + st) * kBN;
        if constexpr (FMT == kKv16) {
          issue_part_warp<kLanes>(ld, sm.kv[st], &sm.full[st][half], start, 4 * half, half == 1,
                                  pages, 4 * st, lane);
        } else {
          // fp8_ds_mla's tile scales with the part this stage's warpgroup expands first
          issue_part_raw<FMT>(ld, sm.kv[st], &sm.full[st][half], start, half, half == st, pages,
                              4 * st, lane);
        }
      }
      ++fills[0];
      if (ta + 1 < n_tiles) ++fills[1];
      if (!kPairNoLoad && prefetches_l2(m_tile) && ld.rows >= kPrefetchMinRows<FMT>) {
        for (int k = 2; k < 4; ++k) {
          if constexpr (FMT == kKv16) {
            prefetch_tile_l2(ld, c.kv_lo + (ta + k) * kBN, pages_next, 4 * (k - 2), lane);
          } else {
            prefetch_raw_l2<FMT>(ld, c.kv_lo + (ta + k) * kBN, pages_next, 4 * (k - 2), lane);
          }
        }
      }
      pages = pages_next;
    }
  }
}

// FMT: kKv16 (TMA loads of a T cache; kv_map describes it) or kKvFp8 / kKvDsMla (raw entries
// loaded by the producer warpgroup and expanded to T by the consumers, pair_fp8_fill.cuh;
// kv_map: the cache as bytes when p.kv_tma, else unused). T is the wgmma operand type, TQ the
// queries' and the output's. Both quantized formats run on fp16 (bf16 / fp16 queries scaled per
// row into fp16, load_q_pow2): fp8's e4m3 values exactly, fp8_ds_mla's over a power of two a
// warp's tokens share, with its bf16 RoPE part of the scores on a bf16 wgmma (ds_unscale_scores).
// q_map: the queries' TMA map, used when p.q_tma (16-bit caches).
template <typename T, int FMT, typename TQ = T>
__global__ void __launch_bounds__(kPairThreads, 1)
    mla_decode_hopper_pair_kernel(const __grid_constant__ CUtensorMap kv_map,
                                  const __grid_constant__ CUtensorMap q_map,
                                  const DecodeParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Quantized caches on fp16 operands: the queries (bf16 or fp16) scaled into fp16 per row as
  // they load.
  constexpr bool kScaleQ = FMT != kKv16;
  constexpr bool kDs = FMT == kKvDsMla;
  static_assert(!kScaleQ || std::is_same<T, __half>::value, "quantized caches expand to fp16");
  static_assert(kScaleQ || std::is_same<T, TQ>::value, "queries of the operand type");
  using G = Gmma<T>;
  // The scores' RoPE k-steps: fp8_ds_mla keeps its RoPE in bf16 (queries' and cache's).
  using SRope = typename std::conditional<kDs, Gmma<__nv_bfloat16>, G>::type::S64;
  extern __shared__ unsigned char smem_raw[];
  PairSmem& sm = smem_aligned_1024<PairSmem>(smem_raw);
  const int tid = threadIdx.x, wq = (tid >> 5) & 3, lane = tid & 31;
  // The warpgroup index through a shuffle, so the compiler knows it is warp-uniform (wgmma in
  // the per-warpgroup branches is otherwise serialized).
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int part = blockIdx.y, m_tile = blockIdx.x;
  const int H = p.num_heads;
  PAIR_SPAN(0);
  PAIR_CTA(0);

  if (tid == 0) {
    if (FMT == kKv16 || p.kv_tma) tma_prefetch_desc(&kv_map);
    for (int s = 0; s < kStages; ++s) {
      for (int half = 0; half < 2; ++half) {
        // TMA: one arrival + bytes; quantized caches' copies: one arrival a producer thread
        // (on its copies' landing).
        mbar_init(&sm.full[s][half], FMT == kKv16 || p.kv_tma ? 1 : 128);
        mbar_init(&sm.empty[s][half], 4);  // the 4 warps of the releasing warpgroup
      }
    }
    mbar_init(&sm.q_full, kScaleQ ? kThreads : 1);  // q_tma: one arrival + bytes
    for (int h = 0; h < kHandR; ++h) mbar_init(&sm.hand[h], 128);  // every writer thread
    for (int h = kHandR; h <= kHandF; ++h) mbar_init(&sm.hand[h], kThreads);  // every consumer
    mbar_init_fence();
  }
  sched_fill_cta(p, sm.sched, tid >> 5, lane);
  // kTailCount (16-bit caches only: launch_kernel.cuh's kTakesCount; compiled out of the
  // quantized forms, where its code in the segment loop cost 150-300 B of spills and 10-19 % at
  // 128 heads).
  constexpr bool kCounts = FMT == kKv16;
  if (kCounts && p.tail_merge == kTailCount) pdl_launch_dependents();  // the merge kernel polls
  __syncthreads();

  // Every thread walks the part's segments itself (common/schedule.cuh); tile pairs restart at
  // each segment (a: stage 0, b: stage 1), the stages' phases run on across segments.
  PartWalker walk;
  walk.init(p, sm.sched, part);
  Segment seg;
  if (wg == 2) {
    // ---- Producer warpgroup: one warp issues every TMA load (produce_tma); quantized caches
    // that TMA cannot tile are copied by all four warps (produce_fp8).
    setmaxnreg_dec<kProducerRegs>();
    if constexpr (FMT != kKv16) {
      if (!p.kv_tma) {
        produce_fp8<FMT>(p, sm, walk, m_tile, wq, lane);
        return;
      }
    }
    if (wq == 0) {
      // Boxes of 16 or 32 rows (16-bit caches): every lane issues one, where lane 0's loop bound
      // the pair loop; a loop of its own, so that block 64's is the one it was.
      if (FMT == kKv16 && p.block_size < kBN) {
        if constexpr (FMT == kKv16) produce_tma<FMT, true>(&kv_map, p, sm, walk, m_tile, lane);
      } else {
        produce_tma<FMT>(&kv_map, p, sm, walk, m_tile, lane);
      }
    }
    return;
  }
  setmaxnreg_inc<kConsumerRegs>();

  // This thread's two rows (accumulator layout of wgmma m64: warp wq owns rows 16 wq ..).
  const int r0 = 16 * wq + (lane >> 2);
  // fp8: the stages hold the e4m3 values; k_scale goes on the scores and on the output.
  const float kv_scale = FMT == kKvFp8 ? *p.k_scale : 1.f;
  const bool kv_tma = p.kv_tma != 0;  // quantized caches: which producer filled the stages
  const float scale_log2 = p.softmax_scale * kv_scale * 1.4426950408889634f;
  const uint64_t q_desc = gmma_desc_sw128(sm.q, 16, 1024);
  unsigned char* const own = sm.kv[wg];  // the stage whose scores this warpgroup computes
  const uint64_t k_desc = gmma_desc_sw128(own, 16, 1024);
  // P V operands: V columns of this warpgroup's O half in stage 0 / 1 (MN-major), P chunks.
  const uint64_t v_desc0 = gmma_desc_sw128(sm.kv[0] + 4 * wg * kChunk, kChunk, 1024);
  const uint64_t v_desc1 = gmma_desc_sw128(sm.kv[1] + 4 * wg * kChunk, kChunk, 1024);
  const uint64_t pa_desc = gmma_desc_sw128(sm.kv[0] + kRope * kChunk, 16, 1024);
  const uint64_t pb_desc = gmma_desc_sw128(sm.p_b, 16, 1024);

  int used[kStages] = {0, 0};  // pairs that read each stage so far (the full barriers' phases)
  uint32_t segs = 0;  // segments so far: the phase of q_full (p.q_tma), kHandR and kHandF
  while (walk.next(p, sm.sched, seg)) {
    sm80::CtaRows c;
    if (!segment_rows(p, seg, m_tile, c)) continue;  // the same for every thread
    const int n_tiles = (c.kv_hi - c.kv_lo + kBN - 1) / kBN;
    const int n_pairs = (n_tiles + 1) / 2;
    PAIR_SPAN_SEG(segs, 7);
    // Q is free: every consumer passed the last segment's epilogue barrier after its last S.
    if constexpr (kScaleQ) {  // quantized caches: the rows scaled into fp16 (q_inv)
      load_q_pow2<TQ, kDs>(p, c, sm.q, sm.q_inv, tid);
      PAIR_SPAN_SEG(segs, 1);  // Q loaded (this thread's part)
      // Every consumer arrives on q_full (256 here) and waits on it: racecheck follows that
      // mbarrier for q_inv's rows (written by other threads, values that change between
      // segments), not the bar.sync over the consumers while the producer warp runs; the
      // bar.sync stays between the two (the wait then passes at once): without it ptxas spilled
      // 250-480 B in the quantized consumers (NOTES.md).
      mbar_arrive(&sm.q_full);
      named_barrier(kBarQ, kThreads);
      mbar_wait(&sm.q_full, segs & 1);
    } else {
      if (p.q_tma) {
        load_q_tma(&q_map, p, c, sm.q, &sm.q_full, segs & 1, tid);
      } else {
        load_q<T>(p, c, sm.q, tid);
      }
      PAIR_SPAN_SEG(segs, 1);  // Q loaded (this thread's part)
      named_barrier(kBarQ, kThreads);
    }
    PAIR_SPAN_SEG(segs, 2);
    // Base-2 score scale of this thread's two rows (times the Q row's inverse scale).
    float sl2[2] = {scale_log2, scale_log2};
    if constexpr (kScaleQ) {
      sl2[0] *= sm.q_inv[r0];
      sl2[1] *= sm.q_inv[r0 + 8];
    }
    // The scale softmax_pack applies: fp8_ds_mla's scores come scaled (ds_unscale_scores).
    const float pl2[2] = {kDs ? 1.f : sl2[0], kDs ? 1.f : sl2[1]};
    const int last0 = c.last_pos(c.m0 + r0, H), last1 = c.last_pos(c.m0 + r0 + 8, H);
    const int min_last = c.last_pos(c.m0, H);  // rows are (token, head) in order: the least
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;

    for (int pi = 0; pi < n_pairs; ++pi) {
      const uint32_t par = (wg == 0 ? used[0] : used[1]) & 1;
      const uint32_t hpar = used[0] & 1;  // the handoffs' phase: pairs so far
      const int ta = 2 * pi, tb = ta + 1;
      const bool has_b = tb < n_tiles;
      const int own_start = c.kv_lo + (ta + wg) * kBN;

      PAIR_TRACE(0);
      // ---- S = Q K^T of this warpgroup's tile (a for WG0, b for WG1), raw (unscaled) scores.
      // Stage parts in release order: part 0 = chunks 0..3, part 1 = chunks 4..7 + rope.
      float s[32];
      float mx[2] = {-INFINITY, -INFINITY};
      float wsum[4];  // fp8_ds_mla: the row sums' weights (ds_unscale_scores)
      const int valid = c.kv_hi - own_start;  // positions of the own tile (< 64: the last one)
      if (wg == 0 || has_b) {
        DsCarry carry{};  // fp8_ds_mla: from the first part's expansion to the second's
        mbar_wait(&sm.full[wg][wg], par);  // WG0: part 0 first; WG1: part 1 (released earlier)
        PAIR_TRACE(1);
        PAIR_SPAN_SEG(segs, pi == 0 ? 5 : 6);
        // Quantized caches: the part holds raw e4m3 pieces; this warpgroup expands them (the
        // second part while the first part's k-steps run).
        if constexpr (FMT != kKv16) {  // the warpgroup's first part: fp8_ds_mla's k to ds_exp
          expand_part<FMT>(kv_tma, own, wg, wq, lane, kBarOwn0 + wg, valid, true,
                           &sm.ds_exp[wg][wq], carry);
        }
        fence_regs(s);
        wgmma_fence();
        qk_chunks<typename G::S64, 4>(q_desc, k_desc, s, 4 * wg, true);
        if (wg == 1 && !kDs) {  // fp8_ds_mla: its RoPE is scaled with the second part
          wgmma_fence();
          qk_chunks<SRope, 1>(q_desc, k_desc, s, kRope, false);
        }
        mbar_wait(&sm.full[wg][wg ^ 1], par);
        PAIR_TRACE(2);
        if constexpr (FMT != kKv16) {
          expand_part<FMT>(kv_tma, own, wg ^ 1, wq, lane, kBarOwn0 + wg, valid, false,
                           &sm.ds_exp[wg][wq], carry);
        }
        wgmma_fence();
        qk_chunks<typename G::S64, 4>(q_desc, k_desc, s, 4 * (wg ^ 1), false);
        if (wg == 0 || kDs) {
          wgmma_fence();
          qk_chunks<SRope, 1>(q_desc, k_desc, s, kRope, false);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);
        fence_regs(o);
        PAIR_TRACE(3);
        // fp8_ds_mla: k of the tile's warps, read here, before this warpgroup's next handoff
        // arrive (after which it may expand its next tile over ds_exp).
        if constexpr (kDs) ds_unscale_scores(s, sm.ds_exp[wg], sl2, wsum);
        // Masks only where a position may be out of range for some row of the CTA: the segment's
        // last tile, or causal rows of a multi-token query ending inside the tile.
        if (own_start + kBN > min(c.kv_hi, min_last + 1)) {
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            const int pos = own_start + 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
            const bool ok = pos < c.kv_hi && pos <= ((i & 2) ? last1 : last0);
            s[i] = ok ? s[i] : -INFINITY;
          }
        }
#pragma unroll
        for (int i = 0; i < 32; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 1));
          mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 2));
          mx[h2] *= pl2[h2];  // scale > 0: the max of the scaled scores; -inf stays -inf
        }
      }

      uint32_t pk[16];
      float sum[2] = {0.f, 0.f};
      if (wg == 0) {
        // ---- WG0: softmax of tile a; O_L += P_a V_a (P_a from registers); P_a rescaled to m_b
        // for WG1; O_L += P_b V_b.
        float m_a[2], sc0[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          m_a[h2] = fmaxf(m_run[h2], mx[h2]);
          sc0[h2] = rescale(m_run[h2], m_a[h2]);
        }
        if ((lane & 3) == 0) {
          sm.m_a[r0] = m_a[0];
          sm.m_a[r0 + 8] = m_a[1];
        }
        mbar_arrive(&sm.hand[kHandA]);
        fence_regs(o);  // keeps the O rescale below the arrive
        PAIR_TRACE(4);
        softmax_pack<T, kDs>(s, pl2, m_a, sum, pk, wsum);
        if (valid < kBN) {  // the segment's last tile: zero V rows past its end for both halves
          zero_v_rows(own, valid, tid, 128);
          fence_proxy_async_smem();
          named_barrier(kBarOwn0, 128);
        }
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) l_run[h2] = l_run[h2] * sc0[h2] + sum[h2];
        scale_rows(o, sc0);
        pv_rs<typename G::ORs>(pk, v_desc0, o);
        // Stage 0's part 0 (K_a chunks 0..3 = V_a columns 0..255) has no reader after this
        // product: free it before waiting for WG1, so the next fill starts a barrier earlier.
        release_after_pv(o, pk, &sm.empty[0][0], lane);
        mbar_wait(&sm.hand[kHandB], hpar);
        PAIR_TRACE(5);
        float sc1[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          const float m_b = sm.m_b[r0 + 8 * h2];
          sc1[h2] = rescale(m_a[h2], m_b);
          m_run[h2] = m_b;
          l_run[h2] *= sc1[h2];
        }
        // P_a at m_b -> stage 0's rope chunk (dead since S_a): the A operand of WG1's O_R += P_a V_a.
        uint32_t pa[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          pa[i] = pack2<T>(s[2 * i] * sc1[i & 1], s[2 * i + 1] * sc1[i & 1]);
        }
        store_p(own + kRope * kChunk, pa, r0, lane);
        fence_proxy_async_smem();
        mbar_arrive(&sm.hand[kHandC]);
        PAIR_TRACE(6);
        scale_rows(o, sc1);
        if (has_b) {
          pv_ss<typename G::O>(pb_desc, v_desc1, o);
          PAIR_TRACE(7);
          wgmma_wait<0>();
          fence_regs(o);
          PAIR_TRACE(8);
          if (lane == 0) mbar_arrive(&sm.empty[1][0]);  // stage 1's part 0 is free
        }
      } else {
        // ---- WG1: softmax of tile b; O_R = O_R * 2^(m - m_b) + P_b V_b (P_b from registers)
        // + P_a V_a (P_a at m_b from WG0).
        mbar_wait(&sm.hand[kHandA], hpar);
        PAIR_TRACE(4);
        float m_b[2], sc01[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          const float m_a = sm.m_a[r0 + 8 * h2];
          m_b[h2] = fmaxf(m_a, mx[h2]);
          sc01[h2] = rescale(m_run[h2], m_b[h2]);
          m_run[h2] = m_b[h2];
        }
        if ((lane & 3) == 0) {
          sm.m_b[r0] = m_b[0];
          sm.m_b[r0 + 8] = m_b[1];
        }
        PAIR_TRACE(10);
        if (has_b) {
          softmax_pack<T, kDs>(s, pl2, m_b, sum, pk, wsum);
          store_p(sm.p_b, pk, r0, lane);
          if (valid < kBN) zero_v_rows(own, valid, tid - 128, 128);
        }
        PAIR_TRACE(8);
        fence_proxy_async_smem();
        PAIR_TRACE(9);
        mbar_arrive(&sm.hand[kHandB]);
        fence_regs(o);
        PAIR_TRACE(5);
        if (has_b && valid < kBN) named_barrier(kBarOwn0 + 1, 128);
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) l_run[h2] = l_run[h2] * sc01[h2] + sum[h2];
        scale_rows(o, sc01);
        if (has_b) {
          // Stage 1's part 1 (K_b chunks 4..7 + rope = V_b columns 256..511) is free once this
          // product is done: released before waiting for WG0's P_a.
          pv_rs<typename G::ORs>(pk, v_desc1, o);
          release_after_pv(o, pk, &sm.empty[1][1], lane);
        }
        mbar_wait(&sm.hand[kHandC], hpar);
        pv_ss<typename G::O>(pa_desc, v_desc0, o);
        PAIR_TRACE(6);
        wgmma_wait<0>();
        fence_regs(o);
        PAIR_TRACE(7);
        if (lane == 0) mbar_arrive(&sm.empty[0][1]);  // stage 0's part 1 is free
      }
      ++used[0];
      if (has_b) ++used[1];
    }
    wgmma_wait<0>();  // WG0's last O_L += P_b V_b
    fence_regs(o);
    PAIR_SPAN_SEG(segs, 3);

    // Row sums: quad reduction, then the two warpgroups' through shared memory.
    if (segs > 0) mbar_wait(&sm.hand[kHandF], (segs - 1) & 1);  // the last segment's reads
    share_row_sums(l_run, sm.red, wg, r0, lane);
    mbar_arrive(&sm.hand[kHandR]);
    mbar_wait(&sm.hand[kHandR], segs & 1);
    PAIR_SPAN_SEG(segs, 8);
    // Quantized caches: the paired partial stores made ptxas spill in the pair loop (132 B).
    store_rows<TQ, FMT == kKv16>(p, c, o, sm.red, m_run, seg.slot, wg, r0, lane, kv_scale);
    PAIR_SPAN_SEG(segs, 9);
    mbar_arrive(&sm.hand[kHandF]);
    if (kCounts && p.tail_merge == kTailCount && seg.slot >= 0 && tid == kCountThread) {
      mbar_wait(&sm.hand[kHandF], segs & 1);  // every consumer's rows of the piece stored
      __threadfence();
      atomicAdd(piece_counter(p, seg.b), 1);
    }
    PAIR_SPAN_SEG(segs, 4);  // this segment's epilogue done
    ++segs;
  }
  PAIR_CTA(1);
  if (p.tail_merge == kTailBarrier) {  // cooperative launch; the producer warpgroup has exited
    sm80::merge_pieces_at_end<TQ, kThreads / 32, 8, 4>(
        p, sm.sched, reinterpret_cast<float*>(sm.kv[0]), tid >> 5, lane,
        [] { named_barrier(kBarTail, kThreads); }, [] { PAIR_CTA(2); });
    PAIR_CTA(3);
  }
#else
  __trap();  // built without sm_90a device code: the launcher never selects this kernel
#endif
}

}  // namespace sm90
}  // namespace portmla
