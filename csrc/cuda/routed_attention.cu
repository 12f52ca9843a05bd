// Routed paged attention forward on CUDA tensor cores (WMMA, fp16/bf16 in, fp32 accumulate).
//
// One CTA = one (row b, query tile of 64, head h); 4 warps, each owning 16 query rows. The CTA
// walks row b's page table; a routed-out page (-1) is skipped without touching its memory, and a
// page is consumed in blocks of 64 keys (the tail of a partly filled page is masked). Per block:
//   S = Q K^T on tensor cores -> shared memory; an online softmax by two lanes per query row
//   (running max m and sum l in registers, probabilities P written back as fp16/bf16, the
//   running output rescaled); O += P V on tensor cores with O kept in shared memory.
// Grid x runs over rows b, fastest, so branches that share history pages run side by side and read
// those pages from L2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>

#include "dtype.cuh"
#include "kernels.h"

namespace kvpo::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kBM = 16 * kWarps;  // query rows per CTA
constexpr int kBN = 64;           // keys per block
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <int D>
struct Layout {
  static constexpr int kLdT = D + 8;    // fp16/bf16 tiles (ldm: multiple of 8 elements)
  static constexpr int kLdS = kBN + 4;  // fp32 scores (ldm: multiple of 4)
  static constexpr int kLdP = kBN + 8;  // fp16/bf16 probabilities
  static constexpr int kLdO = D + 4;    // fp32 output accumulator
  static constexpr size_t kQ = size_t(kBM) * kLdT * 2;
  static constexpr size_t kK = size_t(kBN) * kLdT * 2;
  static constexpr size_t kS = size_t(kWarps) * 16 * kLdS * 4;
  static constexpr size_t kP = size_t(kWarps) * 16 * kLdP * 2;
  static constexpr size_t kO = size_t(kWarps) * 16 * kLdO * 4;
  static constexpr size_t kBytes = kQ + 2 * kK + kS + kP + kO;
  // Every region is a multiple of 32 bytes, so WMMA pointers stay 256-bit aligned.
  static_assert(kQ % 32 == 0 && kK % 32 == 0 && kS % 32 == 0 && kP % 32 == 0 && kO % 32 == 0);
};

// Copies `rows` rows of D elements (row stride D in global memory) into a shared tile of
// stride ld, zero-filling rows [rows, total). 16-byte vectors; D % 8 == 0.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int rows, int total) {
  constexpr int kVecPerRow = D / 8;
  for (int i = threadIdx.x; i < total * kVecPerRow; i += kThreads) {
    const int r = i / kVecPerRow, c = (i % kVecPerRow) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < rows) v = __ldg(reinterpret_cast<const uint4*>(src + int64_t(r) * D + c));
    *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
  }
}

// Two CTAs per SM: at D = 128 a CTA takes 112 KB of shared memory, so two fit an H100's SM. The
// hint also keeps ptxas from spilling the fp16 variants (16-36 bytes without it, at 40-64 of 255
// registers); the build fails on any spill (-warn-spills, tests/kernels/test_cuda_build.py).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) routed_attn_fwd_kernel(RoutedAttnParams p) {
  using L = Layout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + L::kQ);
  T* sV = reinterpret_cast<T*>(smem + L::kQ + L::kK);
  float* sS = reinterpret_cast<float*>(smem + L::kQ + 2 * L::kK);
  T* sP = reinterpret_cast<T*>(smem + L::kQ + 2 * L::kK + L::kS);
  float* sO = reinterpret_cast<float*>(smem + L::kQ + 2 * L::kK + L::kS + L::kP);

  const int64_t b = blockIdx.x, h = blockIdx.z;
  const int64_t q0 = int64_t(blockIdx.y) * kBM;
  const int64_t hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* wS = sS + warp * 16 * L::kLdS;
  T* wP = sP + warp * 16 * L::kLdP;
  float* wO = sO + warp * 16 * L::kLdO;
  const T* q = static_cast<const T*>(p.q) + ((b * p.H + h) * p.Lq + q0) * D;
  const T* kp = static_cast<const T*>(p.k_pages);
  const T* vp = static_cast<const T*>(p.v_pages);

  const int q_rows = static_cast<int>(imin(kBM, p.Lq - q0));
  load_tile<T, D>(sQ, L::kLdT, q, q_rows, kBM);
  for (int i = lane; i < 16 * L::kLdO; i += 32) wO[i] = 0.f;

  // Two lanes per query row: lane 2r and 2r+1 own row r of this warp's 16, half the columns each.
  const int r = lane >> 1, half = lane & 1;
  const float scale_log2 = p.scale * kLog2e;
  float m = -INFINITY, l = 0.f;

  for (int64_t j = 0; j < p.max_pages; ++j) {
    const int32_t page = p.page_table[b * p.max_pages + j];
    if (page < 0) continue;  // routed out: its memory is never read
    int64_t n = p.page_size;
    if (p.page_lens != nullptr) n = imin(p.page_lens[page] > 0 ? p.page_lens[page] : 0, n);
    const int64_t base = ((int64_t(page) * p.Hkv + hk) * p.page_size) * D;
    for (int64_t k0 = 0; k0 < n; k0 += kBN) {
      const int valid = static_cast<int>(imin(kBN, n - k0));
      __syncthreads();  // the previous block's K, V are no longer read
      load_tile<T, D>(sK, L::kLdT, kp + base + k0 * D, valid, kBN);
      load_tile<T, D>(sV, L::kLdT, vp + base + k0 * D, valid, kBN);
      __syncthreads();

      // S = Q K^T for this warp's 16 rows: [16, kBN].
#pragma unroll
      for (int nt = 0; nt < kBN / 16; ++nt) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
          wmma::load_matrix_sync(a, sQ + warp * 16 * L::kLdT + kk * 16, L::kLdT);
          wmma::load_matrix_sync(bt, sK + nt * 16 * L::kLdT + kk * 16, L::kLdT);
          wmma::mma_sync(acc, a, bt, acc);
        }
        wmma::store_matrix_sync(wS + nt * 16, acc, L::kLdS, wmma::mem_row_major);
      }
      __syncwarp();

      // Online softmax over the block (log2 domain).
      constexpr int kCols = kBN / 2;
      float* srow = wS + r * L::kLdS + half * kCols;
      float mx = -INFINITY;
