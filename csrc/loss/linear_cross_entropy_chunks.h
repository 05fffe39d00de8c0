// The chunk loop of eagle_fast::linear_cross_entropy, shared by the CPU and CUDA kernels (host code,
// ATen ops only). The learned rows go in chunks of R so that only one (R, V) logits buffer exists;
// per chunk:
//   z = h_c @ W^T                    at::mm, input dtype (the reference's lm_head output)
//   row_pass(z, labels_c, losses_c)  the device's per-row pass: the chunk's row losses and, with
//                                    grads, z <- softmax - onehot in the input dtype
//   grad_h[c] = z @ W                at::mm into the chunk's rows of grad_hidden
//   grad_W   += z^T @ h_c            acc dtype (fp32; fp64 for fp64 inputs)
// Gradients are those of the sum of the row losses; the caller scales them. What differs per
// device stays in its file: the device and label checks, R, the row pass, the fp32 accumulation
// of 16-bit z^T @ h_c, and how the row losses are summed. The Triton path runs the same loop in
// Python (_chunked in eagle_fast/ops/linear_cross_entropy.py).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace eagle_fast::loss {

// Rows per chunk: about chunk_bytes of fp32 logits, at least 1, at most max_rows.
inline int64_t chunk_rows(int64_t V, int64_t chunk_bytes, int64_t max_rows) {
  return std::clamp<int64_t>(chunk_bytes / (4 * std::max<int64_t>(V, 1)), 1, std::max<int64_t>(max_rows, 1));
}

struct ChunkedResult {
  at::Tensor row_losses;   // (n,) acc dtype; the device sums them in its own fixed order
  at::Tensor grad_hidden;  // (n, H) input dtype, or an empty (0,) tensor when not asked for
  at::Tensor grad_weight;  // (V, H) weight dtype, or an empty (0,) tensor
};

// hidden (n, H), weight (V, H), labels (n,) int64 (checked by the caller).
//   row_pass(at::Tensor& z, const at::Tensor& labels_c, at::Tensor& losses_c, bool with_grad):
//     z (rc, V) contiguous logits, labels_c (rc,) int64, losses_c (rc,) acc dtype to fill.
//   add_grad_weight_16bit(at::Tensor& gw, const at::Tensor& z_t, const at::Tensor& h):
//     gw (V, H) fp32 += z_t (V, rc) @ h (rc, H) for bf16/fp16 operands, summed in fp32.
template <typename RowPass, typename AddGradWeight16>
ChunkedResult run_chunks(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, bool grad_hidden,
                         bool grad_weight, int64_t rows_per_chunk, RowPass&& row_pass,
                         AddGradWeight16&& add_grad_weight_16bit) {
  const int64_t n = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto dt = hidden.scalar_type();
  const auto acc_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  const bool with_grad = grad_hidden || grad_weight;
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  at::Tensor row_losses = at::empty({n}, hidden.options().dtype(acc_dt));
  at::Tensor gh = grad_hidden ? at::empty({n, H}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor gw = grad_weight ? at::zeros({V, H}, weight.options().dtype(acc_dt)) : at::empty({0}, weight.options());
  const int64_t R = std::max<int64_t>(rows_per_chunk, 1);
  at::Tensor buf = at::empty({std::min(R, n), V}, hidden.options());  // the one logits chunk
  const at::Tensor wt = weight.t();
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t rc = std::min(R, n - r0);
    const at::Tensor h = hidden.narrow(0, r0, rc);
    at::Tensor z = buf.narrow(0, 0, rc);
    at::mm_out(z, h, wt);
    at::Tensor losses_c = row_losses.narrow(0, r0, rc);
    row_pass(z, lab.narrow(0, r0, rc), losses_c, with_grad);
    if (grad_hidden) {
      at::Tensor gh_c = gh.narrow(0, r0, rc);
      at::mm_out(gh_c, z, weight);
    }
    if (grad_weight) {
      if (dt == acc_dt)
        gw.addmm_(z.t(), h);
      else
        add_grad_weight_16bit(gw, z.t(), h);
    }
  }
  if (grad_weight && dt != acc_dt) gw = gw.to(dt);
  return {row_losses, gh, gw};
}

}  // namespace eagle_fast::loss
