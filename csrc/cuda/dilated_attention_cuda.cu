// CUDA kernels of the `fused` engine (docs/operator.md), compiled only with
// LONGNET_FUSED_CUDA=1 (setup.py): argument checks, buffers, the per-pattern launch
// sequence and the dispatch between the tensor-core kernels (bfloat16/float16, sm80+,
// head dims tensor_core.cuh accepts) and the generic FMA kernels (every dtype and head
// dim).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/generic_kernels.cuh"
#include "cuda/tensor_core.cuh"
#include "fused.h"
#include "op_common.h"
#include "pattern.h"

namespace longnet::cuda {
namespace {

// LONGNET_CUDA_GENERIC=1 routes bfloat16/float16 to the generic kernels too (read on
// every call, so tests can compare both paths in one process).
bool force_generic() {
  const char* env = std::getenv("LONGNET_CUDA_GENERIC");
  return env != nullptr && env[0] != '\0' && env[0] != '0';
}

// The kernels need a dense last dimension; any other strides are read in place.
at::Tensor with_dense_last(const at::Tensor& t) {
  return (t.size(3) <= 1 || t.stride(3) == 1) ? t : t.contiguous();
}

void check_launch_dims(const at::Tensor& q, const at::Tensor& k) {
  constexpr int64_t kMaxGridYZ = 65535;
  TORCH_CHECK(q.size(0) <= kMaxGridYZ, "longnet: CUDA kernels support batch sizes up to ",
              kMaxGridYZ, ", got ", q.size(0));
  TORCH_CHECK(q.size(2) <= kMaxGridYZ && k.size(2) <= kMaxGridYZ,
              "longnet: CUDA kernels support up to ", kMaxGridYZ, " heads, got ", q.size(2));
}

// Where the rows' sequences lie: position_offset and the checked key ranges.
struct Rows {
  int64_t position_offset;
  const KeyRanges& ranges;
};

Shape make_shape(const at::Tensor& q, const at::Tensor& k, int64_t w, int64_t r, bool causal,
                 int64_t tile_rows, const Rows& rows) {
  Shape sh;
  sh.batch = q.size(0);
  sh.nq = q.size(1);
  sh.nk = k.size(1);
  sh.heads = q.size(2);
  sh.kv_heads = k.size(2);
  sh.dim = q.size(3);
  sh.position_offset = rows.position_offset;
  sh.key_start = rows.ranges.start_ptr();
  sh.key_end = rows.ranges.end_ptr();
  sh.w = w;
  sh.r = r;
  sh.nseg = max_row_segments(sh.nk, sh.position_offset, w);
  const int64_t max_count = ((w < sh.nk ? w : sh.nk) + r - 1) / r;  // rows of a sparse segment
  sh.ntiles = (max_count + tile_rows - 1) / tile_rows;
  sh.causal = causal;
  TORCH_CHECK(sh.nseg * sh.ntiles <= std::numeric_limits<int32_t>::max(),
              "longnet: too many segments for one CUDA launch (", sh.nseg, " segments of ",
              sh.ntiles, " tiles)");
  return sh;
}

unsigned int elementwise_blocks(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

// Calls f.template operator()<kPerLane>() with the per-lane width covering `dim`
// (wider head dims loop over chunks of 256).
template <typename F>
void dispatch_per_lane(int64_t dim, F&& f) {
  if (dim <= 32) {
    f.template operator()<1>();
  } else if (dim <= 64) {
    f.template operator()<2>();
  } else if (dim <= 128) {
    f.template operator()<4>();
  } else {
    f.template operator()<8>();
  }
}

// ---------------------------------------------------------------- forward ----

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates, bool is_causal,
                  double scale_d, const Rows& rows, at::Tensor& out, at::Tensor& lse) {
  using A = acc_t<T>;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<A>::value);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool tensor_cores = !force_generic() && tc_supported({q, k, v});

