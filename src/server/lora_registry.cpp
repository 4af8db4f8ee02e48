#include "server/lora_registry.h"

#include <algorithm>

#include "server/http_error.h"
#include "server/metrics.h"

namespace fluxswap {

namespace fsys = std::filesystem;

namespace {

constexpr const char* kExtension = ".safetensors";

bool inside(const fsys::path& root, const fsys::path& p) {
  auto [r, q] = std::mismatch(root.begin(), root.end(), p.begin(), p.end());
  return r == root.end() && q != p.end();
}

// Checked on the text before touching the file system, so that a hostile name never reaches a path operation.
void check_name(const std::string& name) {
  const std::string shown = "LoRA name '" + name.substr(0, 100) + "'";
  if (name.empty()) throw HttpError(400, "LoRA name is empty");
  if (name.size() > 255) throw HttpError(400, shown + " is longer than 255 characters");
  for (unsigned char c : name)
    if (c < 0x20 || c == 0x7f || c == '\\' || c == ':')
      throw HttpError(400, shown + " contains a control character, '\\' or ':'");
  if (name.front() == '/') throw HttpError(400, shown + " is an absolute path; names are relative to the LoRA directory");
  size_t start = 0;
  while (start <= name.size()) {
    const size_t end = std::min(name.find('/', start), name.size());
    const std::string part = name.substr(start, end - start);
    if (part.empty() || part == "." || part == "..")
      throw HttpError(400, shown + " has an empty, '.' or '..' path component; names cannot leave the LoRA directory");
    start = end + 1;
  }
}

}  // namespace

LoraRegistry::LoraRegistry(const std::string& dir) {
  if (dir.empty()) return;
  std::error_code ec;
  if (!fsys::is_directory(dir, ec)) throw Error("--lora-dir " + dir + ": not a directory");
  root_ = fsys::canonical(dir);
}

std::vector<LoraRegistry::Entry> LoraRegistry::list() const {
  std::vector<Entry> out;
  if (root_.empty()) return out;
  std::error_code ec;
  for (auto it = fsys::recursive_directory_iterator(root_, fsys::directory_options::skip_permission_denied, ec);
       !ec && it != fsys::recursive_directory_iterator(); it.increment(ec)) {
    const fsys::path& p = it->path();
    if (p.extension() != kExtension) continue;
    std::error_code e2;
    const fsys::path real = fsys::canonical(p, e2);
    if (e2 || !inside(root_, real) || !fsys::is_regular_file(real, e2)) continue;  // dangling or escaping links
    const fsys::path rel = p.lexically_relative(root_);
    std::string name = rel.string();
    name.resize(name.size() - std::string(kExtension).size());
    try {
      check_name(name);  // a file listed must be nameable
    } catch (const HttpError&) {
      continue;
    }
    out.push_back({name, rel.string(), fsys::file_size(real, e2)});
  }
  std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.name < b.name; });
  return out;
}

std::string LoraRegistry::resolve(const std::string& requested) const {
  std::string name = requested;
  if (name.size() > std::string(kExtension).size() && name.ends_with(kExtension))
    name.resize(name.size() - std::string(kExtension).size());
  check_name(name);
  if (root_.empty()) throw HttpError(404, "unknown LoRA '" + name + "': the server has no --lora-dir");
  const fsys::path p = root_ / (name + kExtension);
  std::error_code ec;
  if (!fsys::exists(fsys::symlink_status(p, ec)))
    throw HttpError(404, "unknown LoRA '" + name + "' (GET /v1/loras lists the available ones)");
  const fsys::path real = fsys::canonical(p, ec);
  if (ec) throw HttpError(404, "LoRA '" + name + "' is a dangling link");
  // A link inside the directory may point anywhere; only what it resolves to counts.
  if (!inside(root_, real)) throw HttpError(400, "LoRA '" + name + "' is a link leading outside the LoRA directory");
  if (!fsys::is_regular_file(real, ec)) throw HttpError(404, "LoRA '" + name + "' is not a regular file");
  return real.string();
}

std::shared_ptr<const LoraAdapter> AdapterCache::get(const std::string& name, const std::string& path,
                                                     const FluxConfig& config, bool* was_cached,
                                                     const HostBufferAllocator& host) {
  std::error_code ec;
  const uintmax_t bytes = fsys::file_size(path, ec);
  const auto mtime = fsys::last_write_time(path, ec);
  {
    std::lock_guard lock(mutex_);
    for (auto it = items_.begin(); it != items_.end(); ++it)
      if (it->path == path) {
        if (it->bytes == bytes && it->mtime == mtime) {
          items_.splice(items_.begin(), items_, it);
          metrics_.adapter_cache_hits++;
          if (was_cached) *was_cached = true;
          return it->adapter;
        }
        items_.erase(it);
        break;
      }
  }
  metrics_.adapter_cache_misses++;
  if (was_cached) *was_cached = false;
  // Parsed outside the lock: a large file must not hold up requests for cached ones. Two requests for the same new
  // file may both parse it; the second insert replaces the first and both results are valid.
  std::shared_ptr<const LoraAdapter> adapter;
  try {
    auto a = std::make_shared<LoraAdapter>(load_lora_adapter(path, config, host));
    if (a->pairs.empty() && a->clip_pairs.empty())
      throw Error(path + ": no LoRA tensors for the transformer or the CLIP text encoder in it: it would change nothing");
    adapter = std::move(a);
  } catch (const std::exception& e) {
    throw HttpError(422, "LoRA '" + name + "' cannot be used: " + e.what());
  }
  if (capacity_ == 0) return adapter;
  std::lock_guard lock(mutex_);
  items_.remove_if([&](const Item& i) { return i.path == path; });
  items_.push_front({path, bytes, mtime, adapter});
  while (items_.size() > capacity_) items_.pop_back();
  return adapter;
}

bool AdapterCache::contains(const std::string& path) const {
  std::lock_guard lock(mutex_);
  return std::any_of(items_.begin(), items_.end(), [&](const Item& i) { return i.path == path; });
}

size_t AdapterCache::size() const {
  std::lock_guard lock(mutex_);
  return items_.size();
}

}  // namespace fluxswap
