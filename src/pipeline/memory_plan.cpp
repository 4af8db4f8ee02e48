#include "pipeline/memory_plan.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <optional>

#include "core/error.h"
#include "model/flux_weight_map.h"

namespace fluxswap {

std::string_view weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::BF16: return "bf16";
    case WeightFormat::FP8: return "fp8";
    case WeightFormat::NF4: return "nf4";
  }
  return "?";
}

std::string_view placement_name(Placement p) {
  switch (p) {
    case Placement::Resident: return "resident";
    case Placement::OnDemand: return "on demand";
    case Placement::Streamed: return "streamed";
  }
  return "?";
}

uint64_t TransformerSpec::weight_bytes() const {
  return std::accumulate(block_bytes.begin(), block_bytes.end(), shared_bytes);
}

const ComponentPlan& MemoryPlan::component(const std::string& name) const {
  for (const auto& c : components)
    if (c.name == name) return c;
  throw Error("memory plan: no component '" + name + "'");
}

std::string format_gb(uint64_t bytes) {
  const double tenths = std::round(double(bytes) / 1e8);
  char s[48];
  if (std::fmod(tenths, 10.0) == 0.0)
    std::snprintf(s, sizeof s, "%.0f GB", tenths / 10);
  else
    std::snprintf(s, sizeof s, "%.1f GB", tenths / 10);
  return s;
}

std::string MemoryPlan::to_string() const {
  std::string out;
  for (Placement p : {Placement::Resident, Placement::Streamed, Placement::OnDemand}) {
    std::string list;
    for (const auto& c : components) {
      if (c.placement != p) continue;
      list += (list.empty() ? "" : ", ") + c.name + " (" + std::string(weight_format_name(c.format)) + ", " +
              format_gb(c.weight_bytes);
      if (p == Placement::Streamed)
        list += "; " + std::to_string(streaming.resident_blocks) + " of " +
                std::to_string(streaming.block_resident.size()) + " blocks resident, prefetch " +
                std::to_string(streaming.prefetch_depth) + ", " + format_gb(streaming.bytes_per_step) +
                " per step from pinned host memory";
      list += ")";
    }
    if (!list.empty()) out += std::string(placement_name(p)) + ": " + list + "; ";
  }
  return out + "peak " + format_gb(peak_bytes) + " of " + format_gb(budget_bytes);
}

// ---- planning ----

namespace {

struct TransformerChoice {
  Placement placement = Placement::Resident;
  StreamingPlan streaming;
};

// Which blocks stay resident when `count` of them do: the largest, so the fewest bytes move per step. Among blocks
// of the size where resident ones run out (FLUX: the single blocks), the streamed ones are spread evenly: each
// upload then has the resident blocks before it to hide behind instead of all of them queueing at the end.
std::vector<bool> largest_blocks(const std::vector<uint64_t>& sizes, int count) {
  std::vector<size_t> order(sizes.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return sizes[a] > sizes[b]; });
  std::vector<bool> resident(sizes.size(), false);
  for (int i = 0; i < count; ++i) resident[order[i]] = true;
  if (count == 0 || count == int(sizes.size())) return resident;
  const uint64_t boundary = sizes[order[size_t(count) - 1]];
  std::vector<size_t> tied;  // execution order
  for (size_t b = 0; b < sizes.size(); ++b)
    if (sizes[b] == boundary) tied.push_back(b);
  size_t streamed = 0;
  for (size_t b : tied) streamed += !resident[b];
  if (streamed == 0) return resident;
  for (size_t b : tied) resident[b] = true;
  for (size_t i = 0; i < streamed; ++i) resident[tied[(2 * i + 1) * tied.size() / (2 * streamed)]] = false;
  return resident;
}

// The other way to keep `count` blocks: the streamed ones evenly spaced over the whole step whatever their sizes, so
// that uploads can run from the first block to the last. Moves more bytes (larger blocks stream too) but may hide
// them where streaming only the smaller blocks puts every upload at the end of the step.
std::vector<bool> spread_blocks(size_t n, int count) {
  std::vector<bool> resident(n, true);
  const size_t streamed = n - size_t(count);
  for (size_t i = 0; i < streamed; ++i) resident[(2 * i + 1) * n / (2 * streamed)] = false;
  return resident;
}

