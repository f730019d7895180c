// The bfloat16 row passes of vec_math.cpp written for AVX-512 with the BF16
// extension: 16 floats a register, and the hardware conversion (vcvtneps2bf16,
// round to nearest even) instead of integer rounding on 256-bit registers, which is
// all the compiler's own clones manage around 16-bit stores. The same polynomial and
// clamps as the portable loops; the results differ from theirs by FMA contraction and
// the order of the row sums (float32 ulps before rounding) and, at the lower clamp, by
// 2^n (vscalefps gives a float32 subnormal where the portable exponent bits give 0);
// the hardware conversion flushes values below 2^-126 (bfloat16 subnormals) to zero.
#include "cpu/vec_math_avx512.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// GCC 12's AVX-512 headers build some intrinsics on a deliberately undefined vector
// (`__Y`), which -Wuninitialized reports where they are inlined (GCC bug 105593).
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define LONGNET_AVX512_BF16_BUILD 1
#define LONGNET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define LONGNET_AVX512_BF16_BUILD 0
#endif

namespace longnet::cpu {

#if LONGNET_AVX512_BF16_BUILD
namespace {

// exp_approx of vec_math.cpp, 16 lanes: 2^n * p(r) with x = n ln2 + r; inputs clamped
// to [-88, 88] (NaN and -inf give the lower clamp). 2^n is applied by vscalefps: at
// the lower clamp (n = -127) that gives a float32 subnormal (about 6e-39) where the
// exponent bits of the portable loops give 0, below bfloat16's range and nothing
// against a row sum of at least 1.
LONGNET_AVX512_BF16 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(kExpC5);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Lanes j with j < count (count may exceed 16).
LONGNET_AVX512_BF16 inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}
LONGNET_AVX512_BF16 inline __mmask32 first_lanes32(int64_t count) {
  return count >= 32  ? __mmask32(0xffffffffu)
         : count <= 0 ? __mmask32(0)
                      : __mmask32((1u << count) - 1);
}

LONGNET_AVX512_BF16 inline __m256i to_bf16(__m512 x) {
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
}

// 32 bfloat16 values a[0], b[0], a[1], b[1], ... from 16 floats each.
LONGNET_AVX512_BF16 inline __m512i interleave_bf16(__m512 a, __m512 b) {
  // cvtne2ps: lanes 0-15 from the second operand, 16-31 from the first.
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, both);
}

LONGNET_AVX512_BF16 void zero_tail(uint16_t* p, int64_t from, int64_t to) {
  if (to > from) std::memset(p + from, 0, sizeof(uint16_t) * (to - from));
}

LONGNET_AVX512_BF16 float exp_scaled_sum_bf16_impl(const float* s, float scale, float m,
                                                   uint16_t* p, int64_t n, int64_t n_pad) {
  const __m512 vscale = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vscale, vm));
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bf16(e));
  }
  if (j < n) {
    const __mmask16 lanes = first_lanes(n - j);
    const __m512 x = _mm512_maskz_loadu_ps(lanes, s + j);
    const __m512 e = _mm512_maskz_mov_ps(lanes, exp16(_mm512_fmsub_ps(x, vscale, vm)));
    sum = _mm512_add_ps(sum, e);
    _mm256_mask_storeu_epi16(p + j, lanes, to_bf16(e));
  }
  zero_tail(p, n, n_pad);
  return _mm512_reduce_add_ps(sum);
}

