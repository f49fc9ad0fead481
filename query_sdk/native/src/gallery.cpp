#include "gallery.h"

#include <sodium.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <unordered_map>

#include "common.h"
#include "fileio.h"
#include "index_check.h"
#include "json_schema.h"

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wsign-compare"
#endif
#include "hnswlib/hnswlib.h"
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

namespace cmce {

using nlohmann::json;

namespace {

constexpr const char* kManifestFile = "manifest.json";
constexpr const char* kSignatureFile = "manifest.sig";
constexpr uint64_t kMaxSignatureBytes = 4096;
constexpr double kNormTolerance = 1e-3;
const std::string kRebuild = "; rebuild the gallery or download it again";


std::map<std::string, FileEntry> file_entries(const json& j) {
  std::map<std::string, FileEntry> out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    out[it.key()] = {static_cast<uint64_t>(json_integer(it.value()["bytes"])),
                     it.value()["sha256"].get<std::string>()};
  }
  return out;
}


std::vector<uint8_t> hex_bytes(const std::string& text, bool* ok) {
  std::vector<uint8_t> out;
  *ok = true;
  int high = -1;
  for (char c : text) {
    int v = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
    if (v < 0) {
      if (std::strchr(" \t\n\r\f\v", c) && c && high < 0) continue;
      *ok = false;
      return out;
    }
    if (high < 0) {
      high = v;
    } else {
      out.push_back(static_cast<uint8_t>(high * 16 + v));
      high = -1;
    }
  }
  *ok = high < 0;
  return out;
}

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\n\r\f\v"), b = s.find_last_not_of(" \t\n\r\f\v");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

std::vector<uint8_t> public_key_bytes(const std::string& key) {
  std::string text = trim(key);
  if (text.size() != 64 && is_regular_file(text)) {
    std::vector<uint8_t> data = read_regular_file(text, 8 * 32, "public key file", CMCE_ERR_SIGNATURE);
    text = trim(std::string(data.begin(), data.end()));
  }
  bool ok;
  std::vector<uint8_t> raw = hex_bytes(text, &ok);
  if (!ok) fail(CMCE_ERR_SIGNATURE, "public key " + repr(key) + ": neither 64 hex digits nor a key file");
  if (raw.size() != 32) {
    fail(CMCE_ERR_SIGNATURE, "public key: " + std::to_string(raw.size()) + " bytes, an Ed25519 key has 32");
  }
  return raw;
}

std::string hex(const uint8_t* p, size_t n) {
  std::string out(2 * n + 1, '\0');
  sodium_bin2hex(&out[0], out.size(), p, n);
  out.pop_back();
  return out;
}

}  // namespace

GalleryManifest parse_gallery_manifest(const uint8_t* data, size_t n, const std::string& where) {
  json d = parse_json(data, n, where, CMCE_ERR_FORMAT);
  validate_schema(published_schema("gallery-manifest.schema.json"), d, where, CMCE_ERR_FORMAT);
  if (!real_date(d["created"].get<std::string>())) {
    format_error(where + ": key 'created' must be an ISO 8601 UTC time like 2024-05-01T12:00:00Z, got " +
                 d["created"].dump());
  }
  GalleryManifest m;
  m.format_version = static_cast<int>(json_integer(d["format_version"]));
  m.space_id = d["space_id"].get<std::string>();
  m.dim = json_integer(d["dim"]);
  m.M = json_integer(d["hnsw"]["M"]);
  m.ef_construction = json_integer(d["hnsw"]["ef_construction"]);
  m.ef_search = json_integer(d["hnsw"]["ef_search"]);
  for (auto it = d["uncertainty_quantiles"].begin(); it != d["uncertainty_quantiles"].end(); ++it) {
    m.quantiles.emplace_back(it.key(), it.value().get<double>());
  }
  std::set<std::string> seen;
  std::vector<std::string> names;
  const json& shards = d["shards"];
  for (size_t i = 0; i < shards.size(); ++i) {
    const json& s = shards[i];
    const std::string at = where + ": shards[" + std::to_string(i) + "]";
    ShardEntry e{s["index_file"].get<std::string>(), s["meta_file"].get<std::string>(),
                 json_integer(s["count"]), json_integer(s["deleted"]), file_entries(s["files"])};
    if (e.index_file == e.meta_file) format_error(at + ": index_file and meta_file are the same (" + repr(e.index_file) + ")");
    if (e.deleted > e.count) {
      format_error(at + ": deleted (" + std::to_string(e.deleted) + ") exceeds count (" + std::to_string(e.count) + ")");
    }
    if (e.files.size() != 2 || !e.files.count(e.index_file) || !e.files.count(e.meta_file)) {
      format_error(at + ": 'files' must describe exactly its index_file and meta_file");
    }
    names.push_back(e.index_file);
    names.push_back(e.meta_file);
    m.shards.push_back(std::move(e));
  }
  if (d.contains("files")) m.files = file_entries(d["files"]);
  for (const auto& f : m.files) names.push_back(f.first);
  for (const std::string& name : names) {
    if (!seen.insert(name).second) format_error(where + ": file " + repr(name) + " is listed more than once");
  }
  return m;
}

