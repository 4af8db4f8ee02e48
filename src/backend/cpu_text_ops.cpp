// Placeholder until the text-encoder ops land: each throws.
#include "backend/cpu_ops.h"
#include "core/error.h"

namespace fluxswap::cpu_ops {
namespace {
[[noreturn]] void todo(const char* op) { throw Error(std::string("cpu backend: ") + op + " is not implemented yet"); }
}  // namespace
void layer_norm(const Tensor&, const Tensor&, const Tensor&, float, const Tensor&) { todo("layer_norm"); }
void rms_norm(const Tensor&, const Tensor&, float, const Tensor&) { todo("rms_norm"); }
void embedding(const Tensor&, const Tensor&, const Tensor&, const Tensor&) { todo("embedding"); }
void split_heads(const Tensor&, const Tensor&) { todo("split_heads"); }
void attention_ex(const Tensor&, const Tensor&, const Tensor&, float, const Tensor&, bool, const Tensor&) {
  todo("attention_ex");
}
void activation(const Tensor&, Activation, const Tensor&) { todo("activation"); }
void mul(const Tensor&, const Tensor&) { todo("mul"); }
}  // namespace fluxswap::cpu_ops
