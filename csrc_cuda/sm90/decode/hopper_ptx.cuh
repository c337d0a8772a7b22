// sm_90a building blocks of the Hopper decode kernel: mbarriers, TMA tile loads, proxy fences,
// named barriers, GMMA shared-memory descriptors and the wgmma calls (CuTe's SM90 GMMA atoms,
// headers from the nvidia-cutlass package). Everything here is device code for sm_90a only.
#pragma once

#include <cuda.h>  // CUtensorMap (type only; the map is encoded on the host)
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "../../common/params.h"

#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>

namespace portmla {
namespace sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// `raw` (the dynamic shared memory) moved up to a 1024-byte boundary by pointer arithmetic on
// the __shared__ array itself, so the compiler keeps shared-space loads / stores (STS, not
// generic ST with 64-bit addresses).
template <typename S>
__device__ __forceinline__ S& smem_aligned_1024(unsigned char* raw) {
  return *reinterpret_cast<S*>(raw + ((1024u - (smem_u32(raw) & 1023u)) & 1023u));
}

// 2^x, the MUFU approximation (relative error ~2^-22), flushing subnormal results to 0;
// 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------- mbarrier + TMA

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}

// Makes the initialised barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}

// Plain arrival (no transaction bytes).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// An arrival that fires once every cp.async this thread issued before it has landed (the
// pending count is not raised: it counts as one of the barrier's expected arrivals).
__device__ __forceinline__ void mbar_arrive_cp_async(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar))
               : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// One 3-D TMA tile load (coordinates innermost first) that completes `bar`'s transaction count.
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar,
                                            int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// The L2 eviction policy of the KV tiles' loads (DecodeParams::kv_l2_hint, KvL2Hint; the grid's
// x dimension is its row tiles): evict_first, evict_last, or evict_normal (the default
// priority).
__device__ __forceinline__ uint64_t kv_l2_policy(int hint) {
  uint64_t pol;
  if (hint == kL2First || (hint == kL2Auto && gridDim.x == 1)) {
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  } else if (hint == kL2Last) {
    asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(pol));
  } else {
    asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(pol));
  }
  return pol;
}

// tma_load_3d with an L2 eviction policy from kv_l2_policy.
__device__ __forceinline__ void tma_load_3d_hint(void* dst, const CUtensorMap* map, uint64_t* bar,
                                                 int c0, int c1, int c2, uint64_t pol) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".L2::cache_hint [%0], [%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2), "l"(pol)
      : "memory");
}

// Hint: bring one TMA box into L2 (no shared memory, no barrier).
__device__ __forceinline__ void tma_prefetch_l2_3d(const CUtensorMap* map, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.prefetch.tensor.3d.L2.global.tile [%0, {%1, %2, %3}];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}

__device__ __forceinline__ void tma_prefetch_desc(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Generic-proxy writes to shared memory (st.shared, cp.async) -> visible to wgmma / TMA.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Per-warpgroup register budget (all 128 threads of the warpgroup execute it): a producer
// warpgroup gives registers back, the consumers take them.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Arrives at barrier `id` without waiting (the producer side of a bar.sync of `threads`).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---------------------------------------------------------------- GMMA descriptors

// 128-byte-swizzled operand descriptor (the canonical GMMA layouts of CuTe's
// make_gmma_desc): K-major: rows 128 B apart, 8-row groups `sbo` bytes apart; MN-major:
// 64-element blocks `lbo` bytes apart along M/N, 8-row groups of K `sbo` bytes apart.
// The start address must lie in a 1024-byte-aligned swizzle atom (base offset 0).
__device__ __forceinline__ uint64_t gmma_desc_sw128(const void* smem, uint32_t lbo, uint32_t sbo) {
  cute::GmmaDescriptor d;
  d.bitfield.start_address_ = static_cast<uint16_t>(smem_u32(smem) >> 4);
  d.bitfield.leading_byte_offset_ = static_cast<uint16_t>(lbo >> 4);
  d.bitfield.stride_byte_offset_ = static_cast<uint16_t>(sbo >> 4);
  d.bitfield.base_offset_ = 0;
  d.bitfield.layout_type_ = static_cast<uint8_t>(cute::SM90::GMMA::LayoutType::B128);
  return d.desc_;
}

// A descriptor moved by `bytes` (a multiple of 16) in shared memory.
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, uint32_t bytes) {
  return desc + static_cast<uint64_t>(bytes >> 4);
}

