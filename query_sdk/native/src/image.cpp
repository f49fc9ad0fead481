// Query images as the model takes them: a port of query_sdk/images.py (decode_image, _from_pil)
// and query_sdk/spec.py (to_model_input) with Pillow 13's arithmetic, bit-exact on PNG and, with
// the same libjpeg-turbo IDCT (JDCT_ISLOW, fancy upsampling), on JPEG.
//
// Compiled with -ffp-contract=off (cmake/embedder.cmake): Pillow's resampling coefficients are
// computed in double, and a fused multiply-add would round them differently.
#include "image.h"

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include <jpeglib.h>

#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_NO_STDIO
#define STBI_NO_LINEAR
#define STBI_NO_HDR
#include <stb/stb_image.h>

#include "cmce_query.h"
#include "common.h"
#include "fileio.h"

namespace cmce {

namespace {

// Largest image file read into memory: far above any photo (a 67 MP PNG is ~200 MB at most).
constexpr uint64_t kMaxImageFileBytes = 512ull << 20;
constexpr int kJpegScales[] = {2, 4, 8};  // images._JPEG_SCALES

[[noreturn]] void image_error(const std::string& message) { fail(CMCE_ERR_DATA, message); }

// A decoded image before conversion: h x w x c (c = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).
struct Image {
  int width = 0, height = 0, channels = 0;
  std::vector<uint8_t> px;
};

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}

// ------------------------------------------------------------------ orientation (EXIF / XMP)

// Tag 0x0112 of IFD0 in a TIFF block ("II*\0" / "MM\0*"): its value if present (0 when it is
// not a single integer), nullopt when the block or the tag is missing.
std::optional<int> tiff_orientation(const uint8_t* d, size_t n) {
  if (n >= 6 && std::memcmp(d, "Exif\0\0", 6) == 0) d += 6, n -= 6;
  if (n < 8) return std::nullopt;
  const bool le = std::memcmp(d, "II*\0", 4) == 0;
  if (!le && std::memcmp(d, "MM\0*", 4) != 0) return std::nullopt;
  auto u16 = [&](size_t o) { return le ? d[o] | (d[o + 1] << 8) : (d[o] << 8) | d[o + 1]; };
  auto u32 = [&](size_t o) {
    return le ? uint32_t(d[o]) | (uint32_t(d[o + 1]) << 8) | (uint32_t(d[o + 2]) << 16) |
                    (uint32_t(d[o + 3]) << 24)
              : be32(d + o);
  };
  const size_t ifd = u32(4);
  if (ifd > n || n - ifd < 2) return std::nullopt;
  const size_t count = u16(ifd);
  for (size_t i = 0; i < count; ++i) {
    const size_t e = ifd + 2 + 12 * i;
    if (e > n || n - e < 12) break;
    if (u16(e) != 0x0112) continue;
    const int type = u16(e + 2);
    if (u32(e + 4) != 1) return 0;
    if (type == 3) return u16(e + 8);  // SHORT
    if (type == 4) return static_cast<int>(u32(e + 8) & 0x7fffffff);  // LONG
    if (type == 1) return d[e + 8];  // BYTE
    return 0;
  }
  return std::nullopt;
}

// Pillow's XMP fallback (Image.getexif): the first tiff:Orientation="N" or >N in the packet.
std::optional<int> xmp_orientation(const uint8_t* d, size_t n) {
  static const char kKey[] = "tiff:Orientation";
  const size_t k = sizeof kKey - 1;
  for (size_t i = 0; i + k + 1 < n; ++i) {
    if (std::memcmp(d + i, kKey, k) != 0) continue;
    const size_t j = i + k;
    if (d[j] == '>' && j + 1 < n && d[j + 1] >= '0' && d[j + 1] <= '9') return d[j + 1] - '0';
    if (d[j] == '=' && j + 2 < n && d[j + 1] == '"' && d[j + 2] >= '0' && d[j + 2] <= '9')
      return d[j + 2] - '0';
  }
  return std::nullopt;
}

int pick_orientation(std::optional<int> exif, std::optional<int> xmp) {
  return exif ? *exif : xmp.value_or(1);
}

// Orientation in a PNG: the eXIf chunk (anywhere), else XMP in an uncompressed iTXt or a tEXt
// chunk keyed "XML:com.adobe.xmp" (Pillow reads both into info).
int png_orientation(const uint8_t* d, size_t n) {
  std::optional<int> exif, xmp;
  static const char kXmpKey[] = "XML:com.adobe.xmp";
  const size_t keylen = sizeof kXmpKey;  // with its NUL
  for (size_t o = 8; o + 12 <= n;) {
    const uint32_t len = be32(d + o);
    if (len > n - o - 12) break;
    const uint8_t* type = d + o + 4;
    const uint8_t* data = d + o + 8;
    if (std::memcmp(type, "eXIf", 4) == 0 && !exif) {
      exif = tiff_orientation(data, len);
    } else if ((std::memcmp(type, "iTXt", 4) == 0 || std::memcmp(type, "tEXt", 4) == 0) &&
               len > keylen && std::memcmp(data, kXmpKey, keylen) == 0) {
      size_t text = keylen;
      if (type[0] == 'i') {  // compression flag, method, language\0, translated keyword\0
        if (len < text + 2 || data[text] != 0) {
          o += 12 + len;
          continue;  // compressed XMP: not read (see the report)
        }
        text += 2;
        for (int field = 0; field < 2 && text < len; ++text)
          if (data[text] == 0) ++field;
      }
      if (text <= len) xmp = xmp_orientation(data + text, len - text);
    } else if (std::memcmp(type, "IEND", 4) == 0) {
      break;
    }
    o += 12 + len;
  }
  return pick_orientation(exif, xmp);
}

// Orientation in a JPEG: APP1 "Exif" (the first), else the last APP1 XMP packet.
int jpeg_orientation(const uint8_t* d, size_t n) {
  std::optional<int> exif, xmp;
  static const char kXmp[] = "http://ns.adobe.com/xap/1.0/";
  for (size_t o = 2; o + 4 <= n;) {
    if (d[o] != 0xFF) break;
    const uint8_t marker = d[o + 1];
    if (marker == 0xFF) {
      ++o;
      continue;
    }
    if (marker == 0xDA || marker == 0xD9) break;  // start of scan / end of image
    const size_t len = (d[o + 2] << 8) | d[o + 3];
    if (len < 2 || len > n - o - 2) break;
    const uint8_t* s = d + o + 4;
    const size_t sn = len - 2;
    if (marker == 0xE1 && sn >= 6 && std::memcmp(s, "Exif\0\0", 6) == 0) {
      if (!exif) exif = tiff_orientation(s, sn);
    } else if (marker == 0xE1 && sn >= sizeof kXmp && std::memcmp(s, kXmp, sizeof kXmp) == 0) {
      xmp = xmp_orientation(s + sizeof kXmp, sn - sizeof kXmp);
    }
    o += 2 + len;
  }
  return pick_orientation(exif, xmp);
}

// ImageOps.exif_transpose: orientation 2..8 -> the transpose that makes it 1.
Image orient(Image im, int orientation) {
  if (orientation < 2 || orientation > 8) return im;
  const bool swap = orientation >= 5;
  Image out;
  out.width = swap ? im.height : im.width;
  out.height = swap ? im.width : im.height;
  out.channels = im.channels;
  out.px.resize(im.px.size());
  const int c = im.channels, W = im.width, H = im.height;
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int sx = x, sy = y;  // the source pixel of out (x, y)
      switch (orientation) {
        case 2: sx = W - 1 - x; break;                       // FLIP_LEFT_RIGHT
        case 3: sx = W - 1 - x, sy = H - 1 - y; break;       // ROTATE_180
        case 4: sy = H - 1 - y; break;                       // FLIP_TOP_BOTTOM
        case 5: sx = y, sy = x; break;                       // TRANSPOSE
        case 6: sx = y, sy = H - 1 - x; break;               // ROTATE_270
        case 7: sx = W - 1 - y, sy = H - 1 - x; break;       // TRANSVERSE
        case 8: sx = W - 1 - y, sy = x; break;               // ROTATE_90
      }
      std::memcpy(&out.px[(size_t(y) * out.width + x) * c], &im.px[(size_t(sy) * W + sx) * c], c);
    }
  }
  return out;
}

