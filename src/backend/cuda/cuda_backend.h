#pragma once
// The CUDA backend: bf16 activations and weights, float32 math inside every kernel, one stream, no host
// synchronisation inside ops and no allocation while a CUDA graph is being captured. GEMMs run on cuBLASLt,
// attention on cuDNN's fused SDPA (with a built-in flash-attention kernel as the fallback), the rest on the
// kernels in this folder.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <set>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cublaslt_linear.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cudnn_attention.h"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/fp8_linear.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/op_profiler.h"
#include "backend/cuda/pinned_host_pool.h"
#include "backend/cuda/text_kernels.h"

namespace fluxswap::cuda {

enum class AttentionMode { Auto, Cudnn, Naive };

inline AttentionMode attention_mode_from_env() {
  const char* env = std::getenv("FLUXSWAP_ATTENTION");
  if (!env || !*env || !std::strcmp(env, "auto")) return AttentionMode::Auto;
  if (!std::strcmp(env, "cudnn")) return AttentionMode::Cudnn;
  if (!std::strcmp(env, "naive")) return AttentionMode::Naive;
  throw Error(std::string("FLUXSWAP_ATTENTION='") + env + "': expected auto, cudnn or naive");
}

[[noreturn]] inline void bad(const char* op, const std::string& what) {
  throw Error(std::string("cuda backend: ") + op + ": " + what);
}

inline void check_cuda_tensor(const Tensor& t, const char* op, const char* what, DType dtype) {
  if (!t.defined()) bad(op, std::string(what) + " is undefined");
  if (t.device() != Device::CUDA) bad(op, std::string(what) + " must be a CUDA tensor");
  if (t.dtype() != dtype)
    bad(op, std::string(what) + " must be " + std::string(dtype_name(dtype)) + ", got " +
                std::string(dtype_name(t.dtype())));
}

// A rows view [B, N, C] (a 2-D [B, C] tensor is B rows of one batch), as the CPU reference reads them.
inline RowsView rows_of(const Tensor& t, const char* op, const char* what) {
  check_cuda_tensor(t, op, what, DType::BF16);
  if (t.stride(-1) != 1) bad(op, std::string(what) + " needs a contiguous last dimension");
  auto* p = t.ptr<__nv_bfloat16>();
  if (t.ndim() == 3) return {p, t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1)};
  if (t.ndim() == 2) return {p, 1, t.size(0), t.size(1), 0, t.stride(0)};
  bad(op, std::string(what) + " must be 2-D or 3-D, got " + shape_str(t.shape()));
}

inline VecsView vecs_of(const Tensor& t, const char* op, const char* what) {
  check_cuda_tensor(t, op, what, DType::BF16);
  if (t.ndim() != 2 || t.stride(1) != 1)
    bad(op, std::string(what) + " must be a [B, C] view, got " + shape_str(t.shape()));
  return {t.ptr<__nv_bfloat16>(), t.size(0), t.size(1), t.stride(0)};
}

inline void check_same_rows(const cuda::RowsView& a, const cuda::RowsView& b, const char* op) {
  if (a.B != b.B || a.N != b.N || a.C != b.C) bad(op, "shape mismatch");
}

inline void check_vecs_fit(const cuda::VecsView& v, const cuda::RowsView& r, const char* op, const char* what) {
  if (v.B < r.B || v.C != r.C) bad(op, std::string(what) + " does not match the rows it modulates");
}

inline void check_contiguous(const Tensor& t, const char* op, const char* what) {
  if (!t.is_contiguous()) bad(op, std::string(what) + " must be contiguous");
}

// The weight of a bf16 linear: [nout, K] with contiguous rows.
inline void check_weight(const Tensor& w, const char* op) {
  check_cuda_tensor(w, op, "weight", DType::BF16);
  if (w.ndim() != 2 || w.stride(1) != 1 || w.stride(0) < w.size(1))
    bad(op, "weight must be a [Nout, K] tensor with contiguous rows");
}

