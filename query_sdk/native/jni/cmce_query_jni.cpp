// JNI glue of org.cmce.CmceQuery over the C API (include/cmce_query.h) only: it translates
// handles, buffers, strings and errors, nothing more. Strings come in as NUL-terminated UTF-8
// byte[] (made by the Java side) and go out through UTF-16, so no text is lost to JNI's
// modified UTF-8. A failed C call throws org.cmce.CmceException(code, name, message).
#include <jni.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cmce_query.h"
#include "utf16.h"

namespace {

cmce_query_t* from(jlong handle) { return reinterpret_cast<cmce_query_t*>(handle); }

jstring jstr(JNIEnv* env, const char* s) {
  const std::u16string u = cmce_tools::utf16(s);
  return env->NewString(reinterpret_cast<const jchar*>(u.data()), static_cast<jsize>(u.size()));
}

/** A NUL-terminated UTF-8 byte[] from the Java side, held for one call. */
class Utf8 {
 public:
  Utf8(JNIEnv* env, jbyteArray a) {
    if (!a) return;
    const jsize n = env->GetArrayLength(a);
    bytes_.resize(static_cast<size_t>(n) + 1, 0);
    env->GetByteArrayRegion(a, 0, n, reinterpret_cast<jbyte*>(bytes_.data()));
  }
  const char* get() const { return bytes_.empty() ? nullptr : bytes_.data(); }

 private:
  std::vector<char> bytes_;
};

std::vector<uint8_t> bytes_of(JNIEnv* env, jbyteArray a) {
  std::vector<uint8_t> out(a ? static_cast<size_t>(env->GetArrayLength(a)) : 0);
  if (a) env->GetByteArrayRegion(a, 0, static_cast<jsize>(out.size()), reinterpret_cast<jbyte*>(out.data()));
  return out;
}

/** Throw CmceException for a failed call; returns true when there was an error. */
bool thrown(JNIEnv* env, cmce_status status, const cmce_error_t& error) {
  if (status == CMCE_OK) return false;
  jclass cls = env->FindClass("org/cmce/CmceException");
  if (!cls) return true;  // NoClassDefFoundError is pending
  jmethodID init = env->GetMethodID(cls, "<init>", "(ILjava/lang/String;Ljava/lang/String;)V");
  if (!init) return true;
  jstring name = jstr(env, cmce_status_name(error.code));
  jstring message = name ? jstr(env, error.message) : nullptr;
  if (!message) return true;  // OutOfMemoryError is pending
  jobject e = env->NewObject(cls, init, static_cast<jint>(error.code), name, message);
  if (e) env->Throw(static_cast<jthrowable>(e));
  return true;
}

void throw_argument(JNIEnv* env, const char* message) {
  cmce_error_t e{};
  e.code = CMCE_ERR_ARGUMENT;
  std::snprintf(e.message, sizeof e.message, "%s", message);
  thrown(env, CMCE_ERR_ARGUMENT, e);
}

}  // namespace

