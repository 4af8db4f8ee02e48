#include "lora/streamed_upload.h"

#include <chrono>
#include <cmath>
#include <functional>
#include <string>

#include "core/dtype.h"
#include "core/error.h"

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

RegisteredUploadReport upload_mapped_adapter(Backend& be, const LoraAdapter& adapter, const HostToDevice& copies,
                                             double* check_seconds) {
  if (!adapter.mapped) throw Error(adapter.path + ": upload_mapped_adapter needs an adapter from map_lora_adapter");
  const SafetensorsFile& file = *adapter.mapped;
  const auto [region, bytes] = file.data_region();
  const RegisteredUploadReport sent = be.copy_from_host_registered(region, bytes, copies);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<Tensor> dst;
  for (const auto& c : copies) dst.push_back(c.second);
  const std::vector<int64_t> bad = be.find_non_finite(dst);
  if (check_seconds) *check_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // The first bad tensor in file order, named by its key (found by the host address of its bytes).
  const Tensor* src = nullptr;
  int64_t element = -1;
  for (size_t i = 0; i < copies.size(); ++i)
    if (bad[i] >= 0 && (!src || std::less<const void*>()(copies[i].first.data(), src->data())))
      src = &copies[i].first, element = bad[i];
  if (!src) return sent;
  std::string key = "?";
  for (const LoraPair& p : adapter.pairs)
    for (const auto& [t, k] : {std::pair{&p.down, &p.down_key}, {&p.up, &p.up_key}, {&p.up_bias, &p.up_bias_key}})
      if (t->defined() && t->data() == src->data()) key = *k;
  float v = 0;
  convert_to_f32(src->dtype(), static_cast<const char*>(src->data()) + element * int64_t(dtype_size(src->dtype())),
                 &v, 1);
  const std::string what = std::isnan(v) ? "NaN" : std::isinf(v) ? "an infinity"
                                                 : "a value (" + std::to_string(v) + ") that overflows " +
                                                       std::string(dtype_name(be.compute_dtype()));
  throw Error(file.path() + ": '" + key + "' holds " + what + " at element " + std::to_string(element) +
              ", expected finite values");
}

}  // namespace fluxswap
