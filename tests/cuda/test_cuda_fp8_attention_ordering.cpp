// cuDNN's attention at FLUX.1's size (24 heads, 4608 tokens), on its own and between the kernels around it.
//
// What session 5 measured on the H100 (cuDNN 9.14): the bf16 kernel reproduces its output bit for bit whatever ran
// before it. The FP8 kernel (engine 2, the heuristics' first plan) writes every output byte but is not run-to-run
// reproducible: now and then a run comes out a little different, with the same inputs and a host wait before it as
// well as right behind the kernel that wrote its inputs (a few hundred to ~85k of its 14.2M e4m3 codes, by a few
// thousandths of the output's largest value). No fence between the writer of its inputs and cuDNN (an event, a
// memset, an empty kernel) changed that, the recorded graph has only full dependencies, and cuDNN's only other plan
// for the shape is faster but differs on every run by millions of codes. So these tests hold bf16 to bit equality
// and FP8 to that noise: at most 5% of a layer's codes differ, none by more than two steps of the largest (64 in
// code units, where the output's scale puts max |out| at or below 448).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cudnn_attention.h"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/fp8_attention_kernels.h"
#include "backend/cuda/kernels.h"
#include "core/dtype.h"
#include "quant/fp8.h"
#include "cuda_test_util.h"

namespace fluxswap::test {
namespace {

using cuda::check;

constexpr int64_t B = 1, H = 24, S = 4608, D = 128, N = B * H * S * D;

struct Device {
  std::shared_ptr<void> owner;
  template <class T = void>
  T* p() const {
    return static_cast<T*>(owner.get());
  }
};

class CudnnFp8AttentionOrdering : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) GTEST_SKIP() << "no CUDA device";
    cudaGetLastError();
    memory_ = std::make_unique<cuda::DeviceMemory>(0);
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "test", "cudaStreamCreateWithFlags");
    try {
      attention_ = std::make_unique<cuda::CudnnAttention>(*memory_, stream_);
      attention_->build(shape_);
    } catch (const Error& e) {
      GTEST_SKIP() << "no cuDNN FP8 attention: " << e.what();
    }
    // q and k quantised at the scale their max gives (the product keeps softmax in its normal range), two different
    // v sources with their own max |v|.
    std::mt19937 rng(7);
    for (Device* d : {&q8_, &k8_, &v8_, &o8_}) *d = alloc(N);
    for (Device* d : {&qkv_slots_, &slots_}) *d = alloc(cuda::kFp8AttentionSlots * sizeof(float));
    for (Device* d : {&amax_qk_, &amax_a_, &amax_b_}) *d = alloc(sizeof(float));
    dequantized_ = alloc(N * 2);
    const float mq = upload_normal(q_bf16_, rng, 1.0f, 0), mk = upload_normal(k_bf16_, rng, 1.0f, 0);
    qk_scale_ = 448.0f / std::max(mq, mk);
    put_scalar(amax_qk_, std::max(mq, mk));
    put_scalar(amax_a_, upload_normal(v_a_, rng, 1.0f, 0));
    put_scalar(amax_b_, upload_normal(v_b_, rng, 3.0f, 0.5f));
    cuda::launch_quantize_v_e4m3(heads(q_bf16_), q8_.p<uint8_t>(), amax_qk_.p<float>(), qk_scale_,
                                 qkv_slots_.p<float>(), stream_);
    cuda::launch_quantize_v_e4m3(heads(k_bf16_), k8_.p<uint8_t>(), amax_qk_.p<float>(), qk_scale_,
                                 qkv_slots_.p<float>(), stream_);
    sync();
  }
  void TearDown() override {
    if (stream_) cudaStreamSynchronize(stream_), cudaStreamDestroy(stream_);
  }

  Device alloc(size_t bytes) { return {memory_->allocate(bytes, "test")}; }
  static cuda::VHeads heads(const Device& d) { return {d.p<__nv_bfloat16>(), B, H, S, D, H * S * D, S * D, D}; }
  void sync() { check(cudaStreamSynchronize(stream_), "test", "cudaStreamSynchronize"); }
  void put_scalar(const Device& d, float v) {
    check(cudaMemcpy(d.p(), &v, sizeof v, cudaMemcpyHostToDevice), "test", "cudaMemcpy");
  }
  // N bf16 normal values (std, mean) into a new buffer; returns their max |x|.
  float upload_normal(Device& d, std::mt19937& rng, float std, float mean) {
    std::normal_distribution<float> normal(mean, std);
    std::vector<uint16_t> h(static_cast<size_t>(N));
    float m = 0;
    for (auto& x : h) {
      x = f32_to_bf16(normal(rng));
      m = std::max(m, std::fabs(bf16_to_f32(x)));
    }
    d = alloc(N * 2);
    check(cudaMemcpy(d.p(), h.data(), h.size() * 2, cudaMemcpyHostToDevice), "test", "cudaMemcpy");
    return m;
  }
  std::vector<uint8_t> output() {
    sync();
    std::vector<uint8_t> h(static_cast<size_t>(N));
    check(cudaMemcpy(h.data(), o8_.p(), h.size(), cudaMemcpyDeviceToHost), "test", "cudaMemcpy");
    return h;
  }
  // One layer's FP8 attention as the backend issues it (v quantised just before cuDNN reads it), optionally with a
  // device synchronisation between the two.
  void layer(bool v_b, bool sync_before_cudnn) {
    cuda::launch_quantize_v_e4m3(heads(v_b ? v_b_ : v_a_), v8_.p<uint8_t>(), (v_b ? amax_b_ : amax_a_).p<float>(),
                                 qk_scale_, slots_.p<float>(), stream_);
    if (sync_before_cudnn) sync();
    attention_->run_fp8(shape_, q8_.p(), k8_.p(), v8_.p(), o8_.p(), slots_.p<float>());
  }

  const cuda::AttentionShape shape_{.B = B, .H = H, .S = S, .D = D, .out_sb = S * H * D, .out_sn = H * D,
                                    .v_sb = S * H * D, .v_sh = S * D, .v_ss = D, .fp8 = true};
  std::unique_ptr<cuda::DeviceMemory> memory_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::CudnnAttention> attention_;
  Device q_bf16_, k_bf16_, v_a_, v_b_, q8_, k8_, v8_, o8_, qkv_slots_, slots_, amax_qk_, amax_a_, amax_b_, dequantized_;
  float qk_scale_ = 1.0f;
};

