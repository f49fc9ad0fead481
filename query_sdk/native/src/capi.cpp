// The C API (include/cmce_query.h): handles, options and errors at the boundary. Nothing is
// thrown across it: every cmce::Error becomes its code and message, std::bad_alloc
// CMCE_ERR_NO_MEMORY, anything else CMCE_ERR_INTERNAL.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "bundle.h"
#include "cmce_query.h"
#include "common.h"
#include "gallery.h"

#ifdef CMCE_HAVE_EMBEDDER
#include "embedder.h"
#endif

struct cmce_query {
  std::unique_ptr<cmce::Gallery> gallery;
  std::string space_id, model_file, quantization;
  int threads = 1;
#ifdef CMCE_HAVE_EMBEDDER
  cmce::PixelSpec spec;
  std::unique_ptr<cmce::Embedder> embedder;
#endif
};

namespace {

cmce_status report(cmce_error_t* error, int code, const std::string& message) {
  if (error) {
    error->code = code;
    std::snprintf(error->message, sizeof error->message, "%s", message.c_str());
  }
  return static_cast<cmce_status>(code);
}

template <typename Fn>
cmce_status guarded(cmce_error_t* error, Fn&& fn) {
  try {
    fn();
    return report(error, CMCE_OK, "");
  } catch (const cmce::Error& e) {
    return report(error, e.code, e.what());
  } catch (const std::bad_alloc&) {
    return report(error, CMCE_ERR_NO_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return report(error, CMCE_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return report(error, CMCE_ERR_INTERNAL, "internal error");
  }
}

void need(bool ok, const char* what) {
  if (!ok) cmce::fail(CMCE_ERR_ARGUMENT, what);
}

double limit_of(const cmce_query_t* q, const cmce_search_options_t* o) {
  if (!o) return NAN;
  need(!(o->use_max_uncertainty && o->max_uncertainty_quantile),
       "max_uncertainty: give a value or a quantile name, not both");
  if (o->use_max_uncertainty) {
    need(std::isfinite(o->max_uncertainty), "max_uncertainty must be a finite number");
    return o->max_uncertainty;
  }
  if (o->max_uncertainty_quantile) return q->gallery->quantile_limit(o->max_uncertainty_quantile);
  return NAN;
}

void fill_hits(const cmce::Gallery& g, const std::vector<cmce::Hit>& found, cmce_hit_t* hits,
               size_t capacity, size_t* n_hits) {
  const size_t n = std::min(capacity, found.size());
  for (size_t i = 0; i < n; ++i) {
    const cmce::Hit& h = found[i];
    hits[i] = {g.id(h.row).c_str(), h.score, g.uncertainty(h.row), g.payload(h.row).c_str(),
               g.class_name(h.row).c_str(), h.label};
  }
  *n_hits = n;
}

void search_rows(const cmce_query_t* q, const float* vectors, size_t n, size_t dim,
                 const cmce_search_options_t* options, cmce_hit_t* hits, size_t capacity,
                 size_t* n_hits) {
  need(q && vectors && n_hits && (hits || capacity == 0), "search: NULL argument");
  need(dim == static_cast<size_t>(q->gallery->manifest().dim),
       ("search: query vectors have dim " + std::to_string(dim) + ", the gallery has " +
        std::to_string(q->gallery->manifest().dim)).c_str());
  const uint32_t k = options && options->k ? options->k : 10;
  const double limit = limit_of(q, options);
  const auto found = q->gallery->search(vectors, n, k, limit);
  for (size_t r = 0; r < n; ++r) fill_hits(*q->gallery, found[r], hits + r * capacity, capacity, n_hits + r);
}

#ifdef CMCE_HAVE_EMBEDDER
void checked(const cmce::Status& s) {
  if (s.code != CMCE_OK) cmce::fail(s.code, s.message);
}
#endif

#ifdef CMCE_HAVE_EMBEDDER
using Input = cmce::Pixels;
#else
using Input = std::vector<uint8_t>;
#endif

void embed_with(cmce_query_t* q, float* out, size_t out_dim, const std::function<void(Input*)>& prepare) {
  need(q && out, "embed: NULL argument");
  need(out_dim == static_cast<size_t>(q->gallery->manifest().dim), "embed: out_dim is not the embedding dim");
#ifdef CMCE_HAVE_EMBEDDER
  need(q->embedder != nullptr, "embed: the handle was opened without a bundle (search by vector only)");
  Input input;
  std::vector<float> embedding;
  prepare(&input);
  checked(q->embedder->embed(input, &embedding));
  need(embedding.size() == out_dim, "embed: the model returned another dim");
  std::copy(embedding.begin(), embedding.end(), out);
#else
  (void)prepare;
  cmce::fail(CMCE_ERR_BACKEND, "embed: libcmce_query was built without the model runtime (ExecuTorch)");
#endif
}

}  // namespace

extern "C" {

const char* cmce_status_name(int32_t code) {
  switch (code) {
    case CMCE_OK: return "ok";
    case CMCE_ERR_GENERIC: return "CmceError";
    case CMCE_ERR_FORMAT: return "FormatError";
    case CMCE_ERR_SIGNATURE: return "SignatureError";
    case CMCE_ERR_DATA: return "DataError";
    case CMCE_ERR_BACKEND: return "BackendError";
    case CMCE_ERR_ARGUMENT: return "ArgumentError";
    case CMCE_ERR_IO: return "IOError";
    case CMCE_ERR_NO_MEMORY: return "OutOfMemory";
    case CMCE_ERR_INTERNAL: return "InternalError";
    default: return "unknown";
  }
}

const char* cmce_version(void) { return "0.1.0"; }

cmce_status cmce_open(const char* bundle_dir, const char* gallery_dir, const cmce_open_options_t* options,
                      cmce_query_t** out, cmce_error_t* error) {
  if (out) *out = nullptr;
  return guarded(error, [&] {
    need(gallery_dir && out, "cmce_open: gallery_dir and out must not be NULL");
    const cmce_open_options_t defaults{};
    const cmce_open_options_t& o = options ? *options : defaults;
    need(o.threads >= 0, "cmce_open: threads must be >= 0");
    need(o.n_shards == 0 || o.shards, "cmce_open: n_shards > 0 needs shards");
    auto q = std::make_unique<cmce_query>();
    const int cpus = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    q->threads = std::min(std::max(1, o.threads), cpus);
    cmce::GalleryOptions g;
    if (o.n_shards) g.shards = std::vector<int32_t>(o.shards, o.shards + o.n_shards);
    if (o.public_key) g.public_key = o.public_key;
    if (o.space_id) g.space_id = o.space_id;
    g.dim = o.dim;
    g.threads = q->threads;
    std::unique_ptr<cmce::Bundle> bundle;
    const cmce::BundleArtifact* artifact = nullptr;
    if (bundle_dir) {
      bundle = std::make_unique<cmce::Bundle>(cmce::read_bundle(bundle_dir));
      artifact = &cmce::pick_artifact(*bundle, "executorch", o.quantization ? o.quantization : "");
      g.space_id = bundle->space_id;
      g.dim = bundle->embedding_dim;
    }
    q->gallery = cmce::Gallery::open(gallery_dir, g);
    q->space_id = q->gallery->manifest().space_id;
    if (bundle) {
      const std::string model = cmce::verify_artifact(*bundle, *artifact);
      q->model_file = artifact->file;
      q->quantization = artifact->quantization;
#ifdef CMCE_HAVE_EMBEDDER
      const cmce::BundleInputSpec& s = bundle->input_spec;
      q->spec = cmce::PixelSpec{s.height, s.width, s.channels};  // mean/std: inside the model
      checked(cmce::Embedder::open(model, q->spec, static_cast<int>(bundle->embedding_dim), q->threads, &q->embedder));
#else
      (void)model;
      cmce::fail(CMCE_ERR_BACKEND, "libcmce_query was built without the model runtime (ExecuTorch); open with bundle_dir NULL to search by vector");
#endif
    }
    *out = q.release();
  });
}

void cmce_close(cmce_query_t* query) { delete query; }

cmce_status cmce_info(const cmce_query_t* q, cmce_info_t* out, cmce_error_t* error) {
  return guarded(error, [&] {
    need(q && out, "cmce_info: NULL argument");
    const cmce::Gallery& g = *q->gallery;
    out->dim = static_cast<int32_t>(g.manifest().dim);
    out->count = g.count();
    out->shards_loaded = static_cast<int32_t>(g.shards_loaded());
    out->shards_total = static_cast<int32_t>(g.manifest().shards.size());
    out->threads = q->threads;
    out->memory_bytes = g.memory_bytes();
    out->has_model = !q->model_file.empty();
    out->space_id = q->space_id.c_str();
    out->model_file = q->model_file.c_str();
    out->quantization = q->quantization.c_str();
  });
}

uint64_t cmce_memory_bytes(const cmce_query_t* q) { return q ? q->gallery->memory_bytes() : 0; }

cmce_status cmce_embed_file(cmce_query_t* q, const char* image_path, float* out, size_t out_dim, cmce_error_t* error) {
  return guarded(error, [&] {
    need(image_path != nullptr, "embed: image_path is NULL");
    embed_with(q, out, out_dim, [&](Input* input) {
#ifdef CMCE_HAVE_EMBEDDER
      checked(cmce::image_file_to_input(image_path, q->spec, input));
#else
      (void)input;
#endif
    });
  });
}

cmce_status cmce_embed_encoded(cmce_query_t* q, const uint8_t* bytes, size_t n_bytes, float* out, size_t out_dim,
                               cmce_error_t* error) {
  return guarded(error, [&] {
    need(bytes != nullptr || n_bytes == 0, "embed: bytes is NULL");
    embed_with(q, out, out_dim, [&](Input* input) {
#ifdef CMCE_HAVE_EMBEDDER
      checked(cmce::image_to_input(bytes, n_bytes, q->spec, input));
#else
      (void)input;
#endif
    });
  });
}

cmce_status cmce_embed_pixels(cmce_query_t* q, const uint8_t* pixels, int32_t height, int32_t width, int32_t channels,
                              float* out, size_t out_dim, cmce_error_t* error) {
  return guarded(error, [&] {
    need(pixels != nullptr, "embed: pixels is NULL");
    need(height > 0 && width > 0 && (channels == 1 || channels == 3 || channels == 4),
         "embed: height and width must be positive and channels 1, 3 or 4");
    embed_with(q, out, out_dim, [&](Input* input) {
#ifdef CMCE_HAVE_EMBEDDER
      checked(cmce::pixels_to_input(pixels, height, width, channels, q->spec, input));
#else
      (void)input;
#endif
    });
  });
}

cmce_status cmce_search_vector(const cmce_query_t* q, const float* vector, size_t dim,
                               const cmce_search_options_t* options, cmce_hit_t* hits, size_t capacity,
                               size_t* n_hits, cmce_error_t* error) {
  return guarded(error, [&] { search_rows(q, vector, 1, dim, options, hits, capacity, n_hits); });
}

cmce_status cmce_search_vectors(const cmce_query_t* q, const float* vectors, size_t n, size_t dim,
                                const cmce_search_options_t* options, cmce_hit_t* hits, size_t capacity,
                                size_t* n_hits, cmce_error_t* error) {
  return guarded(error, [&] { search_rows(q, vectors, n, dim, options, hits, capacity, n_hits); });
}

cmce_status cmce_search_file(cmce_query_t* q, const char* image_path, const cmce_search_options_t* options,
                             cmce_hit_t* hits, size_t capacity, size_t* n_hits, cmce_error_t* error) {
  std::vector<float> v(q ? static_cast<size_t>(q->gallery->manifest().dim) : 0);
  cmce_status s = cmce_embed_file(q, image_path, v.data(), v.size(), error);
  return s != CMCE_OK ? s : cmce_search_vector(q, v.data(), v.size(), options, hits, capacity, n_hits, error);
}

cmce_status cmce_search_encoded(cmce_query_t* q, const uint8_t* bytes, size_t n_bytes,
                                const cmce_search_options_t* options, cmce_hit_t* hits, size_t capacity,
                                size_t* n_hits, cmce_error_t* error) {
  std::vector<float> v(q ? static_cast<size_t>(q->gallery->manifest().dim) : 0);
  cmce_status s = cmce_embed_encoded(q, bytes, n_bytes, v.data(), v.size(), error);
  return s != CMCE_OK ? s : cmce_search_vector(q, v.data(), v.size(), options, hits, capacity, n_hits, error);
}

cmce_status cmce_search_pixels(cmce_query_t* q, const uint8_t* pixels, int32_t height, int32_t width,
                               int32_t channels, const cmce_search_options_t* options, cmce_hit_t* hits,
                               size_t capacity, size_t* n_hits, cmce_error_t* error) {
  std::vector<float> v(q ? static_cast<size_t>(q->gallery->manifest().dim) : 0);
  cmce_status s = cmce_embed_pixels(q, pixels, height, width, channels, v.data(), v.size(), error);
  return s != CMCE_OK ? s : cmce_search_vector(q, v.data(), v.size(), options, hits, capacity, n_hits, error);
}

}  // extern "C"
