#pragma once
// The decoder half of diffusers' AutoencoderKL (FLUX.1: 16 latent channels, block_out_channels [128, 256, 512, 512]),
// written once against the Backend ops, plus the FLUX pipeline's latent unpacking and image post-processing.
//
//   [post_quant_conv] -> conv_in -> mid block (resnet, attention, resnet)
//   -> up blocks (widest first; layers_per_block + 1 resnets each, then nearest 2x + conv on all but the last)
//   -> GroupNorm + SiLU -> conv_out
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/weight_offload.h"

namespace fluxswap {

struct VaeConfig {
  std::vector<int64_t> block_out_channels = {128, 256, 512, 512};
  int64_t layers_per_block = 2;
  int64_t norm_num_groups = 32;
  int64_t latent_channels = 16;
  int64_t out_channels = 3;
  float scaling_factor = 0.3611f;
  float shift_factor = 0.1159f;
  bool mid_block_add_attention = true;
  bool use_post_quant_conv = false;  // SD-style VAEs have a 1x1 conv before the decoder; FLUX's has none

  static VaeConfig flux1();  // FLUX.1's VAE (the defaults above)
  // Parses a diffusers AutoencoderKL config.json; `path` is for messages. Absent optional fields take diffusers'
  // defaults (no shift, post_quant_conv present, mid-block attention on).
  static VaeConfig from_json_text(const std::string& text, const std::string& path);
  static VaeConfig from_json_file(const std::string& path);
  // Throws Error naming `what` on a value out of range.
  void validate(const std::string& what) const;

  // Image pixels per latent pixel: one 2x upsampler per block but the last.
  int64_t upscale() const { return int64_t(1) << (block_out_channels.size() - 1); }
};

// One layer's parameters: a conv ([out, in, kh, kw]), a linear ([out, in]) or a GroupNorm ([C]), and its bias.
struct WeightBias {
  Tensor weight, bias;
};

struct VaeResnetWeights {
  WeightBias norm1, conv1, norm2, conv2;
  WeightBias conv_shortcut;  // 1x1, only where the block changes the channel count
};

struct VaeAttentionWeights {
  WeightBias group_norm, to_q, to_k, to_v, to_out;
};

struct VaeUpBlockWeights {
  std::vector<VaeResnetWeights> resnets;
  WeightBias upsampler;  // the conv after the nearest 2x; undefined on the last block
};

struct VaeDecoderWeights {
  WeightBias post_quant_conv;  // undefined unless config.use_post_quant_conv
  WeightBias conv_in;
  VaeResnetWeights mid_resnet_in, mid_resnet_out;
  VaeAttentionWeights mid_attention;  // undefined unless config.mid_block_add_attention
  std::vector<VaeUpBlockWeights> up_blocks;
  WeightBias conv_norm_out, conv_out;

  // Every tensor (undefined ones of absent layers included), in a fixed order: what leaves the device on offload.
  std::vector<Tensor*> device_tensors();
};

// Reads the `decoder.*` (and `post_quant_conv.*`) tensors of a diffusers AutoencoderKL checkpoint and uploads them;
// encoder tensors are ignored. Throws Error naming the file and key on a missing tensor, a shape that does not match
// the config, or a decoder tensor the config has no place for.
VaeDecoderWeights load_vae_decoder_weights(const SafetensorsCollection& file, const VaeConfig& config,
                                           Backend& backend);

// Elements of the largest activation a decode of latents [height, width] holds (per sample), or of its uint8 image
// if that is larger: what each of the decoder's arenas must hold (the memory planner sizes the VAE with it too).
int64_t vae_largest_activation(const VaeConfig& config, int64_t height, int64_t width);

class VaeDecoder {
 public:
  VaeDecoder(const VaeConfig& config, VaeDecoderWeights weights, Backend& backend);

