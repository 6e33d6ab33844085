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
// DRAM speed (fp32, 2049 keys: 2.2 ms against PyTorch's 1.7). Work is split over (batch, head) pairs. With AVX512
// and a head width that is a multiple of 16, a row's q and its output stay in registers (attend_row).
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

#ifdef GLM_X86
// The scores of a query row (weights[0, sk), already scaled) become their unnormalised softmax weights
// exp(score - max), masked keys 0; returns their sum. Masked keys are left out; a fully masked row weighs every key
// alike (the original's scores are all equal there).
GLM_AVX512 inline float softmax_weights(float* weights, int64_t sk, const bool* mrow, bool any_visible) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  float top = kMasked;
  int64_t j = 0;
  for (; j < sk; ++j) {
    if (!any_visible) weights[j] = 0.f;
    else if (mrow != nullptr && mrow[j]) weights[j] = kMasked;
    top = std::max(top, weights[j]);
  }
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= sk; j += 16) {
    const __m512 s = _mm512_loadu_ps(weights + j);
    const __m512 w = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, _mm512_set1_ps(kMasked), _CMP_NEQ_OQ),
                                         glm_kernels::vec::exp16(_mm512_sub_ps(s, _mm512_set1_ps(top))));
    _mm512_storeu_ps(weights + j, w);
    sum = _mm512_add_ps(sum, w);
  }
  float total = _mm512_reduce_add_ps(sum);
  for (; j < sk; ++j) {
    weights[j] = weights[j] == kMasked ? 0.f : std::exp(weights[j] - top);
    total += weights[j];
  }
  return total;
}

// How a head's row of 16 * N values is held as N fp32 vectors. Plain: vector n holds values [16n, 16n + 16).
template <typename T, int N>
struct PlainRow {
  static constexpr int kVectors = N;
  GLM_AVX512 static inline __m512 get(const T* row, int n) { return load16(row + 16 * n); }
  GLM_AVX512 static inline void put(T* row, const __m512* v) {
    for (int n = 0; n < N; ++n) glm_kernels::vec::store16(row + 16 * n, v[n]);
  }
};

// bf16 with N even: vectors 2c and 2c + 1 hold the even and odd values of [32c, 32c + 32), each 64-byte load made
// fp32 by a shift or a mask (the widening shuffles of load16 bound the loops at ~40 cycles per key and head)
template <int N>
struct SplitBf16Row {
  static constexpr int kVectors = N;
  GLM_AVX512 static inline __m512 get(const c10::BFloat16* row, int n) {
    const __m512i w = _mm512_loadu_si512(row + 32 * (n / 2));
    return n % 2 == 0 ? glm_kernels::vec::even_bf16(w) : glm_kernels::vec::odd_bf16(w);
  }
  GLM_AVX512 static inline void put(c10::BFloat16* row, const __m512* v) {
    for (int c = 0; c < N / 2; ++c) glm_kernels::vec::store32(row + 32 * c, v[2 * c], v[2 * c + 1]);
  }
};

// q . key j as 16 partial sums (q in registers, held as `Row` holds it), asking for the key kAheadRows further
template <typename Row, typename T>
GLM_AVX512 inline __m512 key_score(const __m512* q, const T* kp, int64_t ks0, int64_t sk, int64_t j) {
  const T* kr = kp + j * ks0;
  if (j + kAheadRows < sk) prefetch_row(kr + kAheadRows * ks0, 16 * Row::kVectors);
  __m512 s = _mm512_mul_ps(q[0], Row::get(kr, 0));
  for (int n = 1; n < Row::kVectors; ++n) s = _mm512_fmadd_ps(q[n], Row::get(kr, n), s);
  return s;
}

