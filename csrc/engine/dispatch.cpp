// The operators' CPU (and, in a CUDA build, CUDA) implementations: pick the engine
// of the call (engine.h, choose_engine), then run the fused kernels or the
// composition of dense problems on that engine, and record which engine ran.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "engine/engine.h"
#include "fused.h"
#include "op_common.h"

namespace longnet::engine {
namespace {

// A call as the composition plans it: the checked key ranges (kept alive here) read
// from their host copies.
struct ComposedCall {
  KeyRanges ranges;
  Call call;
  ComposedCall(const at::Tensor& q, const at::Tensor& k, at::IntArrayRef segment_lengths,
               at::IntArrayRef dilation_rates, bool is_causal, double scale,
               int64_t position_offset, const std::optional<at::Tensor>& key_start,
               const std::optional<at::Tensor>& key_end)
      : ranges(key_start, key_end, q, k.size(1)),
        call{segment_lengths,         dilation_rates,       is_causal, scale, position_offset,
             ranges.host_start_ptr(), ranges.host_end_ptr()} {}
};

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, at::IntArrayRef segment_lengths,
                                           at::IntArrayRef dilation_rates, bool is_causal,
                                           double scale, int64_t position_offset,
                                           const std::optional<at::Tensor>& key_start,
                                           const std::optional<at::Tensor>& key_end) {
  check_qkv(q, k, v, scale);
  check_patterns(segment_lengths, dilation_rates);
  check_position_offset(position_offset);
  const std::string name = choose_engine(q, k, v);
  std::tuple<at::Tensor, at::Tensor> result;
  if (name == "fused") {
#ifdef LONGNET_WITH_CUDA
    if (q.is_cuda()) {
      result = cuda::fused_forward(q, k, v, segment_lengths, dilation_rates, is_causal, scale,
                                   position_offset, key_start, key_end);
    } else
#endif
    {
      result = cpu::fused_forward(q, k, v, segment_lengths, dilation_rates, is_causal, scale,
                                  position_offset, key_start, key_end);
    }
  } else {
    const ComposedCall composed(q, k, segment_lengths, dilation_rates, is_causal, scale,
                                position_offset, key_start, key_end);
    result = composed_forward(*find_engine(name), q, k, v, composed.call);
  }
  record_engine(name);
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates, bool is_causal, double scale,
    int64_t position_offset, const std::optional<at::Tensor>& key_start,
    const std::optional<at::Tensor>& key_end) {
  check_qkv(q, k, v, scale);
  check_patterns(segment_lengths, dilation_rates);
  check_position_offset(position_offset);
  check_backward_args(grad_out, grad_lse, q, out, lse);
  const std::string name = choose_engine(q, k, v);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  if (name == "fused") {
#ifdef LONGNET_WITH_CUDA
    if (q.is_cuda()) {
      result = cuda::fused_backward(grad_out, grad_lse, q, k, v, out, lse, segment_lengths,
                                    dilation_rates, is_causal, scale, position_offset, key_start,
                                    key_end);
    } else
#endif
    {
      result = cpu::fused_backward(grad_out, grad_lse, q, k, v, out, lse, segment_lengths,
                                   dilation_rates, is_causal, scale, position_offset, key_start,
                                   key_end);
    }
  } else {
    const ComposedCall composed(q, k, segment_lengths, dilation_rates, is_causal, scale,
                                position_offset, key_start, key_end);
    result =
        composed_backward(*find_engine(name), grad_out, grad_lse, q, k, v, out, lse, composed.call);
  }
  record_engine(name);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(longnet, CPU, m) {
  m.impl("dilated_attention_fwd", &forward);
  m.impl("dilated_attention_bwd", &backward);
}

#ifdef LONGNET_WITH_CUDA
TORCH_LIBRARY_IMPL(longnet, CUDA, m) {
  m.impl("dilated_attention_fwd", &forward);
  m.impl("dilated_attention_bwd", &backward);
}
#endif

}  // namespace longnet::engine
