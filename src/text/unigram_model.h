#pragma once
// A SentencePiece unigram language model, segmenting one pre-tokenised piece (e.g. "▁hello") into the vocabulary
// pieces whose log-probabilities sum highest (Viterbi over the piece's characters). Semantics follow HF
// tokenizers' Unigram: every vocabulary entry can match; a character no entry starts with becomes an unknown
// node scored (lowest score - 10); runs of unknown nodes fuse into one unknown token; ties keep the first
// path found scanning left to right.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fluxswap {

class UnigramModel {
 public:
  // `pieces[i]` is (piece, score) of id i. `byte_fallback` spells unknown characters as <0xXX> byte pieces
  // when the vocabulary has them. Error naming `source` for an empty vocabulary or an unk_id out of range.
  UnigramModel(std::vector<std::pair<std::string, double>> pieces, int32_t unk_id, bool byte_fallback,
               const std::string& source);

  void encode(std::string_view piece, std::vector<int32_t>& out) const;

  std::optional<int32_t> piece_id(std::string_view piece) const;
  size_t size() const { return scores_.size(); }
  int32_t unk_id() const { return unk_id_; }

 private:
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
  };
  std::unordered_map<std::string, int32_t, Hash, std::equal_to<>> ids_;
  std::vector<double> scores_;
  size_t max_piece_bytes_ = 0;
  double unk_score_ = 0;
  int32_t unk_id_ = 0;
  bool byte_fallback_ = false;
};

}  // namespace fluxswap
