// CUDA glue of collaborative selection (Algorithm 2) and its gradient.
// Kernels: csrc/torch_free/collab_select.cuh; CPU twin: csrc/cpu/collab_select.cpp.
#include <torch/library.h>

#include "../checks.h"
#include "../torch_free/collab_select.cuh"
#include "glue.h"

namespace cda2 {
namespace {

using glue::cptr;
using glue::cuda_t;
using glue::mptr;

std::tuple<at::Tensor, at::Tensor> collab_select_cuda(const at::Tensor& ppd_logit, const at::Tensor& logits) {
  check_select(ppd_logit, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto s = ppd_logit.contiguous(), z = logits.contiguous();
  const int64_t M = z.size(0), B = z.size(1), K = z.size(2);
  auto index = at::empty({B}, s.options().dtype(at::kLong));
  auto chosen = at::empty({B, K}, z.options());
  const cudaStream_t stream = glue::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "collab_select_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const T* zp = cptr<T>(z);
    T* cp = mptr<T>(chosen);
    // The scores keep their own dtype (converting them could create ties): a second dispatch.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "collab_select_cuda_scores", [&] {
      using P = cuda_t<scalar_t>;
      const cudaError_t err =
          gpu::launch_collab_select<T, P>(cptr<P>(s), zp, M, B, K, index.data_ptr<int64_t>(), cp, stream);
      C10_CUDA_CHECK(err);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {index, chosen};
}

// A bad index raises ValueError before the launch, as on the CPU: glue::check_in_range_cuda reads
// the index on the device and synchronises the stream once per call (the price of an error instead
// of a silently wrong gradient for a direct call; the collab_loss forward pays the same for labels
// it is not told were checked). Autograd's own call passes check_index=False and pays nothing.
at::Tensor collab_select_backward_cuda(const at::Tensor& grad_chosen, const at::Tensor& index, int64_t num_models,
                                       bool check_index) {
  check_select_backward(grad_chosen, index, num_models);
  const c10::cuda::CUDAGuard guard(grad_chosen.device());
  const auto g = grad_chosen.contiguous(), idx = index.contiguous();
  const cudaStream_t stream = glue::current_stream();
  // Autograd passes check_index=False (its index is the forward's argmax): no host sync. The
  // kernel writes every row and never indexes memory with an entry, so that is safe regardless.
  if (check_index) glue::check_in_range_cuda(idx, num_models, "index", "entries", stream);
  const int64_t B = g.size(0), K = g.size(1);
  auto out = at::empty({num_models, B, K}, g.options());  // the kernel writes every row (zeros or g)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "collab_select_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    C10_CUDA_CHECK(gpu::launch_collab_select_backward<T>(cptr<T>(g), idx.data_ptr<int64_t>(), num_models, B, K,
                                                         mptr<T>(out), stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cda2_ext, CUDA, m) {
  m.impl("collab_select", &collab_select_cuda);
  m.impl("collab_select_backward", &collab_select_backward_cuda);
}

}  // namespace cda2
