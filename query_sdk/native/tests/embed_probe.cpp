// A driver of src/image.h + src/embedder.h for tests/test_native_embed.py and the latency figures:
// one JSON line per input on stdout ({"i", "code", "message", ...}); exit code 0 unless misused.
//   embed_probe prep  H W C OUTDIR FILE...        preprocessed pixels -> OUTDIR/<i>.bin
//   embed_probe raw   H W C OUTDIR h w c FILE...  raw h x w x c uint8 files, as pixels_to_input
//   embed_probe embed PTE H W C DIM THREADS FILE...  query vectors
//   embed_probe bench PTE H W C DIM RUNS FILE     embed latency (model alone; file -> vector)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "embedder.h"

namespace {

std::string quoted(const std::string& s) {
  std::string q = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') q += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) ch = ' ';
    q += ch;
  }
  return q + "\"";
}

void line(int i, const cmce::Status& s, const std::string& extra = "") {
  std::printf("{\"i\": %d, \"code\": %d, \"message\": %s%s}\n", i, s.code, quoted(s.message).c_str(),
              extra.c_str());
}

std::string vector_json(const std::vector<float>& v) {
  std::string s = ", \"vector\": [";
  char buf[32];
  for (size_t j = 0; j < v.size(); ++j) {
    std::snprintf(buf, sizeof buf, "%s%.9g", j ? ", " : "", v[j]);
    s += buf;
  }
  return s + "]";
}

int usage() {
  std::fprintf(stderr, "usage: embed_probe prep|raw|embed|bench ... (see the source)\n");
  return 2;
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * (v.size() - 1))];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string cmd = argv[1];
  auto spec_at = [&](int k) { return cmce::PixelSpec{std::atoi(argv[k]), std::atoi(argv[k + 1]), std::atoi(argv[k + 2])}; };
  if ((cmd == "prep" && argc >= 6) || (cmd == "raw" && argc >= 9)) {
    const cmce::PixelSpec spec = spec_at(2);
    const std::string outdir = argv[5];
    const int first = cmd == "prep" ? 6 : 9;
    for (int k = first; k < argc; ++k) {
      cmce::Pixels px;
      cmce::Status s;
      if (cmd == "prep") {
        s = cmce::image_file_to_input(argv[k], spec, &px);
      } else {
        std::ifstream in(argv[k], std::ios::binary);
        std::vector<uint8_t> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        const int h = std::atoi(argv[6]), w = std::atoi(argv[7]), c = std::atoi(argv[8]);
        if (raw.size() != size_t(h) * w * c) {
          s = {20, std::string(argv[k]) + ": not h x w x c bytes"};
        } else {
          s = cmce::pixels_to_input(raw.data(), h, w, c, spec, &px);
        }
      }
      if (s.ok()) {
        std::ofstream(outdir + "/" + std::to_string(k - first) + ".bin", std::ios::binary)
            .write(reinterpret_cast<const char*>(px.data()), static_cast<std::streamsize>(px.size()));
      }
      line(k - first, s);
    }
    return 0;
  }
  if ((cmd == "embed" && argc >= 8) || (cmd == "bench" && argc == 9)) {
    const cmce::PixelSpec spec = spec_at(3);
    const int dim = std::atoi(argv[6]);
    std::unique_ptr<cmce::Embedder> embedder;
    const int threads = cmd == "embed" ? std::atoi(argv[7]) : 1;
    cmce::Status s = cmce::Embedder::open(argv[2], spec, dim, threads, &embedder);
    if (!s.ok()) {
      line(-1, s);
      return 0;
    }
    if (cmd == "embed") {
      for (int k = 8; k < argc; ++k) {
        cmce::Pixels px;
        std::vector<float> v;
        s = cmce::image_file_to_input(argv[k], spec, &px);
        if (s.ok()) s = embedder->embed(px, &v);
        line(k - 8, s, s.ok() ? vector_json(v) : "");
      }
      return 0;
    }
    const int runs = std::atoi(argv[7]);
    std::vector<double> model, total;
    for (int r = 0; r < runs + 10; ++r) {  // 10 warm-up runs
      cmce::Pixels px;
      std::vector<float> v;
      const auto t0 = std::chrono::steady_clock::now();
      s = cmce::image_file_to_input(argv[8], spec, &px);
      const auto t1 = std::chrono::steady_clock::now();
      if (s.ok()) s = embedder->embed(px, &v);
      const auto t2 = std::chrono::steady_clock::now();
      if (!s.ok()) break;
      if (r >= 10) {
        model.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
        total.push_back(std::chrono::duration<double, std::micro>(t2 - t0).count());
      }
    }
    if (!s.ok()) {
      line(0, s);
      return 0;
    }
    char buf[160];
    std::snprintf(buf, sizeof buf, ", \"model_p50_us\": %.1f, \"model_p90_us\": %.1f, \"file_p50_us\": %.1f",
                  percentile(model, 0.5), percentile(model, 0.9), percentile(total, 0.5));
    line(0, s, buf);
    return 0;
  }
  return usage();
}
