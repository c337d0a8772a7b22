// launch_mla_decode: picks the instantiation for (q dtype, cache format) and checks the call;
// the scheduled variants (the sm_90a Hopper kernels, the quantized-cache kernel) run the device
// schedule, the decode kernel and the pieces' merge.
#include "../../common/persistent_launch.h"
#include "../../common/schedule.cuh"
#include "decode_kernel.cuh"
#include "quant_launch.h"
#if defined(PORTMLA_HAVE_SM90A)
#include "../../sm90/decode/launch.h"
#endif

namespace portmla {
namespace {

// Device schedule -> decode (persistent parts) -> merge of the sequences cut into pieces (by the
// decode kernel itself when it could take p.tail_merge, else by a merge kernel).
template <class Decode>
cudaError_t run_scheduled(const DecodeParams& p, cudaStream_t stream, Decode decode) {
  if (p.num_parts < 1 || !p.part_out || !p.part_lse ||
      p.part_rows < static_cast<int64_t>(p.max_query_len) * p.num_heads) {
    return cudaErrorInvalidValue;
  }
  if (p.num_seqs == 0 || p.num_tokens == 0 || p.num_heads == 0) return cudaSuccess;
  // Small batches: the decode kernel computes the schedule itself (common/schedule.cuh).
  if (!sched_inline(p)) PORTMLA_RETURN_IF_ERROR(launch_decode_schedule(p, stream));
  int took = kTailOff;  // the TailMerge the decode kernel took
  PORTMLA_RETURN_IF_ERROR(decode(p, stream, &took));
  // Nothing is ever cut, or the decode kernel merged the pieces itself.
  if (p.num_parts == 1 || (took != kTailOff && took != kTailCount)) return cudaSuccess;
  const bool counted = took == kTailCount;  // the merge kernel polls the pair kernel's counts
  return p.q_dtype == kBF16
             ? sm80::launch_decode_combine_pieces<__nv_bfloat16>(p, stream, counted)
             : sm80::launch_decode_combine_pieces<__half>(p, stream, counted);
}

}  // namespace

int last_tail_merge() { return g_last_tail_merge.load(std::memory_order_relaxed); }

cudaError_t launch_mla_decode(const DecodeParams& p, cudaStream_t stream) {
  g_last_tail_merge.store(kTailOff, std::memory_order_relaxed);  // set again by a scheduled launch
  if (p.kv_lora_rank != sm80::kL || p.rope_dim != sm80::kR || p.num_splits < 1 ||
      p.max_query_len < 1 || p.block_size < 1 || (p.num_splits > 1 && (!p.part_out || !p.part_lse)) ||
      (p.kv_format == kKvFp8 && p.k_scale == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool bf16 = p.q_dtype == kBF16;
  if (!bf16 && p.q_dtype != kFP16) return cudaErrorInvalidValue;
  if (p.variant == sm80::kHopper || p.variant == sm80::kHopperPair ||
      p.variant == sm80::kHopperNarrow || p.variant == sm80::kHopperNarrowQuant) {
#if defined(PORTMLA_HAVE_SM90A)
    return run_scheduled(p, stream, sm90::launch_decode);
#else
    return cudaErrorNotSupported;
#endif
  }
  if (p.variant == sm80::kQuant) {
    return run_scheduled(p, stream, sm80::launch_decode_quant);
  }
  switch (p.kv_format) {
    case kKv16:
      return bf16 ? sm80::run_decode<__nv_bfloat16, kKv16>(p, stream)
                  : sm80::run_decode<__half, kKv16>(p, stream);
    case kKvFp8:
      return bf16 ? sm80::run_decode<__nv_bfloat16, kKvFp8>(p, stream)
                  : sm80::run_decode<__half, kKvFp8>(p, stream);
    case kKvDsMla:
      return bf16 ? sm80::run_decode<__nv_bfloat16, kKvDsMla>(p, stream)
                  : sm80::run_decode<__half, kKvDsMla>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace portmla
