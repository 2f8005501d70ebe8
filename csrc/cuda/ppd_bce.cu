// CUDA glue of the PPD-head BCE. Kernels: csrc/torch_free/ppd_bce.cuh; CPU twin: csrc/cpu/ppd_bce.cpp.
#include <torch/library.h>

#include "../checks.h"
#include "../torch_free/ppd_bce.cuh"
#include "glue.h"

namespace cda2 {
namespace {

using glue::cptr;
using glue::cuda_t;
using glue::mptr;

at::Tensor ppd_bce_cuda(const at::Tensor& ppd_logit, const at::Tensor& target_prob, int64_t reduction) {
  check_ppd_bce(ppd_logit, target_prob, reduction);
  const c10::cuda::CUDAGuard guard(ppd_logit.device());
  const auto s = ppd_logit.contiguous(), t = target_prob.contiguous();
  const auto opts = s.options().dtype(stat_type(s.scalar_type()));
  const int64_t n = s.numel();
  auto out = reduction == kNone ? at::empty(s.sizes(), opts) : at::empty({}, opts);
  at::Tensor partials;
  if (reduction != kNone) partials = at::empty({gpu::kPpdMaxBlocks}, opts);
  const cudaStream_t stream = glue::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "ppd_bce_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using S = gpu::acc_t<T>;
    C10_CUDA_CHECK(gpu::launch_ppd_bce_forward<T>(cptr<T>(s), cptr<T>(t), n, reduction, mptr<S>(out),
                                                  partials.defined() ? mptr<S>(partials) : nullptr, stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor ppd_bce_backward_cuda(const at::Tensor& grad, const at::Tensor& ppd_logit, const at::Tensor& target_prob,
                                 int64_t reduction) {
  check_ppd_bce_backward(grad, ppd_logit, target_prob, reduction);
  const bool per_elem = reduction == kNone;
  const c10::cuda::CUDAGuard guard(ppd_logit.device());
  const auto s = ppd_logit.contiguous(), t = target_prob.contiguous(), g = grad.contiguous();
  auto ds = at::empty(s.sizes(), s.options());
  const cudaStream_t stream = glue::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "ppd_bce_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using S = gpu::acc_t<T>;
    C10_CUDA_CHECK(gpu::launch_ppd_bce_backward<T>(cptr<S>(g), per_elem, cptr<T>(s), cptr<T>(t), s.numel(), reduction,
                                                   mptr<T>(ds), stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ds;
}

}  // namespace

TORCH_LIBRARY_IMPL(cda2_ext, CUDA, m) {
  m.impl("ppd_bce", &ppd_bce_cuda);
  m.impl("ppd_bce_backward", &ppd_bce_backward_cuda);
}

}  // namespace cda2
