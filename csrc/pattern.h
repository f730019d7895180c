// Pattern arithmetic of dilated attention (docs/operator.md), shared by the CPU
// and CUDA kernels.
//
// Row b of a batch holds its sequence in the keys [key_begin, key_end) (the whole
// row unless key ranges are given); key index key_begin sits at absolute position
// `position_offset`. Pattern (w, r) cuts absolute positions into segments
// [s*w, (s+1)*w). Query head j keeps the positions of segment s whose offset inside
// the segment is congruent to o = j mod r: the "sparse segment" of the positions
// s*w + o + t*r that lie inside the row. Within one sparse segment the causal rule
// "key position <= query position" is simply t_key <= t_query.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LONGNET_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LONGNET_HOST_DEVICE inline
#endif

namespace longnet {

// Where one batch row's sequence lies among the Nk keys, and where its queries sit.
struct RowSpan {
  int64_t key_begin;  // first key index of the sequence
  int64_t key_end;    // one past its last key index
  int64_t position;   // absolute position of key index key_begin
  int64_t q_start;    // key index of query 0 (bottom-right aligned to key_end)

  LONGNET_HOST_DEVICE int64_t length() const { return key_end - key_begin; }
  // First key index that holds a query of this row.
  LONGNET_HOST_DEVICE int64_t first_query_key() const {
    return q_start > key_begin ? q_start : key_begin;
  }
};

// Row b's span: the key range [key_start[b], key_end[b]) when given (nullptr: the
// whole row), queries bottom-right aligned to its end.
LONGNET_HOST_DEVICE RowSpan row_span(int64_t nk, int64_t nq, int64_t position_offset,
                                     const int64_t* key_start, const int64_t* key_end, int64_t b) {
  RowSpan row;
  // Clamped, so that a range the caller failed to check cannot reach outside [0, nk).
  int64_t begin = key_start != nullptr ? key_start[b] : 0;
  int64_t end = key_end != nullptr ? key_end[b] : nk;
  begin = begin < 0 ? 0 : (begin > nk ? nk : begin);
  end = end < begin ? begin : (end > nk ? nk : end);
  row.key_begin = begin;
  row.key_end = end;
  row.position = position_offset;
  row.q_start = row.key_end - nq;
  return row;
}

struct SparseSegment {
  int64_t base;         // key index of element t = 0
  int64_t count;        // number of positions in the sparse segment (may be 0)
  int64_t first_query;  // first t whose position holds a query (t >= count: none)
};

// Number of segments of length w covering n positions.
LONGNET_HOST_DEVICE int64_t num_segments(int64_t n, int64_t w) {
  return n <= 0 ? 0 : (n + w - 1) / w;
}

// An upper bound, for every row of at most nk keys starting at absolute position
// position_offset, of the number of segments of length w the row touches.
LONGNET_HOST_DEVICE int64_t max_row_segments(int64_t nk, int64_t position_offset, int64_t w) {
  return num_segments(nk + position_offset % w, w);
}

// Offset of query head `head` inside each segment of a pattern with dilation r.
LONGNET_HOST_DEVICE int64_t head_offset(int64_t head, int64_t r) { return head % r; }

// The `local`-th segment that row `row` touches (local = 0 holds its first key),
// of pattern (w, r), for head offset `offset`.
LONGNET_HOST_DEVICE SparseSegment sparse_segment(const RowSpan& row, int64_t w, int64_t r,
                                                 int64_t local, int64_t offset) {
  SparseSegment seg;
  const int64_t row_end = row.position + row.length();   // absolute, exclusive
  const int64_t start = (row.position / w + local) * w;  // absolute segment start
  const int64_t lo = start > row.position ? start : row.position;
  const int64_t hi = start + w < row_end ? start + w : row_end;
  int64_t first = start + offset;  // absolute position of t = 0
  if (first < lo) first += (lo - first + r - 1) / r * r;
  seg.count = first < hi ? (hi - first + r - 1) / r : 0;
  seg.base = first - row.position + row.key_begin;
  const int64_t q_lo = row.first_query_key();
  seg.first_query = seg.base >= q_lo ? 0 : (q_lo - seg.base + r - 1) / r;
  if (seg.first_query > seg.count) seg.first_query = seg.count;
  return seg;
}

// Number of keys (t_key < result) that query element t_query may attend to.
LONGNET_HOST_DEVICE int64_t visible_keys(const SparseSegment& seg, int64_t t_query,
                                         bool is_causal) {
  return is_causal ? t_query + 1 : seg.count;
}

}  // namespace longnet
