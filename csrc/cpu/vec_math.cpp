#include "cpu/vec_math.h"

#include <bit>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LONGNET_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LONGNET_TARGET_CLONES
#endif

namespace longnet::cpu {

// exp(x) for float, Cephes-style: 2^n * p(r) with x = n ln2 + r (about 1 ulp);
// -inf and values below -88 give 0.
static inline float exp_approx(float x) {
  x = x > -88.0f ? x : -88.0f;
  x = x < 88.0f ? x : 88.0f;
  // n = round(x / ln2): adding and removing 1.5 * 2^23 rounds to an integer.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n through the exponent bits; n = -127 gives 0 (the clamp's underflow).
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

// p[j] = exp(s[j] - m) for j < n; returns the sum.
LONGNET_TARGET_CLONES float exp_shift_sum(const float* s, float m, float* p, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_approx(s[j] - m);
    p[j] = e;
    sum += e;
  }
  return sum;
}

// Backward: p[j] = exp(s[j] - lse); ds[j] = p[j] * (dp[j] - delta).
LONGNET_TARGET_CLONES void softmax_grad_row(float* s, float* dp, float lse, float delta,
                                            int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float p = exp_approx(s[j] - lse);
    s[j] = p;
    dp[j] = p * (dp[j] - delta);
  }
}

// s[j] *= scale for j < n; returns the largest s[j] afterwards.
LONGNET_TARGET_CLONES float scale_and_max(float* s, float scale, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const float x = s[j] * scale;
    s[j] = x;
    m = m > x ? m : x;
  }
  return m;
}

// p[j] = exp(scale * s[j] - lse); ds[j] = scale * p[j] * (dp[j] - delta), in place.
LONGNET_TARGET_CLONES void softmax_grad_row_scaled(float* s, float* dp, float scale, float lse,
                                                   float delta, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float p = exp_approx(s[j] * scale - lse);
    s[j] = p;
    dp[j] = scale * p * (dp[j] - delta);
  }
}

// float -> bfloat16 bits, rounding to nearest even; NaN stays a (quiet) NaN.
static inline uint16_t bf16_bits(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return x != x ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
}

LONGNET_TARGET_CLONES void round_to_bf16(const float* s, int64_t n, int64_t n_pad, uint16_t* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = bf16_bits(s[j]);
  for (int64_t j = n; j < n_pad; ++j) out[j] = 0;
}

LONGNET_TARGET_CLONES void interleave_to_bf16(const float* s0, const float* s1, int64_t n,
                                              uint16_t* out) {
  if (s1 == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[2 * j] = bf16_bits(s0[j]);
      out[2 * j + 1] = 0;
    }
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[2 * j] = bf16_bits(s0[j]);
    out[2 * j + 1] = bf16_bits(s1[j]);
  }
}

}  // namespace longnet::cpu