// A step's length in units of one block's compute, for comparing streaming patterns: every block computes in one unit
// (FLUX's double and single blocks have the same FLOPs per token) and the mean block uploads in `mean_upload` units.
// As BlockStreamer issues them: the first `depth` uploads at the start, then the one `depth` ahead when a streamed
// block is about to compute (its buffer is free once the blocks before have run); the copy engine takes them in
// order; a streamed block waits for its upload.
double simulated_step(const std::vector<uint64_t>& sizes, const std::vector<bool>& resident, int depth,
                      double mean_upload) {
  double mean = 0;
  for (uint64_t b : sizes) mean += double(b);
  mean /= double(std::max<size_t>(1, sizes.size())) * mean_upload;
  std::vector<size_t> streamed;
  for (size_t b = 0; b < sizes.size(); ++b)
    if (!resident[b]) streamed.push_back(b);
  std::vector<double> done(streamed.size(), 0);
  double copy_free = 0, t = 0;
  auto upload = [&](size_t k, double when) {
    copy_free = std::max(copy_free, when) + double(sizes[streamed[k]]) / mean;
    done[k] = copy_free;
  };
  for (size_t k = 0; k < streamed.size() && k < size_t(depth); ++k) upload(k, 0);
  for (size_t b = 0, j = 0; b < sizes.size(); ++b) {
    if (!resident[b]) {
      if (j + size_t(depth) < streamed.size()) upload(j + size_t(depth), t);
      t = std::max(t, done[j++]);
    }
    t += 1;
  }
  return t;
}

// How long the mean FLUX block takes to upload, in block computes, at 1024x1024: a bf16 block (424 MB) crosses PCIe
// 4.0 (~25 GB/s) in about the time an RTX 3090/4090 computes it (~15 ms); an FP8 block is half the bytes but computes
// about 2.5x faster on FP8 tensor cores, so its upload takes about two computes (measured on the H100 over PCIe 5.0:
// 3.9 ms against 1.7 ms).
double mean_block_upload_units(WeightFormat format) { return format == WeightFormat::FP8 ? 2.0 : 1.0; }

enum class BlockChoice { Largest, Spread };

StreamingPlan streaming_plan(const TransformerSpec& t, int resident_count, int depth,
                             BlockChoice choice = BlockChoice::Largest) {
  StreamingPlan s;
  s.block_resident = choice == BlockChoice::Largest ? largest_blocks(t.block_bytes, resident_count)
                                                    : spread_blocks(t.block_bytes.size(), resident_count);
  s.resident_blocks = resident_count;
  s.prefetch_depth = depth;
  uint64_t largest_streamed = 0;
  for (size_t i = 0; i < t.block_bytes.size(); ++i) {
    if (s.block_resident[i]) continue;
    largest_streamed = std::max(largest_streamed, t.block_bytes[i]);
    s.bytes_per_step += t.block_bytes[i];
  }
  s.buffer_bytes = uint64_t(depth + 1) * largest_streamed;
  return s;
}

