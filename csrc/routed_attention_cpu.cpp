// CPU kernels for routed paged attention (forward and backward).
//
// Every row b of the batch reads the shared physical pages that its page table lists; nothing is
// copied per row. The forward is a tiled online softmax; the backward recomputes probabilities from
// the saved log-sum-exp once per row and takes dq and the row's dk/dv contributions from them, then
// sums each physical page's contributions through a page -> rows index in row order: no races, and
// the same bits at any thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "message.h"
#include "routed_attention.h"
#include "simd.h"

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

// Query rows per GEMM: the heads of a GQA group that read one KV head are stacked with their
// query rows (a row's pages are staged once for all of them, and staged a few at a time as the
// keys of one product), so the BLAS sees a few large products, not many small.
constexpr int64_t kStackM = 256;
constexpr int64_t kBlockN = 512;  // key tokens per staged block

// Bytes of the backward's per-row dk/dv partials held at once: KVPO_CPU_WORKSPACE_MB, default 16
// (rows run in chunks that fit, at least one row; the chunking changes no result bit).
int64_t workspace_bytes() {
  const char* env = std::getenv("KVPO_CPU_WORKSPACE_MB");
  if (env == nullptr || *env == '\0') return int64_t{16} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(*end == '\0' && mb >= 0 && mb < (int64_t{1} << 40),
              "KVPO_CPU_WORKSPACE_MB must be a non-negative integer (MiB), got '", env, "'");
  return static_cast<int64_t>(mb) << 20;
}

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

// How the forward and dq passes split one (batch row, KV head) into tasks: the group's heads in
// `head_splits` parts of up to kStackHeads, its queries in `count` equal tiles of up to `rows`
// (72 queries are one tile, not 64 + 8), a task's heads x rows stacked as the GEMMs' rows, at
// most kStackM. The split depends on the head counts and Lq alone, never on the batch size or the
// thread count: the BLAS may round a product's row differently when the product has other rows,
// so a row's result would otherwise change with the rows batched beside it (the trainer's anchor
// branch, one row among the group's, is meant to repeat the deployment sample).
constexpr int64_t kStackHeads = 8;  // MQA decoding: 32 heads over 1 KV head are still 4 tasks

struct QueryTiles {
  int64_t count, rows, head_splits, heads;
  int64_t tasks(int64_t B, int64_t Hkv) const { return B * Hkv * head_splits * count; }
};

QueryTiles query_tiles(const Dims& d) {
  const int64_t head_splits = (d.group + kStackHeads - 1) / kStackHeads;
  const int64_t heads = (d.group + head_splits - 1) / head_splits;
  const int64_t most = std::max<int64_t>(1, kStackM / heads);
  const int64_t count = std::max<int64_t>(1, (d.Lq + most - 1) / most);
  return {count, (d.Lq + count - 1) / count, head_splits, heads};
}

// Index into [B, H, Lq] of query i of head g of KV head hk's group, batch row b.
inline int64_t query_index(const Dims& d, int64_t b, int64_t hk, int64_t g, int64_t i) {
  return (b * d.H + hk * d.group + g) * d.Lq + i;
}

// Task w of QueryTiles: batch row b, KV head hk, heads g0 .. g0 + heads of its group, queries
// i0 .. i0 + rows.
struct Task {
  int64_t b, hk, g0, heads, i0, rows;
};

inline Task task_of(const Dims& d, const QueryTiles& tiles, int64_t w) {
  const int64_t tile = w % tiles.count;
  w /= tiles.count;
  const int64_t split = w % tiles.head_splits;
  w /= tiles.head_splits;
  const int64_t g0 = split * tiles.heads, i0 = tile * tiles.rows;
  return {w / d.Hkv, w % d.Hkv, g0, std::min(tiles.heads, d.group - g0), i0,
          std::min(tiles.rows, d.Lq - i0)};
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

constexpr float kLog2e = 1.44269504f;
constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds a float to an integer
constexpr float kLn2Hi = 0.693359375f;      // ln 2 in two parts (Cody-Waite)
constexpr float kLn2Lo = -2.12194440e-4f;

inline float exp_shifted(float* x, int64_t n, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::max(x[i] - shift, -87.0f);
    const float kf = (a * kLog2e + kRoundShift) - kRoundShift;  // round(a / ln2)
    const float r = (a - kf * kLn2Hi) - kf * kLn2Lo;             // a - k ln2
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

// The softmax work between the GEMMs (exponentials, row maxima, rescaling) costs as much as the
// GEMMs at small head dims: the float versions are compiled for AVX2 and AVX-512 too (simd.h).

// One staged block of the online softmax: s [rows, n] scores in, exp(s - new max) out; the
// running max m, sum l and output accumulator acc [rows, D] rescaled to the new max.
template <typename acc_t>
__attribute__((always_inline)) inline void online_softmax_impl(acc_t* s, int64_t rows, int64_t n,
                                                               acc_t* m, acc_t* l, acc_t* acc,
                                                               int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* sr = s + r * n;
    acc_t mx = m[r];
#pragma omp simd reduction(max : mx)
    for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sr[t]);
    const acc_t corr = std::exp(m[r] - mx);  // m[r] = -inf on the first block gives 0
    l[r] = l[r] * corr + exp_shifted(sr, n, mx);
    m[r] = mx;
    acc_t* ar = acc + r * D;
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) ar[c] *= corr;
  }
}

