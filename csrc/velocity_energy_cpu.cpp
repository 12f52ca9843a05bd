// CPU kernels for the per-branch Trajectory Velocity Energy.
//
// energy[g] = sum_s weight[g, s] * reduce_n (v_pred[g, s, n] - v_ref[g, s, n])^2, never
// materialising the difference. Squares are summed in double, so a long reduction (tens of
// thousands of tokens per step) stays exact to float32 output precision.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "simd.h"

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

// Rows are split into chunks of a fixed size (never by the thread count), each chunk's partial sum
// kept apart and added in order: a branch's energy is the same bits on any number of threads, and
// a few rows of many elements still spread over all threads.
constexpr int64_t kChunk = int64_t{1} << 14;

inline int64_t chunks_of(int64_t N) { return (N + kChunk - 1) / kChunk; }

// A value as acc_t; bfloat16 from its bits, in a form the compiler vectorises (c10's conversion it
// does not; for float16, GCC's _Float16 conversions measured slower than c10's).
template <typename T>
inline at::opmath_type<T> to_acc(T v) {
  return static_cast<at::opmath_type<T>>(v);
}
template <>
inline float to_acc(c10::BFloat16 v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16);
}

// acc_t back to T; bfloat16 rounded to nearest even as c10 does (NaN stays NaN), vectorisable.
template <typename T>
inline T from_acc(at::opmath_type<T> v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 from_acc(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t r = v != v ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(r >> 16), c10::BFloat16::from_bits());
}

// sum_n (x[n] - y[n])^2, the difference in acc_t, its square summed in double (each SIMD lane a
// double partial sum, so the loop streams at memory speed rather than one add's latency).
template <typename scalar_t>
__attribute__((always_inline)) inline double sq_diff_sum_impl(const scalar_t* x,
                                                              const scalar_t* y, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(to_acc(x[i]) - to_acc(y[i]));
    sum += d * d;
  }
  return sum;
}

// dx = c (x - y) and, where dy is given, dy = -dx.
template <typename scalar_t>
__attribute__((always_inline)) inline void scaled_diff_impl(const scalar_t* x, const scalar_t* y,
                                                            at::opmath_type<scalar_t> c,
                                                            scalar_t* dx, scalar_t* dy,
                                                            int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  if (dy == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      dx[i] = from_acc<scalar_t>(c * (to_acc(x[i]) - to_acc(y[i])));
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = c * (to_acc(x[i]) - to_acc(y[i]));
    dx[i] = from_acc<scalar_t>(g);
    dy[i] = from_acc<scalar_t>(-g);
  }
}

// One overload per dtype: the loops are compiled for AVX2 and AVX-512 too (simd.h), which
// target_clones does only for non-template functions.
#define KVPO_VELOCITY_LOOPS(T)                                                                 \
  KVPO_SIMD_CLONES double sq_diff_sum(const T* x, const T* y, int64_t n) {                    \
    return sq_diff_sum_impl(x, y, n);                                                          \
  }                                                                                            \
  KVPO_SIMD_CLONES void scaled_diff(const T* x, const T* y, at::opmath_type<T> c, T* dx, T* dy, \
                                    int64_t n) {                                               \
    scaled_diff_impl(x, y, c, dx, dy, n);                                                      \
  }
KVPO_VELOCITY_LOOPS(float)
KVPO_VELOCITY_LOOPS(double)
KVPO_VELOCITY_LOOPS(c10::Half)
KVPO_VELOCITY_LOOPS(c10::BFloat16)
#undef KVPO_VELOCITY_LOOPS

template <typename scalar_t>
void fwd_kernel(const at::Tensor& vp, const at::Tensor& vr, const at::Tensor& w, bool mean,
                at::Tensor& energy) {
  const int64_t G = vp.size(0), S = vp.size(1), N = vp.size(2), C = chunks_of(N);
  const scalar_t* a = vp.const_data_ptr<scalar_t>();
  const scalar_t* b = vr.const_data_ptr<scalar_t>();
  std::vector<double> partial(G * S * C, 0.0);
  at::parallel_for(0, G * S * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = (t % C) * kChunk, off = (t / C) * N + n0;
      partial[t] = sq_diff_sum(a + off, b + off, std::min(kChunk, N - n0));
    }
  });
  const double* wp = w.const_data_ptr<double>();
  const double inv_n = mean ? 1.0 / static_cast<double>(N) : 1.0;
  auto e64 = at::empty({G}, energy.options().dtype(at::kDouble));
  double* ep = e64.data_ptr<double>();
  for (int64_t g = 0; g < G; ++g) {
    double s = 0.0;
    for (int64_t k = 0; k < S; ++k) {
      double row = 0.0;
      for (int64_t c = 0; c < C; ++c) row += partial[(g * S + k) * C + c];
      s += wp[g * S + k] * row;
    }
    ep[g] = s * inv_n;
  }
  energy.copy_(e64);
}

template <typename scalar_t>
void bwd_kernel(const at::Tensor& grad, const at::Tensor& vp, const at::Tensor& vr,
                const at::Tensor& w, bool mean, at::Tensor& dvp, at::Tensor* dvr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = vp.size(0), S = vp.size(1), N = vp.size(2), C = chunks_of(N);
  const at::Tensor coef = (grad.to(at::kDouble).unsqueeze(1) * w *
                     (mean ? 2.0 / static_cast<double>(N) : 2.0))
                        .to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat)
                        .contiguous();
  const acc_t* cp = coef.const_data_ptr<acc_t>();
  const scalar_t* a = vp.const_data_ptr<scalar_t>();
  const scalar_t* b = vr.const_data_ptr<scalar_t>();
  scalar_t* da = dvp.data_ptr<scalar_t>();
  scalar_t* db = dvr ? dvr->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, G * S * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = (t % C) * kChunk, off = (t / C) * N + n0;
      scaled_diff(a + off, b + off, cp[t / C], da + off, db ? db + off : nullptr,
                  std::min(kChunk, N - n0));
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
