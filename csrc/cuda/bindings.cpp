// torch bindings of the CUDA kernels in csrc/cuda/*.cu (which see no torch headers): checks,
// allocation, the current stream, and TORCH_LIBRARY_IMPL(kvpo, CUDA, ...). Compiled only into CUDA
// builds of kvpo_kernels._C. kvpo::routed_attn_bwd has no CUDA kernel here: the Python layer runs
// the Triton backward for backend "cuda".
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

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

std::tuple<at::Tensor, at::Tensor> routed_attn_fwd_cuda(const at::Tensor& q_,
                                                        const at::Tensor& k_,
                                                        const at::Tensor& v_,
                                                        const at::Tensor& table_,
                                                        const std::optional<at::Tensor>& lens_,
                                                        double scale) {
  TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4 && table_.dim() == 2,
              "routed_attn_fwd: q [B, H, Lq, D], k/v pages [P, Hkv, page_size, D], table [B, N]");
  TORCH_CHECK(q_.scalar_type() == k_.scalar_type() && q_.scalar_type() == v_.scalar_type(),
              "routed_attn_fwd: q, k_pages, v_pages must share a dtype");
  TORCH_CHECK(table_.scalar_type() == at::kInt, "routed_attn_fwd: page_table must be int32");
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
  p.B = q.size(0);
  p.H = q.size(1);
  p.Lq = q.size(2);
  p.D = q.size(3);
  p.P = k.size(0);
  p.Hkv = k.size(1);
  p.page_size = k.size(2);
  p.max_pages = table.size(1);
  p.scale = static_cast<float>(scale);
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
  m.impl("velocity_energy_fwd", &velocity_energy_fwd_cuda);
  m.impl("velocity_energy_bwd", &velocity_energy_bwd_cuda);
}

}  // namespace kvpo
