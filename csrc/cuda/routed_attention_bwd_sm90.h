// Hopper (sm_90a) backward of routed paged attention: TMA loads and wgmma, warp-specialised
// (csrc/cuda/routed_attention_bwd_sm90.cu). Same parameters and results as routed_attention_bwd.
#pragma once

#include <cuda_runtime.h>

#include "kernels.h"

namespace kvpo::cuda {

// Launches the Hopper kernels on a device of compute capability 9.0: dk and dv, then dq (a second
// kernel when p.deterministic, else float32 atomics into p.dq_accum and a conversion).
// cudaErrorNotSupported: this call cannot use them (another device, a binary without sm_90a code,
// a dtype or head_dim they do not take, no page or query to read, sizes past 32-bit coordinates or
// the grids' axes, pointers not 16-byte aligned); nothing was launched and no error is left set,
// so the caller may run routed_attention_bwd's sm80 kernels instead.
cudaError_t routed_attention_bwd_sm90(const RoutedAttnBwdParams& p, DType dt, cudaStream_t stream);

}  // namespace kvpo::cuda
