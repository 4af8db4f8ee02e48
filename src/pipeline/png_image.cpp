#include "pipeline/png_image.h"

#include <png.h>

#include <cstdio>
#include <memory>

#include "core/error.h"

namespace fluxswap {

namespace {

struct File {
  FILE* f;
  ~File() {
    if (f) std::fclose(f);
  }
};

[[noreturn]] void png_fail(png_structp png, png_const_charp msg) {
  auto* where = static_cast<std::string*>(png_get_error_ptr(png));
  *where = msg;
  png_longjmp(png, 1);
}

// Output bytes appended to a std::string (libpng's write callback).
void append(png_structp png, png_bytep data, png_size_t n) {
  static_cast<std::string*>(png_get_io_ptr(png))->append(reinterpret_cast<const char*>(data), n);
}
void no_flush(png_structp) {}

}  // namespace

std::string encode_png(const Rgb8Image& image, const std::map<std::string, std::string>& text) {
  if (image.width <= 0 || image.height <= 0 || image.pixels.size() != size_t(image.width) * image.height * 3)
    throw Error("image of " + std::to_string(image.width) + "x" + std::to_string(image.height) +
                " does not match its " + std::to_string(image.pixels.size()) + " bytes");
  std::string out, message;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &message, png_fail, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) throw Error("cannot initialise libpng");
  std::vector<png_text> chunks;
  std::vector<std::string> keys, values;  // png_text points into these
  for (const auto& [k, v] : text) {
    keys.push_back(k);
    values.push_back(v);
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    throw Error("encoding PNG failed: " + message);
  }
  png_set_write_fn(png, &out, append, no_flush);
  png_set_IHDR(png, info, png_uint_32(image.width), png_uint_32(image.height), 8, PNG_COLOR_TYPE_RGB,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  for (size_t i = 0; i < keys.size(); ++i) {
    png_text t{};
    t.compression = PNG_TEXT_COMPRESSION_NONE;
    t.key = keys[i].data();
    t.text = values[i].data();
    t.text_length = values[i].size();
    chunks.push_back(t);
  }
  if (!chunks.empty()) png_set_text(png, info, chunks.data(), int(chunks.size()));
  png_write_info(png, info);
  for (int y = 0; y < image.height; ++y)
    png_write_row(png, const_cast<png_bytep>(image.pixels.data() + size_t(y) * image.width * 3));
  png_write_end(png, info);
  png_destroy_write_struct(&png, &info);
  return out;
}

void write_png(const std::string& path, const Rgb8Image& image, const std::map<std::string, std::string>& text) {
  std::string bytes;
  try {
    bytes = encode_png(image, text);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  // Written beside the target and renamed over it, so a reader never sees half a file.
  const std::string tmp = path + ".tmp";
  {
    File file{std::fopen(tmp.c_str(), "wb")};
    if (!file.f) throw Error(path + ": cannot open for writing");
    if (std::fwrite(bytes.data(), 1, bytes.size(), file.f) != bytes.size() || std::fflush(file.f) != 0) {
      std::remove(tmp.c_str());
      throw Error(path + ": writing PNG failed (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw Error(path + ": cannot rename the written file into place");
}

Rgb8Image read_png(const std::string& path, std::map<std::string, std::string>* text) {
  File file{std::fopen(path.c_str(), "rb")};
  if (!file.f) throw Error(path + ": cannot open");
  std::string message;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &message, png_fail, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) throw Error(path + ": cannot initialise libpng");
  Rgb8Image image;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw Error(path + ": not a readable PNG: " + message);
  }
  png_init_io(png, file.f);
  png_read_info(png, info);
  png_set_strip_16(png);
  png_set_palette_to_rgb(png);
  png_set_gray_to_rgb(png);
  png_set_strip_alpha(png);
  png_read_update_info(png, info);
  image.width = int(png_get_image_width(png, info));
  image.height = int(png_get_image_height(png, info));
  image.pixels.resize(size_t(image.width) * image.height * 3);
  for (int y = 0; y < image.height; ++y) png_read_row(png, image.pixels.data() + size_t(y) * image.width * 3, nullptr);
  png_read_end(png, info);
  if (text) {
    png_textp chunks = nullptr;
    int n = 0;
    png_get_text(png, info, &chunks, &n);
    for (int i = 0; i < n; ++i) (*text)[chunks[i].key] = std::string(chunks[i].text, chunks[i].text_length);
  }
  png_destroy_read_struct(&png, &info, nullptr);
  return image;
}

}  // namespace fluxswap
