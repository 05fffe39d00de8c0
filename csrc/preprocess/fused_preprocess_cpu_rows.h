// Row-level CPU kernels of eagle_fast::fused_preprocess (included by fused_preprocess_cpu.cpp only):
// Pillow's fixed-point passes, normalization, moments, output stores and Pix2Struct's
// antialiased resample of one row. Each works on contiguous memory; the hot ones are compiled
// for AVX-512 / AVX2 / baseline and picked at load time.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu_isa.h"
#include "common/rgb_vec.h"
#include "preprocess/fused_preprocess.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Hot loops get AVX-512 and AVX2 clones picked at load time (ifunc, common/cpu_isa.h), keeping the
// wheel portable: the integer multiply-accumulate of Pillow's fixed point needs 32-bit lane
// multiplies (SSE4.1+).
#define EF_MULTIVERSION EF_CLONES_V4

namespace eagle_fast::preprocess {
namespace {

// Horizontal passes run on blocks of kRows rows transposed to (width, kRows * 3): every tap then
// is one multiply-add over kLanes contiguous lanes, which vectorizes without gathers.
constexpr int kRows = 16;
constexpr int kLanes = kRows * 3;

// Interleaved RGB rows (up to kRows) -> column-major block (width, kLanes), missing rows zero.
template <typename Acc, typename Src>
void transpose_rows(const Src* const* rows, int nrows, int width, Acc* __restrict block) {
  for (int x = 0; x < width; ++x) {
    Acc* col = block + static_cast<int64_t>(x) * kLanes;
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < 3; ++c) col[r * 3 + c] = r < nrows ? static_cast<Acc>(rows[r][x * 3 + c]) : Acc(0);
  }
}

// acc[l] = init + sum_i block[(start + i) * kLanes + l] * k[i], for the kLanes lanes of a block.
template <typename Acc, typename W>
inline void block_taps(const Acc* __restrict block, int start, const W* k, int n, Acc init, Acc* __restrict acc) {
  for (int l = 0; l < kLanes; ++l) acc[l] = init;
  const Acc* col = block + static_cast<int64_t>(start) * kLanes;
  for (int i = 0; i < n; ++i, col += kLanes) {
    const Acc ki = static_cast<Acc>(k[i]);
    for (int l = 0; l < kLanes; ++l) acc[l] += col[l] * ki;
  }
}

// One horizontal Pillow pass over a block of source rows: outputs [first, first + count) of the
// resized rows, clip8'ed into `outs` (interleaved RGB).
EF_MULTIVERSION void pil_block_horizontal(const uint8_t* const* rows, int nrows, int src_w, const Taps<int32_t>& t,
                                          int first, int count, int32_t* block, uint8_t* const* outs) {
  transpose_rows(rows, nrows, src_w, block);
  alignas(64) int32_t acc[kLanes];
  for (int x = 0; x < count; ++x) {
    const int xx = first + x;
    block_taps(block, t.start[xx], &t.w[static_cast<size_t>(xx) * t.ksize], t.count[xx], kHalf, acc);
    for (int r = 0; r < nrows; ++r)
      for (int c = 0; c < 3; ++c) outs[r][x * 3 + c] = clip8(acc[r * 3 + c]);
  }
}

// Vertical Pillow pass for one output row: out[j] = clip8(kHalf + sum_i rows[i][j] * k[i]), j over
// width3 bytes. Adds the row's byte sum and sum of squares (Pix2Struct's moments) to *sum, *sumsq
// while the row is in L1.
EF_MULTIVERSION void pil_row_vertical(const uint8_t* rows, int64_t stride, const int32_t* k, int n, int width3,
                                      int32_t* __restrict acc, uint8_t* __restrict out, int64_t* sum, int64_t* sumsq) {
  for (int j = 0; j < width3; ++j) acc[j] = kHalf;
  for (int i = 0; i < n; ++i) {
    const uint8_t* __restrict r = rows + i * stride;
    const int32_t ki = k[i];
    for (int j = 0; j < width3; ++j) acc[j] += r[j] * ki;
  }
  // 32-bit partial sums vectorize; chunks of 8192 bytes keep the sum of squares below 2**32.
  for (int base = 0; base < width3; base += 8192) {
    uint32_t s32 = 0, q32 = 0;
    for (int j = base; j < std::min(width3, base + 8192); ++j) {
      // clip8 without branches (vectorizes): for ss > 0, ss >> 22 >= 256 exactly when ss >= 2**30.
      const uint32_t v = static_cast<uint32_t>(std::clamp(acc[j] >> kPrecisionBits, 0, 255));
      out[j] = static_cast<uint8_t>(v);
      s32 += v;
      q32 += v * v;
    }
    *sum += s32;
    *sumsq += q32;
  }
}

// Output rows are written once and not read again here: with AVX-512, 64-byte aligned runs go out
// as streaming stores, which skip the read-for-ownership of every output cache line (the output is
// the bulk of this op's memory traffic). Elsewhere, and for the unaligned edges, a plain copy.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("avx512f"))) void stream_copy_avx512(void* dst, const void* src, size_t n) {
  auto* d = static_cast<char*>(dst);
  auto* s = static_cast<const char*>(src);
  const size_t head = std::min(n, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
  std::memcpy(d, s, head);
  size_t i = head;
  for (; i + 64 <= n; i += 64) _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
  std::memcpy(d + i, s + i, n - i);
}
void stream_copy(void* dst, const void* src, size_t n) {
  if (__builtin_cpu_supports("avx512f")) {
    stream_copy_avx512(dst, src, n);
  } else {
    std::memcpy(dst, src, n);
  }
}
#else
void stream_copy(void* dst, const void* src, size_t n) {
  std::memcpy(dst, src, n);
}
#endif

// float -> output element. bf16 rounds to nearest-even with plain integer maths (no NaNs occur
// here), which vectorizes where c10::BFloat16's converting constructor does not.
inline void store(float v, float* dst) {
  *dst = v;
}
inline void store(float v, at::BFloat16* dst) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  *dst = at::BFloat16(static_cast<uint16_t>(bits >> 16), at::BFloat16::from_bits());
}