void verify_signature(const std::string& folder, const std::vector<uint8_t>& manifest_bytes,
                      const std::string& public_key) {
  if (sodium_init() < 0) fail(CMCE_ERR_INTERNAL, "libsodium could not be initialised");
  const std::vector<uint8_t> trusted = public_key_bytes(public_key);
  const std::string path = join_path(folder, kSignatureFile);
  if (!is_regular_file(path)) {
    fail(CMCE_ERR_SIGNATURE, std::string(kSignatureFile) + ": missing in " + folder +
                                 "; a public key was given, so unsigned galleries are refused");
  }
  std::vector<uint8_t> data = read_regular_file(path, kMaxSignatureBytes, "signature file", CMCE_ERR_SIGNATURE);
  json record = parse_json(data.data(), data.size(), path, CMCE_ERR_SIGNATURE);
  validate_schema(published_schema("manifest-sig.schema.json"), record, path, CMCE_ERR_SIGNATURE);
  bool ok;
  std::vector<uint8_t> signature = hex_bytes(record["signature"].get<std::string>(), &ok);
  const std::string hint = record.contains("public_key") ? record["public_key"].get<std::string>() : "?";
  if (crypto_sign_verify_detached(signature.data(), manifest_bytes.data(), manifest_bytes.size(),
                                  trusted.data()) != 0) {
    const std::string key = hex(trusted.data(), trusted.size());
    fail(CMCE_ERR_SIGNATURE, std::string(kSignatureFile) + ": the signature does not match " + kManifestFile +
                                 " and public key " + key.substr(0, 16) + ".." +
                                 (hint == key ? "" : " (signed with key " + hint.substr(0, 16) + "..)") +
                                 ": the gallery was changed after signing, or signed by someone else");
  }
}

// ------------------------------------------------------------------------------ shards

struct Gallery::Shard {
  std::unique_ptr<hnswlib::InnerProductSpace> space;
  std::unique_ptr<hnswlib::HierarchicalNSW<float>> index;  // null for an empty shard
  int64_t live = 0;
};

