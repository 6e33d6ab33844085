// glm_kernels._C: weight-only INT8/INT4 products on the CPU, reading THUDM's layout as it is.
//
//   gemv(x [M, K] float, weight int8 [N, K] (8 bits) or [N, K/2] (4 bits), scale fp16 [N], bits) -> fp32 [M, N]
//   dequantize_into(weight, scale, bits, start, stop, out): rows [start, stop) of W into out (fp32 or bf16)
//   dequantize(weight, scale, bits, start, stop) -> fp32 [stop - start, K]
//
// THUDM's 4-bit byte j of a row holds element 2j in its high nibble and element 2j+1 in its low nibble,
// both 4-bit two's complement. W = q * scale[:, None].
//
// gemv accumulates x[m, k] * q[n, k] in fp32 and multiplies the row sum by the fp16 scale (exact in fp32)
// once: every output is rounded once, by the caller's cast to the activation dtype. It is written for
// the few rows of decoding (each weight row is decoded once and used for every row of x); the caller
// (glm_kernels/ops/quant_linear.py) sends larger M to dequantize_into + matmul. Work is split over output
// rows with at::parallel_for (the extension is built with -fopenmp, as ATen is). Three builds of the inner
// loops: AVX512F, AVX2+FMA (both chosen at run time with __builtin_cpu_supports) and portable C++.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GLM_X86 1
#endif

namespace {

constexpr int64_t kMaxRows = 8;  // rows of x handled together (a register block per row)

// ----------------------------------------------------------------------------- portable

void rows_int8_scalar(const float* x, int64_t ldx, int64_t m_rows, const int8_t* w, int64_t k, float* acc) {
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* xm = x + m * ldx;
    float s = 0.f;
    for (int64_t i = 0; i < k; ++i) s += xm[i] * static_cast<float>(w[i]);
    acc[m] = s;
  }
}

// x_even/x_odd: [m_rows, k/2] the even and odd columns of x
void rows_int4_scalar(const float* xe, const float* xo, int64_t ldx, int64_t m_rows, const int8_t* w,
                      int64_t half, float* acc) {
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* e = xe + m * ldx;
    const float* o = xo + m * ldx;
    float s = 0.f;
    for (int64_t j = 0; j < half; ++j) {
      const int8_t b = w[j];
      const int hi = b >> 4;                                      // arithmetic shift: signed high nibble
      const int lo = static_cast<int8_t>(static_cast<uint8_t>(b) << 4) >> 4;  // signed low nibble
      s += e[j] * static_cast<float>(hi) + o[j] * static_cast<float>(lo);
    }
    acc[m] = s;
  }
}

#ifdef GLM_X86
// ----------------------------------------------------------------------------- AVX512F

__attribute__((target("avx512f"))) inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// U 16-wide chunks per step and row of x: M * U independent accumulators (FMA latency is 4 cycles); M is a
// template argument so the accumulators live in registers.
template <int M>
constexpr int unroll512() { return M <= 2 ? 4 : (M <= 4 ? 2 : 1); }

template <int M>
__attribute__((target("avx512f"))) void rows_int8_avx512_t(const float* x, int64_t ldx, const int8_t* w, int64_t k,
                                                           float* acc) {
  constexpr int U = unroll512<M>();
  __m512 a[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) a[m][u] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 * U <= k; i += 16 * U) {
    __m512 wf[U];
    for (int u = 0; u < U; ++u)
      wf[u] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 16 * u))));
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) a[m][u] = _mm512_fmadd_ps(wf[u], _mm512_loadu_ps(x + m * ldx + i + 16 * u), a[m][u]);
  }
  for (; i + 16 <= k; i += 16) {
    const __m512 wf =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i))));
    for (int m = 0; m < M; ++m) a[m][0] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + m * ldx + i), a[m][0]);
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = a[m][0];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, a[m][u]);
    float s = hsum512(sum);
    const float* xm = x + m * ldx;
    for (int64_t t = i; t < k; ++t) s += xm[t] * static_cast<float>(w[t]);
    acc[m] = s;
  }
}

