#include "io/safetensors_header.h"

#include <algorithm>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/dtype.h"

namespace fluxswap {

namespace {

using json = nlohmann::json;

constexpr std::string_view kMetadataKey = "__metadata__";

// SAX events of the expected layout; any other event stops the parse (returns false).
class HeaderSax : public json::json_sax_t {
 public:
  struct Raw {
    std::string name, dtype;
    Shape shape;
    uint64_t offsets[2] = {0, 0};
    int offset_count = 0;
    unsigned fields = 0;  // bits: dtype, shape, data_offsets
  };
  std::vector<Raw> entries;
  std::map<std::string, std::string> metadata;
  bool done() const { return at_ == At::Done; }

  bool start_object(std::size_t) override {
    if (at_ == At::Start) return at_ = At::Top, true;
    if (at_ != At::Top) return false;
    if (key_ == kMetadataKey) return !has_metadata_ && (has_metadata_ = true, at_ = At::Metadata, true);
    entries.push_back({});
    entries.back().name = std::move(key_);
    return at_ = At::Entry, true;
  }
  bool key(string_t& k) override {
    if (at_ == At::Top || at_ == At::Metadata) return key_ = std::move(k), true;
    if (at_ != At::Entry) return false;
    field_ = k == "dtype" ? 0 : k == "shape" ? 1 : k == "data_offsets" ? 2 : -1;
    if (field_ < 0 || entries.back().fields & (1u << field_)) return false;  // unknown or repeated field
    entries.back().fields |= 1u << field_;
    return true;
  }
  bool string(string_t& s) override {
    if (at_ == At::Metadata) return metadata.emplace(std::move(key_), std::move(s)).second;
    if (at_ != At::Entry || field_ != 0) return false;
    entries.back().dtype = std::move(s);
    return true;
  }
  bool number_unsigned(number_unsigned_t v) override {
    if (at_ == At::Shape) {
      if (v > uint64_t(std::numeric_limits<int64_t>::max())) return false;
      entries.back().shape.push_back(int64_t(v));
      return true;
    }
    if (at_ != At::Offsets || entries.back().offset_count == 2) return false;
    Raw& e = entries.back();
    e.offsets[e.offset_count++] = v;
    return true;
  }
  bool start_array(std::size_t) override {
    if (at_ != At::Entry || field_ == 0) return false;
    return at_ = field_ == 1 ? At::Shape : At::Offsets, true;
  }
  bool end_array() override {
    if (at_ != At::Shape && at_ != At::Offsets) return false;
    return at_ = At::Entry, true;
  }
  bool end_object() override {
    if (at_ == At::Entry) {
      const Raw& e = entries.back();
      return e.fields == 7u && e.offset_count == 2 && (at_ = At::Top, true);
    }
    if (at_ == At::Metadata) return at_ = At::Top, true;
    if (at_ == At::Top) return at_ = At::Done, true;
    return false;
  }
  bool null() override { return false; }
  bool boolean(bool) override { return false; }
  bool number_integer(number_integer_t) override { return false; }  // negative
  bool number_float(number_float_t, const string_t&) override { return false; }
  bool binary(binary_t&) override { return false; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

 private:
  enum class At { Start, Top, Metadata, Entry, Shape, Offsets, Done } at_ = At::Start;
  std::string key_;
  int field_ = -1;
  bool has_metadata_ = false;
};

// The entry, if its dtype is known and its offsets span exactly its bytes inside the data region.
bool to_entry(HeaderSax::Raw& raw, uint64_t data_size, SafetensorsEntry& e) {
  const auto dtype = dtype_from_name(raw.dtype);
  if (!dtype) return false;
  // As the checking parse: the product of the non-zero dimensions must fit int64, whatever the others.
  uint64_t nonzero_product = 1;
  bool has_zero = false;
  for (int64_t d : raw.shape)
    if (d == 0)
      has_zero = true;
    else if (__builtin_mul_overflow(nonzero_product, uint64_t(d), &nonzero_product) ||
             nonzero_product > uint64_t(std::numeric_limits<int64_t>::max()))
      return false;
  const uint64_t numel = has_zero ? 0 : nonzero_product;
  uint64_t nbytes = 0;
  const auto [begin, end] = std::pair{raw.offsets[0], raw.offsets[1]};
  if (__builtin_mul_overflow(numel, uint64_t(dtype_size(*dtype)), &nbytes) || begin > end || end > data_size ||
      nbytes != end - begin)
    return false;
  e = {std::move(raw.name), *dtype, std::move(raw.shape), begin, end};
  return true;
}

}  // namespace

bool parse_header_fast(std::string_view header, uint64_t data_size, std::vector<SafetensorsEntry>& entries,
                       std::map<std::string, std::string>& metadata) {
  HeaderSax sax;
  if (!json::sax_parse(header.begin(), header.end(), &sax) || !sax.done()) return false;
  // Duplicate tensor names ("__metadata__" never becomes an entry; a second one was refused while parsing).
  std::vector<std::string_view> names;
  names.reserve(sax.entries.size());
  for (const auto& e : sax.entries) names.push_back(e.name);
  std::sort(names.begin(), names.end());
  if (std::adjacent_find(names.begin(), names.end()) != names.end()) return false;
  entries.resize(sax.entries.size());
  for (size_t i = 0; i < entries.size(); ++i)
    if (!to_entry(sax.entries[i], data_size, entries[i])) return false;
  metadata = std::move(sax.metadata);
  return true;
}

}  // namespace fluxswap
