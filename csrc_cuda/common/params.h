// Plain launch descriptions shared by the kernels and the binding. No torch here.
// Pointers are device pointers; strides are in elements of the tensor's storage dtype
// (bytes for fp8 / uint8 caches), 64-bit; sizes are ints.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace portmla {

// Element types crossing the binding (Python maps torch dtypes to these codes).
enum DType : int { kBF16 = 0, kFP16 = 1, kFP32 = 2, kFP8E4M3 = 3, kU8 = 4, kI32 = 5, kI64 = 6 };

// KV-cache formats (see portmla/kv_formats.py for the byte layouts).
enum KvFormat : int {
  kKv16 = 0,     // bf16 / fp16 values [kv_c | k_pe]; the dtype is given separately
  kKvFp8 = 1,    // e4m3fn values [kv_c | k_pe], one per-tensor scale
  kKvDsMla = 2,  // uint8: 512 e4m3fn | 4 fp32 tile scales | 64 bf16 rope (656 bytes)
};

// Absorbed MLA decode: out[t, h, :L] = softmax(q . kv^T * scale) . kv[:, :L].
struct DecodeParams {
  const void* q = nullptr;  // [T, H, L+R], q_dtype; last dim contiguous
  int64_t q_stride_t = 0, q_stride_h = 0;
  const void* kv_cache = nullptr;  // [num_blocks, block_size, entry]
  int64_t page_stride = 0, token_stride = 0;
  int64_t num_blocks = 0;  // pages in the cache (the Hopper kernel's TMA map bounds)
  int block_size = 0;
  const int32_t* block_table = nullptr;  // [B, max_blocks]
  int64_t bt_stride = 0;
  const int32_t* seq_lens = nullptr;         // [B]
  const int32_t* query_start_loc = nullptr;  // [B+1], or null: one token per sequence
  const float* k_scale = nullptr;            // [1], fp8 only
  void* out = nullptr;                       // [T, H, L], q_dtype
  int64_t out_stride_t = 0, out_stride_h = 0;
  float* lse = nullptr;  // [T, H] or null
  int64_t lse_stride_t = 0, lse_stride_h = 0;
  // Split partials: the outputs in q_dtype (their range is the output's; rounding them costs
  // about one more unit in the last place of the result), the LSEs in fp32.
  void* part_out = nullptr;   // [num_splits, T, H, L] scratch when num_splits > 1
  float* part_lse = nullptr;  // [num_splits, T, H] (scheduled: [slots, part_rows (, L)])
  int num_tokens = 0, num_seqs = 0, num_heads = 0, max_query_len = 1, num_splits = 1;
  int split_chunk = 0;  // KV positions per split when num_splits > 1 (split s: [s*chunk, (s+1)*chunk))
  int variant = 0;      // sm80::DecodeVariant: which tile shape runs (the caller plans splits for it)
  // Device-side schedule (the Hopper kernels; common/schedule.cuh): num_parts CTAs per row
  // tile share the work of all sequences evenly, computed from seq_lens on the device.
  int num_parts = 0;      // > 0: scheduled (num_splits / split_chunk unused)
  int sched_fixed = 1;    // a sequence's fixed cost in KV tiles (Q load, epilogue), >= 1
  int64_t* sched_cum = nullptr;    // [num_seqs + 2] scratch: cost prefix, then tiles per part
  int32_t* sched_piece = nullptr;  // [2 num_seqs] scratch: first partial slot (-1: one piece), pieces
  int32_t* sched_cut = nullptr;    // [1 + min(num_seqs, num_parts - 1)]: count, cut sequences
  int64_t part_rows = 0;  // rows per partial slot (>= max_query_len * num_heads); 2 (num_parts - 1) slots
  int kv_lora_rank = 512, rope_dim = 64;
  float softmax_scale = 1.f;
  int q_dtype = kBF16, kv_format = kKv16;
  int q_tma = 0;  // sm_90a launcher: the Hopper kernels load Q tiles through their q_map
  int kv_tma = 0;  // sm_90a launcher: the pair kernel loads fp8 caches' raw bytes through kv_map
  // Scheduled kernels: 1 asks the decode kernel to merge the cut sequences' pieces itself; the
  // launcher (common/persistent_launch.h) passes the kernel the way it takes (TailMerge), else 0
  // and runs the merge kernel after.
  int tail_merge = 0;
  // Piece counters of the last-piece merge (kTailArrive), one per sequence and 16-row tile:
  // [num_seqs x ceil(max_query_len num_heads / 16)] int32, zeroed by the schedule kernel on every
  // call. Null: that merge is not taken.
  int32_t* sched_arrive = nullptr;
  // 1: the 16-bit pair kernel may take kTailCount (persistent_launch.h: tail_count_taken).
  int tail_count = 0;
  // sm_90a kernels: the L2 eviction priority of the KV tiles' TMA loads (KvL2Hint).
  int kv_l2_hint = 0;
};

