// Internal helpers shared by the core of libcmce_query: the error type thrown inside the
// library (caught at the C boundary, see capi.cpp) and small string helpers.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cmce_query.h"

namespace cmce {

// An expected failure: a cmce_status code and a one-line message naming the file.
struct Error : std::runtime_error {
  int code;
  Error(int c, const std::string& message) : std::runtime_error(message), code(c) {}
};

[[noreturn]] inline void fail(int code, const std::string& message) { throw Error(code, message); }
[[noreturn]] inline void format_error(const std::string& message) {
  throw Error(CMCE_ERR_FORMAT, message);
}

// A short, quoted rendering of a value for messages (like Python's repr, cut at 80).
std::string repr(const std::string& s, size_t limit = 80);

}  // namespace cmce
