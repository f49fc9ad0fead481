// The hnswlib 0.8 index proof of query_sdk/gallery_format.py (_check_index_header,
// _check_index, _check_upper_levels): everything hnswlib's loadIndex and searchKnn trust about
// a file, checked before hnswlib sees it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cmce {

constexpr size_t kIndexHeaderBytes = 96;

struct IndexHeader {
  uint64_t offset_level0, max_elements, cur_element_count, size_data_per_element, label_offset,
      offset_data;
  int32_t maxlevel;
  uint32_t enterpoint_node;
  uint64_t maxM, maxM0, M;
  double mult;
  uint64_t ef_construction;
};

IndexHeader read_index_header(const uint8_t* data, size_t n, const std::string& name);

// The header against the manifest (dim, count, M, ef_construction; M < 0 = unknown) and the
// file size, before the body is read.
void check_index_header(const IndexHeader& h, uint64_t size, const std::string& name, int64_t dim,
                        int64_t count, int64_t M, int64_t ef_construction);

// The whole file; returns labels and deleted flags per internal id.
void check_index(const uint8_t* data, size_t n, const std::string& name, int64_t dim,
                 int64_t count, int64_t M, int64_t ef_construction, std::vector<int64_t>* labels,
                 std::vector<uint8_t>* deleted);

}  // namespace cmce