// The bias of a linear: bf16 [nout], contiguous; or undefined.
inline void check_bias(const Tensor& bias, int64_t nout, const char* op) {
  if (!bias.defined()) return;
  check_cuda_tensor(bias, op, "bias", DType::BF16);
  if (bias.ndim() != 1 || bias.size(0) != nout || !bias.is_contiguous()) bad(op, "bias must be [Nout] contiguous");
}

// The GEMM epilogue for a bias (or none) and an activation; SiLU and QuickGELU have none and run after.
inline cuda::GemmEpilogue epilogue_for(const Tensor& bias, Activation act) {
  const bool gelu = act == Activation::GeluTanh;
  return bias.defined() ? (gelu ? cuda::GemmEpilogue::GeluBias : cuda::GemmEpilogue::Bias)
                        : (gelu ? cuda::GemmEpilogue::Gelu : cuda::GemmEpilogue::None);
}

// A runtime LoRA branch x [.., k] -> y [.., nout]: down [R, k] and up [nout, R] bf16 with contiguous rows, scratch
// rows with x's rows and at least R columns.
inline void check_lora_factors(const Tensor& down, const Tensor& up, const cuda::RowsView& x, const cuda::RowsView& t,
                               int64_t nout, const char* op) {
  for (auto [f, what] : {std::pair{&down, "lora down"}, {&up, "lora up"}}) {
    check_cuda_tensor(*f, op, what, DType::BF16);
    if (f->ndim() != 2 || f->stride(1) != 1 || f->stride(0) < f->size(1))
      bad(op, std::string(what) + " must be a 2-D tensor with contiguous rows");
  }
  const int64_t R = down.size(0);
  if (down.size(1) != x.C || up.size(0) != nout || up.size(1) != R)
    bad(op, "lora down " + shape_str(down.shape()) + " and up " + shape_str(up.shape()) + " do not fit " +
                std::to_string(x.C) + " inputs and " + std::to_string(nout) + " outputs");
  if (t.B != x.B || t.N != x.N || t.C < R)
    bad(op, "the scratch must have the input's rows and at least " + std::to_string(R) + " columns");
}

struct PinnedStaging;
struct CopyQueue;
struct Fp8GemvLists;
struct StepGates;

// The stream is shared with recordings, which may outlive the backend.
struct StreamHolder {
  int device;
  cudaStream_t stream = nullptr;
  ~StreamHolder() {
    if (stream) cudaStreamDestroy(stream);
  }
};

class CudaRecording final : public RecordedWork {
 public:
  CudaRecording(std::shared_ptr<StreamHolder> stream, cudaGraphExec_t exec) : stream_(std::move(stream)), exec_(exec) {}
  ~CudaRecording() override { cudaGraphExecDestroy(exec_); }
  void replay() override { check(cudaGraphLaunch(exec_, stream_->stream), "replay", "cudaGraphLaunch"); }

