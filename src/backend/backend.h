#pragma once
// The ops the FLUX models are written against. The CPU backend is the float32 reference; the CUDA backend stores
// activations in bf16 and accumulates in float32. Every op is asynchronous on the device backend and never
// synchronises with the host, so a whole denoising step can be captured as one CUDA graph.
//
// Layout conventions (all tensors live on the backend's device):
//  - "rows" tensors are [B, N, C] with the last dimension contiguous; their batch and row strides may be larger
//    than the packed ones, so ops can read and write column slices of a wider buffer without copies.
//  - per-sample vectors (modulation shift/scale/gate) are [B, C] views with any batch stride.
//  - attention inputs q, k are contiguous [B, H, S, head_dim], v the same or rows [B, S, H*head_dim] (the v
//    columns of the qkv projection, read in place); the attention output is rows [B, S, H*head_dim].
//  - outputs are passed as const handles: a Tensor is a view, and the op writes the memory it points to.
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend/registered_upload.h"
#include "core/host_buffer.h"
#include "core/tensor.h"

namespace fluxswap {

enum class Activation { None, GeluTanh, Silu, QuickGelu /* x * sigmoid(1.702 x), CLIP */ };

// Device work recorded once and replayed (a CUDA graph on the CUDA backend; a plain re-run on the CPU).
class RecordedWork {
 public:
  virtual ~RecordedWork() = default;
  virtual void replay() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  // dtype of activations and of weights uploaded with upload_weight().
  virtual DType compute_dtype() const = 0;

  // Memory.
  virtual Tensor empty(DType dtype, const Shape& shape) = 0;
  // A copy of a host tensor (any float dtype) on the device in compute_dtype().
  virtual Tensor upload_weight(const Tensor& host) = 0;
  // Host -> device copy into an existing tensor; converts from any float dtype to dst's dtype. Integer tensors
  // (token ids) are copied as they are and need matching dtypes.
  virtual void copy_from_host(const Tensor& host, const Tensor& dst) = 0;
  // Many copy_from_host copies at once; a backend may pack same-dtype ones into a few large pinned transfers.
  virtual void copy_from_host_batch(const std::vector<std::pair<Tensor, Tensor>>& host_to_device);
  // Memory to read files into when their contents go to this device (empty: map them instead).
  virtual HostBufferAllocator host_buffer_allocator() { return {}; }
  // copy_from_host_batch for sources that lie (mostly) in [region, region + bytes) of pageable memory, such as a
  // mapped file: a backend that can pins that memory in place chunk by chunk (read-only) and sends it by DMA with no
  // CPU copy, then unpins it (the CUDA backend returns once all is on the device). Sources outside the region, and
  // everything on a backend or host that cannot pin (the default), go by copy_from_host_batch: never an error for
  // want of support; the report says which way the bytes went and why.
  virtual RegisteredUploadReport copy_from_host_registered(const void* region, size_t bytes,
                                                           const std::vector<std::pair<Tensor, Tensor>>& host_to_device,
                                                           const RegisteredUploadOptions& options = {});
  // Device -> host float32 copy (synchronises).
  virtual Tensor to_host_f32(const Tensor& src) = 0;
  virtual void synchronize() = 0;
  // Fills t (any float dtype) with normal(mean, std) values from a counter-based generator keyed by seed.
  virtual void fill_normal(const Tensor& t, uint64_t seed, float mean, float std) = 0;

  // Records the device work that fn issues (fn runs once, during the recording) for cheap replays. The tensors
  // fn uses must stay allocated while the recording lives; the backend never allocates inside fn's ops.
  virtual std::unique_ptr<RecordedWork> record(const std::function<void()>& fn) = 0;

  // Per-op timing for benchmarks: while on, each op is timed on the device and its time added under the op's
  // name ("attention", ...; GEMMs as "linear MxNxK" where a backend tells shapes apart). Off by default; never on
  // while recording.
  virtual void set_profiling(bool on) = 0;
  virtual std::map<std::string, double> profile_ms() const = 0;  // accumulated since set_profiling(true)
  // Device memory this backend holds now and at most so far (bytes).
  virtual size_t memory_in_use() const = 0;
  virtual size_t peak_memory() const = 0;

  // y = act(x @ w^T + bias).  x rows [B, N, K]; w [Nout, K] contiguous; bias [Nout] or undefined; y rows [B, N, Nout].
  virtual void linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& y, Activation act) = 0;

