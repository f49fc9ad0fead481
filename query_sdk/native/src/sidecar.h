// The shard sidecar (.meta.npz, written by numpy.savez, stored uncompressed): read bounded and
// checked like query_sdk/gallery_format.read_meta — every .npy header (dtype, item size, shape)
// is checked against the manifest's count and the zip directory before any data is used.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cmce {

struct ShardMeta {
  std::vector<std::string> ids;
  std::vector<int64_t> labels;
  std::vector<float> uncertainty;
  std::vector<std::string> payload;  // JSON object text, "" for none
  std::vector<uint8_t> deleted;
  std::vector<std::string> classes;  // empty when the sidecar has none
  bool has_classes = false;
  uint64_t string_bytes = 0;  // bytes held by ids, payloads and classes
};

// Parse sidecar bytes; `name` is the file name for messages. FormatError on any problem.
ShardMeta parse_sidecar(const uint8_t* data, size_t n, const std::string& name, int64_t count);

}  // namespace cmce
