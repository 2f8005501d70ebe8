// CUDA kernels of collaborative selection (Algorithm 2): per sample, the argmax over the M PPD
// scores (torch.argmax's rules) and a copy of the chosen sub-model's K logits; and its gradient, a
// scatter of grad_chosen into zeros. No torch headers; the glue is csrc/cuda/collab_select.cu.
//
// A team of threads per row (threads_per_row: ~4 vectors each) so any K streams with 16-byte
// accesses where alignment allows. The backward writes every row of [M, B, K] itself (zeros or the
// gradient), so no separate zero-fill pass runs. The glue rejects an index outside [0, M) before
// the launch; were one to reach the kernel, it would only compare it with m, so it stays in bounds.
#pragma once

#include "cuda_common.cuh"

namespace cda2 {
namespace gpu {

// torch.argmax over m of s[m * B + b]: the first maximum wins and the first NaN beats every number.
// Compared in the accumulation type, which holds every value of P exactly.
template <typename P>
__device__ __forceinline__ int64_t argmax_models(const P* __restrict__ s, int64_t M, int64_t B, int64_t b) {
  using A = acc_t<P>;
  int64_t best = 0;
  A bv = Num<P>::to(s[b]);
  for (int64_t m = 1; m < M && !(bv != bv); ++m) {
    const A v = Num<P>::to(s[m * B + b]);
    if (v > bv || v != v) {
      best = m;
      bv = v;
    }
  }
  return best;
}

// T: the logits' dtype; P: the scores' dtype.
template <typename T, typename P, int V>
__global__ void __launch_bounds__(kBlock) collab_select_kernel(const P* __restrict__ s, const T* __restrict__ z,
                                                               int64_t M, int64_t B, int64_t K, int tpr,
                                                               int64_t* __restrict__ index, T* __restrict__ chosen) {
  const int64_t rpb = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t nv = K / V;
  for (int64_t b = blockIdx.x * rpb + threadIdx.x / tpr; b < B; b += static_cast<int64_t>(gridDim.x) * rpb) {
    const int64_t m = argmax_models<P>(s, M, B, b);  // M is small; every lane of the team computes it
    if (lane == 0) index[b] = m;
    const T* src = z + (m * B + b) * K;
    T* dst = chosen + b * K;
    for (int64_t j = lane; j < nv; j += tpr) store_vec<T, V>(dst + j * V, load_vec<T, V>(src + j * V));
  }
}

// ppd_logit s [M, B], logits z [M, B, K] contiguous -> index [B], chosen [B, K].
template <typename T, typename P>
cudaError_t launch_collab_select(const P* s, const T* z, int64_t M, int64_t B, int64_t K, int64_t* index, T* chosen,
                                 cudaStream_t stream) {
  constexpr int VW = VecWidth<T>::value;
  const bool vec = K % VW == 0 && aligned16(z) && aligned16(chosen);
  const int V = vec ? VW : 1;
  const int tpr = threads_per_row(K, V);
  const unsigned grid = grid_for(B, kBlock / tpr, 16);
  if (vec)
    collab_select_kernel<T, P, VW><<<grid, kBlock, 0, stream>>>(s, z, M, B, K, tpr, index, chosen);
  else
    collab_select_kernel<T, P, 1><<<grid, kBlock, 0, stream>>>(s, z, M, B, K, tpr, index, chosen);
  return cudaPeekAtLastError();
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlock) collab_select_bwd_kernel(const T* __restrict__ g,
                                                                   const int64_t* __restrict__ index, int64_t M,
                                                                   int64_t B, int64_t K, int tpr, T* __restrict__ out) {
  const int64_t rpb = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t nv = K / V;
  const int64_t R = M * B;
  Vec<T, V> zero;
#pragma unroll
  for (int i = 0; i < V; ++i) zero.v[i] = Num<T>::from(acc_t<T>(0));
  for (int64_t r = blockIdx.x * rpb + threadIdx.x / tpr; r < R; r += static_cast<int64_t>(gridDim.x) * rpb) {
    const int64_t m = r / B, b = r - m * B;
    T* dst = out + r * K;
    if (index[b] == m) {
      const T* src = g + b * K;
      for (int64_t j = lane; j < nv; j += tpr) store_vec<T, V>(dst + j * V, load_vec<T, V>(src + j * V));
    } else {
      for (int64_t j = lane; j < nv; j += tpr) store_vec<T, V>(dst + j * V, zero);
    }
  }
}

// grad_chosen g [B, K] contiguous, index [B] -> out [M, B, K] written in full.
template <typename T>
cudaError_t launch_collab_select_backward(const T* g, const int64_t* index, int64_t M, int64_t B, int64_t K, T* out,
                                          cudaStream_t stream) {
  constexpr int VW = VecWidth<T>::value;
  const bool vec = K % VW == 0 && aligned16(g) && aligned16(out);
  const int V = vec ? VW : 1;
  const int tpr = threads_per_row(K, V);
  const unsigned grid = grid_for(M * B, kBlock / tpr, 16);
  if (vec)
    collab_select_bwd_kernel<T, VW><<<grid, kBlock, 0, stream>>>(g, index, M, B, K, tpr, out);
  else
    collab_select_bwd_kernel<T, 1><<<grid, kBlock, 0, stream>>>(g, index, M, B, K, tpr, out);
  return cudaPeekAtLastError();
}

}  // namespace gpu
}  // namespace cda2

// Explicit instantiation hook for .ci/compile_kernels.sh (T: float, double, __half, __nv_bfloat16):
// the logits' dtype T with scores of every dtype.
#define CDA2_INSTANTIATE_COLLAB_SELECT(T)                                                                    \
  template cudaError_t cda2::gpu::launch_collab_select<T, float>(const float*, const T*, int64_t, int64_t,    \
                                                                 int64_t, int64_t*, T*, cudaStream_t);        \
  template cudaError_t cda2::gpu::launch_collab_select<T, double>(const double*, const T*, int64_t, int64_t,  \
                                                                  int64_t, int64_t*, T*, cudaStream_t);       \
  template cudaError_t cda2::gpu::launch_collab_select<T, __half>(const __half*, const T*, int64_t, int64_t,  \
                                                                  int64_t, int64_t*, T*, cudaStream_t);       \
  template cudaError_t cda2::gpu::launch_collab_select<T, __nv_bfloat16>(                                    \
      const __nv_bfloat16*, const T*, int64_t, int64_t, int64_t, int64_t*, T*, cudaStream_t);                \
  template cudaError_t cda2::gpu::launch_collab_select_backward<T>(const T*, const int64_t*, int64_t, int64_t, \
                                                                   int64_t, T*, cudaStream_t);
