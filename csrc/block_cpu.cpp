// glm_kernels._C: one GLM block of CPU inference over a KV cache (decoding) in one call.
//
//   block_infer(hidden [s, b, h], residual [s, b, h] or None, alpha, eps,
//               norms [ln_in weight, ln_in bias, ln_post weight, ln_post bias],
//               weights [query_key_value, dense, dense_h_to_4h, dense_4h_to_h], scales, biases, bits,
//               position_ids int64 [b, 2, s], cos, sin, num_heads, k_out, v_out, k_all, v_all, mask or None)
//     -> (m [s, b, h], mlp [s, b, h])
//   layers_infer(hidden, alpha, eps, the four-per-layer lists of every layer, position_ids, cos, sin, num_heads,
//                keys, values (each layer's [capacity, b, nh, hd] cache buffers), start, mask or None)
//     -> the last block's (m, mlp): every block in one call
//   step_infer(ids [b, s], embedding table (+ scale, bits, the dtype of its rows), layers_infer's arguments but
//              hidden, the final LayerNorm's weight, bias and eps, the LM head (+ scale, bits), the limits of the
//              ids and positions (0: unchecked))
//     -> logits [b, s, vocab]: the whole forward of ChatGLMForConditionalGeneration in one call; it raises
//        NotImplementedError (declines) before writing anything when a tensor it reads is off the CPU, of another
//        dtype, or needs a gradient, and the forward's ValueError for an id or position out of range
//
// Per linear: a float weight [out, in] with scale None and bits 0 (nn.Linear), or THUDM's int8 bytes with their
// fp16 row scale and bits 8 or 4 (QuantizedLinear); biases may be None. k_out / v_out are the cache views for the
// s new positions (written), k_all / v_all the views up to them; mask is the dense bool [b or 1, 1, s, sk] or None.
//
// It computes what GLMBlock.forward computes with a cache slot in CPU inference, operator for operator: the same
// extension operators (residual_layer_norm, linear on THUDM's bytes, rope_qkv, attention_few, bias_gelu) and ATen's
// linear for float weights, in the same order and dtypes, so its result is bitwise the Python path's
// (tests/test_block_infer.py). Nothing is fused beyond what those operators fuse: the gain is the ~40 Python calls
// of a block (module calls, backend dispatch, argument checks), about 0.15 ms per block, which is 1.2 ms of a
// 17 ms INT4 token of the benchmark model.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu_ops.h"

namespace {

// x [..., in] @ W^T (+ bias) as the model's `quant.linear` runs it on the CPU with the extension
torch::Tensor project(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& scale,
                      const c10::optional<torch::Tensor>& bias, int64_t bits,
                      const std::vector<glm_kernels::ReadAhead>& ahead = {}) {
  if (bits == 0) return at::linear(x, weight, bias);
  const auto y = glm_kernels::linear(x.reshape({-1, x.size(-1)}), weight, *scale, bits, bias, ahead);
  auto shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.reshape(shape);
}

// LayerNorm(x * alpha + residual), or LayerNorm(x) without a residual (ops.residual_layer_norm's CPU inference)
torch::Tensor residual_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual, double alpha,
                            const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
  return glm_kernels::residual_layer_norm(x, residual, alpha, weight, bias, eps);
}

// The memory of a cache view [sk, b, nh, hd] as runs of bytes: the whole view when it is contiguous, one run per
// (batch, head) when each head's rows lie one after the other (GLMKVCache's [b, nh, capacity, hd] buffers seen
// through seq_view), nothing otherwise.
void add_runs(const torch::Tensor& t, std::vector<glm_kernels::ReadAhead>& runs) {
  const int64_t size = t.element_size();
  if (t.is_contiguous()) {
    runs.push_back({t.data_ptr(), t.numel() * size});
    return;
  }
  if (t.dim() != 4 || t.stride(3) != 1 || t.stride(0) != t.size(3)) return;
  const char* base = static_cast<const char*>(t.data_ptr());
  for (int64_t b = 0; b < t.size(1); ++b)
    for (int64_t h = 0; h < t.size(2); ++h)
      runs.push_back({base + (b * t.stride(1) + h * t.stride(2)) * size, t.size(0) * t.size(3) * size});
}

