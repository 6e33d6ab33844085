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

// a CPU [n] fp32 / fp16 / bf16 parameter (LayerNorm weight, a bias) as fp32 values, read once per call
inline std::vector<float> floats_of(const torch::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n, name, " must be a CPU [", n, "] tensor, got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kHalf ||
                  t.scalar_type() == torch::kBFloat16, name, " must be fp32, fp16 or bf16, got ", t.scalar_type());
  const auto f = t.to(torch::kFloat).contiguous();
  return std::vector<float>(f.const_data_ptr<float>(), f.const_data_ptr<float>() + n);
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
