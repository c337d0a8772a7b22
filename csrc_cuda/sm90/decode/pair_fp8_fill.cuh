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

// A fill job: part `half` of stage `st` (its tile: the pair's first for stage 0, second for
// stage 1). Lanes 16 st .. 16 st + 15 hold the entry addresses of its tokens (lane 16 st + j:
// token j of every warp's 16, tok0 = 16 w; null past the segment's end: zero-filled, and the
// consumers mask those scores and zero those V rows).
struct Fp8Job {
  int st, half;
  const unsigned char* entry;  // this lane's token entry of the job's pair
  float2 sc;  // fp8_ds_mla: the two tile scales of `half` of this lane's token
};

// Issues a job's raw copies (one cp.async group; tokens past the end are zero-filled, so no
// branch per piece) and, for fp8_ds_mla, loads its scales.
template <int FMT>
__device__ __forceinline__ void issue_job(unsigned char* kv, Fp8Job& job, int tok0, int lane,
                                          const void* any_valid) {
  // The offsets below derive from the lane: recomputed per job, not hoisted out of the
  // producer's loops into registers it does not have (40).
  asm volatile("" : "+r"(lane));
  using E = Fp8Entry<FMT>;
  constexpr bool kDs = FMT == kKvDsMla;
  const int half = job.half, src0 = 16 * job.st;
  const int u = lane & 15;  // latent piece: channels 256 half + 16 u ..
  const int s0 = 2 * (u & 3);
  if constexpr (kDs) {
    job.sc = job.entry != nullptr && (lane >> 4) == job.st
                 ? __ldg(reinterpret_cast<const float2*>(job.entry + E::kScaleOff) + half)
                 : make_float2(1.f, 1.f);
  }
  unsigned char* const row0 = kv + (4 * half + (u >> 2)) * kChunk + (tok0 + (lane >> 4)) * 128;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int j = (lane >> 4) + 2 * i;  // token tok0 + j; (tok0 + j) & 7 == j & 7
    const unsigned char* src = shfl_ptr(job.entry, src0 + j);
    cp_async16_zfill(row0 + 256 * i + ((s0 ^ (j & 7)) << 4),
                     src != nullptr ? src + 256 * half + 16 * u : any_valid, src != nullptr);
  }
  if (half == 1) {  // the RoPE part: chunk 8
    constexpr int kP = E::kRopePieces, kPer = 16 * kP / 32;  // pieces a lane copies
    const int v = lane % kP, sl = kDs ? v : 2 * v;           // ds: bf16 already, its final slot
    unsigned char* const rrow0 = kv + (kChunks - 1) * kChunk + (tok0 + lane / kP) * 128;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int j = lane / kP + (32 / kP) * i;
      const unsigned char* src = shfl_ptr(job.entry, src0 + j);
      cp_async16_zfill(rrow0 + (32 / kP) * 128 * i + ((sl ^ (j & 7)) << 4),
                       src != nullptr ? src + E::kRopeOff + 16 * v : any_valid, src != nullptr);
    }
  }
  cp_async_commit();
}

