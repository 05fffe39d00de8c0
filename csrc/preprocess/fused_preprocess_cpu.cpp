// CPU kernel of eagle_fast::fused_preprocess: uint8 RGB images -> every expert's input.
//
// Per image, three stages over one uint8 canvas (S, S, 3) kept in cache-friendly HWC order:
//   1. Pillow BICUBIC canvas: horizontal pass over only the source rows the vertical taps read
//      (Pillow's "ybox"), then the vertical pass, fused with the CLIP normalization into
//      pixel_values (3, S, S). Pad mode never materializes the padded square.
//   2. CLIP input: bilinear align_corners=True from the normalized canvas, (3, c, c).
//   3. Pix2Struct: exact integer mean/std of the canvas, antialiased bilinear to (rows*p, cols*p),
//      standardized and scattered straight into the flattened patches (P, 2 + p*p*3).
// Rows are split over threads with at::parallel_for; inner loops run over contiguous memory so
// the compiler vectorizes them. The arithmetic lives in fused_preprocess.h, shared with CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstring>

#include "preprocess/fused_preprocess.h"

namespace eagle_fast::preprocess {
namespace {

// Rows of the (virtually padded) source image. In pad mode rows outside the image are the fill
// colour and rows inside get fill on the sides; the scratch row keeps its fill between calls.
struct Source {
  const uint8_t* img;
  int h, w;
  const CanvasPlan& plan;
  std::vector<uint8_t> fill_row;  // src_w * 3

