// Routed paged attention backward on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32
// accumulate), FlashAttention-2 style: per tile, S = Q K^T, P = exp(scale S - lse), dP = dO V^T
// and dS = P (dP - delta) live in registers and feed the gradient products directly.
//
// dK/dV kernel: one CTA per (block of kBN keys of one physical page, KV head); grid x runs over
// (page, key block) with a page's blocks adjacent, grid y over KV heads (slowest: the CTAs running
// together read one head's Q and dO from L2). Each warp owns 16 keys, whose dK and dV accumulate in
// registers; the block's K and V stay in shared memory. The CTA walks the rows that list its page
// (rows[row_ptr[page]:row_ptr[page + 1]], once per listing), each row's query heads of the KV
// head's group and all their tiles of kBM queries; the Q, dO, lse and delta of a tile stream
// through shared memory in two stages with cp.async. Per tile and warp:
//   S^T = K Q^T;  P^T = exp2(S^T scale log2e - lse log2e), keys past the page's fill masked;
//   dV += P^T dO;  dP^T = V dO^T;  dS^T = P^T (dP^T - delta);  dK += dS^T Q.
// A page listed by several rows (or twice by one) has its gradient summed inside its CTAs in a
// fixed order: no atomics, bitwise repeatable. Keys past the fill are zero-filled, never read, and
// get dK = dV = 0; every element of dk and dv is written, pages no row lists included.
//
// dQ, deterministic mode: a kernel shaped like the forward (one CTA per (row b, tile of kBM
// queries, head), 16 queries per warp, K and V blocks streamed in two stages along row b's page
// table) recomputes S, P, dP and dS per block and accumulates dQ += dS K in registers.
// Non-deterministic mode: the dK/dV kernel also stores each tile's dS^T in shared memory and adds
// dS K into a zero-filled float32 accumulator with atomics (scores computed once in the whole
// backward); a last kernel writes scale * accumulator into dq.
//
// Tiles per GPU, from its opt-in shared memory per block (set by its compute capability): where
// they fit (sm_80, sm_87, sm_90, sm_100: 163 KB and more) 8 warps, dK/dV blocks of 128 keys by
// query tiles of 64 and dQ tiles of 128 queries by key blocks of 64 (at D = 128: 137 KB, 155 KB
// with the atomic dq, and 136 KB); else (sm_86, sm_89, sm_120: 99 KB) 4 warps, 64 keys by 32
// queries and 64 queries by 32 keys (74 KB, 68 KB). One CTA per SM at D = 128 either way.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "mma_sm80.cuh"
#include "routed_attention_bwd_sm90.h"
#include "routed_attention_sm90.h"

namespace kvpo::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// Shared-memory rows are padded by 8 elements (16 bytes): the 8 rows an ldmatrix reads start in 8
// different bank groups and stay 16-byte aligned for cp.async.

// dK/dV kernel tiles: kWarps warps of 16 keys (kBN keys per CTA), query tiles of kBM.
template <int D_, int kWarps_, int kBM_>
struct KvTiles {
  static constexpr int D = D_, kWarps = kWarps_, kThreads = 32 * kWarps_;
  static constexpr int kMinBlocks = kWarps_ == 8 ? 1 : 2;
  static constexpr int kBN = 16 * kWarps_, kBM = kBM_;
  static constexpr int kLd = D + 8, kLdS = kBM + 8;  // row strides of K, V, Q, dO and of dS^T
  static constexpr int kKV = kBN * kLd, kQ = kBM * kLd, kS = kBN * kLdS;  // elements
  // K, V, two stages of Q and dO, dS^T (non-deterministic dq), two stages of lse and delta.
  static constexpr size_t bytes(bool dq) {
    return size_t(2 * kKV + 4 * kQ + (dq ? kS : 0)) * 2 + 4 * kBM * sizeof(float);
  }
};

// dQ kernel tiles: kWarps warps of 16 queries (kBM queries per CTA), key blocks of kBN.
template <int D_, int kWarps_, int kBN_>
struct QTiles {
  static constexpr int D = D_, kThreads = 32 * kWarps_;
  static constexpr int kMinBlocks = kWarps_ == 8 ? 1 : 2;
  static constexpr int kBM = 16 * kWarps_, kBN = kBN_;
  static constexpr int kLd = D + 8;
  static constexpr int kQ = kBM * kLd, kKV = kBN * kLd;  // elements
  static constexpr size_t bytes() { return size_t(2 * kQ + 4 * kKV) * 2; }  // Q, dO, 2 x (K, V)
};