KVPO_SIMD_CLONES void online_softmax(float* s, int64_t rows, int64_t n, float* m, float* l,
                                     float* acc, int64_t D) {
  online_softmax_impl(s, rows, n, m, l, acc, D);
}

void online_softmax(double* s, int64_t rows, int64_t n, double* m, double* l, double* acc,
                    int64_t D) {
  online_softmax_impl(s, rows, n, m, l, acc, D);
}

// dS = P * (dP - delta) for one block of rows, with P = exp(S - lse) written into s.
template <typename acc_t>
__attribute__((always_inline)) inline void softmax_grad_impl(acc_t* s, acc_t* dp,
                                                             const acc_t* lse,
                                                             const acc_t* delta, int64_t rows,
                                                             int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* sr = s + r * n;
    acc_t* dr = dp + r * n;
    exp_shifted(sr, n, lse[r]);
    const acc_t dl = delta[r];
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) dr[t] = sr[t] * (dr[t] - dl);
  }
}

KVPO_SIMD_CLONES void softmax_grad(float* s, float* dp, const float* lse, const float* delta,
                                   int64_t rows, int64_t n) {
  softmax_grad_impl(s, dp, lse, delta, rows, n);
}

void softmax_grad(double* s, double* dp, const double* lse, const double* delta, int64_t rows,
                  int64_t n) {
  softmax_grad_impl(s, dp, lse, delta, rows, n);
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
  const QueryTiles tiles = query_tiles(d);
  const int64_t m_max = tiles.heads * tiles.rows;
  const acc_t sc = static_cast<acc_t>(scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  // Kept pages are staged, a few at a time, into one bounded block per thread, so that each GEMM is
  // large enough for the BLAS to run near its peak; the cache itself is never copied per row.
  const int64_t block_n = staged_block(d.page_size);

  // One task per (batch row, KV head, heads of its group, query tile), the heads' queries
  // stacked as the GEMMs' rows.
  at::parallel_for(0, tiles.tasks(d.B, d.Hkv), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(m_max * d.D), acc(m_max * d.D), kbuf(block_n * d.D),
        vbuf(block_n * d.D), s(m_max * block_n), m(m_max), l(m_max);
    for (int64_t w = begin; w < end; ++w) {
      const Task t = task_of(d, tiles, w);
      if (t.rows <= 0 || t.heads <= 0) continue;
      const int64_t b = t.b, hk = t.hk, i0 = t.i0, rows = t.rows;
      const int64_t M = t.heads * rows;
      for (int64_t g = 0; g < t.heads; ++g) {
        const scalar_t* src = qp + query_index(d, b, hk, t.g0 + g, i0) * d.D;
        acc_t* dst = qbuf.data() + g * rows * d.D;
        for (int64_t x = 0; x < rows * d.D; ++x) dst[x] = static_cast<acc_t>(src[x]) * sc;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));
      int64_t j = 0;
      while (j < d.max_pages) {
        const int64_t n =
            stage_pages(tp + b * d.max_pages, d.max_pages, j, page_lens, kp, vp, d.Hkv, hk,
                        d.page_size, d.D, block_n, kbuf.data(), vbuf.data());
        if (n == 0) continue;
        gemm<acc_t>(false, true, M, n, d.D, qbuf.data(), d.D, kbuf.data(), d.D, 0, s.data(), n);
        online_softmax(s.data(), M, n, m.data(), l.data(), acc.data(), d.D);
        gemm<acc_t>(false, false, M, d.D, n, s.data(), n, vbuf.data(), d.D, 1, acc.data(), d.D);
      }
      for (int64_t r = 0; r < M; ++r) {
        const int64_t qi = query_index(d, b, hk, t.g0 + r / rows, i0 + r % rows);
        const bool empty = !(l[r] > 0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
        for (int64_t c = 0; c < d.D; ++c)
          op[qi * d.D + c] = static_cast<scalar_t>(acc[r * d.D + c] * inv);
        lp[qi] = empty ? neg_inf : m[r] + std::log(l[r]);
      }
    }
  });
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
  scalar_t* dqp = dq.data_ptr<scalar_t>();

  // dk and dv accumulate in acc_t: the output itself when it is acc_t, else a buffer.
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor dk_acc = kSame ? dk.zero_() : at::zeros(dk.sizes(), dk.options().dtype(acc_type));
  at::Tensor dv_acc = kSame ? dv.zero_() : at::zeros(dv.sizes(), dv.options().dtype(acc_type));
  acc_t* dkap = dk_acc.data_ptr<acc_t>();
  acc_t* dvap = dv_acc.data_ptr<acc_t>();

  // Each row's kept tokens, in table order, numbered across the batch: slot x = b * max_pages + j
  // starts at token slot_pos[x]; row b's tokens are [row_start[b], row_start[b + 1]).
  const int64_t slots = d.B * d.max_pages;
  std::vector<int64_t> slot_pos(slots), row_start(d.B + 1, 0);
  for (int64_t x = 0, total = 0; x < slots; ++x) {
    slot_pos[x] = total;
    if (tp[x] >= 0) total += page_len(page_lens, tp[x], d.page_size);
    if ((x + 1) % std::max<int64_t>(d.max_pages, 1) == 0) row_start[x / d.max_pages + 1] = total;
  }
  // Page -> the slots listing it (CSR), in increasing slot order, hence in row order.
  std::vector<int64_t> offsets(d.P + 1, 0);
  for (int64_t x = 0; x < slots; ++x)
    if (tp[x] >= 0) offsets[tp[x] + 1]++;
  for (int64_t p = 0; p < d.P; ++p) offsets[p + 1] += offsets[p];
  std::vector<int64_t> listing(offsets[d.P]);
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t x = 0; x < slots; ++x)
      if (tp[x] >= 0) listing[fill[tp[x]]++] = x;
  }
  if (d.Lq == 0 || d.B == 0) {  // no query: every gradient is zero (16-bit dk/dv too)
    if constexpr (!kSame) {
      dk.zero_();
      dv.zero_();
    }
    return;
  }

  // One pass computes P and dS once per (row, KV head, heads of its group, query tile, staged
  // block) and takes all three gradients from them: dq in the task, and each row's dk, dv
  // contributions as partials [its kept tokens, D] per (KV head, head split), into a workspace.
  // A second pass sums the partials of the rows listing each page in row order. Both the split and
  // that order depend on the shapes alone (never on the batch size or thread count), so dq repeats
  // the row's bits in any batch, and dk, dv repeat theirs; the rows run in chunks whose partials
  // fit workspace_bytes(), which bounds memory without changing any sum.
  const QueryTiles tiles = query_tiles(d);
  const int64_t m_max = tiles.heads * tiles.rows;
  const int64_t block_n = staged_block(d.page_size);
  const int64_t slices = d.Hkv * tiles.head_splits;  // partial sets per row
  const int64_t token_bytes = 2 * slices * d.D * static_cast<int64_t>(sizeof(acc_t));
  const int64_t budget = workspace_bytes();
  const int64_t min_rows = (4 * at::get_num_threads() + slices - 1) / slices;  // work per thread
  std::vector<acc_t> ws_k, ws_v;
  for (int64_t b0 = 0, b1 = 0; b0 < d.B; b0 = b1) {
    b1 = b0 + 1;
    while (b1 < d.B && ((row_start[b1 + 1] - row_start[b0]) * token_bytes <= budget ||
                        b1 - b0 < min_rows))
      ++b1;
    const int64_t chunk_tokens = row_start[b1] - row_start[b0];
    if (static_cast<int64_t>(ws_k.size()) < slices * chunk_tokens * d.D) {
      ws_k.resize(slices * chunk_tokens * d.D);
      ws_v.resize(slices * chunk_tokens * d.D);
    }
    // The slice (KV head, head split) of row b's partials in the workspace.
    auto partial = [&](std::vector<acc_t>& ws, int64_t slice, int64_t token) {
      return ws.data() + (slice * chunk_tokens + token - row_start[b0]) * d.D;
    };

    at::parallel_for(0, (b1 - b0) * slices, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> qbuf(m_max * d.D), dobuf(m_max * d.D), dqacc(m_max * d.D),
          kbuf(block_n * d.D), vbuf(block_n * d.D), s(m_max * block_n), dp(m_max * block_n),
          lbuf(m_max), dbuf(m_max);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t b = b0 + w / slices, slice = w % slices;
        const int64_t hk = slice / tiles.head_splits;
        const int64_t g0 = (slice % tiles.head_splits) * tiles.heads;
        const int64_t heads = std::min(tiles.heads, d.group - g0);
        acc_t* wk = partial(ws_k, slice, row_start[b]);
        acc_t* wv = partial(ws_v, slice, row_start[b]);
        for (int64_t i0 = 0; i0 < d.Lq; i0 += tiles.rows) {
          const int64_t rows = std::min(tiles.rows, d.Lq - i0), M = heads * rows;
          // The heads' queries stacked: q scaled (the scale is exactly d(score)/dk), dout, lse,
          // delta.
          for (int64_t g = 0; g < heads; ++g) {
            const int64_t qi = query_index(d, b, hk, g0 + g, i0), r = g * rows;
            for (int64_t x = 0; x < rows * d.D; ++x) {
              qbuf[r * d.D + x] = static_cast<acc_t>(qp[qi * d.D + x]) * sc;
              dobuf[r * d.D + x] = static_cast<acc_t>(dop[qi * d.D + x]);
            }
            std::copy(lp + qi, lp + qi + rows, lbuf.begin() + r);
            std::copy(dlt + qi, dlt + qi + rows, dbuf.begin() + r);
          }
          std::fill(dqacc.begin(), dqacc.end(), acc_t(0));
          const acc_t beta = i0 == 0 ? 0 : 1;  // the first tile writes the partials
          int64_t j = 0, pos = 0;
          while (j < d.max_pages) {
            const int64_t n =
                stage_pages(tp + b * d.max_pages, d.max_pages, j, page_lens, kp, vp, d.Hkv, hk,
                            d.page_size, d.D, block_n, kbuf.data(), vbuf.data());
            if (n == 0) continue;
            gemm<acc_t>(false, true, M, n, d.D, qbuf.data(), d.D, kbuf.data(), d.D, 0, s.data(),
                        n);
            gemm<acc_t>(false, true, M, n, d.D, dobuf.data(), d.D, vbuf.data(), d.D, 0,
                        dp.data(), n);
            softmax_grad(s.data(), dp.data(), lbuf.data(), dbuf.data(), M, n);
            gemm<acc_t>(false, false, M, d.D, n, dp.data(), n, kbuf.data(), d.D, 1,
                        dqacc.data(), d.D);
            gemm<acc_t>(true, false, n, d.D, M, s.data(), n, dobuf.data(), d.D, beta,
                        wv + pos * d.D, d.D);
            gemm<acc_t>(true, false, n, d.D, M, dp.data(), n, qbuf.data(), d.D, beta,
                        wk + pos * d.D, d.D);
            pos += n;
          }
          for (int64_t g = 0; g < heads; ++g) {
            scalar_t* dst = dqp + query_index(d, b, hk, g0 + g, i0) * d.D;
            const acc_t* src = dqacc.data() + g * rows * d.D;
            for (int64_t x = 0; x < rows * d.D; ++x) dst[x] = static_cast<scalar_t>(src[x] * sc);
          }
        }
      }
    });

    // dk, dv of (page, KV head): its listings by this chunk's rows, in row order.
    at::parallel_for(0, d.P * d.Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t p = w / d.Hkv, hk = w % d.Hkv;
        const int64_t n = page_len(page_lens, p, d.page_size) * d.D;
        const auto first = listing.begin() + offsets[p], last = listing.begin() + offsets[p + 1];
        acc_t* dkw = dkap + w * d.page_size * d.D;
        acc_t* dvw = dvap + w * d.page_size * d.D;
        for (auto e = std::lower_bound(first, last, b0 * d.max_pages);
             e != last && *e < b1 * d.max_pages; ++e) {
          for (int64_t split = 0; split < tiles.head_splits; ++split) {
            const int64_t slice = hk * tiles.head_splits + split;
            const acc_t* pk = partial(ws_k, slice, slot_pos[*e]);
            const acc_t* pv = partial(ws_v, slice, slot_pos[*e]);
#pragma omp simd
            for (int64_t x = 0; x < n; ++x) {
              dkw[x] += pk[x];
              dvw[x] += pv[x];
            }
          }
        }
      }
    });
  }
  if constexpr (!kSame) {
    dk.copy_(dk_acc);
    dv.copy_(dv_acc);
  }
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
    TORCH_CHECK(tp[x] >= -1 && tp[x] < P, "routed_attn: page_table entry ", num(tp[x]),
                " out of range [-1, ", num(P), ")");
  if (page_lens.has_value()) {
    const auto& pl = *page_lens;
    TORCH_CHECK(pl.dim() == 1 && pl.size(0) == P && pl.scalar_type() == at::kInt,
                "routed_attn: page_lens must be int32 [P]");
    const int32_t* lp = pl.const_data_ptr<int32_t>();
    for (int64_t x = 0; x < P; ++x)
      TORCH_CHECK(lp[x] >= 0 && lp[x] <= k_pages.size(2), "routed_attn: page_lens entry ",
                  num(lp[x]), " out of range [0, ", num(k_pages.size(2)), "]");
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
    const at::Tensor& delta_, double scale, bool /*deterministic*/) {
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
