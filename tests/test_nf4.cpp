// NF4 quantisation (quant/nf4.h) against a scalar reference written from bitsandbytes' definition, hand-made blocks
// with known codes, and the bnb checkpoint layout (synthetic tensor sets and a safetensors file).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>

#include "core/error.h"
#include "io/safetensors.h"
#include "quant/nf4.h"
#include "test_support.h"

namespace fluxswap {
namespace {

std::vector<float> normal_values(int64_t n, uint32_t seed, float std = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, std);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// The scalar reference: the code index whose value is nearest to x * (1 / absmax) (distances in double, ties to the
// lower index), packed high nibble first.
int reference_index(float scaled) {
  int best = 0;
  for (int i = 1; i < 16; ++i)
    if (std::fabs(double(scaled) - kNf4Code[i]) < std::fabs(double(scaled) - kNf4Code[best])) best = i;
  return best;
}

int code_at(const Nf4Tensor& t, int64_t i) {
  const uint8_t b = t.packed.ptr<uint8_t>()[i / 2];
  return i % 2 == 0 ? b >> 4 : b & 0xF;
}

using test::error_of;

// Half the widest gap between adjacent NF4 codes (between 0.7229568 and 1.0): the most a value can move when it is
// rounded to its nearest code, in units of the block's absmax.
double max_half_gap() {
  double g = 0;
  for (int i = 0; i < 15; ++i) g = std::max(g, double(kNf4Code[i + 1]) - kNf4Code[i]);
  return g / 2;
}

TEST(Nf4, CodeTableAndThresholdsMatchBitsandbytes) {
  for (int i = 0; i < 15; ++i) EXPECT_LT(kNf4Code[i], kNf4Code[i + 1]);
  EXPECT_EQ(kNf4Code[0], -1.0f);
  EXPECT_EQ(kNf4Code[kNf4ZeroIndex], 0.0f);
  EXPECT_EQ(kNf4Code[15], 1.0f);
  // Each threshold is the midpoint of its codes, to within one float ulp (bnb's CUDA literals; see nf4.h).
  for (int i = 0; i < 15; ++i) {
    const float mid = (kNf4Code[i] + kNf4Code[i + 1]) * 0.5f, t = nf4_thresholds()[i];
    EXPECT_GT(t, kNf4Code[i]);
    EXPECT_LT(t, kNf4Code[i + 1]);
    EXPECT_LE(std::fabs(t - mid), std::fabs(std::nextafter(mid, 2.0f) - mid)) << i;
  }
  // Where they differ, a value on the float32 midpoint goes the way bnb's CUDA kernel sends it.
  const float m0 = (kNf4Code[0] + kNf4Code[1]) * 0.5f, m14 = (kNf4Code[14] + kNf4Code[15]) * 0.5f;
  EXPECT_LT(nf4_thresholds()[0], m0);  // -0.8480964004993439f is below the tie: the tie rounds up
  EXPECT_LT(nf4_thresholds()[14], m14);
  std::vector<float> x(64, 0.0f);
  x[0] = 1.0f;
  x[1] = m0;
  x[2] = m14;
  const Nf4Tensor q = quantize_nf4(x.data(), 64, 64);
  EXPECT_EQ(q.packed.ptr<uint8_t>()[0], 0xF1);
  EXPECT_EQ(q.packed.ptr<uint8_t>()[1] >> 4, 15);
}

TEST(Nf4, DynamicMapShape) {
  const auto& m = dynamic_map_8bit();
  // bnb's construction, in double: each entry within two float ulps of it.
  std::vector<double> built = {0.0, 1.0};
  for (int i = 0; i < 7; ++i) {
    const int steps = (1 << i) + 1;
    for (int j = 0; j + 1 < steps; ++j) {
      const double a = 0.1 + 0.9 * j / (steps - 1), b = 0.1 + 0.9 * (j + 1) / (steps - 1);
      built.push_back(std::pow(10.0, i - 6) * (a + b) / 2);
      built.push_back(-built.back());
    }
  }
  std::sort(built.begin(), built.end());
  ASSERT_EQ(built.size(), 256u);
  for (int i = 0; i < 256; ++i)
    EXPECT_LE(std::fabs(m[i] - built[i]), 2 * std::fabs(std::nextafter(m[i], 2.0f) - m[i])) << i;
  for (int i = 0; i < 255; ++i) ASSERT_LT(m[i], m[i + 1]) << i;
  EXPECT_EQ(m[255], 1.0f);
  EXPECT_EQ(m[127], 0.0f);  // 127 negative values below it
  EXPECT_FLOAT_EQ(m[254], 0.99296875f);  // the mean of linspace(0.1, 1, 65)'s last two points
  EXPECT_FLOAT_EQ(m[0], -0.99296875f);
  EXPECT_FLOAT_EQ(m[128], 0.55e-6f);  // the smallest magnitude: 1e-6 * mean(0.1, 1)
}

TEST(Nf4, NearestCodeIndexTiesGoDown) {
  const float code[4] = {-1.0f, 0.0f, 0.5f, 1.0f};
  EXPECT_EQ(nearest_code_index(code, 4, -0.5f), 0);
  EXPECT_EQ(nearest_code_index(code, 4, -0.49f), 1);
  EXPECT_EQ(nearest_code_index(code, 4, 0.25f), 1);
  EXPECT_EQ(nearest_code_index(code, 4, 0.26f), 2);
  EXPECT_EQ(nearest_code_index(code, 4, 2.0f), 3);
  EXPECT_EQ(nearest_code_index(code, 4, -2.0f), 0);
}

TEST(Nf4, RoundTripMatchesScalarReferenceAndErrorBounds) {
  for (int64_t blocksize : {32, 64, 128, 256, 4096}) {
    const int64_t n = 64 * 1024 + 37;  // a partial last block, and an odd count
    const auto x = normal_values(n, 1234 + uint32_t(blocksize), 0.02f);
    const Nf4Tensor q = quantize_nf4(x.data(), n, blocksize);
    ASSERT_EQ(q.num_blocks(), (n + blocksize - 1) / blocksize);
    ASSERT_EQ(q.packed.numel(), (n + 1) / 2);
    const std::vector<float> d = dequantize_nf4(q);
    const float* absmax = q.absmax.ptr<float>();
    int64_t mismatches = 0;
    double sum_rel_err = 0;
    for (int64_t b = 0; b < q.num_blocks(); ++b) {
      const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
      float a = 0;
      for (int64_t i = begin; i < end; ++i) a = std::max(a, std::fabs(x[i]));
      ASSERT_EQ(absmax[b], a) << "block " << b;
      const float inv = 1.0f / a;
      double block_max_err = 0;
      for (int64_t i = begin; i < end; ++i) {
        const float scaled = x[i] * inv;
        const int ref = reference_index(scaled), got = code_at(q, i);
        if (ref != got) {
          // Only where x sits on a midpoint within float rounding can the two comparisons differ.
          ++mismatches;
          EXPECT_LT(std::fabs(double(scaled) - (double(kNf4Code[ref]) + kNf4Code[got]) / 2), 1e-6) << i;
        }
        EXPECT_EQ(d[i], kNf4Code[got] * a);
        block_max_err = std::max(block_max_err, std::fabs(double(d[i]) - x[i]));
        sum_rel_err += std::fabs(double(d[i]) - x[i]) / a;
      }
      ASSERT_LE(block_max_err, max_half_gap() * a * (1 + 1e-6)) << "block " << b;
    }
    EXPECT_LE(mismatches, 2);
    // Mean |error| in units of absmax for normal data: measured 0.029 at blocksize 32, 0.028 at 64, 0.024 at 4096
    // (a larger block has a larger absmax relative to its typical value, so the error shrinks in those units).
    const double mean_rel = sum_rel_err / double(n);
    EXPECT_LT(mean_rel, 0.035) << "blocksize " << blocksize;
    EXPECT_GT(mean_rel, 0.015) << "blocksize " << blocksize;
  }
}

TEST(Nf4, HandMadeBlocksGiveExactCodes) {
  // Zeros: absmax 0 and the zero code everywhere (bnb's reference clamps 1/absmax, so 0 * big = 0 -> index 7).
  std::vector<float> zeros(64, 0.0f);
  Nf4Tensor z = quantize_nf4(zeros.data(), 64, 64);
  EXPECT_EQ(z.absmax.ptr<float>()[0], 0.0f);
  for (int64_t i = 0; i < 32; ++i) EXPECT_EQ(z.packed.ptr<uint8_t>()[i], 0x77);
  for (float v : dequantize_nf4(z)) EXPECT_EQ(v, 0.0f);

  // All equal: every element is its block's absmax -> code 15 (or 0 when negative).
  std::vector<float> pos(64, 0.3f), neg(64, -0.3f);
  Nf4Tensor p = quantize_nf4(pos.data(), 64, 64), m = quantize_nf4(neg.data(), 64, 64);
  for (int64_t i = 0; i < 32; ++i) {
    EXPECT_EQ(p.packed.ptr<uint8_t>()[i], 0xFF);
    EXPECT_EQ(m.packed.ptr<uint8_t>()[i], 0x00);
  }
  EXPECT_EQ(p.absmax.ptr<float>()[0], 0.3f);
  for (float v : dequantize_nf4(p)) EXPECT_EQ(v, 0.3f);
  for (float v : dequantize_nf4(m)) EXPECT_EQ(v, -0.3f);

  // +-absmax alternating: high nibble 15, low nibble 0.
  std::vector<float> alt(64);
  for (int i = 0; i < 64; ++i) alt[i] = i % 2 ? -2.5f : 2.5f;
  Nf4Tensor a = quantize_nf4(alt.data(), 64, 64);
  for (int64_t i = 0; i < 32; ++i) EXPECT_EQ(a.packed.ptr<uint8_t>()[i], 0xF0);

  // Every code value times the absmax, in order: bytes 0x01, 0x23, ..., 0xEF, repeated.
  std::vector<float> ramp(64);
  for (int i = 0; i < 64; ++i) ramp[i] = kNf4Code[i % 16] * 4.0f;
  Nf4Tensor r = quantize_nf4(ramp.data(), 64, 64);
  for (int64_t i = 0; i < 32; ++i) EXPECT_EQ(r.packed.ptr<uint8_t>()[i], uint8_t(((2 * i % 16) << 4) | (2 * i + 1) % 16));
  EXPECT_EQ(dequantize_nf4(r), ramp);
}

TEST(Nf4, PackingPutsTheFirstElementInTheHighNibble) {
  // x0 = absmax (code 15), x1 = 0 (code 7), x2 = -absmax (code 0), x3 = 0.44 * absmax (code 12), ...
  std::vector<float> x(32, 0.0f);
  x[0] = 1.0f;
  x[2] = -1.0f;
  x[3] = 0.44f;
  Nf4Tensor q = quantize_nf4(x.data(), 32, 32);
  EXPECT_EQ(q.packed.ptr<uint8_t>()[0], 0xF7);
  EXPECT_EQ(q.packed.ptr<uint8_t>()[1], 0x0C);
}

TEST(Nf4, OddSizesUseAPartialLastBlockAndAZeroPadNibble) {
  // n not a multiple of the block size: the last block is partial with its own absmax (as bnb does); an odd n pads
  // the last byte's low nibble with the zero code.
  std::vector<float> x(65);
  for (int i = 0; i < 65; ++i) x[i] = float(i) - 20.0f;
  x[64] = -0.5f;
  Nf4Tensor q = quantize_nf4(x.data(), 65, 64);
  ASSERT_EQ(q.num_blocks(), 2);
  ASSERT_EQ(q.packed.numel(), 33);
  EXPECT_EQ(q.absmax.ptr<float>()[0], 43.0f);
  EXPECT_EQ(q.absmax.ptr<float>()[1], 0.5f);
  EXPECT_EQ(q.packed.ptr<uint8_t>()[32], 0x07);  // -0.5 / 0.5 = -1 -> code 0; pad nibble 7
  const auto d = dequantize_nf4(q);
  ASSERT_EQ(d.size(), 65u);
  EXPECT_EQ(d[64], -0.5f);
  // A single element.
  const float one = 3.0f;
  Nf4Tensor s = quantize_nf4(&one, 1, 64);
  EXPECT_EQ(s.packed.ptr<uint8_t>()[0], 0xF7);
  EXPECT_EQ(dequantize_nf4(s), std::vector<float>{3.0f});
}

TEST(Nf4, DoubleQuantKeepsCodesAndQuantisesAbsmax) {
  const int64_t n = 64 * 700 + 10;  // 701 blocks: three nested blocks of 256, the last partial
  auto x = normal_values(n, 77, 0.05f);
  // Blocks of very different scales, so the nested range matters.
  for (int64_t i = 0; i < n; ++i) x[i] *= 1.0f + float((i / 64) % 7);
  const Nf4Tensor single = quantize_nf4(x.data(), n, 64, false);
  const Nf4Tensor dq = quantize_nf4(x.data(), n, 64, true);
  ASSERT_TRUE(dq.nested);
  ASSERT_EQ(dq.absmax.dtype(), DType::U8);
  ASSERT_EQ(dq.nested_absmax.numel(), 3);
  ASSERT_EQ(dq.nested_code.numel(), 256);
  EXPECT_EQ(dq.nested_blocksize, 256);
  // The 4-bit codes come from the exact absmax in both (bnb quantises the statistics afterwards).
  EXPECT_EQ(std::memcmp(single.packed.data(), dq.packed.data(), single.packed.nbytes()), 0);

  const float* exact = single.absmax.ptr<float>();
  double mean = 0;
  for (int64_t b = 0; b < single.num_blocks(); ++b) mean += exact[b];
  mean /= double(single.num_blocks());
  EXPECT_NEAR(dq.nested_offset, mean, 1e-6 * mean);
  // Each nested absmax is within half the widest gap of the dynamic map (at most 0.0078 near 1) times its nested
  // block's scale of the exact one.
  double widest = 0;
  const auto& dyn = dynamic_map_8bit();
  for (int i = 0; i < 255; ++i) widest = std::max(widest, double(dyn[i + 1]) - dyn[i]);
  const auto nested = nf4_block_absmax(dq);
  for (int64_t b = 0; b < single.num_blocks(); ++b) {
    const double scale = dq.nested_absmax.ptr<float>()[b / 256];
    EXPECT_LE(std::fabs(nested[b] - exact[b]), widest / 2 * scale * (1 + 1e-5) + 1e-7) << b;
  }
  // Dequantised values: the code times the nested absmax, exactly.
  const auto d = dequantize_nf4(dq);
  for (int64_t i = 0; i < n; i += 97) EXPECT_EQ(d[i], kNf4Code[code_at(dq, i)] * nested[i / 64]);
  // Storage: 1 byte per block plus a float per 256 blocks, instead of 4 bytes per block.
  EXPECT_EQ(single.storage_bytes(), size_t((n + 1) / 2 + 701 * 4 + 64));
  EXPECT_EQ(dq.storage_bytes(), size_t((n + 1) / 2 + 701 + 3 * 4 + 64 + 1024));
}

TEST(Nf4, DoubleQuantOfEqualAbsmaxIsExact) {
  std::vector<float> x(64 * 5);
  for (size_t i = 0; i < x.size(); ++i) x[i] = i % 64 == 0 ? 2.0f : 0.5f;
  const Nf4Tensor q = quantize_nf4(x.data(), int64_t(x.size()), 64, true);
  EXPECT_EQ(q.nested_offset, 2.0f);
  EXPECT_EQ(q.nested_absmax.ptr<float>()[0], 0.0f);
  for (float a : nf4_block_absmax(q)) EXPECT_EQ(a, 2.0f);
}

TEST(Nf4, TensorOverloadKeepsShapeAndDtype) {
  Tensor t = Tensor::empty(DType::BF16, {3, 50});
  const auto v = normal_values(150, 5);
  convert_from_f32(v.data(), DType::BF16, t.data(), 150);
  const Nf4Tensor q = quantize_nf4(t, 64, true);
  EXPECT_EQ(q.shape, (Shape{3, 50}));
  EXPECT_EQ(q.dtype, DType::BF16);
  const Tensor d = dequantize_nf4_tensor(q, DType::BF16);
  EXPECT_EQ(d.shape(), (Shape{3, 50}));
  EXPECT_EQ(d.dtype(), DType::BF16);
  const auto f = dequantize_nf4(q);
  for (int i = 0; i < 150; ++i) EXPECT_EQ(d.ptr<uint16_t>()[i], f32_to_bf16(f[i]));
}

TEST(Nf4, RejectsBadBlocksizesAndNonFiniteInput) {
  const std::vector<float> x(256, 1.0f);
  for (int64_t bs : {0, 16, 48, 100, 8192})
    EXPECT_NE(error_of([&] { quantize_nf4(x.data(), 256, bs); }).find("blocksize"), std::string::npos) << bs;
  std::vector<float> bad = x;
  bad[77] = NAN;
  EXPECT_NE(error_of([&] { quantize_nf4(bad.data(), 256, 64); }).find("element 77"), std::string::npos);
  bad[77] = INFINITY;
  EXPECT_NE(error_of([&] { quantize_nf4(bad.data(), 256, 64); }).find("not finite"), std::string::npos);
  EXPECT_NE(error_of([&] { quantize_nf4(x.data(), 0, 64); }).find("empty"), std::string::npos);
}

// ---- bitsandbytes checkpoint layout ----

Tensor json_bytes(const std::string& s) {
  Tensor t = Tensor::empty(DType::U8, {int64_t(s.size())});
  std::memcpy(t.data(), s.data(), s.size());
  return t;
}

// The tensors bnb's Linear4bit state dict holds for `key` (QuantState.as_dict(packed=True)), with the packed codes
// shaped [(n + 1) / 2, 1] as Params4bit stores them.
std::map<std::string, Tensor> bnb_state(const Nf4Tensor& q, const std::string& key, const std::string& dtype) {
  std::map<std::string, Tensor> m;
  m[key] = q.packed.view({q.packed.numel(), 1});
  m[key + ".absmax"] = q.absmax;
  m[key + ".quant_map"] = q.code;
  std::string shape = "[";
  for (size_t i = 0; i < q.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(q.shape[i]);
  shape += "]";
  std::string js = "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(q.blocksize) + ", \"dtype\": \"" +
                   dtype + "\", \"shape\": " + shape;
  if (q.nested) {
    m[key + ".nested_absmax"] = q.nested_absmax;
    m[key + ".nested_quant_map"] = q.nested_code;
    char offset[64];
    std::snprintf(offset, sizeof offset, "%.9g", double(q.nested_offset));
    js += ", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": " + std::string(offset);
  }
  m[key + kBnbNf4StateSuffix] = json_bytes(js + "}");
  return m;
}

TensorLookup lookup_in(const std::map<std::string, Tensor>& m) {
  return [&m](const std::string& name) {
    auto it = m.find(name);
    return it == m.end() ? Tensor() : it->second;
  };
}

Nf4Tensor quantized_weight(bool nested) {
  const auto v = normal_values(40 * 96, 31, 0.1f);
  Tensor w = Tensor::empty(DType::F32, {40, 96});
  std::memcpy(w.data(), v.data(), v.size() * sizeof(float));
  return quantize_nf4(w, 64, nested);
}

TEST(Nf4Bnb, LoadsSyntheticStateDicts) {
  for (bool nested : {false, true}) {
    const Nf4Tensor q = quantized_weight(nested);
    const std::string key = "encoder.block.0.layer.1.DenseReluDense.wo.weight";
    const auto m = bnb_state(q, key, "bfloat16");
    ASSERT_TRUE(is_bnb_4bit(lookup_in(m), key));
    EXPECT_FALSE(is_bnb_4bit(lookup_in(m), "encoder.final_layer_norm.weight"));
    const Nf4Tensor l = load_bnb_nf4(lookup_in(m), key, "t5.safetensors");
    EXPECT_EQ(l.shape, (Shape{40, 96}));
    EXPECT_EQ(l.dtype, DType::BF16);
    EXPECT_EQ(l.nested, nested);
    EXPECT_EQ(l.packed.shape(), (Shape{40 * 96 / 2}));
    EXPECT_EQ(dequantize_nf4(l), dequantize_nf4(q)) << "nested " << nested;
  }
}

TEST(Nf4Bnb, MissingKeysAreNamed) {
  for (bool nested : {false, true}) {
    const Nf4Tensor q = quantized_weight(nested);
    const std::string key = "enc.q.weight";
    const auto full = bnb_state(q, key, "float16");
    for (const auto& [name, tensor] : full) {
      auto m = full;
      m.erase(name);
      const std::string msg = error_of([&] { load_bnb_nf4(lookup_in(m), key, "model.safetensors"); });
      EXPECT_NE(msg.find("model.safetensors: tensor '" + name + "' is missing"), std::string::npos) << msg;
      EXPECT_NE(msg.find("bitsandbytes NF4 state of 'enc.q.weight'"), std::string::npos) << msg;
    }
  }
}

TEST(Nf4Bnb, MalformedStatesAreErrors) {
  const Nf4Tensor q = quantized_weight(false);
  const std::string key = "w";
  auto with_json = [&](const std::string& js) {
    auto m = bnb_state(q, key, "bfloat16");
    m[key + kBnbNf4StateSuffix] = json_bytes(js);
    return error_of([&] { load_bnb_nf4(lookup_in(m), key, "f"); });
  };
  EXPECT_NE(with_json("{\"quant_type\": \"nf4\"").find("not valid JSON"), std::string::npos);
  EXPECT_NE(with_json("{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [40, 96]}")
                .find("quant_type 'fp4'"),
            std::string::npos);
  EXPECT_NE(with_json("{\"quant_type\": \"nf4\", \"dtype\": \"bfloat16\", \"shape\": [40, 96]}").find("'blocksize'"),
            std::string::npos);
  EXPECT_NE(with_json("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [40, 96]}")
                .find("dtype 'int8'"),
            std::string::npos);
  // A shape that disagrees with the packed bytes.
  EXPECT_NE(with_json("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [41, 96]}")
                .find("expected 1968"),
            std::string::npos);
  // Wrong absmax length.
  auto m = bnb_state(q, key, "bfloat16");
  m[key + ".absmax"] = q.absmax.narrow(0, 0, 10);
  EXPECT_NE(error_of([&] { load_bnb_nf4(lookup_in(m), key, "f"); }).find("'w.absmax' is F32 [10]"),
            std::string::npos);
  // FP4 checkpoints are recognised and refused.
  auto fp4 = bnb_state(q, key, "bfloat16");
  fp4[key + kBnbFp4StateSuffix] = fp4[key + kBnbNf4StateSuffix];
  fp4.erase(key + kBnbNf4StateSuffix);
  EXPECT_TRUE(is_bnb_4bit(lookup_in(fp4), key));
  EXPECT_NE(error_of([&] { load_bnb_nf4(lookup_in(fp4), key, "f"); }).find("only NF4 is supported"),
            std::string::npos);
}

TEST(Nf4Bnb, PackedCodesInAnotherStorageDtype) {
  // bnb's quant_storage may be another dtype: the same bytes, viewed differently.
  const Nf4Tensor q = quantized_weight(true);
  auto m = bnb_state(q, "w", "bfloat16");
  m["w"] = Tensor::borrow(q.packed.data(), DType::BF16, {q.packed.numel() / 2, 1}, Device::CPU, q.packed.owner());
  EXPECT_EQ(dequantize_nf4(load_bnb_nf4(lookup_in(m), "w", "f")), dequantize_nf4(q));
}

TEST(Nf4Bnb, LoadsFromASafetensorsFile) {
  test::TempDir dir;
  const Nf4Tensor q = quantized_weight(true);
  const auto m = bnb_state(q, "layers.0.wi.weight", "bfloat16");
  std::vector<std::pair<std::string, Tensor>> tensors(m.begin(), m.end());
  const std::string path = dir / "nf4.safetensors";
  write_safetensors(path, tensors);
  const auto file = SafetensorsCollection::open(path);
  const Nf4Tensor l = load_bnb_nf4(file, "layers.0.wi.weight");
  EXPECT_EQ(dequantize_nf4(l), dequantize_nf4(q));
  const std::string msg = error_of([&] { load_bnb_nf4(file, "layers.1.wi.weight"); });
  EXPECT_NE(msg.find(path + ": tensor 'layers.1.wi.weight.quant_state.bitsandbytes__nf4' is missing"),
            std::string::npos)
      << msg;
}

// ---- goldens from bitsandbytes 0.50.2 (torch 2.11, H100), made by running bnb on these exactly reproducible
// inputs: quantize_4bit(blocksize=64, quant_type="nf4") on CUDA and on the CPU, and Linear4bit(70, 5) state dicts ----

// k / 1000 for k in -1000..1000 from a multiplicative hash, scaled by 2^-(block % 5): float32-exact in numpy and C++.
std::vector<float> golden_inputs(int64_t n) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t h = (uint64_t(i) * 2654435761ull) % 4294967296ull;
    v[i] = std::ldexp(float(int64_t(h % 2001) - 1000) / 1000.0f, -int((i / 64) % 5));
  }
  return v;
}

uint64_t fnv1a(const void* data, size_t bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < bytes; ++i) h = (h ^ static_cast<const uint8_t*>(data)[i]) * 0x100000001b3ull;
  return h;
}
uint64_t fnv1a(const Tensor& t) { return fnv1a(t.data(), t.nbytes()); }
uint64_t fnv1a(const std::vector<float>& v) { return fnv1a(v.data(), v.size() * sizeof(float)); }

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Within one float ulp: bnb's CUDA and CPU paths themselves differ by one in the mean offset and the nested scale.
void expect_ulp_close(float got, float want, const char* what) {
  EXPECT_LE(std::fabs(got - want), std::fabs(std::nextafter(want, 2 * want + 1) - want)) << what;
}

