// The definition behind instances.h (included by the instantiating sources only).
#pragma once

#include "../../common/check.h"
#include "../../common/persistent_launch.h"
#include "instances.h"
#include "launch.h"
#include "narrow_kernel.cuh"
#include "pair_kernel.cuh"

namespace portmla {
namespace sm90 {

// The chosen kernel only (if constexpr: the other one is not instantiated here).
template <typename T, int FMT, typename TQ, bool kPair>
constexpr auto kernel_of() {
  if constexpr (kPair) {
    return mla_decode_hopper_pair_kernel<T, FMT, TQ>;
  } else {
    return mla_decode_hopper_kernel<T>;
  }
}

template <typename T, int FMT, typename TQ, bool kPair>
cudaError_t run_instance(const CUtensorMap& map, const CUtensorMap& q_map, const DecodeParams& p,
                         cudaStream_t stream, bool* merged) {
  const int smem = decode_smem_bytes(kPair);
  constexpr auto kernel = kernel_of<T, FMT, TQ, kPair>();
  PORTMLA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int m_tiles = (p.max_query_len * p.num_heads + kBM - 1) / kBM;
  dim3 grid(m_tiles, p.num_parts);  // persistent: each CTA walks its part's segments
  PORTMLA_RETURN_IF_ERROR(launch_persistent<kernel>(grid, kPair ? kPairThreads : kThreads, smem,
                                                    stream, p, merged, map, q_map));
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename T>
cudaError_t run_narrow(const CUtensorMap& map, const CUtensorMap& q_map, const DecodeParams& p,
                       cudaStream_t stream, bool* merged) {
  constexpr auto kernel = mla_decode_hopper_narrow_kernel<T>;
  PORTMLA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kNarrowSmemBytes));
  const int m_tiles = (p.max_query_len * p.num_heads + kNM - 1) / kNM;
  dim3 grid(m_tiles, p.num_parts);  // persistent: each CTA walks its part's segments
  PORTMLA_RETURN_IF_ERROR(launch_persistent<kernel>(grid, kNThreads, kNarrowSmemBytes, stream, p,
                                                    merged, map, q_map));
  PORTMLA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace sm90
}  // namespace portmla
