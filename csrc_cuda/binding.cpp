// portmla._cuda: a table of launch functions. Python fills the plain structs (pointers as
// ints, element strides, sizes) and passes the stream handle as an int; nothing here knows torch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/params.h"
#include "sm80/decode/config.h"
#include "sm80/decode/quant_launch.h"
#if defined(PORTMLA_HAVE_SM90A)
#include "sm90/decode/launch.h"
#endif

namespace py = pybind11;
using namespace portmla;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("portmla._cuda.") + what + ": " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
  }
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// A pointer field exposed to Python as an int.
#define PTR_FIELD(cls, Type, name)                                                              \
  def_property(                                                                                 \
      #name, [](const cls& o) { return reinterpret_cast<std::uintptr_t>(o.name); },           \
      [](cls& o, std::uintptr_t v) { o.name = reinterpret_cast<Type>(v); })
#define FIELD(cls, name) def_readwrite(#name, &cls::name)

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "portmla native CUDA kernels (launch table; see portmla/backends/cuda.py)";

  py::class_<DecodeParams>(m, "DecodeParams")
      .def(py::init<>())
      .PTR_FIELD(DecodeParams, const void*, q)
      .FIELD(DecodeParams, q_stride_t)
      .FIELD(DecodeParams, q_stride_h)
      .PTR_FIELD(DecodeParams, const void*, kv_cache)
      .FIELD(DecodeParams, page_stride)
      .FIELD(DecodeParams, token_stride)
      .FIELD(DecodeParams, num_blocks)
      .FIELD(DecodeParams, block_size)
      .PTR_FIELD(DecodeParams, const int32_t*, block_table)
      .FIELD(DecodeParams, bt_stride)
      .PTR_FIELD(DecodeParams, const int32_t*, seq_lens)
      .PTR_FIELD(DecodeParams, const int32_t*, query_start_loc)
      .PTR_FIELD(DecodeParams, const float*, k_scale)
      .PTR_FIELD(DecodeParams, void*, out)
      .FIELD(DecodeParams, out_stride_t)
      .FIELD(DecodeParams, out_stride_h)
      .PTR_FIELD(DecodeParams, float*, lse)
      .FIELD(DecodeParams, lse_stride_t)
      .FIELD(DecodeParams, lse_stride_h)
      .PTR_FIELD(DecodeParams, void*, part_out)
      .PTR_FIELD(DecodeParams, float*, part_lse)
      .FIELD(DecodeParams, num_tokens)
      .FIELD(DecodeParams, num_seqs)
      .FIELD(DecodeParams, num_heads)
      .FIELD(DecodeParams, max_query_len)
      .FIELD(DecodeParams, num_splits)
      .FIELD(DecodeParams, split_chunk)
      .FIELD(DecodeParams, variant)
      .FIELD(DecodeParams, num_parts)
      .FIELD(DecodeParams, sched_fixed)
      .FIELD(DecodeParams, tail_merge)
      .FIELD(DecodeParams, tail_count)
      .FIELD(DecodeParams, kv_l2_hint)
      .PTR_FIELD(DecodeParams, int32_t*, sched_arrive)
      .PTR_FIELD(DecodeParams, int64_t*, sched_cum)
      .PTR_FIELD(DecodeParams, int32_t*, sched_piece)
      .PTR_FIELD(DecodeParams, int32_t*, sched_cut)
      .FIELD(DecodeParams, part_rows)
      .FIELD(DecodeParams, kv_lora_rank)
      .FIELD(DecodeParams, rope_dim)
      .FIELD(DecodeParams, softmax_scale)
      .FIELD(DecodeParams, q_dtype)
      .FIELD(DecodeParams, kv_format);

  py::class_<CacheWriteParams>(m, "CacheWriteParams")
      .def(py::init<>())
      .PTR_FIELD(CacheWriteParams, const void*, kv_c)
      .FIELD(CacheWriteParams, kv_c_stride)
      .FIELD(CacheWriteParams, kv_c_dtype)
      .PTR_FIELD(CacheWriteParams, const void*, k_pe)
      .FIELD(CacheWriteParams, k_pe_stride)
      .FIELD(CacheWriteParams, k_pe_dtype)
      .PTR_FIELD(CacheWriteParams, void*, cache)
      .FIELD(CacheWriteParams, page_stride)
      .FIELD(CacheWriteParams, token_stride)
      .FIELD(CacheWriteParams, block_size)
      .PTR_FIELD(CacheWriteParams, const void*, slot_mapping)
      .FIELD(CacheWriteParams, slot_dtype)
      .PTR_FIELD(CacheWriteParams, const float*, scale)
      .FIELD(CacheWriteParams, num_tokens)
      .FIELD(CacheWriteParams, kv_lora_rank)
      .FIELD(CacheWriteParams, rope_dim)
      .FIELD(CacheWriteParams, kv_format)
      .FIELD(CacheWriteParams, cache_dtype);

  py::class_<GatherParams>(m, "GatherParams")
      .def(py::init<>())
      .PTR_FIELD(GatherParams, const void*, cache)
      .FIELD(GatherParams, page_stride)
      .FIELD(GatherParams, token_stride)
      .FIELD(GatherParams, block_size)
      .PTR_FIELD(GatherParams, const int32_t*, block_table)
      .FIELD(GatherParams, bt_stride)
      .PTR_FIELD(GatherParams, const int32_t*, seq_lens)
      .PTR_FIELD(GatherParams, const int32_t*, seq_starts)
      .PTR_FIELD(GatherParams, const int32_t*, cu_seq_lens)
      .PTR_FIELD(GatherParams, const float*, scale)
      .PTR_FIELD(GatherParams, void*, out)
      .FIELD(GatherParams, out_stride)
      .FIELD(GatherParams, out_dtype)
      .FIELD(GatherParams, num_seqs)
      .FIELD(GatherParams, max_seq_tokens)
      .FIELD(GatherParams, kv_lora_rank)
      .FIELD(GatherParams, rope_dim)
      .FIELD(GatherParams, kv_format)
      .FIELD(GatherParams, cache_dtype);

  m.def("mla_decode", [](const DecodeParams& p, std::uintptr_t stream) {
    check(launch_mla_decode(p, as_stream(stream)), "mla_decode");
  }, py::arg("params"), py::arg("stream"));
  // 0: the last scheduled decode call's cut sequences were merged by the merge kernel (or none
  // was cut), 1: by its CTAs after a grid-wide barrier, 2: each by the CTA of its last piece.
  m.def("last_tail_merge", &last_tail_merge);
  m.def("concat_and_cache_mla", [](const CacheWriteParams& p, std::uintptr_t stream) {
    check(launch_concat_and_cache_mla(p, as_stream(stream)), "concat_and_cache_mla");
  }, py::arg("params"), py::arg("stream"));
  m.def("gather_cache", [](const GatherParams& p, std::uintptr_t stream) {
    check(launch_gather_cache(p, as_stream(stream)), "gather_cache");
  }, py::arg("params"), py::arg("stream"));

  // Facts the Python side builds its capability data from (so they cannot drift).
  m.attr("DECODE_TILE_ROWS") = sm80::kBM;
  m.attr("DECODE_TILE_TOKENS") = sm80::kBN;
  m.attr("DECODE_SMEM_BYTES") = sm80::decode_smem_bytes();
  // Decode variants: name -> (code, rows per CTA, tokens per tile, shared memory for 16-bit
  // caches, for fp8 caches, threads per CTA).
  {
    py::dict v;
    v["legacy"] = py::make_tuple(int(sm80::kLegacy), sm80::kBM, sm80::kBN, sm80::decode_smem_bytes(),
                                 sm80::decode_smem_bytes(), sm80::kThreads);
    v["narrow"] = py::make_tuple(int(sm80::kNarrow), sm80::NarrowCfg::kBM, sm80::NarrowCfg::kBN,
                                 sm80::NarrowCfg::smem_bytes(true), sm80::NarrowCfg::smem_bytes(false),
                                 sm80::NarrowCfg::kThreads);
    v["wide"] = py::make_tuple(int(sm80::kWide), sm80::WideCfg::kBM, sm80::WideCfg::kBN,
                               sm80::WideCfg::smem_bytes(true), sm80::WideCfg::smem_bytes(false),
                               sm80::WideCfg::kThreads);
    // fp8 / fp8_ds_mla only (16-bit entry 0: not taken); the fp8 entry is fp8_ds_mla's, the larger
    v["quant"] = py::make_tuple(int(sm80::kQuant), sm80::kQuantRows, sm80::kQuantTokens, 0,
                                sm80::quant_smem_bytes(kKvDsMla), sm80::kQuantThreads);
#if defined(PORTMLA_HAVE_SM90A)
    // shared memory for 16-bit caches (the pair kernel's is the same for fp8 / fp8_ds_mla,
    // HOPPER_QUANT_FORMATS; the fp8 entry 0 keeps the generic planner off it)
    v["hopper"] = py::make_tuple(int(sm80::kHopperPair), 64, 64, sm90::decode_smem_bytes(true), 0, 256);
    v["hopper_tile"] = py::make_tuple(int(sm80::kHopper), 64, 64, sm90::decode_smem_bytes(false), 0, 256);
    v["hopper_narrow"] = py::make_tuple(int(sm80::kHopperNarrow), 16, 64, sm90::narrow_smem_bytes(), 0, 128);
    // fp8 / fp8_ds_mla only; the fp8 entry is fp8_ds_mla's, the larger (two CTAs an SM)
    v["hopper_narrow_quant"] = py::make_tuple(int(sm80::kHopperNarrowQuant), 16, 64, 0,
                                              sm90::narrow_quant_smem_bytes(kKvDsMla), 128);
#endif
    m.attr("DECODE_VARIANTS") = v;
  }
  {  // quantized-cache kernel: format -> shared memory (bytes)
    py::dict q;
    q["fp8"] = sm80::quant_smem_bytes(kKvFp8);
    q["fp8_ds_mla"] = sm80::quant_smem_bytes(kKvDsMla);
    m.attr("DECODE_QUANT_SMEM") = q;
  }
  m.attr("DECODE_KV_LORA_RANK") = sm80::kL;
  m.attr("DECODE_ROPE_DIM") = sm80::kR;
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  m.attr("CUDA_RUNTIME_VERSION") = rt;
  m.attr("BUILT_ARCHS") = PORTMLA_ARCHS;
#if defined(PORTMLA_HAVE_SM90A)
  m.attr("HOPPER_NOT_BUILT") = py::none();
  // Quantized caches the pair kernel takes (its producer warpgroup copies raw entries, its
  // consumers expand them) and the query dtypes of each: fp8 runs on fp16 operands (queries
  // scaled per row), fp8_ds_mla on bf16.
  m.attr("HOPPER_QUANT_FORMATS") = py::make_tuple("fp8", "fp8_ds_mla");
  py::dict hq;
  hq["fp8"] = py::make_tuple("bfloat16", "float16");
  hq["fp8_ds_mla"] = py::make_tuple("bfloat16");
  m.attr("HOPPER_QUANT_QUERY_DTYPES") = hq;
#else
  m.attr("HOPPER_NOT_BUILT") = PORTMLA_SM90A_WHY;
#endif
}
