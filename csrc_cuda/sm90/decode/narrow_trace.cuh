// Per-CTA timeline of the narrow Hopper kernels (scripts/narrow_trace.cu), compiled in only with
// PORTMLA_NARROW_TRACE (never in the module: the macros are empty there). Thread 0 of every CTA
// records globaltimer (ns, comparable across SMs) at the events below, and the clock64 cycles it
// spent waiting for its KV tiles' data.
#pragma once

#if defined(PORTMLA_NARROW_TRACE)
namespace portmla {
namespace sm90 {
constexpr int kNtCtas = 512;  // CTAs traced (blockIdx.y * gridDim.x + blockIdx.x below this)
constexpr int kNtSegs = 5;    // segments traced per CTA (later ones share the last row)
// Events: 0 entry, 1 schedule read (after the first CTA barrier); per segment k: 2 + 5k start
// (walker returned it), 3 + 5k Q ready, 4 + 5k first tile's data landed, 5 + 5k tiles done,
// 6 + 5k rows stored; 27 decode loop left, 28 past the tail merge's grid barrier, 29 merged;
// 30: cycles waiting for data (sum over tiles); 31: smid | tiles << 16 | segments << 40; 32 / 33:
// clock64 at events 1 / 27 (the SM's clock over the decode loop).
constexpr int kNtEv = 34;
__device__ unsigned long long g_nt[kNtCtas][kNtEv];

__device__ __forceinline__ unsigned long long nt_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ int nt_cta() { return blockIdx.y * gridDim.x + blockIdx.x; }
constexpr int kNtW0 = 8, kNtWTiles = 32;
__device__ long long g_ntw[kNtWTiles][6][4];
}  // namespace sm90
}  // namespace portmla

// Per warp (lane 0) of CTA 0, global tiles kNtW0 .. kNtW0 + kNtWTiles - 1: clock64 at the tile
// events NT_WARP(e) (e < 6): where the warps of the warpgroup drift apart within a tile.
#define NT_WARP(e, g)                                                                         \
  do {                                                                                        \
    if (blockIdx.x == 0 && blockIdx.y == 0 && (threadIdx.x & 31) == 0 && (g) >= kNtW0 &&     \
        (g) < kNtW0 + kNtWTiles)                                                              \
      g_ntw[(g) - kNtW0][e][threadIdx.x >> 5] = clock64();                                    \
  } while (0)
#define NT_DECL                                                 \
  int nt_seg = 0, nt_tiles = 0;                                 \
  unsigned long long nt_wait = 0;                               \
  long long nt_t0 = 0
#define NT_EV(ev)                                                                  \
  do {                                                                             \
    if (threadIdx.x == 0 && nt_cta() < kNtCtas) {                                  \
      g_nt[nt_cta()][ev] = nt_now();                                               \
      if ((ev) == 1 || (ev) == 27) g_nt[nt_cta()][(ev) == 1 ? 32 : 33] = clock64(); \
    }                                                                              \
  } while (0)
#define NT_SEG(e) NT_EV(2 + 5 * min(nt_seg, kNtSegs - 1) + (e))
#define NT_SEG_END() (++nt_seg)
#define NT_WAIT_BEGIN() (nt_t0 = clock64())
#define NT_WAIT_END(first)                                   \
  do {                                                       \
    nt_wait += clock64() - nt_t0;                            \
    ++nt_tiles;                                              \
    if (first) NT_SEG(2);                                    \
  } while (0)
#define NT_FINISH()                                                                          \
  do {                                                                                       \
    if (threadIdx.x == 0 && nt_cta() < kNtCtas) {                                            \
      unsigned smid;                                                                         \
      asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));                                      \
      g_nt[nt_cta()][30] = nt_wait;                                                          \
      g_nt[nt_cta()][31] = smid | (static_cast<unsigned long long>(nt_tiles) << 16) |        \
                           (static_cast<unsigned long long>(nt_seg) << 40);                  \
    }                                                                                        \
  } while (0)
#else
#define NT_WARP(e, g)
#define NT_DECL
#define NT_EV(ev)
#define NT_SEG(e)
#define NT_SEG_END()
#define NT_WAIT_BEGIN()
#define NT_WAIT_END(first)
#define NT_FINISH()
#endif
