#include "lora/lora_controller.h"

#include <algorithm>
#include <chrono>
#include <tuple>

#include "core/error.h"
#include "lora/streamed_upload.h"
#include "model/flux_step_order.h"
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
  // The slots are sized from the weights: a transformer uploaded per image (memory plan) comes back meanwhile.
  if (!tr_.resident()) tr_.onload();
  std::map<std::string, int64_t> parts;
  for (const auto& a : flux_diffusers_aliases(tr_.config())) parts[a.module] += 1;
  if (slot_modules.empty())
    for (const auto& [module, n] : parts) slot_modules.push_back(module);
  Backend& be = tr_.backend();
  // Block linears read token rows from buffers with room for R more columns (FluxTransformer), so their slots live
  // inside [W | up]; the others (embedders, modulations, the final projection) keep separate slots.
  const std::vector<Linear*> roomy = block_token_linears(tr_.weights());
  int64_t widest = 0;
  for (const auto& module : slot_modules) {
    Linear& l = tr_.weights().linear(module);
    const Tensor& w = l.weight.defined() ? l.weight : l.weight_fp8;  // FP8-only models have no bf16 weight
    const int64_t r = max_rank * std::max<int64_t>(1, parts[module]), out = w.size(0), in = w.size(1);
    l.lora_down = be.empty(be.compute_dtype(), {r, in});
    be.zero(l.lora_down);
    // (FP8 linears add the branch after their own GEMM and never read [W | up]; without W it cannot be built.)
    // (A streamed block's weight passes through a shared buffer each step: its slot cannot live inside it.)
    if (l.weight.defined() && !tr_.streamed(module) && std::find(roomy.begin(), roomy.end(), &l) != roomy.end()) {
      // The weight moves into [W | up] (its old allocation is freed), so the slot costs what a separate one would.
      l.lora_weight = be.empty(l.weight.dtype(), {out, in + r});
      be.copy(l.weight, l.lora_weight.narrow(1, 0, in));
      tr_.weights().forget(l.weight);
      l.weight = l.lora_weight.narrow(1, 0, in);
      l.lora_up = l.lora_weight.narrow(1, in, r);
    } else {
      l.lora_up = be.empty(be.compute_dtype(), {out, r});
    }
    be.zero(l.lora_up);
    widest = std::max(widest, r);
  }
  tr_.set_lora_slot_rank(widest);
  // Recorded steps wait per block for swap_under_next_step's fills (a no-op where the backend has no gates).
  tr_.set_step_gates(true);
}

LoraController::~LoraController() {
  try {
    clear();
  } catch (const std::exception&) {
    // Only device failures get here; the model is unusable then anyway.
  }
  if (mode_ != LoraMode::Runtime) return;
  Backend& be = tr_.backend();
  for (const auto& a : flux_diffusers_aliases(tr_.config())) {
    Linear& l = tr_.weights().linear(a.module);
    if (l.lora_weight.defined()) {
      try {
        Tensor w = be.empty(l.weight.dtype(), l.weight.shape());
        be.copy(l.weight, w);
        l.weight = w;
      } catch (const std::exception&) {
        // Out of memory: the strided view computes the same.
      }
      l.lora_weight = Tensor();
    }
    l.lora_down = Tensor();
    l.lora_up = Tensor();
  }
  tr_.set_lora_slot_rank(0);
  tr_.set_step_gates(false);
}

int64_t LoraController::slot_rank(const std::string& module) const {
  const Linear& l = tr_.weights().linear(module);
  return l.lora_down.defined() ? l.lora_down.size(0) : 0;
}

