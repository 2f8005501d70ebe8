// The one list of operators: schemas for torch.ops.cda2_ext.*, plus the Python module that
// carries them. Kernels register per backend in cpu/ and cuda/; autograd in autograd.cpp; fake
// (meta) kernels for torch.compile in cda2_ext/ops/__init__.py.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(cda2_ext, m) {
  // logits [M,B,K], target [B] -> loss ([B] or scalar by reduction 0 none / 1 mean / 2 sum),
  // ce, weights, p_true [M,B] (float32 for half inputs); for the backward pass: lse [M,B] float64
  // and, where save_prob asks and the backend finds it pays, the softmax prob [M,B,K] (else empty).
  // check_target=False: the caller has range-checked the labels already (the trainer checks its
  // data set once), so the CUDA kernel skips its per-call check, which synchronises the host; the
  // CPU kernel always checks (it indexes memory with labels, and reading them there is free).
  m.def("collab_loss(Tensor logits, Tensor target, float sigma, int reduction, bool save_prob=False,"
        " bool check_target=True)"
        " -> (Tensor loss, Tensor ce, Tensor weights, Tensor p_true, Tensor lse, Tensor prob)");
  m.def("collab_loss_backward(Tensor? grad_loss, Tensor? grad_ce, Tensor? grad_weights, Tensor? grad_p_true,"
        " Tensor logits, Tensor target, Tensor lse, Tensor prob, Tensor weights, Tensor p_true, float sigma,"
        " int reduction) -> Tensor");
  // ppd_logit, target_prob [M,B] (same dtype) -> softplus(s) - t*s, reduced.
  m.def("ppd_bce(Tensor ppd_logit, Tensor target_prob, int reduction) -> Tensor");
  m.def("ppd_bce_backward(Tensor grad, Tensor ppd_logit, Tensor target_prob, int reduction) -> Tensor");
  // In place over x_adv [M,B,...] (or [B,...]); x_nat is x_adv's shape or x_adv.shape[1:].
  m.def("sign_step_(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, float eps, float alpha, float lo,"
        " float hi) -> ()");
  m.def("random_start_(Tensor(a!) x_adv, Tensor x_nat, float eps, float lo, float hi, int seed) -> ()");
  // ppd_logit [M,B], logits [M,B,K] -> index [B] int64, chosen [B,K].
  m.def("collab_select(Tensor ppd_logit, Tensor logits) -> (Tensor index, Tensor chosen)");
  // check_index=False: the index is collab_select's own output (autograd's call), so always in
  // range; the CUDA kernel then skips the per-call check that synchronises the host.
  m.def("collab_select_backward(Tensor grad_chosen, Tensor index, int num_models, bool check_index=True)"
        " -> Tensor");
}

namespace {
bool has_cuda() {
#ifdef CDA2_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string build_info() {
  std::string s = "cda2_ext kernels: CPU";
#ifdef CDA2_WITH_CUDA
  s += " + CUDA";
#endif
  return s;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cda2_ext compiled operators (registered as torch.ops.cda2_ext.*)";
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled in");
  m.def("build_info", &build_info, "One line describing which backends were built");
}
