// Hopper decode instantiation: the pair kernel, fp16 cache.
#include "launch_kernel.cuh"

namespace portmla {
namespace sm90 {

cudaError_t run_pair_fp16(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream) {
  return launch_kernel(mla_decode_hopper_pair_kernel<__half, kKv16>, map, true, p, stream);
}

}  // namespace sm90
}  // namespace portmla