void LoraController::check_stacks(const std::map<std::string, ModuleStack>& stacks) const {
  for (const auto& [module, s] : stacks) {
    if (mode_ == LoraMode::Merged && !tr_.weights().linear(module).weight.defined())
      throw Error("LoRA targets '" + module + "', which this model holds only in FP8 (it was loaded from an FP8 "
                  "checkpoint): merged mode needs its bf16 weight; use runtime mode (--lora-mode runtime)");
    if (mode_ == LoraMode::Merged && tr_.streamed(module))
      throw Error("LoRA targets '" + module + "', whose block streams from host memory under this memory plan: "
                  "merged mode writes the weights on the device; use runtime mode (--lora-mode runtime) or a budget "
                  "that keeps the transformer resident");
    if (mode_ != LoraMode::Runtime) continue;
    const int64_t cap = slot_rank(module);
    if (cap == 0)
      throw Error("LoRA targets '" + module + "', which has no runtime slot (use merged mode, or give it a slot)");
    if (s.rank > cap)
      throw Error("LoRA rank on '" + module + "' is " + std::to_string(s.rank) + ", over the slot's " +
                  std::to_string(cap) + " (raise the max rank)");
    if (s.has_bias)
      throw Error("LoRA on '" + module + "' carries a bias (lora_B.bias): supported in merged mode only");
  }
}

LoraApplyReport LoraController::set_adapters(const std::vector<ActiveLora>& active) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto stacks = stack_loras(active, tr_.config());
  if (mode_ == LoraMode::Merged && !tr_.resident())
    throw Error("merged LoRAs are written into the transformer's weights, which are off the device between images "
                "under this memory plan: use runtime mode (--lora-mode runtime) or a budget that keeps it resident");
  check_stacks(stacks);  // everything before touching the model
  LoraApplyReport r;
  std::vector<DeviceAdapter*> dev(active.size(), nullptr);
  if (mode_ == LoraMode::Runtime) {
    // Everything the slots will read is on the device and checked before the first write to them.
    for (size_t i = 0; i < active.size(); ++i) dev[i] = &upload(active[i].adapter, r, {});
    apply_runtime(stacks, dev);
  } else {
    merge_as_uploaded(active, stacks, dev, r);
  }
  active_ = active;
  evict_unused(active);
  tr_.backend().synchronize();
  finish_report(r, active, stacks, t0);
  return r;
}

