// CUDA glue of the collaboration loss: checks, contiguous inputs, outputs, launch on the current
// stream. The kernels are csrc/kernels/collab_loss.cuh; the CPU twin is csrc/cpu/collab_loss.cpp.
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../kernels/collab_loss.cuh"
#include "glue.h"

namespace cda2 {
namespace {

using glue::cptr;
using glue::cuda_t;
using glue::mptr;

// Labels in [0, K), read on the device: one tiny kernel and a copy of two int64s back, before any
// kernel touches the logits. The copy synchronises the stream (the price of raising ValueError).
void check_labels_cuda(const at::Tensor& y, int64_t K, cudaStream_t stream) {
  const int64_t B = y.numel();
  auto result = at::empty({2}, y.options());
  C10_CUDA_CHECK(gpu::launch_label_check(y.data_ptr<int64_t>(), B, K, result.data_ptr<int64_t>(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int64_t host[2] = {B, 0};
  C10_CUDA_CHECK(cudaMemcpyAsync(host, result.data_ptr<int64_t>(), sizeof(host), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  TORCH_CHECK_VALUE(host[0] >= B, "target: labels must lie in [0, ", K, "), found ", host[1], " at index ", host[0]);
}

// prob is always returned empty ([0]) on CUDA, whatever save_prob says: there the backward is
// bandwidth-bound, and recomputing exp(z - lse) from z costs one read of z, while a saved softmax
// costs a write of [M, B, K] in the forward and the same read in the backward (4 passes over
// M*B*K instead of 3). The fake kernel in cda2_ext/ops.py must mirror this for CUDA tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> collab_loss_cuda(
    const at::Tensor& logits, const at::Tensor& target, double sigma, int64_t reduction, bool save_prob) {
  (void)save_prob;
  check_collab_loss(logits, target, sigma, reduction);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto z = logits.contiguous();
  const auto y = target.contiguous();
  const int64_t M = z.size(0), B = z.size(1), K = z.size(2);
  const cudaStream_t stream = glue::current_stream();
  check_labels_cuda(y, K, stream);
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

// Labels are not re-read on the host here (that would cost a second synchronisation per step):
// the forward that produced lse checked them, and the kernel never indexes memory with a label
// (an out-of-range one only never matches k), so any input stays in bounds.
at::Tensor collab_loss_backward_cuda(const std::optional<at::Tensor>& grad_loss,
                                     const std::optional<at::Tensor>& grad_ce,
                                     const std::optional<at::Tensor>& grad_weights,
                                     const std::optional<at::Tensor>& grad_p_true, const at::Tensor& logits,
                                     const at::Tensor& target, const at::Tensor& lse, const at::Tensor& prob,
                                     const at::Tensor& weights, const at::Tensor& p_true, double sigma,
                                     int64_t reduction) {
  // A saved softmax (only a CPU forward makes one) is checked, then not used: the gradient is
  // recomputed from z and lse, which reads as many bytes.
  const auto g = check_collab_loss_backward(grad_loss, grad_ce, grad_weights, grad_p_true, logits, target, lse,
                                            prob, weights, p_true, sigma, reduction);
  const int64_t M = logits.size(0), B = logits.size(1), K = logits.size(2);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto z = logits.contiguous();
  const auto y = target.contiguous();
  const auto l = lse.contiguous(), w = weights.contiguous(), p = p_true.contiguous();
  auto dz = at::empty({M, B, K}, z.options());
  const cudaStream_t stream = glue::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "collab_loss_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using S = gpu::acc_t<T>;
    const auto opt_ptr = [](const at::Tensor& t) { return t.defined() ? cptr<S>(t) : nullptr; };
    C10_CUDA_CHECK(gpu::launch_collab_loss_backward<T>(
        opt_ptr(g.loss), reduction == kNone, opt_ptr(g.ce), opt_ptr(g.weights), opt_ptr(g.p_true), cptr<T>(z), y.data_ptr<int64_t>(),
        l.data_ptr<double>(), cptr<S>(w), cptr<S>(p), M, B, K, sigma, reduction, mptr<T>(dz), stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(cda2_ext, CUDA, m) {
  m.impl("collab_loss", &collab_loss_cuda);
  m.impl("collab_loss_backward", &collab_loss_backward_cuda);
}

}  // namespace cda2
