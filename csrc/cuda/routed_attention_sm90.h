// Hopper (sm_90a) forward of routed paged attention: TMA loads and wgmma, warp-specialised
// (csrc/cuda/routed_attention_sm90.cu). Same parameters and results as routed_attention_fwd.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace kvpo::cuda {

// True when the Hopper kernel takes this dtype and head_dim (fp16 / bf16; 64 or 128).
bool routed_attention_fwd_sm90_supported(DType dt, int64_t head_dim);

// Launches the Hopper kernel on a device of compute capability 9.0. cudaErrorNotSupported: this
// call cannot use it (another device, a binary without sm_90a code, no page to read, sizes past
// 32-bit coordinates, bases not 16-byte aligned); nothing was launched and no error is left set,
// so the caller may run routed_attention_fwd's kernel instead. cudaErrorInvalidConfiguration:
// a grid past routed_attention_fwd's limits.
cudaError_t routed_attention_fwd_sm90(const RoutedAttnParams& p, DType dt, cudaStream_t stream);

// Whether the launchers try the Hopper kernels first: the current device is of compute
// capability 9.0 and KVPO_CUDA_HOPPER is not "0" (read per call: a benchmark times both paths
// in one process).
inline bool hopper_kernels_wanted() {
  const char* env = std::getenv("KVPO_CUDA_HOPPER");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  int dev = 0, major = 0, minor = 0;
  return cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
         major == 9 && minor == 0;
}

}  // namespace kvpo::cuda
