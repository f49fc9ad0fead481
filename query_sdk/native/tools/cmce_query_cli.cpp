// cmce-query-native: the native twin of `cmce-query` (query_sdk/cli.py), over the C API only.
// Same flags, same text and JSON output (Python's json.dumps layout, ensure_ascii), same exit
// codes: a refused bundle or gallery is one line "error: ..." and its class's code, an image
// that cannot be used is reported and the others are still answered (exit 1), bad usage exits 2.
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "cmce_query.h"
#include "utf16.h"

namespace {

using Json = nlohmann::ordered_json;

const char* const kProg = "cmce-query-native";
const char* const kQuantizations[] = {"fp32", "fp16", "int8", "pal6", "pal4"};

const char* const kHelp =
    "Usage: cmce-query-native [OPTIONS] IMAGES...\n"
    "\n"
    "  Find the gallery items closest to each IMAGE (the native SDK, libcmce_query).\n"
    "\n"
    "  Opening checks the bundle's and the gallery's checksums (and signature, with\n"
    "  --public-key), that both are in the same embedding space and that the model takes\n"
    "  what the bundle says; a refusal is one line, exit code 2 (gallery or bundle), 3\n"
    "  (signature) or 7 (model runtime). An image that cannot be read (not a regular file,\n"
    "  more pixels than the model's budget, undecodable) is reported (exit code 1); the\n"
    "  others are still answered.\n"
    "\n"
    "  Examples:\n"
    "    cmce-query-native --bundle bundle/ --gallery gallery/ shoe.png bag.jpg\n"
    "    cmce-query-native --bundle bundle/ --gallery gallery/ --k 5 --max-uncertainty q0.9 --json *.png\n"
    "\n"
    "Options:\n"
    "  --bundle PATH              Query bundle folder (cmce-export output).  [required]\n"
    "  --gallery PATH             Gallery folder (cmce-build-gallery output).  [required]\n"
    "  --k INTEGER RANGE          Hits per image (more than the gallery holds returns all\n"
    "                             of its items).  [default: 10; x>=1]\n"
    "  --max-uncertainty TEXT     Leave out gallery items more uncertain than this: a\n"
    "                             number, or a quantile of the gallery's uncertainties such\n"
    "                             as q0.9.\n"
    "  --backend [executorch]     Model runtime (the native SDK runs the bundle's .pte).\n"
    "                             [default: executorch]\n"
    "  --quantization [fp32|fp16|int8|pal6|pal4]\n"
    "                             Which exported model to run (default: the most precise\n"
    "                             in the bundle).\n"
    "  --threads INTEGER RANGE    Threads for the model and the search (at most the CPU\n"
    "                             count).  [default: 1; x>=1]\n"
    "  --public-key TEXT          Refuse galleries not signed with this Ed25519 key (hex, or\n"
    "                             a .pub file from `cmce-build-gallery keygen`).\n"
    "  --shards TEXT              Load only these shards (positions, e.g. 0,2,3).\n"
    "  --json                     Print results as JSON.\n"
    "  -h, --help                 Show this message and exit.\n";

/** Bad usage, as click reports it: exit code 2. */
[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "Usage: %s [OPTIONS] IMAGES...\nTry '%s -h' for help.\n\nError: %s\n", kProg, kProg,
               message.c_str());
  std::exit(2);
}

[[noreturn]] void refused(const cmce_error_t& e) {
  std::fprintf(stderr, "error: %s\n", e.message);
  std::exit(e.code);
}

struct Args {
  std::string bundle, gallery, public_key, quantization, quantile;
  std::vector<std::string> images;
  std::vector<int32_t> shards;
  long k = 10, threads = 1;
  bool has_limit = false, as_json = false;
  double limit = 0;
};

long positive(const std::string& name, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  const long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end || errno) usage_error("Invalid value for '" + name + "': '" + v + "' is not a valid integer.");
  if (n < 1) usage_error("Invalid value for '" + name + "': " + v + " is not in the range x>=1.");
  return n;
}

