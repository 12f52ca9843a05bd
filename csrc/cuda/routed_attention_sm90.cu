// Routed paged attention forward for Hopper (sm_90a): FlashAttention-3 style, warp-specialised,
// TMA loads and wgmma (fp16/bf16 in, fp32 accumulate, head_dim 64 or 128).
//
// One CTA = (row b, tile of 128 queries, head h); 3 warpgroups of 128 threads:
//   warpgroup 0, the producer: drops to 24 registers (setmaxnreg); one thread walks row b's page
//     table and issues TMA loads: Q once (128 x D), then per key block K and V (kBN x D) into
//     rings of kStages shared-memory buffers, each buffer with a "full" mbarrier (TMA bytes
//     landed) and an "empty" one (the 8 consumer warps are done with it). K runs one block ahead
//     of V, the order the consumers use them: K0, K1, V0, K2, V1, ...
//   warpgroups 1 and 2, the consumers: rise to 240 registers; each owns 64 query rows. Per block:
//     S = Q K^T        wgmma, Q and K from shared memory (K-major, 128-byte swizzle);
//     online softmax   on the S accumulators in registers (a row's scores live in a quad);
//     O += P V         wgmma with P from registers (the accumulators repacked as the A fragment)
//                      and V from shared memory (MN-major: the transpose bit).
//   Intra-warpgroup overlap: block j's S = Q K^T and block j-1's O += P V are issued together;
//   the softmax of block j runs while O += P V of block j-1 is still in the tensor cores.
//   Ping-pong: two named barriers hand the right to issue wgmmas from one consumer warpgroup to
//   the other, so one warpgroup's softmax runs while the other's products run.
//
// Tiles and shared memory (bytes): Q 128 x D; a K or V block kBN = 176 keys x D, stored as D / 64
// panels of kBN rows x 128 bytes in TMA's 128-byte swizzle (the canonical wgmma SW128 layout);
// D = 128: 2 stages, 32 KB + 2 x 2 x 44 KB = 208 KB; D = 64: 4 stages, 16 KB + 4 x 2 x 22 KB.
//
// Pages. K and V are read through 3-D tensor maps over [P * Hkv, page_size, D], so a block never
// spans pages and the hardware bounds every box by its page. A page holding n keys (page_lens, or
// page_size) is cut into ceil(n / kBN) blocks of kBN keys; its last block is placed to end at key
// n (starting at n - kBN: it overlaps the block before it, or starts below key 0 where the
// hardware zero-fills), and its first lo keys, already counted or zero-filled, are masked to -inf.
// So no key at or past n is ever loaded: the memory past a page's fill (any bits, NaN included)
// never reaches shared memory, and masked keys have finite K and V. A routed-out page (-1) or an
// empty one is skipped without a load. The producer passes each block's lo to the consumers in a
// per-stage shared-memory slot written before the TMA arrive; the consumers count the blocks with
// the same walk. A tile of a row without a kept key loads nothing and writes out = 0, lse = -inf.
//
// Descriptors (derived from make_gmma_desc in CUTLASS 4.2 cute/atom/mma_traits_sm90_gmma.hpp,
// lines 160-296, and the bitfield of cute/arch/mma_sm90_desc.hpp, lines 80-126): start address
// >> 4 in bits 0-13, leading byte offset >> 4 in 16-29, stride byte offset >> 4 in 32-45, layout
// type in 62-63 (1 = 128-byte swizzle). With T = 8 elements (16 bytes): K-major SW128 (Q, K) is
// ((8,m),(T,2)):((8T,SBO),(1,T)), SBO = 1024 bytes (8 rows of 128), LBO unused (encoded 1); the
// k-th 16-column step of a panel starts 32 k bytes later (the swizzle is applied to the address
// bits, so the step stays inside the 1024-byte atom). MN-major SW128 (V, transpose bit set) is
// ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), LBO = the distance between 64-column panels (kBN x 128
// bytes), SBO = 1024 bytes (8 keys); the k-th 16-key step starts 2048 k bytes later.
//
// The device code exists only in the sm_90a compilation; other targets get an empty kernel that
// the host never launches (routed_attention_fwd_sm90 checks the loaded binary, see has_body).
#include "routed_attention_sm90.h"

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "sm90.cuh"

