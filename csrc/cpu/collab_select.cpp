// CPU kernels of collaborative selection (Algorithm 2): argmax over the M PPD scores of each
// sample, gather of the chosen sub-model's logits, and the scatter that is its gradient.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

namespace cda2 {
namespace {

constexpr int64_t kGrainElems = 32768;  // elements per parallel chunk (at::internal::GRAIN_SIZE)

std::tuple<at::Tensor, at::Tensor> collab_select_cpu(const at::Tensor& ppd_logit, const at::Tensor& logits) {
  check_select(ppd_logit, logits);
  const auto s = ppd_logit.contiguous(), z = logits.contiguous();
  const int64_t M = z.size(0), B = z.size(1), K = z.size(2);
  auto index = at::empty({B}, s.options().dtype(at::kLong));
  auto chosen = at::empty({B, K}, z.options());
  int64_t* ip = index.data_ptr<int64_t>();
  // Both loops run over samples in parallel; the argmax reads M strided scores per sample, the
  // gather copies K contiguous logits, so each gets a grain of ~32k elements read.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "collab_select_argmax", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / M), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        // torch.argmax's rules: the first maximum wins and NaN beats every number.
        int64_t best = 0;
        scalar_t bv = sp[b];
        for (int64_t m = 1; m < M && !(bv != bv); ++m) {
          const scalar_t v = sp[m * B + b];
          if (v > bv || v != v) best = m, bv = v;
        }
        ip[b] = best;
      }
    });
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "collab_select_gather", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* cp = chosen.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / K), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) std::copy_n(zp + (ip[b] * B + b) * K, K, cp + b * K);
    });
  });
  return {index, chosen};
}

at::Tensor collab_select_backward_cpu(const at::Tensor& grad_chosen, const at::Tensor& index, int64_t num_models,
                                      bool check_index) {
  (void)check_index;  // always checked here: the kernel writes through the index (and it costs no sync)
  check_select_backward(grad_chosen, index, num_models);
  const auto g = grad_chosen.contiguous(), idx = index.contiguous();
  check_in_range_cpu(idx, num_models, "index", "entries");
  const int64_t B = g.size(0), K = g.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  auto out = at::zeros({num_models, B, K}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "collab_select_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / K), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) std::copy_n(gp + b * K, K, op + (ip[b] * B + b) * K);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cda2_ext, CPU, m) {
  m.impl("collab_select", &collab_select_cpu);
  m.impl("collab_select_backward", &collab_select_backward_cpu);
}

}  // namespace cda2
