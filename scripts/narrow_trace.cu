// Per-CTA timeline of the narrow Hopper kernels (sm90/decode/narrow_trace.cuh) on B sequences of
// S positions, 16 heads, one query token, block 64, fixed lengths, pages in a scattered order:
// where a call's time goes besides streaming the cache (launch skew, segment starts, data
// waits, the end skew, the pieces' merge).
//   nt S B bf16|fp8|ds sched_fixed [tail_merge 0|1|2]  (params.h TailMerge; 1: the default;
//   sched_fixed: the kernel's entry of portmla.backends.cuda.SCHED_FIXED)
// Built with one nvcc command (flags listed over three lines):
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a
//     -DPORTMLA_HAVE_SM90A=1 -DPORTMLA_NARROW_TRACE -Icsrc_cuda -I$PORTMLA_CUTLASS_INCLUDE
//     scripts/narrow_trace.cu -o nt
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>

#include "../csrc_cuda/sm90/decode/instances.h"
#include "trace_params.h"

// decode_hopper.cu names the pair / single-tile launchers too (declared before it uses them);
// this tool never runs them.
namespace portmla {
namespace sm90 {
#define NT_UNUSED(T, F, TQ, P)                                                                  \
  template <>                                                                                   \
  cudaError_t run_instance<T, F, TQ, P>(const CUtensorMap&, const CUtensorMap&,                 \
                                        const DecodeParams&, cudaStream_t, int*) {              \
    return cudaErrorNotSupported;                                                               \
  }
NT_UNUSED(__nv_bfloat16, kKv16, __nv_bfloat16, false)
NT_UNUSED(__nv_bfloat16, kKv16, __nv_bfloat16, true)
NT_UNUSED(__half, kKv16, __half, false)
NT_UNUSED(__half, kKv16, __half, true)
NT_UNUSED(__half, kKvFp8, __nv_bfloat16, true)
NT_UNUSED(__half, kKvFp8, __half, true)
NT_UNUSED(__nv_bfloat16, kKvDsMla, __nv_bfloat16, true)
template <>
cudaError_t run_narrow<__half>(const CUtensorMap&, const CUtensorMap&, const DecodeParams&,
                               cudaStream_t, int*) {
  return cudaErrorNotSupported;
}
template <>
cudaError_t run_narrow_quant<__half, kKvFp8>(const CUtensorMap&, const CUtensorMap&,
                                             const DecodeParams&, cudaStream_t, int*) {
  return cudaErrorNotSupported;
}
}  // namespace sm90
}  // namespace portmla

#include "../csrc_cuda/sm80/decode/schedule.cu"
#include "../csrc_cuda/sm90/decode/decode_hopper.cu"
#include "../csrc_cuda/sm90/decode/narrow_bf16.cu"
#include "../csrc_cuda/sm90/decode/narrow_dsmla.cu"
#include "../csrc_cuda/sm90/decode/narrow_fp8_bf16q.cu"

