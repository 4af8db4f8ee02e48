#include "model/flux_transformer_io.h"

#include "core/error.h"

namespace fluxswap {

namespace {

Tensor need(const SafetensorsFile& f, const std::string& key, size_t ndim) {
  if (!f.contains(key)) throw Error(f.path() + ": input tensor '" + key + "' is missing");
  Tensor t = f.tensor(key);
  if (!dtype_is_float(t.dtype()))
    throw Error(f.path() + ": input tensor '" + key + "' has dtype " + std::string(dtype_name(t.dtype())) +
                ", expected a float type");
  if (size_t(t.ndim()) != ndim)
    throw Error(f.path() + ": input tensor '" + key + "' has shape " + shape_str(t.shape()) + ", expected " +
                std::to_string(ndim) + " dimensions");
  return t.to_f32();
}

Tensor ids(const SafetensorsFile& f, const std::string& key) {
  if (!f.contains(key)) throw Error(f.path() + ": input tensor '" + key + "' is missing");
  Tensor t = f.tensor(key).to_f32();
  if (t.ndim() == 3) t = t.select(0, 0).to_f32();
  if (t.ndim() != 2 || t.size(1) != 3)
    throw Error(f.path() + ": '" + key + "' has shape " + shape_str(t.shape()) + ", expected [N, 3]");
  return t;
}

}  // namespace

FluxHostInputs read_flux_inputs(const SafetensorsFile& f) {
  FluxHostInputs in;
  in.hidden_states = need(f, "in.hidden_states", 3);
  in.encoder_hidden_states = need(f, "in.encoder_hidden_states", 3);
  in.pooled_projections = need(f, "in.pooled_projections", 2);
  in.timestep = need(f, "in.timestep", 1);
  if (f.contains("in.guidance")) in.guidance = need(f, "in.guidance", 1);
  in.img_ids = ids(f, "in.img_ids");
  in.txt_ids = ids(f, "in.txt_ids");
  const int64_t B = in.hidden_states.size(0);
  auto check = [&](bool ok, const std::string& what) {
    if (!ok) throw Error(f.path() + ": " + what);
  };
  check(in.encoder_hidden_states.size(0) == B && in.pooled_projections.size(0) == B && in.timestep.size(0) == B,
        "batch sizes of in.hidden_states, in.encoder_hidden_states, in.pooled_projections and in.timestep differ");
  check(!in.guidance.data() || in.guidance.size(0) == B, "in.guidance has a different batch size");
  check(in.img_ids.size(0) == in.hidden_states.size(1), "in.img_ids has " + std::to_string(in.img_ids.size(0)) +
                                                             " rows, expected one per image token (" +
                                                             std::to_string(in.hidden_states.size(1)) + ")");
  check(in.txt_ids.size(0) == in.encoder_hidden_states.size(1),
        "in.txt_ids has " + std::to_string(in.txt_ids.size(0)) + " rows, expected one per text token (" +
            std::to_string(in.encoder_hidden_states.size(1)) + ")");
  return in;
}

Tensor run_flux_transformer(FluxTransformer& tr, const FluxHostInputs& h) {
  Backend& be = tr.backend();
  const DType dt = be.compute_dtype();
  auto up = [&](const Tensor& host, DType type) {
    Tensor d = be.empty(type, host.shape());
    be.copy_from_host(host, d);
    return d;
  };
  FluxInputs in;
  in.hidden_states = up(h.hidden_states, dt);
  in.encoder_hidden_states = up(h.encoder_hidden_states, dt);
  in.pooled_projections = up(h.pooled_projections, dt);
  in.timestep = up(h.timestep, DType::F32);
  if (h.guidance.data()) in.guidance = up(h.guidance, DType::F32);
  in.rope = up(flux_rope_table(tr.config(), h.txt_ids, h.img_ids), DType::F32);
  Tensor out = be.empty(dt, {h.hidden_states.size(0), h.hidden_states.size(1), tr.config().out_channels()});
  tr.forward(in, out);
  return be.to_host_f32(out);
}

}  // namespace fluxswap
