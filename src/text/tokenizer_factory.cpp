#include "text/tokenizer_factory.h"

#include <filesystem>

#include "core/error.h"
#include "text/clip_tokenizer.h"
#include "text/t5_tokenizer.h"
#include "text/tokenizer_files.h"

namespace fluxswap {

TokenizerKind detect_tokenizer_kind(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error("tokenizer folder " + dir + ": not a directory");
  auto file = [&](const char* name) { return (fs::path(dir) / name).string(); };

  if (detail::file_exists(file("tokenizer_config.json"))) {
    const auto config = detail::read_tokenizer_json(file("tokenizer_config.json"), "tokenizer_config.json");
    const std::string cls =
        config.is_object() && config.contains("tokenizer_class") && config["tokenizer_class"].is_string()
            ? config["tokenizer_class"].get<std::string>()
            : std::string();
    if (cls.rfind("CLIPTokenizer", 0) == 0) return TokenizerKind::kClip;
    if (cls.rfind("T5Tokenizer", 0) == 0) return TokenizerKind::kT5;
    // Other classes (or none) fall through to the files, which decide what we can load.
  }
  if (detail::file_exists(file("vocab.json")) && detail::file_exists(file("merges.txt"))) return TokenizerKind::kClip;
  if (detail::file_exists(file("spiece.model"))) return TokenizerKind::kT5;
  if (detail::file_exists(file("tokenizer.json"))) {
    const auto root = detail::read_tokenizer_json(file("tokenizer.json"), "tokenizer.json");
    const std::string type = root.is_object() && root.contains("model") && root["model"].is_object()
                                 ? root["model"].value("type", std::string())
                                 : std::string();
    if (type == "BPE") return TokenizerKind::kClip;
    if (type == "Unigram") return TokenizerKind::kT5;
    throw Error(file("tokenizer.json") + ": model.type \"" + type + "\": expected \"BPE\" (CLIP) or \"Unigram\" (T5)");
  }
  throw Error("tokenizer folder " + dir +
              ": expected vocab.json + merges.txt or tokenizer.json (CLIP), or spiece.model or tokenizer.json (T5)");
}

std::unique_ptr<TextTokenizer> load_tokenizer(const std::string& dir) {
  switch (detect_tokenizer_kind(dir)) {
    case TokenizerKind::kClip:
      return std::make_unique<ClipTokenizer>(ClipTokenizer::from_folder(dir));
    case TokenizerKind::kT5:
      return std::make_unique<T5Tokenizer>(T5Tokenizer::from_folder(dir));
  }
  throw Error("tokenizer folder " + dir + ": unknown tokenizer kind");
}

}  // namespace fluxswap
