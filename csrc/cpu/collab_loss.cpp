// CPU kernels of the collaboration loss: forward (M-way cross-entropy + soft-min surrogate) and
// its gradient w.r.t. the logits, each one pass over logits [M, B, K].
//
// For the backward pass the forward keeps the log-partition lse[m,b] in float64 (exp(z - lse) must
// be accurate even for logits of 1e4, where a float32 lse would carry an error of 1e-3) and, when
// autograd asks, the softmax itself, so the backward is a multiply rather than another exp.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../torch_free/collab_loss.h"
#include "vec_math.h"

namespace cda2 {
namespace {

// ---- row routines: inlined into the per-chunk functions below, which are compiled twice --------
// (baseline and AVX2+FMA, see the dispatch below) so each row loop vectorises for the CPU it runs on
// without paying a dispatched call per row (rows have only K = 10 logits at the paper's shape).

// dz[k] = g * (exp(z[k] - lse) - [k == y]). lse is split into a head and a tail in T so the
// subtraction stays in T (and vectorises) without losing lse's float64 accuracy.
template <bool kFma, typename T>
CDA2_ALWAYS_INLINE void grad_row(const T* z, int64_t K, T g, double lse, int64_t y, T* dz) {
  const T hi = static_cast<T>(lse);
  const T lo = static_cast<T>(lse - static_cast<double>(hi));
  cpu::row_scaled_exp<kFma>(z, K, g, hi, lo, dz);
  dz[y] -= g;
}

// dz[k] = g * (prob[k] - [k == y]) from a saved softmax row.
template <typename T>
CDA2_ALWAYS_INLINE void grad_row_from_prob(const T* prob, int64_t K, T g, int64_t y, T* dz) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) dz[k] = g * prob[k];
  dz[y] = g * (prob[y] - T(1));
}

// Rows as the math type: float and double are read in place; half types are widened into a
// per-thread buffer (and their gradients narrowed back through another).
template <typename scalar_t, typename T>
struct Rows {
  std::vector<T> in, out;
  const T* read(const scalar_t* z, int64_t K) {
    if constexpr (std::is_same_v<scalar_t, T>) {
      return z;
    } else {
      in.resize(K);
      for (int64_t k = 0; k < K; ++k) in[k] = static_cast<T>(z[k]);
      return in.data();
    }
  }
  T* dest(scalar_t* dz, int64_t K) {
    if constexpr (std::is_same_v<scalar_t, T>) {
      return dz;
    } else {
      out.resize(K);
      return out.data();
    }
  }
  void commit(scalar_t* dz, int64_t K) {
    if constexpr (!std::is_same_v<scalar_t, T>)
      for (int64_t k = 0; k < K; ++k) dz[k] = static_cast<scalar_t>(out[k]);
  }
};

template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Raw pointers of one call; T is the math/statistics type (float for half inputs).
template <typename scalar_t, typename T = math_t<scalar_t>>
struct Buffers {
  int64_t M, B, K;
  const scalar_t* z;
  const int64_t* y;
  T sigma;
  double* lse;  // written by forward, read by backward
  T* prob;      // may be null
  T *loss, *ce, *w, *p;                       // forward outputs
  scalar_t* dz;                               // backward output
  const T *gL, *gce, *gw, *gp;                // backward inputs (null = no gradient)
  T gscale;                                   // 1/B for mean reduction
  bool per_sample;                            // grad_loss has one entry per sample
};

