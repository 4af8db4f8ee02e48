// libFuzzer target for the safetensors reader: any byte string must either parse into a file whose every
// tensor can be read, or fail with fluxswap::Error. Anything else (crash, sanitizer report, other exception)
// is a bug. A parsed file must also survive a write/read round trip unchanged.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"
#include "io/safetensors.h"

using namespace fluxswap;

namespace {

// Reads every byte so ASan sees any out-of-bounds view.
uint8_t checksum(const Tensor& t) {
  uint8_t acc = 0;
  const auto* p = static_cast<const uint8_t*>(t.data());
  for (size_t i = 0; i < t.nbytes(); ++i) acc ^= p[i];
  return acc;
}

void check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::shared_ptr<SafetensorsFile> f;
  try {
    f = SafetensorsFile::from_bytes(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  } catch (const Error&) {
    return 0;  // the expected outcome for malformed input
  }

  std::vector<std::pair<std::string, Tensor>> tensors;
  const SafetensorsCollection c = SafetensorsCollection::of(f);
  check(c.keys() == f->keys());
  for (const SafetensorsEntry& e : f->entries()) {
    const Tensor t = f->tensor(e.name);
    check(t.dtype() == e.dtype && t.shape() == e.shape && t.nbytes() == e.end - e.begin);
    const Tensor u = c.tensor(e.name);
    check(u.data() == t.data() && checksum(u) == checksum(t));
    check(&c.entry(e.name) == f->find(e.name));
    tensors.emplace_back(e.name, t);
  }
  check(c.metadata() == f->metadata());
  try {
    c.tensor("\x01 absent");
    check(false);
  } catch (const Error&) {
  }

  // Rewriting what was read gives a file with the same tensors, bytes and metadata.
  const std::string img = serialize_safetensors(tensors, f->metadata());
  const auto g = SafetensorsFile::from_bytes(img, "fuzz-rewritten");
  check(g->metadata() == f->metadata() && g->entries().size() == f->entries().size());
  for (const auto& [name, t] : tensors) {
    const Tensor r = g->tensor(name);
    check(r.dtype() == t.dtype() && r.shape() == t.shape() && r.nbytes() == t.nbytes());
    check(t.nbytes() == 0 || std::memcmp(r.data(), t.data(), t.nbytes()) == 0);
  }
  return 0;
}