namespace {

// size, kind and safe path of one shard file (gallery_format._check_file)
std::string check_shard_file(const std::string& folder, const ShardEntry& shard, const std::string& name) {
  const std::string path = safe_join(folder, name, false, CMCE_ERR_FORMAT, "gallery folder");
  auto entry = shard.files.find(name);
  if (entry == shard.files.end()) format_error(name + ": no size/sha256 entry in the manifest");
  if (!exists(path)) format_error(name + ": listed in the manifest but missing from " + folder);
  const uint64_t size = regular_file_size(path, "shard file", CMCE_ERR_FORMAT);
  if (size != entry->second.bytes) {
    format_error(name + ": size " + std::to_string(size) + " bytes, manifest says " + std::to_string(entry->second.bytes));
  }
  return path;
}

struct VerifiedShard {
  std::string index_path;
  ShardMeta meta;
};

VerifiedShard verify_shard(const std::string& folder, const ShardEntry& shard, int64_t dim, int64_t M, int64_t efc) {
  const std::string index_path = check_shard_file(folder, shard, shard.index_file);
  const std::string meta_path = check_shard_file(folder, shard, shard.meta_file);
  const FileEntry& want = shard.files.at(shard.index_file);
  // the header first, against the manifest: nothing is allocated for a lying file
  std::vector<uint8_t> head = read_prefix(index_path, kIndexHeaderBytes, CMCE_ERR_FORMAT);
  check_index_header(read_index_header(head.data(), head.size(), shard.index_file), want.bytes,
                     shard.index_file, dim, shard.count, M, efc);
  std::vector<uint8_t> data = read_regular_file(index_path, want.bytes, "shard file", CMCE_ERR_FORMAT);
  std::string got = sha256_hex(data.data(), data.size());
  if (data.size() != want.bytes || got != want.sha256) {
    format_error(shard.index_file + ": sha256 " + got + ", manifest says " + want.sha256);
  }
  const FileEntry& want_meta = shard.files.at(shard.meta_file);
  std::vector<uint8_t> meta_bytes = read_regular_file(meta_path, want_meta.bytes, "sidecar", CMCE_ERR_FORMAT);
  got = sha256_hex(meta_bytes.data(), meta_bytes.size());
  if (got != want_meta.sha256) format_error(shard.meta_file + ": sha256 " + got + ", manifest says " + want_meta.sha256);

  std::vector<int64_t> labels;
  std::vector<uint8_t> deleted;
  check_index(data.data(), data.size(), shard.index_file, dim, shard.count, M, efc, &labels, &deleted);
  data = {};
  ShardMeta meta = parse_sidecar(meta_bytes.data(), meta_bytes.size(), shard.meta_file, shard.count);
  int64_t n_deleted = 0;
  for (uint8_t x : meta.deleted) n_deleted += x;
  if (n_deleted != shard.deleted) {
    format_error(shard.meta_file + ": " + std::to_string(n_deleted) + " deleted, manifest says " + std::to_string(shard.deleted));
  }
  std::vector<std::pair<int64_t, uint8_t>> a, b;
  for (size_t i = 0; i < labels.size(); ++i) a.emplace_back(labels[i], deleted[i]);
  for (size_t i = 0; i < meta.labels.size(); ++i) b.emplace_back(meta.labels[i], meta.deleted[i]);
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].first != b[i].first) format_error(shard.meta_file + ": labels differ from those in " + shard.index_file);
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].second != b[i].second) format_error(shard.meta_file + ": deleted flags differ from those in " + shard.index_file);
  }
  return {index_path, std::move(meta)};
}

}  // namespace

Gallery::~Gallery() = default;

