// PNG round trip with the generation parameters chunk, and a clear error for a file that is not a PNG.
#include <gtest/gtest.h>

#include <fstream>

#include "core/error.h"
#include "pipeline/png_image.h"
#include "test_support.h"

namespace fluxswap {
namespace {

TEST(PngImage, RoundTripKeepsPixelsAndParameters) {
  test::TempDir tmp;
  Rgb8Image img;
  img.width = 5;
  img.height = 3;
  for (int i = 0; i < 5 * 3 * 3; ++i) img.pixels.push_back(uint8_t(i * 17));
  const std::string params = "a cat\nSteps: 4, Sampler: Euler, Seed: 42, Size: 5x3";
  write_png(tmp / "x.png", img, {{"parameters", params}});
  std::map<std::string, std::string> text;
  Rgb8Image back = read_png(tmp / "x.png", &text);
  EXPECT_EQ(back.width, 5);
  EXPECT_EQ(back.height, 3);
  EXPECT_EQ(back.pixels, img.pixels);
  EXPECT_EQ(text["parameters"], params);
}

TEST(PngImage, NotAPngIsAnError) {
  test::TempDir tmp;
  std::ofstream(tmp / "bad.png") << "not a png at all";
  try {
    read_png(tmp / "bad.png");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.png"), std::string::npos) << e.what();
  }
  EXPECT_THROW(write_png(tmp / "y.png", Rgb8Image{2, 2, {1, 2, 3}}), Error);
}

}  // namespace
}  // namespace fluxswap
