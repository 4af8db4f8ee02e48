// cuDNN's attention at FLUX.1's size (24 heads, 4608 tokens), on its own and between the kernels around it.
//
// What session 5 measured on the H100 (cuDNN 9.14): the bf16 kernel reproduces its output bit for bit whatever ran
// before it. The FP8 kernel (engine 2, the heuristics' first plan) writes every output byte and repeats bit for bit
// when it starts on an idle GPU, but when it follows other work without a host wait, about one layer in 16 comes out
// a little different (a few hundred to ~65k of its 14M e4m3 codes, each one or two codes away): its result depends
// on timing. No fence between the writer of its inputs and cuDNN (an event, a memset, an empty kernel) changed that,
// the recorded graph has only full dependencies, and cuDNN's only other plan for the shape is faster but differs on
// every run by millions of codes. So FP8 attention is not run-to-run reproducible; these tests hold bf16 to bit
// equality and FP8 to that bound (a layer's differing codes <= 1% of them, none more than two codes away).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cudnn_attention.h"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/fp8_attention_kernels.h"
#include "backend/cuda/kernels.h"
#include "core/dtype.h"
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
    cuda::launch_quantize_v_e4m3(q_bf16_.p<__nv_bfloat16>(), q8_.p<uint8_t>(), N, amax_qk_.p<float>(), qk_scale_,
                                 qkv_slots_.p<float>(), stream_);
    cuda::launch_quantize_v_e4m3(k_bf16_.p<__nv_bfloat16>(), k8_.p<uint8_t>(), N, amax_qk_.p<float>(), qk_scale_,
                                 qkv_slots_.p<float>(), stream_);
    sync();
  }
  void TearDown() override {
    if (stream_) cudaStreamSynchronize(stream_), cudaStreamDestroy(stream_);
  }

  Device alloc(size_t bytes) { return {memory_->allocate(bytes, "test")}; }
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
    cuda::launch_quantize_v_e4m3((v_b ? v_b_ : v_a_).p<__nv_bfloat16>(), v8_.p<uint8_t>(), N,
                                 (v_b ? amax_b_ : amax_a_).p<float>(), qk_scale_, slots_.p<float>(), stream_);
    if (sync_before_cudnn) sync();
    attention_->run_fp8(shape_, q8_.p(), k8_.p(), v8_.p(), o8_.p(), slots_.p<float>());
  }

  // How many bytes differ, printed with the first few positions (row = token, column = head * D + d).
  static int64_t differing(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, const char* what) {
    int64_t n = 0;
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i] != b[i]) {
        if (n < 2)
          std::printf("[ ordering ] %s: byte %zu (token %zu, column %zu) 0x%02x vs 0x%02x\n", what, i,
                      i / size_t(H * D), i % size_t(H * D), a[i], b[i]);
        ++n;
      }
    return n;
  }

  const cuda::AttentionShape shape_{B, H, S, D, S * H * D, H * D, /*fp8=*/true};
  std::unique_ptr<cuda::DeviceMemory> memory_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::CudnnAttention> attention_;
  Device q_bf16_, k_bf16_, v_a_, v_b_, q8_, k8_, v8_, o8_, qkv_slots_, slots_, amax_qk_, amax_a_, amax_b_, dequantized_;
  float qk_scale_ = 1.0f;
};

TEST_F(CudnnFp8AttentionOrdering, SameInputsGiveTheSameBytes) {
  layer(false, true);
  const std::vector<uint8_t> first = output();
  int64_t worst = 0;
  for (int i = 0; i < 8; ++i) {
    attention_->run_fp8(shape_, q8_.p(), k8_.p(), v8_.p(), o8_.p(), slots_.p<float>());
    worst = std::max(worst, differing(output(), first, "repeat"));
  }
  std::printf("[ ordering ] same inputs, 8 runs: at most %lld of %lld bytes differ\n", (long long)worst, (long long)N);
  EXPECT_EQ(worst, 0);
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

// Codes that differ between two outputs: how many, and the largest distance between two codes of the same sign
// (e4m3 codes order like their magnitudes), or 255 for a sign change.
struct CodeDiff {
  int64_t count = 0;
  int steps = 0;
};
CodeDiff code_diff(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  CodeDiff d;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == b[i]) continue;
    ++d.count;
    const int steps = (a[i] ^ b[i]) & 0x80 ? 255 : std::abs(int(a[i] & 0x7f) - int(b[i] & 0x7f));
    d.steps = std::max(d.steps, steps);
  }
  return d;
}

// Alternating v sources, each layer's v written by the kernel right before cuDNN's (the v quantisation in FP8, a
// random fill in bf16), eager and replayed from a recording, against the output made with a host wait in between.
TEST_F(CudnnFp8AttentionOrdering, AttentionAfterTheKernelThatWroteItsInputs) {
  const cuda::AttentionShape bf16_shape{B, H, S, D, S * H * D, H * D, /*fp8=*/false};
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
    int differing = 0, steps = 0;
    int64_t worst = 0;
    for (const CodeDiff& d : diffs) {
      differing += d.count > 0;
      worst = std::max(worst, d.count);
      steps = std::max(steps, d.steps);
    }
    std::printf("[ ordering ] %s: %d of %zu layers differ from their output after a host wait (worst %lld bytes, "
                "%d codes apart)\n", fp8 ? "fp8" : "bf16", differing, diffs.size(), (long long)worst, steps);
    if (fp8) {
      EXPECT_LE(worst, N / 100);
      EXPECT_LE(steps, 2);
    } else {
      EXPECT_EQ(differing, 0);
    }
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
