// The definition behind instances.h (included by the instantiating sources only).
#pragma once

#include "../../common/persistent_launch.h"
#include "instances.h"
#include "launch.h"
#include "narrow_kernel.cuh"
#include "narrow_quant_kernel.cuh"
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
                         cudaStream_t stream, int* took) {
  static_assert(kBM == kCountRows, "the merge kernel's counters: one per 64-row tile");
  // The 16-bit pair kernel counts its pieces for the merge kernel (kTailCount).
  constexpr int kTakes = kPair && FMT == kKv16 ? kTakesCount : kTakesNone;
  return launch_scheduled<kernel_of<T, FMT, TQ, kPair>()>(
      kBM, kPair ? kPairThreads : kThreads, decode_smem_bytes(kPair), stream, p, took, kTakes,
      map, q_map);
}

template <typename T>
cudaError_t run_narrow(const CUtensorMap& map, const CUtensorMap& q_map, const DecodeParams& p,
                       cudaStream_t stream, int* took) {
  return launch_scheduled<mla_decode_hopper_narrow_kernel<T>>(kNM, kNThreads, kNarrowSmemBytes,
                                                              stream, p, took, kTakesArrive,
                                                              map, q_map);
}

template <typename TQ, int FMT>
cudaError_t run_narrow_quant(const CUtensorMap& map, const CUtensorMap& tail_map,
                             const DecodeParams& p, cudaStream_t stream, int* took) {
  return launch_scheduled<mla_decode_hopper_narrow_quant_kernel<TQ, FMT>>(
      kNM, kNThreads, narrow_quant_smem_bytes<FMT>(), stream, p, took, kTakesArrive, map,
      tail_map);
}

}  // namespace sm90
}  // namespace portmla