std::tuple<torch::Tensor, torch::Tensor> block_infer(
    const torch::Tensor& hidden, const c10::optional<torch::Tensor>& residual, double alpha, double eps,
    const std::vector<torch::Tensor>& norms, const std::vector<torch::Tensor>& weights,
    const c10::List<c10::optional<torch::Tensor>>& scales, const c10::List<c10::optional<torch::Tensor>>& biases,
    const std::vector<int64_t>& bits, const torch::Tensor& position_ids, const torch::Tensor& cos,
    const torch::Tensor& sin, int64_t num_heads, const torch::Tensor& k_out, const torch::Tensor& v_out,
    const torch::Tensor& k_all, const torch::Tensor& v_all, const c10::optional<torch::Tensor>& mask) {
  TORCH_CHECK(hidden.dim() == 3 && hidden.device().is_cpu(), "hidden must be a CPU [s, b, h] tensor");
  TORCH_CHECK(norms.size() == 4, "norms must be [ln_in weight, ln_in bias, ln_post weight, ln_post bias], got ",
              norms.size(), " tensors");
  TORCH_CHECK(weights.size() == 4 && scales.size() == 4 && biases.size() == 4 && bits.size() == 4,
              "weights, scales, biases and bits must each hold the block's four linears (query_key_value, dense, "
              "dense_h_to_4h, dense_4h_to_h)");
  for (size_t i = 0; i < 4; ++i) {
    const bool quantized = bits[i] != 0;
    TORCH_CHECK(bits[i] == 0 || bits[i] == 4 || bits[i] == 8, "linear ", i, ": bits must be 0 (float), 4 or 8");
    TORCH_CHECK(quantized == scales.get(i).has_value(), "linear ", i, ": a scale goes with bits 4 or 8 and only then");
  }
  auto linear = [&](size_t i, const torch::Tensor& x, bool with_bias,
                    const std::vector<glm_kernels::ReadAhead>& ahead = {}) {
    return project(x, weights[i], scales.get(i), with_bias ? biases.get(i) : c10::nullopt, bits[i], ahead);
  };
  // the cached keys and values the attention reads, fetched during the QKV product (they are as cold as the
  // weights after a decode step's sweep: ~1 MiB per layer of the benchmark model at context 128)
  std::vector<glm_kernels::ReadAhead> cached;
  for (const auto* t : {&k_all, &v_all}) add_runs(*t, cached);

  // attention: LN_in, QKV, 2D rotation (k, v into the cache), attention over the cache, dense
  const auto a = residual_norm(hidden, residual, alpha, norms[0], norms[1], eps);
  const auto mixed = linear(0, a, true, cached);
  const auto q = std::get<0>(glm_kernels::rope_qkv(mixed, position_ids, cos, sin, num_heads, k_out, v_out));
  const auto attn = linear(1, glm_kernels::attention_few(q, k_all, v_all, mask), true);
  // MLP: LN_post of the joined residual, dense_h_to_4h without its bias, bias + GeLU, dense_4h_to_h
  auto m = residual_norm(a, attn, alpha, norms[2], norms[3], eps);
  const auto inner = glm_kernels::bias_gelu(linear(2, m, false), biases.get(2));
  auto out = linear(3, inner, true);
  return {m, out};
}

