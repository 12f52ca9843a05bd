// CUDA kernels of kvpo, free of torch headers: raw device pointers, sizes and a stream.
// csrc/cuda/bindings.cpp wraps them as TORCH_LIBRARY_IMPL(kvpo, CUDA, ...) kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvpo::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A [G, S] float32 weight read through its strides (stride 0 broadcasts); ptr null = ones.
struct StepWeight {
  const float* ptr;
  int64_t stride_g, stride_s;
};

// energy[g] = sum_s weight[g, s] * reduce_n (v_pred[g, s, n] - v_ref[g, s, n])^2, reduce = sum or
// mean over n. v_pred, v_ref: [G, S, N] contiguous, dtype dt; energy: [G] float32 (written, not
// accumulated); workspace: velocity_energy_fwd_workspace(G, S, N) float32 values, any contents.
// Two launches for all branches: per-block partial sums, then a fixed-order sum per branch (no
// atomics: bitwise repeatable).
int64_t velocity_energy_fwd_workspace(int64_t G, int64_t S, int64_t N);
cudaError_t velocity_energy_fwd(const void* v_pred, const void* v_ref, StepWeight weight,
                                float* workspace, float* energy, int64_t G, int64_t S, int64_t N,
                                bool mean, DType dt, cudaStream_t stream);

// grad_pred = grad[g] * weight[g, s] * (2 / N if mean else 2) * (v_pred - v_ref), grad_ref =
// -grad_pred (skipped when grad_ref is null). grad: [G] float32; outputs like v_pred.
cudaError_t velocity_energy_bwd(const float* grad, const void* v_pred, const void* v_ref,
                                StepWeight weight, void* grad_pred, void* grad_ref, int64_t G,
                                int64_t S, int64_t N, bool mean, DType dt, cudaStream_t stream);

// Routed paged attention forward (tensor cores; fp16/bf16; head_dim 64 or 128).
// q: [B, H, Lq, D]; k_pages, v_pages: [P, Hkv, page_size, D]; page_table: [B, max_pages] int32
// (-1 = routed out); page_lens: [P] int32 or null; out: [B, H, Lq, D] (dtype of q);
// lse: [B, H, Lq] float32 (natural log; -inf and out = 0 for a row without kept tokens).
struct RoutedAttnParams {
  const void* q;
  const void* k_pages;
  const void* v_pages;
  const int32_t* page_table;
  const int32_t* page_lens;
  void* out;
  float* lse;
  int64_t B, H, Hkv, Lq, D, P, page_size, max_pages;
  float scale;
};

// True when routed_attention_fwd supports this dtype and head_dim.
bool routed_attention_fwd_supported(DType dt, int64_t head_dim);

cudaError_t routed_attention_fwd(const RoutedAttnParams& p, DType dt, cudaStream_t stream);

// Routed paged attention backward (tensor cores; fp16/bf16; head_dim 64 or 128).
// dout, q: [B, H, Lq, D]; k_pages, v_pages: [P, Hkv, page_size, D]; page_table, page_lens: as the
// forward's; lse, delta: [B, H, Lq] float32 (the forward's lse; delta = rowsum(dout * out) - dlse);
// row_ptr: [P + 1] int32 and rows: [nnz] int32, the rows listing each page, once per listing
// (rows[row_ptr[p]:row_ptr[p + 1]], nnz = row_ptr[P]); dq: [B, H, Lq, D] and dk, dv:
// [P, Hkv, page_size, D], dtype of q, every element written (0 where no kept key or query reaches).
// deterministic: dq by a kernel walking the tables (bitwise repeatable); otherwise the dk/dv
// kernel adds dS K into dq_accum ([B, H, Lq, D] float32, zero-filled by the caller) with float
// atomics and a last kernel writes scale * dq_accum into dq (dq_accum unused when deterministic).
struct RoutedAttnBwdParams {
  const void* dout;
  const void* q;
  const void* k_pages;
  const void* v_pages;
  const int32_t* page_table;
  const int32_t* page_lens;
  const float* lse;
  const float* delta;
  const int32_t* row_ptr;
  const int32_t* rows;
  void* dq;
  void* dk;
  void* dv;
  float* dq_accum;
  int64_t B, H, Hkv, Lq, D, P, page_size, max_pages;
  float scale;
  bool deterministic;
};

// True when routed_attention_bwd supports this dtype and head_dim.
bool routed_attention_bwd_supported(DType dt, int64_t head_dim);

// cudaErrorInvalidConfiguration: a grid past CUDA's axis limits (the caller says which).
cudaError_t routed_attention_bwd(const RoutedAttnBwdParams& p, DType dt, cudaStream_t stream);

}  // namespace kvpo::cuda
