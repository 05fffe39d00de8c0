// Shared maths of eagle_fast::resize_concat (CPU and CUDA kernels): which input samples and
// weights make output cell (gy, gx) of channel c' of one feature map.
//
// Feature i is (B, C, H, W) with strides; with unshuffle factor u it is first viewed as
// pixel_unshuffle(x, u): (B, C*u*u, H/u, W/u), channel c' = c*u*u + u*dy + dx reading
// x[b, c, y*u + dy, x*u + dx]. That map is resized to (G, G) with bilinear align_corners=True as
// torch computes it (scale (n-1)/(G-1) in the accumulation type, src = scale * g, i0 = floor,
// i1 = min(i0 + 1, n - 1), out = l0y*(l0x*v00 + l1x*v01) + l1y*(l0x*v10 + l1x*v11)).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace eagle_fast::resize_concat {

// One axis: output index g of G reading an axis of n samples. acc_t is float (fp32/bf16/fp16
// inputs) or double (float64 inputs), as torch's opmath.
template <typename acc_t>
struct AxisTap {
  int i0, i1;
  acc_t l0, l1;
};

template <typename acc_t>
EF_HD AxisTap<acc_t> axis_tap(int g, int n, int G) {
  const acc_t scale = G > 1 ? static_cast<acc_t>(n - 1) / static_cast<acc_t>(G - 1) : acc_t(0);
  const acc_t src = scale * static_cast<acc_t>(g);
  AxisTap<acc_t> t;
  t.i0 = static_cast<int>(src);
  t.i1 = t.i0 + ((t.i0 < n - 1) ? 1 : 0);
  t.l1 = src - static_cast<acc_t>(t.i0);
  t.l0 = acc_t(1) - t.l1;
  return t;
}

// Offset (in elements) of sample (c', y', x') of the unshuffled map in the strided input.
EF_HD int64_t unshuffled_offset(int cu, int yu, int xu, int u, int64_t sc, int64_t sy, int64_t sx) {
  const int c = cu / (u * u), r = cu % (u * u);
  return c * sc + static_cast<int64_t>(yu * u + r / u) * sy + static_cast<int64_t>(xu * u + r % u) * sx;
}

template <typename acc_t>
EF_HD acc_t bilinear(acc_t v00, acc_t v01, acc_t v10, acc_t v11, const AxisTap<acc_t>& ty, const AxisTap<acc_t>& tx) {
  return ty.l0 * (tx.l0 * v00 + tx.l1 * v01) + ty.l1 * (tx.l0 * v10 + tx.l1 * v11);
}

}  // namespace eagle_fast::resize_concat
