#include "sidecar.h"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <unordered_set>

#include "common.h"
#include "fileio.h"

namespace cmce {
namespace {

constexpr size_t kMaxIdChars = 1024;
constexpr size_t kMaxPayloadChars = 65536;
constexpr size_t kMaxNpyHeader = 10000;  // numpy's max_header_size
const char* const kRequired[] = {"ids", "labels", "uncertainty", "payload", "deleted"};
const char* const kOptional[] = {"classes"};

template <typename T>
T le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// ------------------------------------------------------------------ zip directory (stored only)

struct Member {
  std::string name;
  uint16_t flags = 0, method = 0;
  uint32_t crc = 0;
  uint64_t compressed = 0, size = 0, offset = 0;
};

std::vector<Member> zip_directory(const uint8_t* d, size_t n, const std::string& name) {
  const std::string bad = name + ": not a readable .npz archive: ";
  // the end record: at the very end (no comment), else the last one in the final 64 KiB
  size_t eocd = std::string::npos;
  if (n >= 22 && std::memcmp(d + n - 22, "PK\x05\x06", 4) == 0 && d[n - 2] == 0 && d[n - 1] == 0) {
    eocd = n - 22;
  } else {
    size_t lo = n > 65535 + 22 ? n - 65535 - 22 : 0;
    for (size_t i = n >= 22 ? n - 22 + 1 : 0; i-- > lo;) {
      if (n - i >= 22 && std::memcmp(d + i, "PK\x05\x06", 4) == 0) {
        eocd = i;
        break;
      }
    }
  }
  if (eocd == std::string::npos) format_error(bad + "File is not a zip file");
  if (eocd >= 20 && std::memcmp(d + eocd - 20, "PK\x06\x07", 4) == 0) {
    format_error(bad + "ZIP64 archives are not supported by the native SDK");
  }
  const uint64_t cd_size = le<uint32_t>(d + eocd + 12), cd_offset = le<uint32_t>(d + eocd + 16);
  if (cd_size + cd_offset > eocd) format_error(bad + "Bad offset for central directory");
  const uint64_t concat = eocd - cd_size - cd_offset;  // bytes before the archive
  std::vector<Member> members;
  uint64_t p = cd_offset + concat, end = p + cd_size;
  while (p < end) {
    if (end - p < 46 || std::memcmp(d + p, "PK\x01\x02", 4) != 0) {
      format_error(bad + "Bad magic number for central directory");
    }
    Member m;
    m.flags = le<uint16_t>(d + p + 8);
    m.method = le<uint16_t>(d + p + 10);
    m.crc = le<uint32_t>(d + p + 16);
    m.compressed = le<uint32_t>(d + p + 20);
    m.size = le<uint32_t>(d + p + 24);
    const uint64_t name_len = le<uint16_t>(d + p + 28), extra_len = le<uint16_t>(d + p + 30),
                   comment_len = le<uint16_t>(d + p + 32);
    m.offset = le<uint32_t>(d + p + 42);
    if (p + 46 + name_len + extra_len + comment_len > end) format_error(bad + "truncated central directory");
    m.name.assign(reinterpret_cast<const char*>(d + p + 46), name_len);
    // zip64 extra field: the 0xFFFFFFFF fields, in order
    const uint8_t* x = d + p + 46 + name_len;
    for (uint64_t q = 0; q + 4 <= extra_len;) {
      const uint16_t tag = le<uint16_t>(x + q), len = le<uint16_t>(x + q + 2);
      if (q + 4 + len > extra_len) format_error(bad + "Corrupt extra field");
      if (tag == 1) {
        uint64_t r = q + 4;
        for (uint64_t* field : {&m.size, &m.compressed, &m.offset}) {
          if (*field == 0xFFFFFFFFu) {
            if (r + 8 > q + 4 + len) format_error(bad + "Corrupt extra field 0001");
            *field = le<uint64_t>(x + r);
            r += 8;
          }
        }
      }
      q += 4 + len;
    }
    m.offset += concat;
    members.push_back(m);
    p += 46 + name_len + extra_len + comment_len;
  }
  return members;
}

// ------------------------------------------------------------------ the .npy header (a literal)

struct Literal {
  enum Kind { kNone, kBool, kInt, kFloat, kStr, kTuple, kList, kDict } kind = kNone;
  bool b = false;
  long long i = 0;
  bool big = false;  // an int beyond 64 bits
  std::string s;
  std::vector<Literal> items;           // tuple, list, dict values
  std::vector<std::string> keys;        // dict keys (strings only)
};

class LiteralParser {
 public:
  LiteralParser(const std::string& text) : t_(text) {}
  bool parse(Literal* out) {
    if (!value(out, 0)) return false;
    space();
    return pos_ == t_.size();
  }

