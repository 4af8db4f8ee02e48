#include "cli/component_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cli/bench_timing.h"
#include "core/error.h"
#include "model/clip_text_model.h"
#include "model/random_component_weights.h"
#include "model/t5_encoder.h"
#include "model/vae_decoder.h"

namespace fluxswap {

namespace {

// diffusers on an H100, bf16, eager (ms). CLIP-L has no reference: it is reported without a ratio.
constexpr double kDiffusersT5Encode512Ms = 35.9;  // T5-XXL encode of 512 tokens
constexpr double kDiffusersVaeDecode1024Ms = 91.8;  // VAE decode of a 1024x1024 image
constexpr int kWarmupReplays = 3;
constexpr uint64_t kWeightSeed = 1;

using Clock = BenchClock;
double gib(double bytes) { return bytes / double(1ull << 30); }

// The backend's high-water mark never resets, and other benchmarks may have run on the backend before: a
// component's own peak is how far the mark rose above the memory held when the component started. If an earlier,
// larger user set the mark and this component never passed it, only an upper bound is known.
class MemoryWatch {
 public:
  explicit MemoryWatch(Backend& be) : be_(be), held_(be.memory_in_use()), peak_(be.peak_memory()) {}

  double added_bytes() const { return double(be_.memory_in_use()) - double(held_); }

  // Prints the memory line and returns its fields.
  nlohmann::json report(double weight_bytes) const {
    const size_t peak = be_.peak_memory();
    const bool exact = peak > peak_;
    const double own_peak = double(peak) - double(held_);
    std::printf("  device memory: weights %.2f GiB, peak %s%.2f GiB (weights + activations + workspaces%s)\n",
                gib(weight_bytes), exact ? "" : "at most ", gib(own_peak),
                exact ? "" : "; an earlier run on this backend set the high-water mark");
    return {{"weights_gib", gib(weight_bytes)}, {"peak_memory_gib", gib(own_peak)}, {"peak_memory_exact", exact}};
  }