template <int N>
__device__ __forceinline__ void zero(float (&x)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) x[i][0] = x[i][1] = x[i][2] = x[i][3] = 0.f;
}

// lse in the log2 domain; a row without kept keys (-inf) counts as 0, as in the Triton backward.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? 0.f : lse * kLog2e;
}

// Queues rows [0, ROWS) of two [*, D] tiles a and b into shared memory (row stride D + 8); rows
// from `valid` on are zero-filled, their memory never read.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_pair(T* sa, T* sb, const T* a, const T* b, int valid) {
  constexpr int kVec = D / 8, kLd = D + 8;
#pragma unroll
  for (int i = threadIdx.x; i < ROWS * kVec; i += THREADS) {
    const int r = i / kVec, col = (i % kVec) * 8;
    const bool in = r < valid;
    const int64_t off = in ? int64_t(r) * D + col : 0;
    cp_async16(sa + r * kLd + col, a + off, in ? 16 : 0);
    cp_async16(sb + r * kLd + col, b + off, in ? 16 : 0);
  }
}

// Element offsets of a lane's ldmatrix row address in a tile of row stride ld. x: the A operand,
// and the transposed B (matrices rows +0..7 / +8..15 by lane / 8 % 2, columns +0..7 / +8..15 by
// lane / 16); y: the B operand, and the transposed A (rows by lane / 16, columns by lane / 8 % 2).
__device__ __forceinline__ int lane_x(int ld, int lane) {
  return ((lane % 8) + ((lane / 8) % 2) * 8) * ld + (lane / 16) * 8;
}
__device__ __forceinline__ int lane_y(int ld, int lane) {
  return ((lane % 8) + (lane / 16) * 8) * ld + ((lane / 8) % 2) * 8;
}

// acc[16, 8 NT] += A B^T for one warp: A = 16 rows of 16 KT elements, B = 8 NT rows of 16 KT
// elements, both row-major in shared memory; a, b: byte addresses of the lane's rows (lane_x,
// lane_y offsets included).
template <typename T, int KT, int NT, int LDA, int LDB>
__device__ __forceinline__ void gemm_abt(float (&acc)[NT][4], uint32_t a, uint32_t b) {
// Two k-steps at a time: fully unrolled, the D = 128 dK/dV kernel hoists loads until it spills.
#pragma unroll 2
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, a + kk * 32);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (np * 16 * LDB + kk * 16) * 2);
      mma16816<T>(acc[2 * np], af, bf[0], bf[1]);
      mma16816<T>(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// acc[16, 8 NT] += X B for one warp: X = [16, 16 KT] in registers as mma accumulators (tile i:
// columns 8 i .. 8 i + 7), repacked as A fragments; B = 16 KT rows of 8 NT elements, row-major in
// shared memory, read transposed; b: byte address of the lane's row (lane_x offset included).
template <typename T, int KT, int NT, int LDB>
__device__ __forceinline__ void gemm_xb(float (&acc)[NT][4], const float (&x)[2 * KT][4],
                                        uint32_t b) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    const uint32_t xa[4] = {
        pack2<T>(x[2 * kk][0], x[2 * kk][1]), pack2<T>(x[2 * kk][2], x[2 * kk][3]),
        pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]), pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (kk * 16 * LDB + np * 16) * 2);
      mma16816<T>(acc[2 * np], xa, bf[0], bf[1]);
      mma16816<T>(acc[2 * np + 1], xa, bf[2], bf[3]);
    }
  }
}

// Writes one warp's [16, 8 NT] accumulators times scale as rows of dst (row stride ld), rows from
// `rows` on skipped. Lane: rows lane / 4 and lane / 4 + 8, columns 8 i + 2 (lane % 4) + {0, 1}.
template <typename T, int NT>
__device__ __forceinline__ void store_tile(T* dst, int64_t ld, const float (&x)[NT][4],
                                           float scale, int rows, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = lane / 4 + r * 8;
    if (row >= rows) continue;
    T* d = dst + row * ld + (lane % 4) * 2;
#pragma unroll
    for (int i = 0; i < NT; ++i)
      *reinterpret_cast<uint32_t*>(d + i * 8) =
          pack2<T>(x[i][2 * r] * scale, x[i][2 * r + 1] * scale);
  }
}