// Every block of the model in one call: block_infer layer after layer, each layer's arguments taken from the
// flattened lists (four per layer: norms, weights, scales, biases, bits), its cache views cut from the layer's
// whole [capacity, b, nh, hd] key and value buffers at [start, start + s). Returns the last block's (m, mlp), as
// the model's loop leaves them for the final LayerNorm. It saves the Python of a block call per layer (module
// call, argument lists, cache views, checks): ~0.1 ms per layer once a decode step's weights have swept the caches.
std::tuple<torch::Tensor, torch::Tensor> layers_infer(
    const torch::Tensor& hidden, double alpha, double eps, const std::vector<torch::Tensor>& norms,
    const std::vector<torch::Tensor>& weights, const c10::List<c10::optional<torch::Tensor>>& scales,
    const c10::List<c10::optional<torch::Tensor>>& biases, const std::vector<int64_t>& bits,
    const torch::Tensor& position_ids, const torch::Tensor& cos, const torch::Tensor& sin, int64_t num_heads,
    const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values, int64_t start,
    const c10::optional<torch::Tensor>& mask) {
  const size_t layers = keys.size();
  TORCH_CHECK(layers > 0 && values.size() == layers, "keys and values must hold one cache buffer per layer, got ",
              keys.size(), " and ", values.size());
  TORCH_CHECK(norms.size() == 4 * layers && weights.size() == 4 * layers && scales.size() == 4 * layers &&
                  biases.size() == 4 * layers && bits.size() == 4 * layers,
              "norms, weights, scales, biases and bits must hold four entries per layer (", 4 * layers, "), got ",
              norms.size(), ", ", weights.size(), ", ", scales.size(), ", ", biases.size(), ", ", bits.size());
  TORCH_CHECK(hidden.dim() == 3, "hidden must be [s, b, h]");
  const int64_t s = hidden.size(0);
  torch::Tensor h = hidden;
  c10::optional<torch::Tensor> residual;
  for (size_t i = 0; i < layers; ++i) {
    TORCH_CHECK(keys[i].dim() == 4 && values[i].dim() == 4 && start >= 0 && start + s <= keys[i].size(0) &&
                    start + s <= values[i].size(0),
                "layer ", i, ": the cache buffers must be [capacity, b, nh, hd] with room for positions [", start,
                ", ", start + s, ")");
    auto pick = [&](const auto& list) {
      return std::vector<typename std::decay_t<decltype(list)>::value_type>(list.begin() + 4 * i,
                                                                           list.begin() + 4 * i + 4);
    };
    c10::List<c10::optional<torch::Tensor>> layer_scales, layer_biases;
    for (size_t j = 4 * i; j < 4 * i + 4; ++j) {
      layer_scales.push_back(scales.get(j));
      layer_biases.push_back(biases.get(j));
    }
    auto [m, out] = block_infer(h, residual, alpha, eps, pick(norms), pick(weights), layer_scales, layer_biases,
                                pick(bits), position_ids, cos, sin, num_heads, keys[i].narrow(0, start, s),
                                values[i].narrow(0, start, s), keys[i].narrow(0, 0, start + s),
                                values[i].narrow(0, 0, start + s), mask);
    h = m;
    residual = out;
  }
  return {h, *residual};
}

// An integer tensor's values as contiguous int64 (read over numel() in memory order): int64 and contiguous, as
// generate() makes ids and positions, are read in place (no ATen call per step)
torch::Tensor as_longs(const torch::Tensor& t) {
  return t.scalar_type() == torch::kLong && t.is_contiguous() ? t : t.reshape({-1}).to(torch::kLong).contiguous();
}

// The input embeddings [b, s, h] of ids [b, s], as the model's embedding module computes them: `at::embedding` of a
// float table (bits 0), or each id's row of THUDM's bytes dequantized in fp32 and rounded to `dtype`
// (QuantizedEmbedding's few-ids path, which raises IndexError for an id outside the table).
torch::Tensor embed(const torch::Tensor& ids, const torch::Tensor& table, const c10::optional<torch::Tensor>& scale,
                    int64_t bits, at::ScalarType dtype) {
  TORCH_CHECK(ids.dim() == 2 && (ids.scalar_type() == torch::kLong || ids.scalar_type() == torch::kInt),
              "ids must be an integer [b, s] tensor");
  if (bits == 0) return at::embedding(table, ids);
  TORCH_CHECK(scale.has_value() && (bits == 4 || bits == 8), "a quantized embedding takes a scale and bits 4 or 8");
  const auto flat = as_longs(ids);
  const int64_t* id = flat.const_data_ptr<int64_t>();
  const int64_t n = flat.numel(), k = bits == 8 ? table.size(1) : table.size(1) * 2;
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(0 <= id[i] && id[i] < table.size(0), "QuantizedEmbedding: id ", id[i], " outside [0, ",
                      table.size(0), ")");
  // each row's q * scale in fp32, rounded once to the model's dtype: dequantize_into writes fp32 or bf16 itself
  // (to nearest even, as .to() rounds), so only fp16 takes a conversion (an ATen call from cold caches per step)
  const bool direct = dtype == torch::kBFloat16 || dtype == torch::kFloat;
  auto out = torch::empty({n, k}, table.options().dtype(direct ? dtype : torch::kFloat));
  for (int64_t i = 0; i < n; ++i)
    glm_kernels::dequantize_into(table, *scale, bits, id[i], id[i] + 1, out.narrow(0, i, 1));
  return (direct ? out : out.to(dtype)).reshape({ids.size(0), ids.size(1), -1});
}

