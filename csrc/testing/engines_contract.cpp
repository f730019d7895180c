// CPU contract engines `contract_cuda_flash`, `contract_cuda_efficient` and
// `contract_cuda_cudnn` (docs/operator.md, "Engines"): dense attention in float32 on
// CPU behind the same argument preparation as the CUDA engines (KernelEngine,
// csrc/engine/kernel_contract.cpp), with each kernel's input contract enforced and
// exploited as the CUDA kernel reads its arguments:
//
// * they raise where the kernel's TORCH_CHECKs raise (dtypes, head dims, a contiguous
//   last dimension, heads, int32 strides), and where the kernel would read misaligned
//   memory (16-byte loads) or cuDNN would fail (one query, one key, grad_out strides
//   unlike out's, a graph cached for other strides);
// * they read `out` and lse as the kernels do: the efficient kernel's 16-bit backward
//   reads `out` with row stride head_dim * num_heads, flash reads lse as a contiguous
//   (B, H, L) tensor, ...;
// * they return lse in the kernel's layout (flash (B, H, L); efficient (B, H, L
//   rounded up to 32), padding unspecified (NaN here); cuDNN (B, H, L, 1)) and align
//   causal masks as the kernel does (flash bottom-right; efficient with
//   custom_mask_type 1 and cuDNN top-left);
// * they make grad_out and out contiguous where ATen does (flash: both; efficient:
//   grad_out only; cuDNN: neither).
//
// Engines for tests: compiled into testing builds only (LONGNET_BUILD_TESTING=1,
// setup.py), never among the API's engine names, never chosen by `auto`; only forced
// (longnet.testing.use_engine, LONGNET_ENGINE).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

#include "engine/kernel_contract.h"

namespace longnet::engine {
namespace {

std::string strides_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.strides();
  return s.str();
}

class ContractEngine final : public KernelEngine {
 public:
  ContractEngine(Kernel kernel, const char* name) : KernelEngine(kernel), name_(name) {
    register_engine(this);
  }
  const char* name() const override { return name_; }
  bool for_tests() const override { return true; }

 protected:
  std::optional<std::string> device_cannot_run(const at::Tensor& q) const override {
    if (!q.device().is_cpu()) {
      return "it needs CPU tensors (it runs a CUDA kernel's contract on CPU), got " +
             q.device().str();
    }
    return std::nullopt;
  }