// ------------------------------------------------------------------ decoders

std::string budget_message(const std::string& name, uint64_t width, uint64_t height,
                           const PixelSpec& spec) {
  return name + ": " + std::to_string(width) + "x" + std::to_string(height) +
         " pixels is more than the " + std::to_string(pixel_budget(spec)) +
         " an image for this " + std::to_string(spec.height) + "x" + std::to_string(spec.width) +
         " model may decode to (max(4096x4096, 4x its input)); downscale it first";
}

// PNG through stb_image, in the file's own channels; 16-bit grey scaled as _from_pil does
// (rint(v * 255 / 65535)), other 16-bit data cut to its high byte as Pillow's unpackers do.
Image decode_png(const uint8_t* d, size_t n, const PixelSpec& spec, const std::string& name) {
  if (n < 33 || std::memcmp(d + 12, "IHDR", 4) != 0)
    image_error(name + ": cannot use this image: a PNG without its IHDR header");
  const uint64_t width = be32(d + 16), height = be32(d + 20);
  const int depth = d[24], color_type = d[25];
  if (width * height > pixel_budget(spec)) image_error(budget_message(name, width, height, spec));
  if (n > static_cast<size_t>(INT32_MAX))
    image_error(name + ": cannot use this image: more than 2 GiB of PNG");
  const int len = static_cast<int>(n);
  Image im;
  if (depth == 16 && color_type == 0) {  // "I;16": scaled to 8 bits, rounded
    stbi_us* p = stbi_load_16_from_memory(d, len, &im.width, &im.height, &im.channels, 0);
    if (!p) image_error(name + ": cannot use this image: " + stbi_failure_reason());
    im.px.resize(size_t(im.width) * im.height);
    for (size_t i = 0; i < im.px.size(); ++i) im.px[i] = uint8_t((p[i * im.channels] + 128) / 257);
    im.channels = 1;
    stbi_image_free(p);
    return im;
  }
  stbi_uc* p = stbi_load_from_memory(d, len, &im.width, &im.height, &im.channels, 0);
  if (!p) image_error(name + ": cannot use this image: " + stbi_failure_reason());
  im.px.assign(p, p + size_t(im.width) * im.height * im.channels);
  stbi_image_free(p);
  return im;
}

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_error_exit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void jpeg_silent(j_common_ptr, int) {}

