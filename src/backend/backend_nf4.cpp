// The host reference of Backend::dequantize_nf4: quant/nf4's scalar dequantisation, which the GPU kernel matches bit
// for bit (rounded to the output dtype once).
#include <string>

#include "backend/backend.h"
#include "backend/nf4_checks.h"
#include "core/error.h"
#include "quant/nf4.h"

namespace fluxswap {

void check_nf4_operands(const Tensor& packed, const Tensor& absmax, int64_t blocksize, const Tensor& out,
                        const std::string& op) {
  auto fail = [&](const std::string& why) { throw Error(op + ": " + why); };
  if (!packed.defined() || !absmax.defined() || !out.defined()) fail("packed, absmax and out must all be defined");
  if (out.ndim() != 2 || !out.is_contiguous())
    fail("out must be a contiguous [rows, cols] matrix, got " + shape_str(out.shape()));
  const int64_t n = out.numel();
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)))
    fail("blocksize " + std::to_string(blocksize) + " is not a power of two from 32 to 4096");
  if (packed.dtype() != DType::U8 || !packed.is_contiguous() || packed.numel() != (n + 1) / 2)
    fail("packed must be contiguous U8 with " + std::to_string((n + 1) / 2) + " bytes for " + shape_str(out.shape()) +
         ", got " + std::string(dtype_name(packed.dtype())) + " " + shape_str(packed.shape()));
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  if (absmax.dtype() != DType::F32 || !absmax.is_contiguous() || absmax.numel() != blocks)
    fail("absmax must be contiguous float32 with " + std::to_string(blocks) + " values (one per " +
         std::to_string(blocksize) + "), got " + std::string(dtype_name(absmax.dtype())) + " " +
         shape_str(absmax.shape()));
}

void Backend::dequantize_nf4(const Tensor& packed, const Tensor& absmax, int64_t blocksize, const Tensor& out) {
  const std::string op = "dequantize_nf4";
  check_nf4_operands(packed, absmax, blocksize, out, op);
  if (packed.device() != Device::CPU || absmax.device() != Device::CPU || out.device() != Device::CPU)
    throw Error(op + " is not implemented by the " + name() + " backend");
  if (!dtype_is_float(out.dtype())) throw Error(op + ": out must be a float tensor");
  Nf4Tensor t;
  t.shape = out.shape();
  t.blocksize = blocksize;
  t.packed = packed.view({packed.numel()});
  t.absmax = absmax.view({absmax.numel()});
  t.code = Tensor::empty(DType::F32, {16});
  for (int i = 0; i < 16; ++i) t.code.ptr<float>()[i] = kNf4Code[size_t(i)];
  const std::vector<float> values = fluxswap::dequantize_nf4(t);
  convert_from_f32(values.data(), out.dtype(), out.data(), values.size());
}

}  // namespace fluxswap
