#include "cpu/blas.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

// Fortran BLAS entry points (LP64). Weak: resolved against the BLAS inside
// libtorch_cpu when it exports them, null otherwise.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

// fbgemm's transposes (16x16 AVX-512 / 8x8 AVX2 blocks, picked at run time), exported
// by libtorch_cpu on x86 builds with fbgemm; weak, so null elsewhere.
namespace fbgemm {
template <typename T>
void transpose_simd(int64_t M, int64_t N, const T* src, int64_t ld_src, T* dst, int64_t ld_dst);
template <>
void transpose_simd<float>(int64_t, int64_t, const float*, int64_t, float*, int64_t)
    __attribute__((weak));
template <>
void transpose_simd<uint16_t>(int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t)
    __attribute__((weak));
}  // namespace fbgemm

namespace longnet::cpu {
namespace {

template <typename T>
using fortran_gemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                                const T*, const T*, const int*, const T*, const int*, const T*, T*,
                                const int*);

template <typename T>
fortran_gemm_t<T> raw_fortran_gemm();
template <>
fortran_gemm_t<float> raw_fortran_gemm<float>() {
  return &sgemm_ ? sgemm_ : nullptr;
}
template <>
fortran_gemm_t<double> raw_fortran_gemm<double>() {
  return &dgemm_ ? dgemm_ : nullptr;
}

bool blas_disabled_by_env() {
  const char* env = std::getenv("LONGNET_CPU_BLAS");
  return env != nullptr && std::strcmp(env, "0") == 0;
}

// Portable loops, used when no BLAS is found. Accumulate in T.
template <typename T>
void portable_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    const T* ai = a + i * lda;
    T* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) {
      const T* bj = b + j * ldb;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t p = 0; p < k; ++p) sum += ai[p] * bj[p];
      ci[j] = alpha * sum + (beta == T(0) ? T(0) : beta * ci[j]);
    }
  }
}

template <typename T>
void scale_rows(int64_t m, int64_t n, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < n; ++j) ci[j] = T(0);
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) ci[j] *= beta;
    }
  }
}

template <typename T>
void portable_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T beta, T* c, int64_t ldc) {
  scale_rows(m, n, beta, c, ldc);
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    for (int64_t p = 0; p < k; ++p) {
      const T aip = alpha * a[i * lda + p];
      if (aip == T(0)) continue;
      const T* bp = b + p * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += aip * bp[j];
    }
  }
}

template <typename T>
void portable_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T beta, T* c, int64_t ldc) {
  scale_rows(m, n, beta, c, ldc);
  for (int64_t p = 0; p < k; ++p) {
    const T* ap = a + p * lda;
    const T* bp = b + p * ldb;
    for (int64_t i = 0; i < m; ++i) {
      const T api = alpha * ap[i];
      if (api == T(0)) continue;
      T* ci = c + i * ldc;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += api * bp[j];
    }
  }
}

bool fits_int(int64_t x) { return x >= 0 && x <= INT_MAX; }

// Check once that the BLAS found answers a small known product correctly (guards
// against an ILP64 BLAS behind the LP64 names).
template <typename T>
fortran_gemm_t<T> checked_fortran_gemm() {
  static const fortran_gemm_t<T> fn = []() -> fortran_gemm_t<T> {
    fortran_gemm_t<T> f = raw_fortran_gemm<T>();
    if (f == nullptr || blas_disabled_by_env()) return nullptr;
    // Column-major 2x2: C = A * B with A = [[1,2],[3,4]], B = [[5,6],[7,8]] (rows).
    const T a[4] = {1, 3, 2, 4}, b[4] = {5, 7, 6, 8};
    T c[4] = {0, 0, 0, 0};
    const int two = 2;
    const T one = 1, zero = 0;
    f("N", "N", &two, &two, &two, &one, a, &two, b, &two, &zero, c, &two);
    const bool ok = c[0] == T(19) && c[2] == T(22) && c[1] == T(43) && c[3] == T(50);
    return ok ? f : nullptr;
  }();
  return fn;
}

