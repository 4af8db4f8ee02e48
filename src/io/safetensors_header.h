#pragma once
// The two parsers of a safetensors header (the JSON after the 8-byte length). Every LoRA swap from a file parses one
// (~1000 entries), so the common case has its own:
//  - parse_header_fast (safetensors_header_fast.cpp): one SAX pass, no document. It accepts only a well-formed
//    header — an object of tensor entries {dtype, shape, data_offsets} and an optional "__metadata__" object of
//    strings, no duplicate names or fields, known dtypes, offsets that span the shape's bytes inside the data region
//    — and says false for anything else.
//  - parse_header_checked (safetensors.cpp): a JSON document, then each entry checked; throws Error naming the fault.
//    SafetensorsFile takes it whenever the fast one says false. Both accept exactly the same headers and read them
//    the same way (the fuzz target checks it on every input).
// Neither checks the layout of the entries (overlaps, holes): SafetensorsFile does that after either.
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "io/safetensors.h"

namespace fluxswap {

// On true, `entries` (in header order) and `metadata` hold the header; on false they are unspecified.
bool parse_header_fast(std::string_view header, uint64_t data_size, std::vector<SafetensorsEntry>& entries,
                       std::map<std::string, std::string>& metadata);

// `path` names the file in messages. Entries come in name order.
void parse_header_checked(std::string_view header, const std::string& path, uint64_t data_size,
                          std::vector<SafetensorsEntry>& entries, std::map<std::string, std::string>& metadata);

}  // namespace fluxswap
