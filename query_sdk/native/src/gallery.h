// A gallery folder opened like query_sdk.shards.Gallery.open: manifest bytes (and signature),
// the published schema and the cross checks, space_id/dim, then every selected shard's sizes,
// sha256, hnswlib structure proof and sidecar, before hnswlib loads an index; then search.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "sidecar.h"
#include "thread_pool.h"

namespace hnswlib {
template <typename T>
class HierarchicalNSW;
class InnerProductSpace;
}  // namespace hnswlib

namespace cmce {

struct FileEntry {
  uint64_t bytes;
  std::string sha256;
};

struct ShardEntry {
  std::string index_file, meta_file;
  int64_t count, deleted;
  std::map<std::string, FileEntry> files;
};

struct GalleryManifest {
  int format_version;
  std::string space_id;
  int64_t dim, M, ef_construction, ef_search;
  std::vector<std::pair<std::string, double>> quantiles;  // uncertainty_quantiles
  std::vector<ShardEntry> shards;
  std::map<std::string, FileEntry> files;
};

// Parse and check manifest bytes (schema + cross checks); FormatError naming `where`.
GalleryManifest parse_gallery_manifest(const uint8_t* data, size_t n, const std::string& where);

// Verify folder/manifest.sig against the exact manifest bytes and a trusted key (hex or a
// .pub file); SignatureError otherwise.
void verify_signature(const std::string& folder, const std::vector<uint8_t>& manifest_bytes,
                      const std::string& public_key);

struct GalleryOptions {
  std::optional<std::vector<int32_t>> shards;  // positions; none = all
  std::string public_key;                      // "" = no signature check
  std::string space_id;                        // "" = no check
  int64_t dim = 0;                             // 0 = no check
  int threads = 1;
};

struct Hit {
  int64_t label;
  float score;
  uint32_t row;  // into the concatenated sidecars
};

class Gallery {
 public:
  static std::unique_ptr<Gallery> open(const std::string& folder, const GalleryOptions& options);
  ~Gallery();

  const GalleryManifest& manifest() const { return manifest_; }
  int64_t count() const { return live_; }
  size_t shards_loaded() const { return shards_.size(); }
  uint64_t memory_bytes() const { return memory_; }
  int threads() const { return threads_; }

  // The limit for a quantile name ("q0.9" or "0.9"); ARGUMENT error if the manifest has none.
  double quantile_limit(const std::string& name) const;

  // Top-k for n unit vectors (checked), best first; `limit` NaN = no rejection.
  std::vector<std::vector<Hit>> search(const float* vectors, size_t n, size_t k,
                                       double limit) const;

  const std::string& id(uint32_t row) const { return ids_[row]; }
  const std::string& payload(uint32_t row) const { return payload_[row]; }
  const std::string& class_name(uint32_t row) const { return classes_[row]; }
  float uncertainty(uint32_t row) const { return uncertainty_[row]; }

 private:
  struct Shard;
  Gallery() = default;
  uint32_t row_of(int64_t label) const;

  std::string folder_;
  GalleryManifest manifest_;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::vector<std::string> ids_, payload_, classes_;
  std::vector<float> uncertainty_;
  std::vector<std::pair<int64_t, uint32_t>> by_label_;  // sorted
  int64_t live_ = 0;
  uint64_t memory_ = 0;
  int threads_ = 1;
  std::unique_ptr<ThreadPool> pool_;
};

}  // namespace cmce