MemoryPlan evaluate(const MemoryPlanRequest& r, const TransformerChoice& tc, Placement t5, Placement clip,
                    Placement vae) {
  MemoryPlan p;
  p.budget_bytes = r.budget_bytes;
  p.reserve_bytes = r.reserve_bytes;
  const TransformerSpec& t = r.transformer;
  p.components.push_back({"transformer", t.format, t.weight_bytes(), tc.placement});
  p.components.push_back({r.t5.name, r.t5.format, r.t5.weight_bytes, t5});
  p.components.push_back({r.clip.name, r.clip.format, r.clip.weight_bytes, clip});
  p.components.push_back({r.vae.name, r.vae.format, r.vae.weight_bytes, vae});
  p.streaming = tc.streaming;

  // Weights that never leave: resident components, and a streamed transformer's shared part and resident blocks.
  uint64_t transformer_resident = 0, transformer_transient = 0;
  if (tc.placement == Placement::Resident) transformer_resident = t.weight_bytes();
  if (tc.placement == Placement::OnDemand) transformer_transient = t.weight_bytes();
  if (tc.placement == Placement::Streamed) {
    transformer_resident = t.weight_bytes() - tc.streaming.bytes_per_step;
    transformer_transient = tc.streaming.buffer_bytes;
  }
  p.resident_bytes = transformer_resident;
  for (const auto* c : {&r.t5, &r.clip, &r.vae}) {
    const Placement pl = c == &r.t5 ? t5 : c == &r.clip ? clip : vae;
    if (pl == Placement::Resident) p.resident_bytes += c->weight_bytes;
  }
  auto transient = [](const ComponentSpec& c, Placement pl) {
    return (pl == Placement::OnDemand ? c.weight_bytes : 0) + c.activation_bytes;
  };
  const uint64_t base = p.resident_bytes + r.reserve_bytes;
  const uint64_t kept = r.transformer_buffers_kept ? t.activation_bytes : 0;
  p.encode_peak = base + kept + std::max(transient(r.t5, t5), transient(r.clip, clip));
  p.denoise_peak = base + transformer_transient + t.activation_bytes;
  p.decode_peak = base + kept + transient(r.vae, vae);
  p.peak_bytes = std::max({p.encode_peak, p.denoise_peak, p.decode_peak});

  if (tc.placement == Placement::OnDemand) p.upload_bytes_per_image += t.weight_bytes();
  if (tc.placement == Placement::Streamed) p.upload_bytes_per_image += tc.streaming.bytes_per_step * uint64_t(r.steps);
  p.pinned_host_bytes = tc.placement == Placement::Streamed ? tc.streaming.bytes_per_step
                        : tc.placement == Placement::OnDemand ? t.weight_bytes()
                                                               : 0;
  for (const auto* c : {&r.t5, &r.clip, &r.vae}) {
    const Placement pl = c == &r.t5 ? t5 : c == &r.clip ? clip : vae;
    if (pl == Placement::OnDemand) {
      p.upload_bytes_per_image += c->weight_bytes;
      p.pinned_host_bytes += c->weight_bytes;
    }
  }
  return p;
}

bool better(const MemoryPlan& a, const MemoryPlan& b) {
  if (a.upload_bytes_per_image != b.upload_bytes_per_image) return a.upload_bytes_per_image < b.upload_bytes_per_image;
  return a.peak_bytes < b.peak_bytes;
}

}  // namespace

MemoryPlan plan_memory(const MemoryPlanRequest& r) {
  if (r.budget_bytes == 0) throw Error("memory plan: the budget is 0 bytes");
  if (r.steps < 1) throw Error("memory plan: steps must be at least 1, got " + std::to_string(r.steps));
  const int blocks = int(r.transformer.block_bytes.size());

  bool found = false;
  MemoryPlan best, frugal;
  bool have_frugal = false;
  auto consider = [&](const MemoryPlan& p) {
    if (!have_frugal || p.peak_bytes < frugal.peak_bytes) {
      frugal = p;
      have_frugal = true;
    }
    if (p.peak_bytes <= r.budget_bytes && (!found || better(p, best))) {
      best = p;
      found = true;
    }
  };

  const Placement both[] = {Placement::Resident, Placement::OnDemand};
  for (Placement t5 : both)
    for (Placement clip : both)
      for (Placement vae : both) {
        consider(evaluate(r, {Placement::Resident, {}}, t5, clip, vae));
        consider(evaluate(r, {Placement::OnDemand, {}}, t5, clip, vae));
        if (blocks == 0) continue;
        // Streaming: the most resident blocks that fit at the preferred depth, else at depth 1 (see memory_plan.h),
        // the largest kept or the streamed ones spread out, whichever the step model says runs faster.
        for (int depth = std::clamp(r.max_prefetch_depth, 1, 2); depth >= 1; --depth) {
          std::optional<MemoryPlan> chosen;
          double chosen_step = 0;
          for (BlockChoice choice : {BlockChoice::Largest, BlockChoice::Spread}) {
            for (int k = blocks - 1; k >= 0; --k) {
              const MemoryPlan p =
                  evaluate(r, {Placement::Streamed, streaming_plan(r.transformer, k, depth, choice)}, t5, clip, vae);
              if (k == 0) consider(p);  // the most frugal candidates, for the error message
              if (p.peak_bytes > r.budget_bytes) continue;
              const double step = simulated_step(r.transformer.block_bytes, p.streaming.block_resident, depth,
                                                 mean_block_upload_units(r.transformer.format));
              if (!chosen || step < chosen_step) chosen = p, chosen_step = step;
              break;
            }
          }
          if (chosen) {
            consider(*chosen);
            break;
          }
        }
      }

  if (!found)
    throw Error("memory plan: a budget of " + format_gb(r.budget_bytes) + " is too small: the most frugal plan (" +
                frugal.to_string() + ") needs " + format_gb(frugal.peak_bytes) + " including a reserve of " +
                format_gb(r.reserve_bytes));
  return best;
}

