#include "model/flux_checkpoint.h"

#include <filesystem>
#include <set>

#include "core/error.h"
#include "io/json_config.h"
#include "model/component_weights.h"
#include "model/flux_weight_map.h"
#include "model/flux_weights.h"

namespace fluxswap {

namespace fsys = std::filesystem;

namespace {

// The weights inside a transformer folder: sharded index first (real FLUX.1 folders are sharded), else its only
// .safetensors file.
std::string transformer_weights_in_folder(const fsys::path& dir) {
  return weights_in_folder(dir.string(),
                           {"diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                            "model.safetensors.index.json", "model.safetensors"},
                           /*or_only_safetensors=*/true);
}

// Detects the naming and key prefix from a key that exists only in one naming.
void detect_naming(FluxCheckpoint& ck) {
  const std::pair<const char*, FluxNaming> markers[] = {{"img_in.weight", FluxNaming::BFL},
                                                       {"x_embedder.weight", FluxNaming::Diffusers}};
  for (const auto& key : ck.weights.keys())
    for (const auto& [suffix, naming] : markers) {
      const std::string s = suffix;
      if (key.size() >= s.size() && key.compare(key.size() - s.size(), s.size(), s) == 0) {
        const std::string prefix = key.substr(0, key.size() - s.size());
        if (!prefix.empty() && prefix.back() != '.') continue;
        ck.naming = naming;
        ck.prefix = prefix;
        return;
      }
    }
  throw Error(ck.weights_path +
              ": not a FLUX transformer checkpoint: found neither 'img_in.weight' (BFL naming) nor "
              "'x_embedder.weight' (diffusers naming) under any prefix");
}

// Whether any source tensor of a block linear's weight is stored in FP8 (other FP8 weights are just dequantised).
void detect_fp8_block_linears(FluxCheckpoint& ck) {
  std::set<std::string> block_weights;
  for (const auto& module : block_token_linear_names(ck.config)) block_weights.insert(module + ".weight");
  for (const WeightSpec& spec : flux_weight_specs(ck.config, ck.naming)) {
    if (!block_weights.count(spec.name)) continue;
    for (const WeightPart& part : spec.parts) {
      if (!ck.weights.contains(ck.prefix + part.key)) continue;  // (named when loading)
      const DType t = ck.weights.entry(ck.prefix + part.key).dtype;
      if (t == DType::F8_E4M3 || t == DType::F8_E5M2) {
        ck.fp8_linears = true;
        return;
      }
    }
  }
}

}  // namespace

std::string resolve_hf_cache_path(const std::string& path) {
  fsys::path p(path);
  if (!fsys::is_directory(p / "snapshots")) return path;
  std::string rev;
  if (fsys::exists(p / "refs" / "main")) {
    rev = read_text_file((p / "refs" / "main").string());
    while (!rev.empty() && (rev.back() == '\n' || rev.back() == ' ')) rev.pop_back();
  }
  if (!rev.empty() && fsys::is_directory(p / "snapshots" / rev)) return (p / "snapshots" / rev).string();
  std::vector<fsys::path> snaps;
  for (auto& e : fsys::directory_iterator(p / "snapshots"))
    if (e.is_directory()) snaps.push_back(e.path());
  if (snaps.size() != 1)
    throw Error(path + ": Hugging Face cache entry with " + std::to_string(snaps.size()) +
                " snapshots and no usable refs/main: pass the snapshot folder itself");
  return snaps[0].string();
}

FluxCheckpoint open_flux_checkpoint(const std::string& user_path) {
  FluxCheckpoint ck;
  ck.path = user_path;
  fsys::path p(resolve_hf_cache_path(user_path));
  if (!fsys::exists(p)) throw Error(user_path + ": no such file or folder");

  fsys::path config_path;
  if (fsys::is_directory(p)) {
    if (fsys::exists(p / "model_index.json") || fsys::is_directory(p / "transformer")) p = p / "transformer";
    if (!fsys::is_directory(p)) throw Error(user_path + ": pipeline folder without a transformer/ folder");
    ck.weights_path = transformer_weights_in_folder(p);
    config_path = p / "config.json";
  } else if (p.filename() == "config.json") {
    ck.weights_path = transformer_weights_in_folder(p.parent_path());
    config_path = p;
  } else {
    ck.weights_path = p.string();
    config_path = p.parent_path() / "config.json";  // optional beside a single file
  }
  ck.weights = SafetensorsCollection::open(ck.weights_path);
  detect_naming(ck);

  if (fsys::exists(config_path)) {
    ck.config = FluxConfig::from_json_file(config_path.string());
    ck.config_source = config_path.string();
  } else {
    ck.config = infer_flux_config(
        ck.naming,
        [&](const std::string& k) -> std::optional<Shape> {
          if (!ck.weights.contains(ck.prefix + k)) return std::nullopt;
          return ck.weights.entry(ck.prefix + k).shape;
        },
        ck.weights_path);
    ck.config_source = "inferred from tensor shapes";
  }
  detect_fp8_block_linears(ck);
  return ck;
}

}  // namespace fluxswap
