#include "backend/cuda/cudnn_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/fp8_attention_kernels.h"

#if FLUXSWAP_HAVE_CUDNN
#include <cudnn.h>

#include <cudnn_frontend.h>
#include <unordered_map>
#endif

namespace fluxswap::cuda {

#if FLUXSWAP_HAVE_CUDNN

namespace fe = cudnn_frontend;

namespace {

enum Uid : int64_t { kQ = 1, kK, kV, kO, kSlot0 = 16 };  // FP8: slot i of fp8_attention_kernels.h is kSlot0 + i

void check_cudnn(cudnnStatus_t status, const char* call) {
  if (status != CUDNN_STATUS_SUCCESS) fail("attention", call, cudnnGetErrorString(status));
}

void check_fe(fe::error_t status, const char* call) {
  if (status.is_bad()) fail("attention", call, status.get_message());
}

// cuDNN's bf16 SDPA comes in two implementations: UNIFIED (one SDPA operation, cuDNN 9.13.1 and newer; the
// frontend's AUTO picks it where it can) and COMPOSITE (the operation graph of matmuls and softmax). They are timed
// against each other with FLUXSWAP_CUDNN_SDPA=composite|unified (default: the frontend's choice). FP8 SDPA has only
// the composite one.
fe::AttentionImplementation_t bf16_implementation() {
  const char* env = std::getenv("FLUXSWAP_CUDNN_SDPA");
  const std::string v = env ? env : "";
  if (v == "composite") return fe::AttentionImplementation_t::COMPOSITE;
  if (v == "unified") return fe::AttentionImplementation_t::UNIFIED;
  if (!v.empty() && v != "auto")
    fail("attention", "FLUXSWAP_CUDNN_SDPA", "must be auto, composite or unified, got \"" + v + "\"");
  return fe::AttentionImplementation_t::AUTO;
}

// Which of the heuristics' engine configurations runs (FLUXSWAP_CUDNN_PLAN): its first choice (heuristic, the
// default), or the fastest of the first few, timed on each shape's first eager run on its real operands (fastest;
// the timings go to stderr). Session 3 timed every plan once on zero-filled inputs and kept plans that were much
// slower on real data (docs/PERF.md); this timing runs on the operands themselves, after a warm-up.
bool fastest_plan() {
  const char* env = std::getenv("FLUXSWAP_CUDNN_PLAN");
  const std::string v = env ? env : "";
  if (v.empty() || v == "heuristic") return false;
  if (v == "fastest") return true;
  fail("attention", "FLUXSWAP_CUDNN_PLAN", "must be heuristic or fastest, got \"" + v + "\"");
}

constexpr int64_t kMaxTimedPlans = 6;

}  // namespace

struct CudnnAttention::Handle {
  cudnnHandle_t h = nullptr;
  ~Handle() {
    if (h) cudnnDestroy(h);
  }
};

struct CudnnAttention::Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  std::shared_ptr<void> workspace;
  std::vector<int64_t> built;  // the engine configurations built, the heuristics' choice first
  int64_t index = 0;           // the one that runs: the heuristics' choice until timing picks one
  bool timed = false;

  // `pack` by value: the frontend adds pointers to its own pass-by-value scalars (the attention scale) to the map it
  // is given, valid for that call only, and a later call would keep the stale ones (emplace).
  void execute(cudnnHandle_t h, std::unordered_map<int64_t, void*> pack) const {
    check_fe(graph->execute_plan_at_index(h, pack, workspace.get(), index), "cudnn_frontend execute_plan_at_index");
  }
};

CudnnAttention::CudnnAttention(DeviceMemory& memory, cudaStream_t stream)
    : memory_(memory), handle_(std::make_unique<Handle>()) {
  check_cudnn(cudnnCreate(&handle_->h), "cudnnCreate");
  check_cudnn(cudnnSetStream(handle_->h, stream), "cudnnSetStream");
}

CudnnAttention::~CudnnAttention() = default;

