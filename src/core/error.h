#pragma once
// One exception type for every user-facing failure: the message names the file/key/field and what was expected.
#include <stdexcept>
#include <string>

namespace fluxswap {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace fluxswap
