// CPU kernels of longnet::dilated_attention_fwd / _bwd (docs/operator.md), the
// `fused` engine; csrc/engine/dispatch.cpp registers the operators.
//
// All patterns share one online softmax per query row: the patterns run one after
// another; within a pattern every (batch, head, sparse segment, query block) is an
// independent task (each query row of a head lies in exactly one sparse segment
// of a pattern), so tasks write disjoint rows of the running state (m, l, acc).
// Sparse segments are read in place: their rows are r rows of the input apart,
// which the block products take as a leading dimension.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/blas.h"
#include "cpu/vec_math.h"
#include "cpu/vec_math_avx512.h"
#include "fused.h"
#include "op_common.h"
#include "pattern.h"

namespace longnet::cpu {
namespace {

constexpr int64_t kQueryBlock = 128;
constexpr int64_t kKeyBlock = 256;

// Accumulation type: float for float, bfloat16 and half; double for double.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename A>
constexpr A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// Element (b, n, h, 0) of a (B, N, H, D) tensor whose last dimension is dense.
template <typename T>
struct RowView {
  T* data;
  int64_t sb, sn, sh;
  explicit RowView(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sn(t.stride(1)), sh(t.stride(2)) {}
  T* at(int64_t b, int64_t n, int64_t h) const { return data + b * sb + n * sn + h * sh; }
};

// `count` rows of `d` values, `stride` apart, as acc_t rows: the tensor memory when
// the types match, else a converted copy in `scratch`. Sets *ld to the row stride.
template <typename T, typename A>
const A* load_rows(const T* first, int64_t stride, int64_t count, int64_t d, A* scratch,
                   int64_t* ld) {
  if constexpr (std::is_same_v<T, A>) {
    *ld = stride;
    return first;
  } else {
    for (int64_t i = 0; i < count; ++i) {
      const T* src = first + i * stride;
      A* dst = scratch + i * d;
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<A>(src[j]);
    }
    *ld = d;
    return scratch;
  }
}

// Rows whose last dimension is dense and whose row stride covers a row, as the
// block products need; anything else is copied once.
at::Tensor with_dense_rows(const at::Tensor& t) {
  if (t.stride(3) == 1 && t.stride(1) >= t.size(3)) return t;
  return t.contiguous();
}

struct Problem {
  int64_t batch, nq, nk, heads, kv_heads, dim;
  int64_t position_offset;
  const int64_t* key_start;  // (B,) or nullptr
  const int64_t* key_end;    // (B,) or nullptr
  int64_t group() const { return heads / kv_heads; }
  RowSpan row(int64_t b) const { return row_span(nk, nq, position_offset, key_start, key_end, b); }
  // Upper bound of the segments of length w any row touches.
  int64_t segments(int64_t w) const { return max_row_segments(nk, position_offset, w); }
};

// ---------------------------------------------------------------- forward ----

// The only write of every output element: out = acc / l, lse = m + log l; rows
// that reached no key (l = 0, acc never written) get out = 0, lse = -inf.
template <typename T, typename A>
void finish_forward(at::Tensor& out, at::Tensor& lse, const A* acc_p, const A* m_p, const A* l_p,
                    const Problem& pb) {
  const int64_t D = pb.dim;
  const int64_t skipped_state = debug_skip_first_row() ? 0 : -1;
  T* out_p = out.data_ptr<T>();
  A* lse_p = lse.data_ptr<A>();
  const int64_t rows = pb.batch * pb.nq * pb.heads;
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % pb.heads;
      const int64_t qi = (row / pb.heads) % pb.nq;
      const int64_t b = row / (pb.heads * pb.nq);
      const int64_t state = (b * pb.heads + h) * pb.nq + qi;
      if (state == skipped_state) continue;
      const A denom = l_p[state];
      const A* src = acc_p + row * D;
      T* dst = out_p + row * D;
      if (denom > A(0)) {
        const A inv = A(1) / denom;
        for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<T>(src[j] * inv);
        lse_p[state] = m_p[state] + std::log(denom);
      } else {
        for (int64_t j = 0; j < D; ++j) dst[j] = T(0);
        lse_p[state] = neg_inf<A>();
      }
    }
  });
}

// Running softmax state (m, l, acc) of every query row, kept across patterns. acc
// lives in out when out has the accumulation type; a row's first merge overwrites it,
// so nothing is zero-filled and finish_forward is the only writer of every result.
template <typename T, typename A>
struct RowState {
  at::Tensor acc, m, l;
  A* acc_p;
  A* m_p;
  A* l_p;
  int64_t skipped_state;

  RowState(const at::Tensor& q, at::Tensor& out, const Problem& pb) {
    const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<A>::value);
    acc = std::is_same_v<T, A> ? out : at::empty(q.sizes(), acc_opts);
    m = at::full({pb.batch, pb.heads, pb.nq}, neg_inf<A>(), acc_opts);
    l = at::zeros({pb.batch, pb.heads, pb.nq}, acc_opts);
    acc_p = acc.data_ptr<A>();
    m_p = m.data_ptr<A>();
    l_p = l.data_ptr<A>();
    skipped_state = debug_skip_first_row() ? 0 : -1;
  }

  // Merges a query block's partial softmax (rows i < qn at query index qi0 + i * r of
  // batch b, head h) into the running state of its rows.
  void merge(const Problem& pb, int64_t b, int64_t h, int64_t qi0, int64_t r, int64_t qn,
             const A* acc_loc, const A* m_loc, const A* l_loc) const {
    const int64_t D = pb.dim;
    for (int64_t i = 0; i < qn; ++i) {
      if (l_loc[i] == A(0)) continue;
      const int64_t qi = qi0 + i * r;
      const int64_t state = (b * pb.heads + h) * pb.nq + qi;
      if (state == skipped_state) continue;
      A* acc_row = acc_p + ((b * pb.nq + qi) * pb.heads + h) * D;
      const A* src = acc_loc + i * D;
      const A m_old = m_p[state];
      if (m_old == neg_inf<A>()) {  // first contribution to this row
        std::copy(src, src + D, acc_row);
        l_p[state] = l_loc[i];
        m_p[state] = m_loc[i];
        continue;
      }
      const A m_new = std::max(m_old, m_loc[i]);
      const A a_old = std::exp(m_old - m_new);
      const A a_new = std::exp(m_loc[i] - m_new);
      for (int64_t j = 0; j < D; ++j) acc_row[j] = acc_row[j] * a_old + src[j] * a_new;
      l_p[state] = l_p[state] * a_old + l_loc[i] * a_new;
      m_p[state] = m_new;
    }
  }

  void finish(at::Tensor& out, at::Tensor& lse, const Problem& pb) const {
    finish_forward<T, A>(out, lse, acc_p, m_p, l_p, pb);
  }
};