// JPEG through libjpeg-turbo with Pillow's settings (JpegDecode.c): ISLOW IDCT, fancy
// upsampling, DCT scaling when the header is over the budget (JpegImagePlugin.draft); CMYK
// (Adobe, inverted) to RGB with Pillow's cmyk2rgb.
Image decode_jpeg(const uint8_t* d, size_t n, const PixelSpec& spec, const std::string& name) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_error_exit;
  err.mgr.emit_message = jpeg_silent;
  Image im;
  std::vector<uint8_t> raw;
  std::string refusal;
  // Nothing with a destructor is created between setjmp and a longjmp back to it.
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    image_error(name + ": cannot use this image: " + err.message);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, d, static_cast<unsigned long>(n));
  jpeg_read_header(&cinfo, TRUE);
  const uint64_t width = cinfo.image_width, height = cinfo.image_height;
  const uint64_t budget = pixel_budget(spec);
  if (width * height > budget) {
    for (int scale : kJpegScales) {
      if ((width / scale) * (height / scale) > budget) continue;
      // Image.draft(None, (w // scale, h // scale)): Pillow picks the largest of 8, 4, 2, 1
      // that min(w // (w // scale), h // (h // scale)) reaches.
      const uint64_t want_w = std::max<uint64_t>(width / scale, 1);
      const uint64_t want_h = std::max<uint64_t>(height / scale, 1);
      const uint64_t ratio = std::min(width / want_w, height / want_h);
      unsigned denom = 1;
      for (unsigned s : {8u, 4u, 2u, 1u}) {
        if (ratio >= s) {
          denom = s;
          break;
        }
      }
      cinfo.scale_num = 1;
      cinfo.scale_denom = denom;
      break;
    }
    const uint64_t sw = (width + cinfo.scale_denom - 1) / cinfo.scale_denom;
    const uint64_t sh = (height + cinfo.scale_denom - 1) / cinfo.scale_denom;
    if (sw * sh > budget) refusal = budget_message(name, width, height, spec);
  }
  if (refusal.empty()) {
    const int components = cinfo.num_components;
    cinfo.out_color_space = components == 1 ? JCS_GRAYSCALE : components == 4 ? JCS_CMYK : JCS_RGB;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_start_decompress(&cinfo);
    im.width = static_cast<int>(cinfo.output_width);
    im.height = static_cast<int>(cinfo.output_height);
    const int c = cinfo.output_components;
    try {
      raw.resize(size_t(im.width) * im.height * c);
    } catch (const std::bad_alloc&) {
      jpeg_destroy_decompress(&cinfo);
      throw;
    }
    while (cinfo.output_scanline < cinfo.output_height) {
      JSAMPROW row = raw.data() + size_t(cinfo.output_scanline) * im.width * c;
      jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_decompress(&cinfo);
    im.channels = c == 4 ? 3 : c;
  }
  jpeg_destroy_decompress(&cinfo);
  if (!refusal.empty()) image_error(refusal);
  if (im.channels != 3 || raw.size() == size_t(im.width) * im.height * 3) {
    im.px = std::move(raw);
    return im;
  }
  // "CMYK;I" (Adobe polarity: stored inverted), then cmyk2rgb (Convert.c).
  im.px.resize(size_t(im.width) * im.height * 3);
  for (size_t i = 0, j = 0; i < raw.size(); i += 4, j += 3) {
    const int nk = raw[i + 3];  // 255 - (255 - k)
    for (int ch = 0; ch < 3; ++ch) {
      const int v = 255 - raw[i + ch];
      const int tmp = v * nk + 128;
      const int out = nk - (((tmp >> 8) + tmp) >> 8);
      im.px[j + ch] = uint8_t(std::clamp(out, 0, 255));
    }
  }
  return im;
}