namespace kvpo::cuda {
namespace {

constexpr int kBM = 128;          // queries per CTA, 64 per consumer warpgroup
constexpr int kBN = 176;          // keys per block (1560 = 8 x 176 + 152: 9 blocks a page)
constexpr int kThreads = 384;     // producer warpgroup + 2 consumer warpgroups

template <int D>
struct Sm90Layout {
  static constexpr int kPanels = D / 64;              // 64-column (128-byte) panels
  static constexpr int kStages = D == 128 ? 2 : 4;
  static constexpr uint32_t kQPanel = kBM * 128;      // bytes of one Q panel
  static constexpr uint32_t kKVPanel = kBN * 128;     // bytes of one K or V panel
  static constexpr uint32_t kQBytes = kPanels * kQPanel;
  static constexpr uint32_t kKVBytes = kPanels * kKVPanel;  // one stage of K (or of V)
  static constexpr uint32_t kK = kQBytes;                   // offsets from the aligned base
  static constexpr uint32_t kV = kK + kStages * kKVBytes;
  static constexpr size_t kBytes = kV + kStages * kKVBytes + 1024;  // + room to align to 1024
  static_assert(kKVPanel % 1024 == 0 && kQPanel % 1024 == 0, "SW128 atoms are 1024 bytes");
};

// mbarriers and the per-stage masked-key counts; static shared memory, so a binary whose kernel
// has a body reports some (has_body).
template <int S>
struct Sm90Bars {
  uint64_t q_full;
  uint64_t k_full[S], k_empty[S], v_full[S], v_empty[S];
  int lo[S];
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int kConsumerWarps = 8;  // arrivals on an "empty" barrier: one per consumer warp
constexpr int kSchedBar = 1;       // named barriers 1, 2: consumer warpgroup 0's and 1's turn
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Keys of a page that count: page_lens clamped to [0, page_size], or page_size; 0 when routed out.
__device__ __forceinline__ int page_fill(const RoutedAttnParams& p, int page) {
  if (page < 0) return 0;
  int n = static_cast<int>(p.page_size);
  if (p.page_lens != nullptr) {
    const int len = __ldg(p.page_lens + page);
    n = len < n ? (len > 0 ? len : 0) : n;
  }
  return n;
}

// S = Q K^T for one block, issued as one wgmma group (not waited for): D / 16 k-steps, each 32
// bytes further into a 128-byte panel row, the next panel after 4.
template <typename T, int D>
__device__ __forceinline__ void issue_qk(float (&s)[kBN / 2], uint32_t q, uint32_t k) {
  using L = Sm90Layout<D>;
  fence_regs(s);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t step = (kk % 4) * 32;  // bytes into the panel row
    gmma_ss<T, kBN>(s, kmajor_desc(q + (kk / 4) * L::kQPanel + step),
                    kmajor_desc(k + (kk / 4) * L::kKVPanel + step), kk > 0 ? 1 : 0);
  }
  wgmma_commit();
  fence_regs(s);
}

// O += P V for one block, issued as one wgmma group: kBN / 16 k-steps of 16 keys (2048 bytes of
// each V panel), A = the 4 registers of P holding those keys.
template <typename T, int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], uint32_t (&pf)[kBN / 4], uint32_t v) {
  using L = Sm90Layout<D>;
  fence_regs(o);
  fence_regs(pf);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk)
    gmma_rs<T, D>(o, &pf[4 * kk], gmma_desc(v + kk * 2048, L::kKVPanel, 1024));
  wgmma_commit();
  fence_regs(o);
}

