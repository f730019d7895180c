// Tensor-core kernels (nvcuda::wmma, bfloat16 / float16 in, float accumulate; sm80+)
// of dilated attention, one launch per pattern (see common.cuh for the running state).
//
// Forward: a block of 4 warps owns 64 consecutive query rows of one sparse segment
// (16 per warp) and streams the segment's keys and values through shared memory,
// 64 rows at a time, read in place with row stride r * stride(1). Each warp computes
// S = Q K^T for its rows on tensor cores, updates its online softmax (two lanes per
// row), and accumulates O += P V into its float tile in shared memory. At the end
// the block merges (m, l, O) into the global running state.
//
// Backward: a block owns 64 consecutive key rows of one sparse segment of one
// (batch, kv head) for every query head of the group (16 keys per warp), keeps dK and
// dV in accumulator fragments and streams the segment's queries 32 at a time:
// S^T = K Q^T, dP^T = V dO^T, then P and dS elementwise, dV += P^T dO, dK += dS^T Q,
// and dQ += dS K added to the float dq buffer with atomics. Blocks of one launch own
// disjoint key rows, so dK and dV are written without atomics.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <vector>

#include "cuda/tensor_core.cuh"

namespace longnet::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTcWarps = 4;
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kFwdRows = 64;  // query rows per forward block (16 per warp)
constexpr int kFwdKeys = 64;  // keys per forward step
constexpr int kBwdKeys = 64;  // key rows per backward block (16 per warp)
constexpr int kBwdRows = 32;  // queries per backward step

// The CUDA element type of a c10 half-precision type, and conversions.
template <typename T>
struct Elem;
template <>
struct Elem<c10::Half> {
  using type = __half;
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<c10::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
};

// Copies `rows` rows of D elements (row i at src + i * stride, 16-byte aligned) into
// shared memory with leading dimension ld; rows at or beyond `valid` are zero.
// Threads `tid` of `nthreads` share the work.
template <int D, typename E>
__device__ __forceinline__ void load_rows(E* dst, int ld, const E* src, int64_t stride, int rows,
                                          int64_t valid, int tid, int nthreads) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = tid; c < rows * kChunks; c += nthreads) {
    const int row = c / kChunks;
    const int col = (c - row * kChunks) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row < valid) val = *reinterpret_cast<const uint4*>(src + row * stride + col);
    *reinterpret_cast<uint4*>(dst + row * ld + col) = val;
  }
}

template <int D>
struct FwdSmem {
  static constexpr int kLdT = D + 8;                          // K, V, (Q) tiles, elements
  static constexpr int kLdS = kFwdKeys + 4;                   // scores, floats
  static constexpr int kLdP = kFwdKeys + 8;                   // probabilities, elements
  static constexpr int kLdO = D + 4;                          // output accumulator, floats
  static constexpr size_t kKV = size_t(kFwdKeys) * kLdT * 2;  // bytes, each
  static constexpr size_t kS = size_t(kTcWarps) * 16 * kLdS * 4;
  static constexpr size_t kP = size_t(kTcWarps) * 16 * kLdP * 2;
  static constexpr size_t kO = size_t(kTcWarps) * 16 * kLdO * 4;
  static constexpr size_t kBytes = 2 * kKV + kS + kP + kO;
  static_assert(kKV % 128 == 0 && kS % 128 == 0 && kP % 128 == 0, "smem regions stay aligned");
  static_assert(16 * kLdT * 2 <= 16 * kLdO * 4, "a warp's Q rows fit in its O tile");
};

template <int D>
struct BwdSmem {
  static constexpr int kLdT = D + 8;                              // K, V, Q, dO tiles, elements
  static constexpr int kLdS = kBwdRows + 4;                       // S^T, dP^T scratch, floats
  static constexpr int kLdP = kBwdRows + 8;                       // P^T, dS^T, elements
  static constexpr size_t kKV = size_t(kBwdKeys) * kLdT * 2;      // bytes, each of K, V
  static constexpr size_t kQ = size_t(kBwdRows) * kLdT * 2;       // each of Q, dO
  static constexpr size_t kS = size_t(kTcWarps) * 16 * kLdS * 4;  // each of S^T, dP^T
  static constexpr size_t kP = size_t(kTcWarps) * 16 * kLdP * 2;  // P^T
  static constexpr size_t kDS = size_t(kBwdKeys) * kLdP * 2;      // dS^T of the block
  static constexpr size_t kRow = size_t(kBwdRows) * 4;            // each of lse, delta
  static constexpr size_t kBytes = 2 * kKV + 2 * kQ + 2 * kS + kP + kDS + 2 * kRow;
  static_assert(kKV % 128 == 0 && kQ % 128 == 0 && kS % 128 == 0 && kP % 128 == 0 && kDS % 128 == 0,
                "smem regions stay aligned");
  static_assert(16 * kLdS >= 16 * 16, "a 16x16 float tile fits in a warp's scratch");
};