// ------------------------------------------------------------------ conversion and resize

// ITU-R 601 luma of an RGB pixel in Pillow's 16-bit fixed point (Image.convert("L"), L24).
uint8_t luma601(const uint8_t* p) {
  return uint8_t((p[0] * 19595u + p[1] * 38470u + p[2] * 7471u + 0x8000u) >> 16);
}

// Image.convert("L") (alpha ignored) or "RGB".
Pixels pil_convert(const Image& im, int channels) {
  const size_t n = size_t(im.width) * im.height;
  const int c = im.channels;
  Pixels out(n * channels);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = &im.px[i * c];
    if (channels == 1) {
      out[i] = c >= 3 ? luma601(p) : p[0];
    } else if (c >= 3) {
      std::memcpy(&out[i * 3], p, 3);
    } else {
      out[i * 3] = out[i * 3 + 1] = out[i * 3 + 2] = p[0];
    }
  }
  return out;
}

// Pillow's precompute_coeffs (Resample.c) for BILINEAR, then normalize_coeffs_8bpc.
constexpr int kPrecisionBits = 32 - 8 - 2;

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // (min, count) per output index
  std::vector<int32_t> k;   // ksize per output index, fixed point
};

Coeffs bilinear_coeffs(int in_size, int out_size) {
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  double scale = static_cast<double>(in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(size_t(out_size) * 2);
  c.k.resize(size_t(out_size) * c.ksize);
  std::vector<double> kk(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      double t = (x + xmin - center + 0.5) * ss;
      if (t < 0.0) t = -t;
      const double w = t < 1.0 ? 1.0 - t : 0.0;
      kk[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x)
      if (ww != 0.0) kk[x] /= ww;
    for (int x = xmax; x < c.ksize; ++x) kk[x] = 0;
    for (int x = 0; x < c.ksize; ++x) {
      const double v = kk[x];
      c.k[size_t(xx) * c.ksize + x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                                             : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[size_t(xx) * 2] = xmin;
    c.bounds[size_t(xx) * 2 + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int v) {
  const int s = v >> kPrecisionBits;
  return static_cast<uint8_t>(s < 0 ? 0 : s > 255 ? 255 : s);
}

// One separable pass of Pillow's 8bpc resampling: `horizontal` maps w -> out_w over the rows
// first_row .. first_row + rows of `in`; otherwise h -> out_h over every column.
Pixels resample_pass(const Pixels& in, int w, int c, const Coeffs& k, bool horizontal, int out_n,
                     int first_row, int rows) {
  Pixels out(horizontal ? size_t(rows) * out_n * c : size_t(out_n) * w * c);
  if (horizontal) {
    for (int y = 0; y < rows; ++y) {
      const uint8_t* line = &in[size_t(y + first_row) * w * c];
      for (int xx = 0; xx < out_n; ++xx) {
        const int xmin = k.bounds[size_t(xx) * 2], xmax = k.bounds[size_t(xx) * 2 + 1];
        const int32_t* kx = &k.k[size_t(xx) * k.ksize];
        for (int ch = 0; ch < c; ++ch) {
          int ss = 1 << (kPrecisionBits - 1);
          for (int x = 0; x < xmax; ++x) ss += line[size_t(x + xmin) * c + ch] * kx[x];
          out[(size_t(y) * out_n + xx) * c + ch] = clip8(ss);
        }
      }
    }
    return out;
  }
  const size_t stride = size_t(w) * c;
  for (int yy = 0; yy < out_n; ++yy) {
    const int ymin = k.bounds[size_t(yy) * 2], ymax = k.bounds[size_t(yy) * 2 + 1];
    const int32_t* ky = &k.k[size_t(yy) * k.ksize];
    for (size_t xx = 0; xx < stride; ++xx) {
      int ss = 1 << (kPrecisionBits - 1);
      for (int y = 0; y < ymax; ++y) ss += in[size_t(y + ymin) * stride + xx] * ky[y];
      out[size_t(yy) * stride + xx] = clip8(ss);
    }
  }
  return out;
}

// Image.resize(size, BILINEAR) on "L" or "RGB" as Pillow 13's ImagingResampleInner does it: a
// pass is skipped when its side is kept; the vertical pass goes first when it drops more than
// twice the rows the horizontal one drops columns, else the horizontal pass runs first over just
// the rows the vertical pass reads.
Pixels pil_resize(const Pixels& in, int w, int h, int c, int out_w, int out_h) {
  const bool need_h = out_w != w, need_v = out_h != h;
  const bool horizontal_first = !((h - out_h) > 0 && (h - out_h) > (w - out_w) * 2);
  Coeffs vert = bilinear_coeffs(h, out_h);
  const Coeffs hor = bilinear_coeffs(w, out_w);
  if (!horizontal_first) {
    Pixels tall = need_v ? resample_pass(in, w, c, vert, false, out_h, 0, 0) : in;
    return need_h ? resample_pass(tall, w, c, hor, true, out_w, 0, out_h) : tall;
  }
  if (!need_h) return resample_pass(in, w, c, vert, false, out_h, 0, 0);
  const int first = vert.bounds[0];
  const int last = vert.bounds[size_t(out_h) * 2 - 2] + vert.bounds[size_t(out_h) * 2 - 1];
  for (int i = 0; i < out_h; ++i) vert.bounds[size_t(i) * 2] -= first;
  Pixels wide = resample_pass(in, w, c, hor, true, out_w, first, last - first);
  return need_v ? resample_pass(wide, out_w, c, vert, false, out_h, 0, 0) : wide;
}

// to_model_input's resize step (pixels already in the spec's channels).
Pixels to_spec_size(Pixels px, int h, int w, const PixelSpec& spec) {
  if (h == spec.height && w == spec.width) return px;
  return pil_resize(px, w, h, spec.channels, spec.width, spec.height);
}

void check_spec(const PixelSpec& spec) {
  if (spec.height < 1 || spec.width < 1 || (spec.channels != 1 && spec.channels != 3))
    fail(CMCE_ERR_ARGUMENT, "input spec: height and width must be positive and channels 1 or 3");
}

template <typename Fn>
Status guarded(Fn&& fn) {
  try {
    fn();
    return {};
  } catch (const Error& e) {
    return {e.code, e.what()};
  } catch (const std::bad_alloc&) {
    return {CMCE_ERR_NO_MEMORY, "out of memory decoding an image"};
  }
}

}  // namespace

uint64_t pixel_budget(const PixelSpec& spec) {
  return std::max<uint64_t>(4096ull * 4096ull, 4ull * spec.height * spec.width);
}

Status image_to_input(const uint8_t* bytes, size_t n, const PixelSpec& spec, Pixels* out,
                      const std::string& name) {
  return guarded([&] {
    check_spec(spec);
    static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    Image im;
    if (n >= 8 && std::memcmp(bytes, kPng, 8) == 0) {
      im = orient(decode_png(bytes, n, spec, name), png_orientation(bytes, n));
    } else if (n >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) {
      im = orient(decode_jpeg(bytes, n, spec, name), jpeg_orientation(bytes, n));
    } else {
      image_error(name + ": cannot use this image: not a PNG or JPEG file (the native SDK "
                         "decodes those two)");
    }
    *out = to_spec_size(pil_convert(im, spec.channels), im.height, im.width, spec);
  });
}

Status image_file_to_input(const std::string& path, const PixelSpec& spec, Pixels* out) {
  std::vector<uint8_t> data;
  const Status read = guarded([&] {
    data = read_regular_file(path, kMaxImageFileBytes, "image", CMCE_ERR_DATA);
  });
  if (!read.ok()) return read;
  return image_to_input(data.data(), data.size(), spec, out, path);
}

Status pixels_to_input(const uint8_t* pixels, int height, int width, int channels,
                       const PixelSpec& spec, Pixels* out) {
  return guarded([&] {
    check_spec(spec);
    if (!pixels || height < 1 || width < 1 || (channels != 1 && channels != 3 && channels != 4))
      fail(CMCE_ERR_ARGUMENT, "pixels: height and width must be positive and channels 1, 3 or 4");
    const size_t n = size_t(height) * width;
    Pixels px(n * spec.channels);
    for (size_t i = 0; i < n; ++i) {
      const uint8_t* p = pixels + i * channels;
      if (spec.channels == 3) {
        for (int ch = 0; ch < 3; ++ch) px[i * 3 + ch] = p[channels == 1 ? 0 : ch];
      } else if (channels == 1) {
        px[i] = p[0];
      } else {
        px[i] = luma601(p);
      }
    }
    *out = to_spec_size(std::move(px), height, width, spec);
  });
}

}  // namespace cmce
