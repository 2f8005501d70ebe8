// CUDA glue of the PGD pieces (projected sign step, random start), in place on x_adv.
// Kernels: csrc/torch_free/sign_step.cuh; CPU twin: csrc/cpu/sign_step.cpp.
#include <torch/library.h>

#include "../checks.h"
#include "../torch_free/sign_step.cuh"
#include "glue.h"

namespace cda2 {
namespace {

using glue::cptr;
using glue::cuda_t;
using glue::mptr;

void sign_step_cuda(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat, double eps, double alpha,
                    double lo, double hi) {
  check_sign_step(x_adv, grad, x_nat, eps, alpha, lo, hi);
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const auto g = grad.contiguous(), x0 = x_nat.contiguous();
  const int64_t n0 = x0.numel(), reps = x_adv.numel() / n0;
  const cudaStream_t stream = glue::current_stream();
  with_contiguous(x_adv, [&](at::Tensor& x) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sign_step_cuda", [&] {
      using T = cuda_t<scalar_t>;
      C10_CUDA_CHECK(
          gpu::launch_sign_step<T>(mptr<T>(x), cptr<T>(g), cptr<T>(x0), n0, reps, eps, alpha, lo, hi, stream));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void random_start_cuda(at::Tensor& x_adv, const at::Tensor& x_nat, double eps, double lo, double hi, int64_t seed) {
  check_random_start(x_adv, x_nat, eps, lo, hi);
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const auto x0 = x_nat.contiguous();
  const int64_t n0 = x0.numel(), reps = x_adv.numel() / n0;
  const cudaStream_t stream = glue::current_stream();
  with_contiguous(x_adv, [&](at::Tensor& x) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "random_start_cuda", [&] {
      using T = cuda_t<scalar_t>;
      C10_CUDA_CHECK(gpu::launch_random_start<T>(mptr<T>(x), cptr<T>(x0), n0, reps, eps, lo, hi, seed, stream));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cda2_ext, CUDA, m) {
  m.impl("sign_step_", &sign_step_cuda);
  m.impl("random_start_", &random_start_cuda);
}

}  // namespace cda2