// ---------------------------------------------------------------- wgmma

__device__ __forceinline__ void wgmma_fence() { cute::warpgroup_arrive(); }
__device__ __forceinline__ void wgmma_commit() { cute::warpgroup_commit_batch(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  cute::warpgroup_wait<N>();
}

// Keeps the compiler from moving accesses of accumulator registers across wgmma fences.
template <typename R, int N>
__device__ __forceinline__ void fence_regs(R (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(r[i]);
}

namespace detail {
template <class Atom, int N, std::size_t... I>
__device__ __forceinline__ void gmma_call(uint64_t a, uint64_t b, float (&d)[N], bool accumulate,
                                          std::index_sequence<I...>) {
  Atom::fma(a, b, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One
                                      : cute::SM90::GMMA::ScaleOut::Zero);
}
template <class Atom, int N, std::size_t... I>
__device__ __forceinline__ void gmma_rs_call(const uint32_t (&a)[4], uint64_t b, float (&d)[N],
                                             std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], b, d[I]..., cute::SM90::GMMA::ScaleOut::One);
}
}  // namespace detail

using cute::SM90::GMMA::Major;

// Shapes of the decode kernels: S (m64 n32 or n64, both operands K-major) and O (m64 n256, A
// K-major from shared memory or from registers, B MN-major), for bf16 and fp16 inputs, fp32
// accumulators; the narrow kernel's transposed products: SNarrow (S^T = K Q^T, m64 n16, both
// K-major) and ONarrow (O^T = V^T P^T, m64 n16, A = V^T MN-major, B = P K-major).
template <typename T> struct Gmma;
template <> struct Gmma<__nv_bfloat16> {
  using S = cute::SM90::GMMA::MMA_64x32x16_F32BF16BF16_SS<Major::K, Major::K>;
  using S64 = cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_SS<Major::K, Major::K>;
  using O = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_SS<Major::K, Major::MN>;
  using ORs = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_RS<Major::K, Major::MN>;
  using SNarrow = cute::SM90::GMMA::MMA_64x16x16_F32BF16BF16_SS<Major::K, Major::K>;
  using ONarrow = cute::SM90::GMMA::MMA_64x16x16_F32BF16BF16_SS<Major::MN, Major::K>;
};
template <> struct Gmma<__half> {
  using S = cute::SM90::GMMA::MMA_64x32x16_F32F16F16_SS<Major::K, Major::K>;
  using S64 = cute::SM90::GMMA::MMA_64x64x16_F32F16F16_SS<Major::K, Major::K>;
  using O = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_SS<Major::K, Major::MN>;
  using ORs = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_RS<Major::K, Major::MN>;
  using SNarrow = cute::SM90::GMMA::MMA_64x16x16_F32F16F16_SS<Major::K, Major::K>;
  using ONarrow = cute::SM90::GMMA::MMA_64x16x16_F32F16F16_SS<Major::MN, Major::K>;
};

template <class Atom, int N>
__device__ __forceinline__ void gmma(uint64_t a, uint64_t b, float (&d)[N], bool accumulate) {
  detail::gmma_call<Atom>(a, b, d, accumulate, std::make_index_sequence<N>{});
}

// d += A B with the m64 x k16 A fragment in registers (4 x 2 16-bit values per thread).
template <class Atom, int N>
__device__ __forceinline__ void gmma_rs(const uint32_t (&a)[4], uint64_t b, float (&d)[N]) {
  detail::gmma_rs_call<Atom>(a, b, d, std::make_index_sequence<N>{});
}

}  // namespace sm90
}  // namespace portmla