 private:
  const std::string& t_;
  size_t pos_ = 0;
  void space() {
    while (pos_ < t_.size() && std::strchr(" \t\n\r\f\v", t_[pos_]) && t_[pos_]) ++pos_;
  }
  bool value(Literal* out, int depth) {
    if (depth > 32) return false;
    space();
    if (pos_ >= t_.size()) return false;
    char c = t_[pos_];
    if (c == '{' || c == '(' || c == '[') return container(out, depth);
    if (c == '\'' || c == '"') return string(out);
    if (c == '-' || c == '+' || (c >= '0' && c <= '9')) return number(out);
    for (auto word : {"True", "False", "None"}) {
      size_t n = std::strlen(word);
      if (t_.compare(pos_, n, word) == 0) {
        pos_ += n;
        out->kind = word[0] == 'N' ? Literal::kNone : Literal::kBool;
        out->b = word[0] == 'T';
        return true;
      }
    }
    return false;
  }
  bool string(Literal* out) {
    char quote = t_[pos_++];
    out->kind = Literal::kStr;
    while (pos_ < t_.size() && t_[pos_] != quote) {
      char c = t_[pos_++];
      if (c == '\n') return false;
      if (c == '\\') {
        if (pos_ >= t_.size()) return false;
        char e = t_[pos_++];
        if (e == 'n') c = '\n';
        else if (e == 't') c = '\t';
        else if (e == '\\' || e == '\'' || e == '"') c = e;
        else return false;  // other escapes do not occur in numpy headers
      }
      out->s += c;
    }
    if (pos_ >= t_.size()) return false;
    ++pos_;
    return true;
  }
  bool number(Literal* out) {
    size_t start = pos_;
    if (t_[pos_] == '-' || t_[pos_] == '+') ++pos_;
    size_t digits = pos_;
    while (pos_ < t_.size() && ((t_[pos_] >= '0' && t_[pos_] <= '9') || t_[pos_] == '_')) ++pos_;
    if (pos_ == digits) return false;
    if (pos_ < t_.size() && (t_[pos_] == '.' || t_[pos_] == 'e' || t_[pos_] == 'E')) {
      while (pos_ < t_.size() && std::strchr("0123456789.eE+-", t_[pos_]) && t_[pos_]) ++pos_;
      out->kind = Literal::kFloat;
      return true;
    }
    std::string text;
    for (size_t k = start; k < pos_; ++k) {
      if (t_[k] != '_') text += t_[k];
    }
    out->kind = Literal::kInt;
    errno = 0;
    out->i = std::strtoll(text.c_str(), nullptr, 10);
    out->big = errno == ERANGE;
    return true;
  }
  bool container(Literal* out, int depth) {
    char open = t_[pos_++];
    char close = open == '{' ? '}' : open == '(' ? ')' : ']';
    out->kind = open == '{' ? Literal::kDict : open == '(' ? Literal::kTuple : Literal::kList;
    bool comma = true;  // a tuple of one needs its comma: (3,)
    size_t n = 0;
    for (;;) {
      space();
      if (pos_ < t_.size() && t_[pos_] == close) {
        ++pos_;
        break;
      }
      if (!comma) return false;
      if (out->kind == Literal::kDict) {
        Literal key;
        if (!value(&key, depth + 1) || key.kind != Literal::kStr) return false;
        space();
        if (pos_ >= t_.size() || t_[pos_++] != ':') return false;
        out->keys.push_back(key.s);
      }
      Literal item;
      if (!value(&item, depth + 1)) return false;
      out->items.push_back(std::move(item));
      ++n;
      space();
      comma = pos_ < t_.size() && t_[pos_] == ',';
      if (comma) ++pos_;
      else if (out->kind == Literal::kTuple && n == 1) {
        space();
        // (x) without a comma is just x, not a tuple
        if (pos_ < t_.size() && t_[pos_] == ')') {
          ++pos_;
          Literal inner = std::move(out->items[0]);
          *out = std::move(inner);
          return true;
        }
      }
    }
    return true;
  }
};

struct Dtype {
  char kind = 0;  // 'b', 'i', 'u', 'f', 'U'
  size_t itemsize = 0;
  bool big_endian = false;
};

bool parse_descr(const std::string& d, Dtype* out) {
  if (d == "?") {
    *out = {'b', 1, false};
    return true;
  }
  size_t p = 0;
  if (p < d.size() && std::strchr("<>|=", d[p]) && d[p]) out->big_endian = d[p++] == '>';
  if (p >= d.size() || !std::strchr("biufU", d[p]) || !d[p]) return false;
  out->kind = d[p++];
  if (p >= d.size() || d.size() - p > 7) return false;
  size_t n = 0;
  for (; p < d.size(); ++p) {
    if (d[p] < '0' || d[p] > '9') return false;
    n = n * 10 + static_cast<size_t>(d[p] - '0');
  }
  switch (out->kind) {
    case 'b': if (n != 1) return false; break;
    case 'i': case 'u': if (n != 1 && n != 2 && n != 4 && n != 8) return false; break;
    case 'f': if (n != 2 && n != 4 && n != 8 && n != 16) return false; break;
    case 'U': n *= 4; break;
  }
  out->itemsize = n;
  return true;
}

struct Array {
  Dtype dtype;
  uint64_t length = 0;
  const uint8_t* data = nullptr;
};

struct Rule {
  const char* kinds;
  size_t max_item;
};

Rule rule_for(const std::string& key) {
  if (key == "ids" || key == "classes") return {"U", 4 * kMaxIdChars};
  if (key == "labels") return {"iu", 8};
  if (key == "uncertainty") return {"f", 8};
  if (key == "payload") return {"U", 4 * kMaxPayloadChars};
  return {"b", 1};  // deleted
}

Array read_member(const uint8_t* d, size_t n, const Member& m, const std::string& key,
                  const std::string& name, int64_t count) {
  const std::string where = name + ": array '" + key + "'";
  const std::string bad = name + ": not a readable .npz archive: ";
  if (m.flags & 0x1) format_error(where + " is encrypted; sidecars are plain numpy.savez archives");
  if (m.method != 0) {
    format_error(where + " is compressed (zip method " + std::to_string(m.method) +
                 "); sidecars are stored uncompressed (numpy.savez), so that reading one takes "
                 "no more memory than its size");
  }
  if (m.compressed != m.size) {
    format_error(where + ": stored uncompressed, yet the zip directory gives " +
                 std::to_string(m.compressed) + " bytes on disk and " + std::to_string(m.size) +
                 " unpacked");
  }
  // the local header: its name must be the directory's; the data follows its extra field
  if (m.offset > n || n - m.offset < 30 || std::memcmp(d + m.offset, "PK\x03\x04", 4) != 0) {
    format_error(bad + "Bad magic number for file header");
  }
  const uint64_t name_len = le<uint16_t>(d + m.offset + 26), extra_len = le<uint16_t>(d + m.offset + 28);
  if (n - m.offset - 30 < name_len ||
      std::memcmp(d + m.offset + 30, m.name.data(), std::min<uint64_t>(name_len, m.name.size())) != 0 ||
      name_len != m.name.size()) {
    format_error(bad + "File name in directory and header differ");
  }
  const uint64_t start = m.offset + 30 + name_len + extra_len;
  if (start > n || n - start < m.size) format_error(bad + "truncated member " + repr(m.name));
  const uint8_t* p = d + start;
  const uint64_t size = m.size;
  if (size < 8 || std::memcmp(p, "\x93NUMPY", 6) != 0) {
    format_error(bad + "the magic string is not correct");
  }
  const int major = p[6], minor = p[7];
  if (!((major == 1 || major == 2) && minor == 0)) {
    format_error(where + ": .npy format version (" + std::to_string(major) + ", " +
                 std::to_string(minor) + ") is not supported");
  }
  uint64_t header_len, at;
  if (major == 1) {
    if (size < 10) format_error(bad + "EOF: reading array header length");
    header_len = le<uint16_t>(p + 8);
    at = 10;
  } else {
    if (size < 12) format_error(bad + "EOF: reading array header length");
    header_len = le<uint32_t>(p + 8);
    at = 12;
  }
  if (size - at < header_len) format_error(bad + "EOF: reading array header");
  if (header_len > kMaxNpyHeader) format_error(bad + "Header info length is large and may not be safe to load");
  const std::string header(reinterpret_cast<const char*>(p + at), header_len);  // latin-1
  at += header_len;
  Literal dict;
  if (!LiteralParser(header).parse(&dict)) format_error(bad + "Cannot parse header: " + repr(header));
  if (dict.kind != Literal::kDict) format_error(bad + "Header is not a dictionary");
  std::map<std::string, const Literal*> fields;
  for (size_t i = 0; i < dict.keys.size(); ++i) fields[dict.keys[i]] = &dict.items[i];
  if (fields.size() != 3 || !fields.count("descr") || !fields.count("fortran_order") || !fields.count("shape")) {
    format_error(bad + "Header does not contain the correct keys");
  }
  const Literal& shape = *fields["shape"];
  bool shape_ok = shape.kind == Literal::kTuple;
  for (const Literal& x : shape.items) shape_ok = shape_ok && (x.kind == Literal::kInt || x.kind == Literal::kBool);
  if (!shape_ok) format_error(bad + "shape is not valid");
  if (fields["fortran_order"]->kind != Literal::kBool) format_error(bad + "fortran_order is not a valid bool");
  const Literal& descr = *fields["descr"];
  Array a;
  const Rule r = rule_for(key);
  if (descr.kind == Literal::kStr && descr.s.find('O') != std::string::npos && descr.s.size() <= 2) {
    format_error(where + " refused: dtype object holds Python objects (reading it would unpickle)");
  }
  if (descr.kind != Literal::kStr || !parse_descr(descr.s, &a.dtype) ||
      !std::strchr(r.kinds, a.dtype.kind) || a.dtype.itemsize > r.max_item) {
    format_error(where + " refused: dtype " + (descr.kind == Literal::kStr ? repr(descr.s) : "(structured)") +
                 " is not of kind '" + r.kinds + "' with items of at most " + std::to_string(r.max_item) + " bytes");
  }
  auto dim0 = [](const Literal& x) { return x.kind == Literal::kBool ? static_cast<long long>(x.b) : x.i; };
  if (shape.items.size() != 1 || shape.items[0].big || dim0(shape.items[0]) < 0 ||
      (count >= 0 && dim0(shape.items[0]) != count)) {
    format_error(where + " refused: shape is not " +
                 (count >= 0 ? "(" + std::to_string(count) + ",) from the manifest's count" : std::string("1-D")));
  }
  a.length = static_cast<uint64_t>(dim0(shape.items[0]));
  const unsigned __int128 nbytes = static_cast<unsigned __int128>(a.length) * a.dtype.itemsize;
  if (static_cast<unsigned __int128>(size) != at + nbytes) {
    format_error(where + ": the zip directory gives " + std::to_string(size) +
                 " bytes, its header implies another size (" + std::to_string(a.length) + " items)");
  }
  const uint32_t crc = static_cast<uint32_t>(crc32_z(0L, p, size));
  if (crc != m.crc) format_error(bad + "Bad CRC-32 for file " + repr(m.name));
  a.data = p + at;
  return a;
}

// --------------------------------------------------------------------------- array values

float half_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(frac), -24);
  else if (exp == 31) v = frac ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(frac | 0x400), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

uint64_t raw(const Array& a, uint64_t i, size_t bytes_at = 0, size_t width = 0) {
  const size_t w = width ? width : a.dtype.itemsize;
  const uint8_t* p = a.data + i * a.dtype.itemsize + bytes_at;
  uint64_t v = 0;
  for (size_t k = 0; k < w; ++k) {
    const size_t byte = a.dtype.big_endian ? w - 1 - k : k;
    v |= static_cast<uint64_t>(p[byte]) << (8 * k);
  }
  return v;
}

// numpy str items: UCS-4 code points, trailing NULs stripped; as UTF-8
std::string text(const Array& a, uint64_t i, const std::string& where) {
  const size_t chars = a.dtype.itemsize / 4;
  std::vector<uint32_t> cps;
  for (size_t c = 0; c < chars; ++c) cps.push_back(static_cast<uint32_t>(raw(a, i, 4 * c, 4)));
  while (!cps.empty() && cps.back() == 0) cps.pop_back();
  std::string out;
  for (uint32_t cp : cps) {
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      format_error(where + "[" + std::to_string(i) + "] holds a code point that is not a Unicode character");
    }
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return out;
}

}  // namespace

