#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "core/dtype.h"
#include "core/error.h"
#include "io/safetensors_header.h"

namespace fluxswap {

namespace {

using json = nlohmann::json;

constexpr size_t kMaxJsonDepth = 16;               // the format needs 3; deeper is hostile or garbage
constexpr const char* kMetadataKey = "__metadata__";

// Quotes a name for a message, escaping control characters and non-ASCII bytes so messages stay printable.
std::string quote(std::string_view s) {
  std::string out = "'";
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f) {
      out += char(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return out + "'";
}

// Returns the offset of the first byte that is not part of well-formed UTF-8 (no overlongs, no surrogates,
// nothing above U+10FFFF), or npos.
size_t invalid_utf8_offset(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;  // overlong
      if (c == 0xed) hi = 0x9f;  // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;  // overlong
      if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
    } else {
      return i;
    }
    if (i + len > n || p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xbf) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::string known_dtypes() {
  std::string out;
  for (int t = 0; t <= int(DType::BOOL); ++t) {
    if (!out.empty()) out += ", ";
    out += dtype_name(DType(t));
  }
  return out;
}

std::string json_type(const json& j) {
  if (j.is_number_unsigned()) return "a non-negative integer";
  if (j.is_number_integer()) return "a negative integer";
  if (j.is_number_float()) return "a non-integer number";
  if (j.is_object()) return "an object";
  if (j.is_array()) return "an array";
  return std::string("a ") + j.type_name();
}

// Parses JSON, rejecting duplicate object keys (nlohmann keeps the last silently) and absurd nesting.
// `tensor_header` picks the wording: a safetensors header (tensor names) or an index file (plain keys).
json parse_json_strict(std::string_view text, const std::string& path, bool tensor_header) {
  const std::string doc = path + (tensor_header ? ": header" : "");
  std::vector<std::set<std::string>> keys_seen;  // one set per open object or array
  std::string top_key;
  auto cb = [&](int, json::parse_event_t ev, json& parsed) {
    switch (ev) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (keys_seen.size() >= kMaxJsonDepth)
          throw Error(doc + " nests deeper than " + std::to_string(kMaxJsonDepth) +
                      " levels, expected a flat JSON object");
        keys_seen.emplace_back();
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!keys_seen.empty()) keys_seen.pop_back();
        break;
      case json::parse_event_t::key: {
        std::string key = parsed.get<std::string>();
        if (keys_seen.size() == 1) top_key = key;
        if (keys_seen.empty() || keys_seen.back().insert(key).second) break;
        const std::string kind = tensor_header ? "tensor " : "key ";
        if (keys_seen.size() == 1)
          throw Error(path + ": " + kind + quote(key) + " appears more than once, expected unique names");
        throw Error(path + ": " + kind + quote(top_key) + ": field " + quote(key) +
                    " appears more than once, expected unique fields");
      }
      case json::parse_event_t::value:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), cb);
  } catch (const json::exception& e) {
    throw Error(doc + " is not valid JSON (" + e.what() + "), expected a JSON object");
  }
}

// Reads a JSON non-negative integer as uint64; false when it is anything else.
bool get_u64(const json& j, uint64_t& out) {
  if (!j.is_number_unsigned()) return false;
  out = j.get<uint64_t>();
  return true;
}

// Shortens a JSON value for a message (a hostile shape array may have millions of elements).
std::string brief(const json& j) {
  std::string s = j.dump();
  return s.size() <= 80 ? s : s.substr(0, 77) + "...";
}

std::map<std::string, std::string> parse_metadata(const std::string& p, const json& value) {
  if (!value.is_object())
    throw Error(p + ": '__metadata__' is " + json_type(value) + ", expected an object of string -> string");
  std::map<std::string, std::string> out;
  for (const auto& [k, v] : value.items()) {
    if (!v.is_string())
      throw Error(p + ": '__metadata__': value of " + quote(k) + " is " + json_type(v) +
                  ", expected a string (a tensor may not be named '__metadata__')");
    out[k] = v.get<std::string>();
  }
  return out;
}