// ---------------------------------------------------------------- forward ----

template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads)
    fwd_tc_kernel(const T* __restrict__ q_ptr, const T* __restrict__ k_ptr,
                  const T* __restrict__ v_ptr, RowStrides qs, RowStrides ks, RowStrides vs,
                  Shape sh, float scale, FwdState<float> st) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using E = typename Elem<T>::type;
  using L = FwdSmem<D>;
  constexpr int kLdT = L::kLdT, kLdS = L::kLdS, kLdP = L::kLdP, kLdO = L::kLdO;
  extern __shared__ __align__(128) unsigned char smem[];
  E* k_s = reinterpret_cast<E*>(smem);
  E* v_s = reinterpret_cast<E*>(smem + L::kKV);
  float* s_s = reinterpret_cast<float*>(smem + 2 * L::kKV);
  E* p_s = reinterpret_cast<E*>(smem + 2 * L::kKV + L::kS);
  float* o_s = reinterpret_cast<float*>(smem + 2 * L::kKV + L::kS + L::kP);

  const E* q = reinterpret_cast<const E*>(q_ptr);
  const E* k = reinterpret_cast<const E*>(k_ptr);
  const E* v = reinterpret_cast<const E*>(v_ptr);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t tile = blockIdx.x % sh.ntiles;
  const int64_t s = blockIdx.x / sh.ntiles;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const RowSpan span = sh.row(b);
  const int64_t g = h / sh.group();

  const SparseSegment seg = sparse_segment(span, sh.w, sh.r, s, head_offset(h, sh.r));
  const int64_t tb = seg.first_query + tile * kFwdRows;  // block's first row
  if (tb >= seg.count) return;                           // block-uniform, before any barrier
  const int64_t block_rows = seg.count - tb < kFwdRows ? seg.count - tb : kFwdRows;
  const int64_t key_end = sh.causal ? tb + block_rows : seg.count;
  const int64_t q0 = seg.base - span.q_start;  // query index of t = 0 (may be negative)
  const E* k_first = k + b * ks.b + seg.base * ks.n + g * ks.h;
  const E* v_first = v + b * vs.b + seg.base * vs.n + g * vs.h;
  const int64_t kstep = sh.r * ks.n, vstep = sh.r * vs.n;

  // The warp's 16 query rows: staged in its O tile, then kept as A fragments.
  const int64_t tw = tb + warp * 16;
  float* o_w = o_s + warp * 16 * kLdO;
  float* s_w = s_s + warp * 16 * kLdS;
  E* p_w = p_s + warp * 16 * kLdP;
  {
    E* q_w = reinterpret_cast<E*>(o_w);
    const int64_t valid = seg.count - tw;  // may be <= 0: all rows zero
    load_rows<D>(q_w, kLdT, q + b * qs.b + (q0 + tw * sh.r) * qs.n + h * qs.h, sh.r * qs.n, 16,
                 valid, lane, 32);
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> qf[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wmma::load_matrix_sync(qf[kk], reinterpret_cast<const E*>(o_w) + kk * 16, kLdT);
  __syncwarp();
  for (int i = lane; i < 16 * kLdO; i += 32) o_w[i] = 0.f;

  // Two lanes per row: lane owns row `row`, columns [half * 32, half * 32 + 32).
  const int row = lane >> 1, half = lane & 1;
  const int64_t tq = tw + row;
  const bool row_ok = tq < seg.count;
  // Keys [0, key_lim) are visible to this row.
  int64_t key_lim = row_ok ? key_end : 0;
  if (sh.causal && tq + 1 < key_lim) key_lim = tq + 1;
  float m_run = -INFINITY, l_run = 0.f;

  for (int64_t kb = 0; kb < key_end; kb += kFwdKeys) {
    __syncthreads();  // every warp is done with the previous K/V tile
    const int64_t kvalid = key_end - kb;
    load_rows<D>(k_s, kLdT, k_first + kb * kstep, kstep, kFwdKeys, kvalid, threadIdx.x, kTcThreads);
    load_rows<D>(v_s, kLdT, v_first + kb * vstep, vstep, kFwdKeys, kvalid, threadIdx.x, kTcThreads);
    __syncthreads();

    // S = Q K^T for the warp's rows (K row-major is K^T column-major).
#pragma unroll
    for (int n = 0; n < kFwdKeys / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
      wmma::fill_fragment(sf, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, k_s + n * 16 * kLdT + kk * 16, kLdT);
        wmma::mma_sync(sf, qf[kk], kf, sf);
      }
      wmma::store_matrix_sync(s_w + n * 16, sf, kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of the row over this tile's visible keys.
    const int64_t col0 = kb + half * 32;
    const int nvalid =
        static_cast<int>(key_lim - col0 <= 0 ? 0 : (key_lim - col0 < 32 ? key_lim - col0 : 32));
    const float* srow = s_w + row * kLdS + half * 32;
    float mx = -INFINITY;
    for (int c = 0; c < nvalid; ++c) mx = fmaxf(mx, srow[c] * scale);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    float m_new = m_run, alpha = 1.f;
    if (mx != -INFINITY) {
      m_new = fmaxf(m_run, mx);
      alpha = m_run == -INFINITY ? 0.f : __expf(m_run - m_new);
    }
    E* prow = p_w + row * kLdP + half * 32;
    float sum = 0.f;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const float pv = c < nvalid ? __expf(srow[c] * scale - m_new) : 0.f;
      prow[c] = Elem<T>::from_float(pv);
      sum += pv;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    float* orow = o_w + row * kLdO;
    if (alpha != 1.f) {
      for (int d = half; d < D; d += 2) orow[d] *= alpha;
    }
    __syncwarp();

    // O += P V.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> pf[kFwdKeys / 16];
#pragma unroll
    for (int kk = 0; kk < kFwdKeys / 16; ++kk) wmma::load_matrix_sync(pf[kk], p_w + kk * 16, kLdP);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
      wmma::load_matrix_sync(of, o_w + n * 16, kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kFwdKeys / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> vf;
        wmma::load_matrix_sync(vf, v_s + kk * 16 * kLdT + n * 16, kLdT);
        wmma::mma_sync(of, pf[kk], vf, of);
      }
      wmma::store_matrix_sync(o_w + n * 16, of, kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // Merge (m, l, O) of each row into the global running state.
  const bool merge = row_ok && l_run > 0.f;
  const int64_t qi = q0 + tq * sh.r;
  const int64_t si = (b * sh.heads + h) * sh.nq + qi;
  float m_old = -INFINITY, l_old = 0.f;
  if (merge) {
    m_old = st.m[si];
    l_old = st.l[si];
  }
  __syncwarp();  // both lanes of a row have read m and l before one rewrites them
  if (merge) {
    const float mn = fmaxf(m_old, m_run);
    const float a_old = m_old == -INFINITY ? 0.f : __expf(m_old - mn);
    const float a_new = __expf(m_run - mn);
    float* arow = st.acc + ((b * sh.nq + qi) * sh.heads + h) * D;
    const float* orow = o_w + row * kLdO;
    for (int d = half; d < D; d += 2) arow[d] = arow[d] * a_old + orow[d] * a_new;
    if (half == 0) {
      st.m[si] = mn;
      st.l[si] = l_old * a_old + l_run * a_new;
    }
  }
#else
  __trap();  // tc_supported() keeps devices below sm80 off this path
#endif
}

// --------------------------------------------------------------- backward ----

template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads)
    bwd_tc_kernel(const T* __restrict__ q_ptr, const T* __restrict__ k_ptr,
                  const T* __restrict__ v_ptr, const T* __restrict__ do_ptr, RowStrides qs,
                  RowStrides ks, RowStrides vs, RowStrides dos, Shape sh, float scale,
                  const float* __restrict__ lse, const float* __restrict__ delta, float* dq,
                  float* dk, float* dv) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using E = typename Elem<T>::type;
  using L = BwdSmem<D>;
  constexpr int kLdT = L::kLdT, kLdS = L::kLdS, kLdP = L::kLdP;
  extern __shared__ __align__(128) unsigned char smem[];
  size_t off = 0;
  E* k_s = reinterpret_cast<E*>(smem + off);
  off += L::kKV;
  E* v_s = reinterpret_cast<E*>(smem + off);
  off += L::kKV;
  E* q_s = reinterpret_cast<E*>(smem + off);
  off += L::kQ;
  E* do_s = reinterpret_cast<E*>(smem + off);
  off += L::kQ;
  float* s_s = reinterpret_cast<float*>(smem + off);
  off += L::kS;
  float* dp_s = reinterpret_cast<float*>(smem + off);
  off += L::kS;
  E* pt_s = reinterpret_cast<E*>(smem + off);
  off += L::kP;
  E* dst_s = reinterpret_cast<E*>(smem + off);
  off += L::kDS;
  float* lse_s = reinterpret_cast<float*>(smem + off);
  off += L::kRow;
  float* delta_s = reinterpret_cast<float*>(smem + off);

  const E* q = reinterpret_cast<const E*>(q_ptr);
  const E* k = reinterpret_cast<const E*>(k_ptr);
  const E* v = reinterpret_cast<const E*>(v_ptr);
  const E* dout = reinterpret_cast<const E*>(do_ptr);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t tile = blockIdx.x % sh.ntiles;
  const int64_t s = blockIdx.x / sh.ntiles;
  const int64_t g = blockIdx.y;
  const int64_t b = blockIdx.z;
  const RowSpan span = sh.row(b);
  const int64_t group = sh.group();
  const int64_t tk0 = tile * kBwdKeys;  // block's first key row

  float* s_w = s_s + warp * 16 * kLdS;
  float* dp_w = dp_s + warp * 16 * kLdS;
  E* pt_w = pt_s + warp * 16 * kLdP;
  E* dst_w = dst_s + warp * 16 * kLdP;
  const int krow = lane >> 1, half = lane & 1;  // elementwise phase: key row, query half
  const int64_t tk = tk0 + warp * 16 + krow;

  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    const SparseSegment seg = sparse_segment(span, sh.w, sh.r, s, head_offset(h, sh.r));
    if (seg.first_query >= seg.count || tk0 >= seg.count) continue;  // block-uniform
    const int64_t q0 = seg.base - span.q_start;
    const int64_t q_begin =
        sh.causal ? (seg.first_query > tk0 ? seg.first_query : tk0) : seg.first_query;
    const float* lse_row = lse + (b * sh.heads + h) * sh.nq;
    const float* delta_row = delta + (b * sh.heads + h) * sh.nq;
    const bool key_ok = tk < seg.count;

    __syncthreads();  // the previous head's K/V tile is no longer read
    {
      const int64_t kvalid = seg.count - tk0;
      load_rows<D>(k_s, kLdT, k + b * ks.b + (seg.base + tk0 * sh.r) * ks.n + g * ks.h, sh.r * ks.n,
                   kBwdKeys, kvalid, threadIdx.x, kTcThreads);
      load_rows<D>(v_s, kLdT, v + b * vs.b + (seg.base + tk0 * sh.r) * vs.n + g * vs.h, sh.r * vs.n,
                   kBwdKeys, kvalid, threadIdx.x, kTcThreads);
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> dkf[D / 16], dvf[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fill_fragment(dkf[n], 0.f);
      wmma::fill_fragment(dvf[n], 0.f);
    }

    for (int64_t tq0 = q_begin; tq0 < seg.count; tq0 += kBwdRows) {
      __syncthreads();  // Q, dO, dS^T of the previous step are no longer read
      const int64_t qvalid = seg.count - tq0;
      load_rows<D>(q_s, kLdT, q + b * qs.b + (q0 + tq0 * sh.r) * qs.n + h * qs.h, sh.r * qs.n,
                   kBwdRows, qvalid, threadIdx.x, kTcThreads);
      load_rows<D>(do_s, kLdT, dout + b * dos.b + (q0 + tq0 * sh.r) * dos.n + h * dos.h,
                   sh.r * dos.n, kBwdRows, qvalid, threadIdx.x, kTcThreads);
      if (threadIdx.x < kBwdRows) {
        const int64_t t = tq0 + threadIdx.x;
        const bool ok = t < seg.count;
        lse_s[threadIdx.x] = ok ? lse_row[q0 + t * sh.r] : -INFINITY;
        delta_s[threadIdx.x] = ok ? delta_row[q0 + t * sh.r] : 0.f;
      }
      __syncthreads();

      // S^T = K_w Q^T and dP^T = V_w dO^T for the warp's 16 keys.
#pragma unroll
      for (int n = 0; n < kBwdRows / 16; ++n) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf, dpf;
        wmma::fill_fragment(sf, 0.f);
        wmma::fill_fragment(dpf, 0.f);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> af;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> bf;
          wmma::load_matrix_sync(af, k_s + warp * 16 * kLdT + kk * 16, kLdT);
          wmma::load_matrix_sync(bf, q_s + n * 16 * kLdT + kk * 16, kLdT);
          wmma::mma_sync(sf, af, bf, sf);
          wmma::load_matrix_sync(af, v_s + warp * 16 * kLdT + kk * 16, kLdT);
          wmma::load_matrix_sync(bf, do_s + n * 16 * kLdT + kk * 16, kLdT);
          wmma::mma_sync(dpf, af, bf, dpf);
        }
        wmma::store_matrix_sync(s_w + n * 16, sf, kLdS, wmma::mem_row_major);
        wmma::store_matrix_sync(dp_w + n * 16, dpf, kLdS, wmma::mem_row_major);
      }
      __syncwarp();

      // P^T and dS^T: lane pair per key row, 16 queries per lane.
      for (int c = 0; c < kBwdRows / 2; ++c) {
        const int qq = half * (kBwdRows / 2) + c;
        const int64_t t = tq0 + qq;
        const float row_lse = lse_s[qq];
        const bool ok = key_ok && t < seg.count && row_lse != -INFINITY && (!sh.causal || tk <= t);
        const float p = ok ? __expf(s_w[krow * kLdS + qq] * scale - row_lse) : 0.f;
        const float ds = ok ? p * (dp_w[krow * kLdS + qq] - delta_s[qq]) : 0.f;
        pt_w[krow * kLdP + qq] = Elem<T>::from_float(p);
        dst_w[krow * kLdP + qq] = Elem<T>::from_float(ds);
      }
      __syncwarp();

      // dV_w += P^T dO and dK_w += dS^T Q (scale applied when written out).
#pragma unroll
      for (int kk = 0; kk < kBwdRows / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> pa, dsa;
        wmma::load_matrix_sync(pa, pt_w + kk * 16, kLdP);
        wmma::load_matrix_sync(dsa, dst_w + kk * 16, kLdP);
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> bf;
          wmma::load_matrix_sync(bf, do_s + kk * 16 * kLdT + n * 16, kLdT);
          wmma::mma_sync(dvf[n], pa, bf, dvf[n]);
          wmma::load_matrix_sync(bf, q_s + kk * 16 * kLdT + n * 16, kLdT);
          wmma::mma_sync(dkf[n], dsa, bf, dkf[n]);
        }
      }
      __syncthreads();  // dS^T of every warp is complete

      // dQ (queries x D) += dS K: 16x16 output tiles spread over the warps; dS is
      // dS^T read column-major.
      for (int ti = warp; ti < (kBwdRows / 16) * (D / 16); ti += kTcWarps) {
        const int qt = ti / (D / 16);
        const int n = ti - qt * (D / 16);
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf;
        wmma::fill_fragment(cf, 0.f);
#pragma unroll
        for (int kk = 0; kk < kBwdKeys / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::col_major> af;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> bf;
          wmma::load_matrix_sync(af, dst_s + kk * 16 * kLdP + qt * 16, kLdP);
          wmma::load_matrix_sync(bf, k_s + kk * 16 * kLdT + n * 16, kLdT);
          wmma::mma_sync(cf, af, bf, cf);
        }
        wmma::store_matrix_sync(s_w, cf, kLdS, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int i = e >> 4, j = e & 15;
          const int64_t t = tq0 + qt * 16 + i;
          if (t < seg.count && lse_s[qt * 16 + i] != -INFINITY) {
            const int64_t qi = q0 + t * sh.r;
            atomicAdd(dq + ((b * sh.nq + qi) * sh.heads + h) * D + n * 16 + j,
                      s_w[i * kLdS + j] * scale);
          }
        }
        __syncwarp();
      }
    }

    // Add the warp's dK and dV rows into the accumulators (this block owns them).
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
#pragma unroll
      for (int which = 0; which < 2; ++which) {
        wmma::store_matrix_sync(s_w, which == 0 ? dkf[n] : dvf[n], kLdS, wmma::mem_row_major);
        __syncwarp();
        float* dst = which == 0 ? dk : dv;
        const float mul = which == 0 ? scale : 1.f;
        for (int e = lane; e < 256; e += 32) {
          const int i = e >> 4, j = e & 15;
          const int64_t t = tk0 + warp * 16 + i;
          if (t < seg.count) {
            const int64_t pos = seg.base + t * sh.r;
            dst[((b * sh.nk + pos) * sh.kv_heads + g) * D + n * 16 + j] += s_w[i * kLdS + j] * mul;
          }
        }
        __syncwarp();
      }
    }
  }
