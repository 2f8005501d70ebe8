// Autograd for the differentiable operators, in C++ so a forward+backward of a fused op costs
// two dispatcher calls and no Python frames (the Python autograd.Function route costs tens of
// microseconds per call, more than the kernels themselves at the paper's shapes).
// The backward formulas are operators too (collab_loss_backward, ...), so they dispatch to
// whichever device the tensors live on and trace under torch.compile.
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

namespace cda2 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using torch::autograd::variable_list;

using OptT = std::optional<at::Tensor>;
using CollabLossOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Undefined gradients (outputs that did not reach the loss) travel as None: the kernels treat
// them as zero without materialising zero tensors.
OptT maybe(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }

class CollabLossFn : public torch::autograd::Function<CollabLossFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               double sigma, int64_t reduction, bool save_prob) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("cda2_ext::collab_loss", "")
                         .typed<CollabLossOut(const at::Tensor&, const at::Tensor&, double, int64_t, bool)>();
    auto [loss, ce, w, p, lse, prob] = op.call(logits, target, sigma, reduction, save_prob);
    ctx->save_for_backward({logits, target, lse, prob, w, p});
    ctx->saved_data["sigma"] = sigma;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({lse, prob});
    return {loss, ce, w, p, lse, prob};
  }

  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto s = ctx->get_saved_variables();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("cda2_ext::collab_loss_backward", "")
                         .typed<at::Tensor(const OptT&, const OptT&, const OptT&, const OptT&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, double, int64_t)>();
    auto dz = op.call(maybe(g[0]), maybe(g[1]), maybe(g[2]), maybe(g[3]), s[0], s[1], s[2], s[3], s[4], s[5],
                      ctx->saved_data["sigma"].toDouble(), ctx->saved_data["reduction"].toInt());
    return {dz, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class PpdBceFn : public torch::autograd::Function<PpdBceFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s, const at::Tensor& t, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cda2_ext::ppd_bce", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
    ctx->save_for_backward({s, t});
    ctx->saved_data["reduction"] = reduction;
    return op.call(s, t, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto s = ctx->get_saved_variables();
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cda2_ext::ppd_bce_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
    // The target is a constant by design (the paper detaches p_y): no gradient for it.
    return {op.call(g[0], s[0], s[1], ctx->saved_data["reduction"].toInt()), at::Tensor(), at::Tensor()};
  }
};

class SelectFn : public torch::autograd::Function<SelectFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& ppd, const at::Tensor& logits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cda2_ext::collab_select", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
    auto [index, chosen] = op.call(ppd, logits);
    ctx->save_for_backward({index});
    ctx->saved_data["num_models"] = logits.size(0);
    ctx->mark_non_differentiable({index});
    return {index, chosen};
  }

  static variable_list backward(AutogradContext* ctx, variable_list g) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cda2_ext::collab_select_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
    auto index = ctx->get_saved_variables()[0];
    // The argmax has no gradient w.r.t. the scores; only the chosen logits receive one.
    return {at::Tensor(), op.call(g[1], index, ctx->saved_data["num_models"].toInt())};
  }
};

CollabLossOut collab_loss_ag(const at::Tensor& logits, const at::Tensor& target, double sigma, int64_t reduction,
                             bool save_prob) {
  // Ask the kernel to keep the softmax only when a backward pass can follow: then backward is a
  // multiply instead of a second exp per logit. No-grad callers (attacks, eval) pay nothing.
  // (Checked here: Function::apply runs forward with grad mode off.)
  const bool need = save_prob || (at::GradMode::is_enabled() && logits.requires_grad());
  auto r = CollabLossFn::apply(logits, target, sigma, reduction, need);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

at::Tensor ppd_bce_ag(const at::Tensor& s, const at::Tensor& t, int64_t reduction) {
  return PpdBceFn::apply(s, t, reduction);
}

std::tuple<at::Tensor, at::Tensor> select_ag(const at::Tensor& ppd, const at::Tensor& logits) {
  auto r = SelectFn::apply(ppd, logits);
  return {r[0], r[1]};
}

// ---- the in-place PGD ops: not differentiable, but they must play by autograd's rules -------
// Autograd: refuse to write into a tensor that records gradients (as torch's in-place ops do for
// leaves), instead of silently corrupting a graph. ADInplaceOrView: bump x_adv's version counter,
// so a tensor saved for backward and then stepped on raises instead of giving a wrong gradient.
using SignStepFn = void(at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double, double);
using RandomStartFn = void(at::Tensor&, const at::Tensor&, double, double, double, int64_t);

void check_no_grad(const at::Tensor& x_adv, const at::Tensor& other, const char* op) {
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && (x_adv.requires_grad() || other.requires_grad())),
                    "x_adv: ", op, " is an in-place attack step and not differentiable; call it under "
                    "torch.no_grad() on tensors that do not require grad");
}

c10::TypedOperatorHandle<SignStepFn>& sign_step_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cda2_ext::sign_step_", "").typed<SignStepFn>();
  return op;
}

c10::TypedOperatorHandle<RandomStartFn>& random_start_op() {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("cda2_ext::random_start_", "").typed<RandomStartFn>();
  return op;
}

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
  torch::autograd::increment_version(x);
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
  torch::autograd::increment_version(x);
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
