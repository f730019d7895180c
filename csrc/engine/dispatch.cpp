// The operators' CPU (and, in a CUDA build, CUDA) implementations: check the
// arguments, pick the engine of the call (engine.h, choose_engine), run it (packed
// documents one by one, or together on an engine with varlen calls) and record which
// engine ran.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "engine/engine.h"
#include "op_common.h"

namespace longnet::engine {
namespace {

// A dense engine with varlen calls (engine.h, has_varlen), or nullptr.
const DenseEngine* varlen_engine(const Engine& engine) {
  const auto* dense = dynamic_cast<const DenseEngine*>(&engine);
  return dense != nullptr && dense->has_varlen() ? dense : nullptr;
}

// Packed documents: every document is its own problem (its first key at
// position_offset; args has no key ranges, Documents checked), run on views of the
// packed tensors and written into the packed outputs. Every query row belongs to one
// document, so every output row is written. An engine with varlen calls runs the
// problems of all documents together (composed_documents_forward/_backward).
std::tuple<at::Tensor, at::Tensor> documents_forward(const Engine& engine, const Documents& docs,
                                                     const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, const Arguments& args) {
  if (const DenseEngine* dense = varlen_engine(engine)) {
    return composed_documents_forward(*dense, docs.q, docs.k, q, k, v, args);
  }
  auto [out, lse] = allocate_forward_outputs(q);
  for (int64_t i = 0; i < docs.count(); ++i) {
    const int64_t q0 = docs.q[i], nq = docs.q[i + 1] - q0;
    const int64_t k0 = docs.k[i], nk = docs.k[i + 1] - k0;
    if (nq == 0) continue;
    const auto [o, l] =
        engine.run_forward(q.narrow(1, q0, nq), k.narrow(1, k0, nk), v.narrow(1, k0, nk), args);
    out.narrow(1, q0, nq).copy_(o);
    lse.narrow(2, q0, nq).copy_(l);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> documents_backward(
    const Engine& engine, const Documents& docs, const at::Tensor& grad_out,
    const at::Tensor& grad_lse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const Arguments& args) {
  if (const DenseEngine* dense = varlen_engine(engine)) {
    return composed_documents_backward(*dense, docs.q, docs.k, grad_out, grad_lse, q, k, v, out,
                                       lse, args);
  }
  auto [dq, dk, dv] = allocate_backward_outputs(q, k, v);
  for (int64_t i = 0; i < docs.count(); ++i) {
    const int64_t q0 = docs.q[i], nq = docs.q[i + 1] - q0;
    const int64_t k0 = docs.k[i], nk = docs.k[i + 1] - k0;
    if (nq == 0) {  // keys no query reads
      dk.narrow(1, k0, nk).zero_();
      dv.narrow(1, k0, nk).zero_();
      continue;
    }
    const auto [dqi, dki, dvi] = engine.run_backward(
        grad_out.narrow(1, q0, nq), grad_lse.defined() ? grad_lse.narrow(2, q0, nq) : at::Tensor(),
        q.narrow(1, q0, nq), k.narrow(1, k0, nk), v.narrow(1, k0, nk), out.narrow(1, q0, nq),
        lse.narrow(2, q0, nq), args);
    dq.narrow(1, q0, nq).copy_(dqi);
    dk.narrow(1, k0, nk).copy_(dki);
    dv.narrow(1, k0, nk).copy_(dvi);
  }
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef segment_lengths,
    at::IntArrayRef dilation_rates, bool is_causal, double scale, int64_t position_offset,
    const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k) {
  check_qkv(q, k, v, scale);
  check_patterns(segment_lengths, dilation_rates);
  check_position_offset(position_offset);
  const Documents docs(cu_seqlens_q, cu_seqlens_k, q, k, key_start, key_end);
  const Arguments args{segment_lengths, dilation_rates, is_causal, scale,
                       position_offset, key_start,      key_end};
  const Engine& engine = choose_engine(q, k, v);
  auto result = docs.defined() ? documents_forward(engine, docs, q, k, v, args)
                               : engine.run_forward(q, k, v, args);
  record_engine(engine.name());
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse_in, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates, bool is_causal, double scale,
    int64_t position_offset, const std::optional<at::Tensor>& key_start,
    const std::optional<at::Tensor>& key_end, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k) {
  check_qkv(q, k, v, scale);
  check_patterns(segment_lengths, dilation_rates);
  check_position_offset(position_offset);
  // Undefined when the loss does not read lse.
  const at::Tensor grad_lse = grad_lse_in.has_value() ? *grad_lse_in : at::Tensor();
  check_backward_args(grad_out, grad_lse, q, out, lse);
  const Documents docs(cu_seqlens_q, cu_seqlens_k, q, k, key_start, key_end);
  const Arguments args{segment_lengths, dilation_rates, is_causal, scale,
                       position_offset, key_start,      key_end};
  const Engine& engine = choose_engine(q, k, v);
  auto result = docs.defined()
                    ? documents_backward(engine, docs, grad_out, grad_lse, q, k, v, out, lse, args)
                    : engine.run_backward(grad_out, grad_lse, q, k, v, out, lse, args);
  record_engine(engine.name());
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
