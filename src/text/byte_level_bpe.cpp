#include "text/byte_level_bpe.h"

#include <functional>
#include <queue>

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
    // A repeated pair takes its last rank: both references build the table as a dict, later entries winning.
    merges_.insert_or_assign(pair_key(ia->second, ib->second), Merge{int32_t(rank), im->second});
  }
}

std::optional<int32_t> ByteLevelBpe::token_id(std::string_view token) const {
  auto it = vocab_.find(std::string(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

std::vector<int32_t> ByteLevelBpe::merge_word(std::string_view word) const {
  // Symbols form a linked list; candidate pairs wait in a min-heap by (rank, position), so a word costs
  // O(n log n) rather than a rescan per merge (a prompt may hold one enormous "word"). Applying the lowest rank,
  // leftmost first, equals the reference's merge-every-occurrence loop for trained merge lists, where a merge
  // never creates a pair ranked below itself.
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // -1 at the ends; a merged-away symbol has id -1
  };
  struct Candidate {
    int32_t rank;
    int32_t left;  // position of the left symbol
    int32_t left_id, right_id, merged_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  const int32_t n = static_cast<int32_t>(word.size());
  std::vector<Symbol> symbols(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) {
    const auto b = static_cast<unsigned char>(word[size_t(i)]);
    symbols[size_t(i)] = {i + 1 == n ? byte_eow_ids_[b] : byte_ids_[b], i - 1, i + 1 < n ? i + 1 : -1};
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto push_pair = [&](int32_t left) {
    if (left < 0) return;
    const int32_t right = symbols[size_t(left)].next;
    if (right < 0) return;
    const int32_t a = symbols[size_t(left)].id, b = symbols[size_t(right)].id;
    auto it = merges_.find(pair_key(a, b));
    if (it != merges_.end()) heap.push({it->second.rank, left, a, b, it->second.merged_id});
  };
  for (int32_t i = 0; i + 1 < n; ++i) push_pair(i);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& left = symbols[size_t(c.left)];
    // Stale entries: either symbol changed since the pair was queued.
    if (left.id != c.left_id || left.next < 0 || symbols[size_t(left.next)].id != c.right_id) continue;
    Symbol& right = symbols[size_t(left.next)];
    left.id = c.merged_id;
    right.id = -1;
    left.next = right.next;
    if (right.next >= 0) symbols[size_t(right.next)].prev = c.left;
    push_pair(left.prev);
    push_pair(c.left);
  }
  std::vector<int32_t> ids;
  for (int32_t i = 0; i >= 0 && i < n; i = symbols[size_t(i)].next) ids.push_back(symbols[size_t(i)].id);
  return ids;
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
