// CPU kernel of eagle_fast::linear_cross_entropy (semantics: the pure-torch body in
// eagle_fast/ops/linear_cross_entropy.py; per-row maths: linear_cross_entropy.h).
//
// hidden (n, H) learned rows, weight (V, H), labels (n,) in [0, V) or ignore_index. Rows go in
// chunks of R so that only one (R, V) logits buffer exists (~kChunkBytes in fp32); per chunk:
//   z = h_c @ W^T                   at::mm, input dtype (the reference's lm_head output)
//   per row (at::parallel_for):     max, sum of exp, lse, loss; with grads z <- softmax - onehot,
//                                   in the input dtype (the reference casts its fp32 grad so too)
//   grad_h[c] = z @ W               at::mm into the chunk's rows of grad_hidden
//   grad_W   += z^T @ h_c           fp32 (fp64) accumulator; bf16/fp16 operands upcast exactly
// Gradients are those of the sum of the row losses; the caller scales them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>

#include "loss/linear_cross_entropy.h"
#include "loss/linear_cross_entropy_checks.h"

namespace eagle_fast::linear_cross_entropy {
namespace {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ~16 MiB of fp32 logits per chunk (131 rows at V = 32000, 85 at 49152): BLAS needs that many rows
// to run near its large-M speed (measured on one core here, H = 576, V = 49152: the three matmuls
// cost 3.9 ms per row in 42-row chunks, 2.6 ms in 129-row ones, 2.4 ms in 512-row ones). The row
// passes walk one row (V values, in L2) at a time, so a larger chunk does not slow them.
constexpr int64_t kChunkBytes = int64_t(16) << 20;

constexpr int64_t kSumBlock = 512;

int64_t chunk_rows(int64_t V) { return std::max<int64_t>(1, kChunkBytes / (4 * std::max<int64_t>(V, 1))); }

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
// lanes) and for the baseline (SSE2), picked once at load time by the dynamic linker (ifunc).
// Measured on one core here: 1.2-1.5 ns per logit for the three passes with AVX2, 4.5 with SSE2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EF_ROW_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EF_ROW_CLONES
#endif

EF_ROW_CLONES float row_pass_isa(float* z, int64_t V, int64_t label, bool g) { return row_pass(z, V, label, g); }
EF_ROW_CLONES double row_pass_isa(double* z, int64_t V, int64_t label, bool g) { return row_pass(z, V, label, g); }
EF_ROW_CLONES float row_pass_isa(c10::BFloat16* z, int64_t V, int64_t label, bool g) {
  return row_pass(z, V, label, g);
}
EF_ROW_CLONES float row_pass_isa(c10::Half* z, int64_t V, int64_t label, bool g) { return row_pass(z, V, label, g); }

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels) {
  constexpr const char* op = "linear_cross_entropy";
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(), op,
              ": expected cpu tensors, got hidden on ", hidden.device(), ", weight on ", weight.device(),
              ", labels on ", labels.device());
  eagle_fast::loss::check_shapes_and_dtypes(hidden, weight, labels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(const at::Tensor& hidden,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& labels,
                                                                        int64_t ignore_index, bool grad_hidden,
                                                                        bool grad_weight) {
  check_inputs(hidden, weight, labels);
  const int64_t n = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t* y = lab.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(y[r] == ignore_index || (y[r] >= 0 && y[r] < V), "linear_cross_entropy: label ", y[r],
                " of row ", r, " is outside [0, ", V, ") and not ignore_index ", ignore_index);
  const auto dt = hidden.scalar_type();
  const auto acc_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  const bool with_grad = grad_hidden || grad_weight;
  at::Tensor row_losses = at::empty({n}, hidden.options().dtype(acc_dt));
  // Gradients not asked for come back as empty (0,) tensors.
  at::Tensor gh = grad_hidden ? at::empty({n, H}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor gw = grad_weight ? at::zeros({V, H}, weight.options().dtype(acc_dt)) : at::empty({0}, weight.options());
  const int64_t R = chunk_rows(V);
  at::Tensor buf = at::empty({std::min(R, n), V}, hidden.options());  // the one logits chunk
  const at::Tensor wt = weight.t();
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t rc = std::min(R, n - r0);
    const at::Tensor h = hidden.narrow(0, r0, rc);
    at::Tensor z = buf.narrow(0, 0, rc);
    at::mm_out(z, h, wt);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "linear_cross_entropy_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      scalar_t* zp = z.mutable_data_ptr<scalar_t>();
      acc_t* lp = row_losses.mutable_data_ptr<acc_t>() + r0;
      at::parallel_for(0, rc, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* row = zp + r * V;
          if (y[r0 + r] == ignore_index) {  // contributes nothing
            lp[r] = acc_t(0);
            if (with_grad) std::fill(row, row + V, scalar_t(0));
          } else {
            lp[r] = row_pass_isa(row, V, y[r0 + r], with_grad);
          }
        }
      });
    });
    if (grad_hidden) {
      at::Tensor gh_c = gh.narrow(0, r0, rc);
      at::mm_out(gh_c, z, weight);
    }
    if (grad_weight) {
      if (dt == acc_dt)
        gw.addmm_(z.t(), h);
      else  // (V, rc) @ (rc, H) in fp32: bf16/fp16 -> fp32 is exact, the sum is fp32
        gw.addmm_(z.t().to(acc_dt), h.to(acc_dt));
    }
  }
  // The loss: row losses summed in a fixed order in double (same bits for any thread count).
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(acc_dt, "linear_cross_entropy_cpu_sum", [&] {
    const scalar_t* lp = row_losses.const_data_ptr<scalar_t>();
    for (int64_t r = 0; r < n; ++r) total += static_cast<double>(lp[r]);
  });
  at::Tensor loss = at::full({}, total, hidden.options().dtype(acc_dt));
  if (grad_weight && dt != acc_dt) gw = gw.to(dt);
  return {loss, gh, gw};
}

}  // namespace
}  // namespace eagle_fast::linear_cross_entropy

TORCH_LIBRARY_IMPL(eagle_fast, CPU, m) {
  m.impl("linear_cross_entropy", &eagle_fast::linear_cross_entropy::linear_cross_entropy_cpu);
}
