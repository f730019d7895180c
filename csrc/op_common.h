// Argument checks and output allocation shared by the CPU and CUDA operators.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <optional>
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

#ifdef LONGNET_TESTING
// Testing builds (LONGNET_BUILD_TESTING=1, setup.py): LONGNET_DEBUG_SKIP_ROW=1 makes
// the fused kernels never initialise row (b=0, q=0, head=0) of their outputs (no
// store, zeroing or final write; in-place accumulation only adds to it), so tests can
// show that the poison above catches an element the kernels never set (read once).
inline bool debug_skip_first_row() {
  static const bool skip = [] {
    const char* env = std::getenv("LONGNET_DEBUG_SKIP_ROW");
    return env != nullptr && env[0] != '\0' && env[0] != '0';
  }();
  return skip;
}
#else
// Other builds write every row: the switch above does not exist there.
constexpr bool debug_skip_first_row() { return false; }
#endif

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
  at::Tensor lse =
      at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(accumulate_dtype(q)));
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

// grad_lse may be undefined (the loss does not read lse).
inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  for (const at::Tensor* t : {&grad_out, &grad_lse, &out, &lse}) {
    if (!t->defined()) continue;
    TORCH_CHECK(t->device() == q.device(),
                "longnet: grad_out, grad_lse, out and lse must be on the device of q (", q.device(),
                "), got ", t->device());
  }
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "longnet: grad_out and out must have the shape of q ", q.sizes());
  const std::vector<int64_t> lse_shape{q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK((!grad_lse.defined() || grad_lse.sizes() == lse_shape) && lse.sizes() == lse_shape,
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

// Per-row key ranges as contiguous int64 tensors on the device of q and on the host
// (undefined when absent), checked: shape (B,), integer dtype, device of q, and
// 0 <= key_start <= key_end <= Nk (read on the host: a synchronisation on CUDA).
struct KeyRanges {
  at::Tensor start, end;            // on the device of q
  at::Tensor start_host, end_host;  // the same values on the host
  KeyRanges(const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end,
            const at::Tensor& q, int64_t nk) {
    start = prepare(key_start, "key_start", q);
    end = prepare(key_end, "key_end", q);
    if (!start.defined() && !end.defined()) return;
    const int64_t batch = q.size(0);
    if (start.defined()) start_host = start.cpu();
    if (end.defined()) end_host = end.cpu();
    const at::Tensor s_host = start.defined() ? start_host : at::zeros({batch}, at::kLong);
    const at::Tensor e_host = end.defined() ? end_host : at::full({batch}, nk, at::kLong);
    const int64_t* s = s_host.data_ptr<int64_t>();
    const int64_t* e = e_host.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(0 <= s[b] && s[b] <= e[b] && e[b] <= nk,
                  "longnet: key ranges must satisfy 0 <= key_start <= key_end <= Nk (", nk,
                  "), got key_start[", b, "] = ", s[b], ", key_end[", b, "] = ", e[b]);
    }
  }
  const int64_t* start_ptr() const { return start.defined() ? start.data_ptr<int64_t>() : nullptr; }
  const int64_t* end_ptr() const { return end.defined() ? end.data_ptr<int64_t>() : nullptr; }
  const int64_t* host_start_ptr() const {
    return start_host.defined() ? start_host.data_ptr<int64_t>() : nullptr;
  }
  const int64_t* host_end_ptr() const {
    return end_host.defined() ? end_host.data_ptr<int64_t>() : nullptr;
  }

 private:
  static at::Tensor prepare(const std::optional<at::Tensor>& t, const char* name,
                            const at::Tensor& q) {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->dim() == 1 && t->size(0) == q.size(0), "longnet: ", name,
                " must have shape (B,) = (", q.size(0), ",), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kLong || t->scalar_type() == at::kInt, "longnet: ", name,
                " must be an int32 or int64 tensor, got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "longnet: ", name, " must be on the device of q (",
                q.device(), "), got ", t->device());
    return t->to(at::kLong).contiguous();
  }
};

// Packed documents (cu_seqlens_q / cu_seqlens_k, flash-attn's convention), checked
// and copied to the host (a synchronisation when they are on a CUDA device; none when
// they are given on the CPU): document i is the queries
// [q[i], q[i+1]) against the keys [k[i], k[i+1]) of a batch of one row.
struct Documents {
  std::vector<int64_t> q, k;  // S+1 offsets each; empty when no documents are given

  Documents(const std::optional<at::Tensor>& cu_seqlens_q,
            const std::optional<at::Tensor>& cu_seqlens_k, const at::Tensor& query,
            const at::Tensor& key, const std::optional<at::Tensor>& key_start,
            const std::optional<at::Tensor>& key_end) {
    const bool has_q = cu_seqlens_q.has_value() && cu_seqlens_q->defined();
    const bool has_k = cu_seqlens_k.has_value() && cu_seqlens_k->defined();
    if (!has_q && !has_k) return;
    TORCH_CHECK(has_q && has_k,
                "longnet: cu_seqlens_q and cu_seqlens_k must be given together (the Python API "
                "fills in the missing one)");
    TORCH_CHECK(!(key_start.has_value() && key_start->defined()) &&
                    !(key_end.has_value() && key_end->defined()),
                "longnet: cu_seqlens_q/cu_seqlens_k (packed documents) cannot be combined with "
                "key_start/key_end (per-row key ranges)");
    TORCH_CHECK(query.size(0) == 1,
                "longnet: packed documents need a batch of one row, q of shape ",
                "(1, total_q, H, D); got batch size ", query.size(0));
    q = read(*cu_seqlens_q, "cu_seqlens_q", query, query.size(1));
    k = read(*cu_seqlens_k, "cu_seqlens_k", query, key.size(1));
    TORCH_CHECK(q.size() == k.size(), "longnet: cu_seqlens_q and cu_seqlens_k must have the same ",
                "length (S+1), got ", q.size(), " and ", k.size());
    for (size_t i = 0; i + 1 < q.size(); ++i) {
      TORCH_CHECK(q[i + 1] - q[i] <= k[i + 1] - k[i], "longnet: document ", i,
                  " has more queries (", q[i + 1] - q[i], ") than keys (", k[i + 1] - k[i], ")");
    }
  }
  bool defined() const { return !q.empty(); }
  int64_t count() const { return static_cast<int64_t>(q.size()) - 1; }

 private:
  static std::vector<int64_t> read(const at::Tensor& t, const char* name, const at::Tensor& query,
                                   int64_t total) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) >= 1, "longnet: ", name,
                " must have shape (S+1,) with S >= 0, got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "longnet: ", name,
                " must be an int32 or int64 tensor, got ", t.scalar_type());
    // On the CPU the offsets are read in place; a caller that has them on the host
    // (longnet.packing.PackedDocuments) passes them there, so a CUDA call never waits
    // for a copy back.
    TORCH_CHECK(t.device() == query.device() || t.device().is_cpu(), "longnet: ", name,
                " must be on the device of q (", query.device(), ") or the CPU, got ", t.device());
    const at::Tensor host = t.to(at::kCPU, at::kLong).contiguous();
    const int64_t* p = host.data_ptr<int64_t>();
    std::vector<int64_t> offsets(p, p + host.numel());
    TORCH_CHECK(offsets[0] == 0, "longnet: ", name, "[0] must be 0, got ", offsets[0]);
    for (size_t i = 0; i + 1 < offsets.size(); ++i) {
      TORCH_CHECK(offsets[i] <= offsets[i + 1], "longnet: ", name, " must be nondecreasing, got ",
                  name, "[", i, "] = ", offsets[i], " > ", name, "[", i + 1,
                  "] = ", offsets[i + 1]);
    }
    TORCH_CHECK(offsets.back() == total, "longnet: ", name,
                "[-1] must equal the number of packed positions (", total, "), got ",
                offsets.back());
    return offsets;
  }
};

inline void check_position_offset(int64_t position_offset) {
  TORCH_CHECK(position_offset >= 0, "longnet: position_offset must be >= 0, got ", position_offset);
}

}  // namespace longnet
