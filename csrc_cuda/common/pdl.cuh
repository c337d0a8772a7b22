// Programmatic dependent launch (sm_90+) for the Hopper decode's chain of kernels:
// schedule -> decode -> pieces' merge. A kernel launched with launch_pdl may start (its
// prologue: barrier init, descriptor prefetch) while the kernel before it in the stream still
// runs; pdl_wait() then blocks each calling thread until that kernel has finished and its
// memory is visible. pdl_launch_dependents() lets the next kernel be scheduled early (the
// first call in a CTA counts). Both are no-ops below sm_90 and when the kernel was launched
// without the attribute; CUDA graph capture keeps the programmatic edges.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

namespace portmla {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Which launches of the chain are programmatic: a mask of these bits, PORTMLA_CUDA_PDL
// (default kPdlDefault). 0 launches the chain plainly (serialised): a profiler then times each
// kernel alone (with PDL a kernel's span includes its wait for the one before).
constexpr int kPdlDecode = 1, kPdlMerge = 2;
constexpr int kPdlDefault = kPdlDecode | kPdlMerge;

inline int pdl_mask() {
  static const int mask = [] {
    const char* v = std::getenv("PORTMLA_CUDA_PDL");
    return v == nullptr || *v == 0 ? kPdlDefault : static_cast<int>(std::strtol(v, nullptr, 10));
  }();
  return mask;
}

// Launch `kernel`, allowed to overlap the stream's previous kernel when `which` is in the mask
// (it must call pdl_wait() before reading anything that kernel writes).
template <typename... Params, typename... Args>
cudaError_t launch_pdl(int which, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = (pdl_mask() & which) ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace portmla