// One key block of the online softmax: the scores S (qn x kn; query block starting at
// segment index tq0, key block at kb0) become exp(S - m) in place, keys after a causal
// query zeroed, and each row's running max m_loc and sum l_loc are updated, its
// accumulator acc_loc rescaled when the max moves. The product applied the scale.
template <typename A>
void softmax_block(A* S, int64_t qn, int64_t kn, int64_t tq0, int64_t kb0, bool is_causal,
                   int64_t D, A* m_loc, A* l_loc, A* acc_loc) {
  for (int64_t i = 0; i < qn; ++i) {
    A* srow = S + i * kn;
    const int64_t valid = is_causal ? std::clamp<int64_t>(tq0 + i - kb0 + 1, 0, kn) : kn;
    if (valid == 0) {
      fill_row<A>(srow, A(0), kn);
      continue;
    }
    const A block_max = row_max(srow, valid);
    const A m_old = m_loc[i];
    const A m_new = std::max(m_old, block_max);
    const A sum = exp_shift_sum(srow, m_new, srow, valid);
    fill_row<A>(srow + valid, A(0), kn - valid);
    if (m_old != m_new) {
      const A alpha = m_old == neg_inf<A>() ? A(0) : std::exp(m_old - m_new);
      l_loc[i] *= alpha;
      scale_row(acc_loc + i * D, alpha, D);
    }
    l_loc[i] += sum;
    m_loc[i] = m_new;
  }
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates, bool is_causal,
                  double scale_d, const Problem& pb, at::Tensor& out, at::Tensor& lse) {
  using A = acc_t<T>;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const int64_t D = pb.dim;
  const A scale = static_cast<A>(scale_d);
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<A>::value);

  const RowState<T, A> state(q, out, pb);

  const RowView<const T> qv(q), kv(k), vv(v);
  const int64_t QB = kQueryBlock, KB = kKeyBlock;
  const int64_t per_thread = QB * KB + QB * D + 2 * QB + (kConvert ? QB * D + 2 * KB * D : 0);
  const int64_t nthreads = at::get_num_threads();
  at::Tensor scratch = at::empty({nthreads, per_thread}, acc_opts);
  A* scratch_p = scratch.data_ptr<A>();

  for (size_t pi = 0; pi < segment_lengths.size(); ++pi) {
    const int64_t w = segment_lengths[pi], r = dilation_rates[pi];
    const int64_t nseg = pb.segments(w);
    const int64_t max_count = (std::min(w, pb.nk) + r - 1) / r;
    const int64_t nqb = (max_count + QB - 1) / QB;
    const int64_t ntasks = pb.batch * pb.heads * nseg * nqb;

    at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
      A* buf = scratch_p + at::get_thread_num() * per_thread;
      A* S = buf;
      A* acc_loc = S + QB * KB;
      A* m_loc = acc_loc + QB * D;
      A* l_loc = m_loc + QB;
      A* q_buf = l_loc + QB;
      A* k_buf = q_buf + QB * D;
      A* v_buf = k_buf + KB * D;

      for (int64_t task = begin; task < end; ++task) {
        int64_t rest = task;
        const int64_t qb = rest % nqb;
        rest /= nqb;
        const int64_t s = rest % nseg;
        rest /= nseg;
        const int64_t h = rest % pb.heads;
        const int64_t b = rest / pb.heads;
        const int64_t g = h / pb.group();

        const RowSpan row = pb.row(b);
        const SparseSegment seg = sparse_segment(row, w, r, s, head_offset(h, r));
        const int64_t tq0 = seg.first_query + qb * QB;
        if (tq0 >= seg.count) continue;
        const int64_t tq1 = std::min(tq0 + QB, seg.count);
        const int64_t qn = tq1 - tq0;
        const int64_t kend = is_causal ? tq1 : seg.count;
        const int64_t qi0 = seg.base + tq0 * r - row.q_start;  // query index of row 0

        int64_t ldq, ldk, ldv;
        const A* Q = load_rows<T, A>(qv.at(b, qi0, h), r * qv.sn, qn, D, q_buf, &ldq);
        fill_row<A>(m_loc, neg_inf<A>(), qn);
        fill_row<A>(l_loc, A(0), qn);
        fill_row<A>(acc_loc, A(0), qn * D);

        for (int64_t kb0 = 0; kb0 < kend; kb0 += KB) {
          const int64_t kn = std::min(KB, kend - kb0);
          const T* k_first = kv.at(b, seg.base + kb0 * r, g);
          const T* v_first = vv.at(b, seg.base + kb0 * r, g);
          const A* K = load_rows<T, A>(k_first, r * kv.sn, kn, D, k_buf, &ldk);
          const A* V = load_rows<T, A>(v_first, r * vv.sn, kn, D, v_buf, &ldv);

          gemm_nt<A>(qn, kn, D, scale, Q, ldq, K, ldk, A(0), S, kn);
          softmax_block<A>(S, qn, kn, tq0, kb0, is_causal, D, m_loc, l_loc, acc_loc);
          gemm_nn<A>(qn, D, kn, A(1), S, kn, V, ldv, A(1), acc_loc, D);
        }

        state.merge(pb, b, h, qi0, r, qn, acc_loc, m_loc, l_loc);
      }
    });
  }

  state.finish(out, lse, pb);
}

// ------------------------------------------------ micro-kernel forward ----
// The same online softmax with the products on oneDNN's micro-kernels (tile_gemm),
// inputs of type T (float32, bfloat16 or float16) multiplied in their own format,
// sums in float32. A task is one (batch, head, sparse segment, range of query
// blocks); the key blocks it reads are prepared once (K^T, and V for 16-bit formats)
// and reused by all its query blocks. For 16-bit formats P is rounded to T for P V.

constexpr int64_t kTileQuery = 64;
constexpr int64_t kTileKey = 256;
// Prepared key blocks kept per thread at most (larger segments prepare per block pair).
constexpr int64_t kMaxPreparedBytes = int64_t(32) << 20;

// p[j] = T(s[j]) for j < n, zeros up to n_pad.
template <typename T>
void round_row(const float* s, int64_t n, int64_t n_pad, T* p) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    round_to_bf16(s, n, n_pad, reinterpret_cast<uint16_t*>(p));
  } else {
    for (int64_t j = 0; j < n; ++j) p[j] = static_cast<T>(s[j]);
    for (int64_t j = n; j < n_pad; ++j) p[j] = T(0.f);
  }
}

// prepare_b<T, float> with the vectorised rounding for bfloat16.
template <typename T>
void prepare_b_rounded(const float* src, int64_t ld, int64_t k, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t p = 0; p < k; p += 2) {
      interleave_to_bf16(src + p * ld, p + 1 < k ? src + (p + 1) * ld : nullptr, n,
                         reinterpret_cast<uint16_t*>(dst + p * n));
    }
  } else {
    prepare_b<T, float>(src, ld, k, n, dst);
  }
}

// prepare_b<T, T>: for 16-bit formats the pairs of rows interleaved as bits.
template <typename T>
void prepare_b_pairs(const T* src, int64_t ld, int64_t k, int64_t n, T* dst) {
  if constexpr (kPairInterleaved<T>) {
    static_assert(sizeof(T) == 2);
    for (int64_t p = 0; p < k; p += 2) {
      const auto* in0 = reinterpret_cast<const uint16_t*>(src + p * ld);
      const auto* in1 = p + 1 < k ? in0 + ld : nullptr;
      interleave_bits16(in0, in1, n, reinterpret_cast<uint16_t*>(dst + p * n));
    }
  } else {
    prepare_b<T, T>(src, ld, k, n, dst);
  }
}

// softmax_block for the micro-kernel forward: S (qn x kn, scores before the scale) is
// only read, P (rows ld_p apart; S itself for float32) gets exp(scale S - m) in T, zero
// after a causal query's last key and up to ld_p. bfloat16 rounds in the same pass.
template <typename T>
void tile_softmax(float* S, int64_t qn, int64_t kn, int64_t tq0, int64_t kb0, bool is_causal,
                  float scale, int64_t D, float* m_loc, float* l_loc, float* acc_loc, T* P,
                  int64_t ld_p) {
  for (int64_t i = 0; i < qn; ++i) {
    float* srow = S + i * kn;
    T* prow = P + i * ld_p;
    const int64_t valid = is_causal ? std::clamp<int64_t>(tq0 + i - kb0 + 1, 0, kn) : kn;
    if (valid == 0) {
      std::fill(prow, prow + ld_p, T(0.f));
      continue;
    }
    const float m_old = m_loc[i];
    const float m_new = std::max(m_old, scaled_max(srow, scale, valid));
    float sum;
    if constexpr (std::is_same_v<T, float>) {
      sum = exp_scaled_sum(srow, scale, m_new, prow, valid);
      fill_row<float>(prow + valid, 0.f, ld_p - valid);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      sum = exp_scaled_sum_bf16(srow, scale, m_new, reinterpret_cast<uint16_t*>(prow), valid, ld_p);
    } else {
      sum = exp_scaled_sum(srow, scale, m_new, srow, valid);
      round_row<T>(srow, valid, ld_p, prow);
    }
    if (m_old != m_new) {
      const float alpha = m_old == neg_inf<float>() ? 0.f : std::exp(m_old - m_new);
      l_loc[i] *= alpha;
      scale_row(acc_loc + i * D, alpha, D);
    }
    l_loc[i] += sum;
    m_loc[i] = m_new;
  }
}

