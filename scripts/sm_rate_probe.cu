// Per-SM streaming rate under full load: one CTA an SM (its shared memory forces that) streams
// its own slice of a large buffer from HBM through a ring of 1D bulk copies (TMA), and records
// its smid and the globaltimer span of the stream. Prints one line an SM ("rate <smid> <GB/s a
// round> ...") and the correlation of the rates between rounds: whether some SMs get their data
// systematically faster than others (csrc_cuda/NOTES.md, thirty-third session: on two H100s 24
// of 132 SMs, a different set on each, read ~1.3x faster than the rest, every round).
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a scripts/sm_rate_probe.cu -o probe
//   probe [MB a CTA] [rounds] [chunk KB] [stages] [passes]
// passes > 1: each CTA reads its slice that many times in one launch; with slices that fit in L2
// together (MB a CTA given as a fraction, e.g. 0.25) the passes after the first are L2 hits.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ unsigned long long gtime() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// One thread a CTA issues every copy (chunk bytes, `stages` in flight) and waits for each.
__global__ void stream_kernel(const unsigned char* src, long long bytes_per_cta, int chunk,
                              int stages, int passes, unsigned long long* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  if (threadIdx.x != 0) return;
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);  // up to 8 mbarriers in the first 64 B
  unsigned char* ring = smem + 64;
  const long long per_pass = bytes_per_cta / chunk, n = per_pass * passes;
  const unsigned char* base = src + static_cast<long long>(blockIdx.x) * bytes_per_cta;
  for (int s = 0; s < stages; ++s)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&bar[s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  auto issue = [&](long long i) {
    const uint32_t b = smem_u32(&bar[i % stages]);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(chunk)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            smem_u32(ring + (i % stages) * chunk)),
        "l"(base + (i % per_pass) * chunk), "r"(chunk), "r"(b)
        : "memory");
  };
  const unsigned long long t0 = gtime();
  for (long long i = 0; i < stages && i < n; ++i) issue(i);
  for (long long i = 0; i < n; ++i) {
    const uint32_t parity = static_cast<uint32_t>((i / stages) & 1);
    asm volatile(
        "{\n.reg .pred d;\nW_%=:\nmbarrier.try_wait.parity.shared::cta.b64 d, [%0], %1;\n"
        "@!d bra W_%=;\n}" ::"r"(smem_u32(&bar[i % stages])),
        "r"(parity)
        : "memory");
    if (i + stages < n) issue(i + stages);
  }
  const unsigned long long t1 = gtime();
  unsigned smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  out[3 * blockIdx.x] = smid;
  out[3 * blockIdx.x + 1] = t0;
  out[3 * blockIdx.x + 2] = t1;
}

double corr(const std::vector<double>& a, const std::vector<double>& b) {
  double sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] <= 0 || b[i] <= 0) continue;
    sa += a[i]; sb += b[i]; saa += a[i] * a[i]; sbb += b[i] * b[i]; sab += a[i] * b[i]; n += 1;
  }
  return (n * sab - sa * sb) / std::sqrt((n * saa - sa * sa) * (n * sbb - sb * sb));
}

}  // namespace

int main(int argc, char** argv) {
  const double mb = argc > 1 ? atof(argv[1]) : 8;
  const int rounds = argc > 2 ? atoi(argv[2]) : 4;
  const int chunk = (argc > 3 ? atoi(argv[3]) : 32) * 1024;
  const int stages = argc > 4 ? atoi(argv[4]) : 6;
  const int passes = argc > 5 ? atoi(argv[5]) : 1;
  int dev = 0, sms = 0, max_smem = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  const int ring = 64 + stages * chunk;
  const int smem = std::max(ring, max_smem * 3 / 5);  // more than half an SM's: one CTA an SM
  if (ring > max_smem || stages > 8) {
    fprintf(stderr, "ring too large (at most 8 stages and %d bytes)\n", max_smem);
    return 1;
  }
  cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const long long per_cta = static_cast<long long>(mb * (1 << 20)) / chunk * chunk;
  unsigned char* src = nullptr;
  unsigned long long* out = nullptr;
  if (cudaMalloc(&src, per_cta * sms) != cudaSuccess || cudaMalloc(&out, 3 * 8 * sms) != cudaSuccess) {
    fprintf(stderr, "alloc failed\n");
    return 1;
  }
  cudaMemset(src, 1, per_cta * sms);
  std::vector<std::vector<double>> rate(rounds, std::vector<double>(1024, 0.0));
  std::vector<unsigned long long> h(3 * sms);
  for (int r = -1; r < rounds; ++r) {
    stream_kernel<<<sms, 32, smem>>>(src, per_cta, chunk, stages, passes, out);
    if (cudaDeviceSynchronize() != cudaSuccess) {
      fprintf(stderr, "kernel failed\n");
      return 1;
    }
    if (r < 0) continue;  // warm-up
    cudaMemcpy(h.data(), out, 3 * 8 * sms, cudaMemcpyDeviceToHost);
    unsigned long long first = ~0ull, last = 0;
    for (int k = 0; k < sms; ++k) {
      first = std::min(first, h[3 * k + 1]);
      last = std::max(last, h[3 * k + 2]);
      rate[r][h[3 * k] & 1023] =
          per_cta * static_cast<double>(passes) / (h[3 * k + 2] - h[3 * k + 1]);  // GB/s
    }
    printf("round %d: %.1f us, %.2f TB/s over the whole span\n", r, (last - first) / 1e3,
           per_cta * static_cast<double>(sms) * passes / (last - first) / 1e3);
  }
  for (int s = 0; s < 1024; ++s) {
    if (rate[0][s] <= 0) continue;
    printf("rate %3d", s);
    for (int r = 0; r < rounds; ++r) printf(" %7.2f", rate[r][s]);
    printf("\n");
  }
  for (int r = 1; r < rounds; ++r) printf("correlation round 0 / %d: %.3f\n", r, corr(rate[0], rate[r]));
  return 0;
}
