// Host entry of the quantized-cache decode kernel (decode_quant.cu, quant_kernel.cuh).
#pragma once

#include <cuda_runtime.h>

#include "../../common/params.h"

namespace portmla {
namespace sm80 {

// Shared memory of the kernel for a quantized format (bytes).
int quant_smem_bytes(int kv_format);

// The decode kernel, on the schedule in p.sched_cum / p.sched_piece (the caller runs
// launch_decode_schedule before); *took as sm90::launch_decode's. cudaErrorInvalidValue for
// 16-bit caches and cache strides that are not multiples of 16 bytes.
cudaError_t launch_decode_quant(const DecodeParams& p, cudaStream_t stream,
                                int* took = nullptr);

}  // namespace sm80
}  // namespace portmla