// Codes that differ between two e4m3 outputs: how many, and the largest difference of their values (code units).
struct CodeDiff {
  int64_t count = 0;
  float delta = 0;
};
CodeDiff code_diff(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  CodeDiff d;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == b[i]) continue;
    ++d.count;
    d.delta = std::max(d.delta, std::fabs(quant::e4m3_to_f32(a[i]) - quant::e4m3_to_f32(b[i])));
  }
  return d;
}
CodeDiff worse(const CodeDiff& a, const CodeDiff& b) { return {std::max(a.count, b.count), std::max(a.delta, b.delta)}; }
void expect_within_fp8_noise(const CodeDiff& d) {
  EXPECT_LE(d.count, N / 20);
  EXPECT_LE(d.delta, 64.0f);
}

TEST_F(CudnnFp8AttentionOrdering, SameInputsGiveTheSameBytesUpToItsNoise) {
  layer(false, true);
  const std::vector<uint8_t> first = output();
  CodeDiff worst;
  int differing = 0;
  for (int i = 0; i < 8; ++i) {
    attention_->run_fp8(shape_, q8_.p(), k8_.p(), v8_.p(), o8_.p(), slots_.p<float>());
    const CodeDiff d = code_diff(output(), first);
    differing += d.count > 0;
    worst = worse(worst, d);
  }
  std::printf("[ ordering ] same inputs, 8 runs after host waits: %d differ (at most %lld of %lld codes, by up to %.3g "
              "in code units)\n", differing, (long long)worst.count, (long long)N, worst.delta);
  expect_within_fp8_noise(worst);
}

