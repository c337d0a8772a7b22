// Hopper decode instantiation: the pair kernel, fp8_ds_mla cache on bf16 operands.
#include "launch_kernel.cuh"

namespace portmla {
namespace sm90 {

cudaError_t run_pair_dsmla(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream) {
  return launch_kernel(mla_decode_hopper_pair_kernel<__nv_bfloat16, kKvDsMla>, map, true, p, stream);
}

}  // namespace sm90
}  // namespace portmla
