// One template instantiation per file so the build runs in parallel.
#include "launch_kernel.cuh"

namespace portmla {
namespace sm90 {
template cudaError_t run_narrow_quant<__half, kKvFp8>(const CUtensorMap&, const CUtensorMap&, const DecodeParams&, cudaStream_t, int*);
}  // namespace sm90
}  // namespace portmla
