// The project's own CUDA kernels (the `fused` engine on CUDA, opt-in), called by
// csrc/engine/dispatch.cpp. Arguments as the operator schemas in csrc/longnet.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace longnet::cuda {

std::tuple<at::Tensor, at::Tensor> fused_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates, bool is_causal,
    double scale, int64_t position_offset, const std::optional<at::Tensor>& key_start,
    const std::optional<at::Tensor>& key_end);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates, bool is_causal,
    double scale, int64_t position_offset, const std::optional<at::Tensor>& key_start,
    const std::optional<at::Tensor>& key_end);

}  // namespace longnet::cuda
