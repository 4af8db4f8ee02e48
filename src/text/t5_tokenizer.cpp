#include "text/t5_tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <filesystem>
#include <functional>

#include "core/error.h"
#include "text/precompiled_charsmap.h"
#include "text/tokenizer_files.h"
#include "text/unicode.h"
#include "text/unigram_model.h"

namespace fluxswap {

class T5Tokenizer::Backend {
 public:
  virtual ~Backend() = default;
  // Appends the ids of prompt text that holds no special tokens.
  virtual void encode_text(std::string_view text, std::vector<int32_t>& out) const = 0;
  virtual std::optional<int32_t> piece_id(std::string_view piece) const = 0;
};

namespace {

using nlohmann::json;

// --- spiece.model: SentencePiece does normalisation (the model's own charsmap, whitespace folding, the "▁"
// prefix) and segmentation itself.
class SentencePieceBackend final : public T5Tokenizer::Backend {
 public:
  explicit SentencePieceBackend(const std::string& path) {
    detail::read_tokenizer_file(path, "spiece.model");  // a missing file gets the common message
    const auto status = processor_.Load(path);
    if (!status.ok()) throw Error(path + " (spiece.model): not a SentencePiece model: " + status.ToString());
  }
  void encode_text(std::string_view text, std::vector<int32_t>& out) const override {
    std::vector<int> ids;
    const auto status = processor_.Encode(text, &ids);
    if (!status.ok()) throw Error("SentencePiece failed to encode a prompt: " + status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  }
  std::optional<int32_t> piece_id(std::string_view piece) const override {
    const int id = processor_.PieceToId(piece);
    // PieceToId answers unk for unknown pieces; only a round trip tells them apart from "<unk>" itself.
    if (id < 0 || processor_.IdToPiece(id) != piece) return std::nullopt;
    return id;
  }
  const sentencepiece::SentencePieceProcessor& processor() const { return processor_; }

 private:
  sentencepiece::SentencePieceProcessor processor_;
};

// --- tokenizer.json: the HF pipeline, normaliser -> pre-tokenisers -> unigram model.
using TextStep = std::function<std::string(std::string)>;
using SplitStep = std::function<void(std::vector<std::string>&)>;

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  if (from.empty()) return text;
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = text.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(text, pos, hit - pos).append(to);
  }
  return out.append(text, pos, std::string::npos);
}

void parse_normalizer(const json& n, const std::string& source, std::vector<TextStep>& steps) {
  if (n.is_null()) return;
  const std::string type = n.is_object() ? n.value("type", std::string()) : std::string();
  if (type == "Sequence") {
    for (const json& child : n.value("normalizers", json::array())) parse_normalizer(child, source, steps);
  } else if (type == "Precompiled") {
    const json& map = n.value("precompiled_charsmap", json());
    if (map.is_null()) return;  // a Precompiled normaliser without a map is the identity
    if (!map.is_string()) throw Error(source + ": normalizer.precompiled_charsmap must be a base64 string");
    auto charsmap =
        std::make_shared<PrecompiledCharsmap>(PrecompiledCharsmap::from_base64(map.get<std::string>(), source));
    steps.push_back([charsmap](std::string s) { return charsmap->normalize(s); });
  } else if (type == "Replace") {
    const json& pattern = n.value("pattern", json());
    const std::string content = n.value("content", std::string());
    if (pattern.contains("String") && pattern["String"].is_string()) {
      const std::string from = pattern["String"].get<std::string>();
      steps.push_back([from, content](std::string s) { return replace_all(std::move(s), from, content); });
    } else if (pattern.contains("Regex") && pattern["Regex"] == " {2,}") {
      // The one regex SentencePiece conversions emit: fold runs of spaces.
      steps.push_back([content](std::string s) {
        std::string out;
        for (size_t i = 0; i < s.size();) {
          size_t j = i;
          while (j < s.size() && s[j] == ' ') ++j;
          if (j - i >= 2) {
            out += content;
            i = j;
          } else {
            out += s[i++];
          }
        }
        return out;
      });
    } else {
      throw Error(source + ": unsupported normalizer Replace pattern " + pattern.dump() +
                  ": expected a String, or the Regex \" {2,}\"");
    }
  } else if (type == "Strip") {
    const bool left = n.value("strip_left", true), right = n.value("strip_right", true);
    steps.push_back([left, right](std::string s) {
      std::u32string u = unicode::decode_utf8(s);
      size_t b = 0, e = u.size();
      while (left && b < e && unicode::is_whitespace(u[b])) ++b;
      while (right && e > b && unicode::is_whitespace(u[e - 1])) --e;
      return unicode::encode_utf8(std::u32string_view(u).substr(b, e - b));
    });
  } else if (type == "Lowercase") {
    steps.push_back([](std::string s) { return unicode::encode_utf8(unicode::to_lowercase(unicode::decode_utf8(s))); });
  } else if (type == "NFC") {
    steps.push_back([](std::string s) { return unicode::encode_utf8(unicode::nfc(unicode::decode_utf8(s))); });
  } else {
    throw Error(source + ": unsupported normalizer \"" + type +
                "\": expected Precompiled, Replace, Strip, Lowercase, NFC or a Sequence of them");
  }
}

// Splits on Unicode whitespace, dropping it (HF WhitespaceSplit).
void whitespace_split(std::vector<std::string>& pieces) {
  std::vector<std::string> out;
  for (const std::string& piece : pieces) {
    const std::u32string u = unicode::decode_utf8(piece);
    for (size_t i = 0; i < u.size();) {
      if (unicode::is_whitespace(u[i])) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < u.size() && !unicode::is_whitespace(u[j])) ++j;
      out.push_back(unicode::encode_utf8(std::u32string_view(u).substr(i, j - i)));
      i = j;
    }
  }
  pieces.swap(out);
}

