// glm_kernels._C: the GLM block's residual LayerNorm on the CPU, in one pass over each row (inference).
//
//   residual_layer_norm(x [..., h], residual [..., h] or None, alpha, weight [h], bias [h], eps) -> y [..., h]
//
// y = LayerNorm(x * alpha + residual), in x's dtype (fp32, fp16 or bf16). The join rounds as the op-by-op form
// does: x * alpha rounded to the dtype, then + residual rounded to the dtype (PyTorch's two element-wise ops in
// the activation dtype); the statistics and the affine map are computed in fp32 and each output rounded once.
// Without a residual it is LayerNorm(x). weight and bias may be fp32, fp16 or bf16.
//
// Why: decoding runs it twice per block on one row; as three ATen operators (mul, add, layer_norm) that is
// ~30 us each time on this VM, mostly the cold code and allocations of three dispatches after each weight stream
// has swept the caches; here it is one small loop.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_ops.h"
#include "elementwise_cpu.h"
#include "vec_cpu.h"

namespace {

using glm_kernels::Isa;
using glm_kernels::isa;
using glm_kernels::round_to;

// One row, portable: t = joined row (fp32 values of T), then mean, variance, y.
template <typename T>
void norm_row(const T* x, const T* r, float alpha, const float* w, const float* b, float eps, int64_t h, float* t,
              T* y) {
  double sum = 0.0;
  for (int64_t i = 0; i < h; ++i) {
    float v = static_cast<float>(x[i]);
    if (r != nullptr) v = round_to<T>(round_to<T>(v * alpha) + static_cast<float>(r[i]));
    t[i] = v;
    sum += v;
  }
  const float mean = static_cast<float>(sum / h);
  double sq = 0.0;
  for (int64_t i = 0; i < h; ++i) sq += static_cast<double>(t[i] - mean) * (t[i] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / h + eps));
  for (int64_t i = 0; i < h; ++i) y[i] = static_cast<T>((t[i] - mean) * rstd * w[i] + b[i]);
}

#ifdef GLM_X86
using glm_kernels::vec::load16;
using glm_kernels::vec::store16;

// The same with 16 lanes: the sums in fp32 lanes (h / 16 terms each), combined in double.
template <typename T>
GLM_AVX512 void norm_row_avx512(const T* x, const T* r, float alpha, const float* w, const float* b, float eps,
                                int64_t h, float* t, T* y) {
  const int64_t body = h / 16 * 16;
  const __m512 va = _mm512_set1_ps(alpha);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < body; i += 16) {
    __m512 v = load16(x + i);
    if (r != nullptr)
      v = glm_kernels::vec::round_to<T>(_mm512_add_ps(glm_kernels::vec::round_to<T>(_mm512_mul_ps(v, va)),
                                                      load16(r + i)));
    _mm512_storeu_ps(t + i, v);
    acc = _mm512_add_ps(acc, v);
  }
  double sum = _mm512_reduce_add_ps(acc);
  for (int64_t i = body; i < h; ++i) {
    float v = static_cast<float>(x[i]);
    if (r != nullptr) v = round_to<T>(round_to<T>(v * alpha) + static_cast<float>(r[i]));
    t[i] = v;
    sum += v;
  }
  const float mean = static_cast<float>(sum / h);
  const __m512 vm = _mm512_set1_ps(mean);
  acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < body; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(t + i), vm);
    acc = _mm512_fmadd_ps(d, d, acc);
  }
  double sq = _mm512_reduce_add_ps(acc);
  for (int64_t i = body; i < h; ++i) sq += static_cast<double>(t[i] - mean) * (t[i] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / h + eps));
  const __m512 vr = _mm512_set1_ps(rstd);
  for (int64_t i = 0; i < body; i += 16) {
    const __m512 n = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(t + i), vm), vr);
    store16(y + i, _mm512_add_ps(_mm512_mul_ps(n, _mm512_loadu_ps(w + i)), _mm512_loadu_ps(b + i)));
  }
  for (int64_t i = body; i < h; ++i) y[i] = static_cast<T>((t[i] - mean) * rstd * w[i] + b[i]);
}
#endif

template <typename T>
void norm_rows(const torch::Tensor& x, const c10::optional<torch::Tensor>& r, float alpha, const float* w,
               const float* b, float eps, torch::Tensor& y) {
  const int64_t h = x.size(-1), rows = x.numel() / h;
  const T* xp = x.const_data_ptr<T>();
  const T* rp = r ? r->const_data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const bool wide = isa() >= Isa::kAvx512;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / h), [&](int64_t begin, int64_t end) {
    std::vector<float> t(h);
    for (int64_t i = begin; i < end; ++i) {
      const T* ri = rp ? rp + i * h : nullptr;
#ifdef GLM_X86
      if (wide) {
        norm_row_avx512(xp + i * h, ri, alpha, w, b, eps, h, t.data(), yp + i * h);
        continue;
      }
#endif
      norm_row(xp + i * h, ri, alpha, w, b, eps, h, t.data(), yp + i * h);
    }
  });
}

}  // namespace

torch::Tensor glm_kernels::residual_layer_norm(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& residual,
                                               double alpha, const torch::Tensor& weight, const torch::Tensor& bias,
                                               double eps) {
  glm_kernels::check_activation(x_in, "[..., h]");
  const auto dtype = x_in.scalar_type();
  const int64_t h = x_in.size(-1);
  const auto x = x_in.contiguous();
  c10::optional<torch::Tensor> r;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == dtype && residual->device().is_cpu(),
                "residual must match x: ", x.sizes(), " ", dtype, ", got ", residual->sizes(), " ",
                residual->scalar_type());
    r = residual->contiguous();
  }
  const auto w = glm_kernels::floats_of(weight, h, "weight");
  const auto b = glm_kernels::floats_of(bias, h, "bias");
  auto y = torch::empty_like(x);
  const float a = static_cast<float>(alpha), e = static_cast<float>(eps);
  glm_kernels::with_activation_type(dtype, [&](auto t) {
    norm_rows<decltype(t)>(x, r, a, w.data(), b.data(), e, y);
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(glm_kernels, m) {
  m.def("residual_layer_norm(Tensor x, Tensor? residual, float alpha, Tensor weight, Tensor bias, float eps) -> Tensor",
        &glm_kernels::residual_layer_norm);
}
