#pragma once
// Element types as safetensors names them, plus the scalar conversions the loaders and the CPU reference need.
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace fluxswap {

enum class DType : uint8_t { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // the safetensors spelling, e.g. "BF16"
std::optional<DType> dtype_from_name(std::string_view name);
bool dtype_is_float(DType t);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN stays NaN (as torch does).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float f8_e4m3_to_f32(uint8_t v);
float f8_e5m2_to_f32(uint8_t v);

// Index of the first NaN or infinity among n elements of a float type (raw-bit test, split over threads for large
// n), or -1 when all are finite.
int64_t first_non_finite(DType type, const void* data, size_t n);

// Converts n elements of any float type to float32.
void convert_to_f32(DType src_type, const void* src, float* dst, size_t n);
// Converts n float32 values to dst_type (F32, F16 or BF16).
void convert_from_f32(const float* src, DType dst_type, void* dst, size_t n);
// Converts between any float types, through float32 where the types differ.
void convert(DType src_type, const void* src, DType dst_type, void* dst, size_t n);

}  // namespace fluxswap
