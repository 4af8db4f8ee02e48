// The default of Backend::copy_from_host_registered: no pinning, the ordinary batch copy.
#include "backend/backend.h"

namespace fluxswap {

RegisteredUploadReport Backend::copy_from_host_registered(const void*, size_t,
                                                          const std::vector<std::pair<Tensor, Tensor>>& host_to_device,
                                                          const RegisteredUploadOptions&) {
  RegisteredUploadReport r;
  r.fallback = "the " + name() + " backend does not pin host memory in place";
  for (const auto& [host, dst] : host_to_device) r.other_bytes += host.nbytes();
  copy_from_host_batch(host_to_device);
  return r;
}

}  // namespace fluxswap
