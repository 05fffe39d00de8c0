// Shared per-row maths of eagle_fast::linear_cross_entropy (CPU and CUDA kernels).
//
// One learned row r of a chunk: z = logits[r, :] (V values, h_r @ W^T in the input dtype), label y.
//   m    = max_j z_j
//   s    = sum_j exp(z_j - m)
//   lse  = m + log(s)                      (logsumexp)
//   loss = lse - z_y                       (cross-entropy of row r)
//   grad = exp(z_j - lse) - [j == y]       (d loss / d z_j = softmax - onehot), written over z
// All of it in acc_t: float for fp32/bf16/fp16 inputs (the reference upcasts the logits to fp32),
// double for fp64 inputs. The CPU kernel walks a row in three vectorizable passes (max, sum of
// exp, grad); the CUDA kernel folds max and sum into one online pass (online_add / online_merge).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/host_device.h"

namespace eagle_fast::linear_cross_entropy {

// The accumulation type of an input dtype: double for fp64, float otherwise.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

EF_HD float bits_to_float(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  return std::bit_cast<float>(b);
#endif
}

// exp for float, branch-free so that loops of it vectorize (no libm call): x = k*ln2 + r with
// k = round(x / ln2), |r| <= ln2/2 (ln2 split in two for an exact k*ln2_hi), exp(r) by its
// degree-7 Taylor polynomial (truncation < 6e-9 relative, below half an fp32 ulp), 2^k built in
// the exponent field. About 1 ulp off libm. Below -87.5 it returns 0 (true values there are under
// 1e-38, the smallest normal float), above 88 it returns +inf; NaN stays NaN.
EF_HD float exp_acc(float x) {
  const float xc = x > 88.0f ? 88.0f : (x < -87.5f ? -87.5f : x);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float kf = (xc * 1.44269504088896341f + kRound) - kRound;
  const float r = (xc - kf * 0.693145751953125f) - kf * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t biased = static_cast<uint32_t>(static_cast<int32_t>(kf) + 127);  // k in [-126, 127]
  const float y = p * bits_to_float(static_cast<int32_t>(biased << 23));
  return x < -87.5f ? 0.0f : (x > 88.0f ? INFINITY : y);
}

EF_HD double exp_acc(double x) {
  return ::exp(x);
}

EF_HD float log_acc(float x) {
  return ::logf(x);
}
EF_HD double log_acc(double x) {
  return ::log(x);
}

// Online (max, sum of exp) of a stream of values: after add(x) for every x of a set,
// s = sum exp(x - m) with m their max. Start from m = lowest finite value (not -inf, so that a
// -inf logit adds exp(-inf) = 0 rather than exp(-inf - -inf) = nan), s = 0.
template <typename acc_t>
EF_HD void online_add(acc_t& m, acc_t& s, acc_t x) {
  if (x > m) {
    s = s * exp_acc(m - x) + acc_t(1);
    m = x;
  } else {
    s += exp_acc(x - m);
  }
}

// Merge of two partial (max, sum) pairs (reductions across threads).
template <typename acc_t>
EF_HD void online_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  if (m2 > m) {
    s = s * exp_acc(m - m2) + s2;
    m = m2;
  } else if (m2 == m) {
    s += s2;  // also keeps an all -inf pair at s = 0 instead of exp(nan)
  } else {
    s += s2 * exp_acc(m2 - m);
  }
}

template <typename acc_t>
EF_HD acc_t logsumexp(acc_t m, acc_t s) {
  return m + log_acc(s);
}

template <typename acc_t>
EF_HD acc_t row_loss(acc_t lse, acc_t z_label) {
  return lse - z_label;
}

// d loss / d z_j without the onehot term (softmax_j); the label's entry subtracts 1 more.
template <typename acc_t>
EF_HD acc_t softmax_grad(acc_t z, acc_t lse) {
  return exp_acc(z - lse);
}

template <typename acc_t>
EF_HD acc_t label_grad(acc_t z_label, acc_t lse) {
  return exp_acc(z_label - lse) - acc_t(1);
}

}  // namespace eagle_fast::linear_cross_entropy