std::unique_ptr<Gallery> Gallery::open(const std::string& folder, const GalleryOptions& options) {
  const std::string manifest_path = join_path(folder, kManifestFile);
  if (!exists(manifest_path)) format_error(std::string(kManifestFile) + ": missing in " + folder);
  std::vector<uint8_t> bytes = read_regular_file(manifest_path, kMaxJsonBytes, "gallery manifest", CMCE_ERR_FORMAT);
  if (!options.public_key.empty()) verify_signature(folder, bytes, options.public_key);
  std::unique_ptr<Gallery> g(new Gallery());
  g->folder_ = folder;
  g->manifest_ = parse_gallery_manifest(bytes.data(), bytes.size(), manifest_path);
  const GalleryManifest& m = g->manifest_;
  if (!options.space_id.empty() && m.space_id != options.space_id) {
    format_error(folder + ": the gallery is in embedding space " + repr(m.space_id) +
                 ", the query model is in space " + repr(options.space_id) +
                 "; they are not compatible (use a gallery built or reprojected for this query "
                 "model, or the matching query bundle)");
  }
  if (options.dim && m.dim != options.dim) {
    format_error(manifest_path + ": dim " + std::to_string(m.dim) + ", the query model gives " + std::to_string(options.dim));
  }
  std::vector<int32_t> selected;
  if (options.shards) {
    selected = *options.shards;
  } else {
    for (size_t i = 0; i < m.shards.size(); ++i) selected.push_back(static_cast<int32_t>(i));
  }
  if (std::set<int32_t>(selected.begin(), selected.end()).size() != selected.size()) {
    fail(CMCE_ERR_ARGUMENT, "shards lists a shard more than once");
  }
  std::vector<VerifiedShard> verified;
  std::unordered_map<int64_t, size_t> seen;
  for (int32_t i : selected) {
    if (i < 0 || static_cast<size_t>(i) >= m.shards.size()) {
      format_error(std::string(kManifestFile) + ": no shard number " + std::to_string(i) + " (" +
                   std::to_string(m.shards.size()) + " shards)");
    }
    const ShardEntry& shard = m.shards[static_cast<size_t>(i)];
    try {
      verified.push_back(verify_shard(folder, shard, m.dim, m.M, m.ef_construction));
    } catch (const Error& e) {
      if (e.code != CMCE_ERR_FORMAT) throw;
      format_error(e.what() + kRebuild);
    }
    for (int64_t label : verified.back().meta.labels) {
      auto it = seen.emplace(label, verified.size() - 1);
      if (!it.second) {
        format_error(shard.meta_file + ": label " + std::to_string(label) + " also used in " +
                     m.shards[static_cast<size_t>(selected[it.first->second])].meta_file);
      }
    }
  }
  // everything is proven: hand the files to hnswlib
  uint64_t memory = 0;
  g->threads_ = std::max(1, options.threads);
  for (size_t s = 0; s < verified.size(); ++s) {
    const ShardEntry& shard = m.shards[static_cast<size_t>(selected[s])];
    ShardMeta& meta = verified[s].meta;
    auto sh = std::make_unique<Shard>();
    for (uint8_t x : meta.deleted) sh->live += !x;
    if (shard.count > 0) {
      sh->space = std::make_unique<hnswlib::InnerProductSpace>(static_cast<size_t>(m.dim));
      try {
        sh->index = std::make_unique<hnswlib::HierarchicalNSW<float>>(
            sh->space.get(), verified[s].index_path, false, static_cast<size_t>(shard.count));
      } catch (const std::bad_alloc&) {
        throw;
      } catch (const std::exception& e) {
        format_error(shard.index_file + ": hnswlib could not load it: " + e.what());
      }
      if (static_cast<int64_t>(sh->index->cur_element_count) != shard.count) {
        format_error(shard.index_file + ": hnswlib loaded another number of elements than the manifest's count");
      }
      sh->index->setEf(static_cast<size_t>(m.ef_search));
    }
    // hnswlib 0.8: level-0 block, link lists, per-element level/pointer/mutex, label map,
    // 65536 label locks, and one visited list (2 bytes an element) per concurrent search
    const uint64_t n = static_cast<uint64_t>(shard.count);
    const uint64_t file = shard.files.at(shard.index_file).bytes;
    memory += file + n * (sizeof(void*) + sizeof(int) + sizeof(std::mutex) + 48) +
              65536 * sizeof(std::mutex) + static_cast<uint64_t>(g->threads_) * n * 2;
    g->live_ += sh->live;
    const uint32_t base = static_cast<uint32_t>(g->ids_.size());
    for (size_t r = 0; r < meta.labels.size(); ++r) g->by_label_.emplace_back(meta.labels[r], base + static_cast<uint32_t>(r));
    memory += meta.string_bytes + meta.labels.size() * (3 * sizeof(std::string) + sizeof(float) + 16);
    for (size_t r = 0; r < meta.ids.size(); ++r) {
      g->ids_.push_back(std::move(meta.ids[r]));
      g->payload_.push_back(std::move(meta.payload[r]));
      g->classes_.push_back(meta.has_classes ? std::move(meta.classes[r]) : std::string());
      g->uncertainty_.push_back(meta.uncertainty[r]);
    }
    g->shards_.push_back(std::move(sh));
  }
  std::sort(g->by_label_.begin(), g->by_label_.end());
  g->memory_ = memory;
  g->pool_ = std::make_unique<ThreadPool>(g->threads_);
  return g;
}

uint32_t Gallery::row_of(int64_t label) const {
  auto it = std::lower_bound(by_label_.begin(), by_label_.end(), std::make_pair(label, uint32_t{0}));
  return it->second;  // every label hnswlib returns is in a sidecar (proven at open)
}

