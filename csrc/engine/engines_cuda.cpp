// Dense engines on ATen's CUDA attention kernels: `cuda_flash`
// (_flash_attention_forward/_backward, FlashAttention-2), `cuda_efficient`
// (_efficient_attention_forward/_backward, memory-efficient attention) and
// `cuda_cudnn` (_cudnn_attention_forward/_backward). Compiled in CUDA builds only.
//
// The arguments reach these calls prepared by KernelEngine (kernel_contract.cpp:
// aligned copies, a compact `out` for the efficient kernel, the lse layout of each
// kernel, cuDNN's one-query problems on `math`), the code the CPU contract engines
// run too (csrc/testing/engines_contract.cpp). The calls below compile against torch
// 2.11 to 2.14 (their ATen/ops headers checked: the later versions only add trailing
// defaulted arguments to _flash_attention_forward and _cudnn_attention_forward, which
// these calls leave at their defaults; built against 2.11 and 2.14.1). Older torch
// versions are not checked: there only `math` and `fused` run on CUDA.
#ifdef LONGNET_WITH_CUDA

#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11)
#define LONGNET_ATEN_ATTENTION_ENGINES 1
#endif

#ifdef LONGNET_ATEN_ATTENTION_ENGINES

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <sstream>
#include <vector>

#include "engine/kernel_contract.h"

namespace longnet::engine {
namespace {

// Why the kernels cannot run on q's device: not CUDA, or an older architecture than
// min_major (bfloat16 needs sm80).
std::optional<std::string> check_device(const at::Tensor& q, int min_major) {
  std::ostringstream why;
  if (!q.is_cuda()) {
    why << "it needs CUDA tensors, got " << q.device();
    return why.str();
  }
  int major = 0, minor = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.device().index()));
  if (q.scalar_type() == at::kBFloat16) min_major = std::max(min_major, 8);
  if (major < min_major) {
    why << "it needs compute capability " << min_major << ".0 or newer for " << q.scalar_type()
        << ", got " << major << "." << minor;
    return why.str();
  }
  return std::nullopt;
}

// The philox seed/offset arguments of the backward calls, never read without dropout:
// one int64 (2,) tensor per device, allocated once and kept for the process (never
// freed, so no CUDA call runs at exit).
at::Tensor unused_rng(const at::Tensor& q) {
  static std::mutex mutex;
  static auto* cache = new std::vector<at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto index = static_cast<size_t>(q.device().index());
  if (cache->size() <= index) cache->resize(index + 1);
  at::Tensor& t = (*cache)[index];
  if (!t.defined()) t = at::zeros({2}, q.options().dtype(at::kLong));
  return t;  // a reference count, not a copy of the data
}

class CudaFlashEngine final : public KernelEngine {
 public:
  CudaFlashEngine() : KernelEngine(Kernel::kFlash) { register_engine(this); }
  const char* name() const override { return "cuda_flash"; }

 protected:
  std::optional<std::string> device_cannot_run(const at::Tensor& q) const override {
    // flash_api.cpp mha_fwd: "FlashAttention only supports Ampere GPUs or newer."
    return check_device(q, 8);
  }
  std::tuple<at::Tensor, at::Tensor> kernel_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, bool causal,
                                                    double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    // Arguments aligned (kernel_contract.cpp, prepare_input); lse (Bt, H, Lq).
    auto r = at::_flash_attention_forward(q, k, v, std::nullopt, std::nullopt, q.size(1), k.size(1),
                                          0.0, causal, false, std::optional<double>(scale));
    return {std::get<0>(r), std::get<1>(r)};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    // grad_out, out aligned; lse contiguous (Bt, H, Lq) float32 (mha_bwd reads it so).
    const at::Tensor rng = unused_rng(q);
    return at::_flash_attention_backward(grad_out, q, k, v, out, lse, at::Tensor(), at::Tensor(),
                                         q.size(1), k.size(1), 0.0, causal, rng, rng,
                                         std::optional<double>(scale));
  }
  std::tuple<at::Tensor, at::Tensor> kernel_forward_varlen(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v,
                                                           const PackedSequences& seqs, bool causal,
                                                           double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    // (total, H, D) aligned; int32 offsets on the device; lse (H, total_q).
    auto r = at::_flash_attention_forward(q, k, v, seqs.cu_q, seqs.cu_k, seqs.max_q, seqs.max_k,
                                          0.0, causal, false, std::optional<double>(scale));
    return {std::get<0>(r), std::get<1>(r)};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward_varlen(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, const PackedSequences& seqs, bool causal,
      double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    const at::Tensor rng = unused_rng(q);
    return at::_flash_attention_backward(grad_out, q, k, v, out, lse, seqs.cu_q, seqs.cu_k,
                                         seqs.max_q, seqs.max_k, 0.0, causal, rng, rng,
                                         std::optional<double>(scale));
  }
};

class CudaEfficientEngine final : public KernelEngine {
 public:
  CudaEfficientEngine() : KernelEngine(Kernel::kEfficient) { register_engine(this); }
  const char* name() const override { return "cuda_efficient"; }

