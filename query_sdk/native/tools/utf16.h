// UTF-8 to UTF-16, shared by the JNI glue (Java strings) and the native CLI (JSON \u escapes).
#ifndef CMCE_TOOLS_UTF16_H
#define CMCE_TOOLS_UTF16_H

#include <cstdint>
#include <string>

namespace cmce_tools {

/** Decode NUL-terminated UTF-8; a malformed or overlong sequence becomes U+FFFD. */
inline std::u16string utf16(const char* s) {
  std::u16string out;
  const auto* p = reinterpret_cast<const unsigned char*>(s);
  while (*p) {
    uint32_t c = *p++, extra = 0, min = 0;
    if (c >= 0xF0 && c < 0xF5) {
      c &= 0x07, extra = 3, min = 0x10000;
    } else if (c >= 0xE0 && c < 0xF0) {
      c &= 0x0F, extra = 2, min = 0x800;
    } else if (c >= 0xC2 && c < 0xE0) {
      c &= 0x1F, extra = 1, min = 0x80;
    } else if (c >= 0x80) {
      c = 0xFFFD;
    }
    for (uint32_t i = 0; i < extra; ++i, ++p) {
      if ((*p & 0xC0) != 0x80) {  // also stops at the NUL
        c = 0xFFFD, min = 0;
        break;
      }
      c = (c << 6) | (*p & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c < 0xE000)) c = 0xFFFD;
    if (c >= 0x10000) {
      out.push_back(static_cast<char16_t>(0xD800 + ((c - 0x10000) >> 10)));
      out.push_back(static_cast<char16_t>(0xDC00 + ((c - 0x10000) & 0x3FF)));
    } else {
      out.push_back(static_cast<char16_t>(c));
    }
  }
  return out;
}

}  // namespace cmce_tools

#endif  // CMCE_TOOLS_UTF16_H
