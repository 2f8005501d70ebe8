// Device-side building blocks shared by the CUDA kernels: numeric traits for the four dtypes,
// 16-byte vector access, warp/block reductions, the online (max, sum-of-exp) pair, and launch
// helpers. No torch headers: plain nvcc compile-checks this file (see .ci/compile_kernels.sh).
//
// Half types are touched only through explicit intrinsics (__half2float, __float2half_rn, ...), so
// the kernels build with torch's -D__CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_HALF_CONVERSIONS__ flags.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "common.h"

namespace cda2 {
namespace gpu {

// ---- dtype traits ------------------------------------------------------------------------------
// acc: the type arithmetic runs in (float for float and the half types, double for double).
template <typename T>
struct Num;

template <>
struct Num<float> {
  using acc = float;
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};

template <>
struct Num<double> {
  using acc = double;
  static __device__ __forceinline__ double to(double v) { return v; }
  static __device__ __forceinline__ double from(double v) { return v; }
};

template <>
struct Num<__half> {
  using acc = float;
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};

template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
using acc_t = typename Num<T>::acc;

// ---- scalar device math in the accumulation type ----------------------------------------------
// Full-precision expf/exp (not __expf): the statistics are compared against float32 references at
// rtol 1e-5, and the kernels are memory-bound, so the extra instructions are free.
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }  // NaN-ignoring
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }

// Products and sums rounded exactly once each, whatever -fmad says (random start must match the
// CPU and the reference bit for bit, so (u*2-1)*eps + x0 must not become a fused multiply-add).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// ---- 16-byte vectors ----------------------------------------------------------------------------
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// True when p can be read/written with 16-byte vectors (host side).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- reductions -----------------------------------------------------------------------------
constexpr unsigned kFullMask = 0xffffffffu;

// Sum over groups of W consecutive lanes (W a power of two <= 32); every lane of the warp must call
// it (full mask). Each lane gets its group's total.
template <int W, typename S>
__device__ __forceinline__ S group_sum(S v) {
#pragma unroll
  for (int off = W / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off, W);
  return v;
}

// Block-wide sum; the result is valid in thread 0. `smem` holds >= 32 values. Every thread of the
// block must call it; it ends with a barrier so `smem` may be reused at once.
template <typename S>
__device__ __forceinline__ S block_sum(S v, S* smem) {
  v = group_sum<32>(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? smem[lane] : S(0);
    v = group_sum<32>(v);
  }
  __syncthreads();
  return v;
}

// Running (max, sum of exp(x - max)) over part of a row: the online softmax of Milakov & Gimelshein.
// m never holds NaN (dmax ignores it); a NaN input poisons s instead, so lse comes out NaN like
// torch's log_softmax. When m is -inf the reference point is 0, so exp(-inf - ref) is 0, not NaN.
template <typename S>
struct MaxSum {
  S m;
  S s;
};

template <typename S>
__device__ __forceinline__ MaxSum<S> maxsum_empty() {
  return {S(-INFINITY), S(0)};
}

template <typename S>
__device__ __forceinline__ MaxSum<S> maxsum_merge(const MaxSum<S>& a, const MaxSum<S>& b) {
  const S m = dmax(a.m, b.m);
  const S ref = m == S(-INFINITY) ? S(0) : m;
  return {m, a.s * dexp(a.m - ref) + b.s * dexp(b.m - ref)};
}

template <int W, typename S>
__device__ __forceinline__ MaxSum<S> group_maxsum(MaxSum<S> v) {
#pragma unroll
  for (int off = W / 2; off > 0; off >>= 1) {
    MaxSum<S> o;
    o.m = __shfl_xor_sync(kFullMask, v.m, off, W);
    o.s = __shfl_xor_sync(kFullMask, v.s, off, W);
    v = maxsum_merge(v, o);
  }
  return v;
}

// Block-wide (max, sum) merge; result valid in thread 0; ends with a barrier.
template <typename S>
__device__ __forceinline__ MaxSum<S> block_maxsum(MaxSum<S> v, MaxSum<S>* smem) {
  v = group_maxsum<32>(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? smem[lane] : maxsum_empty<S>();
    v = group_maxsum<32>(v);
  }
  __syncthreads();
  return v;
}