#pragma unroll 8
      for (int c = 0; c < kCols; ++c) {
        const float s = (half * kCols + c < valid) ? srow[c] * scale_log2 : -INFINITY;
        srow[c] = s;
        mx = fmaxf(mx, s);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_new = fmaxf(m, mx);
      // m_new is finite here: every block has at least one valid key.
      const float alpha = exp2f(m - m_new);  // m = -inf on the first block gives 0
      float sum = 0.f;
      T* prow = wP + r * L::kLdP + half * kCols;
#pragma unroll 8
      for (int c = 0; c < kCols; ++c) {
        const float e = exp2f(srow[c] - m_new);
        sum += e;
        prow[c] = from_f<T>(e);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      l = l * alpha + sum;
      m = m_new;
      float* orow = wO + r * L::kLdO + half * (D / 2);
#pragma unroll 8
      for (int c = 0; c < D / 2; ++c) orow[c] *= alpha;
      __syncwarp();

      // O += P V: [16, kBN] x [kBN, D].
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, wO + dt * 16, L::kLdO, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
          wmma::load_matrix_sync(a, wP + kk * 16, L::kLdP);
          wmma::load_matrix_sync(bv, sV + kk * 16 * L::kLdT + dt * 16, L::kLdT);
          wmma::mma_sync(acc, a, bv, acc);
        }
        wmma::store_matrix_sync(wO + dt * 16, acc, L::kLdO, wmma::mem_row_major);
      }
      __syncwarp();
    }
  }

  // Epilogue: normalise and write this warp's rows; rows without a kept token give 0 and -inf.
  const int64_t qi = q0 + warp * 16 + r;
  if (qi < p.Lq) {
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* out = static_cast<T*>(p.out) + ((b * p.H + h) * p.Lq + qi) * D + half * (D / 2);
    const float* orow = wO + r * L::kLdO + half * (D / 2);
#pragma unroll 8
    for (int c = 0; c < D / 2; ++c) out[c] = from_f<T>(orow[c] * inv);
    if (half == 0) p.lse[(b * p.H + h) * p.Lq + qi] = l > 0.f ? m * kLn2 + logf(l) : -INFINITY;
  }
}

template <typename T, int D>
cudaError_t launch(const RoutedAttnParams& p, cudaStream_t stream) {
  const size_t bytes = Layout<D>::kBytes;
  cudaError_t err = cudaFuncSetAttribute(routed_attn_fwd_kernel<T, D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  if (p.B == 0 || p.H == 0 || p.Lq == 0) return cudaSuccess;
  const int64_t tiles = (p.Lq + kBM - 1) / kBM;
  if (tiles > 65535 || p.H > 65535 || p.B > 2147483647LL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(p.B), static_cast<unsigned>(tiles),
                  static_cast<unsigned>(p.H));
  routed_attn_fwd_kernel<T, D><<<grid, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool routed_attention_fwd_supported(DType dt, int64_t head_dim) {
  return (dt == DType::kFloat16 || dt == DType::kBFloat16) && (head_dim == 64 || head_dim == 128);
}

cudaError_t routed_attention_fwd(const RoutedAttnParams& p, DType dt, cudaStream_t stream) {
  if (!routed_attention_fwd_supported(dt, p.D) || p.Hkv <= 0 || p.H % p.Hkv != 0)
    return cudaErrorInvalidValue;
  if (dt == DType::kFloat16)
    return p.D == 64 ? launch<__half, 64>(p, stream) : launch<__half, 128>(p, stream);
  return p.D == 64 ? launch<__nv_bfloat16, 64>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
}

}  // namespace kvpo::cuda