  std::tuple<at::Tensor, at::Tensor> kernel_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, bool causal,
                                                    double scale) const override {
    ++dense_calls_;
    return dense_forward(q, k, v, causal, scale);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const override {
    ++dense_calls_;
    return dense_backward(grad_out, q, k, v, out, lse, causal, scale);
  }

  // Varlen calls: the offsets' contract checked, then every sequence on the dense
  // kernel's code as a (1, L, H, D) view of the packed tensors, its lse written where
  // the varlen kernel writes it (flash (H, total_q); efficient (P, H, padded), the
  // padding NaN).
  std::tuple<at::Tensor, at::Tensor> kernel_forward_varlen(const at::Tensor& q_in,
                                                           const at::Tensor& k_in,
                                                           const at::Tensor& v_in,
                                                           const PackedSequences& seqs, bool causal,
                                                           double scale) const override {
    ++varlen_calls_;
    const at::Tensor q = varlen_rows(q_in, "query"), k = varlen_rows(k_in, "key"),
                     v = varlen_rows(v_in, "value");
    check_varlen(q, k, seqs);
    const int64_t heads = q.size(1), count = seqs.count();
    at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const auto f32 = q.options().dtype(at::kFloat);
    const bool flash = kernel() == Kernel::kFlash;
    at::Tensor lse = flash ? at::full({heads, q.size(0)}, nan, f32)
                           : at::full({count, heads, efficient_lse_length(seqs.max_q)}, nan, f32);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t q0 = seqs.host_q[i], lq = seqs.host_q[i + 1] - q0;
      const int64_t k0 = seqs.host_k[i], lk = seqs.host_k[i + 1] - k0;
      if (lq == 0) continue;
      TORCH_CHECK(lk > 0, label(), ": sequence ", i, " has queries and no keys");
      auto [o, l] =
          dense_forward(q.narrow(0, q0, lq).unsqueeze(0), k.narrow(0, k0, lk).unsqueeze(0),
                        v.narrow(0, k0, lk).unsqueeze(0), causal, scale);
      out.narrow(0, q0, lq).copy_(o.select(0, 0));
      if (flash) {
        lse.narrow(1, q0, lq).copy_(l.select(0, 0));
      } else {
        lse.select(0, i).narrow(1, 0, lq).copy_(l.select(0, 0).narrow(1, 0, lq));
      }
    }
    return {flash ? out : out.unsqueeze(0), lse};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward_varlen(
      const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
      const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
      const PackedSequences& seqs, bool causal, double scale) const override {
    ++varlen_calls_;
    const at::Tensor q = varlen_rows(q_in, "query"), k = varlen_rows(k_in, "key"),
                     v = varlen_rows(v_in, "value");
    const at::Tensor grad_out = varlen_rows(grad_out_in, "grad_out"),
                     out = varlen_rows(out_in, "out");
    check_varlen(q, k, seqs);
    const int64_t heads = q.size(1), count = seqs.count();
    TORCH_CHECK(lse_in.scalar_type() == at::kFloat, label(), ": logsumexp must be float32, got ",
                lse_in.scalar_type());
    if (kernel() == Kernel::kFlash) {
      // mha_varlen_bwd reads softmax_lse as (H, total_q) at head * total_q + row.
      TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == heads && lse_in.size(1) == q.size(0) &&
                      lse_in.is_contiguous(),
                  label(), ": softmax_lse must be a contiguous (", heads, ", ", q.size(0),
                  ") tensor, got ", lse_in.sizes(), " with strides ", strides_of(lse_in));
    } else {
      const int64_t padded = efficient_lse_length(seqs.max_q);
      TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == count && lse_in.size(1) == heads &&
                      lse_in.size(2) >= padded && lse_in.stride(2) == 1,
                  label(), ": logsumexp must be (", count, ", ", heads, ", >= ", padded, "), got ",
                  lse_in.sizes());
    }
    at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options()),
               dv = at::zeros(v.sizes(), v.options());
    for (int64_t i = 0; i < count; ++i) {
      const int64_t q0 = seqs.host_q[i], lq = seqs.host_q[i + 1] - q0;
      const int64_t k0 = seqs.host_k[i], lk = seqs.host_k[i + 1] - k0;
      if (lq == 0) continue;
      const at::Tensor lse_i = kernel() == Kernel::kFlash
                                   ? lse_in.narrow(1, q0, lq).unsqueeze(0).contiguous()
                                   : lse_in.select(0, i).unsqueeze(0);
      const auto rows = [&](const at::Tensor& t, int64_t r0, int64_t n) {
        return t.narrow(0, r0, n).unsqueeze(0);
      };
      auto [dqi, dki, dvi] =
          dense_backward(rows(grad_out, q0, lq), rows(q, q0, lq), rows(k, k0, lk), rows(v, k0, lk),
                         rows(out, q0, lq), lse_i, causal, scale);
      dq.narrow(0, q0, lq).copy_(dqi.select(0, 0));
      dk.narrow(0, k0, lk).copy_(dki.select(0, 0));
      dv.narrow(0, k0, lk).copy_(dvi.select(0, 0));
    }
    if (kernel() == Kernel::kFlash) return {dq, dk, dv};
    return {dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)};
  }

 private:
  std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, bool causal,
                                                   double scale) const {
    check_inputs(q, k, v);
    const int64_t bt = q.size(0), lq = q.size(1), heads = q.size(2);
    at::Tensor s = scores(q, k, causal, scale);
    at::Tensor lse = at::logsumexp(s, -1);  // (Bt, H, Lq)
    const at::Tensor p = probabilities(s, lse);
    const at::Tensor o = at::matmul(p, heads_first(v, heads / v.size(2)));
    at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
    out.copy_(o.transpose(1, 2));
    switch (kernel()) {
      case Kernel::kFlash:
        return {out, lse.contiguous()};
      case Kernel::kEfficient: {
        const int64_t padded =
            (lq + kEfficientLseAlign - 1) / kEfficientLseAlign * kEfficientLseAlign;
        at::Tensor l =
            at::full({bt, heads, padded}, std::numeric_limits<float>::quiet_NaN(), lse.options());
        l.narrow(2, 0, lq).copy_(lse);
        return {out, l};
      }
      case Kernel::kCudnn:
        return {out, lse.unsqueeze(-1).contiguous()};
    }
    return {out, lse};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
      const at::Tensor& grad_out_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out_in, const at::Tensor& lse_in, bool causal, double scale) const {
    check_inputs(q, k, v);
    const int64_t bt = q.size(0), lq = q.size(1), heads = q.size(2), dv = v.size(3);
    TORCH_CHECK(grad_out_in.sizes() == q.sizes() && out_in.sizes() == q.sizes(), label(),
                ": grad_out and out must have the shape of query ", q.sizes());
    TORCH_CHECK(
        grad_out_in.scalar_type() == q.scalar_type() && out_in.scalar_type() == q.scalar_type(),
        label(), ": query, out and dout must have the same dtype");
    TORCH_CHECK(lse_in.scalar_type() == at::kFloat, label(), ": logsumexp must be float32, got ",
                lse_in.scalar_type());
    at::Tensor grad_out = grad_out_in, out = out_in, lse;
    switch (kernel()) {
      case Kernel::kFlash:
        // attention_backward.cu: grad_out.contiguous(), out.contiguous().
        grad_out = grad_out.contiguous();
        out = out.contiguous();
        // mha_bwd reads softmax_lse at (b * h + head) * seqlen_q + row: contiguous.
        TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == bt && lse_in.size(1) == heads &&
                        lse_in.size(2) == lq,
                    label(), ": softmax_lse must have shape (", bt, ", ", heads, ", ", lq,
                    "), got ", lse_in.sizes());
        lse = lse_in.as_strided({bt, heads, lq}, {heads * lq, lq, 1});
        break;
      case Kernel::kEfficient: {
        // attention_backward.cu: grad_out.contiguous(), out as given.
        grad_out = grad_out.contiguous();
        const int64_t padded =
            (lq + kEfficientLseAlign - 1) / kEfficientLseAlign * kEfficientLseAlign;
        TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == bt && lse_in.size(1) == heads &&
                        lse_in.size(2) >= padded && lse_in.stride(2) == 1,
                    label(), ": logsumexp must be (", bt, ", ", heads, ", >= ", padded,
                    ") with rows padded to a multiple of ", kEfficientLseAlign, ", got ",
                    lse_in.sizes());
        TORCH_CHECK(
            (heads <= 1 || lse_in.stride(1) % 8 == 0) && (bt <= 1 || lse_in.stride(0) % 8 == 0),
            label(), ": LSE is not correctly aligned (strideH/strideB)");
        lse = lse_in.narrow(2, 0, lq);
        break;
      }
      case Kernel::kCudnn:
        TORCH_CHECK(lse_in.dim() == 4 && lse_in.size(0) == bt && lse_in.size(1) == heads &&
                        lse_in.size(2) == lq && lse_in.size(3) == 1,
                    label(), ": softmax statistics must be (", bt, ", ", heads, ", ", lq,
                    ", 1), got ", lse_in.sizes());
        check_cudnn_backward_layout(q, k, v, out, grad_out);
        lse = lse_in.select(3, 0);
        break;
    }
    check_aligned(out, "out");
    check_aligned(grad_out, "grad_out");

    // Delta = rowsum(dO * O), (Bt, H, Lq).
    at::Tensor out_read = out;
    if (kernel() == Kernel::kEfficient && q.scalar_type() != at::kFloat) {
      // kernel_backward.h: the 16-bit kernels compute Delta in the kernel
      // (kKernelComputesDelta) from out read with Params::o_strideM() =
      // head_dim_value * num_heads, o_strideH = out.stride(2), o_strideB = out.stride(0).
      out_read = out.as_strided(out.sizes(), {out.stride(0), heads * dv, out.stride(2), 1},
                                out.storage_offset());
    }
    const at::Tensor delta =
        (grad_out.to(at::kFloat) * out_read.to(at::kFloat)).sum(-1).transpose(1, 2);

    const int64_t group = heads / k.size(2);
    const at::Tensor qh = heads_first(q, 1), kh = heads_first(k, group), vh = heads_first(v, group),
                     doh = heads_first(grad_out, 1);
    const at::Tensor p = probabilities(scores(q, k, causal, scale), lse.to(at::kFloat));
    const at::Tensor dvh = at::matmul(p.transpose(-1, -2), doh);
    const at::Tensor ds =
        at::matmul(doh, vh.transpose(-1, -2)).sub_(delta.unsqueeze(-1)).mul_(p).mul_(scale);
    const at::Tensor dqh = at::matmul(ds, kh);
    const at::Tensor dkh = at::matmul(ds.transpose(-1, -2), qh);
    return {to_input(dqh, q, 1), to_input(dkh, k, group), to_input(dvh, v, group)};
  }

 public:
  // The kernel calls alone, without KernelEngine's argument preparation (the test
  // operators below).
  std::tuple<at::Tensor, at::Tensor> raw_forward(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, bool causal,
                                                 double scale) const {
    return kernel_forward(q, k, v, causal, scale);
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> raw_backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const {
    return kernel_backward(grad_out, q, k, v, out, lse, causal, scale);
  }
  std::tuple<at::Tensor, at::Tensor> raw_forward_varlen(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        const PackedSequences& seqs, bool causal,
                                                        double scale) const {
    return kernel_forward_varlen(q, k, v, seqs, causal, scale);
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> raw_backward_varlen(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, const PackedSequences& seqs, bool causal,
      double scale) const {
    return kernel_backward_varlen(grad_out, q, k, v, out, lse, seqs, causal, scale);
  }
  // (dense kernel calls, varlen kernel calls) since the process started.
  std::vector<int64_t> calls() const { return {dense_calls_.load(), varlen_calls_.load()}; }

 private:
  // The (T, H, D) rows of a varlen argument in the kernel's shape: flash takes (T, H,
  // D) (mha_varlen_fwd), the efficient kernel (1, T, H, D) ("cu_seqlen only supports
  // batch_size=1").
  at::Tensor varlen_rows(const at::Tensor& t, const char* arg) const {
    if (kernel() == Kernel::kFlash) {
      TORCH_CHECK(t.dim() == 3, label(), ": varlen ", arg, " must be (total, H, D), got ",
                  t.sizes());
      return t;
    }
    TORCH_CHECK(t.dim() == 4 && t.size(0) == 1, label(), ": cu_seqlen only supports batch_size=1, ",
                arg, " of shape ", t.sizes());
    return t.select(0, 0);
  }

  // The varlen kernels' offsets (flash_api.cpp mha_varlen_fwd/bwd; attention.cu with
  // cu_seqlens): int32, contiguous, on the inputs' device, (P+1,) with P >= 1 and P in
  // a grid dimension. The kernels read them unchecked, so the values are checked here
  // as a GPU would misread them: rows past the tensors, or max_seqlen below a length
  // (the grid is sized from max_seqlen: rows past it are never computed).
  void check_varlen(const at::Tensor& q, const at::Tensor& k, const PackedSequences& s) const {
    for (const at::Tensor* cu : {&s.cu_q, &s.cu_k}) {
      const char* arg = cu == &s.cu_q ? "cu_seqlens_q" : "cu_seqlens_k";
      TORCH_CHECK(cu->scalar_type() == at::kInt, label(), ": ", arg, " must have dtype int32, got ",
                  cu->scalar_type());
      TORCH_CHECK(cu->device() == q.device(), label(), ": ", arg,
                  " must be on the device of the inputs");
      TORCH_CHECK(cu->dim() == 1 && cu->is_contiguous(), label(), ": ", arg,
                  " must be a contiguous 1-d tensor");
    }
    TORCH_CHECK(s.cu_q.size(0) == s.cu_k.size(0) && s.cu_q.size(0) >= 2, label(),
                ": cu_seqlens_q and cu_seqlens_k must be (P+1,) with P >= 1, got ", s.cu_q.sizes(),
                " and ", s.cu_k.sizes());
    TORCH_CHECK(s.cu_q.size(0) - 1 <= kMaxGridBatch, label(), ": ", s.cu_q.size(0) - 1,
                " sequences exceed the 65535 blocks of a grid dimension");
    TORCH_CHECK(at::equal(s.cu_q.to(at::kLong), at::tensor(s.host_q, at::kLong)) &&
                    at::equal(s.cu_k.to(at::kLong), at::tensor(s.host_k, at::kLong)),
                label(), ": the offsets differ from their host copies");
    const auto check = [&](const std::vector<int64_t>& cu, int64_t total, int64_t max_len,
                           const char* arg, const char* max_arg) {
      TORCH_CHECK(cu.front() == 0 && cu.back() == total, label(), ": ", arg,
                  " must run from 0 to the packed rows (", total, "), got ", cu.front(), " .. ",
                  cu.back());
      for (size_t i = 0; i + 1 < cu.size(); ++i) {
        TORCH_CHECK(cu[i] <= cu[i + 1], label(), ": ", arg, " must be nondecreasing at ", i);
        TORCH_CHECK(cu[i + 1] - cu[i] <= max_len, label(), ": sequence ", i, " has ",
                    cu[i + 1] - cu[i], " rows, more than ", max_arg, " = ", max_len,
                    ": the kernel's grid would leave its last rows unwritten");
      }
    };
    check(s.host_q, q.size(0), s.max_q, "cu_seqlens_q", "max_seqlen_q");
    check(s.host_k, k.size(0), s.max_k, "cu_seqlens_k", "max_seqlen_k");
  }

  std::string label() const {
    return std::string("longnet: ") + name_ + " (" + kernel_label(kernel()) + ")";
  }

  void check_aligned(const at::Tensor& t, const char* arg) const {
    TORCH_CHECK(is_aligned(t), label(), ": misaligned address: the kernel reads ", arg,
                " with 16-byte loads, but its data pointer (",
                reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kAlignBytes,
                " bytes past a 16-byte boundary) or one of its strides ", strides_of(t),
                " (elements of ", t.element_size(),
                " bytes) is not a multiple of 16 bytes; on a GPU this read faults");
  }

  // The kernels' argument checks (flash_api.cpp mha_fwd/mha_bwd;
  // attention.cu/attention_backward.cu and kernel_backward.h check_supported;
  // sdp_utils.cpp check_cudnn_tensor_shapes, MHA.cpp check_cudnn_sdpa_decode).
  void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const {
    const at::ScalarType t = q.scalar_type();
    TORCH_CHECK(k.scalar_type() == t && v.scalar_type() == t, label(),
                ": query, key and value must have the same dtype");
    const bool f32 = kernel() == Kernel::kEfficient;
    TORCH_CHECK(t == at::kBFloat16 || t == at::kHalf || (f32 && t == at::kFloat), label(),
                ": only ", f32 ? "fp32, " : "", "fp16 and bf16 data types are supported, got ", t);
    for (const at::Tensor* x : {&q, &k, &v}) {
      TORCH_CHECK(x->dim() == 4 && x->stride(3) == 1, label(),
                  ": input tensors must have contiguous last dimension");
    }
    TORCH_CHECK(k.size(0) == q.size(0) && v.sizes() == k.sizes() && k.size(3) == q.size(3), label(),
                ": query, key and value shapes do not match");
    const int64_t d = q.size(3);
    const int64_t max_dim = kernel() == Kernel::kCudnn ? 128 : 256;
    TORCH_CHECK(d % (t == at::kFloat ? 4 : 8) == 0 && d > 0 && d <= max_dim, label(),
                ": head dim must be a multiple of ", t == at::kFloat ? 4 : 8, " and at most ",
                max_dim, ", got ", d);
    TORCH_CHECK(q.size(0) <= kMaxGridBatch, label(), ": batch ", q.size(0),
                " exceeds the 65535 blocks of a grid dimension");
    if (kernel() == Kernel::kEfficient) {
      TORCH_CHECK(q.size(2) == k.size(2), label(), ": query and key must have the same heads");
      for (const at::Tensor* x : {&q, &k, &v}) {
        TORCH_CHECK(x->stride(1) < kInt32Max && x->stride(2) < kInt32Max, label(), ": stride ",
                    strides_of(*x), " overflows (int32 strideM/strideH)");
      }
    } else {
      TORCH_CHECK(q.size(2) % k.size(2) == 0, label(),
                  ": number of heads in key/value must divide number of heads in query");
    }
    if (kernel() == Kernel::kCudnn) {
      TORCH_CHECK(q.size(1) != 1, label(),
                  ": cuDNN SDPA decode (one query) is disabled for some cuDNN versions and GPUs");
      TORCH_CHECK(k.size(1) != 1, label(),
                  ": cudnn SDPA does not support key/value sequence length 1");
      for (const at::Tensor* x : {&q, &k, &v}) {
        TORCH_CHECK(largest_stride(*x) < kInt32Max, label(), ": stride ", strides_of(*x),
                    " does not fit the int strides of cuDNN's graph cache key");
      }
    }
    check_aligned(q, "query");
    check_aligned(k, "key");
    check_aligned(v, "value");
  }

  // MHA.cpp run_cudnn_SDP_bprop: cuDNN < 9.5.1 asserts grad_out.strides() ==
  // out.strides() (sizes-1 dimensions left out, same_strides), and a graph cache key
  // of only (sizes, q, k, v strides as int) reuses the graph of the first call with
  // other out/grad_out strides. Both are enforced here for every cuDNN version.
  void check_cudnn_backward_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& out, const at::Tensor& grad_out) const {
    const auto no_ones = [](const at::Tensor& t) {
      std::vector<int64_t> s;
      for (int64_t d = 0; d < t.dim(); ++d) {
        if (t.size(d) > 1) s.push_back(t.stride(d));
      }
      return s;
    };
    TORCH_CHECK(no_ones(out) == no_ones(grad_out), label(),
                ": cuDNN SDPA expected grad_output.strides() == output.strides() (cuDNN < "
                "9.5.1), got ",
                strides_of(grad_out), " and ", strides_of(out));
    std::vector<int64_t> key{q.size(0),
                             q.size(1),
                             q.size(2),
                             k.size(1),
                             k.size(2),
                             q.size(3),
                             static_cast<int64_t>(q.scalar_type())};
    for (const at::Tensor* x : {&q, &k, &v}) {
      for (int64_t d = 0; d < 4; ++d) key.push_back(static_cast<int32_t>(x->stride(d)));
    }
    std::vector<int64_t> layout = no_ones(out);
    static std::mutex mutex;
    static std::map<std::vector<int64_t>, std::vector<int64_t>> graphs;
    const std::lock_guard<std::mutex> lock(mutex);
    if (graphs.size() > 4096) graphs.clear();
    const auto it = graphs.emplace(key, layout).first;
    TORCH_CHECK(it->second == layout, label(),
                ": cuDNN's graph cache (keyed by q, k, v sizes and int strides) holds a graph "
                "built for out/grad_out strides unlike ",
                strides_of(out), "; it would run with the wrong strides");
  }

  // (Bt, H, Lq, Lk) float32 scores, masked as the kernel aligns causal masks.
  at::Tensor scores(const at::Tensor& q, const at::Tensor& k, bool causal, double scale) const {
    const int64_t heads = q.size(2), lq = q.size(1), lk = k.size(1);
    at::Tensor s =
        at::matmul(heads_first(q, 1), heads_first(k, heads / k.size(2)).transpose(-1, -2))
            .mul_(scale);
    if (causal) {
      // Flash: bottom-right (query i sees keys <= i + Lk - Lq); the efficient kernel
      // with custom_mask_type 1 (CausalFromTopLeft) and cuDNN's set_causal_mask:
      // top-left (keys <= i).
      const int64_t shift = kernel() == Kernel::kFlash ? lk - lq : 0;
      const at::Tensor qi = at::arange(lq, q.options().dtype(at::kLong)).unsqueeze(1);
      const at::Tensor ki = at::arange(lk, q.options().dtype(at::kLong)).unsqueeze(0);
      s.masked_fill_(ki > qi + shift, -std::numeric_limits<float>::infinity());
    }
    return s;
  }

  // exp(s - lse), 0 where a row has no key (lse = -inf).
  static at::Tensor probabilities(const at::Tensor& s, const at::Tensor& lse) {
    const at::Tensor l = at::where(at::isinf(lse), at::zeros_like(lse), lse).unsqueeze(-1);
    return (s - l).exp_().masked_fill_(at::isneginf(s), 0);
  }

  // (Bt, L, H', D) -> float32 (Bt, H' * group, L, D), each head repeated group times.
  static at::Tensor heads_first(const at::Tensor& t, int64_t group) {
    at::Tensor x = t.to(at::kFloat).transpose(1, 2);
    return group > 1 ? x.repeat_interleave(group, 1) : x;
  }

  // float32 (Bt, H' * group, L, D) -> like t, (Bt, L, H', D), groups summed.
  static at::Tensor to_input(const at::Tensor& g, const at::Tensor& t, int64_t group) {
    at::Tensor x = g;
    if (group > 1) x = x.reshape({t.size(0), t.size(2), group, t.size(1), t.size(3)}).sum(2);
    at::Tensor r = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
    r.copy_(x.transpose(1, 2));
    return r;
  }

  const char* name_;
  mutable std::atomic<int64_t> dense_calls_{0}, varlen_calls_{0};
};

