// Routed paged attention forward on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32
// accumulate), FlashAttention-2 style with everything per query row in registers.
//
// One CTA = one (row b, tile of 64 queries, head h); 4 warps, each owning 16 query rows. The CTA
// walks row b's page table; a routed-out page (-1) is skipped without touching its memory, and a
// page is consumed in blocks of 64 keys whose rows past the page's fill are zero-filled and masked.
// K and V blocks stream through shared memory in two stages with cp.async: the next block's copy
// runs while the tensor cores work on the current one. Per block and warp:
//   S = Q K^T      Q fragments held in registers for the whole walk, K read with ldmatrix;
//   online softmax on the S accumulators (a query row's 64 scores live in the 4 lanes of a quad:
//                  two shuffles give its max); the probabilities are repacked in registers as the
//                  A operand of the next product, never written to memory;
//   O += P V       V read with ldmatrix.trans, O accumulated in registers.
// Grid x runs over rows b, fastest, so branches that share history pages run side by side and read
// those pages from L2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "mma_sm80.cuh"
#include "routed_attention_sm90.h"

namespace kvpo::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kBM = 16 * kWarps;  // query rows per CTA
constexpr int kBN = 64;           // keys per block
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory tiles: rows of D elements padded by 8 (16 bytes), so the 8 rows an ldmatrix
// reads start in 8 different 16-byte bank groups (no bank conflicts) and stay 16-byte aligned for
// cp.async.
template <int D>
struct Layout {
  static constexpr int kLd = D + 8;
  static constexpr int kQ = kBM * kLd;  // elements
  static constexpr int kKV = kBN * kLd;
  static constexpr size_t kBytes = size_t(kQ + 4 * kKV) * 2;  // Q, 2 stages of K and V
};

__device__ __forceinline__ bool advance(Cursor& c, const RoutedAttnParams& p, int64_t b,
                                        int64_t hk, int D) {
  if (c.k0 + kBN < c.n) {
    c.k0 += kBN;
    return true;
  }
  return first_from(c, c.j + 1, p, b, hk, D);
}

// Queues the copy of one block of K and V (rows past the page's fill zero-filled).
template <typename T, int D>
__device__ __forceinline__ void load_kv(T* sK, T* sV, const T* kp, const T* vp, const Cursor& c) {
  using L = Layout<D>;
  constexpr int kVecPerRow = D / 8;
  const int valid = static_cast<int>(imin(kBN, c.n - c.k0));
  const T* k = kp + c.base + c.k0 * D;
  const T* v = vp + c.base + c.k0 * D;
#pragma unroll
  for (int i = threadIdx.x; i < kBN * kVecPerRow; i += kThreads) {
    const int r = i / kVecPerRow, col = (i % kVecPerRow) * 8;
    const bool in = r < valid;
    const int64_t off = in ? int64_t(r) * D + col : 0;
    cp_async16(sK + r * L::kLd + col, k + off, in ? 16 : 0);
    cp_async16(sV + r * L::kLd + col, v + off, in ? 16 : 0);
  }
}

