// Timeline of one CTA of the Hopper pair kernel (clock64 at the schedule's events), on the
// 128q1s4k h128 shape with fixed lengths (part PORTMLA_PAIR_TRACE of the device schedule;
// pairs counted over its segments). `pt S fp8 ...`: an fp8 cache (block 64: raw boxes through
// TMA, expanded by the consumers; the copying producer's fill jobs are printed only where it
// ran); `pt S fp8|bf16 B sched_fixed`: B sequences, the schedule's fixed cost (the kernel's
// portmla.backends.cuda.SCHED_FIXED entry), and the CTA's prologue / epilogue spans
// (globaltimer). GPU machine:
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -DPORTMLA_HAVE_SM90A=1 \
//     -DPORTMLA_PAIR_TRACE=10 -Icsrc_cuda -I$PORTMLA_CUTLASS_INCLUDE scripts/pair_trace.cu -o /tmp/pt
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>

#include "../csrc_cuda/sm80/decode/schedule.cu"
#include "../csrc_cuda/sm90/decode/decode_hopper.cu"
#include "../csrc_cuda/sm90/decode/pair_bf16.cu"
#include "../csrc_cuda/sm90/decode/pair_dsmla.cu"
#include "../csrc_cuda/sm90/decode/pair_fp16.cu"
#include "../csrc_cuda/sm90/decode/pair_fp8_bf16q.cu"
#include "../csrc_cuda/sm90/decode/pair_fp8_fp16q.cu"
#include "../csrc_cuda/sm90/decode/tile_bf16.cu"
#include "../csrc_cuda/sm90/decode/tile_fp16.cu"
#include "trace_params.h"

