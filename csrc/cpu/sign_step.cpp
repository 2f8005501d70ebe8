// CPU kernels of the PGD pieces: the projected sign step (in place) and the random start.
// One pass over M*B images: read x, g, x0 once, write x once. x_nat of shape x_adv.shape[1:] is
// broadcast over the sub-model axis by walking it once per sub-model (no expanded copy).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../torch_free/common.h"
#include "vec_math.h"

namespace cda2 {
namespace {

constexpr int64_t kGrain = 32768;

// Float and double run their own type; half types compute in float and round once.
CDA2_CPU_CLONES void step_span(float* x, const float* g, const float* x0, int64_t n, float eps, float alpha,
                               float lo, float hi) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = sign_step(x[i], g[i], x0[i], eps, alpha, lo, hi);
}

CDA2_CPU_CLONES void step_span(double* x, const double* g, const double* x0, int64_t n, double eps,
                               double alpha, double lo, double hi) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = sign_step(x[i], g[i], x0[i], eps, alpha, lo, hi);
}

template <typename T>
void step_span(T* x, const T* g, const T* x0, int64_t n, float eps, float alpha, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i)
    x[i] = static_cast<T>(sign_step<float>(x[i], g[i], x0[i], eps, alpha, lo, hi));
}

// Random start over elements [first, first + n): u from the counter-based hash of the flat index.
CDA2_CPU_CLONES void start_span(float* x, const float* x0, int64_t n, uint64_t first, uint64_t seed, float eps,
                                float lo, float hi) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = random_start(x0[j], hash_uniform(seed, first + j), eps, lo, hi);
}

CDA2_CPU_CLONES void start_span(double* x, const double* x0, int64_t n, uint64_t first, uint64_t seed,
                                double eps, double lo, double hi) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    x[j] = random_start(x0[j], static_cast<double>(hash_uniform(seed, first + j)), eps, lo, hi);
}

template <typename T>
void start_span(T* x, const T* x0, int64_t n, uint64_t first, uint64_t seed, float eps, float lo, float hi) {
  for (int64_t j = 0; j < n; ++j) {
    // u is rounded to the tensor's dtype first, as the reference's u.to(x_nat.dtype) does.
    const float u = static_cast<float>(static_cast<T>(hash_uniform(seed, first + j)));
    x[j] = static_cast<T>(random_start<float>(static_cast<float>(x0[j]), u, eps, lo, hi));
  }
}

// Calls f(begin, end, x0_offset) over [0, numel) in parallel, splitting spans at the boundaries of
// x_nat's period so that each call sees a contiguous x_nat slice.
template <typename F>
void for_each_span(int64_t numel, int64_t period, const F& f) {
  at::parallel_for(0, numel, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t off = i % period;
      const int64_t end = std::min(i1, i + (period - off));
      f(i, end, off);
      i = end;
    }
  });
}

void sign_step_cpu(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat, double eps, double alpha,
                   double lo, double hi) {
  check_sign_step(x_adv, grad, x_nat, eps, alpha, lo, hi);
  const auto g = grad.contiguous(), x0 = x_nat.contiguous();
  with_contiguous(x_adv, [&](at::Tensor& x) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sign_step_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* x0p = x0.data_ptr<scalar_t>();
      // eps and alpha are rounded to the tensor's precision first, as torch does for scalars.
      const acc_t e = static_cast<acc_t>(eps), a = static_cast<acc_t>(alpha);
      const acc_t l = static_cast<acc_t>(lo), h = static_cast<acc_t>(hi);
      for_each_span(x.numel(), x0.numel(), [&](int64_t i, int64_t end, int64_t off) {
        step_span(xp + i, gp + i, x0p + off, end - i, e, a, l, h);
      });
    });
  });
}

void random_start_cpu(at::Tensor& x_adv, const at::Tensor& x_nat, double eps, double lo, double hi, int64_t seed) {
  check_random_start(x_adv, x_nat, eps, lo, hi);
  const auto x0 = x_nat.contiguous();
  const uint64_t s = static_cast<uint64_t>(seed);
  with_contiguous(x_adv, [&](at::Tensor& x) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "random_start_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* x0p = x0.data_ptr<scalar_t>();
      const acc_t e = static_cast<acc_t>(eps), l = static_cast<acc_t>(lo), h = static_cast<acc_t>(hi);
      for_each_span(x.numel(), x0.numel(), [&](int64_t i, int64_t end, int64_t off) {
        start_span(xp + i, x0p + off, end - i, static_cast<uint64_t>(i), s, e, l, h);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cda2_ext, CPU, m) {
  m.impl("sign_step_", &sign_step_cpu);
  m.impl("random_start_", &random_start_cpu);
}

}  // namespace cda2
