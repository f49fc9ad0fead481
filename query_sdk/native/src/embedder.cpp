// The bundle's .pte through the ExecuTorch C++ runtime (Module API over the bytes we read and
// checked, XNNPACK delegate linked in): query_sdk/runtimes.py (check_pte, ExecuTorchRuntime)
// and the re-normalisation of query_sdk/searcher.py (_embed).
#include "embedder.h"

#include <cmath>
#include <cstring>
#include <mutex>
#include <new>

#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr_maker.h>
#include <executorch/runtime/platform/runtime.h>

#include "cmce_query.h"
#include "common.h"
#include "fileio.h"

// The wheel ships libexecutorch_threadpool.so without its header: the two functions used here,
// declared as the library defines them (extension/threadpool/threadpool.h).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace cmce {

namespace et = executorch::runtime;
using executorch::aten::ScalarType;
using executorch::extension::BufferDataLoader;
using executorch::extension::module::Module;

namespace {

constexpr uint64_t kMaxProgramBytes = 2ull << 30;  // bundle_format's bound on an artifact
constexpr char kPteIdentifier[] = "ET12";           // runtimes.PTE_IDENTIFIER
constexpr char kPteHeaderMagic[] = "eh00";

// ExecuTorch's thread pool (XNNPACK's) is one per process and resizing it is unsafe while a
// program runs: every run and every resize, over all handles, take this lock.
std::mutex g_runtime;

uint64_t le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string hex(const uint8_t* p, size_t n) {
  static const char digits[] = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) s += {digits[p[i] >> 4], digits[p[i] & 15]};
  return s;
}

std::string et_error(et::Error e) {
  return std::string(et::to_string(e)) + " (ExecuTorch error " +
         std::to_string(static_cast<int>(e)) + ")";
}

}  // namespace

Status check_pte(const uint8_t* data, size_t n, const std::string& file) {
  if (n < 16)
    return {CMCE_ERR_BACKEND,
            file + ": " + std::to_string(n) + " bytes, too short for an ExecuTorch program"};
  if (std::memcmp(data + 4, kPteIdentifier, 4) != 0)
    return {CMCE_ERR_BACKEND, file + ": not an ExecuTorch program: bytes 4-7 are " +
                                  hex(data + 4, 4) + ", expected " +
                                  hex(reinterpret_cast<const uint8_t*>(kPteIdentifier), 4) +
                                  " (ET12); re-export it with cmce-export"};
  const uint64_t root = le(data, 4);
  if (root < 8 || root >= n)
    return {CMCE_ERR_BACKEND, file + ": flatbuffer root offset " + std::to_string(root) +
                                  " outside the " + std::to_string(n) + " bytes"};
  if (std::memcmp(data + 8, kPteHeaderMagic, 4) != 0 || n < 32) return {};
  const uint64_t length = le(data + 12, 4), program = le(data + 16, 8), base = le(data + 24, 8);
  const uint64_t segments = length > 24 && n >= 40 ? le(data + 32, 8) : 0;
  if (length < 24 || program > n || base > n || segments > n - base)
    return {CMCE_ERR_BACKEND, file + ": the extended header claims " + std::to_string(program) +
                                  " program bytes and segments at " + std::to_string(base) + "+" +
                                  std::to_string(segments) + "; the file has " +
                                  std::to_string(n) + " bytes (truncated or crafted)"};
  return {};
}

struct Embedder::Impl {
  std::string file;
  PixelSpec spec;
  int dim = 0, batch = 1;  // batch: the rows the program is run with (1, or its fixed batch)
  std::vector<uint8_t> bytes;  // the program; the Module reads it in place
  std::unique_ptr<Module> module;

  // One run on `batch` copies of `input` (already checked); the first row of the output.
  Status run(const Pixels& input, std::vector<float>* out) {
    const size_t image = input.size();
    std::vector<uint8_t> rows(image * batch);
    for (int b = 0; b < batch; ++b) std::memcpy(rows.data() + b * image, input.data(), image);
    auto tensor = executorch::extension::from_blob(
        rows.data(), {batch, spec.height, spec.width, spec.channels}, ScalarType::Byte);
    std::lock_guard<std::mutex> lock(g_runtime);
    auto result = module->forward(et::EValue(*tensor));
    if (!result.ok())
      return {CMCE_ERR_BACKEND, file + ": ExecuTorch could not run it: " + et_error(result.error())};
    const auto& outputs = *result;
    if (outputs.empty() || !outputs[0].isTensor())
      return {CMCE_ERR_BACKEND, file + ": the model returned no tensor"};
    const auto& t = outputs[0].toTensor();
    if (t.scalar_type() != ScalarType::Float || t.dim() != 2 || t.size(0) != batch ||
        t.size(1) != dim)
      return {CMCE_ERR_BACKEND, file + ": the model returned a " + std::to_string(t.dim()) +
                                    "-d tensor of type " + std::to_string(int(t.scalar_type())) +
                                    "; expected (" + std::to_string(batch) + ", " +
                                    std::to_string(dim) + ") float32"};
    const float* v = t.const_data_ptr<float>();
    out->assign(v, v + dim);
    return {};
  }
};

