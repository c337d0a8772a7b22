// The launch of one Hopper decode kernel instantiation (included by its own source only).
#pragma once

#include "../../common/check.h"
#include "instances.h"
#include "pair_kernel.cuh"

namespace portmla {
namespace sm90 {

template <typename Kernel>
inline cudaError_t launch_kernel(Kernel kernel, const CUtensorMap& map, bool pair,
                                 const DecodeParams& p, cudaStream_t stream) {
  const int smem = pair ? kPairSmemBytes : kSmemBytes;
  PORTMLA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int m_tiles = (p.max_query_len * p.num_heads + kBM - 1) / kBM;
  dim3 grid(m_tiles, p.num_parts);  // persistent: each CTA walks its part's segments
  kernel<<<grid, pair ? kPairThreads : kThreads, smem, stream>>>(map, p);
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace sm90
}  // namespace portmla
