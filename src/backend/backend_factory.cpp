#include <cstdio>

#include "backend/backend.h"
#include "core/error.h"

namespace fluxswap {

void Backend::copy_from_host_batch(const std::vector<std::pair<Tensor, Tensor>>& host_to_device) {
  for (const auto& [host, dst] : host_to_device) copy_from_host(host, dst);
}
void Backend::stream_upload(const Tensor& host_src, const Tensor& device_dst, int buffer) {
  if (buffer < 0 || buffer >= kStreamBuffers)
    throw Error("stream_upload: buffer " + std::to_string(buffer) + " is not in 0.." + std::to_string(kStreamBuffers - 1));
  if (host_src.nbytes() != device_dst.nbytes())
    throw Error("stream_upload: " + std::to_string(host_src.nbytes()) + " host bytes into a " +
                std::to_string(device_dst.nbytes()) + "-byte device buffer");
  copy_from_host_batch({{host_src, device_dst}});
}
void Backend::axpy(const Tensor&, float, const Tensor&) {
  throw Error("axpy is not implemented by the " + name() + " backend");
}
void Backend::copy(const Tensor&, const Tensor&) { throw Error("copy is not implemented by the " + name() + " backend"); }
void Backend::add_matmul(const Tensor&, const Tensor&, const Tensor&, const Tensor&, float) {
  throw Error("add_matmul is not implemented by the " + name() + " backend");
}
void Backend::zero(const Tensor&) { throw Error("zero is not implemented by the " + name() + " backend"); }
void Backend::quantize_fp8_rows(const Tensor&, const Tensor&, const Tensor&) {
  throw Error("FP8 is not supported by the " + name() + " backend");
}
void Backend::linear_fp8(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Activation) {
  throw Error("FP8 is not supported by the " + name() + " backend");
}
void Backend::layer_norm_modulate_fp8(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  throw Error("FP8 is not supported by the " + name() + " backend");
}
void Backend::linear_fp8_quantized(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, Activation) {
  throw Error("FP8 is not supported by the " + name() + " backend");
}
void Backend::linear_fp8_quantized_residual(const Tensor& xq, const Tensor& x_scale, const Tensor& wq,
                                            const Tensor& w_scale, const Tensor& bias, const Tensor& gate,
                                            const Tensor& x, const Tensor& branch, const GatedFactors&) {
  linear_fp8_quantized(xq, x_scale, wq, w_scale, bias, branch, Activation::None);
  gated_residual(x, gate, branch);
}
void Backend::linear_fp8_residual(const Tensor& in, const Tensor& wq, const Tensor& w_scale, const Tensor& bias,
                                  const Tensor& gate, const Tensor& x, const Tensor& branch, const GatedFactors&) {
  linear_fp8(in, wq, w_scale, bias, branch, Activation::None);
  gated_residual(x, gate, branch);
}
void Backend::gated_output_factors(const std::vector<GatedFactors>&) {
  throw Error("gated_output_factors is not implemented by the " + name() + " backend");
}
void Backend::linear_fp8_batch(const Tensor& x, const std::vector<Fp8LinearItem>& items) {
  for (const Fp8LinearItem& it : items) linear_fp8(x, it.wq, it.w_scale, it.bias, it.y, Activation::None);
}
void Backend::gated_residual_layer_norm_modulate(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, const Tensor&) {
  throw Error("gated_residual_layer_norm_modulate is not implemented by the " + name() + " backend");
}
void Backend::gated_residual_layer_norm_modulate_fp8(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                     const Tensor&, const Tensor&, const Tensor&) {
  throw Error("gated_residual_layer_norm_modulate_fp8 is not implemented by the " + name() + " backend");
}
void Backend::qk_norm_rope_fp8(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, float,
                               const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  throw Error("FP8 attention is not supported by the " + name() + " backend");
}
void Backend::attention_fp8(const Tensor&, const Tensor&, const Tensor&, float, const Tensor&, const Tensor&) {
  throw Error("FP8 attention is not supported by the " + name() + " backend");
}
void Backend::attention_fp8_rows(const Tensor&, const Tensor&, const Tensor&, float, const Tensor&, const Tensor&,
                                 const Tensor&) {
  throw Error("FP8 attention is not supported by the " + name() + " backend");
}
void Backend::quantize_fp8_rows_joined(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  throw Error("FP8 is not supported by the " + name() + " backend");
}
void Backend::add_lora_branch(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Activation) {
  throw Error("add_lora_branch is not implemented by the " + name() + " backend");
}
void Backend::scaled_copy_batch(const std::vector<ScaledCopy>& copies) {
  for (const ScaledCopy& c : copies) {
    zero(c.dst);
    axpy(c.dst, c.alpha, c.src);
  }
}
void Backend::lora_linear(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, Activation) {
  throw Error("lora_linear is not implemented by the " + name() + " backend");
}

void Backend::layer_norm(const Tensor&, const Tensor&, const Tensor&, float, const Tensor&) {
  throw Error("layer_norm is not implemented by the " + name() + " backend");
}
void Backend::rms_norm(const Tensor&, const Tensor&, float, const Tensor&) {
  throw Error("rms_norm is not implemented by the " + name() + " backend");
}
void Backend::embedding(const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  throw Error("embedding is not implemented by the " + name() + " backend");
}
void Backend::split_heads(const Tensor&, const Tensor&) {
  throw Error("split_heads is not implemented by the " + name() + " backend");
}
void Backend::attention_ex(const Tensor&, const Tensor&, const Tensor&, float, const Tensor&, bool, const Tensor&) {
  throw Error("attention_ex is not implemented by the " + name() + " backend");
}
void Backend::activation(const Tensor&, Activation, const Tensor&) {
  throw Error("activation is not implemented by the " + name() + " backend");
}
void Backend::mul(const Tensor&, const Tensor&) { throw Error("mul is not implemented by the " + name() + " backend"); }
void Backend::conv2d(const Tensor&, const Tensor&, const Tensor&, int, const Tensor&) {
  throw Error("conv2d is not implemented by the " + name() + " backend");
}
void Backend::group_norm(const Tensor&, const Tensor&, const Tensor&, int, float, bool, const Tensor&) {
  throw Error("group_norm is not implemented by the " + name() + " backend");
}
void Backend::upsample_nearest2x(const Tensor&, const Tensor&) {
  throw Error("upsample_nearest2x is not implemented by the " + name() + " backend");
}
void Backend::transpose_last2(const Tensor&, const Tensor&) {
  throw Error("transpose_last2 is not implemented by the " + name() + " backend");
}

#ifndef FLUXSWAP_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(int) {
  throw Error("this build of fluxswap has no CUDA backend (configure with -DFLUXSWAP_CUDA=ON where nvcc exists)");
}
#endif

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "cpu") return make_cpu_backend();
  if (name == "cuda") return make_cuda_backend(0);
  if (name == "auto") {
    try {
      return make_cuda_backend(0);
    } catch (const Error& e) {
      std::printf("device   no usable GPU (%s): running on the CPU reference backend\n", e.what());
      return make_cpu_backend();
    }
  }
  throw Error("unknown device '" + name + "', expected auto, cpu or cuda");
}

}  // namespace fluxswap
