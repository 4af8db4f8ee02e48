#include "text/unicode.h"

#include <algorithm>
#include <cstdint>
#include <unordered_map>

#include "text/unicode_data.h"

namespace fluxswap::unicode {

namespace {

bool in_ranges(const data::CodeRange* ranges, size_t count, char32_t cp) {
  const data::CodeRange* end = ranges + count;
  // First range whose `last` is not below cp; the tables are sorted and disjoint.
  const data::CodeRange* it =
      std::lower_bound(ranges, end, cp, [](const data::CodeRange& r, char32_t c) { return r.last < c; });
  return it != end && it->first <= cp;
}

// --- Hangul syllables compose and decompose arithmetically (Unicode ch. 3.12), so they are not in the tables.
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28;
constexpr char32_t kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

uint8_t combining_class(char32_t cp) {
  if (cp < 0x300) return 0;  // nothing below the combining diacritics block has a nonzero class
  const data::CombiningRun* begin = data::kCombiningClasses;
  const data::CombiningRun* end = begin + data::kCombiningClassesCount;
  const data::CombiningRun* it =
      std::lower_bound(begin, end, cp, [](const data::CombiningRun& r, char32_t c) { return r.last < c; });
  return (it != end && it->first <= cp) ? it->ccc : 0;
}

void decompose_into(std::u32string& out, char32_t cp) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const char32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out.push_back(kTBase + s % kTCount);
    return;
  }
  if (cp >= 0xC0) {
    const auto* pb = data::kPairDecompositions;
    const auto* pe = pb + data::kPairDecompositionsCount;
    const auto* p = std::lower_bound(pb, pe, cp, [](const data::PairDecomposition& d, char32_t c) { return d.cp < c; });
    if (p != pe && p->cp == cp) {
      // Mappings are one level deep in the data; full decomposition applies them recursively.
      decompose_into(out, p->first);
      decompose_into(out, p->second);
      return;
    }
    const auto* sb = data::kSingletonDecompositions;
    const auto* se = sb + data::kSingletonDecompositionsCount;
    const auto* s =
        std::lower_bound(sb, se, cp, [](const data::SingletonDecomposition& d, char32_t c) { return d.cp < c; });
    if (s != se && s->cp == cp) {
      decompose_into(out, s->to);
      return;
    }
  }
  out.push_back(cp);
}

uint64_t pair_key(char32_t a, char32_t b) { return (uint64_t(a) << 32) | uint64_t(b); }

const std::unordered_map<uint64_t, char32_t>& composition_table() {
  static const std::unordered_map<uint64_t, char32_t> table = [] {
    std::unordered_map<uint64_t, char32_t> t;
    const char32_t* ex_begin = data::kCompositionExclusions;
    const char32_t* ex_end = ex_begin + data::kCompositionExclusionsCount;
    for (size_t i = 0; i < data::kPairDecompositionsCount; ++i) {
      const auto& d = data::kPairDecompositions[i];
      if (!std::binary_search(ex_begin, ex_end, d.cp)) t.emplace(pair_key(d.first, d.second), d.cp);
    }
    return t;
  }();
  return table;
}

// The primary composite of (a, b), or 0 when there is none.
char32_t compose_pair(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto& table = composition_table();
  auto it = table.find(pair_key(a, b));
  return it == table.end() ? 0 : it->second;
}

// --- Grapheme cluster helpers.
enum class Hangul { kNone, kL, kV, kT, kLV, kLVT };

Hangul hangul_type(char32_t cp) {
  if ((cp >= 0x1100 && cp <= 0x115F) || (cp >= 0xA960 && cp <= 0xA97C)) return Hangul::kL;
  if ((cp >= 0x1160 && cp <= 0x11A7) || (cp >= 0xD7B0 && cp <= 0xD7C6)) return Hangul::kV;
  if ((cp >= 0x11A8 && cp <= 0x11FF) || (cp >= 0xD7CB && cp <= 0xD7FB)) return Hangul::kT;
  if (cp >= kSBase && cp < kSBase + kSCount) return (cp - kSBase) % kTCount == 0 ? Hangul::kLV : Hangul::kLVT;
  return Hangul::kNone;
}