uint64_t smallest_budget_with_resident_transformer(const MemoryPlanRequest& request) {
  // Each placement of the others with the transformer resident has a peak; the smallest of those at which the
  // planner, weighing uploads, also chooses a resident transformer is the answer.
  std::vector<uint64_t> peaks;
  const Placement both[] = {Placement::Resident, Placement::OnDemand};
  for (Placement t5 : both)
    for (Placement clip : both)
      for (Placement vae : both)
        peaks.push_back(evaluate(request, {Placement::Resident, {}}, t5, clip, vae).peak_bytes);
  std::sort(peaks.begin(), peaks.end());
  MemoryPlanRequest r = request;
  for (uint64_t peak : peaks) {
    r.budget_bytes = peak;
    if (plan_memory(r).component("transformer").placement == Placement::Resident) return peak;
  }
  return peaks.back();  // everything resident: no plan does better than that
}

uint64_t parse_memory_budget(const std::string& text) {
  auto fail = [&]() -> uint64_t {
    throw Error("memory budget '" + text +
                "': expected a number with a unit, e.g. 24G, 16GB, 16000M, 24GiB (K/M/G/T and KB/MB/GB/TB are "
                "powers of 10, KiB/MiB/GiB/TiB powers of 2)");
  };
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  const std::string number = text.substr(0, i);
  if (number.empty() || std::count(number.begin(), number.end(), '.') > 1 || number == ".") return fail();
  while (i < text.size() && text[i] == ' ') ++i;
  std::string unit;
  for (; i < text.size(); ++i) unit += char(std::tolower(static_cast<unsigned char>(text[i])));
  static const std::pair<const char*, double> units[] = {
      {"k", 1e3},  {"kb", 1e3},  {"kib", 1024.0},           {"m", 1e6},  {"mb", 1e6},  {"mib", 1048576.0},
      {"g", 1e9},  {"gb", 1e9},  {"gib", 1073741824.0},     {"t", 1e12}, {"tb", 1e12}, {"tib", 1099511627776.0},
  };
  double scale = 0;
  for (const auto& [name, s] : units)
    if (unit == name) scale = s;
  if (scale == 0) return fail();
  const double bytes = std::stod(number) * scale;
  if (!(bytes >= 1.0) || bytes > 1.8e19) return fail();
  return uint64_t(std::llround(bytes));
}

// ---- FLUX.1 sizes ----

uint64_t weight_storage_bytes(WeightFormat format, int64_t numel, int64_t rows) {
  switch (format) {
    case WeightFormat::BF16: return uint64_t(numel) * 2;
    case WeightFormat::FP8: return uint64_t(numel) + uint64_t(rows) * 4;
    case WeightFormat::NF4: {
      const uint64_t blocks = (uint64_t(numel) + 63) / 64;
      return (uint64_t(numel) + 1) / 2 + blocks * 4 + 16 * 4;  // codes, float32 absmax, the 16-entry map
    }
  }
  return 0;
}

namespace {
constexpr uint64_t kBf16 = 2;
}  // namespace

