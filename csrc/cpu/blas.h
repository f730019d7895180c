// Row-major GEMM helpers for the CPU kernels.
//
// The block products of dilated attention read sparse segments in place: a
// segment's rows are r * row_stride elements apart, which is a plain BLAS leading
// dimension. We call the Fortran BLAS that torch itself links (MKL's or
// OpenBLAS's sgemm_/dgemm_, looked up as weak symbols), and fall back to portable
// loops when none is found, when a leading dimension does not fit the 32-bit BLAS
// interface, or when LONGNET_CPU_BLAS=0 is set.
//
// The flash-style tile products of float32 and bfloat16/float16 go through oneDNN's
// micro-kernels instead (tile_gemm below: ATen's at::native::cpublas::brgemm, which
// JIT-compiles for the running ISA: AVX2, AVX-512, AVX-512-BF16, AMX). Their B operand
// is a prepared copy: for float32 a plain row-major K x N tile, for 16-bit formats the
// pair-interleaved ("VNNI") layout B'[(p / 2)][j][p % 2] = B[p][j], K padded to even.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace longnet::cpu {

// C[m x n] = alpha * A[m x k] * B[n x k]^T + beta * C
template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc);

// C[m x n] = alpha * A[m x k] * B[k x n] + beta * C
template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc);

// C[m x n] = alpha * A[k x m]^T * B[k x n] + beta * C
template <typename T>
void gemm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc);

// True when the BLAS path is in use (for tests and benchmarks).
bool blas_available();

// ------------------------------------------------- micro-kernel products ----

// Whether tile_gemm runs oneDNN's micro-kernel for inputs of type E (float,
// c10::BFloat16, c10::Half): checked once on a small known product, so a build or a
// processor without them reports false. LONGNET_CPU_BLAS=0 (portable loops),
// LONGNET_CPU_BRGEMM=0 (the Fortran BLAS path) and torch.backends.mkldnn.enabled =
// False turn it off; all are read per call.
template <typename E>
bool tile_gemm_available();

// C[m x n] (add ? += : =) A[m x k] * B with A row-major (lda), B prepared (ldb = its
// row length n), C float32 (ldc). For 16-bit E, k must be even (pad A and B with a
// zero column / row). Products in E, sums in float32.
void tile_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
               int64_t ldb, float* c, int64_t ldc, bool add);
void tile_gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda,
               const c10::BFloat16* b, int64_t ldb, float* c, int64_t ldc, bool add);
void tile_gemm(int64_t m, int64_t n, int64_t k, const c10::Half* a, int64_t lda, const c10::Half* b,
               int64_t ldb, float* c, int64_t ldc, bool add);

// Ends a run of tile_gemm calls of type E on this thread (releases AMX state).
template <typename E>
void tile_gemm_release();

template <typename E>
constexpr bool kPairInterleaved = !std::is_same_v<E, float>;

// The K extent tile_gemm needs for k: even for 16-bit formats.
template <typename E>
constexpr int64_t padded_k(int64_t k) {
  return kPairInterleaved<E> ? (k + 1) / 2 * 2 : k;
}

// Prepares B = src (k rows of n values, ld apart) as tile_gemm's B of type E,
// converting from S. Writes padded_k<E>(k) x n values (ldb = n).
template <typename E, typename S>
inline void prepare_b(const S* src, int64_t ld, int64_t k, int64_t n, E* dst) {
  if constexpr (!kPairInterleaved<E>) {
    for (int64_t p = 0; p < k; ++p) {
      const S* in = src + p * ld;
      E* out = dst + p * n;
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<E>(in[j]);
    }
  } else {
    for (int64_t p = 0; p < k; p += 2) {
      const S* in0 = src + p * ld;
      const S* in1 = in0 + ld;
      E* out = dst + p * n;
      if (p + 1 < k) {
        for (int64_t j = 0; j < n; ++j) {
          out[2 * j] = static_cast<E>(in0[j]);
          out[2 * j + 1] = static_cast<E>(in1[j]);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          out[2 * j] = static_cast<E>(in0[j]);
          out[2 * j + 1] = E(0.f);
        }
      }
    }
  }
}

// dst (cols rows of `rows` values, ld_dst apart) = src^T for src of `rows` rows of
// `cols` values (ld_src apart), elements of 4 or 2 bytes copied bit for bit: fbgemm's
// SIMD transposes where libtorch exports them, else loops.
void transpose_bits(int64_t rows, int64_t cols, const uint32_t* src, int64_t ld_src, uint32_t* dst,
                    int64_t ld_dst);
void transpose_bits(int64_t rows, int64_t cols, const uint16_t* src, int64_t ld_src, uint16_t* dst,
                    int64_t ld_dst);

// transpose_bits on elements of type E (float, c10::BFloat16, c10::Half).
template <typename E>
inline void transpose_elems(int64_t rows, int64_t cols, const E* src, int64_t ld_src, E* dst,
                            int64_t ld_dst) {
  static_assert(sizeof(E) == 4 || sizeof(E) == 2);
  using U = std::conditional_t<sizeof(E) == 4, uint32_t, uint16_t>;
  transpose_bits(rows, cols, reinterpret_cast<const U*>(src), ld_src, reinterpret_cast<U*>(dst),
                 ld_dst);
}

// Prepares B = src^T, src being n rows of k values (ld apart), i.e. B[p][j] =
// src[j][p]: the K^T and V^T operands of S = Q K^T and dP = dO V^T. 16-bit formats
// need k even: the pairs of a row are moved as 32-bit words (a transpose of words
// when the rows start on 4-byte boundaries).
template <typename E>
inline void prepare_b_transposed(const E* src, int64_t ld, int64_t n, int64_t k, E* dst) {
  if constexpr (!kPairInterleaved<E>) {
    transpose_elems<E>(n, k, src, ld, dst, n);
  } else {
    static_assert(sizeof(E) == 2);
    if (ld % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0) {
      transpose_bits(n, k / 2, reinterpret_cast<const uint32_t*>(src), ld / 2,
                     reinterpret_cast<uint32_t*>(dst), n);
      return;
    }
    for (int64_t j = 0; j < n; ++j) {
      const E* in = src + j * ld;
      for (int64_t p = 0; p < k; p += 2) {
        uint32_t pair;
        std::memcpy(&pair, in + p, sizeof(pair));
        std::memcpy(dst + p * n + 2 * j, &pair, sizeof(pair));
      }
    }
  }
}

// dst (cols rows, ld_dst apart) = src^T for src of `rows` rows of `cols` values (ld
// apart), columns rows..pad_to-1 zero: the transposed A operands (Q^T, dO^T).
template <typename E>
inline void transpose_a(const E* src, int64_t ld, int64_t rows, int64_t cols, E* dst,
                        int64_t ld_dst, int64_t pad_to) {
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = rows; r < pad_to; ++r) dst[c * ld_dst + r] = E(0.f);
  }
  transpose_elems<E>(rows, cols, src, ld, dst, ld_dst);
}

// Which products the fused CPU kernels of this thread used last (forward or
// backward): "brgemm-<dtype>" (oneDNN micro-kernels, inputs multiplied in their own
// format), "blas-<acc>" (Fortran BLAS on float32/float64 tiles), "portable-<acc>".
const char* last_products();
void set_last_products(const char* name);

}  // namespace longnet::cpu
