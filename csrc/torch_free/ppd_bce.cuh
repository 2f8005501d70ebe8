// CUDA kernels of the PPD-head BCE: bce = softplus(s) - t*s over [M, B], d bce / ds = sigmoid(s) - t.
// No torch headers; the glue is csrc/cuda/ppd_bce.cu. [M, B] is small (M*B scalars), so these are
// grid-stride elementwise loops; a reduced loss is summed per block and finished in a fixed order.
#pragma once

#include "cuda_common.cuh"

namespace cda2 {
namespace gpu {

// Largest grid of the reducing forward, i.e. the length of the `partials` workspace.
constexpr int kPpdMaxBlocks = 1024;

// n elements; reduce: out[0] = sum / divisor (one block), or partials[blockIdx.x] = block sum.
template <typename T>
__global__ void __launch_bounds__(kBlock) ppd_bce_fwd_kernel(const T* __restrict__ s, const T* __restrict__ t,
                                                             int64_t n, bool reduce, acc_t<T> divisor,
                                                             acc_t<T>* __restrict__ out,
                                                             acc_t<T>* __restrict__ partials) {
  using S = acc_t<T>;
  __shared__ S smem[32];
  S acc = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const S x = Num<T>::to(s[i]);
    const S v = softplus(x) - Num<T>::to(t[i]) * x;
    if (reduce)
      acc += v;
    else
      out[i] = v;
  }
  if (!reduce) return;  // uniform across the block
  acc = block_sum(acc, smem);
  if (threadIdx.x == 0) {
    if (gridDim.x == 1)
      out[0] = acc / divisor;
    else
      partials[blockIdx.x] = acc;
  }
}

// s, t [n] contiguous, same dtype. reduction 0: out [n]; 1 (mean) / 2 (sum): out [1], and
// `partials` must hold kPpdMaxBlocks values (unused when n is small enough for one block).
template <typename T>
cudaError_t launch_ppd_bce_forward(const T* s, const T* t, int64_t n, int64_t reduction, acc_t<T>* out,
                                   acc_t<T>* partials, cudaStream_t stream) {
  using S = acc_t<T>;
  const bool reduce = reduction != 0;
  const S divisor = reduction == 1 ? static_cast<S>(n) : S(1);
  // One block up to 16 elements per thread: the whole reduction then costs one launch.
  const unsigned grid = (reduce && n <= 16 * kBlock) ? 1u
                                                     : static_cast<unsigned>(clamp_int(grid_for(n, 4 * kBlock, 8), 1,
                                                                                       kPpdMaxBlocks));
  ppd_bce_fwd_kernel<T><<<grid, kBlock, 0, stream>>>(s, t, n, reduce, divisor, out, partials);
  cudaError_t err = cudaPeekAtLastError();
  if (err != cudaSuccess || !reduce || grid == 1) return err;
  return launch_finish_sum<S>(partials, grid, divisor, out, stream);
}

// ds = g * (sigmoid(s) - t), g = grad[i] (reduction none) or grad[0] * scale (1/n for mean).
template <typename T>
__global__ void __launch_bounds__(kBlock) ppd_bce_bwd_kernel(const acc_t<T>* __restrict__ grad, bool per_elem,
                                                             acc_t<T> scale, const T* __restrict__ s,
                                                             const T* __restrict__ t, int64_t n, T* __restrict__ ds) {
  using S = acc_t<T>;
  const S g0 = per_elem ? S(0) : grad[0] * scale;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const S g = per_elem ? grad[i] * scale : g0;
    ds[i] = Num<T>::from(g * (sigmoid(Num<T>::to(s[i])) - Num<T>::to(t[i])));
  }
}

template <typename T>
cudaError_t launch_ppd_bce_backward(const acc_t<T>* grad, bool per_elem, const T* s, const T* t, int64_t n,
                                    int64_t reduction, T* ds, cudaStream_t stream) {
  using S = acc_t<T>;
  const S scale = reduction == 1 ? S(1) / static_cast<S>(n) : S(1);
  ppd_bce_bwd_kernel<T><<<grid_for(n, 4 * kBlock, 8), kBlock, 0, stream>>>(grad, per_elem, scale, s, t, n, ds);
  return cudaPeekAtLastError();
}

}  // namespace gpu
}  // namespace cda2

// Explicit instantiation hook for .ci/compile_kernels.sh (T: float, double, __half, __nv_bfloat16).
#define CDA2_INSTANTIATE_PPD_BCE(T)                                                                          \
  template cudaError_t cda2::gpu::launch_ppd_bce_forward<T>(const T*, const T*, int64_t, int64_t,            \
                                                            cda2::gpu::acc_t<T>*, cda2::gpu::acc_t<T>*,      \
                                                            cudaStream_t);                                   \
  template cudaError_t cda2::gpu::launch_ppd_bce_backward<T>(const cda2::gpu::acc_t<T>*, bool, const T*,     \
                                                             const T*, int64_t, int64_t, T*, cudaStream_t);
