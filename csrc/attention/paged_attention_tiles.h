// The tiled path of the CPU paged_attention kernel: prompt chunks (many query rows per sequence).
//
// The row path (paged_attention_cpu.cpp) computes each query vector's scores as dot products, which
// suits a decode step (one row per sequence) but leaves a 512-row prompt chunk far from the FMA
// units' throughput. Here an item is (sequence, kv head, tile of up to kTileRows query rows): its
// M = rows * G query vectors (the G query heads sharing the kv head) form one matrix Q (M, D), and
// per chunk of kTileKeys keys the item packs K^T (D, kTileKeys) and V (kTileKeys, D) from the
// blocks, then
//   S = Q K^T                     register-blocked: 4 query vectors x 16 keys per inner product
//   online softmax over S's rows   (bottom-right causal: a row's keys past its last are left out)
//   O = O * alpha + P V           register-blocked: 4 query vectors x 16 dims
// with O (M, D) in fp32 in the item's scratch until the end (out = O / l). Chunks past the tile's
// last visible key are never read (the causal triangle costs nothing), and the keys before the
// tile's first row's last key need no mask. Everything in fp32 (bf16 / fp16 rows upcast while
// packing); the arithmetic of a row depends only on its item, not on which thread runs it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/paged_attention.h"
#include "loss/linear_cross_entropy.h"  // exp_acc

namespace eagle_fast::paged_attention {

// Query rows per item: M = 64 * G query vectors (192 at G = 3). Each key step's K^T / V packs serve
// all of them: 64-row tiles ran the chunks of a 1,070-row prompt ~12% faster than 32-row ones.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileKeys = 64;  // keys per online-softmax step (K^T and V packs: 2 x 16 KiB at D = 64)

// 8 fp32 lanes: one AVX2 register in the x86-64-v3 clone, two SSE registers in the baseline one.
typedef float f8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline f8 ld8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void st8(float* p, f8 v) {
  std::memcpy(p, &v, sizeof v);
}

// Does the tiled path take this head dim and accumulator type? (16-lane blocks of D; fp32 only.)
template <typename acc_t>
constexpr bool tile_dtype_ok() {
  return std::is_same_v<acc_t, float>;
}
inline bool tile_dim_ok(int64_t D) {
  return D % 16 == 0 && D <= 256;
}

struct TileScratch {
  std::vector<float> q, o, s, kt, v, m, l;
  TileScratch(int64_t Mmax, int64_t D)
      : q(Mmax * D), o(Mmax * D), s(Mmax * kTileKeys), kt(D * kTileKeys), v(kTileKeys * D), m(Mmax), l(Mmax) {}
};

// A 4 x 16 block of fp32 accumulators in 8 vector registers (row r: a_r lanes 0-7, b_r 8-15).
struct Block4x16 {
  f8 a0, b0, a1, b1, a2, b2, a3, b3;

