// CPU kernels of eagle_fast::resize_concat and eagle_fast::resize_concat_backward.
//
// Feature i (B, C, H, W), any strides, unshuffle u: its unshuffled map (B, C' = C*u*u, n = H/u, n)
// is resized (bilinear, align_corners=True) to (G, G) and written into channels
// [off_i, off_i + C') of the output (B, G*G, sum C'). Nothing is materialized per feature: every
// unshuffled channel c' is read through a base offset (unshuffled_offset(c', 0, 0)) plus
// per-sample offsets y*u*sy, x*u*sx, and written straight into the output slice.
//
// Two loop orders, picked per feature from its strides (both exact for any strides):
//   channel-inner: channels-last / token views (sc <= sx): per output cell the C' values of the
//     4 taps are contiguous (or evenly strided) in the input and contiguous in the output.
//   row-inner: NCHW-like (sx < sc): tiles of kTile channels; per channel the 2 input rows of the
//     taps are walked along x, and each output cell receives its kTile channels as one run.
// Forward: at::parallel_for over (b, gy) output rows for channel-inner features and over
// (b, channel tile) for row-inner ones; fp32 accumulation (fp64 for fp64).
// Backward: at::parallel_for over (b, block of CB unshuffled channels), so each task owns disjoint
// input elements; it scatters w * grad into a task-local accumulator (n, n, CB) in a fixed cell
// order, then stores it through the input's strides. Same bits for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "vision/resize_concat.h"

