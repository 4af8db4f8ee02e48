// Tokenizers against the goldens of shared/fixtures/tokenizers (ids from HF CLIPTokenizer / T5Tokenizer as the
// FLUX pipelines call them), through every loader, plus truncation, special tokens and loader errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "test_support.h"
#include "text/clip_tokenizer.h"
#include "text/t5_tokenizer.h"
#include "text/tokenizer_factory.h"
#include "text/unicode.h"

namespace fs = std::filesystem;
using namespace fluxswap;
using fluxswap::test::fixtures_dir;
using fluxswap::test::TempDir;

namespace {

constexpr size_t kGoldenT5Length = 64;  // goldens.json pads T5 to 64

std::string tokenizers_dir() { return fixtures_dir() + "/tokenizers"; }
std::string pipeline_dir() { return fixtures_dir() + "/tiny/pipeline"; }

#define REQUIRE_TOKENIZER_FIXTURES() \
  if (!fs::exists(tokenizers_dir() + "/goldens.json")) GTEST_SKIP() << "no tokenizer fixtures at " << tokenizers_dir()

struct Golden {
  std::string prompt;
  std::vector<int32_t> clip_ids, t5_ids;
};

const std::vector<Golden>& goldens() {
  static const std::vector<Golden> all = [] {
    std::ifstream in(tokenizers_dir() + "/goldens.json");
    const auto doc = nlohmann::json::parse(in);
    std::vector<Golden> out;
    for (const auto& e : doc) {
      out.push_back({e.at("prompt").get<std::string>(), e.at("clip_ids").get<std::vector<int32_t>>(),
                     e.at("t5_ids").get<std::vector<int32_t>>()});
    }
    return out;
  }();
  return all;
}

size_t first_index_of(const std::vector<int32_t>& ids, int32_t id) {
  return size_t(std::find(ids.begin(), ids.end(), id) - ids.begin());
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::string long_prompt() {
  std::string p;
  for (int i = 0; i < 300; ++i) p += "a very long prompt about a red fox jumping over dogs, ";
  return p;
}

// Runs `stmt`, expecting a fluxswap::Error whose message contains `part`.
#define EXPECT_ERROR_MENTIONS(stmt, part)                                           \
  do {                                                                              \
    try {                                                                           \
      stmt;                                                                         \
      ADD_FAILURE() << "expected fluxswap::Error from: " #stmt;                     \
    } catch (const fluxswap::Error& e_) {                                           \
      EXPECT_NE(std::string(e_.what()).find(part), std::string::npos) << e_.what(); \
    }                                                                               \
  } while (0)

void expect_clip_goldens(const ClipTokenizer& tok, const char* loader) {
  ASSERT_FALSE(goldens().empty());
  for (const Golden& g : goldens()) {
    const TokenEncoding enc = tok.encode(g.prompt);
    EXPECT_EQ(enc.ids, g.clip_ids) << loader << ": " << g.prompt;
    EXPECT_EQ(enc.eos_index, first_index_of(g.clip_ids, 49407)) << loader << ": " << g.prompt;
  }
}

void expect_t5_goldens(const T5Tokenizer& tok, const char* loader) {
  ASSERT_FALSE(goldens().empty());
  for (const Golden& g : goldens()) {
    const TokenEncoding enc = tok.encode(g.prompt, kGoldenT5Length);
    EXPECT_EQ(enc.ids, g.t5_ids) << loader << ": " << g.prompt;
    EXPECT_EQ(enc.eos_index, first_index_of(g.t5_ids, 1)) << loader << ": " << g.prompt;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// CLIP

TEST(ClipTokenizer, GoldensFromVocabAndMerges) {
  REQUIRE_TOKENIZER_FIXTURES();
  const auto tok = ClipTokenizer::from_folder(tokenizers_dir() + "/clip");  // vocab.json + merges.txt only
  EXPECT_EQ(tok.vocab_size(), 49408u);
  EXPECT_EQ(tok.bos_id(), 49406);
  EXPECT_EQ(tok.eos_id(), 49407);
  EXPECT_EQ(tok.pad_id(), 49407);
  expect_clip_goldens(tok, "vocab.json + merges.txt");
}

TEST(ClipTokenizer, GoldensFromTokenizerJson) {
  REQUIRE_TOKENIZER_FIXTURES();
  // The pipeline's tokenizer/ carries the same CLIP vocabulary in both forms.
  const std::string dir = pipeline_dir() + "/tokenizer";
  const auto tok = ClipTokenizer::from_tokenizer_json(dir + "/tokenizer.json", dir + "/tokenizer_config.json");
  EXPECT_EQ(tok.pad_id(), 49407);
  expect_clip_goldens(tok, "tokenizer.json");
}

TEST(ClipTokenizer, FolderFallsBackToTokenizerJson) {
  REQUIRE_TOKENIZER_FIXTURES();
  TempDir dir;
  fs::copy_file(pipeline_dir() + "/tokenizer/tokenizer.json", dir / "tokenizer.json");
  expect_clip_goldens(ClipTokenizer::from_folder(dir.path().string()), "folder with tokenizer.json only");
}

TEST(ClipTokenizer, FolderLoadsPipelineTokenizer) {
  REQUIRE_TOKENIZER_FIXTURES();
  expect_clip_goldens(ClipTokenizer::from_folder(pipeline_dir() + "/tokenizer"), "pipeline tokenizer/");
}

TEST(ClipTokenizer, TruncationKeepsEndTokenLast) {
  REQUIRE_TOKENIZER_FIXTURES();
  const auto tok = ClipTokenizer::from_folder(tokenizers_dir() + "/clip");
  const std::string prompt = long_prompt();
  const auto content = tok.tokenize(prompt);
  ASSERT_GT(content.size(), 200u);
  const TokenEncoding enc = tok.encode(prompt);
  ASSERT_EQ(enc.ids.size(), 77u);
  EXPECT_EQ(enc.ids.front(), 49406);
  EXPECT_EQ(enc.ids.back(), 49407);
  EXPECT_EQ(enc.eos_index, 76u);
  EXPECT_TRUE(std::equal(enc.ids.begin() + 1, enc.ids.end() - 1, content.begin()));  // keeps the start

  const TokenEncoding short_enc = tok.encode(prompt, 8);
  ASSERT_EQ(short_enc.ids.size(), 8u);
  EXPECT_EQ(short_enc.ids.back(), 49407);
  EXPECT_ERROR_MENTIONS(tok.encode(prompt, 1), "max_length 1");
}

TEST(ClipTokenizer, EmptyPromptAndEndIndex) {
  REQUIRE_TOKENIZER_FIXTURES();
  const auto tok = ClipTokenizer::from_folder(tokenizers_dir() + "/clip");
  const TokenEncoding enc = tok.encode("");
  ASSERT_EQ(enc.ids.size(), 77u);
  EXPECT_EQ(enc.ids[0], 49406);
  EXPECT_TRUE(std::all_of(enc.ids.begin() + 1, enc.ids.end(), [](int32_t id) { return id == 49407; }));
  EXPECT_EQ(enc.eos_index, 1u);
  EXPECT_EQ(tok.encode("   \t\n ").ids, enc.ids);
}

TEST(ClipTokenizer, NormalisesCaseWhitespaceAndComposition) {
  REQUIRE_TOKENIZER_FIXTURES();
  const auto tok = ClipTokenizer::from_folder(tokenizers_dir() + "/clip");
  EXPECT_EQ(tok.tokenize("A  CAT\t\nHolding"), tok.tokenize("a cat holding"));
  EXPECT_EQ(tok.tokenize("Cafe\xCC\x81"), tok.tokenize("caf\xC3\xA9"));  // e + combining acute == é (NFC)
  EXPECT_EQ(tok.tokenize("\xCE\xA3\xCE\x9F\xCE\xA6\xCE\x99\xCE\x91"),
            tok.tokenize("\xCF\x83\xCE\xBF\xCF\x86\xCE\xB9\xCE\xB1"));
  // Digits are single tokens; contractions split off.
  EXPECT_EQ(tok.tokenize("1024").size(), 4u);
  EXPECT_EQ(tok.tokenize("it's"), (std::vector<int32_t>{585, 568}));
}

TEST(ClipTokenizer, SpecialTokensInPromptBecomeIds) {
  REQUIRE_TOKENIZER_FIXTURES();
  const auto tok = ClipTokenizer::from_folder(tokenizers_dir() + "/clip");
  const auto ids = tok.tokenize("a<|endoftext|>cat");
  EXPECT_EQ(ids, (std::vector<int32_t>{320, 49407, 2368}));
  const TokenEncoding enc = tok.encode("a<|endoftext|>cat");
  EXPECT_EQ(enc.eos_index, 2u);  // the first end token, as the pooled output reads it
}

TEST(ClipTokenizer, PadTokenFromConfig) {
  REQUIRE_TOKENIZER_FIXTURES();
  TempDir dir;
  fs::copy_file(tokenizers_dir() + "/clip/vocab.json", dir / "vocab.json");
  fs::copy_file(tokenizers_dir() + "/clip/merges.txt", dir / "merges.txt");
  // SD2-style CLIP pads with "!" (id 0); the pooled output must still find the real end token.
  write_file(dir / "tokenizer_config.json", R"({"pad_token": {"content": "!", "lstrip": false}})");
  const auto tok = ClipTokenizer::from_folder(dir.path().string());
  EXPECT_EQ(tok.pad_id(), 0);
  const TokenEncoding enc = tok.encode("a cat");
  EXPECT_EQ(enc.ids[0], 49406);
  EXPECT_EQ(enc.ids[3], 49407);
  EXPECT_EQ(enc.eos_index, 3u);
  EXPECT_TRUE(std::all_of(enc.ids.begin() + 4, enc.ids.end(), [](int32_t id) { return id == 0; }));
}

TEST(ClipTokenizer, MissingFilesNameThem) {
  REQUIRE_TOKENIZER_FIXTURES();
  TempDir dir;
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_folder(dir / "nope"), "not a directory");
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_folder(dir.path().string()), "vocab.json + merges.txt, or tokenizer.json");
  fs::copy_file(tokenizers_dir() + "/clip/vocab.json", dir / "vocab.json");
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_folder(dir.path().string()), "merges.txt");
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_vocab_merges(dir / "vocab.json", dir / "merges.txt"), dir / "merges.txt");
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_tokenizer_json(dir / "tokenizer.json"), dir / "tokenizer.json");
}

