// CPU kernel of eagle_fast::paged_attention (semantics: eagle_fast/ops/paged_attention.py).
//
// Two paths. A sequence with kTileMinRows new rows or more (a prompt chunk) runs on the tiled path
// (paged_attention_tiles.h: register-blocked Q K^T and P V products per tile of rows and kv head).
// The others (decode rows, short chunks) run on the row path described here.
// Work items are (sequence b, kv heads [h0, h1), tile of up to kRowTile query rows): one kv head
// each when the items would be few (a lone decode: the threads split the heads), every kv head of
// the sequence when there are many (a decode batch: each cache slot's heads are read once, side by
// side); at::parallel_for runs them independently and each head's arithmetic is the same either
// way, so the output has the same bits for any thread count. An item holds the G = Hq / Hkv query
// heads of each of its kv heads for its rows (M = heads * rows * G query vectors), so every key
// and value row it reads serves all G heads (a decode step reads each cache row once). The next
// chunk's rows are prefetched while one chunk computes (blocks lie scattered in memory).
// It walks the keys its last row sees in chunks of kKeyChunk logical keys, whatever the block size:
// per chunk the key / value row addresses are looked up through the block table (bf16 / fp16 rows
// are upcast into a small per-task buffer, fp32 / fp64 rows are read in place: never a gather of
// the sequence), then per query vector:
//   s_t = scale * q . k_t  for the keys t of the chunk the row sees (bottom-right causal; four keys
//                          at a time, and four value rows per pass below: see scores / accumulate)
//   m'  = max(m, max_t s_t);  alpha = exp(m - m');  p_t = exp(s_t - m')
//   l   = l * alpha + sum_t p_t;  acc = acc * alpha + sum_t p_t v_t;  m = m'
// and out = acc / l. Everything in fp32 (fp64 for fp64 inputs), out rounded to q's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/paged_attention.h"
#include "attention/paged_attention_tiles.h"
#include "common/cpu_isa.h"
#include "loss/linear_cross_entropy.h"  // exp_acc: branch-free fp32 exp that vectorizes

namespace eagle_fast::paged_attention {
namespace {

using eagle_fast::linear_cross_entropy::exp_acc;

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// 16 rows x G heads of fp32 state stay in L1/L2 (G = 3, D = 64: 12 KiB of accumulators); a prefill
// chunk of many rows still splits into enough items to keep every thread busy.
constexpr int64_t kRowTile = 16;
// Keys per online-softmax step: the rescale of the accumulators (D multiplies per query vector)
// is paid once per chunk rather than once per block (block_size 1 would pay it per key).
constexpr int64_t kKeyChunk = 64;
// New rows of a sequence from which the tiled path runs them (a prompt chunk, not a decode row).
constexpr int64_t kTileMinRows = 8;

struct Item {
  int64_t b, h0, h1, r0, r1;  // sequence, kv heads [h0, h1), query rows [r0, r1) of the sequence
  bool tiled = false;         // the tiled path (paged_attention_tiles.h): one kv head, many rows
  int64_t cost = 0;           // query rows x keys read: the items are run heaviest first
};

// What every item reads: geometry, strides (elements) and base pointers.
template <typename T>
struct Args {
  const T *q, *k, *v;
  T* out;
  const int32_t *table, *cu, *lk;
  int64_t table_stride, G, D, block_size, Hq;
  int64_t sq0, sq1, sq2;  // q (Tq, Hq, D)
  int64_t sk0, sk1, sk2;  // k_cache (block, slot, head); last dim contiguous
  int64_t sv0, sv1, sv2;  // v_cache
  double scale;
};

template <typename acc_t>
__attribute__((always_inline)) inline acc_t dot(const acc_t* a, const acc_t* b, int64_t D) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// s[t] = scale * q . k_t for the n keys of a chunk, four keys at a time: a lone dot product's
// reduction is one dependency chain of D / lanes FMAs (latency-bound); four run side by side.
template <typename acc_t>
__attribute__((always_inline)) inline void scores(const acc_t* q, const acc_t* const* kp, int64_t n, int64_t D,
                                                  acc_t scale, acc_t* s) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const acc_t *k0 = kp[t], *k1 = kp[t + 1], *k2 = kp[t + 2], *k3 = kp[t + 3];
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      const acc_t x = q[d];
      s0 += x * k0[d];
      s1 += x * k1[d];
      s2 += x * k2[d];
      s3 += x * k3[d];
    }
    s[t] = s0 * scale;
    s[t + 1] = s1 * scale;
    s[t + 2] = s2 * scale;
    s[t + 3] = s3 * scale;
  }
  for (; t < n; ++t) s[t] = dot(q, kp[t], D) * scale;
}

