#include "lora/streamed_upload.h"

#include <chrono>

namespace fluxswap {

StreamedUploadStats upload_as_it_arrives(const SafetensorsFile* file, const HostToDevice& copies,
                                         size_t min_batch_bytes, const std::function<void(const HostToDevice&)>& send) {
  StreamedUploadStats stats;
  auto in = [&](size_t i) { return !file || file->arrived(copies[i].first.data(), copies[i].first.nbytes()); };
  for (size_t i = 0; i < copies.size();) {
    size_t k = i, bytes = copies[i].first.nbytes();
    while (k + 1 < copies.size() && bytes < min_batch_bytes) bytes += copies[++k].first.nbytes();
    if (file) {
      const auto t0 = std::chrono::steady_clock::now();
      for (size_t m = i; m <= k; ++m) file->wait_for(copies[m].first.data(), copies[m].first.nbytes());
      stats.waited_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    size_t j = k + 1;
    while (j < copies.size() && in(j)) ++j;
    send(HostToDevice(copies.begin() + std::ptrdiff_t(i), copies.begin() + std::ptrdiff_t(j)));
    ++stats.batches;
    i = j;
  }
  return stats;
}

}  // namespace fluxswap
