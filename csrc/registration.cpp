// Every eagle_fast op schema, on one screen. Device kernels register with TORCH_LIBRARY_IMPL
// in their own files (csrc/<capability>/<op>_{cpu.cpp,cuda.cu}); fake kernels and autograd are
// registered from Python in eagle_fast/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(eagle_fast, m) {
  // Decoded uint8 RGB images (H_i, W_i, 3) -> (pixel_values (B,3,S,S), clip (B,3,c,c) | empty,
  // flattened_patches (B,P,2+p*p*3) | empty, attention_mask (B,P) | empty). See ops/fused_preprocess.py.
  m.def(
      "fused_preprocess(Tensor[] images, int canvas_size, bool pad, int[] fill, float[] mean, "
      "float[] std, int clip_size, int p2s_max_patches, int p2s_patch, ScalarType dtype) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Feature maps (B, C_i, H_i, W_i), any strides (token grids arrive as channels-last views) ->
  // (B, grid*grid, sum_i C_i * unshuffle_i^2): pixel_unshuffle, bilinear align_corners=True, concat.
  m.def("resize_concat(Tensor[] features, int grid, int[] unshuffle) -> Tensor");
  // Gradients of resize_concat for every feature, each shaped and strided like empty_like(feature).
  m.def("resize_concat_backward(Tensor grad, Tensor[] features, int grid, int[] unshuffle) -> Tensor[]");
  // Fused LM head + cross-entropy over learned rows: hidden (n, H), weight (V, H), labels (n,) in
  // [0, V) or ignore_index -> (sum of the n row losses (0-d fp32; fp64 for fp64), d sum / d hidden
  // (n, H), d sum / d weight (V, H)); a gradient not asked for is an empty (0,) tensor. Logits are
  // never held beyond one chunk of rows. See ops/linear_cross_entropy.py.
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, "
      "bool compute_grad_hidden, bool compute_grad_weight) -> (Tensor loss_sum, Tensor grad_hidden, "
      "Tensor grad_weight)");
  // Causal attention of packed new query rows q (Tq, Hq, D) (cu_seqlens_q (B+1,) int32) against a
  // paged KV cache k_cache / v_cache (num_blocks, block_size, Hkv, D), block_table (B, max_blocks)
  // int32, seqlens_k (B,) int32 keys per sequence including its new rows; bottom-right causal, GQA,
  // forward only -> (Tq, Hq, D) in q's dtype. See ops/paged_attention.py.
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor cu_seqlens_q, "
      "Tensor seqlens_k, int max_seqlen_q, float scale) -> Tensor");
}
