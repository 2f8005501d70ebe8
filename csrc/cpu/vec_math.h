// CPU-only helpers that let g++ auto-vectorise the hot row loops.
//
// Why not at::vec::Vectorized? An extension is compiled once with baseline flags, so ATen's
// vector classes fall back to scalar code here, and libm's expf does not vectorise. Instead the
// row loops are plain C++ written so g++ vectorises them (`#pragma omp simd` with -fopenmp-simd,
// branch-free bodies), and CDA2_CPU_CLONES asks for an AVX2+FMA copy of each hot function next to
// the baseline one, picked at load time by the CPU it runs on (GCC function multi-versioning).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CDA2_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CDA2_CPU_CLONES
#endif

// Row helpers must inline into the cloned function that calls them to get its instruction set.
#if defined(__GNUC__)
#define CDA2_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CDA2_ALWAYS_INLINE inline
#endif

namespace cda2 {
namespace cpu {

// a * b + c, fused where the caller is compiled for FMA (kFma: see collab_loss.cpp's dispatch).
// The build disables automatic contraction (-ffp-contract=off), so this is the only place FMAs
// appear: inside the exp/log polynomials, where they only add accuracy.
template <bool kFma>
CDA2_ALWAYS_INLINE float madd(float a, float b, float c) {
  if constexpr (kFma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

// exp(x) for float in ~1.5 ulp, branch-free so loops of it vectorise (Cephes expf polynomial
// after the usual 2^n * e^r range reduction; n is rounded with the 1.5 * 2^23 trick, which needs
// no SSE4.1 round instruction in the baseline clone). Underflows to exactly 0 below -87.3, where
// softmax entries stop mattering; callers pass x - max, so overflow is never reached.
template <bool kFma = false>
CDA2_ALWAYS_INLINE float exp_f(float x) {
  const float lo = -87.33654475f, hi = 88.3762626647949f, magic = 12582912.0f;  // 1.5 * 2^23
  const bool under = x < lo;
  x = x < lo ? lo : (x > hi ? hi : x);
  const float t = madd<kFma>(x, 1.44269504088896341f, magic);  // low bits of t: round(x / ln 2)
  const float n = t - magic;
  float r = madd<kFma>(n, -0.693359375f, x);
  r = madd<kFma>(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = madd<kFma>(p, r, 1.3981999507e-3f);
  p = madd<kFma>(p, r, 8.3334519073e-3f);
  p = madd<kFma>(p, r, 4.1665795894e-2f);
  p = madd<kFma>(p, r, 1.6666665459e-1f);
  p = madd<kFma>(p, r, 5.0000001201e-1f);
  p = madd<kFma>(p, r * r, r) + 1.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  const int32_t bits = (ti - 0x4B400000 + 127) << 23;  // 2^n as a float's exponent field
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return under ? 0.0f : p * scale;
}

template <bool kFma = false>
CDA2_ALWAYS_INLINE double exp_f(double x) { return std::exp(x); }

// log(x) for float in ~1 ulp, branch-free (Cephes logf polynomial on the mantissa). For the
// values it serves -- sums of exps, >= 1 -- it needs no zero/negative/denormal handling;
// NaN and +inf pass through.
template <bool kFma = false>
CDA2_ALWAYS_INLINE float log_f(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = madd<kFma>(y, m, -1.1514610310e-1f);
  y = madd<kFma>(y, m, 1.1676998740e-1f);
  y = madd<kFma>(y, m, -1.2420140846e-1f);
  y = madd<kFma>(y, m, 1.4249322787e-1f);
  y = madd<kFma>(y, m, -1.6668057665e-1f);
  y = madd<kFma>(y, m, 2.0000714765e-1f);
  y = madd<kFma>(y, m, -2.4999993993e-1f);
  y = madd<kFma>(y, m, 3.3333331174e-1f);
  y = y * m * z;
  y = madd<kFma>(e, -2.12194440e-4f, y);
  y = madd<kFma>(-0.5f, z, y);
  const float r = madd<kFma>(e, 0.693359375f, m + y);
  return (x != x || x > 3.4e38f) ? x : r;
}

template <bool kFma = false>
CDA2_ALWAYS_INLINE double log_f(double x) { return std::log(x); }

// max over a row. NaNs need no special care here: a NaN logit turns exp(z - max) and so the row's
// sum into NaN, which is what torch's log_softmax gives too (and a flag would stop vectorisation).
template <typename T>
CDA2_ALWAYS_INLINE T row_max(const T* z, int64_t K) {
  T m = z[0];
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < K; ++k) m = z[k] > m ? z[k] : m;
  return m;
}

// sum_k exp(z[k] - mx); with out, also stores each exp(z[k] - mx) there.
template <bool kFma = false, typename T>
CDA2_ALWAYS_INLINE T row_sum_exp(const T* z, int64_t K, T mx, T* out = nullptr) {
  T s = 0;
  if (out) {
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) {
      out[k] = exp_f<kFma>(z[k] - mx);
      s += out[k];
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += exp_f<kFma>(z[k] - mx);
  }
  return s;
}

// out[k] = g * exp((z[k] - hi) - lo)
template <bool kFma = false, typename T>
CDA2_ALWAYS_INLINE void row_scaled_exp(const T* z, int64_t K, T g, T hi, T lo, T* out) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) out[k] = g * exp_f<kFma>((z[k] - hi) - lo);
}

}  // namespace cpu
}  // namespace cda2
