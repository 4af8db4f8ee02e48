// The FP8 E4M3 CPU reference (quant/fp8.h), which the GPU quantisation kernels must match bit for bit: the code
// table, round-to-nearest-even, saturation, and the error bounds of per-row quantisation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/counter_rng.h"
#include "core/dtype.h"
#include "quant/fp8.h"

namespace fluxswap::quant {
namespace {

// The OCP table written out from the spec: S.EEEE.MMM, bias 7, subnormals at E = 0, NaN only at S.1111.111.
double ocp_value(int code) {
  const int e = (code >> 3) & 15, m = code & 7;
  const double v = e == 0 ? m * std::ldexp(1.0, -9) : (1.0 + m / 8.0) * std::ldexp(1.0, e - 7);
  return (code & 0x80) ? -v : v;
}

bool is_nan_code(int code) { return (code & 0x7f) == 0x7f; }

TEST(Fp8E4m3, DecodesTheOcpTable) {
  for (int c = 0; c < 256; ++c) {
    const float v = e4m3_to_f32(uint8_t(c));
    if (is_nan_code(c)) {
      EXPECT_TRUE(std::isnan(v)) << "code " << c;
      continue;
    }
    EXPECT_EQ(double(v), ocp_value(c)) << "code " << c;
    EXPECT_EQ(v, f8_e4m3_to_f32(uint8_t(c))) << "code " << c << " disagrees with core/dtype's decoder";
    EXPECT_EQ(std::signbit(v), (c & 0x80) != 0) << "code " << c;
  }
  EXPECT_EQ(e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(e4m3_to_f32(0xFE), -448.0f);
  EXPECT_EQ(e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(e4m3_to_f32(0x07), 7 * std::ldexp(1.0f, -9));  // largest subnormal
  EXPECT_EQ(e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(e4m3_to_f32(0x3C), 1.5f);
  EXPECT_EQ(e4m3_to_f32(0x77), 240.0f);
  EXPECT_EQ(e4m3_to_f32(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(e4m3_to_f32(0x80)));
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0x7F)));
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0xFF)));
}

TEST(Fp8E4m3, EncodeInvertsDecodeForEveryCode) {
  for (int c = 0; c < 256; ++c)
    if (!is_nan_code(c)) EXPECT_EQ(int(e4m3_from_f32(e4m3_to_f32(uint8_t(c)))), c) << "code " << c;
}

TEST(Fp8E4m3, RoundsToNearestEven) {
  // Between each pair of neighbouring finite codes (the midpoint of two e4m3 values is exact in float): ties go to
  // the even code (the even mantissa; across an exponent step that is the upper code, mantissa 0), and the floats
  // next to the midpoint go to the nearer code.
  for (int c = 0; c < 0x7E; ++c) {
    const float lo = e4m3_to_f32(uint8_t(c)), hi = e4m3_to_f32(uint8_t(c + 1));
    const float mid = (lo + hi) / 2;
    ASSERT_EQ(double(mid), (double(lo) + double(hi)) / 2) << "midpoint not exact at code " << c;
    for (const int sign : {0x00, 0x80}) {
      const float s = sign ? -1.0f : 1.0f;
      const int even = (c & 1) ? c + 1 : c;
      EXPECT_EQ(int(e4m3_from_f32(s * mid)), sign | even) << "tie between codes " << c << " and " << c + 1;
      EXPECT_EQ(int(e4m3_from_f32(s * std::nextafter(mid, 0.0f))), sign | c) << "below the tie at code " << c;
      EXPECT_EQ(int(e4m3_from_f32(s * std::nextafter(mid, 1e9f))), sign | (c + 1)) << "above the tie at code " << c;
    }
  }
  // Inside the subnormal range and at its boundary with the normals.
  EXPECT_EQ(e4m3_from_f32(2.5f * std::ldexp(1.0f, -9)), 0x02);
  EXPECT_EQ(e4m3_from_f32(3.5f * std::ldexp(1.0f, -9)), 0x04);
  EXPECT_EQ(e4m3_from_f32(7.5f * std::ldexp(1.0f, -9)), 0x08);
  // Ordinary values.
  EXPECT_EQ(e4m3_from_f32(1.0f), 0x38);
  EXPECT_EQ(e4m3_from_f32(1.0625f), 0x38);  // tie between 1 and 1.125: even
  EXPECT_EQ(e4m3_from_f32(1.1875f), 0x3A);  // tie between 1.125 and 1.25: even (1.25)
  EXPECT_EQ(e4m3_from_f32(-3.3f), 0xC5);    // -3.25
}

TEST(Fp8E4m3, SaturatesUnderflowsAndKeepsNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  for (const float v : {448.0f, 449.0f, 463.99f, 464.0f, 464.01f, 480.0f, 1e6f, std::numeric_limits<float>::max(),
                        inf}) {
    EXPECT_EQ(e4m3_from_f32(v), 0x7E) << v;
    EXPECT_EQ(e4m3_from_f32(-v), 0xFE) << -v;
  }
  EXPECT_EQ(e4m3_from_f32(std::numeric_limits<float>::quiet_NaN()), kE4m3NaN);
  EXPECT_EQ(e4m3_from_f32(-std::numeric_limits<float>::quiet_NaN()), kE4m3NaN);
  // Half of the smallest subnormal is a tie with zero, which is even; the sign of zero is kept.
  EXPECT_EQ(e4m3_from_f32(std::ldexp(1.0f, -10)), 0x00);
  EXPECT_EQ(e4m3_from_f32(-std::ldexp(1.0f, -10)), 0x80);
  EXPECT_EQ(e4m3_from_f32(std::nextafter(std::ldexp(1.0f, -10), 1.0f)), 0x01);
  EXPECT_EQ(e4m3_from_f32(std::ldexp(1.0f, -11)), 0x00);
  EXPECT_EQ(e4m3_from_f32(std::numeric_limits<float>::denorm_min()), 0x00);
  EXPECT_EQ(e4m3_from_f32(-0.0f), 0x80);
  EXPECT_EQ(e4m3_from_f32(0.0f), 0x00);
}

