// SafetensorsFile::read_in_background: the header is parsed before it returns, the data arrives chunk by chunk in
// file order (wait_for / arrived), small tensors can be had early (tensor_now), values are checked whatever the
// chunk size (elements straddling chunk ends included), and read failures or an abandoned read end cleanly.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "io/nonfinite_scan.h"
#include "io/safetensors.h"
#include "test_support.h"
#include "thread_gate.h"

namespace fluxswap {
namespace {

std::shared_ptr<void> heap(size_t bytes) { return std::shared_ptr<void>(std::malloc(bytes), std::free); }

std::string bytes_of(const Tensor& t) { return std::string(static_cast<const char*>(t.data()), t.nbytes()); }

using test::Gate;

// Three bf16 tensors after an odd-sized one (so elements straddle chunk ends), values 1.0 and neighbours; `nan_at`
// puts a NaN into "c" at that element when >= 0.
std::string write_file(const test::TempDir& dir, int64_t nan_at = -1) {
  std::vector<std::pair<std::string, Tensor>> ts;
  Tensor odd = Tensor::empty(DType::U8, {3});
  std::memset(odd.data(), 7, 3);
  ts.emplace_back("a_odd", odd);
  for (const char* name : {"b", "c", "d"}) {
    Tensor t = Tensor::empty(DType::BF16, {1000});
    for (int64_t i = 0; i < 1000; ++i) t.ptr<uint16_t>()[i] = uint16_t(0x3f80 + (i % 64));
    if (nan_at >= 0 && std::string(name) == "c") t.ptr<uint16_t>()[nan_at] = 0x7fc0;
    ts.emplace_back(name, t);
  }
  Tensor alpha = Tensor::empty(DType::F32, {});
  alpha.ptr<float>()[0] = 4.0f;
  ts.emplace_back("e_alpha", alpha);
  const std::string path = dir / "f.safetensors";
  write_safetensors(path, ts);
  return path;
}

TEST(SafetensorsBackground, DataArrivesInFileOrderWhileTheCallerGoesOn) {
  test::TempDir dir;
  const std::string path = write_file(dir);
  auto m = SafetensorsFile::open(path);
  Gate gate;
  SafetensorsReadOptions o;
  o.threads = 1;
  o.chunk_bytes = 512;
  const uint64_t last_chunk = (m->entries().back().end + 511) / 512 - 1;
  o.before_chunk = [&](uint64_t c) {
    if (c == last_chunk) EXPECT_TRUE(gate.pass());
  };
  auto f = SafetensorsFile::read_in_background(path, heap, o);
  EXPECT_EQ(f->keys(), m->keys());  // the header is there at once
  const Tensor b = f->tensor("b");
  f->wait_for(b.data(), b.nbytes());  // "b" lies before the last chunk
  EXPECT_EQ(bytes_of(b), bytes_of(m->tensor("b")));
  const Tensor alpha = f->tensor("e_alpha");
  EXPECT_FALSE(f->arrived(alpha.data(), alpha.nbytes()));  // held back at the gate
  EXPECT_FALSE(f->complete());
  EXPECT_FALSE(f->values_checked());
  EXPECT_EQ(f->read_seconds(), 0.0);
  const Tensor early = f->tensor_now("e_alpha");  // read on this thread, not from the buffer
  EXPECT_NE(early.data(), alpha.data());
  EXPECT_EQ(early.ptr<float>()[0], 4.0f);
  gate.open();
  f->wait_until_read();
  EXPECT_TRUE(f->complete());
  EXPECT_TRUE(f->values_checked());
  EXPECT_TRUE(f->non_finite().empty());
  EXPECT_GT(f->read_seconds(), 0.0);
  EXPECT_EQ(f->tensor_now("e_alpha").data(), alpha.data());  // in now: the view itself
  for (const auto& e : m->entries()) EXPECT_EQ(bytes_of(f->tensor(e.name)), bytes_of(m->tensor(e.name))) << e.name;
}

// read_rank: chunks are taken by the rank of the tensors they hold, so "d" (ranked first) is read before "b" and
// usable while "b" is still held back; the values are the file's and are checked all the same.
// A paused read reads nothing until resumed (here by a wait, which must not hang), then everything, checked.
TEST(SafetensorsBackground, APausedReadStartsAtResumeOrAtTheFirstWait) {
  test::TempDir dir;
  const std::string path = write_file(dir, 17);
  auto m = SafetensorsFile::open(path);
  std::atomic<int> chunks_read{0};
  SafetensorsReadOptions o;
  o.chunk_bytes = 512;
  o.paused = true;
  o.before_chunk = [&](uint64_t) { chunks_read++; };
  for (bool by_wait : {false, true}) {
    SCOPED_TRACE(by_wait ? "resumed by wait_until_read" : "resumed by resume_read");
    chunks_read = 0;
    auto f = SafetensorsFile::read_in_background(path, heap, o);
    const Tensor d = f->tensor("d");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_EQ(chunks_read.load(), 0);
    EXPECT_FALSE(f->arrived(d.data(), d.nbytes()));
    if (!by_wait) f->resume_read();
    f->wait_until_read();
    f->resume_read();  // again: nothing more happens
    EXPECT_TRUE(f->complete());
    EXPECT_EQ(bytes_of(f->tensor("d")), bytes_of(m->tensor("d")));
    ASSERT_EQ(f->non_finite().count("c"), 1u);
    EXPECT_EQ(f->non_finite().at("c").element, 17);
  }
  // Abandoned while paused: nothing to join, nothing read.
  chunks_read = 0;
  SafetensorsFile::read_in_background(path, heap, o).reset();
  EXPECT_EQ(chunks_read.load(), 0);
}

TEST(SafetensorsBackground, ChunksAreReadInTheRankedOrder) {
  test::TempDir dir;
  const std::string path = write_file(dir, 5);
  auto m = SafetensorsFile::open(path);
  SafetensorsReadOptions o;
  o.threads = 1;
  o.chunk_bytes = 256;
  o.read_rank = [](const std::string& key) { return key == "d" ? 0 : key == "c" ? 1 : 2; };
  std::vector<uint64_t> seen;
  Gate gate;
  const SafetensorsEntry& b_entry = *m->find("b");
  const uint64_t b_first = b_entry.begin / 256;
  o.before_chunk = [&](uint64_t c) {
    seen.push_back(c);
    if (c == b_first) EXPECT_TRUE(gate.pass());
  };
  auto f = SafetensorsFile::read_in_background(path, heap, o);
  const Tensor d = f->tensor("d"), b = f->tensor("b");
  f->wait_for(d.data(), d.nbytes());
  EXPECT_EQ(bytes_of(d), bytes_of(m->tensor("d")));
  EXPECT_FALSE(f->arrived(b.data(), b.nbytes()));
  gate.open();
  f->wait_until_read();
  ASSERT_EQ(seen.size(), (m->entries().back().end + 255) / 256);
  // "d"'s chunks first (in file order), then "c"'s that are not "d"'s, ...
  const auto [d_first, d_last] = std::pair{m->find("d")->begin / 256, (m->find("d")->end + 255) / 256};
  for (uint64_t i = 0; i < d_last - d_first; ++i) EXPECT_EQ(seen[i], d_first + i);
  for (const auto& e : m->entries()) EXPECT_EQ(bytes_of(f->tensor(e.name)), bytes_of(m->tensor(e.name))) << e.name;
  ASSERT_EQ(f->non_finite().size(), 1u);
  EXPECT_EQ(f->non_finite().begin()->second.element, 5);
}

// Every chunk size down to one byte finds the same first bad element, also where it straddles a chunk end, whether
// chunks are read with pread or copied from a mapping.
TEST(SafetensorsBackground, ValuesAreCheckedWhateverTheChunkSize) {
  test::TempDir dir;
  for (int64_t nan_at : {0, 1, 254, 255, 999}) {
    const std::string path = write_file(dir, nan_at);
    for (bool from_mapping : {false, true})
      for (uint64_t chunk : {1, 3, 8, 509, 512, 4096}) {
        SafetensorsReadOptions o;
        o.chunk_bytes = chunk;
        o.threads = 3;
        o.from_mapping = from_mapping;
        auto f = SafetensorsFile::read(path, heap, o);
        ASSERT_EQ(f->non_finite().size(), 1u) << "chunk " << chunk << ", NaN at " << nan_at;
        EXPECT_EQ(f->non_finite().at("c").element, nan_at) << "chunk " << chunk << (from_mapping ? ", mapped" : "");
        EXPECT_TRUE(std::isnan(f->non_finite().at("c").value));
        EXPECT_EQ(bytes_of(f->tensor("d")), bytes_of(SafetensorsFile::open(path)->tensor("d")));
      }
  }
}

TEST(SafetensorsBackground, AReadFailureReachesEveryWaiterAndNamesTheFile) {
  test::TempDir dir;
  const std::string path = write_file(dir);
  Gate truncated;
  SafetensorsReadOptions o;
  o.threads = 1;
  o.chunk_bytes = 512;
  o.before_chunk = [&](uint64_t c) {
    if (c == 1) EXPECT_TRUE(truncated.pass());
  };
  auto f = SafetensorsFile::read_in_background(path, heap, o);
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 1000);
  truncated.open();
  const Tensor d = f->tensor("d");
  const std::string waited = test::error_of([&] { f->wait_for(d.data(), d.nbytes()); });
  EXPECT_NE(waited.find(path), std::string::npos) << waited;
  EXPECT_NE(waited.find("unexpected end of file"), std::string::npos) << waited;
  EXPECT_EQ(test::error_of([&] { f->wait_until_read(); }), waited);
  EXPECT_EQ(test::error_of([&] { f->wait_until_read(); }), waited);  // every time
  EXPECT_FALSE(f->values_checked());
}

TEST(SafetensorsBackground, AnAbandonedReadStopsAfterTheChunksInHand) {
  test::TempDir dir;
  const std::string path = write_file(dir);
  std::atomic<int> started{0};
  SafetensorsReadOptions o;
  o.threads = 2;
  o.chunk_bytes = 64;  // ~95 chunks
  o.before_chunk = [&](uint64_t) {
    ++started;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  };
  auto f = SafetensorsFile::read_in_background(path, heap, o);
  f.reset();  // the consumer gave up (an error elsewhere): the destructor stops and joins the readers
  EXPECT_LT(started.load(), 10);
}

TEST(SafetensorsBackground, StructuralErrorsComeBeforeReturning) {
  test::TempDir dir;
  std::ofstream(dir / "short.safetensors") << "abc";
  const std::string msg = test::error_of([&] { SafetensorsFile::read_in_background(dir / "short.safetensors", heap); });
  EXPECT_NE(msg.find("short.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("shorter than"), std::string::npos) << msg;
}

// The reader's fast check answers exactly as first_non_finite does, for every float type, bad value and position
// (unaligned too).
TEST(NonFiniteScan, AgreesWithFirstNonFinite) {
  std::vector<uint8_t> bytes(8 * 300 + 1);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = uint8_t(i * 37 % 61);  // small values: all finite
  for (DType t : {DType::F64, DType::F32, DType::BF16, DType::F16, DType::F8_E4M3, DType::F8_E5M2}) {
    const size_t es = dtype_size(t), n = 300;
    for (size_t offset : {0, 1}) {
      const uint8_t* p = bytes.data() + offset;
      EXPECT_FALSE(any_non_finite(t, p, n)) << dtype_name(t);
      EXPECT_EQ(first_non_finite(t, p, n), -1);
      for (size_t at : {size_t(0), size_t(17), n - 1}) {
        std::vector<uint8_t> bad(bytes);
        uint8_t* q = bad.data() + offset + at * es;
        std::memset(q, 0xff, es);  // all ones: a NaN in every float type
        EXPECT_TRUE(any_non_finite(t, bad.data() + offset, n)) << dtype_name(t) << " at " << at;
        EXPECT_EQ(first_non_finite(t, bad.data() + offset, n), int64_t(at));
        EXPECT_FALSE(any_non_finite(t, bad.data() + offset, at)) << "counted past the end";
      }
    }
  }
  EXPECT_NE(test::error_of([] { any_non_finite(DType::I32, nullptr, 0); }).find("not a float type"), std::string::npos);
}

}  // namespace
}  // namespace fluxswap