// ---- launch helpers (host) ------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

inline int clamp_int(int64_t v, int lo, int hi) {
  return static_cast<int>(v < lo ? lo : (v > hi ? hi : v));
}

// Multiprocessor count of the current device, cached per device (grids are sized to fill it).
inline int sm_count() {
  static std::atomic<int> cache[128];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 128) return 108;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 108;
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Threads given to one row of K elements read V at a time when no cross-thread reduction is
// needed (elementwise row kernels): about 4 vectors per thread, between 2 and 256 threads.
inline int threads_per_row(int64_t K, int V) { return clamp_int(next_pow2(ceil_div(K, 4LL * V)), 2, 256); }

constexpr int kBlock = 256;  // the default block size

// Blocks for `items` work items of `per_block` each, capped at `waves` resident waves of the GPU.
inline unsigned grid_for(int64_t items, int64_t per_block, int waves = 8) {
  const int64_t need = ceil_div(items, per_block);
  const int64_t cap = static_cast<int64_t>(sm_count()) * waves;
  return static_cast<unsigned>(need < cap ? (need < 1 ? 1 : need) : cap);
}

// ---- range check of an int64 vector (labels, selection indices) ------------------------------
// result[0] = smallest i with v[i] outside [0, hi) (n when all are in range), result[1] = v at it.
// One block: n is at most a few thousand entries (one per sample), and one launch + one copy back
// is what costs. `static`: every .cu that includes this header gets its own copy of the kernel.
static __global__ void __launch_bounds__(1024) range_check_kernel(const int64_t* __restrict__ v, int64_t n,
                                                                  int64_t hi, int64_t* __restrict__ result) {
  __shared__ int64_t smem[32];
  int64_t first = n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t x = v[i];
    if ((x < 0 || x >= hi) && i < first) first = i;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const int64_t o = __shfl_xor_sync(kFullMask, first, off);
    first = o < first ? o : first;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  if (lane == 0) smem[warp] = first;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 0; w < nwarps; ++w) first = smem[w] < first ? smem[w] : first;
    result[0] = first;
    result[1] = first < n ? v[first] : 0;
  }
}

inline cudaError_t launch_range_check(const int64_t* v, int64_t n, int64_t hi, int64_t* result,
                                      cudaStream_t stream) {
  const int threads = clamp_int(next_pow2(n), 32, 1024);
  range_check_kernel<<<1, threads, 0, stream>>>(v, n, hi, result);
  return cudaPeekAtLastError();
}

// ---- the one-block deterministic finishing sum -----------------------------------------------
// out[0] = (sum of vals[0..n)) / divisor, summed in a fixed order (no atomics), so a reduced loss
// is bit-reproducible run to run.
template <typename S>
__global__ void __launch_bounds__(1024) finish_sum_kernel(const S* __restrict__ vals, int64_t n, S divisor,
                                                          S* __restrict__ out) {
  __shared__ S smem[32];
  S v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += vals[i];
  v = block_sum(v, smem);
  if (threadIdx.x == 0) out[0] = v / divisor;
}

template <typename S>
cudaError_t launch_finish_sum(const S* vals, int64_t n, S divisor, S* out, cudaStream_t stream) {
  const int threads = clamp_int(next_pow2(n), 32, 1024);
  finish_sum_kernel<S><<<1, threads, 0, stream>>>(vals, n, divisor, out);
  return cudaPeekAtLastError();
}

}  // namespace gpu
}  // namespace cda2

namespace cda2 {
namespace gpu {
// Keyed on the input dtype T so that .ci/compile_kernels.sh can instantiate it for all four dtypes
// in one translation unit (float, __half and __nv_bfloat16 share acc_t = float).
template <typename T>
struct CommonInstantiation {
  static cudaError_t finish(const acc_t<T>* v, int64_t n, acc_t<T> d, acc_t<T>* o, cudaStream_t s) {
    return launch_finish_sum<acc_t<T>>(v, n, d, o, s);
  }
};
}  // namespace gpu
}  // namespace cda2

// Explicit instantiation hook for .ci/compile_kernels.sh (T: float, double, __half, __nv_bfloat16).
#define CDA2_INSTANTIATE_CUDA_COMMON(T) template struct cda2::gpu::CommonInstantiation<T>;
