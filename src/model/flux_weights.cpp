#include "model/flux_weights.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <set>
#include <thread>

#include "core/error.h"
#include "model/component_weights.h"
#include "model/flux_weight_map.h"
#include "quant/fp8.h"

namespace fluxswap {

namespace {

Tensor take(std::map<std::string, Tensor>& m, const std::string& name) {
  auto it = m.find(name);
  if (it == m.end()) throw Error("internal weight '" + name + "' missing");
  return it->second;
}

Linear take_linear(std::map<std::string, Tensor>& m, const std::string& module) {
  Linear l;
  if (m.count(module + ".weight_fp8")) {
    l.weight_fp8 = take(m, module + ".weight_fp8");
    l.weight_scale = take(m, module + ".weight_scale");
  } else {
    l.weight = take(m, module + ".weight");
  }
  l.bias = take(m, module + ".bias");
  return l;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The source tensor of one part, checked to hold the rows the part takes.
Tensor source_part(const FluxCheckpoint& ck, const WeightSpec& spec, const WeightPart& part,
                   std::set<std::string>& used) {
  const int64_t cols = spec.shape.size() == 2 ? spec.shape[1] : 1;
  const std::string key = ck.prefix + part.key;
  Tensor src = float_tensor(ck.weights, key, "needed for " + spec.name);
  used.insert(key);
  const int64_t src_cols = src.ndim() == 2 ? src.size(1) : 1;
  const bool rank_ok = src.ndim() == int(spec.shape.size());
  if (!rank_ok || src_cols != cols || part.src_row + part.rows > src.size(0))
    throw Error(ck.weights_path + ": tensor '" + key + "' has shape " + shape_str(src.shape()) + ", expected " +
                std::to_string(part.src_row + part.rows) + " rows" +
                (cols > 1 || spec.shape.size() == 2 ? " of " + std::to_string(cols) : std::string()) + " for " +
                spec.name + " of config " + ck.config_source);
  return src;
}

// The per-tensor scale of a linear weight: ComfyUI's "scaled fp8" files store W / s and s beside it as
// `<module>.scale_weight`; without one the stored values are the weights (s = 1).
float weight_scale_of(const FluxCheckpoint& ck, const WeightSpec& spec, const WeightPart& part,
                      std::set<std::string>& used) {
  if (spec.shape.size() != 2 || !ends_with(part.key, ".weight")) return 1.0f;
  const std::string weight_key = ck.prefix + part.key;
  const std::string key = weight_key.substr(0, weight_key.size() - 7) + ".scale_weight";
  if (!ck.weights.contains(key)) return 1.0f;
  used.insert(key);
  const Tensor s = ck.weights.tensor(key);
  if (!dtype_is_float(s.dtype()) || s.ndim() > 1 || s.numel() != 1)
    throw Error(ck.weights_path + ": tensor '" + key + "' is " + std::string(dtype_name(s.dtype())) + " " +
                shape_str(s.shape()) + ", expected a float scalar or [1] (the per-tensor scale of '" + weight_key +
                "')");
  const float v = s.to_f32().ptr<float>()[0];
  if (!std::isfinite(v) || !(v > 0.0f))
    throw Error(ck.weights_path + ": tensor '" + key + "' is " + std::to_string(v) +
                ", expected a finite positive scale for '" + weight_key + "'");
  return v;
}

// Runs fn(first, end) over blocks of rows [0, rows), on all cores when there is more than one block: FLUX.1-dev's
// FP8 modulation weights alone are 3.2B values to dequantise, seconds on one core.
void for_row_blocks(int64_t rows, int64_t cols, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t per_block = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(cols, 1));
  const int64_t blocks = (rows + per_block - 1) / per_block;
  const int64_t threads = std::min<int64_t>(blocks, std::max(1u, std::thread::hardware_concurrency()));
  if (threads <= 1) return fn(0, rows);
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      for (int64_t b = next++; b < blocks; b = next++) fn(b * per_block, std::min(rows, (b + 1) * per_block));
    });
  for (auto& t : pool) t.join();
}

