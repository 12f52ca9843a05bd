// Routed paged attention backward for Hopper (sm_90a): FlashAttention-3 style, warp-specialised,
// TMA loads and wgmma (fp16/bf16 in, fp32 accumulate, head_dim 64 or 128). Semantics as the sm80
// backward (routed_attention_bwd.cu): P = exp(scale q.k - lse) (lse = -inf counts as 0), dV += P^T
// dO, dP = dO V^T, dS = P (dP - delta), dQ = scale dS K, dK = scale dS^T Q.
//
// Both kernels: 3 warpgroups of 128 threads. Warpgroup 0, the producer, drops to 24 registers
// (setmaxnreg) and issues the TMA loads; warpgroups 1 and 2, the consumers, rise to 240 and run
// the wgmmas. A ring of kStages shared-memory stages, each with a "full" mbarrier (its TMA bytes
// landed and, in the dK/dV kernel, the producer warp's 32 lanes stored its lse and delta) and an
// "empty" one (its 8 consumer warps are done with it: one arrival per warp after wgmma.wait_group
// 0). Phases are tracked by (stage, parity) pairs; the producer's first pass waits for parity 1,
// which a fresh barrier reports complete.
//
// dK/dV kernel: one CTA per (block of kBN = 128 keys of one physical page, KV head); consumer
// warpgroup c owns keys 64 c .. 64 c + 63 of the block, whose dK and dV accumulate in registers
// over every tile (no atomics: deterministic). K and V of the block: one TMA load each (kv_full).
// The producer's warp 0 walks the rows that list the page (rows[row_ptr[page]:row_ptr[page + 1]],
// once per listing) x the query heads of the KV head's group x the tiles of kBM = 64 queries, and
// per tile loads Q and dO by TMA (3-D maps over [B * H, Lq, D]; queries past Lq zero-filled) and
// lse (as lse log2 e) and delta by plain loads (0 past Lq). Per tile and consumer warpgroup:
//   S^T  = K_c Q^T     wgmma SS (64 x 64, K-major A and B);
//   dP^T = V_c dO^T    wgmma SS, issued with S^T as a second group;
//   P^T  = exp2(S^T scale log2 e - lse log2 e), keys outside the block 0, in registers, while
//                      dP^T is still in the tensor cores;
//   dS^T = P^T (dP^T - delta); both repacked as A fragments, where S^T and dP^T die (at
//                      D = 128 the accumulators dK, dV, S^T, dP^T peak at 192 of 240 registers);
//   dV  += P^T dO      wgmma RS (B = dO MN-major) and
//   dK  += dS^T Q      wgmma RS (B = Q MN-major), issued together, then waited for.
// Queries past Lq have Q = dO = lse = delta = 0: P = 1 but dO = 0 and dS = 0, exact zeros.
// Non-deterministic dq (p.deterministic false): each warpgroup also stores its dS^T (bf16/fp16) in
// one of two swizzled shared buffers, fences it for the async proxy, and after a named barrier
// over both consumer warpgroups computes a 64-query x 64-column part of dQ = dS K (wgmma SS, A =
// dS MN-major from the buffer, B = K MN-major): at D = 128 warpgroup c takes columns 64 c .. + 63
// over the block's 128 keys, at D = 64 all columns over its own 64 keys. The part is added to the
// float32 accumulator with float2 atomics; a last kernel writes scale * accumulator into dq. The
// buffers alternate per tile, so one barrier a tile orders both the reads of tile t - 2 before the
// writes of tile t and the writes of tile t before its reads.
// Shared memory (bytes): K, V 2 x 128 x D x 2; kStages x (Q, dO) 2 x 64 x D x 2; dS^T 2 x 16 KB.
// D = 128: 3 stages, 64 + 96 (+ 32) = 160 (192) KB; D = 64: 4 stages, 32 + 64 (+ 32) = 96 (128) KB.
//
// dQ kernel (deterministic mode): one CTA per (row b, tile of kBM = 128 queries, head h), shaped
// like the forward: the producer's thread 0 walks row b's page table and loads Q and dO once, then
// per key block K and V (kBN = 64 keys at D = 128, 128 at D = 64) into one ring stage. Consumer
// warpgroup c owns queries 64 c .. 64 c + 63; per block: S = Q K^T and dP = dO V^T (SS, K-major),
// P, dS = P (dP - delta) in registers, dQ += dS K (RS, B = K MN-major); dQ accumulates in registers
// along the walk (deterministic). Shared memory: Q, dO 2 x 128 x D x 2 and 4 stages of K, V
// 2 x kBN x D x 2: 192 KB at D = 128, 160 KB at D = 64.
//
// Pages, as in the forward (routed_attention_sm90.cu): K and V are read through 3-D tensor maps
// over [P * Hkv, page_size, D], so no box spans pages. A block holding the last kept key n - 1 of
// its page is placed to end at key n (its box starts at n - kB, below key 0 if need be, where TMA
// zero-fills), and its first lo rows, another block's keys or zeros, are masked: no key at or past
// n ever reaches shared memory (page memory past the fill may hold anything, NaN included), and
// masked keys have finite K and V. In the dK/dV kernel shared-memory row r holds key y + r, rows
// below lo are skipped at the write, and keys from n to the block's end (within page_size) are
// written 0; a block without a kept key, or of a page no row lists, writes zeros and loads nothing.
//
// Operands: every tile lies in shared memory as D / 64 panels of rows x 128 bytes in TMA's 128-byte
// swizzle (16-byte chunk j of row r at chunk j ^ (r % 8)), the canonical wgmma SW128 layout; see
// sm90.cuh for the descriptors. K-major (transpose bit 0): K, V, Q, dO as the A or B of S^T, dP^T,
// S, dP (k-step: 32 bytes along a panel row, the next panel after 4 steps). MN-major (transpose
// bit 1): dO, Q as B of dV, dK (k-step: 16 query rows = 2048 bytes; LBO = the panel size between
// the 64-column halves at D = 128); K as B of dQ (16 key rows per step); dS^T as A of the atomic
// dQ (M = 64 queries = one panel). Register operands (P^T, dS^T, P, dS) reuse the accumulator
// layout: the A fragment of k-step kk is pf[4 kk .. 4 kk + 3], pf[i] = pack(acc[2 i],
// acc[2 i + 1]).
//
// The device code exists only in the sm_90a compilation; other targets get empty kernels that the
// host never launches (routed_attention_bwd_sm90 checks the loaded binary, see has_body).
#include "routed_attention_bwd_sm90.h"

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "sm90.cuh"

