// Shared index maths and argument checks of eagle_fast::paged_attention (semantics: the module
// docstring of eagle_fast/ops/paged_attention.py).
//
// Sequence b has Lq new query rows (q rows cu_seqlens_q[b] ..) and Lk keys, the new rows being the
// last Lq of them. Key j lives in physical block block_table[b, j / block_size], slot
// j % block_size. Query row i (0-based within the sequence) sees keys 0 .. i + Lk - Lq.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/host_device.h"

namespace eagle_fast::paged_attention {

// How many keys query row i of a sequence with Lq rows and Lk keys sees (bottom-right causal).
EF_HD int64_t visible_keys(int64_t i, int64_t Lq, int64_t Lk) {
  return i + Lk - Lq + 1;
}

// Element offset of (logical key j, kv head h) in a cache with strides (s_block, s_slot, s_head),
// given the sequence's row of the block table.
EF_HD int64_t key_offset(const int32_t* table_row, int64_t j, int64_t block_size, int64_t s_block, int64_t s_slot,
                         int64_t s_head, int64_t h) {
  return static_cast<int64_t>(table_row[j / block_size]) * s_block + (j % block_size) * s_slot + h * s_head;
}

// Shapes, dtypes and devices (the public API checked them already and raised ValueError; these
// guard direct calls of torch.ops.eagle_fast.paged_attention).
inline void check_shapes(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_table, const at::Tensor& cu_seqlens_q, const at::Tensor& seqlens_k) {
  constexpr const char* op = "paged_attention";
  TORCH_CHECK(q.dim() == 3, op, ": q must be (Tq, Hq, D), got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be (num_blocks, block_size, Hkv, D), got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache ", v_cache.sizes(), " and k_cache ", k_cache.sizes(),
              " differ in shape");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op, ": q has dtype ", dt,
              " (float32, float64, bfloat16, float16 supported)");
  TORCH_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt, op, ": k_cache / v_cache have dtype ",
              k_cache.scalar_type(), " / ", v_cache.scalar_type(), ", q has ", dt);
  TORCH_CHECK(k_cache.size(1) >= 1, op, ": block_size must be >= 1");
  TORCH_CHECK(q.size(2) == k_cache.size(3), op, ": head dim of q (", q.size(2), ") and k_cache (", k_cache.size(3),
              ") differ");
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0, op, ": q's ", q.size(1),
              " heads are not a multiple of k_cache's ", k_cache.size(2), " kv heads");
  TORCH_CHECK(seqlens_k.dim() == 1 && seqlens_k.scalar_type() == at::kInt, op, ": seqlens_k must be (B,) int32, got ",
              seqlens_k.scalar_type(), " ", seqlens_k.sizes());
  const int64_t B = seqlens_k.size(0);
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) == B + 1 && cu_seqlens_q.scalar_type() == at::kInt, op,
              ": cu_seqlens_q must be (B + 1,) = (", B + 1, ",) int32, got ", cu_seqlens_q.scalar_type(), " ",
              cu_seqlens_q.sizes());
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && block_table.scalar_type() == at::kInt, op,
              ": block_table must be (B = ", B, ", max_blocks_per_seq) int32, got ", block_table.scalar_type(), " ",
              block_table.sizes());
}

}  // namespace eagle_fast::paged_attention
