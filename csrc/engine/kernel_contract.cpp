// Argument preparation shared by the CUDA engines and their CPU contract engines
// (kernel_contract.h). Each step names the contract it keeps and where ATen states it.
// Empty unless a build has engines derived from KernelEngine: CUDA builds and testing
// builds.
#if defined(LONGNET_WITH_CUDA) || defined(LONGNET_TESTING)

#include "engine/kernel_contract.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <sstream>

namespace longnet::engine {
namespace {

struct Limits {
  bool float32;     // float32 inputs allowed (bfloat16 and float16 always are)
  int64_t max_dim;  // largest head dim
};

Limits limits(Kernel kernel) {
  switch (kernel) {
    // flash_api.cpp mha_fwd/mha_bwd: fp16/bf16, head_size % 8 == 0, <= 256.
    case Kernel::kFlash:
      return {false, 256};
    // sdp_utils.cpp check_head_dim_size_mem_efficient (minimum_gemm_alignment: 8
    // elements for 16-bit, 4 for float32) and kMaxK = 256 of the largest kernels.
    case Kernel::kEfficient:
      return {true, 256};
    // sdp_utils.cpp check_cudnn_tensor_shapes: fp16/bf16, head_dim % 8 == 0, <= 128
    // (256 only on some cuDNN versions and GPUs).
    case Kernel::kCudnn:
      return {false, 128};
  }
  return {false, 0};
}

// A kernel reading t with int strides (cuDNN's cache key) or int32 row and head
// strides (mem_eff_attention's Params) must not see strides past 2^31 - 1.
bool has_int32_stride(const at::Tensor& t) { return largest_stride(t) < kInt32Max; }

// Upper bound of the strides of the views the composition makes of a (B, N, H, D)
// tensor (batch, segment, row and head strides, see composition.cpp view5) and of
// the compact (Bt, L, H, D) copies of them.
int64_t view_stride_bound(const at::Tensor& t) {
  const int64_t n = t.size(1), h = t.size(2), d = t.size(3);
  int64_t bound = std::max({n * std::abs(t.stride(1)), h * std::abs(t.stride(2)), n * h * d});
  if (t.size(0) > 1) bound = std::max(bound, std::abs(t.stride(0)));
  return bound;
}

// The kernel's input of a (Bt, L, H, D) view.
at::Tensor prepare_input(Kernel kernel, const at::Tensor& t) {
  // Every kernel: 16-byte aligned pointers and strides (kernel_contract.h,
  // kAlignBytes); a copy keeps "any strides" (docs/operator.md).
  at::Tensor a = aligned(t);
  // mem_eff_attention kernel_forward.h Params: q/k/v strideM and strideH are int32
  // and ASSIGN_CHECK_OVERFLOW raises past INT32_MAX; a compact copy has small ones.
  if (kernel == Kernel::kEfficient && !has_int32_stride(a.select(0, 0))) a = compact(a);
  return a;
}

void check_int32_strides(std::initializer_list<const at::Tensor*> tensors) {
  // cuDNN's graph cache key (MHA.cpp, MHAParams q_stride/k_stride/v_stride as int)
  // would truncate these strides and reuse a graph built for other strides.
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(has_int32_stride(*t), "longnet: cuDNN attention cannot take a stride of ",
                largest_stride(*t), " (past 2^31 - 1); its engine should have refused the call");
  }
}

}  // namespace

const char* kernel_label(Kernel kernel) {
  switch (kernel) {
    case Kernel::kFlash:
      return "FlashAttention-2 (mha_fwd/mha_bwd)";
    case Kernel::kEfficient:
      return "memory-efficient attention (cutlassF/cutlassB)";
    case Kernel::kCudnn:
      return "cuDNN attention (run_cudnn_SDP_fprop/bprop)";
  }
  return "?";
}

bool is_aligned(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kAlignBytes != 0) return false;
  const int64_t elem = static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) != 1 && (t.stride(d) * elem) % kAlignBytes != 0) return false;
  }
  return true;
}

