#include "common/stable_tensor.h"

#include <sstream>

namespace qgoft::stable {

std::vector<int64_t> sizes_of(const Tensor& t) {
  const auto s = t.sizes();
  return std::vector<int64_t>(s.begin(), s.end());
}

std::string device_name(const torch::stable::Device& device) {
  std::ostringstream name;  // (no std::string operator+: GCC 12 warns falsely about it at -O3)
  switch (device.type()) {
    case torch::headeronly::DeviceType::CPU: return "cpu";
    case torch::headeronly::DeviceType::Meta: return "meta";
    case torch::headeronly::DeviceType::CUDA: name << "cuda"; break;
    default: name << "device type " << static_cast<int>(device.type()); break;
  }
  if (device.index() >= 0) name << ':' << static_cast<int>(device.index());
  return name.str();
}

TensorMeta meta_of(const Tensor& t) {
  TensorMeta m;
  m.dtype = t.scalar_type();
  m.sizes = sizes_of(t);
  m.device = device_name(t.device());
  return m;
}

Tensor empty_on(const Tensor& t, std::vector<int64_t> sizes, ScalarType dtype) {
  return torch::stable::empty(sizes, dtype, std::nullopt, t.device());
}

Tensor zeros_on(const Tensor& t, std::vector<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_zeros(t, sizes, dtype);
}

Tensor as_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

Tensor contiguous_as(const Tensor& t, ScalarType dtype) {
  Tensor c = as_dtype(t, dtype);
  return c.is_contiguous() ? c : torch::stable::contiguous(c);
}

Tensor rows_view(const Tensor& x, int64_t d) {
  const std::vector<int64_t> sizes = sizes_of(x);
  Tensor x2 = x;
  if (!(x.dim() == 2 && sizes[1] == d)) x2 = torch::stable::reshape(x, {num_rows(sizes), d});
  return rows_need_copy(d, x2.stride(1), x2.is_contiguous()) ? torch::stable::contiguous(x2) : x2;
}

}  // namespace qgoft::stable
