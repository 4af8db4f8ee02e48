#include "lora/lora_controller.h"

#include <chrono>
#include <cstring>

#include "core/error.h"
#include "model/flux_weight_map.h"

namespace fluxswap {

LoraMode lora_mode_from_name(const std::string& name) {
  if (name == "merged") return LoraMode::Merged;
  if (name == "runtime") return LoraMode::Runtime;
  throw Error("unknown LoRA mode '" + name + "', expected merged or runtime");
}

LoraController::LoraController(FluxTransformer& tr, LoraMode mode, int64_t max_rank,
                               std::vector<std::string> slot_modules)
    : tr_(tr), mode_(mode) {
  if (mode_ != LoraMode::Runtime) return;
  if (max_rank <= 0) throw Error("LoRA runtime mode needs a max rank > 0, got " + std::to_string(max_rank));
  std::map<std::string, int64_t> parts;
  for (const auto& a : flux_diffusers_aliases(tr_.config())) parts[a.module] += 1;
  if (slot_modules.empty())
    for (const auto& [module, n] : parts) slot_modules.push_back(module);
  Backend& be = tr_.backend();
  int64_t widest = 0;
  for (const auto& module : slot_modules) {
    Linear& l = tr_.weights().linear(module);
    const int64_t r = max_rank * std::max<int64_t>(1, parts[module]);
    l.lora_down = be.empty(be.compute_dtype(), {r, l.weight.size(1)});
    l.lora_up = be.empty(be.compute_dtype(), {l.weight.size(0), r});
    be.copy_from_host(Tensor::zeros(DType::F32, l.lora_down.shape()), l.lora_down);
    be.copy_from_host(Tensor::zeros(DType::F32, l.lora_up.shape()), l.lora_up);
    widest = std::max(widest, r);
  }
  tr_.set_lora_slot_rank(widest);
}

LoraController::~LoraController() {
  try {
    clear();
  } catch (const std::exception&) {
    // Only device failures get here; the model is unusable then anyway.
  }
  if (mode_ != LoraMode::Runtime) return;
  for (const auto& a : flux_diffusers_aliases(tr_.config())) {
    Linear& l = tr_.weights().linear(a.module);
    l.lora_down = Tensor();
    l.lora_up = Tensor();
  }
  tr_.set_lora_slot_rank(0);
}

int64_t LoraController::slot_rank(const std::string& module) const {
  const Linear& l = tr_.weights().linear(module);
  return l.lora_down.defined() ? l.lora_down.size(0) : 0;
}

LoraApplyReport LoraController::set_adapters(const std::vector<ActiveLora>& active) {
  const auto t0 = std::chrono::steady_clock::now();
  auto stacked = stack_loras(active, tr_.config());
  if (mode_ == LoraMode::Runtime) {
    for (const auto& [module, s] : stacked) {  // check everything before touching any slot
      const int64_t cap = slot_rank(module);
      if (cap == 0)
        throw Error("LoRA targets '" + module + "', which has no runtime slot (use merged mode, or give it a slot)");
      if (s.down.size(0) > cap)
        throw Error("LoRA rank on '" + module + "' is " + std::to_string(s.down.size(0)) + ", over the slot's " +
                    std::to_string(cap) + " (raise the max rank)");
      if (s.bias_delta.defined())
        throw Error("LoRA on '" + module + "' carries a bias (lora_B.bias): supported in merged mode only");
    }
    apply_runtime(stacked);
  } else {
    apply_merged(stacked);
  }
  LoraApplyReport r;
  r.adapters = active.size();
  for (const auto& a : active) {
    r.pairs += a.adapter->pairs.size();
    r.tensors += a.adapter->tensors_used;
  }
  r.modules = stacked.size();
  tr_.backend().synchronize();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

void LoraController::apply_merged(const std::map<std::string, StackedLora>& stacked) {
  Backend& be = tr_.backend();
  // Upload everything first: an upload failure leaves the weights untouched.
  struct Upload {
    Tensor up, down, bias_delta;
  };
  std::map<std::string, Upload> dev;
  for (const auto& [module, s] : stacked)
    dev[module] = {be.upload_weight(s.up), be.upload_weight(s.down),
                   s.bias_delta.defined() ? be.upload_weight(s.bias_delta.view({1, s.bias_delta.size(0)})) : Tensor()};
  for (const auto& [module, d] : dev) {
    if (base_weight_.count(module)) continue;
    const Linear& l = tr_.weights().linear(module);
    base_weight_[module] = be.empty(l.weight.dtype(), l.weight.shape());
    be.copy(l.weight, base_weight_[module]);
    base_bias_[module] = be.empty(l.bias.dtype(), l.bias.shape());
    be.copy(l.bias, base_bias_[module]);
  }
  for (const auto& module : changed_) {
    if (dev.count(module)) continue;
    Linear& l = tr_.weights().linear(module);
    be.copy(base_weight_.at(module), l.weight);
    be.copy(base_bias_.at(module), l.bias);
  }
  changed_.clear();
  for (const auto& [module, d] : dev) {
    Linear& l = tr_.weights().linear(module);
    be.add_matmul(base_weight_.at(module), d.up, d.down, l.weight);
    be.copy(base_bias_.at(module), l.bias);
    if (d.bias_delta.defined()) be.add(l.bias.view({1, l.bias.size(0)}), d.bias_delta);
    changed_.insert(module);
  }
}

void LoraController::apply_runtime(const std::map<std::string, StackedLora>& stacked) {
  Backend& be = tr_.backend();
  std::set<std::string> next;
  for (const auto& [module, s] : stacked) next.insert(module);
  for (const auto& module : changed_)
    if (!next.count(module)) {
      Linear& l = tr_.weights().linear(module);
      be.copy_from_host(Tensor::zeros(DType::F32, l.lora_down.shape()), l.lora_down);
      be.copy_from_host(Tensor::zeros(DType::F32, l.lora_up.shape()), l.lora_up);
    }
  for (const auto& [module, s] : stacked) {
    Linear& l = tr_.weights().linear(module);
    // Pad to the slot's rank: zero rows of down and zero columns of up add nothing.
    const int64_t R = l.lora_down.size(0), r = s.down.size(0), in = s.down.size(1), out = s.up.size(0);
    Tensor down = Tensor::zeros(DType::F32, {R, in}), up = Tensor::zeros(DType::F32, {out, R});
    std::memcpy(down.ptr<float>(), s.down.ptr<float>(), size_t(r * in) * 4);
    for (int64_t i = 0; i < out; ++i) std::memcpy(up.ptr<float>() + i * R, s.up.ptr<float>() + i * r, size_t(r) * 4);
    be.copy_from_host(down, l.lora_down);
    be.copy_from_host(up, l.lora_up);
  }
  changed_ = next;
}

}  // namespace fluxswap