at::Tensor aligned(const at::Tensor& t) {
  if (is_aligned(t)) return t;
  at::Tensor c = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  c.copy_(t);
  return c;
}

at::Tensor compact(const at::Tensor& t) {
  if (t.is_contiguous() && is_aligned(t)) return t;
  at::Tensor c = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  c.copy_(t);
  return c;
}

int64_t largest_stride(const at::Tensor& t) {
  int64_t s = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) s = std::max(s, std::abs(t.stride(d)));
  }
  return s;
}

std::optional<std::string> kernel_cannot_run(Kernel kernel, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v) {
  const Limits lim = limits(kernel);
  std::ostringstream why;
  const at::ScalarType t = q.scalar_type();
  if (!(t == at::kBFloat16 || t == at::kHalf || (lim.float32 && t == at::kFloat))) {
    why << "it takes " << (lim.float32 ? "float32, " : "") << "bfloat16 or float16 inputs, got "
        << t;
    return why.str();
  }
  const int64_t d = q.size(3);
  const int64_t multiple = t == at::kFloat ? 4 : 8;  // 16 bytes of the dtype
  if (d % multiple != 0 || d > lim.max_dim || d == 0) {
    why << "it needs a head dim that is a multiple of " << multiple << " and at most "
        << lim.max_dim << ", got " << d;
    return why.str();
  }
  if (kernel == Kernel::kCudnn) {
    for (const at::Tensor* x : {&q, &k, &v}) {
      const int64_t bound = view_stride_bound(*x);
      if (bound >= kInt32Max) {
        why << "cuDNN's graph cache stores strides as 32-bit ints, and the dense problems "
               "of these inputs can have strides up to "
            << bound << " (past 2^31 - 1)";
        return why.str();
      }
    }
  }
  return std::nullopt;
}

std::optional<std::string> KernelEngine::cannot_run(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v) const {
  if (auto why = device_cannot_run(q)) return why;
  return kernel_cannot_run(kernel_, q, k, v);
}

bool KernelEngine::on_fallback(const at::Tensor& q, const at::Tensor& k) const {
  // cuDNN: MHA.cpp check_cudnn_sdpa_decode raises for s_q == 1 with some cuDNN 9.x
  // versions on some GPUs, and sdp_utils.cpp check_cudnn_tensor_shapes refuses
  // s_kv == 1. The composition makes both (r = w, a partial last segment, decoding).
  return kernel_ == Kernel::kCudnn && (q.size(1) == 1 || k.size(1) == 1);
}

