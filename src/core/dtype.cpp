#include "core/dtype.h"

#include <cmath>
#include <vector>

#include "core/error.h"

namespace fluxswap {

namespace {
struct DTypeInfo {
  DType type;
  std::string_view name;
  size_t size;
  bool is_float;
};
constexpr DTypeInfo kInfo[] = {
    {DType::F64, "F64", 8, true},      {DType::F32, "F32", 4, true},
    {DType::F16, "F16", 2, true},      {DType::BF16, "BF16", 2, true},
    {DType::F8_E4M3, "F8_E4M3", 1, true}, {DType::F8_E5M2, "F8_E5M2", 1, true},
    {DType::I64, "I64", 8, false},     {DType::I32, "I32", 4, false},
    {DType::I16, "I16", 2, false},     {DType::I8, "I8", 1, false},
    {DType::U64, "U64", 8, false},     {DType::U32, "U32", 4, false},
    {DType::U16, "U16", 2, false},     {DType::U8, "U8", 1, false},
    {DType::BOOL, "BOOL", 1, false},
};
const DTypeInfo& info(DType t) { return kInfo[static_cast<int>(t)]; }
}  // namespace

size_t dtype_size(DType t) { return info(t).size; }
std::string_view dtype_name(DType t) { return info(t).name; }
bool dtype_is_float(DType t) { return info(t).is_float; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& i : kInfo)
    if (i.name == name) return i.type;
  return std::nullopt;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  float mag;
  if (exp == 0) {
    mag = std::ldexp(float(man), -24);
  } else if (exp == 31) {
    mag = man ? NAN : INFINITY;
  } else {
    mag = std::ldexp(float(man | 0x400), int(exp) - 25);
  }
  uint32_t u;
  std::memcpy(&u, &mag, 4);
  u |= sign;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t sign = uint16_t((u >> 16) & 0x8000);
  float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00;
  if (a >= 65520.0f) return sign | 0x7c00;  // rounds to inf
  if (a < std::ldexp(1.0f, -14)) {          // subnormal: multiples of 2^-24, ties to even
    float q = std::nearbyint(a * 16777216.0f);
    return sign | uint16_t(q);
  }
  int e;
  float m = std::frexp(a, &e);                        // a = m * 2^e, m in [0.5, 1)
  float q = std::nearbyint(std::ldexp(m, 11));        // 11 significant bits
  if (q >= 2048.0f) { q /= 2; e += 1; }
  uint16_t exp_bits = uint16_t(e - 1 + 15);
  return sign | uint16_t(exp_bits << 10) | (uint16_t(q) & 0x3ff);
}

float f8_e4m3_to_f32(uint8_t v) {
  float sign = (v & 0x80) ? -1.0f : 1.0f;
  int exp = (v >> 3) & 0xf;
  int man = v & 0x7;
  if (exp == 15 && man == 7) return NAN;  // e4m3fn has no infinities
  if (exp == 0) return sign * std::ldexp(float(man), -9);
  return sign * std::ldexp(float(8 + man), exp - 10);
}

float f8_e5m2_to_f32(uint8_t v) { return f16_to_f32(uint16_t(v) << 8); }

void convert_to_f32(DType src_type, const void* src, float* dst, size_t n) {
  switch (src_type) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::F64: {
      auto* s = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      return;
    }
    case DType::BF16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::F8_E4M3: {
      auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f8_e4m3_to_f32(s[i]);
      return;
    }
    case DType::F8_E5M2: {
      auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f8_e5m2_to_f32(s[i]);
      return;
    }
    default:
      throw Error("cannot convert " + std::string(dtype_name(src_type)) + " to F32: not a float type");
  }
}

void convert_from_f32(const float* src, DType dst_type, void* dst, size_t n) {
  switch (dst_type) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::F16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    default:
      throw Error("cannot convert F32 to " + std::string(dtype_name(dst_type)));
  }
}

void convert(DType src_type, const void* src, DType dst_type, void* dst, size_t n) {
  if (src_type == dst_type) {
    std::memcpy(dst, src, n * dtype_size(src_type));
    return;
  }
  if (dst_type == DType::F32) {
    convert_to_f32(src_type, src, static_cast<float*>(dst), n);
    return;
  }
  constexpr size_t kChunk = 1 << 16;
  std::vector<float> tmp(std::min(n, kChunk));
  for (size_t off = 0; off < n; off += kChunk) {
    size_t m = std::min(kChunk, n - off);
    convert_to_f32(src_type, static_cast<const char*>(src) + off * dtype_size(src_type), tmp.data(), m);
    convert_from_f32(tmp.data(), dst_type, static_cast<char*>(dst) + off * dtype_size(dst_type), m);
  }
}

}  // namespace fluxswap