template <typename T>
void forward_tiles(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates, bool is_causal,
                   double scale_d, const Problem& pb, at::Tensor& out, at::Tensor& lse) {
  using A = float;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const int64_t D = pb.dim;
  const A scale = static_cast<A>(scale_d);
  const auto acc_opts = q.options().dtype(at::kFloat);

  const RowState<T, A> state(q, out, pb);

  const RowView<const T> qv(q), kv(k), vv(v);
  constexpr int64_t QB = kTileQuery, KB = kTileKey;
  const int64_t nthreads = at::get_num_threads();
  int64_t max_blocks = 1;
  for (size_t pi = 0; pi < segment_lengths.size(); ++pi) {
    const int64_t count =
        (std::min(segment_lengths[pi], pb.nk) + dilation_rates[pi] - 1) / dilation_rates[pi];
    max_blocks = std::max(max_blocks, (count + KB - 1) / KB);
  }
  const int64_t block_elems = (kConvert ? 2 : 1) * KB * D;  // K^T (and V) of one key block
  const int64_t kept_blocks = std::max<int64_t>(
      1, std::min(max_blocks, kMaxPreparedBytes / (block_elems * int64_t(sizeof(T)))));
  const int64_t per_thread_acc = QB * KB + QB * D + 2 * QB;
  const int64_t per_thread_in = kept_blocks * block_elems + QB * (KB + 2);
  at::Tensor scratch = at::empty({nthreads, per_thread_acc}, acc_opts);
  at::Tensor scratch_in = at::empty({nthreads, per_thread_in}, q.options());
  A* scratch_p = scratch.data_ptr<A>();
  T* scratch_in_p = scratch_in.data_ptr<T>();

  for (size_t pi = 0; pi < segment_lengths.size(); ++pi) {
    const int64_t w = segment_lengths[pi], r = dilation_rates[pi];
    const int64_t nseg = pb.segments(w);
    const int64_t max_count = (std::min(w, pb.nk) + r - 1) / r;
    const int64_t nqb = (max_count + QB - 1) / QB;
    const int64_t nkb = (max_count + KB - 1) / KB;
    // Whole segments per task when there are enough of them; else ranges of query
    // blocks, so that every thread has work.
    const int64_t segment_tasks = pb.batch * pb.heads * nseg;
    const int64_t chunks = std::clamp<int64_t>(
        (4 * nthreads + segment_tasks - 1) / std::max<int64_t>(segment_tasks, 1), 1, nqb);
    const int64_t per_chunk = (nqb + chunks - 1) / chunks;
    const bool keep = nkb <= kept_blocks;

    at::parallel_for(0, segment_tasks * chunks, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      A* S = scratch_p + tid * per_thread_acc;
      A* acc_loc = S + QB * KB;
      A* m_loc = acc_loc + QB * D;
      A* l_loc = m_loc + QB;
      T* prepared = scratch_in_p + tid * per_thread_in;
      T* P = prepared + kept_blocks * block_elems;  // QB x padded KB
      std::vector<int64_t> ready(keep ? nkb : 1);

      for (int64_t task = begin; task < end; ++task) {
        const int64_t chunk = task % chunks;
        int64_t rest = task / chunks;
        const int64_t s = rest % nseg;
        rest /= nseg;
        const int64_t h = rest % pb.heads;
        const int64_t b = rest / pb.heads;
        const int64_t g = h / pb.group();
        const RowSpan row = pb.row(b);
        const SparseSegment seg = sparse_segment(row, w, r, s, head_offset(h, r));
        std::fill(ready.begin(), ready.end(), int64_t(-1));

        for (int64_t qb = chunk * per_chunk; qb < std::min(nqb, (chunk + 1) * per_chunk); ++qb) {
          const int64_t tq0 = seg.first_query + qb * QB;
          if (tq0 >= seg.count) break;
          const int64_t tq1 = std::min(tq0 + QB, seg.count);
          const int64_t qn = tq1 - tq0;
          const int64_t kend = is_causal ? tq1 : seg.count;
          const int64_t qi0 = seg.base + tq0 * r - row.q_start;
          const T* Q = qv.at(b, qi0, h);
          const int64_t ldq = r * qv.sn;
          fill_row<A>(m_loc, neg_inf<A>(), qn);
          fill_row<A>(l_loc, A(0), qn);
          fill_row<A>(acc_loc, A(0), qn * D);

          for (int64_t kb0 = 0; kb0 < kend; kb0 += KB) {
            const int64_t kn = std::min(KB, kend - kb0);
            const int64_t kn_full = std::min(KB, seg.count - kb0);  // the block's extent
            const int64_t kbi = kb0 / KB;
            T* kt = prepared + (keep ? kbi : 0) * block_elems;
            T* vp = kt + KB * D;
            const T* k_first = kv.at(b, seg.base + kb0 * r, g);
            const T* v_first = vv.at(b, seg.base + kb0 * r, g);
            // Prepared blocks cover the block's full extent, so that a later query
            // block of the segment (seeing more keys when causal) reuses them.
            const int64_t slot = keep ? kbi : 0;
            if (ready[slot] != (keep ? 0 : kb0 + 1)) {
              prepare_b_transposed<T>(k_first, r * kv.sn, kn_full, D, kt);
              if constexpr (kConvert) prepare_b_pairs<T>(v_first, r * vv.sn, kn_full, D, vp);
              ready[slot] = keep ? 0 : kb0 + 1;
            }
            tile_gemm(qn, kn, D, Q, ldq, kt, kn_full, S, kn, false);
            if constexpr (kConvert) {
              // P in T; V prepared over kn_full rows: the product reads its first
              // padded_k(kn) rows (pairs), and a padding column of P is zero.
              const int64_t kp = padded_k<T>(kn);
              tile_softmax<T>(S, qn, kn, tq0, kb0, is_causal, scale, D, m_loc, l_loc, acc_loc, P,
                              kp);
              tile_gemm(qn, D, kp, P, kp, vp, D, acc_loc, D, true);
            } else {
              tile_softmax<T>(S, qn, kn, tq0, kb0, is_causal, scale, D, m_loc, l_loc, acc_loc, S,
                              kn);
              tile_gemm(qn, D, kn, S, kn, v_first, r * vv.sn, acc_loc, D, true);
            }
          }

          state.merge(pb, b, h, qi0, r, qn, acc_loc, m_loc, l_loc);
        }
      }
      tile_gemm_release<T>();
    });
  }
  state.finish(out, lse, pb);
}

// --------------------------------------------------------------- backward ----

// Backward of one pattern (w, r). With the final lse and
// Delta = rowsum(dout * out) - dlse, a (query block, key block) pair of a sparse
// segment gives P = exp(scale q k^T - lse) and dS = P * (dO v^T - Delta); then
// dv += P^T dO, dk += scale dS^T q, dq += scale dS k.
template <typename T>
struct PatternBackward {
  using A = acc_t<T>;
  static constexpr bool kConvert = !std::is_same_v<T, A>;
  static constexpr int64_t QB = kQueryBlock, KB = kKeyBlock;

  Problem pb;
  int64_t w, r;
  bool is_causal;
  A scale;
  RowView<const T> qv, kv, vv, dov;
  const A* lse_p;
  const A* delta_p;
  A* dq_p;  // accumulators, contiguous (B, N, H or Hk, D)
  A* dk_p;
  A* dv_p;
  // Rows of dq (B, Nq, H) and of dk/dv (B, Nk, Hk) that hold a contribution: the first
  // one is stored, later ones added, so nothing is zero-filled beforehand.
  uint8_t* dq_seen;
  uint8_t* kv_seen;
  bool skip_first_row;  // LONGNET_DEBUG_SKIP_ROW: row 0 is only ever added to

