#include "core/dtype.h"

#include <cmath>
#include <algorithm>
#include <thread>
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

namespace {
// First index in [begin, end) whose exponent bits (mask) are all ones, reading WORD-sized raw values.
template <typename WORD>
int64_t first_all_ones(const uint8_t* p, size_t begin, size_t end, WORD mask) {
  constexpr size_t kBlock = 4096;
  WORD block[kBlock];
  for (size_t b = begin; b < end; b += kBlock) {
    // An aligned copy and a loop without an early exit vectorise (~4x the naive loop); the exact index is searched
    // only in a block with a hit.
    const size_t m = std::min(end - b, kBlock);
    std::memcpy(block, p + b * sizeof(WORD), m * sizeof(WORD));
    unsigned hits = 0;
    for (size_t i = 0; i < m; ++i) hits |= unsigned((block[i] & mask) == mask);
    if (!hits) continue;
    for (size_t i = 0; i < m; ++i)
      if ((block[i] & mask) == mask) return int64_t(b + i);
  }
  return -1;
}

int64_t first_non_finite_range(DType type, const uint8_t* p, size_t begin, size_t end) {
  switch (type) {
    case DType::F64: return first_all_ones<uint64_t>(p, begin, end, 0x7ff0000000000000ull);
    case DType::F32: return first_all_ones<uint32_t>(p, begin, end, 0x7f800000u);
    case DType::BF16: return first_all_ones<uint16_t>(p, begin, end, 0x7f80u);
    case DType::F16: return first_all_ones<uint16_t>(p, begin, end, 0x7c00u);
    case DType::F8_E4M3: return first_all_ones<uint8_t>(p, begin, end, 0x7fu);  // e4m3fn: NaN only, no infinities
    case DType::F8_E5M2: return first_all_ones<uint8_t>(p, begin, end, 0x7cu);
    default: throw Error("first_non_finite: " + std::string(dtype_name(type)) + " is not a float type");
  }
}
}  // namespace

int64_t first_non_finite(DType type, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  constexpr size_t kPerThread = size_t(1) << 24;
  const size_t threads = std::min<size_t>(std::max(1u, std::thread::hardware_concurrency()), n / kPerThread + 1);
  if (threads <= 1) return first_non_finite_range(type, p, 0, n);
  std::vector<int64_t> found(threads, -1);
  std::vector<std::thread> pool;
  const size_t chunk = (n + threads - 1) / threads;
  for (size_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] { found[t] = first_non_finite_range(type, p, t * chunk, std::min(n, (t + 1) * chunk)); });
  for (auto& th : pool) th.join();
  for (int64_t f : found)
    if (f >= 0) return f;
  return -1;
}

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