  Source(const uint8_t* img_, int h_, int w_, const CanvasPlan& p, at::IntArrayRef fill)
      : img(img_), h(h_), w(w_), plan(p), fill_row(static_cast<size_t>(p.src_w) * 3) {
    for (int x = 0; x < p.src_w; ++x)
      for (int c = 0; c < 3; ++c) fill_row[x * 3 + c] = static_cast<uint8_t>(fill[c]);
  }
  bool is_fill_row(int y) const { return y < plan.img_top || y >= plan.img_top + h; }
  // `scratch` must start as a copy of fill_row.
  const uint8_t* row(int y, uint8_t* scratch) const {
    if (is_fill_row(y)) return fill_row.data();
    const uint8_t* r = img + static_cast<int64_t>(y - plan.img_top) * w * 3;
    if (w == plan.src_w) return r;
    std::memcpy(scratch + plan.img_left * 3, r, static_cast<size_t>(w) * 3);
    return scratch;
  }
};

// One horizontal Pillow pass over a source row: outputs [first, first + count) of the resized row.
void pil_row_horizontal(const uint8_t* src, uint8_t* out, const Taps<int32_t>& t, int first, int count) {
  for (int x = 0; x < count; ++x) {
    const int xx = first + x;
    const int32_t* k = &t.w[static_cast<size_t>(xx) * t.ksize];
    const uint8_t* s = src + t.start[xx] * 3;
    int32_t s0 = kHalf, s1 = kHalf, s2 = kHalf;
    for (int i = 0; i < t.count[xx]; ++i) {
      s0 += s[i * 3 + 0] * k[i];
      s1 += s[i * 3 + 1] * k[i];
      s2 += s[i * 3 + 2] * k[i];
    }
    out[x * 3 + 0] = clip8(s0);
    out[x * 3 + 1] = clip8(s1);
    out[x * 3 + 2] = clip8(s2);
  }
}

// Vertical Pillow pass for one output row: acc[j] = kHalf + sum_i rows[i][j] * k[i], j over S*3.
void pil_row_vertical(const uint8_t* rows, int64_t stride, const int32_t* k, int n, int width3,
                      int32_t* acc, uint8_t* out) {
  for (int j = 0; j < width3; ++j) acc[j] = kHalf;
  for (int i = 0; i < n; ++i) {
    const uint8_t* r = rows + i * stride;
    const int32_t ki = k[i];
    for (int j = 0; j < width3; ++j) acc[j] += r[j] * ki;
  }
  for (int j = 0; j < width3; ++j) out[j] = clip8(acc[j]);
}

template <typename T>
void normalize_row(const uint8_t* row, int width, const std::array<std::array<float, 256>, 3>& lut,
                   T* out, int64_t plane) {
  for (int c = 0; c < 3; ++c) {
    const float* l = lut[c].data();
    T* o = out + c * plane;
    for (int x = 0; x < width; ++x) o[x] = static_cast<T>(l[row[x * 3 + c]]);
  }
}

// Stage 1: the uint8 canvas (S, S, 3) and the normalized pixel_values (3, S, S).
template <typename T>
void build_canvas(const at::Tensor& image, int S, bool pad, at::IntArrayRef fill,
                  const std::array<std::array<float, 256>, 3>& lut, uint8_t* canvas, T* pixels) {
  const int h = image.size(0), w = image.size(1);
  const CanvasPlan p = plan_canvas(h, w, S, pad);
  Source src(image.data_ptr<uint8_t>(), h, w, p, fill);
  const bool do_h = p.resized_w != p.src_w, do_v = p.resized_h != p.src_h;
  const Taps<int32_t> th = do_h ? pil_bicubic_taps(p.src_w, p.resized_w) : Taps<int32_t>{};
  const Taps<int32_t> tv = do_v ? pil_bicubic_taps(p.src_h, p.resized_h) : Taps<int32_t>{};
  // Source rows that the kept output rows read.
  const int y0 = do_v ? tv.start[p.crop_top] : p.crop_top;
  const int y1 = do_v ? tv.start[p.crop_top + S - 1] + tv.count[p.crop_top + S - 1] : p.crop_top + S;
  const int64_t row3 = static_cast<int64_t>(S) * 3;
  std::vector<uint8_t> temp(static_cast<size_t>(y1 - y0) * row3);  // horizontally resized rows

  // Pad mode: every fill row resamples to the same output row; compute it once.
  std::vector<uint8_t> fill_out;
  if (pad && do_h) {
    fill_out.resize(row3);
    pil_row_horizontal(src.fill_row.data(), fill_out.data(), th, p.crop_left, S);
  }
  at::parallel_for(y0, y1, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> scratch(src.fill_row);
    for (int64_t y = begin; y < end; ++y) {
      uint8_t* out = temp.data() + (y - y0) * row3;
      if (!fill_out.empty() && src.is_fill_row(y)) {
        std::memcpy(out, fill_out.data(), row3);
      } else if (do_h) {
        pil_row_horizontal(src.row(y, scratch.data()), out, th, p.crop_left, S);
      } else {
        std::memcpy(out, src.row(y, scratch.data()) + p.crop_left * 3, row3);
      }
    }
  });
  const int64_t plane = static_cast<int64_t>(S) * S;
  at::parallel_for(0, S, 8, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> acc(row3);
    for (int64_t oy = begin; oy < end; ++oy) {
      uint8_t* crow = canvas + oy * row3;
      if (do_v) {
        const int yy = p.crop_top + oy;
        pil_row_vertical(temp.data() + (tv.start[yy] - y0) * row3, row3,
                         &tv.w[static_cast<size_t>(yy) * tv.ksize], tv.count[yy], row3, acc.data(), crow);
      } else {
        std::memcpy(crow, temp.data() + (p.crop_top + oy - y0) * row3, row3);
      }
      normalize_row(crow, S, lut, pixels + oy * S, plane);
    }
  });
}

// Stage 2: CLIP input (3, c, c), bilinear align_corners=True over the normalized canvas.
template <typename T>
void clip_resize(const uint8_t* canvas, int S, int c_size, const std::array<std::array<float, 256>, 3>& lut,
                 T* out) {
  const float scale = align_corners_scale(S, c_size);
  std::vector<int> x0(c_size), x1(c_size);
  std::vector<float> lx(c_size);
  for (int ox = 0; ox < c_size; ++ox) linear_align_corners(ox, S, scale, x0[ox], x1[ox], lx[ox]);
  const int64_t plane = static_cast<int64_t>(c_size) * c_size;
  at::parallel_for(0, c_size, 16, [&](int64_t begin, int64_t end) {
    for (int64_t oy = begin; oy < end; ++oy) {
      int y0, y1;
      float ly;
      linear_align_corners(oy, S, scale, y0, y1, ly);
      const uint8_t* r0 = canvas + static_cast<int64_t>(y0) * S * 3;
      const uint8_t* r1 = canvas + static_cast<int64_t>(y1) * S * 3;
      for (int c = 0; c < 3; ++c) {
        const float* l = lut[c].data();
        T* o = out + c * plane + oy * c_size;
        for (int ox = 0; ox < c_size; ++ox) {
          const float w1 = lx[ox], w0 = 1.f - w1;
          const float top = w0 * l[r0[x0[ox] * 3 + c]] + w1 * l[r0[x1[ox] * 3 + c]];
          const float bot = w0 * l[r1[x0[ox] * 3 + c]] + w1 * l[r1[x1[ox] * 3 + c]];
          o[ox] = static_cast<T>((1.f - ly) * top + ly * bot);
        }
      }
    }
  });
}