 protected:
  std::optional<std::string> device_cannot_run(const at::Tensor& q) const override {
    // sdp_utils.cpp check_mem_efficient_hardware_support: sm50 and newer.
    return check_device(q, 5);
  }
  std::tuple<at::Tensor, at::Tensor> kernel_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, bool causal,
                                                    double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    // custom_mask_type 1: causal from the top left (causal problems are square).
    // Arguments aligned, row and head strides int32 (prepare_input); lse padded to 32.
    auto r = at::_efficient_attention_forward(q, k, v, std::nullopt, std::nullopt, std::nullopt,
                                              std::nullopt, std::nullopt, 0.0, causal ? 1 : 0, true,
                                              std::optional<double>(scale));
    return {std::get<0>(r), std::get<1>(r)};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    // out compact (row stride H * D, Params::o_strideM), grad_out aligned, lse padded
    // to a multiple of 32 with +inf (KernelEngine::backward).
    const at::Tensor rng = unused_rng(q);
    auto r = at::_efficient_attention_backward(
        grad_out, q, k, v, std::nullopt, out, std::nullopt, std::nullopt, q.size(1), k.size(1), lse,
        0.0, rng, rng, causal ? 1 : 0, false, std::optional<double>(scale));
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
  std::tuple<at::Tensor, at::Tensor> kernel_forward_varlen(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v,
                                                           const PackedSequences& seqs, bool causal,
                                                           double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    // (1, total, H, D); lse (P, H, max_q rounded up to 32). Causal problems are square.
    auto r = at::_efficient_attention_forward(q, k, v, std::nullopt, seqs.cu_q, seqs.cu_k,
                                              seqs.max_q, seqs.max_k, 0.0, causal ? 1 : 0, true,
                                              std::optional<double>(scale));
    return {std::get<0>(r), std::get<1>(r)};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward_varlen(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, const PackedSequences& seqs, bool causal,
      double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    const at::Tensor rng = unused_rng(q);
    auto r = at::_efficient_attention_backward(
        grad_out, q, k, v, std::nullopt, out, seqs.cu_q, seqs.cu_k, seqs.max_q, seqs.max_k, lse,
        0.0, rng, rng, causal ? 1 : 0, false, std::optional<double>(scale));
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
};

// cuDNN takes (B, H, L, D) views: the (Bt, L, Hh, D) views transposed.
class CudaCudnnEngine final : public KernelEngine {
 public:
  CudaCudnnEngine() : KernelEngine(Kernel::kCudnn) { register_engine(this); }
  const char* name() const override { return "cuda_cudnn"; }

 protected:
  std::optional<std::string> device_cannot_run(const at::Tensor& q) const override {
    // sdp_utils.cpp check_cudnn_hardware_support: sm80 to sm121.
    return check_device(q, 8);
  }
  std::tuple<at::Tensor, at::Tensor> kernel_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, bool causal,
                                                    double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    // Arguments aligned, strides below 2^31 (cannot_run, prepare_input); no problem
    // with one query or one key (they run on `math`). Causal: top left, square.
    auto r = run_forward(q, k, v, causal, scale);
    const at::Tensor& lse = std::get<1>(r);
    lse_dims_.store(lse.dim());
    return {std::get<0>(r).transpose(1, 2), lse.reshape({q.size(0), q.size(2), q.size(1), 1})};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    // out and grad_out compact with equal strides, lse (Bt, H, Lq, 1) contiguous
    // (KernelEngine::backward).
    const at::Tensor rng = unused_rng(q);
    auto r = at::_cudnn_attention_backward(
        grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        out.transpose(1, 2), lse_dims(q) == 3 ? lse.squeeze(-1) : lse, rng, rng, at::Tensor(),
        at::Tensor(), at::Tensor(), q.size(1), k.size(1), 0.0, causal,
        std::optional<double>(scale));
    return {std::get<0>(r).transpose(1, 2), std::get<1>(r).transpose(1, 2),
            std::get<2>(r).transpose(1, 2)};
  }

 private:
  // (out (B, H, L, D), softmax statistics) of (Bt, L, H, D) views.
  static std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, bool causal,
                                                        double scale) {
    auto r = at::_cudnn_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), std::nullopt, std::nullopt,
        std::nullopt, q.size(1), k.size(1), true, 0.0, causal, false, std::optional<double>(scale));
    return {std::get<0>(r), std::get<1>(r)};
  }
  // The backward takes the softmax statistics as the forward returns them: (B, H, L)
  // in some ATen versions (whose _cudnn_attention_backward unsqueezes them), (B, H, L,
  // 1) in others. Learnt from a forward, running a small one first when needed.
  int64_t lse_dims(const at::Tensor& q) const {
    if (lse_dims_.load() == 0) {
      const at::Tensor t = at::zeros({1, 2, 1, 8}, q.options());
      lse_dims_.store(std::get<1>(run_forward(t, t, t, false, 1.0)).dim());
    }
    return lse_dims_.load();
  }
  mutable std::atomic<int64_t> lse_dims_{0};
};

const CudaFlashEngine cuda_flash_engine;
const CudaEfficientEngine cuda_efficient_engine;
const CudaCudnnEngine cuda_cudnn_engine;

}  // namespace
}  // namespace longnet::engine

#endif  // LONGNET_ATEN_ATTENTION_ENGINES
#endif  // LONGNET_WITH_CUDA
