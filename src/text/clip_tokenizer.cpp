#include "text/clip_tokenizer.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "text/tokenizer_files.h"
#include "text/unicode.h"

namespace fluxswap {

namespace {

using nlohmann::json;
using unicode::is_letter;
using unicode::is_number;
using unicode::is_whitespace;

std::unordered_map<std::string, int32_t> parse_vocab(const json& vocab, const std::string& source) {
  if (!vocab.is_object()) throw Error(source + ": expected the vocabulary as an object mapping tokens to ids");
  std::unordered_map<std::string, int32_t> out;
  out.reserve(vocab.size());
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      throw Error(source + ": token \"" + token + "\" must map to a non-negative integer id, got " + id.dump());
    }
    out.emplace(token, id.get<int32_t>());
  }
  if (out.empty()) throw Error(source + ": the vocabulary is empty");
  return out;
}

std::vector<std::pair<std::string, std::string>> parse_merges_txt(const std::string& text, const std::string& path) {
  std::vector<std::pair<std::string, std::string>> merges;
  size_t line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    const size_t space = line.find(' ');
    if (space == 0 || space == std::string::npos || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string::npos) {
      throw Error(path + " (merges.txt): line " + std::to_string(line_no) +
                  ": expected two tokens separated by one space, got \"" + line + "\"");
    }
    merges.emplace_back(line.substr(0, space), line.substr(space + 1));
  }
  return merges;
}

std::vector<std::pair<std::string, std::string>> parse_json_merges(const json& merges, const std::string& source) {
  if (!merges.is_array()) throw Error(source + ": model.merges must be an array");
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& m = merges[i];
    // Two spellings exist: "a b" (tokenizers < 0.20) and ["a", "b"].
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space != std::string::npos && space > 0 && space + 1 < s.size()) {
        out.emplace_back(s.substr(0, space), s.substr(space + 1));
        continue;
      }
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      out.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
      continue;
    }
    throw Error(source + ": model.merges[" + std::to_string(i) + "] must be \"a b\" or [\"a\", \"b\"], got " +
                m.dump());
  }
  return out;
}

bool starts_with_at(std::u32string_view s, size_t i, std::u32string_view prefix) {
  return s.size() - i >= prefix.size() && s.compare(i, prefix.size(), prefix) == 0;
}

// Length of the match of the CLIP pre-tokenisation pattern at s[i] (s[i] is not whitespace). The alternatives
// are tried in the pattern's order, as a backtracking regex engine does, so e.g. "'s" wins over punctuation.
size_t clip_piece_length(std::u32string_view s, size_t i) {
  static constexpr std::u32string_view kFixed[] = {
      U"<|startoftext|>", U"<|endoftext|>", U"'s", U"'t", U"'re", U"'ve", U"'m", U"'ll", U"'d"};
  for (std::u32string_view fixed : kFixed) {
    if (starts_with_at(s, i, fixed)) return fixed.size();
  }
  size_t j = i;
  if (is_letter(s[i])) {
    while (j < s.size() && is_letter(s[j])) ++j;
    return j - i;
  }
  if (is_number(s[i])) return 1;  // digits are single tokens in CLIP
  while (j < s.size() && !is_whitespace(s[j]) && !is_letter(s[j]) && !is_number(s[j])) ++j;
  return j - i;
}

std::optional<int32_t> lookup(const std::unordered_map<std::string, int32_t>& vocab,
                              const std::vector<std::pair<std::string, int32_t>>& added, const std::string& token) {
  if (auto id = detail::special_token_id(added, token)) return id;
  auto it = vocab.find(token);
  if (it == vocab.end()) return std::nullopt;
  return it->second;
}

}  // namespace

void ClipTokenizer::apply_config(SpecialNames& names, const std::string& tokenizer_config_json) {
  if (tokenizer_config_json.empty()) return;
  const json config = detail::read_tokenizer_json(tokenizer_config_json, "tokenizer_config.json");
  if (!config.is_object()) throw Error(tokenizer_config_json + " (tokenizer_config.json): expected a JSON object");
  if (auto v = detail::special_token_field(config, "bos_token", tokenizer_config_json)) names.bos = *v;
  if (auto v = detail::special_token_field(config, "eos_token", tokenizer_config_json)) names.eos = *v;
  if (auto v = detail::special_token_field(config, "pad_token", tokenizer_config_json)) names.pad = *v;
  if (auto v = detail::special_token_field(config, "unk_token", tokenizer_config_json)) names.unk = *v;
}

