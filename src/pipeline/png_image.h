#pragma once
// PNG files with the generation parameters in a `parameters` tEXt chunk, where AUTOMATIC1111, ComfyUI and image
// browsers look for them.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fluxswap {

struct Rgb8Image {
  int width = 0, height = 0;
  std::vector<uint8_t> pixels;  // row-major RGB, 3 bytes per pixel
};

// An 8-bit RGB PNG with the given tEXt chunks (key -> text), in memory.
std::string encode_png(const Rgb8Image& image, const std::map<std::string, std::string>& text = {});
// Writes encode_png()'s bytes to `path` (via a temporary file renamed into place). Throws Error naming the path.
void write_png(const std::string& path, const Rgb8Image& image, const std::map<std::string, std::string>& text = {});

// Reads an 8-bit RGB PNG and its tEXt chunks (for tests and tools).
Rgb8Image read_png(const std::string& path, std::map<std::string, std::string>* text = nullptr);

}  // namespace fluxswap
