#include "cpu/vec_math.h"

#include <bit>
#include <cmath>
#include <cstdint>

#include "cpu/vec_math_avx512.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LONGNET_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LONGNET_TARGET_CLONES
#endif

namespace longnet::cpu {

// exp(x) for float: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2 (ln2 split in two
// so that n * ln2 loses nothing), p the degree-5 polynomial closest to exp in relative
// error on that interval (a minimax fit: 9e-8 in exact arithmetic, 1.6e-7 at most
// evaluated in float32 with FMA, about 2 ulp); -inf and values below -88 give 0.
static inline float exp_approx(float x) {
  x = x > -88.0f ? x : -88.0f;
  x = x < 88.0f ? x : 88.0f;
  // n = round(x / ln2): adding and removing 1.5 * 2^23 rounds to an integer.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = kExpC5;
  p = p * r + kExpC4;
  p = p * r + kExpC3;
  p = p * r + kExpC2;
  p = p * r + kExpC1;
  p = p * r + 1.0f;
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

LONGNET_TARGET_CLONES float scaled_max(const float* s, float scale, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const float x = s[j] * scale;
    m = m > x ? m : x;
  }
  return m;
}

LONGNET_TARGET_CLONES float exp_scaled_sum(const float* s, float scale, float m, float* p,
                                           int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_approx(s[j] * scale - m);
    p[j] = e;
    sum += e;
  }
  return sum;
}

namespace {

LONGNET_TARGET_CLONES float exp_scaled_sum_bf16_portable(const float* s, float scale, float m,
                                                         uint16_t* p, int64_t n, int64_t n_pad) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_approx(s[j] * scale - m);
    p[j] = bf16_bits(e);
    sum += e;
  }
  for (int64_t j = n; j < n_pad; ++j) p[j] = 0;
  return sum;
}

LONGNET_TARGET_CLONES void softmax_grad_pair_bf16_portable(const GradRowPair& g, float scale,
                                                           int64_t n, uint16_t* p_pairs,
                                                           uint16_t* ds_pairs, uint16_t* ds_rows,
                                                           int64_t ld_rows, int64_t rows,
                                                           int64_t n_pad) {
  const float *s0 = g.s[0], *s1 = g.s[1], *dp0 = g.dp[0], *dp1 = g.dp[1];
  const float lse0 = g.lse[0], lse1 = g.lse[1], delta0 = g.delta[0], delta1 = g.delta[1];
  const int64_t valid0 = g.valid[0], valid1 = g.valid[1];
  uint16_t* row0 = ds_rows;
  uint16_t* row1 = ds_rows != nullptr && rows > 1 ? ds_rows + ld_rows : nullptr;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float e0 = exp_approx(s0[j] * scale - lse0);
    const float e1 = exp_approx(s1[j] * scale - lse1);
    const float p0 = j < valid0 ? e0 : 0.0f;
    const float p1 = j < valid1 ? e1 : 0.0f;
    const float d0 = j < valid0 ? scale * e0 * (dp0[j] - delta0) : 0.0f;
    const float d1 = j < valid1 ? scale * e1 * (dp1[j] - delta1) : 0.0f;
    p_pairs[2 * j] = bf16_bits(p0);
    p_pairs[2 * j + 1] = bf16_bits(p1);
    ds_pairs[2 * j] = bf16_bits(d0);
    ds_pairs[2 * j + 1] = bf16_bits(d1);
  }
  // The row form of dS reads back the rounded pairs (the same bits).
  for (int64_t t = 0; t < 2; ++t) {
    uint16_t* row = t == 0 ? row0 : row1;
    if (row == nullptr) continue;
    const uint16_t* src = ds_pairs + t;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = src[2 * j];
    for (int64_t j = n; j < n_pad; ++j) row[j] = 0;
  }
}

}  // namespace

float exp_scaled_sum_bf16(const float* s, float scale, float m, uint16_t* p, int64_t n,
                          int64_t n_pad) {
  if (avx512_bf16_rows()) return exp_scaled_sum_bf16_avx512(s, scale, m, p, n, n_pad);
  return exp_scaled_sum_bf16_portable(s, scale, m, p, n, n_pad);
}

void softmax_grad_pair_bf16(const GradRowPair& g, float scale, int64_t n, uint16_t* p_pairs,
                            uint16_t* ds_pairs, uint16_t* ds_rows, int64_t ld_rows, int64_t rows,
                            int64_t n_pad) {
  if (avx512_bf16_rows()) {
    softmax_grad_pair_bf16_avx512(g, scale, n, p_pairs, ds_pairs, ds_rows, ld_rows, rows, n_pad);
  } else {
    softmax_grad_pair_bf16_portable(g, scale, n, p_pairs, ds_pairs, ds_rows, ld_rows, rows, n_pad);
  }
}

const char* bf16_row_pass() { return choose_bf16_row_pass() ? "avx512-bf16" : "portable"; }

LONGNET_TARGET_CLONES void interleave_bits16(const uint16_t* in0, const uint16_t* in1, int64_t n,
                                             uint16_t* out) {
  if (in1 == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[2 * j] = in0[j];
      out[2 * j + 1] = 0;
    }
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[2 * j] = in0[j];
    out[2 * j + 1] = in1[j];
  }
}

}  // namespace longnet::cpu
