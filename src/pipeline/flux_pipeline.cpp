#include "pipeline/flux_pipeline.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "core/counter_rng.h"
#include "core/error.h"
#include "model/flux_checkpoint.h"
#include "text/tokenizer_factory.h"

namespace fluxswap {

namespace fsys = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

Tensor host_scalars(int64_t n, float value) {
  Tensor t = Tensor::empty(DType::F32, {n});
  for (int64_t i = 0; i < n; ++i) t.ptr<float>()[i] = value;
  return t;
}
}  // namespace

Tensor flux_initial_noise(uint64_t seed, int64_t batch, int64_t channels, int64_t latent_h, int64_t latent_w) {
  Tensor noise = Tensor::empty(DType::F32, {batch, channels, latent_h, latent_w});
  for (int64_t i = 0; i < noise.numel(); ++i) noise.ptr<float>()[i] = normal_from_counter(seed, uint64_t(i));
  return pack_flux_latents(noise);
}

std::unique_ptr<FluxPipeline> FluxPipeline::from_pretrained(const std::string& user_path, Backend& backend,
                                                           const PipelineLoadOptions& options) {
  const MemoryBudget& budget = options.budget;
  const fsys::path dir = resolve_hf_cache_path(user_path);
  if (!fsys::exists(dir / "model_index.json"))
    throw Error(user_path + ": not a diffusers pipeline folder (no model_index.json)");
  std::unique_ptr<FluxPipeline> p(new FluxPipeline(backend));
  p->path_ = dir.string();
  FluxCheckpoint ck = open_flux_checkpoint((dir / "transformer").string());
  // Under a budget, which components leave the device as soon as they are loaded: planned from the configs, before
  // anything is allocated, so that loading stays within the budget too and an impossible budget fails at once.
  std::optional<MemoryPlan> loading;
  if (budget.bytes) {
    backend.set_memory_limit(budget.bytes);
    MemoryPlanRequest r = pipeline_plan_request(
        budget.bytes, ck.config, ck.fp8_linears ? WeightFormat::FP8 : WeightFormat::BF16,
        T5EncoderConfig::from_json_file((dir / "text_encoder_2" / "config.json").string()),
        options.t5_nf4 ? WeightFormat::NF4 : WeightFormat::BF16,
        ClipTextConfig::from_json_file((dir / "text_encoder" / "config.json").string()),
        VaeConfig::from_json_file((dir / "vae" / "config.json").string()), budget.workload);
    r.reserve_bytes = budget.reserve_bytes;
    loading = plan_memory(r);
  }
  auto leaves = [&](const char* name) {
    return loading && loading->component(name).placement == Placement::OnDemand;
  };
  p->clip_tokenizer_ = load_tokenizer((dir / "tokenizer").string());
  p->t5_tokenizer_ = load_tokenizer((dir / "tokenizer_2").string());
  p->clip_ = std::make_unique<ClipTextModel>(ClipTextModel::from_folder((dir / "text_encoder").string(), backend));
  if (leaves("clip")) p->clip_->offload();
  p->t5_ = std::make_unique<T5Encoder>(
      T5Encoder::from_folder((dir / "text_encoder_2").string(), backend, options.t5_nf4));
  if (leaves("t5")) p->t5_->offload();
  // A transformer the budget cannot hold whole loads its streamed blocks into host memory.
  std::vector<bool> on_host;
  const bool streamed = loading && loading->component("transformer").placement == Placement::Streamed;
  if (streamed)
    for (bool resident : loading->streaming.block_resident) on_host.push_back(!resident);
  p->transformer_ =
      std::make_unique<FluxTransformer>(ck.config, load_flux_weights(ck, backend, nullptr, on_host), backend);
  if (streamed) p->transformer_->stream_blocks(loading->streaming.block_resident, loading->streaming.prefetch_depth);
  p->vae_ = std::make_unique<VaeDecoder>(open_vae_decoder((dir / "vae").string(), backend));
  if (leaves("vae")) p->vae_->offload();
  p->scheduler_config_ = FlowMatchSchedulerConfig::from_json_file((dir / "scheduler" / "scheduler_config.json").string());
  p->check_components_fit(user_path);
  if (budget.bytes) p->set_memory_budget(budget);
  return p;
}

