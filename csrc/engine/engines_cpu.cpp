// Dense engines without device-specific code: `math` (plain ATen matmul and softmax
// on any device and dtype) and `cpu_flash` (ATen's CPU flash attention).
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "engine/engine.h"
#include "op_common.h"

namespace longnet::engine {
namespace {

// Score elements (batch x heads x queries x keys) one step of `math` holds.
constexpr int64_t kMathScoreBudget = int64_t{1} << 22;

// Plain matmul/softmax in the accumulation dtype, in chunks of batch and queries so
// that the score matrix of one chunk stays within kMathScoreBudget elements.
class MathEngine final : public DenseEngine {
 public:
  MathEngine() { register_engine(this); }
  const char* name() const override { return "math"; }
  std::optional<std::string> cannot_run(const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&) const override {
    return std::nullopt;
  }

  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, bool causal,
                                             double scale) const override {
    const at::ScalarType acc = accumulate_dtype(q);
    const int64_t bt = q.size(0), lq = q.size(1), heads = q.size(2);
    at::Tensor out = at::empty(q.sizes(), q.options());
    at::Tensor lse = at::empty({bt, heads, lq}, q.options().dtype(acc));
    const at::Tensor qh = q.transpose(1, 2), kh = k.transpose(1, 2), vh = v.transpose(1, 2);
    for_each_chunk(q, k, [&](int64_t b0, int64_t b1, int64_t q0, int64_t q1) {
      const int64_t kend = causal ? q1 : k.size(1);
      const at::Tensor kc = kh.slice(0, b0, b1).slice(2, 0, kend).to(acc);
      at::Tensor s = at::matmul(qh.slice(0, b0, b1).slice(2, q0, q1).to(acc), kc.transpose(-1, -2))
                         .mul_(scale);
      if (causal)
        s.masked_fill_(causal_mask(q0, q1, kend, q.device()),
                       -std::numeric_limits<double>::infinity());
      const at::Tensor l = at::logsumexp(s, -1);
      const at::Tensor o =
          at::matmul(s.sub_(l.unsqueeze(-1)).exp_(), vh.slice(0, b0, b1).slice(2, 0, kend).to(acc));
      out.slice(0, b0, b1).slice(1, q0, q1).copy_(o.transpose(1, 2));
      lse.slice(0, b0, b1).slice(2, q0, q1).copy_(l);
    });
    return {out, lse};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const override {
    const at::ScalarType acc = accumulate_dtype(q);
    const at::Tensor qh = q.transpose(1, 2), kh = k.transpose(1, 2), vh = v.transpose(1, 2);
    const at::Tensor doh = grad_out.transpose(1, 2);
    // Delta = rowsum(grad_out * out), (Bt, Hh, Lq).
    const at::Tensor delta = (grad_out.to(acc) * out.to(acc)).sum(-1).transpose(1, 2);
    at::Tensor dq = at::zeros(qh.sizes(), q.options().dtype(acc));
    at::Tensor dk = at::zeros(kh.sizes(), k.options().dtype(acc));
    at::Tensor dv = at::zeros(vh.sizes(), v.options().dtype(acc));
    for_each_chunk(q, k, [&](int64_t b0, int64_t b1, int64_t q0, int64_t q1) {
      const int64_t kend = causal ? q1 : k.size(1);
      const at::Tensor qc = qh.slice(0, b0, b1).slice(2, q0, q1).to(acc);
      const at::Tensor kc = kh.slice(0, b0, b1).slice(2, 0, kend).to(acc);
      const at::Tensor vc = vh.slice(0, b0, b1).slice(2, 0, kend).to(acc);
      const at::Tensor doc = doh.slice(0, b0, b1).slice(2, q0, q1).to(acc);
      at::Tensor s = at::matmul(qc, kc.transpose(-1, -2)).mul_(scale);
      if (causal)
        s.masked_fill_(causal_mask(q0, q1, kend, q.device()),
                       -std::numeric_limits<double>::infinity());
      const at::Tensor p =
          s.sub_(lse.slice(0, b0, b1).slice(2, q0, q1).to(acc).unsqueeze(-1)).exp_();
      dv.slice(0, b0, b1).slice(2, 0, kend).add_(at::matmul(p.transpose(-1, -2), doc));
      at::Tensor ds = at::matmul(doc, vc.transpose(-1, -2))
                          .sub_(delta.slice(0, b0, b1).slice(2, q0, q1).unsqueeze(-1))
                          .mul_(p)
                          .mul_(scale);
      dq.slice(0, b0, b1).slice(2, q0, q1).add_(at::matmul(ds, kc));
      dk.slice(0, b0, b1).slice(2, 0, kend).add_(at::matmul(ds.transpose(-1, -2), qc));
    });
    return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
  }

 private:
  // True above the diagonal of a square causal problem: query i (of q0 .. q1) sees
  // keys 0 .. i.
  static at::Tensor causal_mask(int64_t q0, int64_t q1, int64_t nk, at::Device device) {
    const at::Tensor qi = at::arange(q0, q1, at::TensorOptions().dtype(at::kLong).device(device));
    const at::Tensor ki = at::arange(nk, at::TensorOptions().dtype(at::kLong).device(device));
    return ki.unsqueeze(0) > qi.unsqueeze(1);
  }

  template <typename F>
  static void for_each_chunk(const at::Tensor& q, const at::Tensor& k, F&& f) {
    const int64_t bt = q.size(0), lq = q.size(1), heads = q.size(2),
                  lk = std::max<int64_t>(k.size(1), 1);
    const int64_t per_query = heads * lk;
    const int64_t q_chunk =
        std::clamp<int64_t>(kMathScoreBudget / per_query, 1, std::max<int64_t>(lq, 1));
    const int64_t b_chunk =
        q_chunk < lq
            ? 1
            : std::max<int64_t>(1, kMathScoreBudget / (per_query * std::max<int64_t>(lq, 1)));
    for (int64_t b0 = 0; b0 < bt; b0 += b_chunk) {
      for (int64_t q0 = 0; q0 < lq; q0 += q_chunk) {
        f(b0, std::min(bt, b0 + b_chunk), q0, std::min(lq, q0 + q_chunk));
      }
    }
  }
};

// ATen's CPU flash attention (_scaled_dot_product_flash_attention_for_cpu), which
// takes (B, H, L, D) strided views: the (Bt, L, Hh, D) views transposed.
class CpuFlashEngine final : public DenseEngine {
 public:
  CpuFlashEngine() { register_engine(this); }
  const char* name() const override { return "cpu_flash"; }
  std::optional<std::string> cannot_run(const at::Tensor& q, const at::Tensor&,
                                        const at::Tensor&) const override {
    if (!q.device().is_cpu()) return "it needs CPU tensors, got " + q.device().str();
    return std::nullopt;
  }

  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, bool causal,
                                             double scale) const override {
    at::Tensor out, lse;
    std::tie(out, lse) = at::_scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, std::nullopt, scale);
    return {out.transpose(1, 2), lse};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const override {
    at::Tensor dq, dk, dv;
    std::tie(dq, dk, dv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        out.transpose(1, 2), lse, 0.0, causal, std::nullopt, scale);
    return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
  }
};

const MathEngine math_engine_instance;
const CpuFlashEngine cpu_flash_engine;

}  // namespace

const DenseEngine& math_engine() { return math_engine_instance; }

}  // namespace longnet::engine