LONGNET_AVX512_BF16 void softmax_grad_pair_bf16_impl(const GradRowPair& g, float scale, int64_t n,
                                                     uint16_t* p_pairs, uint16_t* ds_pairs,
                                                     uint16_t* ds_rows, int64_t ld_rows,
                                                     int64_t rows, int64_t n_pad) {
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 lse0 = _mm512_set1_ps(g.lse[0]), lse1 = _mm512_set1_ps(g.lse[1]);
  const __m512 delta0 = _mm512_set1_ps(g.delta[0]), delta1 = _mm512_set1_ps(g.delta[1]);
  uint16_t* row0 = ds_rows;
  uint16_t* row1 = ds_rows != nullptr && rows > 1 ? ds_rows + ld_rows : nullptr;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    const __mmask16 live0 = first_lanes(g.valid[0] - j) & lanes;
    const __mmask16 live1 = first_lanes(g.valid[1] - j) & lanes;
    const __m512 e0 =
        exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, g.s[0] + j), vscale, lse0));
    const __m512 e1 =
        exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, g.s[1] + j), vscale, lse1));
    const __m512 dp0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, g.dp[0] + j), delta0);
    const __m512 dp1 = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, g.dp[1] + j), delta1);
    const __m512 p0 = _mm512_maskz_mov_ps(live0, e0);
    const __m512 p1 = _mm512_maskz_mov_ps(live1, e1);
    const __m512 d0 = _mm512_maskz_mul_ps(live0, _mm512_mul_ps(vscale, e0), dp0);
    const __m512 d1 = _mm512_maskz_mul_ps(live1, _mm512_mul_ps(vscale, e1), dp1);
    const __mmask32 pair_lanes = first_lanes32(2 * (n - j));
    _mm512_mask_storeu_epi16(p_pairs + 2 * j, pair_lanes, interleave_bf16(p0, p1));
    _mm512_mask_storeu_epi16(ds_pairs + 2 * j, pair_lanes, interleave_bf16(d0, d1));
    // The row form of dS: the same rounding of the same values, so the same bits.
    if (row0 != nullptr) _mm256_mask_storeu_epi16(row0 + j, lanes, to_bf16(d0));
    if (row1 != nullptr) _mm256_mask_storeu_epi16(row1 + j, lanes, to_bf16(d1));
  }
  if (row0 != nullptr) zero_tail(row0, n, n_pad);
  if (row1 != nullptr) zero_tail(row1, n, n_pad);
}

bool cpu_has_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

}  // namespace
#endif

namespace {
std::atomic<bool> g_avx512_bf16_rows{false};
}  // namespace

bool choose_bf16_row_pass() {
#if LONGNET_AVX512_BF16_BUILD
  static const bool supported = cpu_has_avx512_bf16();
  const char* env = std::getenv("LONGNET_CPU_AVX512");
  const bool use = supported && !(env != nullptr && std::strcmp(env, "0") == 0);
#else
  const bool use = false;
#endif
  g_avx512_bf16_rows.store(use, std::memory_order_relaxed);
  return use;
}

bool avx512_bf16_rows() { return g_avx512_bf16_rows.load(std::memory_order_relaxed); }

float exp_scaled_sum_bf16_avx512(const float* s, float scale, float m, uint16_t* p, int64_t n,
                                 int64_t n_pad) {
#if LONGNET_AVX512_BF16_BUILD
  return exp_scaled_sum_bf16_impl(s, scale, m, p, n, n_pad);
#else
  (void)s, (void)scale, (void)m, (void)p, (void)n, (void)n_pad;
  std::abort();
#endif
}

void softmax_grad_pair_bf16_avx512(const GradRowPair& g, float scale, int64_t n, uint16_t* p_pairs,
                                   uint16_t* ds_pairs, uint16_t* ds_rows, int64_t ld_rows,
                                   int64_t rows, int64_t n_pad) {
#if LONGNET_AVX512_BF16_BUILD
  softmax_grad_pair_bf16_impl(g, scale, n, p_pairs, ds_pairs, ds_rows, ld_rows, rows, n_pad);
#else
  (void)g, (void)scale, (void)n, (void)p_pairs, (void)ds_pairs, (void)ds_rows, (void)ld_rows,
      (void)rows, (void)n_pad;
  std::abort();
#endif
}

}  // namespace longnet::cpu