std::unique_ptr<FluxPipeline> FluxPipeline::from_components(
    Backend& backend, std::unique_ptr<TextTokenizer> clip_tokenizer, std::unique_ptr<TextTokenizer> t5_tokenizer,
    std::unique_ptr<ClipTextModel> clip, std::unique_ptr<T5Encoder> t5, std::unique_ptr<FluxTransformer> transformer,
    std::unique_ptr<VaeDecoder> vae, FlowMatchSchedulerConfig scheduler, const std::string& label) {
  std::unique_ptr<FluxPipeline> p(new FluxPipeline(backend));
  p->path_ = label;
  p->clip_tokenizer_ = std::move(clip_tokenizer);
  p->t5_tokenizer_ = std::move(t5_tokenizer);
  p->clip_ = std::move(clip);
  p->t5_ = std::move(t5);
  p->transformer_ = std::move(transformer);
  p->vae_ = std::move(vae);
  p->scheduler_config_ = scheduler;
  p->check_components_fit(label);
  return p;
}

void FluxPipeline::check_components_fit(const std::string& label) const {
  const auto& tc = transformer_->config();
  if (t5_->config().d_model != tc.joint_attention_dim || clip_->config().hidden_size != tc.pooled_projection_dim)
    throw Error(label + ": the text encoders (T5 width " + std::to_string(t5_->config().d_model) + ", CLIP width " +
                std::to_string(clip_->config().hidden_size) + ") do not fit the transformer (" +
                std::to_string(tc.joint_attention_dim) + ", " + std::to_string(tc.pooled_projection_dim) + ")");
  if (vae_->config().latent_channels * 4 != tc.in_channels)
    throw Error(label + ": the VAE has " + std::to_string(vae_->config().latent_channels) +
                " latent channels; the transformer expects " + std::to_string(tc.in_channels / 4));
}

int FluxPipeline::vae_scale_factor() const { return 1 << (int(vae_->config().block_out_channels.size()) - 1); }

int FluxPipeline::default_size() const { return vae_scale_factor() >= 8 ? 1024 : 64 * vae_scale_factor(); }

int FluxPipeline::default_max_sequence_length() const { return is_guidance_distilled() ? 512 : 256; }

FluxWorkload FluxPipeline::workload_for(const GenerateParams& params, int64_t lora_slot_rank) const {
  FluxWorkload w;
  w.width = params.width > 0 ? params.width : default_size();
  w.height = params.height > 0 ? params.height : default_size();
  w.batch = std::max<int64_t>(1, int64_t(params.prompts.size()));
  w.text_tokens = params.max_sequence_length > 0 ? params.max_sequence_length : default_max_sequence_length();
  w.lora_rank = lora_slot_rank;
  return w;
}

// ---- memory budget ----

const MemoryPlan* FluxPipeline::set_memory_budget(const MemoryBudget& budget) {
  // A transformer uploaded per image is between images now: back on the device (the room the current plan kept for
  // it is free), so that the new plan measures it.
  transformer_->onload();
  if (budget.bytes == 0) {
    plan_.reset();
    backend_.set_memory_limit(0);
    transformer_->stream_blocks({}, 0);
    clip_->onload();
    t5_->onload();
    vae_->onload();
    return nullptr;
  }
  const MemoryPlanRequest request =
      measured_plan_request(budget, *transformer_, *t5_, *clip_, *vae_, backend_.memory_in_use());
  plan_ = plan_memory(request);
  backend_.set_memory_limit(budget.bytes);
  // Leaving first, so that what comes back finds the room the plan counts on.
  const bool streamed = plan_->component("transformer").placement == Placement::Streamed;
  transformer_->stream_blocks(streamed ? plan_->streaming.block_resident : std::vector<bool>{},
                              plan_->streaming.prefetch_depth);
  if (on_demand("clip")) clip_->offload();
  if (on_demand("t5")) t5_->offload();
  if (on_demand("vae")) vae_->offload();
  if (!on_demand("clip")) clip_->onload();
  if (!on_demand("t5")) t5_->onload();
  if (!on_demand("vae")) vae_->onload();
  return &*plan_;
}

bool FluxPipeline::on_demand(const char* component) const {
  return plan_ && plan_->component(component).placement == Placement::OnDemand;
}

