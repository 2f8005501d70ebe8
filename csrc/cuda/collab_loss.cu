// CUDA glue of the collaboration loss: checks, contiguous inputs, outputs, launch on the current
// stream. The kernels are csrc/torch_free/collab_loss.cuh; the CPU twin is csrc/cpu/collab_loss.cpp.
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../torch_free/collab_loss.cuh"
#include "glue.h"

namespace cda2 {
namespace {

using glue::cptr;
using glue::cuda_t;
using glue::mptr;

// prob is always returned empty ([0]) on CUDA, whatever save_prob says: there the backward is
// bandwidth-bound, and recomputing exp(z - lse) from z costs one read of z, while a saved softmax
// costs a write of [M, B, K] in the forward and the same read in the backward (4 passes over
// M*B*K instead of 3). The fake kernel in cda2_ext/ops/__init__.py must mirror this for CUDA tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> collab_loss_cuda(
    const at::Tensor& logits, const at::Tensor& target, double sigma, int64_t reduction, bool save_prob,
    bool check_target) {
  (void)save_prob;
  check_collab_loss(logits, target, sigma, reduction);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto z = logits.contiguous();
  const auto y = target.contiguous();
  const int64_t M = z.size(0), B = z.size(1), K = z.size(2);
  const cudaStream_t stream = glue::current_stream();
  // Unchecked (check_target=False, labels the caller checked): no host sync; a bad label would
  // only give a NaN loss, as the kernel never indexes memory with one.
  if (check_target) glue::check_in_range_cuda(y, K, "target", "labels", stream);
  const auto opts = z.options().dtype(stat_type(z.scalar_type()));
  auto loss_vec = at::empty({B}, opts);
  auto loss = reduction == kNone ? loss_vec : at::empty({}, opts);
  auto ce = at::empty({M, B}, opts), w = at::empty({M, B}, opts), p = at::empty({M, B}, opts);
  auto lse = at::empty({M, B}, z.options().dtype(at::kDouble));
  auto prob = at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "collab_loss_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using S = gpu::acc_t<T>;
    C10_CUDA_CHECK(gpu::launch_collab_loss_forward<T>(
        cptr<T>(z), y.data_ptr<int64_t>(), M, B, K, sigma, reduction, mptr<S>(loss_vec),
        reduction == kNone ? nullptr : mptr<S>(loss), mptr<S>(ce), mptr<S>(w), mptr<S>(p), lse.data_ptr<double>(),
        stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, ce, w, p, lse, prob};
}

// Labels are not checked again here (that would cost a second synchronisation per step): the
// forward that produced lse checked them, and the kernel never indexes memory with a label (an
// out-of-range one only never matches k), so any input stays in bounds. A saved softmax (only a
// CPU forward makes one) was checked, and is not used: recomputing exp(z - lse) reads as many bytes.
at::Tensor collab_loss_backward_cuda(const CollabLossBackward& a) {
  const c10::cuda::CUDAGuard guard(a.logits.device());
  auto dz = at::empty({a.M, a.B, a.K}, a.logits.options());
  const cudaStream_t stream = glue::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.logits.scalar_type(), "collab_loss_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using S = gpu::acc_t<T>;
    const auto opt_ptr = [](const at::Tensor& t) { return t.defined() ? cptr<S>(t) : nullptr; };
    C10_CUDA_CHECK(gpu::launch_collab_loss_backward<T>(
        opt_ptr(a.grad_loss), a.reduction == kNone, opt_ptr(a.grad_ce), opt_ptr(a.grad_weights),
        opt_ptr(a.grad_p_true), cptr<T>(a.logits), a.target.data_ptr<int64_t>(), a.lse.data_ptr<double>(),
        cptr<S>(a.weights), cptr<S>(a.p_true), a.M, a.B, a.K, a.sigma, a.reduction, mptr<T>(dz), stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(cda2_ext, CUDA, m) {
  m.impl("collab_loss", &collab_loss_cuda);
  m.impl("collab_loss_backward", &collab_loss_backward_op<collab_loss_backward_cuda>);
}

}  // namespace cda2