// Rows [first, end) of a source part (relative to part.src_row) as float32 values times scale.
void scaled_rows(const Tensor& src, int64_t first, int64_t end, int64_t cols, float scale, std::vector<float>& v) {
  v.resize(size_t((end - first) * cols));
  const char* p = static_cast<const char*>(src.data()) + first * cols * int64_t(dtype_size(src.dtype()));
  if (src.dtype() == DType::F8_E4M3) {  // quant's table: the generic conversion computes each code
    for (size_t i = 0; i < v.size(); ++i) v[i] = quant::e4m3_to_f32(uint8_t(p[i])) * scale;
    return;
  }
  convert_to_f32(src.dtype(), p, v.data(), v.size());
  if (scale != 1.0f)
    for (float& x : v) x *= scale;
}

// Fills rows of `dst` (host, dst dtype) from the checkpoint according to `spec`, dequantising FP8 weights.
void assemble(const FluxCheckpoint& ck, const WeightSpec& spec, Tensor& dst, std::set<std::string>& used) {
  const int64_t cols = spec.shape.size() == 2 ? spec.shape[1] : 1;
  const size_t ss_dst = dtype_size(dst.dtype());
  int64_t rows_filled = 0;
  for (const WeightPart& part : spec.parts) {
    const Tensor src = source_part(ck, spec, part, used);
    const float scale = weight_scale_of(ck, spec, part, used);
    const size_t ss = dtype_size(src.dtype());
    const bool plain = scale == 1.0f && src.dtype() != DType::F8_E4M3;
    for_row_blocks(part.rows, cols, [&](int64_t first, int64_t end) {
      char* out = static_cast<char*>(dst.data()) + (part.row + first) * cols * int64_t(ss_dst);
      if (plain) {
        convert(src.dtype(), static_cast<const char*>(src.data()) + (part.src_row + first) * cols * int64_t(ss),
                dst.dtype(), out, size_t((end - first) * cols));
        return;
      }
      std::vector<float> v;
      scaled_rows(src, part.src_row + first, part.src_row + end, cols, scale, v);
      convert_from_f32(v.data(), dst.dtype(), out, v.size());
    });
    rows_filled += part.rows;
  }
  if (rows_filled != spec.shape[0])
    throw Error(ck.weights_path + ": internal error assembling " + spec.name);
}

// The e4m3 rows and per-row scales of a block linear. E4M3 sources keep their bytes (a per-tensor scale is one
// scale per row, repeated); others are quantised per row as FP8 mode would quantise a bf16 weight.
void assemble_fp8(const FluxCheckpoint& ck, const WeightSpec& spec, Tensor& q, Tensor& scales,
                  std::set<std::string>& used) {
  const int64_t cols = spec.shape[1];
  int64_t rows_filled = 0;
  for (const WeightPart& part : spec.parts) {
    const Tensor src = source_part(ck, spec, part, used);
    const float scale = weight_scale_of(ck, spec, part, used);
    for_row_blocks(part.rows, cols, [&](int64_t first, int64_t end) {
      uint8_t* out = q.ptr<uint8_t>() + (part.row + first) * cols;
      float* out_scales = scales.ptr<float>() + part.row + first;
      if (src.dtype() == DType::F8_E4M3) {
        std::memcpy(out, src.ptr<uint8_t>() + (part.src_row + first) * cols, size_t((end - first) * cols));
        std::fill(out_scales, out_scales + (end - first), scale);
        return;
      }
      std::vector<float> v;
      scaled_rows(src, part.src_row + first, part.src_row + end, cols, scale, v);
      quant::quantize_rows_e4m3(v.data(), cols, end - first, cols, out, cols, out_scales);
    });
    rows_filled += part.rows;
  }
  if (rows_filled != spec.shape[0])
    throw Error(ck.weights_path + ": internal error assembling " + spec.name);
}

// The tensor on the backend's device with its dtype and bytes as they are: upload_weight and copy_from_host convert
// through float32, which has no way to e4m3, while the batched upload moves same-dtype tensors byte for byte. The
// CPU backend computes on host memory.
Tensor upload_as_is(Backend& backend, const Tensor& host) {
  if (backend.device() == Device::CPU) return host;
  Tensor dev = backend.empty(host.dtype(), host.shape());
  backend.copy_from_host_batch({{host, dev}});
  return dev;
}