TransformerSpec flux_transformer_spec(const FluxConfig& c, WeightFormat format, const FluxWorkload& w) {
  TransformerSpec t;
  t.format = format;
  t.block_bytes.assign(size_t(c.num_layers + c.num_single_layers), 0);
  // Block linears take the format; biases, norm scales and the embedders / final layer (about 0.1B parameters,
  // read once per step) stay bf16. A runtime LoRA slot adds rank x (in + out) bf16 values per block linear and
  // stays on the device with the shared part.
  uint64_t lora = 0;
  for (const auto& spec : flux_weight_specs(c, FluxNaming::BFL)) {
    const int64_t n = shape_numel(spec.shape);
    size_t block = 0;
    const bool in_block = flux_block_index(spec.name, c, &block);
    const bool matrix = spec.shape.size() == 2;
    const uint64_t bytes = in_block && matrix ? weight_storage_bytes(format, n, spec.shape[0]) : uint64_t(n) * kBf16;
    (in_block ? t.block_bytes[block] : t.shared_bytes) += bytes;
    if (in_block && matrix) lora += uint64_t(w.lora_rank) * uint64_t(spec.shape[0] + spec.shape[1]) * kBf16;
  }
  t.shared_bytes += lora;

  // One step's buffers (flux_transformer.h): per token the residual stream, normed input and branch (D each),
  // proj_in (3D + M), q, k (2D; attention reads v from proj_in) and attn_mlp (D + M), plus the LoRA scratch (rank);
  // the RoPE table (float32 cos/sin per token and half head dim); the pipeline's inputs and latents (text embeddings
  // [B, T, 4096], noisy latents and velocity [B, Ni, 64]), and the output projections' gated factors (float32 scale
  // and bf16 bias per projection: 4 a double block, 1 a single block). cuDNN's flash attention keeps no S x S scores.
  const int64_t D = c.inner_dim(), M = c.mlp_dim();
  const int64_t img = (w.height / 16) * (w.width / 16), S = img + w.text_tokens;
  const uint64_t per_token = uint64_t(9 * D + 2 * M + w.lora_rank) * kBf16;
  const uint64_t projections = uint64_t(4 * c.num_layers + c.num_single_layers);
  t.activation_bytes = uint64_t(w.batch * S) * per_token + uint64_t(S * c.attention_head_dim) * 4 +
                       uint64_t(w.batch) * (uint64_t(w.text_tokens * c.joint_attention_dim) +
                                            uint64_t(2 * img * c.in_channels)) * kBf16 +
                       projections * uint64_t(w.batch * D) * (4 + kBf16);
  return t;
}

ComponentSpec t5_encoder_spec(const T5EncoderConfig& c, WeightFormat format, const FluxWorkload& w) {
  ComponentSpec s{"t5", format, 0, 0};
  const int64_t D = c.d_model, I = c.inner_dim(), F = c.d_ff;
  // The embedding stays bf16 (bitsandbytes quantises nn.Linear only); the relative position table lives on the
  // host (t5_encoder.h). Per layer: two RMSNorm scales and the fused qkv, o, fused wi (gate | linear) and wo.
  s.weight_bytes = uint64_t(c.vocab_size * D + D) * kBf16;
  const int64_t linears[4][2] = {{3 * I, D}, {D, I}, {2 * F, D}, {D, F}};
  for (int64_t l = 0; l < c.num_layers; ++l) {
    s.weight_bytes += uint64_t(2 * D) * kBf16;
    for (const auto& [rows, cols] : linears) s.weight_bytes += weight_storage_bytes(format, rows * cols, rows);
  }
  // T5Encoder's buffers per token: hidden, normed, branch (D), qkv (3I), q, k, v (3I), attn (I), ff (2F); the
  // float32 position bias [H, S, S]; NF4 linears are dequantised into a bf16 scratch as large as the largest (wi).
  const int64_t S = w.text_tokens;
  s.activation_bytes = uint64_t(w.batch * S * (3 * D + 7 * I + 2 * F)) * kBf16 + uint64_t(c.num_heads * S * S) * 4;
  if (format == WeightFormat::NF4) s.activation_bytes += uint64_t(2 * F * D) * kBf16;
  return s;
}