// The forward over samples [b0, b1) in three sweeps, each a loop the compiler vectorises:
//  1. per row: max and sum of exps (and the softmax, if kept); mx, the sum and mx - z_y are parked
//     in lse, w and p, which are overwritten below;
//  2. per sub-model, across samples: lse = mx + log(sum), ce = (mx - z_y) + log(sum);
//  3. per sub-model, across samples: the soft-min over m (Eq. 7) -- the same math as
//     softmin_forward in torch_free/collab_loss.h, laid out so that the M-way loop runs over
//     contiguous samples instead of one sample at a time (the per-sample transcendental calls
//     were most of the forward at K = 10).
template <bool kFma, typename scalar_t, typename T = math_t<scalar_t>>
CDA2_ALWAYS_INLINE void forward_chunk_body(const Buffers<scalar_t>& a, int64_t b0, int64_t b1) {
  Rows<scalar_t, T> rows;
  const int64_t M = a.M, B = a.B, K = a.K, n = b1 - b0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = m * B + b;
      const T* row = rows.read(a.z + r * K, K);
      T* prob = a.prob ? a.prob + r * K : nullptr;
      const T mx = cpu::row_max(row, K);
      const T s = cpu::row_sum_exp<kFma>(row, K, mx, prob);
      if (prob) {
        const T inv = T(1) / s;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) prob[k] *= inv;
      }
      a.lse[r] = static_cast<double>(mx);
      a.w[r] = s;
      a.p[r] = mx - row[a.y[b]];
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r0 = m * B + b0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T ls = cpu::log_f<kFma>(a.w[r0 + i]);  // the sum is >= 1: log(sum) is accurate on its own
      a.lse[r0 + i] += static_cast<double>(ls);
      a.ce[r0 + i] = a.p[r0 + i] + ls;
    }
  }
  // Soft-min over m. amax lives in loss[b0, b1) until the loss overwrites it; sum in a buffer.
  T* amax = a.loss + b0;
  std::vector<T> sum_buf(n, T(0));
  T* sum = sum_buf.data();
  const T neg_inv_sigma = T(-1) / a.sigma;
  for (int64_t i = 0; i < n; ++i) amax[i] = -static_cast<T>(INFINITY);
  for (int64_t m = 0; m < M; ++m) {
    const T* ce = a.ce + m * B + b0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) amax[i] = ce[i] * neg_inv_sigma > amax[i] ? ce[i] * neg_inv_sigma : amax[i];
  }
  for (int64_t m = 0; m < M; ++m) {
    const T* ce = a.ce + m * B + b0;
    T* w = a.w + m * B + b0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      w[i] = cpu::exp_f<kFma>(ce[i] * neg_inv_sigma - amax[i]);
      sum[i] += w[i];
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const T* ce = a.ce + m * B + b0;
    T* w = a.w + m * B + b0;
    T* p = a.p + m * B + b0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      w[i] /= sum[i];
      p[i] = cpu::exp_f<kFma>(-ce[i]);
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) amax[i] = -a.sigma * (amax[i] + cpu::log_f<kFma>(sum[i]));
}

template <bool kFma, typename scalar_t, typename T = math_t<scalar_t>>
CDA2_ALWAYS_INLINE void backward_chunk_body(const Buffers<scalar_t>& a, int64_t b0, int64_t b1) {
  Rows<scalar_t, T> rows;
  for (int64_t b = b0; b < b1; ++b) {
    const T gLb = a.gL ? a.gL[a.per_sample ? b : 0] * a.gscale : T(0);
    T wgw = 0;
    if (a.gw)
      for (int64_t m = 0; m < a.M; ++m) wgw += a.gw[m * a.B + b] * a.w[m * a.B + b];
    for (int64_t m = 0; m < a.M; ++m) {
      const int64_t r = m * a.B + b;
      const T g = ce_grad<T>(gLb, a.w[r], a.p[r], a.gce, a.gw, a.gp, r, wgw, a.sigma);
      T* dz = rows.dest(a.dz + r * a.K, a.K);
      if (a.prob)
        grad_row_from_prob<T>(a.prob + r * a.K, a.K, g, a.y[b], dz);
      else
        grad_row<kFma, T>(rows.read(a.z + r * a.K, a.K), a.K, g, a.lse[r], a.y[b], dz);
      rows.commit(a.dz + r * a.K, a.K);
    }
  }
}

// float: an AVX2+FMA instantiation (FMAs inside exp/log only) picked at run time where the CPU has
// it, else the baseline; double: AVX2 clones without FMA (std::exp/log do the work); half types:
// baseline. (target_clones alone cannot vary the source between the copies, hence the template.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target("arch=x86-64-v3"))) void forward_chunk_v3(const Buffers<float>& a, int64_t b0, int64_t b1) {
  forward_chunk_body<true>(a, b0, b1);
}
__attribute__((target("arch=x86-64-v3"))) void backward_chunk_v3(const Buffers<float>& a, int64_t b0, int64_t b1) {
  backward_chunk_body<true>(a, b0, b1);
}
bool cpu_has_v3() {
  static const bool yes = __builtin_cpu_supports("x86-64-v3");
  return yes;
}
void forward_chunk(const Buffers<float>& a, int64_t b0, int64_t b1) {
  cpu_has_v3() ? forward_chunk_v3(a, b0, b1) : forward_chunk_body<false>(a, b0, b1);
}
void backward_chunk(const Buffers<float>& a, int64_t b0, int64_t b1) {
  cpu_has_v3() ? backward_chunk_v3(a, b0, b1) : backward_chunk_body<false>(a, b0, b1);
}
#else
void forward_chunk(const Buffers<float>& a, int64_t b0, int64_t b1) { forward_chunk_body<false>(a, b0, b1); }
void backward_chunk(const Buffers<float>& a, int64_t b0, int64_t b1) { backward_chunk_body<false>(a, b0, b1); }
#endif
CDA2_CPU_CLONES void forward_chunk(const Buffers<double>& a, int64_t b0, int64_t b1) { forward_chunk_body<false>(a, b0, b1); }
CDA2_CPU_CLONES void backward_chunk(const Buffers<double>& a, int64_t b0, int64_t b1) { backward_chunk_body<false>(a, b0, b1); }
template <typename scalar_t>
void forward_chunk(const Buffers<scalar_t>& a, int64_t b0, int64_t b1) { forward_chunk_body<false>(a, b0, b1); }
template <typename scalar_t>
void backward_chunk(const Buffers<scalar_t>& a, int64_t b0, int64_t b1) { backward_chunk_body<false>(a, b0, b1); }

