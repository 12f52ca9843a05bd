#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace kvpo {

// q: [B, H, Lq, D]; k_pages, v_pages: [P, Hkv, page_size, D]; page_table: [B, max_pages] int32
// (-1 = routed out); page_lens: [P] int32 or none. Returns out [B, H, Lq, D] (dtype of q) and
// lse [B, H, Lq] (float32, float64 for float64 inputs).
std::tuple<at::Tensor, at::Tensor> routed_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k_pages,
                                                       const at::Tensor& v_pages,
                                                       const at::Tensor& page_table,
                                                       const std::optional<at::Tensor>& page_lens,
                                                       double scale);

// delta: [B, H, Lq] = rowsum(dout * out) - dlse. Returns dq, dk_pages, dv_pages. deterministic is
// ignored: the CPU kernel's order of summation is fixed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_pages,
    const at::Tensor& v_pages, const at::Tensor& page_table,
    const std::optional<at::Tensor>& page_lens, const at::Tensor& lse, const at::Tensor& delta,
    double scale, bool deterministic);

}  // namespace kvpo
