// Hopper decode instantiation: the single-tile kernel, fp16.
#include "launch_kernel.cuh"

namespace portmla {
namespace sm90 {

cudaError_t run_tile_fp16(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream) {
  return launch_kernel(mla_decode_hopper_kernel<__half>, map, false, p, stream);
}

}  // namespace sm90
}  // namespace portmla