void CudnnAttention::build(const AttentionShape& s) {
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(s.fp8 ? fe::DataType_t::FP8_E4M3 : fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto input = [&](const char* name, int64_t uid, std::vector<int64_t> stride) {
    return graph->tensor(fe::graph::Tensor_attributes()
                             .set_name(name)
                             .set_uid(uid)
                             .set_dim({s.B, s.H, s.S, s.D})
                             .set_stride(std::move(stride)));
  };
  const std::vector<int64_t> heads{s.H * s.S * s.D, s.S * s.D, s.D, 1};
  auto q = input("Q", kQ, heads), k = input("K", kK, heads), v = input("V", kV, {s.v_sb, s.v_sh, s.v_ss, 1});
  const float attn_scale = float(1.0 / std::sqrt(double(s.D)));
  std::shared_ptr<fe::graph::Tensor_attributes> o;
  if (s.fp8) {
    auto slot = [&](const char* name, int slot_index) {
      return graph->tensor(fe::graph::Tensor_attributes()
                               .set_name(name)
                               .set_uid(kSlot0 + slot_index)
                               .set_dim({1, 1, 1, 1})
                               .set_stride({1, 1, 1, 1})
                               .set_data_type(fe::DataType_t::FLOAT));
    };
    auto options = fe::graph::SDPA_fp8_attributes()
                       .set_name("flash_attention_fp8")
                       .set_generate_stats(false)
                       .set_attn_scale(attn_scale);
    auto outputs = graph->sdpa_fp8(q, k, v, slot("Descale_Q", kDescaleQ), slot("Descale_K", kDescaleK),
                                   slot("Descale_V", kDescaleV), slot("Descale_S", kDescaleS),
                                   slot("Scale_S", kScaleS), slot("Scale_O", kScaleO), options);
    o = outputs[0];
    for (auto [amax, slot_index] : {std::pair{outputs[2], int(kAmaxS)}, std::pair{outputs[3], int(kAmaxO)}})
      amax->set_output(true)
          .set_uid(kSlot0 + slot_index)
          .set_dim({1, 1, 1, 1})
          .set_stride({1, 1, 1, 1})
          .set_data_type(fe::DataType_t::FLOAT);
  } else {
    auto options = fe::graph::SDPA_attributes()
                       .set_name("flash_attention")
                       .set_generate_stats(false)
                       .set_attn_scale(attn_scale)
                       .set_implementation(bf16_implementation());
    o = graph->sdpa(q, k, v, options)[0];
  }
  o->set_output(true).set_uid(kO).set_dim({s.B, s.H, s.S, s.D}).set_stride({s.out_sb, s.D, s.out_sn, 1});

  check_fe(graph->validate(), "cudnn_frontend validate");
  check_fe(graph->build_operation_graph(handle_->h), "cudnn_frontend build_operation_graph");
  check_fe(graph->create_execution_plans({fe::HeurMode_t::A}), "cudnn_frontend create_execution_plans");
  check_fe(graph->check_support(), "cudnn_frontend check_support");
  // The heuristics' choice is the first configuration that builds (what build_plans(HEURISTICS_CHOICE) takes);
  // timing tries the next few too. Each runs by its index: building one makes it the graph's default.
  auto plan = std::make_unique<Plan>();
  const int64_t wanted = fastest_plan() ? kMaxTimedPlans : 1, count = graph->get_execution_plan_count();
  int64_t ws = 0;
  for (int64_t i = 0; i < count && int64_t(plan->built.size()) < wanted; ++i) {
    int64_t plan_ws = 0;
    if (graph->build_plan_at_index(i).is_bad() || graph->get_workspace_size_plan_at_index(i, plan_ws).is_bad())
      continue;
    plan->built.push_back(i);
    ws = std::max(ws, plan_ws);
  }
  if (plan->built.empty())
    fail("attention", "cudnn_frontend build_plan_at_index", "none of " + std::to_string(count) +
                                                                " engine configurations could be built");
  plan->graph = std::move(graph);
  plan->workspace = memory_.allocate(size_t(ws), "attention workspace");
  plan->index = plan->built.front();
  plan->timed = plan->built.size() < 2;
  plans_.emplace(s, std::move(plan));
}

void CudnnAttention::time_plans(const AttentionShape& s, Plan& plan, const std::unordered_map<int64_t, void*>& pack) {
  plan.timed = true;
  cudaStream_t stream = nullptr;
  check_cudnn(cudnnGetStream(handle_->h, &stream), "cudnnGetStream");
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "attention", "cudaEventCreate");
  check(cudaEventCreate(&stop), "attention", "cudaEventCreate");
  // A configuration that builds but does not run is skipped (its time infinite); the heuristics' choice must run.
  std::vector<float> ms;
  for (int64_t index : plan.built) {
    plan.index = index;
    constexpr int kReps = 3;
    float t = 0;
    try {
      plan.execute(handle_->h, pack);  // warm-up
      check(cudaEventRecord(start, stream), "attention", "cudaEventRecord");
      for (int r = 0; r < kReps; ++r) plan.execute(handle_->h, pack);
      check(cudaEventRecord(stop, stream), "attention", "cudaEventRecord");
      check(cudaEventSynchronize(stop), "attention", "cudaEventSynchronize");
      check(cudaEventElapsedTime(&t, start, stop), "attention", "cudaEventElapsedTime");
    } catch (const Error&) {
      if (index == plan.built.front()) {
        cudaEventDestroy(start);
        cudaEventDestroy(stop);
        throw;
      }
      t = std::numeric_limits<float>::infinity();
    }
    ms.push_back(t / kReps);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  const size_t best = size_t(std::min_element(ms.begin(), ms.end()) - ms.begin());
  plan.index = plan.built[best];
  std::string times;
  for (size_t i = 0; i < ms.size(); ++i)
    times += (i ? " / " : "") + std::to_string(plan.built[i]) + ": " + std::to_string(ms[i]).substr(0, 5) + " ms";
  std::fprintf(stderr, "fluxswap: cuDNN %s attention B %lld H %lld S %lld D %lld: %zu engine configurations timed "
               "(%s); running %lld (the heuristics' first choice: %lld)\n",
               s.fp8 ? "FP8" : "bf16", (long long)s.B, (long long)s.H, (long long)s.S, (long long)s.D, ms.size(),
               times.c_str(), (long long)plan.index, (long long)plan.built.front());
}

void CudnnAttention::run(const AttentionShape& s, const void* q, const void* k, const void* v, void* out,
                         bool may_time) {
  Plan& plan = *plans_.at(s);
  std::unordered_map<int64_t, void*> pack{{kQ, const_cast<void*>(q)},
                                          {kK, const_cast<void*>(k)},
                                          {kV, const_cast<void*>(v)},
                                          {kO, out}};
  if (!plan.timed && may_time) time_plans(s, plan, pack);
  plan.execute(handle_->h, pack);
}

void CudnnAttention::run_fp8(const AttentionShape& s, const void* q8, const void* k8, const void* v8, void* o8,
                             float* slots, bool may_time) {
  Plan& plan = *plans_.at(s);
  std::unordered_map<int64_t, void*> pack{{kQ, const_cast<void*>(q8)},
                                          {kK, const_cast<void*>(k8)},
                                          {kV, const_cast<void*>(v8)},
                                          {kO, o8}};
  for (int i : {kDescaleQ, kDescaleK, kDescaleV, kDescaleS, kScaleS, kScaleO, kAmaxS, kAmaxO})
    pack.emplace(kSlot0 + i, slots + i);
  if (!plan.timed && may_time) time_plans(s, plan, pack);
  plan.execute(handle_->h, pack);
}

#else

struct CudnnAttention::Handle {};
struct CudnnAttention::Plan {};

CudnnAttention::CudnnAttention(DeviceMemory& memory, cudaStream_t) : memory_(memory) {
  throw Error("cuda backend: attention: this build has no cuDNN (run scripts/install_cudnn_frontend.sh and "
              "reconfigure)");
}
CudnnAttention::~CudnnAttention() = default;
void CudnnAttention::build(const AttentionShape&) {}
void CudnnAttention::run(const AttentionShape&, const void*, const void*, const void*, void*, bool) {}
void CudnnAttention::run_fp8(const AttentionShape&, const void*, const void*, const void*, void*, float*, bool) {}
void CudnnAttention::time_plans(const AttentionShape&, Plan&, const std::unordered_map<int64_t, void*>&) {}

#endif

}  // namespace fluxswap::cuda