TEST(Nf4BnbGolden, DynamicMapIsBitIdentical) {
  const auto& m = dynamic_map_8bit();
  EXPECT_EQ(fnv1a(m.data(), sizeof m), 0xd677f22a96665bc4ull);
}

TEST(Nf4BnbGolden, QuantizationMatchesBitsandbytes) {
  struct Golden {
    int64_t n;
    uint64_t packed, absmax, dequant, absmax_q;
    uint32_t offset, absmax2[3];
    int nested_blocks;
  };
  // bnb's CUDA and CPU results agree on every code and 8-bit absmax; the offset and scales are CUDA's.
  const Golden goldens[] = {
      {5 * 70, 0xc6f971ecb1461be2ull, 0x4bebd36bb960cd0dull, 0xd1c37f9632e769e5ull, 0x89b6a628fad10d96ull,
       0x3ef6e97a, {0x3f048b43}, 1},
      {300 * 128, 0xc67843157df64425ull, 0x41ccac770ffb6eb3ull, 0x16877f98af4cc07bull, 0x7f770941147706fbull,
       0x3ec380cf, {0x3f1e3f98, 0x3f1e3f98, 0x3f1dfe10}, 3},
  };
  for (const auto& g : goldens) {
    SCOPED_TRACE(g.n);
    const auto x = golden_inputs(g.n);
    const Nf4Tensor single = quantize_nf4(x.data(), g.n, 64, false);
    EXPECT_EQ(fnv1a(single.packed), g.packed);
    EXPECT_EQ(fnv1a(single.absmax), g.absmax);
    EXPECT_EQ(fnv1a(dequantize_nf4(single)), g.dequant);
    const Nf4Tensor nested = quantize_nf4(x.data(), g.n, 64, true);
    EXPECT_EQ(fnv1a(nested.packed), g.packed);
    EXPECT_EQ(fnv1a(nested.absmax), g.absmax_q);
    expect_ulp_close(nested.nested_offset, from_bits(g.offset), "offset");
    ASSERT_EQ(nested.nested_absmax.numel(), g.nested_blocks);
    for (int j = 0; j < g.nested_blocks; ++j)
      expect_ulp_close(nested.nested_absmax.ptr<float>()[j], from_bits(g.absmax2[j]), "nested absmax");
  }
}

