#include "quant/nf4.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <thread>

#include "core/error.h"
#include "io/safetensors.h"

namespace fluxswap {

namespace {

bool valid_blocksize(int64_t b) { return b >= 32 && b <= 4096 && (b & (b - 1)) == 0; }

// bnb computes x * (1 / absmax) (its CUDA quantisers multiply by the reciprocal); a subnormal absmax has no finite
// reciprocal, so those blocks divide instead. A zero block has no scale at all: every element takes the zero code.
struct BlockScale {
  float absmax, inv;
  bool divide;
  explicit BlockScale(float a) : absmax(a), inv(a > 0.0f ? 1.0f / a : 0.0f), divide(a > 0.0f && !std::isfinite(inv)) {}
  float scaled(float x) const { return divide ? x / absmax : x * inv; }
};

// The nested absmax as bnb computes it: the 8-bit value times its block's scale, then the offset added, each step
// rounded to float. `volatile` keeps a compiler targeting FMA from contracting the two into one rounding, which
// would break bit-exactness with the GPU kernels (they use __fmul_rn / __fadd_rn for the same reason).
float nested_absmax_value(float code, float scale, float offset) {
  volatile float product = code * scale;
  return product + offset;
}

Tensor f32_tensor(const std::vector<float>& v) {
  Tensor t = Tensor::empty(DType::F32, {int64_t(v.size())});
  if (!v.empty()) std::memcpy(t.data(), v.data(), v.size() * sizeof(float));
  return t;
}

template <size_t N>
Tensor f32_tensor(const std::array<float, N>& v) {
  return f32_tensor(std::vector<float>(v.begin(), v.end()));
}

void check_part(const Tensor& t, const std::string& what, const std::string& part, DType dtype, int64_t numel) {
  if (!t.defined()) throw Error(what + ": " + part + " is missing");
  if (t.device() != Device::CPU) throw Error(what + ": " + part + " must be a host tensor");
  if (t.dtype() != dtype || t.numel() != numel || !t.is_contiguous())
    throw Error(what + ": " + part + " is " + std::string(dtype_name(t.dtype())) + " " + shape_str(t.shape()) +
                ", expected contiguous " + std::string(dtype_name(dtype)) + " with " + std::to_string(numel) +
                " elements");
}

}  // namespace

const std::array<float, 15>& nf4_thresholds() {
  static constexpr std::array<float, 15> t = {
      -0.8480964004993439f,  -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
      -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
      0.1202552504837513f,   0.2035212516784668f,   0.2920137718319893f,   0.3893125355243683f,
      0.5016634166240692f,   0.6427869200706482f,   0.8614784181118011f};
  return t;
}

const std::array<float, 256>& dynamic_map_8bit() {
  // The float32 bit patterns of bnb's create_dynamic_map() as bitsandbytes 0.50.2 / torch 2.11 builds it (read on
  // the device machine). Rebuilding it here from the construction (nf4.h) lands up to two ulps off in 42 entries,
  // because torch's float32 linspace and products round differently, so the values themselves are kept.
  static const std::array<float, 256> map = [] {
    static constexpr uint32_t bits[256] = {
        0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
        0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
        0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
        0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
        0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
        0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
        0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
        0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
        0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
        0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
        0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
        0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
        0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
        0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
        0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
        0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
        0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
        0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
        0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
        0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
        0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
        0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
        0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
        0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
        0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
        0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
        0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
        0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
        0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
        0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
        0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
        0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
    };
    std::array<float, 256> r{};
    std::memcpy(r.data(), bits, sizeof bits);
    return r;
  }();
  return map;
}

int nearest_code_index(const float* code, int n, float x) {
  // The number of midpoints strictly below x: "above the midpoint -> the upper code" (bnb's CUDA comparisons).
  int lo = 0, hi = n - 1;  // answer in [lo, hi]
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const float midpoint = (code[mid] + code[mid + 1]) * 0.5f;
    if (x > midpoint)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

size_t Nf4Tensor::storage_bytes() const {
  size_t b = 0;
  for (const Tensor* t : {&packed, &code, &absmax, &nested_absmax, &nested_code})
    if (t->defined()) b += t->nbytes();
  return b;
}

Nf4Tensor quantize_nf4(const float* x, int64_t n, int64_t blocksize, bool double_quant) {
  if (!valid_blocksize(blocksize))
    throw Error("quantize_nf4: blocksize " + std::to_string(blocksize) +
                " is not a power of two from 32 to 4096 (the sizes bitsandbytes accepts)");
  if (n < 1) throw Error("quantize_nf4: empty input");
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) throw Error("quantize_nf4: element " + std::to_string(i) + " is not finite");

  Nf4Tensor t;
  t.shape = {n};
  t.blocksize = blocksize;
  t.code = f32_tensor(kNf4Code);
  const int64_t blocks = t.num_blocks();
  std::vector<float> absmax(blocks);
  t.packed = Tensor::zeros(DType::U8, {(n + 1) / 2});
  uint8_t* out = t.packed.ptr<uint8_t>();
  const auto& thr = nf4_thresholds();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
    float a = 0.0f;
    for (int64_t i = begin; i < end; ++i) a = std::max(a, std::fabs(x[i]));
    absmax[b] = a;
    const BlockScale s(a);
    for (int64_t i = begin; i < end; ++i) {
      const int q = a > 0.0f ? int(std::lower_bound(thr.begin(), thr.end(), s.scaled(x[i])) - thr.begin())
                             : kNf4ZeroIndex;
      out[i / 2] |= uint8_t(i % 2 == 0 ? q << 4 : q);
    }
  }
  if (n % 2) out[n / 2] |= kNf4ZeroIndex;  // the pad nibble, as bnb writes it

