// Scalar math shared by the CPU and CUDA kernels. No torch headers: plain nvcc and g++ compile
// this file on their own, which is how CI compile-checks the kernels without a GPU.
#pragma once

#include <cstdint>
#include <cmath>
#include <math.h>

#if defined(__CUDACC__)
#define CDA2_HD __host__ __device__ __forceinline__
#else
#define CDA2_HD inline
#endif

namespace cda2 {

// Reduction codes, equal to at::Reduction so Python can pass ints straight through.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// ---- counter-based uniform noise -------------------------------------------------------------
// u(seed, i) in [0, 1) on a 2^-24 grid. A stateless hash of (seed, i) instead of a generator
// stream: every element's noise is independent of how the work is split across threads, blocks
// or devices, so CPU, CUDA and the plain-PyTorch twin (cda2_ext/ops/reference.py, hash_uniform)
// agree bit for bit. Constants are below 2^31 so the Python twin's int64 products never wrap.
CDA2_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x045D9F3Bu;
  x ^= x >> 16;
  return x;
}

CDA2_HD float hash_uniform(uint64_t seed, uint64_t i) {
  uint32_t h = mix32(static_cast<uint32_t>(i) ^ static_cast<uint32_t>(seed));
  h = mix32(h ^ static_cast<uint32_t>(i >> 32) ^ static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(h >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

// ---- torch-compatible elementwise pieces -----------------------------------------------------
// These mirror torch.sign / torch.maximum / torch.minimum / torch.clamp exactly, NaN included
// (a NaN gradient does not move x; a NaN x or x_nat stays NaN),
// so the fused step is bit-identical to the reference (no fused multiply-add is possible: every
// operation below rounds once and alpha * sign is exact).
// Each is a chain of plain selects (no nested || on NaN tests inside a ternary) so that g++
// if-converts and vectorises the CPU loops.
template <typename T>
CDA2_HD T sign_of(T g) {  // 1, -1, and 0 for +-0 and NaN, as torch.sign does in torch 2.13
  const T s = g > T(0) ? T(1) : T(0);
  return g < T(0) ? T(-1) : s;
}

template <typename T>
CDA2_HD T max_nan(T v, T a) {  // torch.maximum: NaN if either is NaN
  v = v < a ? a : v;
  return a != a ? a : v;
}

template <typename T>
CDA2_HD T min_nan(T v, T b) {  // torch.minimum
  v = v > b ? b : v;
  return b != b ? b : v;
}

template <typename T>
CDA2_HD T clamp_nan(T v, T lo, T hi) {  // torch.clamp with non-NaN bounds: NaN stays NaN
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// One projected sign step for one element (x0 already broadcast by the caller).
// Computed in T (float or double); half types call it with T = float and round once at the end.
template <typename T>
CDA2_HD T sign_step(T x, T g, T x0, T eps, T alpha, T lo, T hi) {
  T v = x + alpha * sign_of(g);
  v = min_nan(max_nan(v, x0 - eps), x0 + eps);
  return clamp_nan(v, lo, hi);
}

// Random start for one element: clamp(x0 + (2u - 1) * eps, lo, hi), rounded step by step as the
// reference does (u*2 and -1 are exact; the product and the sum each round once).
template <typename T>
CDA2_HD T random_start(T x0, T u, T eps, T lo, T hi) {
  T noise = (u * T(2) - T(1)) * eps;
  return clamp_nan(x0 + noise, lo, hi);
}

// ---- stable scalar pieces for the losses ----------------------------------------------------
// Overloads so float math stays in float (expf is several times cheaper than exp on the host).
CDA2_HD float exp_t(float x) { return expf(x); }
CDA2_HD double exp_t(double x) { return exp(x); }
CDA2_HD float log_t(float x) { return logf(x); }
CDA2_HD double log_t(double x) { return log(x); }
CDA2_HD float log1p_t(float x) { return log1pf(x); }
CDA2_HD double log1p_t(double x) { return log1p(x); }

// softplus(s) = log(1 + e^s) without overflow for large |s|.
template <typename T>
CDA2_HD T softplus(T s) {
  return s > T(0) ? s + log1p_t(exp_t(-s)) : log1p_t(exp_t(s));
}

template <typename T>
CDA2_HD T sigmoid(T s) {
  if (s >= T(0)) return T(1) / (T(1) + exp_t(-s));
  T e = exp_t(s);
  return e / (T(1) + e);
}

}  // namespace cda2
