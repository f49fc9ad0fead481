import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import org.cmce.CmceException;
import org.cmce.CmceQuery;
import org.cmce.Hit;

/**
 * Drives org.cmce.CmceQuery on the host JVM for tests/test_native_bindings.py.
 *
 * <pre>
 *   java CmceQueryCheck search BUNDLE GALLERY K IMAGE...   one line per image:
 *       IMAGE TAB id,id,... TAB score,score,... (after checking that searchFile, searchEncoded,
 *       embedFile + search and 4 threads at once agree, that a wrong dim and undecodable
 *       bytes are refused and leave the handle usable, and that a closed handle refuses)
 *   java CmceQueryCheck open BUNDLE GALLERY                "ok DIM COUNT" or
 *       "error CODE STATUS TAB MESSAGE" (the CmceException)
 * </pre>
 */
public final class CmceQueryCheck {
  private static void check(boolean ok, String what) {
    if (!ok) throw new AssertionError(what);
  }

  private static String ids(Hit[] hits) {
    StringBuilder s = new StringBuilder();
    for (Hit h : hits) s.append(s.length() == 0 ? "" : ",").append(h.id);
    return s.toString();
  }

  private static String scores(Hit[] hits) {
    StringBuilder s = new StringBuilder();
    for (Hit h : hits) s.append(s.length() == 0 ? "" : ",").append(h.score);
    return s.toString();
  }

  public static void main(String[] args) throws Exception {
    String bundle = args[1].equals("-") ? null : args[1];
    if (args[0].equals("open")) {
      try (CmceQuery q = CmceQuery.open(bundle, args[2], null)) {
        System.out.println("ok " + q.dim() + " " + q.count());
      } catch (CmceException e) {
        System.out.println("error " + e.code + " " + e.statusName + "\t" + e.getMessage());
      }
      return;
    }
    int k = Integer.parseInt(args[3]);
    List<String> images = Arrays.asList(args).subList(4, args.length);
    CmceQuery.SearchOptions options = new CmceQuery.SearchOptions().k(k);
    CmceQuery q = CmceQuery.open(bundle, args[2], new CmceQuery.Options().threads(1));
    check(q.memoryBytes() > 0, "memoryBytes() is 0");
    List<Hit[]> serial = new ArrayList<>();
    for (String image : images) {
      Hit[] byFile = q.searchFile(image, options);
      Hit[] byBytes = q.searchEncoded(Files.readAllBytes(Paths.get(image)), options);
      float[] v = q.embedFile(image);
      check(v.length == q.dim(), "embedFile: " + v.length + " floats, dim " + q.dim());
      Hit[] byVector = q.search(v, options);
      check(ids(byFile).equals(ids(byBytes)), image + ": searchEncoded differs from searchFile");
      check(ids(byFile).equals(ids(byVector)), image + ": search(embedFile) differs from searchFile");
      serial.add(byFile);
    }
    ExecutorService pool = Executors.newFixedThreadPool(4);
    List<Future<Hit[]>> parallel = new ArrayList<>();
    for (int round = 0; round < 4; ++round) {
      for (String image : images) parallel.add(pool.submit(() -> q.searchFile(image, options)));
    }
    for (int i = 0; i < parallel.size(); ++i) {
      check(ids(parallel.get(i).get()).equals(ids(serial.get(i % images.size()))),
          "4 threads at once: other hits for " + images.get(i % images.size()));
    }
    pool.shutdown();
    try {
      q.search(new float[q.dim() + 1], options);
      check(false, "a vector of the wrong dim was searched");
    } catch (CmceException e) {
      check(e.code == 20 && e.statusName.equals("ArgumentError"), "wrong dim: " + e.getMessage());
    }
    try {
      q.searchEncoded(new byte[] {1, 2, 3}, options);
      check(false, "three bytes were decoded as an image");
    } catch (CmceException e) {
      check(e.code == 5 && e.statusName.equals("DataError"), "undecodable: " + e.getMessage());
    }
    check(ids(q.searchFile(images.get(0), options)).equals(ids(serial.get(0))),
        "the handle changed after a refused image");
    q.close();
    q.close();  // idempotent
    try {
      q.searchFile(images.get(0), options);
      check(false, "a closed CmceQuery searched");
    } catch (IllegalStateException expected) {
      // what a closed handle does
    }
    for (int i = 0; i < images.size(); ++i) {
      System.out.println(images.get(i) + "\t" + ids(serial.get(i)) + "\t" + scores(serial.get(i)));
    }
  }
}
