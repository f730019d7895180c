// Dense engines on ATen's CUDA attention kernels: `cuda_flash`
// (_flash_attention_forward/_backward, FlashAttention-2), `cuda_efficient`
// (_efficient_attention_forward/_backward, memory-efficient attention) and
// `cuda_cudnn` (_cudnn_attention_forward/_backward). Compiled in CUDA builds only.
//
// The calls below have the same signatures in torch 2.13 and 2.14 (checked against
// both versions' ATen/ops headers); torch 2.14 adds trailing defaulted arguments to
// _cudnn_attention_forward, which these calls leave at their defaults. Older torch
// versions are not checked: there only `math` and `fused` run on CUDA.
#ifdef LONGNET_WITH_CUDA

#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
#define LONGNET_ATEN_ATTENTION_ENGINES 1
#endif

#ifdef LONGNET_ATEN_ATTENTION_ENGINES

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <limits>
#include <sstream>

#include "engine/engine.h"

namespace longnet::engine {
namespace {

// Grid dimensions y and z of a CUDA launch hold at most 65535 blocks; the ATen
// kernels put the batch there.
constexpr int64_t kMaxGridBatch = 65535;

struct Requirements {
  bool float32;        // float32 inputs allowed (bfloat16 and float16 always are)
  int64_t dim_multiple;
  int64_t max_dim;
  int min_major;       // lowest compute capability major version
};

std::optional<std::string> check(const at::Tensor& q, const Requirements& req) {
  std::ostringstream why;
  if (!q.is_cuda()) {
    why << "it needs CUDA tensors, got " << q.device();
    return why.str();
  }
  const at::ScalarType t = q.scalar_type();
  if (!(t == at::kBFloat16 || t == at::kHalf || (req.float32 && t == at::kFloat))) {
    why << "it takes " << (req.float32 ? "float32, " : "") << "bfloat16 or float16 inputs, got "
        << t;
    return why.str();
  }
  const int64_t d = q.size(3);
  if (d % req.dim_multiple != 0 || d > req.max_dim || d == 0) {
    why << "it needs a head dim that is a multiple of " << req.dim_multiple << " and at most "
        << req.max_dim << ", got " << d;
    return why.str();
  }
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.device().index()));
  const int min_major = (t == at::kBFloat16) ? std::max(req.min_major, 8) : req.min_major;
  if (major < min_major) {
    why << "it needs compute capability " << min_major << ".0 or newer for " << t << ", got "
        << major << "." << minor;
    return why.str();
  }
  return std::nullopt;
}

at::Tensor unused_rng(const at::Tensor& q) {
  return at::zeros({2}, q.options().dtype(at::kLong));
}

class CudaFlashEngine final : public DenseEngine {
 public:
  CudaFlashEngine() { register_engine(this); }
  const char* name() const override { return "cuda_flash"; }
  int64_t max_batch() const override { return kMaxGridBatch; }
  std::optional<std::string> cannot_run(const at::Tensor& q) const override {
    return check(q, {false, 8, 256, 8});
  }
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, bool causal,
                                             double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    auto r = at::_flash_attention_forward(q, k, v, std::nullopt, std::nullopt, q.size(1),
                                          k.size(1), 0.0, causal, false,
                                          std::optional<double>(scale));
    return {std::get<0>(r), std::get<1>(r)};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    return at::_flash_attention_backward(grad_out, q, k, v, out, lse.to(at::kFloat).contiguous(),
                                         at::Tensor(), at::Tensor(), q.size(1), k.size(1), 0.0,
                                         causal, unused_rng(q), unused_rng(q),
                                         std::optional<double>(scale));
  }
};

// Memory-efficient attention keeps its lse padded to a multiple of 32 queries.
constexpr int64_t kEfficientLseAlign = 32;

class CudaEfficientEngine final : public DenseEngine {
 public:
  CudaEfficientEngine() { register_engine(this); }
  const char* name() const override { return "cuda_efficient"; }
  int64_t max_batch() const override { return kMaxGridBatch; }
  std::optional<std::string> cannot_run(const at::Tensor& q) const override {
    return check(q, {true, q.scalar_type() == at::kFloat ? 4 : 8, 256, 5});
  }
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, bool causal,
                                             double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    // custom_mask_type 1: causal from the top left (problems are square when causal).
    auto r = at::_efficient_attention_forward(q, k, v, std::nullopt, std::nullopt, std::nullopt,
                                              std::nullopt, std::nullopt, 0.0, causal ? 1 : 0,
                                              true, std::optional<double>(scale));
    return {std::get<0>(r), std::get<1>(r).narrow(2, 0, q.size(1))};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t lq = q.size(1);
    const int64_t padded = (lq + kEfficientLseAlign - 1) / kEfficientLseAlign * kEfficientLseAlign;
    // Padding rows hold +inf, so any probability read there is 0.
    at::Tensor lse_padded = at::full({lse.size(0), lse.size(1), padded},
                                     std::numeric_limits<float>::infinity(),
                                     lse.options().dtype(at::kFloat));
    lse_padded.narrow(2, 0, lq).copy_(lse);
    auto r = at::_efficient_attention_backward(
        grad_out, q, k, v, std::nullopt, out, std::nullopt, std::nullopt, lq, k.size(1),
        lse_padded, 0.0, unused_rng(q), unused_rng(q), causal ? 1 : 0, false,
        std::optional<double>(scale));
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
};

// cuDNN takes (B, H, L, D) views: the (Bt, L, Hh, D) views transposed. Its lse
// (softmax statistics) is (B, H, L, 1).
class CudaCudnnEngine final : public DenseEngine {
 public:
  CudaCudnnEngine() { register_engine(this); }
  const char* name() const override { return "cuda_cudnn"; }
  int64_t max_batch() const override { return kMaxGridBatch; }
  std::optional<std::string> cannot_run(const at::Tensor& q) const override {
    return check(q, {false, 8, 128, 8});
  }
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, bool causal,
                                             double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    auto r = at::_cudnn_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          std::nullopt, std::nullopt, std::nullopt, q.size(1),
                                          k.size(1), true, 0.0, causal, false,
                                          std::optional<double>(scale));
    return {std::get<0>(r).transpose(1, 2),
            std::get<1>(r).reshape({q.size(0), q.size(2), q.size(1)})};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const override {
    const c10::cuda::CUDAGuard guard(q.device());
    auto r = at::_cudnn_attention_backward(
        grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        out.transpose(1, 2), lse.to(at::kFloat).contiguous().unsqueeze(-1), unused_rng(q),
        unused_rng(q), at::Tensor(), at::Tensor(), at::Tensor(), q.size(1), k.size(1), 0.0, causal,
        std::optional<double>(scale));
    return {std::get<0>(r).transpose(1, 2), std::get<1>(r).transpose(1, 2),
            std::get<2>(r).transpose(1, 2)};
  }
};

const CudaFlashEngine cuda_flash_engine;
const CudaEfficientEngine cuda_efficient_engine;
const CudaCudnnEngine cuda_cudnn_engine;

}  // namespace
}  // namespace longnet::engine

#endif  // LONGNET_ATEN_ATTENTION_ENGINES
#endif  // LONGNET_WITH_CUDA
