// CPU kernel of eagle_fast::fused_preprocess: uint8 RGB images -> every expert's input.
//
// Per image, three stages over one uint8 canvas (S, S, 3) kept in cache-friendly HWC order:
//   1. Pillow BICUBIC canvas: horizontal pass over only the source rows the vertical taps read
//      (Pillow's "ybox"), then the vertical pass, fused with the CLIP normalization into
//      pixel_values (3, S, S). Pad mode never materializes the padded square.
//   2. CLIP input: bilinear align_corners=True from the normalized canvas, (3, c, c); its
//      horizontal half runs inside stage 1 on the normalized rows while they are in L1.
//   3. Pix2Struct: exact integer mean/std of the canvas, antialiased bilinear to (rows*p, cols*p),
//      standardized, written patch row by patch row into the patches (P, 2 + p*p*3).
// Rows are split over threads with at::parallel_for; the row kernels (fused_preprocess_cpu_rows.h)
// run over contiguous memory. The arithmetic lives in fused_preprocess.h, shared with CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>

#include "common/page_cache.h"
#include "preprocess/fused_preprocess.h"
#include "preprocess/fused_preprocess_checks.h"
#include "preprocess/fused_preprocess_cpu_rows.h"

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
  // `scratch` (src_w * 3 bytes) must start as a copy of fill_row.
  const uint8_t* row(int y, uint8_t* scratch) const {
    if (is_fill_row(y)) return fill_row.data();
    const uint8_t* r = img + static_cast<int64_t>(y - plan.img_top) * w * 3;
    if (w == plan.src_w) return r;
    std::memcpy(scratch + plan.img_left * 3, r, static_cast<size_t>(w) * 3);
    return scratch;
  }
};

// Stage 2 (CLIP input (3, c, c), bilinear align_corners=True over the normalized canvas) runs in
// two halves. Horizontal: while stage 1 holds a canvas row's normalized planes in L1, the rows that
// some CLIP row reads are interpolated along x into `h` (one slot of (3, c) per such row).
// Vertical: clip_vertical() blends slot pairs into the output once the canvas is done.
struct ClipPlan {
  int c = 0;
  float scale = 0.f;
  std::vector<int> x0, x1, slot;  // slot: canvas row -> its row of h, or -1 when no CLIP row reads it
  std::vector<float> lx;
  std::unique_ptr<float[]> h;  // (rows read, 3, c), every value written before it is read

  ClipPlan(int S, int c_size) : c(c_size), scale(align_corners_scale(S, c_size)), slot(S, -1) {
    x0.resize(c);
    x1.resize(c);
    lx.resize(c);
    for (int ox = 0; ox < c; ++ox) linear_align_corners(ox, S, scale, x0[ox], x1[ox], lx[ox]);
    int n = 0;
    for (int oy = 0; oy < c; ++oy) {
      int y0, y1;
      float ly;
      linear_align_corners(oy, S, scale, y0, y1, ly);
      for (const int y : {y0, y1})
        if (slot[y] < 0) slot[y] = n++;
    }
    h = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(n) * 3 * c);
  }

  // planes: (3, S) normalized canvas row y.
  void horizontal(const float* planes, int S, int y) {
    if (slot[y] < 0) return;
    float* out = h.get() + static_cast<int64_t>(slot[y]) * 3 * c;
    for (int ch = 0; ch < 3; ++ch)
      linear_row(planes + static_cast<int64_t>(ch) * S, x0.data(), x1.data(), lx.data(), c, out + ch * c);
  }
};

