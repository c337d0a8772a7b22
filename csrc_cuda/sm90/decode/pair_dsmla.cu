// One template instantiation per file so the build runs in parallel.
#include "launch_kernel.cuh"

namespace portmla {
namespace sm90 {
template cudaError_t run_instance<__half, kKvDsMla, __nv_bfloat16, true>(const CUtensorMap&, const CUtensorMap&, const DecodeParams&, cudaStream_t, int*);
}  // namespace sm90
}  // namespace portmla
