// `fluxswap bench`: FLUX.1-dev-sized transformer steps on random weights made on the device (same shapes and
// FLOPs as the real model; values never zero). Method: bench/README.md.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <filesystem>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "cli/bench_timing.h"
#include "cli/component_bench.h"
#include "cli/e2e_bench.h"
#include "cli/lora_read_sweep.h"
#include "core/compare.h"
#include "core/error.h"
#include "io/page_cache.h"
#include "io/scratch_dir.h"
#include "lora/lora_controller.h"
#include "lora/random_lora.h"
#include "model/flux_cost.h"
#include "model/flux_random_weights.h"
#include "model/flux_transformer.h"

namespace fluxswap {

namespace {

using Clock = BenchClock;

struct BenchOptions {
  std::string device = "cuda", model = "dev", json_out;
  std::vector<int> sizes = {1024};
  int steps = 20, txt_tokens = 512, batch = 1;
  bool profile = true;
  int64_t lora_rank = 0;  // 0: no LoRA part
  std::string lora_mode = "merged", lora_dir;  // empty: /dev/shm when it has room (choose_scratch_dir)
  int swaps = 6;
  bool lora_read_sweep = false;  // also time the file read alone over reader settings
  bool components = false;  // also time the text encoders and the VAE decoder
  bool fp8 = false, fp8_fast_accum = false, fp8_attention = false;
  bool e2e = false;  // the whole pipeline instead of transformer steps
  int e2e_runs = 5;
  std::string tokenizers;
  std::string vram;  // --e2e: device memory budget (empty: none)
  std::string t5 = "bf16";  // --e2e: T5 weights, bf16 or nf4
  int quality_steps = 28;   // FP8 vs bf16 over a whole sampling run (0: skip)
  int schedule = 28;        // sampling steps the modulation table covers (its cost is spread over them)
};

struct Timing {
  double median = 0, min = 0, max = 0;
};

// Replays recorded steps `steps` times each (after 3 warm-ups each), alternating between them so that clock and
// temperature drift fall on all alike, each replay timed to completion.
std::vector<Timing> time_alternating(Backend& be, const std::vector<RecordedWork*>& graphs, int steps) {
  for (RecordedWork* g : graphs)
    for (int i = 0; i < 3; ++i) g->replay();
  be.synchronize();
  std::vector<std::vector<double>> ms(graphs.size());
  for (int i = 0; i < steps; ++i)
    for (size_t k = 0; k < graphs.size(); ++k) {
      const auto t0 = Clock::now();
      graphs[k]->replay();
      be.synchronize();
      ms[k].push_back(seconds_since(t0) * 1e3);
    }
  std::vector<Timing> out;
  for (auto& m : ms) {
    std::sort(m.begin(), m.end());
    out.push_back({m[m.size() / 2], m.front(), m.back()});
  }
  return out;
}

Timing time_replays(Backend& be, RecordedWork& graph, int steps) { return time_alternating(be, {&graph}, steps)[0]; }

// The pipeline's way of giving a step its modulations: the whole schedule's computed up front (one pass over the
// modulation weights, FluxTransformer::modulation_table), each step copying its row. The step is timed as a recording
// of that copy and the step, replayed alternately with `per_step` (the same step computing its own modulations); the
// table's time is spread over the schedule's steps.
struct TabledTiming {
  Timing step, per_step_alongside;
  double table_ms = 0;
  int schedule = 1;
  double per_step() const { return step.median + table_ms / schedule; }
  double gain_ms() const { return per_step_alongside.median - per_step(); }
  nlohmann::json json() const {
    return {{"step_ms_median", step.median}, {"step_ms_min", step.min}, {"step_ms_max", step.max},
            {"table_ms", table_ms}, {"schedule_steps", schedule}, {"ms_per_step_with_table", per_step()},
            {"per_step_modulations_alongside_ms_median", per_step_alongside.median}, {"gain_ms", gain_ms()}};
  }
};

TabledTiming time_with_modulation_table(FluxTransformer& tr, const FluxInputs& in, const Tensor& out, int schedule,
                                        int steps, RecordedWork& per_step) {
  Backend& be = tr.backend();
  const int64_t B = in.timestep.size(0);
  Tensor t = Tensor::empty(DType::F32, {schedule, B});
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = 1.0f - float(i / B) / float(schedule);
  const Tensor timesteps = be.empty(DType::F32, t.shape());
  be.copy_from_host(t, timesteps);
  tr.modulation_table(timesteps, in.guidance, in.pooled_projections);  // picks the GEMM algorithms for its rows
  be.synchronize();
  const auto t0 = Clock::now();
  const Tensor table = tr.modulation_table(timesteps, in.guidance, in.pooled_projections);
  be.synchronize();
  const double table_ms = seconds_since(t0) * 1e3;
  FluxInputs x = in;
  x.modulations = be.empty(be.compute_dtype(), {B, tr.modulation_width()});
  auto step = [&] {
    be.copy(table.select(0, 0), x.modulations);
    tr.forward(x, out);
  };
  step();
  auto graph = be.record(step);
  const std::vector<Timing> both = time_alternating(be, {graph.get(), &per_step}, steps);
  return {both[0], both[1], table_ms, schedule};
}

void print_tabled(const char* what, const TabledTiming& t) {
  std::printf("  %s, the %d-step schedule's modulations up front (the pipeline's way): table %.2f ms once + step "
              "%.2f ms (min %.2f, max %.2f) = %.2f ms/step; replayed alternately with modulations in each step "
              "(%.2f): %+.2f ms\n",
              what, t.schedule, t.table_ms, t.step.median, t.step.min, t.step.max, t.per_step(),
              t.per_step_alongside.median, -t.gain_ms());
}

FluxConfig bench_config(const std::string& model) {
  if (model == "dev") return FluxConfig::flux1_dev();
  if (model == "schnell") return FluxConfig::flux1_schnell();
  if (model == "tiny") return FluxConfig::tiny();  // the fixtures' architecture, for a CPU try-out
  throw Error("--model-size must be dev, schnell or tiny, got '" + model + "'");
}

// Inputs of one step at `size` x `size` pixels: 2x2 packed latents over an 8x-downsampled grid.
FluxInputs make_inputs(Backend& be, const FluxConfig& c, int size, int64_t txt, int64_t batch) {
  if (size % 16) throw Error("--sizes: " + std::to_string(size) + " is not a multiple of 16");
  const int64_t grid = size / 16, ni = grid * grid;
  FluxInputs in;
  const DType dt = be.compute_dtype();
  in.hidden_states = be.empty(dt, {batch, ni, c.in_channels});
  in.encoder_hidden_states = be.empty(dt, {batch, txt, c.joint_attention_dim});
  in.pooled_projections = be.empty(dt, {batch, c.pooled_projection_dim});
  be.fill_normal(in.hidden_states, 11, 0.0f, 1.0f);
  be.fill_normal(in.encoder_hidden_states, 12, 0.0f, 1.0f);
  be.fill_normal(in.pooled_projections, 13, 0.0f, 1.0f);
  Tensor t = Tensor::empty(DType::F32, {batch}), g = Tensor::empty(DType::F32, {batch});
  for (int64_t b = 0; b < batch; ++b) {
    t.ptr<float>()[b] = 0.9f;
    g.ptr<float>()[b] = 3.5f;
  }
  in.timestep = be.empty(DType::F32, {batch});
  be.copy_from_host(t, in.timestep);
  if (c.guidance_embeds) {
    in.guidance = be.empty(DType::F32, {batch});
    be.copy_from_host(g, in.guidance);
  }
  Tensor img_ids = Tensor::zeros(DType::F32, {ni, 3}), txt_ids = Tensor::zeros(DType::F32, {txt, 3});
  for (int64_t i = 0; i < ni; ++i) {
    img_ids.ptr<float>()[i * 3 + 1] = float(i / grid);
    img_ids.ptr<float>()[i * 3 + 2] = float(i % grid);
  }
  Tensor rope = flux_rope_table(c, txt_ids, img_ids);
  in.rope = be.empty(DType::F32, rope.shape());
  be.copy_from_host(rope, in.rope);
  return in;
}

// Two random rank-r adapters on every block linear, swapped back and forth while a recorded step keeps running.
// "From the file": the files sit in a RAM-backed directory (their page-cache residency is measured before timing);
// the read runs under the upload (start_loading_lora_adapter) and a swap ends when set_adapters returns, which is
// when the next step can start. Reading the whole file first, adapters kept in host memory and adapters kept on the
// device are timed the same way, for comparison.
nlohmann::json bench_lora(FluxTransformer& tr, const FluxInputs& in, const Tensor& out, const Timing& base,
                          const TabledTiming& base_tabled, const BenchOptions& o) {
  Backend& be = tr.backend();
  const FluxConfig& c = tr.config();
  const HostBufferAllocator host = be.host_buffer_allocator();
  const ScratchDirChoice dir = choose_scratch_dir(o.lora_dir, 2 * (random_lora_data_bytes(c, o.lora_rank) + (1 << 20)));
  std::printf("  lora files in %s: %s\n", dir.path.c_str(), dir.reason.c_str());
  ScratchFiles files;  // removed at the end, also on failure
  for (int i = 0; i < 2; ++i) {
    const std::string f = files.add(dir.path + "/fluxswap-bench-lora-r" + std::to_string(o.lora_rank) + "-" +
                                    std::to_string(i) + ".safetensors");
    const auto t0 = Clock::now();
    const size_t bytes = write_random_lora(f, c, o.lora_rank, uint64_t(100 + i));
    std::printf("  lora file %s: %.0f MB (rank %lld, written in %.1f s)\n", f.c_str(), bytes / 1e6,
                (long long)o.lora_rank, seconds_since(t0));
  }
  LoraController lora(tr, lora_mode_from_name(o.lora_mode), o.lora_rank);
  // Read whole into pinned memory (recycled between loads), then sent from there by DMA ...
  auto load = [&](int i) { return std::make_shared<LoraAdapter>(load_lora_adapter(files.paths()[i], c, host)); };
  // ... or parsed from the header at once, the data uploaded by set_adapters chunk by chunk as it is read.
  // (The pinned buffer's allocation timed: a pool that has to grow pins the memory anew, ~0.5 s.)
  double alloc_ms = 0;
  const HostBufferAllocator timed_host = [&](size_t bytes) {
    const auto a = Clock::now();
    std::shared_ptr<void> p = host(bytes);
    alloc_ms = seconds_since(a) * 1e3;
    return p;
  };
  auto start = [&](int i, bool parse_first = false) {
    SafetensorsReadOptions read;
    read.paused = parse_first;
    return std::make_shared<LoraAdapter>(start_loading_lora_adapter(files.paths()[i], c, timed_host, read));
  };
  auto t0 = Clock::now();
  lora.set_adapters({{load(0), 1.0f}});
  const double first_apply_s = seconds_since(t0);
  tr.forward(in, out);
  t0 = Clock::now();
  auto graph = be.record([&] { tr.forward(in, out); });
  const double capture_s = seconds_since(t0);
  const Timing with = time_replays(be, *graph, o.steps);
  // The same with the table the pipeline computes once the adapter is set (its modulation pairs are in it).
  // (Its alternating replays end with the per-step recording: `out` is A's output again.)
  const TabledTiming with_tabled = time_with_modulation_table(tr, in, out, o.schedule, o.steps, *graph);
  const Tensor out_a = be.to_host_f32(out);
  // The same adapter replayed once more: the run-to-run floor that a swap back is held to (0 but with FP8 attention,
  // whose cuDNN kernel is not run-to-run reproducible).
  graph->replay();
  const double a_rerun = max_rel_error(out_a, be.to_host_f32(out));

  // Untimed swaps first: pinning 700 MB costs more than reading it, so the pinned pool gets the buffers that the
  // adapters alive at once (active, two kept on the device, one arriving) need before anything is timed.
  for (int s = 1; s <= 3; ++s) lora.set_adapters({{load(s % 2), 1.0f}});
  // What "from the page cache" rests on, measured right before the swaps.
  std::vector<double> resident;
  for (const auto& f : files.paths()) resident.push_back(page_cache_residency(f).fraction());
  std::printf("  lora files resident in the page cache before timing (mincore): %.1f%%, %.1f%%\n",
              resident[0] * 100, resident[1] * 100);
  if (std::min(resident[0], resident[1]) < 0.99)
    std::printf("  WARNING: not all in the page cache: the from-file swaps below include reading the disk\n");
  nlohmann::json sweep;
  if (o.lora_read_sweep) sweep = lora_read_sweep(files.paths()[0], be);

  // Read first, then upload and apply: the baseline the pipelining is measured against.
  std::vector<double> seq_ms, seq_read_ms;
  for (int s = 1; s <= o.swaps; ++s) {
    t0 = Clock::now();
    auto a = load(s % 2);
    seq_read_ms.push_back(seconds_since(t0) * 1e3);
    lora.set_adapters({{a, 1.0f}});
    seq_ms.push_back(seconds_since(t0) * 1e3);
  }
  // The read pipelined with the upload. The swap time is the time to the next step's start.
  std::vector<double> swap_ms, swap_step_ms, read_ms, wait_ms, batches, early, started_all;
  Tensor out_b;
  std::shared_ptr<LoraAdapter> kept[2];
  for (int s = 1; s <= o.swaps; ++s) {
    t0 = Clock::now();
    kept[s % 2] = start(s % 2);
    const double started_ms = seconds_since(t0) * 1e3;
    started_all.push_back(started_ms);
    const LoraApplyReport rep = lora.set_adapters({{kept[s % 2], 1.0f}});
    swap_ms.push_back(seconds_since(t0) * 1e3);
    graph->replay();
    be.synchronize();
    swap_step_ms.push_back(seconds_since(t0) * 1e3);
    // A backend without pinned memory maps and checks the file while parsing it: that is its read.
    read_ms.push_back(kept[s % 2]->arriving ? kept[s % 2]->arriving->read_seconds() * 1e3 : started_ms);
    wait_ms.push_back(rep.file_wait_seconds * 1e3);
    batches.push_back(double(rep.upload_batches));
    early.push_back(double(rep.merged_while_reading));
    if (s == 1) out_b = be.to_host_f32(out);
  }
  // Runtime mode with step gates: the swap under the next step (the step launched before the file is read; its
  // blocks wait for their slots). Timed from the request to that step's end; the swap's cost is what that takes
  // beyond a step with the adapter already in.
  std::vector<double> under_ms;
  double under_vs_blocking = -1;
  nlohmann::json gate_timelines = nlohmann::json::array();
  if (o.lora_mode == "runtime" && be.has_gates()) {
    // The key mapping before the read (A/B: FLUXSWAP_LORA_PARSE_FIRST=0): it decides when the step can launch.
    const char* env = std::getenv("FLUXSWAP_LORA_PARSE_FIRST");
    const bool parse_first = !(env && std::string(env) == "0");
    // The adapters held here would keep their pinned buffers beside the controller's cache, one more than the
    // untimed swaps pinned: the pool would grow (~0.3-0.4 s) inside the timed loop. Loaded again after it.
    kept[0].reset(), kept[1].reset();
    for (int s = 1; s <= o.swaps; ++s) {
      // Every time below counts from the request (t0): host points, and device ones through the round's close.
      t0 = Clock::now();
      const std::shared_ptr<LoraAdapter> next = start(s % 2, parse_first);
      const double started_ms = seconds_since(t0) * 1e3;
      const LoraApplyReport rep = lora.swap_under_next_step({{next, 1.0f}}, [&] { graph->replay(); });
      const double returned_ms = seconds_since(t0) * 1e3;
      be.synchronize();
      under_ms.push_back(seconds_since(t0) * 1e3);
      if (s == 1) under_vs_blocking = max_rel_error(be.to_host_f32(out), out_b);
      const Backend::GateTimeline line = be.gate_timeline();
      const double closed_ms = std::chrono::duration<double, std::milli>(line.closed_at - t0).count();
      // (-1 stays "never".)
      auto from = [](double origin, double ms) { return ms < 0 ? -1.0 : origin + ms; };
      std::vector<double> opened, passed, issued;
      for (const Backend::GateTimes& g : line.gates) {
        opened.push_back(from(closed_ms, g.opened_ms));
        passed.push_back(from(closed_ms, g.passed_ms));
      }
      for (double ms : rep.gate_issued_ms) issued.push_back(from(started_ms, ms));
      nlohmann::json marks = nlohmann::json::object();
      for (const auto& [mark, ms] : rep.host_marks_ms) marks[mark] = started_ms + ms;
      gate_timelines.push_back({{"started_ms", started_ms}, {"pinned_alloc_ms", alloc_ms}, {"host_marks_ms", marks},
                                {"returned_ms", returned_ms}, {"total_ms", under_ms.back()},
                                {"round_closed_on_device_ms", closed_ms}, {"opened_ms", opened}, {"passed_ms", passed},
                                {"host_gate_issued_ms", issued}});
      if (s <= 3 && !passed.empty()) {
        std::printf("    under-step swap %d, ms from the request: adapter started (header parsed, keys mapped, read "
                    "begun %s) %.1f (pinned buffer %.1f);",
                    s, parse_first ? "after the mapping" : "before it", started_ms, alloc_ms);
        for (const auto& [mark, ms] : rep.host_marks_ms) std::printf(" %s %.1f,", mark, started_ms + ms);
        std::printf(" returned %.1f; round closed on the device %.1f; step done %.1f\n", returned_ms, closed_ms,
                    under_ms.back());
        std::printf("      per gate, opening issued (host) / opened / passed (device):");
        const size_t n = passed.size();
        for (size_t g : {size_t(0), size_t(1), size_t(2), size_t(5), size_t(10), n / 3, n / 2, 2 * n / 3, n - 2, n - 1})
          if (g < n && g < issued.size())
            std::printf(" %zu: %.1f/%.1f/%.1f", g, issued[g], opened[g], passed[g]);
        std::printf("\n");
      }
    }
  }
  for (int i = 0; i < 2; ++i)
    if (!kept[i]) kept[i] = load(i);
  // Between the two adapters kept on the device (what a server serving a working set of adapters sees).
  std::vector<double> cached_ms;
  for (int s = 0; s < o.swaps; ++s) {
    t0 = Clock::now();
    lora.set_adapters({{kept[s % 2], 1.0f}});
    cached_ms.push_back(seconds_since(t0) * 1e3);
  }
  // Between adapters parsed and kept in (pinned) host memory but not on the device: what a server's adapter cache
  // gives when the device keeps none (every swap uploads the whole adapter).
  std::vector<double> host_ms;
  lora.set_cache_capacity(0);
  lora.set_adapters({{kept[1], 1.0f}});
  for (int s = 0; s < o.swaps; ++s) {
    t0 = Clock::now();
    lora.set_adapters({{kept[s % 2], 1.0f}});
    host_ms.push_back(seconds_since(t0) * 1e3);
  }
  lora.set_cache_capacity(2);
  lora.set_adapters({{kept[0], 1.0f}});
  graph->replay();
  const Tensor out_a_again = be.to_host_f32(out);
  const double a_vs_b = max_rel_error(out_a, out_b), a_again = max_rel_error(out_a, out_a_again);
  const double overhead = (with.median / base.median - 1.0) * 100.0;

  // Overlap: what reading first and then swapping from host memory would take, less what the swap took, i.e. the
  // time the read and the upload ran at once.
  const double host_median = median_of(host_ms);
  std::vector<double> after_read_ms, hidden_ms;
  for (size_t i = 0; i < swap_ms.size(); ++i) {
    after_read_ms.push_back(swap_ms[i] - read_ms[i]);
    hidden_ms.push_back(read_ms[i] + host_median - swap_ms[i]);
  }
  std::printf("  LoRA rank %lld on every block linear, %s mode: %.2f ms/step (base %.2f) -> %+.1f%% per step\n",
              (long long)o.lora_rank, o.lora_mode.c_str(), with.median, base.median, overhead);
  print_tabled("LoRA", with_tabled);
  std::printf("  LoRA per step with the modulation tables: %.2f ms/step (base %.2f) -> %+.1f%% per step\n",
              with_tabled.per_step(), base_tabled.per_step(),
              (with_tabled.per_step() / base_tabled.per_step() - 1.0) * 100.0);
  std::printf("  first apply %.0f ms, graph capture with LoRA %.2f s; graph re-captures during swaps: 0\n",
              first_apply_s * 1e3, capture_s);
  for (size_t i = 0; i < swap_ms.size(); ++i)
    std::printf("    swap %zu from the file: read %.1f ms (adapter started, header parsed, at %.1f ms); next step can "
                "start at %.1f ms (%.1f ms after the read ended; waited %.1f ms for the file, %d upload batches, %d "
                "modules merged while reading); hidden %.1f ms\n",
                i + 1, read_ms[i], started_all[i], swap_ms[i], after_read_ms[i], wait_ms[i], int(batches[i]),
                int(early[i]), hidden_ms[i]);
  std::printf("  swap from the file, read pipelined with the upload: median %.1f ms to the next step's start (read "
              "%.1f ms, then %.1f ms; hidden %.1f ms against reading first), + next step %.1f ms\n",
              median_of(swap_ms), median_of(read_ms), median_of(after_read_ms), median_of(hidden_ms),
              median_of(swap_step_ms));
  if (!under_ms.empty())
    std::printf("  swap from the file under the next step: median %.1f ms from the request to that step's end = the "
                "step (%.2f ms) + %.1f ms (output vs the same adapter swapped first: %.3g, must be 0)\n",
                median_of(under_ms), with.median, median_of(under_ms) - with.median, under_vs_blocking);
  std::printf("  swap from the file, whole file read first: median %.1f ms (read + parse %.1f ms)\n",
              median_of(seq_ms), median_of(seq_read_ms));
  std::printf("  swap between adapters kept parsed in host memory only (uploaded every time) median %.1f ms; kept "
              "on the device median %.1f ms\n",
              host_median, median_of(cached_ms));
  std::printf("  (hidden = read + swap from host memory - swap: the time the read and the upload ran at once)\n");
  std::printf("  check: output A vs B differs by %.3g (must be > 0), A after swapping back vs A: %.3g (must be 0, or "
              "within A replayed again without a swap: %.3g)\n",
              a_vs_b, a_again, a_rerun);
  return {{"rank", o.lora_rank},
          {"mode", o.lora_mode},
          {"lora_dir", dir.path},
          {"lora_dir_reason", dir.reason},
          {"files_resident_fraction", resident},
          {"ms_per_step_median", with.median},
          {"overhead_percent", overhead},
          {"with_modulation_table", with_tabled.json()},
          {"swap_ms_median", median_of(swap_ms)},
          {"swap_plus_step_ms_median", median_of(swap_step_ms)},
          {"swap_ms_all", swap_ms},
          {"read_ms_median", median_of(read_ms)},
          {"read_ms_all", read_ms},
          {"after_read_ms_all", after_read_ms},
          {"hidden_ms_median", median_of(hidden_ms)},
          {"hidden_ms_all", hidden_ms},
          {"file_wait_ms_all", wait_ms},
          {"started_ms_all", started_all},
          {"upload_batches_all", batches},
          {"merged_while_reading_all", early},
          {"under_step_swap_plus_step_ms_all", under_ms},
          {"under_step_swap_added_ms_median", under_ms.empty() ? -1.0 : median_of(under_ms) - with.median},
          {"under_step_vs_blocking_rel_diff", under_vs_blocking},
          {"under_step_gate_timelines", gate_timelines},
          {"sequential_swap_ms_median", median_of(seq_ms)},
          {"sequential_swap_ms_all", seq_ms},
          {"sequential_read_parse_ms_median", median_of(seq_read_ms)},
          {"first_apply_ms", first_apply_s * 1e3},
          {"cached_swap_ms_median", median_of(cached_ms)},
          {"host_cached_swap_ms_median", host_median},
          {"graph_recaptures_during_swaps", 0},
          {"a_vs_b_rel_diff", a_vs_b},
          {"a_again_rel_diff", a_again},
          {"a_rerun_rel_diff", a_rerun},
          {"read_sweep", sweep}};
}

// FP8 against bf16 on the same noise and weights: `steps` Euler steps of the flow-matching sampler (sigmas 1 -> 0,
// eager), then the final latents compared; also one step's output. Random weights make a harsher test than real
// ones (no structure to preserve), so this bounds the damage rather than predicting image quality.
nlohmann::json fp8_quality(FluxTransformer& tr, FluxInputs& in, const Tensor& out, int steps, bool attention) {
  Backend& be = tr.backend();
  // The benchmark's inputs, put back afterwards.
  const Tensor noise = be.empty(in.hidden_states.dtype(), in.hidden_states.shape());
  be.copy(in.hidden_states, noise);
  const Tensor timestep = be.to_host_f32(in.timestep);
  auto sample = [&](int n) {
    be.copy(noise, in.hidden_states);
    Tensor t = Tensor::empty(DType::F32, {in.timestep.size(0)});
    for (int i = 0; i < n; ++i) {
      const float sigma = 1.0f - float(i) / float(steps), next = 1.0f - float(i + 1) / float(steps);
      for (int64_t b = 0; b < t.numel(); ++b) t.ptr<float>()[b] = sigma;
      be.copy_from_host(t, in.timestep);
      tr.forward(in, out);
      if (n == 1) return be.to_host_f32(out);
      be.axpy(in.hidden_states, next - sigma, out);
    }
    return be.to_host_f32(in.hidden_states);
  };
  const bool was = tr.fp8(), was_attention = tr.fp8_attention();
  tr.set_fp8(false);
  tr.set_fp8_attention(false);
  const Tensor step_bf16 = sample(1), run_bf16 = sample(steps);
  tr.set_fp8(true);
  tr.set_fp8_attention(attention);
  const Tensor step_fp8 = sample(1), run_fp8 = sample(steps);
  tr.set_fp8(was);
  tr.set_fp8_attention(was_attention);
  be.copy(noise, in.hidden_states);
  be.copy_from_host(timestep, in.timestep);
  nlohmann::json r = {{"steps", steps},
                      {"one_step_cosine", cosine_similarity(step_fp8, step_bf16)},
                      {"one_step_psnr_db", psnr_db(step_fp8, step_bf16)},
                      {"run_cosine", cosine_similarity(run_fp8, run_bf16)},
                      {"run_psnr_db", psnr_db(run_fp8, run_bf16)}};
  std::printf("  FP8 vs bf16, same noise: one step cosine %.5f (PSNR %.1f dB); %d-step run final latents cosine %.5f "
              "(PSNR %.1f dB)\n",
              double(r["one_step_cosine"]), double(r["one_step_psnr_db"]), steps, double(r["run_cosine"]),
              double(r["run_psnr_db"]));
  return r;
}

nlohmann::json bench_size(FluxTransformer& tr, int size, const BenchOptions& o) {
  Backend& be = tr.backend();
  const FluxConfig& c = tr.config();
  FluxInputs in = make_inputs(be, c, size, o.txt_tokens, o.batch);
  const int64_t ni = in.hidden_states.size(1);
  Tensor out = be.empty(be.compute_dtype(), {int64_t(o.batch), ni, c.out_channels()});

  auto t0 = Clock::now();
  tr.forward(in, out);  // first eager step: allocates buffers, picks GEMM algorithms, builds attention plans
  be.synchronize();
  const double first_step_s = seconds_since(t0);
  t0 = Clock::now();
  auto graph = be.record([&] { tr.forward(in, out); });
  be.synchronize();
  const double capture_s = seconds_since(t0);

  Timing base = time_replays(be, *graph, o.steps);
  const double median = base.median;
  const FluxStepCost cost = flux_step_cost(c, o.batch, ni, o.txt_tokens);

  nlohmann::json r = {{"size", size},
                      {"image_tokens", ni},
                      {"text_tokens", o.txt_tokens},
                      {"batch", o.batch},
                      {"first_eager_step_s", first_step_s},
                      {"graph_capture_s", capture_s},
                      {"ms_per_step_median", median},
                      {"ms_per_step_min", base.min},
                      {"ms_per_step_max", base.max},
                      {"tflop_per_step", cost.total_flops() / 1e12},
                      {"tflops_achieved", cost.total_flops() / (median * 1e-3) / 1e12},
                      {"peak_memory_gib", double(be.peak_memory()) / (1ull << 30)}};
  std::printf("\n%dx%d: %lld image + %d text tokens, batch %d, %.1f TFLOP/step (linear %.1f, attention %.1f)\n",
              size, size, (long long)ni, o.txt_tokens, o.batch, cost.total_flops() / 1e12, cost.linear_flops / 1e12,
              cost.attention_flops / 1e12);
  std::printf("  first eager step %.2f s, graph capture %.2f s\n", first_step_s, capture_s);
  std::printf("  ms/step  median %.2f  (min %.2f, max %.2f over %d replays)  ->  %.0f TFLOP/s\n", median,
              base.min, base.max, o.steps, cost.total_flops() / (median * 1e-3) / 1e12);
  TabledTiming tabled = time_with_modulation_table(tr, in, out, o.schedule, o.steps, *graph);
  print_tabled("bf16", tabled);
  r["modulation_table"] = tabled.json();
  nlohmann::json fp8;
  if (o.fp8) {
    // The same step with the block linears in FP8, against the bf16 timing just taken.
    tr.set_fp8(true);
    t0 = Clock::now();
    tr.forward(in, out);
    be.synchronize();
    const double fp8_first_s = seconds_since(t0);
    graph.reset();
    graph = be.record([&] { tr.forward(in, out); });
    const Timing f = time_replays(be, *graph, o.steps);
    std::printf("  bf16 %.2f ms/step; FP8 (e4m3 block linears, %s accumulation) %.2f ms/step (min %.2f, max %.2f): "
                "%.2fx faster\n",
                base.median, o.fp8_fast_accum ? "fast" : "exact", f.median, f.min, f.max, base.median / f.median);
    fp8 = {{"bf16_ms_per_step_median", base.median}, {"fp8_ms_per_step_median", f.median},
           {"fp8_ms_per_step_min", f.min}, {"fp8_ms_per_step_max", f.max}, {"speedup", base.median / f.median},
           {"first_fp8_step_s", fp8_first_s}, {"fast_accum", o.fp8_fast_accum}};
    Timing best = f;
    if (o.fp8_attention) {
      // And with the attention in FP8 too (cuDNN's e4m3 flash attention), timed in the same run.
      tr.set_fp8_attention(true);
      tr.forward(in, out);
      graph.reset();
      graph = be.record([&] { tr.forward(in, out); });
      best = time_replays(be, *graph, o.steps);
      std::printf("  + FP8 attention: %.2f ms/step (min %.2f, max %.2f): %.2fx faster than bf16, %.2fx than FP8 "
                  "linears alone\n",
                  best.median, best.min, best.max, base.median / best.median, f.median / best.median);
      fp8["fp8_attention"] = {{"ms_per_step_median", best.median}, {"ms_per_step_min", best.min},
                              {"ms_per_step_max", best.max}, {"speedup_vs_bf16", base.median / best.median},
                              {"speedup_vs_fp8_linears", f.median / best.median}};
    }
    const TabledTiming bf16_tabled = tabled;
    tabled = time_with_modulation_table(tr, in, out, o.schedule, o.steps, *graph);
    print_tabled(o.fp8_attention ? "FP8 + FP8 attention" : "FP8", tabled);
    std::printf("  with the modulation tables: bf16 %.2f, FP8 %.2f ms/step: %.2fx faster\n", bf16_tabled.per_step(),
                tabled.per_step(), bf16_tabled.per_step() / tabled.per_step());
    fp8["modulation_table"] = tabled.json();
    if (o.quality_steps > 0) fp8["quality"] = fp8_quality(tr, in, out, o.quality_steps, o.fp8_attention);
    r["fp8"] = fp8;
    base = best;  // what the profile and the LoRA part compare against
  }

  if (o.profile) r["per_op_ms"] = profile_ops(be, [&] { tr.forward(in, out); }, "one eager step");
  std::printf("  peak device memory %.2f GiB\n", double(be.peak_memory()) / (1ull << 30));
  if (o.lora_rank > 0) r["lora"] = bench_lora(tr, in, out, base, tabled, o);
  return r;
}

void run(const BenchOptions& o) {
  nlohmann::json all;
  if (o.components) {
    // Each on a fresh backend, so its peak memory is its own.
    all["text_encoders"] = bench_text_encoders(*make_backend(o.device), o.steps);
    all["vae"] = bench_vae_decode(*make_backend(o.device), 1024, o.steps);
  }
  auto backend = make_backend(o.device);
  backend->set_fp8_fast_accumulation(o.fp8_fast_accum);
  if (o.e2e) {
    std::printf("device   %s\n", backend->name().c_str());
    EndToEndOptions e;
    e.tokenizers = o.tokenizers;
    e.runs = o.e2e_runs;
    e.size = o.sizes.front();
    e.fp8 = o.fp8;
    e.fp8_attention = o.fp8_attention;
    e.lora_rank = o.lora_rank;
    e.lora_mode = o.lora_mode;
    e.lora_dir = o.lora_dir;
    e.vram = o.vram;
    e.t5 = o.t5;
    all["device"] = backend->name();
    all["end_to_end"] = bench_end_to_end(*backend, e);
    if (!o.json_out.empty()) std::ofstream(o.json_out) << all.dump(1) << "\n";
    return;
  }
  const FluxConfig c = bench_config(o.model);
  auto t0 = Clock::now();
  FluxTransformer tr(c, random_flux_weights(c, *backend, 1), *backend);
  backend->synchronize();
  const FluxStepCost cost = flux_step_cost(c, 1, 4096, 512);
  std::printf("device   %s\n", backend->name().c_str());
  std::printf("model    FLUX.1-%s-shaped transformer, RANDOM weights made on the device: %.2f B parameters "
              "(%.1f GB in %s) in %.1f s\n",
              o.model.c_str(), cost.weight_params / 1e9,
              cost.weight_params * double(dtype_size(backend->compute_dtype())) / 1e9,
              std::string(dtype_name(backend->compute_dtype())).c_str(), seconds_since(t0));
  all["device"] = backend->name();
  all["model"] = o.model;
  all["results"] = nlohmann::json::array();
  for (int size : o.sizes) all["results"].push_back(bench_size(tr, size, o));
  if (!o.json_out.empty()) {
    std::ofstream(o.json_out) << all.dump(1) << "\n";
    std::printf("\nwrote %s\n", o.json_out.c_str());
  }
}

}  // namespace

void register_bench_command(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* cmd = app.add_subcommand("bench", "Time transformer steps on FLUX.1-sized random weights");
  cmd->add_option("--device", o->device, "cuda (default) or cpu")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--model-size", o->model, "dev (default), schnell, or tiny (for a CPU try-out)");
  cmd->add_option("--sizes", o->sizes, "image sizes in pixels (square), e.g. 512 1024 1536")->delimiter(',');
  cmd->add_option("--steps", o->steps, "timed graph replays per size (median reported)")->check(CLI::PositiveNumber);
  cmd->add_option("--text-tokens", o->txt_tokens, "T5 tokens (512 for dev, 256 for schnell)");
  cmd->add_option("--batch", o->batch, "images per step")->check(CLI::PositiveNumber);
  cmd->add_flag("!--no-profile", o->profile, "skip the per-op breakdown");
  cmd->add_option("--json", o->json_out, "also write the results as JSON here");
  cmd->add_option("--lora-rank", o->lora_rank, "also time a random rank-r LoRA on every block linear (0: off)");
  cmd->add_option("--lora-mode", o->lora_mode, "merged (default) or runtime")
      ->check(CLI::IsMember({"merged", "runtime"}));
  cmd->add_option("--lora-dir", o->lora_dir,
                  "where the random LoRA files are written and removed (default /dev/shm when it has room, else the "
                  "temp directory; --e2e: /tmp)");
  cmd->add_option("--swaps", o->swaps, "LoRA swaps timed")->check(CLI::PositiveNumber);
  cmd->add_flag("--lora-read-sweep", o->lora_read_sweep,
                "also time reading the LoRA file alone over reader threads, chunk sizes and pread/mapped copies");
  cmd->add_flag("--fp8", o->fp8, "also time the step with FP8 (e4m3) block linears; LoRA timings then use FP8");
  cmd->add_flag("--fp8-fast-accum", o->fp8_fast_accum, "FP8 GEMMs with Hopper's fast (less exact) accumulation");
  cmd->add_flag("--fp8-attention", o->fp8_attention,
                "with --fp8: also time (and then use) FP8 attention (e4m3 q, k, v through cuDNN)");
  cmd->add_option("--quality-steps", o->quality_steps, "FP8 vs bf16 sampling run length (0: skip)");
  cmd->add_option("--schedule", o->schedule, "sampling steps a modulation table covers (its time is spread over them)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--e2e", o->e2e, "time the whole pipeline (text encoders, steps, VAE) instead; first --sizes entry");
  cmd->add_option("--e2e-runs", o->e2e_runs, "timed generations for --e2e (median)")->check(CLI::PositiveNumber);
  cmd->add_option("--tokenizers", o->tokenizers, "--e2e: pipeline folder with tokenizer/ and tokenizer_2/");
  cmd->add_option("--t5", o->t5, "--e2e: T5-XXL weights, bf16 (default) or nf4 (reports NF4 vs bf16 cosine)")
      ->check(CLI::IsMember({"bf16", "nf4"}));
  cmd->add_option("--vram", o->vram, "--e2e: device memory budget, e.g. 24G (plans on-demand components; then "
                  "also times the run without it)");
  cmd->add_flag("--components", o->components, "also time CLIP-L, T5-XXL (512 tokens) and the VAE decoder (1024²)");
  cmd->callback([o] { run(*o); });
}

}  // namespace fluxswap
