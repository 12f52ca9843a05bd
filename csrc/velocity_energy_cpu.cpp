// CPU kernels for the per-branch Trajectory Velocity Energy.
//
// energy[g] = sum_s weight[g, s] * reduce_n (v_pred[g, s, n] - v_ref[g, s, n])^2, never
// materialising the difference. Per-(g, s) partial sums are accumulated in double, so a long
// reduction (tens of thousands of tokens per step) stays exact to float32 output precision.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

namespace kvpo {
namespace {

// weight [G, S] (any strides) as a contiguous double tensor; ones when absent.
at::Tensor checked_weight(const at::Tensor& v_pred, const at::Tensor& v_ref,
                          const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(v_pred.dim() == 3, "velocity_energy: v_pred must be viewed as [G, S, N]");
  TORCH_CHECK(v_pred.sizes() == v_ref.sizes(), "velocity_energy: v_pred and v_ref differ in shape");
  TORCH_CHECK(v_pred.scalar_type() == v_ref.scalar_type(), "velocity_energy: dtypes differ");
  const auto opts = v_pred.options().dtype(at::kDouble);
  if (!weight.has_value()) return at::ones({v_pred.size(0), v_pred.size(1)}, opts);
  TORCH_CHECK(weight->dim() == 2 && weight->size(0) == v_pred.size(0) &&
                  weight->size(1) == v_pred.size(1),
              "velocity_energy: weight must be [G, S]");
  return weight->to(opts).contiguous();
}

template <typename scalar_t>
void fwd_kernel(const at::Tensor& vp, const at::Tensor& vr, const at::Tensor& w, bool mean,
                at::Tensor& energy) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = vp.size(0), S = vp.size(1), N = vp.size(2);
  const scalar_t* a = vp.const_data_ptr<scalar_t>();
  const scalar_t* b = vr.const_data_ptr<scalar_t>();
  std::vector<double> partial(G * S, 0.0);
  at::parallel_for(0, G * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gs = begin; gs < end; ++gs) {
      const scalar_t* x = a + gs * N;
      const scalar_t* y = b + gs * N;
      double sum = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const double d = static_cast<double>(static_cast<acc_t>(x[n]) - static_cast<acc_t>(y[n]));
        sum += d * d;
      }
      partial[gs] = sum;
    }
  });
  const double* wp = w.const_data_ptr<double>();
  const double inv_n = mean ? 1.0 / static_cast<double>(N) : 1.0;
  auto e64 = at::empty({G}, energy.options().dtype(at::kDouble));
  double* ep = e64.data_ptr<double>();
  for (int64_t g = 0; g < G; ++g) {
    double s = 0.0;
    for (int64_t k = 0; k < S; ++k) s += wp[g * S + k] * partial[g * S + k];
    ep[g] = s * inv_n;
  }
  energy.copy_(e64);
}

template <typename scalar_t>
void bwd_kernel(const at::Tensor& grad, const at::Tensor& vp, const at::Tensor& vr,
                const at::Tensor& w, bool mean, at::Tensor& dvp, at::Tensor* dvr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = vp.size(0), S = vp.size(1), N = vp.size(2);
  const at::Tensor coef = (grad.to(at::kDouble).unsqueeze(1) * w *
                     (mean ? 2.0 / static_cast<double>(N) : 2.0))
                        .to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat)
                        .contiguous();
  const acc_t* cp = coef.const_data_ptr<acc_t>();
  const scalar_t* a = vp.const_data_ptr<scalar_t>();
  const scalar_t* b = vr.const_data_ptr<scalar_t>();
  scalar_t* da = dvp.data_ptr<scalar_t>();
  scalar_t* db = dvr ? dvr->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, G * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gs = begin; gs < end; ++gs) {
      const acc_t c = cp[gs];
      for (int64_t n = gs * N; n < (gs + 1) * N; ++n) {
        const acc_t g = c * (static_cast<acc_t>(a[n]) - static_cast<acc_t>(b[n]));
        da[n] = static_cast<scalar_t>(g);
        if (db) db[n] = static_cast<scalar_t>(-g);
      }
    }
  });
}

}  // namespace

// v_pred, v_ref: [G, S, N]; weight: [G, S] (float32 or float64, any strides) or none (ones).
// Returns energy [G] (float32, float64 for float64 inputs).
at::Tensor velocity_energy_fwd_cpu(const at::Tensor& v_pred_, const at::Tensor& v_ref_,
                                   const std::optional<at::Tensor>& weight_, bool mean) {
  const auto v_pred = v_pred_.contiguous(), v_ref = v_ref_.contiguous();
  const auto weight = checked_weight(v_pred, v_ref, weight_);
  const auto acc_type = v_pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto energy = at::empty({v_pred.size(0)}, v_pred.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v_pred.scalar_type(),
                                  "velocity_energy_fwd_cpu",
                                  [&] { fwd_kernel<scalar_t>(v_pred, v_ref, weight, mean, energy); });
  return energy;
}

// grad: [G]. Returns d v_pred and d v_ref (an empty tensor when need_ref is false).
std::tuple<at::Tensor, at::Tensor> velocity_energy_bwd_cpu(const at::Tensor& grad,
                                                           const at::Tensor& v_pred_,
                                                           const at::Tensor& v_ref_,
                                                           const std::optional<at::Tensor>& weight_,
                                                           bool mean, bool need_ref) {
  const auto v_pred = v_pred_.contiguous(), v_ref = v_ref_.contiguous();
  const auto weight = checked_weight(v_pred, v_ref, weight_);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == v_pred.size(0), "velocity_energy_bwd: grad [G]");
  auto dvp = at::empty_like(v_pred);
  auto dvr = need_ref ? at::empty_like(v_ref) : at::empty({0}, v_ref.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v_pred.scalar_type(),
                                  "velocity_energy_bwd_cpu", [&] {
                                    bwd_kernel<scalar_t>(grad, v_pred, v_ref, weight, mean, dvp,
                                                         need_ref ? &dvr : nullptr);
                                  });
  return {dvp, dvr};
}

TORCH_LIBRARY_IMPL(kvpo, CPU, m) {
  m.impl("velocity_energy_fwd", &velocity_energy_fwd_cpu);
  m.impl("velocity_energy_bwd", &velocity_energy_bwd_cpu);
}

}  // namespace kvpo