// Why a step must not run on these tensors (empty: it may): every tensor it reads on the CPU, the float ones in the
// model's dtype (the embeddings'), THUDM's bytes int8, and none needing a gradient while gradients are on. A step
// checks this first, since the model keeps its arguments from step to step (glm_kernels/step_plan.py): a module
// moved or cast since then is seen here, before anything is written.
std::string unfit(at::ScalarType dtype, const torch::Tensor& embedding, const c10::optional<torch::Tensor>& embedding_scale,
                  int64_t embedding_bits, const std::vector<torch::Tensor>& norms,
                  const std::vector<torch::Tensor>& weights, const c10::List<c10::optional<torch::Tensor>>& scales,
                  const c10::List<c10::optional<torch::Tensor>>& biases, const std::vector<int64_t>& bits,
                  const torch::Tensor& cos, const torch::Tensor& sin, const std::vector<torch::Tensor>& keys,
                  const std::vector<torch::Tensor>& values, const torch::Tensor& final_weight,
                  const torch::Tensor& final_bias, const torch::Tensor& head,
                  const c10::optional<torch::Tensor>& head_scale, int64_t head_bits) {
  const bool grad = at::GradMode::is_enabled();
  std::string why;
  auto look = [&](const torch::Tensor& t, bool packed, const char* what, size_t i) {
    if (!why.empty()) return;
    if (!t.device().is_cpu()) why = " is not on the CPU";
    else if (packed ? t.scalar_type() != torch::kChar : t.scalar_type() != dtype) why = " has another dtype";
    else if (grad && t.requires_grad()) why = " needs a gradient";
    if (!why.empty()) why = std::string(what) + " " + std::to_string(i) + why;
  };
  auto scale_of = [&](const c10::optional<torch::Tensor>& t, const char* what, size_t i) {
    if (why.empty() && t.has_value() && (!t->device().is_cpu() || !t->is_floating_point() ||
                                         (grad && t->requires_grad())))
      why = std::string(what) + " " + std::to_string(i) + " is not a CPU float scale without a gradient";
  };
  look(embedding, embedding_bits != 0, "embedding", 0);
  scale_of(embedding_scale, "embedding scale", 0);
  for (size_t i = 0; i < norms.size(); ++i) look(norms[i], false, "norm", i);
  for (size_t i = 0; i < weights.size(); ++i) {
    look(weights[i], bits[i] != 0, "weight", i);
    scale_of(scales.get(i), "scale", i);
    if (biases.get(i).has_value()) look(*biases.get(i), false, "bias", i);
  }
  look(cos, false, "rotary table", 0);
  look(sin, false, "rotary table", 1);
  for (size_t i = 0; i < keys.size(); ++i) look(keys[i], false, "cached keys", i);
  for (size_t i = 0; i < values.size(); ++i) look(values[i], false, "cached values", i);
  look(final_weight, false, "final norm", 0);
  look(final_bias, false, "final norm", 1);
  look(head, head_bits != 0, "head", 0);
  scale_of(head_scale, "head scale", 0);
  return why;
}

// ValueError unless every value of `t` lies in [0, limit) (limit 0: unchecked), named as the model's forward does
void check_range(const torch::Tensor& t, int64_t limit, bool ids) {
  if (limit <= 0 || t.numel() == 0) return;
  const auto flat = as_longs(t);
  const int64_t* v = flat.const_data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(v, v + flat.numel());
  if (*lo >= 0 && *hi < limit) return;
  const int64_t bad = *lo < 0 ? *lo : *hi;
  if (ids) TORCH_CHECK_VALUE(false, "input_ids holds id ", bad, ", outside the vocabulary [0, ", limit, ")");
  TORCH_CHECK_VALUE(false, "position_ids holds ", bad, ", outside [0, max_sequence_length=", limit, ")");
}

