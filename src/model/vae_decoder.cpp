#include "model/vae_decoder.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "backend/cpu_ops.h"
#include "core/error.h"
#include "io/json_config.h"
#include "model/component_weights.h"

namespace fluxswap {

namespace {

// diffusers builds every GroupNorm of the decoder (resnets, attention, conv_norm_out) with eps 1e-6.
constexpr float kNormEps = 1e-6f;

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Config

VaeConfig VaeConfig::flux1() { return VaeConfig{}; }

VaeConfig VaeConfig::from_json_text(const std::string& text, const std::string& path) {
  const nlohmann::json j = parse_json_object(text, path);
  // diffusers' AutoencoderKL defaults stand for absent fields.
  VaeConfig c;
  c.block_out_channels = {64};
  c.layers_per_block = 1;
  c.latent_channels = 4;
  c.scaling_factor = 0.18215f;
  c.shift_factor = 0.0f;
  c.use_post_quant_conv = true;
  read_field(j, "block_out_channels", c.block_out_channels, path);
  read_field(j, "layers_per_block", c.layers_per_block, path);
  read_field(j, "norm_num_groups", c.norm_num_groups, path);
  read_field(j, "latent_channels", c.latent_channels, path);
  read_field(j, "out_channels", c.out_channels, path);
  read_field(j, "scaling_factor", c.scaling_factor, path);
  read_field(j, "shift_factor", c.shift_factor, path);  // null in SD-style configs: no shift
  read_field(j, "mid_block_add_attention", c.mid_block_add_attention, path);
  read_field(j, "use_post_quant_conv", c.use_post_quant_conv, path);
  std::string act = "silu";
  read_field(j, "act_fn", act, path);
  if (act != "silu") throw Error(path + ": act_fn '" + act + "' is not supported, expected 'silu'");
  std::vector<std::string> up_types;
  read_field(j, "up_block_types", up_types, path);
  for (const auto& t : up_types)
    if (t != "UpDecoderBlock2D") throw Error(path + ": up block type '" + t + "' is not supported");
  c.validate(path);
  return c;
}

VaeConfig VaeConfig::from_json_file(const std::string& path) { return from_json_text(read_text_file(path), path); }

void VaeConfig::validate(const std::string& what) const {
  auto fail = [&](const std::string& m) { throw Error(what + ": " + m); };
  if (block_out_channels.empty() || block_out_channels.size() > 8)
    fail("block_out_channels must list 1 to 8 widths, got " + shape_str(block_out_channels));
  if (norm_num_groups <= 0) fail("norm_num_groups must be positive");
  for (int64_t c : block_out_channels)
    if (c <= 0 || c % norm_num_groups != 0)
      fail("block_out_channels " + shape_str(block_out_channels) + " must be positive multiples of norm_num_groups " +
           std::to_string(norm_num_groups));
  if (layers_per_block < 0) fail("layers_per_block must not be negative");
  if (latent_channels <= 0 || out_channels <= 0) fail("latent_channels and out_channels must be positive");
  if (!std::isfinite(scaling_factor) || scaling_factor == 0.0f || !std::isfinite(shift_factor))
    fail("scaling_factor must be finite and non-zero, shift_factor finite");
}

// ---------------------------------------------------------------------------------------------------------------
// Weights

namespace {

// Reads decoder tensors by diffusers key, checking each shape against the config, and uploads them.
class DecoderTensors {
 public:
  DecoderTensors(const SafetensorsCollection& file, Backend& backend) : file_(file), backend_(backend) {}

  Tensor get(const std::string& key, const Shape& shape) {
    Tensor t = checked_tensor(file_, key, shape, "VAE decoder, per the VAE config");
    used_.insert(key);
    return backend_.upload_weight(t);
  }
  WeightBias conv(const std::string& m, int64_t out, int64_t in, int64_t k) {
    return {get(m + ".weight", {out, in, k, k}), get(m + ".bias", {out})};
  }
  WeightBias linear(const std::string& m, int64_t out, int64_t in) {
    return {get(m + ".weight", {out, in}), get(m + ".bias", {out})};
  }
  WeightBias norm(const std::string& m, int64_t c) { return {get(m + ".weight", {c}), get(m + ".bias", {c})}; }

  VaeResnetWeights resnet(const std::string& m, int64_t in, int64_t out) {
    VaeResnetWeights r;
    r.norm1 = norm(m + ".norm1", in);
    r.conv1 = conv(m + ".conv1", out, in, 3);
    r.norm2 = norm(m + ".norm2", out);
    r.conv2 = conv(m + ".conv2", out, out, 3);
    if (in != out) r.conv_shortcut = conv(m + ".conv_shortcut", out, in, 1);
    return r;
  }

