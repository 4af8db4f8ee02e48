// gated_residual_layer_norm_modulate(_fp8) on the GPU against the two GPU ops it replaces (gated_residual, then
// layer_norm_modulate or layer_norm_modulate_fp8), bit for bit: the updated residual stream (every byte of its buffer,
// rows outside the view included), the normed rows (every byte of a NaN-poisoned buffer: nothing written outside the
// view) or the e4m3 codes (poisoned buffer, padding untouched) and row scales. Layouts:
//  - transformer: x rows 2 .. 2 + N of a [B, N + 5, C] stream buffer (row stride C, batch stride (N + 5) C), the
//    branch likewise, gate/shift/scale chunks of a [B, 6C] modulation vector, normed rows with R = 64 spare columns,
//    e4m3 rows contiguous: the 16-byte paths (rows in registers at C = 3072, 4096);
//  - normed-odd-stride: normed rows at stride C + 3 (the bf16 form's norm takes its element-by-element kernel, the
//    FP8 form its 16-byte one);
//  - unaligned: x a column slice 3 elements in (element-by-element kernels for both parts);
//  - branch-unaligned: the branch 3 elements in beside aligned x (the fused launcher falls back to the two kernels).
// Odd row counts, B = 1 and 2, C = 64, 3072, 4096. The result is also held against the CPU reference's two ops
// (float32, unrounded): x within 1e-2 and the normed rows within 2e-2 (max|a-b|/max|b|; bf16 roundings of x and y).
#include <cstring>

#include "cuda_test_util.h"

