// Argument checks for the raw operators, run before any kernel reads tensor data. The Python
// face (cda2_ext/ops/_checks.py) checks the same things with the same messages first; these guard
// direct torch.ops.cda2_ext.* calls so that no input can make a kernel read out of bounds.
// TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError in Python.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <cmath>
#include <optional>
#include <vector>

#include "torch_free/common.h"

namespace cda2 {

// None from Python arrives as an undefined tensor.
inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), name, ": expected a tensor, got None");
}

inline void check_float(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   name, ": expected a floating dtype (float16, bfloat16, float32, float64), got ", st);
}

// The statistics (loss, ce, weights, p_true, bce) of half-precision inputs are float32.
inline at::ScalarType stat_type(at::ScalarType st) {
  return (st == at::kHalf || st == at::kBFloat16) ? at::kFloat : st;
}

inline void check_same_device(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK_VALUE(a.device() == b.device(), nb, ": expected a tensor on ", a.device(), " like ", na,
                    ", got ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), nb, ": expected dtype ", a.scalar_type(), " like ",
                   na, ", got ", b.scalar_type());
}

inline void check_reduction(int64_t r) {
  TORCH_CHECK_VALUE(r >= 0 && r <= 2, "reduction: expected 0 (none), 1 (mean) or 2 (sum), got ", r);
}

inline void check_nonneg(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, name, ": must be finite and >= 0, got ", v);
}

inline void check_collab_loss(const at::Tensor& logits, const at::Tensor& target, double sigma,
                              int64_t reduction) {
  check_float(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 3, "logits: expected shape [M, B, K], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(0) >= 1 && logits.size(1) >= 1,
                    "logits: needs M >= 1 sub-models and B >= 1 samples, got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(2) >= 2, "logits: needs K >= 2 classes, got K=", logits.size(2));
  check_defined(target, "target");
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target: expected int64 labels, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(1), "target: expected shape [B]=[",
                    logits.size(1), "] to match logits ", logits.sizes(), ", got ", target.sizes());
  check_same_device(logits, "logits", target, "target");
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0, "sigma: must be finite and > 0, got ", sigma);
  check_reduction(reduction);
}

// Entries of an int64 vector (labels, selection indices) in [0, hi). Each backend finds the first
// entry outside the range its own way (check_in_range_cpu below, glue::check_in_range_cuda in
// cuda/glue.h, before any kernel uses the entries); both raise here, with one message:
// `first` is that entry's position (n when every entry is in range), `value` the entry.
inline void check_range_result(int64_t first, int64_t value, int64_t n, int64_t hi, const char* name,
                               const char* what) {
  TORCH_CHECK_VALUE(first >= n, name, ": ", what, " must lie in [0, ", hi, "), found ", value, " at index ",
                    first);
}

// t: a contiguous int64 CPU tensor; reads its entries and nothing else.
inline void check_in_range_cpu(const at::Tensor& t, int64_t hi, const char* name, const char* what) {
  const int64_t* v = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  int64_t first = 0;
  while (first < n && v[first] >= 0 && v[first] < hi) ++first;
  check_range_result(first, first < n ? v[first] : 0, n, hi, name, what);
}

inline void check_ppd_bce(const at::Tensor& s, const at::Tensor& t, int64_t reduction) {
  check_float(s, "ppd_logit");
  check_float(t, "target_prob");
  TORCH_CHECK_VALUE(s.dim() == 2 && s.numel() > 0, "ppd_logit: expected a non-empty [M, B] tensor, got ",
                    s.sizes());
  TORCH_CHECK_VALUE(t.sizes() == s.sizes(), "target_prob: expected shape ", s.sizes(),
                    " like ppd_logit, got ", t.sizes());
  check_same_dtype(s, "ppd_logit", t, "target_prob");
  check_same_device(s, "ppd_logit", t, "target_prob");
  check_reduction(reduction);
}

