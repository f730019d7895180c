// Engine registry, per-thread forced engine and last engine, and the choice of the
// engine that runs a call.
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <sstream>

#include "engine/engine.h"

namespace longnet::engine {
namespace {

std::vector<const Engine*>& registry() {
  static std::vector<const Engine*> engines;
  return engines;
}
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

thread_local std::string t_forced;
thread_local std::pair<uint64_t, std::string> t_last{0, ""};
std::atomic<uint64_t> g_sequence{0};

// An engine of the API (built or not), or an engine for tests that is built.
bool is_known(const std::string& name) {
  for (const std::string& n : engine_names()) {
    if (n == name) return true;
  }
  const Engine* engine = find_engine(name);
  return name == "auto" || (engine != nullptr && engine->for_tests());
}

std::string known_list() {
  std::ostringstream s;
  s << "auto";
  for (const std::string& n : engine_names()) s << ", " << n;
  return s.str();
}

std::optional<std::string> cannot_run(const std::string& name, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v) {
  const Engine* engine = find_engine(name);
  if (engine == nullptr) {
    return "it is not built into this installation of longnet (the CUDA engines need a "
           "CUDA build)";
  }
  return engine->cannot_run(q, k, v);
}

// The engines `auto` tries on a device, in order; `math`, which runs every call, when
// none of them can.
const std::vector<std::string>& preference(const at::Device& device) {
  static const std::vector<std::string> cpu{"fused"};
  static const std::vector<std::string> cuda{"cuda_flash", "cuda_cudnn", "cuda_efficient"};
  static const std::vector<std::string> other;
  if (device.is_cpu()) return cpu;
  if (device.is_cuda()) return cuda;
  return other;
}

const Engine& automatic(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const std::string& name : preference(q.device())) {
    const Engine* engine = find_engine(name);
    if (engine != nullptr && !engine->cannot_run(q, k, v)) return *engine;
  }
  return math_engine();
}

}  // namespace

void register_engine(const Engine* engine) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().push_back(engine);
}

const Engine* find_engine(const std::string& name) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  for (const Engine* e : registry()) {
    if (name == e->name()) return e;
  }
  return nullptr;
}

const std::vector<std::string>& engine_names() {
  static const std::vector<std::string> names{"fused",      "cpu_flash",  "math",
                                              "cuda_flash", "cuda_cudnn", "cuda_efficient"};
  return names;
}

void set_forced_engine(const std::string& name) { t_forced = name; }
const std::string& forced_engine() { return t_forced; }

void record_engine(const std::string& name) { t_last = {++g_sequence, name}; }
std::pair<uint64_t, std::string> last_engine() { return t_last; }

const Engine& choose_engine(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
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
  return *find_engine(name);
}

}  // namespace longnet::engine
