// fp8 / fp8_ds_mla caches in the pair kernel: the producer warpgroup's four warps turn raw cache
// entries into the bf16 stage layout a 16-bit cache gets from TMA (64-row x 128-byte chunks,
// 128-byte swizzle), so the consumer warpgroups run unchanged on wgmma.
//
// A part of a stage (chunks 0..3, or chunks 4..7 + rope) is filled by all 128 producer threads,
// 16 tokens a warp: every thread cp.async-copies its raw 16-byte pieces (16 e4m3 values) into
// the first of the two 16-byte slots their bf16 values will occupy, waits for its own copies,
// reads each piece back, converts it (e4m3 -> f16 -> f32, times the tile scale for
// fp8_ds_mla, -> bf16) and writes both slots. No thread touches another's slots, so the raw
// bytes need no staging space (the pair kernel uses all of the sm_90 shared memory) and no
// barrier among the producer threads; 128 arrivals complete the part's `full` barrier.
// fp8 (per-tensor scale): the e4m3 values are exact in bf16; k_scale is applied to the scores
// and the output. fp8_ds_mla: value * tile scale rounded once to bf16; its bf16 RoPE part is
// copied as is.
//
// Each thread also holds the entry address of one token of the pair in flight (lanes 0..15:
// tile a, 16..31: tile b; token 16 w + lane % 16), loaded a pair ahead, and prefetches that
// entry of the next pair into L2 (bulk prefetch, one instruction per entry).
#pragma once

#include <cuda_bf16.h>

#include "hopper_kernel.cuh"

namespace portmla {
namespace sm90 {

template <int FMT>
struct Fp8Entry {
  static constexpr int kBytes = FMT == kKvDsMla ? 656 : 576;  // one cache entry
  static constexpr int kScaleOff = 512;                       // ds: 4 fp32 tile scales
  static constexpr int kRopeOff = FMT == kKvDsMla ? 528 : 512;
  static constexpr int kRopePieces = FMT == kKvDsMla ? 8 : 4;  // 16-byte pieces of the RoPE part
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

// Four e4m3 values (one word, lowest byte first) times `sc` -> two bf16x2 words.
template <bool kScaled>
__device__ __forceinline__ void e4m3x4_to_bf16(uint32_t w, float sc, uint32_t& lo, uint32_t& hi) {
  float2 a = fp8x2_e4m3_to_float2(static_cast<uint16_t>(w & 0xffffu));
  float2 b = fp8x2_e4m3_to_float2(static_cast<uint16_t>(w >> 16));
  if constexpr (kScaled) {
    a.x *= sc;
    a.y *= sc;
    b.x *= sc;
    b.y *= sc;
  }
  lo = pack2<__nv_bfloat16>(a.x, a.y);
  hi = pack2<__nv_bfloat16>(b.x, b.y);
}

// The 16-byte piece copied raw to `row + 16 s0` (16 e4m3 values) -> 16 bf16 values in slots
// s0 (values 0..7) and s1 (8..15) of the same 128-byte row.
template <bool kScaled>
__device__ __forceinline__ void expand_piece(unsigned char* row, int s0, int s1, float sc) {
  const uint4 raw = *reinterpret_cast<const uint4*>(row + (s0 << 4));
  uint4 a, b;
  e4m3x4_to_bf16<kScaled>(raw.x, sc, a.x, a.y);
  e4m3x4_to_bf16<kScaled>(raw.y, sc, a.z, a.w);
  e4m3x4_to_bf16<kScaled>(raw.z, sc, b.x, b.y);
  e4m3x4_to_bf16<kScaled>(raw.w, sc, b.z, b.w);
  *reinterpret_cast<uint4*>(row + (s0 << 4)) = a;
  *reinterpret_cast<uint4*>(row + (s1 << 4)) = b;
}

// Part `half` of the tile in stage buffer `kv`: this warp's 16 tokens tok0 .. tok0 + 15, whose
// entry addresses lanes src0 .. src0 + 15 hold (bit src0 + j of `have` clear: past the
// segment's end, left alone: the consumers mask those scores and zero those V rows). Copies,
// waits, converts; the caller fences and arrives.
template <int FMT>
__device__ __forceinline__ void fill_part_fp8(unsigned char* kv, int half, int tok0, int src0,
                                              const unsigned char* entry, uint32_t have, int lane) {
  // The offsets below derive from the lane: recomputed per part, not hoisted out of the
  // producer's loops into registers it does not have (40).
  asm volatile("" : "+r"(lane));
  using E = Fp8Entry<FMT>;
  constexpr bool kDs = FMT == kKvDsMla;
  const int u = lane & 15;  // latent piece: channels 256 half + 16 u ..
  const int chunk = 4 * half + (u >> 2), s0 = 2 * (u & 3);
  // fp8_ds_mla: the two tile scales of this half, of the token this lane holds the entry of.
  float2 my_sc = make_float2(1.f, 1.f);
  if constexpr (kDs) {
    if (entry != nullptr) {
      my_sc = __ldg(reinterpret_cast<const float2*>(entry + E::kScaleOff) + half);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int j = (lane >> 4) + 2 * i, r = tok0 + j;
    const unsigned char* src = shfl_ptr(entry, src0 + j);
    if ((have >> (src0 + j)) & 1) {
      cp_async16(kv + chunk * kChunk + r * 128 + ((s0 ^ (r & 7)) << 4), src + 256 * half + 16 * u);
    }
  }
  if (half == 1) {  // the RoPE part: chunk 8
    constexpr int kP = E::kRopePieces, kPer = 16 * kP / 32;  // pieces a lane copies
    const int v = lane % kP;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int j = lane / kP + (32 / kP) * i, r = tok0 + j;
      const unsigned char* src = shfl_ptr(entry, src0 + j);
      if ((have >> (src0 + j)) & 1) {
        const int s = kDs ? v : 2 * v;  // ds: bf16 already, its final slot
        cp_async16(kv + (kChunks - 1) * kChunk + r * 128 + ((s ^ (r & 7)) << 4), src + E::kRopeOff + 16 * v);
      }
    }
  }
  cp_async_commit();
  cp_async_wait<0>();
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int j = (lane >> 4) + 2 * i, r = tok0 + j;
    const bool ok = (have >> (src0 + j)) & 1;
    float sc = 1.f;
    if constexpr (kDs) {
      const float sa = __shfl_sync(0xffffffffu, my_sc.x, src0 + j);
      const float sb = __shfl_sync(0xffffffffu, my_sc.y, src0 + j);
      sc = u < 8 ? sa : sb;
    }
    if (ok) expand_piece<kDs>(kv + chunk * kChunk + r * 128, s0 ^ (r & 7), (s0 + 1) ^ (r & 7), sc);
  }
  if constexpr (!kDs) {
    if (half == 1) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int v = lane & 3, j = (lane >> 2) + 8 * i, r = tok0 + j;
        if ((have >> (src0 + j)) & 1) {
          expand_piece<false>(kv + (kChunks - 1) * kChunk + r * 128, (2 * v) ^ (r & 7), (2 * v + 1) ^ (r & 7),
                              1.f);
        }
      }
    }
  }
}