  // Whether row `flag` of `seen` already holds a contribution (then add to it); marks
  // it as holding one. The debug-skipped row 0 always counts as started.
  bool started(int64_t flag, uint8_t* seen) const {
    if (seen[flag] || (skip_first_row && flag == 0)) return true;
    seen[flag] = 1;
    return false;
  }
  // dst = src on a row's first contribution, dst += src after.
  void add_row(A* dst, const A* src, bool add) const {
    if (add) {
      for (int64_t j = 0; j < pb.dim; ++j) dst[j] += src[j];
    } else {
      std::copy(src, src + pb.dim, dst);
    }
  }
  // Zeroes the rows of dq a product is about to add into, where nothing is stored yet.
  void start_dq_rows(int64_t b, int64_t h, int64_t qi0, int64_t qn, A* first) const {
    for (int64_t i = 0; i < qn; ++i) {
      if (!started((b * pb.nq + qi0 + i * r) * pb.heads + h, dq_seen)) {
        fill_row<A>(first + i * r * pb.heads * pb.dim, A(0), pb.dim);
      }
    }
  }

  // Per-thread scratch: S/P and dP/dS tiles, dk/dv (or dq) tiles, converted rows.
  static int64_t scratch_size(int64_t D, int64_t /*max_count*/) {
    return 2 * QB * KB + 2 * KB * D + (kConvert ? 2 * QB * D + 2 * KB * D : 0);
  }
  struct Scratch {
    A *S, *dP, *tile0, *tile1, *q_buf, *do_buf, *k_buf, *v_buf;
    Scratch(A* buf, int64_t D, int64_t /*max_count*/) {
      S = buf;
      dP = S + QB * KB;
      tile0 = dP + QB * KB;
      tile1 = tile0 + KB * D;
      q_buf = tile1 + KB * D;
      do_buf = q_buf + QB * D;
      k_buf = do_buf + QB * D;
      v_buf = k_buf + KB * D;
    }
  };

  SparseSegment segment(const RowSpan& row, int64_t s, int64_t h) const {
    return sparse_segment(row, w, r, s, head_offset(h, r));
  }
  int64_t query_index(const RowSpan& row, const SparseSegment& seg, int64_t t) const {
    return seg.base + t * r - row.q_start;
  }

  // Turns S = Q K^T (scaled) into P and dP = dO V^T into dS for rows tq0.. of
  // head h against keys kb0.. of the sparse segment.
  void probs_and_grads(int64_t b, int64_t h, const RowSpan& row, const SparseSegment& seg,
                       int64_t tq0, int64_t qn, int64_t kb0, int64_t kn, A* S, A* dP) const {
    const A* lse_row = lse_p + (b * pb.heads + h) * pb.nq;
    const A* delta_row = delta_p + (b * pb.heads + h) * pb.nq;
    for (int64_t i = 0; i < qn; ++i) {
      A* s_row = S + i * kn;
      A* dp_row = dP + i * kn;
      const int64_t qi = query_index(row, seg, tq0 + i);
      const int64_t valid = is_causal ? std::clamp<int64_t>(tq0 + i - kb0 + 1, 0, kn) : kn;
      const A row_lse = lse_row[qi];
      if (valid == 0 || row_lse == neg_inf<A>()) {
        fill_row<A>(s_row, A(0), kn);
        fill_row<A>(dp_row, A(0), kn);
        continue;
      }
      softmax_grad_row(s_row, dp_row, row_lse, delta_row[qi], valid);
      fill_row<A>(s_row + valid, A(0), kn - valid);
      fill_row<A>(dp_row + valid, A(0), kn - valid);
    }
  }

  // dk, dv of key block kb0 of head h's sparse segment (kv head g) from all its
  // queries; with_dq also adds those queries' dq. The caller owns these rows.
  void key_block(int64_t b, int64_t h, int64_t s, int64_t kb0, bool with_dq,
                 const Scratch& sc) const {
    const int64_t D = pb.dim, g = h / pb.group();
    const RowSpan row = pb.row(b);
    const SparseSegment seg = segment(row, s, h);
    if (seg.first_query >= seg.count || kb0 >= seg.count) return;
    const int64_t kn = std::min(KB, seg.count - kb0);
    const int64_t key0 = seg.base + kb0 * r;
    int64_t ldk, ldv, ldq, ldo;
    const A* K = load_rows<T, A>(kv.at(b, key0, g), r * kv.sn, kn, D, sc.k_buf, &ldk);
    const A* V = load_rows<T, A>(vv.at(b, key0, g), r * vv.sn, kn, D, sc.v_buf, &ldv);
    A* dk_loc = sc.tile0;
    A* dv_loc = sc.tile1;
    fill_row<A>(dk_loc, A(0), kn * D);
    fill_row<A>(dv_loc, A(0), kn * D);

    const int64_t q_first = is_causal ? std::max(seg.first_query, kb0) : seg.first_query;
    for (int64_t tq0 = q_first; tq0 < seg.count; tq0 += QB) {
      const int64_t qn = std::min(QB, seg.count - tq0);
      const int64_t qi0 = query_index(row, seg, tq0);
      const A* Q = load_rows<T, A>(qv.at(b, qi0, h), r * qv.sn, qn, D, sc.q_buf, &ldq);
      const A* dO = load_rows<T, A>(dov.at(b, qi0, h), r * dov.sn, qn, D, sc.do_buf, &ldo);
      gemm_nt<A>(qn, kn, D, scale, Q, ldq, K, ldk, A(0), sc.S, kn);
      gemm_nt<A>(qn, kn, D, A(1), dO, ldo, V, ldv, A(0), sc.dP, kn);
      probs_and_grads(b, h, row, seg, tq0, qn, kb0, kn, sc.S, sc.dP);
      gemm_tn<A>(kn, D, qn, A(1), sc.S, kn, dO, ldo, A(1), dv_loc, D);
      gemm_tn<A>(kn, D, qn, scale, sc.dP, kn, Q, ldq, A(1), dk_loc, D);
      if (with_dq) {
        A* dq_rows = dq_p + ((b * pb.nq + qi0) * pb.heads + h) * D;
        start_dq_rows(b, h, qi0, qn, dq_rows);
        gemm_nn<A>(qn, D, kn, scale, sc.dP, kn, K, ldk, A(1), dq_rows, r * pb.heads * D);
      }
    }

    const int64_t kv_row = pb.kv_heads * D;
    A* dk_rows = dk_p + ((b * pb.nk + key0) * pb.kv_heads + g) * D;
    A* dv_rows = dv_p + ((b * pb.nk + key0) * pb.kv_heads + g) * D;
    for (int64_t i = 0; i < kn; ++i) {
      const bool add = started((b * pb.nk + key0 + i * r) * pb.kv_heads + g, kv_seen);
      add_row(dk_rows + i * r * kv_row, dk_loc + i * D, add);
      add_row(dv_rows + i * r * kv_row, dv_loc + i * D, add);
    }
  }