// Stage 1: the uint8 canvas (S, S, 3) and the normalized pixel_values (3, S, S). Returns, per canvas
// row, whether it is a pure pad-colour row (those rows are identical; stage 3 reuses that).
template <typename T>
std::vector<uint8_t> build_canvas(const at::Tensor& image, int S, bool pad, at::IntArrayRef fill, const float* mean,
                                  const float* std, uint8_t* canvas, T* pixels, Moments* moments, ClipPlan* clip) {
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
  const PageCache::Scratch temp = PageCache::instance().scratch(static_cast<size_t>(y1 - y0) * row3);  // resized rows

  // Pad mode: every fill row resamples to the same output row; computed once, then copied.
  std::vector<uint8_t> fill_out;
  std::vector<int32_t> block(do_h ? static_cast<size_t>(p.src_w) * kLanes : 0);
  if (pad && do_h) {
    fill_out.resize(row3);
    const uint8_t* in[1] = {src.fill_row.data()};
    uint8_t* out[1] = {fill_out.data()};
    pil_block_horizontal(in, 1, p.src_w, th, p.crop_left, S, block.data(), out);
  }
  // Rows whose 16-output windows read within 32 input pixels (up- and mild downscaling) take the
  // permute path row by row; strong downscaling takes the transposed-block path.
  std::vector<WindowTaps<int32_t>> win;
  int kmax = 0;
  if (do_h) {
    kmax = *std::max_element(th.count.begin() + p.crop_left, th.count.begin() + p.crop_left + S);
    win = window_taps(th, p.crop_left, S, kmax);
  }
  const bool windowed = do_h && all_windowed(win);
  const int64_t pw = p.src_w + 2 * kWin + th.ksize;  // int32 plane width with zero slack
  const int64_t nblocks = (y1 - y0 + kRows - 1) / kRows;
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> scratch(kRows * src.fill_row.size());
    for (int r = 0; r < kRows; ++r)
      std::memcpy(&scratch[r * src.fill_row.size()], src.fill_row.data(), src.fill_row.size());
    std::vector<int32_t> blk(windowed ? 0 : block.size()), planes(windowed ? 3 * pw : 0, 0);
    for (int64_t bi = begin; bi < end; ++bi) {
      const uint8_t* in[kRows];
      uint8_t* out[kRows];
      int n = 0;
      for (int y = y0 + bi * kRows; y < std::min<int64_t>(y1, y0 + (bi + 1) * kRows); ++y) {
        uint8_t* o = temp.get() + (y - y0) * row3;
        if (!fill_out.empty() && src.is_fill_row(y)) {
          std::memcpy(o, fill_out.data(), row3);
        } else if (do_h) {
          in[n] = src.row(y, &scratch[n * src.fill_row.size()]);
          out[n++] = o;
        } else {
          std::memcpy(o, src.row(y, scratch.data()) + p.crop_left * 3, row3);
        }
      }
      if (n == 0) continue;
#if defined(EF_VECTOR_SHUFFLE)
      if (windowed) {
        for (int r = 0; r < n; ++r) pil_row_horizontal_window(in[r], p.src_w, win, kmax, planes.data(), pw, out[r]);
        continue;
      }
#endif
      pil_block_horizontal(in, n, p.src_w, th, p.crop_left, S, blk.data(), out);
    }
  });
  const int64_t plane = static_cast<int64_t>(S) * S;
  // Pad mode, wide images: a canvas row whose vertical taps read only fill rows equals fill_out
  // exactly (a row's fixed-point weights sum to 2**22 within a few units, far from moving a byte),
  // so those rows are copies, normalized once.
  std::vector<uint8_t> fill_rows(S, 0);
  std::vector<T> fill_pixels;
  std::vector<float> fill_norm;
  int64_t fill_sum = 0, fill_sumsq = 0;
  if (!fill_out.empty() && do_v) {
    for (int oy = 0; oy < S; ++oy) {
      const int a = tv.start[p.crop_top + oy], b = a + tv.count[p.crop_top + oy];
      fill_rows[oy] = b <= p.img_top || a >= p.img_top + h;
    }
    fill_norm.resize(row3 + 64);  // + slack for linear_row's 64-float windows
    normalize_row(fill_out.data(), S, mean, std, fill_norm.data(), fill_norm.data() + S, fill_norm.data() + 2 * S);
    fill_pixels.resize(row3);
    store_row(fill_norm.data(), row3, fill_pixels.data());
    for (const uint8_t v : fill_out) {
      fill_sum += v;
      fill_sumsq += static_cast<int64_t>(v) * v;
    }
  }
  at::parallel_for(0, S, 8, [&](int64_t begin, int64_t end) {
    // normalized fp32 row (3, S), streamed out (rounded first for bf16); + slack for linear_row
    std::vector<float> planes(row3 + 64);
    std::vector<T> planes_bf16(std::is_same_v<T, float> ? 0 : S);
    std::vector<int32_t> acc(row3);
    int64_t n_fill = 0, sum = 0, sumsq = 0;
    for (int64_t oy = begin; oy < end; ++oy) {
      uint8_t* crow = canvas + oy * row3;
      T* out = pixels + oy * S;
      if (fill_rows[oy]) {
        std::memcpy(crow, fill_out.data(), row3);
        for (int c = 0; c < 3; ++c) stream_copy(out + c * plane, fill_pixels.data() + c * S, S * sizeof(T));
        if (clip) clip->horizontal(fill_norm.data(), S, oy);
        ++n_fill;
        continue;
      }
      if (do_v) {
        const int yy = p.crop_top + oy;
        pil_row_vertical(temp.get() + (tv.start[yy] - y0) * row3, row3, &tv.w[static_cast<size_t>(yy) * tv.ksize],
                         tv.count[yy], row3, acc.data(), crow, &sum, &sumsq);
      } else {
        std::memcpy(crow, temp.get() + (p.crop_top + oy - y0) * row3, row3);
        row_moments(crow, row3, &sum, &sumsq);
      }
      normalize_row(crow, S, mean, std, planes.data(), planes.data() + S, planes.data() + 2 * S);
      if (clip) clip->horizontal(planes.data(), S, oy);
      for (int c = 0; c < 3; ++c) {
        if constexpr (std::is_same_v<T, float>) {
          stream_copy(out + c * plane, planes.data() + c * S, S * sizeof(float));
        } else {
          store_row(planes.data() + c * S, S, planes_bf16.data());
          stream_copy(out + c * plane, planes_bf16.data(), S * sizeof(T));
        }
      }
    }
    if (moments) {
      moments->sum += sum + n_fill * fill_sum;
      moments->sumsq += sumsq + n_fill * fill_sumsq;
    }
  });
  return fill_rows;
}

