// Tensor-core (bfloat16 / float16, sm80+) kernels of dilated attention: one launch
// per pattern, with the same running-state contract as the generic kernels
// (common.cuh). Defined in tensor_core.cu for T = c10::Half and c10::BFloat16.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <initializer_list>

#include "cuda/common.cuh"

namespace longnet::cuda {

// True when the tensors (q first; then k, v and, in the backward, dout) can take the
// tensor-core kernels: bfloat16 or float16, head dim 32, 64, 96 or 128, a device of
// compute capability 8.0 or newer, and rows aligned for 16-byte loads.
bool tc_supported(std::initializer_list<at::Tensor> tensors);

// Query rows per forward block / key rows per backward block (Shape::ntiles).
int64_t tc_forward_tile_rows();
int64_t tc_backward_tile_rows();

// Forward pass of one pattern: merges into `st` (float accumulators).
template <typename T>
void tc_forward_pattern(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const Shape& sh, float scale, const FwdState<float>& st,
                        cudaStream_t stream);

// Backward pass of one pattern: adds into the float accumulators dq, dk, dv
// (contiguous), given lse and delta laid out (B, H, Nq).
template <typename T>
void tc_backward_pattern(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& dout, const Shape& sh, float scale, const float* lse,
                         const float* delta, float* dq, float* dk, float* dv, cudaStream_t stream);

}  // namespace longnet::cuda
