// The extension's operators that other source files compose (csrc/block_cpu.cpp): declared once here, defined in
// their own files, registered there with TORCH_LIBRARY_FRAGMENT.
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace glm_kernels {

// Bytes the operator after a product will read (the attention's keys and values): a decode step's weights sweep
// every cache, so they would come from DRAM; `linear` pulls them in while it streams the weight.
struct ReadAhead {
  const void* data;
  int64_t bytes;
};

// csrc/quant_cpu.cpp: y [M, N] in x's dtype = x [M, K] @ (q * scale)^T + bias, THUDM's INT8/INT4 bytes
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits,
                     const c10::optional<torch::Tensor>& bias);

// the same product, prefetching `ahead` a few lines per pass of one bf16 row of x (decoding; other calls ignore it)
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits,
                     const c10::optional<torch::Tensor>& bias, const std::vector<ReadAhead>& ahead);

// csrc/quant_cpu.cpp: rows [start, stop) of W = q * scale, fp32 [stop - start, K]
torch::Tensor dequantize(const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits, int64_t start,
                         int64_t stop);

// the same rows into `out` (contiguous CPU [>= stop - start, K], fp32 or bf16: computed in fp32, rounded once)
void dequantize_into(const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits, int64_t start,
                     int64_t stop, const torch::Tensor& out);

// csrc/attention_cpu.cpp: attention of a few query rows [sq, b, nh, hd] over k, v [sk, b, nh, hd] -> [sq, b, nh * hd]
torch::Tensor attention_few(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const c10::optional<torch::Tensor>& mask);

// csrc/rope_cpu.cpp: split of the fused QKV output, GLM's 2D rotation, k and v written into the cache views
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> rope_qkv(
    const torch::Tensor& mixed, const torch::Tensor& position_ids, const torch::Tensor& cos, const torch::Tensor& sin,
    int64_t num_heads, const c10::optional<torch::Tensor>& k_out, const c10::optional<torch::Tensor>& v_out);

// csrc/layernorm_cpu.cpp: LayerNorm(x * alpha + residual) over the last axis, in x's dtype
torch::Tensor residual_layer_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual, double alpha,
                                  const torch::Tensor& weight, const torch::Tensor& bias, double eps);

// csrc/gelu_cpu.cpp: tanh-GeLU(x + bias) over [..., n], in x's dtype
torch::Tensor bias_gelu(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias);

}  // namespace glm_kernels