// Stage 2, vertical half: out (3, c, c) from the horizontally interpolated rows.
template <typename T>
void clip_vertical(const ClipPlan& cp, int S, T* out) {
  const int c = cp.c;
  const int64_t plane = static_cast<int64_t>(c) * c;
  at::parallel_for(0, c, 16, [&](int64_t begin, int64_t end) {
    for (int64_t oy = begin; oy < end; ++oy) {
      int y0, y1;
      float ly;
      linear_align_corners(oy, S, cp.scale, y0, y1, ly);
      const float* top = cp.h.get() + static_cast<int64_t>(cp.slot[y0]) * 3 * c;
      const float* bot = cp.h.get() + static_cast<int64_t>(cp.slot[y1]) * 3 * c;
      for (int ch = 0; ch < 3; ++ch) {
        T* o = out + ch * plane + oy * c;
        for (int ox = 0; ox < c; ++ox) store((1.f - ly) * top[ch * c + ox] + ly * bot[ch * c + ox], o + ox);
      }
    }
  });
}

// Stage 3: Pix2Struct flattened patches (P, 2 + p*p*3) and mask (P,).
template <typename T>
void pix2struct_patches(const uint8_t* canvas, const std::vector<uint8_t>& fill_rows, int S, int P, int p,
                        const Moments& m, T* patches, T* mask) {
  int rows, cols;
  pix2struct_grid(S, S, P, p, rows, cols);
  const int OH = rows * p, OW = cols * p, D = 2 + p * p * 3;
  const int64_t n = static_cast<int64_t>(S) * S * 3;
  // numpy's mean / population std of the 0..255 canvas; n * sumsq overflows int64 past a 2048
  // canvas, so the variance numerator is exact in 128-bit.
  const int64_t sum = m.sum.load(), sumsq = m.sumsq.load();
  const __int128 num = static_cast<__int128>(n) * sumsq - static_cast<__int128>(sum) * sum;
  const double var = static_cast<double>(num) / (static_cast<double>(n) * n);
  const float inv_std = static_cast<float>(1.0 / std::max(std::sqrt(var), 1.0 / std::sqrt(static_cast<double>(n))));
  const float meanf = static_cast<float>(static_cast<double>(sum) / n);

  // One patch row (p output rows) at a time, computed straight into its flattened patches in an
  // L2-sized buffer (cols, D), then streamed out whole: no full-size float temporary, no
  // reassembly copy, and no partial writes of output cache lines.
  const Taps<float> tv = aa_bilinear_taps(S, OH), th = aa_bilinear_taps(S, OW);
  const int kmax = *std::max_element(th.count.begin(), th.count.end());
  const std::vector<WindowTaps<float>> win = window_taps(th, 0, OW, kmax);
  const int64_t pw = S + 2 * kWin + th.ksize;            // plane width with zero slack for window reads
  const int64_t row_vals = static_cast<int64_t>(p) * 3;  // one patch's share of an output row
  const int64_t nvals = static_cast<int64_t>(cols) * D;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> planes(3 * pw + 3 * static_cast<int64_t>(S), 0.f), buf(nvals), fill_vals(cols * row_vals);
    std::vector<T> buf_out(std::is_same_v<T, float> ? 0 : nvals);
    bool have_fill = false;  // fill_vals holds a row computed from pad-colour canvas rows only
    for (int64_t pr = begin; pr < end; ++pr) {
      for (int py = 0; py < p; ++py) {
        const int oy = pr * p + py;
        float* dst = buf.data() + 2 + py * row_vals;
        // Rows reading only (identical) pad-colour canvas rows equal each other up to fp32
        // rounding of their weight sums (~1e-7): compute one, copy it.
        bool fill_only = true;
        for (int i = 0; i < tv.count[oy] && fill_only; ++i) fill_only = fill_rows[tv.start[oy] + i];
        if (fill_only && have_fill) {
          for (int cc = 0; cc < cols; ++cc)
            std::memcpy(dst + cc * D, fill_vals.data() + cc * row_vals, row_vals * sizeof(float));
          continue;
        }
        p2s_row(canvas, S, tv, th, win, kmax, oy, meanf, inv_std, planes.data(), pw, dst, p, D);
        if (fill_only) {
          for (int cc = 0; cc < cols; ++cc)
            std::memcpy(fill_vals.data() + cc * row_vals, dst + cc * D, row_vals * sizeof(float));
          have_fill = true;
        }
      }
      for (int cc = 0; cc < cols; ++cc) {  // row and column ids, 1-based
        buf[cc * D] = static_cast<float>(pr + 1);
        buf[cc * D + 1] = static_cast<float>(cc + 1);
      }
      T* out = patches + pr * nvals;
      if constexpr (std::is_same_v<T, float>) {
        stream_copy(out, buf.data(), nvals * sizeof(float));
      } else {
        store_row(buf.data(), nvals, buf_out.data());
        stream_copy(out, buf_out.data(), nvals * sizeof(T));
      }
    }
  });
  for (int64_t k = 0; k < P; ++k) {  // the padding patches, and the mask
    if (k >= rows * cols) std::fill(patches + k * D, patches + (k + 1) * D, static_cast<T>(0.f));
    mask[k] = static_cast<T>(k < rows * cols ? 1.f : 0.f);
  }
}

