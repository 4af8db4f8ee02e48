#include "model/flux_step_order.h"

#include <string_view>

namespace fluxswap {

namespace {

// Called for every tensor of a LoRA file as its read is planned (and for every pair as a swap places it): plain
// scans instead of regular expressions, which cost ~4 µs a name.

bool is_separator(char c) { return c == '.' || c == '_'; }

// Where `word` next occurs at or after `from` starting a token (at the start or after '.' or '_'); npos if nowhere.
size_t find_token(std::string_view name, std::string_view word, size_t from) {
  for (size_t at = name.find(word, from); at != std::string_view::npos; at = name.find(word, at + 1))
    if (at == 0 || is_separator(name[at - 1])) return at;
  return std::string_view::npos;
}

// A token `word` followed by a separator and `next`, which must end a token too when `whole` (else it may run on).
bool has_token_then(std::string_view name, std::string_view word, std::string_view next, bool whole) {
  for (size_t at = find_token(name, word, 0); at != std::string_view::npos; at = find_token(name, word, at + 1)) {
    const size_t after = at + word.size(), end = after + 1 + next.size();
    if (after < name.size() && is_separator(name[after]) && name.substr(after + 1, next.size()) == next &&
        (!whole || end == name.size() || (end < name.size() && is_separator(name[end]))))
      return true;
  }
  return false;
}

// A token `word` followed by a separator, a block number and a separator or the end: the number of the first such.
int64_t numbered(std::string_view name, std::string_view word) {
  for (size_t at = find_token(name, word, 0); at != std::string_view::npos; at = find_token(name, word, at + 1)) {
    size_t p = at + word.size();
    if (p >= name.size() || !is_separator(name[p])) continue;
    const size_t digits = ++p;
    int64_t n = 0;
    while (p < name.size() && name[p] >= '0' && name[p] <= '9' && p - digits < 9) n = n * 10 + (name[p++] - '0');
    if (p > digits && (p == name.size() || is_separator(name[p]))) return n;
  }
  return -1;
}

// A token `word` that ends at a separator or the end of the name.
bool has_whole_token(std::string_view name, std::string_view word) {
  for (size_t at = find_token(name, word, 0); at != std::string_view::npos; at = find_token(name, word, at + 1)) {
    const size_t after = at + word.size();
    if (after == name.size() || is_separator(name[after])) return true;
  }
  return false;
}

}  // namespace

int64_t flux_step_rank(const std::string& name, const FluxConfig& config) {
  const std::string_view n = name;
  // Modulations run before the first block, whichever block they belong to.
  for (std::string_view mod :
       {"img_mod", "txt_mod", "modulation", "adaLN_modulation", "norm1", "norm1_context", "norm", "norm_out"})
    if (has_token_then(n, mod, "lin", false)) return 0;
  int64_t i = numbered(n, "single_blocks");
  if (i < 0) i = numbered(n, "single_transformer_blocks");
  if (i >= 0) return i < config.num_single_layers ? 1 + config.num_layers + i : 0;
  i = numbered(n, "double_blocks");
  if (i < 0) i = numbered(n, "transformer_blocks");
  if (i >= 0) return i < config.num_layers ? 1 + i : 0;
  if (has_whole_token(n, "proj_out") || has_token_then(n, "final_layer", "linear", true))
    return flux_step_ranks(config) - 1;
  return 0;
}

}  // namespace fluxswap
