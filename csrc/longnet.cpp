// Operator schemas of the longnet namespace and the Python module stub.
// Kernels live in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

// Importing longnet._C loads this library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(longnet, m) {
  // Returns (out (B, Nq, H, D) in the input dtype, lse (B, H, Nq) in float32, or
  // float64 for float64 inputs). docs/operator.md is the contract: position_offset is
  // the absolute position of k[:, 0]; key_start/key_end (int (B,)) bound each row's
  // sequence among the keys.
  m.def(
      "dilated_attention_fwd(Tensor q, Tensor k, Tensor v, int[] segment_lengths, "
      "int[] dilation_rates, bool is_causal, float scale, int position_offset=0, "
      "Tensor? key_start=None, Tensor? key_end=None) -> (Tensor, Tensor)");
  // Gradients of a loss on both outputs; returns (dq, dk, dv).
  m.def(
      "dilated_attention_bwd(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, int[] segment_lengths, int[] dilation_rates, bool is_causal, "
      "float scale, int position_offset=0, Tensor? key_start=None, Tensor? key_end=None) "
      "-> (Tensor, Tensor, Tensor)");
}
