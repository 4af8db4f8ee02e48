#include "io/nonfinite_scan.h"

#include <cstdint>
#include <cstring>
#include <string>

#include "core/error.h"

namespace fluxswap {

namespace {
// An accumulator as wide as the element (not a 32-bit flag) keeps the compiler's vector loop in one lane width.
template <typename WORD>
bool any_all_ones(const uint8_t* p, size_t n, WORD mask) {
  WORD hits = 0;
  for (size_t i = 0; i < n; ++i) {
    WORD w;
    std::memcpy(&w, p + i * sizeof(WORD), sizeof(WORD));
    hits |= WORD(-WORD((w & mask) == mask));
  }
  return hits != 0;
}
}  // namespace

bool any_non_finite(DType type, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  switch (type) {  // exponent all ones, as first_non_finite tests
    case DType::F64: return any_all_ones<uint64_t>(p, n, 0x7ff0000000000000ull);
    case DType::F32: return any_all_ones<uint32_t>(p, n, 0x7f800000u);
    case DType::BF16: return any_all_ones<uint16_t>(p, n, 0x7f80u);
    case DType::F16: return any_all_ones<uint16_t>(p, n, 0x7c00u);
    case DType::F8_E4M3: return any_all_ones<uint8_t>(p, n, 0x7fu);  // e4m3fn: NaN only
    case DType::F8_E5M2: return any_all_ones<uint8_t>(p, n, 0x7cu);
    default: throw Error("any_non_finite: " + std::string(dtype_name(type)) + " is not a float type");
  }
}

}  // namespace fluxswap
