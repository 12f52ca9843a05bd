// CPU kernels for routed paged attention (forward and backward).
//
// Every row b of the batch reads the shared physical pages that its page table lists; nothing is
// copied per row. The forward is a tiled online softmax; the backward recomputes probabilities from
// the saved log-sum-exp, computes dq per row, and dk/dv per physical page through a page -> rows
// index, so a page shared by several rows accumulates its gradient without races.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "routed_attention.h"

// Fortran BLAS of the BLAS library that torch bundles; weak, so a torch without them still loads
// this extension and the kernels fall back to plain loops.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*)
    __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace kvpo {
namespace {

constexpr int64_t kTileM = 64;   // query rows per task
constexpr int64_t kBlockN = 512;  // key tokens per staged block (forward)

struct Dims {
  int64_t B, H, Lq, D, P, Hkv, page_size, max_pages, group;
};

Dims get_dims(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& page_table) {
  Dims d;
  d.B = q.size(0);
  d.H = q.size(1);
  d.Lq = q.size(2);
  d.D = q.size(3);
  d.P = k_pages.size(0);
  d.Hkv = k_pages.size(1);
  d.page_size = k_pages.size(2);
  d.max_pages = page_table.size(1);
  d.group = d.H / d.Hkv;
  return d;
}

inline int64_t page_len(const int32_t* page_lens, int64_t p, int64_t page_size) {
  return page_lens ? static_cast<int64_t>(page_lens[p]) : page_size;
}

// Row-major C[M, N] = op(A) op(B) + beta * C, op(X) = X^T when the flag is set. A row-major matrix
// is its transpose in column-major order, so the column-major BLAS computes C^T = op(B)^T op(A)^T
// with the same flags and the operands swapped.
template <typename T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&cb, &ca, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_) return dgemm_(&cb, &ca, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      T s = 0;
      for (int64_t x = 0; x < K; ++x)
        s += (ta ? A[x * lda + i] : A[i * lda + x]) * (tb ? B[j * ldb + x] : B[x * ldb + j]);
      C[i * ldc + j] = s + (beta == T(0) ? T(0) : beta * C[i * ldc + j]);
    }
}

// x[i] <- exp(x[i] - shift) over a row, returning the sum. The float version is written so that
// the compiler vectorizes it (range reduction by the round-to-nearest magic constant, a degree-6
// polynomial on [-ln2/2, ln2/2]; ~1 ulp); arguments are <= 0 here, clamped at -87 where exp
// underflows anyway relative to the row's largest term, 1.
inline double exp_shifted(double* x, int64_t n, double shift) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
}

inline float exp_shifted(float* x, int64_t n, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::max(x[i] - shift, -87.0f);
    const float kf = (a * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(a / ln2)
    const float r = (a - kf * 0.693359375f) + kf * 2.12194440e-4f;    // a - k ln2, two parts
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    x[i] = p * __builtin_bit_cast(float, (static_cast<int32_t>(kf) + 127) << 23);
  }
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return sum;
}

// A page's K or V tile as acc_t: the page memory itself when no conversion is needed, else a copy.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

// Tokens per staged block: whole pages, about kBlockN tokens (at least one page).
inline int64_t staged_block(int64_t page_size) {
  return std::max(page_size, kBlockN - kBlockN % page_size);
}

// Copies kept pages of one row's table, from slot j on, into kbuf/vbuf (as acc_t) until the
// next page would overflow block_n tokens; returns the tokens staged and advances j. Routed-out
// pages (-1) are skipped without reading their memory.
template <typename scalar_t, typename acc_t>
inline int64_t stage_pages(const int32_t* row_table, int64_t max_pages, int64_t& j,
                           const int32_t* page_lens, const scalar_t* kp, const scalar_t* vp,
                           int64_t Hkv, int64_t hk, int64_t page_size, int64_t D, int64_t block_n,
                           acc_t* kbuf, acc_t* vbuf) {
  int64_t n = 0;
  for (; j < max_pages; ++j) {
    const int64_t p = row_table[j];
    if (p < 0) continue;
    const int64_t len = page_len(page_lens, p, page_size);
    if (n + len > block_n) break;
    const int64_t base = ((p * Hkv + hk) * page_size) * D;
    for (int64_t x = 0; x < len * D; ++x) {
      kbuf[n * D + x] = static_cast<acc_t>(kp[base + x]);
      vbuf[n * D + x] = static_cast<acc_t>(vp[base + x]);
    }
    n += len;
  }
  return n;
}

