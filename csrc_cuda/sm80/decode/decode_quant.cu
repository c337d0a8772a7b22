// Launcher of the quantized-cache decode kernel (quant_kernel.cuh): fp8 / fp8_ds_mla caches,
// 16 rows per CTA, two cp.async stages (two CTAs per SM where shared memory allows), on the
// device schedule.
#include "../../common/persistent_launch.h"
#include "quant_kernel.cuh"
#include "quant_launch.h"

namespace portmla {
namespace sm80 {
namespace {

template <typename T, int FMT>
cudaError_t run(const DecodeParams& p, cudaStream_t stream, int* took) {
  return launch_scheduled<mla_decode_quant_kernel<T, FMT>>(
      quant::kQM, quant::kQThreads, quant::Layout<FMT, quant::kQStages>::kBytes, stream, p, took,
      kTakesNone);
}

}  // namespace

int quant_smem_bytes(int kv_format) {
  return kv_format == kKvDsMla ? quant::Layout<kKvDsMla, quant::kQStages>::kBytes
                               : quant::Layout<kKvFp8, quant::kQStages>::kBytes;
}

cudaError_t launch_decode_quant(const DecodeParams& p, cudaStream_t stream, int* took) {
  if (took != nullptr) *took = kTailOff;
  if ((p.kv_format != kKvFp8 && p.kv_format != kKvDsMla) || p.num_parts < 1 ||
      p.num_parts > 65535 || p.sched_cum == nullptr || p.sched_piece == nullptr ||
      (p.token_stride % 16) || (p.page_stride % 16) ||
      reinterpret_cast<uintptr_t>(p.kv_cache) % 16) {
    return cudaErrorInvalidValue;
  }
  if (p.num_seqs == 0 || p.num_tokens == 0 || p.num_heads == 0) return cudaSuccess;
  const bool bf16 = p.q_dtype == kBF16;
  if (p.kv_format == kKvFp8) {
    return bf16 ? run<__nv_bfloat16, kKvFp8>(p, stream, took)
                : run<__half, kKvFp8>(p, stream, took);
  }
  return bf16 ? run<__nv_bfloat16, kKvDsMla>(p, stream, took)
              : run<__half, kKvDsMla>(p, stream, took);
}

}  // namespace sm80
}  // namespace portmla