// Two CTAs per SM: at D = 128 a CTA holds 87 KB of shared memory.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) routed_attn_fwd_kernel(RoutedAttnParams p) {
  using L = Layout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  // Q, then stage 0's K and V, then stage 1's.
  T* sQ = reinterpret_cast<T*>(smem);
  auto sK = [&](int stage) { return sQ + L::kQ + 2 * stage * L::kKV; };
  auto sV = [&](int stage) { return sQ + L::kQ + (2 * stage + 1) * L::kKV; };

  const int64_t b = blockIdx.x, h = blockIdx.z;
  const int64_t q0 = int64_t(blockIdx.y) * kBM;
  const int64_t hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad_row = lane / 4, quad_col = lane % 4;  // mma fragment coordinates
  const T* q = static_cast<const T*>(p.q) + ((b * p.H + h) * p.Lq + q0) * D;
  const T* kp = static_cast<const T*>(p.k_pages);
  const T* vp = static_cast<const T*>(p.v_pages);

  // Q tile -> shared (rows past Lq zero-filled), in the first copy group with the first K/V block.
  const int q_rows = static_cast<int>(imin(kBM, p.Lq - q0));
  constexpr int kVecPerRow = D / 8;
  for (int i = threadIdx.x; i < kBM * kVecPerRow; i += kThreads) {
    const int r = i / kVecPerRow, col = (i % kVecPerRow) * 8;
    const bool in = r < q_rows;
    cp_async16(sQ + r * L::kLd + col, q + (in ? int64_t(r) * D + col : 0), in ? 16 : 0);
  }
  Cursor cur;
  bool have = first_from(cur, 0, p, b, hk, D);
  if (have) load_kv<T, D>(sK(0), sV(0), kp, vp, cur);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // This warp's 16 query rows as A fragments, one per 16 columns of D.
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
    const int col = kk * 16 + (lane / 16) * 8;
    ldmatrix_x4(qf[kk], sQ + row * L::kLd + col);
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  // Rows quad_row and quad_row + 8 of the warp's 16: running max (log2 domain) and this lane's
  // part of the running sum (the quad's four parts are added at the end).
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;

  for (int stage = 0; have; stage ^= 1) {
    Cursor nxt = cur;
    const bool more = advance(nxt, p, b, hk, D);
    if (more) load_kv<T, D>(sK(stage ^ 1), sV(stage ^ 1), kp, vp, nxt);
    cp_async_commit();
    cp_async_wait<1>();  // this block's copy is done (the next one may still run)
    __syncthreads();
    const T* k = sK(stage);
    const T* v = sV(stage);
    const int valid = static_cast<int>(imin(kBN, cur.n - cur.k0));

    // S = Q K^T: [16, 64] per warp, 8 tiles of 8 keys.
    float s[kBN / 8][4];
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        // matrices: keys +0..7 / +8..15 (by lane / 16) x columns +0..7 / +8..15 (by lane / 8 % 2)
        uint32_t kb[4];
        const int key = np * 16 + (lane % 8) + (lane / 16) * 8;
        const int col = kk * 16 + ((lane / 8) % 2) * 8;
        ldmatrix_x4(kb, k + key * L::kLd + col);
        mma16816<T>(s[2 * np], qf[kk], kb[0], kb[1]);
        mma16816<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // Online softmax. Lane holds, for 8-key tile i, keys i*8 + quad_col*2 + {0, 1} of rows
    // quad_row (s[i][0..1]) and quad_row + 8 (s[i][2..3]).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = i * 8 + quad_col * 2 + (e & 1);
        s[i][e] = key < valid ? s[i][e] * scale_log2 : -INFINITY;
        mx[e / 2] = fmaxf(mx[e / 2], s[i][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);  // finite: a block has at least one valid key
      alpha[r] = exp2f(m[r] - m_new);           // 0 on the first block (m = -inf)
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[i][e] = exp2f(s[i][e] - m[e / 2]);
        l[e / 2] += s[i][e];
      }
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }

    // O += P V: P's accumulators repacked as A fragments (keys 16 kk .. 16 kk + 15 = tiles 2 kk
    // and 2 kk + 1), V as B fragments by ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {
          pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
          pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
          pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        // matrices: keys +0..7 / +8..15 (by lane / 8 % 2) x columns +0..7 / +8..15 (by lane / 16)
        uint32_t vb[4];
        const int key = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        const int col = dp * 16 + (lane / 16) * 8;
        ldmatrix_x4_trans(vb, v + key * L::kLd + col);
        mma16816<T>(o[2 * dp], pa, vb[0], vb[1]);
        mma16816<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before its next copy is queued
    cur = nxt;
    have = more;
  }
  cp_async_wait<0>();

  // Epilogue: normalise and write; rows without a kept token give 0 and lse = -inf.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  T* out = static_cast<T*>(p.out) + ((b * p.H + h) * p.Lq + q0) * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + quad_row + r * 8;
    if (q0 + row >= p.Lq) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    T* orow = out + int64_t(row) * D + quad_col * 2;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(orow + i * 8) =
          pack2<T>(o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
    if (quad_col == 0)
      p.lse[(b * p.H + h) * p.Lq + q0 + row] =
          l[r] > 0.f ? m[r] * kLn2 + logf(l[r]) : -INFINITY;
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
  // The TMA + wgmma kernel (routed_attention_sm90.cu) first; for what it leaves to this file's
  // kernel it answers cudaErrorNotSupported.
  if (hopper_kernels_wanted()) {
    const cudaError_t err = routed_attention_fwd_sm90(p, dt, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  if (dt == DType::kFloat16)
    return p.D == 64 ? launch<__half, 64>(p, stream) : launch<__half, 128>(p, stream);
  return p.D == 64 ? launch<__nv_bfloat16, 64>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
}

}  // namespace kvpo::cuda
