// What the element-wise CPU ops (csrc/layernorm_cpu.cpp, csrc/gelu_cpu.cpp) check and read alike.
#pragma once

#include <torch/extension.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace glm_kernels {

// x: a CPU [..., n] tensor with n > 0, fp32 / fp16 / bf16 (the activations' dtypes)
inline void check_activation(const torch::Tensor& x, const char* shape) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.size(-1) > 0, "x must be a CPU ", shape, " tensor");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kHalf || dtype == torch::kBFloat16,
              "x must be fp32, fp16 or bf16, got ", dtype);
}

// a CPU [n] fp32 / fp16 / bf16 parameter (LayerNorm weight, a bias) as fp32 values, read once per call; widened
// here rather than by an ATen conversion, which a decode step would run ~40 times from cold caches (exact either way)
inline std::vector<float> floats_of(const torch::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n, name, " must be a CPU [", n, "] tensor, got ",
              t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kHalf || dtype == torch::kBFloat16, name,
              " must be fp32, fp16 or bf16, got ", dtype);
  const auto c = t.contiguous();
  std::vector<float> out(n);
  auto widen = [&](const auto* p) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  };
  if (dtype == torch::kBFloat16) widen(c.const_data_ptr<c10::BFloat16>());
  else if (dtype == torch::kHalf) widen(c.const_data_ptr<c10::Half>());
  else widen(c.const_data_ptr<float>());
  return out;
}

// fn(T{}) with T the storage type of an activation dtype checked by check_activation
template <typename Fn>
void with_activation_type(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case torch::kBFloat16: fn(c10::BFloat16{}); break;
    case torch::kHalf: fn(c10::Half{}); break;
    default: fn(float{}); break;
  }
}

}  // namespace glm_kernels