  if (!double_quant) {
    t.absmax = f32_tensor(absmax);
    return t;
  }
  // Nested: absmax - mean, quantised in blocks of 256 with the 8-bit dynamic map.
  double sum = 0.0;
  for (float a : absmax) sum += a;
  const float offset = float(sum / double(blocks));
  const auto& dyn = dynamic_map_8bit();
  const int64_t nb = kNf4NestedBlocksize, nested_blocks = (blocks + nb - 1) / nb;
  std::vector<float> absmax2(nested_blocks);
  t.absmax = Tensor::empty(DType::U8, {blocks});
  uint8_t* q8 = t.absmax.ptr<uint8_t>();
  const int zero8 = int(std::find(dyn.begin(), dyn.end(), 0.0f) - dyn.begin());
  for (int64_t j = 0; j < nested_blocks; ++j) {
    const int64_t begin = j * nb, end = std::min(blocks, begin + nb);
    float a = 0.0f;
    for (int64_t b = begin; b < end; ++b) a = std::max(a, std::fabs(absmax[b] - offset));
    absmax2[j] = a;
    const BlockScale s(a);
    for (int64_t b = begin; b < end; ++b)
      q8[b] = uint8_t(a > 0.0f ? nearest_code_index(dyn.data(), 256, s.scaled(absmax[b] - offset)) : zero8);
  }
  t.nested = true;
  t.nested_absmax = f32_tensor(absmax2);
  t.nested_code = f32_tensor(dyn);
  t.nested_blocksize = nb;
  t.nested_offset = offset;
  return t;
}

Nf4Tensor quantize_nf4(const Tensor& x, int64_t blocksize, bool double_quant) {
  if (!x.defined() || x.device() != Device::CPU || !dtype_is_float(x.dtype()))
    throw Error("quantize_nf4: expected a host tensor of a float dtype");
  const Tensor f = x.to_f32();
  Nf4Tensor t = quantize_nf4(f.ptr<float>(), f.numel(), blocksize, double_quant);
  t.shape = x.shape();
  t.dtype = x.dtype();
  return t;
}