template <int M>
__attribute__((target("avx512f"))) void rows_int4_avx512_t(const float* xe, const float* xo, int64_t ldx,
                                                           const int8_t* w, int64_t half, float* acc) {
  constexpr int U = unroll512<M>() / 2 > 0 ? unroll512<M>() / 2 : 1;  // each chunk feeds two accumulators
  // signed value of a 4-bit two's complement nibble 0..15
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  __m512 a[M][2 * U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < 2 * U; ++u) a[m][u] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 * U <= half; j += 16 * U) {  // 16 bytes = 32 weights per chunk
    __m512 hi[U], lo[U];
    for (int u = 0; u < U; ++u) {
      // nibble -> float through a 16-entry table (vpermps reads the low 4 bits of each index): fewer
      // instructions than sign-extending shifts and two int->float conversions
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j + 16 * u)));
      hi[u] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
      lo[u] = _mm512_permutexvar_ps(b, lut);
    }
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) {
        a[m][2 * u] = _mm512_fmadd_ps(hi[u], _mm512_loadu_ps(xe + m * ldx + j + 16 * u), a[m][2 * u]);
        a[m][2 * u + 1] = _mm512_fmadd_ps(lo[u], _mm512_loadu_ps(xo + m * ldx + j + 16 * u), a[m][2 * u + 1]);
      }
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = a[m][0];
    for (int u = 1; u < 2 * U; ++u) sum = _mm512_add_ps(sum, a[m][u]);
    float s = hsum512(sum);
    const float* e = xe + m * ldx;
    const float* o = xo + m * ldx;
    for (int64_t t = j; t < half; ++t) {
      const int8_t bt = w[t];
      s += e[t] * static_cast<float>(bt >> 4) +
           o[t] * static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(bt) << 4) >> 4);
    }
    acc[m] = s;
  }
}

#define GLM_DISPATCH_M(fn, m_rows, ...)        \
  switch (m_rows) {                            \
    case 1: fn<1>(__VA_ARGS__); break;         \
    case 2: fn<2>(__VA_ARGS__); break;         \
    case 3: fn<3>(__VA_ARGS__); break;         \
    case 4: fn<4>(__VA_ARGS__); break;         \
    case 5: fn<5>(__VA_ARGS__); break;         \
    case 6: fn<6>(__VA_ARGS__); break;         \
    case 7: fn<7>(__VA_ARGS__); break;         \
    default: fn<8>(__VA_ARGS__); break;        \
  }

void rows_int8_avx512(const float* x, int64_t ldx, int64_t m_rows, const int8_t* w, int64_t k, float* acc) {
  GLM_DISPATCH_M(rows_int8_avx512_t, m_rows, x, ldx, w, k, acc)
}

void rows_int4_avx512(const float* xe, const float* xo, int64_t ldx, int64_t m_rows, const int8_t* w, int64_t half,
                      float* acc) {
  GLM_DISPATCH_M(rows_int4_avx512_t, m_rows, xe, xo, ldx, w, half, acc)
}

__attribute__((target("avx512f"))) void dequant_int8_avx512(const int8_t* w, float s, int64_t k, float* out) {
  const __m512 vs = _mm512_set1_ps(s);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i))));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(v, vs));
  }
  for (; i < k; ++i) out[i] = static_cast<float>(w[i]) * s;
}

__attribute__((target("avx512f"))) void dequant_int4_avx512(const int8_t* w, float s, int64_t half, float* out) {
  const __m512 vs = _mm512_set1_ps(s);
  // output element 2j = high nibble of byte j, 2j+1 = low nibble: interleave the two vectors
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  int64_t j = 0;
  for (; j + 16 <= half; j += 16) {
    const __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j)));
    const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4)), vs);
    const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28)), vs);
    _mm512_storeu_ps(out + 2 * j, _mm512_permutex2var_ps(hi, lo_idx, lo));
    _mm512_storeu_ps(out + 2 * j + 16, _mm512_permutex2var_ps(hi, hi_idx, lo));
  }
  for (; j < half; ++j) {
    const int8_t bt = w[j];
    out[2 * j] = static_cast<float>(bt >> 4) * s;
    out[2 * j + 1] = static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(bt) << 4) >> 4) * s;
  }
}