// Online softmax of one block's scores (log2 domain): keys below lo masked, the running max m and
// this thread's part of the running sum l of rows lane / 4 and lane / 4 + 8 updated, s replaced by
// the probabilities, alpha = the factor the earlier O must be scaled by.
__device__ __forceinline__ void softmax_block(float (&s)[kBN / 2], int lo, int quad_col,
                                              float scale_log2, float (&m)[2], float (&l)[2],
                                              float (&alpha)[2]) {
  float mx[2] = {-INFINITY, -INFINITY};
  if (lo > 0) {  // the last block of a partly used page: its first lo keys are not this block's
#pragma unroll
    for (int v = 0; v < kBN / 2; ++v) {
      const int key = 8 * (v / 4) + 2 * quad_col + (v & 1);
      s[v] = key < lo ? -INFINITY : s[v] * scale_log2;
      mx[(v >> 1) & 1] = fmaxf(mx[(v >> 1) & 1], s[v]);
    }
  } else {
#pragma unroll
    for (int v = 0; v < kBN / 2; ++v) {
      s[v] *= scale_log2;
      mx[(v >> 1) & 1] = fmaxf(mx[(v >> 1) & 1], s[v]);
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(m[r], mx[r]);  // finite: a block has a valid key for every row
    alpha[r] = exp2f(m[r] - m_new);           // 0 on the first block (m = -inf)
    m[r] = m_new;
    l[r] *= alpha[r];
  }
#pragma unroll
  for (int v = 0; v < kBN / 2; ++v) {
    s[v] = exp2f(s[v] - m[(v >> 1) & 1]);
    l[(v >> 1) & 1] += s[v];
  }
}

// Probabilities -> the A fragment of O += P V: pf[4 kk .. 4 kk + 3] = keys 16 kk .. 16 kk + 15.
template <typename T>
__device__ __forceinline__ void to_p(const float (&s)[kBN / 2], uint32_t (&pf)[kBN / 4]) {
#pragma unroll
  for (int i = 0; i < kBN / 4; ++i) pf[i] = pack2<T>(s[2 * i], s[2 * i + 1]);
}

// Queues V of block vc (keys y .. y + kBN - 1 of tensor-map row row) once its stage is free.
template <int D>
__device__ __forceinline__ void load_v(const CUtensorMap* tm_v,
                                       Sm90Bars<Sm90Layout<D>::kStages>& bars, uint32_t smem,
                                       uint32_t vc, int y, int row) {
  using L = Sm90Layout<D>;
  const uint32_t s = vc % L::kStages;
  mbar_wait(smem_u32(&bars.v_empty[s]), ((vc / L::kStages) & 1) ^ 1);
  const uint32_t bar = smem_u32(&bars.v_full[s]);
  mbar_expect_tx(bar, L::kKVBytes);
#pragma unroll
  for (int pn = 0; pn < L::kPanels; ++pn)
    tma_load_3d(smem + L::kV + s * L::kKVBytes + pn * L::kKVPanel, tm_v, bar, pn * 64, y, row);
}

// The producer thread: Q once, then K of block j + 1 before V of block j, each into its ring.
template <int D>
__device__ __forceinline__ void produce(const CUtensorMap* tm_q, const CUtensorMap* tm_k,
                                        const CUtensorMap* tm_v, const RoutedAttnParams& p,
                                        Sm90Bars<Sm90Layout<D>::kStages>& bars, uint32_t smem,
                                        int b, int q0, int bh, int hk) {
  using L = Sm90Layout<D>;
  tma_prefetch_map(tm_q);
  tma_prefetch_map(tm_k);
  tma_prefetch_map(tm_v);
  const int32_t* table = p.page_table + int64_t(b) * p.max_pages;
  const int max_pages = static_cast<int>(p.max_pages);
  const int hkv = static_cast<int>(p.Hkv);
  uint32_t kc = 0;       // K blocks issued (V blocks issued: kc - 1 within the walk)
  int vy = 0, vrow = 0;  // the block whose V is next
  for (int j = 0; j < max_pages; ++j) {
    const int page = __ldg(table + j);
    const int n = page_fill(p, page);
    const int row = page * hkv + hk;  // the page's (page, KV head) slice of the tensor maps
    for (int k0 = 0; k0 < n; k0 += kBN) {
      const int y = min(k0, n - kBN);  // the last block ends at key n
      if (kc == 0) {  // Q, once the tile has a kept key
        const uint32_t bar = smem_u32(&bars.q_full);
        mbar_expect_tx(bar, L::kQBytes);
#pragma unroll
        for (int pn = 0; pn < L::kPanels; ++pn)
          tma_load_3d(smem + pn * L::kQPanel, tm_q, bar, pn * 64, q0, bh);
      }
      const uint32_t s = kc % L::kStages;
      mbar_wait(smem_u32(&bars.k_empty[s]), ((kc / L::kStages) & 1) ^ 1);
      bars.lo[s] = k0 - y;  // published by the arrive below (release)
      const uint32_t bar = smem_u32(&bars.k_full[s]);
      mbar_expect_tx(bar, L::kKVBytes);
#pragma unroll
      for (int pn = 0; pn < L::kPanels; ++pn)
        tma_load_3d(smem + L::kK + s * L::kKVBytes + pn * L::kKVPanel, tm_k, bar, pn * 64, y, row);
      if (kc > 0) load_v<D>(tm_v, bars, smem, kc - 1, vy, vrow);
      vy = y;
      vrow = row;
      ++kc;
    }
  }
  if (kc > 0) load_v<D>(tm_v, bars, smem, kc - 1, vy, vrow);
}

// A consumer warpgroup (cw = 0, 1): query rows q0 + 64 cw .. + 63 against every kept block.
template <typename T, int D>
__device__ __forceinline__ void consume(const RoutedAttnParams& p,
                                        Sm90Bars<Sm90Layout<D>::kStages>& bars, uint32_t smem,
                                        int b, int h, int q0, int cw) {
  using L = Sm90Layout<D>;
  constexpr int S = L::kStages;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4;
  const int quad_col = lane % 4;

  // The number of blocks, by the producer's walk.
  const int32_t* table = p.page_table + int64_t(b) * p.max_pages;
  const int max_pages = static_cast<int>(p.max_pages);
  int nblk = 0;
  for (int j = 0; j < max_pages; ++j) nblk += (page_fill(p, __ldg(table + j)) + kBN - 1) / kBN;

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;

  if (nblk > 0) {
    const int own = kSchedBar + cw, other = kSchedBar + (cw ^ 1);
    if (cw == 1) named_arrive(kSchedBar);  // warpgroup 0 issues first
    const uint32_t q = smem + cw * 64 * 128;  // this warpgroup's 64 rows of each Q panel
    float s[kBN / 2];
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) s[i] = 0.f;
    uint32_t pf[kBN / 4];
    float alpha[2];
    mbar_wait(smem_u32(&bars.q_full), 0);

    // Block 0: S, softmax, P.
    mbar_wait(smem_u32(&bars.k_full[0]), 0);
    int lo = bars.lo[0];
    named_sync(own);
    issue_qk<T, D>(s, q, smem + L::kK);
    named_arrive(other);
    wgmma_wait<0>();
    fence_regs(s);
    if (lane == 0) mbar_arrive(smem_u32(&bars.k_empty[0]));
    softmax_block(s, lo, quad_col, scale_log2, m, l, alpha);
    to_p<T>(s, pf);

    // Block j: S_j and O += P_{j-1} V_{j-1} issued together, softmax of S_j under the latter.
    for (int j = 1; j < nblk; ++j) {
      const uint32_t ks = j % S, kph = (j / S) & 1;
      const uint32_t vs = (j - 1) % S, vph = ((j - 1) / S) & 1;
      mbar_wait(smem_u32(&bars.k_full[ks]), kph);
      lo = bars.lo[ks];
      named_sync(own);
      issue_qk<T, D>(s, q, smem + L::kK + ks * L::kKVBytes);
      mbar_wait(smem_u32(&bars.v_full[vs]), vph);
      issue_pv<T, D>(o, pf, smem + L::kV + vs * L::kKVBytes);
      named_arrive(other);
      wgmma_wait<1>();  // S_j is done, O += P V may still run
      fence_regs(s);
      if (lane == 0) mbar_arrive(smem_u32(&bars.k_empty[ks]));
      softmax_block(s, lo, quad_col, scale_log2, m, l, alpha);
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(pf);
      fence_regs(s);
      if (lane == 0) mbar_arrive(smem_u32(&bars.v_empty[vs]));
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
      to_p<T>(s, pf);
    }

    // The last block's O += P V.
    const uint32_t vs = (nblk - 1) % S, vph = ((nblk - 1) / S) & 1;
    mbar_wait(smem_u32(&bars.v_full[vs]), vph);
    issue_pv<T, D>(o, pf, smem + L::kV + vs * L::kKVBytes);
    wgmma_wait<0>();
    fence_regs(o);
    // Warpgroup 1's last hand-over is still pending on warpgroup 0's barrier: taking it leaves
    // both named barriers as they started.
    if (cw == 0) named_sync(kSchedBar);
  }

  // Normalise and write; rows without a kept key give 0 and lse = -inf.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const int64_t bh = int64_t(b) * p.H + h;
  T* out = static_cast<T*>(p.out) + bh * p.Lq * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = q0 + cw * 64 + warp * 16 + lane / 4 + r * 8;
    if (row >= p.Lq) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    T* orow = out + row * D + quad_col * 2;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(orow + i * 8) =
          pack2<T>(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
    if (quad_col == 0)
      p.lse[bh * p.Lq + row] = l[r] > 0.f ? m[r] * kLn2 + logf(l[r]) : -INFINITY;
  }
}

