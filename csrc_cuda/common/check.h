// Launch checks: every launch is followed by CHECK_LAUNCH, which returns the error.
#pragma once

#include <cuda_runtime.h>

#define PORTMLA_RETURN_IF_ERROR(expr)       \
  do {                                      \
    cudaError_t err__ = (expr);             \
    if (err__ != cudaSuccess) return err__; \
  } while (0)

#define PORTMLA_CHECK_LAUNCH() PORTMLA_RETURN_IF_ERROR(cudaGetLastError())