// One query row of one head: q held in registers, the scores of four keys per step (each an fp32 dot product in
// q's order, the four summed by one transposed reduction), the softmax weights by a vectorised exp, and the
// weighted sum of the value rows held in registers. The loops above take a dot product and a horizontal sum per
// key and add each value row into memory: ~83 us for one bf16 token over 129 keys x 16 heads of 128 on one core,
// ~32 us here. `weights` holds sk floats.
template <typename Row, typename T>
GLM_AVX512 void attend_row(const T* qi, const T* kp, int64_t ks0, const T* vp, int64_t vs0, int64_t sk,
                           const bool* mrow, bool any_visible, float scale, float* weights, T* oi) {
  constexpr int N = Row::kVectors;
  constexpr int64_t hd = 16 * N;
  __m512 q[N];
  for (int n = 0; n < N; ++n) q[n] = Row::get(qi, n);
  for (int64_t j = 0; j < std::min(sk, kAheadRows); ++j) prefetch_row(kp + j * ks0, hd);
  int64_t j = 0;
  for (; j + 4 <= sk; j += 4) {
    const __m512 s0 = key_score<Row>(q, kp, ks0, sk, j), s1 = key_score<Row>(q, kp, ks0, sk, j + 1);
    const __m512 s2 = key_score<Row>(q, kp, ks0, sk, j + 2), s3 = key_score<Row>(q, kp, ks0, sk, j + 3);
    _mm_storeu_ps(weights + j, _mm_mul_ps(glm_kernels::vec::reduce4(s0, s1, s2, s3), _mm_set1_ps(scale)));
  }
  for (; j < sk; ++j) weights[j] = _mm512_reduce_add_ps(key_score<Row>(q, kp, ks0, sk, j)) * scale;
  const float total = softmax_weights(weights, sk, mrow, any_visible);
  __m512 acc[N];
  for (int n = 0; n < N; ++n) acc[n] = _mm512_setzero_ps();
  for (j = 0; j < std::min(sk, kAheadRows); ++j) prefetch_row(vp + j * vs0, hd);
  for (j = 0; j < sk; ++j) {
    const T* vr = vp + j * vs0;
    if (j + kAheadRows < sk) prefetch_row(vr + kAheadRows * vs0, hd);
    if (weights[j] == 0.f) continue;  // a masked key (or a weight below fp32's range: it adds nothing)
    const __m512 w = _mm512_set1_ps(weights[j]);
    for (int n = 0; n < N; ++n) acc[n] = _mm512_fmadd_ps(w, Row::get(vr, n), acc[n]);
  }
  const __m512 inv = _mm512_set1_ps(1.f / total);
  for (int n = 0; n < N; ++n) acc[n] = _mm512_mul_ps(acc[n], inv);
  Row::put(oi, acc);
}

// attend_row for a head of 16 * N values: bf16 split into even / odd halves when N is even, plain otherwise
template <typename T, int N>
auto row_of_width() -> decltype(&attend_row<PlainRow<T, N>, T>) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && N % 2 == 0) return &attend_row<SplitBf16Row<N>, T>;
  else return &attend_row<PlainRow<T, N>, T>;
}

// attend_row for a head width hd = 16 * N, N in 1..16 (ChatGLM-6B: 128); nullptr for another width
template <typename T>
auto row_loop(int64_t hd) -> decltype(&attend_row<PlainRow<T, 1>, T>) {
  switch (hd % 16 == 0 ? hd / 16 : 0) {
#define GLM_ROW_CASE(n) \
  case n: return row_of_width<T, n>();
    GLM_ROW_CASE(1) GLM_ROW_CASE(2) GLM_ROW_CASE(3) GLM_ROW_CASE(4) GLM_ROW_CASE(5) GLM_ROW_CASE(6) GLM_ROW_CASE(7)
    GLM_ROW_CASE(8) GLM_ROW_CASE(9) GLM_ROW_CASE(10) GLM_ROW_CASE(11) GLM_ROW_CASE(12) GLM_ROW_CASE(13)
    GLM_ROW_CASE(14) GLM_ROW_CASE(15) GLM_ROW_CASE(16)
#undef GLM_ROW_CASE
    default: return nullptr;
  }
}
#endif

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
#ifdef GLM_X86
  const auto row = wide ? row_loop<T>(hd) : nullptr;
#endif
  at::parallel_for(0, b * nh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(sk), acc(hd);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / nh, h = bh % nh;
      for (int64_t i = 0; i < sq; ++i) {
        const T* qi = qp + i * qs0 + bi * qs1 + h * qs2;
        const bool* mrow = mask ? mask + bi * mask_batch_stride + i * sk : nullptr;
        bool any_visible = mrow == nullptr;
        for (int64_t j = 0; j < sk && !any_visible; ++j) any_visible = !mrow[j];
#ifdef GLM_X86
        if (row != nullptr) {
          row(qi, kp + bi * ks1 + h * ks2, ks0, vp + bi * vs1 + h * vs2, vs0, sk, mrow, any_visible, scale,
              scores.data(), op + (i * b + bi) * nh * hd + h * hd);
          continue;
        }
#endif
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
