// ChunkArrival: chunks finishing in any order make a ready run from the start; waiters wake when the run passes
// what they need, and a failure reaches the waiters whose bytes never came.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "core/error.h"
#include "io/chunk_arrival.h"
#include "test_support.h"

namespace fluxswap {
namespace {

TEST(ChunkArrival, SplitsTheRangeIntoChunks) {
  ChunkArrival a(10, 4);
  EXPECT_EQ(a.chunks(), 3u);
  EXPECT_EQ(a.chunk(0), std::make_pair(uint64_t(0), uint64_t(4)));
  EXPECT_EQ(a.chunk(2), std::make_pair(uint64_t(8), uint64_t(10)));
  EXPECT_EQ(a.chunks_of(3, 9), std::make_pair(uint64_t(0), uint64_t(3)));
  EXPECT_EQ(a.chunks_of(4, 8), std::make_pair(uint64_t(1), uint64_t(2)));
  EXPECT_EQ(a.chunks_of(5, 5), std::make_pair(uint64_t(0), uint64_t(0)));
  EXPECT_NE(test::error_of([] { ChunkArrival(10, 0); }).find("chunk size 0"), std::string::npos);
  ChunkArrival empty(0, 4);
  EXPECT_EQ(empty.chunks(), 0u);
  EXPECT_TRUE(empty.complete());
  EXPECT_EQ(empty.wait_until(100), 0u);
}

// Ranges for readers that take chunks out of order: a range is in when every chunk holding it is, whatever the run.
TEST(ChunkArrival, AnyRangeIsInWhenItsChunksAre) {
  ChunkArrival a(10, 4);
  EXPECT_TRUE(a.has(5, 5));  // nothing asked
  EXPECT_FALSE(a.has(8, 10));
  a.finish(2);
  EXPECT_TRUE(a.has(8, 10));
  EXPECT_FALSE(a.has(7, 9));  // chunk 1 too
  EXPECT_EQ(a.ready(), 0u);
  std::atomic<bool> woke{false};
  std::thread waiter([&] {
    a.wait_range(4, 9);
    woke = true;
  });
  a.finish(0);  // not the one it waits for
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(woke);
  a.finish(1);
  waiter.join();
  EXPECT_TRUE(woke);
  EXPECT_TRUE(a.has(0, 10));
  ChunkArrival b(10, 4);
  b.finish(0);
  std::thread failing([&] { b.fail("disk gone"); });
  EXPECT_NE(test::error_of([&] { b.wait_range(4, 8); }).find("disk gone"), std::string::npos);
  failing.join();
  b.wait_range(0, 4);  // what came before the failure is still there
}

TEST(ChunkArrival, ReadyIsTheRunOfFinishedChunksFromTheStart) {
  ChunkArrival a(10, 4);
  a.finish(2);
  EXPECT_EQ(a.ready(), 0u);  // a tensor in [8, 10) is in, but the consumer goes in order: nothing yet
  a.finish(0);
  EXPECT_EQ(a.ready(), 4u);
  a.finish(0);  // twice is harmless
  EXPECT_EQ(a.ready(), 4u);
  EXPECT_FALSE(a.complete());
  a.finish(1);
  EXPECT_EQ(a.ready(), 10u);  // 1 joins 0 and 2: the last chunk is shorter
  EXPECT_TRUE(a.complete());
  EXPECT_GE(a.completed_at().time_since_epoch().count(), 1);
}

TEST(ChunkArrival, WaitersWakeWhenTheirBytesAreIn) {
  ChunkArrival a(12, 4);
  std::atomic<uint64_t> seen{0};
  std::thread waiter([&] { seen = a.wait_until(7); });  // needs chunks 0 and 1
  a.finish(1);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(seen.load(), 0u);
  a.finish(0);
  waiter.join();
  EXPECT_EQ(seen.load(), 8u);
  EXPECT_EQ(a.wait_until(8), 8u);  // at once
}

TEST(ChunkArrival, AFailureReachesOnlyWaitersWhoseBytesNeverCame) {
  ChunkArrival a(12, 4);
  a.finish(0);
  std::string message;
  std::thread waiter([&] { message = test::error_of([&] { a.wait_until(12); }); });
  a.fail("f.safetensors: cannot read 4 bytes at offset 8: unexpected end of file");
  a.fail("a later failure");  // the first one is kept
  waiter.join();
  EXPECT_EQ(message, "f.safetensors: cannot read 4 bytes at offset 8: unexpected end of file");
  EXPECT_EQ(a.wait_until(4), 4u);  // what did arrive is still usable
  EXPECT_NE(test::error_of([&] { a.wait_until(5); }).find("unexpected end of file"), std::string::npos);
}

}  // namespace
}  // namespace fluxswap