  // Allocates the activation buffers for a batch and latent size; kept while the shape stays the same.
  void prepare(int64_t batch, int64_t height, int64_t width);
  // latents [B, latent_channels, h, w] as the network sees them (see unscale_latents) -> image
  // [B, out_channels, h * upscale, w * upscale] in about -1..1, both in the backend's compute dtype on its device.
  // Issues device work only.
  void decode(const Tensor& latents, const Tensor& image);
  // Host latents (any float dtype) in, host float32 image out: uploads, decodes, downloads.
  Tensor decode_host(const Tensor& latents);
  // The FLUX pipeline's decode tail on the backend's device: the sampler's packed latents [B, (h/2)(w/2),
  // 4 * latent_channels] (compute dtype, contiguous) -> unpack and unscale -> decode -> uint8 RGB
  // [B, h * upscale, w * upscale, out_channels] as postprocess_u8 makes it. h and w are the latent size (even).
  // Issues device work only; the result lives in one of this decoder's arenas, rewritten by the next decode.
  Tensor decode_to_rgb8(const Tensor& packed, int64_t height, int64_t width);

  const VaeConfig& config() const { return config_; }

  // Under a memory budget: offload() frees the device weights (kept in host memory, pinned on the GPU) and the
  // arenas, onload() brings the weights back in one transfer. Results are bit-identical either way. Both
  // idempotent; decoding refuses to run while offloaded. release_buffers() frees the arenas (and with them the last
  // decode_to_rgb8 result) and the backend's convolution scratch, not the weights.
  void offload();
  void onload();
  bool resident() const { return offload_.resident(); }
  uint64_t weight_bytes();  // device bytes of the weights, resident or not
  void release_buffers();

 private:
  // Returns the output: x updated in place, or a scratch arena when the block changes the channel count.
  Tensor resnet(const VaeResnetWeights& w, const Tensor& x);
  // Adds the attention branch to x in place.
  void attention(const VaeAttentionWeights& w, const Tensor& x);
  // The two arenas that do not hold x.
  std::pair<Tensor, Tensor> scratch_besides(const Tensor& x) const;
  // A view of `arena` with this shape.
  static Tensor shaped(const Tensor& arena, const Shape& shape);

  VaeConfig config_;
  VaeDecoderWeights weights_;
  Backend& backend_;
  WeightOffload offload_;

  int64_t B_ = 0, h_ = 0, w_ = 0;
  struct Buffers {
    // Three flat arenas, each as large as the largest activation: one holds the current activation, the other
    // two a layer's intermediate results (which arena is which changes as layers write their outputs).
    Tensor cur, a, b;
    Tensor q, k, v, attn;          // [B, h*w, C] token rows of the mid-block attention
    Tensor latents_in, image_out;  // decode_host's device copies; decode_to_rgb8's intermediates
  } buf_;
};

// Opens a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors), or a pipeline folder that
// has one, and loads its decoder.
VaeDecoder open_vae_decoder(const std::string& path, Backend& backend);

// latents / scaling_factor + shift_factor: what FluxPipeline does to the sampler's latents before vae.decode.
// Host tensors; the result is float32.
Tensor unscale_latents(const Tensor& latents, const VaeConfig& config);

// FluxPipeline._unpack_latents: packed [B, (h/2)(w/2), 4C] -> [B, C, h, w], where packed channel c*4 + dy*2 + dx of
// token i*(w/2) + j is latent pixel (c, 2i + dy, 2j + dx). h and w are the latent size (image size / upscale, even).
// Host tensors; the result is float32.
Tensor unpack_flux_latents(const Tensor& packed, int64_t height, int64_t width);
// The inverse, FluxPipeline._pack_latents: [B, C, h, w] -> [B, (h/2)(w/2), 4C].
Tensor pack_flux_latents(const Tensor& latents);

// diffusers' VaeImageProcessor.postprocess: host image [B, C, H, W] in -1..1 -> float32 [B, H, W, C] of
// (x / 2 + 0.5) clamped to 0..1 (output_type "np").
Tensor postprocess_unit(const Tensor& image);
// ... then numpy_to_pil's (x * 255).round() (half to even, as numpy rounds) as uint8 [B, H, W, C].
Tensor postprocess_u8(const Tensor& image);

}  // namespace fluxswap
