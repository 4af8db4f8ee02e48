// Reading a LoRA file of any supported format into a LoraAdapter: split every key into (stem, role), detect the
// format in the order LORA_FORMATS.md gives, place each stem on the internal layout (lora_key_mapping), then
// validate and convert each down/up pair. Every key ends up in a pair, in ignored_keys, or in an Error.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <string_view>
#include <thread>
#include <tuple>

#include "core/error.h"
#include "lora/lora_adapter.h"
#include "model/flux_step_order.h"
#include "lora/lora_key_mapping.h"
#include "lora/lora_scaling.h"
#include "lora/text_encoder_lora_keys.h"

namespace fluxswap {

namespace {

enum class Role { Down, Up, Alpha, UpBias };

const char* role_name(Role r) {
  switch (r) {
    case Role::Down: return "down (lora_down/lora_A) tensor";
    case Role::Up: return "up (lora_up/lora_B) tensor";
    case Role::Alpha: return "alpha";
    case Role::UpBias: return "up bias (lora_B.bias)";
  }
  return "?";
}

// The suffixes that give a tensor its role; `partner` is the other half of its down/up pair in the same spelling,
// so a message can name the key that is missing.
struct Suffix {
  std::string_view text;
  Role role;
  std::string_view partner;
};
constexpr Suffix kSuffixes[] = {
    {".lora_down.weight", Role::Down, ".lora_up.weight"},
    {".lora_up.weight", Role::Up, ".lora_down.weight"},
    {".lora_A.weight", Role::Down, ".lora_B.weight"},
    {".lora_B.weight", Role::Up, ".lora_A.weight"},
    {".lora_B.bias", Role::UpBias, ""},
    {".alpha", Role::Alpha, ""},
    {".down.weight", Role::Down, ".up.weight"},  // XLabs
    {".up.weight", Role::Up, ".down.weight"},
};

const Suffix* suffix_of(const std::string& key) {
  for (const Suffix& s : kSuffixes)
    if (key.size() > s.text.size() && key.ends_with(s.text)) return &s;
  return nullptr;
}

// The file keys that make up one LoRA (one stem).
struct StemKeys {
  std::string down, up, alpha, up_bias;  // empty when absent