TEST(ClipTokenizer, MalformedFilesAreErrors) {
  REQUIRE_TOKENIZER_FIXTURES();
  TempDir dir;
  const std::string merges = tokenizers_dir() + "/clip/merges.txt";
  write_file(dir / "vocab.json", "{\"a\": 1, ");
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_vocab_merges(dir / "vocab.json", merges), dir / "vocab.json");
  write_file(dir / "vocab.json", "[1, 2, 3]");
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_vocab_merges(dir / "vocab.json", merges), "object mapping tokens to ids");
  write_file(dir / "vocab.json", R"({"a": "one"})");
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_vocab_merges(dir / "vocab.json", merges), "\"a\"");

  fs::copy_file(tokenizers_dir() + "/clip/vocab.json", dir / "real_vocab.json");
  write_file(dir / "merges.txt", "#version: 0.2\ni n\nthisisnotamerge\n");
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_vocab_merges(dir / "real_vocab.json", dir / "merges.txt"), "line 3");
  write_file(dir / "merges.txt", "#version: 0.2\nq\xC3\xA9 zz\n");
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_vocab_merges(dir / "real_vocab.json", dir / "merges.txt"),
                        "not in the vocabulary");

  // A T5 tokenizer.json is not a CLIP one.
  EXPECT_ERROR_MENTIONS(ClipTokenizer::from_tokenizer_json(tokenizers_dir() + "/t5/tokenizer.json"),
                        "expected model.type \"BPE\"");
  write_file(dir / "tokenizer_config.json", "{\"pad_token\": 5}");
  fs::copy_file(merges, dir / "real_merges.txt");
  EXPECT_ERROR_MENTIONS(
      ClipTokenizer::from_vocab_merges(dir / "real_vocab.json", dir / "real_merges.txt", dir / "tokenizer_config.json"),
      "pad_token");
}

