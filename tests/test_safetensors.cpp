#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"

#ifndef FLUXSWAP_FIXTURES
#define FLUXSWAP_FIXTURES ""
#endif

namespace fs = std::filesystem;
using namespace fluxswap;

namespace {

std::string fixtures_dir() {
  if (const char* env = std::getenv("FLUXSWAP_FIXTURES"); env && *env) return env;
  return FLUXSWAP_FIXTURES;
}

#define REQUIRE_FIXTURES()                                                                   \
  do {                                                                                       \
    if (!fs::is_directory(fixtures_dir())) GTEST_SKIP() << "no fixtures at " << fixtures_dir(); \
  } while (0)

// Runs `stmt`, expecting a fluxswap::Error whose message contains every one of `parts`.
#define EXPECT_ERROR(stmt, ...)                                                                   \
  do {                                                                                            \
    try {                                                                                         \
      stmt;                                                                                       \
      ADD_FAILURE() << "expected fluxswap::Error from: " #stmt;                                   \
    } catch (const fluxswap::Error& e_) {                                                         \
      for (const std::string& part_ : std::vector<std::string>{__VA_ARGS__})                      \
        EXPECT_NE(std::string(e_.what()).find(part_), std::string::npos)                          \
            << "message lacks \"" << part_ << "\": " << e_.what();                                \
    }                                                                                             \
  } while (0)

// A fresh directory, removed with everything in it at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "fluxswap_st_XXXXXX").string();
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

void write_text(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A safetensors image from a literal header and data bytes.
std::string image(const std::string& header, const std::string& data = "") {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char(uint64_t(header.size()) >> (8 * i));
  return out + header + data;
}

std::string image_with_length(uint64_t n, const std::string& rest) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char(n >> (8 * i));
  return out + rest;
}

std::shared_ptr<SafetensorsFile> parse(const std::string& header, const std::string& data = "") {
  return SafetensorsFile::from_bytes(image(header, data), "bad.safetensors");
}

// A contiguous tensor whose bytes are 0, 1, 2, ... (mod 256) offset by `seed`.
Tensor pattern(DType dtype, Shape shape, int seed = 0) {
  Tensor t = Tensor::empty(dtype, std::move(shape));
  auto* p = t.ptr<uint8_t>();
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = uint8_t(i * 7 + seed);
  return t;
}

std::string bytes_of(const Tensor& t) {
  return std::string(static_cast<const char*>(t.data()), t.nbytes());
}

}  // namespace

// ----------------------------------------------------------------------------------------------------------
// Round trips

TEST(Safetensors, RoundTripKeepsDtypeShapeBytesAndMetadata) {
  TempDir dir;
  const Tensor base = pattern(DType::F32, {4, 6}, 3);
  const Tensor view = base.narrow(1, 1, 3);  // [4, 3], row stride 6: not contiguous
  ASSERT_FALSE(view.is_contiguous());
  std::vector<std::pair<std::string, Tensor>> tensors = {
      {"w.bf16", pattern(DType::BF16, {3, 5}, 1)},
      {"w.f8", pattern(DType::F8_E4M3, {7}, 2)},
      {"ids", pattern(DType::I64, {2, 2}, 4)},
      {"scalar", pattern(DType::F16, {}, 5)},
      {"empty", Tensor::empty(DType::F32, {0, 4})},
      {"view", view},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "h\u00e9llo \"quoted\""}};
  const std::string path = dir / "rt.safetensors";
  write_safetensors(path, tensors, meta);
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->metadata(), meta);
  ASSERT_EQ(f->entries().size(), tensors.size());
  // Entries come back in data-offset order, which is the write order.
  for (size_t i = 0; i < tensors.size(); ++i) EXPECT_EQ(f->entries()[i].name, tensors[i].first);
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    Tensor r = f->tensor(name);
    EXPECT_EQ(r.dtype(), t.dtype());
    EXPECT_EQ(r.shape(), t.shape());
    EXPECT_EQ(r.device(), Device::CPU);
    EXPECT_TRUE(r.is_contiguous());
    if (name != "view") EXPECT_EQ(bytes_of(r), bytes_of(t));
  }
  // The narrowed view is written row by row. Written in the given order after odd-sized tensors, its bytes
  // are not 4-byte aligned in the file, hence memcpy rather than ptr<float>().
  const std::string got = bytes_of(f->tensor("view"));
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 3; ++j) {
      float v;
      std::memcpy(&v, got.data() + (i * 3 + j) * 4, 4);
      EXPECT_EQ(v, base.ptr<float>()[i * 6 + 1 + j]) << i << "," << j;
    }

  EXPECT_EQ(f->keys(), (std::vector<std::string>{"empty", "ids", "scalar", "view", "w.bf16", "w.f8"}));
  EXPECT_TRUE(f->contains("ids"));
  EXPECT_FALSE(f->contains("nope"));
  EXPECT_EQ(f->find("nope"), nullptr);
}