// ----------------------------------------------------------------------------- AVX2 + FMA

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int M>
__attribute__((target("avx2,fma"))) void rows_int8_avx2_t(const float* x, int64_t ldx, const int8_t* w, int64_t k,
                                                          float* acc) {
  constexpr int U = unroll512<M>();
  __m256 a[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) a[m][u] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * U <= k; i += 8 * U) {
    __m256 wf[U];
    for (int u = 0; u < U; ++u)
      wf[u] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i + 8 * u))));
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) a[m][u] = _mm256_fmadd_ps(wf[u], _mm256_loadu_ps(x + m * ldx + i + 8 * u), a[m][u]);
  }
  for (int m = 0; m < M; ++m) {
    __m256 sum = a[m][0];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, a[m][u]);
    float s = hsum256(sum);
    const float* xm = x + m * ldx;
    for (int64_t t = i; t < k; ++t) s += xm[t] * static_cast<float>(w[t]);
    acc[m] = s;
  }
}

template <int M>
__attribute__((target("avx2,fma"))) void rows_int4_avx2_t(const float* xe, const float* xo, int64_t ldx,
                                                          const int8_t* w, int64_t half, float* acc) {
  constexpr int U = unroll512<M>() / 2 > 0 ? unroll512<M>() / 2 : 1;
  __m256 a[M][2 * U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < 2 * U; ++u) a[m][u] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 * U <= half; j += 8 * U) {  // 8 bytes = 16 weights per chunk
    __m256 hi[U], lo[U];
    for (int u = 0; u < U; ++u) {
      const __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + j + 8 * u)));
      hi[u] = _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 4));
      lo[u] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
    }
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) {
        a[m][2 * u] = _mm256_fmadd_ps(hi[u], _mm256_loadu_ps(xe + m * ldx + j + 8 * u), a[m][2 * u]);
        a[m][2 * u + 1] = _mm256_fmadd_ps(lo[u], _mm256_loadu_ps(xo + m * ldx + j + 8 * u), a[m][2 * u + 1]);
      }
  }
  for (int m = 0; m < M; ++m) {
    __m256 sum = a[m][0];
    for (int u = 1; u < 2 * U; ++u) sum = _mm256_add_ps(sum, a[m][u]);
    float s = hsum256(sum);
    const float* e = xe + m * ldx;
    const float* o = xo + m * ldx;
    for (int64_t t = j; t < half; ++t) {
      const int8_t bt = w[t];
      s += e[t] * static_cast<float>(bt >> 4) +
           o[t] * static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(bt) << 4) >> 4);
    }
    acc[m] = s;
  }
}

void rows_int8_avx2(const float* x, int64_t ldx, int64_t m_rows, const int8_t* w, int64_t k, float* acc) {
  GLM_DISPATCH_M(rows_int8_avx2_t, m_rows, x, ldx, w, k, acc)
}

void rows_int4_avx2(const float* xe, const float* xo, int64_t ldx, int64_t m_rows, const int8_t* w, int64_t half,
                    float* acc) {
  GLM_DISPATCH_M(rows_int4_avx2_t, m_rows, xe, xo, ldx, w, half, acc)
}
#endif  // GLM_X86

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef GLM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

void check(const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kChar && weight.dim() == 2,
              "weight must be a CPU int8 [out, in] or [out, in/2] tensor");
  TORCH_CHECK(scale.device().is_cpu() && scale.dim() == 1 && scale.size(0) == weight.size(0),
              "scale must be a CPU [out] tensor");
}

}  // namespace