#else
  __trap();  // tc_supported() keeps devices below sm80 off this path
#endif
}

// Calls f.template operator()<D>() for the head dims with tensor-core kernels.
template <typename F>
void dispatch_head_dim(int64_t dim, F&& f) {
  switch (dim) {
    case 32:
      f.template operator()<32>();
      break;
    case 64:
      f.template operator()<64>();
      break;
    case 96:
      f.template operator()<96>();
      break;
    case 128:
      f.template operator()<128>();
      break;
    default:
      TORCH_CHECK(false, "longnet: no tensor-core kernel for head dim ", dim);
  }
}

bool aligned_rows(const at::Tensor& t) {
  const auto addr = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  return addr % 16 == 0 && t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0;
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

}  // namespace

bool tc_supported(std::initializer_list<at::Tensor> tensors) {
  const at::Tensor& q = *tensors.begin();
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const int64_t d = q.size(3);
  if (d != 32 && d != 64 && d != 96 && d != 128) return false;
  int major = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  if (major < 8) return false;
  // The kernels ask for FwdSmem<D>::kBytes / BwdSmem<D>::kBytes of dynamic shared
  // memory (set_smem); a device that cannot grant it takes the generic kernels
  // instead of failing in cudaFuncSetAttribute.
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        q.device().index()));
  size_t needed = 0;
  dispatch_head_dim(d, [&]<int D>() {
    needed = FwdSmem<D>::kBytes > BwdSmem<D>::kBytes ? FwdSmem<D>::kBytes : BwdSmem<D>::kBytes;
  });
  if (needed > static_cast<size_t>(smem_optin)) return false;
  for (const at::Tensor& t : tensors) {
    if (!aligned_rows(t)) return false;
  }
  return true;
}