namespace kvpo::cuda {
namespace {

constexpr int kThreads = 384;  // producer warpgroup + 2 consumer warpgroups

// dK/dV kernel: kBN keys of a page per CTA, query tiles of kBM.
template <int D>
struct KvLayout {
  static constexpr int kBN = 128, kBM = 64;
  static constexpr int kPanels = D / 64;  // 64-column (128-byte) panels
  static constexpr int kStages = D == 128 ? 3 : 4;
  static constexpr uint32_t kKVPanel = kBN * 128;           // bytes of one K or V panel
  static constexpr uint32_t kKVBytes = kPanels * kKVPanel;  // K (or V) of the block
  static constexpr uint32_t kQPanel = kBM * 128;            // bytes of one Q or dO panel
  static constexpr uint32_t kQBytes = kPanels * kQPanel;    // one stage of Q (or of dO)
  static constexpr uint32_t kSBytes = kBN * 128;            // one dS^T buffer: kBN x kBM
  static constexpr uint32_t kK = 0;                         // offsets from the aligned base
  static constexpr uint32_t kV = kK + kKVBytes;
  static constexpr uint32_t kQ = kV + kKVBytes;
  static constexpr uint32_t kO = kQ + kStages * kQBytes;
  static constexpr uint32_t kS = kO + kStages * kQBytes;  // two dS^T buffers (atomic dq only)
  static constexpr size_t bytes(bool dq) { return kS + (dq ? 2 * kSBytes : 0) + 1024; }
  static_assert(kKVPanel % 1024 == 0 && kQPanel % 1024 == 0, "SW128 atoms are 1024 bytes");
  static_assert(kBM == 64 && kBN == 128, "the consumers' lane mappings assume these tiles");
};

// mbarriers and the per-stage lse (log2 domain) and delta; static shared memory, so a binary whose
// kernel has a body reports some (has_body).
template <int S>
struct KvBars {
  uint64_t kv_full;
  uint64_t full[S], empty[S];
  float lse2[S][64], delta[S][64];
};

// dQ kernel: kBM queries per CTA, key blocks of kBN.
template <int D>
struct QLayout {
  static constexpr int kBM = 128, kBN = D == 128 ? 64 : 128;
  static constexpr int kPanels = D / 64;
  static constexpr int kStages = 4;
  static constexpr uint32_t kQPanel = kBM * 128;
  static constexpr uint32_t kQBytes = kPanels * kQPanel;    // Q (or dO) of the tile
  static constexpr uint32_t kKVPanel = kBN * 128;
  static constexpr uint32_t kKVBytes = kPanels * kKVPanel;  // K (or V) of a block
  static constexpr uint32_t kQ = 0;
  static constexpr uint32_t kO = kQ + kQBytes;
  static constexpr uint32_t kKV = kO + kQBytes;  // stage s: K at kKV + 2 s kKVBytes, V after it
  static constexpr size_t kBytes = kKV + kStages * 2 * kKVBytes + 1024;
  static_assert(kKVPanel % 1024 == 0 && kQPanel % 1024 == 0, "SW128 atoms are 1024 bytes");
};

template <int S>
struct QBars {
  uint64_t q_full;
  uint64_t full[S], empty[S];
  int lo[S];
};

// The CTA's block of the dK/dV kernel: shared-memory row r holds key y + r; rows below lo are
// not this block's keys.
struct KvBlock {
  int page, hk, k0, n, y, lo;
  int start, end;  // the page's listings: rows[start:end]
  int64_t slice;   // row of key 0 of (page, hk) in [P * Hkv * page_size, D]
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int kConsumerWarps = 8;  // arrivals on an "empty" barrier: one per consumer warp
constexpr int kProducerLanes = 32;  // arrivals on a dK/dV "full" barrier: the producer warp
constexpr int kDsBar = 1;           // named barrier: both warpgroups' dS^T are stored
constexpr float kLog2e = 1.4426950408889634f;

// Generic-proxy shared-memory writes made visible to the async proxy (wgmma operand reads).
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

// Keys of a page that count: page_lens clamped to [0, page_size], or page_size; 0 when routed out.
__device__ __forceinline__ int page_fill(const RoutedAttnBwdParams& p, int page) {
  if (page < 0) return 0;
  int n = static_cast<int>(p.page_size);
  if (p.page_lens != nullptr) {
    const int len = __ldg(p.page_lens + page);
    n = len < n ? (len > 0 ? len : 0) : n;
  }
  return n;
}

// lse in the log2 domain; a row without kept keys (-inf) counts as 0, as in the sm80 backward.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? 0.f : lse * kLog2e;
}

template <int N>
__device__ __forceinline__ void zero(float (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = 0.f;
}

// A descriptor advanced by off bytes (a multiple of 16): the start address field (bits 0-13,
// address >> 4) cannot carry, shared memory being below 256 KB.
__device__ __forceinline__ uint64_t desc_at(uint64_t desc, uint32_t off) {
  return desc + (off >> 4);
}

// Hides a value from the optimiser, so what derives from it is computed where used, not hoisted
// out of the tile loop into registers the consumers lack.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}

// acc (64 x N) = A B^T over the head dim, one wgmma group (not waited for): A = 64 K-major rows
// at a, B = N K-major rows at b; panel strides PA, PB; D / 16 k-steps of 32 bytes along a panel
// row, the next panel after 4.
template <typename T, int D, int N, uint32_t PA, uint32_t PB>
__device__ __forceinline__ void issue_abt(float (&acc)[N / 2], uint32_t a, uint32_t b) {
  const uint64_t da = kmajor_desc(a), db = kmajor_desc(b);
  fence_regs(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t step = (kk % 4) * 32;
    gmma_ss<T, N>(acc, desc_at(da, (kk / 4) * PA + step), desc_at(db, (kk / 4) * PB + step),
                  kk > 0 ? 1 : 0);
  }
  wgmma_commit();
  fence_regs(acc);
}

// acc (64 x D) += X B, one wgmma group: X from registers (xf[4 kk .. 4 kk + 3]: its columns
// 16 kk .. 16 kk + 15), B = KSTEPS x 16 MN-major rows at b (2048 bytes a step; PB between the
// 64-column panels).
template <typename T, int D, int KSTEPS, uint32_t PB>
__device__ __forceinline__ void issue_xb(float (&acc)[D / 2], uint32_t (&xf)[4 * KSTEPS],
                                         uint32_t b) {
  const uint64_t db = gmma_desc(b, PB, 1024);
  fence_regs(acc);
  fence_regs(xf);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) gmma_rs<T, D>(acc, &xf[4 * kk], desc_at(db, kk * 2048));
  wgmma_commit();
  fence_regs(acc);
}

// Accumulators as the A fragments of a register wgmma: pf[i] = columns 2 i, 2 i + 1 of chunk i / 2.
template <typename T, int N>
__device__ __forceinline__ void pack_frag(const float (&x)[N], uint32_t (&pf)[N / 2]) {
#pragma unroll
  for (int i = 0; i < N / 2; ++i) pf[i] = pack2<T>(x[2 * i], x[2 * i + 1]);
}

// dk and dv of keys [from, to) of the (page, KV head) slice set to 0, 16 bytes a store.
template <typename T, int D>
__device__ __forceinline__ void zero_keys(const RoutedAttnBwdParams& p, int64_t slice, int from,
                                          int to, int tid, int threads) {
  if (from >= to) return;
  const int64_t n16 = int64_t(to - from) * D / 8;
  uint4* a = reinterpret_cast<uint4*>(static_cast<T*>(p.dk) + (slice + from) * D);
  uint4* c = reinterpret_cast<uint4*>(static_cast<T*>(p.dv) + (slice + from) * D);
  for (int64_t i = tid; i < n16; i += threads) {
    a[i] = make_uint4(0u, 0u, 0u, 0u);
    c[i] = make_uint4(0u, 0u, 0u, 0u);
  }
}

// ------------------------------------------------------------------------------------------------
// dK/dV kernel
// ------------------------------------------------------------------------------------------------

// The producer warp: K and V of the block once, then per tile Q and dO (lane 0, TMA) and lse and
// delta (every lane, 2 queries each) into the ring.
template <int D>
__device__ __forceinline__ void produce_kv(const CUtensorMap* tm_q, const CUtensorMap* tm_o,
                                           const CUtensorMap* tm_k, const CUtensorMap* tm_v,
                                           const RoutedAttnBwdParams& p,
                                           KvBars<KvLayout<D>::kStages>& bars, uint32_t smem,
                                           const KvBlock& blk) {
  using L = KvLayout<D>;
  const int lane = threadIdx.x % 32;
  if (lane == 0) {
    tma_prefetch_map(tm_q);
    tma_prefetch_map(tm_o);
    tma_prefetch_map(tm_k);
    tma_prefetch_map(tm_v);
    const uint32_t bar = smem_u32(&bars.kv_full);
    const int row = blk.page * static_cast<int>(p.Hkv) + blk.hk;
    mbar_expect_tx(bar, 2 * L::kKVBytes);
#pragma unroll
    for (int pn = 0; pn < L::kPanels; ++pn) {
      tma_load_3d(smem + L::kK + pn * L::kKVPanel, tm_k, bar, pn * 64, blk.y, row);
      tma_load_3d(smem + L::kV + pn * L::kKVPanel, tm_v, bar, pn * 64, blk.y, row);
    }
  }
  const int group = static_cast<int>(p.H / p.Hkv);
  const int mtiles = static_cast<int>((p.Lq + L::kBM - 1) / L::kBM);
  const int h0 = blk.hk * group;
  int s = 0;
  uint32_t ph = 0;
  for (int e = blk.start; e < blk.end; ++e) {
    const int b = __ldg(p.rows + e);
    for (int g = 0; g < group; ++g) {
      const int bh = b * static_cast<int>(p.H) + h0 + g;
      const float* lse = p.lse + int64_t(bh) * p.Lq;
      const float* delta = p.delta + int64_t(bh) * p.Lq;
      for (int mb = 0; mb < mtiles; ++mb) {
        mbar_wait(smem_u32(&bars.empty[s]), ph ^ 1);
#pragma unroll
        for (int i = lane; i < L::kBM; i += 32) {
          const int64_t qi = int64_t(mb) * L::kBM + i;
          const bool in = qi < p.Lq;
          bars.lse2[s][i] = in ? lse_log2(__ldg(lse + qi)) : 0.f;
          bars.delta[s][i] = in ? __ldg(delta + qi) : 0.f;
        }
        const uint32_t bar = smem_u32(&bars.full[s]);
        if (lane == 0) {  // its arrival, after its stores, also sets the TMA bytes
          mbar_expect_tx(bar, 2 * L::kQBytes);
#pragma unroll
          for (int pn = 0; pn < L::kPanels; ++pn) {
            const uint32_t off = s * L::kQBytes + pn * L::kQPanel;
            tma_load_3d(smem + L::kQ + off, tm_q, bar, pn * 64, mb * L::kBM, bh);
            tma_load_3d(smem + L::kO + off, tm_o, bar, pn * 64, mb * L::kBM, bh);
          }
        } else {
          mbar_arrive(bar);  // release: this lane's lse and delta stores
        }
        if (++s == L::kStages) {
          s = 0;
          ph ^= 1;
        }
      }
    }
  }
}

// dS^T rows r0 and r0 + 8 (64 queries as columns) into a swizzled [kBN x 64] buffer at buf, from
// its A fragments (sf[2 i + j]: row r0 + 8 j, queries 8 i + 2 quad, + 1).
__device__ __forceinline__ void store_ds(const uint32_t (&sf)[16], uint32_t buf, int r0, int quad) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int r = r0 + 8 * j;
    const uint32_t row = buf + r * 128 + quad * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) st_shared_u32(row + ((i ^ (r & 7)) << 4), sf[2 * i + j]);
  }
}

