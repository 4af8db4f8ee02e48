#pragma once
// The CPU backend's float32 reference ops for the text encoders and the VAE, one file per model family
// (cpu_text_ops.cpp, cpu_image_ops.cpp). Semantics are those of the Backend methods of the same names.
#include "backend/backend.h"

namespace fluxswap::cpu_ops {

// cpu_text_ops.cpp
void layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, const Tensor& y);
void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& y);
void embedding(const Tensor& ids, const Tensor& table, const Tensor& positions, const Tensor& out);
void split_heads(const Tensor& x, const Tensor& out);
void attention_ex(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& bias, bool causal,
                  const Tensor& out);
void activation(const Tensor& x, Activation act, const Tensor& y);
void mul(const Tensor& y, const Tensor& x);

// cpu_image_ops.cpp
void conv2d(const Tensor& x, const Tensor& w, const Tensor& bias, int pad, const Tensor& y);
void group_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, int groups, float eps, bool silu,
                const Tensor& y);
void upsample_nearest2x(const Tensor& x, const Tensor& y);
void transpose_last2(const Tensor& x, const Tensor& y);

}  // namespace fluxswap::cpu_ops
