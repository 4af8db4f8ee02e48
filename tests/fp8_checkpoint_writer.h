#pragma once
// Writes FP8 single-file checkpoints from the tiny fixture transformer for the FP8-checkpoint tests (CPU and CUDA):
// the block linears and a few others as per-tensor e4m3, in BFL names, optionally in ComfyUI's "scaled fp8" form.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/flux_weights.h"
#include "quant/fp8.h"
#include "test_support.h"

namespace fluxswap::test {

// One linear weight as the file stores it: e4m3 codes of W / scale.
struct Quantised {
  Tensor codes;  // F8_E4M3, the weight's shape
  float scale = 1.0f;
};

// Per-tensor quantisation as ComfyUI's scaled fp8 does it (scale = amax / 448), or none (scale 1: the codes are the
// weights rounded to e4m3).
inline Quantised quantise(const Tensor& w, bool scaled) {
  const Tensor f = w.to_f32();
  float amax = 0.0f;
  for (int64_t i = 0; i < f.numel(); ++i) amax = std::max(amax, std::fabs(f.ptr<float>()[i]));
  Quantised q{Tensor::empty(DType::F8_E4M3, w.shape()), scaled ? amax / quant::kE4m3Max : 1.0f};
  const float inv = 1.0f / q.scale;
  for (int64_t i = 0; i < f.numel(); ++i) q.codes.ptr<uint8_t>()[i] = quant::e4m3_from_f32(f.ptr<float>()[i] * inv);
  return q;
}

// Linears FP8 mode does not run in FP8 but that such files store in FP8 too: they are dequantised at load. (Not
// img_in or final_layer.linear: one e4m3 scale over those costs the model as much as all block linears together.)
inline const std::vector<std::string> kOtherFp8Linears = {"double_blocks.0.img_mod.lin", "single_blocks.1.modulation.lin"};

struct Fp8File {
  std::string path;
  std::map<std::string, Quantised> modules;  // by internal module name
};

// The tiny fixture (BFL names) with the block linears and kOtherFp8Linears in FP8; `scaled` adds ComfyUI's
// `.scale_weight` (alternately [] and [1]), `.scale_input` and the `scaled_fp8` marker. `edit` may replace a tensor
// before it is written (error cases).
inline Fp8File write_fp8_checkpoint(const std::string& dir, bool scaled, const std::string& prefix,
                                    const std::function<Tensor(const std::string&, Tensor)>& edit = nullptr) {
  const std::string fx = test::fixtures_dir() + "/tiny";
  std::filesystem::copy_file(fx + "/config.json", dir + "/config.json",
                             std::filesystem::copy_options::overwrite_existing);
  const FluxConfig config = FluxConfig::from_json_file(fx + "/config.json");
  std::set<std::string> fp8;
  for (const auto& m : block_token_linear_names(config)) fp8.insert(m);
  fp8.insert(kOtherFp8Linears.begin(), kOtherFp8Linears.end());

  Fp8File out{dir + "/flux-fp8.safetensors", {}};
  auto src = SafetensorsFile::open(fx + "/transformer_bfl.safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors;
  auto put = [&](const std::string& key, Tensor t) { tensors.emplace_back(prefix + key, edit ? edit(key, t) : t); };
  int n = 0;
  for (const auto& key : src->keys()) {
    const std::string module = key.substr(0, key.rfind('.'));
    if (!fp8.count(module) || key != module + ".weight") {
      put(key, src->tensor(key));
      continue;
    }
    const Quantised q = quantise(src->tensor(key), scaled);
    out.modules[module] = q;
    put(key, q.codes);
    if (!scaled) continue;
    Tensor s = Tensor::empty(DType::F32, n++ % 2 ? Shape{1} : Shape{});
    s.ptr<float>()[0] = q.scale;
    put(module + ".scale_weight", s);
    Tensor in_scale = Tensor::empty(DType::F32, {});
    in_scale.ptr<float>()[0] = 1.0f;
    put(module + ".scale_input", in_scale);
  }
  if (scaled) put("scaled_fp8", Tensor::empty(DType::F8_E4M3, {0}));
  write_safetensors(out.path, tensors);
  return out;
}

}  // namespace fluxswap::test