// ------------------------------------------------------------------------------------------------
// dK/dV kernel
// ------------------------------------------------------------------------------------------------

// A tile of the dK/dV walk: listing e of the page, query head g of the group, query tile mb.
struct RowTile {
  int64_t e, g, mb;
};

__device__ __forceinline__ bool next_tile(RowTile& t, int64_t end, int64_t group, int64_t tiles) {
  if (++t.mb < tiles) return true;
  t.mb = 0;
  if (++t.g < group) return true;
  t.g = 0;
  return ++t.e < end;
}

// Index of the tile's first query in [B, H, Lq] (int64: rows of q may pass 2**31 elements).
__device__ __forceinline__ int64_t tile_row(const RowTile& t, const RoutedAttnBwdParams& p,
                                            int64_t hk, int bm) {
  const int64_t b = p.rows[t.e], h = hk * (p.H / p.Hkv) + t.g;
  return (b * p.H + h) * p.Lq + t.mb * bm;
}

// Queues a tile's Q, dO, lse and delta. Queries past Lq are zero-filled: P = 1 (s = lse = 0),
// but dO = delta = 0, so they add exact zeros to dV and dK (and dq skips them).
template <typename T, class C>
__device__ __forceinline__ void load_rows(T* sQ, T* sO, float* sL, float* sDelta,
                                          const RoutedAttnBwdParams& p, int64_t row, int rows) {
  load_pair<C::kBM, C::D, C::kThreads>(sQ, sO, static_cast<const T*>(p.q) + row * C::D,
                                       static_cast<const T*>(p.dout) + row * C::D, rows);
  for (int i = threadIdx.x; i < C::kBM; i += C::kThreads) {
    const bool in = i < rows;
    cp_async4(sL + i, p.lse + row + (in ? i : 0), in ? 4 : 0);
    cp_async4(sDelta + i, p.delta + row + (in ? i : 0), in ? 4 : 0);
  }
}

// One query tile for this warp's 16 keys: dV += P^T dO, dK += dS^T Q, and with kDq dS^T stored at
// sS. k, v: byte addresses of the warp's K and V rows (lane_x included); q, o: of the stage's Q
// and dO; lx, ly: the lane's lane_x and lane_y in bytes. key_in: whether the lane's keys lane / 4
// and lane / 4 + 8 are kept.
template <typename T, class C, bool kDq>
__device__ __forceinline__ void kv_tile(float (&dk)[C::D / 8][4], float (&dv)[C::D / 8][4],
                                        uint32_t k, uint32_t v, uint32_t q, uint32_t o, int lx,
                                        int ly, const float* sL, const float* sDelta, T* sS,
                                        const bool (&key_in)[2], float scale_log2, int lane) {
  constexpr int NT = C::kBM / 8, KD = C::D / 16, KM = C::kBM / 16, LD = C::kLd;
  // Lane: keys lane / 4 (e < 2) and lane / 4 + 8 (e >= 2), queries 8 i + 2 (lane % 4) + e % 2.
  float st[NT][4];
  zero(st);
  gemm_abt<T, KD, NT, LD, LD>(st, k, q + ly);
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const float2 l = *reinterpret_cast<const float2*>(sL + i * 8 + (lane % 4) * 2);
    const float l2[2] = {lse_log2(l.x), lse_log2(l.y)};
#pragma unroll
    for (int e = 0; e < 4; ++e)
      st[i][e] = key_in[e / 2] ? exp2f(st[i][e] * scale_log2 - l2[e % 2]) : 0.f;
  }
  gemm_xb<T, KM, C::D / 8, LD>(dv, st, o + lx);
  float dpt[NT][4];
  zero(dpt);
  gemm_abt<T, KD, NT, LD, LD>(dpt, v, o + ly);
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const float2 d = *reinterpret_cast<const float2*>(sDelta + i * 8 + (lane % 4) * 2);
#pragma unroll
    for (int e = 0; e < 4; ++e) st[i][e] *= dpt[i][e] - (e % 2 ? d.y : d.x);
  }
  gemm_xb<T, KM, C::D / 8, LD>(dk, st, q + lx);
  if constexpr (kDq) store_tile<T, NT>(sS, C::kLdS, st, 1.f, 16, lane);
}