// ComfyUI keys that carry nothing the engine uses: activation scales, and the marker of a scaled-fp8 file.
bool ignored_key(const FluxCheckpoint& ck, const std::string& key) {
  return ends_with(key, ".scale_input") || key == ck.prefix + "scaled_fp8";
}

std::vector<std::string> token_linear_names(size_t double_blocks, size_t single_blocks) {
  std::vector<std::string> out;
  for (size_t i = 0; i < double_blocks; ++i) {
    const std::string p = "double_blocks." + std::to_string(i) + ".";
    for (const char* m : {"img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "txt_mlp.0",
                          "img_mlp.2", "txt_mlp.2"})
      out.push_back(p + m);
  }
  for (size_t i = 0; i < single_blocks; ++i) {
    const std::string p = "single_blocks." + std::to_string(i) + ".";
    out.push_back(p + "linear1");
    out.push_back(p + "linear2");
  }
  return out;
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
  for (const auto& [name, t] : m)
    if (ends_with(name, ".weight_fp8")) w.fp8_only = true;
  w.by_name = std::move(m);
  return w;
}

std::vector<Linear*> FluxWeights::block_linears(size_t b) {
  if (b < double_blocks.size()) {
    DoubleBlockWeights& d = double_blocks[b];
    return {&d.img_mod, &d.txt_mod, &d.img_qkv, &d.txt_qkv, &d.img_proj, &d.txt_proj, &d.img_mlp_in, &d.txt_mlp_in,
            &d.img_mlp_out, &d.txt_mlp_out};
  }
  SingleBlockWeights& sb = single_blocks.at(b - double_blocks.size());
  return {&sb.modulation, &sb.linear1, &sb.linear2};
}

namespace {
void add_linear_tensors(std::vector<Tensor*>& out, Linear& l) {
  out.insert(out.end(), {&l.weight, &l.bias, &l.weight_fp8, &l.weight_scale});
}
}  // namespace

std::vector<std::vector<Tensor*>> FluxWeights::block_tensors() {
  std::vector<std::vector<Tensor*>> out(double_blocks.size() + single_blocks.size());
  for (size_t b = 0; b < out.size(); ++b) {
    for (Linear* l : block_linears(b)) add_linear_tensors(out[b], *l);
    if (b < double_blocks.size()) {
      DoubleBlockWeights& d = double_blocks[b];
      out[b].insert(out[b].end(), {&d.img_q_norm, &d.img_k_norm, &d.txt_q_norm, &d.txt_k_norm});
    } else {
      SingleBlockWeights& sb = single_blocks[b - double_blocks.size()];
      out[b].insert(out[b].end(), {&sb.q_norm, &sb.k_norm});
    }
  }
  return out;
}

std::vector<Linear*> FluxWeights::shared_linears() {
  return {&img_in, &txt_in, &time_in, &time_out, &vector_in, &vector_out, &guidance_in, &guidance_out, &final_mod,
          &final_linear};
}

std::vector<Tensor*> FluxWeights::shared_tensors() {
  std::vector<Tensor*> out;
  for (Linear* l : shared_linears()) add_linear_tensors(out, *l);
  return out;
}

std::vector<Tensor*> FluxWeights::device_tensors() {
  std::vector<Tensor*> out = shared_tensors();
  for (const auto& block : block_tensors()) out.insert(out.end(), block.begin(), block.end());
  return out;
}

