// The defaults of Backend::copy_from_host_registered (no pinning: the ordinary batch copy) and
// Backend::find_non_finite (a host scan), and the options' environment defaults.
#include <cstdlib>
#include <string>

#include "backend/backend.h"
#include "core/dtype.h"
#include "core/error.h"

namespace fluxswap {

namespace {
uint64_t env_or(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && std::atoll(v) > 0 ? uint64_t(std::atoll(v)) : fallback;
}
}  // namespace

RegisteredUploadOptions resolve_registered_upload_options(const RegisteredUploadOptions& options) {
  RegisteredUploadOptions o = options;
  if (!o.chunk_bytes) o.chunk_bytes = size_t(env_or("FLUXSWAP_REGISTER_CHUNK_MB", 64)) << 20;
  if (!o.threads) o.threads = unsigned(env_or("FLUXSWAP_REGISTER_THREADS", 4));
  return o;
}

RegisteredUploadReport Backend::copy_from_host_registered(const void*, size_t,
                                                          const std::vector<std::pair<Tensor, Tensor>>& host_to_device,
                                                          const RegisteredUploadOptions&) {
  RegisteredUploadReport r;
  r.fallback = "the " + name() + " backend does not pin host memory in place";
  for (const auto& [host, dst] : host_to_device) r.other_bytes += host.nbytes();
  copy_from_host_batch(host_to_device);
  return r;
}

std::vector<int64_t> Backend::find_non_finite(const std::vector<Tensor>& tensors) {
  std::vector<int64_t> first(tensors.size(), -1);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    if (!t.defined() || !dtype_is_float(t.dtype()))
      throw Error("find_non_finite: tensor " + std::to_string(i) + " is " +
                  (t.defined() ? std::string(dtype_name(t.dtype())) : std::string("undefined")) +
                  ", expected a float tensor");
    if (t.device() == Device::CPU && t.is_contiguous()) {
      first[i] = first_non_finite(t.dtype(), t.data(), size_t(t.numel()));
      continue;
    }
    // A device without its own scan: the values come to the host once (float32 keeps NaN and infinities).
    const Tensor h = t.device() == Device::CPU ? t.to_f32() : to_host_f32(t);
    first[i] = first_non_finite(DType::F32, h.data(), size_t(h.numel()));
  }
  return first;
}

}  // namespace fluxswap
