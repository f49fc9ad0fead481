/*
 * cmce_query.h — the C API of libcmce_query, the on-device query SDK of cmce.
 *
 * Open a query bundle (the phone's model, cmce-export output) and a gallery (cmce-build-gallery
 * output) together; embed query images; search every loaded shard in parallel with an exact
 * top-k merge and optional rejection by stored uncertainty. Every file is checked before it is
 * parsed, with the same rules as the Python SDK (query_sdk): format versions, sha256 of every
 * file, the Ed25519 signature of the gallery manifest (with a public key), space_id and dim
 * between bundle and gallery, paths that stay inside their folder, and the full hnswlib
 * structure proof before hnswlib reads an index.
 *
 * Conventions (usearch / SQLite style):
 *  - Opaque handle `cmce_query_t`; C types only; nothing throws or aborts across the API.
 *  - Every call returns a `cmce_status` (CMCE_OK = 0) and, when `error` is not NULL, fills the
 *    caller-owned `cmce_error_t` with the same code and a one-line message that names the file
 *    and the problem. Nothing to free. Error codes mirror query_sdk/errors.py exit codes.
 *  - Options structs: a zero-initialised struct means "defaults", so new fields at the end do
 *    not break old callers (`cmce_open_options_t opts = {0};`).
 *  - Thread safety: after cmce_open returns, every embed/search/info call may run concurrently
 *    on one handle from any number of threads. cmce_close must not race with other calls.
 *  - A failed call leaves the handle as it was (no partial state); a failed cmce_open creates
 *    no handle. An undecodable image fails that call only.
 *  - Strings in results (hit ids, payload JSON, class names, space_id) are owned by the handle
 *    and stay valid, unchanged, until cmce_close.
 */
#ifndef CMCE_QUERY_H
#define CMCE_QUERY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(CMCE_QUERY_BUILD_SHARED)
#define CMCE_API __declspec(dllexport)
#elif defined(__GNUC__)
#define CMCE_API __attribute__((visibility("default")))
#else
#define CMCE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define CMCE_QUERY_VERSION_MAJOR 0
#define CMCE_QUERY_VERSION_MINOR 1
#define CMCE_QUERY_VERSION_PATCH 0

/* ------------------------------------------------------------------------------ errors */

/** Result codes. 1..9 are the exit codes of query_sdk/errors.py's classes. */
typedef enum cmce_status {
  CMCE_OK = 0,
  CMCE_ERR_GENERIC = 1,    /* CmceError: anything else expected */
  CMCE_ERR_FORMAT = 2,     /* FormatError (GalleryError, BundleError): a damaged/crafted file */
  CMCE_ERR_SIGNATURE = 3,  /* SignatureError: manifest.sig missing, malformed, not verifying */
  CMCE_ERR_DATA = 5,       /* DataError (ImageError): an image that cannot be used */
  CMCE_ERR_BACKEND = 7,    /* BackendError: the model runtime refuses or fails */
  CMCE_ERR_ARGUMENT = 20,  /* a bad argument from the caller (NULL, k = 0, wrong dim, ...) */
  CMCE_ERR_IO = 21,        /* the OS refused a read (permission, I/O error) */
  CMCE_ERR_NO_MEMORY = 22, /* an allocation failed */
  CMCE_ERR_INTERNAL = 23   /* a bug in libcmce_query: please report it */
} cmce_status;

#define CMCE_ERROR_MESSAGE_BYTES 1024

/** Caller-owned error record; `message` is NUL-terminated (truncated if longer). */
typedef struct cmce_error_t {
  int32_t code; /* a cmce_status */
  char message[CMCE_ERROR_MESSAGE_BYTES];
} cmce_error_t;

/** A static name for a status ("FormatError", "SignatureError", ..., "ok"). */
CMCE_API const char* cmce_status_name(int32_t code);

/** The library version, "MAJOR.MINOR.PATCH" (static string). */
CMCE_API const char* cmce_version(void);

/* ------------------------------------------------------------------------------ open */

typedef struct cmce_query cmce_query_t; /* opaque */

typedef struct cmce_open_options_t {
  /** Threads for the model and the shard search pool; 0 = 1. Clamped to the CPU count. */
  int32_t threads;
  /** Positions of the shards to load (NULL / 0 = all), e.g. to fit a memory budget. */
  const int32_t* shards;
  size_t n_shards;
  /** Trusted Ed25519 public key: 64 hex digits or a path to a .pub file. When set, galleries
   *  without a valid manifest.sig made with this key are refused (CMCE_ERR_SIGNATURE). */
  const char* public_key;
  /** "fp32", "fp16", "int8", "pal6", "pal4"; NULL = the most precise the bundle has. */
  const char* quantization;
  /** With no bundle (bundle_dir NULL): refuse a gallery whose space_id / dim differ.
   *  NULL / 0 = no check. Ignored when a bundle is given (its values are used). */
  const char* space_id;
  int32_t dim;
} cmce_open_options_t;

/**
 * Verify and open a bundle and a gallery. `bundle_dir` may be NULL: then only search by
 * vector works (embed and search-by-image return CMCE_ERR_ARGUMENT). `options` may be NULL
 * (defaults). On success `*out` is a new handle; on failure `*out` is NULL.
 */
CMCE_API cmce_status cmce_open(const char* bundle_dir, const char* gallery_dir,
                               const cmce_open_options_t* options, cmce_query_t** out,
                               cmce_error_t* error);

