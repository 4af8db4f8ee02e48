#include "backend/cuda/cudnn_conv.h"

#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/image_kernels.h"

#if FLUXSWAP_HAVE_CUDNN
#include <cudnn.h>

#include <cudnn_frontend.h>
#include <unordered_map>
#endif

namespace fluxswap::cuda {

#if FLUXSWAP_HAVE_CUDNN

namespace fe = cudnn_frontend;

namespace {

enum Uid : int64_t { kX = 1, kW, kBias, kY };

// Engines that want more workspace than this are skipped. The channels-last engines need little or none; in the
// NCHW layout the fast engines want the whole tensors transposed in workspace and are skipped at the large sizes.
constexpr int64_t kMaxWorkspace = int64_t(256) << 20;

void check_cudnn(cudnnStatus_t status, const char* call) {
  if (status != CUDNN_STATUS_SUCCESS) fail("conv2d", call, cudnnGetErrorString(status));
}

void check_fe(fe::error_t status, const char* call) {
  if (status.is_bad()) fail("conv2d", call, status.get_message());
}

std::string describe(const ConvShape& s) {
  auto d = [](int64_t v) { return std::to_string(v); };
  return "B " + d(s.B) + ", " + d(s.Cin) + " -> " + d(s.Cout) + " channels, " + d(s.H) + "x" + d(s.W) + ", kernel " +
         d(s.kh) + "x" + d(s.kw) + ", padding " + d(s.pad) + (s.layout == ConvLayout::Nchw ? ", NCHW" : ", NHWC");
}

// Strides of a [n, c, h, w] tensor stored in `layout`.
std::vector<int64_t> strides(ConvLayout layout, int64_t c, int64_t h, int64_t w) {
  if (layout == ConvLayout::Nchw) return {c * h * w, h * w, w, 1};
  return {h * w * c, 1, w * c, c};
}

// conv_fprop, then + bias [1, Cout, 1, 1] when `fuse_bias`; built and checked for the device.
std::shared_ptr<fe::graph::Graph> make_graph(const ConvShape& s, bool fuse_bias, cudnnHandle_t handle) {
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto x = graph->tensor(fe::graph::Tensor_attributes()
                             .set_name("x")
                             .set_uid(kX)
                             .set_dim({s.B, s.Cin, s.H, s.W})
                             .set_stride(strides(s.layout, s.Cin, s.H, s.W)));
  auto w = graph->tensor(fe::graph::Tensor_attributes()
                             .set_name("w")
                             .set_uid(kW)
                             .set_dim({s.Cout, s.Cin, s.kh, s.kw})
                             .set_stride(strides(s.layout, s.Cin, s.kh, s.kw)));
  const std::vector<int64_t> y_dim{s.B, s.Cout, s.Ho(), s.Wo()}, y_stride = strides(s.layout, s.Cout, s.Ho(), s.Wo());
  auto y = graph->conv_fprop(x, w,
                             fe::graph::Conv_fprop_attributes()
                                 .set_name("conv")
                                 .set_padding({s.pad, s.pad})
                                 .set_stride({1, 1})
                                 .set_dilation({1, 1}));
  y->set_dim(y_dim).set_stride(y_stride);
  if (fuse_bias) {
    auto bias = graph->tensor(fe::graph::Tensor_attributes()
                                  .set_name("bias")
                                  .set_uid(kBias)
                                  .set_dim({1, s.Cout, 1, 1})
                                  .set_stride(strides(s.layout, s.Cout, 1, 1)));
    y = graph->pointwise(y, bias,
                         fe::graph::Pointwise_attributes().set_name("bias_add").set_mode(fe::PointwiseMode_t::ADD));
    y->set_dim(y_dim).set_stride(y_stride);
  }
  y->set_output(true).set_uid(kY).set_data_type(fe::DataType_t::BFLOAT16);

  check_fe(graph->validate(), "cudnn_frontend validate");
  check_fe(graph->build_operation_graph(handle), "cudnn_frontend build_operation_graph");
  check_fe(graph->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}),
           "cudnn_frontend create_execution_plans");
  graph->deselect_workspace_greater_than(kMaxWorkspace);
  check_fe(graph->check_support(), "cudnn_frontend check_support");
  check_fe(graph->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE), "cudnn_frontend build_plans");
  return graph;
}

// Where a plan's buffers lie in the scratch arena: [workspace | x | w | y], each part 256-byte aligned; the
// copies only in the NHWC layout.
struct ScratchParts {
  size_t x = 0, w = 0, y = 0, total = 0;
};

ScratchParts scratch_parts(const ConvShape& s, int64_t workspace) {
  auto up = [](int64_t bytes) { return size_t((bytes + 255) / 256 * 256); };
  ScratchParts p;
  p.total = up(workspace);
  if (s.layout == ConvLayout::Nhwc) {
    const int64_t e = 2;  // bf16
    p.x = p.total;
    p.w = p.x + up(s.B * s.Cin * s.H * s.W * e);
    p.y = p.w + up(s.Cout * s.Cin * s.kh * s.kw * e);
    p.total = p.y + up(s.B * s.Cout * s.Ho() * s.Wo() * e);
  }
  return p;
}

}  // namespace

struct CudnnConv::Handle {
  cudnnHandle_t h = nullptr;
  ~Handle() {
    if (h) cudnnDestroy(h);
  }
};

struct CudnnConv::Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  bool fused_bias = false;
  ScratchParts parts;
};