  // dq of query block qb of head h's sparse segment from all its keys. The caller
  // owns these rows.
  void query_block(int64_t b, int64_t h, int64_t s, int64_t qb, const Scratch& sc) const {
    const int64_t D = pb.dim, g = h / pb.group();
    const RowSpan row = pb.row(b);
    const SparseSegment seg = segment(row, s, h);
    const int64_t tq0 = seg.first_query + qb * QB;
    if (tq0 >= seg.count) return;
    const int64_t qn = std::min(QB, seg.count - tq0);
    const int64_t kend = is_causal ? tq0 + qn : seg.count;
    const int64_t qi0 = query_index(row, seg, tq0);
    int64_t ldk, ldv, ldq, ldo;
    const A* Q = load_rows<T, A>(qv.at(b, qi0, h), r * qv.sn, qn, D, sc.q_buf, &ldq);
    const A* dO = load_rows<T, A>(dov.at(b, qi0, h), r * dov.sn, qn, D, sc.do_buf, &ldo);
    A* dq_loc = sc.tile0;  // qn x D fits: QB <= KB
    fill_row<A>(dq_loc, A(0), qn * D);
    for (int64_t kb0 = 0; kb0 < kend; kb0 += KB) {
      const int64_t kn = std::min(KB, kend - kb0);
      const int64_t key0 = seg.base + kb0 * r;
      const A* K = load_rows<T, A>(kv.at(b, key0, g), r * kv.sn, kn, D, sc.k_buf, &ldk);
      const A* V = load_rows<T, A>(vv.at(b, key0, g), r * vv.sn, kn, D, sc.v_buf, &ldv);
      gemm_nt<A>(qn, kn, D, scale, Q, ldq, K, ldk, A(0), sc.S, kn);
      gemm_nt<A>(qn, kn, D, A(1), dO, ldo, V, ldv, A(0), sc.dP, kn);
      probs_and_grads(b, h, row, seg, tq0, qn, kb0, kn, sc.S, sc.dP);
      gemm_nn<A>(qn, D, kn, scale, sc.dP, kn, K, ldk, A(1), dq_loc, D);
    }
    A* dq_rows = dq_p + ((b * pb.nq + qi0) * pb.heads + h) * D;
    for (int64_t i = 0; i < qn; ++i) {
      const bool add = started((b * pb.nq + qi0 + i * r) * pb.heads + h, dq_seen);
      add_row(dq_rows + i * r * pb.heads * D, dq_loc + i * D, add);
    }
  }
};

// ----------------------------------------------- micro-kernel backward ----
// PatternBackward's schedule with the products on tile_gemm, inputs multiplied in
// T, sums in float32. Per (query block, key block) pair, with the key block's K^T,
// V^T and (16-bit formats) K prepared once per key block:
//   S = Q K^T, dP = dO V^T (A = Q, dO in place); P, dS = scale * P * (dP - Delta);
//   dv^T += dO^T P, dk^T += Q^T dS (dv, dk of the key block kept transposed,
//   D x keys, so that P and dS are B operands: in place for float32, rounded to T
//   and pair-interleaved for 16-bit formats); dq += dS K.
template <typename T>
struct TileBackward : PatternBackward<T> {
  using Base = PatternBackward<T>;
  using A = float;
  static constexpr bool kConvert = !std::is_same_v<T, A>;
  static constexpr int64_t QB = kTileQuery, KB = kTileKey;
  explicit TileBackward(const Base& base) : Base(base) {}

  // Per-thread scratch: float S, dP, dk^T, dv^T, dq tiles; then T buffers: K^T, V^T,
  // for 16-bit formats K, P and dS (B form) and dS (A form); Q^T and dO^T of one pair,
  // or (16-bit formats, when they fit) of a whole sparse segment, which saves their
  // transposition per pair. float32 keeps no more than the BLAS path's scratch.
  static constexpr int64_t k16 = kConvert ? 1 : 0;
  static int64_t segment_ld(int64_t D, int64_t max_count) {
    const int64_t ld = max_count + 2;
    return kConvert && 2 * D * ld * int64_t(sizeof(T)) <= kMaxPreparedBytes / 4 ? ld : 0;
  }
  static int64_t t_elems(int64_t D, int64_t max_count) {
    const int64_t seg_ld = segment_ld(D, max_count);
    return (2 + k16) * KB * D + (seg_ld > 0 ? 2 * D * seg_ld : 2 * D * (QB + 2)) +
           3 * k16 * (QB + 2) * (KB + 2);
  }
  static int64_t scratch_size(int64_t D, int64_t max_count) {
    const int64_t t_floats = (t_elems(D, max_count) * int64_t(sizeof(T)) + 3) / 4;
    return 16 + 2 * QB * KB + 4 * D * KB + QB * D + t_floats;
  }
  struct Scratch {
    A *S, *dP, *dkT, *dvT, *dq, *dk, *dv;
    T *kt, *vt, *kp, *qt, *dot, *p_b, *ds_b, *ds_a, *qt_seg, *dot_seg;
    int64_t seg_ld;
    int64_t* tag;  // (b, h, s, w, r) whose Q^T, dO^T qt_seg/dot_seg hold
    Scratch(A* buf, int64_t D, int64_t max_count) {
      seg_ld = segment_ld(D, max_count);
      tag = reinterpret_cast<int64_t*>(buf);  // 5 values in 16 floats
      std::fill(tag, tag + 5, int64_t(-1));
      buf += 16;
      S = buf;
      dP = S + QB * KB;
      dkT = dP + QB * KB;
      dvT = dkT + D * KB;
      dq = dvT + D * KB;
      dk = dq + QB * D;  // dk, dv of a key block as rows (dkT, dvT transposed back)
      dv = dk + KB * D;
      T* t = reinterpret_cast<T*>(dv + KB * D);
      kt = t;
      vt = kt + KB * D;
      kp = vt + KB * D;  // 16-bit formats only
      t = kp + k16 * KB * D;
      qt_seg = dot_seg = qt = dot = nullptr;
      if (seg_ld > 0) {
        qt_seg = t;
        dot_seg = qt_seg + D * seg_ld;
        t = dot_seg + D * seg_ld;
      } else {
        qt = t;
        dot = qt + D * (QB + 2);
        t = dot + D * (QB + 2);
      }
      p_b = t;  // 16-bit formats only
      ds_b = p_b + k16 * (QB + 2) * (KB + 2);
      ds_a = ds_b + k16 * (QB + 2) * (KB + 2);
    }
  };

  // Q^T and dO^T of the queries of sparse segment `seg` (head h), prepared once per
  // (b, h, s) into the segment buffers (columns past the last query zero).
  void prepare_segment_queries(int64_t b, int64_t h, int64_t s, const RowSpan& row,
                               const SparseSegment& seg, const Scratch& sc) const {
    if (sc.tag[0] == b && sc.tag[1] == h && sc.tag[2] == s && sc.tag[3] == this->w &&
        sc.tag[4] == this->r) {
      return;
    }
    const int64_t D = this->pb.dim, r = this->r;
    const int64_t t0 = seg.first_query, n = seg.count - seg.first_query;
    const int64_t qi0 = this->query_index(row, seg, t0);
    // Column t of the buffers is query element t (t < first_query unused).
    transpose_a<T>(this->qv.at(b, qi0, h), r * this->qv.sn, n, D, sc.qt_seg + t0, sc.seg_ld, n + 2);
    transpose_a<T>(this->dov.at(b, qi0, h), r * this->dov.sn, n, D, sc.dot_seg + t0, sc.seg_ld,
                   n + 2);
    sc.tag[0] = b, sc.tag[1] = h, sc.tag[2] = s, sc.tag[3] = this->w, sc.tag[4] = this->r;
  }

  // Prepares the B operands of key block kb0 (kn keys from key0): K^T, V^T and,
  // with with_k, K itself (16-bit formats; float32 reads K in place).
  void prepare_keys(int64_t b, int64_t g, int64_t key0, int64_t kn, bool with_k,
                    const Scratch& sc) const {
    const int64_t D = this->pb.dim, r = this->r;
    prepare_b_transposed<T>(this->kv.at(b, key0, g), r * this->kv.sn, kn, D, sc.kt);
    prepare_b_transposed<T>(this->vv.at(b, key0, g), r * this->vv.sn, kn, D, sc.vt);
    if constexpr (kConvert) {
      if (with_k) prepare_b_pairs<T>(this->kv.at(b, key0, g), r * this->kv.sn, kn, D, sc.kp);
    }
  }

