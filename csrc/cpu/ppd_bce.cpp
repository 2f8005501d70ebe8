// CPU kernels of the PPD-head BCE: bce = softplus(s) - t*s, d bce / ds = sigmoid(s) - t.
// [M, B] is small (M*B scalars); one elementwise pass each way, parallel over elements.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../torch_free/common.h"

namespace cda2 {
namespace {

constexpr int64_t kGrain = 16384;

at::Tensor ppd_bce_cpu(const at::Tensor& ppd_logit, const at::Tensor& target_prob, int64_t reduction) {
  check_ppd_bce(ppd_logit, target_prob, reduction);
  const auto s = ppd_logit.contiguous(), t = target_prob.contiguous();
  auto out = at::empty(s.sizes(), s.options().dtype(stat_type(s.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "ppd_bce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, s.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t x = static_cast<acc_t>(sp[i]);
        op[i] = softplus(x) - static_cast<acc_t>(tp[i]) * x;
      }
    });
  });
  if (reduction == kNone) return out;
  return reduction == kMean ? out.mean() : out.sum();
}

at::Tensor ppd_bce_backward_cpu(const at::Tensor& grad, const at::Tensor& ppd_logit, const at::Tensor& target_prob,
                                int64_t reduction) {
  check_ppd_bce_backward(grad, ppd_logit, target_prob, reduction);
  const bool per_elem = reduction == kNone;
  const auto s = ppd_logit.contiguous(), t = target_prob.contiguous(), g = grad.contiguous();
  auto ds = at::empty_like(s);
  const int64_t n = s.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "ppd_bce_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const acc_t* gp = g.data_ptr<acc_t>();
    scalar_t* dp = ds.data_ptr<scalar_t>();
    const acc_t scale = reduction == kMean ? acc_t(1) / static_cast<acc_t>(n) : acc_t(1);
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t gi = (per_elem ? gp[i] : gp[0]) * scale;
        dp[i] = static_cast<scalar_t>(gi * (sigmoid(static_cast<acc_t>(sp[i])) - static_cast<acc_t>(tp[i])));
      }
    });
  });
  return ds;
}

}  // namespace

TORCH_LIBRARY_IMPL(cda2_ext, CPU, m) {
  m.impl("ppd_bce", &ppd_bce_cpu);
  m.impl("ppd_bce_backward", &ppd_bce_backward_cpu);
}

}  // namespace cda2