EF_MULTIVERSION void store_row(const float* __restrict src, int64_t n, at::BFloat16* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) store(src[i], dst + i);
}
inline void store_row(const float* src, int64_t n, float* dst) {
  std::memcpy(dst, src, n * sizeof(float));
}

// CLIP rescale + normalize of one canvas row into three float planes, with the numpy processor's
// exact arithmetic (u * (1/255) in double, cast to float, then (x - mean) / std in float).
EF_MULTIVERSION void normalize_row(const uint8_t* __restrict row, int width, const float* mean, const float* std,
                                   float* __restrict o0, float* __restrict o1, float* __restrict o2) {
  const float m0 = mean[0], m1 = mean[1], m2 = mean[2], s0 = std[0], s1 = std[1], s2 = std[2];
  for (int x = 0; x < width; ++x) {
    o0[x] = (static_cast<float>(row[x * 3 + 0] * (1.0 / 255.0)) - m0) / s0;
    o1[x] = (static_cast<float>(row[x * 3 + 1] * (1.0 / 255.0)) - m1) / s1;
    o2[x] = (static_cast<float>(row[x * 3 + 2] * (1.0 / 255.0)) - m2) / s2;
  }
}

// Linear interpolation along one row: out[i] = (1 - l[i]) * src[i0[i]] + l[i] * src[i1[i]], with
// i1 - i0 in {0, 1} and i0 non-decreasing (align_corners bilinear).
inline void linear_row_scalar(const float* __restrict src, const int* __restrict i0, const int* __restrict i1,
                              const float* __restrict l, int begin, int n, float* __restrict out) {
  for (int i = begin; i < n; ++i) out[i] = (1.f - l[i]) * src[i0[i]] + l[i] * src[i1[i]];
}

#if defined(EF_VECTOR_SHUFFLE)
// 16 outputs at a time whose reads lie within a 64-float window from src + i0[first]: each of the
// two taps is two two-register permutes and a select (AMD's gathers are slower than scalar loads).
// `src` must be readable up to 64 floats past the last window's start.
EF_MULTIVERSION void linear_row(const float* __restrict src, const int* __restrict i0, const int* __restrict i1,
                                const float* __restrict l, int n, float* __restrict out) {
  int i = 0;
  for (; i + 16 <= n && i1[i + 15] - i0[i] < 64; i += 16) {
    const float* w = src + i0[i];
    v16f q0, q1, q2, q3, lw;  // separate loads: a copy into an array would go through the stack
    std::memcpy(&q0, w, sizeof(q0));
    std::memcpy(&q1, w + 16, sizeof(q1));
    std::memcpy(&q2, w + 32, sizeof(q2));
    std::memcpy(&q3, w + 48, sizeof(q3));
    std::memcpy(&lw, l + i, sizeof(lw));
    v16i a, b;
    std::memcpy(&a, i0 + i, sizeof(a));
    std::memcpy(&b, i1 + i, sizeof(b));
    a -= i0[i];
    b -= i0[i];
    // permutes read the low 5 bits of each index; bit 5 picks the upper register pair
    const v16f va = a < 32 ? __builtin_shuffle(q0, q1, a) : __builtin_shuffle(q2, q3, a);
    const v16f vb = b < 32 ? __builtin_shuffle(q0, q1, b) : __builtin_shuffle(q2, q3, b);
    const v16f r = (1.f - lw) * va + lw * vb;
    std::memcpy(out + i, &r, sizeof(r));
  }
  linear_row_scalar(src, i0, i1, l, i, n, out);
}
#else
inline void linear_row(const float* src, const int* i0, const int* i1, const float* l, int n, float* out) {
  linear_row_scalar(src, i0, i1, l, 0, n, out);
}
#endif

