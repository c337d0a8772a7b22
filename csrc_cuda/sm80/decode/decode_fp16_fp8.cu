// One template instantiation per file so the build runs in parallel.
#include "decode_kernel.cuh"

namespace portmla {
namespace sm80 {
template cudaError_t run_decode<__half, kKvFp8>(const DecodeParams&, cudaStream_t);
}  // namespace sm80
}  // namespace portmla