#endif  // sm_90a

// One CTA = (row b = blockIdx.x, queries 128 blockIdx.y .. + 127, head h = blockIdx.z).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    routed_attn_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q,
                                const __grid_constant__ CUtensorMap tm_k,
                                const __grid_constant__ CUtensorMap tm_v,
                                const RoutedAttnParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Sm90Layout<D>;
  __shared__ Sm90Bars<L::kStages> bars;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t smem = (smem_u32(smem_raw) + 1023u) & ~1023u;  // SW128 atoms: 1024-aligned
  const int b = blockIdx.x, h = blockIdx.z;
  const int q0 = blockIdx.y * kBM;
  if (threadIdx.x == 0) {
    mbar_init(smem_u32(&bars.q_full), 1);
#pragma unroll
    for (int s = 0; s < L::kStages; ++s) {
      mbar_init(smem_u32(&bars.k_full[s]), 1);
      mbar_init(smem_u32(&bars.v_full[s]), 1);
      mbar_init(smem_u32(&bars.k_empty[s]), kConsumerWarps);
      mbar_init(smem_u32(&bars.v_empty[s]), kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0) {
      const int hk = h / static_cast<int>(p.H / p.Hkv);
      produce<D>(&tm_q, &tm_k, &tm_v, p, bars, smem, b, q0, b * static_cast<int>(p.H) + h, hk);
    }
  } else {
    setmaxnreg_inc<240>();
    consume<T, D>(p, bars, smem, b, h, q0, threadIdx.x / 128 - 1);
  }
#endif
}

