#include "text/text_tokenizer.h"

#include <algorithm>

#include "core/error.h"

namespace fluxswap::detail {

TokenEncoding finish_sequence(const std::vector<int32_t>& content, int32_t prefix, int32_t eos, int32_t pad,
                              size_t max_length, const char* who) {
  const size_t specials = (prefix >= 0 ? 1 : 0) + 1;
  if (max_length < specials) {
    throw Error(std::string(who) + " tokenizer: max_length " + std::to_string(max_length) +
                " is too short: expected at least " + std::to_string(specials) + " for the special tokens");
  }
  TokenEncoding out;
  out.ids.reserve(max_length);
  if (prefix >= 0) out.ids.push_back(prefix);
  const size_t keep = std::min(content.size(), max_length - specials);
  out.ids.insert(out.ids.end(), content.begin(), content.begin() + static_cast<std::ptrdiff_t>(keep));
  out.ids.push_back(eos);
  out.ids.resize(max_length, pad);
  // The first eos may be one the prompt spelled out literally; the reference pooling takes the first one too.
  out.eos_index = static_cast<size_t>(std::find(out.ids.begin(), out.ids.end(), eos) - out.ids.begin());
  return out;
}

std::vector<PromptSegment> split_special_tokens(std::string_view prompt,
                                                const std::vector<std::pair<std::string, int32_t>>& specials) {
  std::vector<PromptSegment> out;
  size_t text_begin = 0;
  size_t i = 0;
  while (i < prompt.size()) {
    const std::pair<std::string, int32_t>* best = nullptr;
    for (const auto& special : specials) {
      if (!special.first.empty() && prompt.compare(i, special.first.size(), special.first) == 0 &&
          (best == nullptr || special.first.size() > best->first.size())) {
        best = &special;
      }
    }
    if (best == nullptr) {
      ++i;
      continue;
    }
    if (i > text_begin) out.push_back({prompt.substr(text_begin, i - text_begin), -1});
    out.push_back({prompt.substr(i, best->first.size()), best->second});
    i += best->first.size();
    text_begin = i;
  }
  if (text_begin < prompt.size()) out.push_back({prompt.substr(text_begin), -1});
  return out;
}

std::optional<int32_t> special_token_id(const std::vector<std::pair<std::string, int32_t>>& specials,
                                        std::string_view token) {
  for (const auto& [content, id] : specials) {
    if (content == token) return id;
  }
  return std::nullopt;
}

}  // namespace fluxswap::detail