extern "C" {

JNIEXPORT jlong JNICALL Java_org_cmce_CmceQuery_nativeOpen(JNIEnv* env, jclass, jbyteArray bundle,
                                                           jbyteArray gallery, jint threads, jintArray shards,
                                                           jbyteArray public_key, jbyteArray quantization) {
  const Utf8 b(env, bundle), g(env, gallery), key(env, public_key), quant(env, quantization);
  std::vector<int32_t> chosen(shards ? static_cast<size_t>(env->GetArrayLength(shards)) : 0);
  if (shards) env->GetIntArrayRegion(shards, 0, static_cast<jsize>(chosen.size()), reinterpret_cast<jint*>(chosen.data()));
  cmce_open_options_t opts{};
  opts.threads = threads;
  opts.shards = chosen.empty() ? nullptr : chosen.data();
  opts.n_shards = chosen.size();
  opts.public_key = key.get();
  opts.quantization = quant.get();
  cmce_query_t* q = nullptr;
  cmce_error_t error{};
  if (thrown(env, cmce_open(b.get(), g.get(), &opts, &q, &error), error)) return 0;
  return reinterpret_cast<jlong>(q);
}

JNIEXPORT void JNICALL Java_org_cmce_CmceQuery_nativeClose(JNIEnv*, jclass, jlong handle) {
  cmce_close(from(handle));
}

JNIEXPORT jint JNICALL Java_org_cmce_CmceQuery_nativeDim(JNIEnv*, jclass, jlong handle) {
  cmce_info_t info{};
  return cmce_info(from(handle), &info, nullptr) == CMCE_OK ? info.dim : 0;
}

JNIEXPORT jlong JNICALL Java_org_cmce_CmceQuery_nativeCount(JNIEnv*, jclass, jlong handle) {
  cmce_info_t info{};
  return cmce_info(from(handle), &info, nullptr) == CMCE_OK ? info.count : 0;
}

JNIEXPORT jlong JNICALL Java_org_cmce_CmceQuery_nativeMemoryBytes(JNIEnv*, jclass, jlong handle) {
  return static_cast<jlong>(cmce_memory_bytes(from(handle)));
}

JNIEXPORT jfloatArray JNICALL Java_org_cmce_CmceQuery_nativeEmbed(JNIEnv* env, jclass, jlong handle, jint dim,
                                                                  jbyteArray path, jbyteArray encoded,
                                                                  jbyteArray pixels, jint height, jint width,
                                                                  jint channels) {
  std::vector<float> v(static_cast<size_t>(dim));
  cmce_error_t error{};
  cmce_status s;
  if (path) {
    s = cmce_embed_file(from(handle), Utf8(env, path).get(), v.data(), v.size(), &error);
  } else if (encoded) {
    const auto b = bytes_of(env, encoded);
    s = cmce_embed_encoded(from(handle), b.data(), b.size(), v.data(), v.size(), &error);
  } else if (pixels) {
    const auto b = bytes_of(env, pixels);
    // the C API cannot see the buffer's length: check it covers height x width x channels
    if (height <= 0 || width <= 0 || channels <= 0 ||
        b.size() / static_cast<size_t>(height) / static_cast<size_t>(width) < static_cast<size_t>(channels)) {
      throw_argument(env, "embedPixels: the pixel array is shorter than height x width x channels");
      return nullptr;
    }
    s = cmce_embed_pixels(from(handle), b.data(), height, width, channels, v.data(), v.size(), &error);
  } else {
    throw_argument(env, "embed: no image given (null)");
    return nullptr;
  }
  if (thrown(env, s, error)) return nullptr;
  jfloatArray out = env->NewFloatArray(dim);
  if (out) env->SetFloatArrayRegion(out, 0, dim, v.data());
  return out;
}

JNIEXPORT jobjectArray JNICALL Java_org_cmce_CmceQuery_nativeSearch(JNIEnv* env, jclass, jlong handle,
                                                                    jfloatArray vector, jbyteArray path,
                                                                    jbyteArray encoded, jint k,
                                                                    jdouble max_uncertainty, jbyteArray quantile) {
  cmce_info_t info{};
  cmce_error_t error{};
  if (thrown(env, cmce_info(from(handle), &info, &error), error)) return nullptr;
  const Utf8 q(env, quantile);
  cmce_search_options_t opts{};
  opts.k = static_cast<uint32_t>(std::max(k, 1));
  opts.use_max_uncertainty = !std::isnan(max_uncertainty);
  opts.max_uncertainty = max_uncertainty;
  opts.max_uncertainty_quantile = q.get();
  // more than the live items returns all of them: no buffer larger than that
  std::vector<cmce_hit_t> hits(static_cast<size_t>(std::min<int64_t>(opts.k, std::max<int64_t>(info.count, 1))));
  size_t n = 0;
  cmce_status s;
  if (vector) {
    std::vector<float> v(static_cast<size_t>(env->GetArrayLength(vector)));
    env->GetFloatArrayRegion(vector, 0, static_cast<jsize>(v.size()), v.data());
    s = cmce_search_vector(from(handle), v.data(), v.size(), &opts, hits.data(), hits.size(), &n, &error);
  } else if (path) {
    s = cmce_search_file(from(handle), Utf8(env, path).get(), &opts, hits.data(), hits.size(), &n, &error);
  } else if (encoded) {
    const auto b = bytes_of(env, encoded);
    s = cmce_search_encoded(from(handle), b.data(), b.size(), &opts, hits.data(), hits.size(), &n, &error);
  } else {
    throw_argument(env, "search: no query given (null)");
    return nullptr;
  }
  if (thrown(env, s, error)) return nullptr;
  jclass cls = env->FindClass("org/cmce/Hit");
  if (!cls) return nullptr;
  jmethodID init = env->GetMethodID(cls, "<init>", "(Ljava/lang/String;FFLjava/lang/String;Ljava/lang/String;J)V");
  if (!init) return nullptr;
  jobjectArray out = env->NewObjectArray(static_cast<jsize>(n), cls, nullptr);
  for (size_t i = 0; out && i < n; ++i) {
    const cmce_hit_t& h = hits[i];
    jstring id = jstr(env, h.id);
    jstring payload = h.payload_json[0] && id ? jstr(env, h.payload_json) : nullptr;
    jstring cname = h.class_name[0] && id ? jstr(env, h.class_name) : nullptr;
    if (env->ExceptionCheck()) return nullptr;  // OutOfMemoryError
    jobject hit = env->NewObject(cls, init, id, h.score, h.uncertainty, payload, cname, static_cast<jlong>(h.label));
    if (!hit) return nullptr;
    env->SetObjectArrayElement(out, static_cast<jsize>(i), hit);
    env->DeleteLocalRef(hit);
    env->DeleteLocalRef(id);
    if (payload) env->DeleteLocalRef(payload);
    if (cname) env->DeleteLocalRef(cname);
  }
  return out;
}

}  // extern "C"
