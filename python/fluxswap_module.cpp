// fluxswap._fluxswap: the engine behind the Python module. One `Engine` owns a backend, a FluxPipeline on it and
// the LoRA state (loaded adapters by name, the active ones with their weights, fused or not). The diffusers-shaped
// API (argument normalisation, progress bar, PIL, output object) is the pure-Python layer in fluxswap/__init__.py.
//
// Threading: every entry point releases the GIL and then takes the engine's mutex (in that order, so a step
// callback that reacquires the GIL never deadlocks with another thread waiting for the engine).
// Errors: fluxswap::Error becomes fluxswap.Error (a RuntimeError) with the engine's message; bad arguments found
// here (unknown adapter names, mismatched lists) are ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "lora/clip_lora.h"
#include "lora/lora_adapter.h"
#include "lora/lora_controller.h"
#include "lora/lora_stack.h"
#include "model/flux_weight_map.h"
#include "pipeline/flux_pipeline.h"

namespace py = pybind11;

namespace fluxswap {
namespace {

constexpr int64_t kDefaultSlotRank = 64;

struct NamedWeight {
  std::string name;
  double weight = 1.0;  // as the user gave it (reported back unrounded); the engine gets float(weight x scale)
};

using AdapterMap = std::map<std::string, std::shared_ptr<const LoraAdapter>>;

std::unique_ptr<Backend> backend_for(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
  if (device == "cuda") return make_cuda_backend(0);
  if (device != "auto") throw py::value_error("device must be 'auto', 'cpu' or 'cuda', got '" + device + "'");
  try {
    return make_cuda_backend(0);
  } catch (const Error&) {
    return make_cpu_backend();  // no CUDA in this build, or no usable GPU
  }
}

class Engine {
 public:
  // vram_bytes: a device memory budget (0: none), planned and enforced as `fluxswap generate --vram` does.
  Engine(const std::string& path, const std::string& device, int64_t lora_max_rank, uint64_t vram_bytes)
      : default_rank_(lora_max_rank) {
    if (lora_max_rank <= 0) throw py::value_error("lora_max_rank must be > 0, got " + std::to_string(lora_max_rank));
    backend_ = backend_for(device);
    PipelineLoadOptions options;
    options.budget.bytes = vram_bytes;
    pipe_ = FluxPipeline::from_pretrained(path, *backend_, options);
  }
  ~Engine() {
    lora_.reset();  // gives the transformer back before it goes
    pipe_.reset();
    backend_.reset();
  }

  std::string device() const { return backend_->device() == Device::CUDA ? "cuda" : "cpu"; }

  void set_precision(bool fp8_linears, bool fp8_attention) {
    pipe_->transformer().set_precision(fp8_linears, fp8_attention);
  }
  bool fp8() const { return pipe_->transformer().fp8(); }
  bool fp8_attention() const { return pipe_->transformer().fp8_attention(); }
  std::string backend_name() const { return backend_->name(); }
  // torch's spelling of the compute dtype: "float32" (CPU reference) or "bfloat16" (CUDA).
  std::string dtype() const {
    switch (backend_->compute_dtype()) {
      case DType::F32: return "float32";
      case DType::BF16: return "bfloat16";
      case DType::F16: return "float16";
      default: return std::string(dtype_name(backend_->compute_dtype()));
    }
  }
  std::string path() const { return pipe_->path(); }
  bool guidance_distilled() const { return pipe_->is_guidance_distilled(); }
  int vae_scale_factor() const { return pipe_->vae_scale_factor(); }

  // ---- LoRA -----------------------------------------------------------------------------------------------------
  void load_lora(const std::string& path, const std::string& name, bool hotswap) {
    std::lock_guard lock(mu_);
    const bool exists = adapters_.count(name) != 0;
    if (exists && !hotswap)
      throw py::value_error("adapter name '" + name + "' is already in use; pass another adapter_name, or "
                            "hotswap=True to replace its weights");
    auto adapter = std::make_shared<const LoraAdapter>(load_lora_adapter(path, pipe_->transformer().config()));
    if (adapter->pairs.empty() && adapter->clip_pairs.empty())
      throw Error(path + ": no LoRA tensors for the transformer or the CLIP text encoder: it would change nothing");
    AdapterMap adapters = adapters_;
    adapters[name] = adapter;
    std::vector<NamedWeight> active = active_;
    if (!exists) active.push_back({name, 1.0});  // a new adapter joins the active ones at weight 1
    apply(active, adapters, fused_, fuse_scale_, enabled_);
    adapters_ = std::move(adapters);
    active_ = std::move(active);
    if (!exists) order_.push_back(name);
  }

