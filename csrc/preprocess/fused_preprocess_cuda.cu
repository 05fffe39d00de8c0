// CUDA kernel of eagle_fast::fused_preprocess (semantics: _fused_preprocess_reference in
// eagle_fast/ops/fused_preprocess.py; shared maths: fused_preprocess.h).
//
// Flow, all on the current stream:
//   host: every resampling table (Pillow bicubic per image, clip align_corners, pix2struct
//         antialiased bilinear) packed into one pinned int32 buffer -> one async H2D copy.
//   per image: canvas_hpass (source rows Pillow's ybox needs -> tmp (ny, S, 3) uint8)
//              canvas_vpass (tmp -> canvas (S, S, 3) uint8 + pixel_values (3, S, S) + histogram)
//   batched:   clip_kernel, p2s_stats, p2s_hpass / p2s_vpass (chunks of images), p2s_meta.
// Float sums use __fmul_rn / __fadd_rn so nvcc cannot contract them into FMAs: the GPU then
// rounds like the CPU kernel and torch's CPU reference, in the order they sum.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstring>

#include "preprocess/fused_preprocess.h"
#include "preprocess/fused_preprocess_checks.h"

namespace eagle_fast::preprocess {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxVpassBlocks = 1024;                  // grid-stride cap: ~one wave on an H100
constexpr int64_t kP2sTmpBudget = int64_t(128) << 20;  // bytes of pix2struct temp per chunk

struct Rgb8 {
  uint8_t v[3];
};
struct Norm {
  float mean[3], std[3];
};

unsigned int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  TORCH_CHECK(b >= 1 && b <= INT_MAX, "fused_preprocess: launch of ", n, " threads out of range");
  return static_cast<unsigned int>(b);
}

// ---------------------------------------------------------------------------- canvas (Pillow)

// Horizontal Pillow pass for one image, only the S crop columns and the source rows
// [y0, y0 + ny) that the vertical taps read. The source is virtual: img (h, w, 3) sits at
// (top, left) inside a fill-coloured square (pad mode; top = left = 0 otherwise).
// tab = [start (S) | count (S) | weights (S * k)], start in source columns.  tmp: (ny, S, 3).
__global__ void __launch_bounds__(kThreads)
    canvas_hpass_kernel(const uint8_t* __restrict__ img, int h, int w, int top, int left, Rgb8 fill,
                        const int32_t* __restrict__ tab, int k, int S, int y0, int ny, uint8_t* __restrict__ tmp) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(ny) * S) return;
  const int x = static_cast<int>(i % S);
  const int y = y0 + static_cast<int>(i / S) - top;  // row inside the real image
  const int s0 = tab[x], n = tab[S + x];
  const int32_t* wt = tab + 2 * static_cast<int64_t>(S) + static_cast<int64_t>(x) * k;
  int32_t acc[3] = {kHalf, kHalf, kHalf};
  const bool row_in = y >= 0 && y < h;
  const uint8_t* row = img + (row_in ? static_cast<int64_t>(y) * w * 3 : 0);
  for (int t = 0; t < n; ++t) {
    const int xs = s0 + t - left;  // column inside the real image
    const bool in = row_in && xs >= 0 && xs < w;
    const uint8_t* p = row + static_cast<int64_t>(in ? xs : 0) * 3;
#pragma unroll
    for (int c = 0; c < 3; ++c) acc[c] += static_cast<int32_t>(in ? p[c] : fill.v[c]) * wt[t];
  }
#pragma unroll
  for (int c = 0; c < 3; ++c) tmp[i * 3 + c] = clip8(acc[c]);
}

