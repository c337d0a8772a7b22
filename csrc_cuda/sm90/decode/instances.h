// The Hopper decode kernels' launch, one explicit instantiation per source (tile_*.cu,
// pair_*.cu; defined in launch_kernel.cuh) so the build compiles them in parallel;
// decode_hopper.cu picks one.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include "../../common/params.h"

namespace portmla {
namespace sm90 {

// kPair: the pair kernel mla_decode_hopper_pair_kernel<T, FMT, TQ>, else the single-tile
// kernel mla_decode_hopper_kernel<T> (FMT kKv16, TQ T). Instantiated: single-tile bf16 / fp16;
// pair bf16 / fp16 caches, fp8 on fp16 operands with bf16 / fp16 queries, fp8_ds_mla on fp16
// operands with bf16 queries.
// `map`: the TMA map of the cache (16-bit; fp8 / fp8_ds_mla as bytes when p.kv_tma, else
// unused), `q_map`: the queries' (used when p.q_tma). took: as launch_decode's.
template <typename T, int FMT, typename TQ, bool kPair>
cudaError_t run_instance(const CUtensorMap& map, const CUtensorMap& q_map, const DecodeParams& p,
                         cudaStream_t stream, int* took);

// The narrow kernel mla_decode_hopper_narrow_kernel<T> (16-bit caches, 16 rows a CTA; q_map
// unused).
template <typename T>
cudaError_t run_narrow(const CUtensorMap& map, const CUtensorMap& q_map, const DecodeParams& p,
                       cudaStream_t stream, int* took);

// The narrow kernel for quantized caches mla_decode_hopper_narrow_quant_kernel<TQ, FMT> (fp8 with
// bf16 / fp16 queries, fp8_ds_mla with bf16): `map` the raw entries' latent bytes (boxes of 128
// bytes, 128-byte swizzle), `tail_map` their bytes from 512 on (RoPE; fp8_ds_mla: scales first).
template <typename TQ, int FMT>
cudaError_t run_narrow_quant(const CUtensorMap& map, const CUtensorMap& tail_map,
                             const DecodeParams& p, cudaStream_t stream, int* took);

using RunKernel = cudaError_t (*)(const CUtensorMap& map, const CUtensorMap& q_map,
                                  const DecodeParams& p, cudaStream_t stream, int* took);

}  // namespace sm90
}  // namespace portmla