template <typename scalar_t>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                const at::Tensor& page_table, const int32_t* page_lens, double scale,
                at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims d = get_dims(q, k_pages, page_table);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k_pages.const_data_ptr<scalar_t>();
  const scalar_t* vp = v_pages.const_data_ptr<scalar_t>();
  const int32_t* tp = page_table.const_data_ptr<int32_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const int64_t n_tiles = (d.Lq + kTileM - 1) / kTileM;
  const acc_t sc = static_cast<acc_t>(scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  // Kept pages are staged, a few at a time, into one bounded block per thread, so that each GEMM is
  // large enough for the BLAS to run near its peak; the cache itself is never copied per row.
  const int64_t block_n = staged_block(d.page_size);

  at::parallel_for(0, d.B * d.H * n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(kTileM * d.D), acc(kTileM * d.D), kbuf(block_n * d.D),
        vbuf(block_n * d.D), s(kTileM * block_n);
    acc_t m[kTileM], l[kTileM];
    for (int64_t w = begin; w < end; ++w) {
      const int64_t tile = w % n_tiles;
      const int64_t bh = w / n_tiles;
      const int64_t b = bh / d.H, h = bh % d.H, hk = h / d.group;
      const int64_t i0 = tile * kTileM, rows = std::min(kTileM, d.Lq - i0);
      const scalar_t* qrow = qp + (bh * d.Lq + i0) * d.D;
      for (int64_t x = 0; x < rows * d.D; ++x) qbuf[x] = static_cast<acc_t>(qrow[x]) * sc;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m, m + kTileM, neg_inf);
      std::fill(l, l + kTileM, acc_t(0));
      int64_t j = 0;
      while (j < d.max_pages) {
        const int64_t n =
            stage_pages(tp + b * d.max_pages, d.max_pages, j, page_lens, kp, vp, d.Hkv, hk,
                        d.page_size, d.D, block_n, kbuf.data(), vbuf.data());
        if (n == 0) continue;
        gemm<acc_t>(false, true, rows, n, d.D, qbuf.data(), d.D, kbuf.data(), d.D, 0, s.data(), n);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* sr = s.data() + r * n;
          acc_t mx = m[r];
#pragma omp simd reduction(max : mx)
          for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sr[t]);
          const acc_t corr = std::exp(m[r] - mx);  // m[r] = -inf on the first block gives 0
          l[r] = l[r] * corr + exp_shifted(sr, n, mx);
          m[r] = mx;
          acc_t* ar = acc.data() + r * d.D;
          for (int64_t c = 0; c < d.D; ++c) ar[c] *= corr;
        }
        gemm<acc_t>(false, false, rows, d.D, n, s.data(), n, vbuf.data(), d.D, 1, acc.data(), d.D);
      }
      scalar_t* orow = op + (bh * d.Lq + i0) * d.D;
      acc_t* lrow = lp + bh * d.Lq + i0;
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = !(l[r] > 0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
        for (int64_t c = 0; c < d.D; ++c)
          orow[r * d.D + c] = static_cast<scalar_t>(acc[r * d.D + c] * inv);
        lrow[r] = empty ? neg_inf : m[r] + std::log(l[r]);
      }
    }
  });
}

// dS = P * (dP - delta) for one (query tile, page) block, with P = exp(S - lse) written into s.
template <typename acc_t>
inline void softmax_grad(acc_t* s, acc_t* dp, const acc_t* lse, const acc_t* delta, int64_t rows,
                         int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* sr = s + r * n;
    acc_t* dr = dp + r * n;
    exp_shifted(sr, n, lse[r]);
    for (int64_t t = 0; t < n; ++t) dr[t] = sr[t] * (dr[t] - delta[r]);
  }
}