// read(): the same tensors as open(), and NaN/Inf found while reading in parallel chunks of 4 MiB, also in an
// element that straddles a chunk boundary (the bf16 tensor starts at an odd offset).
TEST(Safetensors, ReadIntoMemoryChecksValuesOnTheWay) {
  TempDir dir;
  const int64_t n = 3 << 20;  // 6 MiB of bf16
  Tensor big = Tensor::empty(DType::BF16, {n});
  auto* b = big.ptr<uint16_t>();
  for (int64_t i = 0; i < n; ++i) b[i] = uint16_t(0x3f80 + (i % 64));  // 1.0 and neighbours
  const int64_t straddling = (int64_t(4) << 19) - 2;  // bytes [4 MiB - 1, 4 MiB + 1) of the data region
  b[straddling] = 0x7fc0;                              // NaN
  b[n - 1] = 0xff80;                                   // -Inf, later in the same tensor
  Tensor f32 = Tensor::empty(DType::F32, {5});
  for (int i = 0; i < 5; ++i) f32.ptr<float>()[i] = float(i);
  f32.ptr<float>()[3] = std::numeric_limits<float>::infinity();
  const std::string path = dir / "values.safetensors";
  write_safetensors(path, {{"odd", pattern(DType::U8, {3})}, {"big", big}, {"f32", f32},
                           {"fine", pattern(DType::I32, {4})}});
  auto heap = [](size_t bytes) { return std::shared_ptr<void>(std::malloc(bytes), std::free); };
  auto r = SafetensorsFile::read(path, heap);
  auto m = SafetensorsFile::open(path);
  for (const auto& e : m->entries()) EXPECT_EQ(bytes_of(r->tensor(e.name)), bytes_of(m->tensor(e.name))) << e.name;
  EXPECT_FALSE(m->values_checked());
  ASSERT_TRUE(r->values_checked());
  ASSERT_EQ(r->non_finite().size(), 2u);
  EXPECT_EQ(r->non_finite().at("big").element, straddling);
  EXPECT_TRUE(std::isnan(r->non_finite().at("big").value));
  EXPECT_EQ(r->non_finite().at("f32").element, 3);
  EXPECT_TRUE(std::isinf(r->non_finite().at("f32").value));
  // Structural errors are the same as open()'s.
  std::ofstream(dir / "short.safetensors") << "abc";
  EXPECT_ERROR(SafetensorsFile::read(dir / "short.safetensors", heap), "short.safetensors", "shorter than");
  EXPECT_ERROR(SafetensorsFile::read(dir / "missing.safetensors", heap), "missing.safetensors", "cannot open");
}

