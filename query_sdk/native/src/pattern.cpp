#include "pattern.h"

#include <bitset>
#include <functional>
#include <vector>

#include "common.h"

namespace cmce {

struct Pattern::Node {
  enum Kind { kSet, kSeq, kAlt, kRepeat, kStart, kEnd } kind;
  std::bitset<256> set;
  std::vector<std::unique_ptr<Node>> kids;
  size_t min = 1, max = 1;  // kRepeat
};

namespace {

using Node = Pattern::Node;
using Cont = std::function<bool(size_t)>;
constexpr size_t kUnbounded = static_cast<size_t>(-1);

class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}
  std::unique_ptr<Node> parse() {
    auto n = alternation();
    if (pos_ != s_.size()) bad();
    return n;
  }

 private:
  const std::string& s_;
  size_t pos_ = 0;
  [[noreturn]] void bad() { fail(CMCE_ERR_INTERNAL, "unsupported schema pattern " + s_); }
  bool more() const { return pos_ < s_.size(); }

  std::unique_ptr<Node> alternation() {
    auto alt = std::make_unique<Node>(Node{Node::kAlt, {}, {}, 1, 1});
    alt->kids.push_back(sequence());
    while (more() && s_[pos_] == '|') {
      ++pos_;
      alt->kids.push_back(sequence());
    }
    return alt;
  }
  std::unique_ptr<Node> sequence() {
    auto seq = std::make_unique<Node>(Node{Node::kSeq, {}, {}, 1, 1});
    while (more() && s_[pos_] != '|' && s_[pos_] != ')') seq->kids.push_back(quantified());
    return seq;
  }
  std::unique_ptr<Node> quantified() {
    auto atom_node = atom();
    if (!more()) return atom_node;
    size_t lo, hi;
    const char c = s_[pos_];
    if (c == '?') lo = 0, hi = 1;
    else if (c == '*') lo = 0, hi = kUnbounded;
    else if (c == '+') lo = 1, hi = kUnbounded;
    else if (c == '{') {
      size_t close = s_.find('}', pos_);
      if (close == std::string::npos) bad();
      const std::string body = s_.substr(pos_ + 1, close - pos_ - 1);
      const size_t comma = body.find(',');
      lo = std::stoul(body.substr(0, comma));
      hi = comma == std::string::npos ? lo : (comma + 1 == body.size() ? kUnbounded : std::stoul(body.substr(comma + 1)));
      pos_ = close;
    } else {
      return atom_node;
    }
    ++pos_;
    auto rep = std::make_unique<Node>(Node{Node::kRepeat, {}, {}, lo, hi});
    rep->kids.push_back(std::move(atom_node));
    return rep;
  }
  std::unique_ptr<Node> atom() {
    const char c = s_[pos_++];
    if (c == '(') {
      auto inner = alternation();
      if (!more() || s_[pos_++] != ')') bad();
      return inner;
    }
    if (c == '^') return std::make_unique<Node>(Node{Node::kStart, {}, {}, 1, 1});
    if (c == '$') return std::make_unique<Node>(Node{Node::kEnd, {}, {}, 1, 1});
    auto n = std::make_unique<Node>(Node{Node::kSet, {}, {}, 1, 1});
    if (c == '[') {
      bool negate = more() && s_[pos_] == '^';
      if (negate) ++pos_;
      while (more() && s_[pos_] != ']') {
        unsigned char lo = literal();
        if (pos_ + 1 < s_.size() && s_[pos_] == '-' && s_[pos_ + 1] != ']') {
          ++pos_;
          unsigned char hi = literal();
          for (unsigned v = lo; v <= hi; ++v) n->set.set(v);
        } else {
          n->set.set(lo);
        }
      }
      if (!more()) bad();
      ++pos_;
      if (negate) n->set.flip();
    } else if (c == '.') {
      n->set.set();
      n->set.reset('\n');
      n->set.reset('\r');
    } else {
      --pos_;
      n->set.set(literal());
    }
    return n;
  }
  unsigned char literal() {
    char c = s_[pos_++];
    if (c != '\\') return static_cast<unsigned char>(c);
    if (!more()) bad();
    c = s_[pos_++];
    if (std::string("dwsDWSbBnrtu").find(c) != std::string::npos) bad();  // not in our schemas
    return static_cast<unsigned char>(c);
  }
};

bool match(const Node& n, const std::string& t, size_t pos, const Cont& k) {
  switch (n.kind) {
    case Node::kStart: return pos == 0 && k(pos);
    case Node::kEnd: return pos == t.size() && k(pos);
    case Node::kSet: return pos < t.size() && n.set.test(static_cast<unsigned char>(t[pos])) && k(pos + 1);
    case Node::kAlt:
      for (const auto& kid : n.kids) {
        if (match(*kid, t, pos, k)) return true;
      }
      return false;
    case Node::kSeq: {
      std::function<bool(size_t, size_t)> step = [&](size_t i, size_t p) {
        return i == n.kids.size() ? k(p) : match(*n.kids[i], t, p, [&, i](size_t q) { return step(i + 1, q); });
      };
      return step(0, pos);
    }
    case Node::kRepeat: {
      const Node& kid = *n.kids[0];
      if (kid.kind == Node::kSet) {  // a run of one class: greedy, iterative
        size_t run = 0;
        while (run < n.max && pos + run < t.size() && kid.set.test(static_cast<unsigned char>(t[pos + run]))) ++run;
        for (size_t len = run + 1; len-- > n.min;) {
          if (k(pos + len)) return true;
        }
        return false;
      }
      std::function<bool(size_t, size_t)> more = [&](size_t count, size_t p) {
        if (count < n.max && match(kid, t, p, [&, count, p](size_t q) { return q != p && more(count + 1, q); })) {
          return true;
        }
        return count >= n.min && k(p);
      };
      return more(0, pos);
    }
  }
  return false;
}

}  // namespace

Pattern::Pattern(const std::string& source) : root_(Parser(source).parse()) {}
Pattern::~Pattern() = default;
Pattern::Pattern(Pattern&&) noexcept = default;

bool Pattern::search(const std::string& text) const {
  for (size_t start = 0; start <= text.size(); ++start) {
    if (match(*root_, text, start, [](size_t) { return true; })) return true;
    if (root_->kids.size() == 1 && !root_->kids[0]->kids.empty() && root_->kids[0]->kids[0]->kind == Node::kStart) {
      return false;  // anchored at the start: one try
    }
  }
  return false;
}

}  // namespace cmce
