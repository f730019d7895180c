// Dilated attention composed of dense attention problems over strided views
// (docs/operator.md, "Engines"; engine.h).
//
// Plan: for every group of batch rows with one key range, every pattern (w, r), head
// offset o and set of query heads whose key/value heads are a strided set, the
// segments that lie wholly inside the row's queries form one batched dense problem
// (batch = rows x segments, rows o, o+r, ... of each segment); every other segment
// (partial first or last segment, the segment where the queries start) is a problem
// of its own. A causal problem whose queries start after its first key is split into
// the keys before the first query (no mask) and a square causal problem, so engines
// only ever see square causal problems.
//
// Forward: the problems' (out, lse) merge into the outputs by log-sum-exp, which is
// the softmax over the multiset union of the keys of all patterns.
// Backward: each problem's dense backward with the merged out and lse gives exact
// dq, dk, dv contributions. A gradient on lse adds dlse * P to dS; one more dense
// backward per problem with values 0, out = -e_0 and grad_out = dlse * e_0 (so that
// rowsum(grad_out * out) = -dlse and grad_out . v = 0) yields exactly those terms of
// dq and dk.
#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <tuple>

#include "engine/engine.h"
#include "op_common.h"
#include "pattern.h"

namespace longnet::engine {
namespace {

// A call as the plan reads it: the arguments, with the key ranges on the host.
struct Call {
  at::IntArrayRef segment_lengths, dilation_rates;
  bool is_causal;
  double scale;
  int64_t position_offset;
  const int64_t* key_start;  // host (B,) or nullptr
  const int64_t* key_end;    // host (B,) or nullptr
};

// Rows row0, row0 + step, ... (len of them) of the first segment.
struct Side {
  int64_t row0, len;
};

struct SubProblem {
  int64_t b0, nb;              // batch rows b0 .. b0 + nb - 1
  int64_t segments, seg_step;  // segments of the problem and their distance in rows
  int64_t step;                // row step inside a segment (the dilation rate)
  Side q, k;                   // q rows index q, k rows index k and v
  int64_t h0, heads, hstep;    // query heads h0, h0 + hstep, ...
  int64_t kh0, khstep;         // their key/value heads kh0, kh0 + khstep, ...
  bool causal;
  bool fresh;       // no earlier problem reaches these query rows: store instead of merge
  int64_t pattern;  // index of its pattern (w, r)
};

// (nb, segments, len, heads, D) view of a (B, N, H, D) tensor.
at::Tensor view5(const at::Tensor& t, const SubProblem& sp, const Side& side, bool kv) {
  const int64_t h0 = kv ? sp.kh0 : sp.h0, hstep = kv ? sp.khstep : sp.hstep;
  return t.as_strided(
      {sp.nb, sp.segments, side.len, sp.heads, t.size(3)},
      {t.stride(0), sp.seg_step * t.stride(1), sp.step * t.stride(1), hstep * t.stride(2),
       t.stride(3)},
      t.storage_offset() + sp.b0 * t.stride(0) + side.row0 * t.stride(1) + h0 * t.stride(2));
}

// (nb, segments, heads, Lq) view of a (B, H, Nq) tensor (lse and its gradient).
at::Tensor row_stats_view(const at::Tensor& t, const SubProblem& sp) {
  return t.as_strided(
      {sp.nb, sp.segments, sp.heads, sp.q.len},
      {t.stride(0), sp.seg_step * t.stride(2), sp.hstep * t.stride(1), sp.step * t.stride(2)},
      t.storage_offset() + sp.b0 * t.stride(0) + sp.h0 * t.stride(1) + sp.q.row0 * t.stride(2));
}

// True when rows and segments of a view5 fold into one batch dimension without a copy.
bool batch_folds(const at::Tensor& t5) {
  return t5.size(0) == 1 || t5.size(1) == 1 || t5.stride(0) == t5.size(1) * t5.stride(1);
}

at::Tensor fold(const at::Tensor& t5) { return t5.flatten(0, 1); }

void add_heads(std::vector<SubProblem>& plan, SubProblem base, int64_t o, int64_t r, int64_t heads,
               int64_t group) {
  // Query heads o + m r read key/value heads (o + m r) / group. With L = lcm(r, group),
  // the heads h0 + c L for one h0 read the strided key/value heads h0 / group + c L / group.
  const int64_t period = std::lcm(r, group);
  for (int64_t h0 = o; h0 < std::min(heads, o + period); h0 += r) {
    SubProblem sp = base;
    sp.h0 = h0;
    sp.heads = (heads - h0 + period - 1) / period;
    sp.hstep = period;
    sp.kh0 = h0 / group;
    sp.khstep = period / group;
    plan.push_back(sp);
  }
}

// Problems of rows b0 .. b0 + nb - 1, which share one key range.
void plan_rows(std::vector<SubProblem>& plan, int64_t b0, int64_t nb, const RowSpan& span,
               int64_t heads, int64_t group, const Call& call) {
  if (span.length() <= 0) return;
  const int64_t q_lo = span.first_query_key();
  if (q_lo >= span.key_end) return;
  for (size_t pi = 0; pi < call.segment_lengths.size(); ++pi) {
    const int64_t w = call.segment_lengths[pi], r = call.dilation_rates[pi];
    const int64_t nseg = num_segments(span.position % w + span.length(), w);
    // Key index of the start of the row's first segment (before key_begin when the
    // row starts inside a segment).
    const int64_t first_start = (span.position / w) * w - span.position + span.key_begin;
    // Segments [la, lb) start at or after the first query and end inside the row.
    const int64_t la = std::max<int64_t>(0, (q_lo - first_start + w - 1) / w);
    const int64_t lb = std::max(la, std::min(nseg, (span.key_end - first_start) / w));
    for (int64_t o = 0; o < std::min(r, heads); ++o) {
      SubProblem base{};
      base.fresh = pi == 0;  // the first pattern's problems hold disjoint query rows
      base.pattern = static_cast<int64_t>(pi);
      base.b0 = b0;
      base.nb = nb;
      base.step = r;
      base.seg_step = w;
      if (lb > la) {
        SubProblem sp = base;
        sp.segments = lb - la;
        sp.k = {first_start + la * w + o, (w - o + r - 1) / r};
        sp.q = {sp.k.row0 - span.q_start, sp.k.len};
        sp.causal = call.is_causal;
        add_heads(plan, sp, o, r, heads, group);
      }
      for (int64_t l = std::max<int64_t>(0, la - 1); l < nseg; ++l) {
        if (l >= la && l < lb) continue;
        const SparseSegment seg = sparse_segment(span, w, r, l, o);
        if (seg.count == 0 || seg.first_query >= seg.count) continue;
        SubProblem sp = base;
        sp.segments = 1;
        const int64_t fq = seg.first_query;
        sp.q = {seg.base + fq * r - span.q_start, seg.count - fq};
        if (!call.is_causal || fq == 0) {
          sp.k = {seg.base, seg.count};
          sp.causal = call.is_causal;
          add_heads(plan, sp, o, r, heads, group);
        } else {
          sp.k = {seg.base, fq};  // keys before the first query: all visible
          sp.causal = false;
          add_heads(plan, sp, o, r, heads, group);
          sp.k = {seg.base + fq * r, seg.count - fq};  // the queries' own keys: causal
          sp.causal = true;
          sp.fresh = false;
          add_heads(plan, sp, o, r, heads, group);
        }
      }
    }
  }
}

std::vector<SubProblem> make_plan(const at::Tensor& q, const at::Tensor& k, const Call& call) {
  const int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1);
  const int64_t heads = q.size(2), group = q.size(2) / k.size(2);
  std::vector<SubProblem> plan;
  for (int64_t b = 0; b < batch;) {
    const RowSpan span = row_span(nk, nq, call.position_offset, call.key_start, call.key_end, b);
    int64_t nb = 1;
    while (b + nb < batch) {
      const RowSpan next =
          row_span(nk, nq, call.position_offset, call.key_start, call.key_end, b + nb);
      if (next.key_begin != span.key_begin || next.key_end != span.key_end) break;
      ++nb;
    }
    plan_rows(plan, b, nb, span, heads, group, call);
    b += nb;
  }
  return plan;
}

// Runs `run` on pieces of sp whose batch folds into one dimension (checked by
// `folds`) and holds at most max_batch problems.
void for_each_call(const SubProblem& sp, int64_t max_batch,
                   const std::function<bool(const SubProblem&)>& folds,
                   const std::function<void(const SubProblem&)>& run) {
  if (sp.nb * sp.segments <= max_batch && folds(sp)) {
    run(sp);
    return;
  }
  if (sp.nb > 1) {
    for (int64_t b = 0; b < sp.nb; ++b) {
      SubProblem one = sp;
      one.b0 = sp.b0 + b;
      one.nb = 1;
      for_each_call(one, max_batch, folds, run);
    }
    return;
  }
  for (int64_t s = 0; s < sp.segments; s += max_batch) {
    SubProblem part = sp;
    part.segments = std::min(max_batch, sp.segments - s);
    part.q.row0 += s * sp.seg_step;
    part.k.row0 += s * sp.seg_step;
    run(part);
  }
}

at::Tensor with_dense_last(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// The forward's outputs and the accumulator of out (out itself when the input dtype
// is the accumulation dtype): out = 0 and lse = -inf until a problem reaches a row.
struct ForwardAccumulator {
  at::Tensor out, lse, acc;
  at::ScalarType acc_type;
  explicit ForwardAccumulator(const at::Tensor& q) : acc_type(accumulate_dtype(q)) {
    std::tie(out, lse) = allocate_forward_outputs(q);
    lse.fill_(-std::numeric_limits<double>::infinity());
    acc = q.scalar_type() == acc_type ? out : at::empty(q.sizes(), q.options().dtype(acc_type));
    acc.zero_();
  }
  std::tuple<at::Tensor, at::Tensor> result() {
    if (!acc.is_same(out)) out.copy_(acc);
    return {out, lse};
  }
};

// dq, dk, dv and their accumulators (themselves in the accumulation dtype), zeroed.
struct GradAccumulator {
  at::Tensor dq, dk, dv, dq_acc, dk_acc, dv_acc;
  at::ScalarType acc_type;
  GradAccumulator(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v)
      : acc_type(accumulate_dtype(q)) {
    std::tie(dq, dk, dv) = allocate_backward_outputs(q, k, v);
    const bool direct = q.scalar_type() == acc_type;
    const auto accumulator = [&](const at::Tensor& t) {
      return direct ? t : at::empty(t.sizes(), t.options().dtype(acc_type));
    };
    dq_acc = accumulator(dq).zero_();
    dk_acc = accumulator(dk).zero_();
    dv_acc = accumulator(dv).zero_();
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result() {
    if (!dq_acc.is_same(dq)) {
      dq.copy_(dq_acc);
      dk.copy_(dk_acc);
      dv.copy_(dv_acc);
    }
    return {dq, dk, dv};
  }
};

// The backward's row inputs in the dtypes the problems take (grad_out and out in the
// input dtype, lse and its gradient in the accumulation dtype), and whether the
// problems' backward runs again for the gradient on lse: never without one (the loss
// reads no lse), on the CPU only when a row reached by a problem has a nonzero one
// (rows with lse = -inf are in none), on a GPU always (reading that back would wait
// for the device).
struct BackwardInputs {
  at::Tensor dout, out, lse, dlse;
  bool with_dlse = false;
  BackwardInputs(const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& out_in,
                 const at::Tensor& lse_in, const at::Tensor& grad_lse, at::ScalarType acc_type)
      : dout(with_dense_last(grad_out.to(q.scalar_type()))),
        out(with_dense_last(out_in.to(q.scalar_type()))),
        lse(lse_in.to(acc_type)) {
    if (!grad_lse.defined() || q.size(1) == 0 || q.size(3) == 0) return;
    dlse = grad_lse.to(acc_type);
    with_dlse = !q.is_cpu() || at::logical_and(dlse != 0, at::isfinite(lse)).any().item<bool>();
  }
};

// A problem whose dense backward gives the terms of dq and dk that a gradient on lse
// adds (dS += dlse * P): values 0, out = -e_0 and grad_out = dlse * e_0, so that
// rowsum(grad_out * out) = -dlse and grad_out . v = 0. `dl` is dlse in the shape of
// q without its last dimension.
struct LseGradientProblem {
  at::Tensor grad_out, out, v;
  LseGradientProblem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& dl)
      : grad_out(at::zeros(q.sizes(), q.options())),
        out(at::zeros(q.sizes(), q.options())),
        v(at::zeros(k.sizes(), k.options())) {
    grad_out.select(-1, 0).copy_(dl);
    out.select(-1, 0).fill_(-1);
  }
};

std::tuple<at::Tensor, at::Tensor> composed_forward(const DenseEngine& engine,
                                                    const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& v_in, const Call& call) {
  // Every element of out and lse is written here: rows that no problem reaches
  // keep out = 0 and lse = -inf.
  ForwardAccumulator result(q_in);
  at::Tensor &acc = result.acc, &lse = result.lse;
  const at::ScalarType acc_type = result.acc_type;
  if (q_in.numel() > 0 && k_in.numel() > 0) {
    const at::Tensor q = with_dense_last(q_in), k = with_dense_last(k_in),
                     v = with_dense_last(v_in);
    const auto folds = [&](const SubProblem& sp) {
      return batch_folds(view5(q, sp, sp.q, false)) && batch_folds(view5(k, sp, sp.k, true)) &&
             batch_folds(view5(v, sp, sp.k, true));
    };
    const auto run = [&](const SubProblem& sp) {
      at::Tensor o_p, l_p;
      std::tie(o_p, l_p) =
          engine.forward(fold(view5(q, sp, sp.q, false)), fold(view5(k, sp, sp.k, true)),
                         fold(view5(v, sp, sp.k, true)), sp.causal, call.scale);
      at::Tensor acc5 = view5(acc, sp, sp.q, false);
      at::Tensor lse5 = row_stats_view(lse, sp);
      o_p = o_p.reshape(acc5.sizes());
      l_p = l_p.reshape(lse5.sizes());
      if (sp.fresh) {
        acc5.copy_(o_p);
        lse5.copy_(l_p);
        return;
      }
      o_p = o_p.to(acc_type);
      l_p = l_p.to(acc_type);
      // Every query of a problem sees at least one key, so l_p and the merged lse
      // are finite.
      const at::Tensor merged = at::logaddexp(lse5, l_p);
      const at::Tensor w_old = (lse5 - merged).exp_().transpose(2, 3).unsqueeze(-1);
      const at::Tensor w_new = (l_p - merged).exp_().transpose(2, 3).unsqueeze(-1);
      acc5.mul_(w_old).add_(o_p * w_new);
      lse5.copy_(merged);
    };
    for (const SubProblem& sp : make_plan(q, k, call))
      for_each_call(sp, engine.max_batch(), folds, run);
  }
  return result.result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> composed_backward(
    const DenseEngine& engine, const at::Tensor& grad_out, const at::Tensor& grad_lse,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const Call& call) {
  GradAccumulator grads(q_in, k_in, v_in);
  if (q_in.numel() > 0 && k_in.numel() > 0) {
    const at::Tensor q = with_dense_last(q_in), k = with_dense_last(k_in),
                     v = with_dense_last(v_in);
    const BackwardInputs rows(q, grad_out, out_in, lse_in, grad_lse, grads.acc_type);
    const at::Tensor &dout = rows.dout, &out = rows.out, &lse = rows.lse, &dlse = rows.dlse;
    const auto folds = [&](const SubProblem& sp) {
      return batch_folds(view5(q, sp, sp.q, false)) && batch_folds(view5(k, sp, sp.k, true)) &&
             batch_folds(view5(v, sp, sp.k, true)) && batch_folds(view5(dout, sp, sp.q, false)) &&
             batch_folds(view5(out, sp, sp.q, false));
    };
    const auto run = [&](const SubProblem& sp) {
      const at::Tensor qv = fold(view5(q, sp, sp.q, false));
      const at::Tensor kv = fold(view5(k, sp, sp.k, true));
      const at::Tensor vv = fold(view5(v, sp, sp.k, true));
      const int64_t bt = qv.size(0);
      const at::Tensor lse_p =
          row_stats_view(lse, sp).reshape({bt, sp.heads, sp.q.len}).contiguous();
      at::Tensor dq5 = view5(grads.dq_acc, sp, sp.q, false);
      at::Tensor dk5 = view5(grads.dk_acc, sp, sp.k, true);
      at::Tensor dv5 = view5(grads.dv_acc, sp, sp.k, true);
      at::Tensor dq_p, dk_p, dv_p;
      std::tie(dq_p, dk_p, dv_p) =
          engine.backward(fold(view5(dout, sp, sp.q, false)), qv, kv, vv,
                          fold(view5(out, sp, sp.q, false)), lse_p, sp.causal, call.scale);
      dq5.add_(dq_p.reshape(dq5.sizes()));
      dk5.add_(dk_p.reshape(dk5.sizes()));
      dv5.add_(dv_p.reshape(dv5.sizes()));
      if (rows.with_dlse) {
        const LseGradientProblem p(
            qv, kv,
            row_stats_view(dlse, sp).permute({0, 1, 3, 2}).reshape({bt, sp.q.len, sp.heads}));
        at::Tensor dq2, dk2, dv2;
        std::tie(dq2, dk2, dv2) =
            engine.backward(p.grad_out, qv, kv, p.v, p.out, lse_p, sp.causal, call.scale);
        dq5.add_(dq2.reshape(dq5.sizes()));
        dk5.add_(dk2.reshape(dk5.sizes()));
      }
    };
    for (const SubProblem& sp : make_plan(q, k, call))
      for_each_call(sp, engine.max_batch(), folds, run);
  }
  return grads.result();
}

// ---------------------------------------------------------- packed documents ----
//
// The problems of every document, grouped by what one varlen call shares: pattern,
// mask and head set. Within a group every query row appears once (a row belongs to
// one segment of a pattern for one head set; the causal split puts its two parts in
// a non-causal and a causal group), so the merges below are row-wise gathers and
// scatters. Groups run in the order (pattern, non-causal before causal, head set),
// which merges every row's problems in the order composed_forward does for the
// document alone, with the same float32 operations (on gathered rows, where a
// vectorized exp or log can differ from a strided view's in the last bit).

struct GroupKey {
  int64_t pattern, causal, h0, heads, hstep, kh0, khstep;
  bool operator<(const GroupKey& o) const {
    return std::tie(pattern, causal, h0, heads, hstep, kh0, khstep) <
           std::tie(o.pattern, o.causal, o.h0, o.heads, o.hstep, o.kh0, o.khstep);
  }
};

// One group: its problems as pieces of query rows q_base + step * t (t < q_len)
// against key rows k_base + step * t (t < k_len), rows of the packed tensors.
struct PieceGroup {
  int64_t step = 1;
  bool causal = false, fresh = true;
  int64_t h0 = 0, heads = 0, hstep = 1, kh0 = 0, khstep = 1;
  std::vector<int64_t> q_base, q_len, k_base, k_len;
};

std::vector<PieceGroup> plan_documents(const std::vector<int64_t>& doc_q,
                                       const std::vector<int64_t>& doc_k, const at::Tensor& q,
                                       const at::Tensor& k, const Call& call) {
  std::map<GroupKey, PieceGroup> groups;
  for (size_t i = 0; i + 1 < doc_q.size(); ++i) {
    const int64_t nq = doc_q[i + 1] - doc_q[i], nk = doc_k[i + 1] - doc_k[i];
    if (nq == 0) continue;
    for (const SubProblem& sp :
         make_plan(q.narrow(1, doc_q[i], nq), k.narrow(1, doc_k[i], nk), call)) {
      PieceGroup& g =
          groups[GroupKey{sp.pattern, sp.causal, sp.h0, sp.heads, sp.hstep, sp.kh0, sp.khstep}];
      g.step = sp.step;
      g.causal = sp.causal;
      g.fresh = g.fresh && sp.fresh;
      g.h0 = sp.h0, g.heads = sp.heads, g.hstep = sp.hstep, g.kh0 = sp.kh0, g.khstep = sp.khstep;
      for (int64_t s = 0; s < sp.segments; ++s) {
        g.q_base.push_back(doc_q[i] + sp.q.row0 + s * sp.seg_step);
        g.q_len.push_back(sp.q.len);
        g.k_base.push_back(doc_k[i] + sp.k.row0 + s * sp.seg_step);
        g.k_len.push_back(sp.k.len);
      }
    }
  }
  std::vector<PieceGroup> plan;
  for (auto& entry : groups) plan.push_back(std::move(entry.second));
  return plan;
}

// One varlen call of a group: pieces [p0, p1), their packed rows on the device.
struct Launch {
  PackedSequences seqs;
  at::Tensor q_rows, k_rows;  // int64 (Tq,), (Tk,): rows of the packed tensors
};

// A host tensor on `device`, copied without waiting for the device (pinned memory,
// non-blocking: the caching host allocator keeps it until the copy ran).
at::Tensor host_to(const at::Tensor& host, at::Device device) {
  return device.is_cpu() ? host : host.pin_memory().to(device, /*non_blocking=*/true);
}

// Rows base[p] + step * t (t < len[p]) of pieces [p0, p1), concatenated, on `device`,
// and the pieces' cumulative offsets (P+1,) on the host.
std::pair<at::Tensor, std::vector<int64_t>> piece_rows(const std::vector<int64_t>& base,
                                                       const std::vector<int64_t>& len, size_t p0,
                                                       size_t p1, int64_t step, at::Device device) {
  std::vector<int64_t> cu{0}, start(p1 - p0);
  for (size_t p = p0; p < p1; ++p) {
    start[p - p0] = base[p] - step * cu.back();  // row of t-th element: start + step * index
    cu.push_back(cu.back() + len[p]);
  }
  const int64_t total = cu.back();
  const auto host = at::TensorOptions().dtype(at::kLong);
  const at::Tensor lens =
      host_to(at::tensor(at::ArrayRef<int64_t>(len.data() + p0, p1 - p0), host), device);
  const at::Tensor starts = host_to(at::tensor(start, host), device);
  const at::Tensor index = at::arange(total, at::TensorOptions().dtype(at::kLong).device(device));
  const at::Tensor rows =
      at::repeat_interleave(starts, lens, /*dim=*/0, /*output_size=*/total).add_(index, step);
  return {rows, cu};
}

// The group's calls: at most max_batch pieces each (a grid dimension) and fewer than
// 2^31 rows (int32 offsets).
std::vector<Launch> launches(const PieceGroup& g, int64_t max_batch, at::Device device) {
  std::vector<Launch> out;
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
  const size_t pieces = g.q_base.size();
  for (size_t p0 = 0; p0 < pieces;) {
    size_t p1 = p0;
    int64_t tq = 0, tk = 0;
    while (p1 < pieces && static_cast<int64_t>(p1 - p0) < max_batch &&
           tq + g.q_len[p1] < kMaxRows && tk + g.k_len[p1] < kMaxRows) {
      tq += g.q_len[p1];
      tk += g.k_len[p1];
      ++p1;
    }
    TORCH_CHECK(p1 > p0, "longnet: one problem of ", g.q_len[p0], " rows exceeds int32 offsets");
    Launch l;
    std::tie(l.q_rows, l.seqs.host_q) = piece_rows(g.q_base, g.q_len, p0, p1, g.step, device);
    std::tie(l.k_rows, l.seqs.host_k) = piece_rows(g.k_base, g.k_len, p0, p1, g.step, device);
    l.seqs.max_q = *std::max_element(g.q_len.begin() + p0, g.q_len.begin() + p1);
    l.seqs.max_k = *std::max_element(g.k_len.begin() + p0, g.k_len.begin() + p1);
    const auto int32 = [&](const std::vector<int64_t>& cu) {
      return host_to(at::tensor(cu, at::TensorOptions().dtype(at::kLong)).to(at::kInt), device);
    };
    l.seqs.cu_q = int32(l.seqs.host_q);
    l.seqs.cu_k = int32(l.seqs.host_k);
    out.push_back(std::move(l));
    p0 = p1;
  }
  return out;
}

// (N, heads, D) view of heads h0, h0 + hstep, ... of a (1, N, H, D) tensor.
at::Tensor head_rows(const at::Tensor& t, int64_t h0, int64_t heads, int64_t hstep) {
  return t.select(0, 0).as_strided({t.size(1), heads, t.size(3)},
                                   {t.stride(1), hstep * t.stride(2), t.stride(3)},
                                   t.storage_offset() + h0 * t.stride(2));
}

// (heads, N) view of heads h0, h0 + hstep, ... of a (1, H, N) tensor (lse).
at::Tensor head_stats(const at::Tensor& t, int64_t h0, int64_t heads, int64_t hstep) {
  return t.select(0, 0).as_strided({heads, t.size(2)}, {hstep * t.stride(1), t.stride(2)},
                                   t.storage_offset() + h0 * t.stride(1));
}

// The Call of packed documents (no key ranges: Documents refuses them).
Call document_call(const Arguments& args) {
  return Call{args.segment_lengths,
              args.dilation_rates,
              args.is_causal,
              args.scale,
              args.position_offset,
              nullptr,
              nullptr};
}

at::Tensor gather_rows(const at::Tensor& t, const PieceGroup& g, const at::Tensor& rows, bool kv) {
  return head_rows(t, kv ? g.kh0 : g.h0, g.heads, kv ? g.khstep : g.hstep).index_select(0, rows);
}

// The Call of the arguments: the checked key ranges (kept alive here) read from their
// host copies.
struct PlannedCall {
  KeyRanges ranges;
  Call call;
  PlannedCall(const at::Tensor& q, const at::Tensor& k, const Arguments& args)
      : ranges(args.key_start, args.key_end, q, k.size(1)),
        call{args.segment_lengths, args.dilation_rates,     args.is_causal,       args.scale,
             args.position_offset, ranges.host_start_ptr(), ranges.host_end_ptr()} {}
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> composed_documents_forward(
    const DenseEngine& engine, const std::vector<int64_t>& doc_q, const std::vector<int64_t>& doc_k,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const Arguments& args) {
  ForwardAccumulator result(q_in);
  const at::ScalarType acc_type = result.acc_type;
  const Call call = document_call(args);
  const at::Tensor q = with_dense_last(q_in), k = with_dense_last(k_in), v = with_dense_last(v_in);
  for (const PieceGroup& g : plan_documents(doc_q, doc_k, q, k, call)) {
    at::Tensor acc_h = head_rows(result.acc, g.h0, g.heads, g.hstep);
    at::Tensor lse_h = head_stats(result.lse, g.h0, g.heads, g.hstep);
    for (const Launch& l : launches(g, engine.max_batch(), q.device())) {
      at::Tensor o_p, l_p;
      std::tie(o_p, l_p) = engine.forward_varlen(
          gather_rows(q, g, l.q_rows, false), gather_rows(k, g, l.k_rows, true),
          gather_rows(v, g, l.k_rows, true), l.seqs, g.causal, call.scale);
      o_p = o_p.to(acc_type);
      l_p = l_p.to(acc_type);
      if (g.fresh) {
        acc_h.index_copy_(0, l.q_rows, o_p);
        lse_h.index_copy_(1, l.q_rows, l_p);
        continue;
      }
      // As composed_forward: every query of a problem sees a key, l_p is finite.
      const at::Tensor old_l = lse_h.index_select(1, l.q_rows);
      const at::Tensor merged = at::logaddexp(old_l, l_p);
      const at::Tensor w_old = (old_l - merged).exp_().t().unsqueeze(-1);
      const at::Tensor w_new = (l_p - merged).exp_().t().unsqueeze(-1);
      at::Tensor acc_p = acc_h.index_select(0, l.q_rows);
      acc_p.mul_(w_old).add_(o_p * w_new);
      acc_h.index_copy_(0, l.q_rows, acc_p);
      lse_h.index_copy_(1, l.q_rows, merged);
    }
  }
  return result.result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> composed_documents_backward(
    const DenseEngine& engine, const std::vector<int64_t>& doc_q, const std::vector<int64_t>& doc_k,
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const Arguments& args) {
  GradAccumulator grads(q_in, k_in, v_in);
  const at::ScalarType acc_type = grads.acc_type;
  const Call call = document_call(args);
  const at::Tensor q = with_dense_last(q_in), k = with_dense_last(k_in), v = with_dense_last(v_in);
  const BackwardInputs rows(q, grad_out, out_in, lse_in, grad_lse, acc_type);
  for (const PieceGroup& g : plan_documents(doc_q, doc_k, q, k, call)) {
    at::Tensor dq_h = head_rows(grads.dq_acc, g.h0, g.heads, g.hstep);
    at::Tensor dk_h = head_rows(grads.dk_acc, g.kh0, g.heads, g.khstep);
    at::Tensor dv_h = head_rows(grads.dv_acc, g.kh0, g.heads, g.khstep);
    for (const Launch& l : launches(g, engine.max_batch(), q.device())) {
      const at::Tensor qg = gather_rows(q, g, l.q_rows, false);
      const at::Tensor kg = gather_rows(k, g, l.k_rows, true);
      const at::Tensor vg = gather_rows(v, g, l.k_rows, true);
      const at::Tensor lse_g =
          head_stats(rows.lse, g.h0, g.heads, g.hstep).index_select(1, l.q_rows).to(at::kFloat);
      at::Tensor dq_p, dk_p, dv_p;
      std::tie(dq_p, dk_p, dv_p) = engine.backward_varlen(
          gather_rows(rows.dout, g, l.q_rows, false), qg, kg, vg,
          gather_rows(rows.out, g, l.q_rows, false), lse_g, l.seqs, g.causal, call.scale);
      dq_h.index_add_(0, l.q_rows, dq_p.to(acc_type));
      dk_h.index_add_(0, l.k_rows, dk_p.to(acc_type));
      dv_h.index_add_(0, l.k_rows, dv_p.to(acc_type));
      if (rows.with_dlse) {
        const LseGradientProblem p(
            qg, kg, head_stats(rows.dlse, g.h0, g.heads, g.hstep).index_select(1, l.q_rows).t());
        at::Tensor dq2, dk2, dv2;
        std::tie(dq2, dk2, dv2) = engine.backward_varlen(p.grad_out, qg, kg, p.v, p.out, lse_g,
                                                         l.seqs, g.causal, call.scale);
        dq_h.index_add_(0, l.q_rows, dq2.to(acc_type));
        dk_h.index_add_(0, l.k_rows, dk2.to(acc_type));
      }
    }
  }
  return grads.result();
}

std::tuple<at::Tensor, at::Tensor> DenseEngine::forward_varlen(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&,
                                                               const PackedSequences&, bool,
                                                               double) const {
  TORCH_CHECK(false, "longnet: engine ", name(), " has no varlen calls");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> DenseEngine::backward_varlen(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const PackedSequences&, bool, double) const {
  TORCH_CHECK(false, "longnet: engine ", name(), " has no varlen calls");
}

std::tuple<at::Tensor, at::Tensor> DenseEngine::run_forward(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const Arguments& args) const {
  const PlannedCall planned(q, k, args);
  return composed_forward(*this, q, k, v, planned.call);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> DenseEngine::run_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const Arguments& args) const {
  const PlannedCall planned(q, k, args);
  return composed_backward(*this, grad_out, grad_lse, q, k, v, out, lse, planned.call);
}

}  // namespace longnet::engine
