// Dense attention engines and the composition that runs dilated attention on them
// (docs/operator.md, "Engines").
//
// For one pattern (w, r) and head offset o, the sparse segments of heads o, o+r, ...
// are ordinary dense attention problems over strided views of the (B, N, H, D)
// inputs: batch = rows x segments, query/key rows o, o+r, ... of each segment, heads
// o, o+r, ... The composition plans these views, runs each on a dense engine and
// merges the results by log-sum-exp; the backward calls every dense backward with
// the merged out and lse. A dense engine is the only device-specific part.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace longnet::engine {

// One batch of dense attention problems: q (Bt, Lq, Hh, D), k and v (Bt, Lk, Hh, D),
// strided views whose last dimension is dense. `causal` is only asked for Lq == Lk
// (where top-left and bottom-right alignment agree).
class DenseEngine {
 public:
  virtual ~DenseEngine() = default;
  virtual const char* name() const = 0;
  // Why this engine cannot run the dense problems of a call on these (B, N, H, D)
  // inputs, or nullopt when it can.
  virtual std::optional<std::string> cannot_run(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v) const = 0;
  // Largest batch (Bt) of one call.
  virtual int64_t max_batch() const { return INT64_MAX; }
  // (out (Bt, Lq, Hh, D), lse (Bt, Hh, Lq)); lse in float32 (float64 for float64).
  virtual std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal,
                                                     double scale) const = 0;
  // (dq, dk, dv) of the problem, given out and lse (Bt, Hh, Lq, contiguous, float32 or
  // float64) that may come from a larger softmax than this problem's own.
  virtual std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const = 0;
};

// Registration of dense engines (by static objects of the engine files).
void register_engine(const DenseEngine* engine);
// The dense engine of that name, nullptr when none is built under that name.
const DenseEngine* find_engine(const std::string& name);

// Every engine name the API knows, in the order `auto` prefers them per device.
const std::vector<std::string>& engine_names();

// ------------------------------------------------------------ selection ----

// Engine forced for this thread by longnet.use_engine ("" when none).
void set_forced_engine(const std::string& name);
const std::string& forced_engine();
// Engine that ran the last call in this thread, with a process-wide sequence number
// (0: none yet).
void record_engine(const std::string& name);
std::pair<uint64_t, std::string> last_engine();

// The engine a call on q, k, v runs: the forced one (thread, then LONGNET_ENGINE)
// after checking it can run, else the automatic choice. Raises naming why a forced
// engine cannot run.
std::string choose_engine(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// --------------------------------------------------------- composition ----

struct Call {
  at::IntArrayRef segment_lengths, dilation_rates;
  bool is_causal;
  double scale;
  int64_t position_offset;
  const int64_t* key_start;  // host (B,) or nullptr
  const int64_t* key_end;    // host (B,) or nullptr
};

std::tuple<at::Tensor, at::Tensor> composed_forward(const DenseEngine& engine, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& v,
                                                    const Call& call);

std::tuple<at::Tensor, at::Tensor, at::Tensor> composed_backward(
    const DenseEngine& engine, const at::Tensor& grad_out, const at::Tensor& grad_lse,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const Call& call);

}  // namespace longnet::engine
