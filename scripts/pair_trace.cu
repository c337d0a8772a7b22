// Timeline of one CTA of the Hopper pair kernel (clock64 at the schedule's events), on the
// 128q1s4k h128 shape with fixed lengths (part PORTMLA_PAIR_TRACE of the device schedule;
// pairs counted over its segments). GPU machine:
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -DPORTMLA_HAVE_SM90A=1 \
//     -DPORTMLA_PAIR_TRACE=10 -Icsrc_cuda -I$PORTMLA_CUTLASS_INCLUDE scripts/pair_trace.cu -o /tmp/pt
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_bf16.h>

#include "../csrc_cuda/sm80/decode/schedule.cu"
#include "../csrc_cuda/sm90/decode/decode_hopper.cu"

int main(int argc, char** argv) {
  const int B = 128, H = 128, S = argc > 1 ? atoi(argv[1]) : 4096, BS = 64, D = 576;
  const int pages_per_seq = S / BS;
  const size_t n_cache = static_cast<size_t>(B) * pages_per_seq * BS * D;
  std::vector<__nv_bfloat16> h_cache(n_cache), h_q(static_cast<size_t>(B) * H * D);
  srand(1);
  for (auto& x : h_cache) x = __float2bfloat16((rand() % 2001 - 1000) / 1000.f);
  for (auto& x : h_q) x = __float2bfloat16((rand() % 2001 - 1000) / 1000.f);
  std::vector<int> bt(static_cast<size_t>(B) * pages_per_seq), lens(B, S);
  for (size_t i = 0; i < bt.size(); ++i) bt[i] = static_cast<int>((i * 7919) % bt.size());
  void *d_cache, *d_q, *d_out;
  int *d_bt, *d_lens;
  cudaMalloc(&d_cache, n_cache * 2);
  cudaMalloc(&d_q, h_q.size() * 2);
  cudaMalloc(&d_out, static_cast<size_t>(B) * H * 512 * 2);
  cudaMalloc(&d_bt, bt.size() * 4);
  cudaMalloc(&d_lens, B * 4);
  cudaMemcpy(d_cache, h_cache.data(), n_cache * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(d_q, h_q.data(), h_q.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(d_bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_lens, lens.data(), B * 4, cudaMemcpyHostToDevice);
  portmla::DecodeParams p;
  p.q = d_q;
  p.q_stride_t = H * D;
  p.q_stride_h = D;
  p.kv_cache = d_cache;
  p.page_stride = BS * D;
  p.token_stride = D;
  p.num_blocks = B * pages_per_seq;
  p.block_size = BS;
  p.block_table = d_bt;
  p.bt_stride = pages_per_seq;
  p.seq_lens = d_lens;
  p.out = d_out;
  p.out_stride_t = H * 512;
  p.out_stride_h = 512;
  p.num_tokens = B;
  p.num_seqs = B;
  p.num_heads = H;
  p.softmax_scale = 0.0417f;
  p.variant = portmla::sm80::kHopperPair;
  p.num_parts = 66;  // 132 SMs / 2 row tiles
  p.sched_fixed = 4;
  p.part_rows = H;
  const int slots = 2 * (p.num_parts - 1);
  cudaMalloc(&p.sched_cum, (2 * B + 2) * 8);
  p.sched_piece = reinterpret_cast<int32_t*>(p.sched_cum + B + 2);
  cudaMalloc(&p.part_out, static_cast<size_t>(slots) * H * 512 * 4);
  cudaMalloc(&p.part_lse, static_cast<size_t>(slots) * H * 4);
  portmla::launch_decode_schedule(p, 0);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (int i = 0; i < 3; ++i) portmla::sm90::launch_decode(p, 0);
  cudaEventRecord(e0);
  cudaError_t err = portmla::sm90::launch_decode(p, 0);
  cudaEventRecord(e1);
  cudaEventSynchronize(e1);
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  printf("launch %s, %.1f us, last error %s\n", cudaGetErrorString(err), ms * 1000,
         cudaGetErrorString(cudaGetLastError()));
  static long long tr[2][64][12];
  cudaMemcpyFromSymbol(tr, portmla::sm90::g_pair_trace, sizeof(tr));
  const long long t0 = tr[0][0][0];
  const char* names[2][11] = {{"start", "own", "other", "S", "arrA", "syncB", "PV0L", "PV1Li", "PV1L"},
                             {"start", "own", "other", "S", "syncA", "arrB", "PV0R", "PV1R", "stored", "fenced", "m_b"}};
  const int np = S / 128;
  for (int pi = 0; pi < np; ++pi) {
    if (pi > 4 && pi < np - 3 && pi % 8) continue;
    for (int w = 0; w < 2; ++w) {
      printf("pair %2d wg%d:", pi, w);
      for (int e = 0; e < (w ? 11 : 9); ++e) printf(" %s=%lld", names[w][e], tr[w][pi][e] - t0);
      printf("\n");
    }
  }
  // steady-state mean durations (pairs 4 .. np - 2)
  double per_pair = 0;
  for (int pi = 4; pi < np - 2; ++pi) per_pair += tr[0][pi + 1][0] - tr[0][pi][0];
  printf("mean pair cycles (wg0 start to start) %.0f\n", per_pair / (np - 6));
  for (int w = 0; w < 2; ++w) {
    printf("wg%d mean phase cycles:", w);
    for (int e = 1; e < (w ? 11 : 9); ++e) {
      double d = 0;
      const int prev = w == 1 && e == 8 ? 10 : w == 1 && e == 10 ? 4 : e - 1;
      for (int pi = 4; pi < np - 2; ++pi) d += tr[w][pi][e] - tr[w][pi][prev];
      printf(" %s=%.0f", names[w][e], d / (np - 6));
    }
    printf("\n");
  }
  return 0;
}
