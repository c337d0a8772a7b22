// One launcher per instantiation of the Hopper decode kernels, each defined in its own source
// (tile_*.cu, pair_*.cu) so the build compiles them in parallel; decode_hopper.cu picks one.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include "../../common/params.h"

namespace portmla {
namespace sm90 {

// `map`: the TMA map of a 16-bit cache (unused by the converting fp8 / fp8_ds_mla kernels).
using RunKernel = cudaError_t (*)(const CUtensorMap& map, const DecodeParams& p,
                                  cudaStream_t stream);

cudaError_t run_tile_bf16(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream);
cudaError_t run_tile_fp16(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream);
cudaError_t run_pair_bf16(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream);
cudaError_t run_pair_fp16(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream);
// fp8 on fp16 operands, bf16 / fp16 queries; fp8_ds_mla on bf16, bf16 queries.
cudaError_t run_pair_fp8_bf16q(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream);
cudaError_t run_pair_fp8_fp16q(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream);
cudaError_t run_pair_dsmla(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream);

}  // namespace sm90
}  // namespace portmla