// Checks one header entry on its own; `where` is "<path>: tensor '<name>': ".
SafetensorsEntry parse_entry(const std::string& where, const std::string& name, const json& value,
                             uint64_t data_size) {
  if (!value.is_object())
    throw Error(where + "entry is " + json_type(value) + ", expected an object {dtype, shape, data_offsets}");
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!value.contains(field))
      throw Error(where + "missing field '" + field + "', expected {dtype, shape, data_offsets}");
  for (const auto& [k, v] : value.items())
    if (k != "dtype" && k != "shape" && k != "data_offsets")
      throw Error(where + "unknown field " + quote(k) + ", expected only dtype, shape, data_offsets");

  SafetensorsEntry e;
  e.name = name;
  const json& jd = value.at("dtype");
  if (!jd.is_string()) throw Error(where + "dtype is " + json_type(jd) + ", expected a string such as \"BF16\"");
  const std::string ds = jd.get<std::string>();
  auto dt = dtype_from_name(ds);
  if (!dt) throw Error(where + "unknown dtype " + quote(ds) + ", expected one of " + known_dtypes());
  e.dtype = *dt;

  const json& js = value.at("shape");
  if (!js.is_array()) throw Error(where + "shape is " + json_type(js) + ", expected an array of integers >= 0");
  // The product of the non-zero dimensions must fit int64, so every partial product (strides, numel) does.
  uint64_t nonzero_product = 1;
  bool has_zero = false;
  for (const json& d : js) {
    uint64_t v;
    if (!get_u64(d, v))
      throw Error(where + "shape " + brief(js) + " has " + json_type(d) + ", expected integers >= 0");
    if (v == 0) {
      has_zero = true;
    } else if (__builtin_mul_overflow(nonzero_product, v, &nonzero_product) ||
               nonzero_product > uint64_t(std::numeric_limits<int64_t>::max())) {
      throw Error(where + "shape " + brief(js) + " has more elements than fit in 64 bits");
    }
    e.shape.push_back(int64_t(v));  // v <= nonzero_product <= INT64_MAX
  }
  const uint64_t numel = has_zero ? 0 : nonzero_product;

  const json& jo = value.at("data_offsets");
  if (!jo.is_array() || jo.size() != 2 || !get_u64(jo[0], e.begin) || !get_u64(jo[1], e.end))
    throw Error(where + "data_offsets is " + brief(jo) + ", expected [begin, end] with integers >= 0");
  const std::string range = "[" + std::to_string(e.begin) + ", " + std::to_string(e.end) + ")";
  if (e.begin > e.end) throw Error(where + "data_offsets " + range + " has begin after end, expected begin <= end");
  if (e.end > data_size)
    throw Error(where + "data_offsets end " + std::to_string(e.end) + " is beyond the data region of " +
                std::to_string(data_size) + " bytes, expected end <= " + std::to_string(data_size) +
                " (file truncated?)");
  uint64_t nbytes;
  const bool overflow = __builtin_mul_overflow(numel, uint64_t(dtype_size(e.dtype)), &nbytes);
  if (overflow || nbytes != e.end - e.begin)
    throw Error(where + "shape " + shape_str(e.shape) + " of " + std::string(dtype_name(e.dtype)) + " needs " +
                (overflow ? std::string("more than 2^64") : std::to_string(nbytes)) + " bytes, but data_offsets " +
                range + " span " + std::to_string(e.end - e.begin) + ", expected them to match");
  return e;
}

// Sorts the entries by offset and checks that, like the reference crate demands, they tile the data region
// exactly: no overlaps, no holes, nothing left over at the end.
void check_layout(const std::string& p, std::vector<SafetensorsEntry>& entries, uint64_t data_size) {
  std::sort(entries.begin(), entries.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t prev_end = 0;
  const SafetensorsEntry* prev = nullptr;
  for (const auto& e : entries) {
    if (e.begin < prev_end)
      throw Error(p + ": tensor " + quote(e.name) + ": bytes [" + std::to_string(e.begin) + ", " +
                  std::to_string(e.end) + ") overlap tensor " + quote(prev->name) + " [" +
                  std::to_string(prev->begin) + ", " + std::to_string(prev->end) +
                  "), expected tensors not to overlap");
    if (e.begin > prev_end)
      throw Error(p + ": tensor " + quote(e.name) + ": data region bytes [" + std::to_string(prev_end) + ", " +
                  std::to_string(e.begin) + ") before it are not referenced by any tensor, expected tensors to "
                  "cover the data region without holes");
    prev_end = e.end;
    prev = &e;
  }
  if (prev_end != data_size)
    throw Error(p + ": the last " + std::to_string(data_size - prev_end) + " bytes of the " +
                std::to_string(data_size) + "-byte data region (after the last tensor) are not referenced by " +
                "any tensor, expected tensors to cover the data region exactly");
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// SafetensorsFile

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(path + ": cannot stat: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file, expected a .safetensors file");
  }
  f->size_ = size_t(st.st_size);
  if (f->size_ >= 8) {  // mmap of an empty file fails; short files are reported by parse()
    // MAP_POPULATE maps the whole (page-cached) file at once: one fault per page would cost more than reading it.
    void* m = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (m == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      throw Error(path + ": cannot mmap " + std::to_string(f->size_) + " bytes: " + std::strerror(err));
    }
    f->mapping_ = m;
    f->bytes_ = static_cast<const uint8_t*>(m);
  }
  ::close(fd);  // the mapping stays valid without the descriptor
  f->parse();
  return f;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::from_bytes(std::string bytes, const std::string& label) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = label;
  f->owned_ = std::move(bytes);
  f->bytes_ = reinterpret_cast<const uint8_t*>(f->owned_.data());
  f->size_ = f->owned_.size();
  f->parse();
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_) ::munmap(mapping_, size_);
}

