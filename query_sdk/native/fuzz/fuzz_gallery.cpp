// libFuzzer target: the manifest, signature and shard loader of libcmce_query on hostile bytes.
//
// The first byte picks what the rest of the input replaces in a copy of the base gallery
// ($CMCE_FUZZ_BASE, default tests/corpus/base): 0 the manifest, 1 the index file, 2 the
// sidecar, 3 manifest.sig (opened with a public key). Index and sidecar inputs get a manifest
// whose sizes and sha256 match, so the fuzzer reaches the structure proof and, when that
// accepts, hnswlib's loader and a search. Any cmce::Error is a refusal (fine); a crash, a
// sanitizer report, a leak or any other exception is a finding.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "common.h"
#include "fileio.h"
#include "gallery.h"

namespace {

std::vector<uint8_t> slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void spill(const std::string& path, const uint8_t* data, size_t n) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (n) std::fwrite(data, 1, n, f);
  std::fclose(f);
}

struct Base {
  std::string dir, work;
  std::vector<uint8_t> manifest, index, meta;
};

const Base& base() {
  static const Base b = [] {
    Base out;
    const char* env = std::getenv("CMCE_FUZZ_BASE");
    out.dir = env ? env : "tests/corpus/base";
    out.manifest = slurp(out.dir + "/manifest.json");
    out.index = slurp(out.dir + "/shard-00000.hnsw");
    out.meta = slurp(out.dir + "/shard-00000.meta.npz");
    if (out.manifest.empty() || out.index.empty() || out.meta.empty()) {
      std::fprintf(stderr, "fuzz_gallery: no base gallery in %s (set CMCE_FUZZ_BASE)\n", out.dir.c_str());
      std::abort();
    }
    char tmpl[] = "/tmp/cmce-fuzz-XXXXXX";
    if (!mkdtemp(tmpl)) std::abort();
    out.work = tmpl;
    return out;
  }();
  return b;
}

// the base manifest with the size and sha256 of one shard file replaced
std::vector<uint8_t> rehashed(const std::string& file, const uint8_t* data, size_t n) {
  const Base& b = base();
  nlohmann::json m = nlohmann::json::parse(b.manifest);
  m["shards"][0]["files"][file] = {{"bytes", n}, {"sha256", cmce::sha256_hex(data, n)}};
  const std::string text = m.dump();
  return {text.begin(), text.end()};
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const Base& b = base();
  const uint8_t mode = data[0] % 4;
  const uint8_t* body = data + 1;
  const size_t n = size - 1;
  std::vector<uint8_t> manifest = b.manifest;
  const std::vector<uint8_t>*index = &b.index, *meta = &b.meta;
  std::vector<uint8_t> own(body, body + n);
  if (mode == 0) manifest = own;
  if (mode == 1) {
    manifest = rehashed("shard-00000.hnsw", body, n);
    index = &own;
  }
  if (mode == 2) {
    manifest = rehashed("shard-00000.meta.npz", body, n);
    meta = &own;
  }
  spill(b.work + "/manifest.json", manifest.data(), manifest.size());
  spill(b.work + "/shard-00000.hnsw", index->data(), index->size());
  spill(b.work + "/shard-00000.meta.npz", meta->data(), meta->size());
  cmce::GalleryOptions options;
  if (mode == 3) {
    spill(b.work + "/manifest.sig", body, n);
    options.public_key = std::string(64, '7');
  } else {
    ::unlink((b.work + "/manifest.sig").c_str());
  }
  try {
    auto g = cmce::Gallery::open(b.work, options);
    const size_t dim = static_cast<size_t>(g->manifest().dim);
    std::vector<float> q(dim, 0.0f);
    q[0] = 1.0f;
    g->search(q.data(), 1, 10, NAN);
    if (!g->manifest().quantiles.empty()) g->search(q.data(), 1, 10, g->manifest().quantiles[0].second);
  } catch (const cmce::Error&) {
    // refused: what the loader is for
  }
  return 0;
}