// Vertical Pillow pass for one image: tmp (ny, S, 3), whose row 0 is source row y0 ->
// canvas (S, S, 3) uint8; fused: pixel_values (3, S, S) = clip_normalize, and, when hist is
// given, this image's 256-bin histogram of the canvas bytes (pix2struct statistics).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    canvas_vpass_kernel(const uint8_t* __restrict__ tmp, const int32_t* __restrict__ tab, int k, int S, int y0,
                        Norm nrm, uint8_t* __restrict__ canvas, T* __restrict__ pv,
                        unsigned long long* __restrict__ hist) {
  __shared__ unsigned int bins[256];
  if (hist != nullptr) {  // uniform over the grid: the barriers below are safe
    for (int j = threadIdx.x; j < 256; j += blockDim.x) bins[j] = 0;
    __syncthreads();
  }
  const int64_t plane = static_cast<int64_t>(S) * S;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < plane; i += stride) {
    const int y = static_cast<int>(i / S), x = static_cast<int>(i % S);
    const int s0 = tab[y] - y0, n = tab[S + y];
    const int32_t* wt = tab + 2 * static_cast<int64_t>(S) + static_cast<int64_t>(y) * k;
    int32_t acc[3] = {kHalf, kHalf, kHalf};
    for (int t = 0; t < n; ++t) {
      const uint8_t* p = tmp + (static_cast<int64_t>(s0 + t) * S + x) * 3;
#pragma unroll
      for (int c = 0; c < 3; ++c) acc[c] += static_cast<int32_t>(p[c]) * wt[t];
    }
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      const uint8_t u = clip8(acc[c]);
      canvas[i * 3 + c] = u;
      pv[c * plane + i] = static_cast<T>(clip_normalize(u, nrm.mean[c], nrm.std[c]));
      if (hist != nullptr) atomicAdd(&bins[u], 1u);
    }
  }
  if (hist != nullptr) {
    __syncthreads();
    for (int j = threadIdx.x; j < 256; j += blockDim.x)
      if (bins[j] != 0) atomicAdd(&hist[j], static_cast<unsigned long long>(bins[j]));
  }
}

// ---------------------------------------------------------------------------- clip

// Bilinear align_corners=True from the normalized canvas: canvas (B, S, S, 3) -> out
// (B, 3, c, c). tab = [i0 (c) | i1 (c) | lambda1 as float bits (c)], the same along h and w
// (square in, square out), computed on the host with linear_align_corners.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    clip_kernel(const uint8_t* __restrict__ canvas, int S, const int32_t* __restrict__ tab, int c, Norm nrm,
                T* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t area = static_cast<int64_t>(c) * c;
  if (i >= area) return;
  const int b = blockIdx.y, oy = static_cast<int>(i / c), ox = static_cast<int>(i % c);
  const int64_t h0 = tab[oy], h1 = tab[c + oy], w0 = tab[ox], w1 = tab[c + ox];
  const float l1h = __int_as_float(tab[2 * c + oy]), l1w = __int_as_float(tab[2 * c + ox]);
  const float l0h = 1.f - l1h, l0w = 1.f - l1w;
  const uint8_t* img = canvas + static_cast<int64_t>(b) * S * S * 3;
#pragma unroll
  for (int ch = 0; ch < 3; ++ch) {
    const float m = nrm.mean[ch], s = nrm.std[ch];
    const float v00 = clip_normalize(img[(h0 * S + w0) * 3 + ch], m, s);
    const float v01 = clip_normalize(img[(h0 * S + w1) * 3 + ch], m, s);
    const float v10 = clip_normalize(img[(h1 * S + w0) * 3 + ch], m, s);
    const float v11 = clip_normalize(img[(h1 * S + w1) * 3 + ch], m, s);
    const float top = __fadd_rn(__fmul_rn(l0w, v00), __fmul_rn(l1w, v01));
    const float bot = __fadd_rn(__fmul_rn(l0w, v10), __fmul_rn(l1w, v11));
    out[(static_cast<int64_t>(b) * 3 + ch) * area + i] =
        static_cast<T>(__fadd_rn(__fmul_rn(l0h, top), __fmul_rn(l1h, bot)));
  }
}

// ---------------------------------------------------------------------------- pix2struct

// Block-wide sum of one double per thread (blockDim.x == 256).
__device__ double block_sum_256(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned int s = 128; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const double r = red[0];
  __syncthreads();  // red is reused by the next call
  return r;
}

// One block of 256 per image: hist (B, 256) counts of the n = 3*S*S canvas bytes ->
// stats (B, 2) = (mean, max(population std, 1/sqrt(n))), in double (the counts are exact).
__global__ void __launch_bounds__(256)
    p2s_stats_kernel(const unsigned long long* __restrict__ hist, int64_t n, double* __restrict__ stats) {
  __shared__ double red[256];
  const int b = blockIdx.x, j = threadIdx.x;
  const double cnt = static_cast<double>(hist[b * 256 + j]);
  const double mean = block_sum_256(cnt * j, red) / static_cast<double>(n);
  const double d = j - mean;
  const double var = block_sum_256(cnt * d * d, red) / static_cast<double>(n);
  if (j == 0) {
    stats[2 * b] = mean;
    stats[2 * b + 1] = fmax(sqrt(var), 1.0 / sqrt(static_cast<double>(n)));
  }
}

