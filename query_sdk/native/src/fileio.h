// Reading untrusted files: regular files only, bounded sizes, sha256, bounded JSON, and paths
// from manifests that cannot escape their folder (query_sdk/fileio.py, gallery_format.safe_join).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace cmce {

constexpr uint64_t kMaxJsonBytes = 64ull << 20;  // fileio.MAX_JSON_BYTES
constexpr int kMaxJsonDepth = 64;                // fileio.MAX_JSON_DEPTH

// Size of a regular file (following symlinks); `code` error naming it otherwise.
uint64_t regular_file_size(const std::string& path, const std::string& what, int code);
bool is_regular_file(const std::string& path);
bool exists(const std::string& path);

// The bytes of a regular file of at most max_bytes (a file that grows is refused).
std::vector<uint8_t> read_regular_file(const std::string& path, uint64_t max_bytes,
                                       const std::string& what, int code);
// Up to `n` bytes from the start of a file (fewer if shorter).
std::vector<uint8_t> read_prefix(const std::string& path, uint64_t n, int code);

std::string sha256_hex(const uint8_t* data, size_t n);
std::string sha256_file(const std::string& path, int code);

// JSON from untrusted bytes: UTF-8, no NaN/Infinity, nesting checked before parsing.
nlohmann::json parse_json(const uint8_t* data, size_t n, const std::string& where, int code);

// folder/name for a plain file name from a manifest (one sub-folder level with `subfolder`);
// refuses absolute paths, '..', separators, NUL and symlinks resolving outside the folder.
std::string safe_join(const std::string& folder, const std::string& name, bool subfolder,
                      int code, const std::string& what);

std::string join_path(const std::string& folder, const std::string& name);

}  // namespace cmce