// Stage 3: Pix2Struct flattened patches (P, 2 + p*p*3) and mask (P,).
template <typename T>
void pix2struct_patches(const uint8_t* canvas, int S, int P, int p, T* patches, T* mask) {
  int rows, cols;
  pix2struct_grid(S, S, P, p, rows, cols);
  const int OH = rows * p, OW = cols * p, D = 2 + p * p * 3;
  const int64_t n = static_cast<int64_t>(S) * S * 3;
  // Exact integer moments: mean and population std as numpy computes on the 0..255 canvas.
  std::atomic<int64_t> sum{0}, sumsq{0};
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    int64_t s = 0, q = 0;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t v = canvas[i];
      s += v;
      q += v * v;
    }
    sum += s;
    sumsq += q;
  });
  const double mean = static_cast<double>(sum) / n;
  // n * sumsq overflows int64 past a 2048 canvas: exact in 128-bit.
  const __int128 num = static_cast<__int128>(n) * sumsq.load() - static_cast<__int128>(sum.load()) * sum.load();
  const double var = static_cast<double>(num) / (static_cast<double>(n) * n);
  const float inv_std = static_cast<float>(1.0 / std::max(std::sqrt(var), 1.0 / std::sqrt(static_cast<double>(n))));
  const float meanf = static_cast<float>(mean);

  const Taps<float> th = aa_bilinear_taps(S, OW), tv = aa_bilinear_taps(S, OH);
  const int64_t row3 = static_cast<int64_t>(OW) * 3;
  std::vector<float> temp(static_cast<size_t>(S) * row3);  // (S, OW, 3) after the horizontal pass
  at::parallel_for(0, S, 16, [&](int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y) {
      const uint8_t* s = canvas + y * S * 3;
      float* o = temp.data() + y * row3;
      for (int x = 0; x < OW; ++x) {
        const float* k = &th.w[static_cast<size_t>(x) * th.ksize];
        const uint8_t* src = s + th.start[x] * 3;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f;
        for (int i = 0; i < th.count[x]; ++i) {
          a0 += src[i * 3 + 0] * k[i];
          a1 += src[i * 3 + 1] * k[i];
          a2 += src[i * 3 + 2] * k[i];
        }
        o[x * 3 + 0] = a0;
        o[x * 3 + 1] = a1;
        o[x * 3 + 2] = a2;
      }
    }
  });
  at::parallel_for(0, OH, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(row3);
    for (int64_t oy = begin; oy < end; ++oy) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* k = &tv.w[static_cast<size_t>(oy) * tv.ksize];
      const float* base = temp.data() + tv.start[oy] * row3;
      for (int i = 0; i < tv.count[oy]; ++i) {
        const float* r = base + i * row3;
        for (int64_t j = 0; j < row3; ++j) acc[j] += r[j] * k[i];
      }
      const int r = oy / p, py = oy % p;
      for (int cc = 0; cc < cols; ++cc) {  // one contiguous run of p*3 values per patch
        T* dst = patches + static_cast<int64_t>(r * cols + cc) * D + 2 + py * p * 3;
        const float* a = acc.data() + cc * p * 3;
        for (int j = 0; j < p * 3; ++j) dst[j] = static_cast<T>((a[j] - meanf) * inv_std);
      }
    }
  });
  for (int64_t k = 0; k < P; ++k) {
    T* row = patches + k * D;
    if (k < rows * cols) {
      row[0] = static_cast<T>(static_cast<float>(k / cols + 1));
      row[1] = static_cast<T>(static_cast<float>(k % cols + 1));
      mask[k] = static_cast<T>(1.f);
    } else {
      std::fill(row, row + D, static_cast<T>(0.f));
      mask[k] = static_cast<T>(0.f);
    }
  }
}

