#pragma once
// 4-bit NormalFloat (NF4) weights in the bitsandbytes layout, so that bnb pre-quantised checkpoints load as they are
// and our own quantisation produces what bnb would.
//
// Layout (bitsandbytes `quantize_4bit(quant_type="nf4")`, read from its functional.py, backends/default/ops.py and
// csrc/kernels.cu):
//  - the tensor is flattened and cut into blocks of `blocksize` elements (the last block may be partial and then has
//    its own absmax); each block stores absmax = max|x| as float32;
//  - each element becomes the index (0..15) of the NF4 code nearest to x / absmax; the codes are sorted, so nearest
//    means "x above the midpoint between codes i and i+1" (bnb's CUDA decision tree; a tie rounds down);
//  - two indices per byte, the earlier element in the high nibble; an odd element count pads the last low nibble
//    with index 7 (the code 0.0), as bnb does;
//  - with double quantisation ("nested", bnb's compress_statistics), the absmax vector minus its mean (the
//    "offset") is itself quantised blockwise to 8 bits in blocks of 256 with bnb's signed dynamic map, keeping a
//    float32 absmax per 256 absmaxes. Dequantised: absmax[b] = dyn[q8[b]] * absmax2[b / 256] + offset.
// Dequantisation of element i in block b: code[q[i]] * absmax[b], in float32 (bnb then casts to the output dtype).
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace fluxswap {

class SafetensorsCollection;

// bnb's NF4 table (bitsandbytes.functional.get_4bit_type("nf4")): quantiles of N(0, 1) normalised to [-1, 1], with
// an exact 0. Index order is value order.
inline constexpr std::array<float, 16> kNf4Code = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};
inline constexpr uint8_t kNf4ZeroIndex = 7;
// bnb always double-quantises absmax in blocks of 256 (quantize_4bit hard-codes it).
inline constexpr int64_t kNf4NestedBlocksize = 256;

// The decision thresholds between adjacent NF4 codes, as bnb's CUDA quantiser has them (the float literals of its
// decision tree in csrc/kernels.cu, e.g. 0.8614784181118011f). Four of them (indices 0, 8, 12, 14) are one ulp away
// from the float32 midpoint of their codes, where that midpoint is a tie between two floats that the decimal
// literal resolves the other way; bnb's pure-torch fallback uses the float32 midpoints. We follow the CUDA kernel,
// which made most published checkpoints.
const std::array<float, 15>& nf4_thresholds();
// bnb's signed 8-bit dynamic map (create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)): for i in
// 0..6 the means of adjacent points of linspace(0.1, 1, 2^i + 1) times 10^(i - 6), both signs, then 0 and 1, sorted:
// 256 values in [-1, 1]; used for the nested absmax. Bit-identical to bnb's (a table); a loaded checkpoint always
// uses the map stored in its file.
const std::array<float, 256>& dynamic_map_8bit();

// Index of the code nearest to x (sorted `code` of n entries, tie -> lower index); NaN maps to the lowest index.
int nearest_code_index(const float* code, int n, float x);

struct Nf4Tensor {
  Shape shape;             // logical shape of the dequantised tensor
  int64_t blocksize = 64;  // elements per absmax
  Tensor packed;           // U8 [(numel + 1) / 2]
  Tensor code;             // F32 [16], the quant map (kNf4Code for our own quantisation)
  // Not nested: F32 [num_blocks()]. Nested: U8 [num_blocks()] indices into nested_code.
  Tensor absmax;
  bool nested = false;
  Tensor nested_absmax;  // F32 [ceil(num_blocks() / nested_blocksize)]
  Tensor nested_code;    // F32 [256]
  int64_t nested_blocksize = kNf4NestedBlocksize;
  float nested_offset = 0.0f;
  // The dtype bnb recorded for the original tensor (what its dequantise returns); informational.
  DType dtype = DType::F32;

