// LoraController::swap_under_next_step: a runtime-mode swap that overlaps the next step. The file is read in the
// order the step reads the weights (start_loading_lora_adapter ranks its chunks by flux_step_rank), each group of
// slots (everything before the first block, each block, the final projection) is filled on the side queue as soon as
// its pairs are uploaded, and the group's step gate opens behind the fill; the recorded step (FluxTransformer with
// step gates) waits at each group's gate. A step consumes a block every ~2 ms and the read delivers one every
// ~0.5 ms, so only the first group is waited for.
#include <algorithm>

#include "core/error.h"
#include "lora/lora_controller.h"
#include "model/flux_step_order.h"

namespace fluxswap {

LoraApplyReport LoraController::swap_under_next_step(const std::vector<ActiveLora>& active,
                                                     const std::function<void()>& launch_step) {
  Backend& be = tr_.backend();
  if (mode_ != LoraMode::Runtime || !be.has_gates()) {  // (runtime mode turned the transformer's gates on)
    LoraApplyReport r = set_adapters(active);
    launch_step();
    return r;
  }
  const auto t0 = std::chrono::steady_clock::now();
  const auto stacks = stack_loras(active, tr_.config());
  check_stacks(stacks);

  // Per step rank, the pairs still to come, and what fills them.
  const int64_t ranks = flux_step_ranks(tr_.config());
  std::vector<size_t> waiting(size_t(ranks), 0);
  auto fill = std::vector<std::vector<Backend::ScaledCopy>>(size_t(ranks));
  auto regions = std::vector<std::vector<SlotRegion>>(size_t(ranks));
  struct Target {
    const std::string* module;
    const PlacedPair* pp;
    int64_t rank;
  };
  std::vector<std::vector<std::vector<Target>>> targets(active.size());  // [adapter][pair]
  for (size_t a = 0; a < active.size(); ++a) targets[a].resize(active[a].adapter->pairs.size());
  for (const auto& [module, s] : stacks) {
    const int64_t rank = flux_step_rank(module, tr_.config());
    for (const PlacedPair& pp : s.pairs) {
      targets[pp.adapter][pp.pair].push_back({&module, &pp, rank});
      ++waiting[size_t(rank)];
    }
  }
  std::vector<bool> open(size_t(ranks), false);
  LoraApplyReport r;
  r.gate_issued_ms.assign(size_t(ranks), -1.0);
  auto since_start = [&] {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  auto open_gate = [&](int64_t rank) {
    be.scaled_copy_batch(fill[size_t(rank)]);
    be.open_gate(int(rank));
    open[size_t(rank)] = true;
    r.gate_issued_ms[size_t(rank)] = since_start();
  };
  // Slot parts the last fill wrote and this one does not overwrite: cleared before any gate opens.
  std::set<SlotRegion> next;
  for (size_t a = 0; a < active.size(); ++a)
    for (size_t p = 0; p < targets[a].size(); ++p)
      for (const Target& t : targets[a][p]) {
        const auto [down, up] = slot_regions(*t.module, *t.pp, active[a].adapter->pairs[t.pp->pair]);
        next.insert(down);
        next.insert(up);
      }

  // Every device allocation before the gates shut (place(), the fill's descriptor list): one while they are shut may
  // wait for the step, which waits for the gates.
  std::vector<DeviceAdapter*> dev(active.size(), nullptr);
  try {
    for (size_t a = 0; a < active.size(); ++a) dev[a] = &place(active[a].adapter);
  } catch (...) {
    drop_unsent();
    throw;
  }
  r.host_marks_ms.emplace_back("placed", since_start());
  be.reserve_scaled_copies(2 * next.size());
  be.close_gates();      // the step waits at every gate from here on
  be.fork_side_queue();  // and the side queue starts behind the work before it (the previous step)
  r.host_marks_ms.emplace_back("gates closed", since_start());
  launch_step();
  r.host_marks_ms.emplace_back("step launched", since_start());
  try {
    be.on_side_queue([&] {
      for (const SlotRegion& old : filled_)
        if (!next.count(old)) be.zero(slot_region(old));
      for (int64_t k = 0; k < ranks; ++k)
        if (waiting[size_t(k)] == 0) open_gate(k);
      for (size_t a = 0; a < active.size(); ++a)
        send(*dev[a], r, [&](DeviceAdapter& d, size_t pair) {
          for (const Target& t : targets[a][pair]) {
            slot_fill(*t.module, *t.pp, d, fill[size_t(t.rank)], regions[size_t(t.rank)]);
            if (--waiting[size_t(t.rank)] == 0) open_gate(t.rank);
          }
        });
    });
  } catch (...) {
    // The step must not wait for ever: every gate opens (over part of the new adapters), then the previous ones
    // come back through the ordinary path, which clears whatever this fill wrote.
    be.on_side_queue([&] {
      for (int64_t k = 0; k < ranks; ++k)
        if (!open[size_t(k)]) be.open_gate(int(k));
    });
    be.join_side_queue();
    be.synchronize();
    drop_unsent();
    for (const auto& written : regions) filled_.insert(filled_.end(), written.begin(), written.end());
    std::sort(filled_.begin(), filled_.end());
    filled_.erase(std::unique(filled_.begin(), filled_.end()), filled_.end());
    const std::vector<ActiveLora> previous = active_;
    set_adapters(previous);
    throw;
  }
  r.host_marks_ms.emplace_back("fills issued", since_start());
  be.join_side_queue();
  filled_.clear();
  for (const auto& written : regions) filled_.insert(filled_.end(), written.begin(), written.end());
  active_ = active;
  evict_unused(active);
  r.host_marks_ms.emplace_back("evicted", since_start());
  finish_report(r, active, stacks, t0);
  return r;
}

}  // namespace fluxswap
