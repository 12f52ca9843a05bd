// Per-branch Trajectory Velocity Energy on CUDA.
//
// Forward: a 2-D grid, y = the G*S (branch, step) rows and x = slices of N. Each thread keeps
// four 16-byte loads of v_pred and of v_ref in flight, accumulates (a - b)^2 in float32, the
// block reduces with warp shuffles then shared memory, and writes weight * partial to its own
// slot of a workspace; a second launch sums each branch's slots in a fixed order. No atomics, so
// the energies repeat bit for bit, and no zero fill; no (a - b) temporary.
// Backward: elementwise, 16-byte loads and stores, unrolled the same way.
// Both are sized to one wave of the blocks an SM holds, and read weight[g, s] through its strides
// (a per-step weight broadcast over G is not copied).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dtype.cuh"
#include "kernels.h"

namespace kvpo::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Vec;  // 16 bytes of T and conversions to/from float
template <>
struct Vec<float> {
  static constexpr int kN = 4;
  using Raw = float4;
  __device__ static void to_float(const Raw& r, float* f) {
    f[0] = r.x;
    f[1] = r.y;
    f[2] = r.z;
    f[3] = r.w;
  }
  __device__ static Raw from_float(const float* f) { return make_float4(f[0], f[1], f[2], f[3]); }
};
// Eight 16-bit values (fp16 or bf16), read as four pairs T2 (__half2 / __nv_bfloat162).
__device__ __forceinline__ float2 pair_to_float2(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 pair_to_float2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
template <typename T2>
__device__ T2 float2_to_pair(float a, float b);
template <>
__device__ __forceinline__ __half2 float2_to_pair<__half2>(float a, float b) {
  return __floats2half2_rn(a, b);
}
template <>
__device__ __forceinline__ __nv_bfloat162 float2_to_pair<__nv_bfloat162>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}
template <typename T2>
struct Vec16 {
  static constexpr int kN = 8;
  using Raw = uint4;
  __device__ static void to_float(const Raw& r, float* f) {
    const T2* h = reinterpret_cast<const T2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = pair_to_float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  __device__ static Raw from_float(const float* f) {
    Raw r;
    T2* h = reinterpret_cast<T2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = float2_to_pair<T2>(f[2 * i], f[2 * i + 1]);
    return r;
  }
};
template <>
struct Vec<__half> : Vec16<__half2> {};
template <>
struct Vec<__nv_bfloat16> : Vec16<__nv_bfloat162> {};

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // warp_sums may be reused by the caller's next row
  return v;  // valid in thread 0
}

constexpr int kUnroll = 4;

__device__ __forceinline__ float row_weight(const StepWeight& w, int64_t row, int64_t S) {
  if (w.ptr == nullptr) return 1.f;
  const int64_t g = row / S;
  return w.ptr[g * w.stride_g + (row - g * S) * w.stride_s];
}

// acc + sum over one vector of (x - y)^2.
template <typename V>
__device__ __forceinline__ float sq_dist(const typename V::Raw& x, const typename V::Raw& y,
                                         float acc) {
  float fx[V::kN], fy[V::kN];
  V::to_float(x, fx);
  V::to_float(y, fy);
#pragma unroll
  for (int k = 0; k < V::kN; ++k) {
    const float d = fx[k] - fy[k];
    acc = fmaf(d, d, acc);
  }
  return acc;
}

// *dx = c (x - y) and, when dy is given, *dy = -c (x - y), for one vector.
template <typename V>
__device__ __forceinline__ void scaled_diff(const typename V::Raw& x, const typename V::Raw& y,
                                            float c, typename V::Raw* dx, typename V::Raw* dy) {
  float fx[V::kN], fy[V::kN], g[V::kN];
  V::to_float(x, fx);
  V::to_float(y, fy);
#pragma unroll
  for (int k = 0; k < V::kN; ++k) g[k] = c * (fx[k] - fy[k]);
  *dx = V::from_float(g);
  if (dy) {
#pragma unroll
    for (int k = 0; k < V::kN; ++k) g[k] = -g[k];
    *dy = V::from_float(g);
  }
}

// The forward is held to 32 registers per thread, so 8 blocks (2048 threads) fill an SM: it
// needs no more without spilling. The backward's unrolled stores need 64-80 and get them.
constexpr int kFwdBlocksPerSm = 8;

