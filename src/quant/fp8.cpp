#include "quant/fp8.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/dtype.h"

namespace fluxswap::quant {

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::array<float, 256> make_decode_table() {
  std::array<float, 256> t{};
  for (int c = 0; c < 256; ++c) {
    const int e = (c >> 3) & 15, m = c & 7;
    float v;
    if (e == 15 && m == 7)
      v = std::numeric_limits<float>::quiet_NaN();
    else if (e == 0)
      v = std::ldexp(float(m), -9);  // subnormal: m * 2^-9
    else
      v = std::ldexp(float(8 + m), e - 10);  // (1 + m/8) * 2^(e-7)
    t[size_t(c)] = (c & 0x80) ? -v : v;
  }
  return t;
}

const std::array<float, 256>& decode_table() {
  static const std::array<float, 256> table = make_decode_table();
  return table;
}

template <typename Load>
void quantize_rows(Load load, int64_t ldx, int64_t rows, int64_t cols, uint8_t* q, int64_t ldq, float* scales) {
  for (int64_t r = 0; r < rows; ++r) {
    float amax = 0.0f;
    for (int64_t c = 0; c < cols; ++c) amax = std::fmax(amax, std::fabs(load(r * ldx + c)));
    const float scale = e4m3_row_scale(amax);
    scales[r] = scale;
    const float inv = e4m3_inverse_scale(scale);
    for (int64_t c = 0; c < cols; ++c) q[r * ldq + c] = e4m3_from_f32(load(r * ldx + c) * inv);
  }
}

}  // namespace

uint8_t e4m3_from_f32(float x) {
  const uint32_t u = bits_of(x);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return kE4m3NaN;
  // Everything from 448 up, infinities included, lands on 448: values in (448, 464] would round to 448 anyway and
  // the next step up (480) is the NaN code.
  if (a >= 0x43e00000u) return uint8_t(sign | 0x7e);
  if (a < 0x3c800000u) {
    // Below 2^-6 the codes are m * 2^-9, m = 0..7; m = 8 is code 0x08 = 2^-6, the smallest normal, so a carry out
    // of the subnormal range needs no special case. Scaling by 2^9 is exact, and so is splitting off the fraction.
    const float scaled = float_of(a) * 512.0f;
    const float whole = std::floor(scaled), frac = scaled - whole;
    uint32_t m = uint32_t(whole);
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) ++m;
    return uint8_t(sign | m);
  }
  // Normal: keep the top 3 of the 23 mantissa bits and round the 20 dropped ones to nearest even; a carry out of
  // the mantissa moves into the exponent, which is the correctly rounded result.
  uint32_t code = (((a >> 23) - 127u + 7u) << 3) | ((a >> 20) & 7u);
  const uint32_t rest = a & 0xfffffu;
  if (rest > 0x80000u || (rest == 0x80000u && (code & 1u))) ++code;
  return uint8_t(sign | code);
}

float e4m3_to_f32(uint8_t code) { return decode_table()[code]; }

float e4m3_row_scale(float amax) { return std::max(amax, kE4m3AmaxFloor) / kE4m3Max; }

void quantize_rows_e4m3(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* q, int64_t ldq,
                        float* scales) {
  quantize_rows([x](int64_t i) { return x[i]; }, ldx, rows, cols, q, ldq, scales);
}

void quantize_rows_e4m3(const uint16_t* x_bf16, int64_t ldx, int64_t rows, int64_t cols, uint8_t* q, int64_t ldq,
                        float* scales) {
  quantize_rows([x_bf16](int64_t i) { return bf16_to_f32(x_bf16[i]); }, ldx, rows, cols, q, ldq, scales);
}

void dequantize_rows_e4m3(const uint8_t* q, int64_t ldq, const float* scales, int64_t rows, int64_t cols, float* y,
                          int64_t ldy) {
  const auto& table = decode_table();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y[r * ldy + c] = table[q[r * ldq + c]] * scales[r];
}

}  // namespace fluxswap::quant