// grad: the upstream gradient of ppd_bce's output, [M, B] for reduction none, else a scalar; in
// the statistics dtype (float32 for half inputs). Autograd never passes an undefined one (the
// output is a single tensor), but a direct call can.
inline void check_ppd_bce_backward(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& t,
                                   int64_t reduction) {
  check_ppd_bce(s, t, reduction);
  const bool per_elem = reduction == kNone;
  check_defined(grad, "grad");
  TORCH_CHECK_VALUE(per_elem ? grad.sizes() == s.sizes() : grad.dim() == 0, "grad: expected shape ",
                    per_elem ? s.sizes() : at::IntArrayRef{}, ", got ", grad.sizes());
  const auto st = stat_type(s.scalar_type());
  TORCH_CHECK_TYPE(grad.scalar_type() == st, "grad: expected dtype ", st, ", got ", grad.scalar_type());
  check_same_device(s, "ppd_logit", grad, "grad");
}

inline void check_box(double eps, double lo, double hi) {
  check_nonneg(eps, "eps");
  TORCH_CHECK_VALUE(!std::isnan(lo) && !std::isnan(hi), "lo: expected numbers for lo and hi, got ", lo,
                    ", ", hi);
  TORCH_CHECK_VALUE(lo <= hi, "lo: must be <= hi, got lo=", lo, " > hi=", hi);
}

// x_nat has x_adv's shape, or x_adv's shape without its leading sub-model axis.
inline void check_image_pair(const at::Tensor& x_adv, const at::Tensor& x_nat) {
  TORCH_CHECK_VALUE(x_adv.numel() > 0, "x_adv: expected a non-empty tensor, got ", x_adv.sizes());
  const bool same = x_nat.sizes() == x_adv.sizes();
  const bool bcast = x_adv.dim() >= 1 && x_nat.sizes() == x_adv.sizes().slice(1);
  TORCH_CHECK_VALUE(same || bcast, "x_nat: expected shape ", x_adv.sizes(), " or ", x_adv.sizes().slice(1),
                    " (broadcast over the sub-model axis of x_adv), got ", x_nat.sizes());
  check_same_dtype(x_adv, "x_adv", x_nat, "x_nat");
  check_same_device(x_adv, "x_adv", x_nat, "x_nat");
}

inline void check_sign_step(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                            double eps, double alpha, double lo, double hi) {
  check_float(x_adv, "x_adv");
  check_float(grad, "grad");
  check_float(x_nat, "x_nat");
  TORCH_CHECK_VALUE(grad.sizes() == x_adv.sizes(), "grad: expected shape ", x_adv.sizes(),
                    " like x_adv, got ", grad.sizes());
  check_same_dtype(x_adv, "x_adv", grad, "grad");
  check_same_device(x_adv, "x_adv", grad, "grad");
  check_image_pair(x_adv, x_nat);
  check_box(eps, lo, hi);
  check_nonneg(alpha, "alpha");
}

inline void check_random_start(const at::Tensor& x_adv, const at::Tensor& x_nat, double eps, double lo,
                               double hi) {
  check_float(x_adv, "x_adv");
  check_float(x_nat, "x_nat");
  check_image_pair(x_adv, x_nat);
  check_box(eps, lo, hi);
}

inline void check_select(const at::Tensor& ppd_logit, const at::Tensor& logits) {
  check_float(ppd_logit, "ppd_logit");
  check_float(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.numel() > 0,
                    "logits: expected a non-empty [M, B, K] tensor, got ", logits.sizes());
  TORCH_CHECK_VALUE(ppd_logit.dim() == 2 && ppd_logit.size(0) == logits.size(0) &&
                        ppd_logit.size(1) == logits.size(1),
                    "ppd_logit: expected shape [", logits.size(0), ", ", logits.size(1),
                    "] ([M, B] of logits), got ", ppd_logit.sizes());
  check_same_device(ppd_logit, "ppd_logit", logits, "logits");
}

inline void check_select_backward(const at::Tensor& grad_chosen, const at::Tensor& index, int64_t num_models) {
  check_float(grad_chosen, "grad_chosen");
  TORCH_CHECK_VALUE(grad_chosen.dim() == 2, "grad_chosen: expected [B, K], got ", grad_chosen.sizes());
  check_defined(index, "index");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index: expected int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == grad_chosen.size(0), "index: expected shape [",
                    grad_chosen.size(0), "], got ", index.sizes());
  TORCH_CHECK_VALUE(num_models >= 1, "num_models: must be >= 1, got ", num_models);
  check_same_device(grad_chosen, "grad_chosen", index, "index");
}

