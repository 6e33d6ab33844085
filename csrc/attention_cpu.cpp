// glm_kernels._C: attention for a few query rows (decoding) on the CPU.
//
//   attention_few(q [sq, b, nh, hd], k [sk, b, nh, hd], v [sk, b, nh, hd], mask bool [b or 1, 1, sq, sk] or None)
//     -> [sq, b, nh * hd] in q's dtype
//
// softmax(q k^T / sqrt(hd), masked keys excluded) v, computed in fp32 from fp32 / fp16 / bf16 inputs and rounded
// once. GLM's layer coefficient cancels out of the original's arithmetic (q is divided by it, the fp32 scores
// multiplied by it), so only 1/sqrt(hd) remains; a fully masked query row gets the original's uniform weights over
// every key (its scores all equal -10000 * coeff there). q, k, v are read through their strides (k and v are views
// of the KV cache) with a contiguous last axis.
//
// Why: PyTorch's fused CPU attention spends ~0.4 ms on one bf16 query over 129 keys x 16 heads (thread launch and
// blocking set up for long sequences), 3 ms of a 25 ms INT4 decode step at the benchmark size; these loops take
// ~0.05 ms there and 7x less than PyTorch's at 1056 keys in bf16. At long contexts they read the cache at about
// DRAM speed (fp32, 2049 keys: 2.2 ms against PyTorch's 1.7). Work is split over (batch, head) pairs.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_ops.h"
#include "isa.h"
#include "vec_cpu.h"

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// dot(a, b) over n values, fp32 accumulation; and acc += w * v over n values
template <typename T>
float dot_scalar(const T* a, const T* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += to_float(a[i]) * to_float(b[i]);
  return s;
}

template <typename T>
void axpy_scalar(float w, const T* v, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * to_float(v[i]);
}

#ifdef GLM_X86
using glm_kernels::vec::load16;

template <typename T>
GLM_AVX512 float dot_avx512(const T* a, const T* b, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) s = _mm512_fmadd_ps(load16(a + i), load16(b + i), s);
  float r = _mm512_reduce_add_ps(s);
  for (; i < n; ++i) r += to_float(a[i]) * to_float(b[i]);
  return r;
}

template <typename T>
GLM_AVX512 void axpy_avx512(float w, const T* v, float* acc, int64_t n) {
  const __m512 vw = _mm512_set1_ps(w);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(vw, load16(v + i), _mm512_loadu_ps(acc + i)));
  for (; i < n; ++i) acc[i] += w * to_float(v[i]);
}
#endif

// The rows of one head are one stride of the cache apart ([sk, b, nh, hd]: nh * hd values), so each key and value
// row is a few lines far from the last, which the hardware prefetchers follow late; after a decode step's weight
// stream the cache is in DRAM. The loops ask for the row kAheadRows keys ahead (measured: ~70-80 -> ~55 us per
// layer at 129 keys x 16 heads of 128, bf16).
constexpr int64_t kAheadRows = 16;

template <typename T>
inline void prefetch_row(const T* row, int64_t hd) {
#ifdef GLM_X86
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < hd * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
#else
  (void)row;
  (void)hd;
#endif
}

