// cmce_bundle_check BUNDLE_DIR [QUANTIZATION]: the bundle checks of libcmce_query's core —
// manifest.json against the published schema and the cross checks, the executorch query
// artifact picked, its size and sha256 — printed as one JSON object like cmce_probe's.
// tests/test_native_sdk.py compares it with query_sdk.bundle_format on crafted bundles.
#include <cstdio>
#include <string>

#include "bundle.h"
#include <nlohmann/json.hpp>

#include "common.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: cmce_bundle_check BUNDLE_DIR [QUANTIZATION]\n");
    return 1;
  }
  nlohmann::json out;
  try {
    cmce::Bundle b = cmce::read_bundle(argv[1]);
    const cmce::BundleArtifact& a = cmce::pick_artifact(b, "executorch", argc > 2 ? argv[2] : "");
    cmce::verify_artifact(b, a);
    out = {{"ok", true}, {"file", a.file}, {"quantization", a.quantization}, {"dim", b.embedding_dim},
           {"space_id", b.space_id}, {"input_spec", {b.input_spec.height, b.input_spec.width, b.input_spec.channels}}};
  } catch (const cmce::Error& e) {
    out = {{"ok", false}, {"code", e.code}, {"message", e.what()}};
  }
  std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  return 0;
}