  std::string& slot(Role r) {
    switch (r) {
      case Role::Down: return down;
      case Role::Up: return up;
      case Role::Alpha: return alpha;
      case Role::UpBias: return up_bias;
    }
    return down;
  }
  std::vector<std::string> present() const {
    std::vector<std::string> out;
    for (const std::string* k : {&down, &up, &alpha, &up_bias})
      if (!k->empty()) out.push_back(*k);
    return out;
  }
};

// Recognised but not applied: LoRAs on T5 (diffusers drops them too) or another text encoder, and LyCORIS DoRA
// scales. The caller reports them.
bool is_ignored(const std::string& key) {
  return text_encoder_of(key) == TextEncoderOf::Other || key.ends_with(".dora_scale");
}

// Tensors we recognise but cannot apply yet: never dropped, never mistaken for "unmatched".
void reject_unsupported(const std::string& path, const std::string& key, const LoraKeyMapper& mapper) {
  const std::string where = path + ": '" + key + "': ";
  if (key.ends_with(".diff") || key.ends_with(".diff_b"))
    throw Error(where + "full weight/bias deltas (ComfyUI .diff/.diff_b) are not supported yet");
  if (key.ends_with(".lora_magnitude_vector"))
    throw Error(where + "DoRA (PEFT lora_magnitude_vector) is not supported yet");
  if (key.find(".lokr_") != std::string::npos || key.find(".hada_") != std::string::npos)
    throw Error(where + "LyCORIS LoKr/LoHa tensors are not supported yet");
  if (mapper.is_norm_scale(key))
    throw Error(where +
                "a full norm-scale tensor that replaces the base weight (BFL Control LoRA style); "
                "norm-scale replacement is not supported yet");
}

bool any_of_stems(const std::map<std::string, StemKeys>& stems, const std::function<bool(const std::string&)>& f) {
  return std::any_of(stems.begin(), stems.end(), [&](const auto& s) { return f(s.first); });
}

// diffusers' order: `.lora_down.weight` anywhere → the kohya family (kohya / ComfyUI / OneTrainer, told apart
// by the prefix most stems carry); "processor" → XLabs; then the lora_A/lora_B namings by their prefix.
LoraFormat detect_format(const std::vector<std::string>& keys, const std::map<std::string, StemKeys>& stems,
                         const LoraKeyMapper& mapper) {
  const bool kohya_family =
      std::any_of(keys.begin(), keys.end(), [](const std::string& k) { return k.ends_with(".lora_down.weight"); });
  if (kohya_family) {
    const std::pair<std::string_view, LoraFormat> kFamily[] = {{"lora_unet_", LoraFormat::Kohya},
                                                               {"diffusion_model.", LoraFormat::ComfyUI},
                                                               {"lora_transformer_", LoraFormat::OneTrainer}};
    LoraFormat best = LoraFormat::Kohya;
    size_t best_count = 0;
    for (const auto& [prefix, format] : kFamily) {
      const size_t n =
          size_t(std::count_if(stems.begin(), stems.end(), [&](const auto& s) { return s.first.starts_with(prefix); }));
      if (n > best_count) best = format, best_count = n;
    }
    return best;
  }
  auto prefixed = [&](std::string_view p) {
    return any_of_stems(stems, [&](const std::string& s) { return s.starts_with(p); });
  };
  if (any_of_stems(stems, [](const std::string& s) { return s.find(".processor.") != std::string::npos; }))
    return LoraFormat::XLabs;
  if (prefixed("base_model.model.")) return LoraFormat::FalKontext;
  if (prefixed("diffusion_model.")) return LoraFormat::ComfyUI;
  if (prefixed("transformer.")) return LoraFormat::Peft;
  if (any_of_stems(stems, [&](const std::string& s) { return mapper.is_bfl_module(s); })) return LoraFormat::BflLora;
  return LoraFormat::Peft;
}

std::string unmatched_error(const std::string& path, LoraFormat format, std::vector<std::string> keys,
                            const FluxConfig& config) {
  std::sort(keys.begin(), keys.end());
  constexpr size_t kShown = 10;
  std::string msg = path + ": " + std::to_string(keys.size()) + " key(s) of this " + lora_format_name(format) +
                    "-format LoRA match no module of the FLUX transformer (" + std::to_string(config.num_layers) +
                    " double, " + std::to_string(config.num_single_layers) +
                    " single blocks) or linear of the CLIP text encoder: ";
  for (size_t i = 0; i < keys.size() && i < kShown; ++i) msg += (i ? ", '" : "'") + keys[i] + "'";
  if (keys.size() > kShown) msg += ", ... (" + std::to_string(keys.size() - kShown) + " more)";
  return msg;
}

// The tensor as it is in the file (a view of the mapped bytes, nothing converted: uploads take any float dtype),
// after checking it is a float type. Finiteness is checked for all tensors at once (check_finite).
Tensor float_view(const SafetensorsFile& file, const std::string& key) {
  Tensor t = file.tensor(key);
  if (!dtype_is_float(t.dtype()))
    throw Error(file.path() + ": '" + key + "' has dtype " + std::string(dtype_name(t.dtype())) +
                ", expected a float type (F32, F16, BF16, F8...)");
  return t;
}

// The first of `keys` (sorted, so the same tensor is named as by the scan in check_finite) that read() found to hold
// a NaN or an infinity.
void throw_if_non_finite(const SafetensorsFile& file, const std::vector<std::string>& keys) {
  for (const std::string& key : keys)
    if (auto it = file.non_finite().find(key); it != file.non_finite().end())
      throw Error(file.path() + ": '" + key + "' holds " + (std::isnan(it->second.value) ? "NaN" : "an infinity") +
                  " at element " + std::to_string(it->second.element) + ", expected finite values");
}

// Every float tensor the pairs read must be finite (one bad value would poison every image made with the LoRA).
// Checked on all cores, tensors shared out between threads: a FLUX.1-dev rank-64 adapter holds ~344 M values.
void check_finite(const SafetensorsFile& file, const std::vector<std::string>& keys) {
  if (file.values_checked()) {  // read() checked every float tensor on the way in
    throw_if_non_finite(file, keys);
    return;
  }
  const size_t workers = std::max<size_t>(1, std::min<size_t>(std::thread::hardware_concurrency(), keys.size()));
  std::vector<std::pair<size_t, int64_t>> first_bad(workers, {keys.size(), -1});  // (key index, element)
  std::vector<std::thread> pool;
  for (size_t w = 0; w < workers; ++w)
    pool.emplace_back([&, w] {
      for (size_t k = w; k < keys.size(); k += workers) {
        const SafetensorsEntry* e = file.find(keys[k]);
        if (!e || !dtype_is_float(e->dtype)) continue;  // reported by float_view with its own message
        const Tensor t = file.tensor(keys[k]);
        if (const int64_t i = first_non_finite(t.dtype(), t.data(), size_t(t.numel())); i >= 0) {
          first_bad[w] = {k, i};
          return;
        }
      }
    });
  for (auto& th : pool) th.join();
  const auto bad = *std::min_element(first_bad.begin(), first_bad.end());
  if (bad.second < 0) return;
  const std::string& key = keys[bad.first];
  const Tensor t = file.tensor(key);
  float v = 0;
  convert_to_f32(t.dtype(), static_cast<const char*>(t.data()) + bad.second * int64_t(dtype_size(t.dtype())), &v, 1);
  throw Error(file.path() + ": '" + key + "' holds " + (std::isnan(v) ? "NaN" : "an infinity") + " at element " +
              std::to_string(bad.second) + ", expected finite values");
}

// Reorders the leading dimension of `x` from the file's row order into the internal one (see LoraTarget). The copy
// needs the values, so a file still being read is waited for up to x (only norm_out's LoRA is stored reordered).
Tensor to_internal_rows(const SafetensorsFile& file, Tensor x, const LoraTarget& t) {
  if (t.blocks.size() == 1 && t.blocks[0].src_row == 0) return x;
  file.wait_for(x.data(), x.nbytes());
  Tensor out = Tensor::empty(x.dtype(), x.shape());
  const int64_t row_bytes = int64_t(x.nbytes()) / x.size(0);
  for (const LoraRowBlock& b : t.blocks)
    std::memcpy(static_cast<char*>(out.data()) + (b.row - t.row) * row_bytes,
                static_cast<const char*>(x.data()) + b.src_row * row_bytes, size_t(b.rows * row_bytes));
  return out;
}

// A CLIP linear's LoRA: its sizes come from the file (the CLIP model checks them when it is applied), so the pair's
// own shapes are what build_pair compares. Unset (0) where a tensor is missing or not 2-D: build_pair names that.
LoraTarget clip_target(const SafetensorsFile& file, const std::string& module, const StemKeys& k) {
  auto dim = [&](const std::string& key, size_t d) -> int64_t {
    const SafetensorsEntry* e = key.empty() ? nullptr : file.find(key);
    return e && e->shape.size() == 2 ? e->shape[d] : 0;
  };
  LoraTarget t;
  t.module = t.diffusers_module = module;
  t.rows = dim(k.up, 0);
  t.in_features = dim(k.down, 1);
  t.blocks = {{0, t.rows, 0}};
  return t;
}

std::string module_rows(const LoraTarget& t) {
  return "'" + t.module + "' rows [" + std::to_string(t.row) + ", " + std::to_string(t.row + t.rows) + ")";
}

LoraPair build_pair(const SafetensorsFile& file, const std::string& stem, const StemKeys& k, const LoraTarget& t,
                    LoraFormat format, const PeftScaling& peft) {
  const std::string& path = file.path();
  if (k.down.empty() && k.up.empty())
    throw Error(path + ": '" + k.present().front() + "' belongs to no LoRA: '" + stem +
                "' has no down/up tensors, expected both");
  if (k.down.empty() || k.up.empty()) {
    const std::string& have = k.down.empty() ? k.up : k.down;
    const Suffix* s = suffix_of(have);
    const std::string partner = have.substr(0, have.size() - s->text.size()) + std::string(s->partner);
    throw Error(path + ": '" + have + "' has no matching " + role_name(k.down.empty() ? Role::Down : Role::Up) + " '" +
                partner + "', expected both halves of the pair");
  }
  const Shape& ds = file.find(k.down)->shape;
  const Shape& us = file.find(k.up)->shape;
  const std::string down_is = path + ": '" + k.down + "' has shape " + shape_str(ds);
  const std::string up_is = path + ": '" + k.up + "' has shape " + shape_str(us);
  if (ds.size() != 2) throw Error(down_is + ", expected a 2-D [rank, in_features] matrix");
  if (us.size() != 2) throw Error(up_is + ", expected a 2-D [out_features, rank] matrix");
  const int64_t rank = ds[0];
  if (rank == 0) throw Error(down_is + ": rank 0, expected at least one row");
  if (ds[1] != t.in_features) {
    std::string msg = down_is + ": " + std::to_string(ds[1]) + " input columns, but '" + t.module + "' takes " +
                      std::to_string(t.in_features) + " inputs";
    if (t.module == "img_in" && ds[1] > t.in_features)
      msg += " (a control LoRA that widens img_in's input: zero-padding the base img_in is not supported yet)";
    throw Error(msg);
  }
  if (us[1] != rank)
    throw Error(up_is + ": rank " + std::to_string(us[1]) + ", but '" + k.down + "' has rank " + std::to_string(rank) +
                " (shape " + shape_str(ds) + "), expected the same rank");
  if (us[0] != t.rows)
    throw Error(up_is + ": " + std::to_string(us[0]) + " output rows, expected " + std::to_string(t.rows) + " for " +
                module_rows(t));
  if (!k.up_bias.empty() && file.find(k.up_bias)->shape != Shape{t.rows})
    throw Error(path + ": '" + k.up_bias + "' has shape " + shape_str(file.find(k.up_bias)->shape) + ", expected [" +
                std::to_string(t.rows) + "] for " + module_rows(t));

  std::optional<double> alpha;
  if (!k.alpha.empty()) {
    float_view(file, k.alpha);  // the dtype check; the value is needed now, before the read may have reached it
    const Tensor a = file.tensor_now(k.alpha).to_f32();
    if (a.numel() != 1)
      throw Error(path + ": '" + k.alpha + "' has shape " + shape_str(a.shape()) + ", expected a scalar alpha");
    alpha = a.ptr<float>()[0];
  }
  LoraPair p;
  p.module = t.module;
  p.row = t.row;
  p.rows = t.rows;
  p.down = float_view(file, k.down);
  p.up = to_internal_rows(file, float_view(file, k.up), t);
  if (!k.up_bias.empty()) p.up_bias = to_internal_rows(file, float_view(file, k.up_bias), t);
  p.scale = lora_pair_scale(format, t, rank, alpha, peft, path, k.down);
  p.source = stem;
  return p;
}

// Two LoRAs of one file on the same rows (a module named twice, e.g. with and without a wrapper prefix) would
// be applied twice; a file means each once.
void check_no_overlap(const std::string& path, const std::vector<LoraPair>& pairs) {
  std::vector<const LoraPair*> sorted;
  for (const auto& p : pairs) sorted.push_back(&p);
  std::stable_sort(sorted.begin(), sorted.end(), [](const LoraPair* a, const LoraPair* b) {
    return std::tie(a->module, a->row) < std::tie(b->module, b->row);
  });
  const LoraPair* reach = nullptr;  // of the pairs so far on this module, the one that ends last
  for (const LoraPair* b : sorted) {
    if (reach && reach->module == b->module && reach->row + reach->rows > b->row)
      throw Error(path + ": '" + reach->source + "' and '" + b->source + "' both target '" + b->module + "' rows [" +
                  std::to_string(b->row) + ", " + std::to_string(std::min(reach->row + reach->rows, b->row + b->rows)) +
                  "), expected each module row range at most once");
    if (!reach || reach->module != b->module || b->row + b->rows > reach->row + reach->rows) reach = b;
  }
}

}  // namespace

LoraAdapter parse_lora_adapter(const SafetensorsFile& file, const FluxConfig& config) {
  const std::string& path = file.path();
  const std::vector<std::string> keys = file.keys();
  if (std::none_of(keys.begin(), keys.end(), [](const std::string& k) { return k.find("lora") != std::string::npos; }))
    throw Error(path + ": no LoRA tensors: none of its " + std::to_string(keys.size()) + " keys contains 'lora'" +
                (keys.empty() ? "" : " (first: '" + keys.front() + "')") + "; expected a LoRA file");

  const std::shared_ptr<const LoraKeyMapper> mapper_owner = LoraKeyMapper::for_config(config);
  const LoraKeyMapper& mapper = *mapper_owner;
  LoraAdapter adapter;
  adapter.path = path;
  adapter.metadata = file.metadata();
  std::map<std::string, StemKeys> stems, clip_stems;
  std::vector<std::string> unmatched;
  for (const std::string& key : keys) {
    if (is_ignored(key)) {
      adapter.ignored_keys.push_back(key);
      continue;
    }
    reject_unsupported(path, key, mapper);
    const Suffix* s = suffix_of(key);
    if (!s) {
      unmatched.push_back(key);
      continue;
    }
    const std::string stem = key.substr(0, key.size() - s->text.size());
    auto& by_stem = text_encoder_of(key) == TextEncoderOf::Clip ? clip_stems : stems;
    std::string& slot = by_stem[stem].slot(s->role);
    if (!slot.empty())
      throw Error(path + ": '" + slot + "' and '" + key + "' are both the " + role_name(s->role) + " of '" + stem +
                  "', expected one");
    slot = key;
  }

  const LoraFormat format = detect_format(keys, stems, mapper);
  adapter.format = lora_format_name(format);
  std::vector<std::pair<const std::string*, LoraTarget>> targets;
  for (const auto& [stem, k] : stems) {
    if (auto t = mapper.target(format, stem)) {
      targets.emplace_back(&stem, std::move(*t));
    } else {
      for (const std::string& key : k.present()) unmatched.push_back(key);
    }
  }
  std::vector<std::tuple<const std::string*, LoraTarget, LoraFormat>> clip_targets;
  for (const auto& [stem, k] : clip_stems) {
    if (auto c = clip_lora_stem(stem)) {
      clip_targets.emplace_back(&stem, clip_target(file, c->module, k), c->peft ? LoraFormat::Peft : LoraFormat::Kohya);
    } else {
      for (const std::string& key : k.present()) unmatched.push_back(key);
    }
  }
  if (!unmatched.empty()) throw Error(unmatched_error(path, format, unmatched, config));

  const PeftScaling peft = format == LoraFormat::Peft ? PeftScaling::from_metadata(file) : PeftScaling{};
  std::vector<std::string> used;
  for (const auto& [stem, t] : targets)
    for (const std::string& key : stems.at(*stem).present()) used.push_back(key);
  for (const auto& [stem, t, f] : clip_targets)
    for (const std::string& key : clip_stems.at(*stem).present()) used.push_back(key);
  std::sort(used.begin(), used.end());
  if (file.complete()) {
    file.wait_until_read();  // a background read that is over: its findings, without a second scan
    check_finite(file, used);
  } else {
    adapter.arriving = file.shared_from_this();
    adapter.unchecked = used;
  }
  for (const auto& [stem, t] : targets) {
    const StemKeys& k = stems.at(*stem);
    adapter.pairs.push_back(build_pair(file, *stem, k, t, format, peft));
    adapter.tensors_used += k.present().size();
  }
  const PeftScaling clip_peft = clip_targets.empty() ? PeftScaling{} : PeftScaling::from_metadata(file, "text_encoder");
  for (const auto& [stem, t, clip_format] : clip_targets) {
    const StemKeys& k = clip_stems.at(*stem);
    LoraPair p = build_pair(file, *stem, k, t, clip_format, clip_peft);
    if (p.up_bias.defined())
      throw Error(path + ": '" + k.up_bias + "': a bias on a text-encoder LoRA is not supported yet");
    adapter.clip_pairs.push_back(std::move(p));
    adapter.clip_tensors_used += k.present().size();
  }
  check_no_overlap(path, adapter.pairs);
  check_no_overlap(path, adapter.clip_pairs);
  return adapter;
}

LoraAdapter load_lora_adapter(const std::string& path, const FluxConfig& config, const HostBufferAllocator& host) {
  return parse_lora_adapter(host ? *SafetensorsFile::read(path, host) : *SafetensorsFile::open(path), config);
}

LoraAdapter start_loading_lora_adapter(const std::string& path, const FluxConfig& config,
                                       const HostBufferAllocator& host, const SafetensorsReadOptions& read) {
  if (!host) return load_lora_adapter(path, config);
  // Read in the order a step reads the weights, so uploads can follow the step (swap_under_next_step).
  SafetensorsReadOptions o = read;
  if (!o.read_rank) o.read_rank = [config](const std::string& key) { return flux_step_rank(key, config); };
  const std::shared_ptr<SafetensorsFile> file = SafetensorsFile::read_in_background(path, host, o);
  LoraAdapter adapter = parse_lora_adapter(*file, config);
  file->resume_read();  // (read.paused: the readers start now that the keys are mapped)
  return adapter;
}

void wait_until_loaded(const LoraAdapter& adapter) {
  if (!adapter.arriving) return;
  adapter.arriving->wait_until_read();
  throw_if_non_finite(*adapter.arriving, adapter.unchecked);
}

}  // namespace fluxswap