  int64_t numel() const { return shape_numel(shape); }
  int64_t num_blocks() const { return (numel() + blocksize - 1) / blocksize; }
  // Device bytes of every part (packed codes, absmax state, maps).
  size_t storage_bytes() const;
};

// Quantises n float32 values (any n >= 1; a partial last block is allowed, as in bnb). blocksize: a power of two
// from 32 to 4096 (bnb's accepted sizes). Throws Error on a bad blocksize or a non-finite input (NaN/inf would
// poison a whole block's absmax).
Nf4Tensor quantize_nf4(const float* x, int64_t n, int64_t blocksize = 64, bool double_quant = false);
// A CPU tensor of any float dtype and any strides; the result keeps its shape.
Nf4Tensor quantize_nf4(const Tensor& x, int64_t blocksize = 64, bool double_quant = false);
// quantize_nf4(x, n, blocksize) without double quantisation, the blocks spread over `threads` threads (0: one per
// core): the same bits, for the billions of values of a T5-XXL.
Nf4Tensor quantize_nf4_parallel(const float* x, int64_t n, int64_t blocksize = 64, unsigned threads = 0);

// The float32 absmax of every block (resolving the nested quantisation when there is one).
std::vector<float> nf4_block_absmax(const Nf4Tensor& t);
// The dequantised values, float32, flattened.
std::vector<float> dequantize_nf4(const Nf4Tensor& t);
// The same as a contiguous host tensor of t.shape in `dtype` (F32, F16 or BF16; rounded to nearest even, as bnb's
// cast of its float32 result).
Tensor dequantize_nf4_tensor(const Nf4Tensor& t, DType dtype = DType::F32);

// Checks every invariant (sizes and dtypes of all parts, blocksize); throws Error starting with `what`.
void validate_nf4(const Nf4Tensor& t, const std::string& what);

// ---- bitsandbytes pre-quantised checkpoints ----
// For a weight `X.weight`, bnb (Linear4bit._save_to_state_dict -> QuantState.as_dict(packed=True)) stores
//   X.weight                               the packed codes (U8 [(n + 1) / 2, 1]; another dtype when quant_storage
//                                          was changed: the same bytes)
//   X.weight.absmax                        F32 [blocks], or U8 [blocks] when nested
//   X.weight.quant_map                     F32 [16]
//   X.weight.nested_absmax                 F32 [ceil(blocks / 256)]       (nested only)
//   X.weight.nested_quant_map              F32 [256]                      (nested only)
//   X.weight.quant_state.bitsandbytes__nf4 U8 bytes of a JSON object: quant_type, blocksize, dtype ("bfloat16", ...),
//                                          shape, and when nested nested_blocksize, nested_dtype, nested_offset.
inline constexpr const char* kBnbNf4StateSuffix = ".quant_state.bitsandbytes__nf4";
inline constexpr const char* kBnbFp4StateSuffix = ".quant_state.bitsandbytes__fp4";

// Looks a tensor up by its full name; returns an undefined Tensor when there is none.
using TensorLookup = std::function<Tensor(const std::string& name)>;

// Whether `weight_key` is stored the bnb 4-bit way (its packed quant-state tensor is present, NF4 or FP4).
bool is_bnb_4bit(const TensorLookup& lookup, const std::string& weight_key);
// Builds the NF4 tensor of `weight_key` from its bnb parts. Errors start with `source` (a file path) and name the
// missing or malformed key, e.g. "t5.safetensors: tensor 'encoder.block.0.layer.0.SelfAttention.q.weight.absmax'
// is missing (bitsandbytes NF4 state of 'encoder.block.0.layer.0.SelfAttention.q.weight')". The tensors may borrow
// the lookup's memory (an mmapped file stays alive through their owners).
Nf4Tensor load_bnb_nf4(const TensorLookup& lookup, const std::string& weight_key, const std::string& source);
Nf4Tensor load_bnb_nf4(const SafetensorsCollection& file, const std::string& weight_key);

}  // namespace fluxswap