  void set_adapters(const std::vector<std::string>& names, const std::vector<double>& weights) {
    std::lock_guard lock(mu_);
    if (names.size() != weights.size())
      throw py::value_error("set_adapters: " + std::to_string(names.size()) + " adapter names but " +
                            std::to_string(weights.size()) + " weights");
    std::vector<NamedWeight> active;
    for (size_t i = 0; i < names.size(); ++i) {
      if (!adapters_.count(names[i])) throw py::value_error("no adapter named '" + names[i] + "'; loaded: " + loaded_list());
      for (const auto& a : active)
        if (a.name == names[i]) throw py::value_error("set_adapters: adapter '" + names[i] + "' named twice");
      active.push_back({names[i], weights[i]});
    }
    apply(active, adapters_, fused_, fuse_scale_, enabled_);
    active_ = std::move(active);
  }

  void delete_adapters(const std::vector<std::string>& names) {
    std::lock_guard lock(mu_);
    for (const auto& n : names)
      if (!adapters_.count(n)) throw py::value_error("no adapter named '" + n + "'; loaded: " + loaded_list());
    auto gone = [&](const std::string& n) { return std::find(names.begin(), names.end(), n) != names.end(); };
    std::vector<NamedWeight> active;
    for (const auto& a : active_)
      if (!gone(a.name)) active.push_back(a);
    apply(active, adapters_, fused_, fuse_scale_, enabled_);
    active_ = std::move(active);
    for (const auto& n : names) adapters_.erase(n);
    order_.erase(std::remove_if(order_.begin(), order_.end(), gone), order_.end());
  }

  void fuse(double scale) {
    std::lock_guard lock(mu_);
    apply(active_, adapters_, true, scale, enabled_);
    fused_ = true;
    fuse_scale_ = scale;
  }

  void unfuse() {
    std::lock_guard lock(mu_);
    apply(active_, adapters_, false, 1.0, enabled_);
    fused_ = false;
    fuse_scale_ = 1.0;
  }

  void set_enabled(bool on) {
    std::lock_guard lock(mu_);
    apply(active_, adapters_, fused_, fuse_scale_, on);
    enabled_ = on;
  }

  // Every adapter gone; the transformer and CLIP are the base model again, bit for bit (both modes restore exactly).
  void unload() {
    std::lock_guard lock(mu_);
    lora_.reset();
    pipe_->clip().set_lora({});
    adapters_.clear();
    active_.clear();
    order_.clear();
    fused_ = false;
    fuse_scale_ = 1.0;
    enabled_ = true;
  }

  // Loaded adapter names (in load order) per component they change, as diffusers' get_list_adapters.
  std::map<std::string, std::vector<std::string>> list_adapters() {
    std::lock_guard lock(mu_);
    std::map<std::string, std::vector<std::string>> out;
    for (const auto& name : order_) {
      const LoraAdapter& a = *adapters_.at(name);
      if (!a.pairs.empty()) out["transformer"].push_back(name);
      if (!a.clip_pairs.empty()) out["text_encoder"].push_back(name);
    }
    return out;
  }
  std::vector<std::pair<std::string, double>> active_adapters() {
    std::lock_guard lock(mu_);
    std::vector<std::pair<std::string, double>> out;
    for (const auto& a : active_) out.emplace_back(a.name, a.weight);
    return out;
  }
  std::string lora_mode() {
    std::lock_guard lock(mu_);
    return !lora_ ? "none" : lora_->mode() == LoraMode::Merged ? "merged" : "runtime";
  }
  bool fused() {
    std::lock_guard lock(mu_);
    return fused_;
  }
  bool enabled() {
    std::lock_guard lock(mu_);
    return enabled_;
  }
  double fuse_scale() {
    std::lock_guard lock(mu_);
    return fuse_scale_;
  }

  // ---- Text and images ------------------------------------------------------------------------------------------
  std::pair<Tensor, Tensor> encode(const std::vector<std::string>& prompts, int max_sequence_length) {
    std::lock_guard lock(mu_);
    if (prompts.empty()) throw py::value_error("encode_prompt: no prompt");
    if (max_sequence_length <= 0) max_sequence_length = pipe_->is_guidance_distilled() ? 512 : 256;
    EncodedPrompts e = pipe_->encode_prompts(prompts, max_sequence_length);
    return {backend_->to_host_f32(e.prompt_embeds), backend_->to_host_f32(e.pooled)};
  }

