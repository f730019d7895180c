// Argument checks and output allocation shared by the CPU and CUDA operators.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"

namespace longnet {

// LONGNET_POISON_OUTPUTS=1 fills freshly allocated outputs with NaN, so tests
// catch any element a kernel forgets to write (read once).
inline void maybe_poison(std::initializer_list<at::Tensor> outputs) {
  static const bool poison = [] {
    const char* env = std::getenv("LONGNET_POISON_OUTPUTS");
    return env != nullptr && env[0] != '\0' && env[0] != '0';
  }();
  if (!poison) return;
  for (const at::Tensor& t : outputs) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

// float64 inputs keep float64 statistics; every other dtype accumulates in float32.
inline at::ScalarType accumulate_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor empty_contiguous_like(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
}

// (out, lse) of the forward, poisoned when asked.
inline std::tuple<at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& q) {
  at::Tensor out = empty_contiguous_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(accumulate_dtype(q)));
  maybe_poison({out, lse});
  return {out, lse};
}

// (dq, dk, dv) of the backward, poisoned when asked.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_backward_outputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  at::Tensor dq = empty_contiguous_like(q), dk = empty_contiguous_like(k),
             dv = empty_contiguous_like(v);
  maybe_poison({dq, dk, dv});
  return {dq, dk, dv};
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                const at::Tensor& q, const at::Tensor& out,
                                const at::Tensor& lse) {
  for (const at::Tensor* t : {&grad_out, &grad_lse, &out, &lse}) {
    TORCH_CHECK(t->device() == q.device(),
                "longnet: grad_out, grad_lse, out and lse must be on the device of q (",
                q.device(), "), got ", t->device());
  }
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "longnet: grad_out and out must have the shape of q ", q.sizes());
  const std::vector<int64_t> lse_shape{q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK(grad_lse.sizes() == lse_shape && lse.sizes() == lse_shape,
              "longnet: grad_lse and lse must have shape (B, H, Nq) = ", lse_shape);
}

// The backward's row-wise inputs as contiguous tensors of the kernels' dtypes:
// grad_out and out in the input dtype, lse and grad_lse in the accumulation dtype.
struct BackwardRows {
  at::Tensor grad_out, out, lse, grad_lse;
  BackwardRows(const at::Tensor& q, const at::Tensor& grad_out_in, const at::Tensor& out_in,
               const at::Tensor& lse_in, const at::Tensor& grad_lse_in)
      : grad_out(grad_out_in.to(q.scalar_type()).contiguous()),
        out(out_in.to(q.scalar_type()).contiguous()),
        lse(lse_in.to(accumulate_dtype(q)).contiguous()),
        grad_lse(grad_lse_in.to(accumulate_dtype(q)).contiguous()) {}
};

}  // namespace longnet