void FluxWeights::forget(const Tensor& t) {
  if (t.defined()) std::erase_if(by_name, [&](const auto& kv) { return kv.second.data() == t.data(); });
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
    // (An optional module, schnell's guidance embedder, is absent when its tensors are, unless all are away.)
    if (!offloaded && !l.weight.defined() && !l.weight_fp8.defined()) throw bad();
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

FluxWeights load_flux_weights(const FluxCheckpoint& ck, Backend& backend, WeightLoadReport* report,
                              const std::vector<bool>& keep_on_host) {
  auto on_host = [&](const std::string& name) {
    size_t block = 0;
    return flux_block_index(name, ck.config, &block) && block < keep_on_host.size() && keep_on_host[block];
  };
  std::set<std::string> fp8_weights;  // internal names of the weights loaded as FP8
  if (ck.fp8_linears)
    for (const auto& module : block_token_linear_names(ck.config)) fp8_weights.insert(module + ".weight");
  std::map<std::string, Tensor> m;
  std::set<std::string> used;
  size_t bytes = 0;
  for (const WeightSpec& spec : flux_weight_specs(ck.config, ck.naming)) {
    const bool host = on_host(spec.name);
    auto place = [&](const std::string& name, const Tensor& t, Tensor dev) {
      bytes += host ? 0 : dev.nbytes();
      m.emplace(name, host ? t : std::move(dev));
    };
    if (fp8_weights.count(spec.name)) {
      const std::string module = spec.name.substr(0, spec.name.size() - 7);
      Tensor q = Tensor::empty(DType::F8_E4M3, spec.shape), scales = Tensor::empty(DType::F32, {spec.shape[0]});
      assemble_fp8(ck, spec, q, scales, used);
      for (const auto& [name, t] : {std::pair{module + ".weight_fp8", q}, {module + ".weight_scale", scales}})
        place(name, t, host ? Tensor() : upload_as_is(backend, t));
      continue;
    }
    Tensor t = Tensor::empty(backend.compute_dtype(), spec.shape);
    assemble(ck, spec, t, used);
    place(spec.name, t, host ? Tensor() : backend.upload_weight(t));
  }
  if (report) {
    report->tensors_loaded = m.size();
    report->bytes_on_device = bytes;
    report->unused_keys.clear();
    for (const auto& k : ck.weights.keys())
      if (k.compare(0, ck.prefix.size(), ck.prefix) == 0 && !used.count(k) && !ignored_key(ck, k))
        report->unused_keys.push_back(k);
  }
  return flux_weights_from_map(ck.config, std::move(m));
}

std::vector<std::string> block_token_linear_names(const FluxConfig& config) {
  return token_linear_names(size_t(config.num_layers), size_t(config.num_single_layers));
}

std::vector<Linear*> modulation_linears(FluxWeights& w) {
  std::vector<Linear*> out;
  for (auto& b : w.double_blocks) out.insert(out.end(), {&b.img_mod, &b.txt_mod});
  for (auto& b : w.single_blocks) out.push_back(&b.modulation);
  out.push_back(&w.final_mod);
  return out;
}

std::vector<Linear*> block_token_linears(FluxWeights& w) {
  std::vector<Linear*> out;
  for (const auto& module : token_linear_names(w.double_blocks.size(), w.single_blocks.size()))
    out.push_back(&w.linear(module));
  return out;
}

void quantize_linear_fp8(Linear& l, Backend& backend) {
  if (!l.weight.defined())
    throw Error("this linear exists only in FP8 (the model was loaded from an FP8 checkpoint): there is no bf16 "
                "weight to quantise");
  if (l.weight.device() == Device::CPU && backend.device() != Device::CPU) {
    const Tensor w = l.weight.to_f32();
    const int64_t rows = w.size(0), cols = w.size(1);
    l.weight_fp8 = Tensor::empty(DType::F8_E4M3, w.shape());
    l.weight_scale = Tensor::empty(DType::F32, {rows});
    quant::quantize_rows_e4m3(w.ptr<float>(), cols, rows, cols, l.weight_fp8.ptr<uint8_t>(), cols,
                              l.weight_scale.ptr<float>());
    return;
  }
  if (!l.weight_fp8.defined()) {
    l.weight_fp8 = backend.empty(DType::F8_E4M3, l.weight.shape());
    l.weight_scale = backend.empty(DType::F32, {l.weight.size(0)});
  }
  backend.quantize_fp8_rows(l.weight, l.weight_fp8, l.weight_scale);
}

}  // namespace fluxswap