int main(int argc, char** argv) {
  if (argc < 5) {  // the fixed cost is the cuda backend's, not a copy of it here
    fprintf(stderr, "usage: pt S fp8|bf16 B sched_fixed; sched_fixed: the pair kernel's "
                    "portmla.backends.cuda.SCHED_FIXED entry (hopper, or hopper_quant for fp8_ds_mla)\n");
    return 2;
  }
  const int B = atoi(argv[3]), H = 128, S = atoi(argv[1]);
  const int BS = 64, D = 576;
  const bool fp8 = strcmp(argv[2], "fp8") == 0;
  const int eb = fp8 ? 1 : 2;  // bytes per cache element
  const int pages_per_seq = S / BS;
  const size_t n_cache = static_cast<size_t>(B) * pages_per_seq * BS * D;
  std::vector<__nv_bfloat16> h_cache(n_cache), h_q(static_cast<size_t>(B) * H * D);
  srand(1);
  for (auto& x : h_cache) x = __float2bfloat16((rand() % 2001 - 1000) / 1000.f);
  if (fp8) {  // e4m3 bytes of magnitude < 1 (exponent field <= 6: never NaN)
    unsigned char* b = reinterpret_cast<unsigned char*>(h_cache.data());
    for (size_t i = 0; i < n_cache; ++i) b[i] = static_cast<unsigned char>(rand() & 0xb7);
  }
  for (auto& x : h_q) x = __float2bfloat16((rand() % 2001 - 1000) / 1000.f);
  std::vector<int> bt(static_cast<size_t>(B) * pages_per_seq), lens(B, S);
  for (size_t i = 0; i < bt.size(); ++i) bt[i] = static_cast<int>((i * 7919) % bt.size());
  void *d_cache, *d_q, *d_out;
  int *d_bt, *d_lens;
  cudaMalloc(&d_cache, n_cache * eb);
  cudaMalloc(&d_q, h_q.size() * 2);
  cudaMalloc(&d_out, static_cast<size_t>(B) * H * 512 * 2);
  cudaMalloc(&d_bt, bt.size() * 4);
  cudaMalloc(&d_lens, B * 4);
  cudaMemcpy(d_cache, h_cache.data(), n_cache * eb, cudaMemcpyHostToDevice);
  cudaMemcpy(d_q, h_q.data(), h_q.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(d_bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_lens, lens.data(), B * 4, cudaMemcpyHostToDevice);
  portmla::DecodeParams p;
  trace_params(p, d_q, d_out, d_bt, d_lens, B, H, pages_per_seq, B * pages_per_seq,
               66 /* 132 SMs / 2 row tiles */, atoi(argv[4]));
  p.kv_cache = d_cache;
  p.page_stride = BS * D;  // elements (bytes for fp8)
  p.token_stride = D;
  if (fp8) {
    p.kv_format = portmla::kKvFp8;
    p.k_scale = trace_k_scale(0.02f);
  }
  p.variant = portmla::sm80::kHopperPair;
  const cudaError_t serr = portmla::launch_decode_schedule(p, 0);
  if (serr != cudaSuccess) {
    printf("schedule: %s\n", cudaGetErrorString(serr));
    return 1;
  }
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  // PT_TAIL=1: the decode kernel merges the pieces itself (cooperative launch), as the module
  // does by default; else the kernel alone (its pieces left unmerged).
  p.tail_merge = getenv("PT_TAIL") != nullptr && atoi(getenv("PT_TAIL")) == 1;
  int took = portmla::kTailOff;  // tail_count stays 0: never kTailCount here
  for (int i = 0; i < 3; ++i) portmla::sm90::launch_decode(p, 0, &took);
  cudaEventRecord(e0);
  cudaError_t err = portmla::sm90::launch_decode(p, 0, &took);
  const bool merged = took != portmla::kTailOff;
  printf("tail merge %s\n", merged ? "in the kernel" : "off");
  cudaEventRecord(e1);
  cudaEventSynchronize(e1);
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  printf("launch %s, %.1f us, last error %s\n", cudaGetErrorString(err), ms * 1000,
         cudaGetErrorString(cudaGetLastError()));
  {  // every CTA: entry and consumers' end (globaltimer), us after the first entry
    static unsigned long long cta[2][256][4];
    cudaMemcpyFromSymbol(cta, portmla::sm90::g_pair_cta, sizeof(cta));
    const int parts = std::min(p.num_parts, 256);
    unsigned long long t0c = ~0ull;
    for (int m = 0; m < 2; ++m)
      for (int k = 0; k < parts; ++k) t0c = std::min(t0c, cta[m][k][0]);
    const char* ev_names[4] = {"entry", "decode end", "past barrier", "merged"};
    for (int ev = 0; ev < 4; ++ev) {
      std::vector<double> v;
      for (int m = 0; m < 2; ++m)
        for (int k = 0; k < parts; ++k)
          if (cta[m][k][ev]) v.push_back((cta[m][k][ev] - t0c) / 1e3);
      if (v.empty()) continue;
      std::sort(v.begin(), v.end());
      printf("cta %s us: min %.2f p10 %.2f median %.2f p90 %.2f max %.2f\n", ev_names[ev], v[0],
             v[v.size() / 10], v[v.size() / 2], v[v.size() * 9 / 10], v.back());
    }
  }
  static long long tr[2][64][12];
  cudaMemcpyFromSymbol(tr, portmla::sm90::g_pair_trace, sizeof(tr));
  const long long t0 = tr[0][0][0];
  const char* names[2][11] = {{"start", "own", "other", "S", "arrA", "syncB", "PV0L", "PV1Li", "PV1L"},
                             {"start", "own", "other", "S", "syncA", "arrB", "PV0R", "PV1R", "stored", "fenced", "m_b"}};
  // pairs of the traced part: one segment's worth, at most what its units hold
  const int units = static_cast<int>((static_cast<int64_t>(B) * (S / 64 + p.sched_fixed) +
                                      p.num_parts - 1) / p.num_parts);
  const int np = std::min(std::min(S / 128, units / 2), 64);
  static unsigned long long span[3][8][10];
  static long long span_clk[3][8][10];
  cudaMemcpyFromSymbol(span, portmla::sm90::g_pair_span, sizeof(span));
  cudaMemcpyFromSymbol(span_clk, portmla::sm90::g_pair_span_clk, sizeof(span_clk));
  const char* span_names[10] = {"entry", "q_loaded|pages", "q_ready", "pairs_done", "stored",
                                "first_data", "last_data", "walked", "sums_shared", "rows_stored"};
  for (int w = 0; w < 3; ++w) {
    for (int sg = 0; sg < 8; ++sg) {
      bool any = false;
      for (int e = 0; e < 10; ++e) any = any || span[w][sg][e];
      if (!any) continue;
      printf("span wg%d seg %d (ns from wg0 entry):", w, sg);
      for (int e = 0; e < 10; ++e)
        if (span[w][sg][e]) printf(" %s=%lld", span_names[e], (long long)(span[w][sg][e] - span[0][0][0]));
      printf("\n");
    }
  }
  {  // the SM clock over the CTA's consumer life (wg0: entry -> last segment stored)
    int last = 0;
    for (int sg = 0; sg < 8; ++sg) if (span[0][sg][4]) last = sg;
    const double ns = static_cast<double>(span[0][last][4] - span[0][0][0]);
    const double clk = static_cast<double>(span_clk[0][last][4] - span_clk[0][0][0]);
    if (ns > 0) printf("sm clock %.0f MHz over %.1f us\n", clk / ns * 1e3, ns / 1e3);
  }
  for (int pi = 0; pi < np; ++pi) {
    if (pi > 4 && pi < np - 3 && pi % 8) continue;
    for (int w = 0; w < 2; ++w) {
      printf("pair %2d wg%d:", pi, w);
      for (int e = 0; e < (w ? 11 : 9); ++e) printf(" %s=%lld", names[w][e], tr[w][pi][e] - t0);
      printf("\n");
    }
  }
  // steady-state mean durations (pairs 4 .. np - 2)
  if (np < 8) return 0;  // too few pairs for a steady state (small batches: the spans above)
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
  static long long ft[256][7];
  if (fp8) cudaMemcpyFromSymbol(ft, portmla::sm90::g_fill_trace, sizeof(ft));
  // Producer fill jobs (4 a pair, in release order): waits and issue times. Only the copying
  // producer records them; block 64 here takes the TMA producer (raw boxes), which does not.
  if (fp8 && ft[0][0] != 0) {
    for (int j = 0; j < 4 * np && j < 256; ++j) {
      if (j > 20 && j < 4 * np - 8 && j % 16) continue;
      printf("job %3d: top=%lld free=%lld issued=%lld", j, ft[j][0] - t0, ft[j][1] - t0,
             ft[j][4] - t0);
      if (j % 4 == 3) printf(" entries=%lld prefetched=%lld", ft[j][5] - t0, ft[j][6] - t0);
      printf("\n");
    }
    for (int k = 0; k < 4; ++k) {  // by release slot
      double w = 0, c = 0, n = 0;
      for (int j = 16 + k; j < 4 * np - 8; j += 4) {
        w += ft[j][1] - ft[j][0];
        c += ft[j][4] - ft[j][1];
        n += 1;
      }
      printf("slot %d: mean wait-free %.0f, copies issued in %.0f\n", k, w / n, c / n);
    }
  }
  return 0;
}