// o += sum_t p_t v_t over the n keys of a chunk, four value rows per pass over o (o is loaded and
// stored once per four keys rather than once per key).
template <typename acc_t>
__attribute__((always_inline)) inline void accumulate(acc_t* o, const acc_t* p, const acc_t* const* vp, int64_t n,
                                                      int64_t D) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const acc_t p0 = p[t], p1 = p[t + 1], p2 = p[t + 2], p3 = p[t + 3];
    const acc_t *v0 = vp[t], *v1 = vp[t + 1], *v2 = vp[t + 2], *v3 = vp[t + 3];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
  }
  for (; t < n; ++t) {
    const acc_t pt = p[t];
    const acc_t* vr = vp[t];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] += pt * vr[d];
  }
}

// Per-task scratch, reused across the items of one parallel_for chunk.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> q, acc, m, l, kbuf, vbuf, s;
  std::vector<const acc_t*> kp, vp;
  Scratch(int64_t M, int64_t D)
      : q(M * D),
        acc(M * D),
        m(M),
        l(M),
        kbuf(kKeyChunk * D),
        vbuf(kKeyChunk * D),
        s(kKeyChunk),
        kp(kKeyChunk),
        vp(kKeyChunk) {}
};

// The chunk's key / value row addresses for kv head h (bf16 / fp16 rows upcast into the scratch,
// fp32 / fp64 rows read in place).
template <typename T>
__attribute__((always_inline)) inline void chunk_rows(const Args<T>& a, const int32_t* table, int64_t h, int64_t c0,
                                                      int64_t cn, Scratch<acc_type<T>>& w) {
  using acc_t = acc_type<T>;
  const int64_t D = a.D;
  for (int64_t t = 0; t < cn; ++t) {
    const T* kr = a.k + key_offset(table, c0 + t, a.block_size, a.sk0, a.sk1, a.sk2, h);
    const T* vr = a.v + key_offset(table, c0 + t, a.block_size, a.sv0, a.sv1, a.sv2, h);
    if constexpr (std::is_same_v<T, acc_t>) {
      w.kp[t] = kr;
      w.vp[t] = vr;
    } else {  // once per chunk, shared by the head's query vectors
      acc_t* kd = w.kbuf.data() + t * D;
      acc_t* vd = w.vbuf.data() + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        kd[d] = static_cast<acc_t>(kr[d]);
        vd[d] = static_cast<acc_t>(vr[d]);
      }
      w.kp[t] = kd;
      w.vp[t] = vd;
    }
  }
}

// Requests the cache lines of rows [t0, t1) of kv heads [h0, h1) ahead of their use: blocks lie
// scattered, and a slot's heads sit side by side (one run of (h1 - h0) * D elements when the
// cache is contiguous), which the hardware prefetchers do not follow from block to block.
template <typename T>
__attribute__((always_inline)) inline void prefetch_rows(const Args<T>& a, const int32_t* table, int64_t h0, int64_t h1,
                                                         int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t h = h0; h < h1; ++h) {
      const char* kr = reinterpret_cast<const char*>(a.k + key_offset(table, t, a.block_size, a.sk0, a.sk1, a.sk2, h));
      const char* vr = reinterpret_cast<const char*>(a.v + key_offset(table, t, a.block_size, a.sv0, a.sv1, a.sv2, h));
      for (int64_t byte = 0; byte < a.D * static_cast<int64_t>(sizeof(T)); byte += 64) {
        __builtin_prefetch(kr + byte, 0, 3);
        __builtin_prefetch(vr + byte, 0, 3);
      }
    }
}

