#include "backend/cuda/cudnn_attention.h"

#include <cmath>
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
                       .set_attn_scale(attn_scale);
    o = graph->sdpa(q, k, v, options)[0];
  }
  o->set_output(true).set_uid(kO).set_dim({s.B, s.H, s.S, s.D}).set_stride({s.out_sb, s.D, s.out_sn, 1});

  check_fe(graph->validate(), "cudnn_frontend validate");
  check_fe(graph->build_operation_graph(handle_->h), "cudnn_frontend build_operation_graph");
  check_fe(graph->create_execution_plans({fe::HeurMode_t::A}), "cudnn_frontend create_execution_plans");
  check_fe(graph->check_support(), "cudnn_frontend check_support");
  check_fe(graph->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE), "cudnn_frontend build_plans");
  int64_t ws = 0;
  check_fe(graph->get_workspace_size(ws), "cudnn_frontend get_workspace_size");
  auto plan = std::make_unique<Plan>();
  plan->graph = std::move(graph);
  plan->workspace = memory_.allocate(size_t(ws), "attention workspace");
  plans_.emplace(s, std::move(plan));
}

void CudnnAttention::run(const AttentionShape& s, const void* q, const void* k, const void* v, void* out) {
  const Plan& plan = *plans_.at(s);
  std::unordered_map<int64_t, void*> pack{{kQ, const_cast<void*>(q)},
                                          {kK, const_cast<void*>(k)},
                                          {kV, const_cast<void*>(v)},
                                          {kO, out}};
  check_fe(plan.graph->execute(handle_->h, pack, plan.workspace.get()), "cudnn_frontend execute");
}

void CudnnAttention::run_fp8(const AttentionShape& s, const void* q8, const void* k8, const void* v8, void* o8,
                             float* slots) {
  const Plan& plan = *plans_.at(s);
  std::unordered_map<int64_t, void*> pack{{kQ, const_cast<void*>(q8)},
                                          {kK, const_cast<void*>(k8)},
                                          {kV, const_cast<void*>(v8)},
                                          {kO, o8}};
  for (int i : {kDescaleQ, kDescaleK, kDescaleV, kDescaleS, kScaleS, kScaleO, kAmaxS, kAmaxO})
    pack.emplace(kSlot0 + i, slots + i);
  check_fe(plan.graph->execute(handle_->h, pack, plan.workspace.get()), "cudnn_frontend execute");
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
void CudnnAttention::run(const AttentionShape&, const void*, const void*, const void*, void*) {}
void CudnnAttention::run_fp8(const AttentionShape&, const void*, const void*, const void*, void*, float*) {}

#endif

}  // namespace fluxswap::cuda