namespace eagle_fast::resize_concat {
namespace {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One feature as the kernels see it.
struct Feature {
  int64_t C, n, u, cu;                             // channels, unshuffled side, unshuffle factor, C*u*u
  int64_t sb, sc, sy, sx;                          // element strides of the (B, C, H, W) input
  int64_t off;                                     // first output channel of this feature
  bool channel_inner() const { return sc <= sx; }  // loop order only; both are exact
};

std::vector<Feature> check_features(at::TensorList features, int64_t grid, at::IntArrayRef unshuffle, const char* op) {
  TORCH_CHECK(!features.empty(), op, ": no features given");
  TORCH_CHECK(grid >= 1, op, ": grid must be >= 1, got ", grid);
  TORCH_CHECK(unshuffle.size() == features.size(), op, ": ", unshuffle.size(), " unshuffle factors for ",
              features.size(), " features");
  const auto dtype = features[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": feature 0 has dtype ", dtype, " (float32, float64, bfloat16, float16 supported)");
  std::vector<Feature> out;
  int64_t off = 0;
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& x = features[i];
    TORCH_CHECK(x.dim() == 4, op, ": feature ", i, " is ", x.dim(), "-D, expected (B, C, H, W)");
    TORCH_CHECK(x.device().is_cpu(), op, ": feature ", i, " is on ", x.device(), ", expected cpu");
    TORCH_CHECK(x.scalar_type() == dtype, op, ": feature ", i, " has dtype ", x.scalar_type(), ", feature 0 has ",
                dtype);
    TORCH_CHECK(x.size(0) == features[0].size(0), op, ": feature ", i, " has batch ", x.size(0), ", feature 0 has ",
                features[0].size(0));
    TORCH_CHECK(x.size(2) == x.size(3), op, ": feature ", i, " map ", x.sizes(), " is not square");
    const int64_t u = unshuffle[i];
    TORCH_CHECK(u >= 1 && x.size(2) % u == 0, op, ": feature ", i, ": unshuffle ", u, " does not divide its ",
                x.size(2), "x", x.size(3), " map");
    const int64_t C = x.size(1);
    out.push_back({C, x.size(2) / u, u, C * u * u, x.stride(0), x.stride(1), x.stride(2), x.stride(3), off});
    off += C * u * u;
  }
  return out;
}

int64_t total_channels(const std::vector<Feature>& fs) {
  return fs.back().off + fs.back().cu;
}

// Base offset of every unshuffled channel c' (sample (0, 0) of the unshuffled map).
std::vector<int64_t> channel_bases(const Feature& f) {
  std::vector<int64_t> base(f.cu);
  for (int64_t c = 0; c < f.cu; ++c) base[c] = unshuffled_offset(c, 0, 0, f.u, f.sc, f.sy, f.sx);
  return base;
}

// ----------------------------------------------------------------------------- forward

// Row-inner tiles: kTile channels x up to kMaxG cells on the stack. Writing a cell's kTile
// channels at once matters: output cells are ld*sizeof(T) apart, often a multiple of 4 KiB
// (ld = 3072, 7168), so channel-by-channel writes to G cells thrash one L1 set.
constexpr int64_t kTile = 16;
constexpr int kMaxG = 128;

// Output row (b, gy), unshuffled channels [c_beg, cu) of one feature: out points at
// out[b, gy*G, off], ld = total channels.
template <typename T, typename acc_t>
void forward_row(const T* x, const Feature& f, const std::vector<int64_t>& base,
                 const std::vector<AxisTap<acc_t>>& taps, int gy, int G, T* out, int64_t ld, int64_t c_beg,
                 int64_t cu) {
  const int64_t ys = f.u * f.sy, xs = f.u * f.sx;
  if (f.n == G) {  // exact copy (no arithmetic: keeps inf/nan where the reference keeps them)
    const T* row = x + gy * ys;
    if (f.channel_inner() || G > kMaxG) {
      for (int gx = 0; gx < G; ++gx)
        for (int64_t c = c_beg; c < cu; ++c) out[gx * ld + c] = row[base[c] + gx * xs];
    } else {  // tiles of kTile channels: contiguous reads along x, whole-line writes per cell
      T tile[kMaxG * kTile];
      for (int64_t c0 = c_beg; c0 < cu; c0 += kTile) {
        const int64_t cb = std::min<int64_t>(kTile, cu - c0);
        for (int64_t k = 0; k < cb; ++k)
          for (int gx = 0; gx < G; ++gx) tile[gx * kTile + k] = row[base[c0 + k] + gx * xs];
        for (int gx = 0; gx < G; ++gx)
          for (int64_t k = 0; k < cb; ++k) out[gx * ld + c0 + k] = tile[gx * kTile + k];
      }
    }
    return;
  }
  const AxisTap<acc_t>& ty = taps[gy];
  const T* r0 = x + ty.i0 * ys;
  const T* r1 = x + ty.i1 * ys;
  if (f.channel_inner() || G > kMaxG) {  // (huge grids: no tile)
    for (int gx = 0; gx < G; ++gx) {
      const AxisTap<acc_t>& tx = taps[gx];
      const int64_t x0 = tx.i0 * xs, x1 = tx.i1 * xs;
      T* o = out + gx * ld;
      if (f.sc == 1 && f.u == 1) {  // token / channels-last: 4 contiguous channel vectors
        const T* a = r0 + x0;
        const T* b = r0 + x1;
        const T* c = r1 + x0;
        const T* d = r1 + x1;
        for (int64_t k = c_beg; k < cu; ++k) o[k] = static_cast<T>(bilinear<acc_t>(a[k], b[k], c[k], d[k], ty, tx));
      } else {
        for (int64_t k = c_beg; k < cu; ++k) {
          const int64_t bk = base[k];
          o[k] = static_cast<T>(bilinear<acc_t>(r0[bk + x0], r0[bk + x1], r1[bk + x0], r1[bk + x1], ty, tx));
        }
      }
    }
  } else {  // tiles of kTile channels, as in the copy above
    T tile[kMaxG * kTile];
    for (int64_t c0 = c_beg; c0 < cu; c0 += kTile) {
      const int64_t cb = std::min<int64_t>(kTile, cu - c0);
      for (int64_t k = 0; k < cb; ++k) {
        const T* a = r0 + base[c0 + k];
        const T* c = r1 + base[c0 + k];
        for (int gx = 0; gx < G; ++gx) {
          const AxisTap<acc_t>& tx = taps[gx];
          const int64_t x0 = tx.i0 * xs, x1 = tx.i1 * xs;
          tile[gx * kTile + k] = static_cast<T>(bilinear<acc_t>(a[x0], a[x1], c[x0], c[x1], ty, tx));
        }
      }
      for (int gx = 0; gx < G; ++gx)
        for (int64_t k = 0; k < cb; ++k) out[gx * ld + c0 + k] = tile[gx * kTile + k];
    }
  }
}

template <typename T>
void forward_all(at::TensorList features, const std::vector<Feature>& fs, int G, at::Tensor& out) {
  using acc_t = acc_type<T>;
  const int64_t B = out.size(0), ld = out.size(2);
  std::vector<std::vector<int64_t>> bases;
  std::vector<std::vector<AxisTap<acc_t>>> taps;
  for (const Feature& f : fs) {
    bases.push_back(channel_bases(f));
    std::vector<AxisTap<acc_t>> t(G);
    for (int g = 0; g < G; ++g) t[g] = axis_tap<acc_t>(g, static_cast<int>(f.n), G);
    taps.push_back(std::move(t));
  }
  std::vector<const T*> ptrs;
  for (const at::Tensor& x : features) ptrs.push_back(x.data_ptr<T>());
  T* o = out.data_ptr<T>();
  // Channel-inner features: B*G output rows (each ~G*C' outputs, grain 1).
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / G;
      const int gy = static_cast<int>(r % G);
      for (size_t i = 0; i < fs.size(); ++i)
        if (fs[i].channel_inner() || G > kMaxG)
          forward_row<T, acc_t>(ptrs[i] + b * fs[i].sb, fs[i], bases[i], taps[i], gy, G,
                                o + (b * G * G + static_cast<int64_t>(gy) * G) * ld + fs[i].off, ld, 0, fs[i].cu);
    }
  });
  // Row-inner (NCHW) features: tasks of (b, kTile channels) over all rows, so the tile's kTile
  // planes are streamed once and stay in cache while the G rows read them (rows by (b, gy)
  // instead read 2 rows of every plane per task: 5x slower measured on the ConvNeXt copy).
  for (size_t i = 0; i < fs.size(); ++i) {
    if (fs[i].channel_inner() || G > kMaxG) continue;
    const int64_t nt = (fs[i].cu + kTile - 1) / kTile;
    at::parallel_for(0, B * nt, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nt, c0 = (t % nt) * kTile, c1 = std::min(fs[i].cu, c0 + kTile);
        for (int gy = 0; gy < G; ++gy)
          forward_row<T, acc_t>(ptrs[i] + b * fs[i].sb, fs[i], bases[i], taps[i], gy, G,
                                o + (b * G * G + static_cast<int64_t>(gy) * G) * ld + fs[i].off, ld, c0, c1);
      }
    });
  }
}

