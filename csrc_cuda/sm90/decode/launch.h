// Host entry of the Hopper decode kernels (defined in decode_hopper.cu).
#pragma once

#include <cuda_runtime.h>

#include "../../common/params.h"

namespace portmla {
namespace sm90 {

// Shared memory of the pair / single-tile kernel (bytes, including alignment slack).
int decode_smem_bytes(bool pair);
// The narrow kernel's (16 rows a CTA, 16-bit caches).
int narrow_smem_bytes();
// The narrow quantized kernel's with a kv_format (kKvFp8 / kKvDsMla) cache.
int narrow_quant_smem_bytes(int kv_format);

// The decode kernel, on the schedule in p.sched_cum / p.sched_piece (the caller runs
// launch_decode_schedule before). *took (when given): the TailMerge the kernel took (params.h;
// p.tail_merge granted): kTailOff or kTailCount, the caller runs the pieces' merge after (polling
// the counts for kTailCount), else the kernel merges them itself.
// cudaErrorInvalidValue for what the kernel does not take (non-16-bit formats, block sizes
// other than 16, 32, 64 * k, unaligned strides); the driver's TMA encoder missing:
// cudaErrorNotSupported. Compiled only when PORTMLA_HAVE_SM90A (CuTe headers found).
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream, int* took = nullptr);

}  // namespace sm90
}  // namespace portmla