// Float pair atomics: one vector atomic on sm_90 and newer.
__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// dq[0, rows) += dS K over the CTA's first 16 k16 keys; s, k: byte addresses of dS^T (keys x kBM
// queries; lane_y included) and of K (lane_x included). Tasks of 16 queries x 64 columns are
// dealt to the warps.
template <typename T, class C>
__device__ __forceinline__ void add_dq(float* dq, int rows, uint32_t s, uint32_t k, int k16,
                                       int warp, int lane) {
  constexpr int kRowTiles = C::kBM / 16, kTasks = kRowTiles * (C::D / 64);
  for (int task = warp; task < kTasks; task += C::kWarps) {
    const int r0 = (task % kRowTiles) * 16, c0 = (task / kRowTiles) * 64;
    float acc[8][4];
    zero(acc);
    for (int kk = 0; kk < k16; ++kk) {
      uint32_t af[4];  // dS (queries x keys), read transposed from dS^T
      ldmatrix_x4_trans(af, s + (kk * 16 * C::kLdS + r0) * 2);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, k + (kk * 16 * C::kLd + c0 + np * 16) * 2);
        mma16816<T>(acc[2 * np], af, bf[0], bf[1]);
        mma16816<T>(acc[2 * np + 1], af, bf[2], bf[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = r0 + lane / 4 + r * 8;
      if (row >= rows) continue;
      float* d = dq + int64_t(row) * C::D + c0 + (lane % 4) * 2;
#pragma unroll
      for (int i = 0; i < 8; ++i) atomic_add2(d + i * 8, acc[i][2 * r], acc[i][2 * r + 1]);
    }
  }
}

template <typename T, class C, bool kDq>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    routed_attn_dkdv_kernel(RoutedAttnBwdParams p) {
  constexpr int D = C::D, kBN = C::kBN, kBM = C::kBM;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + C::kKV;
  T* sQ = sV + C::kKV;     // stage s at sQ + s * C::kQ
  T* sO = sQ + 2 * C::kQ;  // dO, stage s at sO + s * C::kQ
  T* sS = sO + 2 * C::kQ;  // dS^T (kDq)
  float* sL = reinterpret_cast<float*>(sS + (kDq ? C::kS : 0));  // lse, stage s at sL + s * kBM
  float* sDelta = sL + 2 * kBM;

  const int64_t blocks = (p.page_size + kBN - 1) / kBN;
  const int64_t page = blockIdx.x / blocks, k0 = (blockIdx.x % blocks) * kBN, hk = blockIdx.y;
  int64_t n = p.page_size;
  if (p.page_lens != nullptr) n = imin(p.page_lens[page] > 0 ? p.page_lens[page] : 0, n);
  const int valid = static_cast<int>(n > k0 ? imin(kBN, n - k0) : 0);  // kept keys of the block
  const int64_t group = p.H / p.Hkv, tiles = (p.Lq + kBM - 1) / kBM, end = p.row_ptr[page + 1];
  const int64_t kv = ((page * p.Hkv + hk) * p.page_size + k0) * D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool active = warp * 16 < valid;  // warp-uniform: the warp has kept keys
  const bool key_in[2] = {warp * 16 + lane / 4 < valid, warp * 16 + lane / 4 + 8 < valid};
  const float scale_log2 = p.scale * kLog2e;
  // Shared-space byte addresses: the lane's ldmatrix rows in the tiles of row stride kLd / kLdS.
  const uint32_t base = smem_addr(smem);
  const int lx = lane_x(C::kLd, lane) * 2, ly = lane_y(C::kLd, lane) * 2;
  const uint32_t k_w = base + (warp * 16 * C::kLd) * 2 + lx;
  const uint32_t v_w = k_w + C::kKV * 2;
  const uint32_t q_s = base + 2 * C::kKV * 2;  // stage s at q_s + s * kQ * 2
  const uint32_t o_s = q_s + 2 * C::kQ * 2;
  const uint32_t s_y = o_s + 2 * C::kQ * 2 + lane_y(C::kLdS, lane) * 2;

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  RowTile cur{p.row_ptr[page], 0, 0};
  bool have = valid > 0 && cur.e < end && group > 0 && tiles > 0;
  if (have) {
    load_pair<kBN, D, C::kThreads>(sK, sV, static_cast<const T*>(p.k_pages) + kv,
                                   static_cast<const T*>(p.v_pages) + kv, valid);
    load_rows<T, C>(sQ, sO, sL, sDelta, p, tile_row(cur, p, hk, kBM),
                    static_cast<int>(imin(kBM, p.Lq)));
  }
  cp_async_commit();

  for (int stage = 0; have; stage ^= 1) {
    RowTile nxt = cur;
    const bool more = next_tile(nxt, end, group, tiles);
    if (more) {
      const int s = stage ^ 1;
      load_rows<T, C>(sQ + s * C::kQ, sO + s * C::kQ, sL + s * kBM, sDelta + s * kBM, p,
                      tile_row(nxt, p, hk, kBM), static_cast<int>(imin(kBM, p.Lq - nxt.mb * kBM)));
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile's copy (and K, V) is done; the next one may still run
    __syncthreads();
    if (active)
      kv_tile<T, C, kDq>(dk, dv, k_w, v_w, q_s + stage * C::kQ * 2, o_s + stage * C::kQ * 2, lx,
                         ly, sL + stage * kBM, sDelta + stage * kBM, sS + warp * 16 * C::kLdS,
                         key_in, scale_log2, lane);
    if constexpr (kDq) {
      __syncthreads();  // every warp's dS^T rows are stored
      add_dq<T, C>(p.dq_accum + tile_row(cur, p, hk, kBM) * D,
                   static_cast<int>(imin(kBM, p.Lq - cur.mb * kBM)), s_y, base + lx,
                   (valid + 15) / 16, warp, lane);
    }
    __syncthreads();  // every warp is done with this stage before its next copy is queued
    cur = nxt;
    have = more;
  }
  cp_async_wait<0>();

  const int rows = static_cast<int>(imin(kBN, p.page_size - k0)) - warp * 16;
  store_tile<T, D / 8>(static_cast<T*>(p.dk) + kv + warp * 16 * D, D, dk, p.scale, rows, lane);
  store_tile<T, D / 8>(static_cast<T*>(p.dv) + kv + warp * 16 * D, D, dv, 1.f, rows, lane);
}

// ------------------------------------------------------------------------------------------------
// dQ kernels
// ------------------------------------------------------------------------------------------------

// The forward's walk over row b's kept key blocks, kBN keys at a time.
template <int kBN>
__device__ __forceinline__ bool next_block(Cursor& c, const RoutedAttnBwdParams& p, int64_t b,
                                           int64_t hk, int D) {
  if (c.k0 + kBN < c.n) {
    c.k0 += kBN;
    return true;
  }
  return first_from(c, c.j + 1, p, b, hk, D);
}

template <typename T, class C>
__device__ __forceinline__ void load_block(T* sK, T* sV, const RoutedAttnBwdParams& p,
                                           const Cursor& c) {
  const int64_t off = c.base + c.k0 * C::D;
  load_pair<C::kBN, C::D, C::kThreads>(sK, sV, static_cast<const T*>(p.k_pages) + off,
                                       static_cast<const T*>(p.v_pages) + off,
                                       static_cast<int>(imin(C::kBN, c.n - c.k0)));
}

template <typename T, class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    routed_attn_dq_kernel(RoutedAttnBwdParams p) {
  constexpr int D = C::D, kBN = C::kBN, kBM = C::kBM;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sO = sQ + C::kQ;
  auto sK = [&](int stage) { return sO + C::kQ + 2 * stage * C::kKV; };
  auto sV = [&](int stage) { return sO + C::kQ + (2 * stage + 1) * C::kKV; };

  const int64_t b = blockIdx.x, h = blockIdx.z, q0 = int64_t(blockIdx.y) * kBM;
  const int64_t hk = h / (p.H / p.Hkv);
  const int64_t row = (b * p.H + h) * p.Lq + q0;  // the tile's first query in [B, H, Lq]
  const int rows = static_cast<int>(imin(kBM, p.Lq - q0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Q and dO -> shared (rows past Lq zero-filled), in the first copy group with the first block.
  load_pair<kBM, D, C::kThreads>(sQ, sO, static_cast<const T*>(p.q) + row * D,
                                 static_cast<const T*>(p.dout) + row * D, rows);
  Cursor cur;
  bool have = first_from(cur, 0, p, b, hk, D);
  if (have) load_block<T, C>(sK(0), sV(0), p, cur);
  cp_async_commit();

  // lse (log2 domain) and delta of the lane's queries lane / 4 and lane / 4 + 8 of the warp's 16.
  float l2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = warp * 16 + lane / 4 + r * 8;
    l2[r] = i < rows ? lse_log2(p.lse[row + i]) : 0.f;
    dl[r] = i < rows ? p.delta[row + i] : 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;
  // Shared-space byte addresses: the warp's Q and dO rows, the stages' K and V (lane offsets added
  // at use).
  const uint32_t base = smem_addr(smem);
  const int lx = lane_x(C::kLd, lane) * 2, ly = lane_y(C::kLd, lane) * 2;
  const uint32_t q_w = base + (warp * 16 * C::kLd) * 2 + lx;
  const uint32_t o_w = q_w + C::kQ * 2;
  const uint32_t kv_s = base + 2 * C::kQ * 2;  // stage s: K at kv_s + 2 s kKV * 2, V after it
  float acc[D / 8][4];
  zero(acc);

  for (int stage = 0; have; stage ^= 1) {
    Cursor nxt = cur;
    const bool more = next_block<kBN>(nxt, p, b, hk, D);
    if (more) load_block<T, C>(sK(stage ^ 1), sV(stage ^ 1), p, nxt);
    cp_async_commit();
    cp_async_wait<1>();  // this block's copy is done (the next one may still run)
    __syncthreads();
    const int valid = static_cast<int>(imin(kBN, cur.n - cur.k0));
    const uint32_t k = kv_s + 2 * stage * C::kKV * 2, v = k + C::kKV * 2;
    // Lane: queries lane / 4 (e < 2) and lane / 4 + 8 (e >= 2), keys 8 i + 2 (lane % 4) + e % 2.
    float s[kBN / 8][4], dp[kBN / 8][4];
    zero(s);
    gemm_abt<T, D / 16, kBN / 8, C::kLd, C::kLd>(s, q_w, k + ly);
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = i * 8 + (lane % 4) * 2 + e % 2;
        s[i][e] = key < valid ? exp2f(s[i][e] * scale_log2 - l2[e / 2]) : 0.f;
      }
    }
    zero(dp);
    gemm_abt<T, D / 16, kBN / 8, C::kLd, C::kLd>(dp, o_w, v + ly);
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] *= dp[i][e] - dl[e / 2];
    }
    gemm_xb<T, kBN / 16, D / 8, C::kLd>(acc, s, k + lx);
    __syncthreads();  // every warp is done with this stage before its next copy is queued
    cur = nxt;
    have = more;
  }
  cp_async_wait<0>();
  store_tile<T, D / 8>(static_cast<T*>(p.dq) + (row + warp * 16) * D, D, acc, p.scale,
                       rows - warp * 16, lane);
}