template <typename scalar_t>
void bwd_kernel(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                const at::Tensor& page_table, const int32_t* page_lens, double scale,
                const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& delta,
                at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims d = get_dims(q, k_pages, page_table);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k_pages.const_data_ptr<scalar_t>();
  const scalar_t* vp = v_pages.const_data_ptr<scalar_t>();
  const scalar_t* dop = dout.const_data_ptr<scalar_t>();
  const int32_t* tp = page_table.const_data_ptr<int32_t>();
  const acc_t* lp = lse.const_data_ptr<acc_t>();
  const acc_t* dlt = delta.const_data_ptr<acc_t>();
  const acc_t sc = static_cast<acc_t>(scale);
  const int64_t n_tiles = (d.Lq + kTileM - 1) / kTileM;

  // Loads a query tile (scaled: the scale is exactly d(score)/dk) and its output gradient.
  auto load_rows = [&](int64_t bh, int64_t i0, int64_t rows, acc_t* qbuf, acc_t* dobuf) {
    const int64_t off = (bh * d.Lq + i0) * d.D;
    for (int64_t x = 0; x < rows * d.D; ++x) {
      qbuf[x] = static_cast<acc_t>(qp[off + x]) * sc;
      dobuf[x] = static_cast<acc_t>(dop[off + x]);
    }
  };

  // dq: one task per (row, head, query tile), walking the row's table like the forward.
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  const int64_t block_n = staged_block(d.page_size);
  at::parallel_for(0, d.B * d.H * n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(kTileM * d.D), dobuf(kTileM * d.D), dqacc(kTileM * d.D),
        kbuf(block_n * d.D), vbuf(block_n * d.D), s(kTileM * block_n), dp(kTileM * block_n);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t tile = w % n_tiles;
      const int64_t bh = w / n_tiles;
      const int64_t b = bh / d.H, h = bh % d.H, hk = h / d.group;
      const int64_t i0 = tile * kTileM, rows = std::min(kTileM, d.Lq - i0);
      load_rows(bh, i0, rows, qbuf.data(), dobuf.data());
      std::fill(dqacc.begin(), dqacc.end(), acc_t(0));
      int64_t j = 0;
      while (j < d.max_pages) {
        // Pages staged into blocks as in the forward, so the GEMMs are large.
        const int64_t n =
            stage_pages(tp + b * d.max_pages, d.max_pages, j, page_lens, kp, vp, d.Hkv, hk,
                        d.page_size, d.D, block_n, kbuf.data(), vbuf.data());
        if (n == 0) continue;
        gemm<acc_t>(false, true, rows, n, d.D, qbuf.data(), d.D, kbuf.data(), d.D, 0, s.data(), n);
        gemm<acc_t>(false, true, rows, n, d.D, dobuf.data(), d.D, vbuf.data(), d.D, 0, dp.data(),
                    n);
        softmax_grad(s.data(), dp.data(), lp + bh * d.Lq + i0, dlt + bh * d.Lq + i0, rows, n);
        gemm<acc_t>(false, false, rows, d.D, n, dp.data(), n, kbuf.data(), d.D, 1, dqacc.data(),
                    d.D);
      }
      const int64_t off = (bh * d.Lq + i0) * d.D;
      for (int64_t x = 0; x < rows * d.D; ++x) dqp[off + x] = static_cast<scalar_t>(dqacc[x] * sc);
    }
  });

  // page -> (rows) index in CSR form, so each task owns one physical page and one KV head.
  std::vector<int64_t> offsets(d.P + 1, 0);
  for (int64_t x = 0; x < d.B * d.max_pages; ++x)
    if (tp[x] >= 0) offsets[tp[x] + 1]++;
  for (int64_t p = 0; p < d.P; ++p) offsets[p + 1] += offsets[p];
  std::vector<int64_t> rows_of(offsets[d.P]);
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t x = 0; x < d.B * d.max_pages; ++x)
      if (tp[x] >= 0) rows_of[fill[tp[x]]++] = x / d.max_pages;
  }

  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();
  at::parallel_for(0, d.P * d.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kbuf(d.page_size * d.D), vbuf(d.page_size * d.D),
        dkacc(d.page_size * d.D), dvacc(d.page_size * d.D), qbuf(kTileM * d.D),
        dobuf(kTileM * d.D), s(kTileM * d.page_size), dp(kTileM * d.page_size);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t p = w / d.Hkv, hk = w % d.Hkv;
      const int64_t base = w * d.page_size * d.D;
      const int64_t n = page_len(page_lens, p, d.page_size);
      std::fill(dkacc.begin(), dkacc.end(), acc_t(0));
      std::fill(dvacc.begin(), dvacc.end(), acc_t(0));
      if (n > 0 && offsets[p + 1] > offsets[p]) {
        const acc_t* kt = as_acc(kp + base, kbuf.data(), n * d.D);
        const acc_t* vt = as_acc(vp + base, vbuf.data(), n * d.D);
        for (int64_t e = offsets[p]; e < offsets[p + 1]; ++e) {
          const int64_t b = rows_of[e];
          for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h) {
            const int64_t bh = b * d.H + h;
            for (int64_t i0 = 0; i0 < d.Lq; i0 += kTileM) {
              const int64_t rows = std::min(kTileM, d.Lq - i0);
              load_rows(bh, i0, rows, qbuf.data(), dobuf.data());
              gemm<acc_t>(false, true, rows, n, d.D, qbuf.data(), d.D, kt, d.D, 0, s.data(), n);
              gemm<acc_t>(false, true, rows, n, d.D, dobuf.data(), d.D, vt, d.D, 0, dp.data(), n);
              softmax_grad(s.data(), dp.data(), lp + bh * d.Lq + i0, dlt + bh * d.Lq + i0, rows,
                           n);
              gemm<acc_t>(true, false, n, d.D, rows, s.data(), n, dobuf.data(), d.D, 1,
                          dvacc.data(), d.D);
              gemm<acc_t>(true, false, n, d.D, rows, dp.data(), n, qbuf.data(), d.D, 1,
                          dkacc.data(), d.D);
            }
          }
        }
      }
      for (int64_t x = 0; x < d.page_size * d.D; ++x) {
        dkp[base + x] = static_cast<scalar_t>(dkacc[x]);
        dvp[base + x] = static_cast<scalar_t>(dvacc[x]);
      }
    }
  });
}

