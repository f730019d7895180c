// The project's own kernels, the `fused` engine (csrc/engine/engines_fused.cpp): CPU
// (csrc/cpu) and, in a build with LONGNET_FUSED_CUDA, CUDA (csrc/cuda). The engine
// calls these on checked arguments (csrc/engine/dispatch.cpp), as the operator schemas
// in csrc/longnet.cpp give them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace longnet {

using FusedForward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef segment_lengths,
    at::IntArrayRef dilation_rates, bool is_causal, double scale, int64_t position_offset,
    const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end);

using FusedBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates, bool is_causal, double scale,
    int64_t position_offset, const std::optional<at::Tensor>& key_start,
    const std::optional<at::Tensor>& key_end);

namespace cpu {
FusedForward fused_forward;
FusedBackward fused_backward;
}  // namespace cpu

namespace cuda {  // defined in builds with LONGNET_FUSED_CUDA only
FusedForward fused_forward;
FusedBackward fused_backward;
}  // namespace cuda

}  // namespace longnet