template <typename T>
void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const bool* mask,
            int64_t mask_batch_stride, torch::Tensor& out) {
  const int64_t sq = q.size(0), b = q.size(1), nh = q.size(2), hd = q.size(3), sk = k.size(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const bool wide = glm_kernels::isa() >= glm_kernels::Isa::kAvx512;  // AVX2 builds use the scalar loops
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  at::parallel_for(0, b * nh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(sk), acc(hd);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / nh, h = bh % nh;
      for (int64_t i = 0; i < sq; ++i) {
        const T* qi = qp + i * qs0 + bi * qs1 + h * qs2;
        const bool* mrow = mask ? mask + bi * mask_batch_stride + i * sk : nullptr;
        bool any_visible = mrow == nullptr;
        for (int64_t j = 0; j < sk && !any_visible; ++j) any_visible = !mrow[j];
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < std::min(sk, kAheadRows); ++j) prefetch_row(kp + j * ks0 + bi * ks1 + h * ks2, hd);
        for (int64_t j = 0; j < sk; ++j) {
          if (!any_visible) {  // fully masked row: every score 0, uniform weights
            scores[j] = 0.f;
          } else if (mrow && mrow[j]) {
            scores[j] = -std::numeric_limits<float>::infinity();
          } else {
            const T* kj = kp + j * ks0 + bi * ks1 + h * ks2;
            if (j + kAheadRows < sk) prefetch_row(kj + kAheadRows * ks0, hd);
#ifdef GLM_X86
            scores[j] = (wide ? dot_avx512(qi, kj, hd) : dot_scalar(qi, kj, hd)) * scale;
#else
            scores[j] = dot_scalar(qi, kj, hd) * scale;
#endif
          }
          top = std::max(top, scores[j]);
        }
        for (int64_t j = 0; j < std::min(sk, kAheadRows); ++j) prefetch_row(vp + j * vs0 + bi * vs1 + h * vs2, hd);
        float total = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < sk; ++j) {
          if (scores[j] == -std::numeric_limits<float>::infinity()) continue;
          const float w = std::exp(scores[j] - top);
          total += w;
          const T* vj = vp + j * vs0 + bi * vs1 + h * vs2;
          if (j + kAheadRows < sk) prefetch_row(vj + kAheadRows * vs0, hd);
#ifdef GLM_X86
          if (wide) axpy_avx512(w, vj, acc.data(), hd);
          else
#endif
            axpy_scalar(w, vj, acc.data(), hd);
        }
        T* oi = op + (i * b + bi) * nh * hd + h * hd;
        const float inv = 1.f / total;
        for (int64_t d = 0; d < hd; ++d) oi[d] = static_cast<T>(acc[d] * inv);
      }
    }
  });
}

}  // namespace

torch::Tensor glm_kernels::attention_few(const torch::Tensor& q_in, const torch::Tensor& k_in,
                                         const torch::Tensor& v_in, const c10::optional<torch::Tensor>& mask_in) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "q, k, v must be [s, b, nh, hd]");
  TORCH_CHECK(q_in.device().is_cpu() && k_in.device().is_cpu() && v_in.device().is_cpu(), "q, k, v must be on the CPU");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "q, k, v must share a dtype");
  TORCH_CHECK(k_in.sizes() == v_in.sizes() && q_in.size(1) == k_in.size(1) && q_in.size(2) == k_in.size(2) &&
                  q_in.size(3) == k_in.size(3), "q [sq, b, nh, hd] and k, v [sk, b, nh, hd] do not match");
  // the loops read the head axis contiguously; any other strides are followed as they are
  const auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const auto k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const auto v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const int64_t sq = q.size(0), b = q.size(1), nh = q.size(2), hd = q.size(3), sk = k.size(0);
  TORCH_CHECK(sk > 0, "attention over no keys");
  torch::Tensor mask;
  int64_t mask_batch_stride = 0;
  if (mask_in.has_value()) {
    mask = mask_in->contiguous();
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.dim() == 4 && mask.size(1) == 1 && mask.size(2) == sq &&
                    mask.size(3) == sk && (mask.size(0) == 1 || mask.size(0) == b),
                "mask must be bool [b or 1, 1, sq, sk] = [", b, ", 1, ", sq, ", ", sk, "]");
    mask_batch_stride = mask.size(0) == 1 ? 0 : sq * sk;
  }
  auto out = torch::empty({sq, b, nh * hd}, q.options());
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  switch (q.scalar_type()) {
    case torch::kFloat: attend<float>(q, k, v, mp, mask_batch_stride, out); break;
    case torch::kBFloat16: attend<c10::BFloat16>(q, k, v, mp, mask_batch_stride, out); break;
    case torch::kHalf: attend<c10::Half>(q, k, v, mp, mask_batch_stride, out); break;
    default: TORCH_CHECK(false, "q, k, v must be fp32, fp16 or bf16, got ", q.scalar_type());
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(glm_kernels, m) {
  m.def("attention_few(Tensor q, Tensor k, Tensor v, Tensor? mask=None) -> Tensor", &glm_kernels::attention_few);
}