  // y = x * sigmoid(x), rows [B, N, C] (or [B, C]).
  virtual void silu(const Tensor& x, const Tensor& y) = 0;

  // Sinusoidal embedding of t[b] * t_scale: out[b] = [cos(t f_0..f_{h-1}), sin(t f_0..f_{h-1})],
  // f_i = exp(-ln(10000) i / h), h = dim / 2.  t is float32 [B]; out [B, dim].
  virtual void timestep_embedding(const Tensor& t, float t_scale, const Tensor& out) = 0;

  // y += x, same shapes (rows or [B, C]).
  virtual void add(const Tensor& y, const Tensor& x) = 0;

  // y = LayerNorm(x, eps=1e-6, no affine) * (1 + scale[b]) + shift[b].  x, y rows [B, N, C]; shift, scale [B, C].
  virtual void layer_norm_modulate(const Tensor& x, const Tensor& shift, const Tensor& scale, const Tensor& y) = 0;

  // Splits qkv rows [B, N, 3*H*D] (q | k | v, each heads-major), applies RMSNorm (eps=1e-6, weight [D]) to q and k
  // per head, rotates q and k by RoPE (pairs (2j, 2j+1); rope [S, D/2, 2] float32 holds (cos, sin) of position
  // seq_offset + n), and writes q, k, v [B, H, S, D] at sequence positions seq_offset .. seq_offset + N (v undefined:
  // not written, for an attention that reads v from the qkv rows).
  virtual void qk_norm_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                            int64_t seq_offset, const Tensor& q, const Tensor& k, const Tensor& v) = 0;

  // out = softmax(q k^T / sqrt(D)) v, per batch and head; out rows [B, S, H*D]. v: heads [B, H, S, D] like q, or
  // rows [B, S, H*D] at any row stride (the v columns of the qkv rows).
  virtual void attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out) = 0;

  // FP8 attention (e4m3 q, k, v, probabilities and output, one scale per tensor). Throwing defaults for backends
  // without it. qk_norm_rope_fp8 is qk_norm_rope writing q8 = e4m3(q * qk_scale), k8 = e4m3(k * qk_scale)
  // (F8_E4M3 [B, H, S, D]) and v in the compute dtype (undefined v: not written, for an attention that reads v from
  // the qkv rows), and raises v_amax (F32 [1], >= 0) to max |v| of its rows.
  // qk_scale must keep |q|, |k| <= 448: after RMSNorm |x_i| <= sqrt(D) max|w|, and the rotation keeps pair norms.
  virtual void qk_norm_rope_fp8(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                                int64_t seq_offset, float qk_scale, const Tensor& q8, const Tensor& k8,
                                const Tensor& v, const Tensor& v_amax);
  // out = softmax(q k^T / sqrt(D)) v from qk_norm_rope_fp8's outputs (v: its [B, H, S, D] heads, or rows
  // [B, S, H*D] in the compute dtype at any row stride, the v columns of the qkv rows): v is quantised with 448 / v_amax, the
  // probabilities with 448 and the output with 448 / v_amax (|out| <= max |v|: a convex combination), then out is
  // written in the compute dtype as rows [B, S, H*D]. Leaves v_amax = 0 for the next layer's qk_norm_rope_fp8.
  virtual void attention_fp8(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale,
                             const Tensor& v_amax, const Tensor& out);
  // attention_fp8 with the output kept in e4m3 for FP8 linears to read (linear_fp8_quantized,
  // quantize_fp8_rows_joined): out8 F8_E4M3 [B, S, H*D] contiguous holds the output's codes at its one scale, and
  // out_scale F32 [B * S] that scale's inverse for every row (all equal), so out8 * out_scale are the values
  // attention_fp8 writes before rounding them to the compute dtype. Leaves v_amax = 0 as attention_fp8 does.
  virtual void attention_fp8_rows(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale,
                                  const Tensor& v_amax, const Tensor& out8, const Tensor& out_scale);

  // x += gate[b] * y.  x, y rows [B, N, C]; gate [B, C].
  virtual void gated_residual(const Tensor& x, const Tensor& gate, const Tensor& y) = 0;
  // gated_residual(x, gate, y) then layer_norm_modulate(x, shift, scale, normed), the block's residual update and the
  // norm that reads it, in one pass over x on a backend that fuses them: x is updated in place exactly as
  // gated_residual rounds it and normalised from those values, so x and normed are the two ops' results bit for
  // bit. Shapes and strides as the two ops take them; normed must not overlap x or y. Throwing default.
  virtual void gated_residual_layer_norm_modulate(const Tensor& x, const Tensor& gate, const Tensor& y,
                                                  const Tensor& shift, const Tensor& scale, const Tensor& normed);
  // The same before layer_norm_modulate_fp8 (q, q_scale as it takes them): gated_residual, then
  // layer_norm_modulate_fp8(x, shift, scale, q, q_scale), bit for bit. Throwing default.
  virtual void gated_residual_layer_norm_modulate_fp8(const Tensor& x, const Tensor& gate, const Tensor& y,
                                                      const Tensor& shift, const Tensor& scale, const Tensor& q,
                                                      const Tensor& q_scale);

  // y += alpha * x in float32 math (the sampler's Euler step on latents); rows, dtypes may differ.
  virtual void axpy(const Tensor& y, float alpha, const Tensor& x);

  // LoRA support. These have throwing defaults only while a backend is being brought up; every shipped backend
  // overrides them.
  // dst = src, same shape and dtype; contiguous tensors, or rows views ([B, N, C] / [B, C]) on both sides.
  virtual void copy(const Tensor& src, const Tensor& dst);
  // out = base + alpha * up @ down: base, out [M, K] contiguous (may alias); up [M, R]; down [R, K] (merging a LoRA).
  virtual void add_matmul(const Tensor& base, const Tensor& up, const Tensor& down, const Tensor& out, float alpha);
  // FP8 (e4m3, one float32 scale per row). Throwing defaults for backends without it.
  // q[r] = e4m3(x[r] / scale[r]) with scale[r] = max|x[r]| / 448: x a 2-D view with contiguous rows in the compute
  // dtype, q F8_E4M3 [rows, cols] (row stride >= cols), scale F32 [rows]. Quantises weights per output feature.
  virtual void quantize_fp8_rows(const Tensor& x, const Tensor& q, const Tensor& scale);
  // quantize_fp8_rows of rows made of two parts side by side, [a | b]: a8 F8_E4M3 [rows, Ca] (row stride >= Ca)
  // with a_scale F32 [rows] (its values a8 * a_scale, each product rounded to float32), b rows [B, N, Cb] in the
  // compute dtype (B * N = rows, evenly strided); q F8_E4M3 [rows, Ca + Cb] (row stride >= Ca + Cb), scale F32
  // [rows]. A single block's linear2 input: the attention output as attention_fp8_rows left it, beside the MLP's.
  virtual void quantize_fp8_rows_joined(const Tensor& a8, const Tensor& a_scale, const Tensor& b, const Tensor& q,
                                        const Tensor& scale);
  // y = act(fp8(x) wq^T * (x's row scales outer w_scale) + bias): x rows as for linear(), quantised per row on the
  // fly; wq F8_E4M3 [Nout, K] (row stride >= K), w_scale F32 [Nout].
  virtual void linear_fp8(const Tensor& x, const Tensor& wq, const Tensor& w_scale, const Tensor& bias,
                          const Tensor& y, Activation act);
  // The activation quantiser of an FP8 linear fused into the LayerNorm that feeds it (saves a pass over the rows):
  // layer_norm_modulate, its y rounded to the compute dtype, then quantize_fp8_rows of y, bit for bit. q F8_E4M3
  // [B, N, C] (or [rows, C] for 2-D x) with contiguous rows, row and batch strides multiples of 16 (FP8 GEMM
  // operands); q_scale F32 [B * N] contiguous, row (b, n) at b * N + n.
  virtual void layer_norm_modulate_fp8(const Tensor& x, const Tensor& shift, const Tensor& scale, const Tensor& q,
                                       const Tensor& q_scale);
  // linear_fp8 of an activation quantised already (xq, x_scale as layer_norm_modulate_fp8 writes them; xq [B, N, K]
  // or [rows, K] with y's rows): the same product, without quantising.
  virtual void linear_fp8_quantized(const Tensor& xq, const Tensor& x_scale, const Tensor& wq, const Tensor& w_scale,
                                    const Tensor& bias, const Tensor& y, Activation act);
  // A block's gated residual update through its FP8 output projection: x += gate[b] * (fp8(in) wq^T * scales + bias),
  // the input quantised already (xq, x_scale as for linear_fp8_quantized) or bf16 rows quantised per row here
  // (linear_fp8_residual). x rows [B, N, nout] (the residual stream, updated in place), gate [B, nout] as
  // gated_residual takes it; branch has x's shape and is scratch. A backend may fold the gate into the GEMM's
  // output-channel scales and read x as its accumulator input, so x is rounded once (the branch is not rounded to
  // the compute dtype first): within rounding of the composition, not bit for bit. The default is the composition:
  // linear_fp8_quantized / linear_fp8 into branch, then gated_residual(x, gate, branch).
  // `ready` may hold the gate's factors made already by gated_output_factors for this gate, weight and bias (the
  // transformer makes a whole step's at once); otherwise (undefined tensors) the op makes its own.
  struct GatedFactors {
    Tensor gate;           // [B, n] as gated_residual takes it
    Tensor w_scale, bias;  // F32 [n], the FP8 weight's row scales; [n] in the compute dtype, or undefined
    Tensor scale;          // F32 [B, n] contiguous: gate[b, o] * w_scale[o]
    Tensor bias_out;       // [B, n] contiguous, compute dtype: gate[b, o] * bias[o] rounded (undefined without bias)
  };
  virtual void linear_fp8_quantized_residual(const Tensor& xq, const Tensor& x_scale, const Tensor& wq,
                                             const Tensor& w_scale, const Tensor& bias, const Tensor& gate,
                                             const Tensor& x, const Tensor& branch, const GatedFactors& ready);
  virtual void linear_fp8_residual(const Tensor& in, const Tensor& wq, const Tensor& w_scale, const Tensor& bias,
                                   const Tensor& gate, const Tensor& x, const Tensor& branch,
                                   const GatedFactors& ready);
  // Whether the ones above do better than their composition (the transformer then calls them; otherwise it leaves the
  // branch for the next fused LayerNorm to add). bf16 projections have no such form: cuBLASLt on Hopper takes no
  // per-row alpha vector for bf16 GEMMs (it refused every shape), so the gate cannot be folded into their product.
  virtual bool fp8_residual_in_gemm() const { return false; }
  // Every item's scale and bias_out from its gate, w_scale and bias, in a few launches on a backend that batches (a step's
  // factors, after its modulations). Throwing default: only backends with an fp8_residual_in_gemm form are asked.
  virtual void gated_output_factors(const std::vector<GatedFactors>& items);
  // Many FP8 linears of one per-sample input (the blocks' modulation linears): for each item,
  // linear_fp8(x, wq, w_scale, bias, y, Activation::None), with the same results bit for bit. x [B, K] with
  // contiguous rows; each item's wq F8_E4M3 [nout, K] (row stride >= K), w_scale F32 [nout], bias [nout] or undefined,
  // y a [B, nout] view with contiguous rows (any row stride). A backend may run them all in one launch; the CUDA
  // backend keeps each distinct item list it has seen on the device, so a list must be issued once outside a
  // recording before record() can capture it. The default calls linear_fp8 per item.
  struct Fp8LinearItem {
    Tensor wq, w_scale, bias, y;
  };
  virtual void linear_fp8_batch(const Tensor& x, const std::vector<Fp8LinearItem>& items);
  // Hopper's faster FP8 accumulation (partial sums not promoted to float32 as often). Off by default.
  virtual void set_fp8_fast_accumulation(bool) {}
  // y = act(y + (x down^T) up^T): a runtime LoRA branch (bf16) added onto an output computed already (FP8 linears).
  // down [R, K], up [Nout, R] with contiguous rows; scratch rows [B, N, >= R].
  virtual void add_lora_branch(const Tensor& x, const Tensor& down, const Tensor& up, const Tensor& scratch,
                               const Tensor& y, Activation act);
  // t = 0 (contiguous, or a 2-D view with contiguous rows).
  virtual void zero(const Tensor& t);
  // dst = alpha * src for many pairs of same-shape, same-dtype 2-D views with contiguous rows (filling runtime LoRA
  // slots); the default copies one by one.
  struct ScaledCopy {
    Tensor src, dst;
    float alpha = 1.0f;
  };
  virtual void scaled_copy_batch(const std::vector<ScaledCopy>& copies);
  // Makes room for scaled_copy_batch lists of up to n copies now, so that later calls allocate nothing.
  virtual void reserve_scaled_copies(size_t n) { (void)n; }
  // y = act(x @ w^T + bias + (x @ down^T) @ up^T): a linear with a runtime LoRA slot. down [R, K] and up [Nout, R]
  // contiguous (up may be a row range of a taller slot); scratch rows [B, N, >= R] receive x @ down^T.
  virtual void lora_linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& down, const Tensor& up,
                           const Tensor& scratch, const Tensor& y, Activation act);

  // Text encoders (CLIP-L, T5). Throwing defaults until each backend implements them.
  // y = LayerNorm(x, eps) * weight + bias; x, y rows.
  virtual void layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, const Tensor& y);
  // y = x / sqrt(mean(x^2) + eps) * weight (T5's norm: no mean subtraction, no bias); x, y rows.
  virtual void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& y);
  // out[b, s] = table[ids[b, s]] (+ positions[s] when defined). ids I32 [B, S]; table [V, C]; positions [>=S, C];
  // out rows [B, S, C].
  virtual void embedding(const Tensor& ids, const Tensor& table, const Tensor& positions, const Tensor& out);
  // Rows [B, S, H*D] -> contiguous [B, H, S, D].
  virtual void split_heads(const Tensor& x, const Tensor& out);
  // out = softmax(scale * q k^T + bias [+ causal mask]) v per batch and head; bias float32 [H, S, S] or
  // undefined; out rows [B, S, H*D]. (T5: scale 1 with its relative position bias; CLIP: causal.)
  virtual void attention_ex(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& bias,
                            bool causal, const Tensor& out);
  // y = act(x) elementwise; x, y rows.
  virtual void activation(const Tensor& x, Activation act, const Tensor& y);
  // y *= x elementwise; x, y rows (T5's gated GELU).
  virtual void mul(const Tensor& y, const Tensor& x);

  // VAE decoder, NCHW contiguous tensors. Throwing defaults until each backend implements them.
  // y = conv2d(x, w) + bias, stride 1, zero padding `pad`; x [B, Cin, H, W], w [Cout, Cin, kh, kw].
  virtual void conv2d(const Tensor& x, const Tensor& w, const Tensor& bias, int pad, const Tensor& y);
  // GroupNorm over (C / groups, H, W) per sample, affine weight/bias [C], then SiLU when `silu`.
  virtual void group_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, int groups, float eps, bool silu,
                          const Tensor& y);
  // y [B, C, 2H, 2W] = nearest-neighbour upsampling of x [B, C, H, W].
  virtual void upsample_nearest2x(const Tensor& x, const Tensor& y);
  // y [B, N, C] = x [B, C, N] transposed (and back): the VAE's attention works on token rows.
  virtual void transpose_last2(const Tensor& x, const Tensor& y);

  // The FLUX pipeline's decode tail, so that only the 8-bit image leaves the device. The defaults are the float32
  // host reference (cpu_image_ops.cpp): the CPU backend runs them as they are, and they refuse device tensors.
  // out [B, C, h, w] = unpacked packed [B, (h/2)(w/2), 4C] / scaling + shift, contiguous, compute dtype: packed
  // channel c*4 + dy*2 + dx of token i*(w/2) + j is latent pixel (c, 2i + dy, 2j + dx) (FluxPipeline._unpack_latents,
  // then the VAE's unscaling).
  virtual void unpack_unscale_latents(const Tensor& packed, float scaling, float shift, const Tensor& out);
  // out U8 [B, H, W, C] = round_half_even(clamp(x / 2 + 0.5, 0, 1) * 255) of image [B, C, H, W] (contiguous, compute
  // dtype), a NaN giving 0: diffusers' postprocess then numpy_to_pil.
  virtual void image_to_u8(const Tensor& image, const Tensor& out);
  // Raw device -> host copy of a contiguous tensor into a contiguous host tensor of the same dtype and shape. Does not
  // synchronise: host_dst may be read once synchronize() has returned (pinned memory from host_buffer_allocator()
  // makes the copy asynchronous; into other memory it may complete before the call returns).
  virtual void copy_to_host(const Tensor& src, const Tensor& host_dst);

  // A device memory budget, so a smaller card can be emulated honestly on a larger one: an allocation that would
  // take memory_in_use() past `bytes` throws Error naming the budget, the request, what is in use and the op.
  // 0: no limit. The CPU backend accepts and ignores it: its "device" is host memory, which it does not count.
  virtual void set_memory_limit(uint64_t bytes) { (void)bytes; }
  virtual uint64_t memory_limit() const { return 0; }
  // Memory in use on the whole device as the driver reports it (CUDA: cudaMemGetInfo total - free): this backend's
  // allocations plus the CUDA context, library workspaces and any other process. 0 on the CPU.
  virtual size_t device_memory_used() const { return 0; }
  // Starts peak_memory() again from memory_in_use(), to measure one phase's peak.
  virtual void reset_peak_memory() {}
  // Frees scratch the backend keeps between ops for speed (the convolutions' arena, up to ~1 GB at 1024x1024), so
  // that under a budget the VAE's phase does not leave it to the next image's encode. Grown again on next use.
  virtual void release_scratch() {}

  // Weight streaming (memory plans that keep only some transformer blocks on the device): host -> device copies on
  // a second queue, overlapping the compute queue. stream_upload copies host_src (pinned, from
  // host_buffer_allocator()) into device_dst (same byte size, contiguous) once all work issued so far on the compute
  // queue is done (the destination buffer is then free), and signals `buffer` (0 .. kStreamBuffers - 1) when done;
  // wait_stream_upload(buffer) makes later compute work wait for the last upload signalled on it. Both may be
  // recorded (record()): every upload must be waited for before the recording ends. The default copies at once.
  // Step gates, for work that runs under the next step (a runtime LoRA swap: LoraController::swap_under_next_step).
  // Compute work issued after wait_gate(g) starts only once gate g is open in the current round. close_gates() (on
  // the compute queue) starts a round with every gate shut; open_gate(g) opens one once the work issued before it on
  // the current queue is done. Until a round is started, every gate is open. wait_gate may be recorded (the point of
  // it: a recorded step waits per block); prepare_gates(n) allocates gates 0 .. n-1 first (outside recordings).
  // The side queue: fork_side_queue() makes it wait for the compute work issued so far, on_side_queue(fn) issues the
  // ops fn issues there, join_side_queue() makes later compute work wait for everything issued there. Defaults, for
  // synchronous backends (has_gates() false): no gates, fn runs in place — a caller swaps before the step instead.
  virtual bool has_gates() const { return false; }
  virtual void prepare_gates(int count) { (void)count; }
  virtual void wait_gate(int gate) { (void)gate; }
  virtual void close_gates() {}
  virtual void open_gate(int gate) { (void)gate; }
  virtual void fork_side_queue() {}
  virtual void on_side_queue(const std::function<void()>& fn) { fn(); }
  virtual void join_side_queue() {}
  // The last round's device times (ms after its close_gates ran on the device), per gate: when it opened (-1: opened
  // before the round, or never) and when the compute queue last passed it (-1: not since); and when the round was
  // closed on the device, on the host's steady clock (to within a synchronisation's latency). For the benchmark's
  // account of a swap under the step; synchronises. No gates on backends without them.
  struct GateTimes {
    double opened_ms = -1, passed_ms = -1;
  };
  struct GateTimeline {
    std::vector<GateTimes> gates;
    std::chrono::steady_clock::time_point closed_at;
  };
  virtual GateTimeline gate_timeline() { return {}; }

  static constexpr int kStreamBuffers = 4;
  virtual void stream_upload(const Tensor& host_src, const Tensor& device_dst, int buffer);
  virtual void wait_stream_upload(int buffer) { (void)buffer; }

  // NF4 weights kept on the device (quant/nf4.h, bitsandbytes' layout with the standard NF4 map, float32 absmax):
  // out (contiguous [rows, cols], compute dtype) = kNf4Code[code of element i] * absmax[i / blocksize], element i
  // of the row-major matrix in the nibbles of packed (U8 [(rows * cols + 1) / 2], the earlier element high). A linear
  // then runs on `out`. The default is the host reference (CPU tensors only).
  virtual void dequantize_nf4(const Tensor& packed, const Tensor& absmax, int64_t blocksize, const Tensor& out);
};

// The CPU reference. With residual_in_gemm it takes the fused form of the FP8 residual projections as the CUDA backend
// does (the gate folded into the weight scales and into the bias, the product added onto x; float32 here), so a
// transformer on it follows the GPU's path: the reference of that path's plumbing.
std::unique_ptr<Backend> make_cpu_backend(bool residual_in_gemm = false);
// Throws Error when this build has no CUDA backend or no GPU is present.
std::unique_ptr<Backend> make_cuda_backend(int device_index = 0);
// "cpu", "cuda", or "auto": the GPU when one is usable, else the CPU (saying so on stdout).
std::unique_ptr<Backend> make_backend(const std::string& name);

}  // namespace fluxswap