Args parse(int argc, char** argv) {
  Args a;
  bool options_done = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    if (options_done || arg.size() < 2 || arg[0] != '-') {
      a.images.push_back(arg);
      continue;
    }
    if (arg == "--") {
      options_done = true;
      continue;
    }
    if (arg == "-h" || arg == "--help") {
      std::fputs(kHelp, stdout);
      std::exit(0);
    }
    if (arg == "--json") {
      a.as_json = true;
      continue;
    }
    const size_t eq = arg.find('=');
    const bool inline_value = eq != std::string::npos && arg.rfind("--", 0) == 0;
    const std::string name = inline_value ? arg.substr(0, eq) : arg;
    static const std::set<std::string> kWithValue = {"--bundle", "--gallery", "--k", "--max-uncertainty",
                                                     "--backend", "--quantization", "--threads",
                                                     "--public-key", "--shards"};
    if (!kWithValue.count(name)) usage_error("No such option: " + name);
    if (inline_value) {
      value = arg.substr(eq + 1);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      usage_error("Option '" + name + "' requires an argument.");
    }
    if (name == "--bundle") {
      a.bundle = value;
    } else if (name == "--gallery") {
      a.gallery = value;
    } else if (name == "--k") {
      a.k = positive(name, value);
    } else if (name == "--threads") {
      a.threads = positive(name, value);
    } else if (name == "--public-key") {
      a.public_key = value;
    } else if (name == "--backend") {
      if (value != "executorch")
        usage_error("Invalid value for '--backend': '" + value +
                    "' is not 'executorch' (the native SDK runs the bundle's .pte through ExecuTorch).");
    } else if (name == "--quantization") {
      bool known = false;
      for (const char* q : kQuantizations) known = known || value == q;
      if (!known) usage_error("Invalid value for '--quantization': '" + value + "' is not one of 'fp32', 'fp16', 'int8', 'pal6', 'pal4'.");
      a.quantization = value;
    } else if (name == "--max-uncertainty") {
      a.quantile.clear(), a.has_limit = false;
      if (!value.empty() && (value[0] == 'q' || value[0] == 'Q')) {
        a.quantile = value;
      } else {
        char* end = nullptr;
        a.limit = std::strtod(value.c_str(), &end);
        if (value.empty() || *end)
          usage_error("Invalid value for '--max-uncertainty': expected a number or a quantile name such as q0.9, got '" +
                      value + "'");
        a.has_limit = true;
      }
    } else {  // --shards
      a.shards.clear();
      size_t start = 0;
      while (true) {
        const size_t comma = value.find(',', start);
        const std::string part = value.substr(start, comma - start);
        int32_t s = 0;
        const auto [p, ec] = std::from_chars(part.data(), part.data() + part.size(), s);
        if (part.empty() || ec != std::errc() || p != part.data() + part.size())
          usage_error("Invalid value for '--shards': expected shard positions such as 0,2,3, got '" + value + "'");
        a.shards.push_back(s);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
      if (std::set<int32_t>(a.shards.begin(), a.shards.end()).size() != a.shards.size())
        usage_error("Invalid value for '--shards': '" + value + "' names a shard twice");
    }
  }
  if (a.bundle.empty()) usage_error("Missing option '--bundle'.");
  if (a.gallery.empty()) usage_error("Missing option '--gallery'.");
  if (a.images.empty()) usage_error("Missing argument 'IMAGES...'.");
  return a;
}

/** str(pathlib.Path(p)): repeated and trailing slashes and "." parts dropped. */
std::string python_path(const std::string& p) {
  std::string out = p.rfind("//", 0) == 0 && p.rfind("///", 0) != 0 ? "//" : (p.rfind('/', 0) == 0 ? "/" : "");
  const size_t root = out.size();
  size_t start = 0;
  while (start <= p.size()) {
    size_t slash = p.find('/', start);
    if (slash == std::string::npos) slash = p.size();
    const std::string part = p.substr(start, slash - start);
    if (!part.empty() && part != ".") out += (out.size() > root ? "/" : "") + part;
    start = slash + 1;
  }
  return out.empty() ? "." : out;
}

/** repr(float(x)): the shortest digits that read back, laid out as Python does. */
std::string python_float(double x) {
  if (std::isnan(x)) return "NaN";
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);
  std::string s(buf, r.ptr);  // e.g. "-1.2345e-05"
  const size_t e = s.find('e');
  const int exp = std::atoi(s.c_str() + e + 1);
  const bool neg = s[0] == '-';
  std::string digits;
  for (size_t i = neg; i < e; ++i)
    if (s[i] != '.') digits += s[i];
  std::string out = neg ? "-" : "";
  if (exp < -4 || exp >= 16) {
    out += digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    char tail[16];
    std::snprintf(tail, sizeof tail, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    return out + tail;
  }
  if (exp < 0) return out + "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  const size_t point = static_cast<size_t>(exp) + 1;
  if (digits.size() <= point) return out + digits + std::string(point - digits.size(), '0') + ".0";
  return out + digits.substr(0, point) + "." + digits.substr(point);
}

/** json.dumps(s) with ensure_ascii. */
std::string python_string(const std::string& s) {
  std::string out = "\"";
  for (const char16_t c : cmce_tools::utf16(s.c_str())) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c >= 0x20 && c < 0x7F) {
          out += static_cast<char>(c);
        } else {
          char u[8];
          std::snprintf(u, sizeof u, "\\u%04x", static_cast<unsigned>(c));
          out += u;
        }
    }
  }
  return out + "\"";
}