void LoraController::finish_report(LoraApplyReport& r, const std::vector<ActiveLora>& active,
                                   const std::map<std::string, ModuleStack>& stacks,
                                   std::chrono::steady_clock::time_point t0) const {
  r.adapters = active.size();
  for (const auto& a : active) {
    r.pairs += a.adapter->pairs.size();
    r.tensors += a.adapter->tensors_used;
  }
  r.modules = stacks.size();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

LoraController::DeviceAdapter& LoraController::upload(const std::shared_ptr<const LoraAdapter>& adapter,
                                                      LoraApplyReport& report, const PairSent& on_pair_sent) {
  DeviceAdapter& d = place(adapter);
  send(d, report, on_pair_sent);
  return d;
}

LoraController::DeviceAdapter& LoraController::place(const std::shared_ptr<const LoraAdapter>& adapter) {
  for (auto& d : cache_)
    if (d.adapter == adapter) {
      d.last_use = ++uses_;
      return d;
    }
  // One device allocation for the whole adapter, in the order the step reads the pairs (the order
  // start_loading_lora_adapter reads the file in), then the host bytes': runs of neighbouring tensors stay
  // neighbours there and travel as one transfer.
  Backend& be = tr_.backend();
  int64_t total = 0;
  for (const LoraPair& p : adapter->pairs)
    total += p.down.numel() + p.up.numel() + (p.up_bias.defined() ? p.up_bias.numel() : 0);
  // In the cache from the start (a list: the address stays) so that on_pair_sent sees where the pairs go; dropped
  // again if the file turns out bad.
  cache_.emplace_back();
  DeviceAdapter& d = cache_.back();
  d.adapter = adapter;
  d.last_use = ++uses_;
  d.sent = false;
  const size_t n = adapter->pairs.size();
  d.down.resize(n), d.up.resize(n), d.bias.resize(n);
  struct Source {
    Tensor host;
    Tensor* device;
    size_t pair;
  };
  std::vector<Source> sources;
  for (size_t i = 0; i < n; ++i) {
    const LoraPair& p = adapter->pairs[i];
    sources.push_back({p.down, &d.down[i], i});
    sources.push_back({p.up, &d.up[i], i});
    if (p.up_bias.defined()) sources.push_back({p.up_bias.view({1, p.up_bias.size(0)}), &d.bias[i], i});
  }
  std::vector<int64_t> rank(n);
  for (size_t i = 0; i < n; ++i) rank[i] = flux_step_rank(adapter->pairs[i].module, tr_.config());
  std::stable_sort(sources.begin(), sources.end(), [&](const Source& a, const Source& b) {
    if (rank[a.pair] != rank[b.pair]) return rank[a.pair] < rank[b.pair];
    return std::less<const void*>()(a.host.data(), b.host.data());
  });
  try {
    const Tensor storage = be.empty(be.compute_dtype(), {total});
    int64_t at = 0;
    for (Source& src : sources) {
      *src.device = storage.narrow(0, at, src.host.numel()).view(src.host.shape());
      at += src.host.numel();
      d.to_send.emplace_back(src.host, *src.device);
      d.to_send_pair.push_back(src.pair);
    }
  } catch (...) {
    cache_.pop_back();
    throw;
  }
  return d;
}

void LoraController::send(DeviceAdapter& d, LoraApplyReport& report, const PairSent& on_pair_sent) {
  if (d.sent) {
    if (on_pair_sent)
      for (size_t i = 0; i < d.adapter->pairs.size(); ++i) on_pair_sent(d, i);
    return;
  }
  // A file still being read goes up in batches as its chunks land (sent in order, so a running count says which);
  // its values are checked once all are in. A bad value throws here and the device copy is dropped; what
  // on_pair_sent did with the pairs sent before is the caller's to undo.
  std::vector<int> unsent(d.adapter->pairs.size(), 0);  // per pair, its tensors not sent yet
  for (size_t pair : d.to_send_pair) ++unsent[pair];
  size_t next = 0;
  try {
    const StreamedUploadStats sent = upload_as_it_arrives(
        d.adapter->arriving.get(), d.to_send, upload_batch_bytes_, [&](const HostToDevice& b) {
          tr_.backend().copy_from_host_batch(b);
          for (size_t end = next + b.size(); next < end; ++next)
            if (--unsent[d.to_send_pair[next]] == 0 && on_pair_sent) on_pair_sent(d, d.to_send_pair[next]);
        });
    wait_until_loaded(*d.adapter);
    report.file_wait_seconds += sent.waited_seconds;
    report.upload_batches += sent.batches;
  } catch (...) {
    drop_unsent();
    throw;
  }
  d.sent = true;
  d.to_send.clear();
  d.to_send_pair.clear();
}

void LoraController::drop_unsent() {
  cache_.remove_if([](const DeviceAdapter& d) { return !d.sent; });
}

void LoraController::evict_unused(const std::vector<ActiveLora>& active) {
  auto is_active = [&](const DeviceAdapter& d) {
    for (const auto& a : active)
      if (a.adapter == d.adapter) return true;
    return false;
  };
  size_t idle = 0;
  for (const auto& d : cache_) idle += !is_active(d);
  while (idle > cache_capacity_) {
    auto oldest = cache_.end();
    for (auto it = cache_.begin(); it != cache_.end(); ++it)
      if (!is_active(*it) && (oldest == cache_.end() || it->last_use < oldest->last_use)) oldest = it;
    cache_.erase(oldest);
    --idle;
  }
}

void LoraController::merge_as_uploaded(const std::vector<ActiveLora>& active,
                                       const std::map<std::string, ModuleStack>& stacks,
                                       std::vector<DeviceAdapter*>& dev, LoraApplyReport& report) {
  begin_merge(stacks);
  // A module is merged as soon as every pair it takes is on its way to the device (the merge follows the upload in
  // the stream), so the merges of the first modules run while the rest of a file is still being read.
  std::map<std::string, size_t> waiting;  // module -> its pairs not sent yet
  std::vector<std::vector<std::vector<const std::string*>>> modules_of(active.size());  // [adapter][pair] -> modules
  for (size_t a = 0; a < active.size(); ++a) modules_of[a].resize(active[a].adapter->pairs.size());
  for (const auto& [module, s] : stacks) {
    waiting[module] = s.pairs.size();
    for (const PlacedPair& pp : s.pairs) modules_of[pp.adapter][pp.pair].push_back(&module);
  }
  try {
    for (size_t a = 0; a < active.size(); ++a)
      dev[a] = &upload(active[a].adapter, report, [&](DeviceAdapter& d, size_t pair) {
        dev[a] = &d;
        const SafetensorsFile* file = active[a].adapter->arriving.get();
        for (const std::string* module : modules_of[a][pair])
          if (--waiting[*module] == 0) {
            merge_module(*module, stacks.at(*module), dev);
            report.merged_while_reading += file && !file->complete();
          }
      });
  } catch (...) {
    // A value or read error found after some modules were merged: back to what the last successful call set (its
    // adapters are still in the cache; every merge starts from the base, so the bits come back exactly).
    const std::vector<ActiveLora> previous = active_;
    set_adapters(previous);
    throw;
  }
  tr_.weights_changed();  // host copies kept for offloading now hold the old values
}

void LoraController::begin_merge(const std::map<std::string, ModuleStack>& stacks) {
  Backend& be = tr_.backend();
  for (const auto& [module, s] : stacks) {
    if (base_weight_.count(module)) continue;
    const Linear& l = tr_.weights().linear(module);
    base_weight_[module] = be.empty(l.weight.dtype(), l.weight.shape());
    be.copy(l.weight, base_weight_[module]);
    base_bias_[module] = be.empty(l.bias.dtype(), l.bias.shape());
    be.copy(l.bias, base_bias_[module]);
  }
  // Every change starts from the base, so swaps never accumulate rounding and unloading is exact. Modules the new
  // stacks touch stay in changed_ until merged: they may still hold the previous adapters' values.
  for (auto it = changed_.begin(); it != changed_.end();) {
    if (stacks.count(*it)) {
      ++it;
      continue;
    }
    Linear& l = tr_.weights().linear(*it);
    be.copy(base_weight_.at(*it), l.weight);
    be.copy(base_bias_.at(*it), l.bias);
    if (l.weight_fp8.defined()) quantize_linear_fp8(l, be);  // FP8 mode: the working weight follows
    it = changed_.erase(it);
  }
}

void LoraController::merge_module(const std::string& module, const ModuleStack& s,
                                  const std::vector<DeviceAdapter*>& dev) {
  Backend& be = tr_.backend();
  Linear& l = tr_.weights().linear(module);
  const Tensor& base = base_weight_.at(module);
  be.copy(base_bias_.at(module), l.bias);
  // The first pair on a row range reads the base (W = base + a up down in one pass over W); later pairs on the
  // same rows add to it. Rows no pair covers are copied; ranges that overlap partly fall back to copy-then-add.
  std::vector<std::pair<int64_t, int64_t>> written;  // row ranges holding base + something
  bool partial = false;
  for (const PlacedPair& pp : s.pairs) {
    const LoraPair& p = dev[pp.adapter]->adapter->pairs[pp.pair];
    for (const auto& [r, n] : written)
      if (r < p.row + p.rows && p.row < r + n && (r != p.row || n != p.rows)) partial = true;
    if (std::find(written.begin(), written.end(), std::pair{p.row, p.rows}) == written.end())
      written.emplace_back(p.row, p.rows);
  }
  if (partial) be.copy(base, l.weight);
  written.clear();
  for (const PlacedPair& pp : s.pairs) {
    const LoraPair& p = dev[pp.adapter]->adapter->pairs[pp.pair];
    const Tensor rows = l.weight.narrow(0, p.row, p.rows);
    const bool first = !partial && std::find(written.begin(), written.end(), std::pair{p.row, p.rows}) == written.end();
    be.add_matmul(first ? base.narrow(0, p.row, p.rows) : rows, dev[pp.adapter]->up[pp.pair],
                  dev[pp.adapter]->down[pp.pair], rows, pp.alpha);
    if (first) written.emplace_back(p.row, p.rows);
    if (const Tensor& b = dev[pp.adapter]->bias[pp.pair]; b.defined())
      be.axpy(l.bias.narrow(0, p.row, p.rows).view({1, p.rows}), pp.alpha, b);
  }
  if (!partial) {  // the gaps between the written ranges
    std::sort(written.begin(), written.end());
    int64_t next = 0;
    for (const auto& [r, n] : written) {
      if (r > next) be.copy(base.narrow(0, next, r - next), l.weight.narrow(0, next, r - next));
      next = std::max(next, r + n);
    }
    if (next < base.size(0)) be.copy(base.narrow(0, next, base.size(0) - next), l.weight.narrow(0, next, base.size(0) - next));
  }
  // FP8 mode requantises the merged module from bf16 (the base itself stays untouched in base_weight_).
  if (l.weight_fp8.defined()) quantize_linear_fp8(l, be);
  changed_.insert(module);
}

void LoraController::apply_runtime(const std::map<std::string, ModuleStack>& stacks,
                                   const std::vector<DeviceAdapter*>& dev) {
  Backend& be = tr_.backend();
  // Each pair's down fills its rank rows of the slot; alpha * up its rank columns of its output rows. The rest of
  // the slot is zero and adds nothing.
  std::vector<Backend::ScaledCopy> fill;
  std::vector<SlotRegion> regions;
  for (const auto& [module, s] : stacks)
    for (const PlacedPair& pp : s.pairs) slot_fill(module, pp, *dev[pp.adapter], fill, regions);
  // Slots are zero outside what the last fill wrote, so only the parts of it that this fill does not overwrite are
  // cleared first: nothing when the adapters keep their layout (same ranks and targets, the common swap) instead of
  // two memsets per module. Parts of one fill never overlap (each pair has its own rank range).
  const std::set<SlotRegion> next(regions.begin(), regions.end());
  for (const SlotRegion& old : filled_)
    if (!next.count(old)) be.zero(slot_region(old));
  be.scaled_copy_batch(fill);
  filled_ = std::move(regions);
}

void LoraController::slot_fill(const std::string& module, const PlacedPair& pp, const DeviceAdapter& d,
                               std::vector<Backend::ScaledCopy>& fill, std::vector<SlotRegion>& regions) {
  const auto [down, up] = slot_regions(module, pp, d.adapter->pairs[pp.pair]);
  regions.push_back(down);
  fill.push_back({d.down[pp.pair], slot_region(down), 1.0f});
  regions.push_back(up);
  fill.push_back({d.up[pp.pair], slot_region(up), pp.alpha});
}

std::pair<LoraController::SlotRegion, LoraController::SlotRegion> LoraController::slot_regions(
    const std::string& module, const PlacedPair& pp, const LoraPair& p) {
  const int64_t r = p.down.size(0);
  return {{module, false, pp.rank_offset, r, 0, p.down.size(1)}, {module, true, p.row, p.rows, pp.rank_offset, r}};
}

Tensor LoraController::slot_region(const SlotRegion& r) {
  const Linear& l = tr_.weights().linear(r.module);
  return (r.up ? l.lora_up : l.lora_down).narrow(0, r.row, r.rows).narrow(1, r.col, r.cols);
}

}  // namespace fluxswap