// Entry address of position pos (null at or past kv_hi).
template <int FMT>
__device__ __forceinline__ const unsigned char* fp8_entry(const DecodeParams& p, const int32_t* bt,
                                                          int pos, int kv_hi) {
  if (pos >= kv_hi) return nullptr;
  const int page = bt[pos / p.block_size];
  return static_cast<const unsigned char*>(p.kv_cache) + static_cast<int64_t>(page) * p.page_stride +
         static_cast<int64_t>(pos % p.block_size) * p.token_stride;
}

// The producer warpgroup's loop for an fp8 / fp8_ds_mla cache: parts in the order the consumers
// release them (stage 0 part 0, stage 1 part 1, stage 0 part 1, stage 1 part 0), each filled
// by all four warps once it is free.
template <int FMT, class Smem>
__device__ __forceinline__ void produce_fp8(const DecodeParams& p, Smem& sm, PartWalker& walk,
                                            int m_tile, int wq, int lane) {
  using E = Fp8Entry<FMT>;
  const int tok0 = 16 * wq, mine = tok0 + (lane & 15), tile_of_lane = lane >> 4;
  int fills[kStages] = {0, 0};
  Segment seg;
  while (walk.next(p, seg)) {
    sm80::CtaRows c;
    if (!segment_rows(p, seg, m_tile, c)) continue;
    const int n_tiles = (c.kv_hi - c.kv_lo + kBN - 1) / kBN;
    const int32_t* bt = p.block_table + static_cast<int64_t>(seg.b) * p.bt_stride;
    const unsigned char* entry =
        fp8_entry<FMT>(p, bt, c.kv_lo + tile_of_lane * kBN + mine, c.kv_hi);
    for (int ta = 0; ta < n_tiles; ta += 2) {
      const unsigned char* next =
          fp8_entry<FMT>(p, bt, c.kv_lo + (ta + 2 + tile_of_lane) * kBN + mine, c.kv_hi);
      const uint32_t have = __ballot_sync(0xffffffffu, entry != nullptr);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int st = j == 1 || j == 3 ? 1 : 0, half = j == 1 || j == 2 ? 1 : 0;
        if (ta + st >= n_tiles) continue;
        if (fills[st] > 0) mbar_wait(&sm.empty[st][half], (fills[st] - 1) & 1);
        fill_part_fp8<FMT>(sm.kv[st], half, tok0, 16 * st, entry, have, lane);
        fence_proxy_async_smem();
        mbar_arrive(&sm.full[st][half]);
      }
      ++fills[0];
      if (ta + 1 < n_tiles) ++fills[1];
      if (next != nullptr) prefetch_l2_bytes(next, E::kBytes);
      entry = next;
    }
  }
}

}  // namespace sm90
}  // namespace portmla
