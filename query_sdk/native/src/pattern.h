// The regular expressions of the published schemas (ECMA-262 "pattern"): a small backtracking
// matcher for the subset they use — literals, escapes, [classes], (groups), |, ?, *, +, {m,n},
// ^ and $ — with search semantics like JSON Schema's. Runs of one class repeat iteratively, so
// a long string cannot exhaust the stack; std::regex is avoided (slow to build, recursive).
#pragma once

#include <memory>
#include <string>

namespace cmce {

class Pattern {
 public:
  explicit Pattern(const std::string& source);  // Error(CMCE_ERR_INTERNAL) if unsupported
  ~Pattern();
  Pattern(Pattern&&) noexcept;
  bool search(const std::string& text) const;

  struct Node;  // the parsed pattern (pattern.cpp)

 private:
  std::unique_ptr<Node> root_;
};

}  // namespace cmce
