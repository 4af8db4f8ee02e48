#pragma once
// A gate a test's reader thread waits at, with a time limit so that a broken implementation fails the test instead
// of hanging it.
#include <chrono>
#include <condition_variable>
#include <mutex>

namespace fluxswap::test {

class Gate {
 public:
  void open() {
    std::lock_guard<std::mutex> lock(m_);
    open_ = true;
    cv_.notify_all();
  }
  // True when opened, false after the time limit.
  bool pass(std::chrono::milliseconds limit = std::chrono::milliseconds(5000)) {
    std::unique_lock<std::mutex> lock(m_);
    return cv_.wait_for(lock, limit, [&] { return open_; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool open_ = false;
};

}  // namespace fluxswap::test
