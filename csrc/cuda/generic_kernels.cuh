// Generic CUDA kernels (plain FMA, every dtype, any head dim) of dilated attention,
// plus the finalize (forward) and Delta (backward) kernels shared with the tensor-core
// path. See common.cuh for the per-pattern launch scheme.
//
// Work split of the generic kernels: a block is 4 warps; each warp owns 4 rows of one
// sparse segment (query rows in the forward, key rows in the backward). Lane l owns
// the head-dim elements d = c0 + l + 32*i (i < kPerLane) of those rows; head dims
// above 32*kPerLane are covered by an outer loop over chunks c0 that recomputes the
// (cheap, deterministic) scores. Scores are computed one key (forward) or one query
// (backward) per lane, 32 at a time, and broadcast with warp shuffles.
#pragma once

#include "cuda/common.cuh"

namespace longnet::cuda {

constexpr int kGenericWarps = 4;
constexpr int kGenericRows = 4;  // rows per warp
constexpr int kGenericTile = kGenericWarps * kGenericRows;
constexpr int kGenericThreads = kGenericWarps * 32;

// ---------------------------------------------------------------- forward ----

// One pattern of the forward pass: grid (nseg * ntiles, H, B); block kGenericThreads.
// Merges the block's partial softmax of each of its query rows into `st`.
template <typename T, int kPerLane>
__global__ void __launch_bounds__(kGenericThreads)
    fwd_generic_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       RowStrides qs, RowStrides ks, RowStrides vs, Shape sh, acc_t<T> scale,
                       FwdState<acc_t<T>> st) {
  using A = acc_t<T>;
  constexpr int R = kGenericRows;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t tile = blockIdx.x % sh.ntiles;
  const int64_t s = blockIdx.x / sh.ntiles;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const RowSpan span = sh.row(b);
  const int64_t g = h / sh.group();
  const int64_t D = sh.dim;

  const SparseSegment seg = sparse_segment(span, sh.w, sh.r, s, head_offset(h, sh.r));
  const int64_t t0 = seg.first_query + tile * kGenericTile + warp * R;  // warp's first row
  if (t0 >= seg.count) return;  // warp-uniform; the kernel has no block barrier
  const int nrows = static_cast<int>(seg.count - t0 < R ? seg.count - t0 : R);
  const int64_t key_end = sh.causal ? t0 + nrows : seg.count;  // keys [0, key_end)

  const T* qrow[R];
  int64_t qidx[R];
  A m_old[R], l_old[R];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int64_t t = t0 + (rr < nrows ? rr : 0);  // padding rows repeat row 0
    qidx[rr] = seg.base + t * sh.r - span.q_start;
    qrow[rr] = q + b * qs.b + qidx[rr] * qs.n + h * qs.h;
    const int64_t si = (b * sh.heads + h) * sh.nq + qidx[rr];
    m_old[rr] = rr < nrows ? st.m[si] : neg_inf<A>();
    l_old[rr] = rr < nrows ? st.l[si] : A(0);
  }
  const T* kbase = k + b * ks.b + seg.base * ks.n + g * ks.h;
  const T* vbase = v + b * vs.b + seg.base * vs.n + g * vs.h;
  const int64_t kstep = sh.r * ks.n, vstep = sh.r * vs.n;

  for (int64_t c0 = 0; c0 < D; c0 += 32 * kPerLane) {
    A acc[R][kPerLane];
    A m[R], l[R];
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      m[rr] = neg_inf<A>();
      l[rr] = A(0);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[rr][i] = A(0);
    }

    for (int64_t kb = 0; kb < key_end; kb += 32) {
      // Scores of key kb + lane against the warp's rows.
      const int64_t t = kb + lane;
      A sc[R];
#pragma unroll
      for (int rr = 0; rr < R; ++rr) sc[rr] = A(0);
      if (t < key_end) {
        const T* kr = kbase + t * kstep;
        for (int64_t d = 0; d < D; ++d) {
          const A kd = to_acc<T, A>(kr[d]);
#pragma unroll
          for (int rr = 0; rr < R; ++rr) sc[rr] += to_acc<T, A>(qrow[rr][d]) * kd;
        }
      }
      // Online softmax update per row; p[rr] is this lane's probability weight.
      A p[R];
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        const bool ok = rr < nrows && t < key_end && (!sh.causal || t <= t0 + rr);
        const A x = ok ? sc[rr] * scale : neg_inf<A>();
        const A mx = warp_max(x);
        p[rr] = A(0);
        if (mx != neg_inf<A>()) {  // warp-uniform
          const A mn = fmax(m[rr], mx);
          const A alpha = m[rr] == neg_inf<A>() ? A(0) : exp_a(m[rr] - mn);
          p[rr] = ok ? exp_a(x - mn) : A(0);
          l[rr] = l[rr] * alpha + warp_sum(p[rr]);
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) acc[rr][i] *= alpha;
          m[rr] = mn;
        }
      }
      // acc += P V over the tile's keys.
      const int nk_tile = static_cast<int>(key_end - kb < 32 ? key_end - kb : 32);
      for (int j = 0; j < nk_tile; ++j) {
        const T* vr = vbase + (kb + j) * vstep;
        A pj[R];
#pragma unroll
        for (int rr = 0; rr < R; ++rr) pj[rr] = __shfl_sync(0xffffffffu, p[rr], j);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t d = c0 + lane + 32 * i;
          if (d < D) {
            const A vd = to_acc<T, A>(vr[d]);
#pragma unroll
            for (int rr = 0; rr < R; ++rr) acc[rr][i] += pj[rr] * vd;
          }
        }
      }
    }

    // Merge into the running state of the rows (this chunk's head dims; m and l
    // once, after the last chunk).
    const bool last_chunk = c0 + 32 * kPerLane >= D;
    __syncwarp();  // every lane has read m_old/l_old before lane 0 rewrites them
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      if (rr >= nrows || !(l[rr] > A(0))) continue;  // warp-uniform
      const A mn = fmax(m_old[rr], m[rr]);
      const A a_old = m_old[rr] == neg_inf<A>() ? A(0) : exp_a(m_old[rr] - mn);
      const A a_new = exp_a(m[rr] - mn);
      A* arow = st.acc + ((b * sh.nq + qidx[rr]) * sh.heads + h) * D;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t d = c0 + lane + 32 * i;
        if (d < D) arow[d] = arow[d] * a_old + acc[rr][i] * a_new;
      }
      if (last_chunk && lane == 0) {
        const int64_t si = (b * sh.heads + h) * sh.nq + qidx[rr];
        st.m[si] = mn;
        st.l[si] = l_old[rr] * a_old + l[rr] * a_new;
      }
    }
  }
}

