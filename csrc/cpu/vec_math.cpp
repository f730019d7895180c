#include "cpu/vec_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LONGNET_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define LONGNET_TARGET_CLONES
#endif

namespace longnet::cpu {

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

}  // namespace longnet::cpu
