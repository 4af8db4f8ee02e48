#pragma once
// SentencePiece's compiled normaliser (the `precompiled_charsmap` of a NormalizerSpec, as HF tokenizer.json
// files embed it in base64): a little-endian u32 trie size, a darts-clone double-array trie over UTF-8 byte
// strings, then NUL-terminated replacement strings the trie's values point into. T5's is nmt_nfkc: NFKC plus
// mapping control characters and odd spaces away.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace fluxswap {

class PrecompiledCharsmap {
 public:
  // `label` names the source in Error messages (malformed base64, sizes that do not add up).
  static PrecompiledCharsmap from_base64(std::string_view base64, const std::string& label);
  PrecompiledCharsmap(std::string_view blob, const std::string& label);

  // HF tokenizers' `Precompiled` normaliser: the text is walked grapheme by grapheme; a grapheme shorter than
  // 6 bytes is replaced whole when the trie matches a prefix of it (the shortest match wins), otherwise each
  // character is replaced on its own match or kept. (SentencePiece proper does longest-match per position; the
  // two agree except on rare clusters, and tokenizer.json files are meant to reproduce HF.)
  std::string normalize(std::string_view text) const;

  // The replacement for the shortest trie key that is a prefix of `chunk`, if any.
  std::optional<std::string_view> transform(std::string_view chunk) const;

 private:
  std::vector<uint32_t> units_;  // the double array
  std::string normalized_;       // replacement strings, NUL-separated
};

}  // namespace fluxswap