  // A decoder tensor nothing read means the config describes a different decoder than the file holds.
  void check_all_decoder_tensors_used() const {
    for (const auto& key : file_.keys())
      if (key.rfind("decoder.", 0) == 0 && !used_.count(key))
        throw Error(file_.path() + ": tensor '" + key +
                    "' has no place in the decoder the VAE config describes (layers_per_block, block_out_channels, "
                    "mid_block_add_attention)");
  }

 private:
  const SafetensorsCollection& file_;
  Backend& backend_;
  std::set<std::string> used_;
};

}  // namespace

VaeDecoderWeights load_vae_decoder_weights(const SafetensorsCollection& file, const VaeConfig& c, Backend& backend) {
  c.validate(file.path() + " (VAE config)");
  DecoderTensors t(file, backend);
  const std::vector<int64_t> widths(c.block_out_channels.rbegin(), c.block_out_channels.rend());  // widest first
  const int64_t top = widths.front(), Cl = c.latent_channels;
  VaeDecoderWeights w;
  if (c.use_post_quant_conv) w.post_quant_conv = t.conv("post_quant_conv", Cl, Cl, 1);
  w.conv_in = t.conv("decoder.conv_in", top, Cl, 3);
  w.mid_resnet_in = t.resnet("decoder.mid_block.resnets.0", top, top);
  if (c.mid_block_add_attention) {
    const std::string m = "decoder.mid_block.attentions.0.";
    w.mid_attention = {t.norm(m + "group_norm", top), t.linear(m + "to_q", top, top), t.linear(m + "to_k", top, top),
                       t.linear(m + "to_v", top, top), t.linear(m + "to_out.0", top, top)};
  }
  w.mid_resnet_out = t.resnet("decoder.mid_block.resnets.1", top, top);
  int64_t in = top;
  for (size_t i = 0; i < widths.size(); ++i) {
    const std::string m = "decoder.up_blocks." + std::to_string(i);
    VaeUpBlockWeights block;
    for (int64_t j = 0; j <= c.layers_per_block; ++j) {
      block.resnets.push_back(t.resnet(m + ".resnets." + std::to_string(j), in, widths[i]));
      in = widths[i];
    }
    if (i + 1 < widths.size()) block.upsampler = t.conv(m + ".upsamplers.0.conv", in, in, 3);
    w.up_blocks.push_back(std::move(block));
  }
  w.conv_norm_out = t.norm("decoder.conv_norm_out", in);
  w.conv_out = t.conv("decoder.conv_out", c.out_channels, in, 3);
  t.check_all_decoder_tensors_used();
  return w;
}

VaeDecoder open_vae_decoder(const std::string& path, Backend& backend) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::exists(fs::path(path) / "vae" / "config.json") ? fs::path(path) / "vae" : fs::path(path);
  if (!fs::exists(dir / "config.json"))
    throw Error(path + ": not a diffusers VAE folder (no config.json) nor a pipeline folder with vae/");
  VaeConfig config = VaeConfig::from_json_file((dir / "config.json").string());
  SafetensorsCollection file = SafetensorsCollection::open(weights_in_folder(
      dir.string(), {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"}));
  return VaeDecoder(config, load_vae_decoder_weights(file, config, backend), backend);
}

// ---------------------------------------------------------------------------------------------------------------
// Decoder

int64_t vae_largest_activation(const VaeConfig& config, int64_t height, int64_t width) {
  // Each up block's input and output at its resolution, and its upsampled output at twice the resolution.
  const std::vector<int64_t> widths(config.block_out_channels.rbegin(), config.block_out_channels.rend());
  int64_t area = height * width, channels = widths.front();
  int64_t most = std::max(config.latent_channels, channels) * area;
  for (size_t i = 0; i < widths.size(); ++i) {
    most = std::max(most, std::max(channels, widths[i]) * area);
    channels = widths[i];
    if (i + 1 == widths.size()) break;
    area *= 4;
    most = std::max(most, channels * area);
  }
  // decode_to_rgb8's uint8 image, one element a value (more than it needs); FLUX's 128 channels hold it already.
  return std::max(most, config.out_channels * area);
}

VaeDecoder::VaeDecoder(const VaeConfig& config, VaeDecoderWeights weights, Backend& backend)
    : config_(config), weights_(std::move(weights)), backend_(backend) {
  config_.validate("VAE config");
}

std::vector<Tensor*> VaeDecoderWeights::device_tensors() {
  std::vector<Tensor*> out;
  auto add = [&](WeightBias& wb) {
    out.push_back(&wb.weight);
    out.push_back(&wb.bias);
  };
  auto add_resnet = [&](VaeResnetWeights& r) {
    for (WeightBias* wb : {&r.norm1, &r.conv1, &r.norm2, &r.conv2, &r.conv_shortcut}) add(*wb);
  };
  for (WeightBias* wb : {&post_quant_conv, &conv_in, &conv_norm_out, &conv_out}) add(*wb);
  add_resnet(mid_resnet_in);
  add_resnet(mid_resnet_out);
  VaeAttentionWeights& a = mid_attention;
  for (WeightBias* wb : {&a.group_norm, &a.to_q, &a.to_k, &a.to_v, &a.to_out}) add(*wb);
  for (VaeUpBlockWeights& b : up_blocks) {
    for (VaeResnetWeights& r : b.resnets) add_resnet(r);
    add(b.upsampler);
  }
  return out;
}

void VaeDecoder::release_buffers() {
  buf_ = Buffers{};
  B_ = h_ = w_ = 0;
  backend_.release_scratch();
}

void VaeDecoder::offload() {
  release_buffers();
  offload_.offload(backend_, weights_.device_tensors(), "VAE decoder");
}

void VaeDecoder::onload() { offload_.onload(backend_, weights_.device_tensors(), "VAE decoder"); }

uint64_t VaeDecoder::weight_bytes() { return offload_.weight_bytes(weights_.device_tensors()); }

Tensor VaeDecoder::shaped(const Tensor& arena, const Shape& shape) {
  return arena.narrow(0, 0, shape_numel(shape)).view(shape);
}

void VaeDecoder::prepare(int64_t batch, int64_t height, int64_t width) {
  if (!resident()) throw Error("VAE decode: the decoder's weights are offloaded; onload() them before decoding");
  if (batch == B_ && height == h_ && width == w_) return;
  const std::vector<int64_t> widths(config_.block_out_channels.rbegin(), config_.block_out_channels.rend());
  const int64_t most = vae_largest_activation(config_, height, width);
  const DType dt = backend_.compute_dtype();
  const int64_t up = config_.upscale(), tokens = height * width;
  buf_ = Buffers{};
  for (Tensor* arena : {&buf_.cur, &buf_.a, &buf_.b}) *arena = backend_.empty(dt, {batch * most});
  if (config_.mid_block_add_attention)
    for (Tensor* t : {&buf_.q, &buf_.k, &buf_.v, &buf_.attn}) *t = backend_.empty(dt, {batch, tokens, widths[0]});
  buf_.latents_in = backend_.empty(dt, {batch, config_.latent_channels, height, width});
  buf_.image_out = backend_.empty(dt, {batch, config_.out_channels, height * up, width * up});
  B_ = batch;
  h_ = height;
  w_ = width;
}

void VaeDecoder::decode(const Tensor& latents, const Tensor& image) {
  const int64_t up = config_.upscale();
  if (latents.ndim() != 4 || latents.size(1) != config_.latent_channels)
    throw Error("VAE decode: latents " + shape_str(latents.shape()) + " must be [B, " +
                std::to_string(config_.latent_channels) + ", h, w]");
  const int64_t B = latents.size(0), h = latents.size(2), w = latents.size(3);
  const Shape expected = {B, config_.out_channels, h * up, w * up};
  if (image.shape() != expected)
    throw Error("VAE decode: image " + shape_str(image.shape()) + " must be " + shape_str(expected) + " for latents " +
                shape_str(latents.shape()));
  prepare(B, h, w);
  Backend& be = backend_;
  const VaeDecoderWeights& W = weights_;

  Tensor z = latents;
  if (config_.use_post_quant_conv) {
    z = shaped(buf_.a, latents.shape());
    be.conv2d(latents, W.post_quant_conv.weight, W.post_quant_conv.bias, 0, z);
  }
  Tensor x = shaped(buf_.cur, {B, config_.block_out_channels.back(), h, w});
  be.conv2d(z, W.conv_in.weight, W.conv_in.bias, 1, x);

  x = resnet(W.mid_resnet_in, x);
  if (config_.mid_block_add_attention) attention(W.mid_attention, x);
  x = resnet(W.mid_resnet_out, x);

  for (const VaeUpBlockWeights& block : W.up_blocks) {
    for (const VaeResnetWeights& r : block.resnets) x = resnet(r, x);
    if (!block.upsampler.weight.defined()) continue;
    const auto [s, t] = scratch_besides(x);
    const Shape big = {B, x.size(1), 2 * x.size(2), 2 * x.size(3)};
    Tensor upsampled = shaped(s, big), y = shaped(t, big);
    be.upsample_nearest2x(x, upsampled);
    be.conv2d(upsampled, block.upsampler.weight, block.upsampler.bias, 1, y);
    x = y;
  }

  Tensor normed = shaped(scratch_besides(x).first, x.shape());
  be.group_norm(x, W.conv_norm_out.weight, W.conv_norm_out.bias, int(config_.norm_num_groups), kNormEps, true, normed);
  be.conv2d(normed, W.conv_out.weight, W.conv_out.bias, 1, image);
}

std::pair<Tensor, Tensor> VaeDecoder::scratch_besides(const Tensor& x) const {
  std::vector<Tensor> free;
  for (const Tensor* arena : {&buf_.cur, &buf_.a, &buf_.b})
    if (arena->data() != x.data()) free.push_back(*arena);
  return {free.at(0), free.at(1)};
}

// ResnetBlock2D without a time embedding: x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), the skip through a 1x1 conv
// where the channel count changes. Returns the output, which is either x updated in place or a scratch arena.
Tensor VaeDecoder::resnet(const VaeResnetWeights& w, const Tensor& x) {
  Backend& be = backend_;
  const int groups = int(config_.norm_num_groups);
  const int64_t B = x.size(0), Cout = w.conv1.weight.size(0), H = x.size(2), W = x.size(3);
  const Shape out_shape = {B, Cout, H, W};
  // Each intermediate result overwrites the scratch arena whose contents are no longer read.
  const auto [s, t] = scratch_besides(x);
  Tensor h = shaped(s, x.shape()), h1 = shaped(t, out_shape), h2 = shaped(s, out_shape);
  be.group_norm(x, w.norm1.weight, w.norm1.bias, groups, kNormEps, true, h);
  be.conv2d(h, w.conv1.weight, w.conv1.bias, 1, h1);
  be.group_norm(h1, w.norm2.weight, w.norm2.bias, groups, kNormEps, true, h2);
  Tensor branch = shaped(t, out_shape);
  be.conv2d(h2, w.conv2.weight, w.conv2.bias, 1, branch);
  const Shape rows = {B, Cout, H * W};  // add() works on rows
  if (!w.conv_shortcut.weight.defined()) {
    be.add(x.view(rows), branch.view(rows));
    return x;
  }
  Tensor skip = shaped(s, out_shape);
  be.conv2d(x, w.conv_shortcut.weight, w.conv_shortcut.bias, 0, skip);
  be.add(skip.view(rows), branch.view(rows));
  return skip;
}

// diffusers' Attention on a feature map (one head as wide as the channels): GroupNorm, then each pixel is a token,
// softmax(q k^T / sqrt(C)) v, the output projection, and the residual added to x in place.
void VaeDecoder::attention(const VaeAttentionWeights& w, const Tensor& x) {
  Backend& be = backend_;
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3);
  const auto [s, t] = scratch_besides(x);
  Tensor normed = shaped(s, {B, C, N}), tokens = shaped(t, {B, N, C});
  be.group_norm(x, w.group_norm.weight, w.group_norm.bias, int(config_.norm_num_groups), kNormEps, false,
                normed.view(x.shape()));
  be.transpose_last2(normed, tokens);
  be.linear(tokens, w.to_q.weight, w.to_q.bias, buf_.q, Activation::None);
  be.linear(tokens, w.to_k.weight, w.to_k.bias, buf_.k, Activation::None);
  be.linear(tokens, w.to_v.weight, w.to_v.bias, buf_.v, Activation::None);
  // With a single head, token rows [B, N, C] already are the [B, 1, N, C] layout attention reads: no split_heads.
  const Shape heads = {B, 1, N, C};
  be.attention_ex(buf_.q.view(heads), buf_.k.view(heads), buf_.v.view(heads), 1.0f / std::sqrt(float(C)), Tensor(),
                  false, buf_.attn);
  be.linear(buf_.attn, w.to_out.weight, w.to_out.bias, tokens, Activation::None);
  be.transpose_last2(tokens, normed);
  be.add(x.view({B, C, N}), normed);
}

Tensor VaeDecoder::decode_host(const Tensor& latents) {
  if (latents.ndim() != 4)
    throw Error("VAE decode: latents " + shape_str(latents.shape()) + " must be [B, C, h, w]");
  prepare(latents.size(0), latents.size(2), latents.size(3));
  if (latents.shape() != buf_.latents_in.shape())
    throw Error("VAE decode: latents " + shape_str(latents.shape()) + " must have " +
                std::to_string(config_.latent_channels) + " channels");
  backend_.copy_from_host(latents, buf_.latents_in);
  decode(buf_.latents_in, buf_.image_out);
  return backend_.to_host_f32(buf_.image_out);
}

Tensor VaeDecoder::decode_to_rgb8(const Tensor& packed, int64_t height, int64_t width) {
  if (packed.ndim() != 3 || packed.size(2) != 4 * config_.latent_channels)
    throw Error("VAE decode: packed latents " + shape_str(packed.shape()) + " must be [B, tokens, " +
                std::to_string(4 * config_.latent_channels) + "] (4 x the VAE's latent channels)");
  prepare(packed.size(0), height, width);
  backend_.unpack_unscale_latents(packed, config_.scaling_factor, config_.shift_factor, buf_.latents_in);
  decode(buf_.latents_in, buf_.image_out);
  // The arenas are free once the image is out, and vae_largest_activation makes each hold the uint8 image too.
  const Shape rgb8_shape = {B_, buf_.image_out.size(2), buf_.image_out.size(3), config_.out_channels};
  Tensor rgb8 = Tensor::borrow(buf_.a.data(), DType::U8, rgb8_shape, buf_.a.device(), buf_.a.owner());
  backend_.image_to_u8(buf_.image_out, rgb8);
  return rgb8;
}

// ---------------------------------------------------------------------------------------------------------------
// Pipeline helpers (host tensors). The arithmetic is the CPU backend's (cpu_ops), so the host path and the CPU
// backend's decode_to_rgb8 give the same bits.

Tensor unscale_latents(const Tensor& latents, const VaeConfig& config) {
  Tensor out = latents.to_f32();
  float* p = out.ptr<float>();
  for (int64_t i = 0; i < out.numel(); ++i)
    p[i] = cpu_ops::unscale_latent(p[i], config.scaling_factor, config.shift_factor);
  return out;
}

Tensor unpack_flux_latents(const Tensor& packed, int64_t h, int64_t w) {
  if (packed.ndim() != 3 || packed.size(2) % 4 != 0 || h <= 0 || w <= 0 || h % 2 || w % 2 ||
      packed.size(1) != (h / 2) * (w / 2))
    throw Error("unpack latents: packed " + shape_str(packed.shape()) + " does not hold a " + std::to_string(h) +
                "x" + std::to_string(w) + " latent (expected [B, (h/2)(w/2), 4C] with h, w even)");
  Tensor out = Tensor::empty(DType::F32, {packed.size(0), packed.size(2) / 4, h, w});
  // x / 1 + (-0) is x exactly, signed zeros included: a plain unpacking.
  cpu_ops::unpack_unscale_latents(packed.to_f32(), 1.0f, -0.0f, out);
  return out;
}

Tensor pack_flux_latents(const Tensor& latents) {
  if (latents.ndim() != 4 || latents.size(2) % 2 || latents.size(3) % 2)
    throw Error("pack latents: " + shape_str(latents.shape()) + " must be [B, C, h, w] with h, w even");
  const Tensor src = latents.to_f32();
  const int64_t B = latents.size(0), C = latents.size(1), h = latents.size(2), w = latents.size(3);
  Tensor out = Tensor::empty(DType::F32, {B, (h / 2) * (w / 2), 4 * C});
  const float* s = src.ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) out.ptr<float>()[cpu_ops::flux_packed_index(b, c, y, x, C, h, w)] = *s++;
  return out;
}

Tensor postprocess_unit(const Tensor& image) {
  if (image.ndim() != 4) throw Error("postprocess: image " + shape_str(image.shape()) + " must be [B, C, H, W]");
  const Tensor src = image.to_f32();
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  Tensor out = Tensor::empty(DType::F32, {B, H, W, C});
  const float* s = src.ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < H * W; ++p) out.ptr<float>()[(b * H * W + p) * C + c] = cpu_ops::unit_pixel(*s++);
  return out;
}

Tensor postprocess_u8(const Tensor& image) {
  if (image.ndim() != 4) throw Error("postprocess: image " + shape_str(image.shape()) + " must be [B, C, H, W]");
  Tensor out = Tensor::empty(DType::U8, {image.size(0), image.size(2), image.size(3), image.size(1)});
  cpu_ops::image_to_u8(image.to_f32(), out);
  return out;
}

}  // namespace fluxswap