ComponentSpec clip_text_spec(const ClipTextConfig& c, const FluxWorkload& w) {
  ComponentSpec s{"clip", WeightFormat::BF16, 0, 0};
  const int64_t C = c.hidden_size, I = c.intermediate_size;
  // Token and position embeddings; per layer two LayerNorms, fused qkv, out projection, fc1, fc2 (all biased);
  // the final LayerNorm.
  const int64_t per_layer = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (I * C + I) + (C * I + C);
  s.weight_bytes = uint64_t(c.vocab_size * C + c.max_position_embeddings * C + c.num_hidden_layers * per_layer +
                            2 * C) * kBf16;
  // ClipTextModel's buffers per token: hidden, normed, attn, branch (C), qkv and q, k, v (3C each), mlp (I).
  s.activation_bytes = uint64_t(w.batch * c.max_position_embeddings * (10 * C + I)) * kBf16;
  return s;
}

ComponentSpec vae_decoder_spec(const VaeConfig& c, const FluxWorkload& w) {
  ComponentSpec s{"vae", WeightFormat::BF16, 0, 0};
  auto conv = [](int64_t out, int64_t in, int64_t k) { return out * in * k * k + out; };
  auto resnet = [&](int64_t in, int64_t out) {
    return 2 * in + conv(out, in, 3) + 2 * out + conv(out, out, 3) + (in != out ? conv(out, in, 1) : 0);
  };
  // The structure load_vae_decoder_weights reads: widest block first.
  const std::vector<int64_t> widths(c.block_out_channels.rbegin(), c.block_out_channels.rend());
  const int64_t top = widths.front(), L = c.latent_channels;
  int64_t params = (c.use_post_quant_conv ? conv(L, L, 1) : 0) + conv(top, L, 3) + 2 * resnet(top, top);
  if (c.mid_block_add_attention) params += 2 * top + 4 * (top * top + top);
  int64_t in = top;
  for (size_t i = 0; i < widths.size(); ++i) {
    for (int64_t j = 0; j <= c.layers_per_block; ++j) {
      params += resnet(in, widths[i]);
      in = widths[i];
    }
    if (i + 1 < widths.size()) params += conv(in, in, 3);
  }
  params += 2 * in + conv(c.out_channels, in, 3);
  s.weight_bytes = uint64_t(params) * kBf16;

  // VaeDecoder::prepare: three arenas as large as the largest activation (an up block's input or output at its
  // resolution, or its upsampled output), the mid-block attention's q, k, v, out token rows, and the latents and
  // image copies.
  const int64_t up = c.upscale(), h = w.height / up, wd = w.width / up;
  const int64_t most = vae_largest_activation(c, h, wd);
  const int64_t tokens = h * wd;
  s.activation_bytes = uint64_t(w.batch) *
                       uint64_t(3 * most + (c.mid_block_add_attention ? 4 * tokens * top : 0) + L * tokens +
                                c.out_channels * w.height * w.width) *
                       kBf16;
  return s;
}

MemoryPlanRequest pipeline_plan_request(uint64_t budget_bytes, const FluxConfig& transformer,
                                        WeightFormat transformer_format, const T5EncoderConfig& t5,
                                        WeightFormat t5_format, const ClipTextConfig& clip, const VaeConfig& vae,
                                        const FluxWorkload& work) {
  MemoryPlanRequest r;
  r.budget_bytes = budget_bytes;
  r.reserve_bytes = kDefaultReserveBytes;
  r.transformer = flux_transformer_spec(transformer, transformer_format, work);
  r.t5 = t5_encoder_spec(t5, t5_format, work);
  r.clip = clip_text_spec(clip, work);
  r.vae = vae_decoder_spec(vae, work);
  return r;
}

MemoryPlanRequest flux1_plan_request(uint64_t budget_bytes, WeightFormat transformer, WeightFormat t5,
                                     const FluxWorkload& work, const FluxConfig& config) {
  return pipeline_plan_request(budget_bytes, config, transformer, T5EncoderConfig::flux1(), t5,
                               ClipTextConfig::flux1(), VaeConfig::flux1(), work);
}

}  // namespace fluxswap
