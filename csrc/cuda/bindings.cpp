// torch bindings of the CUDA kernels in csrc/cuda/*.cu (which see no torch headers): checks,
// allocation, the current stream, and TORCH_LIBRARY_IMPL(kvpo, CUDA, ...). Compiled only into CUDA
// builds of kvpo_kernels._C. The routed attention backward's page -> rows index (CSR) is built
// here with ATen ops on the GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "message.h"

namespace kvpo {
namespace {

cuda::DType to_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, what, ": CUDA kernels take float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return cuda::DType::kFloat32;
}

void check_cuda(cudaError_t err, const char* what) {
  // A build for other GPUs (TORCH_CUDA_ARCH_LIST on a machine without this one) says so at launch.
  TORCH_CHECK(err != cudaErrorNoKernelImageForDevice, what, ": CUDA error: ",
              cudaGetErrorString(err),
              ": kvpo_kernels._C was built for other GPU architectures; rebuild it with this "
              "GPU's in TORCH_CUDA_ARCH_LIST, or run the op on backend='triton' "
              "(KVPO_BACKEND=triton)");
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA error: ", cudaGetErrorString(err));
}

// 16-byte vector loads need 16-byte aligned bases; a view with an odd storage offset is copied.
at::Tensor aligned(const at::Tensor& t) {
  auto c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// The sizes both routed attention launchers take: q [B, H, Lq, D], pages [P, Hkv, page_size, D],
// table [B, max_pages].
template <typename Params>
void set_sizes(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& table,
               double scale) {
  p.B = q.size(0);
  p.H = q.size(1);
  p.Lq = q.size(2);
  p.D = q.size(3);
  p.P = k.size(0);
  p.Hkv = k.size(1);
  p.page_size = k.size(2);
  p.max_pages = table.size(1);
  p.scale = static_cast<float>(scale);
}

// What both routed attention bindings ask of their operands: ranks, one dtype, an int32 table.
void check_operands(const char* op, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& table) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && table.dim() == 2, op,
              ": q [B, H, Lq, D], k/v pages [P, Hkv, page_size, D], table [B, N]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k_pages, v_pages must share a dtype");
  TORCH_CHECK(table.scalar_type() == at::kInt, op, ": page_table must be int32");
}

std::tuple<at::Tensor, at::Tensor> routed_attn_fwd_cuda(const at::Tensor& q_,
                                                        const at::Tensor& k_,
                                                        const at::Tensor& v_,
                                                        const at::Tensor& table_,
                                                        const std::optional<at::Tensor>& lens_,
                                                        double scale) {
  check_operands("routed_attn_fwd", q_, k_, v_, table_);
  const auto dt = to_dtype(q_, "routed_attn_fwd");
  TORCH_CHECK(cuda::routed_attention_fwd_supported(dt, q_.size(3)),
              "routed_attn_fwd: the CUDA kernel takes float16/bfloat16 with head_dim 64 or 128, "
              "got ", q_.scalar_type(), " with head_dim ", num(q_.size(3)));
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto q = aligned(q_), k = aligned(k_), v = aligned(v_);
  const auto table = table_.contiguous();
  std::optional<at::Tensor> lens;
  if (lens_.has_value()) lens = lens_->contiguous();
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  cuda::RoutedAttnParams p{};
  p.q = q.const_data_ptr();
  p.k_pages = k.const_data_ptr();
  p.v_pages = v.const_data_ptr();
  p.page_table = table.const_data_ptr<int32_t>();
  p.page_lens = lens ? lens->const_data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_sizes(p, q, k, table, scale);
  const cudaError_t err =
      cuda::routed_attention_fwd(p, dt, c10::cuda::getCurrentCUDAStream().stream());
  // The launcher's refusal of a grid past CUDA's axis limits (query tiles on y, heads on z).
  TORCH_CHECK_VALUE(err != cudaErrorInvalidConfiguration,
                    "routed_attn_fwd: q [B, H, Lq, D] = ", dims(q.sizes()),
                    " is past the CUDA forward's grid (at most 65535 heads, 65535 tiles of "
                    "queries and 2**31 - 1 rows); backend='triton' takes it");
  check_cuda(err, "routed_attn_fwd");
  return {out, lse};
}

