// CUDA kernel of eagle_fast::linear_cross_entropy (semantics: the pure-torch body in
// eagle_fast/ops/linear_cross_entropy.py; per-row maths: linear_cross_entropy.h; the chunk loop:
// linear_cross_entropy_chunks.h), on the current stream. What is CUDA-specific lives here: the
// device check, chunks of ~32 MiB (<= 65535 rows, one block per row), row_kernel (one online
// (max, sum exp) pass, block reduction, loss; with grads a second pass writes softmax - onehot over
// z in the input dtype), grad_W's bf16/fp16 products as cuBLAS GEMMs with an fp32 result, and the
// loss as a deterministic sum of the row losses (no atomics).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>
#include <tuple>
#include <type_traits>

#include "loss/linear_cross_entropy.h"
#include "loss/linear_cross_entropy_checks.h"
#include "loss/linear_cross_entropy_chunks.h"

namespace eagle_fast::linear_cross_entropy {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// 32 MiB of fp32 logits per chunk (256 rows at V = 32000): enough rows for cuBLAS to fill the GPU.
constexpr int64_t kChunkBytes = int64_t(32) << 20;
constexpr int64_t kMaxChunkRows = 65535;  // row_kernel's grid: one block per row

template <typename acc_t>
__device__ __forceinline__ acc_t lowest() {
  return std::is_same_v<acc_t, double> ? -DBL_MAX : -FLT_MAX;
}

// Block-wide merge of every thread's (m, s): warp shuffles, then warp 0 over the warps' pairs.
template <typename acc_t>
__device__ void block_merge(acc_t& m, acc_t& s) {
  __shared__ acc_t sm[kWarps], ss[kWarps];
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
    online_merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  m = lane < kWarps ? sm[lane] : lowest<acc_t>();
  s = lane < kWarps ? ss[lane] : acc_t(0);
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
    online_merge(m, s, m2, s2);
  }  // every warp computed the same merge: all threads hold the block's (m, s)
}

// Row blockIdx.x of the chunk z (rows, V), labels of the chunk's rows, row losses out.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    row_kernel(scalar_t* __restrict__ z, int64_t V, const int64_t* __restrict__ labels, int64_t ignore_index,
               acc_type<scalar_t>* __restrict__ losses, bool with_grad) {
  using acc_t = acc_type<scalar_t>;
  scalar_t* row = z + static_cast<int64_t>(blockIdx.x) * V;
  const int64_t y = labels[blockIdx.x];
  if (y == ignore_index) {  // contributes nothing
    if (with_grad)
      for (int64_t j = threadIdx.x; j < V; j += kThreads) row[j] = scalar_t(0);
    if (threadIdx.x == 0) losses[blockIdx.x] = acc_t(0);
    return;
  }
  CUDA_KERNEL_ASSERT(y >= 0 && y < V);
  const acc_t z_label = static_cast<acc_t>(row[y]);  // read before any thread overwrites it
  acc_t m = lowest<acc_t>(), s = acc_t(0);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) online_add(m, s, static_cast<acc_t>(row[j]));
  block_merge(m, s);  // has a __syncthreads: every z_label read precedes every write below
  const acc_t lse = logsumexp(m, s);
  if (threadIdx.x == 0) losses[blockIdx.x] = row_loss(lse, z_label);
  if (!with_grad) return;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const acc_t g = j == y ? label_grad(z_label, lse) : softmax_grad(static_cast<acc_t>(row[j]), lse);
    row[j] = static_cast<scalar_t>(g);
  }
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels) {
  constexpr const char* op = "linear_cross_entropy";
  TORCH_CHECK(hidden.is_cuda() && weight.device() == hidden.device() && labels.device() == hidden.device(), op,
              ": expected tensors on one CUDA device, got hidden on ", hidden.device(), ", weight on ", weight.device(),
              ", labels on ", labels.device());
  eagle_fast::loss::check_shapes_and_dtypes(hidden, weight, labels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(const at::Tensor& hidden,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& labels, int64_t ignore_index,
                                                                         bool grad_hidden, bool grad_weight) {
  check_inputs(hidden, weight, labels);
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t V = weight.size(0);
  const auto dt = hidden.scalar_type();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Labels outside [0, V) are caught by row_kernel's device assert (no host sync here).
  const auto row_pass = [&](at::Tensor& z, const at::Tensor& labels_c, at::Tensor& losses_c, bool with_grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "linear_cross_entropy_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      row_kernel<scalar_t><<<static_cast<unsigned>(z.size(0)), kThreads, 0, stream>>>(
          z.mutable_data_ptr<scalar_t>(), V, labels_c.const_data_ptr<int64_t>(), ignore_index,
          losses_c.mutable_data_ptr<acc_t>(), with_grad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  // cuBLAS bf16/fp16 GEMM with an fp32 result, summed over chunks in fp32.
  const auto add_grad_weight_16bit = [](at::Tensor& gw, const at::Tensor& z_t, const at::Tensor& h) {
    gw.add_(at::mm(z_t, h, gw.scalar_type()));
  };
  const int64_t rows = eagle_fast::loss::chunk_rows(V, kChunkBytes, kMaxChunkRows);
  const eagle_fast::loss::ChunkedResult res = eagle_fast::loss::run_chunks(
      hidden, weight, labels, grad_hidden, grad_weight, rows, row_pass, add_grad_weight_16bit);
  at::Tensor loss = res.row_losses.sum();  // 0-d, acc dtype; deterministic (no atomics)
  return {loss, res.grad_hidden, res.grad_weight};
}

}  // namespace
}  // namespace eagle_fast::linear_cross_entropy

TORCH_LIBRARY_IMPL(eagle_fast, CUDA, m) {
  m.impl("linear_cross_entropy", &eagle_fast::linear_cross_entropy::linear_cross_entropy_cuda);
}
