package org.cmce;

/** One search hit: a gallery item, its cosine score (higher is closer) and stored uncertainty. */
public final class Hit {
  public final String id;
  public final float score;
  public final float uncertainty;
  /** Its payload as a JSON object text, or null for none. */
  public final String payloadJson;
  /** Its class from the gallery's sidecar, or null for none. */
  public final String className;
  /** The hnswlib label (unique over the gallery). */
  public final long label;

  public Hit(
      String id, float score, float uncertainty, String payloadJson, String className, long label) {
    this.id = id;
    this.score = score;
    this.uncertainty = uncertainty;
    this.payloadJson = payloadJson;
    this.className = className;
    this.label = label;
  }

  @Override
  public String toString() {
    return "Hit(" + id + ", score " + score + ", uncertainty " + uncertainty + ")";
  }
}
