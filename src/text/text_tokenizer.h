#pragma once
// What the text encoders consume: a prompt turned into a fixed-length row of token ids, padded and truncated the
// way the diffusers FLUX pipelines call their tokenizers (padding="max_length", truncation=True).
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fluxswap {

struct TokenEncoding {
  std::vector<int32_t> ids;  // exactly max_length entries
  // Index of the first end-of-sequence id in `ids`: CLIP's pooled output is read there, and for T5 it is the
  // number of real tokens before the padding.
  size_t eos_index = 0;
};

class TextTokenizer {
 public:
  virtual ~TextTokenizer() = default;
  // Throws Error when max_length cannot hold the special tokens.
  virtual TokenEncoding encode(const std::string& prompt, size_t max_length) const = 0;
  virtual int32_t eos_id() const = 0;
  virtual int32_t pad_id() const = 0;
  virtual const char* kind() const = 0;  // "clip" or "t5", for messages
};

namespace detail {

// Lays out [prefix?] content [eos] [pad...] in exactly max_length ids, cutting content so the eos survives
// (truncation keeps the start of the prompt). `prefix` < 0 means none. Throws Error when max_length is too short
// for the special tokens; `who` names the tokenizer in that message.
TokenEncoding finish_sequence(const std::vector<int32_t>& content, int32_t prefix, int32_t eos, int32_t pad,
                              size_t max_length, const char* who);

// A piece of a prompt: literal text, or one of the tokenizer's special tokens spelled out in it.
struct PromptSegment {
  std::string_view text;
  int32_t special_id = -1;  // >= 0 when `text` is a special token
};

// Splits on occurrences of the special tokens (leftmost, longest first), as the reference tokenizers do before
// normalising: a special token typed into a prompt becomes its id, never text.
std::vector<PromptSegment> split_special_tokens(std::string_view prompt,
                                                const std::vector<std::pair<std::string, int32_t>>& specials);

// The id of `token` when it is one of `specials` (matched as a whole).
std::optional<int32_t> special_token_id(const std::vector<std::pair<std::string, int32_t>>& specials,
                                        std::string_view token);

// The ids of a prompt: its special tokens (split out first) as their ids, the text between them appended by
// encode_text(std::string_view text, std::vector<int32_t>& ids).
template <typename EncodeText>
std::vector<int32_t> tokenize_with_specials(std::string_view prompt,
                                            const std::vector<std::pair<std::string, int32_t>>& specials,
                                            EncodeText&& encode_text) {
  std::vector<int32_t> ids;
  for (const PromptSegment& segment : split_special_tokens(prompt, specials)) {
    if (segment.special_id >= 0) {
      ids.push_back(segment.special_id);
    } else {
      encode_text(segment.text, ids);
    }
  }
  return ids;
}

}  // namespace detail

}  // namespace fluxswap