TEST_F(CudnnFp8AttentionOrdering, WritesEveryOutputByte) {
  layer(false, true);
  sync();
  check(cudaMemsetAsync(o8_.p(), 0x7f, N, stream_), "test", "cudaMemsetAsync");  // e4m3 NaN: never a result here
  attention_->run_fp8(shape_, q8_.p(), k8_.p(), v8_.p(), o8_.p(), slots_.p<float>());
  int64_t nan = 0;
  for (uint8_t b : output()) nan += (b & 0x7f) == 0x7f;
  std::printf("[ ordering ] %lld of %lld output bytes left unwritten (or NaN)\n", (long long)nan, (long long)N);
  EXPECT_EQ(nan, 0);
}

// Alternating v sources, each layer's v written by the kernel right before cuDNN's (the v quantisation in FP8, a
// random fill in bf16), eager and replayed from a recording, against the output made with a host wait in between.
TEST_F(CudnnFp8AttentionOrdering, AttentionAfterTheKernelThatWroteItsInputs) {
  const cuda::AttentionShape bf16_shape{.B = B, .H = H, .S = S, .D = D, .out_sb = S * H * D, .out_sn = H * D,
                                        .v_sb = S * H * D, .v_sh = S * D, .v_ss = D};
  attention_->build(bf16_shape);
  Device v16 = alloc(N * 2), o16 = alloc(N * 2), copies[2] = {alloc(N * 2), alloc(N * 2)};
  for (bool fp8 : {true, false}) {
    const size_t out_bytes = size_t(fp8 ? N : 2 * N);
    void* out = fp8 ? o8_.p() : o16.p();
    auto issue = [&](int v, bool wait) {
      if (fp8) return layer(v == 1, wait);
      cuda::launch_fill_normal(v16.p(), true, N, 100 + uint64_t(v), 0.0f, v ? 2.0f : 1.0f, stream_);
      if (wait) sync();
      attention_->run(bf16_shape, q_bf16_.p(), k_bf16_.p(), v16.p(), o16.p());
    };
    auto download = [&](const void* p) {
      sync();
      std::vector<uint8_t> h(out_bytes);
      check(cudaMemcpy(h.data(), p, h.size(), cudaMemcpyDeviceToHost), "test", "cudaMemcpy");
      return h;
    };
    std::vector<uint8_t> ref[2];
    for (int v = 0; v < 2; ++v) {
      issue(v, true);
      ref[v] = download(out);
    }
    ASSERT_GT(code_diff(ref[0], ref[1]).count, 0) << "the two v sources must give different outputs";
    std::vector<CodeDiff> diffs;
    for (int i = 0; i < 16; ++i) {
      issue(i % 2, false);
      diffs.push_back(code_diff(download(out), ref[i % 2]));
    }
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "test", "cudaStreamBeginCapture");
    for (int v = 0; v < 2; ++v) {
      issue(v, false);
      check(cudaMemcpyAsync(copies[v].p(), out, out_bytes, cudaMemcpyDeviceToDevice, stream_), "test",
            "cudaMemcpyAsync");
    }
    check(cudaStreamEndCapture(stream_, &graph), "test", "cudaStreamEndCapture");
    check(cudaGraphInstantiate(&exec, graph, 0), "test", "cudaGraphInstantiate");
    cudaGraphDestroy(graph);
    for (int r = 0; r < 8; ++r) {
      check(cudaGraphLaunch(exec, stream_), "test", "cudaGraphLaunch");
      for (int v = 0; v < 2; ++v) diffs.push_back(code_diff(download(copies[v].p()), ref[v]));
    }
    cudaGraphExecDestroy(exec);
    int differing = 0;
    CodeDiff worst;
    for (const CodeDiff& d : diffs) {
      differing += d.count > 0;
      worst = worse(worst, d);
    }
    std::printf("[ ordering ] %s: %d of %zu layers differ from their output after a host wait (at most %lld bytes, "
                "by up to %.3g)\n", fp8 ? "fp8" : "bf16", differing, diffs.size(), (long long)worst.count, worst.delta);
    if (fp8)
      expect_within_fp8_noise(worst);
    else
      EXPECT_EQ(differing, 0);
  }
}

