// Engines: the ways of computing the operators, one chosen per call by name
// (docs/operator.md, "Engines").
//
// Every engine is an Engine registered under its name: `fused` (the project's own
// kernels, engines_fused.cpp) and the dense engines, whose forward and backward are
// the composition of dense attention problems below. Each engine says why it cannot
// run a call (cannot_run); choose_engine runs the forced engine after that check, or
// the first engine of the device's preference that can run the call.
//
// Composition: for one pattern (w, r) and head offset o, the sparse segments of heads
// o, o+r, ... are ordinary dense attention problems over strided views of the (B, N,
// H, D) inputs: batch = rows x segments, query/key rows o, o+r, ... of each segment,
// heads o, o+r, ... The composition plans these views, runs each on a dense engine
// and merges the results by log-sum-exp; the backward calls every dense backward with
// the merged out and lse. A dense engine is the only device-specific part.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace longnet::engine {

// The operator arguments beyond the tensors (schemas in csrc/longnet.cpp), checked,
// for one problem: packed documents reach an engine one document at a time.
struct Arguments {
  at::IntArrayRef segment_lengths, dilation_rates;
  bool is_causal;
  double scale;
  int64_t position_offset;
  std::optional<at::Tensor> key_start, key_end;  // int (B,) on q's device, or nullopt
};

// One way of computing the operators on checked (B, N, H, D) inputs.
class Engine {
 public:
  virtual ~Engine() = default;
  virtual const char* name() const = 0;
  // Whether the engine exists for tests only (compiled into a testing build, reached
  // through longnet.testing, never among engine_names()).
  virtual bool for_tests() const { return false; }
  // Why this engine cannot run a call on these (B, N, H, D) inputs, or nullopt when
  // it can.
  virtual std::optional<std::string> cannot_run(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v) const = 0;
  // (out (B, Nq, H, D), lse (B, H, Nq)) of the forward operator.
  virtual std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const Arguments& args) const = 0;
  // (dq, dk, dv) of the backward operator; grad_lse undefined when the loss reads no lse.
  virtual std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(
      const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
      const Arguments& args) const = 0;
};

// Sequences packed along the first dimension of (T, H, D) tensors: sequence i is the
// query rows [cu_q[i], cu_q[i+1]) against the key rows [cu_k[i], cu_k[i+1]). The
// offsets are int32 (P+1,) on the inputs' device (flash-attn's cu_seqlens); max_q and
// max_k are the longest lengths; the host copies, read by the tests' contract engines
// only, are the same offsets.
struct PackedSequences {
  at::Tensor cu_q, cu_k;
  int64_t max_q, max_k;
  std::vector<int64_t> host_q, host_k;
  int64_t count() const { return static_cast<int64_t>(host_q.size()) - 1; }
};

// An engine that runs one batch of dense attention problems: q (Bt, Lq, Hh, D), k and
// v (Bt, Lk, Hh, D), strided views whose last dimension is dense. `causal` is only
// asked for Lq == Lk (where top-left and bottom-right alignment agree). Its operators
// are the composition of such problems (composition.cpp).
class DenseEngine : public Engine {
 public:
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

  // Whether the engine also runs many dense problems of different lengths in one call
  // (forward_varlen, backward_varlen): packed documents then run every group of
  // problems that share their heads, pattern and mask in one call, whatever the
  // number of documents (composed_documents_forward/_backward).
  virtual bool has_varlen() const { return false; }
  // (out (Tq, Hh, D), lse (Hh, Tq) float32) of the packed problems: q (Tq, Hh, D), k
  // and v (Tk, Hh, D), contiguous. `causal` only for problems with Lq == Lk.
  virtual std::tuple<at::Tensor, at::Tensor> forward_varlen(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const PackedSequences& seqs,
                                                            bool causal, double scale) const;
  // (dq, dk, dv) of the packed problems given out (Tq, Hh, D) and lse (Hh, Tq) float32
  // from a larger softmax.
  virtual std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_varlen(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, const PackedSequences& seqs, bool causal,
      double scale) const;

  std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const Arguments& args) const final;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(
      const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
      const Arguments& args) const final;
};

// Packed documents on an engine with has_varlen(): document i is the queries
// [doc_q[i], doc_q[i+1]) against the keys [doc_k[i], doc_k[i+1]) of (1, N, H, D)
// inputs (args without key ranges). Every group of problems of all documents that
// share their pattern, head set and mask runs in one varlen call (composition.cpp).
std::tuple<at::Tensor, at::Tensor> composed_documents_forward(
    const DenseEngine& engine, const std::vector<int64_t>& doc_q, const std::vector<int64_t>& doc_k,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Arguments& args);
std::tuple<at::Tensor, at::Tensor, at::Tensor> composed_documents_backward(
    const DenseEngine& engine, const std::vector<int64_t>& doc_q, const std::vector<int64_t>& doc_k,
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const Arguments& args);

// ------------------------------------------------------------- registry ----

// Registration of engines (by static objects of the engine files).
void register_engine(const Engine* engine);
// The engine of that name, nullptr when none is built under that name.
const Engine* find_engine(const std::string& name);
// The `math` dense engine (engines_cpu.cpp), which runs every problem.
const DenseEngine& math_engine();

// The engine names of the API, built or not (without "auto" and the engines for
// tests), in the order `auto` prefers them per device.
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
const Engine& choose_engine(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

}  // namespace longnet::engine
