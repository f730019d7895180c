// Engine registry, per-thread forced engine and last engine, and the choice of the
// engine that runs a call.
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <sstream>

#include "engine/engine.h"

namespace longnet::engine {
namespace {

std::vector<const DenseEngine*>& registry() {
  static std::vector<const DenseEngine*> engines;
  return engines;
}
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

thread_local std::string t_forced;
thread_local std::pair<uint64_t, std::string> t_last{0, ""};
std::atomic<uint64_t> g_sequence{0};

bool is_known(const std::string& name) {
  for (const std::string& n : engine_names()) {
    if (n == name) return true;
  }
  return name == "auto";
}

std::string known_list() {
  std::ostringstream s;
  s << "auto";
  for (const std::string& n : engine_names()) s << ", " << n;
  return s.str();
}

// Why the project's own kernels cannot run on q, or nullopt.
std::optional<std::string> fused_cannot_run(const at::Tensor& q) {
  if (q.device().is_cpu()) return std::nullopt;
#ifdef LONGNET_WITH_CUDA
  if (q.is_cuda()) return std::nullopt;
#else
  if (q.is_cuda()) return "longnet was built without its CUDA kernels";
#endif
  std::ostringstream s;
  s << "the fused kernels take CPU or CUDA tensors, got " << q.device();
  return s.str();
}

std::optional<std::string> cannot_run(const std::string& name, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v) {
  if (name == "fused") return fused_cannot_run(q);
  const DenseEngine* engine = find_engine(name);
  if (engine == nullptr) {
    return "it is not built into this installation of longnet (the CUDA engines need a "
           "CUDA build)";
  }
  return engine->cannot_run(q, k, v);
}

std::string automatic(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if (q.device().is_cpu()) return "fused";
  if (q.is_cuda()) {
    static const char* const preference[] = {"cuda_flash", "cuda_cudnn", "cuda_efficient"};
    for (const char* name : preference) {
      if (!cannot_run(name, q, k, v)) return name;
    }
  }
  return "math";
}

}  // namespace

void register_engine(const DenseEngine* engine) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().push_back(engine);
}

const DenseEngine* find_engine(const std::string& name) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  for (const DenseEngine* e : registry()) {
    if (name == e->name()) return e;
  }
  return nullptr;
}

const std::vector<std::string>& engine_names() {
  // The contract_* engines run on CPU what the CUDA engines run, under the CUDA
  // kernels' input contracts (engines_contract.cpp); only ever forced.
  static const std::vector<std::string> names{"fused",
                                              "cpu_flash",
                                              "math",
                                              "cuda_flash",
                                              "cuda_cudnn",
                                              "cuda_efficient",
                                              "contract_cuda_flash",
                                              "contract_cuda_cudnn",
                                              "contract_cuda_efficient"};
  return names;
}

void set_forced_engine(const std::string& name) { t_forced = name; }
const std::string& forced_engine() { return t_forced; }

void record_engine(const std::string& name) { t_last = {++g_sequence, name}; }
std::pair<uint64_t, std::string> last_engine() { return t_last; }

std::string choose_engine(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  std::string name = t_forced;
  const char* source = "longnet.use_engine";
  if (name.empty()) {
    const char* env = std::getenv("LONGNET_ENGINE");
    if (env != nullptr) name = env;
    source = "LONGNET_ENGINE";
  }
  if (name.empty() || name == "auto") return automatic(q, k, v);
  TORCH_CHECK(is_known(name), "longnet: unknown engine '", name, "' (from ", source,
              "); expected one of ", known_list());
  const std::optional<std::string> reason = cannot_run(name, q, k, v);
  TORCH_CHECK(!reason.has_value(), "longnet: engine '", name, "' (forced by ", source,
              ") cannot run this call: ", reason.value_or(""));
  return name;
}

}  // namespace longnet::engine