 private:
  std::shared_ptr<StreamHolder> stream_;
  cudaGraphExec_t exec_;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : memory_(device), attention_mode_(attention_mode_from_env()) {
    check(cudaSetDevice(device), "init", "cudaSetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device), "init", "cudaGetDeviceProperties");
    if (prop.major < 8)
      bad("init", std::string(prop.name) + " has compute capability " + std::to_string(prop.major) + "." +
                      std::to_string(prop.minor) + "; bf16 tensor cores need 8.0 or newer");
    name_ = "cuda:" + std::to_string(device) + " (" + prop.name + ", bf16)";
    stream_ = std::make_shared<StreamHolder>();
    stream_->device = device;
    check(cudaStreamCreateWithFlags(&stream_->stream, cudaStreamNonBlocking), "init", "cudaStreamCreateWithFlags");
    cuda::prepare_flash_attention();
    gemm_ = std::make_unique<cuda::CublasLtLinear>(memory_);
  }

  ~CudaBackend() override;

  Device device() const override { return Device::CUDA; }
  std::string name() const override { return name_; }
  DType compute_dtype() const override { return DType::BF16; }

  Tensor empty(DType dtype, const Shape& shape) override {
    if (capturing_) bad("empty", "allocation while recording; allocate buffers before record()");
    for (int64_t d : shape)
      if (d < 0) bad("empty", "negative dimension in shape " + shape_str(shape));
    auto owner = memory_.allocate(size_t(shape_numel(shape)) * dtype_size(dtype), "empty");
    void* p = owner.get();
    return Tensor::borrow(p, dtype, shape, Device::CUDA, std::move(owner));
  }

  Tensor upload_weight(const Tensor& host) override {
    if (host.device() != Device::CPU || !dtype_is_float(host.dtype()))
      bad("upload_weight", "expects a host tensor of a float dtype");
    Tensor dev = empty(DType::BF16, host.shape());
    copy_from_host(host, dev);
    return dev;
  }

  void copy_from_host(const Tensor& host, const Tensor& dst) override {
    const char* op = "copy_from_host";
    if (host.shape() != dst.shape()) bad(op, "shape " + shape_str(host.shape()) + " into " + shape_str(dst.shape()));
    if (host.device() != Device::CPU) bad(op, "source must be a host tensor");
    if (dst.device() != Device::CUDA) bad(op, "destination must be a CUDA tensor");
    check_contiguous(dst, op, "destination");
    const void* src = host.data();
    std::vector<unsigned char> staged;
    if (!dtype_is_float(host.dtype()) || !dtype_is_float(dst.dtype())) {
      // Integer tensors (token ids) travel byte for byte.
      if (host.dtype() != dst.dtype() || !host.is_contiguous())
        bad(op, "integer tensors are copied as they are, contiguous " + std::string(dtype_name(host.dtype())) +
                    " into " + std::string(dtype_name(dst.dtype())));
    } else if (dst.dtype() != DType::F32 && dst.dtype() != DType::BF16) {
      bad(op, "a float destination must be float32 or bf16");
    } else if (host.dtype() != dst.dtype() || !host.is_contiguous()) {
      Tensor f = host.to_f32();
      staged.resize(dst.nbytes());
      convert_from_f32(f.ptr<float>(), dst.dtype(), staged.data(), size_t(f.numel()));
      src = staged.data();
    }
    // From pageable memory the call returns once the source has been staged, so `staged` may go right after.
    check(cudaMemcpyAsync(dst.data(), src, dst.nbytes(), cudaMemcpyHostToDevice, stream()), op, "cudaMemcpyAsync");
  }

  // Float32 and bf16 tensors, and int32 ones (token ids; exact up to 2^24).
  Tensor to_host_f32(const Tensor& src) override {
    const char* op = "to_host_f32";
    if (src.device() != Device::CUDA ||
        (src.dtype() != DType::F32 && src.dtype() != DType::BF16 && src.dtype() != DType::I32))
      bad(op, "source must be a float32, bf16 or int32 CUDA tensor");
    if (src.numel() == 0) return Tensor::empty(DType::F32, src.shape());
    // Copy the span the view covers, then gather on the host.
    int64_t span = 1;
    for (int d = 0; d < src.ndim(); ++d) {
      if (src.stride(d) < 0) bad(op, "negative strides are not supported");
      span += (src.size(d) - 1) * src.stride(d);
    }
    const size_t es = dtype_size(src.dtype());
    Tensor raw = Tensor::empty(src.dtype(), {span});
    check(cudaMemcpyAsync(raw.data(), src.data(), size_t(span) * es, cudaMemcpyDeviceToHost, stream()), op,
          "cudaMemcpyAsync");
    check(cudaStreamSynchronize(stream()), op, "cudaStreamSynchronize");
    auto to_f32 = [&](const void* from, float* to, size_t n) {
      if (src.dtype() != DType::I32) return convert_to_f32(src.dtype(), from, to, n);
      for (size_t i = 0; i < n; ++i) to[i] = float(static_cast<const int32_t*>(from)[i]);
    };
    Tensor out = Tensor::empty(DType::F32, src.shape());
    if (src.is_contiguous()) {
      to_f32(raw.data(), out.ptr<float>(), size_t(src.numel()));
      return out;
    }
    const int nd = src.ndim();
    std::vector<int64_t> idx(size_t(nd), 0);
    const auto* base = static_cast<const unsigned char*>(raw.data());
    for (int64_t i = 0; i < src.numel(); ++i) {
      int64_t off = 0;
      for (int d = 0; d < nd; ++d) off += idx[size_t(d)] * src.stride(d);
      to_f32(base + off * int64_t(es), out.ptr<float>() + i, 1);
      for (int d = nd - 1; d >= 0; --d) {
        if (++idx[size_t(d)] < src.size(d)) break;
        idx[size_t(d)] = 0;
      }
    }
    return out;
  }

  void synchronize() override { check(cudaStreamSynchronize(stream()), "synchronize", "cudaStreamSynchronize"); }

  void fill_normal(const Tensor& t, uint64_t seed, float mean, float std) override {
    const char* op = "fill_normal";
    if (t.device() != Device::CUDA || (t.dtype() != DType::F32 && t.dtype() != DType::BF16))
      bad(op, "tensor must be a float32 or bf16 CUDA tensor");
    check_contiguous(t, op, "tensor");
    cuda::launch_fill_normal(t.data(), t.dtype() == DType::BF16, t.numel(), seed, mean, std, stream());
  }

  // Captures fn's device work into a CUDA graph. As on the CPU backend, the work has also run once when this
  // returns (the graph is launched once right after instantiation).
  std::unique_ptr<RecordedWork> record(const std::function<void()>& fn) override {
    const char* op = "record";
    if (capturing_) bad(op, "recordings do not nest");
    // Relaxed mode, so that host-side calls inside cuBLASLt or cuDNN that are not stream work cannot invalidate the
    // capture; this backend refuses its own allocations through capturing_ instead.
    check(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeRelaxed), op, "cudaStreamBeginCapture");
    capturing_ = true;
    cudaGraph_t graph = nullptr;
    try {
      fn();
    } catch (...) {
      capturing_ = false;
      if (cudaStreamEndCapture(stream(), &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
      cudaGetLastError();
      throw;
    }
    capturing_ = false;
    check(cudaStreamEndCapture(stream(), &graph), op, "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    check(inst, op, "cudaGraphInstantiate");
    auto work = std::make_unique<CudaRecording>(stream_, exec);
    work->replay();
    return work;
  }

  void set_profiling(bool on) override { profiler_.set_enabled(on); }
  std::map<std::string, double> profile_ms() const override { return profiler_.totals(); }
  size_t memory_in_use() const override { return memory_.in_use(); }
  size_t peak_memory() const override { return memory_.peak(); }
  void set_memory_limit(uint64_t bytes) override { memory_.set_limit(size_t(bytes)); }
  uint64_t memory_limit() const override { return memory_.limit(); }
  size_t device_memory_used() const override { return memory_.device_used(); }
  void reset_peak_memory() override { memory_.reset_peak(); }
  // Defined in cuda_image_ops.cpp.
  void release_scratch() override;
  // Defined in cuda_weight_streaming.cpp.
  void stream_upload(const Tensor& host_src, const Tensor& device_dst, int buffer) override;
  void wait_stream_upload(int buffer) override;
  bool has_gates() const override { return true; }
  void prepare_gates(int count) override;
  void wait_gate(int gate) override;
  void close_gates() override;
  void open_gate(int gate) override;
  GateTimeline gate_timeline() override;
  void fork_side_queue() override;
  void on_side_queue(const std::function<void()>& fn) override;
  void join_side_queue() override;
  void reserve_scaled_copies(size_t n) override;
  // Defined in cuda_nf4_ops.cpp.
  void dequantize_nf4(const Tensor& packed, const Tensor& absmax, int64_t blocksize, const Tensor& out) override;

  void linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& y, Activation act) override {
    const char* op = "linear";
    const cuda::RowsView X = rows_of(x, op, "input"), Y = rows_of(y, op, "output");
    check_weight(w, op);
    const int64_t nout = w.size(0), k = w.size(1);
    if (X.C != k || Y.C != nout || X.B != Y.B || X.N != Y.N)
      bad(op, shape_str(x.shape()) + " x " + shape_str(w.shape()) + "^T -> " + shape_str(y.shape()));
    check_bias(bias, nout, op);
    const cuda::GemmEpilogue epilogue = epilogue_for(bias, act);
    // While profiling, GEMMs are told apart by shape: the step's small ones (modulation, text stream) matter.
    const std::string key = profiler_.enabled() ? "linear " + std::to_string(X.B * X.N) + "x" + std::to_string(nout) +
                                                      "x" + std::to_string(k)
                                                : std::string(op);
    timed(key.c_str(), [&] {
      gemm_->run({X.p, X.B, X.N, X.sb, X.sn}, w.data(), bias.data(), {Y.p, Y.B, Y.N, Y.sb, Y.sn}, k, nout, epilogue,
                 capturing_, stream(), false, op, w.stride(0));
      if (act == Activation::Silu || act == Activation::QuickGelu) cuda::launch_activation(Y, act, Y, stream());
    });
  }

  void silu(const Tensor& x, const Tensor& y) override {
    const cuda::RowsView X = rows_of(x, "silu", "input"), Y = rows_of(y, "silu", "output");
    check_same_rows(X, Y, "silu");
    timed("silu", [&] { cuda::launch_activation(X, Activation::Silu, Y, stream()); });
  }

  void timestep_embedding(const Tensor& t, float t_scale, const Tensor& out) override {
    const char* op = "timestep_embedding";
    const cuda::RowsView O = rows_of(out, op, "output");
    check_cuda_tensor(t, op, "t", DType::F32);
    if (t.ndim() != 1 || !t.is_contiguous() || t.size(0) != O.B * O.N) bad(op, "t must be [B] with one entry per row");
    timed(op, [&] { cuda::launch_timestep_embedding(t.ptr<float>(), t_scale, O, stream()); });
  }

  void add(const Tensor& y, const Tensor& x) override {
    const cuda::RowsView Y = rows_of(y, "add", "output"), X = rows_of(x, "add", "input");
    check_same_rows(X, Y, "add");
    timed("add", [&] { cuda::launch_add(Y, X, stream()); });
  }

  void layer_norm_modulate(const Tensor& x, const Tensor& shift, const Tensor& scale, const Tensor& y) override {
    const char* op = "layer_norm_modulate";
    const cuda::RowsView X = rows_of(x, op, "input"), Y = rows_of(y, op, "output");
    const cuda::VecsView Sh = vecs_of(shift, op, "shift"), Sc = vecs_of(scale, op, "scale");
    check_same_rows(X, Y, op);
    check_vecs_fit(Sh, X, op, "shift");
    check_vecs_fit(Sc, X, op, "scale");
    timed(op, [&] { cuda::launch_layer_norm_modulate(X, Sh, Sc, Y, stream()); });
  }

  // Defined in cuda_attention_ops.cpp.
  void qk_norm_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                    int64_t seq_offset, const Tensor& q, const Tensor& k, const Tensor& v) override;
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out) override;
  void qk_norm_rope_fp8(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                        int64_t seq_offset, float qk_scale, const Tensor& q8, const Tensor& k8, const Tensor& v,
                        const Tensor& v_amax) override;
  void attention_fp8(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale, const Tensor& v_amax,
                     const Tensor& out) override;
  void attention_fp8_rows(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale, const Tensor& v_amax,
                          const Tensor& out8, const Tensor& out_scale) override;

