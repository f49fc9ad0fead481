// hnsw_query: search gallery shards with the stock hnswlib C++ headers, as a mobile app would.
//
// Proof that the shard format is plain hnswlib: it loads each shard with
// hnswlib::HierarchicalNSW<float> (inner-product space on L2-normalised vectors), sets the
// manifest's ef_search, searches each query in every shard and merges the per-shard top-k
// exactly as query_sdk.shards.search_shards does (score = 1 - distance, best first; ties keep
// shard order). Prints one line per query: k labels separated by spaces (-1 pads a line when
// the shards hold fewer than k live items).
//
// Usage: hnsw_query DIM EF_SEARCH K QUERIES.f32 SHARD.hnsw [SHARD.hnsw ...]
//   QUERIES.f32: raw little-endian float32, N x DIM.
//
// hnswlib's loader trusts its input: like the Python SDK, an app must check each file's size
// and sha256 against the (signed) gallery manifest before loading it.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "hnswlib/hnswlib.h"

namespace {

struct Scored {
    float score;
    hnswlib::labeltype label;
};

bool parse_size(const char* text, size_t* out) {
    char* end = nullptr;
    long long v = std::strtoll(text, &end, 10);
    if (end == text || *end != '\0' || v <= 0) return false;
    *out = static_cast<size_t>(v);
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 6) {
        std::cerr << "usage: " << argv[0] << " DIM EF_SEARCH K QUERIES.f32 SHARD.hnsw [...]\n";
        return 2;
    }
    size_t dim = 0, ef = 0, k = 0;
    if (!parse_size(argv[1], &dim) || !parse_size(argv[2], &ef) || !parse_size(argv[3], &k)) {
        std::cerr << "error: DIM, EF_SEARCH and K must be positive integers\n";
        return 2;
    }

    std::ifstream in(argv[4], std::ios::binary | std::ios::ate);
    if (!in) {
        std::cerr << "error: cannot open queries file " << argv[4] << "\n";
        return 1;
    }
    std::streamsize bytes = in.tellg();
    if (bytes <= 0 || bytes % static_cast<std::streamsize>(dim * sizeof(float)) != 0) {
        std::cerr << "error: " << argv[4] << " holds " << bytes << " bytes, not N x " << dim
                  << " float32\n";
        return 1;
    }
    size_t n = static_cast<size_t>(bytes) / (dim * sizeof(float));
    std::vector<float> queries(n * dim);
    in.seekg(0);
    in.read(reinterpret_cast<char*>(queries.data()), bytes);

    hnswlib::InnerProductSpace space(dim);
    std::vector<std::unique_ptr<hnswlib::HierarchicalNSW<float>>> shards;
    std::vector<size_t> live;
    try {
        for (int i = 5; i < argc; ++i) {
            shards.emplace_back(new hnswlib::HierarchicalNSW<float>(&space, argv[i]));
            shards.back()->setEf(ef);
            live.push_back(shards.back()->getCurrentElementCount() -
                           shards.back()->getDeletedCount());
        }
    } catch (const std::exception& e) {
        std::cerr << "error: hnswlib could not load a shard: " << e.what() << "\n";
        return 1;
    }

    std::vector<Scored> merged;
    for (size_t q = 0; q < n; ++q) {
        merged.clear();
        for (size_t s = 0; s < shards.size(); ++s) {
            size_t kk = std::min(k, live[s]);
            if (kk == 0) continue;
            auto result = shards[s]->searchKnn(queries.data() + q * dim, kk);
            std::vector<Scored> best(result.size());
            for (size_t i = result.size(); i-- > 0;) {  // the queue pops the farthest first
                best[i] = {1.0f - result.top().first, result.top().second};
                result.pop();
            }
            merged.insert(merged.end(), best.begin(), best.end());
        }
        std::stable_sort(merged.begin(), merged.end(),
                         [](const Scored& a, const Scored& b) { return a.score > b.score; });
        for (size_t i = 0; i < k; ++i) {
            if (i) std::fputc(' ', stdout);
            if (i < merged.size())
                std::printf("%llu", static_cast<unsigned long long>(merged[i].label));
            else
                std::fputs("-1", stdout);
        }
        std::fputc('\n', stdout);
    }
    return 0;
}
