/* cmce_probe: open a gallery (and bundle) through the C API, search, print one JSON object.
 * Written in C99 so that it also proves the header is plain C. Used by tests/test_native_sdk.py.
 *
 *   cmce_probe --gallery DIR [--bundle DIR] [--public-key KEY] [--shards 0,2] [--threads N]
 *              [--k K] [--max-uncertainty X | --quantile q0.9]
 *              [--queries FILE.f32 --n N] [--random N] [--image FILE]...
 *              [--time R] [--concurrent T]
 *
 * --time R: also search the queries one at a time, R rounds, and report the latency of one
 * cmce_search_vector call (p50, p90 in microseconds). --concurrent T: search all queries from
 * T threads at once on the one handle and report whether every thread got the sequential hits.
 *
 * Output: {"ok": true, "info": {...}, "results": [[{"id", "score", "uncertainty", "payload",
 * "class", "label"}, ...], ...]} or {"ok": false, "code": 2, "class": "FormatError",
 * "message": "..."}; exit code 0 either way (1 for bad usage).
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cmce_query.h"

static void json_string(const char* s) {
  putchar('"');
  for (const unsigned char* p = (const unsigned char*)s; *p; ++p) {
    if (*p == '"' || *p == '\\') {
      printf("\\%c", *p);
    } else if (*p < 0x20) {
      printf("\\u%04x", *p);
    } else {
      putchar(*p);
    }
  }
  putchar('"');
}

static void print_error(const cmce_error_t* e) {
  printf("{\"ok\": false, \"code\": %d, \"class\": ", e->code);
  json_string(cmce_status_name(e->code));
  printf(", \"message\": ");
  json_string(e->message);
  printf("}\n");
}

static void print_hits(const cmce_hit_t* hits, size_t n) {
  printf("[");
  for (size_t i = 0; i < n; ++i) {
    printf("%s{\"id\": ", i ? ", " : "");
    json_string(hits[i].id);
    printf(", \"score\": %.9g, \"uncertainty\": %.9g, \"payload\": %s, \"class\": ", hits[i].score,
           hits[i].uncertainty, hits[i].payload_json[0] ? hits[i].payload_json : "null");
    json_string(hits[i].class_name);
    printf(", \"label\": %lld}", (long long)hits[i].label);
  }
  printf("]");
}

/* xorshift64* normal-ish vectors (sum of uniforms), normalised: reproducible random queries */
static double uniform(unsigned long long* s) {
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return (double)((*s * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

static int compare_double(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

struct worker {
  const cmce_query_t* q;
  const float* vectors;
  size_t n, dim, k;
  const cmce_search_options_t* opts;
  const cmce_hit_t* expected;
  const size_t* expected_counts;
  int same;
};

static void* concurrent_search(void* arg) {
  struct worker* w = arg;
  cmce_hit_t* hits = malloc(w->k * sizeof(cmce_hit_t));
  cmce_error_t err;
  w->same = 1;
  for (size_t r = 0; r < w->n; ++r) {
    size_t got = 0;
    if (cmce_search_vector(w->q, w->vectors + r * w->dim, w->dim, w->opts, hits, w->k, &got, &err) != CMCE_OK ||
        got != w->expected_counts[r]) {
      w->same = 0;
      continue;
    }
    for (size_t i = 0; i < got; ++i) {
      const cmce_hit_t* e = w->expected + r * w->k + i;
      if (hits[i].label != e->label || hits[i].score != e->score || hits[i].id != e->id) w->same = 0;
    }
  }
  free(hits);
  return NULL;
}

int main(int argc, char** argv) {
  const char *gallery = NULL, *bundle = NULL, *queries_file = NULL, *quantile = NULL;
  const char* images[256];
  size_t n_images = 0, n_queries = 0, n_random = 0, rounds = 0, concurrent = 0;
  int32_t shards[1024];
  cmce_open_options_t opts;
  cmce_search_options_t sopts;
  memset(&opts, 0, sizeof opts);
  memset(&sopts, 0, sizeof sopts);
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!v) {
      fprintf(stderr, "cmce_probe: %s needs a value\n", a);
      return 1;
    }
    ++i;
    if (!strcmp(a, "--gallery")) gallery = v;
    else if (!strcmp(a, "--bundle")) bundle = v;
    else if (!strcmp(a, "--public-key")) opts.public_key = v;
    else if (!strcmp(a, "--quantization")) opts.quantization = v;
    else if (!strcmp(a, "--threads")) opts.threads = atoi(v);
    else if (!strcmp(a, "--k")) sopts.k = (uint32_t)strtoul(v, NULL, 10);
    else if (!strcmp(a, "--max-uncertainty")) {
      sopts.use_max_uncertainty = true;
      sopts.max_uncertainty = strtod(v, NULL);
    } else if (!strcmp(a, "--quantile")) quantile = v;
    else if (!strcmp(a, "--queries")) queries_file = v;
    else if (!strcmp(a, "--n")) n_queries = strtoul(v, NULL, 10);
    else if (!strcmp(a, "--random")) n_random = strtoul(v, NULL, 10);
    else if (!strcmp(a, "--image") && n_images < 256) images[n_images++] = v;
    else if (!strcmp(a, "--time")) rounds = strtoul(v, NULL, 10);
    else if (!strcmp(a, "--concurrent")) concurrent = strtoul(v, NULL, 10);
    else if (!strcmp(a, "--shards")) {
      for (const char* p = v; *p && opts.n_shards < 1024; ++opts.n_shards) {
        char* end;
        shards[opts.n_shards] = (int32_t)strtol(p, &end, 10);
        p = *end == ',' ? end + 1 : end;
      }
      opts.shards = shards;
    } else {
      fprintf(stderr, "cmce_probe: unknown option %s\n", a);
      return 1;
    }
  }
  if (!gallery) {
    fprintf(stderr, "usage: cmce_probe --gallery DIR [options], see the source\n");
    return 1;
  }
  sopts.max_uncertainty_quantile = quantile;
  cmce_error_t err;
  cmce_query_t* q = NULL;
  if (cmce_open(bundle, gallery, &opts, &q, &err) != CMCE_OK) {
    print_error(&err);
    return 0;
  }
  cmce_info_t info;
  cmce_info(q, &info, &err);
  const size_t dim = (size_t)info.dim, k = sopts.k ? sopts.k : 10;
  float* vectors = NULL;
  size_t n = 0;
  if (queries_file) {
    FILE* f = fopen(queries_file, "rb");
    n = n_queries;
    vectors = malloc(n * dim * sizeof(float) + 1);
    if (!f || fread(vectors, sizeof(float), n * dim, f) != n * dim) {
      fprintf(stderr, "cmce_probe: cannot read %zu x %zu floats from %s\n", n, dim, queries_file);
      return 1;
    }
    fclose(f);
  } else if (n_random) {
    unsigned long long s = 88172645463325252ULL;
    n = n_random;
    vectors = malloc(n * dim * sizeof(float) + 1);
    for (size_t r = 0; r < n; ++r) {
      double norm = 0;
      for (size_t d = 0; d < dim; ++d) {
        double x = uniform(&s) + uniform(&s) + uniform(&s) - 1.5;
        vectors[r * dim + d] = (float)x;
        norm += x * x;
      }
      for (size_t d = 0; d < dim; ++d) vectors[r * dim + d] = (float)(vectors[r * dim + d] / sqrt(norm));
    }
  }
  printf("{\"ok\": true, \"info\": {\"dim\": %d, \"count\": %lld, \"shards_loaded\": %d, "
         "\"shards_total\": %d, \"threads\": %d, \"memory_bytes\": %llu, \"has_model\": %s, \"space_id\": ",
         info.dim, (long long)info.count, info.shards_loaded, info.shards_total, info.threads,
         (unsigned long long)info.memory_bytes, info.has_model ? "true" : "false");
  json_string(info.space_id);
  printf(", \"quantization\": ");
  json_string(info.quantization);
  printf(", \"version\": ");
  json_string(cmce_version());
  printf("}, \"results\": [");
  cmce_hit_t* hits = malloc((n ? n : 1) * k * sizeof(cmce_hit_t));
  size_t* counts = malloc((n ? n : 1) * sizeof(size_t));
  int failed = 0;
  if (n) {
    if (cmce_search_vectors(q, vectors, n, dim, &sopts, hits, k, counts, &err) != CMCE_OK) {
      failed = 1;
    } else {
      for (size_t r = 0; r < n; ++r) {
        printf("%s", r ? ", " : "");
        print_hits(hits + r * k, counts[r]);
      }
    }
  }
  printf("], \"images\": [");
  for (size_t i = 0; i < n_images && !failed; ++i) {
    size_t got = 0;
    printf("%s", i ? ", " : "");
    if (cmce_search_file(q, images[i], &sopts, hits, k, &got, &err) != CMCE_OK) {
      printf("{\"error\": ");
      json_string(cmce_status_name(err.code));
      printf(", \"message\": ");
      json_string(err.message);
      printf("}");
    } else {
      print_hits(hits, got);
    }
  }
  printf("]");
  if (n && !failed && rounds) {
    double* us = malloc(n * rounds * sizeof(double));
    cmce_hit_t* scratch = malloc(k * sizeof(cmce_hit_t));
    size_t got;
    for (size_t t = 0; t < n * rounds; ++t) {
      const double start = now_us();
      cmce_search_vector(q, vectors + (t % n) * dim, dim, &sopts, scratch, k, &got, &err);
      us[t] = now_us() - start;
    }
    qsort(us, n * rounds, sizeof(double), compare_double);
    printf(", \"latency_us\": {\"p50\": %.2f, \"p90\": %.2f, \"calls\": %zu}", us[n * rounds / 2],
           us[n * rounds * 9 / 10], n * rounds);
    free(us);
    free(scratch);
  }
  if (n && !failed && concurrent) {
    pthread_t threads[64];
    struct worker workers[64];
    size_t t_count = concurrent > 64 ? 64 : concurrent;
    int all_same = 1;
    for (size_t t = 0; t < t_count; ++t) {
      workers[t] = (struct worker){q, vectors, n, dim, k, &sopts, hits, counts, 0};
      pthread_create(&threads[t], NULL, concurrent_search, &workers[t]);
    }
    for (size_t t = 0; t < t_count; ++t) {
      pthread_join(threads[t], NULL);
      all_same = all_same && workers[t].same;
    }
    printf(", \"concurrent_same\": %s", all_same ? "true" : "false");
  }
  if (failed) {
    printf(", \"search_error\": ");
    print_error(&err);
  }
  printf("}\n");
  free(hits);
  free(counts);
  free(vectors);
  cmce_close(q);
  return 0;
}