template <typename T>
__attribute__((always_inline)) inline void run_item(const Args<T>& a, const Item& it, Scratch<acc_type<T>>& w) {
  using acc_t = acc_type<T>;
  const int64_t G = a.G, D = a.D;
  const int64_t q0 = a.cu[it.b], Lq = a.cu[it.b + 1] - q0, Lk = a.lk[it.b];
  const int64_t rows = it.r1 - it.r0, heads = it.h1 - it.h0, M = heads * rows * G;
  const int32_t* table = a.table + it.b * a.table_stride;
  const acc_t scale = static_cast<acc_t>(a.scale);
  // query vector mi = (hh * rows + r) * G + g: kv head h0 + hh, row r0 + r, query head (h0 + hh) * G + g
  for (int64_t hh = 0; hh < heads; ++hh)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const T* src = a.q + (q0 + it.r0 + r) * a.sq0 + ((it.h0 + hh) * G + g) * a.sq1;
        acc_t* dst = w.q.data() + ((hh * rows + r) * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d * a.sq2]);
      }
  std::fill(w.acc.begin(), w.acc.begin() + M * D, acc_t(0));
  std::fill(w.m.begin(), w.m.begin() + M, std::numeric_limits<acc_t>::lowest());
  std::fill(w.l.begin(), w.l.begin() + M, acc_t(0));
  const int64_t end = std::min<int64_t>(Lk, visible_keys(it.r1 - 1, Lq, Lk));  // keys the last row sees
  for (int64_t c0 = 0; c0 < end; c0 += kKeyChunk) {
    const int64_t cn = std::min(kKeyChunk, end - c0);
    prefetch_rows(a, table, it.h0, it.h1, c0 + cn, std::min(end, c0 + cn + kKeyChunk));  // the next chunk
    for (int64_t hh = 0; hh < heads; ++hh) {
      chunk_rows(a, table, it.h0 + hh, c0, cn, w);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = std::min(cn, visible_keys(it.r0 + r, Lq, Lk) - c0);
        if (n <= 0) continue;  // this row's keys ended in an earlier chunk
        for (int64_t g = 0; g < G; ++g) {
          const int64_t mi = (hh * rows + r) * G + g;
          const acc_t* qv = w.q.data() + mi * D;
          acc_t* s = w.s.data();
          scores(qv, w.kp.data(), n, D, scale, s);
          acc_t smax = std::numeric_limits<acc_t>::lowest();
          for (int64_t t = 0; t < n; ++t) smax = std::max(smax, s[t]);
          const acc_t m_new = std::max(w.m[mi], smax);
          const acc_t alpha = exp_acc(w.m[mi] - m_new);  // 0 on the first chunk (m = lowest)
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < n; ++t) {
            s[t] = exp_acc(s[t] - m_new);
            sum += s[t];
          }
          w.l[mi] = w.l[mi] * alpha + sum;
          w.m[mi] = m_new;
          acc_t* o = w.acc.data() + mi * D;
          if (alpha != acc_t(1)) {
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
          }
          accumulate(o, s, w.vp.data(), n, D);
        }
      }
    }
  }
  for (int64_t hh = 0; hh < heads; ++hh)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t mi = (hh * rows + r) * G + g;
        const acc_t inv = acc_t(1) / w.l[mi];  // l >= 1: every row sees at least one key
        const acc_t* o = w.acc.data() + mi * D;
        T* dst = a.out + ((q0 + it.r0 + r) * a.Hq + (it.h0 + hh) * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
      }
}

// The item loop per dtype, compiled twice on x86-64 GCC builds: for AVX2 + FMA (x86-64-v3) and for
// the baseline (SSE2), picked once at load time (ifunc, common/cpu_isa.h).
#define EF_ATTN_CLONES EF_CLONES_V3

