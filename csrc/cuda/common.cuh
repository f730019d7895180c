// Shared pieces of the CUDA kernels of longnet::dilated_attention_fwd / _bwd.
//
// Both kernel families (generic FMA and tensor core) run one launch per pattern
// (w, r). A forward launch merges its partial softmax into a running state kept in
// global memory per query row: m (running max), l (running sum) and acc (unnormalised
// output), all in the accumulation type. Every query row of a head lies in at most
// one sparse segment of a pattern, so the blocks of one launch write disjoint rows;
// launches on one stream run in order, so the patterns merge one after another.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "pattern.h"

namespace longnet::cuda {

// Accumulation type: double for double inputs, float otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -INFINITY;
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -static_cast<double>(INFINITY);
}

__device__ __forceinline__ float exp_a(float x) { return expf(x); }
__device__ __forceinline__ double exp_a(double x) { return exp(x); }
__device__ __forceinline__ float log_a(float x) { return logf(x); }
__device__ __forceinline__ double log_a(double x) { return log(x); }

template <typename T, typename A>
__device__ __forceinline__ A to_acc(T x) {
  return static_cast<A>(x);
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Strides (in elements) of a (B, N, H, D) tensor whose last dimension is dense.
struct RowStrides {
  int64_t b, n, h;
};

inline RowStrides row_strides(const at::Tensor& t) {
  return RowStrides{t.stride(0), t.stride(1), t.stride(2)};
}

// Sizes of one problem plus the pattern a launch works on.
struct Shape {
  int64_t batch, nq, nk, heads, kv_heads, dim;
  int64_t position_offset;   // absolute position of key index key_start[b] (0 without ranges)
  const int64_t* key_start;  // (B,) on the device, or nullptr: the whole row
  const int64_t* key_end;    // (B,) on the device, or nullptr
  int64_t w, r;              // pattern
  int64_t nseg;              // segments a row may touch (upper bound over rows)
  int64_t ntiles;            // query (forward) or key (backward) tiles per sparse segment
  bool causal;
  __host__ __device__ int64_t group() const { return heads / kv_heads; }
  __device__ RowSpan row(int64_t b) const {
    return row_span(nk, nq, position_offset, key_start, key_end, b);
  }
};

// Running softmax state of the forward pass, contiguous buffers:
// acc (B, Nq, H, D), m and l (B, H, Nq).
template <typename A>
struct FwdState {
  A* acc;
  A* m;
  A* l;
};

}  // namespace longnet::cuda