// Antialiased bilinear, horizontal pass, images b0 + blockIdx.y: canvas (B, S, S, 3) uint8 ->
// tmp (chunk, S, Wo, 3) float. tab = [start (Wo) | count (Wo) | weights as float bits (Wo * k)].
__global__ void __launch_bounds__(kThreads)
    p2s_hpass_kernel(const uint8_t* __restrict__ canvas, int S, const int32_t* __restrict__ tab, int k, int Wo, int b0,
                     float* __restrict__ tmp) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t area = static_cast<int64_t>(S) * Wo;
  if (i >= area) return;
  const int y = static_cast<int>(i / Wo), x = static_cast<int>(i % Wo);
  const uint8_t* row = canvas + ((static_cast<int64_t>(b0) + blockIdx.y) * S + y) * S * 3;
  const int s0 = tab[x], n = tab[Wo + x];
  const int32_t* wt = tab + 2 * static_cast<int64_t>(Wo) + static_cast<int64_t>(x) * k;
  float acc[3] = {0.f, 0.f, 0.f};
  for (int t = 0; t < n; ++t) {
    const float wv = __int_as_float(wt[t]);
    const uint8_t* p = row + static_cast<int64_t>(s0 + t) * 3;
#pragma unroll
    for (int c = 0; c < 3; ++c) acc[c] = __fadd_rn(acc[c], __fmul_rn(static_cast<float>(p[c]), wv));
  }
  float* o = tmp + (blockIdx.y * area + i) * 3;
#pragma unroll
  for (int c = 0; c < 3; ++c) o[c] = acc[c];
}

// Vertical pass + standardization + patch layout: tmp (chunk, S, Wo, 3) -> patches (B, P, D),
// D = 2 + p*p*3; output pixel (y, x) of image b lands in patch (y/p)*cols + x/p at
// 2 + ((y%p)*p + x%p)*3 + ch. tab = [start (Ho) | count (Ho) | weights bits (Ho * k)].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    p2s_vpass_kernel(const float* __restrict__ tmp, int S, const int32_t* __restrict__ tab, int k, int Ho, int Wo,
                     int b0, const double* __restrict__ stats, int p, int cols, int P, T* __restrict__ patches) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(Ho) * Wo) return;
  const int y = static_cast<int>(i / Wo), x = static_cast<int>(i % Wo);
  const int64_t b = static_cast<int64_t>(b0) + blockIdx.y;
  const int s0 = tab[y], n = tab[Ho + y];
  const int32_t* wt = tab + 2 * static_cast<int64_t>(Ho) + static_cast<int64_t>(y) * k;
  const float* col = tmp + (static_cast<int64_t>(blockIdx.y) * S * Wo + x) * 3;
  float acc[3] = {0.f, 0.f, 0.f};
  for (int t = 0; t < n; ++t) {
    const float wv = __int_as_float(wt[t]);
    const float* q = col + static_cast<int64_t>(s0 + t) * Wo * 3;
#pragma unroll
    for (int c = 0; c < 3; ++c) acc[c] = __fadd_rn(acc[c], __fmul_rn(q[c], wv));
  }
  const double mean = stats[2 * b], adj = stats[2 * b + 1];
  const int64_t D = 2 + static_cast<int64_t>(p) * p * 3;
  const int64_t patch = static_cast<int64_t>(y / p) * cols + x / p;
  T* o = patches + (b * P + patch) * D + 2 + (static_cast<int64_t>(y % p) * p + x % p) * 3;
#pragma unroll
  for (int c = 0; c < 3; ++c) o[c] = static_cast<T>(static_cast<float>((acc[c] - mean) / adj));
}

// Row/col ids (1-based) of the real patches and the attention mask; patches (B, P, D), mask (B, P).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    p2s_meta_kernel(int P, int n_real, int cols, int64_t D, T* __restrict__ patches, T* __restrict__ mask) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= P) return;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * P + k;
  mask[r] = static_cast<T>(k < n_real ? 1.f : 0.f);
  if (k < n_real) {
    patches[r * D] = static_cast<T>(static_cast<float>(k / cols + 1));
    patches[r * D + 1] = static_cast<T>(static_cast<float>(k % cols + 1));
  }
}