// Items are taken by the threads one at a time from a shared counter, heaviest first (plan sorts
// them): the causal triangle makes a prompt chunk's last row tiles several times dearer than its
// first, which a static split of the list would hand to one thread. Which thread runs an item does
// not change its arithmetic.
template <typename T>
__attribute__((always_inline)) inline void run_items(const Args<T>& a, const Item* items, int64_t n,
                                                     std::atomic<int64_t>* next) {
  std::optional<Scratch<acc_type<T>>> w;  // allocated by the first item of its kind
  std::optional<TileScratch> tw;
  for (int64_t i = next->fetch_add(1); i < n; i = next->fetch_add(1)) {
    if constexpr (tile_dtype_ok<acc_type<T>>()) {
      if (items[i].tiled) {
        if (!tw) tw.emplace(kTileRows * a.G, a.D);
        run_tile_item<T>(a, items[i], *tw);
        continue;
      }
    }
    if (!w) w.emplace(kRowTile * a.Hq, a.D);  // up to every head of kRowTile rows
    run_item<T>(a, items[i], *w);
  }
}

EF_ATTN_CLONES void run_items_isa(const Args<float>& a, const Item* it, int64_t n, std::atomic<int64_t>* next) {
  run_items(a, it, n, next);
}
EF_ATTN_CLONES void run_items_isa(const Args<double>& a, const Item* it, int64_t n, std::atomic<int64_t>* next) {
  run_items(a, it, n, next);
}
EF_ATTN_CLONES void run_items_isa(const Args<c10::BFloat16>& a, const Item* it, int64_t n, std::atomic<int64_t>* next) {
  run_items(a, it, n, next);
}
EF_ATTN_CLONES void run_items_isa(const Args<c10::Half>& a, const Item* it, int64_t n, std::atomic<int64_t>* next) {
  run_items(a, it, n, next);
}