bool hangul_joins(Hangul prev, Hangul next) {
  switch (prev) {
    case Hangul::kL:
      return next != Hangul::kNone && next != Hangul::kT;
    case Hangul::kV:
    case Hangul::kLV:
      return next == Hangul::kV || next == Hangul::kT;
    case Hangul::kT:
    case Hangul::kLVT:
      return next == Hangul::kT;
    default:
      return false;
  }
}

constexpr char32_t kZwj = 0x200D;

// Prepended_Concatenation_Mark: format characters that attach to what follows (GB9b) instead of breaking.
bool is_prepend(char32_t cp) {
  return (cp >= 0x600 && cp <= 0x605) || cp == 0x6DD || cp == 0x70F || cp == 0x890 || cp == 0x891 || cp == 0x8E2 ||
         cp == 0x110BD || cp == 0x110CD;
}

// Grapheme_Cluster_Break Control: breaks on both sides. Cc, line/paragraph separators, and format characters
// other than ZWNJ/ZWJ (Extend), the tag characters (Extend) and the prepended marks.
bool is_control_break(char32_t cp) {
  if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cp == 0x2028 || cp == 0x2029) return true;
  if (cp < 0xAD || cp == 0x200C || cp == kZwj || (cp >= 0xE0020 && cp <= 0xE007F) || is_prepend(cp)) return false;
  return in_ranges(data::kFormats, data::kFormatsCount, cp);
}

bool is_regional_indicator(char32_t cp) { return cp >= 0x1F1E6 && cp <= 0x1F1FF; }

// Grapheme_Cluster_Break Extend / SpacingMark, approximated by the mark categories plus the few non-marks
// (ZWNJ, halfwidth sound marks, emoji modifiers, tag characters) that also extend a cluster.
bool is_extend(char32_t cp) {
  return is_mark(cp) || cp == 0x200C || cp == kZwj || (cp >= 0xFF9E && cp <= 0xFF9F) ||
         (cp >= 0x1F3FB && cp <= 0x1F3FF) || (cp >= 0xE0020 && cp <= 0xE007F);
}

// Extended_Pictographic, approximated by the emoji and symbol blocks (enough for ZWJ sequences).
bool is_pictographic(char32_t cp) {
  if (cp < 0xA9) return false;
  if (cp == 0xA9 || cp == 0xAE || cp == 0x203C || cp == 0x2049 || cp == 0x2122 || cp == 0x2139) return true;
  if ((cp >= 0x2194 && cp <= 0x21AA) || (cp >= 0x2300 && cp <= 0x23FF) || (cp >= 0x25A0 && cp <= 0x27BF)) return true;
  if ((cp >= 0x2900 && cp <= 0x297F) || (cp >= 0x2B00 && cp <= 0x2BFF)) return true;
  if (cp == 0x3030 || cp == 0x303D || cp == 0x3297 || cp == 0x3299) return true;
  if (cp >= 0x1F000 && cp <= 0x1FFFD) return !is_regional_indicator(cp) && !(cp >= 0x1F3FB && cp <= 0x1F3FF);
  return false;
}

}  // namespace

size_t utf8_sequence_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead & 0xE0) == 0xC0) return 2;
  if ((lead & 0xF0) == 0xE0) return 3;
  if ((lead & 0xF8) == 0xF0) return 4;
  return 1;
}