// DecodeParams::kv_l2_hint: the L2 eviction priority of the KV tiles' TMA loads in the narrow
// and single-tile Hopper kernels (the pair kernel always loads plainly). A KV tile that only one
// CTA reads (one row tile a sequence) is dead in L2 once loaded: evict_first leaves L2 to the
// tiles still in flight (H100, 16 heads: 1.5-3 % faster). Where several row tiles read each tile
// through L2 (128 heads) evict_first cost up to 11 %, and on the last row tile only up to 10 %.
// Sequences that share pages (a common prefix) read them once each: there kL2None may keep them
// in L2 between the readers.
enum KvL2Hint : int {
  kL2Auto = 0,   // evict_first when the grid has one row tile, else evict_normal
  kL2None = 1,   // evict_normal (the default priority)
  kL2First = 2,  // evict_first
  kL2Last = 3,   // evict_last
};

// DecodeParams::tail_merge as the kernel receives it.
enum TailMerge : int {
  kTailOff = 0,      // the merge kernel runs after the decode kernel (or nothing is cut)
  kTailBarrier = 1,  // every CTA merges a share of the rows after a grid-wide barrier
                     // (cooperative launch; sm80/decode/combine.cuh: merge_pieces_at_end)
  kTailArrive = 2,   // the CTA that stores a row tile's last piece merges its pieces (counters in
                     // sched_arrive; no barrier; the narrow Hopper kernels, schedule kernel runs)
  kTailCount = 3,    // the decode kernel counts each piece it stores in sched_arrive and lets the
                     // merge kernel launch at its start (programmatic dependent launch); the
                     // merge kernel merges a row tile once its count is complete, so most
                     // merges run while the last decode CTAs still do (the 16-bit pair kernel)
};

// concat_and_cache_mla: cache[slot] = quantize([kv_c[t] | k_pe[t]]).
struct CacheWriteParams {
  const void* kv_c = nullptr;  // [T, L]
  int64_t kv_c_stride = 0;
  int kv_c_dtype = kBF16;
  const void* k_pe = nullptr;  // [T, R]
  int64_t k_pe_stride = 0;
  int k_pe_dtype = kBF16;
  void* cache = nullptr;
  int64_t page_stride = 0, token_stride = 0;
  int block_size = 0;
  const void* slot_mapping = nullptr;  // [T] int32 or int64, -1 = skip
  int slot_dtype = kI32;
  const float* scale = nullptr;  // fp8 only
  int num_tokens = 0, kv_lora_rank = 512, rope_dim = 64;
  int kv_format = kKv16, cache_dtype = kBF16;
};

// gather_cache: out[cu[b] + i] = dequantize(cache[token starts[b] + i of sequence b]).
struct GatherParams {
  const void* cache = nullptr;
  int64_t page_stride = 0, token_stride = 0;
  int block_size = 0;
  const int32_t* block_table = nullptr;
  int64_t bt_stride = 0;
  const int32_t* seq_lens = nullptr;
  const int32_t* seq_starts = nullptr;  // or null
  const int32_t* cu_seq_lens = nullptr;  // [B+1]
  const float* scale = nullptr;
  void* out = nullptr;  // [total, L+R]
  int64_t out_stride = 0;
  int out_dtype = kBF16;
  int num_seqs = 0, max_seq_tokens = 0;  // max_seq_tokens: host upper bound of seq_lens
  int kv_lora_rank = 512, rope_dim = 64;
  int kv_format = kKv16, cache_dtype = kBF16;
};

// Launchers (defined in the .cu files). They return the first CUDA error.
cudaError_t launch_mla_decode(const DecodeParams& p, cudaStream_t stream);
cudaError_t launch_concat_and_cache_mla(const CacheWriteParams& p, cudaStream_t stream);
cudaError_t launch_gather_cache(const GatherParams& p, cudaStream_t stream);
// The TailMerge the last scheduled decode launch in this process took (tests read it).
int last_tail_merge();

}  // namespace portmla