// ---------------------------------------------------------------------------------------------------------------
// T5

TEST(T5Tokenizer, GoldensFromSpieceModel) {
  REQUIRE_TOKENIZER_FIXTURES();
  const auto tok = T5Tokenizer::from_spiece_model(tokenizers_dir() + "/t5/spiece.model");
  EXPECT_EQ(tok.vocab_size(), 1100u);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_EQ(tok.pad_id(), 0);
  EXPECT_EQ(tok.unk_id(), 2);
  expect_t5_goldens(tok, "spiece.model");
}

TEST(T5Tokenizer, GoldensFromTokenizerJson) {
  REQUIRE_TOKENIZER_FIXTURES();
  const auto tok = T5Tokenizer::from_tokenizer_json(tokenizers_dir() + "/t5/tokenizer.json");
  EXPECT_EQ(tok.vocab_size(), 1100u);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_EQ(tok.pad_id(), 0);
  expect_t5_goldens(tok, "tokenizer.json");
}

TEST(T5Tokenizer, PipelineFolderEitherLoader) {
  REQUIRE_TOKENIZER_FIXTURES();
  const std::string src = pipeline_dir() + "/tokenizer_2";
  expect_t5_goldens(T5Tokenizer::from_folder(src), "pipeline tokenizer_2/ (tokenizer.json)");
  TempDir dir;
  fs::copy_file(src + "/spiece.model", dir / "spiece.model");
  fs::copy_file(src + "/tokenizer_config.json", dir / "tokenizer_config.json");
  expect_t5_goldens(T5Tokenizer::from_folder(dir.path().string()), "folder with spiece.model only");
}

