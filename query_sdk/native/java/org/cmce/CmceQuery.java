package org.cmce;

import java.nio.charset.StandardCharsets;
import java.util.concurrent.locks.ReentrantReadWriteLock;

/**
 * A query bundle and a gallery opened together through libcmce_query (include/cmce_query.h).
 *
 * <pre>{@code
 * try (CmceQuery q = CmceQuery.open("bundle", "gallery", new CmceQuery.Options())) {
 *   for (Hit h : q.searchFile("shoe.png", new CmceQuery.SearchOptions().k(5))) { ... }
 * }
 * }</pre>
 *
 * Every method may be called from any number of threads at once; {@link #close} waits for the
 * calls in flight and later calls throw IllegalStateException. Errors are {@link CmceException}
 * with the C API's code and its one-line message naming the file and the problem.
 */
public final class CmceQuery implements AutoCloseable {
  static {
    System.loadLibrary("cmce_query_jni");
  }

  /** Options of {@link #open}; the defaults are the C API's (1 thread, all shards, ...). */
  public static final class Options {
    int threads;
    int[] shards;
    String publicKey;
    String quantization;

    /** Threads for the model and the shard search (clamped to the CPU count). */
    public Options threads(int n) {
      threads = n;
      return this;
    }

    /** Load only these shard positions. */
    public Options shards(int... positions) {
      shards = positions.clone();
      return this;
    }

    /** Refuse galleries not signed with this Ed25519 key (64 hex digits or a .pub path). */
    public Options publicKey(String key) {
      publicKey = key;
      return this;
    }

    /** "fp32", "int8", ...; default: the most precise artifact of the bundle. */
    public Options quantization(String name) {
      quantization = name;
      return this;
    }
  }

  /** Options of a search: k hits (default 10) and an optional uncertainty limit. */
  public static final class SearchOptions {
    int k = 10;
    double maxUncertainty = Double.NaN;
    String quantile;

    public SearchOptions k(int hits) {
      if (hits < 1) throw new IllegalArgumentException("k must be >= 1, got " + hits);
      k = hits;
      return this;
    }

    /** Leave out items whose stored uncertainty is above this value. */
    public SearchOptions maxUncertainty(double value) {
      maxUncertainty = value;
      return this;
    }

    /** Or above this quantile of the gallery's uncertainties, e.g. "q0.9". */
    public SearchOptions maxUncertaintyQuantile(String name) {
      quantile = name;
      return this;
    }
  }

  private final ReentrantReadWriteLock lock = new ReentrantReadWriteLock();
  private long handle;
  private final int dim;

  private CmceQuery(long handle) {
    this.handle = handle;
    this.dim = nativeDim(handle);
  }

  /** Verify and open a bundle (null: search by vector only) and a gallery. */
  public static CmceQuery open(String bundleDir, String galleryDir, Options options)
      throws CmceException {
    Options o = options == null ? new Options() : options;
    return new CmceQuery(
        nativeOpen(
            utf8(bundleDir), utf8(galleryDir), o.threads, o.shards, utf8(o.publicKey),
            utf8(o.quantization)));
  }

  /** The embedding dimension. */
  public int dim() {
    return dim;
  }

  /** Live items in the loaded shards. */
  public long count() {
    lock.readLock().lock();
    try {
      return nativeCount(live());
    } finally {
      lock.readLock().unlock();
    }
  }

  /** Bytes in use by the loaded index data, tables and sidecars. */
  public long memoryBytes() {
    lock.readLock().lock();
    try {
      return nativeMemoryBytes(live());
    } finally {
      lock.readLock().unlock();
    }
  }

  /** The L2-normalised query vector of a PNG/JPEG file. */
  public float[] embedFile(String imagePath) throws CmceException {
    lock.readLock().lock();
    try {
      return nativeEmbed(live(), dim, utf8(imagePath), null, null, 0, 0, 0);
    } finally {
      lock.readLock().unlock();
    }
  }

  /** The query vector of encoded PNG/JPEG bytes. */
  public float[] embedEncoded(byte[] bytes) throws CmceException {
    lock.readLock().lock();
    try {
      return nativeEmbed(live(), dim, null, bytes, null, 0, 0, 0);
    } finally {
      lock.readLock().unlock();
    }
  }

  /** The query vector of 8-bit pixels, row-major, interleaved, 1, 3 or 4 channels. */
  public float[] embedPixels(byte[] pixels, int height, int width, int channels)
      throws CmceException {
    lock.readLock().lock();
    try {
      return nativeEmbed(live(), dim, null, null, pixels, height, width, channels);
    } finally {
      lock.readLock().unlock();
    }
  }

  /** Hits for one L2-normalised vector of {@link #dim} floats, best first. */
  public Hit[] search(float[] vector, SearchOptions options) throws CmceException {
    SearchOptions o = options == null ? new SearchOptions() : options;
    lock.readLock().lock();
    try {
      return nativeSearch(live(), vector, null, null, o.k, o.maxUncertainty, utf8(o.quantile));
    } finally {
      lock.readLock().unlock();
    }
  }

  /** Embed a PNG/JPEG file, then search. */
  public Hit[] searchFile(String imagePath, SearchOptions options) throws CmceException {
    SearchOptions o = options == null ? new SearchOptions() : options;
    lock.readLock().lock();
    try {
      return nativeSearch(
          live(), null, utf8(imagePath), null, o.k, o.maxUncertainty, utf8(o.quantile));
    } finally {
      lock.readLock().unlock();
    }
  }

  /** Embed encoded PNG/JPEG bytes, then search. */
  public Hit[] searchEncoded(byte[] bytes, SearchOptions options) throws CmceException {
    SearchOptions o = options == null ? new SearchOptions() : options;
    lock.readLock().lock();
    try {
      return nativeSearch(live(), null, null, bytes, o.k, o.maxUncertainty, utf8(o.quantile));
    } finally {
      lock.readLock().unlock();
    }
  }

  /** Free the native handle (waits for calls in flight); later calls throw. Idempotent. */
  @Override
  public void close() {
    lock.writeLock().lock();
    try {
      if (handle != 0) {
        nativeClose(handle);
        handle = 0;
      }
    } finally {
      lock.writeLock().unlock();
    }
  }

  private long live() {
    if (handle == 0) throw new IllegalStateException("CmceQuery is closed");
    return handle;
  }

  /** NUL-terminated UTF-8 (exact for every string, unlike JNI's modified UTF-8), or null. */
  private static byte[] utf8(String s) {
    if (s == null) return null;
    byte[] b = s.getBytes(StandardCharsets.UTF_8);
    byte[] z = new byte[b.length + 1];
    System.arraycopy(b, 0, z, 0, b.length);
    return z;
  }

  private static native long nativeOpen(
      byte[] bundle, byte[] gallery, int threads, int[] shards, byte[] publicKey,
      byte[] quantization) throws CmceException;

  private static native void nativeClose(long handle);

  private static native int nativeDim(long handle);

  private static native long nativeCount(long handle);

  private static native long nativeMemoryBytes(long handle);

  private static native float[] nativeEmbed(
      long handle, int dim, byte[] path, byte[] encoded, byte[] pixels, int height, int width,
      int channels) throws CmceException;

  private static native Hit[] nativeSearch(
      long handle, float[] vector, byte[] path, byte[] encoded, int k, double maxUncertainty,
      byte[] quantile) throws CmceException;
}