// y [M, N] fp32 = x [M, K] @ (q * scale)^T, fp32 accumulation, one multiplication by the scale per output.
torch::Tensor gemv(const torch::Tensor& x_in, const torch::Tensor& weight_in, const torch::Tensor& scale_in,
                   int64_t bits) {
  check(weight_in, scale_in, bits);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2, "x must be a CPU [M, K] tensor");
  const auto weight = weight_in.contiguous();
  const auto scale = scale_in.to(torch::kFloat).contiguous();
  const int64_t n = weight.size(0);
  const int64_t k = bits == 8 ? weight.size(1) : weight.size(1) * 2;
  TORCH_CHECK(x_in.size(1) == k, "x has ", x_in.size(1), " columns, the weight ", k);
  const int64_t rows = x_in.size(0);
  auto out = torch::empty({rows, n}, x_in.options().dtype(torch::kFloat));
  if (rows == 0 || n == 0) return out;
  // fp32 copies of x: as it is for 8 bits; its even and odd columns for 4 bits (the two nibbles of a byte)
  torch::Tensor xa, xb;
  if (bits == 8) {
    xa = x_in.to(torch::kFloat).contiguous();
  } else {
    auto xf = x_in.to(torch::kFloat);
    xa = xf.slice(1, 0, k, 2).contiguous();
    xb = xf.slice(1, 1, k, 2).contiguous();
  }
  const float* sp = scale.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  const int64_t ldw = weight.size(1);
  const Isa chosen = isa();
  for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
    const int64_t mb = std::min(kMaxRows, rows - m0);
    const int64_t ldx = xa.size(1);
    const float* xap = xa.data_ptr<float>() + m0 * ldx;
    const float* xbp = bits == 4 ? xb.data_ptr<float>() + m0 * ldx : nullptr;
    // Columns in blocks whose slice of x (mb rows, fp32) stays within 16 KiB of L1: every weight row then
    // reads x from L1, and each weight byte is still read once (block by block, row after row).
    const int64_t per_block = bits == 8 ? 4096 : 2048;  // fp32 x values per row of x (4 bits: even + odd)
    const int64_t block = std::max<int64_t>(64, per_block / mb / 64 * 64);  // weight bytes per row and block
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {  // 16 rows at least per thread
      float acc[kMaxRows];
      std::vector<float> sums((end - begin) * mb, 0.f);
      for (int64_t c0 = 0; c0 < ldw; c0 += block) {
        const int64_t width = std::min(block, ldw - c0);  // weight bytes in this block
        for (int64_t r = begin; r < end; ++r) {
          const int8_t* wr = wp + r * ldw + c0;
          if (bits == 8) {
#ifdef GLM_X86
            if (chosen == Isa::kAvx512) rows_int8_avx512(xap + c0, ldx, mb, wr, width, acc);
            else if (chosen == Isa::kAvx2) rows_int8_avx2(xap + c0, ldx, mb, wr, width, acc);
            else
#endif
              rows_int8_scalar(xap + c0, ldx, mb, wr, width, acc);
          } else {
#ifdef GLM_X86
            if (chosen == Isa::kAvx512) rows_int4_avx512(xap + c0, xbp + c0, ldx, mb, wr, width, acc);
            else if (chosen == Isa::kAvx2) rows_int4_avx2(xap + c0, xbp + c0, ldx, mb, wr, width, acc);
            else
#endif
              rows_int4_scalar(xap + c0, xbp + c0, ldx, mb, wr, width, acc);
          }
          float* sr = sums.data() + (r - begin) * mb;
          for (int64_t m = 0; m < mb; ++m) sr[m] += acc[m];
        }
      }
      for (int64_t r = begin; r < end; ++r)
        for (int64_t m = 0; m < mb; ++m) op[(m0 + m) * n + r] = sums[(r - begin) * mb + m] * sp[r];
    });
  }
  return out;
}