CudnnConv::CudnnConv(cudaStream_t stream) : stream_(stream), handle_(std::make_unique<Handle>()) {
  check_cudnn(cudnnCreate(&handle_->h), "cudnnCreate");
  check_cudnn(cudnnSetStream(handle_->h, stream), "cudnnSetStream");
}

CudnnConv::~CudnnConv() = default;

void CudnnConv::build(const ConvShape& s, DeviceMemory& memory) {
  auto plan = std::make_unique<Plan>();
  std::string why;
  // A fused bias saves a pass over the output, but fewer engines offer the fusion: the plain convolution plus the
  // backend's bias kernel is the second choice.
  const std::vector<bool> fusions = s.bias ? std::vector<bool>{true, false} : std::vector<bool>{false};
  for (const bool fuse : fusions) {
    try {
      plan->graph = make_graph(s, fuse, handle_->h);
      plan->fused_bias = fuse;
      break;
    } catch (const std::exception& e) {  // the frontend's own exceptions too
      why += std::string(why.empty() ? "" : "; ") + (s.bias ? (fuse ? "bias fused: " : "bias apart: ") : "") +
             e.what();
    }
  }
  if (!plan->graph) throw Error("cuda backend: conv2d: no cuDNN engine for " + describe(s) + ": " + why);
  int64_t ws = 0;
  check_fe(plan->graph->get_workspace_size(ws), "cudnn_frontend get_workspace_size");
  plan->parts = scratch_parts(s, ws);
  if (plan->parts.total > scratch_bytes_) grow_scratch(plan->parts.total, memory);
  plans_.emplace(s, std::move(plan));
}

void CudnnConv::grow_scratch(size_t bytes, DeviceMemory& memory) {
  std::shared_ptr<void> bigger = memory.allocate(bytes, "conv2d scratch");  // may throw: the old arena stays
  if (scratch_recorded_) {
    retired_.push_back(std::move(scratch_));
  } else if (scratch_) {
    // Work already enqueued may still be reading the old arena.
    check(cudaStreamSynchronize(stream_), "conv2d", "cudaStreamSynchronize");
  }
  scratch_ = std::move(bigger);
  scratch_bytes_ = bytes;
  scratch_recorded_ = false;
}

void CudnnConv::ensure_scratch(const ConvShape& s, DeviceMemory& memory) {
  const size_t need = plans_.at(s)->parts.total;
  if (need > scratch_bytes_) grow_scratch(need, memory);
}

void CudnnConv::release_scratch() {
  if (scratch_recorded_ || !scratch_) return;
  check(cudaStreamSynchronize(stream_), "conv2d", "cudaStreamSynchronize");
  scratch_.reset();
  scratch_bytes_ = 0;
}

void CudnnConv::run(const ConvShape& s, const void* x, const void* w, const void* bias, void* y, bool capturing) {
  const Plan& plan = *plans_.at(s);
  const char* op = "conv2d";
  scratch_recorded_ = scratch_recorded_ || capturing;
  auto* arena = static_cast<char*>(scratch_.get());
  auto bf16 = [](const void* p) { return static_cast<const __nv_bfloat16*>(p); };
  void *cx = const_cast<void*>(x), *cw = const_cast<void*>(w), *cy = y;
  if (s.layout == ConvLayout::Nhwc) {
    // x [B, Cin, HW] -> [B, HW, Cin]; w [Cout, Cin, taps] -> [Cout, taps, Cin] (KRSC).
    cx = arena + plan.parts.x;
    cw = arena + plan.parts.w;
    cy = arena + plan.parts.y;
    launch_transpose_last2(bf16(x), static_cast<__nv_bfloat16*>(cx), s.B, s.Cin, s.H * s.W, stream_, op);
    launch_transpose_last2(bf16(w), static_cast<__nv_bfloat16*>(cw), s.Cout, s.Cin, s.kh * s.kw, stream_, op);
  }
  std::unordered_map<int64_t, void*> pack{{kX, cx}, {kW, cw}, {kY, cy}};
  if (plan.fused_bias) pack.emplace(kBias, const_cast<void*>(bias));
  check_fe(plan.graph->execute(handle_->h, pack, arena), "cudnn_frontend execute");  // the workspace leads
  auto* out = static_cast<__nv_bfloat16*>(y);
  if (s.layout == ConvLayout::Nhwc)
    launch_transpose_last2(bf16(cy), out, s.B, s.Ho() * s.Wo(), s.Cout, stream_, op);  // back to [B, Cout, HW]
  if (s.bias && !plan.fused_bias) launch_channel_bias(out, bf16(bias), s.B, s.Cout, s.Ho() * s.Wo(), stream_, op);
}

#else

struct CudnnConv::Handle {};
struct CudnnConv::Plan {};

CudnnConv::CudnnConv(cudaStream_t stream) : stream_(stream) {
  throw Error("cuda backend: conv2d: this build has no cuDNN (run scripts/install_cudnn_frontend.sh and "
              "reconfigure)");
}
CudnnConv::~CudnnConv() = default;
void CudnnConv::build(const ConvShape&, DeviceMemory&) {}
void CudnnConv::grow_scratch(size_t, DeviceMemory&) {}
void CudnnConv::ensure_scratch(const ConvShape&, DeviceMemory&) {}
void CudnnConv::release_scratch() {}
void CudnnConv::run(const ConvShape&, const void*, const void*, const void*, void*, bool) {}

#endif

}  // namespace fluxswap::cuda