// Row-major C = op(A) op(B) expressed as column-major C^T = op(B)^T op(A)^T.
template <typename T>
bool fortran_gemm(char tb, char ta, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                  int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  fortran_gemm_t<T> f = checked_fortran_gemm<T>();
  if (f == nullptr || !fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) ||
      !fits_int(ldb) || !fits_int(ldc)) {
    return false;
  }
  if (m == 0 || n == 0) return true;
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda < 1 ? 1 : lda);
  const int ildb = static_cast<int>(ldb < 1 ? 1 : ldb);
  const int ildc = static_cast<int>(ldc < 1 ? 1 : ldc);
  f(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  return true;
}

}  // namespace

template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc) {
  if (k == 0) return scale_rows(m, n, beta, c, ldc);
  if (!fortran_gemm<T>('T', 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) {
    portable_nt(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc) {
  if (k == 0) return scale_rows(m, n, beta, c, ldc);
  if (!fortran_gemm<T>('N', 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) {
    portable_nn(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

template <typename T>
void gemm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc) {
  if (k == 0) return scale_rows(m, n, beta, c, ldc);
  if (!fortran_gemm<T>('N', 'T', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) {
    portable_tn(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

bool blas_available() { return checked_fortran_gemm<float>() != nullptr; }

namespace {

// Blocked loops: 16 x 16 tiles keep the strided side within a few cache lines.
template <typename U>
void transpose_loops(int64_t rows, int64_t cols, const U* src, int64_t ld_src, U* dst,
                     int64_t ld_dst) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
      }
    }
  }
}

// fbgemm's transposes, unless LONGNET_CPU_BLAS=0 asks for the portable loops (so that
// they stay tested).
bool simd_transposes() {
  static const bool have =
      &fbgemm::transpose_simd<float> != nullptr && &fbgemm::transpose_simd<uint16_t> != nullptr;
  return have && !blas_disabled_by_env();
}

}  // namespace

void transpose_bits(int64_t rows, int64_t cols, const uint32_t* src, int64_t ld_src, uint32_t* dst,
                    int64_t ld_dst) {
  if (rows <= 0 || cols <= 0) return;
  if (simd_transposes()) {
    // Bits are moved by shuffles only, so any 32-bit pattern passes unchanged.
    fbgemm::transpose_simd<float>(rows, cols, reinterpret_cast<const float*>(src), ld_src,
                                  reinterpret_cast<float*>(dst), ld_dst);
  } else {
    transpose_loops(rows, cols, src, ld_src, dst, ld_dst);
  }
}

void transpose_bits(int64_t rows, int64_t cols, const uint16_t* src, int64_t ld_src, uint16_t* dst,
                    int64_t ld_dst) {
  if (rows <= 0 || cols <= 0) return;
  if (simd_transposes()) {
    fbgemm::transpose_simd<uint16_t>(rows, cols, src, ld_src, dst, ld_dst);
  } else {
    transpose_loops(rows, cols, src, ld_src, dst, ld_dst);
  }
}

// ------------------------------------------------- micro-kernel products ----

namespace {

bool env_is_zero(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, "0") == 0;
}

// ATen headers that declare the float32/bfloat16/float16 -> float32 block products
// (torch >= 2.4); older ones build the portable and BLAS paths only.
#if defined(CPUBLAS_BRGEMM_F32F32F32) && defined(CPUBLAS_BRGEMM_BF16BF16F32) && \
    defined(CPUBLAS_BRGEMM_F16F16F32)
#define LONGNET_HAVE_BRGEMM 1
#else
#define LONGNET_HAVE_BRGEMM 0
#endif

template <typename E>
void brgemm_call(int64_t m, int64_t n, int64_t k, const E* a, int64_t lda, const E* b, int64_t ldb,
                 float* c, int64_t ldc, bool add) {
#if LONGNET_HAVE_BRGEMM
  // float B is plain row-major; 16-bit B is pair-interleaved (is_vnni).
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, kPairInterleaved<E>);
#else
  TORCH_CHECK(false, "longnet: this build of torch has no cpublas::brgemm");
#endif
}

// Runs C = A B for A = [[1, 2], [3, 4]], B = [[5, 6], [7, 8]] (and C += A B) through
// the micro-kernel; true when it exists for E and answers right. A missing kernel
// (no oneDNN micro-kernels in this ATen, or a 16-bit format the ISA lacks) throws.
template <typename E>
bool probe_brgemm() {
  const E a[4] = {E(1.f), E(2.f), E(3.f), E(4.f)};
  E b[4];
  const E b_rows[4] = {E(5.f), E(6.f), E(7.f), E(8.f)};
  prepare_b<E, E>(b_rows, 2, 2, 2, b);
  float c[4] = {0, 0, 0, 0};
  if (!LONGNET_HAVE_BRGEMM) return false;
  try {
    brgemm_call<E>(2, 2, 2, a, 2, b, 2, c, 2, false);
    brgemm_call<E>(2, 2, 2, a, 2, b, 2, c, 2, true);
    tile_gemm_release<E>();
  } catch (const c10::Error&) {
    return false;
  }
  return c[0] == 38.f && c[1] == 44.f && c[2] == 86.f && c[3] == 100.f;
}

thread_local const char* t_last_products = "";

}  // namespace

template <typename E>
bool tile_gemm_available() {
  // ATen's micro-kernels also stand down when oneDNN is turned off
  // (torch.backends.mkldnn.enabled = False): 16-bit ones then raise, float32 ones fall
  // back to a plain GEMM; the BLAS path runs instead.
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool probed = probe_brgemm<E>();
  return probed && !env_is_zero("LONGNET_CPU_BLAS") && !env_is_zero("LONGNET_CPU_BRGEMM");
}
template bool tile_gemm_available<float>();
template bool tile_gemm_available<c10::BFloat16>();
template bool tile_gemm_available<c10::Half>();

void tile_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
               int64_t ldb, float* c, int64_t ldc, bool add) {
  brgemm_call<float>(m, n, k, a, lda, b, ldb, c, ldc, add);
}
void tile_gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda,
               const c10::BFloat16* b, int64_t ldb, float* c, int64_t ldc, bool add) {
  brgemm_call<c10::BFloat16>(m, n, k, a, lda, b, ldb, c, ldc, add);
}
void tile_gemm(int64_t m, int64_t n, int64_t k, const c10::Half* a, int64_t lda, const c10::Half* b,
               int64_t ldb, float* c, int64_t ldc, bool add) {
  brgemm_call<c10::Half>(m, n, k, a, lda, b, ldb, c, ldc, add);
}

template <typename E>
void tile_gemm_release() {
#if LONGNET_HAVE_BRGEMM
  at::native::cpublas::brgemm_release(kPairInterleaved<E>);
#endif
}
template void tile_gemm_release<float>();
template void tile_gemm_release<c10::BFloat16>();
template void tile_gemm_release<c10::Half>();

const char* last_products() { return t_last_products; }
void set_last_products(const char* name) { t_last_products = name; }

#define LONGNET_INSTANTIATE_GEMM(T)                                                               \
  template void gemm_nt<T>(int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, \
                           T*, int64_t);                                                          \
  template void gemm_nn<T>(int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, \
                           T*, int64_t);                                                          \
  template void gemm_tn<T>(int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, \
                           T*, int64_t);
LONGNET_INSTANTIATE_GEMM(float)
LONGNET_INSTANTIATE_GEMM(double)
#undef LONGNET_INSTANTIATE_GEMM

}  // namespace longnet::cpu
