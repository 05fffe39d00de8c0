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
}