int64_t tc_forward_tile_rows() { return kFwdRows; }
int64_t tc_backward_tile_rows() { return kBwdKeys; }

template <typename T>
void tc_forward_pattern(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const Shape& sh, float scale, const FwdState<float>& st,
                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(sh.nseg * sh.ntiles),
                  static_cast<unsigned int>(sh.heads), static_cast<unsigned int>(sh.batch));
  dispatch_head_dim(sh.dim, [&]<int D>() {
    const size_t bytes = FwdSmem<D>::kBytes;
    set_smem(fwd_tc_kernel<T, D>, bytes);
    fwd_tc_kernel<T, D><<<grid, kTcThreads, bytes, stream>>>(
        q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), row_strides(q), row_strides(k),
        row_strides(v), sh, scale, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
void tc_backward_pattern(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& dout, const Shape& sh, float scale, const float* lse,
                         const float* delta, float* dq, float* dk, float* dv, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(sh.nseg * sh.ntiles),
                  static_cast<unsigned int>(sh.kv_heads), static_cast<unsigned int>(sh.batch));
  dispatch_head_dim(sh.dim, [&]<int D>() {
    const size_t bytes = BwdSmem<D>::kBytes;
    set_smem(bwd_tc_kernel<T, D>, bytes);
    bwd_tc_kernel<T, D><<<grid, kTcThreads, bytes, stream>>>(
        q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), dout.data_ptr<T>(), row_strides(q),
        row_strides(k), row_strides(v), row_strides(dout), sh, scale, lse, delta, dq, dk, dv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template void tc_forward_pattern<c10::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const Shape&, float, const FwdState<float>&,
                                            cudaStream_t);
template void tc_forward_pattern<c10::BFloat16>(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const Shape&, float,
                                                const FwdState<float>&, cudaStream_t);
template void tc_backward_pattern<c10::Half>(const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, const Shape&,
                                             float, const float*, const float*, float*, float*,
                                             float*, cudaStream_t);
template void tc_backward_pattern<c10::BFloat16>(const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const Shape&,
                                                 float, const float*, const float*, float*, float*,
                                                 float*, cudaStream_t);

}  // namespace longnet::cuda
