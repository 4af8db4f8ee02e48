#pragma once
// The T5 tokenizer of FLUX's second text encoder, matching HF T5Tokenizer(Fast) as the diffusers pipelines call it
// (padding="max_length", truncation=True, max_length = 512 for dev, 256 for schnell): special tokens typed in the
// prompt (<pad>, </s>, <unk>, <extra_id_N>) are split out first, the rest is SentencePiece-segmented, </s> is
// appended, the ids are cut to keep </s> last and padded with <pad>.
// Two interchangeable back ends: libsentencepiece on spiece.model, or our own reading of tokenizer.json (the
// Precompiled charsmap normaliser, WhitespaceSplit + Metaspace pre-tokenisers and Viterbi unigram segmentation).
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "text/text_tokenizer.h"

namespace fluxswap {

class T5Tokenizer : public TextTokenizer {
 public:
  static constexpr size_t kDevMaxLength = 512;
  static constexpr size_t kSchnellMaxLength = 256;
  static constexpr int kDefaultExtraIds = 100;

  // A diffusers `tokenizer_2/` folder: tokenizer.json when present (what T5TokenizerFast, hence the pipeline,
  // uses), else spiece.model with `extra_ids` from tokenizer_config.json. Error naming what was expected.
  static T5Tokenizer from_folder(const std::string& dir);
  // spiece.model through libsentencepiece; the <extra_id_N> tokens T5 adds on top of the model get ids
  // model_size + extra_ids - 1 - N, as in HF.
  static T5Tokenizer from_spiece_model(const std::string& spiece_model, int extra_ids = kDefaultExtraIds);
  static T5Tokenizer from_tokenizer_json(const std::string& tokenizer_json);

  T5Tokenizer(T5Tokenizer&&) noexcept;
  T5Tokenizer& operator=(T5Tokenizer&&) noexcept;
  ~T5Tokenizer() override;

  // Exactly `max_length` ids; eos_index is the position of </s> (the number of real tokens before it).
  TokenEncoding encode(const std::string& prompt, size_t max_length = kDevMaxLength) const override;
  // The prompt's token ids alone: no </s>, no truncation, no padding.
  std::vector<int32_t> tokenize(const std::string& prompt) const;

  int32_t eos_id() const override { return eos_id_; }
  int32_t pad_id() const override { return pad_id_; }
  int32_t unk_id() const { return unk_id_; }
  const char* kind() const override { return "t5"; }
  size_t vocab_size() const { return vocab_size_; }  // including the extra ids
  std::optional<int32_t> token_id(std::string_view token) const;

  // The segmenting back end of one loader; defined in t5_tokenizer.cpp.
  class Backend;

 private:
  T5Tokenizer() = default;

  std::unique_ptr<Backend> backend_;
  std::vector<std::pair<std::string, int32_t>> special_tokens_;  // matched verbatim in the raw prompt
  int32_t eos_id_ = 1, pad_id_ = 0, unk_id_ = 2;
  size_t vocab_size_ = 0;
};

}  // namespace fluxswap