ClipTokenizer ClipTokenizer::from_folder(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error("CLIP tokenizer folder " + dir + ": not a directory");
  const std::string vocab = (fs::path(dir) / "vocab.json").string();
  const std::string merges = (fs::path(dir) / "merges.txt").string();
  const std::string tokenizer_json = (fs::path(dir) / "tokenizer.json").string();
  const std::string config_path = (fs::path(dir) / "tokenizer_config.json").string();
  const std::string config = detail::file_exists(config_path) ? config_path : std::string();
  const bool have_vocab = detail::file_exists(vocab), have_merges = detail::file_exists(merges);
  if (have_vocab && have_merges) return from_vocab_merges(vocab, merges, config);
  if (detail::file_exists(tokenizer_json)) return from_tokenizer_json(tokenizer_json, config);
  if (have_vocab != have_merges) {
    throw Error("CLIP tokenizer folder " + dir + ": found " + (have_vocab ? vocab : merges) + " but not " +
                (have_vocab ? merges : vocab) + " (and no tokenizer.json)");
  }
  throw Error("CLIP tokenizer folder " + dir + ": expected vocab.json + merges.txt, or tokenizer.json");
}

ClipTokenizer ClipTokenizer::from_vocab_merges(const std::string& vocab_json, const std::string& merges_txt,
                                               const std::string& tokenizer_config_json) {
  auto vocab = parse_vocab(detail::read_tokenizer_json(vocab_json, "vocab.json"), vocab_json + " (vocab.json)");
  auto merges = parse_merges_txt(detail::read_tokenizer_file(merges_txt, "merges.txt"), merges_txt);
  SpecialNames names;
  apply_config(names, tokenizer_config_json);
  const std::string& unk = names.unk ? *names.unk : names.eos;
  auto unk_it = vocab.find(unk);
  const int32_t unk_id = unk_it == vocab.end() ? -1 : unk_it->second;

  // The slow tokenizer's added tokens are its special tokens; they come from the vocabulary.
  std::vector<std::pair<std::string, int32_t>> added;
  for (const std::string& token : {names.bos, names.eos, names.pad.value_or(names.eos), unk}) {
    auto it = vocab.find(token);
    if (it == vocab.end()) {
      throw Error(vocab_json + " (vocab.json): special token \"" + token + "\" is not in the vocabulary");
    }
    if (std::none_of(added.begin(), added.end(), [&](const auto& a) { return a.first == token; })) {
      added.emplace_back(token, it->second);
    }
  }
  ByteLevelBpe bpe(std::move(vocab), merges, "</w>", unk_id, merges_txt + " (merges.txt)");
  return ClipTokenizer(std::move(bpe), std::move(added), names, vocab_json + " (vocab.json)");
}