// Atomic dq: this warpgroup's part of dS K for the tile (queries mb kBM .. of head row bh) added
// into the float32 accumulator. buf: the tile's dS^T buffer, stored by both warpgroups.
template <typename T, int D>
__device__ __forceinline__ void add_dq(const RoutedAttnBwdParams& p, uint32_t smem, uint32_t buf,
                                       int64_t bh, int mb, int cw, int warp, int lane) {
  using L = KvLayout<D>;
  constexpr int kSteps = D == 128 ? 8 : 4;  // 16-key steps
  const int key0 = D == 128 ? 0 : 64 * cw;  // first key row of the sum
  const int nc = D == 128 ? cw : 0;         // the 64-column panel of dQ and K
  const uint64_t da = gmma_desc(buf + key0 * 128, L::kSBytes, 1024);
  const uint64_t db = gmma_desc(opaque(smem + L::kK + nc * L::kKVPanel + key0 * 128),
                                L::kKVPanel, 1024);
  float acc[32];
  zero(acc);
  fence_regs(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk)
    gmma_ss<T, 64, 1, 1>(acc, desc_at(da, kk * 2048), desc_at(db, kk * 2048), kk > 0 ? 1 : 0);
  wgmma_commit();
  fence_regs(acc);
  wgmma_wait<0>();
  fence_regs(acc);
  const int64_t q0 = int64_t(mb) * L::kBM;
  float* dst = p.dq_accum + (bh * p.Lq + q0) * D + nc * 64 + 2 * (lane % 4);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int row = 16 * warp + lane / 4 + 8 * j;
    if (q0 + row >= p.Lq) continue;
    float* r = dst + int64_t(row) * D;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      atomicAdd(reinterpret_cast<float2*>(r + 8 * i),
                make_float2(acc[4 * i + 2 * j], acc[4 * i + 2 * j + 1]));
  }
}