// ---------------------------------------------------------------------------- host

// Appends outputs [first, first + n) of a table as [start (n) | count (n) | weights (n * k)]
// (float weights as their bits); returns the offset in buf.
template <typename W>
int64_t append_taps(std::vector<int32_t>& buf, const Taps<W>& t, int first, int n) {
  const int64_t off = static_cast<int64_t>(buf.size());
  buf.insert(buf.end(), t.start.begin() + first, t.start.begin() + first + n);
  buf.insert(buf.end(), t.count.begin() + first, t.count.begin() + first + n);
  for (size_t j = static_cast<size_t>(first) * t.ksize; j < static_cast<size_t>(first + n) * t.ksize; ++j) {
    int32_t bits;
    std::memcpy(&bits, &t.w[j], sizeof(bits));
    buf.push_back(bits);
  }
  return off;
}

// Pillow skips a pass whose size does not change: an identity table (one tap of weight 1.0 in
// fixed point; clip8 then returns the byte unchanged) keeps both passes uniform.
Taps<int32_t> bicubic_or_identity(int in_size, int out_size) {
  if (in_size != out_size) return pil_bicubic_taps(in_size, out_size);
  Taps<int32_t> t;
  t.ksize = 1;
  t.start.resize(in_size);
  for (int i = 0; i < in_size; ++i) t.start[i] = i;
  t.count.assign(in_size, 1);
  t.w.assign(in_size, int32_t(1) << kPrecisionBits);
  return t;
}

struct ImageJob {
  CanvasPlan plan;
  int h, w, kh, kv, y0, ny;  // ny source rows from y0 feed the vertical taps (Pillow's ybox)
  int64_t h_off, v_off;      // canvas tables in the buffer
};

// Everything the host derives before the launches; offsets index the device table `tab`.
struct Launch {
  int S, clip_size, P, p, rows = 0, cols = 0, p2s_kh = 0, p2s_kv = 0;
  Rgb8 fill;
  Norm nrm;
  std::vector<ImageJob> jobs;
  int64_t clip_off = 0, p2s_h_off = 0, p2s_v_off = 0, max_tmp = 1;
  const int32_t* tab = nullptr;
};