// A whole CPU decoding forward of ChatGLMForConditionalGeneration in one call: the embeddings of `ids` [b, s],
// every block (layers_infer), the final LayerNorm of the last block's joined output and the LM head, giving the
// logits [b, s, vocab] (the head's output [s, b, vocab] made batch-first and contiguous, as the model returns it).
// The same operators in the same order as the model's forward, so the logits are bitwise its own; what it saves
// is the model-level Python of a step (~1.5 ms of an INT4 token of the benchmark model: the argument lists, the
// embedding, LayerNorm and head module calls, each from cold caches after the step's weights swept them).
torch::Tensor step_infer(
    const torch::Tensor& ids, const torch::Tensor& embedding, const c10::optional<torch::Tensor>& embedding_scale,
    int64_t embedding_bits, at::ScalarType embedding_dtype, double alpha, double eps,
    const std::vector<torch::Tensor>& norms, const std::vector<torch::Tensor>& weights,
    const c10::List<c10::optional<torch::Tensor>>& scales, const c10::List<c10::optional<torch::Tensor>>& biases,
    const std::vector<int64_t>& bits, const torch::Tensor& position_ids, const torch::Tensor& cos,
    const torch::Tensor& sin, int64_t num_heads,
    const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values, int64_t start,
    const c10::optional<torch::Tensor>& mask, const torch::Tensor& final_weight, const torch::Tensor& final_bias,
    double final_eps, const torch::Tensor& head, const c10::optional<torch::Tensor>& head_scale, int64_t head_bits,
    int64_t id_limit, int64_t position_limit) {
  TORCH_CHECK(head_bits == 0 || ((head_bits == 4 || head_bits == 8) && head_scale.has_value()),
              "the head is a float weight (bits 0) or THUDM's bytes with a scale (bits 4 or 8)");
  TORCH_CHECK(weights.size() == bits.size() && scales.size() == bits.size() && biases.size() == bits.size(),
              "weights, scales, biases and bits must have one entry per linear");
  TORCH_CHECK(ids.device().is_cpu() && position_ids.device().is_cpu(), "ids and position_ids must be on the CPU");
  const auto why = unfit(embedding_dtype, embedding, embedding_scale, embedding_bits, norms, weights, scales, biases,
                         bits, cos, sin, keys, values, final_weight, final_bias, head, head_scale, head_bits);
  TORCH_CHECK_NOT_IMPLEMENTED(why.empty(), "step_infer declines: ", why);
  check_range(ids, id_limit, true);
  check_range(position_ids, position_limit, false);
  const auto embeds = embed(ids, embedding, embedding_scale, embedding_bits, embedding_dtype);
  const auto [h, residual] = layers_infer(embeds.transpose(0, 1), alpha, eps, norms, weights, scales, biases, bits,
                                          position_ids, cos, sin, num_heads, keys, values, start, mask);
  const auto y = glm_kernels::residual_layer_norm(h, residual, alpha, final_weight, final_bias, final_eps);
  return project(y, head, head_scale, c10::nullopt, head_bits).permute({1, 0, 2}).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glm_kernels, m) {
  m.def("block_infer(Tensor hidden, Tensor? residual, float alpha, float eps, Tensor[] norms, Tensor[] weights, "
        "Tensor?[] scales, Tensor?[] biases, int[] bits, Tensor position_ids, Tensor cos, Tensor sin, int num_heads, "
        "Tensor(a!) k_out, Tensor(b!) v_out, Tensor k_all, Tensor v_all, Tensor? mask=None) -> (Tensor, Tensor)",
        &block_infer);
  m.def("layers_infer(Tensor hidden, float alpha, float eps, Tensor[] norms, Tensor[] weights, Tensor?[] scales, "
        "Tensor?[] biases, int[] bits, Tensor position_ids, Tensor cos, Tensor sin, int num_heads, Tensor(a!)[] keys, "
        "Tensor(b!)[] values, int start, Tensor? mask=None) -> (Tensor, Tensor)",
        &layers_infer);
  m.def("step_infer(Tensor ids, Tensor embedding, Tensor? embedding_scale, int embedding_bits, "
        "ScalarType embedding_dtype, float alpha, float eps, Tensor[] norms, Tensor[] weights, Tensor?[] scales, "
        "Tensor?[] biases, int[] bits, Tensor position_ids, Tensor cos, Tensor sin, int num_heads, "
        "Tensor(a!)[] keys, Tensor(b!)[] values, int start, Tensor? mask, "
        "Tensor final_weight, Tensor final_bias, float final_eps, Tensor head, Tensor? head_scale, int head_bits, "
        "int id_limit=0, int position_limit=0) -> Tensor",
        &step_infer);
}