const ContractEngine contract_flash(Kernel::kFlash, "contract_cuda_flash");
const ContractEngine contract_efficient(Kernel::kEfficient, "contract_cuda_efficient");
const ContractEngine contract_cudnn(Kernel::kCudnn, "contract_cuda_cudnn");

const ContractEngine& contract_engine(const std::string& name) {
  const ContractEngine* found = nullptr;
  for (const ContractEngine* e : {&contract_flash, &contract_efficient, &contract_cudnn}) {
    if (name == e->name()) found = e;
  }
  TORCH_CHECK(found != nullptr, "longnet: no contract engine named '", name, "'");
  return *found;
}

// Test operators (tests/test_contract_engines.py): one contract engine's kernel call on
// (Bt, L, H, D) tensors exactly as given, lse in the kernel's layout.
std::tuple<at::Tensor, at::Tensor> contract_kernel_forward(const std::string& engine,
                                                           const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, bool causal,
                                                           double scale) {
  return contract_engine(engine).raw_forward(q, k, v, causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contract_kernel_backward(
    const std::string& engine, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) {
  return contract_engine(engine).raw_backward(grad_out, q, k, v, out, lse, causal, scale);
}

PackedSequences packed(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                       int64_t max_k) {
  const auto host = [](const at::Tensor& t) {
    const at::Tensor h = t.to(at::kCPU, at::kLong).contiguous();
    return std::vector<int64_t>(h.data_ptr<int64_t>(), h.data_ptr<int64_t>() + h.numel());
  };
  return PackedSequences{cu_q, cu_k, max_q, max_k, host(cu_q), host(cu_k)};
}

std::tuple<at::Tensor, at::Tensor> contract_kernel_forward_varlen(
    const std::string& engine, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k, bool causal,
    double scale) {
  return contract_engine(engine).raw_forward_varlen(q, k, v, packed(cu_q, cu_k, max_q, max_k),
                                                    causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contract_kernel_backward_varlen(
    const std::string& engine, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, bool causal, double scale) {
  return contract_engine(engine).raw_backward_varlen(
      grad_out, q, k, v, out, lse, packed(cu_q, cu_k, max_q, max_k), causal, scale);
}

std::vector<int64_t> contract_kernel_calls(const std::string& engine) {
  return contract_engine(engine).calls();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(longnet, m) {
  m.def(
      "_contract_kernel_forward_varlen(str engine, Tensor q, Tensor k, Tensor v, Tensor cu_q, "
      "Tensor cu_k, int max_q, int max_k, bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "_contract_kernel_backward_varlen(str engine, Tensor grad_out, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, Tensor cu_q, Tensor cu_k, int max_q, int max_k, "
      "bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("_contract_kernel_calls(str engine) -> int[]", &contract_kernel_calls);
  m.def(
      "_contract_kernel_forward(str engine, Tensor q, Tensor k, Tensor v, bool causal, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "_contract_kernel_backward(str engine, Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(longnet, CPU, m) {
  m.impl("_contract_kernel_forward", &contract_kernel_forward);
  m.impl("_contract_kernel_backward", &contract_kernel_backward);
  m.impl("_contract_kernel_forward_varlen", &contract_kernel_forward_varlen);
  m.impl("_contract_kernel_backward_varlen", &contract_kernel_backward_varlen);
}

}  // namespace longnet::engine
