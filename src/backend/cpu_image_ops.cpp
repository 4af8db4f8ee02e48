// Placeholder until the VAE ops land: each throws.
#include "backend/cpu_ops.h"
#include "core/error.h"

namespace fluxswap::cpu_ops {
namespace {
[[noreturn]] void todo(const char* op) { throw Error(std::string("cpu backend: ") + op + " is not implemented yet"); }
}  // namespace
void conv2d(const Tensor&, const Tensor&, const Tensor&, int, const Tensor&) { todo("conv2d"); }
void group_norm(const Tensor&, const Tensor&, const Tensor&, int, float, bool, const Tensor&) { todo("group_norm"); }
void upsample_nearest2x(const Tensor&, const Tensor&) { todo("upsample_nearest2x"); }
void transpose_last2(const Tensor&, const Tensor&) { todo("transpose_last2"); }
}  // namespace fluxswap::cpu_ops