// kVec: rows are 16-byte aligned and N is a multiple of the vector width.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, kFwdBlocksPerSm)
    energy_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, StepWeight w,
                      float* __restrict__ partials, int64_t rows, int64_t S, int64_t N,
                      float inv_n) {
  // y walks the G * S rows (grid-stride: gridDim.y is capped at 65535).
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
  const T* x = a + row * N;
  const T* y = b + row * N;
  float acc = 0.f;
  if constexpr (kVec) {
    using V = Vec<T>;
    const int64_t nv = N / V::kN;
    const auto* xv = reinterpret_cast<const typename V::Raw*>(x);
    const auto* yv = reinterpret_cast<const typename V::Raw*>(y);
    const int64_t stride = int64_t(gridDim.x) * kThreads;
    int64_t i = blockIdx.x * kThreads + threadIdx.x;
    // kUnroll vectors of each operand in flight per thread before any is used.
    for (; i + (kUnroll - 1) * stride < nv; i += kUnroll * stride) {
      typename V::Raw rx[kUnroll], ry[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        rx[u] = __ldg(xv + i + u * stride);
        ry[u] = __ldg(yv + i + u * stride);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) acc = sq_dist<V>(rx[u], ry[u], acc);
    }
    for (; i < nv; i += stride) acc = sq_dist<V>(__ldg(xv + i), __ldg(yv + i), acc);
  } else {
    for (int64_t i = blockIdx.x * kThreads + threadIdx.x; i < N; i += gridDim.x * kThreads) {
      const float d = to_f(x[i]) - to_f(y[i]);
      acc = fmaf(d, d, acc);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0)
    partials[row * gridDim.x + blockIdx.x] = row_weight(w, row, S) * acc * inv_n;
  }
}

// energy[g] = the sum of branch g's per_g partial sums (its S rows times the blocks per row,
// contiguous), one block per branch: a fixed assignment and a fixed shuffle tree.
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const float* __restrict__ partials, int64_t per_g,
                        float* __restrict__ energy) {
  const float* p = partials + blockIdx.x * per_g;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < per_g; i += kThreads) acc += p[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) energy[blockIdx.x] = acc;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    energy_bwd_kernel(const float* __restrict__ grad, const T* __restrict__ a,
                      const T* __restrict__ b, StepWeight w, T* __restrict__ da,
                      T* __restrict__ db, int64_t rows, int64_t S, int64_t N,
                      float two_over_n) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
  const float c = grad[row / S] * row_weight(w, row, S) * two_over_n;
  const T* x = a + row * N;
  const T* y = b + row * N;
  T* dx = da + row * N;
  T* dy = db ? db + row * N : nullptr;
  if constexpr (kVec) {
    using V = Vec<T>;
    const int64_t nv = N / V::kN;
    const auto* xv = reinterpret_cast<const typename V::Raw*>(x);
    const auto* yv = reinterpret_cast<const typename V::Raw*>(y);
    auto* dxv = reinterpret_cast<typename V::Raw*>(dx);
    auto* dyv = reinterpret_cast<typename V::Raw*>(dy);
    const int64_t stride = int64_t(gridDim.x) * kThreads;
    int64_t i = blockIdx.x * kThreads + threadIdx.x;
    for (; i + (kUnroll - 1) * stride < nv; i += kUnroll * stride) {
      typename V::Raw rx[kUnroll], ry[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        rx[u] = __ldg(xv + i + u * stride);
        ry[u] = __ldg(yv + i + u * stride);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        scaled_diff<V>(rx[u], ry[u], c, dxv + i + u * stride, dy ? dyv + i + u * stride : nullptr);
    }
    for (; i < nv; i += stride)
      scaled_diff<V>(__ldg(xv + i), __ldg(yv + i), c, dxv + i, dy ? dyv + i : nullptr);
  } else {
    for (int64_t i = blockIdx.x * kThreads + threadIdx.x; i < N; i += gridDim.x * kThreads) {
      const float g = c * (to_f(x[i]) - to_f(y[i]));
      dx[i] = from_f<T>(g);
      if (dy) dy[i] = from_f<T>(-g);
    }
  }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 132;
  return sms;
}

// Blocks of `kernel` that one SM holds at kThreads threads (registers, shared memory), asked of
// the occupancy calculator once per kernel.
template <typename Kernel>
int resident_blocks(Kernel kernel) {
  int n = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0);
  return err == cudaSuccess && n > 0 ? n : 1;
}

// Blocks of 256 threads an SM can hold at most (2048 threads on sm_80 and sm_90).
constexpr int kMaxBlocksPerSm = 8;

// Blocks along N per row: the G*S rows (in y) times these fill the device in one wave (resident
// blocks per SM times the SMs), at most what N can use. Every block streams the same amount, so
// this rounds down: rounding up would leave a second wave of a few blocks streaming the last
// percent of the data at a fraction of the bandwidth.
int64_t blocks_per_row(int64_t rows, int64_t N, int vec, int per_sm) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * vec;
  const int64_t useful = (N + per_block - 1) / per_block;
  const int64_t blocks_per_sm = per_sm < kMaxBlocksPerSm ? per_sm : kMaxBlocksPerSm;
  const int64_t want = blocks_per_sm * sm_count() / rows;
  const int64_t bx = useful < want ? useful : want;
  return bx < 1 ? 1 : bx;
}