// A consumer warpgroup (cw = 0, 1): keys 64 cw .. 64 cw + 63 of the block against every tile.
template <typename T, int D, bool kDq>
__device__ __forceinline__ void consume_kv(const RoutedAttnBwdParams& p,
                                           KvBars<KvLayout<D>::kStages>& bars, uint32_t smem,
                                           const KvBlock& blk, int cw) {
  using L = KvLayout<D>;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4, quad = lane % 4;
  const int r0 = 64 * cw + 16 * warp + lane / 4;  // the thread's rows r0 and r0 + 8
  const bool key_in[2] = {r0 >= blk.lo, r0 + 8 >= blk.lo};
  const int group = static_cast<int>(p.H / p.Hkv);
  const int mtiles = static_cast<int>((p.Lq + L::kBM - 1) / L::kBM);
  const float scale_log2 = p.scale * kLog2e;
  const uint32_t k_w = smem + L::kK + cw * 64 * 128;  // the warpgroup's rows of each panel
  const uint32_t v_w = smem + L::kV + cw * 64 * 128;
  float dk[D / 2], dv[D / 2];
  zero(dk);
  zero(dv);
  mbar_wait(smem_u32(&bars.kv_full), 0);
  int s = 0;
  uint32_t ph = 0, par = 0;  // ring stage and phase; dS^T buffer
  for (int e = blk.start; e < blk.end; ++e) {
    const int b = kDq ? __ldg(p.rows + e) : 0;
    for (int g = 0; g < group; ++g) {
      const int64_t bh = int64_t(b) * p.H + blk.hk * group + g;
      for (int mb = 0; mb < mtiles; ++mb) {
        mbar_wait(smem_u32(&bars.full[s]), ph);
        const uint32_t q = smem + L::kQ + s * L::kQBytes, o = smem + L::kO + s * L::kQBytes;
        // Lane: keys r0 (v % 4 < 2) and r0 + 8, queries 8 (v / 4) + 2 quad + v % 2.
        float st[32], dp[32];
        issue_abt<T, D, 64, L::kKVPanel, L::kQPanel>(st, opaque(k_w), q);  // S^T = K Q^T
        issue_abt<T, D, 64, L::kKVPanel, L::kQPanel>(dp, opaque(v_w), o);  // dP^T = V dO^T
        wgmma_wait<1>();
        fence_regs(st);
        const float* lse2 = bars.lse2[s];
        const float* delta = bars.delta[s];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float2 l = *reinterpret_cast<const float2*>(lse2 + 8 * i + 2 * quad);
#pragma unroll
          for (int v = 0; v < 4; ++v)
            st[4 * i + v] =
                key_in[v / 2] ? exp2f(st[4 * i + v] * scale_log2 - (v % 2 ? l.y : l.x)) : 0.f;
        }
        wgmma_wait<0>();
        fence_regs(dp);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float2 d = *reinterpret_cast<const float2*>(delta + 8 * i + 2 * quad);
#pragma unroll
          for (int v = 0; v < 4; ++v)
            dp[4 * i + v] = st[4 * i + v] * (dp[4 * i + v] - (v % 2 ? d.y : d.x));
        }
        uint32_t pf[16], sf[16];  // P^T and dS^T as A fragments
        pack_frag<T>(st, pf);
        pack_frag<T>(dp, sf);
        if constexpr (kDq) store_ds(sf, smem + L::kS + par * L::kSBytes, r0, quad);
        issue_xb<T, D, 4, L::kQPanel>(dv, pf, o);  // dV += P^T dO
        issue_xb<T, D, 4, L::kQPanel>(dk, sf, q);  // dK += dS^T Q
        wgmma_wait<0>();
        fence_regs(dv);
        fence_regs(dk);
        fence_regs(pf);
        fence_regs(sf);
        if (lane == 0) mbar_arrive(smem_u32(&bars.empty[s]));
        if constexpr (kDq) {
          fence_async_smem();
          named_sync(kDsBar);
          add_dq<T, D>(p, smem, smem + L::kS + par * L::kSBytes, bh, mb, cw, warp, lane);
          par ^= 1;
        }
        if (++s == L::kStages) {
          s = 0;
          ph ^= 1;
        }
      }
    }
  }

  // dK (times scale) and dV of the block's kept keys; zeros for its keys past the fill.
  T* dkp = static_cast<T*>(p.dk) + blk.slice * D + 2 * quad;
  T* dvp = static_cast<T*>(p.dv) + blk.slice * D + 2 * quad;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (!key_in[j]) continue;
    const int64_t key = blk.y + r0 + 8 * j;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<uint32_t*>(dkp + key * D + 8 * i) =
          pack2<T>(dk[4 * i + 2 * j] * p.scale, dk[4 * i + 2 * j + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvp + key * D + 8 * i) =
          pack2<T>(dv[4 * i + 2 * j], dv[4 * i + 2 * j + 1]);
    }
  }
  const int end = min(blk.k0 + L::kBN, static_cast<int>(p.page_size));
  zero_keys<T, D>(p, blk.slice, blk.n, end, threadIdx.x - 128, 256);
}

