// The `fused` engine: the project's own kernels (fused.h), on CPU (csrc/cpu) and, in a
// build with LONGNET_FUSED_CUDA, on CUDA (csrc/cuda).
#include <ATen/ATen.h>

#include "engine/engine.h"
#include "fused.h"

namespace longnet::engine {
namespace {

class FusedEngine final : public Engine {
 public:
  FusedEngine() { register_engine(this); }
  const char* name() const override { return "fused"; }

  std::optional<std::string> cannot_run(const at::Tensor& q, const at::Tensor&,
                                        const at::Tensor&) const override {
    if (q.device().is_cpu()) return std::nullopt;
    if (q.is_cuda()) {
#ifdef LONGNET_FUSED_CUDA
      return std::nullopt;
#else
      return "its CUDA kernels (csrc/cuda) are not built into this installation of longnet; "
             "build them with LONGNET_FUSED_CUDA=1 (`LONGNET_FUSED_CUDA=1 pip install "
             "--no-build-isolation -e .`, which needs nvcc and a CUDA build of torch)";
#endif
    }
    return "the fused kernels take CPU or CUDA tensors, got " + q.device().str();
  }

  std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const Arguments& args) const override {
#ifdef LONGNET_FUSED_CUDA
    if (q.is_cuda()) {
      return cuda::fused_forward(q, k, v, args.segment_lengths, args.dilation_rates, args.is_causal,
                                 args.scale, args.position_offset, args.key_start, args.key_end);
    }
#endif
    return cpu::fused_forward(q, k, v, args.segment_lengths, args.dilation_rates, args.is_causal,
                              args.scale, args.position_offset, args.key_start, args.key_end);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(
      const at::Tensor& grad_out, const at::Tensor& grad_lse_in, const at::Tensor& q,
      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
      const Arguments& args) const override {
    // The kernels read a gradient on lse in every row: zeros when the loss reads no lse.
    const at::Tensor grad_lse = grad_lse_in.defined() ? grad_lse_in : at::zeros_like(lse);
#ifdef LONGNET_FUSED_CUDA
    if (q.is_cuda()) {
      return cuda::fused_backward(grad_out, grad_lse, q, k, v, out, lse, args.segment_lengths,
                                  args.dilation_rates, args.is_causal, args.scale,
                                  args.position_offset, args.key_start, args.key_end);
    }
#endif
    return cpu::fused_backward(grad_out, grad_lse, q, k, v, out, lse, args.segment_lengths,
                               args.dilation_rates, args.is_causal, args.scale,
                               args.position_offset, args.key_start, args.key_end);
  }
};

const FusedEngine fused_engine;

}  // namespace
}  // namespace longnet::engine