// bnb.nn.Linear4bit(70, 5) with the 5 x 70 golden inputs as bf16 weights, moved to CUDA (which quantises it), its
// state dict saved with safetensors under the prefix "layer.": without and with compress_statistics.
const char* const kBnbLinear4bit[2] = {
    "40010000000000007b226c617965722e7765696768742e6162736d6178223a7b226474797065223a22463332222c227368617065223a5b36"
    "5d2c22646174615f6f666673657473223a5b302c32345d7d2c226c617965722e7765696768742e7175616e745f6d6170223a7b2264747970"
    "65223a22463332222c227368617065223a5b31365d2c22646174615f6f666673657473223a5b32342c38385d7d2c226c617965722e776569"
    "676874223a7b226474797065223a225538222c227368617065223a5b3137352c315d2c22646174615f6f666673657473223a5b38382c3236"
    "335d7d2c226c617965722e7765696768742e7175616e745f73746174652e62697473616e6462797465735f5f6e6634223a7b226474797065"
    "223a225538222c227368617065223a5b37375d2c22646174615f6f666673657473223a5b3236332c3334305d7d7d20200000803f0000ff3e"
    "00007d3e0000003e00007e3d0000763f000080bfb13932bf306b06bfa032cabe4da291be3f353dbe7178babd00000000fffaa23de3ca243e"
    "dd047c3e3a03ad3eb8a4e13eab07103fb313393f0000803f0ad48b36024f13e0bef9d47b36924f13e02df9ce7b25914713e02df9ce7bd591"
    "4712501df1ce6ad59c37125014f1ce0ad58c36a25f13e1be0adf8c36a24813e02ef9de8be6a24813e02ef1ce7be69d4713602df1ce0bd59c"
    "47b25014f1ce0adf9c37b25014f12e0adf8ce7a25913e12e01df8ce6ad5813612e01de1be6ad48136025f1de0bef9d48b36024f13e0bef9c"
    "47b36924f13e02df9ce7b25914712e01df1ce7bd5913712501df1ce6ad58c37b227175616e745f74797065223a20226e6634222c2022626c"
    "6f636b73697a65223a2036342c20226474797065223a202262666c6f61743136222c20227368617065223a205b352c2037305d7d",
    "f0010000000000007b226c617965722e7765696768742e6e65737465645f6162736d6178223a7b226474797065223a22463332222c227368"
    "617065223a5b315d2c22646174615f6f666673657473223a5b302c345d7d2c226c617965722e7765696768742e6e65737465645f7175616e"
    "745f6d6170223a7b226474797065223a22463332222c227368617065223a5b3235365d2c22646174615f6f666673657473223a5b342c3130"
    "32385d7d2c226c617965722e7765696768742e7175616e745f6d6170223a7b226474797065223a22463332222c227368617065223a5b3136"
    "5d2c22646174615f6f666673657473223a5b313032382c313039325d7d2c226c617965722e776569676874223a7b226474797065223a2255"
    "38222c227368617065223a5b3137352c315d2c22646174615f6f666673657473223a5b313039322c313236375d7d2c226c617965722e7765"
    "696768742e6162736d6178223a7b226474797065223a225538222c227368617065223a5b365d2c22646174615f6f666673657473223a5b31"
    "3236372c313237335d7d2c226c617965722e7765696768742e7175616e745f73746174652e62697473616e6462797465735f5f6e6634223a"
    "7b226474797065223a225538222c227368617065223a5b3136325d2c22646174615f6f666673657473223a5b313237332c313433355d7d7d"
    "0090043f33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf9a9956bf000053bf"
    "66664fbfcdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf00002fbf66662bbfcdcc27bf343324bf9a9920bf"
    "00001dbf666619bfcdcc15bf343312bf9a990ebf00000bbf666607bfcccc03bf333300bf3233f9be0000f2becccceabe9a99e3be6666dcbe"
    "3333d5be0000cebeccccc6be9a99bfbe6666b8be3333b1be0000aabecccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbe"
    "cdcc60be666652be000044be9a9935be333327becdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd6766bebdd7a3b8bd48e1b2bd"
    "b81eadbd2a5ca7bd9a99a1bd0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bd"
    "c3f538bda3702dbd85eb21bd676616bd48e10abd52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc643b1fbc"
    "180416bccdcc0cbc819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb5c8f42bb2db21dbbfca9f1ba"
    "9defa7baff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b94b1fbab8b3ef8ab8348037b80642b2b7ff0502b7"
    "941a5ab6b7a313b500000000b7a31335941a5a36ff0502370642b23734803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013a"
    "c1ec1e3a806a3c3a3ee8593aff65773a9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3b"
    "d34de23b6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c15aee73c52b8fe3c"
    "48e10a3d6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d"
    "7b14963d0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23dd7a3b83d6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e"
    "3333273e9a99353e0000443e6666523ecdcc603e33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e"
    "6666b83e9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003fcccc033f6666073f00000b3f"
    "9a990e3f3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f"
    "0000413f9a99443f3333483fcdcc4b3f66664f3f0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f"
    "6666733f0000773f9a997a3f33337e3f0000803f000080bfb13932bf306b06bfa032cabe4da291be3f353dbe7178babd00000000fffaa23d"
    "e3ca243edd047c3e3a03ad3eb8a4e13eab07103fb313393f0000803f0ad48b36024f13e0bef9d47b36924f13e02df9ce7b25914713e02df9"
    "ce7bd5914712501df1ce6ad59c37125014f1ce0ad58c36a25f13e1be0adf8c36a24813e02ef9de8be6a24813e02ef1ce7be69d4713602df1"
    "ce0bd59c47b25014f1ce0adf9c37b25014f12e0adf8ce7a25913e12e01df8ce6ad5813612e01de1be6ad48136025f1de0bef9d48b36024f1"
    "3e0bef9c47b36924f13e02df9ce7b25914712e01df1ce7bd5913712501df1ce6ad58c3ffa626160df97b227175616e745f74797065223a20"
    "226e6634222c2022626c6f636b73697a65223a2036342c20226474797065223a202262666c6f61743136222c20227368617065223a205b35"
    "2c2037305d2c20226e65737465645f626c6f636b73697a65223a203235362c20226e65737465645f6474797065223a2022666c6f61743332"
    "222c20226e65737465645f6f6666736574223a20302e3438323137373733343337357d",
};