TEST(Fp8E4m3, RowScale) {
  EXPECT_EQ(e4m3_row_scale(448.0f), 1.0f);
  EXPECT_EQ(e4m3_row_scale(896.0f), 2.0f);
  EXPECT_EQ(e4m3_row_scale(1.0f), 1.0f / 448.0f);
  EXPECT_EQ(e4m3_row_scale(0.0f), kE4m3AmaxFloor / 448.0f);
  EXPECT_GT(e4m3_row_scale(0.0f), std::numeric_limits<float>::min());  // a normal float
  EXPECT_TRUE(std::isfinite(e4m3_inverse_scale(e4m3_row_scale(0.0f))));
  EXPECT_EQ(e4m3_inverse_scale(e4m3_row_scale(448.0f)), 1.0f);
}

// Rows of very different magnitudes, an outlier, an all-zero row and a NaN; row stride wider than the row.
struct Rows {
  int64_t rows = 9, cols = 301, ld = 320;
  std::vector<float> x;
  Rows() : x(size_t(rows * ld), 1e30f) {  // the padding must not reach the amax
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const float gain = std::ldexp(1.0f, int(r * 7 % 9) * 4 - 16);
        // bf16-representable, so the bf16 overload sees the same values.
        x[size_t(r * ld + c)] = bf16_to_f32(f32_to_bf16(normal_from_counter(7, uint64_t(r * cols + c)) * gain));
      }
    x[size_t(2 * ld + 100)] *= 64.0f;
    for (int64_t c = 0; c < cols; ++c) x[size_t(5 * ld + c)] = 0.0f;
    x[size_t(7 * ld + 3)] = std::numeric_limits<float>::quiet_NaN();
  }
};

TEST(Fp8E4m3, PerRowQuantisationMeetsItsErrorBounds) {
  const Rows in;
  const int64_t ldq = in.cols + 11;
  std::vector<uint8_t> q(size_t(in.rows * ldq), 0xAB);
  std::vector<float> scales(size_t(in.rows)), y(size_t(in.rows * in.cols));
  quantize_rows_e4m3(in.x.data(), in.ld, in.rows, in.cols, q.data(), ldq, scales.data());
  dequantize_rows_e4m3(q.data(), ldq, scales.data(), in.rows, in.cols, y.data(), in.cols);
  for (int64_t r = 0; r < in.rows; ++r) {
    float amax = 0.0f;
    for (int64_t c = 0; c < in.cols; ++c) amax = std::fmax(amax, std::fabs(in.x[size_t(r * in.ld + c)]));
    const float scale = scales[size_t(r)];
    EXPECT_EQ(scale, std::max(amax, kE4m3AmaxFloor) / 448.0f) << "row " << r;
    for (int64_t c = 0; c < in.cols; ++c) {
      const float x = in.x[size_t(r * in.ld + c)], d = y[size_t(r * in.cols + c)];
      const uint8_t code = q[size_t(r * ldq + c)];
      if (std::isnan(x)) {
        EXPECT_EQ(code, kE4m3NaN);
        continue;
      }
      EXPECT_EQ(code, e4m3_from_f32(x * (1.0f / scale))) << "row " << r << " col " << c;
      if (std::fabs(x) == amax && amax > 0) EXPECT_EQ(code & 0x7f, 0x7E) << "the row's amax maps to 448";
      // 3 mantissa bits: half an ulp is at most 2^-4 of the value in the normal range, and 2^-10 * scale (half
      // the smallest subnormal step) below it. The slack covers the float product of the dequantisation.
      const double err = std::fabs(double(d) - double(x));
      if (std::fabs(x) / scale >= std::ldexp(1.0f, -6))
        EXPECT_LE(err, std::ldexp(1.0, -4) * std::fabs(x) * (1 + 1e-6)) << "row " << r << " col " << c;
      else
        EXPECT_LE(err, std::ldexp(1.0, -10) * scale * (1 + 1e-6)) << "row " << r << " col " << c;
    }
    for (int64_t c = in.cols; c < ldq; ++c) EXPECT_EQ(q[size_t(r * ldq + c)], 0xAB) << "wrote past the row";
  }
  for (int64_t c = 0; c < in.cols; ++c) EXPECT_EQ(q[size_t(5 * ldq + c)], 0x00) << "zero row";
}

TEST(Fp8E4m3, Bf16AndFloatInputsQuantiseAlike) {
  const Rows in;
  std::vector<uint16_t> xb(in.x.size());
  for (size_t i = 0; i < xb.size(); ++i) xb[i] = f32_to_bf16(in.x[i]);
  std::vector<uint8_t> qf(size_t(in.rows * in.cols)), qb(qf.size());
  std::vector<float> sf(size_t(in.rows)), sb(sf.size());
  quantize_rows_e4m3(in.x.data(), in.ld, in.rows, in.cols, qf.data(), in.cols, sf.data());
  quantize_rows_e4m3(xb.data(), in.ld, in.rows, in.cols, qb.data(), in.cols, sb.data());
  EXPECT_EQ(qf, qb);
  EXPECT_EQ(std::memcmp(sf.data(), sb.data(), sf.size() * 4), 0);
}

}  // namespace
}  // namespace fluxswap::quant