// dq = scale * dq_accum, four values per thread and step.
template <typename T>
__global__ void routed_attn_dq_convert_kernel(const float4* acc, uint2* dq, int64_t n4,
                                              float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = acc[i];
    dq[i] = make_uint2(pack2<T>(v.x * scale, v.y * scale), pack2<T>(v.z * scale, v.w * scale));
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

constexpr int64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <typename T, class C, bool kDq>
cudaError_t launch_dkdv(const RoutedAttnBwdParams& p, cudaStream_t stream) {
  const size_t bytes = C::bytes(kDq);
  cudaError_t err = allow_smem(routed_attn_dkdv_kernel<T, C, kDq>, bytes);
  if (err != cudaSuccess) return err;
  const int64_t blocks = cdiv(p.page_size, C::kBN) * p.P;
  if (blocks == 0 || p.Hkv == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.Hkv));
  routed_attn_dkdv_kernel<T, C, kDq><<<grid, C::kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, class C>
cudaError_t launch_dq(const RoutedAttnBwdParams& p, cudaStream_t stream) {
  const size_t bytes = C::bytes();
  cudaError_t err = allow_smem(routed_attn_dq_kernel<T, C>, bytes);
  if (err != cudaSuccess) return err;
  if (p.B == 0 || p.H == 0 || p.Lq == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.B), static_cast<unsigned>(cdiv(p.Lq, C::kBM)),
                  static_cast<unsigned>(p.H));
  routed_attn_dq_kernel<T, C><<<grid, C::kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dq_convert(const RoutedAttnBwdParams& p, cudaStream_t stream) {
  const int64_t n4 = p.B * p.H * p.Lq * p.D / 4;  // D is 64 or 128
  if (n4 == 0) return cudaSuccess;
  const int64_t blocks = cdiv(n4, 256) < 65536 ? cdiv(n4, 256) : 65536;
  routed_attn_dq_convert_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      reinterpret_cast<const float4*>(p.dq_accum), static_cast<uint2*>(p.dq), n4, p.scale);
  return cudaGetLastError();
}