TEST(T5Tokenizer, LoadersAgreeBeyondGoldens) {
  REQUIRE_TOKENIZER_FIXTURES();
  const auto spm = T5Tokenizer::from_spiece_model(tokenizers_dir() + "/t5/spiece.model");
  const auto hf = T5Tokenizer::from_tokenizer_json(tokenizers_dir() + "/t5/tokenizer.json");
  const char* prompts[] = {
      "",
      "   ",
      "Hello,   World!\n\tNew line",
      "\xEF\xBC\xA8\xEF\xBD\x85\xEF\xBD\x8C\xEF\xBD\x8C\xEF\xBD\x8F \xEF\xBC\x91\xEF\xBC\x92",  // fullwidth
      "\xEF\xAC\x81nance \xE2\x84\xA2 \xC2\xBD cup",                                            // ﬁ ™ ½ (NFKC)
      "\xCE\x9A\xCE\xB1\xCE\xBB\xCE\xB7\xCE\xBC\xCE\xAD\xCF\x81\xCE\xB1 \xD0\x9C\xD0\xB8\xD1\x80",
      "a <extra_id_0> b </s> c <pad><unk>",
      "price: $15.99 (approx.) -- 50% off!!!",
  };
  for (const char* p : prompts) {
    EXPECT_EQ(spm.encode(p, 128).ids, hf.encode(p, 128).ids) << p;
  }
}

