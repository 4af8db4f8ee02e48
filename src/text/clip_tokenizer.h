#pragma once
// The CLIP tokenizer of FLUX's first text encoder, matching HF CLIPTokenizer(Fast) as the diffusers pipelines call
// it (padding="max_length", truncation=True, max_length=77):
//   special tokens typed in the prompt are split out first; the rest is NFC-normalised, every whitespace run
//   becomes one space, and it is lower-cased; the CLIP pattern
//     <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
//   cuts words (whitespace dropped); each word goes through byte-level BPE with the `</w>` suffix; the ids are
//   framed as <|startoftext|> ... <|endoftext|>, cut to keep the end token, and padded with the pad token.
// This is the tokenizer.json pipeline (transformers' default since ftfy is optional): no ftfy repair, no
// accent stripping, and CJK text is not split into single characters as the ftfy-less slow tokenizer would.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "text/byte_level_bpe.h"
#include "text/text_tokenizer.h"

namespace fluxswap {

class ClipTokenizer : public TextTokenizer {
 public:
  static constexpr size_t kMaxLength = 77;  // CLIP's position table

  // A diffusers `tokenizer/` folder: vocab.json + merges.txt when both are there, else tokenizer.json; the
  // special tokens from tokenizer_config.json when present. Error naming the folder and the files it expected.
  static ClipTokenizer from_folder(const std::string& dir);
  // Explicit files; an empty `tokenizer_config_json` means the CLIP defaults (pad = <|endoftext|>).
  static ClipTokenizer from_vocab_merges(const std::string& vocab_json, const std::string& merges_txt,
                                         const std::string& tokenizer_config_json = "");
  static ClipTokenizer from_tokenizer_json(const std::string& tokenizer_json,
                                           const std::string& tokenizer_config_json = "");

  // Exactly `max_length` ids; eos_index is where the pooled output is read.
  TokenEncoding encode(const std::string& prompt, size_t max_length = kMaxLength) const override;
  // The prompt's token ids alone: no start/end tokens, no truncation, no padding.
  std::vector<int32_t> tokenize(const std::string& prompt) const;

  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const override { return eos_id_; }
  int32_t pad_id() const override { return pad_id_; }
  const char* kind() const override { return "clip"; }
  size_t vocab_size() const { return bpe_.vocab_size(); }
  std::optional<int32_t> token_id(std::string_view token) const;

 private:
  struct SpecialNames {
    std::string bos = "<|startoftext|>";
    std::string eos = "<|endoftext|>";
    std::optional<std::string> pad;  // defaults to eos, as FLUX's CLIP config has it
    std::optional<std::string> unk;  // defaults to eos
  };

  ClipTokenizer(ByteLevelBpe bpe, std::vector<std::pair<std::string, int32_t>> added_tokens, const SpecialNames& names,
                const std::string& source);
  static void apply_config(SpecialNames& names, const std::string& tokenizer_config_json);
  void tokenize_text(std::string_view text, std::vector<int32_t>& out) const;

  ByteLevelBpe bpe_;
  // Tokens matched verbatim in the raw prompt before normalisation (HF "added tokens").
  std::vector<std::pair<std::string, int32_t>> added_tokens_;
  int32_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1;
};

}  // namespace fluxswap
