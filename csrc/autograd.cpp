// Autograd for the differentiable operators, in C++ so a forward+backward of a fused op costs
// two dispatcher calls and no Python frames (the Python autograd.Function route costs tens of
// microseconds per call, more than the kernels themselves at the paper's shapes).
// The backward formulas are operators too (collab_loss_backward, ...), so they dispatch to
// whichever device the tensors live on and trace under torch.compile.
#include <torch/autograd.h>
#include <torch/library.h>

#include "checks.h"

namespace cda2 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using OptT = std::optional<at::Tensor>;
using CollabLossOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The C++ signatures of the schemas in ops.cpp that this file calls.
using CollabLossSig = CollabLossOut(const at::Tensor&, const at::Tensor&, double, int64_t, bool, bool);
using CollabLossBackwardSig = at::Tensor(const OptT&, const OptT&, const OptT&, const OptT&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double, int64_t);
using PpdBceSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t);
using PpdBceBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using SelectSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&);
using SelectBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool);
using SignStepSig = void(at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double, double);
using RandomStartSig = void(at::Tensor&, const at::Tensor&, double, double, double, int64_t);

// The typed handle of cda2_ext::<name>. Callers keep it in a function-local static, so the
// dispatcher's table is searched once per call site, not once per call.
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Function::apply reads every input's device before forward runs, so an undefined tensor (None
// from Python) would fail there as "tensor does not have a device"; name the argument instead.
void check_inputs_defined(std::initializer_list<std::pair<const at::Tensor*, const char*>> inputs) {
  for (const auto& [t, name] : inputs) check_defined(*t, name);
}

// Undefined gradients (outputs that did not reach the loss) travel as None: the kernels treat
// them as zero without materialising zero tensors.
OptT maybe(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }

class CollabLossFn : public torch::autograd::Function<CollabLossFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               double sigma, int64_t reduction, bool save_prob, bool check_target) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_op<CollabLossSig>("cda2_ext::collab_loss");
    auto [loss, ce, w, p, lse, prob] = op.call(logits, target, sigma, reduction, save_prob, check_target);
    ctx->save_for_backward({logits, target, lse, prob, w, p});
    ctx->saved_data["sigma"] = sigma;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({lse, prob});
    return {loss, ce, w, p, lse, prob};
  }

  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto s = ctx->get_saved_variables();
    static const auto op = typed_op<CollabLossBackwardSig>("cda2_ext::collab_loss_backward");
    auto dz = op.call(maybe(g[0]), maybe(g[1]), maybe(g[2]), maybe(g[3]), s[0], s[1], s[2], s[3], s[4], s[5],
                      ctx->saved_data["sigma"].toDouble(), ctx->saved_data["reduction"].toInt());
    return {dz, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class PpdBceFn : public torch::autograd::Function<PpdBceFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s, const at::Tensor& t, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_op<PpdBceSig>("cda2_ext::ppd_bce");
    ctx->save_for_backward({s, t});
    ctx->saved_data["reduction"] = reduction;
    return op.call(s, t, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto s = ctx->get_saved_variables();
    static const auto op = typed_op<PpdBceBackwardSig>("cda2_ext::ppd_bce_backward");
    // The target is a constant by design (the paper detaches p_y): no gradient for it.
    return {op.call(g[0], s[0], s[1], ctx->saved_data["reduction"].toInt()), at::Tensor(), at::Tensor()};
  }
};

class SelectFn : public torch::autograd::Function<SelectFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& ppd, const at::Tensor& logits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_op<SelectSig>("cda2_ext::collab_select");
    auto [index, chosen] = op.call(ppd, logits);
    ctx->save_for_backward({index});
    ctx->saved_data["num_models"] = logits.size(0);
    ctx->mark_non_differentiable({index});
    return {index, chosen};
  }

  static variable_list backward(AutogradContext* ctx, variable_list g) {
    static const auto op = typed_op<SelectBackwardSig>("cda2_ext::collab_select_backward");
    auto index = ctx->get_saved_variables()[0];
    // The argmax has no gradient w.r.t. the scores; only the chosen logits receive one. The index
    // is the forward's argmax, in range by construction: no check (on CUDA, no host sync).
    return {at::Tensor(), op.call(g[1], index, ctx->saved_data["num_models"].toInt(), false)};
  }
};