// Every grid within CUDA's axis limits: dK/dV (page x key block, KV head), dQ (row, tile, head).
bool grids_fit(const RoutedAttnBwdParams& p, int kv_bn, int q_bm) {
  if (cdiv(p.page_size, kv_bn) * p.P > kMaxGridX || p.Hkv > kMaxGridYZ) return false;
  if (!p.deterministic) return true;
  return p.B <= kMaxGridX && cdiv(p.Lq, q_bm) <= kMaxGridYZ && p.H <= kMaxGridYZ;
}

template <typename T, class Kv, class Q>
cudaError_t launch_all(const RoutedAttnBwdParams& p, cudaStream_t stream) {
  if (!grids_fit(p, Kv::kBN, Q::kBM)) return cudaErrorInvalidConfiguration;
  if (p.deterministic) {
    cudaError_t err = launch_dkdv<T, Kv, false>(p, stream);
    return err != cudaSuccess ? err : launch_dq<T, Q>(p, stream);
  }
  cudaError_t err = launch_dkdv<T, Kv, true>(p, stream);
  return err != cudaSuccess ? err : launch_dq_convert<T>(p, stream);
}

// The tiles that fit the device's shared memory per block: 8 warps where it holds them (sm_80,
// sm_87, sm_90, sm_100), else 4 (sm_86, sm_89, sm_120).
template <typename T, int D>
cudaError_t launch(const RoutedAttnBwdParams& p, cudaStream_t stream) {
  using KvBig = KvTiles<D, 8, 64>;
  using QBig = QTiles<D, 8, 64>;
  using KvSmall = KvTiles<D, 4, 32>;
  using QSmall = QTiles<D, 4, 32>;
  int device = 0, smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const size_t optin = static_cast<size_t>(smem);
  if (optin >= KvBig::bytes(!p.deterministic) && optin >= QBig::bytes())
    return launch_all<T, KvBig, QBig>(p, stream);
  return launch_all<T, KvSmall, QSmall>(p, stream);
}

}  // namespace

bool routed_attention_bwd_supported(DType dt, int64_t head_dim) {
  return (dt == DType::kFloat16 || dt == DType::kBFloat16) && (head_dim == 64 || head_dim == 128);
}

cudaError_t routed_attention_bwd(const RoutedAttnBwdParams& p, DType dt, cudaStream_t stream) {
  if (!routed_attention_bwd_supported(dt, p.D) || p.Hkv <= 0 || p.H % p.Hkv != 0)
    return cudaErrorInvalidValue;
  if (!p.deterministic && p.dq_accum == nullptr) return cudaErrorInvalidValue;
  // The TMA + wgmma kernels (routed_attention_bwd_sm90.cu) first; for what they leave to this
  // file's kernels they answer cudaErrorNotSupported.
  if (hopper_kernels_wanted()) {
    const cudaError_t err = routed_attention_bwd_sm90(p, dt, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  if (dt == DType::kFloat16)
    return p.D == 64 ? launch<__half, 64>(p, stream) : launch<__half, 128>(p, stream);
  return p.D == 64 ? launch<__nv_bfloat16, 64>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
}

}  // namespace kvpo::cuda
