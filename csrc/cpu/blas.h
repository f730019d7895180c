// Row-major GEMM helpers for the CPU kernels.
//
// The block products of dilated attention read sparse segments in place: a
// segment's rows are r * row_stride elements apart, which is a plain BLAS leading
// dimension. We call the Fortran BLAS that torch itself links (MKL's or
// OpenBLAS's sgemm_/dgemm_, looked up as weak symbols), and fall back to portable
// loops when none is found, when a leading dimension does not fit the 32-bit BLAS
// interface, or when LONGNET_CPU_BLAS=0 is set.
#pragma once

#include <cstdint>

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

}  // namespace longnet::cpu