std::tuple<at::Tensor, at::Tensor> KernelEngine::forward(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, bool causal,
                                                         double scale) const {
  if (on_fallback(q, k)) return math_engine().forward(q, k, v, causal, scale);
  const at::Tensor qa = prepare_input(kernel_, q), ka = prepare_input(kernel_, k),
                   va = prepare_input(kernel_, v);
  if (kernel_ == Kernel::kCudnn) check_int32_strides({&qa, &ka, &va});
  at::Tensor out, lse;
  std::tie(out, lse) = kernel_forward(qa, ka, va, causal, scale);
  const int64_t lq = q.size(1);
  switch (kernel_) {
    case Kernel::kFlash:
      return {out, lse};  // (Bt, H, Lq)
    // attention.cu _efficient_attention_forward: (Bt, H, ceil(Lq / 32) * 32), the
    // padding unspecified.
    case Kernel::kEfficient:
      return {out, lse.narrow(2, 0, lq)};
    // attention.cu _cudnn_attention_forward: softmax statistics (Bt, H, Lq, 1).
    case Kernel::kCudnn:
      return {out, lse.select(3, 0)};
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> KernelEngine::backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const {
  if (on_fallback(q, k)) {
    return math_engine().backward(grad_out, q, k, v, out, lse, causal, scale);
  }
  const at::Tensor qa = prepare_input(kernel_, q), ka = prepare_input(kernel_, k),
                   va = prepare_input(kernel_, v);
  const at::Tensor lse32 = lse.to(at::kFloat);
  at::Tensor dout, o, lse_k;
  switch (kernel_) {
    case Kernel::kFlash:
      // attention_backward.cu _flash_attention_backward makes grad_out and out
      // contiguous itself ("CUDA code assumes that dout is contiguous"), which keeps
      // a misaligned pointer: aligned copies. mha_bwd reads softmax_lse as a
      // contiguous (Bt, H, Lq) float32 tensor.
      dout = aligned(grad_out);
      o = aligned(out);
      lse_k = lse32.contiguous();
      break;
    case Kernel::kEfficient: {
      // attention_backward.cu _efficient_attention_backward makes grad_out contiguous
      // but not out, and kernel_backward.h Params::o_strideM() hard-codes
      // head_dim_value * num_heads as out's row stride (the 16-bit kernels compute
      // Delta = rowsum(dO * O) from it, kKernelComputesDelta): out must be compact.
      dout = aligned(grad_out);
      const bool rows_compact = out.size(1) <= 1 || out.stride(1) == out.size(2) * out.size(3);
      o = rows_compact && has_int32_stride(out.select(0, 0)) ? aligned(out) : compact(out);
      // The kernel reads lse (Bt, H, Lq rounded up to 32) with lse_strideH % 8 == 0
      // (check_supported); the padding holds +inf, so any probability read there is 0.
      const int64_t lq = q.size(1);
      const int64_t padded =
          (lq + kEfficientLseAlign - 1) / kEfficientLseAlign * kEfficientLseAlign;
      lse_k = at::full({lse.size(0), lse.size(1), padded}, std::numeric_limits<float>::infinity(),
                       lse32.options());
      lse_k.narrow(2, 0, lq).copy_(lse32);
      break;
    }
    case Kernel::kCudnn:
      // MHA.cpp run_cudnn_SDP_bprop: cuDNN < 9.5.1 needs grad_out with the strides of
      // out (else TORCH_INTERNAL_ASSERT), and older graph cache keys hold only q, k, v
      // strides: out and grad_out compact and contiguous, so their strides follow from
      // the shapes in the key. Softmax statistics: (Bt, H, Lq, 1).
      dout = compact(grad_out);
      o = compact(out);
      lse_k = lse32.contiguous().unsqueeze(-1);
      check_int32_strides({&qa, &ka, &va, &dout, &o});
      break;
  }
  return kernel_backward(dout, qa, ka, va, o, lse_k, causal, scale);
}

std::tuple<at::Tensor, at::Tensor> KernelEngine::kernel_forward_varlen(const at::Tensor&,
                                                                       const at::Tensor&,
                                                                       const at::Tensor&,
                                                                       const PackedSequences&, bool,
                                                                       double) const {
  TORCH_CHECK(false, "longnet: ", kernel_label(kernel_), " has no varlen calls");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> KernelEngine::kernel_backward_varlen(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const PackedSequences&, bool, double) const {
  TORCH_CHECK(false, "longnet: ", kernel_label(kernel_), " has no varlen calls");
}

int64_t efficient_lse_length(int64_t max_q) {
  return (max_q + kEfficientLseAlign - 1) / kEfficientLseAlign * kEfficientLseAlign;
}

at::Tensor padded_lse_index(const PackedSequences& seqs, int64_t total_q, int64_t padded) {
  const at::Tensor cu = seqs.cu_q.to(at::kLong);
  const at::Tensor lens = cu.slice(0, 1) - cu.slice(0, 0, -1);
  // Row j of the packed queries is row j - cu[i] of sequence i: index i * padded + j - cu[i].
  const at::Tensor starts =
      at::arange(seqs.count(), cu.options()).mul_(padded) - cu.slice(0, 0, -1);
  return at::repeat_interleave(starts, lens, 0, total_q).add_(at::arange(total_q, cu.options()));
}

std::tuple<at::Tensor, at::Tensor> KernelEngine::forward_varlen(const at::Tensor& q,
                                                                const at::Tensor& k,
                                                                const at::Tensor& v,
                                                                const PackedSequences& seqs,
                                                                bool causal, double scale) const {
  TORCH_CHECK(has_varlen(), "longnet: ", kernel_label(kernel_), " has no varlen calls");
  // Every kernel: 16-byte aligned pointers and strides (a gathered input already is).
  const at::Tensor qa = aligned(q), ka = aligned(k), va = aligned(v);
  const int64_t tq = q.size(0), heads = q.size(1);
  if (kernel_ == Kernel::kFlash) {
    // flash_api.cpp mha_varlen_fwd: (total, H, D) tensors; softmax_lse (H, total_q)
    // (unpadded_lse).
    auto [out, lse] = kernel_forward_varlen(qa, ka, va, seqs, causal, scale);
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == heads && lse.size(1) == tq,
                "longnet: ", kernel_label(kernel_), " returned a varlen softmax_lse of shape ",
                lse.sizes(), ", expected (H, total_q) = (", heads, ", ", tq, ")");
    return {out, lse};
  }
  // attention.cu _efficient_attention_forward with cu_seqlens: a batch of one row,
  // (1, total, H, D); logsumexp (P, H, max_q rounded up to 32), unpadded here.
  auto [out, lse] =
      kernel_forward_varlen(qa.unsqueeze(0), ka.unsqueeze(0), va.unsqueeze(0), seqs, causal, scale);
  const int64_t padded = efficient_lse_length(seqs.max_q);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == seqs.count() && lse.size(1) == heads &&
                  lse.size(2) == padded,
              "longnet: ", kernel_label(kernel_), " returned a varlen logsumexp of shape ",
              lse.sizes(), ", expected (P, H, ", padded, ")");
  const at::Tensor flat = lse.transpose(0, 1).reshape({heads, seqs.count() * padded});
  return {out.select(0, 0), flat.index_select(1, padded_lse_index(seqs, tq, padded))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> KernelEngine::backward_varlen(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const PackedSequences& seqs, bool causal,
    double scale) const {
  TORCH_CHECK(has_varlen(), "longnet: ", kernel_label(kernel_), " has no varlen calls");
  const at::Tensor qa = aligned(q), ka = aligned(k), va = aligned(v);
  const at::Tensor lse32 = lse.to(at::kFloat);
  if (kernel_ == Kernel::kFlash) {
    // As the dense backward: grad_out and out aligned (ATen makes them contiguous);
    // mha_varlen_bwd reads softmax_lse as a contiguous (H, total_q) float32 tensor.
    return kernel_backward_varlen(aligned(grad_out), qa, ka, va, aligned(out), lse32.contiguous(),
                                  seqs, causal, scale);
  }
  // Efficient: out compact (Params::o_strideM = H * D), lse back in the kernel's
  // layout, its padding +inf (no probability is read there).
  const int64_t heads = q.size(1), padded = efficient_lse_length(seqs.max_q);
  at::Tensor flat = at::full({heads, seqs.count() * padded}, std::numeric_limits<float>::infinity(),
                             lse32.options());
  flat.index_copy_(1, padded_lse_index(seqs, q.size(0), padded), lse32);
  const at::Tensor lse_k = flat.view({heads, seqs.count(), padded}).transpose(0, 1).contiguous();
  auto [dq, dk, dv] = kernel_backward_varlen(aligned(grad_out).unsqueeze(0), qa.unsqueeze(0),
                                             ka.unsqueeze(0), va.unsqueeze(0),
                                             compact(out).unsqueeze(0), lse_k, seqs, causal, scale);
  return {dq.select(0, 0), dk.select(0, 0), dv.select(0, 0)};
}

}  // namespace longnet::engine

#endif  // LONGNET_WITH_CUDA || LONGNET_TESTING
