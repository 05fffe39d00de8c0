// Shared maths of eagle_fast::fused_preprocess, used by the CPU kernel and the CUDA kernel.
//
// The canvas resize reproduces Pillow's Image.resize(BICUBIC) on 8-bit RGB images exactly:
// separable, horizontal pass first, coefficients computed in double on the host and quantized
// to 22-bit fixed point, integer accumulation, rounding + clipping to uint8 after each pass.
// The per-element functions are __host__ __device__ so the CPU tests exercise the arithmetic
// the GPU runs. Coefficient tables are host-only (computed once per (in, out) size pair).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/host_device.h"

namespace eagle_fast::preprocess {

// Pillow: PRECISION_BITS = 32 - 8 - 2 (8 bits of pixel, 2 of headroom for negative lobes).
constexpr int kPrecisionBits = 22;
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);

// Pillow's clip8: fixed-point accumulator (already holding the +0.5 rounding term) -> uint8.
EF_HD uint8_t clip8(int32_t ss) {
  if (ss >= (1 << kPrecisionBits << 8)) return 255;
  if (ss <= 0) return 0;
  return static_cast<uint8_t>(ss >> kPrecisionBits);
}

// HF rescale + normalize as the CLIP processor computes it: u * (1/255) in double, cast to
// float32, then (x - mean) / std in float32. Bit-exact with transformers' numpy path.
EF_HD float clip_normalize(uint8_t u, float mean, float std) {
  const float r = static_cast<float>(static_cast<double>(u) * (1.0 / 255.0));
  return (r - mean) / std;
}

// torch bilinear, align_corners=True: source coordinate of output index `dst`.
// scale = (in - 1) / (out - 1) in float (torch's opmath for fp32). Writes i0, i1, lambda1.
EF_HD void linear_align_corners(int dst, int in_size, float scale, int& i0, int& i1, float& l1) {
  const float src = scale * static_cast<float>(dst);
  i0 = static_cast<int>(src);
  i1 = i0 + ((i0 < in_size - 1) ? 1 : 0);
  l1 = src - static_cast<float>(i0);
}

EF_HD float align_corners_scale(int in_size, int out_size) {
  return out_size > 1 ? static_cast<float>(in_size - 1) / static_cast<float>(out_size - 1) : 0.f;
}

// Where one image lands on the square canvas (Eagle "pad" = PIL expand-to-square, then the HF
// CLIP processor's shortest-edge resize + centre crop; "square" = the processor alone).
// Source coordinates refer to the virtual padded image (pad mode) or the image itself.
struct CanvasPlan {
  int src_h, src_w;          // size of the (virtually padded) source
  int img_top, img_left;     // where the real image sits inside that source (pad mode)
  int resized_h, resized_w;  // size after the shortest-edge resize (before the crop)
  int crop_top, crop_left;   // centre crop offsets into the resized image
};

inline CanvasPlan plan_canvas(int h, int w, int size, bool pad) {
  CanvasPlan p{};
  if (pad) {
    const int side = std::max(h, w);
    p.src_h = p.src_w = side;
    p.img_top = (side - h) / 2;
    p.img_left = (side - w) / 2;
    p.resized_h = p.resized_w = size;
  } else {
    p.src_h = h;
    p.src_w = w;
    // transformers get_resize_output_image_size(default_to_square=False): int(size * long / short)
    const int shorter = std::min(h, w), longer = std::max(h, w);
    const int new_long = static_cast<int>(static_cast<double>(size) * longer / shorter);
    p.resized_h = (w <= h) ? new_long : size;
    p.resized_w = (w <= h) ? size : new_long;
  }
  p.crop_top = (p.resized_h - size) / 2;
  p.crop_left = (p.resized_w - size) / 2;
  return p;
}

// Pix2Struct processor grid: rows x cols patches with rows*cols <= max_patches, aspect kept.
inline void pix2struct_grid(int h, int w, int max_patches, int patch, int& rows, int& cols) {
  const double scale =
      std::sqrt(static_cast<double>(max_patches) * (static_cast<double>(patch) / h) * (static_cast<double>(patch) / w));
  rows = std::max(std::min(static_cast<int>(scale * h / patch), max_patches), 1);
  cols = std::max(std::min(static_cast<int>(scale * w / patch), max_patches), 1);
}

// One 1-D resampling table: output i reads taps [start[i], start[i] + count[i]) with weights
// w[i * ksize + t] (fixed point for Pillow bicubic, float for torch's antialiased bilinear).
template <typename W>
struct Taps {
  int ksize = 0;
  std::vector<int32_t> start, count;
  std::vector<W> w;
};

inline double bicubic_filter(double x) {  // Pillow, a = -0.5
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Pillow precompute_coeffs + normalize_coeffs_8bpc (bicubic, support 2): the same double maths
// in the same order, so the 22-bit fixed-point weights are identical.
inline Taps<int32_t> pil_bicubic_taps(int in_size, int out_size) {
  Taps<int32_t> t;
  const double support_base = 2.0;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = support_base * filterscale;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.start.resize(out_size);
  t.count.resize(out_size);
  t.w.assign(static_cast<size_t>(out_size) * t.ksize, 0);
  std::vector<double> k(t.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      const double v = bicubic_filter((x + xmin - center + 0.5) * ss);
      k[x] = v;
      ww += v;
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? k[x] / ww : k[x];
      const double f = v * (1 << kPrecisionBits);
      t.w[static_cast<size_t>(xx) * t.ksize + x] = static_cast<int32_t>(v < 0 ? -0.5 + f : 0.5 + f);
    }
    t.start[xx] = xmin;
    t.count[xx] = xmax;
  }
  return t;
}

// torch's antialiased bilinear weights (align_corners=False, float input). torch computes them in
// float: at a centre near 1000 the float rounding moves weights by ~1e-4, which shows after the
// Pix2Struct standardization, so the float arithmetic is reproduced here, not Pillow's double.
inline Taps<float> aa_bilinear_taps(int in_size, int out_size) {
  Taps<float> t;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  const float support = scale >= 1.f ? scale : 1.f;
  const float invscale = scale >= 1.f ? 1.f / scale : 1.f;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.start.resize(out_size);
  t.count.resize(out_size);
  t.w.assign(static_cast<size_t>(out_size) * t.ksize, 0.f);
  for (int i = 0; i < out_size; ++i) {
    const float center = static_cast<float>(scale * (i + 0.5));
    const int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    const int xsize = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    float* w = &t.w[static_cast<size_t>(i) * t.ksize];
    float total = 0.f;
    for (int j = 0; j < xsize; ++j) {
      float x = static_cast<float>((j + xmin - center + 0.5) * invscale);
      x = x < 0.f ? -x : x;
      w[j] = x < 1.f ? 1.f - x : 0.f;
      total += w[j];
    }
    if (total != 0.f)
      for (int j = 0; j < xsize; ++j) w[j] /= total;
    t.start[i] = xmin;
    t.count[i] = xsize;
  }
  return t;
}

}  // namespace eagle_fast::preprocess
