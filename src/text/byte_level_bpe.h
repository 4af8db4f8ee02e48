#pragma once
// Byte-level BPE as CLIP (and GPT-2) use it: a word's UTF-8 bytes are spelled with the printable stand-in
// characters of the bytes-to-unicode table, the last symbol carries the end-of-word suffix (`</w>` for CLIP), and
// adjacent symbols merge lowest rank first until no ranked pair is left. Results are cached per word because
// prompts repeat words and the merge loop is quadratic in the word length.
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fluxswap {

class ByteLevelBpe {
 public:
  // `merges` in rank order. Each merge's parts and their concatenation must be vocabulary tokens (as HF
  // tokenizers requires); otherwise Error naming `source` and the merge. `unk_id` stands in for a byte whose
  // symbol is missing from the vocabulary (-1: such a vocabulary is an Error).
  ByteLevelBpe(std::unordered_map<std::string, int32_t> vocab,
               const std::vector<std::pair<std::string, std::string>>& merges, std::string end_of_word_suffix,
               int32_t unk_id, const std::string& source);

  // Appends the ids of one pre-tokenised word, given as raw UTF-8 bytes. Thread-safe.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  std::optional<int32_t> token_id(std::string_view token) const;
  size_t vocab_size() const { return vocab_.size(); }

  // The stand-in character (as UTF-8) for each byte value: printable ASCII and Latin-1 stand for themselves,
  // the other 68 bytes map to U+0100 onwards in byte order.
  static const std::vector<std::string>& byte_symbols();

 private:
  struct Merge {
    int32_t rank;
    int32_t merged_id;
  };
  struct Cache {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>> words;
  };
  static uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  std::vector<int32_t> merge_word(std::string_view word) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<uint64_t, Merge> merges_;
  int32_t byte_ids_[256];      // symbol of a byte inside a word
  int32_t byte_eow_ids_[256];  // symbol of a word's last byte, suffix attached
  std::unique_ptr<Cache> cache_;
};

}  // namespace fluxswap
