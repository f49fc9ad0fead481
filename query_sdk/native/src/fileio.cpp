#include "fileio.h"

#include <sodium.h>
#include <sys/stat.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "common.h"

namespace cmce {

std::string repr(const std::string& s, size_t limit) {
  std::string out = "'";
  for (char c : s.substr(0, limit)) {
    if (c == '\'' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + (s.size() > limit ? "'.." : "'");
}

std::string join_path(const std::string& folder, const std::string& name) {
  if (folder.empty()) return name;
  return folder.back() == '/' ? folder + name : folder + "/" + name;
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

bool is_regular_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

uint64_t regular_file_size(const std::string& path, const std::string& what, int code) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) fail(code, path + ": " + what + " missing");
    fail(code, path + ": cannot read the " + what + ": " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) fail(code, path + ": the " + what + " is not a regular file");
  return static_cast<uint64_t>(st.st_size);
}

namespace {
struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

File open_read(const std::string& path, int code) {
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) fail(code, path + ": cannot open: " + std::strerror(errno));
  return f;
}
}  // namespace

std::vector<uint8_t> read_regular_file(const std::string& path, uint64_t max_bytes,
                                       const std::string& what, int code) {
  uint64_t size = regular_file_size(path, what, code);
  if (size > max_bytes) {
    fail(code, path + ": the " + what + " is " + std::to_string(size) + " bytes, more than the " +
                   std::to_string(max_bytes) + " a valid one can have");
  }
  File f = open_read(path, code);
  std::vector<uint8_t> data(size + 1);
  size_t got = std::fread(data.data(), 1, data.size(), f.get());
  if (std::ferror(f.get())) fail(code, path + ": read error: " + std::strerror(errno));
  if (got > max_bytes) {
    fail(code, path + ": the " + what + " grew past " + std::to_string(max_bytes) +
                   " bytes while being read");
  }
  data.resize(got);
  return data;
}

std::vector<uint8_t> read_prefix(const std::string& path, uint64_t n, int code) {
  File f = open_read(path, code);
  std::vector<uint8_t> data(n);
  size_t got = std::fread(data.data(), 1, n, f.get());
  if (std::ferror(f.get())) fail(code, path + ": read error: " + std::strerror(errno));
  data.resize(got);
  return data;
}

std::string sha256_hex(const uint8_t* data, size_t n) {
  unsigned char digest[crypto_hash_sha256_BYTES];
  crypto_hash_sha256(digest, data, n);
  char hex[2 * crypto_hash_sha256_BYTES + 1];
  sodium_bin2hex(hex, sizeof hex, digest, sizeof digest);
  return hex;
}

std::string sha256_file(const std::string& path, int code) {
  File f = open_read(path, code);
  crypto_hash_sha256_state state;
  crypto_hash_sha256_init(&state);
  std::vector<unsigned char> chunk(1 << 20);
  size_t got;
  while ((got = std::fread(chunk.data(), 1, chunk.size(), f.get())) > 0) {
    crypto_hash_sha256_update(&state, chunk.data(), got);
  }
  if (std::ferror(f.get())) fail(code, path + ": read error: " + std::strerror(errno));
  unsigned char digest[crypto_hash_sha256_BYTES];
  crypto_hash_sha256_final(&state, digest);
  char hex[2 * crypto_hash_sha256_BYTES + 1];
  sodium_bin2hex(hex, sizeof hex, digest, sizeof digest);
  return hex;
}

namespace {
// Deepest nesting of arrays/objects outside strings (stops counting past limit + 1).
bool deeper_than(const uint8_t* p, size_t n, int limit) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < n; ++i) {
    uint8_t c = p[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}
}  // namespace

nlohmann::json parse_json(const uint8_t* data, size_t n, const std::string& where, int code) {
  if (deeper_than(data, n, kMaxJsonDepth)) {
    fail(code, where + ": JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  }
  nlohmann::json value = nlohmann::json::parse(data, data + n, nullptr, false);
  if (value.is_discarded()) fail(code, where + ": not valid JSON");
  return value;
}

std::string safe_join(const std::string& folder, const std::string& name, bool subfolder,
                      int code, const std::string& what) {
  if (name.empty()) fail(code, "manifest entry " + repr(name) + ": file name must be a non-empty string");
  std::vector<std::string> parts;
  if (subfolder && name.find('/') != std::string::npos) {
    size_t slash = name.find('/');
    parts = {name.substr(0, slash), name.substr(slash + 1)};
  } else {
    parts = {name};
  }
  bool bad = name[0] == '/';
  for (const std::string& p : parts) {
    if (p.empty() || p == "." || p == ".." || p.find_first_of(std::string("/\\:\0", 4)) != std::string::npos) {
      bad = true;
    }
  }
  if (bad) {
    fail(code, "manifest entry " + repr(name) + ": not a plain file name inside the " + what +
                   " (absolute paths, '..' and path separators" +
                   (subfolder ? " beyond one sub-folder" : "") + " are refused)");
  }
  std::string path = join_path(folder, name);
  char root_buf[PATH_MAX], resolved_buf[PATH_MAX];
  if (!::realpath(folder.c_str(), root_buf)) {
    fail(code, folder + ": cannot resolve the " + what + ": " + std::strerror(errno));
  }
  if (!::realpath(path.c_str(), resolved_buf)) {
    if (errno == ENOENT) return path;  // reported as missing by the caller
    fail(code, "manifest entry " + repr(name) + ": cannot resolve path: " + std::strerror(errno));
  }
  std::string resolved = resolved_buf, root = root_buf;
  // the resolved file's parent (len(parts) levels up) must be the folder itself
  std::string parent = resolved;
  for (size_t i = 0; i < parts.size(); ++i) {
    size_t slash = parent.rfind('/');
    parent = slash == 0 ? "/" : parent.substr(0, slash);
  }
  if (parent != root) {
    fail(code, "manifest entry " + repr(name) + ": resolves to " + resolved + ", outside the " +
                   what + " " + root);
  }
  return path;
}

}  // namespace cmce