  void gated_residual(const Tensor& x, const Tensor& gate, const Tensor& y) override {
    const char* op = "gated_residual";
    const cuda::RowsView X = rows_of(x, op, "residual"), Y = rows_of(y, op, "gated branch");
    const cuda::VecsView G = vecs_of(gate, op, "gate");
    check_same_rows(X, Y, op);
    check_vecs_fit(G, X, op, "gate");
    timed(op, [&] { cuda::launch_gated_residual(X, G, Y, stream()); });
  }

  // Defined in cuda_batch_upload.cpp.
  void copy_from_host_batch(const std::vector<std::pair<Tensor, Tensor>>& host_to_device) override;
  // Defined in cuda_registered_upload.cpp.
  RegisteredUploadReport copy_from_host_registered(const void* region, size_t bytes,
                                                   const std::vector<std::pair<Tensor, Tensor>>& host_to_device,
                                                   const RegisteredUploadOptions& options) override;
  HostBufferAllocator host_buffer_allocator() override {
    return [pool = pinned_](size_t bytes) { return pool->allocate(bytes); };
  }

  // Defined in cuda_lora_ops.cpp.
  void axpy(const Tensor& y, float alpha, const Tensor& x) override;
  void copy(const Tensor& src, const Tensor& dst) override;
  void add_matmul(const Tensor& base, const Tensor& up, const Tensor& down, const Tensor& out, float alpha) override;
  void zero(const Tensor& t) override;
  void scaled_copy_batch(const std::vector<ScaledCopy>& copies) override;
  void lora_linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& down, const Tensor& up,
                   const Tensor& scratch, const Tensor& y, Activation act) override;
  void add_lora_branch(const Tensor& x, const Tensor& down, const Tensor& up, const Tensor& scratch, const Tensor& y,
                       Activation act) override;

  // Defined in cuda_fp8_ops.cpp.
  void quantize_fp8_rows(const Tensor& x, const Tensor& q, const Tensor& scale) override;
  void quantize_fp8_rows_joined(const Tensor& a8, const Tensor& a_scale, const Tensor& b, const Tensor& q,
                                const Tensor& scale) override;
  void linear_fp8(const Tensor& x, const Tensor& wq, const Tensor& w_scale, const Tensor& bias, const Tensor& y,
                  Activation act) override;
  void layer_norm_modulate_fp8(const Tensor& x, const Tensor& shift, const Tensor& scale, const Tensor& q,
                               const Tensor& q_scale) override;
  void linear_fp8_quantized(const Tensor& xq, const Tensor& x_scale, const Tensor& wq, const Tensor& w_scale,
                            const Tensor& bias, const Tensor& y, Activation act) override;
  void linear_fp8_quantized_residual(const Tensor& xq, const Tensor& x_scale, const Tensor& wq, const Tensor& w_scale,
                                     const Tensor& bias, const Tensor& gate, const Tensor& x, const Tensor& branch,
                                     const GatedFactors& ready) override;
  void linear_fp8_residual(const Tensor& in, const Tensor& wq, const Tensor& w_scale, const Tensor& bias,
                           const Tensor& gate, const Tensor& x, const Tensor& branch,
                           const GatedFactors& ready) override;
  void gated_output_factors(const std::vector<GatedFactors>& items) override;
  // Defined in cuda_residual_ops.cpp. True unless FLUXSWAP_FUSED_RESIDUAL=0 (the fused forms off, for comparisons) or
  // cuBLASLt refused that form once.
  bool fp8_residual_in_gemm() const override;
  void linear_fp8_batch(const Tensor& x, const std::vector<Fp8LinearItem>& items) override;
  void gated_residual_layer_norm_modulate(const Tensor& x, const Tensor& gate, const Tensor& y, const Tensor& shift,
                                          const Tensor& scale, const Tensor& normed) override;
  void gated_residual_layer_norm_modulate_fp8(const Tensor& x, const Tensor& gate, const Tensor& y,
                                              const Tensor& shift, const Tensor& scale, const Tensor& q,
                                              const Tensor& q_scale) override;
  void set_fp8_fast_accumulation(bool on) override;

  // Defined in cuda_text_ops.cpp.
  void layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, const Tensor& y) override;
  void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& y) override;
  void embedding(const Tensor& ids, const Tensor& table, const Tensor& positions, const Tensor& out) override;
  void split_heads(const Tensor& x, const Tensor& out) override;
  void attention_ex(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& bias, bool causal,
                    const Tensor& out) override;
  void activation(const Tensor& x, Activation act, const Tensor& y) override;
  void mul(const Tensor& y, const Tensor& x) override;

  // Defined in cuda_image_ops.cpp.
  void conv2d(const Tensor& x, const Tensor& w, const Tensor& bias, int pad, const Tensor& y) override;
  void group_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, int groups, float eps, bool silu,
                  const Tensor& y) override;
  void upsample_nearest2x(const Tensor& x, const Tensor& y) override;
  void transpose_last2(const Tensor& x, const Tensor& y) override;
  void unpack_unscale_latents(const Tensor& packed, float scaling, float shift, const Tensor& out) override;
  void image_to_u8(const Tensor& image, const Tensor& out) override;
  void copy_to_host(const Tensor& src, const Tensor& host_dst) override;

 private:
  // The FP8 activations' e4m3 copy (rows padded to 16 bytes, as cuBLASLt's FP8 kernels want) and row scales, for
  // `rows` rows at stride ldq: the newest buffer, grown outside recordings.
  static int64_t fp8_activation_stride(int64_t K) { return (K + 15) / 16 * 16; }
  std::pair<uint8_t*, float*> fp8_activation_buffer(int64_t rows, int64_t ldq, const char* op);
  // The residual ops' fused form (cuda_residual_ops.cpp): per sample, the gate folded into the weight scales (w_scale;
  // undefined for bf16: the gate alone) and bias (`ready`, or made here), then product() adding onto the residual rows
  // R. Returns how many samples, from the first, were added so: none where R's rows are not 16-byte aligned, and
  // those before the first that cuBLASLt has no algorithm for (a sample's pointers can give its GEMM another plan);
  // the caller composes the rest.

  // product(b, scale, gated_bias) issues sample b's GEMM with its factors, or returns false (nothing issued) where
  // cuBLASLt has no algorithm for it.
  using GatedProduct = std::function<bool(int64_t b, float* scale, void* gated_bias)>;
  int64_t gated_residual_products(const cuda::RowsView& R, const cuda::VecsView& G, const Tensor& w_scale,
                                  const Tensor& bias, const GatedFactors& ready, const GatedProduct& product,
                                  const char* op);
  // qk_norm_rope's checks and launch into q, k, v heads of shape `heads` ([B, H, S, D]); with `fp8`, q and k go to
  // its e4m3 target instead, and v (bf16) is written only when given.
  void qk_norm_rope_checked(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                            int64_t seq_offset, const Shape& heads, __nv_bfloat16* q, __nv_bfloat16* k,
                            __nv_bfloat16* v, const cuda::Fp8QkTarget* fp8, const char* op) {
    const cuda::RowsView X = rows_of(qkv, op, "qkv");
    if (heads.size() != 4) bad(op, "q, k, v must be [B, H, S, D], got " + shape_str(heads));
    const int64_t H = heads[1], S = heads[2], D = heads[3];
    if (X.C != 3 * H * D || seq_offset < 0 || seq_offset + X.N > S || heads[0] != X.B)
      bad(op, "qkv " + shape_str(qkv.shape()) + " does not fit heads " + shape_str(heads) + " at offset " +
                  std::to_string(seq_offset));
    for (const Tensor* t : {&q_norm, &k_norm}) {
      check_cuda_tensor(*t, op, "norm weight", DType::BF16);
      if (t->ndim() != 1 || t->size(0) != D || !t->is_contiguous()) bad(op, "norm weights must be [head_dim]");
    }
    check_cuda_tensor(rope, op, "rope", DType::F32);
    check_contiguous(rope, op, "rope");
    if (rope.ndim() != 3 || rope.size(0) < seq_offset + X.N || rope.size(1) != D / 2 || rope.size(2) != 2)
      bad(op, "rope table " + shape_str(rope.shape()) + " does not cover the positions");
    const cuda::QkvHeads out{q, k, v, H, S, D};
    timed(op, [&] {
      cuda::launch_qk_norm_rope(X, q_norm.ptr<__nv_bfloat16>(), k_norm.ptr<__nv_bfloat16>(), rope.ptr<float>(),
                                seq_offset, out, fp8, stream());
    });
  }

  // FP8 attention up to cuDNN's e4m3 output in o8 (checks, buffers, v quantised): the part attention_fp8 and
  // attention_fp8_rows share. Returns the device scalars it used (cuda_attention_ops.cpp).
  float* run_fp8_attention(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale, const Tensor& v_amax,
                           uint8_t* o8, const char* op);

  // Runs one op's launches, between an event pair while profiling (never inside a recording).
  template <class F>
  void timed(const char* op, F&& launch) {
    if (!profiler_.enabled() || capturing_) {
      launch();
      return;
    }
    profiler_.begin(op, stream());
    try {
      launch();
    } catch (...) {
      profiler_.cancel();
      throw;
    }
    profiler_.end(stream());
  }

  // The queue ops go to: the compute stream, or the side stream inside on_side_queue.
  cudaStream_t stream() const { return on_side_ ? on_side_ : stream_->stream; }

  // Whether this attention runs on cuDNN: creates the handle and builds the shape's graph on first use. In auto
  // mode a failure falls back to the built-in kernel (said once on stderr); with FLUXSWAP_ATTENTION=cudnn it throws.
  bool cudnn_ready(const cuda::AttentionShape& shape) {
    if (attention_mode_ == AttentionMode::Naive || cudnn_unsupported_.count(shape)) return false;
    if (cudnn_ && cudnn_->has_plan(shape)) return true;
    if (capturing_)
      bad("attention", "a new attention shape was first issued while recording; run the work once before record()");
    try {
      if (!cudnn_) cudnn_ = std::make_unique<cuda::CudnnAttention>(memory_, stream());
      cudnn_->build(shape);
      return true;
    } catch (const Error& e) {
      if (attention_mode_ == AttentionMode::Cudnn) throw;
      const bool v_heads = shape.v_in_heads();
      std::fprintf(stderr, "fluxswap: cuDNN attention unavailable for B %lld H %lld S %lld D %lld%s (%s); %s\n",
                   (long long)shape.B, (long long)shape.H, (long long)shape.S, (long long)shape.D,
                   v_heads ? "" : " with v read from the qkv rows", e.what(),
                   v_heads ? "using the built-in kernel" : "trying v copied into heads");
      cudnn_unsupported_.insert(shape);
      return false;
    }
  }

  std::string name_;
  cuda::DeviceMemory memory_;
  std::shared_ptr<PinnedStaging> staging_;  // copy_from_host_batch's buffers, made on first use
  // FP8 linears: made on first use (they refuse GPUs below sm_89); the activations' e4m3 copy and row scales live
  // in buffers that only grow, outside recordings, and outgrown ones stay (a recording may still use them).
  std::unique_ptr<cuda::CublasLtFp8Linear> fp8_;
  bool fp8_fast_accum_ = false;
  std::vector<Tensor> fp8_act_, fp8_act_scale_;
  std::vector<Tensor> gated_scratch_scale_, gated_scratch_bias_;  // the residual ops' own factors (same rule)
  bool fp8_residual_refused_ = false;
  std::shared_ptr<Fp8GemvLists> fp8_gemv_lists_;  // linear_fp8_batch's item lists on the device (cuda_fp8_ops.cpp)
  Tensor scaled_copy_descs_;  // scaled_copy_batch's descriptor list on the device (grows)
  std::shared_ptr<cuda::PinnedHostPool> pinned_ = std::make_shared<cuda::PinnedHostPool>();  // files read to upload
  std::shared_ptr<StreamHolder> stream_;
  std::shared_ptr<StepGates> gates_;  // step gates and the side stream (cuda_step_gates.cpp), made on first use
  cudaStream_t on_side_ = nullptr;
  std::shared_ptr<CopyQueue> copy_queue_;  // weight streaming's stream and events, made on first use
  std::unique_ptr<cuda::CublasLtLinear> gemm_;
  AttentionMode attention_mode_;
  std::unique_ptr<cuda::CudnnAttention> cudnn_;
  // FP8 attention's device scalars and e4m3 v / output scratch (grown outside recordings; outgrown ones kept).
  Tensor fp8_attention_slots_, fp8_attention_v8_, fp8_attention_o8_;
  Tensor attention_v_heads_;  // bf16 v copied into heads where cuDNN refuses it at the qkv rows' strides
  std::vector<Tensor> attention_retired_;
  std::set<cuda::AttentionShape> cudnn_unsupported_;
  bool capturing_ = false;
  mutable cuda::OpProfiler profiler_;
};

}  // namespace fluxswap::cuda
