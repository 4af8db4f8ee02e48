// The CUDA backend's VAE ops on contiguous NCHW bf16 tensors: conv2d on cuDNN (cudnn_conv.h) with the built-in
// direct convolution where cuDNN refuses a shape or is absent; GroupNorm, nearest upsampling and the token
// transpose on the kernels of image_kernels.cu; and the pipeline's decode tail around the VAE (latent unpacking,
// the uint8 image, its download).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cudnn_conv.h"
#include "backend/cuda/image_kernels.h"

namespace fluxswap::cuda {

namespace {

// FLUXSWAP_CONV picks the convolution, read at a backend's first image op:
//  auto   cuDNN in the NHWC layout, the direct kernel for shapes cuDNN refuses (said once per shape on stderr);
//  nhwc   cuDNN on channels-last copies (transposes around each convolution); a refusal throws;
//  nchw   cuDNN on the NCHW tensors as they are; a refusal throws;
//  direct the built-in direct convolution always.
// auto is NHWC because it measured faster end to end, its three transposes included (H100, 3x3, B 1): 512 -> 512
// at 128x128 0.168 ms against 0.170 ms NCHW; 256 -> 256 at 512x512 0.654 against 10.5 ms; 128 -> 128 at
// 1024x1024 0.933 against 10.4 ms. At the large sizes cuDNN's fast NCHW engines transpose inside, in a workspace of
// the whole tensors (over the 256 MiB cap, so a non-tensor-core engine ran); PyTorch's uncapped NCHW convolution
// (same cuDNN 9.19) took 0.864 and 1.361 ms there.
enum class ConvMode { Auto, Nchw, Nhwc, Direct };

ConvMode conv_mode_from_env() {
  const char* env = std::getenv("FLUXSWAP_CONV");
  if (!env || !*env || !std::strcmp(env, "auto")) return ConvMode::Auto;
  if (!std::strcmp(env, "nchw")) return ConvMode::Nchw;
  if (!std::strcmp(env, "nhwc")) return ConvMode::Nhwc;
  if (!std::strcmp(env, "direct")) return ConvMode::Direct;
  throw Error(std::string("FLUXSWAP_CONV='") + env + "': expected auto, nchw, nhwc or direct");
}

// What the image ops keep per backend: cuDNN's convolution plans, the shapes it refused, GroupNorm's scratch.
struct ImageState {
  std::weak_ptr<StreamHolder> owner;
  ConvMode mode;
  std::unique_ptr<CudnnConv> cudnn;
  std::set<ConvShape> refused;
  std::shared_ptr<void> norm_scratch;
};

// CudaBackend (cuda_backend.h) has no member for this state, so it is kept here, keyed by the backend's stream
// holder: the holder lives as long as the backend or a recording of its work, so a state whose holder has expired
// can no longer be reached and is dropped at the next lookup. The list is never destroyed, so no cuDNN handle is
// torn down after the CUDA runtime at process exit.
ImageState& image_state(const std::shared_ptr<StreamHolder>& stream) {
  static std::mutex mutex;
  static auto* states = new std::vector<std::unique_ptr<ImageState>>();
  std::lock_guard<std::mutex> lock(mutex);
  std::erase_if(*states, [](const auto& s) { return s->owner.expired(); });
  for (auto& s : *states)
    if (s->owner.lock() == stream) return *s;
  states->push_back(std::make_unique<ImageState>(ImageState{stream, conv_mode_from_env(), nullptr, {}, nullptr}));
  return *states->back();
}

void check_nchw(const Tensor& t, const char* op, const char* what, int ndim = 4) {
  check_cuda_tensor(t, op, what, DType::BF16);
  if (t.ndim() != ndim || !t.is_contiguous())
    bad(op, std::string(what) + " must be a contiguous " + std::to_string(ndim) + "-D tensor, got " +
                shape_str(t.shape()));
}

void check_channel_vector(const Tensor& t, int64_t C, const char* op, const char* what) {
  check_cuda_tensor(t, op, what, DType::BF16);
  if (t.ndim() != 1 || t.size(0) != C || !t.is_contiguous())
    bad(op, std::string(what) + " must be a contiguous [" + std::to_string(C) + "], got " + shape_str(t.shape()));
}

bool overlap(const Tensor& a, const Tensor& b) {
  const auto *a0 = static_cast<const char*>(a.data()), *b0 = static_cast<const char*>(b.data());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

bool aligned16(const Tensor& t) { return !t.defined() || reinterpret_cast<uintptr_t>(t.data()) % 16 == 0; }

// Whether this convolution runs on cuDNN: sets the layout, creates the handle and builds the shape's plan on
// first use. In auto mode a refusal falls back to the direct kernel (said once per shape); otherwise it throws.
bool cudnn_conv_ready(ImageState& st, ConvShape& shape, bool aligned, bool capturing, DeviceMemory& memory,
                      cudaStream_t stream) {
  const char* op = "conv2d";
  if (st.mode == ConvMode::Direct) return false;
  shape.layout = st.mode == ConvMode::Nchw ? ConvLayout::Nchw : ConvLayout::Nhwc;
  if (!aligned) {  // cuDNN's engines assume 16-byte aligned tensors
    if (st.mode != ConvMode::Auto) bad(op, "cuDNN needs 16-byte aligned tensors");
    return false;
  }
  if (st.refused.count(shape)) return false;
  if (st.cudnn && st.cudnn->has_plan(shape)) {
    if (capturing) return true;  // (recordings keep their scratch)
    try {
      st.cudnn->ensure_scratch(shape, memory);  // released between decodes under a budget
      return true;
    } catch (const Error& e) {
      if (st.mode != ConvMode::Auto) throw;
      std::fprintf(stderr, "fluxswap: %s; using the built-in convolution\n", e.what());
      return false;
    }
  }
  if (capturing) bad(op, "a new convolution shape was first issued while recording; run the work once before record()");
  try {
    if (!st.cudnn) st.cudnn = std::make_unique<CudnnConv>(stream);
    st.cudnn->build(shape, memory);
    return true;
  } catch (const Error& e) {
    if (st.mode != ConvMode::Auto) throw;
    std::fprintf(stderr, "fluxswap: %s; using the built-in convolution\n", e.what());
    st.refused.insert(shape);
    return false;
  }
}

}  // namespace

void CudaBackend::conv2d(const Tensor& x, const Tensor& w, const Tensor& bias, int pad, const Tensor& y) {
  const char* op = "conv2d";
  check_nchw(x, op, "input");
  check_nchw(w, op, "weight");
  check_nchw(y, op, "output");
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = w.size(0), kh = w.size(2), kw = w.size(3);
  ConvShape shape{B, Cin, H, W, Cout, kh, kw, pad, bias.defined(), ConvLayout::Nhwc};
  if (pad < 0 || w.size(1) != Cin || shape.Ho() < 1 || shape.Wo() < 1 || y.size(0) != B || y.size(1) != Cout ||
      y.size(2) != shape.Ho() || y.size(3) != shape.Wo())
    bad(op, "input " + shape_str(x.shape()) + ", weight " + shape_str(w.shape()) + ", padding " + std::to_string(pad) +
                " cannot give output " + shape_str(y.shape()));
  if (bias.defined()) check_channel_vector(bias, Cout, op, "bias");
  if (y.numel() == 0) return;
  if (overlap(x, y)) bad(op, "the output must not overlap the input");
  ImageState& st = image_state(stream_);
  const bool aligned = aligned16(x) && aligned16(w) && aligned16(bias) && aligned16(y);
  const bool on_cudnn = Cin > 0 && cudnn_conv_ready(st, shape, aligned, capturing_, memory_, stream());
  const ConvArgs args{x.ptr<__nv_bfloat16>(), w.ptr<__nv_bfloat16>(),
                      bias.defined() ? bias.ptr<__nv_bfloat16>() : nullptr,
                      y.ptr<__nv_bfloat16>(), B, Cin, H, W, Cout, kh, kw, pad};
  timed(op, [&] {
    if (on_cudnn)
      st.cudnn->run(shape, x.data(), w.data(), bias.defined() ? bias.data() : nullptr, y.data(), capturing_);
    else
      launch_direct_conv(args, stream());
  });
}

void CudaBackend::release_scratch() {
  ImageState& st = image_state(stream_);
  if (st.cudnn) st.cudnn->release_scratch();
}

void CudaBackend::group_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, int groups, float eps,
                             bool silu, const Tensor& y) {
  const char* op = "group_norm";
  check_nchw(x, op, "input");
  check_nchw(y, op, "output");
  if (x.shape() != y.shape()) bad(op, "input " + shape_str(x.shape()) + " and output " + shape_str(y.shape()));
  if (x.data() != y.data() && overlap(x, y)) bad(op, "the output must be the input or not overlap it");
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (groups <= 0 || C % groups != 0)
    bad(op, std::to_string(C) + " channels do not split into " + std::to_string(groups) + " groups");
  check_channel_vector(weight, C, op, "weight");
  check_channel_vector(bias, C, op, "bias");
  if (2 * B * groups > kGroupNormScratch) bad(op, "too many (sample, group) pairs: " + std::to_string(B * groups));
  ImageState& st = image_state(stream_);
  if (!st.norm_scratch) {
    if (capturing_) bad(op, "first issued while recording; run the work once before record()");
    st.norm_scratch = memory_.allocate(size_t(kGroupNormScratch) * sizeof(float2), op);
  }
  const GroupNormArgs args{x.ptr<__nv_bfloat16>(), weight.ptr<__nv_bfloat16>(), bias.ptr<__nv_bfloat16>(),
                           y.ptr<__nv_bfloat16>(), B, C, HW, groups, eps, silu};
  timed(op, [&] { launch_group_norm(args, static_cast<float2*>(st.norm_scratch.get()), stream()); });
}

void CudaBackend::upsample_nearest2x(const Tensor& x, const Tensor& y) {
  const char* op = "upsample_nearest2x";
  check_nchw(x, op, "input");
  check_nchw(y, op, "output");
  const int64_t H = x.size(2), W = x.size(3);
  if (y.size(0) != x.size(0) || y.size(1) != x.size(1) || y.size(2) != 2 * H || y.size(3) != 2 * W)
    bad(op, "input " + shape_str(x.shape()) + " and output " + shape_str(y.shape()) + " do not fit");
  if (overlap(x, y)) bad(op, "the output must not overlap the input");
  timed(op, [&] {
    launch_upsample_nearest2x(x.ptr<__nv_bfloat16>(), y.ptr<__nv_bfloat16>(), x.size(0) * x.size(1), H, W, stream(),
                              op);
  });
}

void CudaBackend::transpose_last2(const Tensor& x, const Tensor& y) {
  const char* op = "transpose_last2";
  check_nchw(x, op, "input", 3);
  check_nchw(y, op, "output", 3);
  const int64_t B = x.size(0), R = x.size(1), C = x.size(2);
  if (y.size(0) != B || y.size(1) != C || y.size(2) != R)
    bad(op, "input " + shape_str(x.shape()) + " and output " + shape_str(y.shape()) + " do not fit");
  if (overlap(x, y)) bad(op, "the output must not overlap the input");
  timed(op, [&] { launch_transpose_last2(x.ptr<__nv_bfloat16>(), y.ptr<__nv_bfloat16>(), B, R, C, stream(), op); });
}

void CudaBackend::unpack_unscale_latents(const Tensor& packed, float scaling, float shift, const Tensor& out) {
  const char* op = "unpack_unscale_latents";
  check_nchw(packed, op, "packed latents", 3);
  check_nchw(out, op, "output");
  const int64_t B = out.size(0), C = out.size(1), h = out.size(2), w = out.size(3);
  if (h % 2 || w % 2 || packed.size(0) != B || packed.size(1) != (h / 2) * (w / 2) || packed.size(2) != 4 * C)
    bad(op, "packed latents " + shape_str(packed.shape()) + " do not unpack to " + shape_str(out.shape()) +
                " (expected [B, (h/2)(w/2), 4C] with h, w even)");
  if (overlap(packed, out)) bad(op, "the output must not overlap the input");
  timed(op, [&] {
    launch_unpack_unscale_latents(packed.ptr<__nv_bfloat16>(), out.ptr<__nv_bfloat16>(), B, C, h, w, scaling, shift,
                                  stream(), op);
  });
}

void CudaBackend::image_to_u8(const Tensor& image, const Tensor& out) {
  const char* op = "image_to_u8";
  check_nchw(image, op, "image");
  check_cuda_tensor(out, op, "output", DType::U8);
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  if (out.shape() != Shape{B, H, W, C} || !out.is_contiguous())
    bad(op, "output must be a contiguous " + shape_str({B, H, W, C}) + " for image " + shape_str(image.shape()) +
                ", got " + shape_str(out.shape()));
  if (overlap(image, out)) bad(op, "the output must not overlap the input");
  timed(op, [&] { launch_image_to_u8(image.ptr<__nv_bfloat16>(), out.ptr<uint8_t>(), B, C, H * W, stream(), op); });
}

// Asynchronous into pinned memory; from pageable memory CUDA returns only once the copy is done.
void CudaBackend::copy_to_host(const Tensor& src, const Tensor& host_dst) {
  const char* op = "copy_to_host";
  if (!src.defined() || src.device() != Device::CUDA) bad(op, "source must be a CUDA tensor");
  if (!host_dst.defined() || host_dst.device() != Device::CPU) bad(op, "destination must be a host tensor");
  if (src.dtype() != host_dst.dtype() || src.shape() != host_dst.shape())
    bad(op, std::string(dtype_name(src.dtype())) + " " + shape_str(src.shape()) + " into " +
                std::string(dtype_name(host_dst.dtype())) + " " + shape_str(host_dst.shape()) +
                ": dtype and shape must match");
  check_contiguous(src, op, "source");
  check_contiguous(host_dst, op, "destination");
  if (capturing_) bad(op, "a download cannot be recorded; issue it after record()");
  if (src.nbytes() == 0) return;
  check(cudaMemcpyAsync(host_dst.data(), src.data(), src.nbytes(), cudaMemcpyDeviceToHost, stream()), op,
        "cudaMemcpyAsync");
}

}  // namespace fluxswap::cuda
