// Launcher of the Hopper decode kernel: encodes the TMA map of the paged cache (through the
// driver entry point the runtime hands out, so nothing links libcuda) and launches the
// bf16 / fp16 instantiation. Built for every arch; device code exists for sm_90a only.
#include <cuda.h>
#include <cuda_runtime.h>

#include <mutex>

#include "../../common/check.h"
#include "pair_kernel.cuh"
#include "launch.h"

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

// The cache as a 3-D tensor [num_blocks][block_size][576] (strides in bytes), boxes of
// 64 columns x min(block_size, 64) positions x 1 page, 128-byte swizzle.
cudaError_t encode_kv_map(const DecodeParams& p, CUtensorMap* map) {
  EncodeTiled fn = encode_fn();
  if (fn == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(sm80::kD),
                              static_cast<cuuint64_t>(p.block_size),
                              static_cast<cuuint64_t>(p.num_blocks)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.token_stride) * 2,
                                 static_cast<cuuint64_t>(p.page_stride) * 2};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(p.block_size < kBN ? p.block_size : kBN),
                             1};
  const cuuint32_t elem[3] = {1, 1, 1};
  const CUresult r = fn(map, p.q_dtype == kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                        3, const_cast<void*>(p.kv_cache), dims, strides, box, elem,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

bool block_size_ok(int bs) { return bs >= 16 && (kBN % bs == 0 || bs % kBN == 0); }

// The launch configuration of the pair kernel as a cluster of 2 along x (the row tiles).
struct ClusterLaunch {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[1];
  ClusterLaunch(dim3 grid, int smem, cudaStream_t stream) {
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kPairThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
};

int m_tiles_of(const DecodeParams& p) { return (p.max_query_len * p.num_heads + kBM - 1) / kBM; }

template <typename T>
cudaError_t run(const DecodeParams& p, cudaStream_t stream) {
  CUtensorMap map;
  PORTMLA_RETURN_IF_ERROR(encode_kv_map(p, &map));
  const bool pair = p.variant == sm80::kHopperPair;
  const int smem = decode_smem_bytes(pair);
  dim3 grid(m_tiles_of(p), p.num_parts);  // persistent: each CTA walks its part's segments
  if (pair && p.cluster) {
    auto kernel = mla_decode_hopper_pair_kernel<T, 2>;
    PORTMLA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    ClusterLaunch l(grid, smem, stream);
    PORTMLA_RETURN_IF_ERROR(cudaLaunchKernelEx(&l.cfg, kernel, map, p));
    return cudaSuccess;
  }
  auto kernel = pair ? mla_decode_hopper_pair_kernel<T, 1> : mla_decode_hopper_kernel<T>;
  PORTMLA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, pair ? kPairThreads : kThreads, smem, stream>>>(map, p);
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace

int decode_smem_bytes(bool pair) { return pair ? kPairSmemBytes : kSmemBytes; }

int max_parts(const DecodeParams& p) {
  if (!(p.variant == sm80::kHopperPair && p.cluster)) return 65535;
  // Clusters need both SMs in one GPC: ask how many fit at once so that no part waits for a
  // second wave (a persistent part that does would double the call's time).
  auto kernel = p.q_dtype == kBF16 ? mla_decode_hopper_pair_kernel<__nv_bfloat16, 2>
                                   : mla_decode_hopper_pair_kernel<__half, 2>;
  const int smem = decode_smem_bytes(true);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) !=
      cudaSuccess) {
    return 1;
  }
  ClusterLaunch l(dim3(m_tiles_of(p), 1), smem, nullptr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &l.cfg) != cudaSuccess || clusters < 1) {
    cudaGetLastError();
    return 1;
  }
  const int per_part = m_tiles_of(p) / 2;  // clusters of one part
  return clusters / per_part > 0 ? clusters / per_part : 1;
}

cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.cluster && (p.variant != sm80::kHopperPair || p.num_heads % 128 != 0)) {
    return cudaErrorInvalidValue;  // a cluster's two row tiles must be one query token's
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
      return run<__nv_bfloat16>(p, stream);
    case kFP16:
      return run<__half>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sm90
}  // namespace portmla
