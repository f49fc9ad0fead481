// Query images as the model takes them (query_sdk/images.py + query_sdk/spec.py, bit-exact):
// decode (PNG: stb_image, JPEG: libjpeg-turbo), EXIF orientation, channel conversion with
// Pillow's arithmetic, Pillow's BILINEAR resize. The exported model takes the app's uint8 NHWC
// pixels and normalises inside (export/graph.py): mean/std are not applied here. Nothing throws:
// every function returns a Status (CMCE_ERR_DATA naming the image, CMCE_ERR_NO_MEMORY).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace cmce {

// The bundle's input_spec as the preprocessing needs it (height, width, channels 1 or 3).
struct PixelSpec {
  int height = 0, width = 0, channels = 0;
};

// A cmce_status code (CMCE_OK = 0) and a one-line message naming the file.
struct Status {
  int code = 0;
  std::string message;
  bool ok() const { return code == 0; }
};

// One image as the model takes it: height x width x channels uint8, row-major, interleaved.
using Pixels = std::vector<uint8_t>;

// Most pixels an image for `spec` decodes to: max(4096 * 4096, 4 * H * W) (images.pixel_budget).
uint64_t pixel_budget(const PixelSpec& spec);

// A PNG or JPEG file / its bytes -> the model input, as query_sdk.images.decode_image: the header
// is checked against pixel_budget before any pixel is decoded (a JPEG over it is decoded at 1/2,
// 1/4 or 1/8 a side, like Pillow's draft), EXIF orientation applied, 16-bit grey scaled, then
// converted to grey (ITU-R 601, Pillow's fixed point) or RGB and resized (Pillow's BILINEAR).
// `name` names the image in messages.
Status image_file_to_input(const std::string& path, const PixelSpec& spec, Pixels* out);
Status image_to_input(const uint8_t* bytes, size_t n, const PixelSpec& spec, Pixels* out,
                      const std::string& name = "encoded image");

// Raw pixels (channels 1, 3 or 4; row-major, interleaved) -> the model input, as
// query_sdk.spec.to_model_input on a uint8 array: alpha dropped, grey <-> RGB (ITU-R 601,
// Pillow's fixed point, as for files), resized (Pillow's BILINEAR).
Status pixels_to_input(const uint8_t* pixels, int height, int width, int channels,
                       const PixelSpec& spec, Pixels* out);

}  // namespace cmce