TEST(Safetensors, SerializeMatchesFileAndPadsHeader) {
  std::vector<std::pair<std::string, Tensor>> tensors = {{"a", pattern(DType::U8, {3})}};
  const std::string img = serialize_safetensors(tensors, {{"k", "v"}});
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(img[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(img.size(), 8 + n + 3);
  const std::string header = img.substr(8, n);
  EXPECT_EQ(header[header.find_last_not_of(' ')], '}');  // padded with spaces
  auto f = SafetensorsFile::from_bytes(img, "mem");
  EXPECT_EQ(f->path(), "mem");
  EXPECT_EQ(f->metadata().at("k"), "v");
  EXPECT_EQ(bytes_of(f->tensor("a")), bytes_of(tensors[0].second));
  // An empty file is legal too.
  auto empty = SafetensorsFile::from_bytes(serialize_safetensors({}), "empty");
  EXPECT_TRUE(empty->entries().empty());
}

TEST(Safetensors, TensorViewOutlivesFileHandle) {
  Tensor t;
  {
    auto f = SafetensorsFile::from_bytes(serialize_safetensors({{"x", pattern(DType::I32, {5}, 9)}}), "mem");
    t = f->tensor("x");
  }
  EXPECT_EQ(bytes_of(t), bytes_of(pattern(DType::I32, {5}, 9)));
}

TEST(Safetensors, WriterRejectsDuplicatesNonCpuAndReservedNames) {
  const Tensor a = pattern(DType::F32, {2});
  EXPECT_ERROR(serialize_safetensors({{"a", a}, {"a", a}}), "'a'", "more than once");
  static float fake[2];
  const Tensor gpu = Tensor::borrow(fake, DType::F32, {2}, Device::CUDA);
  EXPECT_ERROR(serialize_safetensors({{"g", gpu}}), "'g'", "CPU");
  EXPECT_ERROR(serialize_safetensors({{"__metadata__", a}}), "__metadata__");
  TempDir dir;
  EXPECT_ERROR(write_safetensors(dir / "x.safetensors", {{"a", a}, {"a", a}}), "x.safetensors", "'a'");
  EXPECT_FALSE(fs::exists(dir / "x.safetensors.tmp"));
  EXPECT_FALSE(fs::exists(dir / "x.safetensors"));
}

// ----------------------------------------------------------------------------------------------------------
// Real files

TEST(Safetensors, ReadsTinyTransformerFixture) {
  REQUIRE_FIXTURES();
  auto f = SafetensorsFile::open(fixtures_dir() + "/tiny/transformer_diffusers.safetensors");
  EXPECT_EQ(f->keys().size(), 112u);
  const SafetensorsEntry* e = f->find("x_embedder.weight");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->dtype, DType::BF16);
  EXPECT_EQ(e->shape, (Shape{32, 16}));
  Tensor t = f->tensor("x_embedder.weight");
  EXPECT_EQ(t.dtype(), DType::BF16);
  EXPECT_EQ(t.shape(), (Shape{32, 16}));
  Tensor f32 = t.to_f32();
  float maxabs = 0;
  for (int64_t i = 0; i < f32.numel(); ++i) maxabs = std::max(maxabs, std::abs(f32.ptr<float>()[i]));
  EXPECT_GT(maxabs, 0.0f);
  EXPECT_LT(maxabs, 100.0f);
}

TEST(Safetensors, ReadsLoraFixtureMetadata) {
  REQUIRE_FIXTURES();
  auto c = SafetensorsCollection::open(fixtures_dir() + "/tiny/lora_a_peft.safetensors");
  ASSERT_EQ(c.metadata().count("lora_adapter_metadata"), 1u);
  EXPECT_NE(c.metadata().at("lora_adapter_metadata").find("lora_alpha"), std::string::npos);
  EXPECT_EQ(c.metadata().at("format"), "pt");
  EXPECT_FALSE(c.keys().empty());
  for (const auto& k : c.keys()) EXPECT_EQ(c.tensor(k).shape(), c.entry(k).shape);
}

// ----------------------------------------------------------------------------------------------------------
// Sharded checkpoints

namespace {
// Two shards plus an index in `dir`; returns the index path.
std::string make_sharded(const TempDir& dir, const std::string& weight_map_json) {
  write_safetensors(dir / "model-00001-of-00002.safetensors",
                    {{"a.weight", pattern(DType::BF16, {2, 3}, 1)}, {"b.weight", pattern(DType::F32, {4}, 2)}},
                    {{"shard", "1"}});
  write_safetensors(dir / "model-00002-of-00002.safetensors", {{"c.weight", pattern(DType::I8, {5}, 3)}},
                    {{"shard", "2"}});
  const std::string index = dir / "model.safetensors.index.json";
  write_text(index, "{\"metadata\": {\"total_size\": 1}, \"weight_map\": " + weight_map_json + "}");
  return index;
}
const char* kGoodMap =
    "{\"a.weight\": \"model-00001-of-00002.safetensors\", \"b.weight\": \"model-00001-of-00002.safetensors\","
    " \"c.weight\": \"model-00002-of-00002.safetensors\"}";
}  // namespace

TEST(Safetensors, ShardedCheckpointReadsThroughCollection) {
  TempDir dir;
  auto c = SafetensorsCollection::open(make_sharded(dir, kGoodMap));
  EXPECT_EQ(c.keys(), (std::vector<std::string>{"a.weight", "b.weight", "c.weight"}));
  EXPECT_TRUE(c.contains("c.weight"));
  EXPECT_FALSE(c.contains("d.weight"));
  EXPECT_EQ(c.entry("a.weight").dtype, DType::BF16);
  EXPECT_EQ(bytes_of(c.tensor("a.weight")), bytes_of(pattern(DType::BF16, {2, 3}, 1)));
  EXPECT_EQ(bytes_of(c.tensor("c.weight")), bytes_of(pattern(DType::I8, {5}, 3)));
  EXPECT_EQ(c.tensor("c.weight").dtype(), DType::I8);
  EXPECT_EQ(c.metadata().at("shard"), "1");  // the shard of the alphabetically first key
  EXPECT_ERROR(c.tensor("d.weight"), "model.safetensors.index.json", "'d.weight'");
}

TEST(Safetensors, SingleFileCollection) {
  TempDir dir;
  write_safetensors(dir / "one.safetensors", {{"z", pattern(DType::U16, {2})}, {"y", pattern(DType::U8, {1})}});
  auto c = SafetensorsCollection::open(dir / "one.safetensors");
  EXPECT_EQ(c.keys(), (std::vector<std::string>{"y", "z"}));
  EXPECT_TRUE(c.metadata().empty());
  EXPECT_ERROR(c.entry("nope"), "one.safetensors", "'nope'");
  auto w = SafetensorsCollection::of(SafetensorsFile::open(dir / "one.safetensors"));
  EXPECT_EQ(w.path(), dir / "one.safetensors");
  EXPECT_EQ(bytes_of(w.tensor("z")), bytes_of(pattern(DType::U16, {2})));
}

TEST(Safetensors, IndexMissingShardFileIsReportedOnUse) {
  TempDir dir;
  auto c = SafetensorsCollection::open(make_sharded(
      dir, "{\"a.weight\": \"model-00001-of-00002.safetensors\", \"x.weight\": \"gone.safetensors\"}"));
  EXPECT_EQ(c.tensor("a.weight").shape(), (Shape{2, 3}));
  EXPECT_ERROR(c.tensor("x.weight"), "model.safetensors.index.json", "gone.safetensors", "'x.weight'",
               "No such file");
}

TEST(Safetensors, IndexKeyAbsentFromItsShard) {
  TempDir dir;
  auto c = SafetensorsCollection::open(make_sharded(
      dir, "{\"a.weight\": \"model-00001-of-00002.safetensors\", \"c.weight\": \"model-00001-of-00002.safetensors\"}"));
  // Opening the shard for any of its keys checks all keys the index assigns to it.
  EXPECT_ERROR(c.tensor("a.weight"), "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "'c.weight'");
}

TEST(Safetensors, IndexRejectsPathsOutsideItsFolder) {
  TempDir dir;
  EXPECT_ERROR(SafetensorsCollection::open(make_sharded(dir, "{\"a.weight\": \"../model.safetensors\"}")),
               "index.json", "'a.weight'", "'../model.safetensors'");
  EXPECT_ERROR(SafetensorsCollection::open(make_sharded(dir, "{\"a.weight\": \"sub/model.safetensors\"}")),
               "'a.weight'", "'/'");
}

TEST(Safetensors, IndexStructureErrors) {
  TempDir dir;
  const std::string index = dir / "m.safetensors.index.json";
  write_text(index, "{\"metadata\": {}}");
  EXPECT_ERROR(SafetensorsCollection::open(index), index, "weight_map");
  write_text(index, "{\"weight_map\": [1]}");
  EXPECT_ERROR(SafetensorsCollection::open(index), index, "weight_map", "an array");
  write_text(index, "{\"weight_map\": {\"k\": 3}}");
  EXPECT_ERROR(SafetensorsCollection::open(index), index, "'k'", "file name");
  write_text(index, "{\"weight_map\": {\"k\": \"a.safetensors\", \"k\": \"b.safetensors\"}}");
  EXPECT_ERROR(SafetensorsCollection::open(index), index, "'k'", "more than once");
  write_text(index, "{\"weight_map\": ");
  EXPECT_ERROR(SafetensorsCollection::open(index), index, "not valid JSON");
  EXPECT_ERROR(SafetensorsCollection::open(dir / "absent.safetensors.index.json"), "absent.safetensors.index.json",
               "cannot open");
}

// ----------------------------------------------------------------------------------------------------------
// Malformed files: each message names the file, the tensor when there is one, and what is wrong.

TEST(Safetensors, MissingFileNamesPathAndReason) {
  EXPECT_ERROR(SafetensorsFile::open("/nonexistent/x.safetensors"), "/nonexistent/x.safetensors",
               "No such file");
  TempDir dir;
  EXPECT_ERROR(SafetensorsFile::open(dir.path.string()), dir.path.string(), "not a regular file");
}

TEST(Safetensors, FileShorterThanLengthPrefix) {
  EXPECT_ERROR(SafetensorsFile::from_bytes("abcde", "short.st"), "short.st: ", "5 bytes", "8-byte");
  TempDir dir;
  write_text(dir / "empty.safetensors", "");
  EXPECT_ERROR(SafetensorsFile::open(dir / "empty.safetensors"), "empty.safetensors", "0 bytes");
}

TEST(Safetensors, HeaderLengthBeyondFile) {
  EXPECT_ERROR(SafetensorsFile::from_bytes(image_with_length(1000, std::string(92, ' ')), "bad.safetensors"),
               "bad.safetensors: ", "1000", "92 bytes", "100-byte file");
}

TEST(Safetensors, HeaderLengthOverLimit) {
  EXPECT_ERROR(SafetensorsFile::from_bytes(image_with_length(200'000'000, "{}"), "bad.safetensors"),
               "bad.safetensors: ", "200000000", "100000000");
}

TEST(Safetensors, HeaderNotJson) {
  EXPECT_ERROR(parse("{\"a\": {\"dtype\": "), "bad.safetensors: ", "not valid JSON");
  EXPECT_ERROR(parse("{} trailing"), "bad.safetensors: ", "not valid JSON");
}

TEST(Safetensors, HeaderNotAnObject) {
  EXPECT_ERROR(parse("[1, 2]"), "bad.safetensors: ", "an array", "expected a JSON object");
}

TEST(Safetensors, InvalidUtf8InName) {
  const std::string h = "{\"bad\xff" "name\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}";
  EXPECT_ERROR(parse(h, "x"), "bad.safetensors: ", "UTF-8", "bad\\xff");
  // Overlong encoding of '/' and a lone surrogate are invalid too.
  EXPECT_ERROR(parse("{\"a\xc0\xaf\": 1}"), "UTF-8");
  EXPECT_ERROR(parse("{\"a\xed\xa0\x80\": 1}"), "UTF-8");
}

TEST(Safetensors, DuplicateTensorName) {
  const std::string e = "{\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}";
  EXPECT_ERROR(parse("{\"w\": " + e + ", \"w\": " + e + "}", "x"), "bad.safetensors: ", "'w'", "more than once");
}

TEST(Safetensors, DuplicateField) {
  EXPECT_ERROR(
      parse("{\"w\": {\"dtype\": \"U8\", \"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", "x"),
      "bad.safetensors: ", "tensor 'w'", "field 'dtype'", "more than once");
}

TEST(Safetensors, DuplicateKeyDeepInMetadataAndNesting) {
  // Duplicates below the entries and nesting past 16 levels go the checking parser's way too.
  EXPECT_ERROR(parse("{\"__metadata__\": {\"k\": {\"a\": 1, \"a\": 2}}}"), "'a'", "more than once");
  EXPECT_ERROR(parse("{\"w\": " + std::string(17, '[') + std::string(17, ']') + "}"), "nests deeper than 16");
  EXPECT_ERROR(parse("{\"w\": [1, 2"), "not valid JSON");
}

TEST(Safetensors, EntryNotAnObject) {
  EXPECT_ERROR(parse("{\"w\": [1, 2]}"), "bad.safetensors: tensor 'w'", "an array", "expected an object");
}

TEST(Safetensors, MissingAndExtraFields) {
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"U8\", \"shape\": [1]}}", "x"), "bad.safetensors: tensor 'w'",
               "missing field 'data_offsets'");
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1], \"extra\": 0}}", "x"),
               "bad.safetensors: tensor 'w'", "unknown field 'extra'");
}

