// libFuzzer target for the safetensors reader: any byte string must either parse into a file whose every
// tensor can be read, or fail with fluxswap::Error. Anything else (crash, sanitizer report, other exception)
// is a bug. A parsed file must also survive a write/read round trip unchanged. The header's two parsers
// (io/safetensors_header.h) must agree on every input: the fast one accepts exactly what the checked one accepts, and
// reads it the same way.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "io/safetensors_header.h"

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

// Both header parsers on the bytes after the 8-byte length (taken as the header whole, the rest as the data region).
void compare_header_parsers(const uint8_t* data, size_t size) {
  if (size < 8) return;
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > size - 8) return;
  const std::string_view header(reinterpret_cast<const char*>(data + 8), size_t(n));
  const uint64_t data_size = size - 8 - n;
  std::vector<SafetensorsEntry> fast, checked;
  std::map<std::string, std::string> fast_meta, checked_meta;
  const bool fast_ok = parse_header_fast(header, data_size, fast, fast_meta);
  bool checked_ok = true;
  try {
    parse_header_checked(header, "fuzz", data_size, checked, checked_meta);
  } catch (const Error&) {
    checked_ok = false;
  }
  check(fast_ok == checked_ok);
  if (!fast_ok) return;
  auto by_name = [](const SafetensorsEntry& a, const SafetensorsEntry& b) { return a.name < b.name; };
  std::sort(fast.begin(), fast.end(), by_name);
  std::sort(checked.begin(), checked.end(), by_name);
  check(fast.size() == checked.size() && fast_meta == checked_meta);
  for (size_t i = 0; i < fast.size(); ++i)
    check(fast[i].name == checked[i].name && fast[i].dtype == checked[i].dtype && fast[i].shape == checked[i].shape &&
          fast[i].begin == checked[i].begin && fast[i].end == checked[i].end);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  compare_header_parsers(data, size);
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
