#pragma once
// Tells whether the client of a request has gone away, so that its generation can stop between steps.
//
// cpp-httplib 0.11.4 has no Request::is_connection_closed and hands handlers no socket, so the probe finds the
// connection's socket itself: the one descriptor of this process whose local and peer addresses are the
// request's (a TCP 4-tuple is unique while the connection is open, and httplib keeps it open until the handler
// returns, so the descriptor cannot be reused under us). It then only peeks: a readable socket with nothing to
// read is a closed one. Where no socket matches (another platform, a proxy in front), closed() is always false
// and requests end by their timeout only.
#include <string>

namespace httplib {
struct Request;
}

namespace fluxswap {

class ConnectionProbe {
 public:
  explicit ConnectionProbe(const httplib::Request& req);
  bool found() const { return fd_ >= 0; }
  // Non-blocking. A client that half-closes its sending side after the request counts as gone (as in newer
  // cpp-httplib); HTTP clients do not do that while waiting for a response.
  bool closed() const;

 private:
  int fd_ = -1;
};

}  // namespace fluxswap