ShardMeta parse_sidecar(const uint8_t* d, size_t n, const std::string& name, int64_t count) {
  std::vector<Member> members = zip_directory(d, n, name);
  std::vector<std::string> keys, missing;
  for (const Member& m : members) {
    keys.push_back(m.name.size() >= 4 && m.name.compare(m.name.size() - 4, 4, ".npy") == 0
                       ? m.name.substr(0, m.name.size() - 4)
                       : m.name);
  }
  for (const char* k : kRequired) {
    if (std::find(keys.begin(), keys.end(), k) == keys.end()) missing.push_back(k);
  }
  if (!missing.empty()) {
    std::string list;
    for (const std::string& k : missing) list += (list.empty() ? "'" : ", '") + k + "'";
    format_error(name + ": missing array(s) [" + list + "]");
  }
  std::unordered_set<std::string> seen;
  for (const Member& m : members) {
    bool known = false;
    for (const char* k : kRequired) known = known || m.name == std::string(k) + ".npy";
    for (const char* k : kOptional) known = known || m.name == std::string(k) + ".npy";
    if (!known || !seen.insert(m.name).second) {
      format_error(name + ": unknown or repeated member " + repr(m.name));
    }
  }
  std::map<std::string, Array> arrays;
  for (const char* k : {"ids", "labels", "uncertainty", "payload", "deleted", "classes"}) {
    for (size_t i = 0; i < members.size(); ++i) {
      if (keys[i] == k) {
        arrays[k] = read_member(d, n, members[i], k, name, count);
        if (count < 0) count = static_cast<int64_t>(arrays[k].length);
      }
    }
  }
  ShardMeta meta;
  const uint64_t len = static_cast<uint64_t>(count);
  const Array& labels = arrays["labels"];
  std::unordered_set<int64_t> unique_labels;
  bool labels_ok = true, labels_unique = true;
  for (uint64_t i = 0; i < len; ++i) {
    uint64_t v = raw(labels, i);
    int64_t label;
    if (labels.dtype.kind == 'i') {
      const int shift = 64 - 8 * static_cast<int>(labels.dtype.itemsize);
      label = static_cast<int64_t>(v << shift) >> shift;  // sign-extend
      labels_ok = labels_ok && label >= 0;
    } else {
      labels_ok = labels_ok && v <= static_cast<uint64_t>(INT64_MAX);
      label = static_cast<int64_t>(v);
    }
    labels_unique = labels_unique && unique_labels.insert(label).second;
    meta.labels.push_back(label);
  }
  if (!labels_ok) format_error(name + ": labels must be non-negative int64");
  if (!labels_unique) format_error(name + ": labels are not unique");
  std::unordered_set<std::string> unique_ids;
  for (uint64_t i = 0; i < len; ++i) {
    meta.ids.push_back(text(arrays["ids"], i, name + ": ids"));
    if (!unique_ids.insert(meta.ids.back()).second) format_error(name + ": ids are not unique");
    meta.string_bytes += meta.ids.back().size() + 1;
  }
  const Array& unc = arrays["uncertainty"];
  for (uint64_t i = 0; i < len; ++i) {
    float v;
    uint64_t bits = raw(unc, i);
    if (unc.dtype.itemsize == 2) {
      v = half_to_float(static_cast<uint16_t>(bits));
    } else if (unc.dtype.itemsize == 4) {
      uint32_t b32 = static_cast<uint32_t>(bits);
      std::memcpy(&v, &b32, 4);
    } else {
      double x;
      std::memcpy(&x, &bits, 8);
      v = static_cast<float>(x);
    }
    if (!std::isfinite(v)) format_error(name + ": uncertainty contains NaN/inf");
    meta.uncertainty.push_back(v);
  }
  for (uint64_t i = 0; i < len; ++i) {
    const std::string where = name + ": payload[" + std::to_string(i) + "]";
    std::string s = text(arrays["payload"], i, name + ": payload");
    if (!s.empty()) {
      nlohmann::json p = parse_json(reinterpret_cast<const uint8_t*>(s.data()), s.size(), where,
                                    CMCE_ERR_FORMAT);
      if (!p.is_object()) format_error(where + " must be a JSON object");
    }
    meta.string_bytes += s.size() + 1;
    meta.payload.push_back(std::move(s));
  }
  for (uint64_t i = 0; i < len; ++i) meta.deleted.push_back(raw(arrays["deleted"], i) != 0);
  if (arrays.count("classes")) {
    meta.has_classes = true;
    for (uint64_t i = 0; i < len; ++i) {
      meta.classes.push_back(text(arrays["classes"], i, name + ": classes"));
      meta.string_bytes += meta.classes.back().size() + 1;
    }
  }
  return meta;
}

}  // namespace cmce
