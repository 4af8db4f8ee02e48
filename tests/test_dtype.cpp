// Scalar conversions against values whose bit patterns are known exactly.
#include <gtest/gtest.h>

#include <cmath>

#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"

namespace fluxswap {
namespace {

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3f80);  // exactly half way between 0x3f80 and 0x3f81: to even
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3f82);  // half way between 0x3f81 and 0x3f82: to even
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-3.5f)), -3.5f);
}

TEST(DType, F16RoundTripAndSpecials) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);               // largest finite
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);                   // overflow to inf
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  for (uint32_t h = 0; h < 0x7c00; h += 7) EXPECT_EQ(f32_to_f16(f16_to_f32(uint16_t(h))), h);
}

TEST(DType, Fp8Decoding) {
  EXPECT_EQ(f8_e4m3_to_f32(0x38), 1.0f);   // exponent 7 = bias
  EXPECT_EQ(f8_e4m3_to_f32(0x7e), 448.0f);  // largest e4m3fn value
  EXPECT_TRUE(std::isnan(f8_e4m3_to_f32(0x7f)));
  EXPECT_EQ(f8_e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(f8_e5m2_to_f32(0x3c), 1.0f);
  EXPECT_EQ(f8_e5m2_to_f32(0xc0), -2.0f);
}

TEST(DType, NamesRoundTrip) {
  for (auto t : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2, DType::I64,
                 DType::U8, DType::BOOL})
    EXPECT_EQ(dtype_from_name(dtype_name(t)), t);
  EXPECT_FALSE(dtype_from_name("F4").has_value());
}

TEST(Tensor, NarrowSelectAndStridedCopy) {
  Tensor t = Tensor::empty(DType::F32, {2, 3, 4});
  for (int i = 0; i < 24; ++i) t.ptr<float>()[i] = float(i);
  Tensor s = t.narrow(2, 1, 2).select(0, 1);  // rows of the second batch, columns 1..2
  EXPECT_EQ(s.shape(), (Shape{3, 2}));
  EXPECT_FALSE(s.is_contiguous());
  Tensor c = s.to_f32();
  EXPECT_EQ(c.ptr<float>()[0], 13.0f);
  EXPECT_EQ(c.ptr<float>()[5], 22.0f);
  EXPECT_THROW(t.narrow(1, 2, 2), Error);
  EXPECT_THROW(s.view({6}), Error);
}

}  // namespace
}  // namespace fluxswap