// The in-place ops accept a strided x_adv: `body` runs on a contiguous tensor (x_adv itself when it
// already is one) and the result is copied back.
template <typename F>
void with_contiguous(at::Tensor& x_adv, const F& body) {
  if (x_adv.is_contiguous()) {
    body(x_adv);
  } else {
    auto tmp = x_adv.contiguous();
    body(tmp);
    x_adv.copy_(tmp);
  }
}

// A tensor that a backward op reads: undefined (no gradient) or of the expected shape and dtype.
inline void check_saved(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType st,
                        const at::Tensor& like) {
  if (!t.defined()) return;
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == st, name, ": expected dtype ", st, ", got ", t.scalar_type());
  check_same_device(like, "logits", t, name);
}

// collab_loss_backward's inputs, checked and contiguous. The upstream gradients are undefined where
// none flowed (the kernels treat them as zero); prob is undefined unless the forward kept the softmax.
struct CollabLossBackward {
  at::Tensor grad_loss, grad_ce, grad_weights, grad_p_true;
  at::Tensor logits, target, lse, prob, weights, p_true;
  double sigma;
  int64_t reduction, M, B, K;
};

inline CollabLossBackward check_collab_loss_backward(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_ce,
    const std::optional<at::Tensor>& grad_weights, const std::optional<at::Tensor>& grad_p_true,
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& prob,
    const at::Tensor& weights, const at::Tensor& p_true, double sigma, int64_t reduction) {
  check_collab_loss(logits, target, sigma, reduction);
  const int64_t M = logits.size(0), B = logits.size(1), K = logits.size(2);
  const auto st = stat_type(logits.scalar_type());
  const std::vector<int64_t> mb{M, B};
  const auto opt = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
  };
  CollabLossBackward a{opt(grad_loss), opt(grad_ce), opt(grad_weights), opt(grad_p_true),
                       logits.contiguous(), target.contiguous(), {}, {}, {}, {}, sigma, reduction, M, B, K};
  check_saved(a.grad_loss, "grad_loss", reduction == kNone ? at::IntArrayRef{B} : at::IntArrayRef{}, st, logits);
  check_saved(a.grad_ce, "grad_ce", mb, st, logits);
  check_saved(a.grad_weights, "grad_weights", mb, st, logits);
  check_saved(a.grad_p_true, "grad_p_true", mb, st, logits);
  check_defined(lse, "lse");
  check_defined(prob, "prob");
  check_defined(weights, "weights");
  check_defined(p_true, "p_true");
  check_saved(lse, "lse", mb, at::kDouble, logits);
  check_saved(weights, "weights", mb, st, logits);
  check_saved(p_true, "p_true", mb, st, logits);
  a.lse = lse.contiguous();
  a.weights = weights.contiguous();
  a.p_true = p_true.contiguous();
  // prob is empty unless the forward kept the softmax (only the CPU forward does); a.prob stays
  // undefined then.
  if (prob.numel()) {
    check_saved(prob, "prob", {M, B, K}, st, logits);
    a.prob = prob.contiguous();
  }
  return a;
}

// collab_loss_backward with the schema's signature (csrc/ops.cpp), for every backend: the checks
// above, then the backend's `Impl` on the checked, contiguous inputs. Each backend registers
// collab_loss_backward_op<its_impl>, so the twelve arguments are spelled once.
template <at::Tensor (*Impl)(const CollabLossBackward&)>
at::Tensor collab_loss_backward_op(const std::optional<at::Tensor>& grad_loss,
                                   const std::optional<at::Tensor>& grad_ce,
                                   const std::optional<at::Tensor>& grad_weights,
                                   const std::optional<at::Tensor>& grad_p_true, const at::Tensor& logits,
                                   const at::Tensor& target, const at::Tensor& lse, const at::Tensor& prob,
                                   const at::Tensor& weights, const at::Tensor& p_true, double sigma,
                                   int64_t reduction) {
  return Impl(check_collab_loss_backward(grad_loss, grad_ce, grad_weights, grad_p_true, logits, target, lse,
                                         prob, weights, p_true, sigma, reduction));
}

}  // namespace cda2