  // Called with the GIL held; releases it for the engine and takes it back for every step callback.
  py::tuple generate(const std::vector<std::string>& prompts, int width, int height, int steps, float guidance,
                     uint64_t seed, const std::optional<py::array_t<float, py::array::c_style | py::array::forcecast>>& latents,
                     int max_sequence_length, const py::object& on_step) {
    GenerateParams p;
    p.prompts = prompts;
    p.width = width;
    p.height = height;
    p.steps = steps;
    p.guidance = guidance;
    p.seed = seed;
    p.max_sequence_length = max_sequence_length;
    if (latents) {
      Shape shape(latents->shape(), latents->shape() + latents->ndim());
      // A view of the numpy buffer, which `latents` keeps alive for the whole call.
      p.latents = Tensor::borrow(const_cast<float*>(latents->data()), DType::F32, shape);
    }
    p.on_step = [&on_step](int i, int n, double seconds) {
      py::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();  // Ctrl-C stops after the current step
      if (!on_step.is_none()) on_step(i, n, seconds);
    };
    GenerateResult r;
    {
      py::gil_scoped_release nogil;
      std::lock_guard lock(mu_);
      r = pipe_->generate(p);
    }
    py::list images;
    for (const Rgb8Image& img : r.images) {
      py::array_t<uint8_t> a({py::ssize_t(img.height), py::ssize_t(img.width), py::ssize_t(3)});
      std::copy(img.pixels.begin(), img.pixels.end(), a.mutable_data());
      images.append(std::move(a));
    }
    py::dict info;
    info["width"] = r.width;
    info["height"] = r.height;
    info["steps"] = r.steps;
    info["max_sequence_length"] = r.max_sequence_length;
    info["encode_s"] = r.encode_s;
    info["denoise_s"] = r.denoise_s;
    info["decode_s"] = r.decode_s;
    return py::make_tuple(images, to_numpy(r.latents), info);
  }

  static py::array_t<float> to_numpy(const Tensor& t) {
    Tensor c = t.to_f32();  // contiguous host float32 copy
    py::array_t<float> a(std::vector<py::ssize_t>(c.shape().begin(), c.shape().end()));
    std::copy(c.ptr<float>(), c.ptr<float>() + c.numel(), a.mutable_data());
    return a;
  }

 private:
  std::string loaded_list() const {
    std::string s;
    for (const auto& n : order_) s += (s.empty() ? "" : ", ") + ("'" + n + "'");
    return s.empty() ? "none" : s;
  }

  // Makes the transformer and the CLIP text encoder carry exactly `active` (weights x scale when fused; CLIP's
  // LoRAs always run beside its linears). All-or-nothing: the adapters are validated against the model before
  // anything changes; should the device fail half-way, no adapter stays active on the transformer and the engine's
  // own state is left as it was (the caller commits only after this returns).
  void apply(const std::vector<NamedWeight>& active, const AdapterMap& adapters, bool fused, double fuse_scale,
             bool enabled) {
    std::vector<ActiveLora> list;
    if (enabled)
      for (const auto& a : active) list.push_back({adapters.at(a.name), float(a.weight * (fused ? fuse_scale : 1.0))});
    set_loras_with_clip(pipe_->clip(), list, [&] { apply_to_transformer(list, fused); });
  }

  void apply_to_transformer(const std::vector<ActiveLora>& list, bool fused) {
    FluxTransformer& tr = pipe_->transformer();
    const auto stacks = stack_loras(list, tr.config());  // throws Error naming adapter and module on a misfit
    if (stacks.empty()) {
      lora_.reset();  // restores the base weights / removes the slots: the base model exactly
      return;
    }

    // Unfused adapters run in runtime slots (W x + up (down x), like diffusers' unfused PEFT layers), sized to the
    // stack; only a lora_B bias, which slots cannot hold, needs merged weights. Fused: merged.
    std::map<std::string, int64_t> parts;
    for (const auto& a : flux_diffusers_aliases(tr.config())) parts[a.module] += 1;
    LoraMode mode = fused ? LoraMode::Merged : LoraMode::Runtime;
    int64_t rank = default_rank_;
    for (const auto& [module, s] : stacks) {
      if (s.has_bias || !parts.count(module)) mode = LoraMode::Merged;
      const int64_t p = std::max<int64_t>(1, parts[module]);
      rank = std::max(rank, (s.rank + p - 1) / p);
    }
    if (mode == LoraMode::Merged) rank = 0;
    if (lora_ && lora_->mode() == mode && lora_rank_ >= rank) {
      lora_->set_adapters(list);  // all-or-nothing inside the controller
      return;
    }
    lora_.reset();
    lora_rank_ = 0;
    try {
      lora_ = std::make_unique<LoraController>(tr, mode, mode == LoraMode::Runtime ? rank : kDefaultSlotRank);
      lora_rank_ = rank;
      lora_->set_adapters(list);
    } catch (...) {
      lora_.reset();
      pipe_->clip().set_lora({});
      active_.clear();
      throw;
    }
  }