at::Tensor resize_concat_cpu(at::TensorList features, int64_t grid, at::IntArrayRef unshuffle) {
  const std::vector<Feature> fs = check_features(features, grid, unshuffle, "resize_concat");
  at::Tensor out = at::empty({features[0].size(0), grid * grid, total_channels(fs)}, features[0].options(),
                             at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "resize_concat_cpu",
                                  [&] { forward_all<scalar_t>(features, fs, static_cast<int>(grid), out); });
  return out;
}

// ----------------------------------------------------------------------------- backward

// Channels per backward task: the accumulator (n, n, CB) stays around 256 KiB (L2).
int64_t channel_block(const Feature& f) {
  const int64_t cb = (64 * 1024) / std::max<int64_t>(1, f.n * f.n);
  return std::clamp<int64_t>(cb, 16, 64);
}

// Gradient of one feature. g points at grad[0, 0, off], ld = total channels.
template <typename T>
void backward_feature(const T* g, int64_t ld, const Feature& f, int64_t B, int G, T* gx_ptr) {
  using acc_t = acc_type<T>;
  const std::vector<int64_t> base = channel_bases(f);
  const int64_t cu = f.cu, n = f.n, ys = f.u * f.sy, xs = f.u * f.sx, GG = static_cast<int64_t>(G) * G;
  if (n == G) {                            // identity: a plain copy
    if (f.channel_inner() || n > kMaxG) {  // parallel over (b, y) rows, channels inner
      at::parallel_for(0, B * n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / n, y = r % n;
          const T* src = g + (b * GG + y * G) * ld;
          T* dst = gx_ptr + b * f.sb + y * ys;
          for (int64_t x = 0; x < n; ++x)
            for (int64_t c = 0; c < cu; ++c) dst[base[c] + x * xs] = src[x * ld + c];
        }
      });
    } else {  // NCHW: (b, kTile channels) tasks over all rows, as the forward, via a stack tile
      const int64_t nt = (cu + kTile - 1) / kTile;
      at::parallel_for(0, B * nt, 1, [&](int64_t begin, int64_t end) {
        T tile[kMaxG * kTile];
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / nt, c0 = (t % nt) * kTile, cb = std::min(kTile, cu - c0);
          for (int64_t y = 0; y < n; ++y) {
            const T* src = g + (b * GG + y * G) * ld + c0;
            T* dst = gx_ptr + b * f.sb + y * ys;
            for (int64_t x = 0; x < n; ++x)
              for (int64_t k = 0; k < cb; ++k) tile[x * kTile + k] = src[x * ld + k];
            for (int64_t k = 0; k < cb; ++k)
              for (int64_t x = 0; x < n; ++x) dst[base[c0 + k] + x * xs] = tile[x * kTile + k];
          }
        }
      });
    }
    return;
  }
  std::vector<AxisTap<acc_t>> taps(G);
  for (int i = 0; i < G; ++i) taps[i] = axis_tap<acc_t>(i, static_cast<int>(n), G);
  const int64_t CB = channel_block(f), nblk = (cu + CB - 1) / CB;
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(n * n * CB));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nblk, c0 = (t % nblk) * CB, cb = std::min(CB, cu - c0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      // Scatter in a fixed order: cells row-major, channels inner (contiguous in grad and acc).
      for (int gy = 0; gy < G; ++gy) {
        const AxisTap<acc_t>& ty = taps[gy];
        for (int gxi = 0; gxi < G; ++gxi) {
          const AxisTap<acc_t>& tx = taps[gxi];
          const T* src = g + (b * GG + static_cast<int64_t>(gy) * G + gxi) * ld + c0;
          acc_t* a00 = acc.data() + (ty.i0 * n + tx.i0) * CB;
          acc_t* a01 = acc.data() + (ty.i0 * n + tx.i1) * CB;
          acc_t* a10 = acc.data() + (ty.i1 * n + tx.i0) * CB;
          acc_t* a11 = acc.data() + (ty.i1 * n + tx.i1) * CB;
          const acc_t w00 = ty.l0 * tx.l0, w01 = ty.l0 * tx.l1, w10 = ty.l1 * tx.l0, w11 = ty.l1 * tx.l1;
          for (int64_t k = 0; k < cb; ++k) {
            const acc_t v = static_cast<acc_t>(src[k]);
            a00[k] += w00 * v;
            a01[k] += w01 * v;
            a10[k] += w10 * v;
            a11[k] += w11 * v;
          }
        }
      }
      // Store every input element of the block through the input's strides.
      T* dst = gx_ptr + b * f.sb;
      if (f.channel_inner()) {
        for (int64_t p = 0; p < n * n; ++p) {
          const int64_t po = (p / n) * ys + (p % n) * xs;
          for (int64_t k = 0; k < cb; ++k) dst[base[c0 + k] + po] = static_cast<T>(acc[p * CB + k]);
        }
      } else {
        for (int64_t k = 0; k < cb; ++k) {
          T* d = dst + base[c0 + k];
          for (int64_t y = 0; y < n; ++y)
            for (int64_t x = 0; x < n; ++x) d[y * ys + x * xs] = static_cast<T>(acc[(y * n + x) * CB + k]);
        }
      }
    }
  });
}