Embedder::Embedder(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Embedder::~Embedder() = default;

Status Embedder::open(const std::string& pte_path, const PixelSpec& spec, int dim, int threads,
                      std::unique_ptr<Embedder>* out) {
  try {
    auto impl = std::make_unique<Impl>();
    impl->file = pte_path;
    impl->spec = spec;
    impl->dim = dim;
    if (spec.height < 1 || spec.width < 1 || (spec.channels != 1 && spec.channels != 3) || dim < 1)
      return {CMCE_ERR_ARGUMENT, pte_path + ": the input spec or dim is invalid"};
    impl->bytes = read_regular_file(pte_path, kMaxProgramBytes, "ExecuTorch program",
                                    CMCE_ERR_BACKEND);
    Status frame = check_pte(impl->bytes.data(), impl->bytes.size(), pte_path);
    if (!frame.ok()) return frame;

    et::runtime_init();
    {
      std::lock_guard<std::mutex> lock(g_runtime);
      executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(
          static_cast<uint32_t>(std::max(1, threads)));
    }
    impl->module = std::make_unique<Module>(
        std::make_unique<BufferDataLoader>(impl->bytes.data(), impl->bytes.size()));
    const et::Error loaded = impl->module->load(et::Program::Verification::InternalConsistency);
    if (loaded != et::Error::Ok)
      return {CMCE_ERR_BACKEND, pte_path + ": ExecuTorch could not load it: " + et_error(loaded)};
    auto meta = impl->module->method_meta("forward");
    if (!meta.ok())
      return {CMCE_ERR_BACKEND, pte_path + ": no forward method: " + et_error(meta.error())};
    auto input = meta->num_inputs() == 1 ? meta->input_tensor_meta(0)
                                         : et::Result<et::TensorInfo>(et::Error::InvalidProgram);
    const std::vector<int32_t> want = {spec.height, spec.width, spec.channels};
    if (!input.ok() || input->scalar_type() != ScalarType::Byte || input->sizes().size() != 4 ||
        !std::equal(want.begin(), want.end(), input->sizes().begin() + 1))
      return {CMCE_ERR_BACKEND,
              pte_path + ": the program does not take one uint8 [N, " +
                  std::to_string(spec.height) + ", " + std::to_string(spec.width) + ", " +
                  std::to_string(spec.channels) +
                  "] image tensor as the bundle's input_spec says (re-export it with cmce-export)"};
    const int bound = input->sizes()[0];
    const et::Error method = impl->module->load_method("forward");
    if (method != et::Error::Ok)
      return {CMCE_ERR_BACKEND, pte_path + ": ExecuTorch could not load forward: " + et_error(method)};
    // A first run proves the program here (runtimes._GuardedLoad runs one batch of zeros too):
    // at batch 1 (a dynamic batch), else at the program's fixed batch, padded like Runtime.run.
    const Pixels zeros(size_t(spec.height) * spec.width * spec.channels, 0);
    std::vector<float> probe;
    Status ran = impl->run(zeros, &probe);
    if (!ran.ok() && bound > 1) {
      impl->batch = bound;
      ran = impl->run(zeros, &probe);
    }
    if (!ran.ok()) return ran;
    out->reset(new Embedder(std::move(impl)));
    return {};
  } catch (const Error& e) {
    return {e.code, e.what()};
  } catch (const std::bad_alloc&) {
    return {CMCE_ERR_NO_MEMORY, pte_path + ": out of memory loading the program"};
  }
}

Status Embedder::embed(const Pixels& input, std::vector<float>* embedding) {
  const PixelSpec& s = impl_->spec;
  if (input.size() != size_t(s.height) * s.width * s.channels)
    return {CMCE_ERR_ARGUMENT, impl_->file + ": the model input is not " +
                                   std::to_string(s.height) + "x" + std::to_string(s.width) + "x" +
                                   std::to_string(s.channels) + " pixels"};
  try {
    std::vector<float> v;
    Status ran = impl_->run(input, &v);
    if (!ran.ok()) return ran;
    double sum = 0.0;
    for (float x : v) {
      if (!std::isfinite(x))
        return {CMCE_ERR_BACKEND, impl_->file + ": the model returned non-finite values"};
      sum += double(x) * x;
    }
    const float norm = static_cast<float>(std::sqrt(sum));
    if (norm < 1e-6f) return {CMCE_ERR_BACKEND, impl_->file + ": the model returned a zero vector"};
    for (float& x : v) x /= norm;
    *embedding = std::move(v);
    return {};
  } catch (const std::bad_alloc&) {
    return {CMCE_ERR_NO_MEMORY, impl_->file + ": out of memory running the model"};
  }
}

}  // namespace cmce
