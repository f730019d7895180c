// Row-wise softmax helpers for the CPU kernels: a vectorisable exp for float
// (Cephes-style polynomial, about 1 ulp) and the loops that use it. The float
// loops (vec_math.cpp) are compiled for AVX-512, AVX2 and baseline x86-64 and
// picked at load time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace longnet::cpu {

inline float exp_approx(float x) {
  x = x < -88.0f ? -88.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
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
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return p * pow2n;
}

inline double exp_approx(double x) { return std::exp(x); }

// p[j] = exp(s[j] - m) for j < n; returns the sum.
float exp_shift_sum(const float* s, float m, float* p, int64_t n);

inline double exp_shift_sum(const double* s, double m, double* p, int64_t n) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double e = std::exp(s[j] - m);
    p[j] = e;
    sum += e;
  }
  return sum;
}

// Backward: p[j] = exp(s[j] - lse); ds[j] = p[j] * (dp[j] - delta), in place.
void softmax_grad_row(float* s, float* dp, float lse, float delta, int64_t n);

inline void softmax_grad_row(double* s, double* dp, double lse, double delta, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const double p = std::exp(s[j] - lse);
    s[j] = p;
    dp[j] = p * (dp[j] - delta);
  }
}

template <typename T>
inline T row_max(const T* s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

template <typename T>
inline void scale_row(T* x, T a, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

template <typename T>
inline void fill_row(T* x, T value, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = value;
}

}  // namespace longnet::cpu