// Checks the metadata's values (a bad block id would read outside the cache) and lists the items.
std::vector<Item> plan(const at::Tensor& cu_t, const at::Tensor& lk_t, const at::Tensor& table_t, int64_t Tq,
                       int64_t Hkv, int64_t num_blocks, int64_t block_size, int64_t max_seqlen_q, bool tiles_ok) {
  constexpr const char* op = "paged_attention";
  const int32_t* cu = cu_t.const_data_ptr<int32_t>();
  const int32_t* lk = lk_t.const_data_ptr<int32_t>();
  const int32_t* table = table_t.const_data_ptr<int32_t>();
  const int64_t B = lk_t.size(0), width = table_t.size(1);
  TORCH_CHECK(cu[0] == 0 && cu[B] == Tq, op, ": cu_seqlens_q must rise from 0 to the ", Tq, " rows of q, got ", cu[0],
              " .. ", cu[B]);
  std::vector<Item> items;
  int64_t tiles = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Lq = cu[b + 1] - cu[b], Lk = lk[b];
    TORCH_CHECK(Lq >= 0, op, ": cu_seqlens_q decreases at sequence ", b);
    TORCH_CHECK(Lq <= max_seqlen_q, op, ": sequence ", b, " has ", Lq, " query rows, max_seqlen_q is ", max_seqlen_q);
    TORCH_CHECK(Lk >= Lq, op, ": sequence ", b, ": seqlens_k ", Lk, " < its ", Lq, " query rows");
    TORCH_CHECK(Lk <= width * block_size, op, ": sequence ", b, ": seqlens_k ", Lk, " exceeds block_table's ", width,
                " blocks of ", block_size, " rows");
    for (int64_t p = 0; p < (Lk + block_size - 1) / block_size; ++p) {
      const int32_t id = table[b * width + p];
      TORCH_CHECK(id >= 0 && id < num_blocks, op, ": sequence ", b, ": block_table holds block ", id,
                  ", outside the cache's ", num_blocks, " blocks");
    }
    tiles += (Lq + kRowTile - 1) / kRowTile;
  }
  // An item takes every kv head of its rows when there are enough (sequence, row tile) items to
  // keep the threads busy: a cache slot's heads are then read once, side by side, rather than by
  // Hkv items at different times (each fetching the slot's lines again from DRAM at decode). With
  // few sequences (a lone decode), items split by head so that the threads share the work. Each
  // head's arithmetic is the same either way: the output's bits do not depend on the split.
  // A sequence with kTileMinRows new rows or more (a prompt chunk) takes the tiled path instead, in
  // items of one kv head and kTileRows rows.
  const int64_t per = tiles >= 4 * at::get_num_threads() ? Hkv : 1;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Lq = cu[b + 1] - cu[b], Lk = lk[b];
    const bool tiled = tiles_ok && Lq >= kTileMinRows;
    const int64_t step = tiled ? kTileRows : kRowTile, heads = tiled ? 1 : per;
    for (int64_t h = 0; h < Hkv; h += heads)
      for (int64_t r0 = 0; r0 < Lq; r0 += step) {
        const int64_t r1 = std::min(Lq, r0 + step);
        items.push_back({b, h, h + heads, r0, r1, tiled, (r1 - r0) * heads * visible_keys(r1 - 1, Lq, Lk)});
      }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  return items;
}

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache_in, const at::Tensor& v_cache_in,
                               const at::Tensor& block_table, const at::Tensor& cu_seqlens_q,
                               const at::Tensor& seqlens_k, int64_t max_seqlen_q, double scale) {
  check_shapes(q, k_cache_in, v_cache_in, block_table, cu_seqlens_q, seqlens_k);
  for (const at::Tensor* t : {&q, &k_cache_in, &v_cache_in, &block_table, &cu_seqlens_q, &seqlens_k})
    TORCH_CHECK(t->device().is_cpu(), "paged_attention: expected cpu tensors, got one on ", t->device());
  // The kernel reads cache rows as contiguous runs of D; any other strides are free.
  const at::Tensor k_cache = k_cache_in.stride(3) == 1 ? k_cache_in : k_cache_in.contiguous();
  const at::Tensor v_cache = v_cache_in.stride(3) == 1 ? v_cache_in : v_cache_in.contiguous();
  const at::Tensor table = block_table.contiguous(), cu = cu_seqlens_q.contiguous(), lk = seqlens_k.contiguous();
  const int64_t Hq = q.size(1), Hkv = k_cache.size(2), D = q.size(2);
  const bool tiles_ok = q.scalar_type() != at::kDouble && tile_dim_ok(D);
  const std::vector<Item> items =
      plan(cu, lk, table, q.size(0), Hkv, k_cache.size(0), k_cache.size(1), max_seqlen_q, tiles_ok);
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (items.empty() || D == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention_cpu", [&] {
    const Args<scalar_t> a{q.const_data_ptr<scalar_t>(),
                           k_cache.const_data_ptr<scalar_t>(),
                           v_cache.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(),
                           table.const_data_ptr<int32_t>(),
                           cu.const_data_ptr<int32_t>(),
                           lk.const_data_ptr<int32_t>(),
                           table.size(1),
                           Hq / Hkv,
                           D,
                           k_cache.size(1),
                           Hq,
                           q.stride(0),
                           q.stride(1),
                           q.stride(2),
                           k_cache.stride(0),
                           k_cache.stride(1),
                           k_cache.stride(2),
                           v_cache.stride(0),
                           v_cache.stride(1),
                           v_cache.stride(2),
                           scale};
    const int64_t n = static_cast<int64_t>(items.size());
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1,
                     [&](int64_t, int64_t) { run_items_isa(a, items.data(), n, &next); });
  });
  return out;
}

}  // namespace
}  // namespace eagle_fast::paged_attention

TORCH_LIBRARY_IMPL(eagle_fast, CPU, m) {
  m.impl("paged_attention", &eagle_fast::paged_attention::paged_attention_cpu);
}