namespace fluxswap::test {
namespace {

enum class FusedLayout { Transformer, NormedOddStride, Unaligned, BranchUnaligned };

const char* name_of(FusedLayout l) {
  switch (l) {
    case FusedLayout::Transformer: return "transformer";
    case FusedLayout::NormedOddStride: return "normed-odd-stride";
    case FusedLayout::Unaligned: return "unaligned";
    case FusedLayout::BranchUnaligned: return "branch-unaligned";
  }
  return "?";
}

struct Case {
  int64_t B, N, C;
  FusedLayout layout;
};

std::string case_name(const Case& c) {
  return "B " + std::to_string(c.B) + " N " + std::to_string(c.N) + " C " + std::to_string(c.C) + " " +
         name_of(c.layout);
}

// [rows, ld] e4m3 codes, all NaN (0x7F): bytes an op must not write stay so.
Tensor poisoned_codes(Backend& gpu, int64_t rows, int64_t ld) {
  const Pair nan = nan_pair(gpu, {rows, ld});
  Tensor q = gpu.empty(DType::F8_E4M3, {rows, ld}), s = gpu.empty(DType::F32, {rows});
  gpu.quantize_fp8_rows(nan.gpu, q, s);
  return q;
}

class CudaFusedResidualNorm : public GpuAndCpu, public ::testing::WithParamInterface<Case> {
 protected:
  // The residual stream twice on the GPU (one copy per path) and once on the CPU, the branch, the modulation.
  void SetUp() override {
    GpuAndCpu::SetUp();
    if (IsSkipped()) return;
    const auto [B, N, C, layout] = GetParam();
    const int64_t x_col = layout == FusedLayout::Unaligned ? 3 : 0;
    const int64_t x_width = C + (layout == FusedLayout::Unaligned ? 8 : 0);
    stream_ = random_pair(*gpu_, {B, N + 5, x_width}, 101, 1.0f, 0.2f);
    stream2_ = gpu_->empty(DType::BF16, stream_.gpu.shape());
    gpu_->copy(stream_.gpu, stream2_);
    x_col_ = x_col;
    const int64_t b_col = layout == FusedLayout::BranchUnaligned ? 3 : 0;
    branch_full_ = random_pair(*gpu_, {B, N + 5, C + (b_col ? 8 : 0)}, 102, 1.5f);
    branch_ = branch_full_.narrow(1, 2, N).narrow(2, b_col, C);
    mod_ = random_pair(*gpu_, {B, 6 * C}, 103, 0.5f);
  }
  Tensor x_of(const Tensor& stream) const {
    return stream.narrow(1, 2, GetParam().N).narrow(2, x_col_, GetParam().C);
  }
  Pair chunk(int i) const { return mod_.narrow(1, i * GetParam().C, GetParam().C); }
  // The CPU reference's updated x (its two ops on the float32 copy of the inputs).
  void check_against_cpu(const Tensor& gpu_x, const Tensor& gpu_normed, const Tensor& cpu_normed) {
    cpu_->gated_residual(x_of(stream_.cpu), chunk(2).cpu, branch_.cpu);
    cpu_->layer_norm_modulate(x_of(stream_.cpu), chunk(3).cpu, chunk(4).cpu, cpu_normed);
    const double ex = max_rel_error(gpu_->to_host_f32(gpu_x), x_of(stream_.cpu));
    std::printf("[ fused    ] %s: x vs CPU %.3g", case_name(GetParam()).c_str(), ex);
    EXPECT_LE(ex, 1e-2) << "updated residual vs the CPU";
    if (gpu_normed.defined()) {
      const double en = max_rel_error(gpu_->to_host_f32(gpu_normed), cpu_normed);
      std::printf(", normed vs CPU %.3g", en);
      EXPECT_LE(en, 2e-2) << "normed rows vs the CPU";
    }
    std::printf("\n");
  }
  Pair stream_, branch_full_, branch_, mod_;
  Tensor stream2_;
  int64_t x_col_ = 0;
};

TEST_P(CudaFusedResidualNorm, Bf16FormIsTheTwoGpuOpsBitForBit) {
  const auto [B, N, C, layout] = GetParam();
  SCOPED_TRACE(case_name(GetParam()));
  const int64_t ld = layout == FusedLayout::NormedOddStride ? C + 3 : C + 64;
  const Pair normed_full = nan_pair(*gpu_, {B, N + 5, ld});
  const Tensor normed_full2 = nan_pair(*gpu_, {B, N + 5, ld}).gpu;
  const Tensor normed = normed_full.gpu.narrow(1, 2, N).narrow(2, 0, C);
  gpu_->gated_residual_layer_norm_modulate(x_of(stream_.gpu), chunk(2).gpu, branch_.gpu, chunk(3).gpu, chunk(4).gpu,
                                           normed);
  gpu_->gated_residual(x_of(stream2_), chunk(2).gpu, branch_.gpu);
  gpu_->layer_norm_modulate(x_of(stream2_), chunk(3).gpu, chunk(4).gpu, normed_full2.narrow(1, 2, N).narrow(2, 0, C));
  EXPECT_TRUE(same_bytes(download_raw(*gpu_, stream_.gpu), download_raw(*gpu_, stream2_))) << "the residual stream";
  EXPECT_TRUE(same_bytes(download_raw(*gpu_, normed_full.gpu), download_raw(*gpu_, normed_full2))) << "the normed buffer";
  const Tensor cpu_normed = Tensor::empty(DType::F32, {B, N, C});
  check_against_cpu(x_of(stream_.gpu), normed, cpu_normed);
}

TEST_P(CudaFusedResidualNorm, Fp8FormIsTheTwoGpuOpsBitForBit) {
  const auto [B, N, C, layout] = GetParam();
  SCOPED_TRACE(case_name(GetParam()));
  const int64_t ldq = (C + 15) / 16 * 16;  // contiguous rows at FLUX's widths, as the transformer's q buffer
  const Tensor q_full = poisoned_codes(*gpu_, B * N, ldq), q_full2 = poisoned_codes(*gpu_, B * N, ldq);
  const Tensor s = gpu_->empty(DType::F32, {B * N}), s2 = gpu_->empty(DType::F32, {B * N});
  gpu_->gated_residual_layer_norm_modulate_fp8(x_of(stream_.gpu), chunk(2).gpu, branch_.gpu, chunk(3).gpu,
                                               chunk(4).gpu, q_full.view({B, N, ldq}).narrow(2, 0, C), s);
  gpu_->gated_residual(x_of(stream2_), chunk(2).gpu, branch_.gpu);
  gpu_->layer_norm_modulate_fp8(x_of(stream2_), chunk(3).gpu, chunk(4).gpu, q_full2.view({B, N, ldq}).narrow(2, 0, C),
                                s2);
  EXPECT_TRUE(same_bytes(download_raw(*gpu_, stream_.gpu), download_raw(*gpu_, stream2_))) << "the residual stream";
  EXPECT_TRUE(same_bytes(download_raw(*gpu_, q_full), download_raw(*gpu_, q_full2))) << "e4m3 codes (and padding)";
  EXPECT_TRUE(same_bytes(download_raw(*gpu_, s), download_raw(*gpu_, s2))) << "row scales";
  const Tensor cpu_normed = Tensor::empty(DType::F32, {B, N, C});
  check_against_cpu(x_of(stream_.gpu), Tensor(), cpu_normed);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaFusedResidualNorm,
    ::testing::Values(Case{2, 37, 3072, FusedLayout::Transformer}, Case{1, 333, 3072, FusedLayout::Transformer},
                      Case{2, 37, 64, FusedLayout::Transformer}, Case{1, 5, 64, FusedLayout::Transformer},
                      Case{2, 9, 4096, FusedLayout::Transformer}, Case{2, 37, 3072, FusedLayout::NormedOddStride},
                      Case{1, 7, 64, FusedLayout::NormedOddStride}, Case{2, 7, 3072, FusedLayout::Unaligned},
                      Case{1, 11, 64, FusedLayout::Unaligned}, Case{2, 7, 3072, FusedLayout::BranchUnaligned},
                      Case{1, 3, 64, FusedLayout::BranchUnaligned}));

class CudaFusedResidualNormErrors : public GpuAndCpu {};

TEST_F(CudaFusedResidualNormErrors, ShapesAndFp8OutputsAreChecked) {
  const Pair x = random_pair(*gpu_, {1, 3, 48}, 3), y = random_pair(*gpu_, {1, 3, 48}, 4);
  const Pair mod = random_pair(*gpu_, {1, 3 * 48}, 5);
  const Tensor g = mod.gpu.narrow(1, 0, 48), sh = mod.gpu.narrow(1, 48, 48), sc = mod.gpu.narrow(1, 96, 48);
  EXPECT_THROW(gpu_->gated_residual_layer_norm_modulate(x.gpu, g, y.gpu, sh, sc, gpu_->empty(DType::BF16, {1, 4, 48})),
               Error);
  EXPECT_THROW(gpu_->gated_residual_layer_norm_modulate(x.gpu, mod.gpu.narrow(1, 0, 40), y.gpu, sh, sc,
                                                        gpu_->empty(DType::BF16, {1, 3, 48})),
               Error);
  const Tensor s = gpu_->empty(DType::F32, {3});
  const Tensor q_odd = gpu_->empty(DType::F8_E4M3, {1, 3, 56}).narrow(2, 0, 48);  // row stride 56: not 16-byte rows
  EXPECT_THROW(gpu_->gated_residual_layer_norm_modulate_fp8(x.gpu, g, y.gpu, sh, sc, q_odd, s), Error);
  EXPECT_THROW(gpu_->gated_residual_layer_norm_modulate_fp8(x.gpu, g, y.gpu, sh, sc,
                                                            gpu_->empty(DType::F8_E4M3, {1, 3, 48}),
                                                            gpu_->empty(DType::F32, {2})),
               Error);
  EXPECT_NO_THROW(gpu_->gated_residual_layer_norm_modulate_fp8(x.gpu, g, y.gpu, sh, sc,
                                                               gpu_->empty(DType::F8_E4M3, {1, 3, 48}), s));
}

}  // namespace
}  // namespace fluxswap::test