// out = acc / l and lse = m + log l per row; rows that reached no key get out 0 and
// lse -inf: the only write of each element of out and lse (skip_first_row, a debug
// switch, leaves row (0, 0, 0) unwritten). One thread per output element.
template <typename T, typename A>
__global__ void finalize_kernel(const A* acc, const A* m, const A* l, T* out, A* lse, int64_t nq,
                                int64_t heads, int64_t dim, int64_t total, bool skip_first_row) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (skip_first_row && idx < dim) continue;  // debug switch: leave row (0, 0, 0) unwritten
    const int64_t row = idx / dim;              // (b, qi, h) row of out
    const int64_t d = idx - row * dim;
    const int64_t h = row % heads;
    const int64_t qi = (row / heads) % nq;
    const int64_t b = row / (heads * nq);
    const int64_t si = (b * heads + h) * nq + qi;
    const A den = l[si];
    const bool has_key = den > A(0);
    const A mv = d == 0 ? m[si] : A(0);
    out[idx] = static_cast<T>(has_key ? acc[idx] / den : A(0));
    if (d == 0) lse[si] = has_key ? mv + log_a(den) : neg_inf<A>();
  }
}

// dst = src converted, element by element over contiguous (B, N, H, D) tensors: the
// only write of each gradient element (skip_first_row leaves row (0, 0, 0) unwritten).
template <typename T, typename A>
__global__ void write_rows_kernel(const A* __restrict__ src, T* __restrict__ dst, int64_t dim,
                                  int64_t total, bool skip_first_row) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (skip_first_row && idx < dim) continue;
    dst[idx] = static_cast<T>(src[idx]);
  }
}

