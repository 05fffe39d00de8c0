// CPU kernel of eagle_fast::linear_cross_entropy (semantics: the pure-torch body in
// eagle_fast/ops/linear_cross_entropy.py; per-row maths: linear_cross_entropy.h; the chunk loop:
// linear_cross_entropy_chunks.h). What is CPU-specific lives here: the device and label-range
// checks, chunks of ~16 MiB, the per-row pass (three vectorized passes per row over the chunk's rows,
// split over threads with at::parallel_for), the fp32 accumulation of bf16/fp16 grad_weight
// products (upcast operands: exact), and the loss summed in double in row order (same bits for any
// thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "common/cpu_isa.h"
#include "loss/linear_cross_entropy.h"
#include "loss/linear_cross_entropy_checks.h"
#include "loss/linear_cross_entropy_chunks.h"

namespace eagle_fast::linear_cross_entropy {
namespace {

// ~16 MiB of fp32 logits per chunk (131 rows at V = 32000, 85 at 49152): BLAS needs that many rows
// to run near its large-M speed (measured on one core here, H = 576, V = 49152: the three matmuls
// cost 3.9 ms per row in 42-row chunks, 2.6 ms in 129-row ones, 2.4 ms in 512-row ones). The row
// passes walk one row (V values, in L2) at a time, so a larger chunk does not slow them.
constexpr int64_t kChunkBytes = int64_t(16) << 20;

constexpr int64_t kSumBlock = 512;

// One row z[0..V) of the logits chunk: returns its loss; with_grad leaves d loss / d z in z.
// Three passes, each a plain loop the compiler vectorizes (exp_acc is branch-free).
template <typename T>
__attribute__((always_inline)) inline acc_type<T> row_pass(T* z, int64_t V, int64_t label, bool with_grad) {
  using acc_t = acc_type<T>;
  acc_t m = std::numeric_limits<acc_t>::lowest();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) {
    const acc_t x = static_cast<acc_t>(z[j]);
    m = x > m ? x : m;
  }
  // Sum of exp in blocks: acc_t lanes within a block, blocks added in double. One fp32 sum over
  // V = 32000 terms drifts by ~1e-5 relative (that error moves lse and every softmax value).
  double s = 0;
  for (int64_t b = 0; b < V; b += kSumBlock) {
    const int64_t e = std::min(V, b + kSumBlock);
    acc_t sb = 0;
#pragma omp simd reduction(+ : sb)
    for (int64_t j = b; j < e; ++j) sb += exp_acc(static_cast<acc_t>(z[j]) - m);
    s += static_cast<double>(sb);
  }
  const acc_t lse = logsumexp(m, static_cast<acc_t>(s));
  const acc_t z_label = static_cast<acc_t>(z[label]);
  if (with_grad) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) z[j] = static_cast<T>(softmax_grad(static_cast<acc_t>(z[j]), lse));
    z[label] = static_cast<T>(label_grad(z_label, lse));
  }
  return row_loss(lse, z_label);
}

// The row pass per dtype, compiled twice on x86-64 GCC builds: for AVX2 + FMA (x86-64-v3: 8 fp32
// lanes) and for the baseline (SSE2), picked once at load time by the dynamic linker (ifunc,
// common/cpu_isa.h). Measured on one core here: 1.2-1.5 ns per logit for the three passes with
// AVX2, 4.5 with SSE2.
#define EF_ROW_CLONES EF_CLONES_V3

EF_ROW_CLONES float row_pass_isa(float* z, int64_t V, int64_t label, bool g) {
  return row_pass(z, V, label, g);
}
EF_ROW_CLONES double row_pass_isa(double* z, int64_t V, int64_t label, bool g) {
  return row_pass(z, V, label, g);
}
EF_ROW_CLONES float row_pass_isa(c10::BFloat16* z, int64_t V, int64_t label, bool g) {
  return row_pass(z, V, label, g);
}
EF_ROW_CLONES float row_pass_isa(c10::Half* z, int64_t V, int64_t label, bool g) {
  return row_pass(z, V, label, g);
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels) {
  constexpr const char* op = "linear_cross_entropy";
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(), op,
              ": expected cpu tensors, got hidden on ", hidden.device(), ", weight on ", weight.device(),
              ", labels on ", labels.device());
  eagle_fast::loss::check_shapes_and_dtypes(hidden, weight, labels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(const at::Tensor& hidden,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& labels, int64_t ignore_index,
                                                                        bool grad_hidden, bool grad_weight) {
  check_inputs(hidden, weight, labels);
  const int64_t n = hidden.size(0), V = weight.size(0);
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t* y = lab.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(y[r] == ignore_index || (y[r] >= 0 && y[r] < V), "linear_cross_entropy: label ", y[r], " of row ", r,
                " is outside [0, ", V, ") and not ignore_index ", ignore_index);
  const auto dt = hidden.scalar_type();
  const auto row_pass = [&](at::Tensor& z, const at::Tensor& labels_c, at::Tensor& losses_c, bool with_grad) {
    const int64_t rc = z.size(0);
    const int64_t* yc = labels_c.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "linear_cross_entropy_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      scalar_t* zp = z.mutable_data_ptr<scalar_t>();
      acc_t* lp = losses_c.mutable_data_ptr<acc_t>();
      at::parallel_for(0, rc, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* row = zp + r * V;
          if (yc[r] == ignore_index) {  // contributes nothing
            lp[r] = acc_t(0);
            if (with_grad) std::fill(row, row + V, scalar_t(0));
          } else {
            lp[r] = row_pass_isa(row, V, yc[r], with_grad);
          }
        }
      });
    });
  };
  // (V, rc) @ (rc, H) in fp32: bf16/fp16 -> fp32 is exact, the sum is fp32.
  const auto add_grad_weight_16bit = [](at::Tensor& gw, const at::Tensor& z_t, const at::Tensor& h) {
    gw.addmm_(z_t.to(gw.scalar_type()), h.to(gw.scalar_type()));
  };
  const int64_t rows = eagle_fast::loss::chunk_rows(V, kChunkBytes, std::numeric_limits<int64_t>::max());
  const eagle_fast::loss::ChunkedResult res = eagle_fast::loss::run_chunks(
      hidden, weight, lab, grad_hidden, grad_weight, rows, row_pass, add_grad_weight_16bit);
  // The loss: row losses summed in a fixed order in double (same bits for any thread count).
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(res.row_losses.scalar_type(), "linear_cross_entropy_cpu_sum", [&] {
    const scalar_t* lp = res.row_losses.const_data_ptr<scalar_t>();
    for (int64_t r = 0; r < n; ++r) total += static_cast<double>(lp[r]);
  });
  at::Tensor loss = at::full({}, total, hidden.options().dtype(res.row_losses.scalar_type()));
  return {loss, res.grad_hidden, res.grad_weight};
}

}  // namespace
}  // namespace eagle_fast::linear_cross_entropy

TORCH_LIBRARY_IMPL(eagle_fast, CPU, m) {
  m.impl("linear_cross_entropy", &eagle_fast::linear_cross_entropy::linear_cross_entropy_cpu);
}