TEST(Safetensors, UnknownDtypeListsKnownOnes) {
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"F33\", \"shape\": [1], \"data_offsets\": [0, 4]}}", "abcd"),
               "bad.safetensors: tensor 'w'", "'F33'", "BF16", "F8_E4M3", "BOOL");
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": 7, \"shape\": [1], \"data_offsets\": [0, 4]}}", "abcd"), "tensor 'w'",
               "dtype");
}

TEST(Safetensors, BadShape) {
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"U8\", \"shape\": [2, -1], \"data_offsets\": [0, 0]}}"),
               "bad.safetensors: tensor 'w'", "shape", "negative", ">= 0");
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"U8\", \"shape\": [1.5], \"data_offsets\": [0, 0]}}"), "tensor 'w'",
               "shape", "non-integer");
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"U8\", \"shape\": 4, \"data_offsets\": [0, 4]}}", "abcd"), "tensor 'w'",
               "shape", "array");
}

TEST(Safetensors, ShapeProductOverflow) {
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 0], "
                     "\"data_offsets\": [0, 0]}}"),
               "bad.safetensors: tensor 'w'", "64 bits");
  // numel fits int64 but numel * 8 bytes does not fit 64 bits.
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"F64\", \"shape\": [4611686018427387904], \"data_offsets\": [0, 0]}}"),
               "tensor 'w'", "more than 2^64");
}

