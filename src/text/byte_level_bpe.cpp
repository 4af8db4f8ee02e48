#include "text/byte_level_bpe.h"


#include "core/error.h"
#include "text/unicode.h"

namespace fluxswap {

namespace {
// Beyond this many distinct words the cache is dropped and refilled: bounded memory for long-running servers.
constexpr size_t kMaxCachedWords = 16384;
}  // namespace

const std::vector<std::string>& ByteLevelBpe::byte_symbols() {
  static const std::vector<std::string> symbols = [] {
    std::vector<std::string> s(256);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      unicode::append_utf8(s[b], printable ? char32_t(b) : next++);
    }
    return s;
  }();
  return symbols;
}

ByteLevelBpe::ByteLevelBpe(std::unordered_map<std::string, int32_t> vocab,
                           const std::vector<std::pair<std::string, std::string>>& merges,
                           std::string end_of_word_suffix, int32_t unk_id, const std::string& source)
    : vocab_(std::move(vocab)), cache_(std::make_unique<Cache>()) {
  const auto& symbols = byte_symbols();
  for (int b = 0; b < 256; ++b) {
    for (int eow = 0; eow < 2; ++eow) {
      const std::string token = eow ? symbols[b] + end_of_word_suffix : symbols[b];
      auto it = vocab_.find(token);
      int32_t id = it != vocab_.end() ? it->second : unk_id;
      if (id < 0) {
        throw Error(source + ": the vocabulary has no token \"" + token + "\" for byte " + std::to_string(b) +
                    " and no unknown token: expected a byte-level BPE vocabulary");
      }
      (eow ? byte_eow_ids_ : byte_ids_)[b] = id;
    }
  }
  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    auto ia = vocab_.find(a), ib = vocab_.find(b), im = vocab_.find(a + b);
    if (ia == vocab_.end() || ib == vocab_.end() || im == vocab_.end()) {
      const std::string& missing = ia == vocab_.end() ? a : ib == vocab_.end() ? b : a + b;
      throw Error(source + ": merge " + std::to_string(rank + 1) + " \"" + a + " " + b + "\": \"" + missing +
                  "\" is not in the vocabulary");
    }
    // A repeated pair keeps its first (best) rank, as a rank table built front to back would.
    merges_.emplace(pair_key(ia->second, ib->second), Merge{int32_t(rank), im->second});
  }
}

std::optional<int32_t> ByteLevelBpe::token_id(std::string_view token) const {
  auto it = vocab_.find(std::string(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

std::vector<int32_t> ByteLevelBpe::merge_word(std::string_view word) const {
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    const auto b = static_cast<unsigned char>(word[i]);
    symbols.push_back(i + 1 == word.size() ? byte_eow_ids_[b] : byte_ids_[b]);
  }
  std::vector<int32_t> next;
  while (symbols.size() > 1) {
    const Merge* best = nullptr;
    uint64_t best_key = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = merges_.find(pair_key(symbols[i], symbols[i + 1]));
      if (it != merges_.end() && (best == nullptr || it->second.rank < best->rank)) {
        best = &it->second;
        best_key = it->first;
      }
    }
    if (best == nullptr) break;
    // Merge every occurrence of the best pair, left to right without overlaps.
    next.clear();
    for (size_t i = 0; i < symbols.size();) {
      if (i + 1 < symbols.size() && pair_key(symbols[i], symbols[i + 1]) == best_key) {
        next.push_back(best->merged_id);
        i += 2;
      } else {
        next.push_back(symbols[i]);
        ++i;
      }
    }
    symbols.swap(next);
  }
  return symbols;
}

void ByteLevelBpe::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  const std::string key(word);
  {
    std::lock_guard<std::mutex> lock(cache_->mutex);
    auto it = cache_->words.find(key);
    if (it != cache_->words.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids = merge_word(word);
  out.insert(out.end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_->mutex);
  if (cache_->words.size() >= kMaxCachedWords) cache_->words.clear();
  cache_->words.emplace(key, std::move(ids));
}

}  // namespace fluxswap
