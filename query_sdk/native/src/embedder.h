// The query model inside libcmce_query: the bundle's ExecuTorch program (XNNPACK delegate)
// on the model input from image.h -> the L2-normalised query vector (query_sdk/searcher.py).
// Nothing throws: CMCE_ERR_BACKEND naming the file for any problem with the program.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "image.h"

namespace cmce {

// One loaded .pte. The program's frame is checked (runtimes.check_pte) before ExecuTorch sees a
// byte, its input is checked against the spec, and one run on zeros proves it loads and runs
// (at batch 1, or at its fixed batch, padded) before open() returns. embed() is thread-safe:
// runs are serialised over the process, as ExecuTorch's one thread pool (sized by the last
// open()'s `threads`) serves every program.
class Embedder {
 public:
  static Status open(const std::string& pte_path, const PixelSpec& spec, int dim, int threads,
                     std::unique_ptr<Embedder>* out);
  ~Embedder();
  // `input` from the functions above -> `embedding` (dim floats), L2-normalised in float32.
  Status embed(const Pixels& input, std::vector<float>* embedding);

  struct Impl;

 private:
  explicit Embedder(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// runtimes.check_pte on the bytes of a program: CMCE_OK or a CMCE_ERR_BACKEND naming `file`.
Status check_pte(const uint8_t* data, size_t n, const std::string& file);

}  // namespace cmce
