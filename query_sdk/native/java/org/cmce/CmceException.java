package org.cmce;

/**
 * A refusal or failure of libcmce_query: the C API's status code, its name and the one-line
 * message naming the file and the problem (getMessage()).
 */
public final class CmceException extends Exception {
  private static final long serialVersionUID = 1L;

  /** The cmce_status (2 FormatError, 3 SignatureError, 5 DataError, 7 BackendError, ...). */
  public final int code;

  /** The status's name, as query_sdk/errors.py names the class ("FormatError", ...). */
  public final String statusName;

  public CmceException(int code, String statusName, String message) {
    super(message);
    this.code = code;
    this.statusName = statusName;
  }

  @Override
  public String toString() {
    return "CmceException: " + statusName + " (" + code + "): " + getMessage();
  }
}