  // S, dP of rows tq0.. against the first kn keys of the prepared key block (kt, vt
  // rows ld_prep long), turned into P and scale * dS (rows kn long): in place (float),
  // or for bfloat16 rounded in the same pass straight into the B forms p_b, ds_b and
  // (with ds_rows) the A form ds_a of dS.
  void tile_probs(int64_t b, int64_t h, const RowSpan& row, const SparseSegment& seg, int64_t tq0,
                  int64_t qn, int64_t kb0, int64_t kn, int64_t ld_prep, const T* Q, const T* dO,
                  bool ds_rows, const Scratch& sc) const {
    const int64_t D = this->pb.dim, r = this->r;
    tile_gemm(qn, kn, D, Q, r * this->qv.sn, sc.kt, ld_prep, sc.S, kn, false);
    tile_gemm(qn, kn, D, dO, r * this->dov.sn, sc.vt, ld_prep, sc.dP, kn, false);
    const A* lse_row = this->lse_p + (b * this->pb.heads + h) * this->pb.nq;
    const A* delta_row = this->delta_p + (b * this->pb.heads + h) * this->pb.nq;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const int64_t kp = padded_k<T>(kn);
      for (int64_t i = 0; i < qn; i += 2) {
        GradRowPair pair{};
        for (int64_t t = 0; t < 2; ++t) {
          const int64_t ii = std::min(i + t, qn - 1);  // an absent row reads row qn - 1
          pair.s[t] = sc.S + ii * kn;
          pair.dp[t] = sc.dP + ii * kn;
          if (i + t >= qn) continue;  // valid 0
          const int64_t qi = this->query_index(row, seg, tq0 + ii);
          pair.lse[t] = lse_row[qi];
          pair.delta[t] = delta_row[qi];
          const int64_t valid =
              this->is_causal ? std::clamp<int64_t>(tq0 + ii - kb0 + 1, 0, kn) : kn;
          pair.valid[t] = pair.lse[t] == neg_inf<A>() ? 0 : valid;
        }
        softmax_grad_pair_bf16(pair, this->scale, kn, reinterpret_cast<uint16_t*>(sc.p_b + i * kn),
                               reinterpret_cast<uint16_t*>(sc.ds_b + i * kn),
                               ds_rows ? reinterpret_cast<uint16_t*>(sc.ds_a + i * kp) : nullptr,
                               kp, std::min<int64_t>(2, qn - i), kp);
      }
      return;
    }
    for (int64_t i = 0; i < qn; ++i) {
      A* s_row = sc.S + i * kn;
      A* dp_row = sc.dP + i * kn;
      const int64_t qi = this->query_index(row, seg, tq0 + i);
      const int64_t valid = this->is_causal ? std::clamp<int64_t>(tq0 + i - kb0 + 1, 0, kn) : kn;
      const A row_lse = lse_row[qi];
      if (valid == 0 || row_lse == neg_inf<A>()) {
        fill_row<A>(s_row, A(0), kn);
        fill_row<A>(dp_row, A(0), kn);
        continue;
      }
      softmax_grad_row_scaled(s_row, dp_row, this->scale, row_lse, delta_row[qi], valid);
      fill_row<A>(s_row + valid, A(0), kn - valid);
      fill_row<A>(dp_row + valid, A(0), kn - valid);
    }
  }

  // dq rows (ld_c apart) += scale dS K for the current pair.
  void add_dq(int64_t qn, int64_t kn, const T* k_rows, int64_t ldk, A* dq_rows, int64_t ld_c,
              const Scratch& sc) const {
    const int64_t D = this->pb.dim;
    if constexpr (kConvert) {
      const int64_t kp = padded_k<T>(kn);
      if constexpr (!std::is_same_v<T, c10::BFloat16>) {  // bfloat16: tile_probs wrote ds_a
        for (int64_t i = 0; i < qn; ++i) round_row<T>(sc.dP + i * kn, kn, kp, sc.ds_a + i * kp);
      }
      tile_gemm(qn, D, kp, sc.ds_a, kp, sc.kp, D, dq_rows, ld_c, true);
    } else {
      tile_gemm(qn, D, kn, sc.dP, kn, k_rows, ldk, dq_rows, ld_c, true);
    }
  }

  void key_block(int64_t b, int64_t h, int64_t s, int64_t kb0, bool with_dq,
                 const Scratch& sc) const {
    const Base& pt = *this;
    const int64_t D = pt.pb.dim, g = h / pt.pb.group(), r = pt.r;
    const RowSpan row = pt.pb.row(b);
    const SparseSegment seg = pt.segment(row, s, h);
    if (seg.first_query >= seg.count || kb0 >= seg.count) return;
    const int64_t kn = std::min(KB, seg.count - kb0);
    const int64_t key0 = seg.base + kb0 * r;
    prepare_keys(b, g, key0, kn, with_dq, sc);
    if (sc.seg_ld > 0) prepare_segment_queries(b, h, s, row, seg, sc);
    fill_row<A>(sc.dkT, A(0), D * kn);
    fill_row<A>(sc.dvT, A(0), D * kn);

    const int64_t q_first = pt.is_causal ? std::max(seg.first_query, kb0) : seg.first_query;
    for (int64_t tq0 = q_first; tq0 < seg.count; tq0 += QB) {
      const int64_t qn = std::min(QB, seg.count - tq0);
      const int64_t qi0 = pt.query_index(row, seg, tq0);
      const T* Q = pt.qv.at(b, qi0, h);
      const T* dO = pt.dov.at(b, qi0, h);
      // Causal: no row of this query block sees a key past its last query.
      const int64_t kq = pt.is_causal ? std::min(kn, tq0 + qn - kb0) : kn;
      tile_probs(b, h, row, seg, tq0, qn, kb0, kq, kn, Q, dO, with_dq, sc);
      const int64_t qp = padded_k<T>(qn);
      // A = Q^T, dO^T columns tq0..: from the segment buffers, else transposed here.
      const T *qt = sc.qt, *dot = sc.dot;
      int64_t ld_t = qp;
      if (sc.seg_ld > 0) {
        qt = sc.qt_seg + tq0;
        dot = sc.dot_seg + tq0;
        ld_t = sc.seg_ld;
      } else {
        transpose_a<T>(Q, r * pt.qv.sn, qn, D, sc.qt, qp, qp);
        transpose_a<T>(dO, r * pt.dov.sn, qn, D, sc.dot, qp, qp);
      }
      if constexpr (kConvert) {
        if constexpr (!std::is_same_v<T, c10::BFloat16>) {  // bfloat16: written by tile_probs
          prepare_b_rounded<T>(sc.S, kq, qn, kq, sc.p_b);
          prepare_b_rounded<T>(sc.dP, kq, qn, kq, sc.ds_b);
        }
        tile_gemm(D, kq, qp, dot, ld_t, sc.p_b, kq, sc.dvT, kn, true);
        tile_gemm(D, kq, qp, qt, ld_t, sc.ds_b, kq, sc.dkT, kn, true);
      } else {
        tile_gemm(D, kq, qn, dot, ld_t, sc.S, kq, sc.dvT, kn, true);
        tile_gemm(D, kq, qn, qt, ld_t, sc.dP, kq, sc.dkT, kn, true);
      }
      if (with_dq) {
        A* dq_rows = pt.dq_p + ((b * pt.pb.nq + qi0) * pt.pb.heads + h) * D;
        pt.start_dq_rows(b, h, qi0, qn, dq_rows);
        add_dq(qn, kq, pt.kv.at(b, key0, g), r * pt.kv.sn, dq_rows, r * pt.pb.heads * D, sc);
      }
    }

    transpose_elems<A>(D, kn, sc.dkT, kn, sc.dk, D);
    transpose_elems<A>(D, kn, sc.dvT, kn, sc.dv, D);
    const int64_t kv_row = pt.pb.kv_heads * D;
    A* dk_rows = pt.dk_p + ((b * pt.pb.nk + key0) * pt.pb.kv_heads + g) * D;
    A* dv_rows = pt.dv_p + ((b * pt.pb.nk + key0) * pt.pb.kv_heads + g) * D;
    for (int64_t i = 0; i < kn; ++i) {
      const bool add = pt.started((b * pt.pb.nk + key0 + i * r) * pt.pb.kv_heads + g, pt.kv_seen);
      pt.add_row(dk_rows + i * r * kv_row, sc.dk + i * D, add);
      pt.add_row(dv_rows + i * r * kv_row, sc.dv + i * D, add);
    }
  }

  void query_block(int64_t b, int64_t h, int64_t s, int64_t qb, const Scratch& sc) const {
    const Base& pt = *this;
    const int64_t D = pt.pb.dim, g = h / pt.pb.group(), r = pt.r;
    const RowSpan row = pt.pb.row(b);
    const SparseSegment seg = pt.segment(row, s, h);
    const int64_t tq0 = seg.first_query + qb * QB;
    if (tq0 >= seg.count) return;
    const int64_t qn = std::min(QB, seg.count - tq0);
    const int64_t kend = pt.is_causal ? tq0 + qn : seg.count;
    const int64_t qi0 = pt.query_index(row, seg, tq0);
    const T* Q = pt.qv.at(b, qi0, h);
    const T* dO = pt.dov.at(b, qi0, h);
    fill_row<A>(sc.dq, A(0), qn * D);
    for (int64_t kb0 = 0; kb0 < kend; kb0 += KB) {
      const int64_t kn = std::min(KB, kend - kb0);
      const int64_t key0 = seg.base + kb0 * r;
      prepare_keys(b, g, key0, kn, true, sc);
      tile_probs(b, h, row, seg, tq0, qn, kb0, kn, kn, Q, dO, true, sc);
      add_dq(qn, kn, pt.kv.at(b, key0, g), r * pt.kv.sn, sc.dq, D, sc);
    }
    A* dq_rows = pt.dq_p + ((b * pt.pb.nq + qi0) * pt.pb.heads + h) * D;
    for (int64_t i = 0; i < qn; ++i) {
      const bool add = pt.started((b * pt.pb.nq + qi0 + i * r) * pt.pb.heads + h, pt.dq_seen);
      pt.add_row(dq_rows + i * r * pt.pb.heads * D, sc.dq + i * D, add);
    }
  }
};

