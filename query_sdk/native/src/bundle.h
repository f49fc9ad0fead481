// A query bundle's manifest.json (query_sdk/bundle_format.py): the published schema and the
// cross checks, the artifact to run, and its size and sha256 before any runtime loads it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cmce {

struct BundleInputSpec {
  int height, width, channels;
  std::vector<float> mean, std;  // one value per channel
};

struct BundleArtifact {
  std::string target, quantization, file, sha256, role;
  uint64_t bytes;
};

struct Bundle {
  std::string folder, space_id;
  int64_t embedding_dim;
  BundleInputSpec input_spec;
  std::vector<BundleArtifact> artifacts;
};

// Read and check folder/manifest.json; FormatError naming the file and key.
Bundle read_bundle(const std::string& folder);
Bundle parse_bundle_manifest(const uint8_t* data, size_t n, const std::string& where);

// The query artifact for `target` ("executorch"); quantization "" = the most precise there is.
const BundleArtifact& pick_artifact(const Bundle& bundle, const std::string& target,
                                    const std::string& quantization);

// Size and sha256 of one artifact; returns its path.
std::string verify_artifact(const Bundle& bundle, const BundleArtifact& artifact);

}  // namespace cmce