// Large outputs (a 1024 canvas is 12 MB in fp32) come from the page cache: huge pages, reused
// across calls instead of faulted in and zeroed afresh for every image.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  return PageCache::instance().empty(sizes, opt);
}

// The device check; everything else is shared with CUDA (fused_preprocess_checks.h).
void check_on_cpu(at::TensorList images) {
  for (size_t i = 0; i < images.size(); ++i)
    TORCH_CHECK(images[i].device().is_cpu(), "fused_preprocess: image ", i, " is on ", images[i].device(),
                ", expected cpu");
}

template <typename T>
void run_all(at::TensorList images, int S, bool pad, at::IntArrayRef fill, at::ArrayRef<double> mean,
             at::ArrayRef<double> std, int c_size, int P, int p, at::Tensor& pv, at::Tensor& clip, at::Tensor& patches,
             at::Tensor& mask) {
  const float meanf[3] = {static_cast<float>(mean[0]), static_cast<float>(mean[1]), static_cast<float>(mean[2])};
  const float stdf[3] = {static_cast<float>(std[0]), static_cast<float>(std[1]), static_cast<float>(std[2])};
  std::optional<ClipPlan> clip_plan;  // tables shared by every image of the batch
  if (c_size > 0) clip_plan.emplace(S, c_size);
  // Uninitialized on purpose: every byte is written by stage 1 before it is read.
  const PageCache::Scratch canvas = PageCache::instance().scratch(static_cast<size_t>(S) * S * 3);
  for (size_t b = 0; b < images.size(); ++b) {
    const at::Tensor im = images[b].contiguous();
    Moments moments;
    const std::vector<uint8_t> fill_rows =
        build_canvas<T>(im, S, pad, fill, meanf, stdf, canvas.get(), pv[b].data_ptr<T>(), P > 0 ? &moments : nullptr,
                        clip_plan ? &*clip_plan : nullptr);
    if (clip_plan) clip_vertical<T>(*clip_plan, S, clip[b].data_ptr<T>());
    if (P > 0)
      pix2struct_patches<T>(canvas.get(), fill_rows, S, P, p, moments, patches[b].data_ptr<T>(), mask[b].data_ptr<T>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_preprocess_cpu(
    at::TensorList images, int64_t canvas_size, bool pad, at::IntArrayRef fill, at::ArrayRef<double> mean,
    at::ArrayRef<double> std, int64_t clip_size, int64_t p2s_max_patches, int64_t p2s_patch, at::ScalarType dtype) {
  check_arguments(images, canvas_size, fill, mean, std, clip_size, p2s_max_patches, p2s_patch, dtype);
  check_on_cpu(images);
  const int64_t B = images.size();
  const auto opt = images[0].options().dtype(dtype);
  at::Tensor pv = empty_output({B, 3, canvas_size, canvas_size}, opt);
  at::Tensor clip = clip_size > 0 ? empty_output({B, 3, clip_size, clip_size}, opt) : at::empty({0}, opt);
  at::Tensor patches = p2s_max_patches > 0 ? empty_output({B, p2s_max_patches, 2 + p2s_patch * p2s_patch * 3}, opt)
                                           : at::empty({0}, opt);
  at::Tensor mask = p2s_max_patches > 0 ? at::empty({B, p2s_max_patches}, opt) : at::empty({0}, opt);
  if (dtype == at::kFloat) {
    run_all<float>(images, canvas_size, pad, fill, mean, std, clip_size, p2s_max_patches, p2s_patch, pv, clip, patches,
                   mask);
  } else {
    run_all<at::BFloat16>(images, canvas_size, pad, fill, mean, std, clip_size, p2s_max_patches, p2s_patch, pv, clip,
                          patches, mask);
  }
  return {pv, clip, patches, mask};
}

}  // namespace
}  // namespace eagle_fast::preprocess

TORCH_LIBRARY_IMPL(eagle_fast, CPU, m) {
  m.impl("fused_preprocess", &eagle_fast::preprocess::fused_preprocess_cpu);
}
