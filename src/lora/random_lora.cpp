#include "lora/random_lora.h"

#include <cmath>
#include <filesystem>
#include <thread>

#include "core/counter_rng.h"
#include "io/safetensors.h"
#include "model/flux_weight_map.h"

namespace fluxswap {

namespace {

// Fills a bf16 tensor with normal(0, std) on all cores: FLUX.1-dev's rank-64 adapter has ~340M values.
void fill_bf16(Tensor& t, uint64_t seed, float std) {
  const int64_t n = t.numel();
  const unsigned workers = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < workers; ++w)
    pool.emplace_back([&, w] {
      for (int64_t i = w; i < n; i += workers) t.ptr<uint16_t>()[i] = f32_to_bf16(std * normal_from_counter(seed, uint64_t(i)));
    });
  for (auto& th : pool) th.join();
}

// The block linears, as diffusers' benchmarks target them.
bool is_block_linear(const ModuleAlias& a) {
  return a.source.rfind("transformer_blocks.", 0) == 0 || a.source.rfind("single_transformer_blocks.", 0) == 0;
}

// Internal linear module -> its weight's [out, in].
std::map<std::string, Shape> linear_weight_shapes(const FluxConfig& config) {
  std::map<std::string, Shape> shapes;
  for (const auto& spec : flux_weight_specs(config, FluxNaming::BFL))
    if (spec.shape.size() == 2) shapes[spec.name.substr(0, spec.name.size() - 7)] = spec.shape;  // ".weight"
  return shapes;
}

}  // namespace

uint64_t random_lora_data_bytes(const FluxConfig& config, int64_t rank) {
  const std::map<std::string, Shape> weight_shape = linear_weight_shapes(config);
  uint64_t elements = 0;
  for (const ModuleAlias& a : flux_diffusers_aliases(config))
    if (is_block_linear(a))
      elements += uint64_t(rank) * uint64_t(weight_shape.at(a.module)[1] + a.rows);
  return elements * 2;  // bf16
}

size_t write_random_lora(const std::string& path, const FluxConfig& config, int64_t rank, uint64_t seed) {
  const std::map<std::string, Shape> weight_shape = linear_weight_shapes(config);
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::string targets;
  uint64_t stream = seed * 7919;
  for (const ModuleAlias& a : flux_diffusers_aliases(config)) {
    if (!is_block_linear(a)) continue;
    const int64_t in = weight_shape.at(a.module)[1];
    Tensor down = Tensor::empty(DType::BF16, {rank, in}), up = Tensor::empty(DType::BF16, {a.rows, rank});
    fill_bf16(down, ++stream, 1.0f / std::sqrt(float(in)));
    fill_bf16(up, ++stream, 0.02f);
    tensors.emplace_back("transformer." + a.source + ".lora_A.weight", down);
    tensors.emplace_back("transformer." + a.source + ".lora_B.weight", up);
    targets += std::string(targets.empty() ? "" : ", ") + "\"" + a.source + "\"";
  }
  const std::string meta = "{\"transformer.r\": " + std::to_string(rank) + ", \"transformer.lora_alpha\": " +
                           std::to_string(rank) + ", \"transformer.target_modules\": [" + targets + "]}";
  write_safetensors(path, tensors, {{"format", "pt"}, {"lora_adapter_metadata", meta}});
  return std::filesystem::file_size(path);
}

}  // namespace fluxswap
