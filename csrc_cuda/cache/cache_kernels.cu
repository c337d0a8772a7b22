// concat_and_cache_mla and gather_cache for every KV format. Memory-bound, one warp per token.
// Element types are runtime codes (uniform branches); offsets into the cache are 64-bit.
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "../common/check.h"
#include "../common/numeric.cuh"
#include "../common/params.h"

namespace portmla {
namespace {

constexpr int kTile = 128;  // fp8_ds_mla quantization tile

__device__ __forceinline__ float load_as_float(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case kFP16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* base, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kBF16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
    case kFP16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(base)[i] = v; break;
  }
}

__device__ __forceinline__ int64_t elem_size(int fmt) { return fmt == kKv16 ? 2 : 1; }

__global__ void __launch_bounds__(256) concat_and_cache_kernel(const CacheWriteParams p) {
  const int t = blockIdx.x * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (t >= p.num_tokens) return;
  const int64_t slot = p.slot_dtype == kI64 ? static_cast<const int64_t*>(p.slot_mapping)[t]
                                            : static_cast<const int32_t*>(p.slot_mapping)[t];
  if (slot < 0) return;
  const int64_t blk = slot / p.block_size, off = slot % p.block_size;
  const int L = p.kv_lora_rank, R = p.rope_dim;
  unsigned char* e = static_cast<unsigned char*>(p.cache) +
                     (blk * p.page_stride + off * p.token_stride) * elem_size(p.kv_format);
  const int64_t src_c = static_cast<int64_t>(t) * p.kv_c_stride;
  const int64_t src_r = static_cast<int64_t>(t) * p.k_pe_stride;
  if (p.kv_format == kKv16) {
    for (int i = lane; i < L + R; i += 32) {
      const float v = i < L ? load_as_float(p.kv_c, p.kv_c_dtype, src_c + i)
                            : load_as_float(p.k_pe, p.k_pe_dtype, src_r + i - L);
      store_from_float(e, p.cache_dtype, i, v);
    }
  } else if (p.kv_format == kKvFp8) {
    const float s = *p.scale;
    for (int i = lane; i < L + R; i += 32) {
      const float v = i < L ? load_as_float(p.kv_c, p.kv_c_dtype, src_c + i)
                            : load_as_float(p.k_pe, p.k_pe_dtype, src_r + i - L);
      e[i] = float_to_fp8e4m3(fminf(fmaxf(v / s, -448.f), 448.f));
    }
  } else {  // fp8_ds_mla
    float* scales = reinterpret_cast<float*>(e + L);
    for (int tile = 0; tile < L / kTile; ++tile) {
      float v[kTile / 32];
      float amax = 0.f;
#pragma unroll
      for (int k = 0; k < kTile / 32; ++k) {
        v[k] = load_as_float(p.kv_c, p.kv_c_dtype, src_c + tile * kTile + lane + 32 * k);
        amax = fmaxf(amax, fabsf(v[k]));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      const float scale = fmaxf(amax / 448.f, FLT_MIN);
#pragma unroll
      for (int k = 0; k < kTile / 32; ++k) {
        e[tile * kTile + lane + 32 * k] = float_to_fp8e4m3(fminf(fmaxf(v[k] / scale, -448.f), 448.f));
      }
      if (lane == 0) scales[tile] = scale;
    }
    __nv_bfloat16* rope = reinterpret_cast<__nv_bfloat16*>(e + L + 4 * (L / kTile));
    for (int i = lane; i < R; i += 32) {
      rope[i] = __float2bfloat16_rn(load_as_float(p.k_pe, p.k_pe_dtype, src_r + i));
    }
  }
}

__global__ void __launch_bounds__(256) gather_cache_kernel(const GatherParams p) {
  const int b = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int n = p.seq_lens[b];
  const int start = p.seq_starts != nullptr ? p.seq_starts[b] : 0;
  const int64_t out0 = p.cu_seq_lens[b];
  const int L = p.kv_lora_rank, R = p.rope_dim;
  const int* bt = p.block_table + static_cast<int64_t>(b) * p.bt_stride;
  const float s = p.kv_format == kKvFp8 ? *p.scale : 1.f;
  for (int i = blockIdx.y * 8 + (threadIdx.x >> 5); i < n; i += gridDim.y * 8) {
    const int pos = start + i;
    const int64_t blk = bt[pos / p.block_size], off = pos % p.block_size;
    const unsigned char* e = static_cast<const unsigned char*>(p.cache) +
                             (blk * p.page_stride + off * p.token_stride) * elem_size(p.kv_format);
    const int64_t o = (out0 + i) * p.out_stride;
    for (int c = lane; c < L + R; c += 32) {
      float v;
      if (p.kv_format == kKv16) {
        v = load_as_float(e, p.cache_dtype, c);
      } else if (p.kv_format == kKvFp8) {
        v = fp8e4m3_to_float(e[c]) * s;
      } else if (c < L) {
        v = fp8e4m3_to_float(e[c]) * reinterpret_cast<const float*>(e + L)[c / kTile];
      } else {
        v = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(e + L + 4 * (L / kTile))[c - L]);
      }
      store_from_float(p.out, p.out_dtype, o + c, v);
    }
  }
}

}  // namespace

cudaError_t launch_concat_and_cache_mla(const CacheWriteParams& p, cudaStream_t stream) {
  if (p.block_size < 1 || (p.kv_format == kKvFp8 && p.scale == nullptr) ||
      (p.kv_format == kKvDsMla && p.kv_lora_rank % kTile)) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0) return cudaSuccess;
  concat_and_cache_kernel<<<(p.num_tokens + 7) / 8, 256, 0, stream>>>(p);
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

cudaError_t launch_gather_cache(const GatherParams& p, cudaStream_t stream) {
  if (p.block_size < 1 || (p.kv_format == kKvFp8 && p.scale == nullptr) ||
      (p.kv_format == kKvDsMla && p.kv_lora_rank % kTile)) {
    return cudaErrorInvalidValue;
  }
  if (p.num_seqs == 0 || p.max_seq_tokens <= 0) return cudaSuccess;
  const int chunks = (p.max_seq_tokens + 7) / 8;
  dim3 grid(p.num_seqs, chunks < 1024 ? chunks : 1024);
  gather_cache_kernel<<<grid, 256, 0, stream>>>(p);
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace portmla