CollabLossOut collab_loss_ag(const at::Tensor& logits, const at::Tensor& target, double sigma, int64_t reduction,
                             bool save_prob, bool check_target) {
  // Ask the kernel to keep the softmax only when a backward pass can follow: then backward is a
  // multiply instead of a second exp per logit. No-grad callers (attacks, eval) pay nothing.
  // (Checked here: Function::apply runs forward with grad mode off.)
  check_inputs_defined({{&logits, "logits"}, {&target, "target"}});
  const bool need = save_prob || (at::GradMode::is_enabled() && logits.requires_grad());
  auto r = CollabLossFn::apply(logits, target, sigma, reduction, need, check_target);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

at::Tensor ppd_bce_ag(const at::Tensor& s, const at::Tensor& t, int64_t reduction) {
  check_inputs_defined({{&s, "ppd_logit"}, {&t, "target_prob"}});
  return PpdBceFn::apply(s, t, reduction);
}

std::tuple<at::Tensor, at::Tensor> select_ag(const at::Tensor& ppd, const at::Tensor& logits) {
  check_inputs_defined({{&ppd, "ppd_logit"}, {&logits, "logits"}});
  auto r = SelectFn::apply(ppd, logits);
  return {r[0], r[1]};
}

// ---- the in-place PGD ops: not differentiable, but they must play by autograd's rules -------
// Autograd: refuse to write into a tensor that records gradients (as torch's in-place ops do for
// leaves), instead of silently corrupting a graph. ADInplaceOrView: bump x_adv's version counter,
// so a tensor saved for backward and then stepped on raises instead of giving a wrong gradient.
void check_no_grad(const at::Tensor& x_adv, const at::Tensor& other, const char* op) {
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && (x_adv.requires_grad() || other.requires_grad())),
                    "x_adv: ", op, " is an in-place attack step and not differentiable; call it under "
                    "torch.no_grad() on tensors that do not require grad");
}

const c10::TypedOperatorHandle<SignStepSig>& sign_step_op() {
  static const auto op = typed_op<SignStepSig>("cda2_ext::sign_step_");
  return op;
}

const c10::TypedOperatorHandle<RandomStartSig>& random_start_op() {
  static const auto op = typed_op<RandomStartSig>("cda2_ext::random_start_");
  return op;
}

// What torch::autograd::increment_version does (declared in the internal codegen header
// torch/csrc/autograd/VariableTypeUtils.h): bump the version counter that x shares with its views
// and base. TensorImpl::bump_version is c10's public API and raises the same error for an
// inference tensor outside inference mode.
void bump_version(const at::Tensor& x) { x.unsafeGetTensorImpl()->bump_version(); }

void sign_step_ag(c10::DispatchKeySet ks, at::Tensor& x, const at::Tensor& g, const at::Tensor& x0, double eps,
                  double alpha, double lo, double hi) {
  check_no_grad(x, g, "sign_step_");
  sign_step_op().redispatch(ks & c10::after_autograd_keyset, x, g, x0, eps, alpha, lo, hi);
}

void sign_step_view(c10::DispatchKeySet ks, at::Tensor& x, const at::Tensor& g, const at::Tensor& x0, double eps,
                    double alpha, double lo, double hi) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    sign_step_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, x, g, x0, eps, alpha, lo, hi);
  }
  bump_version(x);
}

void random_start_ag(c10::DispatchKeySet ks, at::Tensor& x, const at::Tensor& x0, double eps, double lo, double hi,
                     int64_t seed) {
  check_no_grad(x, x0, "random_start_");
  random_start_op().redispatch(ks & c10::after_autograd_keyset, x, x0, eps, lo, hi, seed);
}

void random_start_view(c10::DispatchKeySet ks, at::Tensor& x, const at::Tensor& x0, double eps, double lo,
                       double hi, int64_t seed) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    random_start_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, x, x0, eps, lo, hi, seed);
  }
  bump_version(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(cda2_ext, Autograd, m) {
  m.impl("collab_loss", &collab_loss_ag);
  m.impl("ppd_bce", &ppd_bce_ag);
  m.impl("collab_select", &select_ag);
  m.impl("sign_step_", &sign_step_ag);
  m.impl("random_start_", &random_start_ag);
}

TORCH_LIBRARY_IMPL(cda2_ext, ADInplaceOrView, m) {
  m.impl("sign_step_", &sign_step_view);
  m.impl("random_start_", &random_start_view);
}

}  // namespace cda2
