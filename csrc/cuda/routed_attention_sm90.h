// Hopper (sm_90a) forward of routed paged attention: TMA loads and wgmma, warp-specialised
// (csrc/cuda/routed_attention_sm90.cu). Same parameters and results as routed_attention_fwd.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

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

}  // namespace kvpo::cuda