// Finishes `dst` (contiguous (B, N, H, D)) row by row: rows no pattern reached are
// written as 0; reached rows are converted from `acc` (when `acc` is not `dst`
// itself). The debug switch skips row (0, 0, 0).
template <typename T, typename A>
void finish_gradients(const at::Tensor& acc, at::Tensor& dst, const uint8_t* seen) {
  const int64_t D = dst.size(3);
  const int64_t rows = dst.numel() / std::max<int64_t>(D, 1);
  const int64_t first = debug_skip_first_row() ? 1 : 0;
  const A* src_p = acc.data_ptr<A>();
  T* dst_p = dst.data_ptr<T>();
  at::parallel_for(first, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* out = dst_p + row * D;
      if (!seen[row]) {
        std::fill(out, out + D, T(0));
      } else if constexpr (!std::is_same_v<T, A>) {
        const A* in = src_p + row * D;
        for (int64_t j = 0; j < D; ++j) out[j] = static_cast<T>(in[j]);
      }
    }
  });
}

// Ends a thread's run of micro-kernel products (TileBackward only).
template <typename T, typename Pattern>
void release_products() {
  if constexpr (!std::is_same_v<Pattern, PatternBackward<T>>) tile_gemm_release<T>();
}

template <typename T, typename Pattern>
void backward_impl(const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse, at::IntArrayRef segment_lengths,
                   at::IntArrayRef dilation_rates, bool is_causal, double scale_d,
                   const Problem& pb, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using A = acc_t<T>;
  const int64_t D = pb.dim;
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<A>::value);

  const A* dlse_p = dlse.data_ptr<A>();
  const RowView<const T> dov(dout), ov(out);

  // Delta = rowsum(dout * out) - dlse, per (b, h, query).
  at::Tensor delta = at::empty({pb.batch, pb.heads, pb.nq}, acc_opts);
  A* delta_p = delta.data_ptr<A>();
  at::parallel_for(0, pb.batch * pb.heads * pb.nq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t qi = idx % pb.nq;
      const int64_t h = (idx / pb.nq) % pb.heads;
      const int64_t b = idx / (pb.nq * pb.heads);
      const T* o = ov.at(b, qi, h);
      const T* g = dov.at(b, qi, h);
      A sum = 0;
      for (int64_t j = 0; j < D; ++j) sum += static_cast<A>(o[j]) * static_cast<A>(g[j]);
      delta_p[idx] = sum - dlse_p[idx];
    }
  });

  // Patterns accumulate in dq, dk, dv themselves (float32/float64) or in float32
  // accumulators (bfloat16/float16); a row's first contribution is stored, so nothing
  // is zero-filled and finish_gradients writes the rows no pattern reached.
  constexpr bool kConvert = !std::is_same_v<T, A>;
  at::Tensor dq_acc = kConvert ? at::empty(dq.sizes(), acc_opts) : dq;
  at::Tensor dk_acc = kConvert ? at::empty(dk.sizes(), acc_opts) : dk;
  at::Tensor dv_acc = kConvert ? at::empty(dv.sizes(), acc_opts) : dv;
  const auto flag_opts = q.options().dtype(at::kByte);
  at::Tensor dq_seen = at::zeros({pb.batch * pb.nq * pb.heads}, flag_opts);
  at::Tensor kv_seen = at::zeros({pb.batch * pb.nk * pb.kv_heads}, flag_opts);

  const int64_t nthreads = at::get_num_threads();
  int64_t max_count_all = 1;
  for (size_t pi = 0; pi < segment_lengths.size(); ++pi) {
    max_count_all =
        std::max(max_count_all, (std::min(segment_lengths[pi], pb.nk) + dilation_rates[pi] - 1) /
                                    dilation_rates[pi]);
  }
  const int64_t per_thread = Pattern::scratch_size(D, max_count_all);
  at::Tensor scratch = at::empty({nthreads, per_thread}, acc_opts);
  A* scratch_p = scratch.data_ptr<A>();

  for (size_t pi = 0; pi < segment_lengths.size(); ++pi) {
    const Pattern pat(PatternBackward<T>{
        pb, segment_lengths[pi], dilation_rates[pi], is_causal, static_cast<A>(scale_d),
        RowView<const T>(q), RowView<const T>(k), RowView<const T>(v), dov, lse.data_ptr<A>(),
        delta_p, dq_acc.data_ptr<A>(), dk_acc.data_ptr<A>(), dv_acc.data_ptr<A>(),
        dq_seen.data_ptr<uint8_t>(), kv_seen.data_ptr<uint8_t>(), debug_skip_first_row()});
    const int64_t nseg = pb.segments(pat.w);
    const int64_t max_count = (std::min(pat.w, pb.nk) + pat.r - 1) / pat.r;
    const int64_t segment_tasks = pb.batch * pb.kv_heads * nseg;

    if (segment_tasks >= 2 * nthreads || nthreads == 1) {
      // Fused: a task owns one (batch, kv head, segment), i.e. all dk/dv rows of
      // that kv head in the segment and all dq rows of its query heads there.
      at::parallel_for(0, segment_tasks, 1, [&](int64_t begin, int64_t end) {
        const typename Pattern::Scratch sc(scratch_p + at::get_thread_num() * per_thread, D,
                                           max_count_all);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t s = task % nseg;
          const int64_t g = (task / nseg) % pb.kv_heads;
          const int64_t b = task / (nseg * pb.kv_heads);
          for (int64_t h = g * pb.group(); h < (g + 1) * pb.group(); ++h) {
            for (int64_t kb0 = 0; kb0 < max_count; kb0 += Pattern::KB) {
              pat.key_block(b, h, s, kb0, /*with_dq=*/true, sc);
            }
          }
        }
        release_products<T, Pattern>();
      });
    } else {
      // Too few segments to keep every thread busy: split into key blocks for
      // dk/dv, then query blocks for dq (recomputing P once more).
      const int64_t nkb = (max_count + Pattern::KB - 1) / Pattern::KB;
      at::parallel_for(0, segment_tasks * nkb, 1, [&](int64_t begin, int64_t end) {
        const typename Pattern::Scratch sc(scratch_p + at::get_thread_num() * per_thread, D,
                                           max_count_all);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t kb = task % nkb;
          const int64_t s = (task / nkb) % nseg;
          const int64_t g = (task / (nkb * nseg)) % pb.kv_heads;
          const int64_t b = task / (nkb * nseg * pb.kv_heads);
          for (int64_t h = g * pb.group(); h < (g + 1) * pb.group(); ++h) {
            pat.key_block(b, h, s, kb * Pattern::KB, /*with_dq=*/false, sc);
          }
        }
        release_products<T, Pattern>();
      });
      const int64_t nqb = (max_count + Pattern::QB - 1) / Pattern::QB;
      at::parallel_for(0, pb.batch * pb.heads * nseg * nqb, 1, [&](int64_t begin, int64_t end) {
        const typename Pattern::Scratch sc(scratch_p + at::get_thread_num() * per_thread, D,
                                           max_count_all);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t qb = task % nqb;
          const int64_t s = (task / nqb) % nseg;
          const int64_t h = (task / (nqb * nseg)) % pb.heads;
          const int64_t b = task / (nqb * nseg * pb.heads);
          pat.query_block(b, h, s, qb, sc);
        }
        release_products<T, Pattern>();
      });
    }
  }

  finish_gradients<T, A>(dq_acc, dq, dq_seen.data_ptr<uint8_t>());
  finish_gradients<T, A>(dk_acc, dk, kv_seen.data_ptr<uint8_t>());
  finish_gradients<T, A>(dv_acc, dv, kv_seen.data_ptr<uint8_t>());
}