TEST(Safetensors, BadDataOffsets) {
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1, 2]}}", "xx"),
               "bad.safetensors: tensor 'w'", "data_offsets", "[begin, end]");
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [-1, 0]}}", "x"),
               "tensor 'w'", "data_offsets");
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [2, 1]}}", "xx"),
               "bad.safetensors: tensor 'w'", "begin after end");
}

TEST(Safetensors, EndBeyondDataRegion) {
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", "12345678"),
               "bad.safetensors: tensor 'w'", "end 16", "beyond", "8 bytes");
}

TEST(Safetensors, SizeDisagreesWithShape) {
  EXPECT_ERROR(parse("{\"w\": {\"dtype\": \"BF16\", \"shape\": [2, 3], \"data_offsets\": [0, 8]}}", "12345678"),
               "bad.safetensors: tensor 'w'", "[2, 3]", "BF16", "needs 12 bytes", "span 8");
}

TEST(Safetensors, OverlappingTensors) {
  EXPECT_ERROR(parse("{\"a\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]},"
                     " \"b\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [2, 6]}}",
                     "123456"),
               "bad.safetensors: tensor 'b'", "overlap", "'a'");
}

TEST(Safetensors, HoleBetweenTensors) {
  EXPECT_ERROR(parse("{\"a\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]},"
                     " \"b\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [4, 6]}}",
                     "123456"),
               "bad.safetensors: tensor 'b'", "[2, 4)", "not referenced");
}