TEST(T5Tokenizer, SpecialTokensInPromptBecomeIds) {
  REQUIRE_TOKENIZER_FIXTURES();
  const auto spm = T5Tokenizer::from_spiece_model(tokenizers_dir() + "/t5/spiece.model");
  const auto hf = T5Tokenizer::from_tokenizer_json(tokenizers_dir() + "/t5/tokenizer.json");
  for (const T5Tokenizer* tok : {&spm, &hf}) {
    EXPECT_EQ(tok->token_id("<extra_id_0>").value_or(-1), 1099);
    EXPECT_EQ(tok->token_id("<extra_id_99>").value_or(-1), 1000);
    EXPECT_EQ(tok->tokenize("<extra_id_0></s>"), (std::vector<int32_t>{1099, 1}));
    std::vector<int32_t> with_pad = tok->tokenize("x");
    with_pad.push_back(0);
    EXPECT_EQ(tok->tokenize("x<pad>"), with_pad);
  }
}

TEST(T5Tokenizer, TruncationKeepsEosLast) {
  REQUIRE_TOKENIZER_FIXTURES();
  const auto tok = T5Tokenizer::from_tokenizer_json(tokenizers_dir() + "/t5/tokenizer.json");
  const std::string prompt = long_prompt();
  const auto content = tok.tokenize(prompt);
  ASSERT_GT(content.size(), T5Tokenizer::kDevMaxLength);
  for (size_t max_length : {kGoldenT5Length, T5Tokenizer::kSchnellMaxLength, T5Tokenizer::kDevMaxLength}) {
    const TokenEncoding enc = tok.encode(prompt, max_length);
    ASSERT_EQ(enc.ids.size(), max_length);
    EXPECT_EQ(enc.ids.back(), 1);
    EXPECT_EQ(enc.eos_index, max_length - 1);
    EXPECT_TRUE(std::equal(enc.ids.begin(), enc.ids.end() - 1, content.begin()));
  }
  EXPECT_EQ(tok.encode("").ids.size(), T5Tokenizer::kDevMaxLength);  // the default is dev's 512
  EXPECT_EQ(tok.encode("").eos_index, 0u);
  EXPECT_ERROR_MENTIONS(tok.encode(prompt, 0), "max_length 0");
}

TEST(T5Tokenizer, MissingFilesNameThem) {
  REQUIRE_TOKENIZER_FIXTURES();
  TempDir dir;
  EXPECT_ERROR_MENTIONS(T5Tokenizer::from_folder(dir / "nope"), "not a directory");
  EXPECT_ERROR_MENTIONS(T5Tokenizer::from_folder(dir.path().string()), "tokenizer.json or spiece.model");
  EXPECT_ERROR_MENTIONS(T5Tokenizer::from_spiece_model(dir / "spiece.model"), dir / "spiece.model");
  EXPECT_ERROR_MENTIONS(T5Tokenizer::from_tokenizer_json(dir / "tokenizer.json"), dir / "tokenizer.json");
}

TEST(T5Tokenizer, MalformedFilesAreErrors) {
  REQUIRE_TOKENIZER_FIXTURES();
  TempDir dir;
  write_file(dir / "spiece.model", "this is not a protobuf");
  EXPECT_ERROR_MENTIONS(T5Tokenizer::from_spiece_model(dir / "spiece.model"), dir / "spiece.model");
  write_file(dir / "tokenizer.json", "{\"model\": ");
  EXPECT_ERROR_MENTIONS(T5Tokenizer::from_tokenizer_json(dir / "tokenizer.json"), dir / "tokenizer.json");
  EXPECT_ERROR_MENTIONS(T5Tokenizer::from_tokenizer_json(pipeline_dir() + "/tokenizer/tokenizer.json"),
                        "expected model.type \"Unigram\"");

  std::ifstream in(tokenizers_dir() + "/t5/tokenizer.json");
  auto doc = nlohmann::json::parse(in);
  doc["normalizer"]["precompiled_charsmap"] = "AAAA";  // 3 bytes: no room for the trie size
  write_file(dir / "bad_charsmap.json", doc.dump());
  EXPECT_ERROR_MENTIONS(T5Tokenizer::from_tokenizer_json(dir / "bad_charsmap.json"), "precompiled_charsmap");
  doc = nlohmann::json::parse(std::ifstream(tokenizers_dir() + "/t5/tokenizer.json"));
  doc["model"]["vocab"][5] = "oops";
  write_file(dir / "bad_vocab.json", doc.dump());
  EXPECT_ERROR_MENTIONS(T5Tokenizer::from_tokenizer_json(dir / "bad_vocab.json"), "model.vocab[5]");
}

