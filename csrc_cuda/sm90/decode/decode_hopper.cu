// Launcher of the Hopper decode kernels: encodes the TMA map of the paged cache (through the
// driver entry point the runtime hands out, so nothing links libcuda) and picks the
// instantiation (instances.h; each in its own source). Built for every arch; device code
// exists for sm_90a only.
#include <cuda.h>
#include <cuda_runtime.h>

#include <mutex>

#include "../../common/check.h"
#include "instances.h"
#include "launch.h"
#include "narrow_kernel.cuh"
#include "narrow_quant_kernel.cuh"
#include "pair_kernel.cuh"

namespace portmla {
namespace sm90 {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_fn() {
  static EncodeTiled fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess) {
      fn = reinterpret_cast<EncodeTiled>(f);
    }
  });
  return fn;
}

// A 3-D tensor of `type` at `base` (dims innermost first, the two outer strides in bytes),
// boxes of `box`, 128-byte swizzle (the layout of the kernels' chunks) unless told otherwise.
// Boxes reaching past the innermost dim are zero-filled there.
bool encode_3d(CUtensorMapDataType type, const void* base, const cuuint64_t (&dims)[3],
               const cuuint64_t (&strides)[2], const cuuint32_t (&box)[3], CUtensorMap* map,
               CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_128B) {
  EncodeTiled fn = encode_fn();
  const cuuint32_t elem[3] = {1, 1, 1};
  return fn != nullptr &&
         fn(map, type, 3, const_cast<void*>(base), dims, strides, box, elem,
            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

CUtensorMapDataType q_type(const DecodeParams& p) {
  return p.q_dtype == kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

bool block_size_ok(int bs) { return bs >= 16 && (kBN % bs == 0 || bs % kBN == 0); }

// The cache as [num_blocks][block_size][576], boxes of 64 columns x min(block_size, 64)
// positions x 1 page.
cudaError_t encode_kv_map(const DecodeParams& p, CUtensorMap* map) {
  if (encode_fn() == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(sm80::kD),
                              static_cast<cuuint64_t>(p.block_size),
                              static_cast<cuuint64_t>(p.num_blocks)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.token_stride) * 2,
                                 static_cast<cuuint64_t>(p.page_stride) * 2};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(p.block_size < kBN ? p.block_size : kBN),
                             1};
  return encode_3d(q_type(p), p.kv_cache, dims, strides, box, map) ? cudaSuccess
                                                                   : cudaErrorInvalidValue;
}

// An fp8 / fp8_ds_mla cache as bytes, [num_blocks][block_size][entry bytes], boxes of 128
// bytes x min(block_size, 64) positions x 1 page (pair_fp8_fill.cuh: RawBoxes). false (the
// producer's cp.async copies instead) for block sizes the boxes do not tile.
bool encode_raw_map(const DecodeParams& p, CUtensorMap* map) {
  if (!block_size_ok(p.block_size) || p.num_blocks < 1) return false;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(p.kv_format == kKvDsMla ? 656 : 576),
                              static_cast<cuuint64_t>(p.block_size),
                              static_cast<cuuint64_t>(p.num_blocks)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.token_stride),
                                 static_cast<cuuint64_t>(p.page_stride)};
  const cuuint32_t box[3] = {128, static_cast<cuuint32_t>(p.block_size < kBN ? p.block_size : kBN),
                             1};
  return encode_3d(CU_TENSOR_MAP_DATA_TYPE_UINT8, p.kv_cache, dims, strides, box, map);
}

// The narrow quantized kernel's tail boxes: entry bytes 512 .. 512 + NQLayout::kTail (fp8: the
// e4m3 RoPE; fp8_ds_mla: the tile scales and the bf16 RoPE) x min(block_size, 64) positions x 1
// page, unswizzled (rows of 64 / 144 bytes: conflict-free 16-byte reads of 8 rows).
bool encode_tail_map(const DecodeParams& p, CUtensorMap* map) {
  if (!block_size_ok(p.block_size) || p.num_blocks < 1) return false;
  const bool ds = p.kv_format == kKvDsMla;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(ds ? 656 : 576),
                              static_cast<cuuint64_t>(p.block_size),
                              static_cast<cuuint64_t>(p.num_blocks)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.token_stride),
                                 static_cast<cuuint64_t>(p.page_stride)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(ds ? NQLayout<kKvDsMla>::kTail
                                                        : NQLayout<kKvFp8>::kTail),
                             static_cast<cuuint32_t>(p.block_size < kBN ? p.block_size : kBN), 1};
  return encode_3d(CU_TENSOR_MAP_DATA_TYPE_UINT8, p.kv_cache, dims, strides, box, map,
                   CU_TENSOR_MAP_SWIZZLE_NONE);
}

// The queries as [num_tokens][num_heads][576], boxes of 64 columns x min(H, 64) heads x
// max(1, 64 / H) tokens: a row tile of 64 (token, head) rows in one box per chunk. false
// (cp.async loads instead) when H neither divides nor is a multiple of 64, or the strides /
// base do not meet TMA's 16-byte rules.
bool encode_q_map(const DecodeParams& p, CUtensorMap* map) {
  const int H = p.num_heads;
  if (H < 1 || (H % kBM != 0 && kBM % H != 0) || (p.q_stride_h * 2) % 16 ||
      (p.q_stride_t * 2) % 16 || reinterpret_cast<uintptr_t>(p.q) % 16) {
    return false;
  }
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(sm80::kD), static_cast<cuuint64_t>(H),
                              static_cast<cuuint64_t>(p.num_tokens)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.q_stride_h) * 2,
                                 static_cast<cuuint64_t>(p.q_stride_t) * 2};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(H < kBM ? H : kBM),
                             static_cast<cuuint32_t>(H < kBM ? kBM / H : 1)};
  return encode_3d(q_type(p), p.q, dims, strides, box, map);
}

