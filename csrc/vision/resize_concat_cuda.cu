// CUDA kernels of eagle_fast::resize_concat and its backward (semantics:
// _resize_concat_reference / _resize_concat_backward_reference in eagle_fast/ops/resize_concat.py;
// shared per-element maths: resize_concat.h).
//
// Forward, one launch per feature, on the current stream: block (channel chunk, output cell, batch),
// consecutive threads = consecutive unshuffled channels c', so the writes into the feature's channel
// slice of out (B, G*G, sum C_i*u_i^2) are coalesced; inputs are read through their strides
// (coalesced for channels-last token grids, strided for NCHW maps).
// Backward, one launch per feature, deterministic gather (no atomics): every thread owns one input
// element (b, c', y', x') of the unshuffled map and sums wy * wx * grad over the output cells whose
// taps touch it. Per feature one host-built CSR table (both axes are the same: square map, square
// grid) lists, for each input index, the (g, weight) pairs of axis_tap; all tables go to the device
// in one pinned async copy per dtype (int32 indices + acc_t weights). A map whose unshuffled side
// equals G is a plain copy both ways, as in the reference.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

#include "resize_concat.h"

namespace eagle_fast::resize_concat {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridYZ = 65535;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct Strides4 {
  int64_t b, c, y, x;
};

// Block size and grid for `channels` channels x `cells` cells x `batch` images. The y and z
// dimensions are capped; the kernels grid-stride over them.
struct Launch {
  dim3 grid, block;
};

Launch launch_for(int64_t channels, int64_t cells, int64_t batch) {
  const int threads = channels >= kThreads ? kThreads : static_cast<int>((channels + 31) / 32 * 32);
  const int64_t bx = (channels + threads - 1) / threads;
  TORCH_CHECK(bx >= 1 && bx <= INT_MAX, "resize_concat: launch of ", channels, " channels out of range");
  Launch l;
  l.block = dim3(static_cast<unsigned int>(threads));
  l.grid = dim3(static_cast<unsigned int>(bx), static_cast<unsigned int>(std::min(cells, kMaxGridYZ)),
                static_cast<unsigned int>(std::min(batch, kMaxGridYZ)));
  return l;
}

// ---------------------------------------------------------------------------- forward

// x: feature (B, C, H, W) with strides xs; unshuffled (B, Cu = C*u*u, n, n). out: (B, G*G, ctot)
// contiguous; this feature's slice starts at channel off.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, Strides4 xs, int u, int n, int Cu, int G, int B, bool identity,
                   scalar_t* __restrict__ out, int64_t ctot, int64_t off) {
  using acc_t = acc_type<scalar_t>;
  const int cu = blockIdx.x * blockDim.x + threadIdx.x;
  if (cu >= Cu) return;
  const int cells = G * G;
  for (int b = blockIdx.z; b < B; b += gridDim.z) {
    const scalar_t* xb = x + static_cast<int64_t>(b) * xs.b;
    for (int g = blockIdx.y; g < cells; g += gridDim.y) {
      const int gy = g / G, gx = g % G;
      scalar_t v;
      if (identity) {
        v = xb[unshuffled_offset(cu, gy, gx, u, xs.c, xs.y, xs.x)];
      } else {
        const AxisTap<acc_t> ty = axis_tap<acc_t>(gy, n, G), tx = axis_tap<acc_t>(gx, n, G);
        const acc_t v00 = static_cast<acc_t>(xb[unshuffled_offset(cu, ty.i0, tx.i0, u, xs.c, xs.y, xs.x)]);
        const acc_t v01 = static_cast<acc_t>(xb[unshuffled_offset(cu, ty.i0, tx.i1, u, xs.c, xs.y, xs.x)]);
        const acc_t v10 = static_cast<acc_t>(xb[unshuffled_offset(cu, ty.i1, tx.i0, u, xs.c, xs.y, xs.x)]);
        const acc_t v11 = static_cast<acc_t>(xb[unshuffled_offset(cu, ty.i1, tx.i1, u, xs.c, xs.y, xs.x)]);
        v = static_cast<scalar_t>(bilinear<acc_t>(v00, v01, v10, v11, ty, tx));
      }
      out[(static_cast<int64_t>(b) * cells + g) * ctot + off + cu] = v;
    }
  }
}