// The recorded sequence: which kernels cuDNN launches, and whether any dependency between them is programmatic.
TEST_F(CudnnFp8AttentionOrdering, RecordedSequenceHasOnlyFullDependencies) {
  const cuda::RowsView out{dequantized_.p<__nv_bfloat16>(), B, S, H * D, S * H * D, H * D};
  layer(false, true);
  cuda::launch_dequantize_attention_e4m3(o8_.p<uint8_t>(), slots_.p<float>(), amax_a_.p<float>(), out, stream_);
  sync();
  put_scalar(amax_a_, 1.0f);
  cudaGraph_t graph = nullptr;
  check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "test", "cudaStreamBeginCapture");
  layer(false, false);
  cuda::launch_dequantize_attention_e4m3(o8_.p<uint8_t>(), slots_.p<float>(), amax_a_.p<float>(), out, stream_);
  check(cudaStreamEndCapture(stream_, &graph), "test", "cudaStreamEndCapture");
  size_t nodes = 0;
  check(cudaGraphGetNodes(graph, nullptr, &nodes), "test", "cudaGraphGetNodes");
  std::vector<cudaGraphNode_t> node(nodes);
  check(cudaGraphGetNodes(graph, node.data(), &nodes), "test", "cudaGraphGetNodes");
  for (size_t i = 0; i < nodes; ++i) {
    cudaGraphNodeType type{};
    check(cudaGraphNodeGetType(node[i], &type), "test", "cudaGraphNodeGetType");
    const char* name = "";
    if (type == cudaGraphNodeTypeKernel) {
      cudaKernelNodeParams params{};
      if (cudaGraphKernelNodeGetParams(node[i], &params) == cudaSuccess && params.func)
        if (cudaFuncGetName(&name, params.func) != cudaSuccess) name = "(name unavailable)";
      cudaGetLastError();
      std::printf("[ ordering ] node %zu: kernel %s grid (%u,%u,%u) block (%u,%u,%u) smem %u\n", i, name,
                  params.gridDim.x, params.gridDim.y, params.gridDim.z, params.blockDim.x, params.blockDim.y,
                  params.blockDim.z, params.sharedMemBytes);
    } else {
      std::printf("[ ordering ] node %zu: type %d\n", i, int(type));
    }
  }
  size_t edges = 0;
  check(cudaGraphGetEdges(graph, nullptr, nullptr, nullptr, &edges), "test", "cudaGraphGetEdges");
  std::vector<cudaGraphNode_t> from(edges), to(edges);
  std::vector<cudaGraphEdgeData> data(edges);
  check(cudaGraphGetEdges(graph, from.data(), to.data(), data.data(), &edges), "test", "cudaGraphGetEdges");
  int programmatic = 0;
  for (size_t e = 0; e < edges; ++e) {
    size_t a = 0, b = 0;
    for (size_t i = 0; i < nodes; ++i) {
      if (node[i] == from[e]) a = i;
      if (node[i] == to[e]) b = i;
    }
    std::printf("[ ordering ] edge %zu -> %zu: type %d from port %d to port %d\n", a, b, int(data[e].type),
                int(data[e].from_port), int(data[e].to_port));
    programmatic += data[e].type == cudaGraphDependencyTypeProgrammatic;
  }
  cudaGraphDestroy(graph);
  EXPECT_EQ(programmatic, 0) << "a kernel of the FP8 attention may start before the kernel it follows has finished";
}

}  // namespace
}  // namespace fluxswap::test