template <typename T>
void launch_all(at::TensorList images, const Launch& L, at::Tensor& pv, at::Tensor& clip, at::Tensor& patches,
                at::Tensor& mask) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int S = L.S, clip_size = L.clip_size, P = L.P, p = L.p, rows = L.rows, cols = L.cols;
  const int32_t* tab = L.tab;
  const Rgb8 fill = L.fill;
  const Norm nrm = L.nrm;
  const int B = static_cast<int>(images.size());
  const auto dev = images[0].device();
  const auto u8 = at::TensorOptions().dtype(at::kByte).device(dev);
  at::Tensor canvas = at::empty({B, S, S, 3}, u8);
  at::Tensor tmp = at::empty({L.max_tmp}, u8);  // reused image after image (stream order)
  at::Tensor hist;
  unsigned long long* hist_p = nullptr;
  if (P > 0) {
    hist = at::zeros({B, 256}, at::TensorOptions().dtype(at::kLong).device(dev));
    hist_p = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  }
  const int64_t plane = static_cast<int64_t>(S) * S;
  const unsigned int vblocks = std::min<unsigned int>(blocks_for(plane), kMaxVpassBlocks);
  for (int b = 0; b < B; ++b) {
    const ImageJob& j = L.jobs[b];
    canvas_hpass_kernel<<<blocks_for(static_cast<int64_t>(j.ny) * S), kThreads, 0, stream>>>(
        images[b].data_ptr<uint8_t>(), j.h, j.w, j.plan.img_top, j.plan.img_left, fill, tab + j.h_off, j.kh, S, j.y0,
        j.ny, tmp.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    canvas_vpass_kernel<T><<<vblocks, kThreads, 0, stream>>>(
        tmp.data_ptr<uint8_t>(), tab + j.v_off, j.kv, S, j.y0, nrm, canvas.data_ptr<uint8_t>() + b * plane * 3,
        pv.data_ptr<T>() + b * plane * 3, hist_p == nullptr ? nullptr : hist_p + b * 256);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (clip_size > 0) {
    const dim3 grid(blocks_for(static_cast<int64_t>(clip_size) * clip_size), B);
    clip_kernel<T><<<grid, kThreads, 0, stream>>>(canvas.data_ptr<uint8_t>(), S, tab + L.clip_off, clip_size, nrm,
                                                  clip.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (P == 0) return;
  at::Tensor stats = at::empty({B, 2}, at::TensorOptions().dtype(at::kDouble).device(dev));
  p2s_stats_kernel<<<B, 256, 0, stream>>>(hist_p, 3 * plane, stats.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The horizontal temp is (S, Wo, 3) floats per image: batch images in chunks that fit the budget.
  const int Ho = rows * p, Wo = cols * p;
  const int64_t per_image = static_cast<int64_t>(S) * Wo * 3;  // floats
  const int chunk = static_cast<int>(std::clamp<int64_t>(kP2sTmpBudget / (per_image * 4), 1, B));
  at::Tensor ptmp = at::empty({chunk * per_image}, at::TensorOptions().dtype(at::kFloat).device(dev));
  for (int b0 = 0; b0 < B; b0 += chunk) {
    const int nb = std::min(chunk, B - b0);
    p2s_hpass_kernel<<<dim3(blocks_for(static_cast<int64_t>(S) * Wo), nb), kThreads, 0, stream>>>(
        canvas.data_ptr<uint8_t>(), S, tab + L.p2s_h_off, L.p2s_kh, Wo, b0, ptmp.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    p2s_vpass_kernel<T><<<dim3(blocks_for(static_cast<int64_t>(Ho) * Wo), nb), kThreads, 0, stream>>>(
        ptmp.data_ptr<float>(), S, tab + L.p2s_v_off, L.p2s_kv, Ho, Wo, b0, stats.data_ptr<double>(), p, cols, P,
        patches.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int n_real = rows * cols;
  p2s_meta_kernel<T><<<dim3(blocks_for(P), B), kThreads, 0, stream>>>(P, n_real, cols, patches.size(2),
                                                                      patches.data_ptr<T>(), mask.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (n_real < P) patches.narrow(1, n_real, P - n_real).zero_();  // padding patches (ATen, same stream)
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_preprocess_cuda(
    at::TensorList images, int64_t canvas_size, bool pad, at::IntArrayRef fill, at::ArrayRef<double> mean,
    at::ArrayRef<double> std, int64_t clip_size, int64_t p2s_max_patches, int64_t p2s_patch, at::ScalarType dtype) {
  check_arguments(images, canvas_size, fill, mean, std, clip_size, p2s_max_patches, p2s_patch, dtype);
  // CUDA's own: one device, contiguous images, and the launch limits (the batch is grid.y; sizes
  // and tables index in int).
  TORCH_CHECK(images.size() <= 65535, "fused_preprocess: ", images.size(), " images, at most 65535 per call on CUDA");
  TORCH_CHECK(canvas_size <= 16384 && clip_size <= 16384 && p2s_max_patches <= (1 << 20) &&
                  (p2s_max_patches == 0 || p2s_patch <= 1024),
              "fused_preprocess: sizes out of range for the CUDA kernel (canvas ", canvas_size, ", clip ", clip_size,
              ", max_patches ", p2s_max_patches, ", patch ", p2s_patch, "; limits 16384, 16384, 2**20, 1024)");
  const at::Device dev = images[0].device();
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor& im = images[i];
    TORCH_CHECK(im.is_cuda() && im.device() == dev, "fused_preprocess: image ", i, " on ", im.device(),
                ", expected a CUDA device, the one of image 0 (", dev, ")");
    TORCH_CHECK(im.size(0) <= (1 << 20) && im.size(1) <= (1 << 20), "fused_preprocess: image ", i, " has shape ",
                im.sizes(), ", at most 2**20 rows and columns on CUDA");
    TORCH_CHECK(im.is_contiguous(), "fused_preprocess: image ", i, " is not contiguous");
  }
  Launch L;
  L.S = static_cast<int>(canvas_size);
  L.clip_size = static_cast<int>(clip_size);
  L.P = static_cast<int>(p2s_max_patches);
  L.p = static_cast<int>(p2s_patch);
  const int S = L.S, c = L.clip_size;
  for (int ch = 0; ch < 3; ++ch) {
    L.fill.v[ch] = static_cast<uint8_t>(fill[ch]);
    L.nrm.mean[ch] = static_cast<float>(mean[ch]);  // float32, as the reference's mean/std tensors
    L.nrm.std[ch] = static_cast<float>(std[ch]);
  }
  c10::cuda::CUDAGuard guard(dev);

  // Every table on the host, in one int32 buffer: per image the crop window of each pass.
  std::vector<int32_t> buf;
  L.jobs.resize(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    ImageJob& j = L.jobs[i];
    j.h = static_cast<int>(images[i].size(0));
    j.w = static_cast<int>(images[i].size(1));
    j.plan = plan_canvas(j.h, j.w, S, pad);
    const auto th = bicubic_or_identity(j.plan.src_w, j.plan.resized_w);
    const auto tv = bicubic_or_identity(j.plan.src_h, j.plan.resized_h);
    j.kh = th.ksize;
    j.kv = tv.ksize;
    j.h_off = append_taps(buf, th, j.plan.crop_left, S);
    j.v_off = append_taps(buf, tv, j.plan.crop_top, S);
    int lo = INT_MAX, hi = 0;  // source rows the crop window's vertical taps read
    for (int y = j.plan.crop_top; y < j.plan.crop_top + S; ++y) {
      lo = std::min(lo, tv.start[y]);
      hi = std::max(hi, tv.start[y] + tv.count[y]);
    }
    j.y0 = lo;
    j.ny = std::max(hi - lo, 1);
    L.max_tmp = std::max(L.max_tmp, static_cast<int64_t>(j.ny) * S * 3);
  }
  if (c > 0) {  // [i0 (c) | i1 (c) | lambda1 bits (c)]
    L.clip_off = static_cast<int64_t>(buf.size());
    buf.resize(buf.size() + 3 * static_cast<size_t>(c));
    const float scale = align_corners_scale(S, c);
    for (int d = 0; d < c; ++d) {
      int i0, i1;
      float l1;
      linear_align_corners(d, S, scale, i0, i1, l1);
      buf[L.clip_off + d] = i0;
      buf[L.clip_off + c + d] = i1;
      std::memcpy(&buf[L.clip_off + 2 * c + d], &l1, sizeof(l1));
    }
  }
  if (L.P > 0) {
    pix2struct_grid(S, S, L.P, L.p, L.rows, L.cols);
    TORCH_CHECK(static_cast<int64_t>(L.rows) * L.cols <= L.P, "fused_preprocess: pix2struct grid ", L.rows, "x", L.cols,
                " exceeds ", L.P, " patches");
    const auto th = aa_bilinear_taps(S, L.cols * L.p), tv = aa_bilinear_taps(S, L.rows * L.p);
    L.p2s_kh = th.ksize;
    L.p2s_kv = tv.ksize;
    L.p2s_h_off = append_taps(buf, th, 0, L.cols * L.p);
    L.p2s_v_off = append_taps(buf, tv, 0, L.rows * L.p);
  }
  const int64_t nbuf = static_cast<int64_t>(buf.size());
  at::Tensor host = at::empty({nbuf}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  std::memcpy(host.data_ptr<int32_t>(), buf.data(), buf.size() * sizeof(int32_t));
  const auto opts = at::TensorOptions().dtype(dtype).device(dev);
  at::Tensor tab = at::empty({nbuf}, opts.dtype(at::kInt));
  tab.copy_(host, /*non_blocking=*/true);  // the host allocator records the stream: safe to free
  L.tab = tab.data_ptr<int32_t>();

  const int64_t B = static_cast<int64_t>(images.size());
  at::Tensor pv = at::empty({B, 3, S, S}, opts);
  at::Tensor clip = c > 0 ? at::empty({B, 3, c, c}, opts) : at::empty({0}, opts);
  at::Tensor patches = L.P > 0 ? at::empty({B, L.P, 2 + int64_t(L.p) * L.p * 3}, opts) : at::empty({0}, opts);
  at::Tensor mask = L.P > 0 ? at::empty({B, L.P}, opts) : at::empty({0}, opts);
  if (dtype == at::kFloat) {
    launch_all<float>(images, L, pv, clip, patches, mask);
  } else {
    launch_all<at::BFloat16>(images, L, pv, clip, patches, mask);
  }
  return {pv, clip, patches, mask};
}

}  // namespace eagle_fast::preprocess

TORCH_LIBRARY_IMPL(eagle_fast, CUDA, m) {
  m.impl("fused_preprocess", &eagle_fast::preprocess::fused_preprocess_cuda);
}
