// glm_kernels._C: split of the fused QKV projection + GLM's 2D rotary + KV-cache write, on the CPU, in one pass.
//
//   rope_qkv(mixed [s, b, 3h], position_ids int64 [b, 2, s], cos [n, hd/2], sin [n, hd/2], num_heads,
//            k_out [s, b, nh, hd] or None, v_out or None) -> (q, k, v), each [s, b, nh, hd]
//
// Per head the row block of `mixed` is [q | k | v] (hd each). q and k are rotated: the first half of a head
// vector by the token position, the second by the block position, each half in the half-split form
// x * cos + rotate_half(x) * sin (glm_kernels/ops/rotary.py). Each output is computed in fp32 from the inputs'
// values and rounded once to their dtype. k and v are written into k_out / v_out (views of a preallocated cache,
// any strides with a contiguous last axis) when given; q is a new contiguous tensor.
//
// Why: in PyTorch ops the same is ~25 small ops per layer (split, four embedding gathers, cat, rotate_half's
// stack, the products, two cache copies), ~1 ms of a decoded token at the benchmark size.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>

#include "cpu_ops.h"

namespace {

template <typename T>
void rope_rows(const torch::Tensor& mixed, const torch::Tensor& pos, const torch::Tensor& cos,
               const torch::Tensor& sin, int64_t nh, torch::Tensor& q, torch::Tensor& k, torch::Tensor& v) {
  const int64_t s = mixed.size(0), b = mixed.size(1);
  const int64_t hd = mixed.size(2) / (3 * nh), half = hd / 2, quarter = hd / 4;
  const T* mp = mixed.data_ptr<T>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t ms0 = mixed.stride(0), ms1 = mixed.stride(1);
  const int64_t ps0 = pos.stride(0), ps1 = pos.stride(1), ps2 = pos.stride(2);
  const int64_t cs0 = cos.stride(0), ss0 = sin.stride(0);
  T* outs[3] = {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>()};
  const torch::Tensor* views[3] = {&q, &k, &v};
  int64_t strides[3][3];
  for (int i = 0; i < 3; ++i)
    for (int d = 0; d < 3; ++d) strides[i][d] = views[i]->stride(d);
  at::parallel_for(0, s * b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t sb = begin; sb < end; ++sb) {
      const int64_t si = sb / b, bi = sb % b;
      const int64_t token = pp[bi * ps0 + si * ps2], block = pp[bi * ps0 + ps1 + si * ps2];
      const T* row = mp + si * ms0 + bi * ms1;
      for (int64_t h = 0; h < nh; ++h) {
        const T* head = row + h * 3 * hd;
        for (int part = 0; part < 3; ++part) {
          const T* x = head + part * hd;
          T* o = outs[part] + si * strides[part][0] + bi * strides[part][1] + h * strides[part][2];
          if (part == 2) {  // v: copied as it is
            for (int64_t d = 0; d < hd; ++d) o[d] = x[d];
            continue;
          }
          for (int64_t side = 0; side < 2; ++side) {  // first half: token position; second: block position
            const int64_t p = side == 0 ? token : block;
            const T* c = cp + p * cs0;
            const T* sn = sp + p * ss0;
            const T* xh = x + side * half;
            T* oh = o + side * half;
            for (int64_t d = 0; d < half; ++d) {
              // rotate_half within the half: [-x[quarter:], x[:quarter]]
              const float rot = d < quarter ? -static_cast<float>(xh[d + quarter]) : static_cast<float>(xh[d - quarter]);
              oh[d] = static_cast<T>(static_cast<float>(xh[d]) * static_cast<float>(c[d]) +
                                     rot * static_cast<float>(sn[d]));
            }
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> glm_kernels::rope_qkv(
    const torch::Tensor& mixed_in, const torch::Tensor& position_ids, const torch::Tensor& cos_in,
    const torch::Tensor& sin_in, int64_t num_heads, const c10::optional<torch::Tensor>& k_out,
    const c10::optional<torch::Tensor>& v_out) {
  TORCH_CHECK(mixed_in.device().is_cpu() && mixed_in.dim() == 3, "mixed must be a CPU [s, b, 3h] tensor");
  TORCH_CHECK(num_heads > 0 && mixed_in.size(2) % (3 * num_heads) == 0, "mixed's last axis ", mixed_in.size(2),
              " is not 3 x num_heads (", num_heads, ") x head size");
  const auto mixed = mixed_in.stride(2) == 1 ? mixed_in : mixed_in.contiguous();
  const int64_t s = mixed.size(0), b = mixed.size(1), hd = mixed.size(2) / (3 * num_heads);
  TORCH_CHECK(hd % 4 == 0, "head size ", hd, " is not a multiple of 4");
  TORCH_CHECK(position_ids.scalar_type() == torch::kLong && position_ids.dim() == 3 && position_ids.size(0) == b &&
                  position_ids.size(1) == 2 && position_ids.size(2) == s,
              "position_ids must be int64 [b, 2, s] = [", b, ", 2, ", s, "]");
  const auto cos = cos_in.stride(1) == 1 ? cos_in : cos_in.contiguous();
  const auto sin = sin_in.stride(1) == 1 ? sin_in : sin_in.contiguous();
  TORCH_CHECK(cos.scalar_type() == mixed.scalar_type() && sin.scalar_type() == mixed.scalar_type(),
              "rotary tables must be in mixed's dtype");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == hd / 2 && sin.sizes() == cos.sizes(), "rotary tables must be [n, ",
              hd / 2, "]");
  const auto pos = position_ids.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < pos.numel(); ++i)  // s * b * 2 values: checked before anything is written
    TORCH_CHECK(pp[i] >= 0 && pp[i] < cos.size(0), "position_ids hold ", pp[i], ", outside the rotary table's ",
                cos.size(0), " positions");
  TORCH_CHECK(k_out.has_value() == v_out.has_value(), "pass both k_out and v_out, or neither");
  const auto opts = mixed.options();
  auto q = torch::empty({s, b, num_heads, hd}, opts);
  torch::Tensor k, v;
  if (k_out.has_value()) {
    k = *k_out;
    v = *v_out;
    for (const auto* t : {&k, &v}) {
      TORCH_CHECK(t->scalar_type() == mixed.scalar_type() && t->dim() == 4 && t->size(0) == s && t->size(1) == b &&
                      t->size(2) == num_heads && t->size(3) == hd && t->stride(3) == 1,
                  "k_out and v_out must be [", s, ", ", b, ", ", num_heads, ", ", hd,
                  "] in mixed's dtype with a contiguous last axis");
    }
  } else {
    k = torch::empty({s, b, num_heads, hd}, opts);
    v = torch::empty({s, b, num_heads, hd}, opts);
  }
  switch (mixed.scalar_type()) {
    case torch::kFloat: rope_rows<float>(mixed, pos, cos, sin, num_heads, q, k, v); break;
    case torch::kBFloat16: rope_rows<c10::BFloat16>(mixed, pos, cos, sin, num_heads, q, k, v); break;
    case torch::kHalf: rope_rows<c10::Half>(mixed, pos, cos, sin, num_heads, q, k, v); break;
    default: TORCH_CHECK(false, "mixed must be fp32, fp16 or bf16, got ", mixed.scalar_type());
  }
  return {q, k, v};
}

TORCH_LIBRARY_FRAGMENT(glm_kernels, m) {
  m.def("rope_qkv(Tensor mixed, Tensor position_ids, Tensor cos, Tensor sin, int num_heads, Tensor(a!)? k_out=None, "
        "Tensor(b!)? v_out=None) -> (Tensor, Tensor, Tensor)",
        &glm_kernels::rope_qkv);
}
