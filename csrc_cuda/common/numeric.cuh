// Small device helpers: 16-bit and fp8 conversions, PTX wrappers (cp.async, ldmatrix, mma).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace portmla {

template <typename T> struct Pack2;
template <> struct Pack2<__nv_bfloat16> { using type = __nv_bfloat162; };
template <> struct Pack2<__half> { using type = __half2; };

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Four consecutive T values (8 bytes) -> float4.
template <typename T>
__device__ __forceinline__ float4 unpack4(uint2 v) {
  const T* e = reinterpret_cast<const T*>(&v);
  return make_float4(to_float(e[0]), to_float(e[1]), to_float(e[2]), to_float(e[3]));
}

// Two floats -> one 32-bit register holding two T (low half = a).
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// e4m3fn (OCP, finite-only) byte -> float, exact.
__device__ __forceinline__ float fp8e4m3_to_float(uint8_t b) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3);
  return __half2float(__half(h));
}

// Two e4m3fn bytes (low byte first) -> two floats, exact.
__device__ __forceinline__ float2 fp8x2_e4m3_to_float2(uint16_t v) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v), __NV_E4M3);
  return __half22float2(__half2(h));
}

// Two e4m3fn bytes (bits 16..31 of w, the lower byte first) -> fp16x2, exact. sm_89+: one cvt
// of the register's upper half, which ptxas reads in place (F2FP .. R.H1); `w >> 16` first
// cost a shift for every such pair (9-12 % of the narrow quantized kernel's instructions).
__device__ __forceinline__ uint32_t e4m3x2_hi_to_h2(uint32_t w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t r;
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %1;\n cvt.rn.f16x2.e4m3x2 %0, h;\n}\n" : "=r"(r) : "r"(w));
  return r;
#else
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w >> 16), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
#endif
}

// Two e4m3fn bytes (bits 0..15 of w, the lower byte first) -> fp16x2, exact.
__device__ __forceinline__ uint32_t e4m3x2_lo_to_h2(uint32_t w) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w & 0xffffu), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// 2^k from its exponent bits (a normal float for k in [-126, 127]).
__device__ __forceinline__ float pow2i(int k) { return __int_as_float((k + 127) << 23); }

// Powers of two (s, 1/s) with amax * s in [2^14, 2^15): a bf16 / fp16 row times s is
// exact in fp16 (down to 2^-28 amax, fp16's subnormals).
__device__ __forceinline__ void pow2_row_scale(float amax, float& s, float& inv) {
  const int e = (__float_as_int(amax) >> 23) & 0xff;
  const int k = min(max(141 - e, -126), 126);
  s = pow2i(k);
  inv = pow2i(-k);
}

// pow2_row_scale of a row spread over kLanes consecutive lanes (`amax`: this lane's part of the
// row's largest magnitude).
template <int kLanes>
__device__ __forceinline__ void pow2_row_scale_lanes(float amax, float& s, float& inv) {
#pragma unroll
  for (int o = 1; o < kLanes; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  pow2_row_scale(amax, s, inv);
}

// Largest magnitude of the 8 T values (bf16 / fp16) in a 16-byte word.
template <typename T>
__device__ __forceinline__ float amax8(const uint4& v) {
  const T* e = reinterpret_cast<const T*>(&v);
  float m = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) m = fmaxf(m, fabsf(to_float(e[k])));
  return m;
}

// The 8 T values of a 16-byte word times s, as 8 TO: exact for a pow2_row_scale factor (fp16
// holds a bf16 / fp16 value's mantissa within its range; bf16, a bf16 value's times any power of
// two within its).
template <typename TO, typename T>
__device__ __forceinline__ uint4 scale8_to(const uint4& v, float s) {
  const T* e = reinterpret_cast<const T*>(&v);
  uint4 h;
  h.x = pack2<TO>(to_float(e[0]) * s, to_float(e[1]) * s);
  h.y = pack2<TO>(to_float(e[2]) * s, to_float(e[3]) * s);
  h.z = pack2<TO>(to_float(e[4]) * s, to_float(e[5]) * s);
  h.w = pack2<TO>(to_float(e[6]) * s, to_float(e[7]) * s);
  return h;
}

// float -> e4m3fn byte, round to nearest even, saturating to +-448 (NaN stays NaN).
__device__ __forceinline__ uint8_t float_to_fp8e4m3(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

// ------------------------------------------------------------------ PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
// The same, zero-filling the destination when !valid (src then unused, but must be a valid address).
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// D (16x8 f32) += A (16x16, row) * B (16x8, col), m16n8k16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace portmla
