// Input contracts of ATen's CUDA attention kernels, and the device-agnostic code that
// prepares every call to keep them (docs/operator.md, "Engines").
//
// A KernelEngine is a dense engine on one of three kernels: FlashAttention-2
// (`_flash_attention_forward/_backward`), memory-efficient attention
// (`_efficient_attention_forward/_backward`) and cuDNN attention
// (`_cudnn_attention_forward/_backward`). Its forward and backward (here, shared by
// every device) check and prepare the arguments (alignment copies, a compact `out`,
// the lse layout of the kernel, the problems the kernel must not see), then call the
// kernel (kernel_forward, kernel_backward). Two families derive from it: the CUDA
// engines (engines_cuda.cpp), whose kernel calls are ATen's, and the CPU contract
// engines `contract_cuda_*` (csrc/testing/engines_contract.cpp), whose kernel calls
// compute dense attention on CPU while enforcing each kernel's input contract as the
// CUDA kernel reads its arguments. So the CPU engines run, and the tests check, the
// exact argument preparation a GPU runs.
//
// kernel_contract.cpp is compiled into CUDA builds (LONGNET_WITH_CUDA) and testing
// builds (LONGNET_TESTING, setup.py), the builds that have engines derived from it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "engine/engine.h"

namespace longnet::engine {

enum class Kernel { kFlash, kEfficient, kCudnn };

// Name of the kernel in messages ("FlashAttention-2 (mha_fwd/mha_bwd)", ...).
const char* kernel_label(Kernel kernel);

// The kernels' 128-bit loads need 16-byte aligned data pointers and strides
// (flash_api.cpp checks only stride(-1) == 1; mem_eff_attention's check_supported
// checks 8 bytes for 16-bit types while its sm80 kernels load 16; cuDNN's tensor
// descriptors are 16-byte aligned).
constexpr int64_t kAlignBytes = 16;
// Grid dimensions y and z of a CUDA launch hold at most 65535 blocks; the kernels put
// the batch there (cuDNN: check_cudnn_tensor_shapes, batch <= 65535).
constexpr int64_t kMaxGridBatch = 65535;
// Memory-efficient attention keeps its lse padded to a multiple of 32 queries
// (attention.cu, kAlignLSE).
constexpr int64_t kEfficientLseAlign = 32;
// cuDNN's graph cache key (MHA.cpp, MHAParams) stores q, k, v strides as int.
constexpr int64_t kInt32Max = 2147483647;

// Whether t's data pointer and the strides of its dimensions of size > 1 are
// multiples of kAlignBytes.
bool is_aligned(const at::Tensor& t);
// t when is_aligned, else a contiguous copy (aligned: the allocators align to >= 64
// bytes and every stride of a contiguous (Bt, L, H, D) tensor is a multiple of D,
// which the kernels take as a multiple of 16 bytes).
at::Tensor aligned(const at::Tensor& t);
// A contiguous copy of t unless t already is contiguous and aligned.
at::Tensor compact(const at::Tensor& t);
// Largest stride of a dimension of size > 1 (0 when none).
int64_t largest_stride(const at::Tensor& t);
// For each packed query row, its index in the efficient kernel's varlen lse (P, H,
// padded) flattened over (P, padded): sequence i's row t at i * padded + t.
at::Tensor padded_lse_index(const PackedSequences& seqs, int64_t total_q, int64_t padded);
// max_q rounded up to the efficient kernel's lse alignment (kEfficientLseAlign).
int64_t efficient_lse_length(int64_t max_q);

// Why `kernel` cannot run the dense problems the composition makes of these (B, N, H,
// D) inputs (dtype, head dim, strides), without the device checks; nullopt when it can.
std::optional<std::string> kernel_cannot_run(Kernel kernel, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v);

class KernelEngine : public DenseEngine {
 public:
  explicit KernelEngine(Kernel kernel) : kernel_(kernel) {}
  int64_t max_batch() const override { return kMaxGridBatch; }
  std::optional<std::string> cannot_run(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v) const override;
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, bool causal,
                                             double scale) const final;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const final;
  // Packed problems in one call: FlashAttention-2 and memory-efficient attention take
  // cumulative offsets (mha_varlen_fwd/bwd; cu_seqlens of the efficient kernels), cuDNN
  // is left to one call per document.
  bool has_varlen() const override { return kernel_ != Kernel::kCudnn; }
  std::tuple<at::Tensor, at::Tensor> forward_varlen(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const PackedSequences& seqs, bool causal,
                                                    double scale) const final;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_varlen(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, const PackedSequences& seqs, bool causal,
      double scale) const final;
  Kernel kernel() const { return kernel_; }

 protected:
  // Device, architecture: why this engine's kernels cannot run on q's device.
  virtual std::optional<std::string> device_cannot_run(const at::Tensor& q) const = 0;
  // The kernel's forward on prepared (Bt, L, H, D) arguments: (out, lse in the
  // kernel's layout: (Bt, H, Lq) flash; (Bt, H, Lq rounded up to 32) efficient;
  // (Bt, H, Lq, 1) cuDNN).
  virtual std::tuple<at::Tensor, at::Tensor> kernel_forward(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v, bool causal,
                                                            double scale) const = 0;
  // The kernel's backward on prepared arguments, lse in the kernel's layout.
  virtual std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const = 0;
  // The kernel's varlen forward on prepared arguments: flash (T, H, D) tensors, lse
  // (H, Tq); efficient (1, T, H, D) tensors, lse (P, H, max_q rounded up to 32) with
  // sequence i's row t at [i, :, t]. Offsets int32 on the inputs' device. Only
  // kernels with has_varlen() are asked (the default raises).
  virtual std::tuple<at::Tensor, at::Tensor> kernel_forward_varlen(const at::Tensor& q,
                                                                   const at::Tensor& k,
                                                                   const at::Tensor& v,
                                                                   const PackedSequences& seqs,
                                                                   bool causal, double scale) const;
  // The kernel's varlen backward, the shapes and lse layout of kernel_forward_varlen.
  virtual std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward_varlen(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, const PackedSequences& seqs, bool causal,
      double scale) const;

 private:
  // Problems this kernel must not see (cuDNN: one query or one key), run on `math`.
  bool on_fallback(const at::Tensor& q, const at::Tensor& k) const;
  Kernel kernel_;
};

}  // namespace longnet::engine