// ---------------------------------------------------------------------------------------------------------------
// Picking the loader from a folder, and the Unicode pieces the normalisers rest on.

TEST(TokenizerFactory, PicksLoaderFromPipelineFolders) {
  REQUIRE_TOKENIZER_FIXTURES();
  EXPECT_EQ(detect_tokenizer_kind(pipeline_dir() + "/tokenizer"), TokenizerKind::kClip);
  EXPECT_EQ(detect_tokenizer_kind(pipeline_dir() + "/tokenizer_2"), TokenizerKind::kT5);
  EXPECT_EQ(detect_tokenizer_kind(tokenizers_dir() + "/clip"), TokenizerKind::kClip);
  EXPECT_EQ(detect_tokenizer_kind(tokenizers_dir() + "/t5"), TokenizerKind::kT5);

  const auto clip = load_tokenizer(pipeline_dir() + "/tokenizer");
  const auto t5 = load_tokenizer(pipeline_dir() + "/tokenizer_2");
  EXPECT_STREQ(clip->kind(), "clip");
  EXPECT_STREQ(t5->kind(), "t5");
  const Golden& g = goldens().front();
  EXPECT_EQ(clip->encode(g.prompt, ClipTokenizer::kMaxLength).ids, g.clip_ids);
  EXPECT_EQ(t5->encode(g.prompt, kGoldenT5Length).ids, g.t5_ids);

  // Without a config the files decide; a lone tokenizer.json by its model type.
  TempDir dir;
  fs::copy_file(tokenizers_dir() + "/t5/tokenizer.json", dir / "tokenizer.json");
  EXPECT_EQ(detect_tokenizer_kind(dir.path().string()), TokenizerKind::kT5);
  TempDir empty;
  EXPECT_ERROR_MENTIONS(detect_tokenizer_kind(empty.path().string()), "expected vocab.json + merges.txt");
}

TEST(TextUnicode, NormalisationPrimitives) {
  using namespace fluxswap::unicode;
  EXPECT_EQ(nfc(U"e\u0301"), U"\u00E9");
  EXPECT_EQ(nfc(U"\u1100\u1161\u11A8"), U"\uAC01");  // Hangul L V T
  EXPECT_EQ(nfc(U"a\u0323\u0302"), U"\u1EAD");       // ậ: marks reordered, both composed
  EXPECT_EQ(nfc(U"\u212B"), U"\u00C5");              // Angstrom sign is a singleton
  EXPECT_EQ(to_lowercase(U"\u0130STANBUL \u03A3\u0394"), U"i\u0307stanbul \u03C3\u03B4");
  EXPECT_TRUE(is_letter(U'\u6771') && is_letter(U'\u0416') && is_number(U'\u0663') && !is_letter(U'\u0663'));
  EXPECT_TRUE(is_whitespace(U'\u3000') && !is_whitespace(U'\u200B'));
  EXPECT_EQ(decode_utf8("a\xFF\xC3"), U"a\uFFFD\uFFFD");
  const std::u32string emoji = U"\U0001F431\u200D\U0001F464x";  // cat ZWJ bust: one cluster, then x
  EXPECT_EQ(grapheme_end(emoji, 0), 3u);
  EXPECT_EQ(grapheme_end(U"\uFEFF\u0301", 0), 1u);  // format characters break like controls
}