void parse_header_checked(std::string_view header, const std::string& p, uint64_t data_size,
                          std::vector<SafetensorsEntry>& entries, std::map<std::string, std::string>& metadata) {
  entries.clear();
  metadata.clear();
  const json root = parse_json_strict(header, p, true);
  if (!root.is_object())
    throw Error(p + ": header is " + json_type(root) +
                ", expected a JSON object of tensor name -> {dtype, shape, data_offsets}");
  for (const auto& [name, value] : root.items()) {
    if (invalid_utf8_offset(name) != std::string_view::npos)  // \u escapes can't produce this, but be sure
      throw Error(p + ": tensor name " + quote(name) + " is not valid UTF-8");
    if (name == kMetadataKey)
      metadata = parse_metadata(p, value);
    else
      entries.push_back(parse_entry(p + ": tensor " + quote(name) + ": ", name, value, data_size));
  }
}

void SafetensorsFile::parse() {
  const std::string& p = path_;
  if (size_ < 8)
    throw Error(p + ": file is " + std::to_string(size_) +
                " bytes, shorter than the 8-byte header length that starts a safetensors file");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes_[i];
  if (n > kMaxHeaderBytes)
    throw Error(p + ": header length " + std::to_string(n) + " exceeds the limit of " +
                std::to_string(kMaxHeaderBytes) + " bytes (not a safetensors file?)");
  if (n > size_ - 8)
    throw Error(p + ": header length " + std::to_string(n) + " is larger than the " + std::to_string(size_ - 8) +
                " bytes that follow it in the " + std::to_string(size_) +
                "-byte file, expected at most that (file truncated or not a safetensors file?)");
  const std::string_view header(reinterpret_cast<const char*>(bytes_ + 8), size_t(n));
  data_ = bytes_ + 8 + n;
  const uint64_t data_size = size_ - 8 - n;

  if (size_t bad = invalid_utf8_offset(header); bad != std::string_view::npos) {
    // Name the string the bad byte sits in: everything since the last quote before it.
    size_t q = header.rfind('"', bad);
    size_t from = q == std::string_view::npos ? (bad > 32 ? bad - 32 : 0) : q + 1;
    throw Error(p + ": header byte " + std::to_string(bad) + " is not valid UTF-8 (in the text starting " +
                quote(header.substr(from, std::min<size_t>(bad - from + 4, 80))) +
                "), expected UTF-8 tensor names and metadata");
  }

  // The common well-formed header without a document; anything else through the checking parse, which names the
  // fault.
  if (!parse_header_fast(header, data_size, entries_, metadata_))
    parse_header_checked(header, p, data_size, entries_, metadata_);
  check_layout(p, entries_, data_size);
  for (size_t i = 0; i < entries_.size(); ++i) index_[entries_[i].name] = i;
}

std::vector<std::string> SafetensorsFile::keys() const {
  std::vector<std::string> k;
  k.reserve(index_.size());
  for (const auto& [name, i] : index_) k.push_back(name);
  return k;
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry* e = find(name);
  if (!e) throw Error(path_ + ": no tensor named " + quote(name));
  // The mapping is read-only: the view is const in practice, though Tensor carries a mutable pointer.
  void* ptr = const_cast<uint8_t*>(data_ + e->begin);
  return Tensor::borrow(ptr, e->dtype, e->shape, Device::CPU,
                        std::const_pointer_cast<SafetensorsFile>(shared_from_this()));
}

// ---------------------------------------------------------------------------------------------------------
// SafetensorsCollection

