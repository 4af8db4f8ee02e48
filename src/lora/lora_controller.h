#pragma once
// Applies a set of weighted LoRA adapters to a loaded transformer, in one of two modes:
//  - Merged: W = W_base + up @ down written into the working weights; the base of every touched module is kept
//    (on the device) so a swap re-merges from it and an unload restores it bit for bit. No per-step cost.
//  - Runtime: every slotted linear computes W x + up (down x) from fixed-size slots; a swap only rewrites slot
//    contents, so buffers, pointers and any recorded CUDA graph stay valid.
// Adapters are uploaded once (as they are in the file, no host-side conversion) and the most recently used ones stay
// on the device, so swapping between them copies nothing from the host. An adapter whose file is still being read
// (start_loading_lora_adapter) is uploaded chunk by chunk as it lands, into its own device memory; in merged mode
// each module is merged as soon as its pairs are sent, under the rest of the read. set_adapters() is all-or-nothing:
// on any validation error, a NaN/Inf found in the last chunk of a file included, the model is left as it was
// (runtime mode writes nothing before every active adapter is on the device and checked; merged mode re-merges
// what the last successful call set, bit for bit).
#include <chrono>
#include <functional>
#include <list>
#include <set>
#include <string>
#include <vector>

#include "lora/lora_stack.h"
#include "lora/streamed_upload.h"
#include "model/flux_transformer.h"

namespace fluxswap {

enum class LoraMode { Merged, Runtime };

struct LoraApplyReport {
  size_t adapters = 0;
  size_t pairs = 0;    // low-rank updates applied
  size_t tensors = 0;  // LoRA file tensors they came from
  size_t modules = 0;  // internal linear modules changed
  double seconds = 0;
  // Of `seconds`, the time spent blocked on adapter files still being read (start_loading_lora_adapter), and the
  // host -> device batches their uploads went in.
  double file_wait_seconds = 0;
  size_t upload_batches = 0;
  // Merged mode: modules merged while the file of an adapter they take was still being read.
  size_t merged_while_reading = 0;
  // swap_under_next_step: host ms from the call's start to each point it passed ("placed", "step launched", ...), and
  // to each step gate's opening being issued (per gate; -1: never).
  std::vector<std::pair<const char*, double>> host_marks_ms;
  std::vector<double> gate_issued_ms;
};

class LoraController {
 public:
  // Runtime mode gives each module in `slot_modules` (default: every linear module) a slot of rank
  // max_rank x (number of separately-adaptable projections fused in it: 3 for qkv, 4 for linear1), so a rank
  // max_rank LoRA fits whether it targets the fused module or its q/k/v parts.
  LoraController(FluxTransformer& transformer, LoraMode mode, int64_t max_rank = 64,
                 std::vector<std::string> slot_modules = {});
  // Gives the model back as it was: merged weights restored, runtime slots removed (record a new graph after).
  ~LoraController();
  LoraController(const LoraController&) = delete;
  LoraController& operator=(const LoraController&) = delete;

  LoraApplyReport set_adapters(const std::vector<ActiveLora>& active);
  void clear() { set_adapters({}); }
  // Runtime mode on a backend with step gates: set_adapters run under the next step instead of before it. Checks
  // what set_adapters checks, issues launch_step() (the recorded step) while the files are still being read, then
  // uploads and fills the slots in the order the step reads them, opening each block's gate once its slots are
  // filled, so the step waits only where it overtakes the read. Returns once everything is issued and the files are
  // in and checked (the step may still be running, unless an adapter beyond the cache's capacity was evicted: freeing
  // its device memory waits for the step). A NaN/Inf or read error found after the step was launched
  // opens every gate, refills the previous adapters and throws: that step's output is not to be used. Other modes
  // and backends: set_adapters, then launch_step(). launch_step must only issue work (a graph replay), never wait
  // for it: the step waits for fills this call issues after it returns.
  LoraApplyReport swap_under_next_step(const std::vector<ActiveLora>& active, const std::function<void()>& launch_step);