 private:
  Backend& be_;
  size_t held_, peak_;
};

// " vs diffusers 35.9 ms -> 1.78x faster", or nothing without a reference. The ratio is diffusers' time over ours.
std::string versus(double ms, double reference_ms) {
  if (reference_ms <= 0) return "";
  char s[96];
  const double ratio = reference_ms / ms;
  std::snprintf(s, sizeof s, " vs diffusers %.1f ms -> %.2fx%s", reference_ms, ratio,
                ratio >= 1 ? " faster" : " (slower)");
  return s;
}

// Times `work` (a forward that issues device work only): one eager warm-up run, which also makes everything
// recording refuses to set up (buffers, GEMM algorithms, conv and attention plans); then one recording whose
// replays are timed, or, if recording fails (an op that allocates or synchronises), eager runs each followed by a
// synchronise. Prints the timing line `label: median ...` and returns the numbers.
nlohmann::json time_forward(Backend& be, const std::string& label, double reference_ms, int runs,
                            const std::function<void()>& work) {
  auto t0 = Clock::now();
  work();
  be.synchronize();
  const double first_s = seconds_since(t0);

  std::unique_ptr<RecordedWork> recording;
  std::string record_error;
  t0 = Clock::now();
  try {
    recording = be.record(work);
    be.synchronize();
  } catch (const Error& e) {
    record_error = e.what();
  }
  const double capture_s = seconds_since(t0);
  const std::function<void()> once = recording ? std::function<void()>([&] { recording->replay(); }) : work;
  if (recording)
    std::printf("  first eager run %.3f s, graph capture %.3f s\n", first_s, capture_s);
  else
    std::printf("  first eager run %.3f s; recording failed, timing eager runs (each + synchronize): %s\n", first_s,
                record_error.c_str());

  for (int i = 0; i < kWarmupReplays; ++i) once();
  be.synchronize();
  std::vector<double> ms;
  for (int i = 0; i < runs; ++i) {
    t0 = Clock::now();
    once();
    be.synchronize();
    ms.push_back(seconds_since(t0) * 1e3);
  }
  std::sort(ms.begin(), ms.end());
  const double median = ms[ms.size() / 2];
  const char* method = recording ? "graph replays" : "eager runs";
  std::printf("  %s: median %.2f ms (min %.2f, max %.2f over %d %s)%s\n", label.c_str(), median, ms.front(),
              ms.back(), runs, method, versus(median, reference_ms).c_str());

  nlohmann::json r = {{"ms_median", median},       {"ms_min", ms.front()},        {"ms_max", ms.back()},
                      {"runs", runs},              {"timing", method},            {"first_eager_run_s", first_s},
                      {"graph_capture_s", capture_s}};
  if (!recording) r["record_error"] = record_error;
  if (reference_ms > 0) {
    r["diffusers_ms"] = reference_ms;
    r["speedup_vs_diffusers"] = reference_ms / median;
  }
  return r;
}

// Token ids drawn uniformly from the whole vocabulary, uploaded as int32 [1, tokens].
Tensor random_ids(Backend& be, int64_t tokens, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, int32_t(vocab - 1));
  Tensor host = Tensor::empty(DType::I32, {1, tokens});
  for (int64_t i = 0; i < tokens; ++i) host.ptr<int32_t>()[i] = id(rng);
  Tensor dev = be.empty(DType::I32, {1, tokens});
  be.copy_from_host(host, dev);
  return dev;
}

// Random weights must still give numbers: a non-finite or constant output would mean the timed work is not what
// real weights cost (an overflow taking a different path, a buffer never written).
nlohmann::json check_output(Backend& be, const Tensor& out) {
  const Tensor v = be.to_host_f32(out);
  const float* p = v.ptr<float>();
  int64_t non_finite = 0;
  bool varied = false;
  for (int64_t i = 0; i < v.numel(); ++i) {
    non_finite += !std::isfinite(p[i]);
    varied = varied || p[i] != p[0];
  }
  const std::string verdict = non_finite ? "has " + std::to_string(non_finite) + " non-finite values"
                              : varied   ? "finite and varied"
                                         : "is CONSTANT";
  std::printf("  check: output %s %s\n", shape_str(out.shape()).c_str(), verdict.c_str());
  return {{"output_non_finite", non_finite}, {"output_varied", varied}};
}

// The block common to every component: header, timing, per-op breakdown, output check, memory.
nlohmann::json bench_forward(Backend& be, const std::string& header, const std::string& label, double reference_ms,
                             int runs, const MemoryWatch& memory, double weight_bytes, double build_s,
                             const Tensor& output, const std::function<void()>& work) {
  std::printf("\n%s, RANDOM weights made on the device in %.3f s\n", header.c_str(), build_s);
  nlohmann::json r = time_forward(be, label, reference_ms, runs, work);
  r["per_op_ms"] = profile_ops(be, work, "one eager run");
  r.update(check_output(be, output));
  r.update(memory.report(weight_bytes));
  r["device"] = be.name();
  r["weights_build_s"] = build_s;
  return r;
}

void check_runs(int runs) {
  if (runs < 1) throw Error("component bench: runs must be at least 1, got " + std::to_string(runs));
}

nlohmann::json bench_t5(Backend& be, int runs) {
  const T5EncoderConfig c = T5EncoderConfig::flux1();
  const int64_t tokens = 512;  // FLUX.1-dev's max_sequence_length
  MemoryWatch memory(be);
  const auto t0 = Clock::now();
  T5Encoder t5(c, random_t5_encoder_weights(c, be, kWeightSeed), be);
  be.synchronize();
  const double build_s = seconds_since(t0), weight_bytes = memory.added_bytes();
  const Tensor ids = random_ids(be, tokens, c.vocab_size, 21);
  const Tensor out = be.empty(be.compute_dtype(), {1, tokens, c.d_model});
  nlohmann::json r = bench_forward(be, "T5-XXL encoder (google/t5-v1_1-xxl shapes, 24 layers, d_model 4096)",
                                   "T5-XXL encode, 512 tokens", kDiffusersT5Encode512Ms, runs, memory, weight_bytes,
                                   build_s, out, [&] { t5.encode(ids, out); });
  r["tokens"] = tokens;
  return r;
}

nlohmann::json bench_clip(Backend& be, int runs) {
  const ClipTextConfig c = ClipTextConfig::flux1();
  const int64_t tokens = c.max_position_embeddings;  // FLUX pads CLIP prompts to 77
  MemoryWatch memory(be);
  const auto t0 = Clock::now();
  ClipTextModel clip(c, random_clip_text_weights(c, be, kWeightSeed), be);
  be.synchronize();
  const double build_s = seconds_since(t0), weight_bytes = memory.added_bytes();
  const Tensor ids = random_ids(be, tokens, c.vocab_size, 22);
  const Tensor pooled = be.empty(be.compute_dtype(), {1, c.hidden_size});
  // FLUX reads only the pooled output; its end-of-text row is the last one for a prompt that fills the context.
  const std::vector<int64_t> eos = {tokens - 1};
  nlohmann::json r = bench_forward(be, "CLIP-L text model (openai/clip-vit-large-patch14 shapes, 12 layers, width 768)",
                                   "CLIP-L encode, 77 tokens", 0.0, runs, memory, weight_bytes, build_s,
                                   pooled, [&] { clip.encode(ids, eos, pooled); });
  r["tokens"] = tokens;
  return r;
}

}  // namespace

nlohmann::json bench_text_encoders(Backend& backend, int runs) {
  check_runs(runs);
  // One model at a time, each freed before the next is built; the small one first, so that on a fresh backend the
  // larger one sets a new high-water mark and both peaks are exact.
  nlohmann::json r;
  r["clip"] = bench_clip(backend, runs);
  r["t5"] = bench_t5(backend, runs);
  return r;
}

nlohmann::json bench_vae_decode(Backend& be, int size, int runs) {
  check_runs(runs);
  const VaeConfig c = VaeConfig::flux1();
  if (size <= 0 || size % c.upscale())
    throw Error("VAE bench: size " + std::to_string(size) + " is not a positive multiple of " +
                std::to_string(c.upscale()));
  const int64_t h = size / c.upscale();
  MemoryWatch memory(be);
  const auto t0 = Clock::now();
  VaeDecoder vae(c, random_vae_decoder_weights(c, be, kWeightSeed), be);
  be.synchronize();
  const double build_s = seconds_since(t0), weight_bytes = memory.added_bytes();
  const Tensor latents = be.empty(be.compute_dtype(), {1, c.latent_channels, h, h});
  be.fill_normal(latents, 23, 0.0f, 1.0f);
  const Tensor image = be.empty(be.compute_dtype(), {1, c.out_channels, int64_t(size), int64_t(size)});
  const std::string label = "VAE decode " + std::to_string(size) + "x" + std::to_string(size);
  nlohmann::json r = bench_forward(be, "FLUX.1 VAE decoder (16 latent channels, blocks 128/256/512/512)", label,
                                   size == 1024 ? kDiffusersVaeDecode1024Ms : 0.0, runs, memory, weight_bytes,
                                   build_s, image, [&] { vae.decode(latents, image); });
  r["size"] = size;
  r["latent_size"] = h;
  return r;
}

}  // namespace fluxswap
