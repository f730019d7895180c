// Row-wise softmax helpers for the CPU kernels: a vectorisable exp for float
// (a degree-5 polynomial after range reduction, about 2 ulp) and the loops that use
// it. The float loops (vec_math.cpp) are compiled for AVX-512, AVX2 and baseline
// x86-64 and picked at load time.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace longnet::cpu {

// exp(r) ~ 1 + r (C1 + r (C2 + r (C3 + r (C4 + r C5)))) for |r| <= ln2 / 2: the
// minimax fit in relative error (9e-8), shared by the portable and AVX-512 passes.
inline constexpr float kExpC1 = 0.9999997020f;
inline constexpr float kExpC2 = 0.4999915063f;
inline constexpr float kExpC3 = 0.1666763574f;
inline constexpr float kExpC4 = 0.04189793020f;
inline constexpr float kExpC5 = 0.008290313184f;

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

// Backward with the logits' scale: p[j] = exp(scale s[j] - lse); ds[j] = scale p[j]
// (dp[j] - delta), in place.
void softmax_grad_row_scaled(float* s, float* dp, float scale, float lse, float delta, int64_t n);

// out[j] = bfloat16(s[j]) (bits, round to nearest even) for j < n, 0 up to n_pad.
void round_to_bf16(const float* s, int64_t n, int64_t n_pad, uint16_t* out);
// out[2 j] = bfloat16(s0[j]), out[2 j + 1] = bfloat16(s1[j]) (0 when s1 is null).
void interleave_to_bf16(const float* s0, const float* s1, int64_t n, uint16_t* out);

// max_j scale * s[j] for j < n (-inf for n = 0); s is only read.
float scaled_max(const float* s, float scale, int64_t n);
// p[j] = exp(scale * s[j] - m) for j < n (p may be s); returns the sum.
float exp_scaled_sum(const float* s, float scale, float m, float* p, int64_t n);
// The same written as bfloat16 bits (round to nearest even), zeros from n up to n_pad;
// returns the sum of the values before rounding.
float exp_scaled_sum_bf16(const float* s, float scale, float m, uint16_t* p, int64_t n,
                          int64_t n_pad);

// Two query rows of the backward for bfloat16 products. Row t has scores s[t], dP
// values dp[t], its lse and Delta, and keys j < valid[t] (0: none, e.g. an absent row
// or a row with lse = -inf); s and dp must be readable for n values even then.
struct GradRowPair {
  const float* s[2];
  const float* dp[2];
  float lse[2];
  float delta[2];
  int64_t valid[2];
};
// For j < n: P = exp(scale s - lse) and dS = scale P (dp - Delta) where j < valid (0
// after), rounded to bfloat16 (bits) and written pair-interleaved, p_pairs[2 j + t] and
// ds_pairs[2 j + t]; with ds_rows, dS also as rows ds_rows[t * ld_rows + j] for the
// `rows` (1 or 2) rows, zeros for n <= j < n_pad.
void softmax_grad_pair_bf16(const GradRowPair& g, float scale, int64_t n, uint16_t* p_pairs,
                            uint16_t* ds_pairs, uint16_t* ds_rows, int64_t ld_rows, int64_t rows,
                            int64_t n_pad);

// Which code a call starting now runs the two bfloat16 passes above with:
// "avx512-bf16" (vec_math_avx512.cpp) or "portable" (the compiler's clones for
// AVX-512, AVX2 and baseline x86-64).
const char* bf16_row_pass();

// out[2 j] = in0[j], out[2 j + 1] = in1[j] (0 when in1 is null), 16-bit values.
void interleave_bits16(const uint16_t* in0, const uint16_t* in1, int64_t n, uint16_t* out);

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
