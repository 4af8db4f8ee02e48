#include "model/component_weights.h"

#include <filesystem>

#include "core/error.h"
#include "quant/nf4.h"

namespace fluxswap {

namespace fsys = std::filesystem;

namespace {

// "a", "a or b", "a, b or c".
std::string or_list(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += i + 1 == names.size() ? " or " : ", ";
    out += names[i];
  }
  return out;
}

std::string in_context(const std::string& context) { return context.empty() ? std::string() : " (" + context + ")"; }

// The tensor under `key`, float and, when `shape` is given, of that shape.
Tensor lookup(const SafetensorsCollection& file, const std::string& key, const Shape* shape,
              const std::string& context) {
  if (!file.contains(key)) throw Error(file.path() + ": tensor '" + key + "' is missing" + in_context(context));
  Tensor t = file.tensor(key);
  if (!dtype_is_float(t.dtype()) || (shape && t.shape() != *shape))
    throw Error(file.path() + ": tensor '" + key + "' is " + std::string(dtype_name(t.dtype())) + " " +
                shape_str(t.shape()) + ", expected a float tensor" +
                (shape ? " of shape " + shape_str(*shape) : std::string()) + in_context(context));
  return t;
}

}  // namespace

std::string weights_in_folder(const std::string& dir, const std::vector<std::string>& names,
                              bool or_only_safetensors) {
  const fsys::path d(dir);
  for (const std::string& name : names)
    if (fsys::exists(d / name)) return (d / name).string();
  std::string others;
  if (or_only_safetensors) {
    std::vector<fsys::path> found;
    for (auto& e : fsys::directory_iterator(d))
      if (e.path().extension() == ".safetensors") found.push_back(e.path());
    if (found.size() == 1) return found[0].string();
    others = found.empty() ? ", nor any other .safetensors file" : ", and several other .safetensors files: name one";
  }
  throw Error(dir + ": no " + or_list(names) + " in this folder" + others);
}

Tensor float_tensor(const SafetensorsCollection& file, const std::string& key, const std::string& context) {
  return lookup(file, key, nullptr, context);
}

Tensor checked_tensor(const SafetensorsCollection& file, const std::string& key, const Shape& shape,
                      const std::string& context) {
  return lookup(file, key, &shape, context);
}

Tensor stack_on_host(const SafetensorsCollection& file, const std::vector<std::string>& keys, const Shape& part,
                     DType dtype) {
  Shape shape = part;
  shape[0] *= int64_t(keys.size());
  Tensor host = Tensor::empty(dtype, shape);
  const size_t part_elems = size_t(shape_numel(part)), part_bytes = part_elems * dtype_size(host.dtype());
  for (size_t i = 0; i < keys.size(); ++i) {
    const Tensor src = checked_tensor(file, keys[i], part);
    convert(src.dtype(), src.data(), host.dtype(), static_cast<char*>(host.data()) + i * part_bytes, part_elems);
  }
  return host;
}

Tensor load_stacked(const SafetensorsCollection& file, const std::vector<std::string>& keys, const Shape& part,
                    Backend& backend) {
  return backend.upload_weight(stack_on_host(file, keys, part, backend.compute_dtype()));
}

Nf4Weight upload_nf4(const Tensor& host, Backend& backend) {
  const Tensor f = host.to_f32();
  const Nf4Tensor q = quantize_nf4_parallel(f.ptr<float>(), f.numel(), kNf4WeightBlocksize);
  Nf4Weight w;
  w.packed = backend.empty(DType::U8, q.packed.shape());
  w.absmax = backend.empty(DType::F32, q.absmax.shape());
  backend.copy_from_host(q.packed, w.packed);
  backend.copy_from_host(q.absmax, w.absmax);  // from pageable memory: the source may go once this returns
  return w;
}

}  // namespace fluxswap
