// Operator schemas of the longnet namespace and the Python module stub.
// csrc/engine/dispatch.cpp registers the implementations, which run the engine of the
// call (csrc/engine/engine.h): `fused` (the kernels of csrc/cpu and csrc/cuda) or a
// dense engine.
#include <Python.h>
#include <torch/library.h>

#include "engine/engine.h"

namespace {

// _set_engine(name): force an engine for this thread ("" or "auto": automatic).
PyObject* set_engine(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  longnet::engine::set_forced_engine(name);
  Py_RETURN_NONE;
}

// _forced_engine() -> str: the engine forced for this thread ("" when none).
PyObject* forced_engine(PyObject*, PyObject*) {
  return PyUnicode_FromString(longnet::engine::forced_engine().c_str());
}

// _last_engine() -> (sequence, name): the engine of this thread's last call, with a
// process-wide sequence number ((0, "") before any call).
PyObject* last_engine(PyObject*, PyObject*) {
  const auto last = longnet::engine::last_engine();
  return Py_BuildValue("(Ks)", static_cast<unsigned long long>(last.first), last.second.c_str());
}

// _engine_names() -> tuple of the API's engine names (without "auto" and the engines
// for tests).
PyObject* engine_names(PyObject*, PyObject*) {
  const auto& names = longnet::engine::engine_names();
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
  if (tuple == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), PyUnicode_FromString(names[i].c_str()));
  }
  return tuple;
}

// _engine_built(name) -> bool: whether an engine of that name is compiled in.
PyObject* engine_built(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  return PyBool_FromLong(longnet::engine::find_engine(name) != nullptr);
}

// _build_flags() -> tuple of the optional parts compiled in (setup.py): "cuda" (CUDA
// operators and engines), "fused_cuda" (the fused CUDA kernels), "testing" (the
// engines and switches for tests).
PyObject* build_flags(PyObject*, PyObject*) {
  static const char* const flags[] = {
#ifdef LONGNET_WITH_CUDA
      "cuda",
#endif
#ifdef LONGNET_FUSED_CUDA
      "fused_cuda",
#endif
#ifdef LONGNET_TESTING
      "testing",
#endif
      nullptr};
  Py_ssize_t count = 0;
  while (flags[count] != nullptr) ++count;
  PyObject* tuple = PyTuple_New(count);
  if (tuple == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyTuple_SET_ITEM(tuple, i, PyUnicode_FromString(flags[i]));
  }
  return tuple;
}

PyMethodDef methods[] = {
    {"_set_engine", set_engine, METH_O, "Force an engine for this thread."},
    {"_forced_engine", forced_engine, METH_NOARGS, "Engine forced for this thread."},
    {"_last_engine", last_engine, METH_NOARGS, "(sequence, engine) of this thread's last call."},
    {"_engine_names", engine_names, METH_NOARGS, "Names of the engines."},
    {"_engine_built", engine_built, METH_O, "Whether an engine is compiled in."},
    {"_build_flags", build_flags, METH_NOARGS, "Optional parts compiled in."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing longnet._C loads this library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(longnet, m) {
  // Returns (out (B, Nq, H, D) in the input dtype, lse (B, H, Nq) in float32, or
  // float64 for float64 inputs). docs/operator.md is the contract: position_offset is
  // the absolute position of k[:, 0]; key_start/key_end (int (B,)) bound each row's
  // sequence among the keys; cu_seqlens_q/cu_seqlens_k (int (S+1,)) pack S documents
  // into a batch of one row, each attended as if alone.
  m.def(
      "dilated_attention_fwd(Tensor q, Tensor k, Tensor v, int[] segment_lengths, "
      "int[] dilation_rates, bool is_causal, float scale, int position_offset=0, "
      "Tensor? key_start=None, Tensor? key_end=None, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None) -> (Tensor, Tensor)");
  // Gradients of a loss on both outputs; returns (dq, dk, dv). grad_lse None: the
  // loss does not read lse (no pass for its gradient, nothing to read back).
  m.def(
      "dilated_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, int[] segment_lengths, int[] dilation_rates, bool is_causal, "
      "float scale, int position_offset=0, Tensor? key_start=None, Tensor? key_end=None, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) -> (Tensor, Tensor, Tensor)");
}