// blocks_per_row for kKernel, its occupancy asked once (the kernel is a template argument, so
// each kernel has its own static).
template <auto kKernel>
int64_t kernel_blocks_per_row(int64_t rows, int64_t N, int vec) {
  static const int per_sm = resident_blocks(kKernel);
  return blocks_per_row(rows, N, vec, per_sm);
}

template <auto kKernel, typename... Args>
cudaError_t launch_rows(int64_t rows, int64_t bx, cudaStream_t st, Args... args) {
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(rows < 65535 ? rows : 65535));
  kKernel<<<grid, kThreads, 0, st>>>(args...);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const void* a, const void* b, StepWeight w, float* partials, float* e,
                       int64_t G, int64_t S, int64_t N, bool mean, cudaStream_t st) {
  const int64_t rows = G * S;
  if (rows == 0) return G == 0 ? cudaSuccess : cudaMemsetAsync(e, 0, sizeof(float) * G, st);
  const float inv_n = mean ? 1.f / static_cast<float>(N) : 1.f;
  const auto* x = static_cast<const T*>(a);
  const auto* y = static_cast<const T*>(b);
  int64_t bx;
  cudaError_t err;
  if (aligned16(a) && aligned16(b) && N % Vec<T>::kN == 0) {
    constexpr auto kernel = energy_fwd_kernel<T, true>;
    bx = kernel_blocks_per_row<kernel>(rows, N, Vec<T>::kN);
    err = launch_rows<kernel>(rows, bx, st, x, y, w, partials, rows, S, N, inv_n);
  } else {
    constexpr auto kernel = energy_fwd_kernel<T, false>;
    bx = kernel_blocks_per_row<kernel>(rows, N, 1);
    err = launch_rows<kernel>(rows, bx, st, x, y, w, partials, rows, S, N, inv_n);
  }
  if (err != cudaSuccess) return err;
  sum_partials_kernel<<<static_cast<unsigned>(G), kThreads, 0, st>>>(partials, S * bx, e);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const float* g, const void* a, const void* b, StepWeight w, void* da,
                       void* db, int64_t G, int64_t S, int64_t N, bool mean, cudaStream_t st) {
  const int64_t rows = G * S;
  if (rows == 0 || N == 0) return cudaSuccess;
  const float two_over_n = mean ? 2.f / static_cast<float>(N) : 2.f;
  const auto* x = static_cast<const T*>(a);
  const auto* y = static_cast<const T*>(b);
  auto* dx = static_cast<T*>(da);
  auto* dy = static_cast<T*>(db);
  if (aligned16(a) && aligned16(b) && aligned16(da) && (!db || aligned16(db)) &&
      N % Vec<T>::kN == 0) {
    constexpr auto kernel = energy_bwd_kernel<T, true>;
    const int64_t bx = kernel_blocks_per_row<kernel>(rows, N, Vec<T>::kN);
    return launch_rows<kernel>(rows, bx, st, g, x, y, w, dx, dy, rows, S, N, two_over_n);
  }
  constexpr auto kernel = energy_bwd_kernel<T, false>;
  const int64_t bx = kernel_blocks_per_row<kernel>(rows, N, 1);
  return launch_rows<kernel>(rows, bx, st, g, x, y, w, dx, dy, rows, S, N, two_over_n);
}

}  // namespace

int64_t velocity_energy_fwd_workspace(int64_t G, int64_t S, int64_t N) {
  const int64_t rows = G * S;
  // the most blocks a row can get: one-element vectors and a full SM of blocks
  return rows == 0 ? 0 : rows * blocks_per_row(rows, N, 1, kMaxBlocksPerSm);
}

cudaError_t velocity_energy_fwd(const void* v_pred, const void* v_ref, StepWeight weight,
                                float* workspace, float* energy, int64_t G, int64_t S, int64_t N,
                                bool mean, DType dt, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32:
      return launch_fwd<float>(v_pred, v_ref, weight, workspace, energy, G, S, N, mean, stream);
    case DType::kFloat16:
      return launch_fwd<__half>(v_pred, v_ref, weight, workspace, energy, G, S, N, mean, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(v_pred, v_ref, weight, workspace, energy, G, S, N, mean,
                                       stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t velocity_energy_bwd(const float* grad, const void* v_pred, const void* v_ref,
                                StepWeight weight, void* grad_pred, void* grad_ref, int64_t G,
                                int64_t S, int64_t N, bool mean, DType dt, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32:
      return launch_bwd<float>(grad, v_pred, v_ref, weight, grad_pred, grad_ref, G, S, N, mean,
                               stream);
    case DType::kFloat16:
      return launch_bwd<__half>(grad, v_pred, v_ref, weight, grad_pred, grad_ref, G, S, N, mean,
                                stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(grad, v_pred, v_ref, weight, grad_pred, grad_ref, G, S, N,
                                       mean, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kvpo::cuda