// Samples b are split across threads; each thread does the M rows of its samples, so the
// soft-min over sub-models needs no cross-thread step. Rows are heavy when K is large: give
// each thread at least ~32k logits.
template <typename F>
void for_samples(int64_t M, int64_t B, int64_t K, const F& f) {
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, M * K)), f);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> collab_loss_cpu(
    const at::Tensor& logits, const at::Tensor& target, double sigma, int64_t reduction, bool save_prob,
    bool check_target) {
  (void)check_target;  // always checked here: the kernel indexes memory with labels (and it costs no sync)
  check_collab_loss(logits, target, sigma, reduction);
  const auto z = logits.contiguous();
  const auto y = target.contiguous();
  const int64_t M = z.size(0), B = z.size(1), K = z.size(2);
  check_in_range_cpu(y, K, "target", "labels");
  const auto st = stat_type(z.scalar_type());
  // empty_cpu skips the dispatcher: six outputs per call are a visible cost at the paper's shape.
  const auto empty = [](at::IntArrayRef size, at::ScalarType t) -> at::Tensor {
    return at::detail::empty_cpu(size, t, false, std::nullopt);
  };
  auto loss_vec = empty({B}, st);
  auto ce = empty({M, B}, st), w = empty({M, B}, st), p = empty({M, B}, st);
  auto lse = empty({M, B}, at::kDouble);
  // On the CPU the exp per logit dominates, so keeping the softmax halves the backward's work.
  auto prob = save_prob ? empty({M, B, K}, st) : empty({0}, st);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "collab_loss_cpu", [&] {
    using T = math_t<scalar_t>;
    Buffers<scalar_t> a{M, B, K, z.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), static_cast<T>(sigma),
                        lse.data_ptr<double>(), save_prob ? prob.data_ptr<T>() : nullptr,
                        loss_vec.data_ptr<T>(), ce.data_ptr<T>(), w.data_ptr<T>(), p.data_ptr<T>(),
                        nullptr, nullptr, nullptr, nullptr, nullptr, T(1), true};
    for_samples(M, B, K, [&](int64_t b0, int64_t b1) { forward_chunk(a, b0, b1); });
  });
  if (reduction == kNone) return {loss_vec, ce, w, p, lse, prob};
  // Reduce here rather than with another op: one dispatcher call less per step.
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(loss_vec.scalar_type(), "collab_loss_reduce", [&] {
    const scalar_t* lp = loss_vec.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) total += static_cast<double>(lp[b]);
  });
  if (reduction == kMean) total /= static_cast<double>(B);
  auto loss = empty({}, st);
  AT_DISPATCH_FLOATING_TYPES(st, "collab_loss_store", [&] { *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(total); });
  return {loss, ce, w, p, lse, prob};
}

// Labels are checked again here, unlike on CUDA: this kernel writes dz[y], so a label indexes memory
// (the CUDA kernel only compares it with k).
at::Tensor collab_loss_backward_cpu(const CollabLossBackward& a) {
  const int64_t M = a.M, B = a.B, K = a.K;
  check_in_range_cpu(a.target, K, "target", "labels");
  at::Tensor dz = at::detail::empty_cpu(a.logits.sizes(), a.logits.scalar_type(), false, std::nullopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.logits.scalar_type(), "collab_loss_backward_cpu", [&] {
    using T = math_t<scalar_t>;
    const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    Buffers<scalar_t> buf{M, B, K, a.logits.data_ptr<scalar_t>(), a.target.data_ptr<int64_t>(),
                          static_cast<T>(a.sigma), a.lse.data_ptr<double>(), ptr(a.prob),
                          nullptr, nullptr, a.weights.data_ptr<T>(), a.p_true.data_ptr<T>(),
                          dz.data_ptr<scalar_t>(), ptr(a.grad_loss), ptr(a.grad_ce), ptr(a.grad_weights),
                          ptr(a.grad_p_true), a.reduction == kMean ? T(1) / static_cast<T>(B) : T(1),
                          a.reduction == kNone};
    for_samples(M, B, K, [&](int64_t b0, int64_t b1) { backward_chunk(buf, b0, b1); });
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(cda2_ext, CPU, m) {
  m.impl("collab_loss", &collab_loss_cpu);
  m.impl("collab_loss_backward", &collab_loss_backward_op<collab_loss_backward_cpu>);
}

}  // namespace cda2