std::vector<at::Tensor> resize_concat_backward_cpu(const at::Tensor& grad, at::TensorList features, int64_t grid,
                                                   at::IntArrayRef unshuffle) {
  const std::vector<Feature> fs = check_features(features, grid, unshuffle, "resize_concat_backward");
  const int64_t B = features[0].size(0), ld = total_channels(fs);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == grid * grid && grad.size(2) == ld,
              "resize_concat_backward: grad has shape ", grad.sizes(), ", expected (", B, ", ", grid * grid, ", ", ld,
              ")");
  TORCH_CHECK(grad.scalar_type() == features[0].scalar_type(), "resize_concat_backward: grad has dtype ",
              grad.scalar_type(), ", features have ", features[0].scalar_type());
  TORCH_CHECK(grad.device().is_cpu(), "resize_concat_backward: grad is on ", grad.device(), ", expected cpu");
  const at::Tensor g = grad.contiguous();  // a no-op for the autograd path (it passes grad.contiguous())
  std::vector<at::Tensor> grads;
  std::vector<Feature> gfs = fs;  // the gradients' strides: empty_like densifies sliced inputs
  for (size_t i = 0; i < fs.size(); ++i) {
    grads.push_back(at::empty_like(features[i]));
    gfs[i].sb = grads[i].stride(0), gfs[i].sc = grads[i].stride(1);
    gfs[i].sy = grads[i].stride(2), gfs[i].sx = grads[i].stride(3);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "resize_concat_backward_cpu", [&] {
    for (size_t i = 0; i < fs.size(); ++i)
      backward_feature<scalar_t>(g.data_ptr<scalar_t>() + gfs[i].off, ld, gfs[i], B, static_cast<int>(grid),
                                 grads[i].data_ptr<scalar_t>());
  });
  return grads;
}

}  // namespace
}  // namespace eagle_fast::resize_concat

TORCH_LIBRARY_IMPL(eagle_fast, CPU, m) {
  m.impl("resize_concat", &eagle_fast::resize_concat::resize_concat_cpu);
  m.impl("resize_concat_backward", &eagle_fast::resize_concat::resize_concat_backward_cpu);
}