// HF Metaspace: spaces become the replacement ("▁"), a replacement is prepended to a piece that lacks one
// (always, or only to the first piece), and with `split` each piece is cut before every replacement.
void metaspace(std::vector<std::string>& pieces, const std::string& replacement, bool prepend_all, bool prepend_first,
               bool split) {
  std::vector<std::string> out;
  for (size_t p = 0; p < pieces.size(); ++p) {
    std::string s = replace_all(pieces[p], " ", replacement);
    if ((prepend_all || (prepend_first && p == 0)) && s.compare(0, replacement.size(), replacement) != 0) {
      s = replacement + s;
    }
    if (!split) {
      out.push_back(std::move(s));
      continue;
    }
    size_t begin = 0;
    for (size_t hit = s.find(replacement, 1); hit != std::string::npos; hit = s.find(replacement, hit + 1)) {
      if (hit > begin) out.push_back(s.substr(begin, hit - begin));
      begin = hit;
    }
    if (begin < s.size()) out.push_back(s.substr(begin));
  }
  pieces.swap(out);
}

void parse_pre_tokenizer(const json& p, const std::string& source, std::vector<SplitStep>& steps) {
  if (p.is_null()) return;
  const std::string type = p.is_object() ? p.value("type", std::string()) : std::string();
  if (type == "Sequence") {
    for (const json& child : p.value("pretokenizers", json::array())) parse_pre_tokenizer(child, source, steps);
  } else if (type == "WhitespaceSplit") {
    steps.push_back(whitespace_split);
  } else if (type == "Metaspace") {
    const std::string replacement = p.value("replacement", std::string("\xE2\x96\x81"));
    // Newer files say prepend_scheme; older ones add_prefix_space.
    std::string scheme = p.value("prepend_scheme", std::string());
    if (scheme.empty()) scheme = p.value("add_prefix_space", true) ? "always" : "never";
    if (scheme != "always" && scheme != "first" && scheme != "never") {
      throw Error(source + ": Metaspace prepend_scheme \"" + scheme + "\": expected always, first or never");
    }
    const bool split = p.value("split", true);
    steps.push_back([replacement, scheme, split](std::vector<std::string>& pieces) {
      metaspace(pieces, replacement, scheme == "always", scheme == "first", split);
    });
  } else {
    throw Error(source + ": unsupported pre_tokenizer \"" + type +
                "\": expected WhitespaceSplit, Metaspace or a Sequence of them");
  }
}

