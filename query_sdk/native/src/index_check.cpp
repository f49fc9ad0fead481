#include "index_check.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_set>

#include "common.h"

namespace cmce {
namespace {

constexpr uint64_t kMaxM = 10000;  // hnswlib caps M here; maxM0 = 2 M fits the u16 count
constexpr int32_t kMaxLevels = 64;
constexpr uint64_t kLabelSize = 8;
constexpr uint8_t kDeleteMark = 0x01;
constexpr double kNormTolerance = 1e-3;

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);  // little-endian hosts only, as hnswlib writes native order
  return v;
}

std::string num(uint64_t v) { return std::to_string(v); }

// Python's repr of a float (shortest round trip), enough for messages
std::string real(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

IndexHeader read_index_header(const uint8_t* data, size_t n, const std::string& name) {
  if (n < kIndexHeaderBytes) {
    format_error(name + ": " + num(n) + " bytes, shorter than the 96-byte hnswlib header");
  }
  IndexHeader h;
  const uint8_t* p = data;
  h.offset_level0 = load<uint64_t>(p);
  h.max_elements = load<uint64_t>(p + 8);
  h.cur_element_count = load<uint64_t>(p + 16);
  h.size_data_per_element = load<uint64_t>(p + 24);
  h.label_offset = load<uint64_t>(p + 32);
  h.offset_data = load<uint64_t>(p + 40);
  h.maxlevel = load<int32_t>(p + 48);
  h.enterpoint_node = load<uint32_t>(p + 52);
  h.maxM = load<uint64_t>(p + 56);
  h.maxM0 = load<uint64_t>(p + 64);
  h.M = load<uint64_t>(p + 72);
  h.mult = load<double>(p + 80);
  h.ef_construction = load<uint64_t>(p + 88);
  return h;
}

void check_index_header(const IndexHeader& h, uint64_t size, const std::string& name, int64_t dim,
                        int64_t count, int64_t M, int64_t ef_construction) {
  if (h.M < 2 || h.M > kMaxM || h.maxM != h.M || h.maxM0 != 2 * h.M) {
    format_error(name + ": implausible header (M " + num(h.M) + ", maxM " + num(h.maxM) +
                 ", maxM0 " + num(h.maxM0) +
                 "; hnswlib writes maxM = M and maxM0 = 2 M with 2 <= M <= 10000)");
  }
  const uint64_t links0 = h.maxM0 * 4 + 4;
  const uint64_t udim = static_cast<uint64_t>(dim), ucount = static_cast<uint64_t>(count);
  if (h.size_data_per_element != links0 + udim * 4 + kLabelSize) {
    format_error(name + ": wrong dims: manifest dim is " + std::to_string(dim) +
                 ", the index's size_data_per_element " + num(h.size_data_per_element) +
                 " (maxM0 " + num(h.maxM0) + ") implies another");
  }
  struct Expect {
    const char* field;
    uint64_t got, want;
  };
  std::vector<Expect> expect = {
      {"offsetLevel0", h.offset_level0, 0},
      {"offsetData", h.offset_data, links0},
      {"label_offset", h.label_offset, links0 + udim * 4},
      {"cur_element_count", h.cur_element_count, ucount},
      {"max_elements", h.max_elements, ucount},  // cmce writes indexes without spare room
  };
  if (M >= 0) expect.push_back({"M", h.M, static_cast<uint64_t>(M)});
  if (M >= 0 && ef_construction >= 0) {
    expect.push_back({"ef_construction", h.ef_construction,
                      static_cast<uint64_t>(std::max(ef_construction, M))});
  }
  for (const Expect& e : expect) {
    if (e.got != e.want) {
      format_error(name + ": header " + e.field + " is " + num(e.got) + ", expected " +
                   num(e.want) + " from the manifest");
    }
  }
  const double want_mult = 1.0 / std::log(static_cast<double>(h.M));
  if (!(std::fabs(h.mult - want_mult) <= 1e-9 * std::max(std::fabs(h.mult), std::fabs(want_mult)))) {
    format_error(name + ": header mult is " + real(h.mult) + ", hnswlib writes 1 / ln(M) for M " +
                 num(h.M));
  }
  if (count == 0) {
    if (h.maxlevel != -1 || size != kIndexHeaderBytes) {
      format_error(name + ": an empty index is the 96-byte header with maxlevel -1, got " +
                   num(size) + " bytes and maxlevel " + std::to_string(h.maxlevel));
    }
    return;
  }
  if (h.maxlevel < 0 || h.maxlevel >= kMaxLevels || h.enterpoint_node >= ucount) {
    format_error(name + ": bad entry point " + num(h.enterpoint_node) + " / maxlevel " +
                 std::to_string(h.maxlevel) + " for " + num(ucount) + " elements");
  }
  const uint64_t need = kIndexHeaderBytes + ucount * (h.size_data_per_element + 4);
  const uint64_t most = need + ucount * static_cast<uint64_t>(h.maxlevel) * (4 + 4 * h.maxM);
  if (size < need) {
    format_error(name + ": truncated: " + num(size) + " bytes, the header and " + num(ucount) +
                 " elements need at least " + num(need));
  }
  if (size > most) {
    format_error(name + ": " + num(size) + " bytes, more than the " + num(most) + " that " +
                 num(ucount) + " elements of at most " + std::to_string(h.maxlevel) +
                 " levels can take (trailing bytes)");
  }
}

namespace {

void check_upper_levels(const uint8_t* data, size_t n_bytes, const IndexHeader& h,
                        const std::string& name, uint64_t n) {
  const uint64_t start = kIndexHeaderBytes + n * h.size_data_per_element;
  if ((n_bytes - start) % 4) {
    format_error(name + ": truncated or padded: the upper-level links are not whole u32 words");
  }
  const uint64_t n_words = (n_bytes - start) / 4;
  auto word = [&](uint64_t w) { return load<uint32_t>(data + start + 4 * w); };
  const uint64_t per_level = 1 + h.maxM;
  std::vector<uint32_t> sizes;
  std::vector<uint64_t> offsets;
  sizes.reserve(n);
  offsets.reserve(n);
  uint64_t w = 0;
  while (sizes.size() < n && w < n_words) {
    uint32_t s = word(w);
    sizes.push_back(s);
    offsets.push_back(w);
    w += 1 + (s >> 2);
  }
  std::vector<int32_t> levels(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    uint64_t lv = sizes[i] / (4 * per_level);
    if (sizes[i] % (4 * per_level) != 0 || lv > static_cast<uint64_t>(h.maxlevel)) {
      format_error(name + ": bad upper-level link block of element " + num(i) + " (" +
                   num(sizes[i]) + " bytes; a block is at most maxlevel " +
                   std::to_string(h.maxlevel) + " levels of " + num(4 * per_level) + " bytes)");
    }
    levels[i] = static_cast<int32_t>(lv);
  }
  if (sizes.size() < n || w > n_words) {
    uint64_t i = w > n_words ? sizes.size() - 1 : sizes.size();
    format_error(name + ": truncated in the upper-level links of element " + num(i));
  }
  if (w < n_words) format_error(name + ": " + num(4 * (n_words - w)) + " unexpected trailing bytes");
  const uint32_t entry = h.enterpoint_node;
  const int32_t highest = *std::max_element(levels.begin(), levels.end());
  if (highest != h.maxlevel || levels[entry] != h.maxlevel) {
    format_error(name + ": maxlevel " + std::to_string(h.maxlevel) +
                 " does not match the stored levels (highest " + std::to_string(highest) +
                 "; the entry point " + num(entry) + " has " + std::to_string(levels[entry]) + ")");
  }
  // first every link count (as the Python proof does), then every link target
  for (int pass = 0; pass < 2; ++pass) {
    for (uint64_t e = 0; e < n; ++e) {
      for (int32_t level = 1; level <= levels[e]; ++level) {
        const uint64_t first = offsets[e] + 1 + static_cast<uint64_t>(level - 1) * per_level;
        const uint32_t links = word(first);
        if (pass == 0) {
          if (links > h.maxM) {
            format_error(name + ": element " + num(e) + " has " + num(links) + " links at level " +
                         std::to_string(level) + ", maxM is " + num(h.maxM));
          }
          continue;
        }
        for (uint32_t j = 0; j < links; ++j) {
          const uint32_t t = word(first + 1 + j);
          if (t >= n) {
            format_error(name + ": the link of element " + num(e) + " at level " +
                         std::to_string(level) + " points past the " + num(n) +
                         " elements (hnswlib would read outside the index)");
          }
          if (levels[t] < level) {
            format_error(name + ": the link of element " + num(e) + " at level " +
                         std::to_string(level) + " points at element " + num(t) +
                         ", which has only level " + std::to_string(levels[t]) +
                         " (hnswlib would follow a link list that does not exist)");
          }
        }
      }
    }
  }
}

}  // namespace

void check_index(const uint8_t* data, size_t n_bytes, const std::string& name, int64_t dim,
                 int64_t count, int64_t M, int64_t ef_construction, std::vector<int64_t>* labels,
                 std::vector<uint8_t>* deleted) {
  const IndexHeader h = read_index_header(data, n_bytes, name);
  check_index_header(h, n_bytes, name, dim, count, M, ef_construction);
  const uint64_t n = static_cast<uint64_t>(count);
  labels->assign(n, 0);
  deleted->assign(n, 0);
  if (n == 0) return;
  const uint64_t links0 = h.maxM0 * 4 + 4;
  const uint8_t* rows = data + kIndexHeaderBytes;
  const uint64_t stride = h.size_data_per_element;
  // problems in the order the Python proof reports them, each at its first element
  uint64_t too_many = n, past_n = n, flags = n;
  for (uint64_t e = 0; e < n; ++e) {
    const uint8_t* row = rows + e * stride;
    const uint16_t links = load<uint16_t>(row);
    if (links > h.maxM0 && too_many == n) too_many = e;
    if (past_n == n) {
      for (uint64_t j = 0; j < std::min<uint64_t>(links, h.maxM0); ++j) {
        if (load<uint32_t>(row + 4 + 4 * j) >= n) {
          past_n = e;
          break;
        }
      }
    }
    if ((row[2] > kDeleteMark || row[3] != 0) && flags == n) flags = e;
  }
  if (too_many < n) {
    format_error(name + ": element " + num(too_many) + " has more than maxM0 (" + num(h.maxM0) +
                 ") level-0 links");
  }
  if (past_n < n) {
    format_error(name + ": element " + num(past_n) + " has a level-0 link past the " + num(n) +
                 " elements");
  }
  if (flags < n) format_error(name + ": element " + num(flags) + " has flag bits hnswlib never sets");
  bool finite = true, unit = true;
  for (uint64_t e = 0; e < n; ++e) {
    const uint8_t* vec = rows + e * stride + links0;
    double norm = 0.0;
    for (int64_t d = 0; d < dim; ++d) {
      float x = load<float>(vec + 4 * d);
      finite = finite && std::isfinite(x);
      norm += static_cast<double>(x) * static_cast<double>(x);
    }
    unit = unit && std::fabs(std::sqrt(norm) - 1.0) <= kNormTolerance;
  }
  if (!finite) format_error(name + ": stored vectors contain NaN/inf");
  if (!unit) format_error(name + ": stored vectors are not L2-normalised (metric 'cosine')");
  std::unordered_set<uint64_t> seen;
  seen.reserve(n);
  bool unique = true;
  for (uint64_t e = 0; e < n; ++e) {
    const uint8_t* row = rows + e * stride;
    const uint64_t label = load<uint64_t>(row + h.label_offset);
    unique = unique && label <= static_cast<uint64_t>(INT64_MAX) && seen.insert(label).second;
    (*labels)[e] = static_cast<int64_t>(label);
    (*deleted)[e] = row[2] & kDeleteMark;
  }
  if (!unique) format_error(name + ": stored labels are not unique non-negative int64");
  check_upper_levels(data, n_bytes, h, name, n);
}

}  // namespace cmce
