// Shared by the trace tools (pair_trace.cu, narrow_trace.cu): the decode parameters of B
// sequences of one query token, H heads, block 64 over device buffers the caller filled, and
// the device schedule's scratch for num_parts parts (partials sized for fp32, an upper bound).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../csrc_cuda/common/params.h"

inline void trace_params(portmla::DecodeParams& p, void* q, void* out, int* bt, int* lens, int B,
                         int H, int pages_per_seq, int64_t n_pages, int num_parts, int fixed) {
  p.q = q;
  p.q_stride_t = H * 576;
  p.q_stride_h = 576;
  p.num_blocks = n_pages;
  p.block_size = 64;
  p.block_table = bt;
  p.bt_stride = pages_per_seq;
  p.seq_lens = lens;
  p.out = out;
  p.out_stride_t = H * 512;
  p.out_stride_h = 512;
  p.num_tokens = B;
  p.num_seqs = B;
  p.num_heads = H;
  p.softmax_scale = 0.0417f;
  p.num_parts = num_parts;
  p.sched_fixed = fixed;
  p.part_rows = H;
  const size_t slots = 2 * static_cast<size_t>(num_parts - 1);
  cudaMalloc(&p.sched_cum, (2 * static_cast<size_t>(B) + 2) * 8);
  p.sched_piece = reinterpret_cast<int32_t*>(p.sched_cum + B + 2);
  cudaMalloc(&p.part_out, slots * H * 512 * 4);
  cudaMalloc(&p.part_lse, slots * H * 4);
  cudaMalloc(&p.sched_cut, (1 + static_cast<size_t>(B)) * 4);
}

// A device copy of a per-tensor fp8 scale.
inline const float* trace_k_scale(float ks) {
  float* d = nullptr;
  cudaMalloc(&d, 4);
  cudaMemcpy(d, &ks, 4, cudaMemcpyHostToDevice);
  return d;
}