// Sum and sum of squares of the canvas bytes: Pix2Struct's per-image mean/std, exact in integers.
struct Moments {
  std::atomic<int64_t> sum{0}, sumsq{0};
};

EF_MULTIVERSION void row_moments(const uint8_t* __restrict row, int64_t n, int64_t* sum, int64_t* sumsq) {
  // 32-bit partial sums vectorize; chunks of 8192 bytes keep the sum of squares below 2**31.
  int64_t s = 0, q = 0;
  for (int64_t base = 0; base < n; base += 8192) {
    const int64_t end = std::min<int64_t>(n, base + 8192);
    uint32_t s32 = 0, q32 = 0;
    for (int64_t j = base; j < end; ++j) {
      const uint32_t v = row[j];
      s32 += v;
      q32 += v * v;
    }
    s += s32;
    q += q32;
  }
  *sum += s;
  *sumsq += q;
}

// Pix2Struct's antialiased bilinear, vertical taps first (only fp32 rounding differs from torch's
// order). Vertical: canvas rows -> three float planes (S + slack each). Horizontal: 16 consecutive
// outputs at a time. When their reads fit one 32-float window (always for Eagle's 1024 -> 720),
// each tap is a two-register permute and a multiply-add over 16 lanes instead of 16 gathers.
constexpr int kWin = 16;

template <typename W>
struct WindowTaps {
  int ox0 = 0, n = 0;        // first output (relative to `first`) and valid lanes (<= kWin)
  int base = 0;              // first input pixel of the 2 * kWin window
  bool vec = false;          // false: a read falls outside the window, the scalar path handles it
  std::vector<int32_t> idx;  // (kmax, kWin), relative to base
  std::vector<W> w;          // (kmax, kWin), 0 past each output's own tap count
};

// Windows of kWin outputs [first, first + count) of a 1-D table, kmax = its largest tap count.
template <typename W>
std::vector<WindowTaps<W>> window_taps(const Taps<W>& th, int first, int count, int kmax) {
  std::vector<WindowTaps<W>> out;
  for (int ox0 = 0; ox0 < count; ox0 += kWin) {
    WindowTaps<W> c;
    c.ox0 = ox0;
    c.n = std::min(kWin, count - ox0);
    c.base = th.start[first + ox0];
    c.idx.assign(static_cast<size_t>(kmax) * kWin, 0);
    c.w.assign(static_cast<size_t>(kmax) * kWin, W(0));
#if defined(EF_VECTOR_SHUFFLE)
    c.vec = true;
#endif
    for (int l = 0; l < c.n; ++l) {
      const int ox = first + ox0 + l;
      for (int t = 0; t < th.count[ox]; ++t) {
        const int rel = th.start[ox] + t - c.base;
        c.vec = c.vec && rel < 2 * kWin;
        c.idx[t * kWin + l] = rel < 2 * kWin ? rel : 0;
        c.w[t * kWin + l] = th.w[static_cast<size_t>(ox) * th.ksize + t];
      }
    }
    out.push_back(std::move(c));
  }
  return out;
}

template <typename W>
bool all_windowed(const std::vector<WindowTaps<W>>& win) {
  return std::all_of(win.begin(), win.end(), [](const WindowTaps<W>& c) { return c.vec; });
}

#if defined(EF_VECTOR_SHUFFLE)
// Horizontal Pillow pass of one source row when every window of 16 outputs reads within 32 input
// pixels (upscaling, mild downscaling): int32 planes, one permute + multiply-add per tap over 16
// lanes, Pillow's clip8 on the vector. `planes` is (3, pw) with zeros past src_w.
EF_MULTIVERSION void pil_row_horizontal_window(const uint8_t* src, int src_w,
                                               const std::vector<WindowTaps<int32_t>>& win, int kmax, int32_t* planes,
                                               int64_t pw, uint8_t* out) {
  // (GCC vectorizes this stride-3 widening loop well; its generic u8 -> i32 vector conversion not.)
  for (int x = 0; x < src_w; ++x)
    for (int ch = 0; ch < 3; ++ch) planes[ch * pw + x] = src[x * 3 + ch];
  for (const WindowTaps<int32_t>& c : win) {
    v16i r[3];
    for (int ch = 0; ch < 3; ++ch) {
      const int32_t* p = planes + ch * pw + c.base;
      v16i lo, hi, idx, w;
      std::memcpy(&lo, p, sizeof(lo));
      std::memcpy(&hi, p + kWin, sizeof(hi));
      v16i acc = v16i{} + kHalf;
      for (int t = 0; t < kmax; ++t) {
        std::memcpy(&idx, &c.idx[t * kWin], sizeof(idx));
        std::memcpy(&w, &c.w[t * kWin], sizeof(w));
        acc += __builtin_shuffle(lo, hi, idx) * w;
      }
      v16i v = acc >> kPrecisionBits;  // clip8, lane-wise
      v = acc <= 0 ? v16i{} : v;
      r[ch] = acc >= (1 << kPrecisionBits << 8) ? v16i{} + 255 : v;
    }
    if (c.n == kWin) {
      store_rgb16(r[0], r[1], r[2], out + c.ox0 * 3);
    } else {
      uint8_t tail[3 * kWin];
      store_rgb16(r[0], r[1], r[2], tail);
      std::memcpy(out + c.ox0 * 3, tail, c.n * 3);
    }
  }
}
#endif

