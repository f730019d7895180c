// Pattern arithmetic of dilated attention (see SPEC.md), shared by the CPU and
// CUDA kernels.
//
// Pattern (w, r) cuts the key positions [0, Nk) into segments [s*w, (s+1)*w)
// (the last one may be shorter). Query head j keeps the positions of segment s
// whose offset inside the segment is congruent to o = j mod r: the "sparse
// segment" s*w + o + t*r, t = 0 .. count-1. Within one sparse segment the causal
// rule "key position <= query position" is simply t_key <= t_query.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LONGNET_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LONGNET_HOST_DEVICE inline
#endif

namespace longnet {

struct SparseSegment {
  int64_t base;   // absolute position of element t = 0
  int64_t count;  // number of positions in the sparse segment (may be 0)
  int64_t first_query;  // first t whose position holds a query (t >= count: none)
};

// Number of segments of length w covering n positions.
LONGNET_HOST_DEVICE int64_t num_segments(int64_t n, int64_t w) {
  return n <= 0 ? 0 : (n + w - 1) / w;
}

// Offset of query head `head` inside each segment of a pattern with dilation r.
LONGNET_HOST_DEVICE int64_t head_offset(int64_t head, int64_t r) {
  return head % r;
}

// Sparse segment `segment` of pattern (w, r) for head offset `offset`, over Nk
// key positions of which the last Nq hold queries (bottom-right alignment).
LONGNET_HOST_DEVICE SparseSegment sparse_segment(
    int64_t nk, int64_t nq, int64_t w, int64_t r, int64_t segment, int64_t offset) {
  SparseSegment seg;
  const int64_t start = segment * w;
  const int64_t len = (nk - start < w) ? (nk - start) : w;
  seg.base = start + offset;
  seg.count = len > offset ? (len - offset + r - 1) / r : 0;
  // Queries occupy absolute positions [nk - nq, nk).
  const int64_t q_start = nk - nq;
  if (seg.base >= q_start) {
    seg.first_query = 0;
  } else {
    seg.first_query = (q_start - seg.base + r - 1) / r;
  }
  if (seg.first_query > seg.count) seg.first_query = seg.count;
  return seg;
}

// Number of keys (t_key < result) that query element t_query may attend to.
LONGNET_HOST_DEVICE int64_t visible_keys(
    const SparseSegment& seg, int64_t t_query, bool is_causal) {
  return is_causal ? t_query + 1 : seg.count;
}

}  // namespace longnet