/** json.dumps(value, indent=indent) (indent < 0: no indent, ", " and ": " separators). */
std::string python_json(const Json& v, int indent, int depth = 0) {
  const std::string nl = indent < 0 ? "" : "\n" + std::string(static_cast<size_t>(indent * (depth + 1)), ' ');
  const std::string close = indent < 0 ? "" : "\n" + std::string(static_cast<size_t>(indent * depth), ' ');
  const std::string sep = indent < 0 ? ", " : ",";
  if (v.is_object() || v.is_array()) {
    if (v.empty()) return v.is_object() ? "{}" : "[]";
    std::string out = v.is_object() ? "{" : "[";
    bool first = true;
    for (auto it = v.begin(); it != v.end(); ++it, first = false) {
      out += (first ? "" : sep) + nl;
      if (v.is_object()) out += python_string(it.key()) + ": ";
      out += python_json(it.value(), indent, depth + 1);
    }
    return out + close + (v.is_object() ? "}" : "]");
  }
  if (v.is_string()) return python_string(v.get<std::string>());
  if (v.is_number_float()) return python_float(v.get<double>());
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_null()) return "null";
  return v.dump();  // integers
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  cmce_open_options_t opts{};
  opts.threads = static_cast<int32_t>(a.threads);
  opts.shards = a.shards.empty() ? nullptr : a.shards.data();
  opts.n_shards = a.shards.size();
  opts.public_key = a.public_key.empty() ? nullptr : a.public_key.c_str();
  opts.quantization = a.quantization.empty() ? nullptr : a.quantization.c_str();
  cmce_query_t* q = nullptr;
  cmce_error_t error{};
  if (cmce_open(a.bundle.c_str(), a.gallery.c_str(), &opts, &q, &error) != CMCE_OK) refused(error);
  cmce_info_t info{};
  if (cmce_info(q, &info, &error) != CMCE_OK) refused(error);

  cmce_search_options_t sopts{};
  sopts.k = static_cast<uint32_t>(std::min<long>(a.k, UINT32_MAX));
  sopts.use_max_uncertainty = a.has_limit;
  sopts.max_uncertainty = a.limit;
  sopts.max_uncertainty_quantile = a.quantile.empty() ? nullptr : a.quantile.c_str();
  // more than the live items returns all of them: no buffer larger than that
  std::vector<cmce_hit_t> hits(static_cast<size_t>(std::max<int64_t>(1, std::min<int64_t>(sopts.k, info.count))));
  if (!a.quantile.empty()) {  // a quantile the manifest lacks is bad usage, before any image
    std::vector<float> unit(static_cast<size_t>(info.dim), 0.0f);
    unit[0] = 1.0f;
    size_t n = 0;
    if (cmce_search_vector(q, unit.data(), unit.size(), &sopts, hits.data(), hits.size(), &n, &error) != CMCE_OK) {
      if (error.code != CMCE_ERR_ARGUMENT) refused(error);
      usage_error(std::string("Invalid value for '--max-uncertainty': ") + error.message);
    }
  }

  int failed = 0;
  Json records = Json::array();
  for (const std::string& image : a.images) {
    size_t n = 0;
    const cmce_status s = cmce_search_file(q, image.c_str(), &sopts, hits.data(), hits.size(), &n, &error);
    const std::string shown = python_path(image);
    if (s == CMCE_ERR_DATA) {
      ++failed;
      records.push_back({{"image", shown}, {"error", error.message}});
      if (!a.as_json) std::fprintf(stderr, "error: %s\n", error.message);
      continue;
    }
    if (s != CMCE_OK) refused(error);
    Json list = Json::array();
    for (size_t i = 0; i < n; ++i) {
      const cmce_hit_t& h = hits[i];
      Json payload = h.payload_json[0] ? Json::parse(h.payload_json, nullptr, false) : Json(nullptr);
      if (payload.is_discarded()) {  // the library checked every payload: a bug if not JSON
        std::fprintf(stderr, "error: the payload of %s is not JSON (a bug in libcmce_query)\n", h.id);
        return CMCE_ERR_INTERNAL;
      }
      list.push_back({{"id", h.id},
                      {"score", static_cast<double>(h.score)},
                      {"uncertainty", static_cast<double>(h.uncertainty)},
                      {"payload", payload}});
    }
    if (!a.as_json) {
      std::printf("%s:\n", shown.c_str());
      for (size_t i = 0; i < n; ++i) {
        const Json& payload = list[i]["payload"];
        const bool extra = payload.is_object() && !payload.empty();
        std::printf("  %3zu. %s  score %.4f  uncertainty %.4f%s%s\n", i + 1, hits[i].id, hits[i].score,
                    hits[i].uncertainty, extra ? "  " : "", extra ? python_json(payload, -1).c_str() : "");
      }
      if (n == 0) std::printf("  (no hits)\n");
    }
    records.push_back({{"image", shown}, {"hits", list}});
  }
  if (a.as_json) std::printf("%s\n", python_json(records, 2).c_str());
  cmce_close(q);
  return failed ? 1 : 0;
}
