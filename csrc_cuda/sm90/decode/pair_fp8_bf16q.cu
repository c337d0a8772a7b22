// Hopper decode instantiation: the pair kernel, fp8 cache on fp16 operands, bf16 queries.
#include "launch_kernel.cuh"

namespace portmla {
namespace sm90 {

cudaError_t run_pair_fp8_bf16q(const CUtensorMap& map, const DecodeParams& p, cudaStream_t stream) {
  return launch_kernel(mla_decode_hopper_pair_kernel<__half, kKvFp8, __nv_bfloat16>, map, true, p, stream);
}

}  // namespace sm90
}  // namespace portmla
