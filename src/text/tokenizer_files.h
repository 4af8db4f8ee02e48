#pragma once
// Reading the files of a tokenizer folder (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json,
// spiece.model): every failure is an Error that names the file and what was expected of it.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fluxswap::detail {

// The whole file; Error "cannot read <path> (<what>)" when it is missing or unreadable.
std::string read_tokenizer_file(const std::string& path, const char* what);
// Parsed JSON; Error naming the file and the parser's complaint when it is not JSON.
nlohmann::json read_tokenizer_json(const std::string& path, const char* what);
// A tokenizer.json: an object whose "model" object has type `model_type` ("BPE", "Unigram"); `who` names the
// tokenizer ("CLIP", "T5") in the Error for any other file.
nlohmann::json read_tokenizer_json_model(const std::string& path, const char* model_type, const char* who);
// The "added_tokens" of a tokenizer.json root as (content, id) pairs, empty when absent; Error naming `source` for
// an entry without a string "content" and a non-negative integer "id".
std::vector<std::pair<std::string, int32_t>> parse_added_tokens(const nlohmann::json& root, const std::string& source);
// A special token as the HF configs spell it: a plain string, or an AddedToken object {"content": ...}.
// nullopt when the key is absent or null; Error naming `path` and `key` for any other shape.
std::optional<std::string> special_token_field(const nlohmann::json& object, const std::string& key,
                                               const std::string& path);
bool file_exists(const std::string& path);

}  // namespace fluxswap::detail