// Whether the loaded binary of the kernel has its body (an sm_90a cubin): a build for sm_90 or
// sm_80 alone gives this device an empty kernel, without static shared memory.
template <typename T, int D>
bool has_body() {
  static const bool ok = [] {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, routed_attn_fwd_sm90_kernel<T, D>) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return attr.sharedSizeBytes > 0;
  }();
  return ok;
}

template <typename T, int D>
cudaError_t launch_sm90(const RoutedAttnParams& p, DType dt, cudaStream_t stream) {
  using L = Sm90Layout<D>;
  if (!has_body<T, D>()) return cudaErrorNotSupported;
  CUtensorMap tm_q, tm_k, tm_v;
  if (!encode_map(&tm_q, dt, p.q, D, p.Lq, p.B * p.H, kBM) ||
      !encode_map(&tm_k, dt, p.k_pages, D, p.page_size, p.P * p.Hkv, kBN) ||
      !encode_map(&tm_v, dt, p.v_pages, D, p.page_size, p.P * p.Hkv, kBN))
    return cudaErrorNotSupported;
  auto* kernel = routed_attn_fwd_sm90_kernel<T, D>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(L::kBytes)) != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaErrorNotSupported;
  }
  const dim3 grid(static_cast<unsigned>(p.B), static_cast<unsigned>((p.Lq + kBM - 1) / kBM),
                  static_cast<unsigned>(p.H));
  kernel<<<grid, kThreads, L::kBytes, stream>>>(tm_q, tm_k, tm_v, p);
  return cudaGetLastError();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

bool routed_attention_fwd_sm90_supported(DType dt, int64_t head_dim) {
  return (dt == DType::kFloat16 || dt == DType::kBFloat16) && (head_dim == 64 || head_dim == 128);
}

cudaError_t routed_attention_fwd_sm90(const RoutedAttnParams& p, DType dt, cudaStream_t stream) {
  if (!routed_attention_fwd_sm90_supported(dt, p.D) || p.Hkv <= 0 || p.H % p.Hkv != 0)
    return cudaErrorInvalidValue;
  if (p.B == 0 || p.H == 0 || p.Lq == 0) return cudaSuccess;
  // The sm80 launcher's limits (64-query tiles on grid y), so that both kernels take one set of
  // shapes; 128-query tiles stay within them.
  if ((p.Lq + 63) / 64 > 65535 || p.H > 65535 || p.B > INT32_MAX)
    return cudaErrorInvalidConfiguration;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaErrorNotSupported;
  }
  if (major != 9 || minor != 0) return cudaErrorNotSupported;
  // Left to the sm80 kernel: no page to read (a tensor map needs non-empty dimensions), indices
  // past 32 bits (TMA coordinates and the walk are int32), bases TMA cannot address.
  constexpr int64_t kMax = INT32_MAX / 2;
  if (p.P <= 0 || p.page_size <= 0 || p.max_pages <= 0 || p.page_size > kMax ||
      p.max_pages > kMax || p.P * p.Hkv > kMax || p.B * p.H > kMax ||
      !aligned16(p.q) || !aligned16(p.k_pages) || !aligned16(p.v_pages))
    return cudaErrorNotSupported;
  if (dt == DType::kFloat16)
    return p.D == 64 ? launch_sm90<__half, 64>(p, dt, stream)
                     : launch_sm90<__half, 128>(p, dt, stream);
  return p.D == 64 ? launch_sm90<__nv_bfloat16, 64>(p, dt, stream)
                   : launch_sm90<__nv_bfloat16, 128>(p, dt, stream);
}

}  // namespace kvpo::cuda
