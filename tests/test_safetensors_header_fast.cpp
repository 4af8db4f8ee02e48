// parse_header_fast: the well-formed header in one pass, false for everything else (which the checking parse in
// safetensors.cpp then reports; test_safetensors.cpp checks those messages through SafetensorsFile).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "io/safetensors_header.h"

namespace fluxswap {
namespace {

bool fast(const std::string& header, uint64_t data_size = 1 << 20) {
  std::vector<SafetensorsEntry> entries;
  std::map<std::string, std::string> metadata;
  return parse_header_fast(header, data_size, entries, metadata);
}

TEST(SafetensorsHeaderFast, ReadsEntriesAndMetadata) {
  const std::string h =
      R"({"b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},)"
      R"( "__metadata__": {"format": "pt", "x": "{\"r\": 4}"},)"
      R"( "a": {"shape": [], "data_offsets": [12, 16], "dtype": "F32"},)"
      R"( "z": {"dtype": "F8_E4M3", "shape": [0, 9223372036854775807], "data_offsets": [16, 16]}})";
  std::vector<SafetensorsEntry> e;
  std::map<std::string, std::string> m;
  ASSERT_TRUE(parse_header_fast(h, 16, e, m));
  ASSERT_EQ(e.size(), 3u);
  EXPECT_EQ(e[0].name, "b");
  EXPECT_EQ(e[0].dtype, DType::BF16);
  EXPECT_EQ(e[0].shape, (Shape{2, 3}));
  EXPECT_EQ(e[0].begin, 0u);
  EXPECT_EQ(e[0].end, 12u);
  EXPECT_EQ(e[1].name, "a");
  EXPECT_EQ(e[1].dtype, DType::F32);
  EXPECT_TRUE(e[1].shape.empty());
  EXPECT_EQ(e[2].shape, (Shape{0, INT64_MAX}));
  EXPECT_EQ(m.size(), 2u);
  EXPECT_EQ(m.at("x"), "{\"r\": 4}");
  EXPECT_TRUE(fast("{}"));
}

TEST(SafetensorsHeaderFast, LeavesEveryDeviationToTheCheckingParse) {
  const std::string ok = R"("dtype": "U8", "shape": [4], "data_offsets": [0, 4])";
  EXPECT_TRUE(fast("{\"w\": {" + ok + "}}"));
  for (const std::string& bad : std::vector<std::string>{
           "[]",                                                     // not an object
           "{\"w\": {" + ok + "}, \"w\": {" + ok + "}}",             // duplicate name
           "{\"w\": {" + ok + ", \"dtype\": \"U8\"}}",               // duplicate field
           "{\"w\": {" + ok + ", \"extra\": 1}}",                    // unknown field
           R"({"w": {"dtype": "U8", "shape": [4]}})",                // missing field
           R"({"w": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 4]}})",
           R"({"w": {"dtype": "U8", "shape": [4.0], "data_offsets": [0, 4]}})",
           R"({"w": {"dtype": "U8", "shape": [[4]], "data_offsets": [0, 4]}})",
           R"({"w": {"dtype": "U8", "shape": 4, "data_offsets": [0, 4]}})",
           R"({"w": {"dtype": 8, "shape": [4], "data_offsets": [0, 4]}})",
           R"({"w": {"dtype": "U9", "shape": [4], "data_offsets": [0, 4]}})",  // unknown dtype
           R"({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4, 8]}})",
           R"({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0]}})",
           R"({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 5]}})",  // span != bytes
           R"({"w": {"dtype": "U8", "shape": [4], "data_offsets": [4, 0]}})",
           R"({"w": {"dtype": "U8", "shape": [0, 9223372036854775807, 2], "data_offsets": [0, 0]}})",
           R"({"w": {"dtype": "U8", "shape": [9223372036854775808], "data_offsets": [0, 0]}})",
           R"({"__metadata__": {"a": 1}})",                          // metadata values are strings
           R"({"__metadata__": {"a": "x", "a": "y"}})",
           R"({"__metadata__": {}, "__metadata__": {}})",
           R"({"__metadata__": "x"})",
           R"({"w": "x"})",
           R"({"w": null})",
           "{\"w\": {" + ok + "}",                                   // truncated
           "{\"w\": {" + ok + "}} x",                                // trailing garbage
       })
    EXPECT_FALSE(fast(bad)) << bad;
  // The data region bounds the offsets.
  EXPECT_FALSE(fast("{\"w\": {" + ok + "}}", 3));
}

}  // namespace
}  // namespace fluxswap
