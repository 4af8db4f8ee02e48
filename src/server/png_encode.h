#pragma once
// PNG bytes in memory and their base64 text, for the b64_json response field.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "pipeline/png_image.h"

namespace fluxswap {

// The same bytes write_png() puts in a file (same libpng settings and tEXt chunks), so an image from the server
// and one from `fluxswap generate` with the same parameters are identical files.
std::string encode_png(const Rgb8Image& image, const std::map<std::string, std::string>& text = {});

std::string base64_encode(const std::string& bytes);
// Throws Error on characters outside the standard alphabet (tests and tools).
std::string base64_decode(const std::string& text);

}  // namespace fluxswap
