#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/error.h"

namespace fluxswap {

std::string shape_str(const Shape& s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ']';
  return o.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t acc = 1;
  for (int i = int(shape.size()) - 1; i >= 0; --i) {
    st[i] = acc;
    acc *= shape[i];
  }
  return st;
}

Tensor Tensor::empty(DType dtype, Shape shape) {
  for (int64_t d : shape)
    if (d < 0) throw Error("Tensor::empty: negative dimension in shape " + shape_str(shape));
  size_t bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
  // 64-byte alignment keeps BLAS and vector loads on their fast paths.
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  if (!p) throw Error("out of host memory allocating " + std::to_string(bytes) + " bytes");
  std::shared_ptr<void> owner(p, [](void* q) { std::free(q); });
  return borrow(p, dtype, std::move(shape), Device::CPU, std::move(owner));
}

Tensor Tensor::zeros(DType dtype, Shape shape) {
  Tensor t = empty(dtype, std::move(shape));
  std::memset(t.data(), 0, t.nbytes());
  return t;
}

Tensor Tensor::borrow(void* data, DType dtype, Shape shape, Device device, std::shared_ptr<void> owner) {
  Tensor t;
  t.data_ = data;
  t.dtype_ = dtype;
  t.device_ = device;
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  t.owner_ = std::move(owner);
  return t;
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_); }

Tensor Tensor::view(Shape shape) const {
  if (!is_contiguous()) throw Error("Tensor::view needs a contiguous tensor, got shape " + shape_str(shape_));
  if (shape_numel(shape) != numel())
    throw Error("Tensor::view: cannot view " + shape_str(shape_) + " as " + shape_str(shape));
  return borrow(data_, dtype_, std::move(shape), device_, owner_);
}

Tensor Tensor::narrow(int dim, int64_t start, int64_t length) const {
  if (dim < 0) dim += ndim();
  if (dim < 0 || dim >= ndim() || start < 0 || length < 0 || start + length > shape_[dim])
    throw Error("Tensor::narrow(" + std::to_string(dim) + ", " + std::to_string(start) + ", " +
                std::to_string(length) + ") out of range for shape " + shape_str(shape_));
  Tensor t = *this;
  t.data_ = static_cast<char*>(data_) + start * strides_[dim] * int64_t(dtype_size(dtype_));
  t.shape_[dim] = length;
  return t;
}

Tensor Tensor::select(int dim, int64_t index) const {
  if (dim < 0) dim += ndim();
  Tensor t = narrow(dim, index, 1);
  t.shape_.erase(t.shape_.begin() + dim);
  t.strides_.erase(t.strides_.begin() + dim);
  return t;
}

Tensor Tensor::to_f32() const {
  if (device_ != Device::CPU) throw Error("Tensor::to_f32 reads host tensors only");
  Tensor out = empty(DType::F32, shape_);
  if (is_contiguous()) {
    convert_to_f32(dtype_, data_, out.ptr<float>(), size_t(numel()));
    return out;
  }
  // Walk the strided index space one innermost row at a time.
  const int nd = ndim();
  const int64_t inner = nd ? shape_[nd - 1] : 1;
  const int64_t rows = inner ? numel() / inner : 0;
    std::vector<int64_t> idx(size_t(nd), 0);
  const size_t es = dtype_size(dtype_);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t off = 0;
    for (int d = 0; d + 1 < nd; ++d) off += idx[d] * strides_[d];
    const char* base = static_cast<const char*>(data_) + off * int64_t(es);
    float* dst = out.ptr<float>() + r * inner;
    for (int64_t i = 0; i < inner; ++i)
      convert_to_f32(dtype_, base + i * strides_[nd - 1] * int64_t(es), dst + i, 1);
    for (int d = nd - 2; d >= 0; --d) {
      if (++idx[d] < shape_[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

}  // namespace fluxswap