// Whether the micro-kernel kernels run for T and head dim D: float32, bfloat16 and
// float16 where tile_gemm has a kernel for them; 16-bit formats need D even (their
// products pair up the columns of Q and dO in place).
template <typename T>
bool use_tiles(int64_t D) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    return tile_gemm_available<T>() && (std::is_same_v<T, float> || D % 2 == 0);
  }
}

template <typename T>
const char* products_name(int64_t D) {
  if (use_tiles<T>(D)) {
    if constexpr (std::is_same_v<T, float>) return "brgemm-float32";
    if constexpr (std::is_same_v<T, c10::BFloat16>) return "brgemm-bfloat16";
    return "brgemm-float16";
  }
  const bool blas = blas_available();
  if constexpr (std::is_same_v<T, double>) return blas ? "blas-float64" : "portable-float64";
  return blas ? "blas-float32" : "portable-float32";
}

}  // namespace

// ------------------------------------------------------------- operators ----
// The fused engine's entry points (fused.h): engine/dispatch.cpp has checked the
// arguments; the key ranges are checked again where they are read.

std::string planned_products(at::ScalarType dtype, int64_t head_dim) {
  std::string name;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "longnet_products",
                                  [&] { name = products_name<scalar_t>(head_dim); });
  return name;
}

std::tuple<at::Tensor, at::Tensor> fused_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in,
                                                 at::IntArrayRef segment_lengths,
                                                 at::IntArrayRef dilation_rates, bool is_causal,
                                                 double scale, int64_t position_offset,
                                                 const std::optional<at::Tensor>& key_start,
                                                 const std::optional<at::Tensor>& key_end) {
  TORCH_CHECK(q_in.device().is_cpu(), "longnet: expected CPU tensors, got ", q_in.device());
  choose_bf16_row_pass();
  const KeyRanges ranges(key_start, key_end, q_in, k_in.size(1));
  at::Tensor out, lse;
  std::tie(out, lse) = allocate_forward_outputs(q_in);
  if (q_in.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const at::Tensor q = with_dense_rows(q_in), k = with_dense_rows(k_in), v = with_dense_rows(v_in);
  const Problem pb{q.size(0), q.size(1),       k.size(1),          q.size(2),       k.size(2),
                   q.size(3), position_offset, ranges.start_ptr(), ranges.end_ptr()};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "longnet_fwd_cpu", [&] {
        bool tiles = false;
        if constexpr (!std::is_same_v<scalar_t, double>) {
          tiles = use_tiles<scalar_t>(pb.dim);
          if (tiles) {
            forward_tiles<scalar_t>(q, k, v, segment_lengths, dilation_rates, is_causal, scale, pb,
                                    out, lse);
          }
        }
        if (!tiles) {
          forward_impl<scalar_t>(q, k, v, segment_lengths, dilation_rates, is_causal, scale, pb,
                                 out, lse);
        }
        set_last_products(products_name<scalar_t>(pb.dim));
      });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates,
    bool is_causal, double scale, int64_t position_offset,
    const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end) {
  TORCH_CHECK(q_in.device().is_cpu(), "longnet: expected CPU tensors, got ", q_in.device());
  choose_bf16_row_pass();
  const KeyRanges ranges(key_start, key_end, q_in, k_in.size(1));
  at::Tensor dq, dk, dv;
  std::tie(dq, dk, dv) = allocate_backward_outputs(q_in, k_in, v_in);
  if (q_in.numel() == 0 || k_in.numel() == 0) {
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  }
  const at::Tensor q = with_dense_rows(q_in), k = with_dense_rows(k_in), v = with_dense_rows(v_in);
  const BackwardRows rows(q_in, grad_out, out_in, lse_in, grad_lse);
  const Problem pb{q.size(0), q.size(1),       k.size(1),          q.size(2),       k.size(2),
                   q.size(3), position_offset, ranges.start_ptr(), ranges.end_ptr()};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "longnet_bwd_cpu", [&] {
        bool tiles = false;
        if constexpr (!std::is_same_v<scalar_t, double>) {
          tiles = use_tiles<scalar_t>(pb.dim);
          if (tiles) {
            backward_impl<scalar_t, TileBackward<scalar_t>>(
                rows.grad_out, rows.grad_lse, q, k, v, rows.out, rows.lse, segment_lengths,
                dilation_rates, is_causal, scale, pb, dq, dk, dv);
          }
        }
        if (!tiles) {
          backward_impl<scalar_t, PatternBackward<scalar_t>>(
              rows.grad_out, rows.grad_lse, q, k, v, rows.out, rows.lse, segment_lengths,
              dilation_rates, is_causal, scale, pb, dq, dk, dv);
        }
        set_last_products(products_name<scalar_t>(pb.dim));
      });
  return {dq, dk, dv};
}

}  // namespace longnet::cpu

// Which products the fused CPU kernels use: _cpu_products() for this thread's last
// call, _cpu_products_for(dtype, head_dim) for a call that would run now;
// _cpu_bf16_row_pass() which code runs the bfloat16 softmax row passes;
// _cpu_tile_sizes() the micro-kernel tiles (queries, keys) of forward and backward.
TORCH_LIBRARY_FRAGMENT(longnet, m) {
  m.def("_cpu_products() -> str", []() { return std::string(longnet::cpu::last_products()); });
  m.def("_cpu_products_for(ScalarType dtype, int head_dim) -> str",
        [](at::ScalarType dtype, int64_t head_dim) {
          return longnet::cpu::planned_products(dtype, head_dim);
        });
  m.def("_cpu_bf16_row_pass() -> str", []() { return std::string(longnet::cpu::bf16_row_pass()); });
  m.def("_cpu_tile_sizes() -> int[]",
        []() { return std::vector<int64_t>{longnet::cpu::kTileQuery, longnet::cpu::kTileKey}; });
}