void check_images(at::TensorList images) {
  TORCH_CHECK(!images.empty(), "fused_preprocess: no images given");
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor& im = images[i];
    TORCH_CHECK(im.device().is_cpu(), "fused_preprocess: image ", i, " is on ", im.device(), ", expected cpu");
    TORCH_CHECK(im.scalar_type() == at::kByte, "fused_preprocess: image ", i, " has dtype ", im.scalar_type(),
                ", expected uint8");
    TORCH_CHECK(im.dim() == 3 && im.size(2) == 3, "fused_preprocess: image ", i, " has shape ", im.sizes(),
                ", expected (H, W, 3)");
    TORCH_CHECK(im.size(0) > 0 && im.size(1) > 0, "fused_preprocess: image ", i, " is empty");
  }
}

template <typename T>
void run_all(at::TensorList images, int S, bool pad, at::IntArrayRef fill, at::ArrayRef<double> mean,
             at::ArrayRef<double> std, int c_size, int P, int p, at::Tensor& pv, at::Tensor& clip,
             at::Tensor& patches, at::Tensor& mask) {
  std::array<std::array<float, 256>, 3> lut;
  for (int c = 0; c < 3; ++c)
    for (int u = 0; u < 256; ++u)
      lut[c][u] = clip_normalize(static_cast<uint8_t>(u), static_cast<float>(mean[c]), static_cast<float>(std[c]));
  std::vector<uint8_t> canvas(static_cast<size_t>(S) * S * 3);
  for (size_t b = 0; b < images.size(); ++b) {
    const at::Tensor im = images[b].contiguous();
    build_canvas<T>(im, S, pad, fill, lut, canvas.data(), pv[b].data_ptr<T>());
    if (c_size > 0) clip_resize<T>(canvas.data(), S, c_size, lut, clip[b].data_ptr<T>());
    if (P > 0) pix2struct_patches<T>(canvas.data(), S, P, p, patches[b].data_ptr<T>(), mask[b].data_ptr<T>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_preprocess_cpu(
    at::TensorList images, int64_t canvas_size, bool pad, at::IntArrayRef fill, at::ArrayRef<double> mean,
    at::ArrayRef<double> std, int64_t clip_size, int64_t p2s_max_patches, int64_t p2s_patch, at::ScalarType dtype) {
  check_images(images);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "fused_preprocess: dtype ", dtype,
              " unsupported (float32, bfloat16)");
  TORCH_CHECK(fill.size() == 3 && mean.size() == 3 && std.size() == 3, "fused_preprocess: need 3 fill/mean/std");
  TORCH_CHECK(canvas_size > 0 && clip_size >= 0 && p2s_max_patches >= 0 && p2s_patch > 0,
              "fused_preprocess: bad sizes");
  const int64_t B = images.size();
  const auto opt = images[0].options().dtype(dtype);
  at::Tensor pv = at::empty({B, 3, canvas_size, canvas_size}, opt);
  at::Tensor clip = clip_size > 0 ? at::empty({B, 3, clip_size, clip_size}, opt) : at::empty({0}, opt);
  at::Tensor patches = p2s_max_patches > 0
                           ? at::empty({B, p2s_max_patches, 2 + p2s_patch * p2s_patch * 3}, opt)
                           : at::empty({0}, opt);
  at::Tensor mask = p2s_max_patches > 0 ? at::empty({B, p2s_max_patches}, opt) : at::empty({0}, opt);
  if (dtype == at::kFloat) {
    run_all<float>(images, canvas_size, pad, fill, mean, std, clip_size, p2s_max_patches, p2s_patch, pv, clip,
                   patches, mask);
  } else {
    run_all<at::BFloat16>(images, canvas_size, pad, fill, mean, std, clip_size, p2s_max_patches, p2s_patch, pv,
                          clip, patches, mask);
  }
  return {pv, clip, patches, mask};
}

}  // namespace
}  // namespace eagle_fast::preprocess

TORCH_LIBRARY_IMPL(eagle_fast, CPU, m) {
  m.impl("fused_preprocess", &eagle_fast::preprocess::fused_preprocess_cpu);
}
