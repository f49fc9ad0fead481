#include "bundle.h"

#include <sys/stat.h>

#include <set>
#include <tuple>

#include "common.h"
#include "fileio.h"
#include "json_schema.h"

namespace cmce {

using nlohmann::json;

namespace {
const char* const kQuantizations[] = {"fp32", "fp16", "int8", "pal6", "pal4"};

std::vector<int64_t> shape(const json& j) {
  std::vector<int64_t> out;
  for (const json& x : j) out.push_back(json_integer(x));
  return out;
}

}  // namespace

Bundle parse_bundle_manifest(const uint8_t* data, size_t n, const std::string& where) {
  json d = parse_json(data, n, where, CMCE_ERR_FORMAT);
  validate_schema(published_schema("bundle-manifest.schema.json"), d, where, CMCE_ERR_FORMAT);
  if (!real_date(d["created"].get<std::string>())) {
    format_error(where + ": key 'created' must be an ISO 8601 UTC time like 2024-05-01T12:00:00Z, got " + d["created"].dump());
  }
  Bundle b;
  b.space_id = d["space_id"].get<std::string>();
  b.embedding_dim = json_integer(d["embedding_dim"]);
  const json& s = d["input_spec"];
  BundleInputSpec& spec = b.input_spec;
  spec.height = static_cast<int>(json_integer(s["height"]));
  spec.width = static_cast<int>(json_integer(s["width"]));
  spec.channels = static_cast<int>(json_integer(s["channels"]));
  for (const char* key : {"mean", "std"}) {
    std::vector<float>& values = key[0] == 'm' ? spec.mean : spec.std;
    if (s.contains(key)) {
      for (const json& v : s[key]) values.push_back(v.get<float>());
    } else {
      values = {0.5f};
    }
    if (values.size() == 1) values.assign(static_cast<size_t>(spec.channels), values[0]);
    if (values.size() != static_cast<size_t>(spec.channels)) {
      format_error(where + ": key 'input_spec' is invalid: " + key + " needs 1 or " +
                   std::to_string(spec.channels) + " values, got " + std::to_string(values.size()));
    }
  }
  std::set<std::string> files;
  std::set<std::tuple<std::string, std::string, std::string>> keys;
  const json& artifacts = d["artifacts"];
  for (size_t i = 0; i < artifacts.size(); ++i) {
    const json& a = artifacts[i];
    const std::string w = where + ": artifacts[" + std::to_string(i) + "]";
    const json& v = a["validation"];
    if (!v["cosine_min"].is_null() && v["cosine_min"].get<double>() > v["cosine_mean"].get<double>() + 1e-9) {
      format_error(w + ": validation: cosine_min exceeds cosine_mean");
    }
    BundleArtifact art{a["target"].get<std::string>(), a["quantization"].get<std::string>(),
                       a["file"].get<std::string>(),   a["sha256"].get<std::string>(),
                       a["role"].get<std::string>(),   static_cast<uint64_t>(json_integer(a["bytes"]))};
    if (!files.insert(art.file).second) format_error(w + ": file " + repr(art.file) + " is listed more than once");
    if (!keys.insert({art.target, art.quantization, art.role}).second) {
      format_error(w + ": a second " + art.target + "/" + art.quantization + " artifact for " + repr(art.role));
    }
    const std::vector<int64_t> in = shape(a["input_shape"]), out = shape(a["output_shape"]);
    if (out.size() != 2 || out.back() != b.embedding_dim) {
      format_error(w + ": output_shape must be [N, " + std::to_string(b.embedding_dim) + "]");
    }
    if (art.role == "query" &&
        std::vector<int64_t>(in.begin() + 1, in.end()) != std::vector<int64_t>{spec.height, spec.width, spec.channels}) {
      format_error(w + ": input_shape does not match input_spec [N, " + std::to_string(spec.height) + ", " +
                   std::to_string(spec.width) + ", " + std::to_string(spec.channels) + "]");
    }
    if (in[0] != out[0]) format_error(w + ": input and output batch dimensions differ");
    b.artifacts.push_back(std::move(art));
  }
  return b;
}

Bundle read_bundle(const std::string& folder) {
  const std::string path = join_path(folder, "manifest.json");
  if (!exists(path)) format_error("manifest.json: missing in " + folder + " (is it a query bundle?)");
  std::vector<uint8_t> data = read_regular_file(path, kMaxJsonBytes, "bundle manifest", CMCE_ERR_FORMAT);
  Bundle b = parse_bundle_manifest(data.data(), data.size(), path);
  b.folder = folder;
  return b;
}

const BundleArtifact& pick_artifact(const Bundle& bundle, const std::string& target, const std::string& quantization) {
  for (const char* q : kQuantizations) {
    if (!quantization.empty() && quantization != q) continue;
    for (const BundleArtifact& a : bundle.artifacts) {
      if (a.target == target && a.quantization == q && a.role == "query") return a;
    }
  }
  bool known = quantization.empty();
  for (const char* q : kQuantizations) known = known || quantization == q;
  if (!known) fail(CMCE_ERR_ARGUMENT, "quantization " + repr(quantization) + ": not one of fp32, fp16, int8, pal6, pal4");
  std::string have;
  for (const BundleArtifact& a : bundle.artifacts) have += (have.empty() ? "" : ", ") + a.target + "/" + a.quantization + "/" + a.role;
  format_error("manifest.json: no " + target + "/" + (quantization.empty() ? "fp32" : quantization) +
               " artifact for 'query'; the bundle has " + have);
}

std::string verify_artifact(const Bundle& bundle, const BundleArtifact& a) {
  const std::string path = safe_join(bundle.folder, a.file, false, CMCE_ERR_FORMAT, "bundle folder");
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) format_error(a.file + ": listed in the manifest but missing from " + bundle.folder);
  if (S_ISLNK(st.st_mode)) format_error(a.file + ": symlinks are refused in a bundle");
  if (!S_ISREG(st.st_mode)) format_error(a.file + ": not a regular file");
  if (static_cast<uint64_t>(st.st_size) != a.bytes) {
    format_error(a.file + ": " + std::to_string(st.st_size) + " bytes, manifest says " + std::to_string(a.bytes));
  }
  const std::string digest = sha256_file(path, CMCE_ERR_FORMAT);
  if (digest != a.sha256) format_error(a.file + ": sha256 " + digest + ", manifest says " + a.sha256);
  return path;
}

}  // namespace cmce