class TokenizerJsonBackend final : public T5Tokenizer::Backend {
 public:
  TokenizerJsonBackend(std::vector<TextStep> normalizers, std::vector<SplitStep> pre_tokenizers, UnigramModel model)
      : normalizers_(std::move(normalizers)), pre_tokenizers_(std::move(pre_tokenizers)), model_(std::move(model)) {}

  void encode_text(std::string_view text, std::vector<int32_t>& out) const override {
    std::string normalized(text);
    for (const auto& step : normalizers_) normalized = step(std::move(normalized));
    std::vector<std::string> pieces{std::move(normalized)};
    for (const auto& step : pre_tokenizers_) step(pieces);
    for (const std::string& piece : pieces) model_.encode(piece, out);
  }
  std::optional<int32_t> piece_id(std::string_view piece) const override { return model_.piece_id(piece); }
  const UnigramModel& model() const { return model_; }

 private:
  std::vector<TextStep> normalizers_;
  std::vector<SplitStep> pre_tokenizers_;
  UnigramModel model_;
};

}  // namespace

T5Tokenizer::T5Tokenizer(T5Tokenizer&&) noexcept = default;
T5Tokenizer& T5Tokenizer::operator=(T5Tokenizer&&) noexcept = default;
T5Tokenizer::~T5Tokenizer() = default;

T5Tokenizer T5Tokenizer::from_folder(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error("T5 tokenizer folder " + dir + ": not a directory");
  const std::string tokenizer_json = (fs::path(dir) / "tokenizer.json").string();
  const std::string spiece = (fs::path(dir) / "spiece.model").string();
  const std::string config_path = (fs::path(dir) / "tokenizer_config.json").string();
  if (detail::file_exists(tokenizer_json)) return from_tokenizer_json(tokenizer_json);
  if (!detail::file_exists(spiece)) {
    throw Error("T5 tokenizer folder " + dir + ": expected tokenizer.json or spiece.model");
  }
  int extra_ids = kDefaultExtraIds;
  if (detail::file_exists(config_path)) {
    const json config = detail::read_tokenizer_json(config_path, "tokenizer_config.json");
    if (config.is_object() && config.contains("extra_ids")) {
      if (!config["extra_ids"].is_number_integer() || config["extra_ids"].get<int64_t>() < 0) {
        throw Error(config_path + " (tokenizer_config.json): \"extra_ids\" must be a non-negative integer");
      }
      extra_ids = config["extra_ids"].get<int>();
    }
  }
  return from_spiece_model(spiece, extra_ids);
}

T5Tokenizer T5Tokenizer::from_spiece_model(const std::string& spiece_model, int extra_ids) {
  if (extra_ids < 0) throw Error(spiece_model + ": extra_ids must be non-negative, got " + std::to_string(extra_ids));
  auto backend = std::make_unique<SentencePieceBackend>(spiece_model);
  const auto& sp = backend->processor();
  T5Tokenizer t;
  t.eos_id_ = sp.eos_id();
  t.pad_id_ = sp.pad_id();
  t.unk_id_ = sp.unk_id();
  if (t.eos_id_ < 0 || t.pad_id_ < 0) {
    throw Error(spiece_model + " (spiece.model): expected a model with pad and eos pieces (T5 layout), got pad_id " +
                std::to_string(t.pad_id_) + ", eos_id " + std::to_string(t.eos_id_));
  }
  const int model_size = sp.GetPieceSize();
  t.vocab_size_ = size_t(model_size) + size_t(extra_ids);
  for (int id : {t.pad_id_, t.eos_id_, t.unk_id_}) {
    if (id >= 0) t.special_tokens_.emplace_back(sp.IdToPiece(id), id);
  }
  for (int n = 0; n < extra_ids; ++n) {
    t.special_tokens_.emplace_back("<extra_id_" + std::to_string(n) + ">", model_size + extra_ids - 1 - n);
  }
  t.backend_ = std::move(backend);
  return t;
}

