#include "text/precompiled_charsmap.h"

#include <cstring>

#include "core/error.h"
#include "text/unicode.h"

namespace fluxswap {

namespace {

int base64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+' || c == '-') return 62;  // standard and URL-safe alphabets
  if (c == '/' || c == '_') return 63;
  return -1;
}

// darts-clone unit layout: label in the low byte (bit 31 set on value units so they never match a label),
// has-leaf in bit 8, offset in bits 10.. scaled by 2^8 when bit 9 is set, value in the low 31 bits.
uint32_t unit_label(uint32_t u) { return u & (0x80000000u | 0xFFu); }
bool unit_has_leaf(uint32_t u) { return (u >> 8) & 1u; }
uint32_t unit_value(uint32_t u) { return u & 0x7FFFFFFFu; }
uint32_t unit_offset(uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); }

}  // namespace

PrecompiledCharsmap PrecompiledCharsmap::from_base64(std::string_view base64, const std::string& label) {
  std::string blob;
  blob.reserve(base64.size() * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  for (char c : base64) {
    if (c == '=') break;
    if (c == '\n' || c == '\r' || c == ' ') continue;
    const int v = base64_value(c);
    if (v < 0) throw Error(label + ": precompiled_charsmap is not base64 (character '" + std::string(1, c) + "')");
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      blob.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return PrecompiledCharsmap(blob, label);
}

PrecompiledCharsmap::PrecompiledCharsmap(std::string_view blob, const std::string& label) {
  if (blob.size() < 4)
    throw Error(label + ": precompiled_charsmap is " + std::to_string(blob.size()) + " bytes: too short");
  const auto* b = reinterpret_cast<const unsigned char*>(blob.data());
  const uint32_t trie_bytes = uint32_t(b[0]) | uint32_t(b[1]) << 8 | uint32_t(b[2]) << 16 | uint32_t(b[3]) << 24;
  if (trie_bytes % 4 != 0 || trie_bytes == 0 || trie_bytes > blob.size() - 4) {
    throw Error(label + ": precompiled_charsmap trie size " + std::to_string(trie_bytes) + " does not fit its " +
                std::to_string(blob.size()) + " bytes: expected a positive multiple of 4 within the blob");
  }
  units_.resize(trie_bytes / 4);
  for (size_t i = 0; i < units_.size(); ++i) {
    const unsigned char* p = b + 4 + 4 * i;
    units_[i] = uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
  }
  normalized_.assign(blob.substr(4 + trie_bytes));
}

std::optional<std::string_view> PrecompiledCharsmap::transform(std::string_view chunk) const {
  // Common-prefix search, stopping at the first (shortest) key. Positions are bounds-checked so a corrupt
  // trie can only fail to match, never read outside the array.
  size_t pos = unit_offset(units_[0]);
  for (unsigned char c : chunk) {
    if (c == 0) break;  // keys are NUL-terminated byte strings
    pos ^= c;
    if (pos >= units_.size()) return std::nullopt;
    const uint32_t unit = units_[pos];
    if (unit_label(unit) != c) return std::nullopt;
    pos ^= unit_offset(unit);
    if (pos >= units_.size()) return std::nullopt;
    if (unit_has_leaf(unit)) {
      const size_t begin = unit_value(units_[pos]);
      if (begin >= normalized_.size()) return std::nullopt;
      const size_t end = normalized_.find('\0', begin);
      return std::string_view(normalized_).substr(begin, (end == std::string::npos ? normalized_.size() : end) - begin);
    }
  }
  return std::nullopt;
}

std::string PrecompiledCharsmap::normalize(std::string_view text) const {
  const std::u32string chars = unicode::decode_utf8(text);
  std::string out;
  out.reserve(text.size());
  std::string cluster, one;
  for (size_t i = 0; i < chars.size();) {
    const size_t end = unicode::grapheme_end(chars, i);
    cluster.clear();
    for (size_t k = i; k < end; ++k) unicode::append_utf8(cluster, chars[k]);
    std::optional<std::string_view> whole;
    if (cluster.size() < 6) whole = transform(cluster);
    if (whole) {
      out.append(*whole);
    } else {
      for (size_t k = i; k < end; ++k) {
        one.clear();
        unicode::append_utf8(one, chars[k]);
        if (auto replaced = transform(one)) {
          out.append(*replaced);
        } else {
          out.append(one);
        }
      }
    }
    i = end;
  }
  return out;
}

}  // namespace fluxswap
