// fp8 / fp8_ds_mla caches in the pair kernel: the producer warpgroup loads raw cache entries
// into the stages and the consumer warpgroups expand them in place into the 16-bit layout a
// 16-bit cache gets from TMA (64-row x 128-byte chunks, 128-byte swizzle), right before their
// wgmma read them. Two producers: TMA boxes of raw bytes issued by one warp (p.kv_tma, the
// block sizes and strides TMA takes; "Raw entries through TMA" below), else 16-byte copies by
// all four warps (any block size; described here). The copies cost ~2.9k cycles a pair at 128
// heads (an H100 trace with them left out: 11.3k -> 8.5k cycles a pair), mostly issuing them.
//
// Copies: a part of a stage (chunks 0..3, or chunks 4..7 + rope) is copied by all 128 producer
// threads, 16 tokens a warp: every thread cp.async-copies its raw 16-byte pieces (16 e4m3 values)
// into the first of the two 16-byte slots their 16-bit values will occupy (so the raw bytes need no
// staging space: the pair kernel uses all of the sm_90 shared memory), and the copies' landing
// completes the part's `full` barrier (cp.async.mbarrier.arrive, one a thread). The consumer
// warpgroup that computes the part's scores then expands it (convert_part: each thread the pieces a
// producer thread of the same warp index copied, every raw piece of two chunks read before any is
// written), the second part while the first part's k-steps run. The producer alone, copying and
// converting, took ~12k cycles a pair against the consumers' ~8k.
// Both formats expand to fp16 (the queries are scaled into fp16 per row by the consumers):
// fp8 (per-tensor scale) exactly, one instruction per two values; k_scale is applied to the
// scores and the output. fp8_ds_mla: e4m3 x (tile scale / M), M a power of two the 16 tokens of
// an expanding warp share, one instruction a value ("fp8_ds_mla on fp16 operands" below); the tile
// scales are copied with the part the stage's warpgroup expands first (its first chunk, in a slot
// its pieces free only when expanded), the bf16 RoPE to its final slots.
//
// Lane l of producer warp w works on token 16 w + l % 16 of the job's tile, the even pieces of
// its row (l < 16) or the odd ones. Lanes 0..15 hold the entry addresses of tile a's tokens of
// the pair in flight and the next one, lanes 16..31 tile b's (one shuffle a job hands a lane
// its token's), read from the block table a pair before use; the next pair's entries are
// prefetched into L2 with one bulk prefetch per 16 tokens where they are consecutive on a page.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "hopper_kernel.cuh"

