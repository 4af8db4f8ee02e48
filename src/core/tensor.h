#pragma once
// A small strided tensor: dtype, shape, strides (in elements), device, and an owner that keeps the memory alive
// (null when the tensor borrows memory someone else owns, e.g. an mmapped safetensors file).
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace fluxswap {

enum class Device : uint8_t { CPU, CUDA };

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;

  // New contiguous host memory (uninitialised).
  static Tensor empty(DType dtype, Shape shape);
  static Tensor zeros(DType dtype, Shape shape);
  // A contiguous view of memory owned elsewhere; `owner` (may be null) keeps it alive.
  static Tensor borrow(void* data, DType dtype, Shape shape, Device device = Device::CPU,
                       std::shared_ptr<void> owner = nullptr);

  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int ndim() const { return int(shape_.size()); }
  int64_t size(int d) const { return shape_[d < 0 ? d + ndim() : d]; }
  int64_t stride(int d) const { return strides_[d < 0 ? d + ndim() : d]; }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  bool defined() const { return data_ != nullptr; }
  bool is_contiguous() const;

  void* data() const { return data_; }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data_); }
  const std::shared_ptr<void>& owner() const { return owner_; }

  // Views share memory with this tensor.
  Tensor view(Shape shape) const;                             // needs a contiguous tensor
  Tensor narrow(int dim, int64_t start, int64_t length) const;  // a sub-range of one dimension
  Tensor select(int dim, int64_t index) const;                // drops dimension `dim`

  // Copies into new contiguous host float32 memory (CPU tensors only; any float dtype, any strides).
  Tensor to_f32() const;

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
  Shape shape_;
  Shape strides_;
  std::shared_ptr<void> owner_;
};

Shape contiguous_strides(const Shape& shape);

}  // namespace fluxswap
