#pragma once
// Picks and loads the tokenizer a diffusers tokenizer folder holds: FLUX's `tokenizer/` is CLIP (byte-level
// BPE), `tokenizer_2/` is T5 (SentencePiece unigram).
#include <memory>
#include <string>

#include "text/text_tokenizer.h"

namespace fluxswap {

enum class TokenizerKind { kClip, kT5 };

// tokenizer_config.json's "tokenizer_class" when it names CLIP or T5 (fast or slow); otherwise the files:
// vocab.json + merges.txt -> CLIP, spiece.model -> T5, tokenizer.json -> by its model.type (BPE -> CLIP,
// Unigram -> T5). Error naming the folder when none of these identifies it.
TokenizerKind detect_tokenizer_kind(const std::string& dir);

// ClipTokenizer::from_folder or T5Tokenizer::from_folder, as detect_tokenizer_kind decides.
std::unique_ptr<TextTokenizer> load_tokenizer(const std::string& dir);

}  // namespace fluxswap