std::u32string decode_utf8(std::string_view text) {
  std::u32string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    const auto b0 = static_cast<unsigned char>(text[i]);
    if (b0 < 0x80) {
      out.push_back(b0);
      ++i;
      continue;
    }
    const size_t len = utf8_sequence_length(b0);
    char32_t cp = 0;
    bool ok = len > 1 && i + len <= text.size();
    if (ok) {
      cp = b0 & (0xFF >> (len + 1));
      for (size_t k = 1; k < len; ++k) {
        const auto b = static_cast<unsigned char>(text[i + k]);
        if ((b & 0xC0) != 0x80) {
          ok = false;
          break;
        }
        cp = (cp << 6) | (b & 0x3F);
      }
    }
    // Reject overlong forms, surrogates and values past U+10FFFF: they are not characters.
    static constexpr char32_t kMinForLength[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (ok && (cp < kMinForLength[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) ok = false;
    if (ok) {
      out.push_back(cp);
      i += len;
    } else {
      out.push_back(kReplacementChar);
      ++i;
    }
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string encode_utf8(std::u32string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char32_t cp : text) append_utf8(out, cp);
  return out;
}

bool is_letter(char32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return in_ranges(data::kLetters, data::kLettersCount, cp);
}

bool is_number(char32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return in_ranges(data::kNumbers, data::kNumbersCount, cp);
}

bool is_mark(char32_t cp) { return cp >= 0x300 && in_ranges(data::kMarks, data::kMarksCount, cp); }

bool is_whitespace(char32_t cp) {
  if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

void append_lowercase(std::u32string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp);
    return;
  }
  if (cp == 0x130) {  // LATIN CAPITAL LETTER I WITH DOT ABOVE: the only unconditional one-to-many mapping
    out.push_back('i');
    out.push_back(0x307);
    return;
  }
  const data::CaseRun* begin = data::kLowercaseRuns;
  const data::CaseRun* end = begin + data::kLowercaseRunsCount;
  const data::CaseRun* it =
      std::lower_bound(begin, end, cp, [](const data::CaseRun& r, char32_t c) { return r.last < c; });
  if (it != end && it->first <= cp && (cp - it->first) % it->stride == 0) {
    out.push_back(static_cast<char32_t>(static_cast<int64_t>(cp) + it->delta));
  } else {
    out.push_back(cp);
  }
}

std::u32string to_lowercase(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  for (char32_t cp : text) append_lowercase(out, cp);
  return out;
}

std::u32string nfc(std::u32string_view text) {
  // Text below U+0300 has no combining marks and no decomposable-then-different characters: already NFC.
  if (std::all_of(text.begin(), text.end(), [](char32_t c) { return c < 0x300; })) return std::u32string(text);

  std::u32string d;
  d.reserve(text.size() + 8);
  for (char32_t cp : text) decompose_into(d, cp);

  // Canonical ordering: stable-sort each run of non-starters by combining class.
  for (size_t i = 0; i < d.size();) {
    if (combining_class(d[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && combining_class(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + i, d.begin() + j,
                     [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }

  // Canonical composition: each character combines with the last starter unless a character in between
  // blocks it (a starter, or a mark of equal or higher class).
  std::u32string out;
  out.reserve(d.size());
  size_t starter = std::u32string::npos;
  uint8_t last_class = 0;
  for (char32_t cp : d) {
    const uint8_t cc = combining_class(cp);
    if (starter != std::u32string::npos) {
      const bool adjacent = out.size() - 1 == starter;
      const bool blocked = !adjacent && (last_class == 0 || last_class >= cc);
      if (!blocked) {
        if (char32_t composite = compose_pair(out[starter], cp)) {
          out[starter] = composite;
          continue;
        }
      }
    }
    if (cc == 0) starter = out.size();
    out.push_back(cp);
    last_class = cc;
  }
  return out;
}

size_t grapheme_end(std::u32string_view text, size_t begin) {
  const size_t n = text.size();
  if (begin >= n) return n;
  const char32_t first = text[begin];
  size_t i = begin + 1;
  if (first == '\r') return (i < n && text[i] == '\n') ? i + 1 : i;
  if (is_control_break(first)) return i;
  if (is_regional_indicator(first) && i < n && is_regional_indicator(text[i])) ++i;
  const bool pictographic = is_pictographic(first);
  Hangul prev = hangul_type(first);
  while (i < n) {
    const char32_t c = text[i];
    if (is_control_break(c)) break;
    if (is_prepend(text[i - 1])) {
      prev = hangul_type(c);
      ++i;
      continue;
    }
    if (is_extend(c)) {
      prev = Hangul::kNone;
      ++i;
      continue;
    }
    if (pictographic && text[i - 1] == kZwj && is_pictographic(c)) {
      prev = Hangul::kNone;
      ++i;
      continue;
    }
    const Hangul h = hangul_type(c);
    if (!hangul_joins(prev, h)) break;
    prev = h;
    ++i;
  }
  return i;
}

}  // namespace fluxswap::unicode