  // Running state (acc, m, l) in internal buffers; finalize_kernel is the only
  // writer of out and lse.
  at::Tensor acc = at::zeros(q.sizes(), acc_opts);
  at::Tensor m = at::full({q.size(0), q.size(2), q.size(1)},
                          -std::numeric_limits<double>::infinity(), acc_opts);
  at::Tensor l = at::zeros({q.size(0), q.size(2), q.size(1)}, acc_opts);
  const FwdState<A> st{acc.data_ptr<A>(), m.data_ptr<A>(), l.data_ptr<A>()};
  const A scale = static_cast<A>(scale_d);

  for (size_t pi = 0; pi < segment_lengths.size(); ++pi) {
    const int64_t w = segment_lengths[pi], r = dilation_rates[pi];
    if (tensor_cores) {
      if constexpr (kConvert) {
        const Shape sh = make_shape(q, k, w, r, is_causal, tc_forward_tile_rows(), rows);
        tc_forward_pattern<T>(q, k, v, sh, static_cast<float>(scale_d), st, stream);
        continue;
      }
    }
    const Shape sh = make_shape(q, k, w, r, is_causal, kGenericTile, rows);
    const dim3 grid(static_cast<unsigned int>(sh.nseg * sh.ntiles),
                    static_cast<unsigned int>(sh.heads), static_cast<unsigned int>(sh.batch));
    dispatch_per_lane(sh.dim, [&]<int kPerLane>() {
      fwd_generic_kernel<T, kPerLane><<<grid, kGenericThreads, 0, stream>>>(
          q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), row_strides(q), row_strides(k),
          row_strides(v), sh, scale, st);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  const int64_t total = out.numel();
  constexpr int kThreads = 256;
  finalize_kernel<T, A><<<elementwise_blocks(total, kThreads), kThreads, 0, stream>>>(
      st.acc, st.m, st.l, out.data_ptr<T>(), lse.data_ptr<A>(), q.size(1), q.size(2), q.size(3),
      total, debug_skip_first_row());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --------------------------------------------------------------- backward ----

// dst (contiguous (B, N, H, D)) = acc converted: the only write of each element.
template <typename T, typename A>
void write_gradient(const at::Tensor& acc, at::Tensor& dst, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = dst.numel();
  write_rows_kernel<T, A><<<elementwise_blocks(total, kThreads), kThreads, 0, stream>>>(
      acc.data_ptr<A>(), dst.data_ptr<T>(), dst.size(3), total, debug_skip_first_row());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse, at::IntArrayRef segment_lengths,
                   at::IntArrayRef dilation_rates, bool is_causal, double scale_d, const Rows& rows,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using A = acc_t<T>;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<A>::value);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool tensor_cores = !force_generic() && tc_supported({q, k, v, dout});
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), D = q.size(3);

  // Delta = rowsum(dout * out) - dlse, laid out like lse.
  at::Tensor delta = at::empty({B, H, Nq}, acc_opts);
  {
    constexpr int kThreads = 256;
    const int64_t n_rows = B * H * Nq;
    delta_kernel<T, A><<<elementwise_blocks(n_rows * 32, kThreads), kThreads, 0, stream>>>(
        dout.data_ptr<T>(), out.data_ptr<T>(), dlse.data_ptr<A>(), delta.data_ptr<A>(), Nq, H, D,
        n_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Patterns add into internal zeroed accumulators; write_rows_kernel is the only
  // writer of dq, dk and dv.
  at::Tensor dq_acc = at::zeros(dq.sizes(), acc_opts);
  at::Tensor dk_acc = at::zeros(dk.sizes(), acc_opts);
  at::Tensor dv_acc = at::zeros(dv.sizes(), acc_opts);
  const A scale = static_cast<A>(scale_d);

  for (size_t pi = 0; pi < segment_lengths.size(); ++pi) {
    const int64_t w = segment_lengths[pi], r = dilation_rates[pi];
    if (tensor_cores) {
      if constexpr (kConvert) {
        const Shape sh = make_shape(q, k, w, r, is_causal, tc_backward_tile_rows(), rows);
        tc_backward_pattern<T>(q, k, v, dout, sh, static_cast<float>(scale_d),
                               lse.data_ptr<float>(), delta.data_ptr<float>(),
                               dq_acc.data_ptr<float>(), dk_acc.data_ptr<float>(),
                               dv_acc.data_ptr<float>(), stream);
        continue;
      }
    }
    const Shape sh = make_shape(q, k, w, r, is_causal, kGenericTile, rows);
    const dim3 grid(static_cast<unsigned int>(sh.nseg * sh.ntiles),
                    static_cast<unsigned int>(sh.kv_heads), static_cast<unsigned int>(sh.batch));
    dispatch_per_lane(D, [&]<int kPerLane>() {
      bwd_generic_kernel<T, kPerLane><<<grid, kGenericThreads, 0, stream>>>(
          q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), dout.data_ptr<T>(), row_strides(q),
          row_strides(k), row_strides(v), row_strides(dout), sh, scale, lse.data_ptr<A>(),
          delta.data_ptr<A>(), dq_acc.data_ptr<A>(), dk_acc.data_ptr<A>(), dv_acc.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  write_gradient<T, A>(dq_acc, dq, stream);
  write_gradient<T, A>(dk_acc, dk, stream);
  write_gradient<T, A>(dv_acc, dv, stream);
}

}  // namespace

// ------------------------------------------------------------- operators ----
// The fused engine on CUDA (fused.h): engine/engines_fused.cpp calls these on the
// arguments engine/dispatch.cpp checked, in builds with LONGNET_FUSED_CUDA.

std::tuple<at::Tensor, at::Tensor> fused_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in,
                                                 at::IntArrayRef segment_lengths,
                                                 at::IntArrayRef dilation_rates, bool is_causal,
                                                 double scale, int64_t position_offset,
                                                 const std::optional<at::Tensor>& key_start,
                                                 const std::optional<at::Tensor>& key_end) {
  TORCH_CHECK(q_in.is_cuda(), "longnet: expected CUDA tensors, got ", q_in.device());
  check_launch_dims(q_in, k_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const KeyRanges ranges(key_start, key_end, q_in, k_in.size(1));
  at::Tensor out, lse;
  std::tie(out, lse) = allocate_forward_outputs(q_in);
  if (q_in.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const at::Tensor q = with_dense_last(q_in), k = with_dense_last(k_in), v = with_dense_last(v_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "longnet_fwd_cuda", [&] {
        forward_impl<scalar_t>(q, k, v, segment_lengths, dilation_rates, is_causal, scale,
                               Rows{position_offset, ranges}, out, lse);
      });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, at::IntArrayRef segment_lengths, at::IntArrayRef dilation_rates,
    bool is_causal, double scale, int64_t position_offset,
    const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end) {
  TORCH_CHECK(q_in.is_cuda(), "longnet: expected CUDA tensors, got ", q_in.device());
  check_launch_dims(q_in, k_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const KeyRanges ranges(key_start, key_end, q_in, k_in.size(1));
  at::Tensor dq, dk, dv;
  std::tie(dq, dk, dv) = allocate_backward_outputs(q_in, k_in, v_in);
  if (q_in.numel() == 0 || k_in.numel() == 0) {
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  }
  const at::Tensor q = with_dense_last(q_in), k = with_dense_last(k_in), v = with_dense_last(v_in);
  const BackwardRows rows(q_in, grad_out, out_in, lse_in, grad_lse);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "longnet_bwd_cuda", [&] {
        backward_impl<scalar_t>(rows.grad_out, rows.grad_lse, q, k, v, rows.out, rows.lse,
                                segment_lengths, dilation_rates, is_causal, scale,
                                Rows{position_offset, ranges}, dq, dk, dv);
      });
  return {dq, dk, dv};
}

}  // namespace longnet::cuda
