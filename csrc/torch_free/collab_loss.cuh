// CUDA kernels of the collaboration loss (M-way cross-entropy + soft-min surrogate, Eq. 7) and of
// its gradient w.r.t. the logits. No torch headers; the glue is csrc/cuda/collab_loss.cu.
//
// Forward: one pass over logits [M, B, K]. A sample b is owned by a group of G lanes (G = 4..32,
// several samples per warp, for K <= 2048) or by a whole block (larger K); the owner walks the M
// rows of its sample, each with an online (max, sum-of-exp) over K in float32 (float64 for double
// inputs) with 16-byte loads where the row alignment allows, so no shared memory scales with K.
// The soft-min over m then runs in the owner's lane 0 (softmin_forward, shared with the CPU kernel),
// so a sample never needs a second kernel. Reduced losses are summed in a fixed order.
//
// Backward: one pass, read z once and write dz once: every row (m, b) gets a team of threads that
// computes the per-row scalar dL/dce from the saved statistics and streams the row.
#pragma once

#include "collab_loss.h"
#include "cuda_common.cuh"

namespace cda2 {
namespace gpu {

// ---- forward --------------------------------------------------------------------------------
// Partial (max, sum) of one row over the elements this thread owns: vectors j = lane, lane +
// nlanes, ... of V elements each (V divides K when V > 1), U vectors loaded before any is used.
template <typename T, int V, int U>
__device__ __forceinline__ MaxSum<acc_t<T>> row_partial(const T* __restrict__ row, int64_t K, int lane,
                                                         int nlanes) {
  using S = acc_t<T>;
  MaxSum<S> st = maxsum_empty<S>();
  const int64_t nv = K / V;
  for (int64_t j0 = lane; j0 < nv; j0 += static_cast<int64_t>(nlanes) * U) {
    S x[U * V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = j0 + static_cast<int64_t>(u) * nlanes;
      if (j < nv) {
        const Vec<T, V> v = load_vec<T, V>(row + j * V);
#pragma unroll
        for (int i = 0; i < V; ++i) x[u * V + i] = Num<T>::to(v.v[i]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) x[u * V + i] = S(-INFINITY);
      }
    }
    S cm = x[0];
#pragma unroll
    for (int i = 1; i < U * V; ++i) cm = dmax(cm, x[i]);
    const S mn = dmax(st.m, cm);
    const S ref = mn == S(-INFINITY) ? S(0) : mn;
    S s = st.s * dexp(st.m - ref);
#pragma unroll
    for (int i = 0; i < U * V; ++i) s += dexp(x[i] - ref);
    st.m = mn;
    st.s = s;
  }
  return st;
}

// Row statistics from the merged (max, sum): lse in float64 (saved for backward, so exp(z - lse)
// stays accurate for large logits) and ce = lse - z[y], as the CPU kernel computes them.
// An out-of-range label (impossible after the host-side check) gives NaN and reads nothing.
template <typename T>
__device__ __forceinline__ void row_finish(const MaxSum<acc_t<T>>& st, const T* __restrict__ row, int64_t yb,
                                           int64_t K, int64_t r, acc_t<T>* __restrict__ ce,
                                           double* __restrict__ lse) {
  using S = acc_t<T>;
  const double l = static_cast<double>(st.m) + log(static_cast<double>(st.s));
  lse[r] = l;
  const double zy = (yb >= 0 && yb < K) ? static_cast<double>(Num<T>::to(row[yb])) : static_cast<double>(NAN);
  ce[r] = static_cast<S>(l - zy);
}

// Arguments shared by the two forward kernels. loss_vec [B] always receives the per-sample loss;
// for mean/sum a single-block launch also writes loss_out[0] = sum / divisor itself (otherwise
// launch_finish_sum does it afterwards).
template <typename T>
struct FwdArgs {
  using S = acc_t<T>;
  const T* z;
  const int64_t* y;
  int64_t M, B, K;
  S sigma;
  bool reduce;
  S divisor;
  S* loss_vec;
  S* loss_out;
  S* ce;
  S* w;
  S* p;
  double* lse;
};

// Small and medium K: a group of G lanes per sample, blockDim.x / G samples per block.
// At most 512 threads, so double rows get the registers they need without spilling.
constexpr int kGroupMaxThreads = 512;

template <typename T, int G, int V>
__global__ void __launch_bounds__(kGroupMaxThreads) collab_loss_fwd_group_kernel(const FwdArgs<T> a) {
  using S = acc_t<T>;
  constexpr int U = 4;
  __shared__ S smem[32];
  const int lane = threadIdx.x % G;
  const int group = threadIdx.x / G;
  const int64_t gpb = blockDim.x / G;
  S lsum = 0;
  // The loop bound depends on b0 only, so every lane of a warp runs the same trip count and the
  // group shuffles below always see the full warp.
  for (int64_t b0 = blockIdx.x * gpb; b0 < a.B; b0 += static_cast<int64_t>(gridDim.x) * gpb) {
    const int64_t b = b0 + group;
    const bool active = b < a.B;
    const int64_t yb = active ? a.y[b] : 0;
    for (int64_t m = 0; m < a.M; ++m) {
      const int64_t r = m * a.B + b;
      const T* row = active ? a.z + r * a.K : a.z;
      MaxSum<S> st = row_partial<T, V, U>(row, active ? a.K : 0, lane, G);
      st = group_maxsum<G>(st);
      if (active && lane == 0) row_finish<T>(st, row, yb, a.K, r, a.ce, a.lse);
    }
    if (active && lane == 0) {
      // Reads back the ce this thread just wrote; writes w and p (same formulas as the CPU kernel).
      const S Lb = softmin_forward<S>(a.ce + b, a.w + b, a.p + b, a.M, a.B, a.sigma);
      a.loss_vec[b] = Lb;
      lsum += Lb;
    }
  }
  if (a.reduce && gridDim.x == 1) {
    const S total = block_sum(lsum, smem);
    if (threadIdx.x == 0) a.loss_out[0] = total / a.divisor;
  }
}

// Large K: one block per sample; the block walks the M rows, each with a block-wide merge.
template <typename T, int V>
__global__ void __launch_bounds__(kBlock) collab_loss_fwd_block_kernel(const FwdArgs<T> a) {
  using S = acc_t<T>;
  __shared__ MaxSum<S> smem[32];
  S lsum = 0;
  for (int64_t b = blockIdx.x; b < a.B; b += gridDim.x) {
    const int64_t yb = a.y[b];
    for (int64_t m = 0; m < a.M; ++m) {
      const int64_t r = m * a.B + b;
      const T* row = a.z + r * a.K;
      MaxSum<S> st = row_partial<T, V, 4>(row, a.K, threadIdx.x, blockDim.x);
      st = block_maxsum(st, smem);
      if (threadIdx.x == 0) row_finish<T>(st, row, yb, a.K, r, a.ce, a.lse);
    }
    if (threadIdx.x == 0) {
      const S Lb = softmin_forward<S>(a.ce + b, a.w + b, a.p + b, a.M, a.B, a.sigma);
      a.loss_vec[b] = Lb;
      lsum += Lb;
    }
  }
  if (a.reduce && gridDim.x == 1 && threadIdx.x == 0) a.loss_out[0] = lsum / a.divisor;
}

constexpr int64_t kBlockKernelMinK = 2048;  // K above this: one block per sample

template <typename T, int G>
cudaError_t launch_fwd_group(const FwdArgs<T>& a, bool vec, cudaStream_t stream, bool* single) {
  constexpr int VW = VecWidth<T>::value;
  const int64_t lanes = a.B * G;
  unsigned grid;
  int threads;
  if (a.reduce && lanes <= kGroupMaxThreads) {  // whole batch in one block: reduce in the same kernel
    grid = 1;
    threads = static_cast<int>(ceil_div(lanes, 32) * 32);
  } else {
    threads = kBlock;
    grid = grid_for(a.B, kBlock / G, 16);
  }
  *single = grid == 1;
  if (vec)
    collab_loss_fwd_group_kernel<T, G, VW><<<grid, threads, 0, stream>>>(a);
  else
    collab_loss_fwd_group_kernel<T, G, 1><<<grid, threads, 0, stream>>>(a);
  return cudaPeekAtLastError();
}

// logits z [M, B, K] contiguous; y [B] labels already checked. Writes loss_vec [B]; ce, w, p [M, B]
// (acc_t<T>), lse [M, B] float64; for reduction mean (1) / sum (2) also loss_out[0].
template <typename T>
cudaError_t launch_collab_loss_forward(const T* z, const int64_t* y, int64_t M, int64_t B, int64_t K, double sigma,
                                       int64_t reduction, acc_t<T>* loss_vec, acc_t<T>* loss_out, acc_t<T>* ce,
                                       acc_t<T>* w, acc_t<T>* p, double* lse, cudaStream_t stream) {
  using S = acc_t<T>;
  constexpr int VW = VecWidth<T>::value;
  FwdArgs<T> a{z, y, M, B, K, static_cast<S>(sigma), reduction != 0, static_cast<S>(reduction == 1 ? B : 1),
               loss_vec, loss_out, ce, w, p, lse};
  const bool vec = K % VW == 0 && aligned16(z);
  bool single = false;
  cudaError_t err;
  if (K > kBlockKernelMinK) {
    const unsigned grid = a.reduce && B == 1 ? 1u : grid_for(B, 1, 16);
    single = grid == 1;
    if (vec)
      collab_loss_fwd_block_kernel<T, VW><<<grid, kBlock, 0, stream>>>(a);
    else
      collab_loss_fwd_block_kernel<T, 1><<<grid, kBlock, 0, stream>>>(a);
    err = cudaPeekAtLastError();
  } else {
    // About 8 elements per lane: K=10 -> 4 lanes, K=100 -> 16, K>=256 -> a warp.
    const int G = clamp_int(next_pow2(ceil_div(K, 8)), 4, 32);
    switch (G) {
      case 4: err = launch_fwd_group<T, 4>(a, vec, stream, &single); break;
      case 8: err = launch_fwd_group<T, 8>(a, vec, stream, &single); break;
      case 16: err = launch_fwd_group<T, 16>(a, vec, stream, &single); break;
      default: err = launch_fwd_group<T, 32>(a, vec, stream, &single); break;
    }
  }
  if (err != cudaSuccess || !a.reduce || single) return err;
  return launch_finish_sum<S>(loss_vec, B, a.divisor, loss_out, stream);
}

// ---- backward -------------------------------------------------------------------------------
// dz[m,b,k] = g[m,b] * (exp(z - lse[m,b]) - [k == y_b]) with g = dL/dce from ce_grad (shared with
// the CPU kernel). Optional upstream gradients are null pointers (zero).
template <typename T>
struct BwdArgs {
  using S = acc_t<T>;
  const T* z;
  const int64_t* y;
  const double* lse;
  const S* w;
  const S* p;
  const S* gL;   // [B] (reduction none) or [1]; may be null
  const S* gce;  // [M, B] or null
  const S* gw;   // [M, B] or null
  const S* gp;   // [M, B] or null
  int64_t M, B, K;
  S sigma;
  bool per_sample;  // gL has B entries
  S gL_scale;       // 1/B for mean, else 1
  T* dz;
  int tpr;  // threads per row, a power of two dividing blockDim.x
};

template <typename T>
__device__ __forceinline__ T grad_elem(acc_t<T> zk, acc_t<T> g, acc_t<T> hi, acc_t<T> lo, bool is_y) {
  using S = acc_t<T>;
  const S e = g * dexp((zk - hi) - lo);
  return Num<T>::from(is_y ? e - g : e);
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlock) collab_loss_bwd_kernel(const BwdArgs<T> a) {
  using S = acc_t<T>;
  constexpr int U = 4;
  const int64_t rpb = blockDim.x / a.tpr;
  const int lane = threadIdx.x % a.tpr;
  const int64_t R = a.M * a.B;
  const int64_t nv = a.K / V;
  for (int64_t r = blockIdx.x * rpb + threadIdx.x / a.tpr; r < R; r += static_cast<int64_t>(gridDim.x) * rpb) {
    const int64_t b = r % a.B;
    const int64_t yb = a.y[b];  // an out-of-range label only never matches k: no access through it
    S gLb = 0;
    if (a.gL) gLb = (a.per_sample ? a.gL[b] : a.gL[0]) * a.gL_scale;
    S wgw = 0;
    if (a.gw)
      for (int64_t j = 0; j < a.M; ++j) wgw += a.gw[j * a.B + b] * a.w[j * a.B + b];
    const S g = ce_grad<S>(gLb, a.w[r], a.p[r], a.gce, a.gw, a.gp, r, wgw, a.sigma);
    // lse split into a head and a tail in S so the per-element work stays in S (exact for double).
    const double l = a.lse[r];
    const S hi = static_cast<S>(l);
    const S lo = static_cast<S>(l - static_cast<double>(hi));
    const T* zr = a.z + r * a.K;
    T* dr = a.dz + r * a.K;
    for (int64_t j0 = lane; j0 < nv; j0 += static_cast<int64_t>(a.tpr) * U) {
      Vec<T, V> in[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + static_cast<int64_t>(u) * a.tpr;
        if (j < nv) in[u] = load_vec<T, V>(zr + j * V);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + static_cast<int64_t>(u) * a.tpr;
        if (j < nv) {
          Vec<T, V> out;
#pragma unroll
          for (int i = 0; i < V; ++i) out.v[i] = grad_elem<T>(Num<T>::to(in[u].v[i]), g, hi, lo, j * V + i == yb);
          store_vec<T, V>(dr + j * V, out);
        }
      }
    }
  }
}

// All tensors contiguous; dz [M, B, K] is written in full.
template <typename T>
cudaError_t launch_collab_loss_backward(const acc_t<T>* grad_loss, bool grad_loss_per_sample,
                                        const acc_t<T>* grad_ce, const acc_t<T>* grad_weights,
                                        const acc_t<T>* grad_p_true, const T* z, const int64_t* y, const double* lse,
                                        const acc_t<T>* weights, const acc_t<T>* p_true, int64_t M, int64_t B,
                                        int64_t K, double sigma, int64_t reduction, T* dz, cudaStream_t stream) {
  using S = acc_t<T>;
  constexpr int VW = VecWidth<T>::value;
  const bool vec = K % VW == 0 && aligned16(z) && aligned16(dz);
  const int V = vec ? VW : 1;
  const int tpr = threads_per_row(K, V);
  BwdArgs<T> a{z,   y, lse, weights, p_true, grad_loss, grad_ce, grad_weights, grad_p_true, M, B, K,
               static_cast<S>(sigma), grad_loss_per_sample,
               reduction == 1 ? S(1) / static_cast<S>(B) : S(1), dz, tpr};
  const unsigned grid = grid_for(M * B, kBlock / tpr, 16);
  if (vec)
    collab_loss_bwd_kernel<T, VW><<<grid, kBlock, 0, stream>>>(a);
  else
    collab_loss_bwd_kernel<T, 1><<<grid, kBlock, 0, stream>>>(a);
  return cudaPeekAtLastError();
}

}  // namespace gpu
}  // namespace cda2

// Explicit instantiation hook for .ci/compile_kernels.sh (T: float, double, __half, __nv_bfloat16).
#define CDA2_INSTANTIATE_COLLAB_LOSS(T)                                                                       \
  template cudaError_t cda2::gpu::launch_collab_loss_forward<T>(                                            \
      const T*, const int64_t*, int64_t, int64_t, int64_t, double, int64_t, cda2::gpu::acc_t<T>*,           \
      cda2::gpu::acc_t<T>*, cda2::gpu::acc_t<T>*, cda2::gpu::acc_t<T>*, cda2::gpu::acc_t<T>*, double*,   \
      cudaStream_t);                                                                                          \
  template cudaError_t cda2::gpu::launch_collab_loss_backward<T>(                                           \
      const cda2::gpu::acc_t<T>*, bool, const cda2::gpu::acc_t<T>*, const cda2::gpu::acc_t<T>*,          \
      const cda2::gpu::acc_t<T>*, const T*, const int64_t*, const double*, const cda2::gpu::acc_t<T>*,     \
      const cda2::gpu::acc_t<T>*, int64_t, int64_t, int64_t, double, int64_t, T*, cudaStream_t);