// --------------------------------------------------------------- backward ----

// delta[b, h, qi] = sum_d dout * out - dlse over contiguous (B, Nq, H, D) dout/out;
// one warp per row.
template <typename T, typename A>
__global__ void delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                             const A* __restrict__ dlse, A* __restrict__ delta, int64_t nq,
                             int64_t heads, int64_t dim, int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_block = blockDim.x >> 5;
  for (int64_t row = blockIdx.x * warps_per_block + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t qi = row % nq;  // row = (b * H + h) * Nq + qi
    const int64_t h = (row / nq) % heads;
    const int64_t b = row / (nq * heads);
    const int64_t off = ((b * nq + qi) * heads + h) * dim;
    A sum = A(0);
    for (int64_t d = lane; d < dim; d += 32)
      sum += to_acc<T, A>(dout[off + d]) * to_acc<T, A>(out[off + d]);
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum - dlse[row];
  }
}

// One pattern of the backward pass: grid (nseg * ntiles, Hk, B); block kGenericThreads.
// A block owns a tile of key rows of one (batch, kv head, segment) for every query
// head of the group, so its dk/dv rows are written by it alone; dq is added with
// atomics. dq, dk, dv are contiguous accumulators of type acc_t<T>.
template <typename T, int kPerLane>
__global__ void __launch_bounds__(kGenericThreads)
    bwd_generic_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ dout, RowStrides qs, RowStrides ks, RowStrides vs,
                       RowStrides dos, Shape sh, acc_t<T> scale, const acc_t<T>* __restrict__ lse,
                       const acc_t<T>* __restrict__ delta, acc_t<T>* dq, acc_t<T>* dk,
                       acc_t<T>* dv) {
  using A = acc_t<T>;
  constexpr int R = kGenericRows;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t tile = blockIdx.x % sh.ntiles;
  const int64_t s = blockIdx.x / sh.ntiles;
  const int64_t g = blockIdx.y;
  const int64_t b = blockIdx.z;
  const RowSpan span = sh.row(b);
  const int64_t D = sh.dim;
  const int64_t group = sh.group();
  const int64_t t0 = tile * kGenericTile + warp * R;  // warp's first key row

  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    const SparseSegment seg = sparse_segment(span, sh.w, sh.r, s, head_offset(h, sh.r));
    if (seg.first_query >= seg.count || t0 >= seg.count) continue;  // warp-uniform
    const int nkeys = static_cast<int>(seg.count - t0 < R ? seg.count - t0 : R);
    const T* krow[R];
    const T* vrow[R];
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const int64_t pos = seg.base + (t0 + (rr < nkeys ? rr : 0)) * sh.r;
      krow[rr] = k + b * ks.b + pos * ks.n + g * ks.h;
      vrow[rr] = v + b * vs.b + pos * vs.n + g * vs.h;
    }
    const A* lse_row = lse + (b * sh.heads + h) * sh.nq;
    const A* delta_row = delta + (b * sh.heads + h) * sh.nq;
    const int64_t q_begin =
        sh.causal ? (seg.first_query > t0 ? seg.first_query : t0) : seg.first_query;
    const int64_t q0 = seg.base - span.q_start;  // query index of t = 0 (may be negative)

    for (int64_t c0 = 0; c0 < D; c0 += 32 * kPerLane) {
      A kreg[R][kPerLane], dk_acc[R][kPerLane], dv_acc[R][kPerLane];
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t d = c0 + lane + 32 * i;
          kreg[rr][i] = (d < D && rr < nkeys) ? to_acc<T, A>(krow[rr][d]) : A(0);
          dk_acc[rr][i] = A(0);
          dv_acc[rr][i] = A(0);
        }
      }

      for (int64_t tq0 = q_begin; tq0 < seg.count; tq0 += 32) {
        // P and dS of query tq0 + lane against the warp's keys.
        const int64_t tq = tq0 + lane;
        bool q_ok = tq < seg.count;
        const int64_t qi = q0 + (q_ok ? tq : tq0) * sh.r;
        const A row_lse = q_ok ? lse_row[qi] : A(0);
        q_ok = q_ok && row_lse != neg_inf<A>();
        const A row_delta = q_ok ? delta_row[qi] : A(0);
        A sc[R], dp[R];
#pragma unroll
        for (int rr = 0; rr < R; ++rr) sc[rr] = dp[rr] = A(0);
        if (q_ok) {
          const T* qr = q + b * qs.b + qi * qs.n + h * qs.h;
          const T* dr = dout + b * dos.b + qi * dos.n + h * dos.h;
          for (int64_t d = 0; d < D; ++d) {
            const A qd = to_acc<T, A>(qr[d]);
            const A od = to_acc<T, A>(dr[d]);
#pragma unroll
            for (int rr = 0; rr < R; ++rr) {
              sc[rr] += qd * to_acc<T, A>(krow[rr][d]);
              dp[rr] += od * to_acc<T, A>(vrow[rr][d]);
            }
          }
        }
        A p[R], ds[R];
#pragma unroll
        for (int rr = 0; rr < R; ++rr) {
          const bool ok = q_ok && rr < nkeys && (!sh.causal || t0 + rr <= tq);
          p[rr] = ok ? exp_a(sc[rr] * scale - row_lse) : A(0);
          ds[rr] = ok ? p[rr] * (dp[rr] - row_delta) : A(0);
        }

        // dv += P^T dout, dk += dS^T q, dq += dS k, one query of the tile at a time.
        const int nq_tile = static_cast<int>(seg.count - tq0 < 32 ? seg.count - tq0 : 32);
        for (int j = 0; j < nq_tile; ++j) {
          A pj[R], dsj[R];
          bool any_p = false, any_ds = false;
#pragma unroll
          for (int rr = 0; rr < R; ++rr) {
            pj[rr] = __shfl_sync(0xffffffffu, p[rr], j);
            dsj[rr] = __shfl_sync(0xffffffffu, ds[rr], j);
            any_p = any_p || pj[rr] != A(0);
            any_ds = any_ds || dsj[rr] != A(0);
          }
          if (!any_p && !any_ds) continue;  // warp-uniform (shuffled values)
          const int64_t qj = q0 + (tq0 + j) * sh.r;
          const T* qr = q + b * qs.b + qj * qs.n + h * qs.h;
          const T* dr = dout + b * dos.b + qj * dos.n + h * dos.h;
          A* dq_row = dq + ((b * sh.nq + qj) * sh.heads + h) * D;
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) {
            const int64_t d = c0 + lane + 32 * i;
            if (d < D) {
              const A qd = to_acc<T, A>(qr[d]);
              const A od = to_acc<T, A>(dr[d]);
              A dq_d = A(0);
#pragma unroll
              for (int rr = 0; rr < R; ++rr) {
                dv_acc[rr][i] += pj[rr] * od;
                dk_acc[rr][i] += dsj[rr] * qd;
                dq_d += dsj[rr] * kreg[rr][i];
              }
              if (any_ds) atomicAdd(dq_row + d, dq_d * scale);
            }
          }
        }
      }

      // The warp alone owns these dk/dv rows in this launch (see the comment above).
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        if (rr >= nkeys) continue;
        const int64_t pos = seg.base + (t0 + rr) * sh.r;
        A* dk_row = dk + ((b * sh.nk + pos) * sh.kv_heads + g) * D;
        A* dv_row = dv + ((b * sh.nk + pos) * sh.kv_heads + g) * D;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t d = c0 + lane + 32 * i;
          if (d < D) {
            dk_row[d] += dk_acc[rr][i] * scale;
            dv_row[d] += dv_acc[rr][i];
          }
        }
      }
    }
  }
}

}  // namespace longnet::cuda
