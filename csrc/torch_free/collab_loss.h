// Per-sample math of the collaboration loss that does not depend on K: the soft-min over the M
// sub-models (Eq. 7) and the chain rule back to each sub-model's cross-entropy. Shared by the CPU
// and CUDA kernels; no torch headers.
#pragma once

#include "common.h"

namespace cda2 {

// Given ce[m * stride] for m < M: writes weights w = softmax_m(-ce / sigma) and p = exp(-ce) at
// the same offsets and returns L = -sigma * log sum_m exp(-ce / sigma).
// Subtracting the max keeps tiny sigma (1e-4) and huge ce finite; sigma -> 0 gives min_m ce.
template <typename T>
CDA2_HD T softmin_forward(const T* ce, T* w, T* p, int64_t M, int64_t stride, T sigma) {
  T amax = -ce[0] / sigma;
  for (int64_t m = 1; m < M; ++m) {
    const T a = -ce[m * stride] / sigma;
    amax = a > amax ? a : amax;
  }
  T s = 0;
  for (int64_t m = 0; m < M; ++m) {
    const T e = exp_t(-ce[m * stride] / sigma - amax);
    w[m * stride] = e;
    s += e;
  }
  for (int64_t m = 0; m < M; ++m) {
    w[m * stride] /= s;
    p[m * stride] = exp_t(-ce[m * stride]);
  }
  return -sigma * (amax + log_t(s));
}

// dLoss/dce[m] for one sample, given the upstream gradients of every output:
//   gL * w[m] + gce[m] - gp[m] * p[m] - (w[m] / sigma) * (gw[m] - sum_j gw[j] w[j]).
// The optional gradients may be null (treated as zero). `wgw` is sum_j gw[j] w[j] (0 if no gw).
template <typename T>
CDA2_HD T ce_grad(T gL, T w, T p, const T* gce, const T* gw, const T* gp, int64_t off, T wgw, T sigma) {
  T g = gL * w;
  if (gce) g += gce[off];
  if (gp) g -= gp[off] * p;
  if (gw) g -= (w / sigma) * (gw[off] - wgw);
  return g;
}

}  // namespace cda2