/** Free the handle and everything it owns. NULL is allowed. */
CMCE_API void cmce_close(cmce_query_t* query);

typedef struct cmce_info_t {
  int32_t dim;                /* embedding dimension */
  int64_t count;              /* live (not deleted) items in the loaded shards */
  int32_t shards_loaded;      /* shards loaded */
  int32_t shards_total;       /* shards in the gallery manifest */
  int32_t threads;            /* threads in use (after clamping) */
  uint64_t memory_bytes;      /* bytes in use: hnswlib index data + its tables + sidecars */
  bool has_model;             /* a bundle was opened (embedding works) */
  const char* space_id;       /* handle-owned */
  const char* model_file;     /* the bundle artifact in use, "" without a bundle */
  const char* quantization;   /* of that artifact, "" without a bundle */
} cmce_info_t;

CMCE_API cmce_status cmce_info(const cmce_query_t* query, cmce_info_t* out,
                               cmce_error_t* error);

/** Bytes in use (same as cmce_info's memory_bytes); 0 for NULL. */
CMCE_API uint64_t cmce_memory_bytes(const cmce_query_t* query);

/* ------------------------------------------------------------------------------ embed */

/* Each writes the L2-normalised query vector (dim floats, see cmce_info) into `out`, which
 * holds `out_dim` floats (must equal dim). Image problems are CMCE_ERR_DATA. */

/** A PNG or JPEG file. */
CMCE_API cmce_status cmce_embed_file(cmce_query_t* query, const char* image_path, float* out,
                                     size_t out_dim, cmce_error_t* error);
/** Encoded PNG/JPEG bytes. */
CMCE_API cmce_status cmce_embed_encoded(cmce_query_t* query, const uint8_t* bytes,
                                        size_t n_bytes, float* out, size_t out_dim,
                                        cmce_error_t* error);
/** Raw 8-bit pixels, row-major, interleaved: channels 1 (grey), 3 (RGB) or 4 (RGBA). */
CMCE_API cmce_status cmce_embed_pixels(cmce_query_t* query, const uint8_t* pixels,
                                       int32_t height, int32_t width, int32_t channels,
                                       float* out, size_t out_dim, cmce_error_t* error);

/* ------------------------------------------------------------------------------ search */

typedef struct cmce_search_options_t {
  /** Hits wanted; 0 = 10. More than the live items returns all of them. */
  uint32_t k;
  /** Leave out items whose stored uncertainty is above `max_uncertainty`. */
  bool use_max_uncertainty;
  double max_uncertainty;
  /** Or above a quantile of the manifest's uncertainty_quantiles, named "q0.9" or "0.9"
   *  (CMCE_ERR_ARGUMENT if the manifest has no such quantile). Not with use_max_uncertainty. */
  const char* max_uncertainty_quantile;
} cmce_search_options_t;

/** One hit. Strings are handle-owned (valid until cmce_close). */
typedef struct cmce_hit_t {
  const char* id;           /* the gallery item's id */
  float score;              /* cosine similarity, higher is closer */
  float uncertainty;        /* its stored ensemble uncertainty */
  const char* payload_json; /* its payload as a JSON object, or "" for none */
  const char* class_name;   /* its class from the sidecar, or "" for none */
  int64_t label;            /* the hnswlib label (unique over the gallery) */
} cmce_hit_t;

/**
 * Search by one L2-normalised vector of `dim` floats (checked: finite, norm 1 +- 1e-3).
 * Writes at most `capacity` hits (best first) to `hits`, their number to `*n_hits`.
 * `options` may be NULL (k = 10, no rejection).
 */
CMCE_API cmce_status cmce_search_vector(const cmce_query_t* query, const float* vector,
                                        size_t dim, const cmce_search_options_t* options,
                                        cmce_hit_t* hits, size_t capacity, size_t* n_hits,
                                        cmce_error_t* error);

/**
 * Search `n` vectors (row-major n x dim). Row i's hits go to hits[i * capacity ...], their
 * number to n_hits[i]. All rows are checked before any is searched.
 */
CMCE_API cmce_status cmce_search_vectors(const cmce_query_t* query, const float* vectors,
                                         size_t n, size_t dim,
                                         const cmce_search_options_t* options, cmce_hit_t* hits,
                                         size_t capacity, size_t* n_hits, cmce_error_t* error);

/** Embed an image file / encoded bytes / raw pixels, then search (as cmce_search_vector). */
CMCE_API cmce_status cmce_search_file(cmce_query_t* query, const char* image_path,
                                      const cmce_search_options_t* options, cmce_hit_t* hits,
                                      size_t capacity, size_t* n_hits, cmce_error_t* error);
CMCE_API cmce_status cmce_search_encoded(cmce_query_t* query, const uint8_t* bytes,
                                         size_t n_bytes, const cmce_search_options_t* options,
                                         cmce_hit_t* hits, size_t capacity, size_t* n_hits,
                                         cmce_error_t* error);
CMCE_API cmce_status cmce_search_pixels(cmce_query_t* query, const uint8_t* pixels,
                                        int32_t height, int32_t width, int32_t channels,
                                        const cmce_search_options_t* options, cmce_hit_t* hits,
                                        size_t capacity, size_t* n_hits, cmce_error_t* error);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* CMCE_QUERY_H */