// ---------------------------------------------------------------------------- backward

// grad: (B, G*G, ctot) with strides gs (b, cell, channel; x unused); this feature's slice starts at
// channel off. gin: the feature's gradient (B, C, H, W) with strides is. CSR table (identity: unused):
// rowptr[n + 1], entries [rowptr[i], rowptr[i+1]) of input index i are (gidx, wt) = output index
// and its bilinear weight along one axis.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad, Strides4 gs, int64_t off, int u, int n, int Cu, int G, int B,
                    bool identity, const int32_t* __restrict__ rowptr, const int32_t* __restrict__ gidx,
                    const acc_type<scalar_t>* __restrict__ wt, scalar_t* __restrict__ gin, Strides4 is) {
  using acc_t = acc_type<scalar_t>;
  const int cu = blockIdx.x * blockDim.x + threadIdx.x;
  if (cu >= Cu) return;
  const int cells = n * n;
  for (int b = blockIdx.z; b < B; b += gridDim.z) {
    const scalar_t* gb = grad + static_cast<int64_t>(b) * gs.b + (off + cu) * gs.c;
    scalar_t* ib = gin + static_cast<int64_t>(b) * is.b;
    for (int p = blockIdx.y; p < cells; p += gridDim.y) {
      const int yu = p / n, xu = p % n;
      scalar_t v;
      if (identity) {  // n == G
        v = gb[static_cast<int64_t>(p) * gs.y];
      } else {
        acc_t total = acc_t(0);
        const int ye = rowptr[yu + 1], xb = rowptr[xu], xe = rowptr[xu + 1];
        for (int ey = rowptr[yu]; ey < ye; ++ey) {
          const scalar_t* grow = gb + static_cast<int64_t>(gidx[ey]) * G * gs.y;
          acc_t inner = acc_t(0);
          for (int ex = xb; ex < xe; ++ex)
            inner += wt[ex] * static_cast<acc_t>(grow[static_cast<int64_t>(gidx[ex]) * gs.y]);
          total += wt[ey] * inner;
        }
        v = static_cast<scalar_t>(total);
      }
      ib[unshuffled_offset(cu, yu, xu, u, is.c, is.y, is.x)] = v;
    }
  }
}

// ---------------------------------------------------------------------------- host

struct FeatureGeom {
  int64_t C, Cu, n;
  int u;
  bool identity;
};

// Checks shared by forward and backward; returns per-feature geometry.
std::vector<FeatureGeom> check_features(at::TensorList features, int64_t grid, at::IntArrayRef unshuffle,
                                        const char* op) {
  TORCH_CHECK(!features.empty(), op, ": no features given");
  TORCH_CHECK(grid >= 1 && grid * grid <= INT_MAX / 2, op, ": grid must be >= 1 (and small), got ", grid);
  TORCH_CHECK(unshuffle.size() == features.size(), op, ": ", unshuffle.size(), " unshuffle factors for ",
              features.size(), " features");
  const at::Tensor& f0 = features[0];
  std::vector<FeatureGeom> geom;
  geom.reserve(features.size());
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& f = features[i];
    TORCH_CHECK(f.is_cuda() && f.device() == f0.device(), op, ": feature ", i, " on ", f.device(), ", feature 0 on ",
                f0.device());
    TORCH_CHECK(f.scalar_type() == f0.scalar_type(), op, ": feature ", i, " has dtype ", f.scalar_type(),
                ", feature 0 has ", f0.scalar_type());
    TORCH_CHECK(f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble || f.scalar_type() == at::kHalf ||
                    f.scalar_type() == at::kBFloat16,
                op, ": feature ", i, " has unsupported dtype ", f.scalar_type());
    TORCH_CHECK(f.dim() == 4, op, ": feature ", i, " is ", f.dim(), "-D, expected (B, C, H, W)");
    TORCH_CHECK(f.size(0) == f0.size(0), op, ": feature ", i, " has batch ", f.size(0), ", feature 0 has ", f0.size(0));
    TORCH_CHECK(f.size(2) == f.size(3), op, ": feature ", i, " map ", f.sizes(), " is not square");
    const int64_t u = unshuffle[i];
    TORCH_CHECK(u >= 1 && f.size(2) >= u && f.size(2) % u == 0, op, ": feature ", i, ": unshuffle ", u,
                " does not divide its ", f.size(2), "x", f.size(3), " map");
    FeatureGeom g;
    g.C = f.size(1);
    g.u = static_cast<int>(u);
    g.n = f.size(2) / u;
    g.Cu = g.C * u * u;
    TORCH_CHECK(g.Cu <= INT_MAX && g.n * g.n <= INT_MAX / 2 && f.size(0) <= INT_MAX, op, ": feature ", i, " of shape ",
                f.sizes(), " is too large");
    g.identity = g.n == grid;
    geom.push_back(g);
  }
  return geom;
}