// Converts a job's pieces once its copies have landed (the caller waits for its group). Every
// piece, past the end too (zeros there): no branches.
template <int FMT>
__device__ __forceinline__ void convert_job(unsigned char* kv, const Fp8Job& job, int tok0,
                                            int lane) {
  asm volatile("" : "+r"(lane));
  constexpr bool kDs = FMT == kKvDsMla;
  const int half = job.half, src0 = 16 * job.st;
  const int u = lane & 15;
  const int s0 = 2 * (u & 3);
  unsigned char* const row0 = kv + (4 * half + (u >> 2)) * kChunk + (tok0 + (lane >> 4)) * 128;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int j = (lane >> 4) + 2 * i;
    float sc = 1.f;
    if constexpr (kDs) {
      const float sa = __shfl_sync(0xffffffffu, job.sc.x, src0 + j);
      const float sb = __shfl_sync(0xffffffffu, job.sc.y, src0 + j);
      sc = u < 8 ? sa : sb;
    }
    expand_piece<kDs>(row0 + 256 * i, s0 ^ (j & 7), (s0 + 1) ^ (j & 7), sc);
  }
  if constexpr (!kDs) {
    if (half == 1) {
      const int v = lane & 3;
      unsigned char* const rrow0 = kv + (kChunks - 1) * kChunk + (tok0 + (lane >> 2)) * 128;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int j = (lane >> 2) + 8 * i;
        expand_piece<false>(rrow0 + 8 * 128 * i, (2 * v) ^ (j & 7), (2 * v + 1) ^ (j & 7), 1.f);
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

// Non-blocking: has the mbarrier completed the phase with this parity?
__device__ __forceinline__ bool mbar_test(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// The producer warpgroup's loop for an fp8 / fp8_ds_mla cache. Jobs in the order the consumers
// release the parts (pair k: stage 0 part 0, stage 1 part 1, stage 0 part 1, stage 1 part 0),
// each done by all four warps: wait until the part is free, copy, convert, arrive. One job of
// look-ahead: before converting a job, the next one's copies are issued if its part is
// already free (never waited for: the consumers may need the current job first), so its
// latency overlaps this conversion.
template <int FMT, class Smem>
__device__ __forceinline__ void produce_fp8(const DecodeParams& p, Smem& sm, PartWalker& walk,
                                            int m_tile, int wq, int lane) {
  using E = Fp8Entry<FMT>;
  const int tok0 = 16 * wq, mine = tok0 + (lane & 15), tile_of_lane = lane >> 4;
  int base[kStages] = {0, 0};  // fills of each stage in earlier segments
  Segment seg;
  while (walk.next(p, seg)) {
    sm80::CtaRows c;
    if (!segment_rows(p, seg, m_tile, c)) continue;
    const int n_tiles = (c.kv_hi - c.kv_lo + kBN - 1) / kBN;
    const int n_jobs = 4 * ((n_tiles + 1) / 2);
    const int32_t* bt = p.block_table + static_cast<int64_t>(seg.b) * p.bt_stride;
    // Entries of pair k (lanes 0..15: tile 2k, 16..31: tile 2k + 1) for k = the current pair
    // and the next one.
    const unsigned char* cur = fp8_entry<FMT>(p, bt, c.kv_lo + tile_of_lane * kBN + mine, c.kv_hi);
    const unsigned char* nxt =
        fp8_entry<FMT>(p, bt, c.kv_lo + (2 + tile_of_lane) * kBN + mine, c.kv_hi);
    if (nxt != nullptr) prefetch_l2_bytes(nxt, E::kBytes);
    // Job g: pair g / 4, release slot g % 4 -> (stage, part); it exists unless its tile does not.
    auto job_at = [&](int g, const unsigned char* entry) {
      const int j = g & 3;
      Fp8Job jb;
      jb.st = j == 1 || j == 3 ? 1 : 0;
      jb.half = j == 1 || j == 2 ? 1 : 0;
      jb.entry = entry;
      jb.sc = make_float2(1.f, 1.f);
      return jb;
    };
    auto exists = [&](int g) { return 2 * (g >> 2) + ((g & 3) == 1 || (g & 3) == 3) < n_tiles; };
    // Fill number of job g's stage (its `empty` phase: fill f > 0 waits phase (f - 1) & 1).
    auto fill_no = [&](const Fp8Job& jb, int g) { return base[jb.st] + (g >> 2); };
    Fp8Job job = job_at(0, cur), ahead{};
    bool have_ahead = false;
    for (int g = 0; g < n_jobs; ++g) {
      if (!exists(g)) continue;
      if (have_ahead) {
        job = ahead;
        have_ahead = false;
      } else {
        job = job_at(g, cur);
        const int f = fill_no(job, g);
        if (f > 0) mbar_wait(&sm.empty[job.st][job.half], (f - 1) & 1);
        issue_job<FMT>(sm.kv[job.st], job, tok0, lane, p.kv_cache);
      }
      int g2 = g + 1;
      while (g2 < n_jobs && !exists(g2)) ++g2;
      if (g2 < n_jobs) {
        Fp8Job nj = job_at(g2, (g2 >> 2) == (g >> 2) ? cur : nxt);
        const int f = fill_no(nj, g2);
        // Warp-uniform: a warp issues the job whole or not at all (warps may differ).
        if (__all_sync(0xffffffffu, f == 0 || mbar_test(&sm.empty[nj.st][nj.half], (f - 1) & 1))) {
          issue_job<FMT>(sm.kv[nj.st], nj, tok0, lane, p.kv_cache);
          ahead = nj;
          have_ahead = true;
        }
      }
      if (have_ahead) {
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      convert_job<FMT>(sm.kv[job.st], job, tok0, lane);
      fence_proxy_async_smem();
      mbar_arrive(&sm.full[job.st][job.half]);
      if (g2 < n_jobs && (g2 >> 2) != (g >> 2)) {  // the pair's last job
        // Next pair: its entries are `nxt`; load the one after and bring it into L2.
        cur = nxt;
        nxt = fp8_entry<FMT>(p, bt, c.kv_lo + (2 * ((g >> 2) + 2) + tile_of_lane) * kBN + mine,
                             c.kv_hi);
        if (nxt != nullptr) prefetch_l2_bytes(nxt, E::kBytes);
      }
    }
    base[0] += n_tiles > 0 ? (n_tiles + 1) / 2 : 0;
    base[1] += n_tiles / 2;
  }
}

}  // namespace sm90
}  // namespace portmla