void check_common(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                  const at::Tensor& page_table, const std::optional<at::Tensor>& page_lens) {
  TORCH_CHECK(q.dim() == 4 && k_pages.dim() == 4 && v_pages.dim() == 4,
              "routed_attn: q, k_pages, v_pages must be 4-D");
  TORCH_CHECK(k_pages.sizes() == v_pages.sizes(), "routed_attn: k_pages and v_pages differ in shape");
  TORCH_CHECK(q.size(3) == k_pages.size(3), "routed_attn: head dim of q and k_pages differ");
  TORCH_CHECK(k_pages.size(1) > 0 && q.size(1) % k_pages.size(1) == 0,
              "routed_attn: H must be a multiple of Hkv");
  TORCH_CHECK(page_table.dim() == 2 && page_table.size(0) == q.size(0) &&
                  page_table.scalar_type() == at::kInt,
              "routed_attn: page_table must be int32 [B, max_pages]");
  TORCH_CHECK(q.scalar_type() == k_pages.scalar_type() && q.scalar_type() == v_pages.scalar_type(),
              "routed_attn: q, k_pages, v_pages must share a dtype");
  const int64_t P = k_pages.size(0);
  const int32_t* tp = page_table.const_data_ptr<int32_t>();
  for (int64_t x = 0; x < page_table.numel(); ++x)
    TORCH_CHECK(tp[x] >= -1 && tp[x] < P, "routed_attn: page_table entry ", tp[x],
                " out of range [-1, ", P, ")");
  if (page_lens.has_value()) {
    const auto& pl = *page_lens;
    TORCH_CHECK(pl.dim() == 1 && pl.size(0) == P && pl.scalar_type() == at::kInt,
                "routed_attn: page_lens must be int32 [P]");
    const int32_t* lp = pl.const_data_ptr<int32_t>();
    for (int64_t x = 0; x < P; ++x)
      TORCH_CHECK(lp[x] >= 0 && lp[x] <= k_pages.size(2), "routed_attn: page_lens entry ", lp[x],
                  " out of range [0, ", k_pages.size(2), "]");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> routed_attn_fwd_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                       const at::Tensor& v_,
                                                       const at::Tensor& table_,
                                                       const std::optional<at::Tensor>& lens_,
                                                       double scale) {
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto table = table_.contiguous();
  std::optional<at::Tensor> lens;
  if (lens_.has_value()) lens = lens_->contiguous();
  check_common(q, k, v, table, lens);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_type));
  const int32_t* lp = lens ? lens->const_data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "routed_attn_fwd_cpu",
                                  [&] { fwd_kernel<scalar_t>(q, k, v, table, lp, scale, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attn_bwd_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& table_, const std::optional<at::Tensor>& lens_, const at::Tensor& lse_,
    const at::Tensor& delta_, double scale) {
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto table = table_.contiguous(), dout = dout_.contiguous();
  std::optional<at::Tensor> lens;
  if (lens_.has_value()) lens = lens_->contiguous();
  check_common(q, k, v, table, lens);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto lse = lse_.to(acc_type).contiguous(), delta = delta_.to(acc_type).contiguous();
  TORCH_CHECK(dout.sizes() == q.sizes(), "routed_attn_bwd: dout must have the shape of q");
  TORCH_CHECK(lse.sizes() == delta.sizes() && lse.dim() == 3, "routed_attn_bwd: lse/delta shape");
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  const int32_t* lp = lens ? lens->const_data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "routed_attn_bwd_cpu",
      [&] { bwd_kernel<scalar_t>(q, k, v, table, lp, scale, dout.to(q.scalar_type()), lse, delta, dq, dk, dv); });
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(kvpo, CPU, m) {
  m.impl("routed_attn_fwd", &routed_attn_fwd_cpu);
  m.impl("routed_attn_bwd", &routed_attn_bwd_cpu);
}

}  // namespace kvpo