T5Tokenizer T5Tokenizer::from_tokenizer_json(const std::string& tokenizer_json) {
  const std::string source = tokenizer_json + " (tokenizer.json)";
  const json root = detail::read_tokenizer_json_model(tokenizer_json, "Unigram", "T5");
  const json& model = root["model"];
  const json& vocab = model.value("vocab", json());
  if (!vocab.is_array() || vocab.empty())
    throw Error(source + ": model.vocab must be a non-empty array of [piece, score]");
  std::vector<std::pair<std::string, double>> pieces;
  pieces.reserve(vocab.size());
  for (size_t i = 0; i < vocab.size(); ++i) {
    const json& entry = vocab[i];
    if (!entry.is_array() || entry.size() != 2 || !entry[0].is_string() || !entry[1].is_number()) {
      throw Error(source + ": model.vocab[" + std::to_string(i) + "] must be [piece, score], got " + entry.dump());
    }
    pieces.emplace_back(entry[0].get<std::string>(), entry[1].get<double>());
  }
  const json& unk = model.value("unk_id", json());
  if (!unk.is_number_integer()) throw Error(source + ": model.unk_id must be an integer");
  const bool byte_fallback = model.value("byte_fallback", false);

  T5Tokenizer t;
  t.unk_id_ = unk.get<int32_t>();
  t.vocab_size_ = pieces.size();
  t.special_tokens_ = detail::parse_added_tokens(root, source);
  for (const auto& added : t.special_tokens_) t.vocab_size_ = std::max(t.vocab_size_, size_t(added.second) + 1);

  std::vector<TextStep> normalizers;
  std::vector<SplitStep> pre_tokenizers;
  parse_normalizer(root.value("normalizer", json()), source, normalizers);
  parse_pre_tokenizer(root.value("pre_tokenizer", json()), source, pre_tokenizers);
  t.backend_ =
      std::make_unique<TokenizerJsonBackend>(std::move(normalizers), std::move(pre_tokenizers),
                                             UnigramModel(std::move(pieces), t.unk_id_, byte_fallback, source));

  const auto eos = t.token_id("</s>");
  if (!eos) throw Error(source + ": no \"</s>\" token: expected T5's end-of-sequence token");
  t.eos_id_ = *eos;
  const json& padding = root.value("padding", json());
  if (padding.is_object() && padding.contains("pad_id") && padding["pad_id"].is_number_integer()) {
    t.pad_id_ = padding["pad_id"].get<int32_t>();
  } else if (auto pad = t.token_id("<pad>")) {
    t.pad_id_ = *pad;
  } else {
    throw Error(source + ": no \"<pad>\" token and no padding.pad_id");
  }
  return t;
}

std::optional<int32_t> T5Tokenizer::token_id(std::string_view token) const {
  if (auto id = detail::special_token_id(special_tokens_, token)) return id;
  return backend_->piece_id(token);
}

std::vector<int32_t> T5Tokenizer::tokenize(const std::string& prompt) const {
  return detail::tokenize_with_specials(prompt, special_tokens_,
                                        [this](std::string_view text, std::vector<int32_t>& ids) {
                                          backend_->encode_text(text, ids);
                                        });
}

TokenEncoding T5Tokenizer::encode(const std::string& prompt, size_t max_length) const {
  return detail::finish_sequence(tokenize(prompt), -1, eos_id_, pad_id_, max_length, "T5");
}

}  // namespace fluxswap
