// Row-wise softmax helpers for the CPU kernels: a vectorisable exp for float
// (Cephes-style polynomial, about 1 ulp) and the loops that use it. The float
// loops (vec_math.cpp) are compiled for AVX-512, AVX2 and baseline x86-64 and
// picked at load time.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace longnet::cpu {

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

// s[j] *= scale for j < n; returns max_j s[j] (after scaling).
float scale_and_max(float* s, float scale, int64_t n);
// Backward with the logits' scale: p[j] = exp(scale s[j] - lse); ds[j] = scale p[j]
// (dp[j] - delta), in place.
void softmax_grad_row_scaled(float* s, float* dp, float scale, float lse, float delta, int64_t n);

// out[j] = bfloat16(s[j]) (bits, round to nearest even) for j < n, 0 up to n_pad.
void round_to_bf16(const float* s, int64_t n, int64_t n_pad, uint16_t* out);
// out[2 j] = bfloat16(s0[j]), out[2 j + 1] = bfloat16(s1[j]) (0 when s1 is null).
void interleave_to_bf16(const float* s0, const float* s1, int64_t n, uint16_t* out);

template <typename T>
inline T row_max(const T* s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = m > s[j] ? m : s[j];
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