  __attribute__((always_inline)) static Block4x16 load(const float* r, int64_t stride) {
    return {ld8(r),
            ld8(r + 8),
            ld8(r + stride),
            ld8(r + stride + 8),
            ld8(r + 2 * stride),
            ld8(r + 2 * stride + 8),
            ld8(r + 3 * stride),
            ld8(r + 3 * stride + 8)};
  }
  // row r += (x0, x1) * s_r: one load of x feeds 4 rows' FMAs
  __attribute__((always_inline)) void fma(f8 x0, f8 x1, float s0, float s1, float s2, float s3) {
    a0 += x0 * s0;
    b0 += x1 * s0;
    a1 += x0 * s1;
    b1 += x1 * s1;
    a2 += x0 * s2;
    b2 += x1 * s2;
    a3 += x0 * s3;
    b3 += x1 * s3;
  }
  __attribute__((always_inline)) void store(float* r, int64_t stride) const {
    st8(r, a0);
    st8(r + 8, b0);
    st8(r + stride, a1);
    st8(r + stride + 8, b1);
    st8(r + 2 * stride, a2);
    st8(r + 2 * stride + 8, b2);
    st8(r + 3 * stride, a3);
    st8(r + 3 * stride + 8, b3);
  }
};

// S[i, j] = sum_d Q[i, d] K^T[d, j] for i < M4 (a multiple of 4), j < J (a multiple of 16), one
// 4 x 16 block at a time.
__attribute__((always_inline)) inline void tile_scores(const float* q, const float* kt, float* s, int64_t M4, int64_t J,
                                                       int64_t D) {
  for (int64_t i = 0; i < M4; i += 4) {
    const float *q0 = q + i * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
    for (int64_t j = 0; j < J; j += 16) {
      Block4x16 c{};
      for (int64_t d = 0; d < D; ++d)
        c.fma(ld8(kt + d * kTileKeys + j), ld8(kt + d * kTileKeys + j + 8), q0[d], q1[d], q2[d], q3[d]);
      c.store(s + i * kTileKeys + j, kTileKeys);
    }
  }
}

// O[i, :] += sum_{t < n} P[i, t] V[t, :] for i < M4, one 4 x 16 block of O at a time.
__attribute__((always_inline)) inline void tile_accumulate(const float* p, const float* v, float* o, int64_t M4,
                                                           int64_t n, int64_t D) {
  for (int64_t i = 0; i < M4; i += 4) {
    const float *p0 = p + i * kTileKeys, *p1 = p0 + kTileKeys, *p2 = p1 + kTileKeys, *p3 = p2 + kTileKeys;
    for (int64_t d = 0; d < D; d += 16) {
      float* r = o + i * D + d;
      Block4x16 c = Block4x16::load(r, D);
      for (int64_t t = 0; t < n; ++t) c.fma(ld8(v + t * D + d), ld8(v + t * D + d + 8), p0[t], p1[t], p2[t], p3[t]);
      c.store(r, D);
    }
  }
}

// One tiled item: sequence b, kv head h0 (h1 = h0 + 1), query rows [r0, r1) of the sequence.
// ArgsT / ItemT: paged_attention_cpu.cpp's Args<T> / Item.
template <typename T, typename ArgsT, typename ItemT>
__attribute__((always_inline)) inline void run_tile_item(const ArgsT& a, const ItemT& it, TileScratch& w) {
  using eagle_fast::linear_cross_entropy::exp_acc;
  const int64_t G = a.G, D = a.D, h = it.h0;
  const int64_t q0 = a.cu[it.b], Lq = a.cu[it.b + 1] - q0, Lk = a.lk[it.b];
  const int64_t rows = it.r1 - it.r0, M = rows * G, M4 = (M + 3) / 4 * 4;
  const int32_t* table = a.table + it.b * a.table_stride;
  const float scale = static_cast<float>(a.scale);
  // Q (M4, D), query vector i = r * G + g (row r0 + r, query head h * G + g), pre-scaled; the
  // padding rows are zero (their scores are 0, their output is never written).
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const T* src = a.q + (q0 + it.r0 + r) * a.sq0 + (h * G + g) * a.sq1;
      float* dst = w.q.data() + (r * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d * a.sq2]) * scale;
    }
  std::fill(w.q.begin() + M * D, w.q.begin() + M4 * D, 0.0f);
  std::fill(w.o.begin(), w.o.begin() + M4 * D, 0.0f);
  std::fill(w.m.begin(), w.m.begin() + M, std::numeric_limits<float>::lowest());
  std::fill(w.l.begin(), w.l.begin() + M, 0.0f);
  const int64_t unmasked = visible_keys(it.r0, Lq, Lk);  // keys every row of the tile sees
  const int64_t end = visible_keys(it.r1 - 1, Lq, Lk);   // keys the tile's last row sees
  for (int64_t c0 = 0; c0 < end; c0 += kTileKeys) {
    const int64_t cn = std::min(kTileKeys, end - c0), J = (cn + 15) / 16 * 16;
    for (int64_t t = 0; t < cn; ++t) {
      const T* kr = a.k + key_offset(table, c0 + t, a.block_size, a.sk0, a.sk1, a.sk2, h);
      const T* vr = a.v + key_offset(table, c0 + t, a.block_size, a.sv0, a.sv1, a.sv2, h);
      float* vd = w.v.data() + t * D;
      for (int64_t d = 0; d < D; ++d) {
        w.kt[d * kTileKeys + t] = static_cast<float>(kr[d]);
        vd[d] = static_cast<float>(vr[d]);
      }
    }
    for (int64_t d = 0; d < D; ++d)  // the columns up to J are scored: zeros, then masked out
      std::fill(w.kt.begin() + d * kTileKeys + cn, w.kt.begin() + d * kTileKeys + J, 0.0f);
    tile_scores(w.q.data(), w.kt.data(), w.s.data(), M4, J, D);
    for (int64_t i = 0; i < M; ++i) {
      float* s = w.s.data() + i * kTileKeys;
      const int64_t n = c0 + cn <= unmasked ? cn : std::clamp<int64_t>(visible_keys(it.r0 + i / G, Lq, Lk) - c0, 0, cn);
      float smax = std::numeric_limits<float>::lowest();
      for (int64_t t = 0; t < n; ++t) smax = std::max(smax, s[t]);
      const float m_new = std::max(w.m[i], smax);
      const float alpha = exp_acc(w.m[i] - m_new);  // 0 on the first chunk (m = lowest), 1 when n = 0
      float sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {
        s[t] = exp_acc(s[t] - m_new);
        sum += s[t];
      }
      std::fill(s + n, s + cn, 0.0f);  // keys this row does not see weigh nothing
      w.l[i] = w.l[i] * alpha + sum;
      w.m[i] = m_new;
      if (alpha != 1.0f) {
        float* o = w.o.data() + i * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
      }
    }
    for (int64_t i = M; i < M4; ++i) std::fill(w.s.data() + i * kTileKeys, w.s.data() + i * kTileKeys + cn, 0.0f);
    tile_accumulate(w.s.data(), w.v.data(), w.o.data(), M4, cn, D);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = r * G + g;
      const float inv = 1.0f / w.l[i];  // l >= 1: every row sees at least one key
      const float* o = w.o.data() + i * D;
      T* dst = a.out + ((q0 + it.r0 + r) * a.Hq + h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
    }
}

}  // namespace eagle_fast::paged_attention