template <class Component>
void FluxPipeline::enter_phase(Component& c, const char* name) {
  if (on_demand(name)) c.onload();
}

template <class Component>
void FluxPipeline::leave_phase(Component& c, const char* name) {
  if (!plan_) return;
  if (on_demand(name)) {
    c.offload();
    return;
  }
  backend_.synchronize();  // queued work may still use the buffers
  c.release_buffers();
}

void FluxPipeline::restore_placements() noexcept {
  try {
    backend_.synchronize();
    if (on_demand("transformer")) transformer_->offload();
    if (on_demand("clip")) clip_->offload();
    if (on_demand("t5")) t5_->offload();
    if (on_demand("vae")) vae_->offload();
  } catch (...) {
    // The generation's own error is the one to report; a failure here surfaces at the next use.
  }
}

PhaseMemory FluxPipeline::measure_memory() const {
  return {uint64_t(backend_.memory_in_use()), uint64_t(backend_.device_memory_used())};
}

EncodedPrompts FluxPipeline::encode_prompts(const std::vector<std::string>& prompts, int max_sequence_length) {
  const int64_t B = int64_t(prompts.size());
  const int64_t clip_len = clip_->config().max_position_embeddings;
  Tensor clip_ids = Tensor::empty(DType::I32, {B, clip_len});
  Tensor t5_ids = Tensor::empty(DType::I32, {B, max_sequence_length});
  std::vector<int64_t> eos(size_t(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    TokenEncoding c = clip_tokenizer_->encode(prompts[size_t(b)], size_t(clip_len));
    TokenEncoding t = t5_tokenizer_->encode(prompts[size_t(b)], size_t(max_sequence_length));
    std::copy(c.ids.begin(), c.ids.end(), clip_ids.ptr<int32_t>() + b * clip_len);
    std::copy(t.ids.begin(), t.ids.end(), t5_ids.ptr<int32_t>() + b * max_sequence_length);
    eos[size_t(b)] = int64_t(c.eos_index);
  }
  const DType dt = backend_.compute_dtype();
  Tensor clip_ids_dev = backend_.empty(DType::I32, clip_ids.shape()), t5_ids_dev = backend_.empty(DType::I32, t5_ids.shape());
  backend_.copy_from_host(clip_ids, clip_ids_dev);
  backend_.copy_from_host(t5_ids, t5_ids_dev);
  EncodedPrompts e;
  e.pooled = backend_.empty(dt, {B, clip_->config().hidden_size});
  e.prompt_embeds = backend_.empty(dt, {B, int64_t(max_sequence_length), t5_->config().d_model});
  // One encoder on the device at a time under a plan, each gone before the steps allocate their buffers.
  try {
    enter_phase(*clip_, "clip");
    clip_->encode(clip_ids_dev, eos, e.pooled);
    leave_phase(*clip_, "clip");
    enter_phase(*t5_, "t5");
    t5_->encode(t5_ids_dev, e.prompt_embeds);
    backend_.synchronize();
    encode_memory_ = measure_memory();
    leave_phase(*t5_, "t5");
  } catch (...) {
    restore_placements();
    throw;
  }
  return e;
}

GenerateResult FluxPipeline::generate(const GenerateParams& params) {
  const bool dev = is_guidance_distilled();
  GenerateParams p = params;
  if (p.width == 0) p.width = default_size();
  if (p.height == 0) p.height = default_size();
  GenerateResult r;
  r.width = p.width;
  r.height = p.height;
  r.steps = p.steps > 0 ? p.steps : (dev ? 28 : 4);
  r.max_sequence_length = p.max_sequence_length > 0 ? p.max_sequence_length : default_max_sequence_length();
  if (p.prompts.empty()) throw Error("generate: no prompt");
  const int f = vae_scale_factor() * 2;  // pixels per packed latent token, per side
  if (p.width < f || p.height < f || p.width % 16 || p.height % 16)
    throw Error("width and height must be positive multiples of 16 (got " + std::to_string(p.width) + "x" +
                std::to_string(p.height) + ")");
  const int64_t B = int64_t(p.prompts.size());
  const int64_t lat_h = 2 * (p.height / f), lat_w = 2 * (p.width / f), tokens = (lat_h / 2) * (lat_w / 2);
  const FluxConfig& c = transformer_->config();

  auto t0 = Clock::now();
  // A transformer uploaded per image leaves before the text encoders come (offload waits for queued work).
  if (on_demand("transformer")) transformer_->offload();
  EncodedPrompts text = encode_prompts(p.prompts, r.max_sequence_length);
  backend_.synchronize();
  r.encode_s = seconds_since(t0);
  r.encode_memory = encode_memory_;

  // Initial noise, RoPE positions, per-sample conditioning.
  Tensor noise = p.latents.defined() ? p.latents.to_f32()
                                     : flux_initial_noise(p.seed, B, c.in_channels / 4, lat_h, lat_w);
  if (noise.shape() != Shape{B, tokens, c.in_channels})
    throw Error("--latents has shape " + shape_str(noise.shape()) + ", expected " +
                shape_str({B, tokens, c.in_channels}) + " for " + std::to_string(p.width) + "x" +
                std::to_string(p.height));
  Tensor img_ids = Tensor::zeros(DType::F32, {tokens, 3});
  for (int64_t i = 0; i < tokens; ++i) {
    img_ids.ptr<float>()[i * 3 + 1] = float(i / (lat_w / 2));
    img_ids.ptr<float>()[i * 3 + 2] = float(i % (lat_w / 2));
  }
  Tensor txt_ids = Tensor::zeros(DType::F32, {int64_t(r.max_sequence_length), 3});
  Tensor rope = flux_rope_table(c, txt_ids, img_ids);

  FluxInputs in;
  in.hidden_states = backend_.empty(backend_.compute_dtype(), noise.shape());
  backend_.copy_from_host(noise, in.hidden_states);
  in.encoder_hidden_states = text.prompt_embeds;
  in.pooled_projections = text.pooled;
  in.timestep = backend_.empty(DType::F32, {B});
  if (dev) {
    in.guidance = backend_.empty(DType::F32, {B});
    backend_.copy_from_host(host_scalars(B, p.guidance), in.guidance);
  }
  in.rope = backend_.empty(DType::F32, rope.shape());
  backend_.copy_from_host(rope, in.rope);
  Tensor velocity = backend_.empty(backend_.compute_dtype(), noise.shape());

  FlowMatchEulerScheduler scheduler(scheduler_config_);
  scheduler.set_timesteps(r.steps, int(tokens));
  // Every step's t / 1000 (float32, as the pipeline hands it to the transformer, which multiplies by 1000 again),
  // uploaded once: a step then only copies its row on the device.
  Tensor t_host = Tensor::empty(DType::F32, {int64_t(r.steps), B});
  for (int i = 0; i < r.steps; ++i)
    for (int64_t b = 0; b < B; ++b) t_host.ptr<float>()[i * B + b] = scheduler.timesteps()[size_t(i)] / 1000.0f;
  Tensor t_table = backend_.empty(DType::F32, t_host.shape());
  backend_.copy_from_host(t_host, t_table);
  t0 = Clock::now();
  if (on_demand("transformer")) {
    try {
      transformer_->onload();
    } catch (...) {
      restore_placements();
      throw;
    }
  }
  // Every step's modulation vectors in one pass over the modulation weights (with the adapters set now), rather than
  // one pass a step; a step copies its row. Block streaming keeps those weights off the device: per step there.
  Tensor mod_table;
  if (transformer_->can_tabulate_modulations()) {
    mod_table = transformer_->modulation_table(t_table, in.guidance, in.pooled_projections);
    in.modulations = backend_.empty(backend_.compute_dtype(), {B, transformer_->modulation_width()});
  }
  std::unique_ptr<RecordedWork> step_graph;
  for (int i = 0; i < r.steps; ++i) {
    const auto ts = Clock::now();
    backend_.copy(t_table.select(0, i), in.timestep);
    if (mod_table.defined()) backend_.copy(mod_table.select(0, i), in.modulations);
    // The first step runs eagerly (it picks GEMM algorithms and attention plans); the second is recorded (and
    // runs as it is recorded); the rest replay the recording.
    if (i == 0)
      transformer_->forward(in, velocity);
    else if (!step_graph)
      step_graph = backend_.record([&] { transformer_->forward(in, velocity); });
    else
      step_graph->replay();
    backend_.axpy(in.hidden_states, scheduler.sigmas()[size_t(i) + 1] - scheduler.sigmas()[size_t(i)], velocity);
    if (p.on_step) {
      backend_.synchronize();
      p.on_step(i, r.steps, seconds_since(ts));
    }
    if (p.should_cancel) {
      // Synchronised before the throw too: unwinding frees `in`, `velocity` and the recording, which queued device
      // work must not still be using. Nothing else outlives this call, so the next generate() starts clean.
      backend_.synchronize();
      if (i + 1 < r.steps && p.should_cancel())
        throw Error("generation cancelled after step " + std::to_string(i + 1) + "/" + std::to_string(r.steps));
    }
  }
  backend_.synchronize();  // so that denoise_s does not include the decode queued behind the last step
  r.denoise_s = seconds_since(t0);  // with a transformer uploaded per image: its upload included
  r.denoise_memory = measure_memory();
  step_graph.reset();  // the recording reads the weights' addresses, which the next onload changes
  if (on_demand("transformer")) transformer_->offload();

  // The decode tail stays on the device; only the 8-bit image and the final latents come back, queued behind it
  // into pinned memory where the backend has some, so neither download stalls the decode.
  t0 = Clock::now();
  const HostBufferAllocator pinned = backend_.host_buffer_allocator();
  auto host_tensor = [&](DType dtype, const Shape& shape) {
    if (!pinned) return Tensor::empty(dtype, shape);
    std::shared_ptr<void> owner = pinned(size_t(shape_numel(shape)) * dtype_size(dtype));
    return Tensor::borrow(owner.get(), dtype, shape, Device::CPU, owner);
  };
  Tensor latents, u8;
  try {
    enter_phase(*vae_, "vae");
    const Tensor rgb8 = vae_->decode_to_rgb8(in.hidden_states, lat_h, lat_w);
    latents = host_tensor(in.hidden_states.dtype(), in.hidden_states.shape());
    u8 = host_tensor(DType::U8, rgb8.shape());
    backend_.copy_to_host(rgb8, u8);
    backend_.copy_to_host(in.hidden_states, latents);
    backend_.synchronize();
    r.decode_memory = measure_memory();
    leave_phase(*vae_, "vae");  // rgb8 lives in the decoder's buffers: only now that it is on the host
  } catch (...) {
    restore_placements();
    throw;
  }
  r.decode_s = seconds_since(t0);
  r.latents = latents.to_f32();
  const int64_t H = u8.size(1), W = u8.size(2);
  for (int64_t b = 0; b < B; ++b) {
    Rgb8Image img;
    img.width = int(W);
    img.height = int(H);
    const uint8_t* src = u8.ptr<uint8_t>() + b * H * W * 3;
    img.pixels.assign(src, src + H * W * 3);
    r.images.push_back(std::move(img));
  }
  return r;
}

std::string model_display_name(const std::string& path) {
  const std::string s = std::filesystem::path(path).lexically_normal().string();
  if (auto at = s.find("models--"); at != std::string::npos) {
    std::string repo = s.substr(at + 8);
    repo = repo.substr(0, repo.find('/'));
    return repo.substr(repo.rfind("--") == std::string::npos ? 0 : repo.rfind("--") + 2);
  }
  std::filesystem::path p(s);
  if (p.filename().empty()) p = p.parent_path();
  const std::string leaf = p.filename().string();
  return leaf == "pipeline" ? p.parent_path().filename().string() + "/" + leaf : leaf;
}

std::string generation_parameters_text(const std::string& prompt, const GenerateParams& p, const GenerateResult& r,
                                       const std::string& model_name, const std::string& loras) {
  std::ostringstream o;
  o << prompt << "\nSteps: " << r.steps << ", Sampler: Euler, Schedule type: Simple, CFG scale: 1";
  if (p.guidance > 0) o << ", Distilled CFG Scale: " << p.guidance;
  o << ", Seed: " << p.seed << ", Size: " << r.width << "x" << r.height << ", Model: " << model_name;
  if (!loras.empty()) o << ", Lora: " << loras;
  o << ", Max sequence length: " << r.max_sequence_length << ", Version: fluxswap 0.1.0";
  return o.str();
}

}  // namespace fluxswap
