// Argument checks of eagle_fast::linear_cross_entropy shared by the CPU and CUDA kernels (host
// code only: ATen types). Each kernel adds its own device check.
#pragma once

#include <ATen/ATen.h>

namespace eagle_fast::loss {

// hidden (n, H), weight (V, H) of hidden's float dtype, labels (n,) int64/int32.
inline void check_shapes_and_dtypes(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels) {
  constexpr const char* op = "linear_cross_entropy";
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be (n, H), got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), op,
              ": weight must be (V, H) with H = ", hidden.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), op,
              ": labels must be (n,) with n = ", hidden.size(0), ", got shape ", labels.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": hidden has dtype ", dt, " (float32, float64, bfloat16, float16 supported)");
  TORCH_CHECK(weight.scalar_type() == dt, op, ": weight has dtype ", weight.scalar_type(), ", hidden has ", dt);
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
}

}  // namespace eagle_fast::loss