Nf4Tensor quantize_nf4_parallel(const float* x, int64_t n, int64_t blocksize, unsigned threads) {
  if (!valid_blocksize(blocksize) || n < 1) return quantize_nf4(x, n, blocksize);  // its error
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  const int64_t per = (blocks + int64_t(threads) - 1) / int64_t(threads);
  Nf4Tensor t;
  t.shape = {n};
  t.blocksize = blocksize;
  t.code = f32_tensor(kNf4Code);
  t.packed = Tensor::empty(DType::U8, {(n + 1) / 2});
  t.absmax = Tensor::empty(DType::F32, {blocks});
  // Each thread quantises whole blocks; a block holds an even number of values (blocksize >= 32), so each part's
  // codes start on a byte and its bytes land as they are. Only the last part can end in a pad nibble, as the whole
  // would.
  std::vector<std::exception_ptr> errors(threads);
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < threads; ++w) {
    const int64_t b0 = int64_t(w) * per, b1 = std::min(blocks, b0 + per);
    if (b0 >= b1) break;
    pool.emplace_back([&, w, b0, b1] {
      try {
        const int64_t begin = b0 * blocksize, end = std::min(n, b1 * blocksize);
        const Nf4Tensor part = quantize_nf4(x + begin, end - begin, blocksize);
        std::memcpy(t.packed.ptr<uint8_t>() + begin / 2, part.packed.data(), part.packed.nbytes());
        std::memcpy(t.absmax.ptr<float>() + b0, part.absmax.data(), part.absmax.nbytes());
      } catch (...) {
        errors[w] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  return t;
}

void validate_nf4(const Nf4Tensor& t, const std::string& what) {
  if (!valid_blocksize(t.blocksize))
    throw Error(what + ": blocksize " + std::to_string(t.blocksize) + " is not a power of two from 32 to 4096");
  for (int64_t d : t.shape)
    if (d < 0) throw Error(what + ": negative dimension in shape " + shape_str(t.shape));
  const int64_t n = t.numel(), blocks = t.num_blocks();
  if (n < 1) throw Error(what + ": empty shape " + shape_str(t.shape));
  check_part(t.packed, what, "packed codes", DType::U8, (n + 1) / 2);
  check_part(t.code, what, "quant map", DType::F32, 16);
  if (!t.nested) {
    check_part(t.absmax, what, "absmax", DType::F32, blocks);
    return;
  }
  if (t.nested_blocksize < 1) throw Error(what + ": nested blocksize " + std::to_string(t.nested_blocksize));
  check_part(t.absmax, what, "absmax (nested)", DType::U8, blocks);
  check_part(t.nested_absmax, what, "nested absmax", DType::F32,
             (blocks + t.nested_blocksize - 1) / t.nested_blocksize);
  check_part(t.nested_code, what, "nested quant map", DType::F32, 256);
  if (!std::isfinite(t.nested_offset)) throw Error(what + ": nested offset is not finite");
}

std::vector<float> nf4_block_absmax(const Nf4Tensor& t) {
  validate_nf4(t, "nf4_block_absmax");
  const int64_t blocks = t.num_blocks();
  std::vector<float> a(blocks);
  if (!t.nested) {
    std::memcpy(a.data(), t.absmax.data(), size_t(blocks) * sizeof(float));
    return a;
  }
  const uint8_t* q8 = t.absmax.ptr<uint8_t>();
  const float* code2 = t.nested_code.ptr<float>();
  const float* scale2 = t.nested_absmax.ptr<float>();
  for (int64_t b = 0; b < blocks; ++b)
    a[b] = nested_absmax_value(code2[q8[b]], scale2[b / t.nested_blocksize], t.nested_offset);
  return a;
}

std::vector<float> dequantize_nf4(const Nf4Tensor& t) {
  const std::vector<float> absmax = nf4_block_absmax(t);  // validates
  const int64_t n = t.numel();
  const uint8_t* p = t.packed.ptr<uint8_t>();
  const float* code = t.code.ptr<float>();
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) {
    const int q = i % 2 == 0 ? p[i / 2] >> 4 : p[i / 2] & 0xF;
    out[i] = code[q] * absmax[i / t.blocksize];
  }
  return out;
}

Tensor dequantize_nf4_tensor(const Nf4Tensor& t, DType dtype) {
  if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    throw Error("dequantize_nf4: output dtype must be F32, F16 or BF16, got " + std::string(dtype_name(dtype)));
  const std::vector<float> v = dequantize_nf4(t);
  Tensor out = Tensor::empty(dtype, t.shape);
  convert_from_f32(v.data(), dtype, out.data(), v.size());
  return out;
}

// ---- bitsandbytes checkpoints ----

bool is_bnb_4bit(const TensorLookup& lookup, const std::string& weight_key) {
  return lookup(weight_key + kBnbNf4StateSuffix).defined() || lookup(weight_key + kBnbFp4StateSuffix).defined();
}

namespace {

DType bnb_dtype(const std::string& name, const std::string& what) {
  if (name == "bfloat16") return DType::BF16;
  if (name == "float16") return DType::F16;
  if (name == "float32") return DType::F32;
  throw Error(what + ": dtype '" + name + "', expected bfloat16, float16 or float32");
}

// A contiguous tensor's bytes as a flat U8 view that keeps the tensor's owner alive.
Tensor bytes_of(const Tensor& t) {
  return Tensor::borrow(t.data(), DType::U8, {int64_t(t.nbytes())}, Device::CPU, t.owner());
}

}  // namespace

Nf4Tensor load_bnb_nf4(const TensorLookup& lookup, const std::string& weight_key, const std::string& source) {
  const std::string ctx = " (bitsandbytes NF4 state of '" + weight_key + "')";
  auto need = [&](const std::string& suffix) {
    const std::string name = weight_key + suffix;
    Tensor t = lookup(name);
    if (!t.defined()) throw Error(source + ": tensor '" + name + "' is missing" + ctx);
    if (t.device() != Device::CPU || !t.is_contiguous())
      throw Error(source + ": tensor '" + name + "' must be a contiguous host tensor" + ctx);
    return t;
  };
  auto bad = [&](const std::string& suffix, const std::string& why) {
    return Error(source + ": tensor '" + weight_key + suffix + "' " + why + ctx);
  };
  auto expect = [&](const Tensor& t, const std::string& suffix, DType dtype, int64_t numel) {
    if (t.dtype() != dtype || t.numel() != numel)
      throw bad(suffix, "is " + std::string(dtype_name(t.dtype())) + " " + shape_str(t.shape()) + ", expected " +
                            std::string(dtype_name(dtype)) + " with " + std::to_string(numel) + " elements");
    return t.view({numel});
  };

  if (!lookup(weight_key + kBnbNf4StateSuffix).defined() && lookup(weight_key + kBnbFp4StateSuffix).defined())
    throw bad(kBnbFp4StateSuffix, "holds a bitsandbytes FP4 weight; only NF4 is supported");
  const Tensor state = need(kBnbNf4StateSuffix);
  if (state.dtype() != DType::U8 && state.dtype() != DType::I8)
    throw bad(kBnbNf4StateSuffix, "is " + std::string(dtype_name(state.dtype())) + ", expected U8 bytes of JSON");
  nlohmann::json js;
  try {
    const char* p = static_cast<const char*>(state.data());
    js = nlohmann::json::parse(p, p + state.nbytes());
  } catch (const nlohmann::json::exception& e) {
    throw bad(kBnbNf4StateSuffix, std::string("is not valid JSON: ") + e.what());
  }
  if (!js.is_object()) throw bad(kBnbNf4StateSuffix, "is not a JSON object");
  auto field = [&](const char* name) -> const nlohmann::json& {
    auto it = js.find(name);
    if (it == js.end() || it->is_null()) throw bad(kBnbNf4StateSuffix, std::string("has no '") + name + "' field");
    return *it;
  };
  auto int_field = [&](const char* name) {
    const auto& v = field(name);
    if (!v.is_number_integer()) throw bad(kBnbNf4StateSuffix, std::string("field '") + name + "' is not an integer");
    return v.get<int64_t>();
  };
  auto string_field = [&](const char* name) {
    const auto& v = field(name);
    if (!v.is_string()) throw bad(kBnbNf4StateSuffix, std::string("field '") + name + "' is not a string");
    return v.get<std::string>();
  };

  Nf4Tensor t;
  const std::string quant_type = string_field("quant_type");
  if (quant_type != "nf4") throw bad(kBnbNf4StateSuffix, "has quant_type '" + quant_type + "', expected 'nf4'");
  t.blocksize = int_field("blocksize");
  if (!valid_blocksize(t.blocksize))
    throw bad(kBnbNf4StateSuffix, "has blocksize " + std::to_string(t.blocksize) + ", expected a power of two 32..4096");
  t.dtype = bnb_dtype(string_field("dtype"), source + ": tensor '" + weight_key + kBnbNf4StateSuffix + "'");
  const auto& shape = field("shape");
  if (!shape.is_array() || shape.empty()) throw bad(kBnbNf4StateSuffix, "field 'shape' is not a non-empty list");
  for (const auto& d : shape) {
    if (!d.is_number_integer() || d.get<int64_t>() < 1)
      throw bad(kBnbNf4StateSuffix, "field 'shape' holds " + d.dump() + ", expected positive integers");
    t.shape.push_back(d.get<int64_t>());
  }
  const int64_t n = t.numel(), blocks = t.num_blocks();

  // The packed codes: any storage dtype (bnb's quant_storage) holding exactly the (n + 1) / 2 bytes.
  const Tensor packed = need("");
  if (int64_t(packed.nbytes()) != (n + 1) / 2)
    throw bad("", "holds " + std::to_string(packed.nbytes()) + " bytes, expected " + std::to_string((n + 1) / 2) +
                      " for 4-bit codes of shape " + shape_str(t.shape));
  t.packed = bytes_of(packed);
  t.code = expect(need(".quant_map"), ".quant_map", DType::F32, 16);

  const bool nested = js.contains("nested_blocksize") || lookup(weight_key + ".nested_absmax").defined();
  if (!nested) {
    t.absmax = expect(need(".absmax"), ".absmax", DType::F32, blocks);
  } else {
    t.nested = true;
    t.nested_blocksize = int_field("nested_blocksize");
    if (t.nested_blocksize < 1)
      throw bad(kBnbNf4StateSuffix, "has nested_blocksize " + std::to_string(t.nested_blocksize));
    const std::string nested_dtype = string_field("nested_dtype");
    if (nested_dtype != "float32")
      throw bad(kBnbNf4StateSuffix, "has nested_dtype '" + nested_dtype + "', expected 'float32'");
    const auto& offset = field("nested_offset");
    if (!offset.is_number()) throw bad(kBnbNf4StateSuffix, "field 'nested_offset' is not a number");
    t.nested_offset = offset.get<float>();
    t.absmax = expect(need(".absmax"), ".absmax", DType::U8, blocks);
    t.nested_absmax = expect(need(".nested_absmax"), ".nested_absmax", DType::F32,
                             (blocks + t.nested_blocksize - 1) / t.nested_blocksize);
    t.nested_code = expect(need(".nested_quant_map"), ".nested_quant_map", DType::F32, 256);
  }
  validate_nf4(t, source + ": " + weight_key);
  return t;
}

Nf4Tensor load_bnb_nf4(const SafetensorsCollection& file, const std::string& weight_key) {
  return load_bnb_nf4([&](const std::string& name) { return file.contains(name) ? file.tensor(name) : Tensor(); },
                      weight_key, file.path());
}

}  // namespace fluxswap