// One output row: vertical taps into planes (3, pw) (+ an S * 3 scratch row after them), then the
// horizontal taps, standardized, written straight into the flattened patches of its patch row:
// output pixel ox lands at out + (ox / p) * D + (ox % p) * 3 (out points at this row's first value
// in the first patch).
EF_MULTIVERSION void p2s_row(const uint8_t* canvas, int S, const Taps<float>& tv, const Taps<float>& th,
                             const std::vector<WindowTaps<float>>& win, int kmax, int oy, float mean, float inv_std,
                             float* planes, int64_t pw, float* out, int p, int64_t D) {
  // Vertical taps over the interleaved rows (contiguous, vectorizes well), then one deinterleave.
  const int64_t row3 = static_cast<int64_t>(S) * 3;
  float* __restrict row = planes + 3 * pw;
  for (int64_t j = 0; j < row3; ++j) row[j] = 0.f;
  const float* kv = &tv.w[static_cast<size_t>(oy) * tv.ksize];
  for (int i = 0; i < tv.count[oy]; ++i) {
    const uint8_t* __restrict src = canvas + (tv.start[oy] + i) * row3;
    const float k = kv[i];
    for (int64_t j = 0; j < row3; ++j) row[j] += src[j] * k;
  }
  int x = 0;
#if defined(EF_VECTOR_SHUFFLE)
  for (; x + kWin <= S; x += kWin) {
    v16f v[3], c[3];
    std::memcpy(v, row + x * 3, sizeof(v));
    deinterleave3(v[0], v[1], v[2], c);
    for (int ch = 0; ch < 3; ++ch) std::memcpy(planes + ch * pw + x, &c[ch], sizeof(v16f));
  }
#endif
  for (; x < S; ++x)
    for (int ch = 0; ch < 3; ++ch) planes[ch * pw + x] = row[x * 3 + ch];
  for (const WindowTaps<float>& c : win) {
#if defined(EF_VECTOR_SHUFFLE)
    if (c.vec) {
      v16f r[3], o[3];
      for (int ch = 0; ch < 3; ++ch) {
        const float* src = planes + ch * pw + c.base;
        v16f lo, hi, acc = {};
        std::memcpy(&lo, src, sizeof(lo));
        std::memcpy(&hi, src + kWin, sizeof(hi));
        for (int t = 0; t < kmax; ++t) {
          v16i idx;
          v16f w;
          std::memcpy(&idx, &c.idx[t * kWin], sizeof(idx));
          std::memcpy(&w, &c.w[t * kWin], sizeof(w));
          acc += __builtin_shuffle(lo, hi, idx) * w;
        }
        r[ch] = (acc - mean) * inv_std;
      }
      interleave3(r[0], r[1], r[2], o);
      if (p % kWin == 0) {  // the window lies in one patch row: 48 contiguous floats
        std::memcpy(out + (c.ox0 / p) * D + (c.ox0 % p) * 3, o, c.n * 3 * sizeof(float));
      } else {
        const float* v = reinterpret_cast<const float*>(o);
        for (int l = 0; l < c.n; ++l) {
          const int ox = c.ox0 + l;
          std::memcpy(out + (ox / p) * D + (ox % p) * 3, v + l * 3, 3 * sizeof(float));
        }
      }
      continue;
    }
#endif
    for (int l = 0; l < c.n; ++l) {
      const int ox = c.ox0 + l;
      const float* k = &th.w[static_cast<size_t>(ox) * th.ksize];
      for (int ch = 0; ch < 3; ++ch) {
        const float* src = planes + ch * pw + th.start[ox];
        float a = 0.f;
        for (int t = 0; t < th.count[ox]; ++t) a += src[t] * k[t];
        out[(ox / p) * D + (ox % p) * 3 + ch] = (a - mean) * inv_std;
      }
    }
  }
}

}  // namespace
}  // namespace eagle_fast::preprocess
