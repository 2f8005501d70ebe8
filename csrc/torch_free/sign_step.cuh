// CUDA kernels of the PGD pieces over all M*B images at once: the projected L-inf sign step (in
// place) and the random start. No torch headers; the glue is csrc/cuda/sign_step.cu.
//
// x_adv holds `reps` copies of x_nat's n0 elements (reps = M when x_nat is broadcast over the
// sub-model axis, 1 when the shapes match). A 2-D grid walks (copy, element) with blockIdx.y over
// the copies, so the broadcast needs no per-element division. One pass: read x, g, x0 once, write
// x once, 16-byte vectors when n0 and the pointers allow.
//
// Rounding matches the CPU kernel and cda2_ext.reference bit for bit in float32/float64: the step
// uses cda2::sign_step (alpha*sign is exact, so a contracted FMA rounds the same); the random start
// forms (u*2 - 1)*eps and x0 + noise with explicitly rounded intrinsics so nvcc cannot fuse them.
// Half types compute in float and round once at the end, as the CPU kernel does.
#pragma once

#include "cuda_common.cuh"

namespace cda2 {
namespace gpu {

// Same value as cda2::random_start, each operation rounded once (no FMA contraction).
template <typename S>
__device__ __forceinline__ S random_start_rn(S x0, S u, S eps, S lo, S hi) {
  const S noise = mul_rn(add_rn(mul_rn(u, S(2)), S(-1)), eps);
  return clamp_nan(add_rn(x0, noise), lo, hi);
}

// The number of threads in x and of blocks in y for `reps` copies of `nvec` vectors.
inline dim3 broadcast_grid(int64_t nvec, int64_t reps) {
  const int64_t gy = reps < 65535 ? reps : 65535;
  const int64_t target = static_cast<int64_t>(sm_count()) * 32;  // blocks in flight, a few waves
  const int64_t gx_cap = target / gy > 1 ? target / gy : 1;
  const int64_t gx_need = ceil_div(nvec, kBlock);
  return dim3(static_cast<unsigned>(gx_need < gx_cap ? gx_need : gx_cap), static_cast<unsigned>(gy), 1);
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlock) sign_step_kernel(T* __restrict__ x, const T* __restrict__ g,
                                                           const T* __restrict__ x0, int64_t n0, int64_t reps,
                                                           acc_t<T> eps, acc_t<T> alpha, acc_t<T> lo,
                                                           acc_t<T> hi) {
  using S = acc_t<T>;
  const int64_t nvec = n0 / V;
  for (int64_t m = blockIdx.y; m < reps; m += gridDim.y) {
    T* xm = x + m * n0;
    const T* gm = g + m * n0;
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < nvec;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const Vec<T, V> xv = load_vec<T, V>(xm + j * V);
      const Vec<T, V> gv = load_vec<T, V>(gm + j * V);
      const Vec<T, V> x0v = load_vec<T, V>(x0 + j * V);
      Vec<T, V> out;
#pragma unroll
      for (int i = 0; i < V; ++i)
        out.v[i] = Num<T>::from(
            sign_step<S>(Num<T>::to(xv.v[i]), Num<T>::to(gv.v[i]), Num<T>::to(x0v.v[i]), eps, alpha, lo, hi));
      store_vec<T, V>(xm + j * V, out);
    }
  }
}

// x [reps * n0] contiguous (updated in place), g like x, x0 [n0]. eps, alpha, lo, hi are rounded to
// the accumulation type first, as torch rounds Python scalars for a tensor of that dtype.
template <typename T>
cudaError_t launch_sign_step(T* x, const T* g, const T* x0, int64_t n0, int64_t reps, double eps, double alpha,
                             double lo, double hi, cudaStream_t stream) {
  using S = acc_t<T>;
  constexpr int VW = VecWidth<T>::value;
  const bool vec = n0 % VW == 0 && aligned16(x) && aligned16(g) && aligned16(x0);
  const S e = static_cast<S>(eps), a = static_cast<S>(alpha), l = static_cast<S>(lo), h = static_cast<S>(hi);
  if (vec)
    sign_step_kernel<T, VW><<<broadcast_grid(n0 / VW, reps), kBlock, 0, stream>>>(x, g, x0, n0, reps, e, a, l, h);
  else
    sign_step_kernel<T, 1><<<broadcast_grid(n0, reps), kBlock, 0, stream>>>(x, g, x0, n0, reps, e, a, l, h);
  return cudaPeekAtLastError();
}

// x[i] = clamp(x0 + (2u - 1) * eps, lo, hi) with u = hash_uniform(seed, i), i the flat index in x.
// u is rounded to T first (the reference draws float32 u and casts it to x's dtype).
template <typename T, int V>
__global__ void __launch_bounds__(kBlock) random_start_kernel(T* __restrict__ x, const T* __restrict__ x0,
                                                              int64_t n0, int64_t reps, acc_t<T> eps, acc_t<T> lo,
                                                              acc_t<T> hi, uint64_t seed) {
  using S = acc_t<T>;
  const int64_t nvec = n0 / V;
  for (int64_t m = blockIdx.y; m < reps; m += gridDim.y) {
    T* xm = x + m * n0;
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < nvec;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const Vec<T, V> x0v = load_vec<T, V>(x0 + j * V);
      const uint64_t base = static_cast<uint64_t>(m * n0 + j * V);
      Vec<T, V> out;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float u32 = hash_uniform(seed, base + i);
        const S u = Num<T>::to(Num<T>::from(static_cast<S>(u32)));
        out.v[i] = Num<T>::from(random_start_rn<S>(Num<T>::to(x0v.v[i]), u, eps, lo, hi));
      }
      store_vec<T, V>(xm + j * V, out);
    }
  }
}

template <typename T>
cudaError_t launch_random_start(T* x, const T* x0, int64_t n0, int64_t reps, double eps, double lo, double hi,
                                int64_t seed, cudaStream_t stream) {
  using S = acc_t<T>;
  constexpr int VW = VecWidth<T>::value;
  const bool vec = n0 % VW == 0 && aligned16(x) && aligned16(x0);
  const S e = static_cast<S>(eps), l = static_cast<S>(lo), h = static_cast<S>(hi);
  const uint64_t s = static_cast<uint64_t>(seed);
  if (vec)
    random_start_kernel<T, VW><<<broadcast_grid(n0 / VW, reps), kBlock, 0, stream>>>(x, x0, n0, reps, e, l, h, s);
  else
    random_start_kernel<T, 1><<<broadcast_grid(n0, reps), kBlock, 0, stream>>>(x, x0, n0, reps, e, l, h, s);
  return cudaPeekAtLastError();
}

}  // namespace gpu
}  // namespace cda2

// Explicit instantiation hook for .ci/compile_kernels.sh (T: float, double, __half, __nv_bfloat16).
#define CDA2_INSTANTIATE_SIGN_STEP(T)                                                                        \
  template cudaError_t cda2::gpu::launch_sign_step<T>(T*, const T*, const T*, int64_t, int64_t, double,      \
                                                      double, double, double, cudaStream_t);                 \
  template cudaError_t cda2::gpu::launch_random_start<T>(T*, const T*, int64_t, int64_t, double, double,     \
                                                         double, int64_t, cudaStream_t);