#endif  // sm_90a

// One CTA = (key block blockIdx.x % blocks of page blockIdx.x / blocks, KV head blockIdx.y).
template <typename T, int D, bool kDq>
__global__ void __launch_bounds__(kThreads, 1)
    routed_attn_dkdv_sm90_kernel(const __grid_constant__ CUtensorMap tm_q,
                                 const __grid_constant__ CUtensorMap tm_o,
                                 const __grid_constant__ CUtensorMap tm_k,
                                 const __grid_constant__ CUtensorMap tm_v,
                                 const RoutedAttnBwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = KvLayout<D>;
  __shared__ KvBars<L::kStages> bars;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t smem = (smem_u32(smem_raw) + 1023u) & ~1023u;  // SW128 atoms: 1024-aligned
  const int blocks = static_cast<int>((p.page_size + L::kBN - 1) / L::kBN);
  const int x = static_cast<int>(blockIdx.x);
  KvBlock blk;
  blk.page = x / blocks;
  blk.k0 = (x % blocks) * L::kBN;
  blk.hk = static_cast<int>(blockIdx.y);
  blk.n = page_fill(p, blk.page);
  blk.y = min(blk.k0, blk.n - L::kBN);  // the block holding key n - 1 ends at key n
  blk.lo = blk.k0 - blk.y;
  blk.start = __ldg(p.row_ptr + blk.page);
  blk.end = __ldg(p.row_ptr + blk.page + 1);
  blk.slice = (int64_t(blk.page) * p.Hkv + blk.hk) * p.page_size;
  if (blk.n <= blk.k0 || blk.start >= blk.end) {  // no kept key here, or no row lists the page
    zero_keys<T, D>(p, blk.slice, blk.k0, min(blk.k0 + L::kBN, static_cast<int>(p.page_size)),
                    threadIdx.x, kThreads);
    return;
  }
  if (threadIdx.x == 0) {
    mbar_init(smem_u32(&bars.kv_full), 1);
#pragma unroll
    for (int s = 0; s < L::kStages; ++s) {
      mbar_init(smem_u32(&bars.full[s]), kProducerLanes);
      mbar_init(smem_u32(&bars.empty[s]), kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    setmaxnreg_dec<24>();
    if (threadIdx.x < 32) produce_kv<D>(&tm_q, &tm_o, &tm_k, &tm_v, p, bars, smem, blk);
  } else {
    setmaxnreg_inc<240>();
    consume_kv<T, D, kDq>(p, bars, smem, blk, threadIdx.x / 128 - 1);
  }
#endif
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// ------------------------------------------------------------------------------------------------
// dQ kernel
// ------------------------------------------------------------------------------------------------

// The producer thread: Q and dO once the tile has a kept key, then K and V of each block.
template <int D>
__device__ __forceinline__ void produce_q(const CUtensorMap* tm_q, const CUtensorMap* tm_o,
                                          const CUtensorMap* tm_k, const CUtensorMap* tm_v,
                                          const RoutedAttnBwdParams& p,
                                          QBars<QLayout<D>::kStages>& bars, uint32_t smem, int b,
                                          int q0, int bh, int hk) {
  using L = QLayout<D>;
  tma_prefetch_map(tm_q);
  tma_prefetch_map(tm_o);
  tma_prefetch_map(tm_k);
  tma_prefetch_map(tm_v);
  const int32_t* table = p.page_table + int64_t(b) * p.max_pages;
  const int max_pages = static_cast<int>(p.max_pages);
  const int hkv = static_cast<int>(p.Hkv);
  bool first = true;
  int s = 0;
  uint32_t ph = 0;
  for (int j = 0; j < max_pages; ++j) {
    const int page = __ldg(table + j);
    const int n = page_fill(p, page);
    const int row = page * hkv + hk;
    for (int k0 = 0; k0 < n; k0 += L::kBN) {
      const int y = min(k0, n - L::kBN);  // the last block ends at key n
      if (first) {
        const uint32_t bar = smem_u32(&bars.q_full);
        mbar_expect_tx(bar, 2 * L::kQBytes);
#pragma unroll
        for (int pn = 0; pn < L::kPanels; ++pn) {
          tma_load_3d(smem + L::kQ + pn * L::kQPanel, tm_q, bar, pn * 64, q0, bh);
          tma_load_3d(smem + L::kO + pn * L::kQPanel, tm_o, bar, pn * 64, q0, bh);
        }
        first = false;
      }
      mbar_wait(smem_u32(&bars.empty[s]), ph ^ 1);
      bars.lo[s] = k0 - y;  // published by the arrive below (release)
      const uint32_t bar = smem_u32(&bars.full[s]);
      const uint32_t kv = smem + L::kKV + s * 2 * L::kKVBytes;
      mbar_expect_tx(bar, 2 * L::kKVBytes);
#pragma unroll
      for (int pn = 0; pn < L::kPanels; ++pn) {
        tma_load_3d(kv + pn * L::kKVPanel, tm_k, bar, pn * 64, y, row);
        tma_load_3d(kv + L::kKVBytes + pn * L::kKVPanel, tm_v, bar, pn * 64, y, row);
      }
      if (++s == L::kStages) {
        s = 0;
        ph ^= 1;
      }
    }
  }
}

// A consumer warpgroup (cw = 0, 1): queries q0 + 64 cw .. + 63 against every kept block.
template <typename T, int D>
__device__ __forceinline__ void consume_q(const RoutedAttnBwdParams& p,
                                          QBars<QLayout<D>::kStages>& bars, uint32_t smem, int b,
                                          int h, int q0, int cw) {
  using L = QLayout<D>;
  constexpr int kBN = L::kBN;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4, quad = lane % 4;

  // The number of blocks, by the producer's walk.
  const int32_t* table = p.page_table + int64_t(b) * p.max_pages;
  const int max_pages = static_cast<int>(p.max_pages);
  int nblk = 0;
  for (int j = 0; j < max_pages; ++j) nblk += (page_fill(p, __ldg(table + j)) + kBN - 1) / kBN;

  // lse (log2 domain) and delta of the thread's queries r0 and r0 + 8 (0 past Lq).
  const int64_t bh = int64_t(b) * p.H + h;
  const int r0 = q0 + 64 * cw + 16 * warp + lane / 4;
  float l2[2], dl[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const bool in = r0 + 8 * j < p.Lq;
    l2[j] = in ? lse_log2(p.lse[bh * p.Lq + r0 + 8 * j]) : 0.f;
    dl[j] = in ? p.delta[bh * p.Lq + r0 + 8 * j] : 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;
  float acc[D / 2];
  zero(acc);

  if (nblk > 0) {
    const uint32_t q = smem + L::kQ + cw * 64 * 128;  // the warpgroup's rows of each panel
    const uint32_t o = smem + L::kO + cw * 64 * 128;
    mbar_wait(smem_u32(&bars.q_full), 0);
    int s = 0;
    uint32_t ph = 0;
    for (int blk = 0; blk < nblk; ++blk) {
      mbar_wait(smem_u32(&bars.full[s]), ph);
      const int lo = bars.lo[s];
      const uint32_t k = smem + L::kKV + s * 2 * L::kKVBytes, v = k + L::kKVBytes;
      // Lane: queries r0 (x % 4 < 2) and r0 + 8, keys 8 (x / 4) + 2 quad + x % 2.
      float sc[kBN / 2], dp[kBN / 2];
      issue_abt<T, D, kBN, L::kQPanel, L::kKVPanel>(sc, q, k);  // S = Q K^T
      issue_abt<T, D, kBN, L::kQPanel, L::kKVPanel>(dp, o, v);  // dP = dO V^T
      wgmma_wait<1>();
      fence_regs(sc);
      if (lo > 0) {  // the last block of a partly used page: its first lo keys are not its own
#pragma unroll
        for (int x = 0; x < kBN / 2; ++x) {
          const int key = 8 * (x / 4) + 2 * quad + (x & 1);
          sc[x] = key >= lo ? exp2f(sc[x] * scale_log2 - l2[(x >> 1) & 1]) : 0.f;
        }
      } else {
#pragma unroll
        for (int x = 0; x < kBN / 2; ++x) sc[x] = exp2f(sc[x] * scale_log2 - l2[(x >> 1) & 1]);
      }
      wgmma_wait<0>();
      fence_regs(dp);
#pragma unroll
      for (int x = 0; x < kBN / 2; ++x) sc[x] *= dp[x] - dl[(x >> 1) & 1];
      uint32_t pf[kBN / 4];
      pack_frag<T>(sc, pf);
      issue_xb<T, D, kBN / 16, L::kKVPanel>(acc, pf, k);  // dQ += dS K
      wgmma_wait<0>();
      fence_regs(acc);
      fence_regs(pf);
      if (lane == 0) mbar_arrive(smem_u32(&bars.empty[s]));
      if (++s == L::kStages) {
        s = 0;
        ph ^= 1;
      }
    }
  }

  // dQ = scale dS K; rows without a kept key give 0.
  T* out = static_cast<T*>(p.dq) + bh * p.Lq * D + 2 * quad;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int64_t row = r0 + 8 * j;
    if (row >= p.Lq) continue;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(out + row * D + 8 * i) =
          pack2<T>(acc[4 * i + 2 * j] * p.scale, acc[4 * i + 2 * j + 1] * p.scale);
  }
}

#endif  // sm_90a

// One CTA = (row b = blockIdx.x, queries 128 blockIdx.y .. + 127, head h = blockIdx.z).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    routed_attn_dq_sm90_kernel(const __grid_constant__ CUtensorMap tm_q,
                               const __grid_constant__ CUtensorMap tm_o,
                               const __grid_constant__ CUtensorMap tm_k,
                               const __grid_constant__ CUtensorMap tm_v,
                               const RoutedAttnBwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = QLayout<D>;
  __shared__ QBars<L::kStages> bars;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t smem = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int b = static_cast<int>(blockIdx.x), h = static_cast<int>(blockIdx.z);
  const int q0 = static_cast<int>(blockIdx.y) * L::kBM;
  if (threadIdx.x == 0) {
    mbar_init(smem_u32(&bars.q_full), 1);
#pragma unroll
    for (int s = 0; s < L::kStages; ++s) {
      mbar_init(smem_u32(&bars.full[s]), 1);
      mbar_init(smem_u32(&bars.empty[s]), kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0) {
      const int hk = h / static_cast<int>(p.H / p.Hkv);
      produce_q<D>(&tm_q, &tm_o, &tm_k, &tm_v, p, bars, smem, b, q0,
                   b * static_cast<int>(p.H) + h, hk);
    }
  } else {
    setmaxnreg_inc<240>();
    consume_q<T, D>(p, bars, smem, b, h, q0, threadIdx.x / 128 - 1);
  }
#endif
}

// dq = scale * dq_accum, four values per thread and step (the atomic mode's last kernel).
template <typename T>
__global__ void routed_attn_dq_convert_sm90_kernel(const float4* acc, uint2* dq, int64_t n4,
                                                   float scale) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = acc[i];
    dq[i] = make_uint2(pack2<T>(v.x * scale, v.y * scale), pack2<T>(v.z * scale, v.w * scale));
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// Host
// ------------------------------------------------------------------------------------------------

// Whether the loaded binary of a kernel has its body (an sm_90a cubin): a build for sm_90 or sm_80
// alone gives this device an empty kernel, without static shared memory.
template <class K>
bool has_body(K kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.sharedSizeBytes > 0;
}

template <typename T, int D>
bool bodies() {
  static const bool ok = has_body(routed_attn_dkdv_sm90_kernel<T, D, false>) &&
                         has_body(routed_attn_dkdv_sm90_kernel<T, D, true>) &&
                         has_body(routed_attn_dq_sm90_kernel<T, D>);
  return ok;
}

template <class K>
bool allow_smem(K kernel, size_t bytes) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)) == cudaSuccess)
    return true;
  (void)cudaGetLastError();
  return false;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int D>
