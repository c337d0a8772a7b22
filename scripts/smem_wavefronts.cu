// Shared-memory wavefronts of 128-bit stores / loads in the quantized pair kernels' expansion
// pattern (csrc_cuda/sm90/decode/pair_fp8_fill.cuh, expand_boxes) against a contiguous control:
// one block of 4 warps, 1000 x 2 accesses a warp a pattern, so 8000 accesses and 32000
// wavefronts where conflict-free. GPU machine (NOTES.md, twenty-ninth session):
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a scripts/smem_wavefronts.cu -o /tmp/swf
//   ncu --metrics l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,\
//     l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum /tmp/swf
#include <cstdio>
#include <cstdint>
__device__ __forceinline__ void st128(unsigned addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ uint4 ld128(unsigned addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
__global__ void k(int pattern, int iters, unsigned* sink) {
  __shared__ __align__(1024) unsigned char buf[16384];
  const int lane = threadIdx.x & 31, wq = threadIdx.x >> 5;
  const int t = 16 * wq + (lane & 15), odd = lane >> 4;
  int o0, o1;
  if (pattern == 0) {  // contiguous: a quarter warp covers 128 consecutive bytes
    o0 = threadIdx.x * 16;
    o1 = o0 + 2048;
  } else if (pattern == 1) {  // expand_piece's two stores of the kept piece
    const int a = ((2 * odd) ^ (t & 7)) << 4, wk = a ^ (64 * odd);
    o0 = t * 128 + wk;
    o1 = t * 128 + (wk ^ 16);
  } else {  // expand_boxes' raw loads (keep, send) of round i = 1
    const int a = ((2 * odd) ^ (t & 7)) << 4, keep = a ^ (16 * odd), send = keep ^ 16;
    o0 = t * 128 + (keep ^ 64);
    o1 = t * 128 + (send ^ 64);
  }
  const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(buf));
  uint4 v = make_uint4(lane, wq, 1, 2), acc = make_uint4(0, 0, 0, 0);
  for (int i = 0; i < iters; ++i) {
    const unsigned b = base + (i & 1) * 8192;
    if (pattern < 2) {
      st128(b + o0, v);
      st128(b + o1, v);
      v.x += 1;
    } else {
      const uint4 x = ld128(b + o0), y = ld128(b + o1);
      acc.x ^= x.x ^ y.x;
      acc.y += x.y + y.y;
      acc.z ^= x.z ^ y.z;
      acc.w += x.w + y.w;
    }
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 12345u) sink[threadIdx.x] = acc.x;
}
int main() {
  unsigned* sink;
  cudaMalloc(&sink, 4096);
  for (int p = 0; p < 3; ++p) {
    k<<<1, 128>>>(p, 1000, sink);
    cudaDeviceSynchronize();
    printf("pattern %d (0 contiguous stores, 1 the expansion's stores, 2 its raw loads): %s\n", p,
           cudaGetErrorString(cudaGetLastError()));
  }
  return 0;
}