// Page -> rows index, as page_rows_csr in kvpo_kernels/triton/routed_attention.py: the rows
// listing page p are rows[row_ptr[p]:row_ptr[p + 1]], in row order, once per listing. int32 both.
std::tuple<at::Tensor, at::Tensor> page_rows_csr(const at::Tensor& table, int64_t num_pages) {
  const int64_t B = table.size(0), N = table.size(1);
  const auto flat = table.reshape({-1}).to(at::kLong);
  const auto kept = flat.ge(0);
  const auto pages = flat.masked_select(kept);
  const auto row_of = at::arange(B, flat.options()).view({B, 1}).expand({B, N}).reshape({-1});
  const auto order = at::argsort(pages, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto row_ptr = at::zeros({num_pages + 1}, flat.options());
  row_ptr.narrow(0, 1, num_pages).copy_(at::bincount(pages, {}, num_pages).cumsum(0));
  return {row_ptr.to(at::kInt), row_of.masked_select(kept).index_select(0, order).to(at::kInt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attn_bwd_cuda(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& table_, const std::optional<at::Tensor>& lens_, const at::Tensor& lse_,
    const at::Tensor& delta_, double scale, bool deterministic) {
  check_operands("routed_attn_bwd", q_, k_, v_, table_);
  TORCH_CHECK(dout_.sizes() == q_.sizes(), "routed_attn_bwd: dout must have the shape of q ",
              dims(q_.sizes()), ", got ", dims(dout_.sizes()));
  TORCH_CHECK(k_.sizes() == v_.sizes() && k_.size(3) == q_.size(3),
              "routed_attn_bwd: k_pages and v_pages must be [P, Hkv, page_size, D] with q's D, "
              "got ", dims(k_.sizes()), " and ", dims(v_.sizes()), " for q ", dims(q_.sizes()));
  TORCH_CHECK(k_.size(1) > 0 && q_.size(1) % k_.size(1) == 0,
              "routed_attn_bwd: q's heads must be a multiple of k_pages' heads, got ",
              num(q_.size(1)), " and ", num(k_.size(1)));
  TORCH_CHECK(table_.size(0) == q_.size(0), "routed_attn_bwd: page_table must have q's ",
              num(q_.size(0)), " rows, got ", num(table_.size(0)));
  const std::vector<int64_t> stat{q_.size(0), q_.size(1), q_.size(2)};
  TORCH_CHECK(lse_.sizes().equals(stat) && delta_.sizes().equals(stat),
              "routed_attn_bwd: lse and delta must be [B, H, Lq] = ", dims(stat), ", got ",
              dims(lse_.sizes()), " and ", dims(delta_.sizes()));
  TORCH_CHECK(!lens_.has_value() || (lens_->scalar_type() == at::kInt && lens_->dim() == 1 &&
                                     lens_->size(0) == k_.size(0)),
              "routed_attn_bwd: page_lens must be int32 [P], P = ", num(k_.size(0)));
  TORCH_CHECK(table_.numel() < (int64_t(1) << 31),
              "routed_attn_bwd: page_table must have fewer than 2**31 entries, got ",
              num(table_.numel()));
  const auto dt = to_dtype(q_, "routed_attn_bwd");
  TORCH_CHECK(cuda::routed_attention_bwd_supported(dt, q_.size(3)),
              "routed_attn_bwd: the CUDA kernel takes float16/bfloat16 with head_dim 64 or 128, "
              "got ", q_.scalar_type(), " with head_dim ", num(q_.size(3)));
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto q = aligned(q_), k = aligned(k_), v = aligned(v_);
  const auto dout = aligned(dout_.to(q_.scalar_type()));
  const auto table = table_.contiguous();
  const auto lse = lse_.to(at::kFloat).contiguous(), delta = delta_.to(at::kFloat).contiguous();
  std::optional<at::Tensor> lens;
  if (lens_.has_value()) lens = lens_->contiguous();
  const auto [row_ptr, rows] = page_rows_csr(table, k.size(0));
  // The kernels write every element of dq, dk and dv (zeros where no kept key or query reaches),
  // pages no row lists included; the atomics' accumulator starts at zero.
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  at::Tensor dq_accum;
  if (!deterministic) dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  cuda::RoutedAttnBwdParams p{};
  p.dout = dout.const_data_ptr();
  p.q = q.const_data_ptr();
  p.k_pages = k.const_data_ptr();
  p.v_pages = v.const_data_ptr();
  p.page_table = table.const_data_ptr<int32_t>();
  p.page_lens = lens ? lens->const_data_ptr<int32_t>() : nullptr;
  p.lse = lse.const_data_ptr<float>();
  p.delta = delta.const_data_ptr<float>();
  p.row_ptr = row_ptr.const_data_ptr<int32_t>();
  p.rows = rows.const_data_ptr<int32_t>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  set_sizes(p, q, k, table, scale);
  p.deterministic = deterministic;
  const cudaError_t err =
      cuda::routed_attention_bwd(p, dt, c10::cuda::getCurrentCUDAStream().stream());
  // The launcher's refusal of a grid past CUDA's axis limits.
  TORCH_CHECK_VALUE(err != cudaErrorInvalidConfiguration, "routed_attn_bwd: q ",
                    dims(q.sizes()), " with k_pages ", dims(k.sizes()),
                    " is past the CUDA backward's grids (at most 65535 heads and KV heads, 65535 "
                    "tiles of queries, 2**31 - 1 rows and 2**31 - 1 key blocks of pages); "
                    "backend='triton' takes it");
  check_cuda(err, "routed_attn_bwd");
  return {dq, dk, dv};
}

void check_energy(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 3 && a.sizes() == b.sizes(), "velocity_energy: v_pred, v_ref [G, S, N]");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "velocity_energy: v_pred, v_ref dtypes differ");
}

// The kernels read weight [G, S] through its strides: an expanded [S] weight is not copied.
// `held` keeps a converted weight alive until the launch is queued.
cuda::StepWeight step_weight(const std::optional<at::Tensor>& weight, const at::Tensor& a,
                             at::Tensor& held) {
  if (!weight.has_value()) return {nullptr, 0, 0};
  TORCH_CHECK(weight->dim() == 2 && weight->size(0) == a.size(0) && weight->size(1) == a.size(1),
              "velocity_energy: weight must be [G, S]");
  held = weight->to(a.device(), at::kFloat);
  return {held.const_data_ptr<float>(), held.stride(0), held.stride(1)};
}

at::Tensor velocity_energy_fwd_cuda(const at::Tensor& v_pred, const at::Tensor& v_ref,
                                    const std::optional<at::Tensor>& weight, bool mean) {
  check_energy(v_pred, v_ref);
  const auto dt = to_dtype(v_pred, "velocity_energy_fwd");
  const c10::cuda::CUDAGuard guard(v_pred.device());
  const auto a = aligned(v_pred), b = aligned(v_ref);
  at::Tensor held;
  const auto w = step_weight(weight, a, held);
  const auto opts = a.options().dtype(at::kFloat);
  auto energy = at::empty({a.size(0)}, opts);
  auto workspace = at::empty({cuda::velocity_energy_fwd_workspace(a.size(0), a.size(1), a.size(2))},
                             opts);
  check_cuda(cuda::velocity_energy_fwd(a.const_data_ptr(), b.const_data_ptr(), w,
                                       workspace.data_ptr<float>(), energy.data_ptr<float>(),
                                       a.size(0), a.size(1), a.size(2), mean, dt,
                                       c10::cuda::getCurrentCUDAStream().stream()),
             "velocity_energy_fwd");
  return energy;
}

std::tuple<at::Tensor, at::Tensor> velocity_energy_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& v_pred, const at::Tensor& v_ref,
    const std::optional<at::Tensor>& weight, bool mean, bool need_ref) {
  check_energy(v_pred, v_ref);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == v_pred.size(0), "velocity_energy_bwd: grad [G]");
  const auto dt = to_dtype(v_pred, "velocity_energy_bwd");
  const c10::cuda::CUDAGuard guard(v_pred.device());
  const auto a = aligned(v_pred), b = aligned(v_ref);
  at::Tensor held;
  const auto w = step_weight(weight, a, held);
  const auto g = grad.to(a.device(), at::kFloat).contiguous();
  auto da = at::empty_like(a);
  auto db = need_ref ? at::empty_like(b) : at::empty({0}, b.options());
  check_cuda(cuda::velocity_energy_bwd(g.const_data_ptr<float>(), a.const_data_ptr(),
                                       b.const_data_ptr(), w, da.data_ptr(),
                                       need_ref ? db.data_ptr() : nullptr, a.size(0), a.size(1),
                                       a.size(2), mean, dt,
                                       c10::cuda::getCurrentCUDAStream().stream()),
             "velocity_energy_bwd");
  return {da, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(kvpo, CUDA, m) {
  m.impl("routed_attn_fwd", &routed_attn_fwd_cuda);
  m.impl("routed_attn_bwd", &routed_attn_bwd_cuda);
  m.impl("velocity_energy_fwd", &velocity_energy_fwd_cuda);
  m.impl("velocity_energy_bwd", &velocity_energy_bwd_cuda);
}

}  // namespace kvpo
