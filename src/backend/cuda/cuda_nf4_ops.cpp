// Backend::dequantize_nf4 on the GPU: nf4_kernels' dequantisation into the bf16 scratch a linear then reads.
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/nf4_kernels.h"
#include "backend/nf4_checks.h"
#include "quant/nf4.h"

namespace fluxswap::cuda {

void CudaBackend::dequantize_nf4(const Tensor& packed, const Tensor& absmax, int64_t blocksize, const Tensor& out) {
  const char* op = "dequantize_nf4";
  check_nf4_operands(packed, absmax, blocksize, out, std::string("cuda backend: ") + op);
  check_cuda_tensor(packed, op, "packed", DType::U8);
  check_cuda_tensor(absmax, op, "absmax", DType::F32);
  check_cuda_tensor(out, op, "out", DType::BF16);
  cuda::Nf4Matrix w;
  w.packed = packed.ptr<uint8_t>();
  w.rows = out.size(0);
  w.cols = out.size(1);
  w.blocksize = blocksize;
  w.absmax = absmax.ptr<float>();
  for (int i = 0; i < 16; ++i) w.code[i] = kNf4Code[size_t(i)];
  timed(op, [&] { cuda::launch_nf4_dequantize(w, out.ptr<__nv_bfloat16>(), w.cols, stream()); });
}

}  // namespace fluxswap::cuda
