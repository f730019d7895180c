// Argument checks shared by the CPU and CUDA kernels. The Python wrapper raises
// friendlier ValueErrors first; these guard direct calls of torch.ops.longnet.*.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace longnet {

inline void check_patterns(at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates) {
  TORCH_CHECK(!segment_lengths.empty(), "longnet: segment_lengths must not be empty");
  TORCH_CHECK(segment_lengths.size() == dilation_rates.size(),
              "longnet: segment_lengths and dilation_rates must have the same length, got ",
              segment_lengths.size(), " and ", dilation_rates.size());
  for (size_t i = 0; i < segment_lengths.size(); ++i) {
    const int64_t w = segment_lengths[i], r = dilation_rates[i];
    TORCH_CHECK(w >= 1, "longnet: segment_lengths[", i, "] must be >= 1, got ", w);
    TORCH_CHECK(r >= 1, "longnet: dilation_rates[", i, "] must be >= 1, got ", r);
    TORCH_CHECK(r <= w, "longnet: dilation_rates[", i, "] (", r,
                ") must not exceed segment_lengths[", i, "] (", w, ")");
  }
}

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4, "longnet: q must have shape (B, Nq, H, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "longnet: k must have shape (B, Nk, Hk, D), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "longnet: v must have the shape of k ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()),
              "longnet: q must be a floating-point tensor, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "longnet: q, k and v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "longnet: q, k and v must be on one device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  TORCH_CHECK(k.size(0) == q.size(0), "longnet: k batch size ", k.size(0),
              " differs from q batch size ", q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "longnet: k head dim ", k.size(3),
              " differs from q head dim ", q.size(3));
  TORCH_CHECK(q.size(1) <= k.size(1), "longnet: q has more positions (", q.size(1), ") than k (",
              k.size(1), ")");
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, "longnet: q heads (", q.size(2),
              ") must be a multiple of k heads (", k.size(2), ")");
  TORCH_CHECK(std::isfinite(scale), "longnet: scale must be finite, got ", scale);
}

}  // namespace longnet
