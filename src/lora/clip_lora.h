#pragma once
// The CLIP-L text encoder's share of a set of weighted adapters (LoraAdapter::clip_pairs) as ClipTextModel's LoRA
// branches: per linear, the adapters' downs stacked along the rank and their ups side by side, each in its
// projection's rows with weight x scale folded in (the layout lora_stack gives the transformer). Built on the host in
// float32, since CLIP's LoRAs are a few MB, and uploaded. The encoder runs once per prompt, so a branch beside the
// linear costs nothing that matters and needs no base copy: in either LoRA mode, a swap is an upload.
#include <cstddef>
#include <functional>
#include <vector>

#include "lora/lora_stack.h"
#include "model/clip_text_model.h"

namespace fluxswap {

struct ClipLoraSet {
  std::vector<ClipLoraLinear> linears;
  size_t pairs = 0;    // low-rank updates
  size_t tensors = 0;  // LoRA file tensors they came from
};

// Checks every CLIP pair of `active` against `clip` (layer in range, rows and input width of its projection: Error
// naming the file and key), waits for its tensors in files still being read and checks their values, and uploads.
// Changes nothing in `clip`: ClipTextModel::set_lora installs the result, so a caller can check the transformer's set
// first.
ClipLoraSet prepare_clip_loras(const std::vector<ActiveLora>& active, ClipTextModel& clip);

struct ClipLoraReport {
  size_t pairs = 0, tensors = 0, linears = 0;
};
// A whole pipeline's LoRA set: prepare_clip_loras, then `set_transformer` (which sets the same adapters on the
// transformer), then CLIP's branches installed. An Error from either step leaves CLIP as it was.
ClipLoraReport set_loras_with_clip(ClipTextModel& clip, const std::vector<ActiveLora>& active,
                                   const std::function<void()>& set_transformer);

}  // namespace fluxswap
