#pragma once
// A failure the server reports to the client: the HTTP status it maps to, with the message in the JSON body.
// Derives from the project's Error so code that only knows Error still prints the message.
#include <string>

#include "core/error.h"

namespace fluxswap {

class HttpError : public Error {
 public:
  HttpError(int status, const std::string& what) : Error(what), status_(status) {}
  int status() const { return status_; }

 private:
  int status_;
};

}  // namespace fluxswap