TEST(Safetensors, TrailingUnreferencedBytes) {
  EXPECT_ERROR(parse("{\"a\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]}}", "12345"),
               "bad.safetensors: ", "last 3 bytes", "not referenced");
  EXPECT_ERROR(parse("{}", "x"), "bad.safetensors: ", "last 1 bytes");
}

TEST(Safetensors, MetadataMustBeStrings) {
  EXPECT_ERROR(parse("{\"__metadata__\": {\"format\": \"pt\", \"n\": 3}}"), "bad.safetensors: ", "__metadata__",
               "'n'", "expected a string");
  EXPECT_ERROR(parse("{\"__metadata__\": [\"pt\"]}"), "bad.safetensors: ", "__metadata__", "an array");
}

TEST(Safetensors, TensorNamedMetadataIsRejected) {
  EXPECT_ERROR(parse("{\"__metadata__\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", "x"),
               "bad.safetensors: ", "__metadata__", "is an array", "may not be named");
}

TEST(Safetensors, EmptyTensorsAreFine) {
  auto f = parse("{\"a\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]},"
                 " \"e\": {\"dtype\": \"F32\", \"shape\": [0, 3], \"data_offsets\": [2, 2]},"
                 " \"z\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [0, 0]}}",
                 "ab");
  EXPECT_EQ(f->entries().size(), 3u);
  EXPECT_EQ(f->tensor("e").numel(), 0);
  EXPECT_EQ(f->tensor("e").shape(), (Shape{0, 3}));
  // An empty tensor inside another tensor's bytes still overlaps it.
  EXPECT_ERROR(parse("{\"a\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]},"
                     " \"e\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [1, 1]}}",
                     "ab"),
               "tensor 'e'", "overlap", "'a'");
}

TEST(Safetensors, AbsentTensorNamesFileAndKey) {
  auto f = parse("{}");
  EXPECT_ERROR(f->tensor("missing.weight"), "bad.safetensors: ", "'missing.weight'");
}

TEST(Safetensors, TruncatedRealFileIsReported) {
  REQUIRE_FIXTURES();
  std::ifstream in(fixtures_dir() + "/tiny/lora_b_peft.safetensors", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 100u);
  bytes.resize(bytes.size() - 10);
  EXPECT_ERROR(SafetensorsFile::from_bytes(bytes, "cut.safetensors"), "cut.safetensors: tensor '", "beyond",
               "truncated");
}