namespace {
struct Stat {
  double v[5];  // min p10 median p90 max
};
Stat stat(std::vector<double> x) {
  Stat s{};
  if (x.empty()) return s;
  std::sort(x.begin(), x.end());
  const size_t n = x.size();
  s.v[0] = x[0];
  s.v[1] = x[n / 10];
  s.v[2] = x[n / 2];
  s.v[3] = x[n * 9 / 10];
  s.v[4] = x[n - 1];
  return s;
}
void show(const char* what, const std::vector<double>& x) {
  const Stat s = stat(x);
  printf("%-34s min %8.2f p10 %8.2f med %8.2f p90 %8.2f max %8.2f  (n %zu)\n", what, s.v[0], s.v[1],
         s.v[2], s.v[3], s.v[4], x.size());
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {  // the fixed cost is the cuda backend's, not a copy of it here
    fprintf(stderr, "usage: nt S B bf16|fp8|ds sched_fixed [tail_merge]; sched_fixed: the kernel's "
                    "portmla.backends.cuda.SCHED_FIXED entry (hopper_narrow, hopper_narrow_quant, "
                    "hopper_narrow_ds)\n");
    return 2;
  }
  const int S = atoi(argv[1]), B = atoi(argv[2]);
  const char* fmt = argv[3];
  const bool fp8 = strcmp(fmt, "fp8") == 0, ds = strcmp(fmt, "ds") == 0, quant = fp8 || ds;
  const int H = 16, BS = 64, D = 576;
  const int entry = ds ? 656 : quant ? 576 : 2 * D;  // bytes
  const int pages_per_seq = S / BS;
  const int64_t n_pages = static_cast<int64_t>(B) * pages_per_seq;
  const size_t cache_bytes = static_cast<size_t>(n_pages) * BS * entry;
  std::vector<unsigned char> h_cache(cache_bytes);
  srand(1);
  const size_t n_entries = cache_bytes / entry, n_random = std::min<size_t>(n_entries, 4099);
  for (size_t t = 0; t < n_random; ++t) {  // random entries, then repeated (fast to fill)
    unsigned char* e = h_cache.data() + t * entry;
    if (!quant) {
      __nv_bfloat16* v = reinterpret_cast<__nv_bfloat16*>(e);
      for (int i = 0; i < D; ++i) v[i] = __float2bfloat16((rand() % 2001 - 1000) / 1000.f);
    } else {
      for (int i = 0; i < 512; ++i) e[i] = static_cast<unsigned char>(rand() & 0xb7);  // |x| < 1
      if (fp8) {
        for (int i = 512; i < 576; ++i) e[i] = static_cast<unsigned char>(rand() & 0xb7);
      } else {
        float* sc = reinterpret_cast<float*>(e + 512);
        for (int i = 0; i < 4; ++i) sc[i] = 0.01f * (1 + rand() % 8);
        __nv_bfloat16* r = reinterpret_cast<__nv_bfloat16*>(e + 528);
        for (int i = 0; i < 64; ++i) r[i] = __float2bfloat16((rand() % 2001 - 1000) / 1000.f);
      }
    }
  }
  for (size_t t = n_random; t < n_entries; ++t) {
    memcpy(h_cache.data() + t * entry, h_cache.data() + (t % n_random) * entry, entry);
  }
  std::vector<__nv_bfloat16> h_q(static_cast<size_t>(B) * H * D);
  for (auto& x : h_q) x = __float2bfloat16((rand() % 2001 - 1000) / 1000.f);
  std::vector<int> bt(n_pages), lens(B, S);
  for (int64_t i = 0; i < n_pages; ++i) bt[i] = static_cast<int>((i * 7919) % n_pages);
  void *d_cache, *d_q, *d_out;
  int *d_bt, *d_lens;
  cudaMalloc(&d_cache, cache_bytes);
  cudaMalloc(&d_q, h_q.size() * 2);
  cudaMalloc(&d_out, static_cast<size_t>(B) * H * 512 * 2);
  cudaMalloc(&d_bt, bt.size() * 4);
  cudaMalloc(&d_lens, B * 4);
  cudaMemcpy(d_cache, h_cache.data(), cache_bytes, cudaMemcpyHostToDevice);
  cudaMemcpy(d_q, h_q.data(), h_q.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(d_bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_lens, lens.data(), B * 4, cudaMemcpyHostToDevice);

  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  portmla::DecodeParams p;
  trace_params(p, d_q, d_out, d_bt, d_lens, B, H, pages_per_seq, n_pages, sms * (quant ? 2 : 1),
               atoi(argv[4]));  // parts: cuda.py per_sm
  p.kv_cache = d_cache;
  p.page_stride = quant ? BS * entry : BS * D;  // bytes for the quantized formats, else elements
  p.token_stride = quant ? entry : D;
  if (quant) {
    p.kv_format = ds ? portmla::kKvDsMla : portmla::kKvFp8;
    if (fp8) p.k_scale = trace_k_scale(0.02f);
  }
  p.variant = quant ? portmla::sm80::kHopperNarrowQuant : portmla::sm80::kHopperNarrow;
  const int mode = argc > 5 ? atoi(argv[5]) : 1;
  p.tail_merge = mode != 0;
  if (mode == 2) {  // the last-piece merge: its counters (one a sequence: 16 rows)
    cudaMalloc(&p.sched_arrive, B * sizeof(int32_t));
  }

  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  int took = portmla::kTailOff;  // the narrow kernels merge themselves or not at all
  auto call = [&] {
    cudaError_t err = portmla::launch_decode_schedule(p, 0);
    if (err == cudaSuccess) err = portmla::sm90::launch_decode(p, 0, &took);
    return err;
  };
  for (int i = 0; i < 3; ++i) call();
  const bool merged = took != portmla::kTailOff;
  std::vector<double> ms_all;
  for (int i = 0; i < 20; ++i) {
    cudaEventRecord(e0);
    const cudaError_t err = call();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (err != cudaSuccess) {
      printf("launch: %s\n", cudaGetErrorString(err));
      return 1;
    }
    ms_all.push_back(ms * 1000);
  }
  printf("%s S %d B %d h16: parts %d, fixed %d, merge %s, last error %s\n", fmt, S, B,
         p.num_parts, p.sched_fixed, merged ? "in the kernel" : "off (pieces left unmerged)",
         cudaGetErrorString(cudaGetLastError()));
  show("call (schedule + decode), us", ms_all);

  static unsigned long long ev[portmla::sm90::kNtCtas][portmla::sm90::kNtEv];
  cudaMemcpyFromSymbol(ev, portmla::sm90::g_nt, sizeof(ev));
  const int ctas = std::min(p.num_parts, portmla::sm90::kNtCtas);
  unsigned long long t0 = ~0ull;
  for (int k = 0; k < ctas; ++k) t0 = std::min(t0, ev[k][0]);
  auto us = [&](int k, int e) { return (ev[k][e] - t0) / 1e3; };
  int clk_khz = 0;
  cudaDeviceGetAttribute(&clk_khz, cudaDevAttrClockRate, 0);
  std::vector<double> entry_t, sched_t, first_q, first_data, loop_end, past_bar, merged_t, wait_us,
      per_tile, seg_start_cost, boundary, tiles_v, segs_v, store_cost;
  for (int k = 0; k < ctas; ++k) {
    const int segs = static_cast<int>(ev[k][31] >> 40), tiles = static_cast<int>((ev[k][31] >> 16) & 0xffffff);
    entry_t.push_back(us(k, 0));
    sched_t.push_back(us(k, 1));
    loop_end.push_back(us(k, 27));
    if (merged && mode == 1) past_bar.push_back(us(k, 28));
    if (merged) {
      merged_t.push_back(us(k, 29));
    }
    tiles_v.push_back(tiles);
    segs_v.push_back(segs);
    wait_us.push_back(ev[k][30] / (clk_khz / 1e3));
    if (segs == 0) continue;
    first_q.push_back(us(k, 3));
    first_data.push_back(us(k, 4));
    for (int s = 0; s < std::min(segs, portmla::sm90::kNtSegs); ++s) {
      const int b = 2 + 5 * s;
      seg_start_cost.push_back((ev[k][b + 2] - ev[k][b]) / 1e3);  // start -> first data
      store_cost.push_back((ev[k][b + 4] - ev[k][b + 3]) / 1e3);  // tiles done -> stored
      if (s + 1 < std::min(segs, portmla::sm90::kNtSegs)) {
        boundary.push_back((ev[k][b + 7] - ev[k][b + 3]) / 1e3);  // tiles done -> next first data
      }
    }
    const double streaming = (ev[k][27] - ev[k][4]) / 1e3;
    if (tiles > 0) per_tile.push_back(streaming / tiles);
  }
  show("entry (us after the first)", entry_t);
  show("schedule read", sched_t);
  show("first Q ready", first_q);
  show("first data landed", first_data);
  show("decode loop left", loop_end);
  {  // the first half of the parts (placed first on their SMs) against the second
    double a = 0, b = 0;
    const int half = ctas / 2;
    for (int k = 0; k < ctas; ++k) (k < half ? a : b) += loop_end[k];
    if (half > 0) {
      printf("loop left, mean of parts < %d: %.2f us, the others: %.2f us\n", half, a / half,
             b / (ctas - half));
    }
  }
  if (merged && mode == 1) show("past the grid barrier", past_bar);
  if (merged) show("merged", merged_t);
  show("tiles a CTA", tiles_v);
  show("segments a CTA", segs_v);
  show("data waits a CTA, us (base clock)", wait_us);
  {
    std::vector<double> mhz;
    for (int k = 0; k < ctas; ++k) {
      if (ev[k][27] > ev[k][1]) mhz.push_back(static_cast<double>(ev[k][33] - ev[k][32]) / ((ev[k][27] - ev[k][1]) / 1e3));
    }
    show("SM clock over the loop, MHz", mhz);
  }
  show("us a tile (first data -> loop left)", per_tile);
  show("segment start -> first data, us", seg_start_cost);
  show("tiles done -> rows stored, us", store_cost);
  show("tiles done -> next first data, us", boundary);
  // The end skew against the work: loop-left time of the CTAs by their tile count.
  {
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (size_t i = 0; i < tiles_v.size(); ++i) {
      sx += tiles_v[i];
      sy += loop_end[i];
      sxx += tiles_v[i] * tiles_v[i];
      sxy += tiles_v[i] * loop_end[i];
    }
    const double n = static_cast<double>(tiles_v.size());
    const double slope = (n * sxy - sx * sy) / (n * sxx - sx * sx);
    printf("loop left ~ %.3f us a tile x tiles + %.2f\n", slope, (sy - slope * sx) / n);
  }
  if (quant) {  // CTA 0's warps within its tiles (narrow_trace.cuh: NT_WARP), cycles
    static long long w[portmla::sm90::kNtWTiles][6][4];
    cudaMemcpyFromSymbol(w, portmla::sm90::g_ntw, sizeof(w));
    const char* names[6] = {"top", "data", "S issue", "S done", "P visible", "end"};
    double lag[6][4] = {}, span[6] = {};
    int n = 0;
    for (int t = 0; t + 1 < portmla::sm90::kNtWTiles; ++t) {
      if (!w[t][0][0] || !w[t + 1][0][0]) continue;
      ++n;
      for (int e = 0; e < 6; ++e) {
        long long lo = w[t][e][0];
        for (int q = 1; q < 4; ++q) lo = std::min(lo, w[t][e][q]);
        for (int q = 0; q < 4; ++q) lag[e][q] += w[t][e][q] - lo;
        const long long from = e == 0 ? w[t][5][0] - (w[t + 1][0][0] - w[t][0][0]) : w[t][e - 1][0];
        span[e] += w[t][e][0] - from;
      }
    }
    if (n) {
      printf("CTA 0, %d tiles: mean cycles since the previous event (warp 0) and each warp's lag behind the first warp there\n", n);
      for (int e = 0; e < 6; ++e) {
        printf("  %-10s %7.0f | lag w0 %5.0f w1 %5.0f w2 %5.0f w3 %5.0f\n", names[e], e ? span[e] / n : 0.0,
               lag[e][0] / n, lag[e][1] / n, lag[e][2] / n, lag[e][3] / n);
      }
      double tile = 0;
      for (int t = 0; t + 1 < portmla::sm90::kNtWTiles; ++t)
        if (w[t][0][0] && w[t + 1][0][0]) tile += w[t + 1][0][0] - w[t][0][0];
      printf("  tile (top to top) %.0f cycles\n", tile / n);
    }
  }
  // The 8 latest CTAs.
  std::vector<int> order(ctas);
  for (int k = 0; k < ctas; ++k) order[k] = k;
  std::sort(order.begin(), order.end(), [&](int a, int b) { return ev[a][27] > ev[b][27]; });
  for (int i = 0; i < 8 && i < ctas; ++i) {
    const int k = order[i];
    printf("late cta %3d sm %3llu: tiles %llu segs %llu entry %.2f first data %.2f left %.2f waits %.2f us\n",
           k, ev[k][31] & 0xffff, (ev[k][31] >> 16) & 0xffffff, ev[k][31] >> 40, us(k, 0), us(k, 4),
           us(k, 27), ev[k][30] / (clk_khz / 1e3));
  }
  // NT_DUMP=1: every CTA (smid, tiles, segments, first data, loop left, waits) after this call
  // and after one more: whether the late CTAs are the same SMs call after call.
  if (getenv("NT_DUMP") != nullptr) {
    static unsigned long long ev2[portmla::sm90::kNtCtas][portmla::sm90::kNtEv];
    call();
    cudaDeviceSynchronize();
    cudaMemcpyFromSymbol(ev2, portmla::sm90::g_nt, sizeof(ev2));
    unsigned long long t2 = ~0ull;
    for (int k = 0; k < ctas; ++k) t2 = std::min(t2, ev2[k][0]);
    double sxy = 0, sx = 0, sy = 0, sxx = 0, syy = 0;
    for (int k = 0; k < ctas; ++k) {
      const double a = us(k, 27), b = (ev2[k][27] - t2) / 1e3;
      printf("dump cta %3d sm %3llu tiles %3llu segs %llu first %.2f left %.2f waits %.1f | sm %3llu left %.2f | mhz %.0f\n",
             k, ev[k][31] & 0xffff, (ev[k][31] >> 16) & 0xffffff, ev[k][31] >> 40, us(k, 4), a,
             ev[k][30] / (clk_khz / 1e3), ev2[k][31] & 0xffff, b,
             static_cast<double>(ev[k][33] - ev[k][32]) / ((ev[k][27] - ev[k][1] + 1) / 1e3));
      sx += a; sy += b; sxx += a * a; syy += b * b; sxy += a * b;
    }
    const double n = ctas;
    printf("loop-left correlation between the two calls (same CTA index): %.3f\n",
           (n * sxy - sx * sy) / std::sqrt((n * sxx - sx * sx) * (n * syy - sy * sy)));
  }
  return 0;
}
