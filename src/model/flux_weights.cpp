#include "model/flux_weights.h"

#include <set>

#include "core/error.h"
#include "model/component_weights.h"
#include "model/flux_weight_map.h"

namespace fluxswap {

namespace {

Tensor take(std::map<std::string, Tensor>& m, const std::string& name) {
  auto it = m.find(name);
  if (it == m.end()) throw Error("internal weight '" + name + "' missing");
  return it->second;
}

Linear take_linear(std::map<std::string, Tensor>& m, const std::string& module) {
  Linear l;
  l.weight = take(m, module + ".weight");
  l.bias = take(m, module + ".bias");
  return l;
}

// Fills rows of `dst` (host, dst dtype) from the checkpoint according to `spec`.
void assemble(const FluxCheckpoint& ck, const WeightSpec& spec, Tensor& dst, std::set<std::string>& used) {
  const int64_t cols = spec.shape.size() == 2 ? spec.shape[1] : 1;
  int64_t rows_filled = 0;
  for (const WeightPart& part : spec.parts) {
    const std::string key = ck.prefix + part.key;
    Tensor src = float_tensor(ck.weights, key, "needed for " + spec.name);
    used.insert(key);
    const int64_t src_cols = src.ndim() == 2 ? src.size(1) : 1;
    const bool rank_ok = src.ndim() == int(spec.shape.size());
    if (!rank_ok || src_cols != cols || part.src_row + part.rows > src.size(0))
      throw Error(ck.weights_path + ": tensor '" + key + "' has shape " + shape_str(src.shape()) +
                  ", expected " + std::to_string(part.src_row + part.rows) + " rows" +
                  (cols > 1 || spec.shape.size() == 2 ? " of " + std::to_string(cols) : std::string()) +
                  " for " + spec.name + " of config " + ck.config_source);
    const size_t es = dtype_size(src.dtype()), des = dtype_size(dst.dtype());
    convert(src.dtype(), static_cast<const char*>(src.data()) + part.src_row * cols * es, dst.dtype(),
            static_cast<char*>(dst.data()) + part.row * cols * des, size_t(part.rows * cols));
    rows_filled += part.rows;
  }
  if (rows_filled != spec.shape[0])
    throw Error(ck.weights_path + ": internal error assembling " + spec.name);
}

}  // namespace

FluxWeights flux_weights_from_map(const FluxConfig& config, std::map<std::string, Tensor> m) {
  FluxWeights w;
  w.img_in = take_linear(m, "img_in");
  w.txt_in = take_linear(m, "txt_in");
  w.time_in = take_linear(m, "time_in.in_layer");
  w.time_out = take_linear(m, "time_in.out_layer");
  w.vector_in = take_linear(m, "vector_in.in_layer");
  w.vector_out = take_linear(m, "vector_in.out_layer");
  if (config.guidance_embeds) {
    w.guidance_in = take_linear(m, "guidance_in.in_layer");
    w.guidance_out = take_linear(m, "guidance_in.out_layer");
  }
  for (int64_t i = 0; i < config.num_layers; ++i) {
    const std::string p = "double_blocks." + std::to_string(i) + ".";
    DoubleBlockWeights b;
    b.img_mod = take_linear(m, p + "img_mod.lin");
    b.txt_mod = take_linear(m, p + "txt_mod.lin");
    b.img_qkv = take_linear(m, p + "img_attn.qkv");
    b.txt_qkv = take_linear(m, p + "txt_attn.qkv");
    b.img_q_norm = take(m, p + "img_attn.norm.query_norm.scale");
    b.img_k_norm = take(m, p + "img_attn.norm.key_norm.scale");
    b.txt_q_norm = take(m, p + "txt_attn.norm.query_norm.scale");
    b.txt_k_norm = take(m, p + "txt_attn.norm.key_norm.scale");
    b.img_proj = take_linear(m, p + "img_attn.proj");
    b.txt_proj = take_linear(m, p + "txt_attn.proj");
    b.img_mlp_in = take_linear(m, p + "img_mlp.0");
    b.img_mlp_out = take_linear(m, p + "img_mlp.2");
    b.txt_mlp_in = take_linear(m, p + "txt_mlp.0");
    b.txt_mlp_out = take_linear(m, p + "txt_mlp.2");
    w.double_blocks.push_back(std::move(b));
  }
  for (int64_t i = 0; i < config.num_single_layers; ++i) {
    const std::string p = "single_blocks." + std::to_string(i) + ".";
    SingleBlockWeights b;
    b.modulation = take_linear(m, p + "modulation.lin");
    b.linear1 = take_linear(m, p + "linear1");
    b.linear2 = take_linear(m, p + "linear2");
    b.q_norm = take(m, p + "norm.query_norm.scale");
    b.k_norm = take(m, p + "norm.key_norm.scale");
    w.single_blocks.push_back(std::move(b));
  }
  w.final_mod = take_linear(m, "final_layer.adaLN_modulation.1");
  w.final_linear = take_linear(m, "final_layer.linear");
  w.by_name = std::move(m);
  return w;
}

Linear& FluxWeights::linear(const std::string& module) {
  static const std::map<std::string, Linear FluxWeights::*> global = {
      {"img_in", &FluxWeights::img_in},
      {"txt_in", &FluxWeights::txt_in},
      {"time_in.in_layer", &FluxWeights::time_in},
      {"time_in.out_layer", &FluxWeights::time_out},
      {"vector_in.in_layer", &FluxWeights::vector_in},
      {"vector_in.out_layer", &FluxWeights::vector_out},
      {"guidance_in.in_layer", &FluxWeights::guidance_in},
      {"guidance_in.out_layer", &FluxWeights::guidance_out},
      {"final_layer.adaLN_modulation.1", &FluxWeights::final_mod},
      {"final_layer.linear", &FluxWeights::final_linear}};
  static const std::map<std::string, Linear DoubleBlockWeights::*> in_double = {
      {"img_mod.lin", &DoubleBlockWeights::img_mod},         {"txt_mod.lin", &DoubleBlockWeights::txt_mod},
      {"img_attn.qkv", &DoubleBlockWeights::img_qkv},        {"txt_attn.qkv", &DoubleBlockWeights::txt_qkv},
      {"img_attn.proj", &DoubleBlockWeights::img_proj},      {"txt_attn.proj", &DoubleBlockWeights::txt_proj},
      {"img_mlp.0", &DoubleBlockWeights::img_mlp_in},        {"img_mlp.2", &DoubleBlockWeights::img_mlp_out},
      {"txt_mlp.0", &DoubleBlockWeights::txt_mlp_in},        {"txt_mlp.2", &DoubleBlockWeights::txt_mlp_out}};
  static const std::map<std::string, Linear SingleBlockWeights::*> in_single = {
      {"modulation.lin", &SingleBlockWeights::modulation},
      {"linear1", &SingleBlockWeights::linear1},
      {"linear2", &SingleBlockWeights::linear2}};

  auto bad = [&] { return Error("'" + module + "' is not a linear module of this transformer"); };
  if (auto it = global.find(module); it != global.end()) {
    Linear& l = this->*(it->second);
    if (!l.weight.defined()) throw bad();
    return l;
  }
  // "<blocks>.<index>.<member>"
  auto block_member = [&](const std::string& prefix, size_t count) -> std::pair<size_t, std::string> {
    if (module.rfind(prefix, 0) != 0) return {count, ""};
    const size_t dot = module.find('.', prefix.size());
    if (dot == std::string::npos) return {count, ""};
    const std::string index = module.substr(prefix.size(), dot - prefix.size());
    if (index.empty() || index.find_first_not_of("0123456789") != std::string::npos || index.size() > 6)
      return {count, ""};
    return {std::stoul(index), module.substr(dot + 1)};
  };
  if (auto [i, member] = block_member("double_blocks.", double_blocks.size()); i < double_blocks.size())
    if (auto it = in_double.find(member); it != in_double.end()) return double_blocks[i].*(it->second);
  if (auto [i, member] = block_member("single_blocks.", single_blocks.size()); i < single_blocks.size())
    if (auto it = in_single.find(member); it != in_single.end()) return single_blocks[i].*(it->second);
  throw bad();
}

FluxWeights load_flux_weights(const FluxCheckpoint& ck, Backend& backend, WeightLoadReport* report) {
  std::map<std::string, Tensor> m;
  std::set<std::string> used;
  size_t bytes = 0;
  for (const WeightSpec& spec : flux_weight_specs(ck.config, ck.naming)) {
    Tensor host = Tensor::empty(backend.compute_dtype(), spec.shape);
    assemble(ck, spec, host, used);
    Tensor dev = backend.upload_weight(host);
    bytes += dev.nbytes();
    m.emplace(spec.name, std::move(dev));
  }
  if (report) {
    report->tensors_loaded = m.size();
    report->bytes_on_device = bytes;
    report->unused_keys.clear();
    for (const auto& k : ck.weights.keys())
      if (k.compare(0, ck.prefix.size(), ck.prefix) == 0 && !used.count(k)) report->unused_keys.push_back(k);
  }
  return flux_weights_from_map(ck.config, std::move(m));
}

std::vector<Linear*> block_token_linears(FluxWeights& w) {
  std::vector<Linear*> out;
  for (auto& b : w.double_blocks)
    for (Linear* l : {&b.img_qkv, &b.txt_qkv, &b.img_proj, &b.txt_proj, &b.img_mlp_in, &b.txt_mlp_in, &b.img_mlp_out,
                      &b.txt_mlp_out})
      out.push_back(l);
  for (auto& b : w.single_blocks) {
    out.push_back(&b.linear1);
    out.push_back(&b.linear2);
  }
  return out;
}

void quantize_linear_fp8(Linear& l, Backend& backend) {
  if (!l.weight_fp8.defined()) {
    l.weight_fp8 = backend.empty(DType::F8_E4M3, l.weight.shape());
    l.weight_scale = backend.empty(DType::F32, {l.weight.size(0)});
  }
  backend.quantize_fp8_rows(l.weight, l.weight_fp8, l.weight_scale);
}

}  // namespace fluxswap