double Gallery::quantile_limit(const std::string& name) const {
  std::string text = trim(name);
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (!text.empty() && text[0] == 'q') text = text.substr(1);
  char* end = nullptr;
  double wanted = text.empty() ? NAN : std::strtod(text.c_str(), &end);
  bool parsed = !text.empty() && end && *end == '\0';
  std::vector<std::pair<double, std::string>> keys;
  for (const auto& q : manifest_.quantiles) {
    if (parsed && std::strtod(q.first.c_str(), nullptr) == wanted) return q.second;
    keys.emplace_back(std::strtod(q.first.c_str(), nullptr), q.first);
  }
  std::sort(keys.begin(), keys.end());
  std::string names;
  for (const auto& k : keys) names += (names.empty() ? "q" : ", q") + k.second;
  fail(CMCE_ERR_ARGUMENT, "max_uncertainty " + repr(name) +
                              ": the manifest has no such uncertainty quantile; it has " +
                              (names.empty() ? "none" : names));
}

std::vector<std::vector<Hit>> Gallery::search(const float* vectors, size_t n, size_t k, double limit) const {
  const size_t dim = static_cast<size_t>(manifest_.dim);
  for (size_t q = 0; q < n; ++q) {
    double norm = 0.0;
    for (size_t d = 0; d < dim; ++d) {
      const float x = vectors[q * dim + d];
      if (!std::isfinite(x)) fail(CMCE_ERR_ARGUMENT, "query vectors contain NaN/inf (row " + std::to_string(q) + ")");
      norm += static_cast<double>(x) * x;
    }
    if (std::fabs(std::sqrt(norm) - 1.0) > kNormTolerance) {
      fail(CMCE_ERR_ARGUMENT, "query vectors must be L2-normalised (metric cosine, within 0.001); row " +
                                  std::to_string(q) + " has norm " + std::to_string(std::sqrt(norm)));
    }
  }
  const size_t total = static_cast<size_t>(live_);
  const size_t want = std::min(k, total);
  std::vector<std::vector<Hit>> out(n);
  const bool reject = !std::isnan(limit);
  std::vector<size_t> todo(n);
  for (size_t q = 0; q < n; ++q) todo[q] = q;
  size_t fetch = want;
  const size_t S = shards_.size();
  // rounds as query_sdk.shards.Gallery.search_labels: fetch more while rejection leaves too few
  while (!todo.empty() && want) {
    std::vector<std::vector<Hit>> found(todo.size() * S);
    std::vector<std::string> errors(todo.size() * S);
    pool_->parallel_for(todo.size() * S, [&](size_t task) {
      const size_t q = todo[task / S], s = task % S;
      const Shard& sh = *shards_[s];
      const size_t kk = std::min(fetch, static_cast<size_t>(sh.live));
      if (kk == 0) return;
      try {
        auto result = sh.index->searchKnn(vectors + q * dim, kk);
        std::vector<Hit>& hits = found[task];
        hits.resize(result.size());
        for (size_t i = result.size(); i-- > 0;) {  // worst first out of the queue
          hits[i] = {static_cast<int64_t>(result.top().second), 1.0f - result.top().first, 0};
          result.pop();
        }
      } catch (const std::exception& e) {
        errors[task] = e.what();
      }
    });
    for (const std::string& e : errors) {
      if (!e.empty()) fail(CMCE_ERR_INTERNAL, "hnswlib search failed: " + e);
    }
    std::vector<size_t> next;
    for (size_t t = 0; t < todo.size(); ++t) {
      std::vector<Hit> merged;
      for (size_t s = 0; s < S; ++s) merged.insert(merged.end(), found[t * S + s].begin(), found[t * S + s].end());
      std::stable_sort(merged.begin(), merged.end(), [](const Hit& a, const Hit& b) { return a.score > b.score; });
      if (merged.size() > fetch) merged.resize(fetch);
      std::vector<Hit> kept;
      for (Hit h : merged) {
        h.row = row_of(h.label);
        if (!reject || uncertainty_[h.row] <= static_cast<float>(limit)) kept.push_back(h);
      }
      if (kept.size() >= want || fetch >= total) {
        if (kept.size() > want) kept.resize(want);
        out[todo[t]] = std::move(kept);
      } else {
        next.push_back(todo[t]);
      }
    }
    todo = std::move(next);
    fetch = std::min(total, fetch * 4);
  }
  return out;
}

}  // namespace cmce