  LoraMode mode() const { return mode_; }
  int64_t slot_rank(const std::string& module) const;
  // How many uploaded adapters besides the active ones stay on the device for instant swaps back (default 2).
  void set_cache_capacity(size_t adapters) { cache_capacity_ = adapters; }
  // Bytes of a file still being read gathered before each host -> device transfer (default 16 MiB: large enough to
  // keep the bus busy, small enough that little is left to send after the last chunk lands).
  void set_upload_batch_bytes(size_t bytes) { upload_batch_bytes_ = bytes; }

 private:
  // An adapter's pairs on the device, in the backend's compute dtype.
  struct DeviceAdapter {
    std::shared_ptr<const LoraAdapter> adapter;
    std::vector<Tensor> down, up, bias;
    uint64_t last_use = 0;
    // Placed on the device but not sent yet (place()): the copies still to make, and the pair of each.
    bool sent = true;
    HostToDevice to_send;
    std::vector<size_t> to_send_pair;
  };
  // Called once per pair of an uploaded adapter when all of its tensors are on their way to the device (at once
  // for an adapter already there).
  using PairSent = std::function<void(DeviceAdapter&, size_t pair)>;
  DeviceAdapter& upload(const std::shared_ptr<const LoraAdapter>& adapter, LoraApplyReport& report,
                        const PairSent& on_pair_sent);
  // upload() in two steps: place() allocates the adapter's device memory (or finds it in the cache), send() makes
  // the copies as the file arrives. A swap under the step allocates before the step is launched: a device
  // allocation or free while gates are shut could wait for the step, which waits for the gates.
  DeviceAdapter& place(const std::shared_ptr<const LoraAdapter>& adapter);
  void send(DeviceAdapter& d, LoraApplyReport& report, const PairSent& on_pair_sent);
  void drop_unsent();  // the adapters placed but never sent (after a failure)
  void evict_unused(const std::vector<ActiveLora>& active);
  void check_stacks(const std::map<std::string, ModuleStack>& stacks) const;
  void finish_report(LoraApplyReport& r, const std::vector<ActiveLora>& active,
                     const std::map<std::string, ModuleStack>& stacks, std::chrono::steady_clock::time_point t0) const;
  void merge_as_uploaded(const std::vector<ActiveLora>& active, const std::map<std::string, ModuleStack>& stacks,
                         std::vector<DeviceAdapter*>& dev, LoraApplyReport& report);
  // Keeps the base of every module the stacks touch and restores the others; merge_module then writes one.
  void begin_merge(const std::map<std::string, ModuleStack>& stacks);
  void merge_module(const std::string& module, const ModuleStack& s, const std::vector<DeviceAdapter*>& dev);
  void apply_runtime(const std::map<std::string, ModuleStack>& stacks, const std::vector<DeviceAdapter*>& dev);

  FluxTransformer& tr_;
  LoraMode mode_;
  std::map<std::string, Tensor> base_weight_, base_bias_;  // merged: copies of touched modules' base values
  std::set<std::string> changed_;                          // merged: modules that currently differ from the base
  std::vector<ActiveLora> active_;                         // what the last successful set_adapters set
  // Runtime: the parts of slots the last fill wrote (all else in the slots is zero), by module, so that a slot the
  // transformer moved since (block streaming splits [W | up]) is still found.
  struct SlotRegion {
    std::string module;
    bool up = false;
    int64_t row = 0, rows = 0, col = 0, cols = 0;
    auto operator<=>(const SlotRegion&) const = default;
  };
  Tensor slot_region(const SlotRegion& r);
  // The parts of `module`'s slot that pair p, placed as pp, fills: its down's rank rows and its up's rank columns.
  static std::pair<SlotRegion, SlotRegion> slot_regions(const std::string& module, const PlacedPair& pp,
                                                        const LoraPair& p);
  // The scaled copies that put pair pp (of adapter d, placed in `module`'s stack) into the module's slot.
  void slot_fill(const std::string& module, const PlacedPair& pp, const DeviceAdapter& d,
                 std::vector<Backend::ScaledCopy>& fill, std::vector<SlotRegion>& regions);
  std::vector<SlotRegion> filled_;
  std::list<DeviceAdapter> cache_;  // a list: set_adapters holds pointers to entries while adding more
  size_t cache_capacity_ = 2;
  size_t upload_batch_bytes_ = size_t(16) << 20;
  uint64_t uses_ = 0;
};

LoraMode lora_mode_from_name(const std::string& name);  // "merged" | "runtime"

}  // namespace fluxswap