std::string unhex(const char* h) {
  std::string out;
  for (size_t i = 0; h[i] && h[i + 1]; i += 2) out += char(std::stoi(std::string(h + i, 2), nullptr, 16));
  return out;
}

TEST(Nf4BnbGolden, LoadsRealLinear4bitStateDicts) {
  test::TempDir dir;
  const auto x = golden_inputs(5 * 70);
  Tensor w = Tensor::empty(DType::BF16, {5, 70});
  convert_from_f32(x.data(), DType::BF16, w.data(), 5 * 70);
  for (int nested = 0; nested < 2; ++nested) {
    SCOPED_TRACE(nested);
    const std::string path = dir / ("linear4bit" + std::to_string(nested) + ".safetensors");
    {
      const std::string bytes = unhex(kBnbLinear4bit[nested]);
      FILE* f = std::fopen(path.c_str(), "wb");
      ASSERT_TRUE(f);
      std::fwrite(bytes.data(), 1, bytes.size(), f);
      std::fclose(f);
    }
    const auto file = SafetensorsCollection::open(path);
    ASSERT_TRUE(is_bnb_4bit([&](const std::string& k) { return file.contains(k) ? file.tensor(k) : Tensor(); },
                            "layer.weight"));
    const Nf4Tensor l = load_bnb_nf4(file, "layer.weight");
    EXPECT_EQ(l.shape, (Shape{5, 70}));
    EXPECT_EQ(l.dtype, DType::BF16);
    EXPECT_EQ(l.nested, nested == 1);
    EXPECT_EQ(std::memcmp(l.code.data(), kNf4Code.data(), 64), 0);
    // Our quantisation of the same bf16 weights gives bnb's codes and statistics.
    const Nf4Tensor q = quantize_nf4(w, 64, nested == 1);
    EXPECT_EQ(std::memcmp(l.packed.data(), q.packed.data(), q.packed.nbytes()), 0);
    EXPECT_EQ(std::memcmp(l.absmax.data(), q.absmax.data(), q.absmax.nbytes()), 0);
    if (nested) {
      EXPECT_EQ(l.nested_offset, 0.482177734375f);  // from the JSON
      EXPECT_EQ(std::memcmp(l.nested_code.data(), dynamic_map_8bit().data(), 1024), 0);
      expect_ulp_close(q.nested_offset, l.nested_offset, "offset");
      expect_ulp_close(q.nested_absmax.ptr<float>()[0], l.nested_absmax.ptr<float>()[0], "nested absmax");
    }
    const auto ld = dequantize_nf4(l), qd = dequantize_nf4(q);
    for (size_t i = 0; i < ld.size(); ++i) EXPECT_NEAR(ld[i], qd[i], 1e-6f * std::fabs(qd[i]) + 1e-12f) << i;
  }
}

}  // namespace
}  // namespace fluxswap