  std::mutex mu_;
  int64_t default_rank_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<FluxPipeline> pipe_;
  std::unique_ptr<LoraController> lora_;
  int64_t lora_rank_ = 0;  // max rank the runtime slots were made for (0: merged)
  AdapterMap adapters_;
  std::vector<std::string> order_;  // adapter names in load order
  std::vector<NamedWeight> active_;
  bool fused_ = false, enabled_ = true;
  double fuse_scale_ = 1.0;
};

}  // namespace
}  // namespace fluxswap

PYBIND11_MODULE(_fluxswap, m) {
  using fluxswap::Engine;
  namespace fs = fluxswap;
  m.doc() = "fluxswap engine binding (use the `fluxswap` package, not this module, directly)";
  py::register_exception<fs::Error>(m, "Error", PyExc_RuntimeError);
  m.attr("__version__") = "0.1.0";
  m.attr("have_cuda") =
#ifdef FLUXSWAP_HAVE_CUDA
      true;
#else
      false;
#endif

  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<Engine>(m, "Engine")
      .def(py::init<const std::string&, const std::string&, int64_t, uint64_t>(), py::arg("path"), py::arg("device"),
           py::arg("lora_max_rank"), py::arg("vram_bytes") = 0, release())
      .def_property_readonly("device", &Engine::device)
      .def_property_readonly("backend_name", &Engine::backend_name)
      .def_property_readonly("dtype", &Engine::dtype)
      .def_property_readonly("path", &Engine::path)
      .def_property_readonly("guidance_distilled", &Engine::guidance_distilled)
      .def_property_readonly("vae_scale_factor", &Engine::vae_scale_factor)
      .def("load_lora", &Engine::load_lora, py::arg("path"), py::arg("name"), py::arg("hotswap"), release())
      .def("set_adapters", &Engine::set_adapters, py::arg("names"), py::arg("weights"), release())
      .def("delete_adapters", &Engine::delete_adapters, py::arg("names"), release())
      .def("fuse", &Engine::fuse, py::arg("scale"), release())
      .def("unfuse", &Engine::unfuse, release())
      .def("set_enabled", &Engine::set_enabled, py::arg("on"), release())
      .def("unload", &Engine::unload, release())
      .def("set_precision", &Engine::set_precision, py::arg("fp8_linears"), py::arg("fp8_attention"), release())
      .def_property_readonly("fp8", &Engine::fp8)
      .def_property_readonly("fp8_attention", &Engine::fp8_attention)
      .def("list_adapters", &Engine::list_adapters, release())
      .def("active_adapters", &Engine::active_adapters, release())
      .def("lora_mode", &Engine::lora_mode, release())
      .def("fused", &Engine::fused, release())
      .def("enabled", &Engine::enabled, release())
      .def("fuse_scale", &Engine::fuse_scale, release())
      .def(
          "encode",
          [](Engine& e, const std::vector<std::string>& prompts, int max_sequence_length) {
            std::pair<fs::Tensor, fs::Tensor> r;
            {
              py::gil_scoped_release nogil;
              r = e.encode(prompts, max_sequence_length);
            }
            return py::make_tuple(Engine::to_numpy(r.first), Engine::to_numpy(r.second));
          },
          py::arg("prompts"), py::arg("max_sequence_length"))
      .def("generate", &Engine::generate, py::arg("prompts"), py::arg("width"), py::arg("height"), py::arg("steps"),
           py::arg("guidance"), py::arg("seed"), py::arg("latents"), py::arg("max_sequence_length"),
           py::arg("on_step"));
}