namespace {
// Guards lazy shard opening; a process-wide lock keeps SafetensorsCollection copyable and costs nothing here.
std::mutex g_shard_mutex;

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

SafetensorsCollection SafetensorsCollection::open(const std::string& path) {
  SafetensorsCollection c;
  c.path_ = path;
  if (!ends_with(path, ".index.json")) {
    c.single_ = SafetensorsFile::open(path);
    return c;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open: " + std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  if (invalid_utf8_offset(text) != std::string::npos) throw Error(path + ": not valid UTF-8, expected JSON");
  const json root = parse_json_strict(text, path, false);
  if (!root.is_object()) throw Error(path + ": index is " + json_type(root) + ", expected a JSON object");
  if (!root.contains("weight_map"))
    throw Error(path + ": missing 'weight_map', expected {\"weight_map\": {tensor name: shard file}}");
  const json& wm = root["weight_map"];
  if (!wm.is_object()) throw Error(path + ": 'weight_map' is " + json_type(wm) + ", expected an object");
  if (wm.empty()) throw Error(path + ": 'weight_map' is empty, expected at least one tensor");
  if (root.contains("metadata") && !root["metadata"].is_object() && !root["metadata"].is_null())
    throw Error(path + ": 'metadata' is " + json_type(root["metadata"]) + ", expected an object");
  for (const auto& [key, shard] : wm.items()) {
    if (!shard.is_string())
      throw Error(path + ": tensor " + quote(key) + ": shard is " + json_type(shard) + ", expected a file name");
    const std::string s = shard.get<std::string>();
    if (s.empty() || s.find('/') != std::string::npos || s.find('\\') != std::string::npos ||
        s.find("..") != std::string::npos)
      throw Error(path + ": tensor " + quote(key) + ": shard " + quote(s) +
                  " is not a plain file name, expected a file in the index's folder (no '/' or '..')");
    c.key_to_shard_[key] = s;
  }
  return c;
}

SafetensorsCollection SafetensorsCollection::of(std::shared_ptr<SafetensorsFile> file) {
  if (!file) throw Error("SafetensorsCollection::of: null file");
  SafetensorsCollection c;
  c.path_ = file->path();
  c.single_ = std::move(file);
  return c;
}

const SafetensorsFile& SafetensorsCollection::file_for(const std::string& name) const {
  if (single_) return *single_;
  auto it = key_to_shard_.find(name);
  if (it == key_to_shard_.end()) throw Error(path_ + ": no tensor named " + quote(name) + " in the weight_map");
  const std::string& shard = it->second;
  std::lock_guard<std::mutex> lock(g_shard_mutex);
  if (auto s = shards_.find(shard); s != shards_.end()) return *s->second;

  const std::string shard_path = (std::filesystem::path(path_).parent_path() / shard).string();
  std::shared_ptr<SafetensorsFile> f;
  try {
    f = SafetensorsFile::open(shard_path);
  } catch (const Error& e) {
    throw Error(path_ + ": shard " + quote(shard) + " (holding tensor " + quote(name) + "): " + e.what());
  }
  for (const auto& [key, s] : key_to_shard_)
    if (s == shard && !f->contains(key))
      throw Error(path_ + ": shard " + quote(shard) + " has no tensor " + quote(key) +
                  ", but the index's weight_map assigns it there");
  return *shards_.emplace(shard, std::move(f)).first->second;
}

std::vector<std::string> SafetensorsCollection::keys() const {
  if (single_) return single_->keys();
  std::vector<std::string> k;
  k.reserve(key_to_shard_.size());
  for (const auto& [name, shard] : key_to_shard_) k.push_back(name);
  return k;
}

bool SafetensorsCollection::contains(const std::string& name) const {
  return single_ ? single_->contains(name) : key_to_shard_.count(name) != 0;
}

const SafetensorsEntry& SafetensorsCollection::entry(const std::string& name) const {
  if (single_ && !single_->contains(name)) throw Error(path_ + ": no tensor named " + quote(name));
  const SafetensorsEntry* e = file_for(name).find(name);
  if (!e) throw Error(path_ + ": no tensor named " + quote(name));  // unreachable: file_for checked the shard
  return *e;
}

Tensor SafetensorsCollection::tensor(const std::string& name) const {
  if (single_ && !single_->contains(name)) throw Error(path_ + ": no tensor named " + quote(name));
  return file_for(name).tensor(name);
}

const std::map<std::string, std::string>& SafetensorsCollection::metadata() const {
  if (single_) return single_->metadata();
  return file_for(key_to_shard_.begin()->first).metadata();  // open() guarantees a non-empty weight_map
}

// ---------------------------------------------------------------------------------------------------------
// Writer

namespace {

using Sink = std::function<void(const void*, size_t)>;

// Validates the tensors and builds the header, padded with spaces to a multiple of 8 bytes.
std::string build_header(const std::vector<std::pair<std::string, Tensor>>& tensors,
                         const std::map<std::string, std::string>& metadata, const std::string& what) {
  std::set<std::string> seen;
  std::string h = "{";
  if (!metadata.empty()) {
    json m = json::object();
    for (const auto& [k, v] : metadata) {
      if (invalid_utf8_offset(k) != std::string::npos || invalid_utf8_offset(v) != std::string::npos)
        throw Error(what + ": metadata key " + quote(k) + " or its value is not valid UTF-8");
      m[k] = v;
    }
    h += "\"__metadata__\":" + m.dump();
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == kMetadataKey) throw Error(what + ": a tensor may not be named '__metadata__'");
    if (invalid_utf8_offset(name) != std::string::npos)
      throw Error(what + ": tensor name " + quote(name) + " is not valid UTF-8");
    if (!seen.insert(name).second)
      throw Error(what + ": tensor " + quote(name) + " is given more than once, expected unique names");
    if (!t.defined()) throw Error(what + ": tensor " + quote(name) + " is undefined");
    if (t.device() != Device::CPU)
      throw Error(what + ": tensor " + quote(name) + " is not on the CPU, expected a host tensor (copy it first)");
    const uint64_t nbytes = t.nbytes();
    if (h.size() > 1) h += ',';
    h += json(name).dump() + ":{\"dtype\":\"" + std::string(dtype_name(t.dtype())) + "\",\"shape\":" +
         json(t.shape()).dump() + ",\"data_offsets\":[" + std::to_string(offset) + "," +
         std::to_string(offset + nbytes) + "]}";
    offset += nbytes;
  }
  h += '}';
  h.append((8 - h.size() % 8) % 8, ' ');  // keeps the data region 8-byte aligned, as the reference writer does
  return h;
}

// Emits a tensor's bytes in row-major order whatever its strides.
void write_tensor_bytes(const Tensor& t, const Sink& sink) {
  const size_t es = dtype_size(t.dtype());
  if (t.numel() == 0) return;
  if (t.is_contiguous()) {
    sink(t.data(), t.nbytes());
    return;
  }
  const int nd = t.ndim();
  const int64_t inner = t.size(nd - 1);  // nd >= 1 here: a 0-d tensor is always contiguous
  const int64_t inner_stride = t.stride(nd - 1);
  const int64_t rows = t.numel() / inner;
  std::vector<int64_t> idx(size_t(nd), 0);
  std::vector<uint8_t> row(size_t(inner) * es);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t off = 0;
    for (int d = 0; d + 1 < nd; ++d) off += idx[d] * t.stride(d);
    const auto* base = static_cast<const uint8_t*>(t.data()) + off * int64_t(es);
    if (inner_stride == 1) {
      sink(base, row.size());
    } else {
      for (int64_t i = 0; i < inner; ++i) std::memcpy(&row[size_t(i) * es], base + i * inner_stride * int64_t(es), es);
      sink(row.data(), row.size());
    }
    for (int d = nd - 2; d >= 0; --d) {
      if (++idx[d] < t.size(d)) break;
      idx[d] = 0;
    }
  }
}

// Data follows in the given order without per-tensor padding, so a tensor placed after odd-sized ones is not
// naturally aligned in the file; the reference writer avoids that by ordering tensors by descending dtype size.
void emit(const std::vector<std::pair<std::string, Tensor>>& tensors, const std::map<std::string, std::string>& metadata,
          const std::string& what, const Sink& sink) {
  const std::string header = build_header(tensors, metadata, what);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(header.size()) >> (8 * i));
  sink(len, 8);
  sink(header.data(), header.size());
  for (const auto& [name, t] : tensors) write_tensor_bytes(t, sink);
}

}  // namespace

std::string serialize_safetensors(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  std::string out;
  emit(tensors, metadata, "serialize_safetensors",
       [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); });
  return out;
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error(tmp + ": cannot create: " + std::strerror(errno));
  try {
    emit(tensors, metadata, path, [&](const void* p, size_t n) {
      if (std::fwrite(p, 1, n, f) != n) throw Error(tmp + ": write failed: " + std::strerror(errno));
    });
  } catch (...) {
    std::fclose(f);
    std::remove(tmp.c_str());
    throw;
  }
  if (std::fclose(f) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    throw Error(tmp + ": write failed: " + std::strerror(err));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    throw Error(path + ": cannot rename " + tmp + " into place: " + std::strerror(err));
  }
}

}  // namespace fluxswap
