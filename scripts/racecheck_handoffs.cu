// Which warpgroup-to-warpgroup handoffs does compute-sanitizer's racecheck follow?
//
// The Hopper pair kernel hands row maxima and row sums between its two consumer warpgroups
// through shared memory. Each kernel below does the same exchange (WG0 writes, WG1 reads, then
// the reverse order for the next round: RAW and WAR across warpgroups) with one kind of
// synchronisation, 16 rounds, one CTA of 384 threads whose third warpgroup exits at once (as
// the pair kernel's producer warps do). Run each under racecheck and read its hazard count:
//
//   nvcc -O2 -arch=sm_90a -o rh scripts/racecheck_handoffs.cu
//   for k in 0 1 2 3 4 5; do compute-sanitizer --tool racecheck ./rh $k | tail -1; done
//
// A GPU-machine tool, never part of the module.
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace {

__device__ __forceinline__ uint32_t su32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void bar_sync(int id) {
  asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id) {
  asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void mb_init(uint64_t* b, uint32_t n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(su32(b)), "r"(n) : "memory");
}
__device__ __forceinline__ void mb_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(su32(b)) : "memory");
}
__device__ __forceinline__ void mb_wait(uint64_t* b, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred d;\nW_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 d, [%0], %1;\n"
      "@!d bra W_%=;\n}\n" ::"r"(su32(b)),
      "r"(parity)
      : "memory");
}

enum Kind {
  kArriveSync = 0,   // the pair kernel's m_a / m_b: bar.arrive by the writer, bar.sync by the reader
  kSyncSync = 1,     // its row sums: bar.sync (256 threads) on both sides
  kSyncthreads = 2,  // control: __syncthreads with the third warpgroup kept alive
  kMbarAll = 3,      // mbarrier, every writer thread arrives (count 128), the reader waits
  kMbarWarp = 4,     // mbarrier, __syncwarp then one arrival per warp (count 4)
  kMbarAllBoth = 5,  // as kMbarAll, and the reader also signals the writer through an mbarrier
};

__global__ void handoff(int kind, float* out) {
  __shared__ float x[64];
  __shared__ uint64_t full, empty;
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31, r = (tid & 127) >> 1;
  if (tid == 0) {
    mb_init(&full, kind == kMbarWarp ? 4 : 128);
    mb_init(&empty, kind == kMbarWarp ? 4 : 128);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (wg == 2 && kind != kSyncthreads) return;
  float acc = 0.f;
  for (int it = 0; it < 16; ++it) {
    const uint32_t par = it & 1;
    if (kind == kSyncthreads) {
      if (wg == 0 && (tid & 1) == 0) x[r] = it + r;
      __syncthreads();
      if (wg == 1) acc += x[r];
      __syncthreads();
      continue;
    }
    if (wg == 0) {
      // Round it: wait until WG1 read round it - 1, then write.
      if (it > 0) {
        if (kind == kArriveSync || kind == kSyncSync) bar_sync(2);
        else if (kind == kMbarAllBoth || kind == kMbarWarp) mb_wait(&empty, par ^ 1);
        else bar_sync(2);
      }
      if ((tid & 1) == 0) x[r] = it + r;
      if (kind == kArriveSync) bar_arrive(1);
      else if (kind == kSyncSync) bar_sync(1);
      else if (kind == kMbarWarp) {
        __syncwarp();
        if (lane == 0) mb_arrive(&full);
      } else {
        mb_arrive(&full);
      }
    } else {
      if (kind == kArriveSync || kind == kSyncSync) bar_sync(1);
      else mb_wait(&full, par);
      acc += x[r];
      if (it + 1 < 16) {
        if (kind == kArriveSync) bar_arrive(2);
        else if (kind == kSyncSync) bar_sync(2);
        else if (kind == kMbarAllBoth) mb_arrive(&empty);
        else if (kind == kMbarWarp) {
          __syncwarp();
          if (lane == 0) mb_arrive(&empty);
        } else {
          bar_arrive(2);  // kMbarAll: the reverse direction stays a named barrier
        }
      }
    }
  }
  if (wg == 1) out[tid - 128] = acc;
}

}  // namespace

int main(int argc, char** argv) {
  const int kind = argc > 1 ? std::atoi(argv[1]) : 0;
  float* out = nullptr;
  cudaMalloc(&out, 128 * sizeof(float));
  handoff<<<1, 384>>>(kind, out);
  float h[128];
  cudaMemcpy(h, out, sizeof(h), cudaMemcpyDeviceToHost);
  // Row r of round it holds it + r: sum over the 16 rounds = 120 + 16 r.
  int bad = 0;
  for (int t = 0; t < 128; ++t) bad += h[t] != 120.f + 16.f * (t >> 1);
  std::printf("kind %d: %s, %d wrong sums\n", kind, cudaGetErrorString(cudaGetLastError()), bad);
  cudaFree(out);
  return bad != 0;
}