cudaError_t launch_bwd_sm90(const RoutedAttnBwdParams& p, DType dt, cudaStream_t stream) {
  using KL = KvLayout<D>;
  using QL = QLayout<D>;
  if (!bodies<T, D>()) return cudaErrorNotSupported;
  const bool det = p.deterministic;
  auto* dkdv = det ? routed_attn_dkdv_sm90_kernel<T, D, false>
                   : routed_attn_dkdv_sm90_kernel<T, D, true>;
  auto* dq = routed_attn_dq_sm90_kernel<T, D>;
  const uint64_t heads = p.B * p.H, slices = p.P * p.Hkv;
  CUtensorMap kv_q, kv_o, kv_k, kv_v, q_q, q_o, q_k, q_v;
  if (!encode_map(&kv_q, dt, p.q, D, p.Lq, heads, KL::kBM) ||
      !encode_map(&kv_o, dt, p.dout, D, p.Lq, heads, KL::kBM) ||
      !encode_map(&kv_k, dt, p.k_pages, D, p.page_size, slices, KL::kBN) ||
      !encode_map(&kv_v, dt, p.v_pages, D, p.page_size, slices, KL::kBN))
    return cudaErrorNotSupported;
  if (det && (!encode_map(&q_q, dt, p.q, D, p.Lq, heads, QL::kBM) ||
              !encode_map(&q_o, dt, p.dout, D, p.Lq, heads, QL::kBM) ||
              !encode_map(&q_k, dt, p.k_pages, D, p.page_size, slices, QL::kBN) ||
              !encode_map(&q_v, dt, p.v_pages, D, p.page_size, slices, QL::kBN)))
    return cudaErrorNotSupported;
  const size_t kv_bytes = KL::bytes(!det);
  if (!allow_smem(dkdv, kv_bytes) || (det && !allow_smem(dq, QL::kBytes)))
    return cudaErrorNotSupported;

  const dim3 kv_grid(static_cast<unsigned>(cdiv(p.page_size, KL::kBN) * p.P),
                     static_cast<unsigned>(p.Hkv));
  dkdv<<<kv_grid, kThreads, kv_bytes, stream>>>(kv_q, kv_o, kv_k, kv_v, p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (det) {
    const dim3 q_grid(static_cast<unsigned>(p.B), static_cast<unsigned>(cdiv(p.Lq, QL::kBM)),
                      static_cast<unsigned>(p.H));
    dq<<<q_grid, kThreads, QL::kBytes, stream>>>(q_q, q_o, q_k, q_v, p);
  } else {
    const int64_t n4 = p.B * p.H * p.Lq * D / 4;
    const int64_t blocks = cdiv(n4, 256) < 65536 ? cdiv(n4, 256) : 65536;
    routed_attn_dq_convert_sm90_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        reinterpret_cast<const float4*>(p.dq_accum), static_cast<uint2*>(p.dq), n4, p.scale);
  }
  return cudaGetLastError();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

cudaError_t routed_attention_bwd_sm90(const RoutedAttnBwdParams& p, DType dt, cudaStream_t stream) {
  if ((dt != DType::kFloat16 && dt != DType::kBFloat16) || (p.D != 64 && p.D != 128) ||
      p.Hkv <= 0 || p.H % p.Hkv != 0 || (!p.deterministic && p.dq_accum == nullptr))
    return cudaErrorNotSupported;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaErrorNotSupported;
  }
  if (major != 9 || minor != 0) return cudaErrorNotSupported;
  // Left to the sm80 kernels: nothing to read (a tensor map needs non-empty dimensions), indices
  // past 32 bits (TMA coordinates and the walks are int32), pointers TMA or the 16-byte stores
  // cannot take.
  constexpr int64_t kMax = INT32_MAX / 2;
  if (p.B <= 0 || p.H <= 0 || p.Lq <= 0 || p.P <= 0 || p.page_size <= 0 || p.max_pages <= 0 ||
      p.Lq > kMax || p.page_size > kMax || p.max_pages > kMax || p.P * p.Hkv > kMax ||
      p.B * p.H > kMax)
    return cudaErrorNotSupported;
  // The sm80 launcher's grid limits (128-key blocks, 64-query dq tiles), so that both paths take
  // one set of shapes; the sm80 path reports a grid past them.
  if (cdiv(p.page_size, 128) * p.P > INT32_MAX || p.Hkv > 65535 ||
      (p.deterministic && (cdiv(p.Lq, 64) > 65535 || p.H > 65535)))
    return cudaErrorNotSupported;
  if (!aligned16(p.q) || !aligned16(p.dout) || !aligned16(p.k_pages) || !aligned16(p.v_pages) ||
      !aligned16(p.dq) || !aligned16(p.dk) || !aligned16(p.dv) ||
      (!p.deterministic && !aligned16(p.dq_accum)))
    return cudaErrorNotSupported;
  if (dt == DType::kFloat16)
    return p.D == 64 ? launch_bwd_sm90<__half, 64>(p, dt, stream)
                     : launch_bwd_sm90<__half, 128>(p, dt, stream);
  return p.D == 64 ? launch_bwd_sm90<__nv_bfloat16, 64>(p, dt, stream)
                   : launch_bwd_sm90<__nv_bfloat16, 128>(p, dt, stream);
}

}  // namespace kvpo::cuda
