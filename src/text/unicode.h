#pragma once
// The slice of Unicode the tokenizers need, with the semantics of the reference implementations (HF tokenizers,
// i.e. Rust `char` methods and the Oniguruma classes its regexes use): UTF-8 coding, the letter / number / mark /
// whitespace classes, per-character lower-casing, NFC, and an approximation of extended grapheme clusters.
// Tables are generated from the Unicode Character Database (unicode_data_*.cpp).
#include <cstddef>
#include <string>
#include <string_view>

namespace fluxswap::unicode {

inline constexpr char32_t kReplacementChar = 0xFFFD;

// Decodes UTF-8; each byte that does not start a well-formed sequence (overlong, surrogate, truncated, > U+10FFFF)
// becomes U+FFFD, as a lossy decoder would, so no input makes tokenisation fail.
std::u32string decode_utf8(std::string_view text);
void append_utf8(std::string& out, char32_t cp);
std::string encode_utf8(std::u32string_view text);
// Byte length of the UTF-8 sequence led by `lead` (1 for a stray continuation byte, so scanning always advances).
size_t utf8_sequence_length(unsigned char lead);

bool is_letter(char32_t cp);      // general category L*  (regex \p{L})
bool is_number(char32_t cp);      // general category N*  (regex \p{N})
bool is_mark(char32_t cp);        // general category M*
bool is_whitespace(char32_t cp);  // the White_Space property (regex \s, Rust char::is_whitespace)

// Appends the full lower-case mapping of one character (Rust char::to_lowercase: no context, so a final
// capital sigma becomes σ; U+0130 becomes "i\u0307").
void append_lowercase(std::u32string& out, char32_t cp);
std::u32string to_lowercase(std::u32string_view text);

// Canonical composition (Unicode normalization form C): decompose, order combining marks, recompose.
std::u32string nfc(std::u32string_view text);

// End (exclusive) of the extended grapheme cluster starting at `begin` (UAX #29), approximating the break
// properties by general category: CR LF, controls and format characters, prepended marks, combining / spacing
// marks, ZWJ and variation selectors, emoji modifiers and ZWJ sequences, regional indicator pairs and Hangul
// syllable sequences.
size_t grapheme_end(std::u32string_view text, size_t begin);

}  // namespace fluxswap::unicode