cudaError_t run(const DecodeParams& p, cudaStream_t stream, int* took, RunKernel tile,
                RunKernel pair, RunKernel narrow) {
  CUtensorMap map, q_map{};
  PORTMLA_RETURN_IF_ERROR(encode_kv_map(p, &map));
  DecodeParams pq = p;
  if (p.variant == sm80::kHopperNarrow) {  // loads its 16 rows itself
    pq.q_tma = 0;
    return narrow(map, q_map, pq, stream, took);
  }
  pq.q_tma = encode_q_map(p, &q_map) ? 1 : 0;
  return (p.variant == sm80::kHopperPair ? pair : tile)(map, q_map, pq, stream, took);
}

// fp8 / fp8_ds_mla: the pair kernel's producer loads raw entries through TMA boxes of bytes
// (kv_tma) where the block size and strides allow, else copies them with cp.async; both on fp16
// operands, fp8 with bf16 or fp16 queries, fp8_ds_mla with bf16.
cudaError_t run_quantized(const DecodeParams& p, cudaStream_t stream, int* took) {
  const CUtensorMap unused{};
  CUtensorMap map{};
  DecodeParams pq = p;
  pq.q_tma = 0;  // the queries are scaled per row into fp16 as they load
  pq.kv_tma = encode_raw_map(p, &map) ? 1 : 0;
  if (p.kv_format == kKvDsMla) {
    return run_instance<__half, kKvDsMla, __nv_bfloat16, true>(map, unused, pq, stream, took);
  }
  return p.q_dtype == kBF16
             ? run_instance<__half, kKvFp8, __nv_bfloat16, true>(map, unused, pq, stream, took)
             : run_instance<__half, kKvFp8, __half, true>(map, unused, pq, stream, took);
}

// fp8 / fp8_ds_mla with 16 rows a CTA: the narrow quantized kernel (raw boxes through TMA only:
// block sizes 16, 32, 64 k; 16-byte strides).
cudaError_t run_narrow_quantized(const DecodeParams& p, cudaStream_t stream, int* took) {
  CUtensorMap map{}, tail{};
  if (encode_fn() == nullptr) return cudaErrorNotSupported;
  if (!encode_raw_map(p, &map) || !encode_tail_map(p, &tail)) return cudaErrorInvalidValue;
  if (p.kv_format == kKvDsMla) {
    return run_narrow_quant<__nv_bfloat16, kKvDsMla>(map, tail, p, stream, took);
  }
  return p.q_dtype == kBF16 ? run_narrow_quant<__nv_bfloat16, kKvFp8>(map, tail, p, stream, took)
                            : run_narrow_quant<__half, kKvFp8>(map, tail, p, stream, took);
}

}  // namespace

int decode_smem_bytes(bool pair) { return pair ? kPairSmemBytes : kSmemBytes; }
int narrow_smem_bytes() { return kNarrowSmemBytes; }
int narrow_quant_smem_bytes(int kv_format) {
  return kv_format == kKvDsMla ? narrow_quant_smem_bytes<kKvDsMla>() : narrow_quant_smem_bytes<kKvFp8>();
}

cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream, int* took) {
  if (took != nullptr) *took = kTailOff;
  if (p.kv_format == kKvFp8 || p.kv_format == kKvDsMla) {
    // Raw entries through TMA boxes of bytes, or 16-byte cp.async for block sizes the boxes
    // do not tile: any block size, strides in bytes. fp8: bf16 or fp16 queries; fp8_ds_mla: bf16.
    const bool q_ok = p.q_dtype == kBF16 || (p.q_dtype == kFP16 && p.kv_format == kKvFp8);
    const bool narrow = p.variant == sm80::kHopperNarrowQuant;
    if ((p.variant != sm80::kHopperPair && !narrow) || !q_ok || p.block_size < 1 ||
        (narrow && !block_size_ok(p.block_size)) ||
        p.token_stride % 16 || p.page_stride % 16 || reinterpret_cast<uintptr_t>(p.kv_cache) % 16 ||
        (p.kv_format == kKvFp8 && p.k_scale == nullptr) || p.num_parts < 1 ||
        p.num_parts > 65535 || p.sched_cum == nullptr || p.sched_piece == nullptr) {
      return cudaErrorInvalidValue;
    }
    if (p.num_seqs == 0 || p.num_tokens == 0 || p.num_heads == 0) return cudaSuccess;
    return narrow ? run_narrow_quantized(p, stream, took) : run_quantized(p, stream, took);
  }
  if (p.kv_format != kKv16 || !block_size_ok(p.block_size) || p.num_blocks < 1 ||
      (p.token_stride * 2) % 16 || (p.page_stride * 2) % 16 ||
      reinterpret_cast<uintptr_t>(p.kv_cache) % 16 || p.num_parts < 1 || p.num_parts > 65535 ||
      p.sched_cum == nullptr || p.sched_piece == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.num_seqs == 0 || p.num_tokens == 0 || p.num_heads == 0) return cudaSuccess;
  switch (p.q_dtype) {
    case kBF16:
      return run(p, stream, took, run_instance<__nv_bfloat16, kKv16, __nv_bfloat16, false>,
                 run_instance<__nv_bfloat16, kKv16, __nv_bfloat16, true>,
                 run_narrow<__nv_bfloat16>);
    case kFP16:
      return run(p, stream, took, run_instance<__half, kKv16, __half, false>,
                 run_instance<__half, kKv16, __half, true>, run_narrow<__half>);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sm90
}  // namespace portmla