namespace portmla {
namespace sm90 {

#if defined(PORTMLA_PAIR_TRACE)  // producer timeline of one CTA (scripts/pair_trace.cu)
__device__ long long g_fill_trace[256][7];  // top, part free, -, -, copies issued,
                                            // (pair end) entries, prefetched
#define FILL_TRACE(n, ev)                                                                 \
  do {                                                                                    \
    if (blockIdx.x == 0 && blockIdx.y == PORTMLA_PAIR_TRACE && threadIdx.x == 256 &&      \
        (n) < 256)                                                                        \
      g_fill_trace[n][ev] = clock64();                                                    \
  } while (0)
#else
#define FILL_TRACE(n, ev)
#endif

template <int FMT>
struct Fp8Entry {
  static constexpr int kBytes = FMT == kKvDsMla ? 656 : 576;  // one cache entry
  static constexpr int kScaleOff = 512;                       // ds: 4 fp32 tile scales
  static constexpr int kRopeOff = FMT == kKvDsMla ? 528 : 512;
};

// One bulk prefetch of `bytes` (a multiple of 16) at a 16-byte aligned global address into L2.
__device__ __forceinline__ void prefetch_l2_bytes(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(reinterpret_cast<uint64_t>(p)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ const unsigned char* shfl_ptr(const unsigned char* p, int src) {
  return reinterpret_cast<const unsigned char*>(
      __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(p), src));
}

// ---- fp8_ds_mla on fp16 operands. A token's latent values are e4m3 x a tile scale (4 tiles of
// 128 channels): bf16 holds any such product but costs e4m3 -> f16 -> f32, the scale, -> bf16
// (~3 instructions a value; the 128-head rows ran 1.25-1.31x the bf16 cache's time). Here the 16
// tokens a consumer warp expands share a power of two M = 2^k >= all their tile scales: a value
// goes to fp16 as e4m3 x (scale / M) (<= 448: F2FP + HMUL2, one instruction a value), its bf16
// RoPE times 2^-k (exact), and the scores of those tokens' columns are taken back times M and
// offset by k in the softmax exponent (pair_kernel.cuh: ds_unscale_scores), which makes P V's P
// hold P x M (<= 1 after the row max). A value whose scale is below the warp's largest by more
// than 2^8 starts losing bits to fp16's subnormals, 2^-25 M at worst: far below the e4m3 rounding
// of the tokens that set M. (The ratio and the product are rounded to fp16, 2^-11 each, against
// one bf16 rounding, 2^-8, before.)

// k of a warp's 16 tokens (all 32 lanes; lanes l and l ^ 16 hold token l % 16: `sc` its four
// tile scales, `live`: it holds a position before the segment's end): the least k with 2^k >= every
// live scale, within [-64, 126] (2^-k x any bf16 RoPE value stays finite); 0 when no live scale is
// positive and finite. One redux.sync on the scales' bits (a positive float's bits order as its
// value; NaN and negatives count as 0), not a chain of shuffles: it sits before the expansion.
__device__ __forceinline__ int ds_warp_exp(const float4& sc, bool live) {
  const float m = live ? fmaxf(fmaxf(fmaxf(sc.x, sc.y), fmaxf(sc.z, sc.w)), 0.f) : 0.f;
  const unsigned b = __reduce_max_sync(0xffffffffu, __float_as_uint(m));
  if (b == 0u || b >= 0x7f800000u) return 0;  // none positive, or +inf
  const int k = static_cast<int>(b >> 23) - 127 + ((b & 0x7fffffu) != 0u ? 1 : 0);
  return min(max(k, -64), 126);
}

// A tile scale times 2^-k (exact), rounded to fp16 and doubled (r, r) for HMUL2.
__device__ __forceinline__ uint32_t ds_ratio2(float sc, int k) {
  const float r = sc * pow2i(-k);
  return pack2<__half>(r, r);
}

__device__ __forceinline__ uint32_t hmul2_u32(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// Token t's bf16 RoPE in its row `rope` of the RoPE chunk (this lane's pieces 2 j + odd of the
// 128-byte swizzled row, as both producers place them) times 2^-k, exact.
__device__ __forceinline__ void ds_scale_rope(unsigned char* rope, int t, int odd, int k) {
  const float f = pow2i(-k);
  const uint32_t f2 = pack2<__nv_bfloat16>(f, f);
  uint4 v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[j] = *reinterpret_cast<const uint4*>(rope + (((2 * j + odd) ^ (t & 7)) << 4));
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t* w = reinterpret_cast<uint32_t*>(&v[j]);
#pragma unroll
    for (int e = 0; e < 4; ++e) asm("mul.rn.bf16x2 %0, %0, %1;\n" : "+r"(w[e]) : "r"(f2));
    *reinterpret_cast<uint4*>(rope + (((2 * j + odd) ^ (t & 7)) << 4)) = v[j];
  }
}

// Four e4m3 values (one word, lowest byte first) -> two fp16 x2 words: exact, one conversion
// instruction per two values; kScaled (fp8_ds_mla): times r (fp16 x2, ds_ratio2), one HMUL2 more.
template <bool kScaled>
__device__ __forceinline__ void e4m3x4_to(uint32_t w, uint32_t r, uint32_t& lo, uint32_t& hi) {
  lo = e4m3x2_lo_to_h2(w);
  hi = e4m3x2_hi_to_h2(w);
  if constexpr (kScaled) {
    lo = hmul2_u32(lo, r);
    hi = hmul2_u32(hi, r);
  }
}

// Chunks k0 .. k0 + kN - 1 (relative to the part) of a thread's copy-only pieces: every raw
// piece read first, then expanded (a piece's store may alias a later piece's load for the
// compiler, which would otherwise run each load -> convert -> store chain one after another).
// `ra` / `rb`: the first slots of the thread's even / odd pieces in the part's first chunk,
// `ra2` / `rb2` their partner slots; kScaled: values times `sc` (fp8_ds_mla: ds_ratio2).
// (Its inner loop is expand_piece's work; written through expand_piece, with the partner slots
// addressed as `w ^ 16` from one base, ptxas spilled 20 B more in the fp8 consumers.)
template <int kN, bool kScaled = false>
__device__ __forceinline__ void expand_chunks(unsigned char* ra, unsigned char* ra2,
                                              unsigned char* rb, unsigned char* rb2, int k0,
                                              uint32_t sc = 0) {
  uint4 raw[2 * kN];
#pragma unroll
  for (int j = 0; j < 2 * kN; ++j) {
    raw[j] = *reinterpret_cast<const uint4*>(((j & 1) ? rb : ra) + (k0 + (j >> 1)) * kChunk);
  }
#pragma unroll
  for (int j = 0; j < 2 * kN; ++j) {
    uint4 lo, hi;
    e4m3x4_to<kScaled>(raw[j].x, sc, lo.x, lo.y);
    e4m3x4_to<kScaled>(raw[j].y, sc, lo.z, lo.w);
    e4m3x4_to<kScaled>(raw[j].z, sc, hi.x, hi.y);
    e4m3x4_to<kScaled>(raw[j].w, sc, hi.z, hi.w);
    const int off = (k0 + (j >> 1)) * kChunk;
    *reinterpret_cast<uint4*>(((j & 1) ? rb : ra) + off) = lo;
    *reinterpret_cast<uint4*>(((j & 1) ? rb2 : ra2) + off) = hi;
  }
}

// A fill job: part `half` of stage `st` (its tile: the pair's first for stage 0, second for
// stage 1). Lane l of warp w works on token 16 w + l % 16 of the tile, the even 16-byte pieces
// of its row (l < 16) or the odd ones, so each pair of lanes reads one 32-byte sector. Tokens
// past the segment's end (entry null) are zero-filled; the consumers mask those scores and
// zero those V rows.
struct Fp8Job {
  int st, half;
};

// Slot j (0..3) of the order the consumers release a pair's stage parts in, which both
// producers refill them in: stage 0 part 0, stage 1 part 1, stage 0 part 1, stage 1 part 0
// (pair_kernel.cuh says who releases each, and when).
__device__ __forceinline__ Fp8Job release_slot(int j) { return {j & 1, j == 1 || j == 2}; }

// Byte offsets of the two 16-byte slots (first of each pair) this lane's pieces 2 i + odd go to
// in a 128-byte stage row: 16 ((4 (i % 2) + 2 odd) ^ (t % 8)) for i even / odd.
struct Fp8Slots {
  int a, b;
  __device__ __forceinline__ Fp8Slots(int t, int odd)
      : a(((2 * odd) ^ (t & 7)) << 4), b(((4 + 2 * odd) ^ (t & 7)) << 4) {}
  // fp8_ds_mla: where token t's 16 bytes of tile scales wait in the part's first chunk, the
  // partner slot of its piece 0 (free until that piece expands).
  __device__ __forceinline__ static int scales(int t) { return Fp8Slots(t, 0).a ^ 16; }
};

// Issues a job's raw copies (zero-filled past the end: no branch per piece), fp8_ds_mla's tile
// scales included. `held`: the entry this lane holds in the job's pair (lanes 0..15: tile a's
// token l, 16..31: tile b's token l - 16).
template <int FMT>
__device__ __forceinline__ void issue_job(unsigned char* kv, const Fp8Job& job,
                                          const unsigned char* held, int tok0, int lane,
                                          const void* any_valid) {
  // The offsets below derive from the lane: recomputed per job, not hoisted out of the
  // producer's loops into registers it does not have (40).
  asm volatile("" : "+r"(lane));
  using E = Fp8Entry<FMT>;
  constexpr bool kDs = FMT == kKvDsMla;
  const int half = job.half, t = tok0 + (lane & 15), odd = lane >> 4;
  const unsigned char* other = shfl_ptr(held, lane ^ 16);
  const unsigned char* const entry = odd == job.st ? held : other;  // token t of the job's tile
  const bool valid = entry != nullptr;
  const unsigned char* const src =
      (valid ? entry : static_cast<const unsigned char*>(any_valid)) + 16 * odd;
  const Fp8Slots sl(t, odd);
  unsigned char* const row = kv + 4 * half * kChunk + t * 128;
  if constexpr (kDs) {  // the 4 tile scales -> the partner slot of piece 0 (free until expanded),
    // with the part the stage's warpgroup expands first (stage 0: part 0; stage 1: part 1)
    if (odd == 0 && job.half == job.st) {
      cp_async16_zfill(row + Fp8Slots::scales(t), src + E::kScaleOff, valid);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {  // piece 2 i + odd: latent channels 256 half + 16 (2 i + odd) ..
    cp_async16_zfill(row + (i >> 1) * kChunk + ((i & 1) ? sl.b : sl.a), src + 256 * half + 32 * i,
                     valid);
  }
  if (half == 1) {  // the RoPE part: chunk 8, pieces 2 j + odd
    unsigned char* const rrow = kv + (kChunks - 1) * kChunk + t * 128;
    if constexpr (kDs) {  // 8 pieces of bf16, straight to their final slots
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        cp_async16_zfill(rrow + (((2 * j + odd) ^ (t & 7)) << 4), src + E::kRopeOff + 32 * j, valid);
      }
    } else {  // 4 pieces of e4m3, to the first of their slot pairs
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        cp_async16_zfill(rrow + (j ? sl.b : sl.a), src + E::kRopeOff + 32 * j, valid);
      }
    }
  }
}

// Block-table page of position pos (0 at or past kv_hi: not used).
__device__ __forceinline__ int fp8_page(const DecodeParams& p, const int32_t* bt, int pos,
                                        int kv_hi) {
  return pos < kv_hi ? __ldg(bt + pos / p.block_size) : 0;
}

// Entry address of position pos on its page (null at or past kv_hi).
__device__ __forceinline__ const unsigned char* fp8_entry(const DecodeParams& p, int page, int pos,
                                                          int kv_hi) {
  if (pos >= kv_hi) return nullptr;
  return static_cast<const unsigned char*>(p.kv_cache) + static_cast<int64_t>(page) * p.page_stride +
         static_cast<int64_t>(pos % p.block_size) * p.token_stride;
}

// The producer warpgroup's loop for an fp8 / fp8_ds_mla cache. Jobs in the order the consumers
// release the parts (release_slot), each done by all four warps: wait until the part is free,
// copy, and arm its `full` barrier on the copies.
template <int FMT, class Smem>
__device__ __forceinline__ void produce_fp8(const DecodeParams& p, Smem& sm, PartWalker& walk,
                                            int m_tile, int wq, int lane) {
  using E = Fp8Entry<FMT>;
  const int tok0 = 16 * wq, odd = lane >> 4;
  // L2 prefetch of a pair's entries: one bulk prefetch per 16 consecutive tokens of a page
  // (lanes 0 / 16: tiles a / b) when the entries are dense enough, else one per token. (The
  // bulk prefetch takes a uniform address: per-lane addresses go out lane by lane, which cost
  // ~2k cycles a pair.)
  const bool grouped = p.block_size % 16 == 0 && p.token_stride <= 2 * E::kBytes;
  int base[kStages] = {0, 0};  // fills of each stage in earlier segments
  Segment seg;
#if defined(PORTMLA_PAIR_TRACE)
  int traced = 0;  // jobs so far (the trace's index)
#endif
  while (walk.next(p, sm.sched, seg)) {
    sm80::CtaRows c;
    if (!segment_rows(p, seg, m_tile, c)) continue;
    const int n_tiles = (c.kv_hi - c.kv_lo + kBN - 1) / kBN;
    const int n_jobs = 4 * ((n_tiles + 1) / 2);
    const int32_t* bt = p.block_table + static_cast<int64_t>(seg.b) * p.bt_stride;
    // This lane holds token l % 16 of tile a (l < 16) or b of pair k: its entry in the current
    // pair and the next one, and its page in the pair after that (read a pair before it is
    // used, so the block-table latency stays off the producer's path).
    auto pos_of = [&](int k) { return c.kv_lo + (2 * k + odd) * kBN + tok0 + (lane & 15); };
    auto prefetch = [&](int k, const unsigned char* e) {
      if (e == nullptr || !prefetches_l2(m_tile)) return;
      if (!grouped) {
        prefetch_l2_bytes(e, E::kBytes);
      } else if ((lane & 15) == 0) {
        const int n = min(16, c.kv_hi - pos_of(k));
        prefetch_l2_bytes(e, static_cast<uint32_t>((n - 1) * p.token_stride + E::kBytes));
      }
    };
    const unsigned char* cur = fp8_entry(p, fp8_page(p, bt, pos_of(0), c.kv_hi), pos_of(0), c.kv_hi);
    const unsigned char* nxt = fp8_entry(p, fp8_page(p, bt, pos_of(1), c.kv_hi), pos_of(1), c.kv_hi);
    int page2 = fp8_page(p, bt, pos_of(2), c.kv_hi);
    prefetch(1, nxt);
    // Job g: pair g / 4, release slot g % 4; it exists unless its tile does not.
    auto exists = [&](int g) { return 2 * (g >> 2) + release_slot(g & 3).st < n_tiles; };
    // Fill number of job g's stage (its `empty` phase: fill f > 0 waits phase (f - 1) & 1).
    auto fill_no = [&](const Fp8Job& jb, int g) { return base[jb.st] + (g >> 2); };
    for (int g = 0; g < n_jobs; ++g) {
      if (!exists(g)) continue;
      FILL_TRACE(traced, 0);
      const Fp8Job job = release_slot(g & 3);
      const int f = fill_no(job, g);
      if (f > 0) mbar_wait(&sm.empty[job.st][job.half], (f - 1) & 1);
      FILL_TRACE(traced, 1);
      issue_job<FMT>(sm.kv[job.st], job, cur, tok0, lane, p.kv_cache);
      mbar_arrive_cp_async(&sm.full[job.st][job.half]);
      FILL_TRACE(traced, 4);
#if defined(PORTMLA_PAIR_TRACE)
      ++traced;
#endif
      int g2 = g + 1;
      while (g2 < n_jobs && !exists(g2)) ++g2;
      if (g2 < n_jobs && (g2 >> 2) != (g >> 2)) {  // the pair's last job
        // Next pair: its entries are `nxt`; the one after from its pages, brought into L2;
        // the pages of the pair after that.
        const int k2 = (g >> 2) + 2;
        cur = nxt;
        nxt = fp8_entry(p, page2, pos_of(k2), c.kv_hi);
        FILL_TRACE(traced - 1, 5);
        prefetch(k2, nxt);
        FILL_TRACE(traced - 1, 6);
        page2 = fp8_page(p, bt, pos_of(k2 + 1), c.kv_hi);
      }
    }
    base[0] += n_tiles > 0 ? (n_tiles + 1) / 2 : 0;
    base[1] += n_tiles / 2;
  }
  // Nothing in flight when the warp exits (the copies go out uncommitted: the `full` barriers
  // track them; wait_group only covers committed groups).
  cp_async_commit();
  cp_async_wait<0>();
}

// fp8_ds_mla: what a warpgroup's first part of a tile leaves its second part (the tile scales
// come with the first part only): the warp's k and the second part's two tile ratios.
struct DsCarry {
  uint32_t r0, r1;
  int k;
};

// fp8_ds_mla, both producers, the first part of a tile: the warp's k from its tokens' scales
// (`at`: this token's four, in a slot the expansion overwrites, so the warp syncs after reading
// them; tokens t >= valid hold no position) -> `kexp` (lane 0) and `carry`; the ratios of the
// part's two tiles -> r0, r1, the other part's -> carry.
__device__ __forceinline__ void ds_first_scales(const unsigned char* at, int t, int valid,
                                                int half, int lane, int* kexp, uint32_t& r0,
                                                uint32_t& r1, DsCarry& carry) {
  const float4 sc = *reinterpret_cast<const float4*>(at);
  const int k = ds_warp_exp(sc, t < valid);
  if (lane == 0) *kexp = k;
  r0 = ds_ratio2(half ? sc.z : sc.x, k);
  r1 = ds_ratio2(half ? sc.w : sc.y, k);
  carry.r0 = ds_ratio2(half ? sc.x : sc.z, k);
  carry.r1 = ds_ratio2(half ? sc.y : sc.w, k);
  carry.k = k;
  __syncwarp();
}

// The consumer side of a copy-only fill: warpgroup threads (warp wq, lane) expand part `half`
// of the stage at `kv` (its raw pieces landed: the part's `full` barrier completed) in place,
// the same pieces a producer thread of warp wq would, and make it visible to the warpgroup's
// wgmma (barrier `bar` of its 128 threads). The other warpgroup reads the stage only after a
// later barrier of the pair (B / C), so those need nothing more. fp8_ds_mla: `valid` positions
// of the tile hold data; `first`: the warpgroup's first part of the tile, which holds the tile
// scales (ds_first_scales: k -> `kexp`, the second part's ratios -> `carry`); the second part
// also scales the RoPE (which came with part 1), so that it runs while the first part's k-steps
// do.
template <int FMT>
__device__ __forceinline__ void convert_part(unsigned char* kv, int half, int wq, int lane,
                                             int bar, int valid, bool first, int* kexp,
                                             DsCarry& carry) {
  asm volatile("" : "+r"(lane));
  const int t = 16 * wq + (lane & 15);
  const Fp8Slots sl(t, lane >> 4);
  // chunks 0..3 of the part, then (part 1) the rope chunk, 4 chunks past the part's first
  unsigned char* const row = kv + 4 * half * kChunk + t * 128;
  unsigned char *const ra = row + sl.a, *const ra2 = row + (sl.a ^ 16);
  unsigned char *const rb = row + sl.b, *const rb2 = row + (sl.b ^ 16);
  if constexpr (FMT == kKvDsMla) {
    // First part: the token's four tile scales (in the partner slot of its piece 0, which the
    // even lane overwrites below: both lanes of the token read them first). Its RoPE came as
    // bf16, in place.
    uint32_t r0 = carry.r0, r1 = carry.r1;
    if (first) {
      ds_first_scales(row + Fp8Slots::scales(t), t, valid, half, lane, kexp, r0, r1, carry);
    }
    expand_chunks<2, true>(ra, ra2, rb, rb2, 0, r0);
    expand_chunks<2, true>(ra, ra2, rb, rb2, 2, r1);
    if (!first) ds_scale_rope(kv + (kChunks - 1) * kChunk + t * 128, t, lane >> 4, carry.k);
  } else {
    expand_chunks<2>(ra, ra2, rb, rb2, 0);
    expand_chunks<2>(ra, ra2, rb, rb2, 2);
    if (half == 1) expand_chunks<1>(ra, ra2, rb, rb2, 4);
  }
  fence_proxy_async_smem();
  named_barrier(bar, 128);
}

// ---- Raw entries through TMA (p.kv_tma: block sizes the boxes tile; kv_map is a byte map of
// the cache, decode_hopper.cu). A stage part arrives as boxes of 128 bytes x the tile's
// positions, each landing (128-byte swizzle) in a chunk that its 16-bit values fill:
//   latent bytes 256 half + 128 j (j = 0, 1) -> chunk 4 half + 2 j, expanding into chunks
//   4 half + 2 j (its 16-byte pieces 0..3) and 4 half + 2 j + 1 (pieces 4..7);
//   fp8, part 1: bytes 512..639 (the 64 RoPE values, zero-filled past the entry) -> chunk 8,
//   expanding in place;
//   fp8_ds_mla: bytes 512..639 (the 4 tile scales first) -> chunk 4 half + 1, read before
//   box j = 0 expands over them, in the part the stage's warpgroup expands first only (`scales`:
//   stage 0's part 0, stage 1's part 1); part 1 also its bf16 RoPE, bytes 528..655 -> chunk 8,
//   final. (The scales through a map of their own, 16-byte boxes into 1 KB of chunk
//   4 half + 1, needed a warpgroup barrier between their reads and the expansion: 5-11 % slower
//   at 128 heads on the H100, NOTES.md.)
// A token's raw bytes and their 16-bit values share the token's row of a chunk pair, so an
// expansion only involves the row's two lanes (shuffles; fp8_ds_mla's scales: __syncwarp), no
// barrier among warps; the producer is one warp issuing 2-4 boxes a part instead of 128
// threads' 16-byte copies.
template <int FMT>
struct RawBoxes {
  static constexpr bool kDs = FMT == kKvDsMla;
  __device__ __forceinline__ static int count(int half, bool scales) {
    return 2 + (kDs && scales ? 1 : 0) + (half == 1 ? 1 : 0);
  }
  // Box j of part `half`: its first byte in the entry and the chunk it lands in.
  __device__ __forceinline__ static void box(int half, bool scales, int j, int& col, int& ch) {
    if (j < 2) {
      col = 256 * half + 128 * j;
      ch = 4 * half + 2 * j;
    } else if (kDs && scales && j == 2) {  // the tile scales
      col = 512;
      ch = 4 * half + 1;
    } else {  // the RoPE
      col = kDs ? 528 : 512;
      ch = kChunks - 1;
    }
  }
};

// One part of a tile through TMA by a whole warp (issue_boxes_warp); `scales`: RawBoxes'.
template <int FMT>
__device__ __forceinline__ void issue_part_raw(const PlainTileLoader& ld, unsigned char* dst,
                                               uint64_t* bar, int tile_start, int half,
                                               bool scales, int pages, int slot, int lane) {
  issue_boxes_warp(ld, dst, bar, tile_start, RawBoxes<FMT>::count(half, scales),
                   [half, scales](int j, int& col, int& ch) {
                     RawBoxes<FMT>::box(half, scales, j, col, ch);
                   },
                   pages, slot, lane);
}

// L2 prefetch of a whole tile's raw entries: boxes at bytes 0, 128, .. 512 (fp8_ds_mla: and
// 528, its RoPE's last bytes).
template <int FMT>
__device__ __forceinline__ void prefetch_raw_l2(const PlainTileLoader& ld, int tile_start,
                                                int pages, int slot, int lane) {
  prefetch_boxes_l2(ld, tile_start, FMT == kKvDsMla ? 6 : 5,
                    [](int j) { return j < 5 ? 128 * j : 528; }, pages, slot, lane);
}

// e4m3 x 16 (one raw piece) -> fp16 values at row + w (the first 8) and row + (w ^ 16).
template <bool kScaled>
__device__ __forceinline__ void expand_piece(const uint4& r, unsigned char* row, int w,
                                             uint32_t sc) {
  uint4 lo, hi;
  e4m3x4_to<kScaled>(r.x, sc, lo.x, lo.y);
  e4m3x4_to<kScaled>(r.y, sc, lo.z, lo.w);
  e4m3x4_to<kScaled>(r.z, sc, hi.x, hi.y);
  e4m3x4_to<kScaled>(r.w, sc, hi.z, hi.w);
  *reinterpret_cast<uint4*>(row + w) = lo;
  *reinterpret_cast<uint4*>(row + (w ^ 16)) = hi;
}

__device__ __forceinline__ uint4 shfl_xor16(const uint4& v) {
  return make_uint4(__shfl_xor_sync(0xffffffffu, v.x, 16), __shfl_xor_sync(0xffffffffu, v.y, 16),
                    __shfl_xor_sync(0xffffffffu, v.z, 16), __shfl_xor_sync(0xffffffffu, v.w, 16));
}

// Raw boxes' rows (a token; lanes l and l ^ 16 share it, `odd` = l / 16) -> 16-bit values.
// Raw piece k (16 bytes) sits in slot k ^ (t % 8) of its box's chunk; its values go to slots
// 2 (k % 4), 2 (k % 4) + 1 (swizzled) of that chunk (k < 4) or the next. Each lane reads the
// four raw slots its own values will overwrite in the box's chunk (the copying producer's
// slots: Fp8Slots a, a ^ 16, b = a ^ 64, b ^ 16), which hold pieces 2 odd, 2 odd + 1, 2 odd + 4,
// 2 odd + 5; the two lanes swap one of each pair (lane 0 needs 2 and 6, lane 1 needs 1 and 5),
// so every lane writes only slots it read itself: no write lands on raw bytes the other lane
// has yet to read. Pieces 4..7 of every box first (their values go to the next chunk), then
// 0..3 (whose values land on the slots of 4..7): two rounds of loads for the whole part, each
// all its boxes' loads before any store (their latency under the wgmma's shared-memory traffic
// is what the expansion waits on). `a`: this lane's Fp8Slots::a; box j's chunk row at
// row + 2 j kChunk; kRope: part 1 of fp8, with the RoPE box (pieces 0..3 only) at row + 4 kChunk.
template <bool kScaled, bool kRope>
__device__ __forceinline__ void expand_boxes(unsigned char* row, int a, int odd, uint32_t sc0,
                                             uint32_t sc1) {
  const int keep = a ^ (16 * odd), send = keep ^ 16;  // lane 0 keeps piece 0, lane 1 piece 3
  const int wk = a ^ (64 * odd);                      // where the kept piece's values go
#pragma unroll
  for (int i = 1; i >= 0; --i) {
    uint4 k[2], g[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      k[j] = *reinterpret_cast<const uint4*>(row + 2 * j * kChunk + (keep ^ (64 * i)));
      g[j] = *reinterpret_cast<const uint4*>(row + 2 * j * kChunk + (send ^ (64 * i)));
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      g[j] = shfl_xor16(g[j]);
      unsigned char* const dst = row + (2 * j + i) * kChunk;
      expand_piece<kScaled>(k[j], dst, wk, j ? sc1 : sc0);
      expand_piece<kScaled>(g[j], dst, wk ^ 64, j ? sc1 : sc0);
    }
  }
  if constexpr (kRope) {  // raw pieces 0..3 only (4..7: the box's zero fill past the entry)
    unsigned char* const rope = row + 4 * kChunk;
    const uint4 kr = *reinterpret_cast<const uint4*>(rope + keep);
    const uint4 gr = shfl_xor16(*reinterpret_cast<const uint4*>(rope + send));
    expand_piece<false>(kr, rope, wk, 0);
    expand_piece<false>(gr, rope, wk ^ 64, 0);
  }
}

// convert_part for a part that arrived through TMA (RawBoxes' layout).
template <int FMT>
__device__ __forceinline__ void convert_part_tma(unsigned char* kv, int half, int wq, int lane,
                                                 int bar, int valid, bool first, int* kexp,
                                                 DsCarry& carry) {
  asm volatile("" : "+r"(lane));
  const int t = 16 * wq + (lane & 15), odd = lane >> 4;
  const int a = Fp8Slots(t, odd).a;
  unsigned char* const row = kv + 4 * half * kChunk + t * 128;  // the part's first chunk
  if constexpr (FMT == kKvDsMla) {
    // First part: the four tile scales, the scales box's first piece, read by both lanes of the
    // row before box 0's values land there.
    uint32_t r0 = carry.r0, r1 = carry.r1;
    if (first) {
      ds_first_scales(row + kChunk + ((t & 7) << 4), t, valid, half, lane, kexp, r0, r1, carry);
    }
    expand_boxes<true, false>(row, a, odd, r0, r1);
    if (!first) ds_scale_rope(kv + (kChunks - 1) * kChunk + t * 128, t, odd, carry.k);
  } else if (half == 1) {
    expand_boxes<false, true>(row, a, odd, 0, 0);
  } else {
    expand_boxes<false, false>(row, a, odd, 0, 0);
  }
  fence_proxy_async_smem();
  named_barrier(bar, 128);
}

// The consumers' expansion of part `half` of their stage, for either producer (`tma`: p.kv_tma);
// `valid`, `first`, `kexp`, `carry`: fp8_ds_mla's (convert_part).
template <int FMT>
__device__ __forceinline__ void expand_part(bool tma, unsigned char* kv, int half, int wq,
                                            int lane, int bar, int valid, bool first, int* kexp,
                                            DsCarry& carry) {
  if (tma) {
    convert_part_tma<FMT>(kv, half, wq, lane, bar, valid, first, kexp, carry);
  } else {
    convert_part<FMT>(kv, half, wq, lane, bar, valid, first, kexp, carry);
  }
}

}  // namespace sm90
}  // namespace portmla
