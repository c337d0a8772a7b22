// Issue rate of the wgmma shapes the Hopper decode kernels use or could use (GPU machine):
// one CTA an SM, 1 or 2 warpgroups each issuing chains of the same wgmma into one accumulator
// (as the k-steps of a product do), B (and A for SS) from shared memory, A for RS from
// registers. Prints cycles an instruction a warpgroup and the SM's FLOP a cycle (dense bf16 /
// fp16 peak: 4096 a cycle an SM on an H100 SXM).
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -DPORTMLA_HAVE_SM90A=1 \
//     -Icsrc_cuda -I$PORTMLA_CUTLASS_INCLUDE scripts/wgmma_rate.cu -o /tmp/wr && /tmp/wr
#include <cstdio>

#include "../csrc_cuda/sm90/decode/hopper_ptx.cuh"

using namespace portmla::sm90;
namespace G = cute::SM90::GMMA;

constexpr int kChain = 32;  // wgmma a committed group
constexpr int kRounds = 256;

template <class Atom, int N, bool kRs>
__global__ void __launch_bounds__(256, 1) rate_kernel(int wgs, long long* cycles) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem[];
  const int wg = threadIdx.x >> 7;
  for (int i = threadIdx.x; i < 96 * 1024 / 4; i += blockDim.x) reinterpret_cast<uint32_t*>(smem)[i] = 0x3c003c00u;
  __syncthreads();
  if (wg >= wgs) return;
  const uint64_t da = gmma_desc_sw128(smem, 16, 1024), db = gmma_desc_sw128(smem + 32768, 16, 1024);
  float d[N];
#pragma unroll
  for (int i = 0; i < N; ++i) d[i] = 0.f;
  uint32_t a[4] = {0x3c003c00u + threadIdx.x, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};
  const long long t0 = clock64();
  for (int r = 0; r < kRounds; ++r) {
    fence_regs(d);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kChain; ++k) {
      if constexpr (kRs) {
        gmma_rs<Atom>(a, desc_add(db, (k & 3) * 32), d);
      } else {
        gmma<Atom>(desc_add(da, (k & 3) * 32), desc_add(db, (k & 3) * 32), d, true);
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(d);
  }
  const long long t1 = clock64();
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) sum += d[i];
  if ((threadIdx.x & 127) == 0) {
    cycles[blockIdx.x * 2 + wg] = t1 - t0;
    if (sum == 12345.f) cycles[0] = 0;  // keeps d live
  }
#endif
}

template <class Atom, int N, bool kRs>
void run(const char* name, int n_dim) {
  long long* dc;
  cudaMalloc(&dc, 132 * 2 * sizeof(long long));
  auto k = rate_kernel<Atom, N, kRs>;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024);
  for (int wgs = 1; wgs <= 2; ++wgs) {
    k<<<132, 256, 96 * 1024>>>(wgs, dc);
    k<<<132, 256, 96 * 1024>>>(wgs, dc);
    long long h[264];
    cudaMemcpy(h, dc, sizeof(h), cudaMemcpyDeviceToHost);
    double mean = 0;
    for (int b = 0; b < 132; ++b) mean += h[2 * b];
    mean /= 132;
    const double per = mean / (kRounds * kChain);
    printf("%-28s wgs %d: %7.1f cycles a wgmma a warpgroup, %6.0f FLOP a cycle an SM (%s)\n", name,
           wgs, per, wgs * 64.0 * n_dim * 16 * 2 / per, cudaGetErrorString(cudaGetLastError()));
  }
  cudaFree(dc);
}

int main() {
  run<G::MMA_64x64x16_F32BF16BF16_SS<Major::K, Major::K>, 32, false>("SS m64n64k16 bf16", 64);
  run<G::MMA_64x32x16_F32BF16BF16_SS<Major::K, Major::K>, 16, false>("SS m64n32k16 bf16", 32);
  run<G::MMA_64x256x16_F32BF16BF16_SS<Major::K, Major::MN>, 128, false>("SS m64n256k16 bf16", 256);
  run<G::MMA_64x256x16_F32F16F16_RS<Major::K, Major::MN>, 128, true>("RS m64n256k16 f16", 256);
  run<G::MMA_64x64x16_F32F16F16_RS<Major::K, Major::K>, 32, true>("RS m64n64k16 f16", 64);
  run<G::MMA_64x32x16_F32F16F16_RS<Major::K, Major::K>, 16, true>("RS m64n32k16 f16", 32);
  run<G::MMA_64x16x16_F32F16F16_RS<Major::K, Major::K>, 8, true>("RS m64n16k16 f16", 16);
  return 0;
}