at::Tensor resize_concat_cuda(at::TensorList features, int64_t grid, at::IntArrayRef unshuffle) {
  const auto geom = check_features(features, grid, unshuffle, "resize_concat");
  const at::Tensor& f0 = features[0];
  c10::cuda::CUDAGuard guard(f0.device());
  const int64_t B = f0.size(0);
  int64_t ctot = 0;
  for (const auto& g : geom) ctot += g.Cu;
  at::Tensor out = at::empty({B, grid * grid, ctot}, f0.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int G = static_cast<int>(grid);
  int64_t off = 0;
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& f = features[i];
    const FeatureGeom& g = geom[i];
    if (g.Cu > 0) {
      const Strides4 xs{f.stride(0), f.stride(1), f.stride(2), f.stride(3)};
      const Launch l = launch_for(g.Cu, grid * grid, B);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "resize_concat_cuda", [&] {
        forward_kernel<scalar_t><<<l.grid, l.block, 0, stream>>>(
            f.const_data_ptr<scalar_t>(), xs, g.u, static_cast<int>(g.n), static_cast<int>(g.Cu), G,
            static_cast<int>(B), g.identity, out.mutable_data_ptr<scalar_t>(), ctot, off);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    off += g.Cu;
  }
  return out;
}

// CSR tables of every non-identity feature, on the device: idx = [rowptr (n+1) | gidx (nnz)] per
// feature, wt = [weights (nnz)] per feature.
template <typename acc_t>
struct Tables {
  at::Tensor idx, wt;
  std::vector<int64_t> rp_off, e_off;  // per feature: offset of rowptr / of its entries (gidx in idx, wt)
};

template <typename acc_t>
Tables<acc_t> build_tables(const std::vector<FeatureGeom>& geom, int G, const at::Device& dev) {
  Tables<acc_t> t;
  t.rp_off.assign(geom.size(), -1);
  t.e_off.assign(geom.size(), -1);
  int64_t nidx = 0, nwt = 0;
  for (size_t i = 0; i < geom.size(); ++i) {
    if (geom[i].identity) continue;
    t.rp_off[i] = nidx;
    t.e_off[i] = nwt;
    nidx += geom[i].n + 1 + 2 * static_cast<int64_t>(G);
    nwt += 2 * static_cast<int64_t>(G);
  }
  if (nwt == 0) return t;
  TORCH_CHECK(nidx <= INT_MAX, "resize_concat_backward: tables too large");
  constexpr auto wdtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  at::Tensor hidx = at::empty({nidx}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  at::Tensor hwt = at::empty({nwt}, at::TensorOptions().dtype(wdtype).pinned_memory(true));
  int32_t* pidx = hidx.mutable_data_ptr<int32_t>();
  acc_t* pwt = hwt.mutable_data_ptr<acc_t>();
  std::vector<int32_t> fill;
  for (size_t i = 0; i < geom.size(); ++i) {
    if (geom[i].identity) continue;
    const int n = static_cast<int>(geom[i].n);
    int32_t* rowptr = pidx + t.rp_off[i];
    int32_t* gidx = rowptr + n + 1;  // entries right after rowptr, numbered from 0 like w
    acc_t* w = pwt + t.e_off[i];
    std::fill(rowptr, rowptr + n + 1, 0);
    for (int g = 0; g < G; ++g) {
      const AxisTap<acc_t> a = axis_tap<acc_t>(g, n, G);
      ++rowptr[a.i0 + 1];
      ++rowptr[a.i1 + 1];
    }
    for (int k = 0; k < n; ++k) rowptr[k + 1] += rowptr[k];
    fill.assign(rowptr, rowptr + n);
    for (int g = 0; g < G; ++g) {  // g ascending within every row
      const AxisTap<acc_t> a = axis_tap<acc_t>(g, n, G);
      gidx[fill[a.i0]] = g;
      w[fill[a.i0]++] = a.l0;
      gidx[fill[a.i1]] = g;
      w[fill[a.i1]++] = a.l1;
    }
  }
  t.idx = at::empty({nidx}, at::TensorOptions().dtype(at::kInt).device(dev));
  t.wt = at::empty({nwt}, at::TensorOptions().dtype(wdtype).device(dev));
  t.idx.copy_(hidx, /*non_blocking=*/true);  // the host allocator records the stream: safe to free
  t.wt.copy_(hwt, /*non_blocking=*/true);
  return t;
}

std::vector<at::Tensor> resize_concat_backward_cuda(const at::Tensor& grad, at::TensorList features, int64_t grid,
                                                    at::IntArrayRef unshuffle) {
  const auto geom = check_features(features, grid, unshuffle, "resize_concat_backward");
  const at::Tensor& f0 = features[0];
  const int64_t B = f0.size(0);
  int64_t ctot = 0;
  for (const auto& g : geom) ctot += g.Cu;
  TORCH_CHECK(grad.is_cuda() && grad.device() == f0.device(), "resize_concat_backward: grad on ", grad.device(),
              ", features on ", f0.device());
  TORCH_CHECK(grad.scalar_type() == f0.scalar_type(), "resize_concat_backward: grad has dtype ", grad.scalar_type(),
              ", features have ", f0.scalar_type());
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == grid * grid && grad.size(2) == ctot,
              "resize_concat_backward: grad of shape ", grad.sizes(), ", expected (", B, ", ", grid * grid, ", ", ctot,
              ")");
  c10::cuda::CUDAGuard guard(f0.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int G = static_cast<int>(grid);
  // grad strides: b, cell, channel (Strides4.y carries the cell stride, .c the channel stride).
  const Strides4 gs{grad.stride(0), grad.stride(2), grad.stride(1), 0};
  std::vector<at::Tensor> grads;
  grads.reserve(features.size());
  for (const auto& f : features) grads.push_back(at::empty_like(f));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "resize_concat_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const Tables<acc_t> tabs = build_tables<acc_t>(geom, G, f0.device());
    int64_t off = 0;
    for (size_t i = 0; i < features.size(); ++i) {
      const FeatureGeom& g = geom[i];
      at::Tensor& gi = grads[i];
      if (gi.numel() > 0) {
        const Strides4 is{gi.stride(0), gi.stride(1), gi.stride(2), gi.stride(3)};
        const int32_t* rowptr = nullptr;
        const int32_t* gidx = nullptr;
        const acc_t* wt = nullptr;
        if (!g.identity) {
          rowptr = tabs.idx.template const_data_ptr<int32_t>() + tabs.rp_off[i];
          gidx = rowptr + g.n + 1;  // entry e of this feature: (gidx[e], wt[e]), e in rowptr's range
          wt = tabs.wt.template const_data_ptr<acc_t>() + tabs.e_off[i];
        }
        const Launch l = launch_for(g.Cu, g.n * g.n, B);
        backward_kernel<scalar_t><<<l.grid, l.block, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), gs, off, g.u, static_cast<int>(g.n), static_cast<int>(g.Cu), G,
            static_cast<int>(B), g.identity, rowptr, gidx, wt, gi.mutable_data_ptr<scalar_t>(), is);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      off += g.Cu;
    }
  });
  return grads;
}

}  // namespace
}  // namespace eagle_fast::resize_concat

TORCH_LIBRARY_IMPL(eagle_fast, CUDA, m) {
  m.impl("resize_concat", &eagle_fast::resize_concat::resize_concat_cuda);
  m.impl("resize_concat_backward", &eagle_fast::resize_concat::resize_concat_backward_cuda);
}