ClipTokenizer ClipTokenizer::from_tokenizer_json(const std::string& tokenizer_json,
                                                 const std::string& tokenizer_config_json) {
  const std::string source = tokenizer_json + " (tokenizer.json)";
  const json root = detail::read_tokenizer_json_model(tokenizer_json, "BPE", "CLIP");
  const json& model = root["model"];
  if (model.contains("continuing_subword_prefix") && model["continuing_subword_prefix"].is_string() &&
      !model["continuing_subword_prefix"].get<std::string>().empty()) {
    throw Error(source + ": model.continuing_subword_prefix is not supported: expected CLIP's byte-level BPE");
  }
  auto vocab = parse_vocab(model.value("vocab", json()), source + " model.vocab");
  auto merges = parse_json_merges(model.value("merges", json::array()), source);
  std::string suffix;
  if (model.contains("end_of_word_suffix") && model["end_of_word_suffix"].is_string()) {
    suffix = model["end_of_word_suffix"].get<std::string>();
  }

  std::vector<std::pair<std::string, int32_t>> added = detail::parse_added_tokens(root, source);

  SpecialNames names;
  // The post-processor frames the sequence: RobertaProcessing's cls/sep are CLIP's start/end tokens.
  if (root.contains("post_processor") && root["post_processor"].is_object()) {
    const json& post = root["post_processor"];
    if (post.contains("cls") && post["cls"].is_array() && !post["cls"].empty() && post["cls"][0].is_string())
      names.bos = post["cls"][0].get<std::string>();
    if (post.contains("sep") && post["sep"].is_array() && !post["sep"].empty() && post["sep"][0].is_string())
      names.eos = post["sep"][0].get<std::string>();
  }
  if (root.contains("padding") && root["padding"].is_object()) {
    if (auto v = detail::special_token_field(root["padding"], "pad_token", tokenizer_json)) names.pad = *v;
  }
  if (model.contains("unk_token") && model["unk_token"].is_string()) names.unk = model["unk_token"].get<std::string>();
  apply_config(names, tokenizer_config_json);

  const auto unk_id = lookup(vocab, added, names.unk.value_or(names.eos));
  ByteLevelBpe bpe(std::move(vocab), merges, suffix, unk_id.value_or(-1), source);
  return ClipTokenizer(std::move(bpe), std::move(added), names, source);
}

ClipTokenizer::ClipTokenizer(ByteLevelBpe bpe, std::vector<std::pair<std::string, int32_t>> added_tokens,
                             const SpecialNames& names, const std::string& source)
    : bpe_(std::move(bpe)), added_tokens_(std::move(added_tokens)) {
  auto resolve = [&](const std::string& token, const char* role) {
    if (auto id = detail::special_token_id(added_tokens_, token)) return *id;
    if (auto id = bpe_.token_id(token)) return *id;
    throw Error(source + ": the " + std::string(role) + " token \"" + token + "\" is not in the vocabulary");
  };
  bos_id_ = resolve(names.bos, "start");
  eos_id_ = resolve(names.eos, "end");
  pad_id_ = resolve(names.pad.value_or(names.eos), "pad");
  // The start/end tokens must split out of a prompt even if the tokenizer.json did not list them.
  for (const auto& [token, id] : {std::pair{names.bos, bos_id_}, std::pair{names.eos, eos_id_}}) {
    if (std::none_of(added_tokens_.begin(), added_tokens_.end(), [&](const auto& a) { return a.first == token; })) {
      added_tokens_.emplace_back(token, id);
    }
  }
}

std::optional<int32_t> ClipTokenizer::token_id(std::string_view token) const {
  if (auto id = detail::special_token_id(added_tokens_, token)) return id;
  return bpe_.token_id(token);
}

void ClipTokenizer::tokenize_text(std::string_view text, std::vector<int32_t>& out) const {
  const std::u32string composed = unicode::nfc(unicode::decode_utf8(text));
  // Normaliser order as in tokenizer.json: NFC, every whitespace run -> " ", lower-case.
  std::u32string normalized;
  normalized.reserve(composed.size());
  for (size_t i = 0; i < composed.size();) {
    if (is_whitespace(composed[i])) {
      while (i < composed.size() && is_whitespace(composed[i])) ++i;
      normalized.push_back(U' ');
    } else {
      unicode::append_lowercase(normalized, composed[i++]);
    }
  }
  std::string word;
  for (size_t i = 0; i < normalized.size();) {
    if (is_whitespace(normalized[i])) {
      ++i;
      continue;
    }
    const size_t len = clip_piece_length(normalized, i);
    word = unicode::encode_utf8(std::u32string_view(normalized).substr(i, len));
    bpe_.encode_word(word, out);
    i += len;
  }
}

std::vector<int32_t> ClipTokenizer::tokenize(const std::string& prompt) const {
  return detail::tokenize_with_specials(
      prompt, added_tokens_, [this](std::string_view text, std::vector<int32_t>& ids) { tokenize_text(text, ids); });
}

TokenEncoding ClipTokenizer::encode(const std::string& prompt, size_t max_length) const {
  return detail::finish_sequence(tokenize(prompt), bos_id_, eos_id_, pad_id_, max_length, "CLIP");
}

}  // namespace fluxswap
