// Argument checks of eagle_fast::fused_preprocess shared by the CPU and CUDA kernels (host code
// only: ATen types). Each kernel adds its own: device placement, and on CUDA the launch limits
// (batch as grid.y, sizes that index in 32 bits) and contiguity.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

namespace eagle_fast::preprocess {

// One decoded image: uint8 (H, W, 3) with H, W >= 1. i is its index in the batch.
inline void check_image(const at::Tensor& im, size_t i) {
  constexpr const char* op = "fused_preprocess";
  TORCH_CHECK(im.scalar_type() == at::kByte, op, ": image ", i, " has dtype ", im.scalar_type(), ", expected uint8");
  TORCH_CHECK(im.dim() == 3 && im.size(2) == 3, op, ": image ", i, " has shape ", im.sizes(), ", expected (H, W, 3)");
  TORCH_CHECK(im.size(0) >= 1 && im.size(1) >= 1, op, ": image ", i, " is empty (shape ", im.sizes(), ")");
}

// Everything but the devices: at least one image, each one valid, an output dtype the kernels
// write, RGB fill (bytes) / mean / std, and sizes the op's schema allows (a skipped output has size
// 0; the Pix2Struct patch side only matters when patches are asked for).
inline void check_arguments(at::TensorList images, int64_t canvas_size, at::IntArrayRef fill, at::ArrayRef<double> mean,
                            at::ArrayRef<double> std, int64_t clip_size, int64_t p2s_max_patches, int64_t p2s_patch,
                            at::ScalarType dtype) {
  constexpr const char* op = "fused_preprocess";
  TORCH_CHECK(!images.empty(), op, ": no images given");
  for (size_t i = 0; i < images.size(); ++i) check_image(images[i], i);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, ": dtype ", dtype,
              " unsupported, use float32 or bfloat16");
  TORCH_CHECK(fill.size() == 3 && mean.size() == 3 && std.size() == 3, op,
              ": fill, mean and std need 3 values (RGB), got ", fill.size(), ", ", mean.size(), " and ", std.size());
  for (const int64_t v : fill) TORCH_CHECK(v >= 0 && v <= 255, op, ": fill value ", v, " not in 0..255");
  TORCH_CHECK(canvas_size >= 1 && clip_size >= 0 && p2s_max_patches >= 0 && (p2s_max_patches == 0 || p2s_patch >= 1),
              op, ": bad sizes (canvas ", canvas_size, ", clip ", clip_size, ", max_patches ", p2s_max_patches,
              ", patch ", p2s_patch,
              "): need canvas >= 1, clip >= 0, max_patches >= 0, and patch >= 1 when "
              "max_patches > 0");
}

}  // namespace eagle_fast::preprocess
