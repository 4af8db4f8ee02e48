#include "text/unigram_model.h"

#include <algorithm>
#include <cstdio>

#include "core/error.h"
#include "text/unicode.h"

namespace fluxswap {

namespace {
// SentencePiece's penalty for an unknown character relative to the rarest piece.
constexpr double kUnknownPenalty = 10.0;
}  // namespace

UnigramModel::UnigramModel(std::vector<std::pair<std::string, double>> pieces, int32_t unk_id, bool byte_fallback,
                           const std::string& source)
    : unk_id_(unk_id), byte_fallback_(byte_fallback) {
  if (pieces.empty()) throw Error(source + ": the unigram vocabulary is empty");
  if (unk_id < 0 || size_t(unk_id) >= pieces.size()) {
    throw Error(source + ": unk_id " + std::to_string(unk_id) + " is outside the vocabulary of " +
                std::to_string(pieces.size()) + " pieces");
  }
  scores_.reserve(pieces.size());
  ids_.reserve(pieces.size());
  double min_score = pieces[0].second;
  for (size_t id = 0; id < pieces.size(); ++id) {
    auto& [piece, score] = pieces[id];
    min_score = std::min(min_score, score);
    max_piece_bytes_ = std::max(max_piece_bytes_, piece.size());
    scores_.push_back(score);
    ids_[std::move(piece)] = int32_t(id);  // a repeated piece resolves to its last id, as in HF
  }
  unk_score_ = min_score - kUnknownPenalty;
}

std::optional<int32_t> UnigramModel::piece_id(std::string_view piece) const {
  auto it = ids_.find(piece);
  if (it == ids_.end()) return std::nullopt;
  return it->second;
}

void UnigramModel::encode(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  const size_t n = text.size();
  struct Node {
    double score = 0;
    size_t start = SIZE_MAX;  // SIZE_MAX: not reached yet
    int32_t id = -1;
  };
  // best[end] = best segmentation of text[0, end), by its last piece.
  std::vector<Node> best(n + 1);
  best[0].start = 0;
  for (size_t start = 0; start < n; start += unicode::utf8_sequence_length(static_cast<unsigned char>(text[start]))) {
    const double base = best[start].score;
    const size_t char_len = std::min(unicode::utf8_sequence_length(static_cast<unsigned char>(text[start])), n - start);
    bool has_single_char_piece = false;
    const size_t limit = std::min(max_piece_bytes_, n - start);
    for (size_t len = 1; len <= limit; ++len) {
      auto it = ids_.find(text.substr(start, len));
      if (it == ids_.end()) continue;
      Node& target = best[start + len];
      const double candidate = base + scores_[size_t(it->second)];
      if (target.start == SIZE_MAX || candidate > target.score) target = {candidate, start, it->second};
      if (len == char_len) has_single_char_piece = true;
    }
    if (!has_single_char_piece) {
      Node& target = best[start + char_len];
      const double candidate = base + unk_score_;
      if (target.start == SIZE_MAX || candidate > target.score) target = {candidate, start, unk_id_};
    }
  }

  // Walk back from the end; adjacent unknown nodes fuse into one token whose text is looked up again.
  std::vector<std::pair<size_t, size_t>> spans;  // (start, end), back to front
  std::vector<bool> unknown;
  for (size_t end = n; end > 0;) {
    const Node& node = best[end];
    const bool is_unk = node.id == unk_id_;
    if (is_unk && !unknown.empty() && unknown.back()) {
      spans.back().first = node.start;
    } else {
      spans.emplace_back(node.start, end);
      unknown.push_back(is_unk);
    }
    end = node.start;
  }
  for (size_t k = spans.size(); k-- > 0;) {
    const std::string_view token = text.substr(spans[k].first, spans[k].second - spans[k].first);
    if (!unknown[k]) {
      out.push_back(ids_.find(token)->second);
      continue;
    }
    if (auto id = piece_id(token)) {
      out.push_back(*id);
      continue;
    }
    if (byte_fallback_) {
      std::vector<int32_t> bytes;
      char name[8];
      for (unsigned char b : token) {
        std::snprintf(name, sizeof name, "<0x%02X>", b);
        auto id = piece_id(name);
        if (!id) break;
        bytes.push_back(*id);
      }
      if (bytes.size() == token.size()) {
        out.insert(out.end(), bytes.begin(), bytes.end());
        continue;
      }
    }
    out.push_back(unk_id_);
  }
}

}  // namespace fluxswap