// rows [start, stop) of W = q * scale, fp32
namespace {

void dequant_row(const int8_t* wr, float s, int64_t ldw, int64_t bits, Isa chosen, float* o) {
#ifdef GLM_X86
  if (chosen == Isa::kAvx512) {
    if (bits == 8) dequant_int8_avx512(wr, s, ldw, o);
    else dequant_int4_avx512(wr, s, ldw, o);
    return;
  }
#endif
  if (bits == 8) {
    for (int64_t i = 0; i < ldw; ++i) o[i] = static_cast<float>(wr[i]) * s;
  } else {
    for (int64_t j = 0; j < ldw; ++j) {
      const int8_t b = wr[j];
      o[2 * j] = static_cast<float>(b >> 4) * s;
      o[2 * j + 1] = static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(b) << 4) >> 4) * s;
    }
  }
}

#ifdef GLM_X86
// fp32 -> bf16, rounding to nearest even (the values are finite: q times an fp16 scale)
__attribute__((target("avx512f"))) void to_bf16_avx512(const float* in, int64_t k, c10::BFloat16* out) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(in + i));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), one);
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(bias, lsb)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < k; ++i) out[i] = c10::BFloat16(in[i]);
}
#endif

}  // namespace

// Rows [start, stop) of W = q * scale into `out` (contiguous CPU [>= stop - start, K], fp32 or bf16: the product
// is computed in fp32 and rounded once). Callers reuse one cache-sized buffer for every block.
void dequantize_into(const torch::Tensor& weight_in, const torch::Tensor& scale_in, int64_t bits, int64_t start,
                     int64_t stop, torch::Tensor& out) {
  check(weight_in, scale_in, bits);
  const auto weight = weight_in.contiguous();
  const auto scale = scale_in.to(torch::kFloat).contiguous();
  TORCH_CHECK(0 <= start && start <= stop && stop <= weight.size(0), "rows [", start, ", ", stop, ") out of range");
  const int64_t ldw = weight.size(1);
  const int64_t k = bits == 8 ? ldw : ldw * 2;
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(out.device().is_cpu() && (out.scalar_type() == torch::kFloat || bf16) && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) >= stop - start && out.size(1) == k,
              "out must be a contiguous fp32 or bf16 CPU tensor of at least [", stop - start, ", ", k, "]");
  const float* sp = scale.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const Isa chosen = isa();
  at::parallel_for(start, stop, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, k)), [&](int64_t begin, int64_t end) {
    std::vector<float> row(bf16 ? k : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int8_t* wr = wp + r * ldw;
      if (!bf16) {
        dequant_row(wr, sp[r], ldw, bits, chosen, out.data_ptr<float>() + (r - start) * k);
        continue;
      }
      dequant_row(wr, sp[r], ldw, bits, chosen, row.data());
      c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + (r - start) * k;
#ifdef GLM_X86
      if (chosen == Isa::kAvx512) {
        to_bf16_avx512(row.data(), k, o);
        continue;
      }
#endif
      for (int64_t i = 0; i < k; ++i) o[i] = c10::BFloat16(row[i]);
    }
  });
}

torch::Tensor dequantize(const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits, int64_t start,
                         int64_t stop) {
  const int64_t k = bits == 8 ? weight.size(1) : weight.size(1) * 2;
  auto out = torch::empty({std::max<int64_t>(stop - start, 0), k}, weight.options().dtype(torch::kFloat));
  dequantize_into(weight, scale, bits, start, stop, out);
  return out;
}

std::string isa_name() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512f";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "glm_kernels CPU extension: weight-only INT8/INT4 products on THUDM's layout";
  m.def("gemv", &gemv, "x [M, K] @ (q * scale)^T in fp32 (THUDM int8 / int4 weight)", py::arg("x"), py::arg("weight"),
        py::arg("scale"), py::arg("bits"));
  m.def("dequantize", &dequantize, "rows [start, stop) of q * scale, fp32", py::arg("weight"), py::arg("scale"),
        py::arg("bits"), py::arg("start"), py::arg("stop"));
  m.def("dequantize_into", &dequantize_into, "rows [start, stop) of q * scale into out[:stop - start] (fp32/bf16)",
        py::arg("weight"), py::arg("scale"), py::arg("bits"), py::arg("start"), py::arg("stop"), py::arg("out"));
  m.def("isa", &isa_name, "the instruction set the kernels use on this CPU");
  m.attr("VERSION") = 5;
}
