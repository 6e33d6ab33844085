// glm_kernels._C: weight-only INT8/INT4 products on the CPU, reading THUDM's layout as it is.
//
//   gemv(x [M, K] float, weight int8 [N, K] (8 bits) or [N, K/2] (4 bits), scale fp16 [N], bits) -> fp32 [M, N]
//   linear(x, weight, scale, bits, bias or None) -> [M, N] in x's dtype: gemv + bias, rounded once
//   stream_read(tensors) -> int: sums every 8-byte word of the tensors (the weight-read floor of a decode step)
//   dequantize_into(weight, scale, bits, start, stop, out): rows [start, stop) of W into out (fp32 or bf16)
//   dequantize(weight, scale, bits, start, stop) -> fp32 [stop - start, K]
//
// THUDM's 4-bit byte j of a row holds element 2j in its high nibble and element 2j+1 in its low nibble,
// both 4-bit two's complement. W = q * scale[:, None].
//
// gemv accumulates x[m, k] * q[n, k] in fp32 and multiplies the row sum by the fp16 scale (exact in fp32)
// once; linear adds the bias in fp32 and rounds every output once, to the activation dtype. It is written for
// the few rows of decoding (each weight row is decoded once and used for every row of x); the caller
// (glm_kernels/ops/quant_linear.py) sends larger M to dequantize_into + matmul. Work is split over output
// rows with at::parallel_for (the extension is built with -fopenmp, as ATen is); one row of x (decoding) and the
// floor read share their weight's chunks instead (parallel_chunks, csrc/chunks_cpu.h). Five builds of the inner
// loops, chosen at run time with __builtin_cpu_supports: AVX512-BF16 with VNNI (one bf16 row of x in 16-bit
// fixed point, see "one row of x in fixed point"), AVX512-BF16 (bf16 x only), AVX512F, AVX2+FMA and portable C++.
//
// The AVX512-BF16 loops (Zen 4, Sapphire Rapids and later) keep bf16 x as it is and convert q to bf16, which
// is exact (|q| <= 128 has at most 8 significant bits); vdpbf16ps multiplies bf16 pairs exactly in fp32 and
// accumulates in fp32, so the result is the fp32 loops' up to summation order, at half the instructions per
// weight: decoding reads the weights at DRAM speed instead of being bound by the int -> float conversions. With
// one row of x (decoding) they take four weight rows per pass and look the nibbles up with vpermw (see "one row
// of x" below): each x vector then serves four rows instead of one.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

#include "chunks_cpu.h"
#include "cpu_ops.h"
#include "isa.h"
#include "vec_cpu.h"

namespace {

using glm_kernels::Isa;
using glm_kernels::isa;
using glm_kernels::isa_label;
using glm_kernels::parallel_chunks;

constexpr int64_t kMaxRows = 8;  // rows of x handled together (a register block per row)
// bytes per chunk of a weight (or of a floor read) that the threads share through parallel_chunks, and the most
// rows one chunk of a product holds (narrow weights)
constexpr int64_t kChunkBytes = 32768;
constexpr int64_t kChunkRows = 256;

// ----------------------------------------------------------------------------- portable

// THUDM's byte: element 2j in the high nibble, 2j+1 in the low one, both 4-bit two's complement
inline int high_nibble(int8_t b) { return b >> 4; }  // arithmetic shift
inline int low_nibble(int8_t b) { return static_cast<int8_t>(static_cast<uint8_t>(b) << 4) >> 4; }

inline float value(float v) { return v; }
inline float value(uint16_t bf16_bits) { return c10::BFloat16(bf16_bits, c10::BFloat16::from_bits()); }

// sum of x[t] * q[t] for t in [from, to): the portable loop, and every vector loop's tail (X: fp32, or bf16 bits)
template <typename X>
float int8_dot(const X* x, const int8_t* w, int64_t from, int64_t to) {
  float s = 0.f;
  for (int64_t t = from; t < to; ++t) s += value(x[t]) * static_cast<float>(w[t]);
  return s;
}

// the same over bytes [from, to) of a 4-bit row; e / o: the even / odd columns of x
template <typename X>
float int4_dot(const X* e, const X* o, const int8_t* w, int64_t from, int64_t to) {
  float s = 0.f;
  for (int64_t t = from; t < to; ++t)
    s += value(e[t]) * static_cast<float>(high_nibble(w[t])) + value(o[t]) * static_cast<float>(low_nibble(w[t]));
  return s;
}

// q * scale for elements (8 bits) or bytes (4 bits) [from, to) of a row, into out (indexed by element)
inline void dequant_tail(const int8_t* w, float scale, int64_t bits, int64_t from, int64_t to, float* out) {
  for (int64_t t = from; t < to; ++t) {
    if (bits == 8) {
      out[t] = static_cast<float>(w[t]) * scale;
    } else {
      out[2 * t] = static_cast<float>(high_nibble(w[t])) * scale;
      out[2 * t + 1] = static_cast<float>(low_nibble(w[t])) * scale;
    }
  }
}

void rows_int8_scalar(const float* x, int64_t ldx, int64_t m_rows, const int8_t* w, int64_t k, float* acc) {
  for (int64_t m = 0; m < m_rows; ++m) acc[m] = int8_dot(x + m * ldx, w, 0, k);
}

// x_even/x_odd: [m_rows, k/2] the even and odd columns of x
void rows_int4_scalar(const float* xe, const float* xo, int64_t ldx, int64_t m_rows, const int8_t* w,
                      int64_t half, float* acc) {
  for (int64_t m = 0; m < m_rows; ++m) acc[m] = int4_dot(xe + m * ldx, xo + m * ldx, w, 0, half);
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
    acc[m] = hsum512(sum) + int8_dot(x + m * ldx, w, i, k);
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
    acc[m] = hsum512(sum) + int4_dot(xe + m * ldx, xo + m * ldx, w, j, half);
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
  dequant_tail(w, s, 8, i, k, out);
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
  dequant_tail(w, s, 4, j, half, out);
}


// ----------------------------------------------------------------------------- AVX512-BF16 (bf16 x)

#define GLM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// Software prefetch of the weight stream kPrefetchBytes ahead into L2 (into the next rows at the end of a row),
// one line per line consumed. The loops issue their loads more slowly than a plain read, so the hardware
// prefetchers alone keep too few lines in flight: without it long rows (ChatGLM-6B's 8192-wide dense_4h_to_h)
// and the LM head read 1.3-1.6x below the bandwidth. Measured over the benchmark model's 33 products, alternating
// in one process (docs/quantization.md): 16 KiB ahead into L2 reads 5-25% faster than the earlier 2 KiB into L1
// when DRAM gives ~40 GB/s, the same when it gives ~30. A prefetch never faults, so running past the end of the
// weight is harmless.
constexpr int64_t kPrefetchBytes = 16384;

inline void prefetch_ahead(const int8_t* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + b), _MM_HINT_T1);
}

// independent accumulators per row of x: enough to hide vdpbf16ps latency with one row, within 32 registers
// with eight
template <int M>
constexpr int unroll_bf16() { return M == 1 ? 4 : (M == 2 ? 2 : 1); }

// x: M rows of bf16 [k] (stride ldx); w: one weight row of k int8 values
template <int M>
GLM_BF16_TARGET void rows_int8_bf16_t(const uint16_t* x, int64_t ldx, const int8_t* w, int64_t k, float* acc) {
  constexpr int U = unroll_bf16<M>();
  __m512 a[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) a[m][u] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 * U <= k; i += 32 * U) {
    prefetch_ahead(w + i, 32 * U);
    for (int u = 0; u < U; ++u) {
      const int8_t* wu = w + i + 32 * u;
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wu))));
      const __m512 hi =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wu + 16))));
      const __m512bh wv = _mm512_cvtne2ps_pbh(hi, lo);  // elements 0..15 from lo, 16..31 from hi; exact
      for (int m = 0; m < M; ++m)
        a[m][u] = _mm512_dpbf16_ps(a[m][u], wv, (__m512bh)_mm512_loadu_si512(x + m * ldx + i + 32 * u));
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = a[m][0];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, a[m][u]);
    acc[m] = _mm512_reduce_add_ps(sum) + int8_dot(x + m * ldx, w, i, k);
  }
}

// xe / xo: M rows of the even / odd columns of x in bf16 [half] (stride ldx); w: one row of `half` THUDM bytes
template <int M>
GLM_BF16_TARGET void rows_int4_bf16_t(const uint16_t* xe, const uint16_t* xo, int64_t ldx, const int8_t* w,
                                      int64_t half, float* acc) {
  constexpr int U = unroll_bf16<M>() / 2 > 0 ? unroll_bf16<M>() / 2 : 1;  // each chunk feeds two accumulators
  // bf16 of the signed nibble (i & 15), for the 32 indices vpermw reads (its low 5 bits): the low nibble of a
  // byte then needs no masking, bit 4 (the high nibble's lowest) picks the upper, identical half of the table
  alignas(64) static const uint16_t table[32] = {
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040,
      0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0,
      0xC080, 0xC040, 0xC000, 0xBF80};
  const __m512i lut = _mm512_load_si512(table);
  __m512 a[M][2 * U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < 2 * U; ++u) a[m][u] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 * U <= half; j += 32 * U) {  // 32 bytes = 64 weights per chunk
    prefetch_ahead(w + j, 32 * U);
    for (int u = 0; u < U; ++u) {
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j + 32 * u)));
      const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), lut);  // elements 2j
      const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(b, lut);                        // elements 2j+1
      for (int m = 0; m < M; ++m) {
        const int64_t off = m * ldx + j + 32 * u;
        a[m][2 * u] = _mm512_dpbf16_ps(a[m][2 * u], hi, (__m512bh)_mm512_loadu_si512(xe + off));
        a[m][2 * u + 1] = _mm512_dpbf16_ps(a[m][2 * u + 1], lo, (__m512bh)_mm512_loadu_si512(xo + off));
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = a[m][0];
    for (int u = 1; u < 2 * U; ++u) sum = _mm512_add_ps(sum, a[m][u]);
    acc[m] = _mm512_reduce_add_ps(sum) + int4_dot(xe + m * ldx, xo + m * ldx, w, j, half);
  }
}

void rows_int8_bf16(const uint16_t* x, int64_t ldx, int64_t m_rows, const int8_t* w, int64_t k, float* acc) {
  GLM_DISPATCH_M(rows_int8_bf16_t, m_rows, x, ldx, w, k, acc)
}

void rows_int4_bf16(const uint16_t* xe, const uint16_t* xo, int64_t ldx, int64_t m_rows, const int8_t* w,
                    int64_t half, float* acc) {
  GLM_DISPATCH_M(rows_int4_bf16_t, m_rows, xe, xo, ldx, w, half, acc)
}

// ---- one row of x (decoding): several weight rows per pass
//
// With one row of x every vdpbf16ps above loads its own 64 bytes of x from L1: x is read two (8 bits) to four (4
// bits) times more often than the weight, and those loads, not the arithmetic, bound the loops at ~24 GB/s of
// weight per core. Here each x vector serves kPass weight rows, and the weight bytes become bf16 without widening
// loads: a 64-byte load is 32 16-bit words, each holding four nibbles, and vpermw looks each nibble up in a table
// (it reads the low 5 bits of each word, so the tables repeat in their upper half and the bit above the nibble
// does not matter). Measured on the benchmark's shapes in L2: 32-34 GB/s of weight per core against 24-26
// (docs/quantization.md).
//   4 bits: the word's nibbles 0..3 are elements 4j+1, 4j, 4j+3, 4j+2 of the row (THUDM: high nibble first), so x
//           goes into four streams, stream s holding x[4j + kInt4Offset[s]].
//   8 bits: word j holds elements 2j and 2j+1; q = 16 h + l with h the signed high nibble and l the unsigned low
//           one, both looked up (16 h and l are exact in bf16), so the streams are x's even and odd columns.
// Every product is exact in fp32 as before; only the order of the fp32 sums changes.
constexpr int kPass = 4;            // weight rows per pass: 16 accumulators, within 32 registers
constexpr int64_t kStep = 64;       // weight bytes per step and row (one zmm)
constexpr int64_t kAhead = 32768;   // prefetch distance along the pass's rows, which lie one after the other
constexpr int kInt4Offset[4] = {1, 0, 3, 2};

// bf16 tables indexed by a nibble (repeated for vpermw's 5-bit index): signed n, unsigned n, 16 x signed n
alignas(64) constexpr uint16_t kSignedNibble[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040,
    0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0,
    0xC080, 0xC040, 0xC000, 0xBF80};
alignas(64) constexpr uint16_t kUnsignedNibble[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150,
    0x4160, 0x4170, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130,
    0x4140, 0x4150, 0x4160, 0x4170};
alignas(64) constexpr uint16_t kSixteenSigned[32] = {
    0x0000, 0x4180, 0x4200, 0x4240, 0x4280, 0x42A0, 0x42C0, 0x42E0, 0xC300, 0xC2E0, 0xC2C0, 0xC2A0, 0xC280, 0xC240,
    0xC200, 0xC180, 0x0000, 0x4180, 0x4200, 0x4240, 0x4280, 0x42A0, 0x42C0, 0x42E0, 0xC300, 0xC2E0, 0xC2C0, 0xC2A0,
    0xC280, 0xC240, 0xC200, 0xC180};

// x (one row, bf16 bits, [k]) into the streams the pass reads: [4][steps * 32] (4 bits) or [2][steps * 32]
// (8 bits); each stream's 32 values per step gathered with two-source word permutes
GLM_BF16_TARGET void pass_streams(const uint16_t* x, int64_t bits, int64_t steps, uint16_t* out) {
  const int64_t len = steps * kStep / 2;  // words per row covered by the steps, a multiple of 32
  alignas(64) uint16_t index[32];
  if (bits == 4) {
    for (int s = 0; s < 4; ++s) {
      for (int j = 0; j < 32; ++j) index[j] = static_cast<uint16_t>(4 * (j % 16) + kInt4Offset[s]);
      const __m512i idx = _mm512_load_si512(index);
      for (int64_t j = 0; j < len; j += 32) {  // x[4j .. 4j + 128)
        const uint16_t* in = x + 4 * j;
        const __m512i lo = _mm512_permutex2var_epi16(_mm512_loadu_si512(in), idx, _mm512_loadu_si512(in + 32));
        const __m512i hi = _mm512_permutex2var_epi16(_mm512_loadu_si512(in + 64), idx, _mm512_loadu_si512(in + 96));
        _mm512_storeu_si512(out + s * len + j, _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1));
      }
    }
  } else {
    for (int s = 0; s < 2; ++s) {
      for (int j = 0; j < 32; ++j) index[j] = static_cast<uint16_t>(2 * j + s);
      const __m512i idx = _mm512_load_si512(index);
      for (int64_t j = 0; j < len; j += 32) {  // x[2j .. 2j + 64)
        const uint16_t* in = x + 2 * j;
        _mm512_storeu_si512(out + s * len + j,
                            _mm512_permutex2var_epi16(_mm512_loadu_si512(in), idx, _mm512_loadu_si512(in + 32)));
      }
    }
  }
}

// x . row over the row's bytes [from, ldw) past the passes' last whole step, from x itself (bf16 bits) in fp32
template <int Bits>
float pass_tail(const uint16_t* x, const int8_t* row, int64_t from, int64_t ldw) {
  if (Bits == 8) return int8_dot(x, row, from, ldw);
  float tail = 0.f;
  for (int64_t t = from; t < ldw; ++t)
    tail += value(x[2 * t]) * static_cast<float>(high_nibble(row[t])) +
            value(x[2 * t + 1]) * static_cast<float>(low_nibble(row[t]));
  return tail;
}

// sums[r] = x . row r of the R rows at w (stride ldw bytes) over the first `steps` 64-byte steps, then the tail
// bytes with the portable loops on x itself
template <int R, int Bits>
GLM_BF16_TARGET void pass_bf16(const uint16_t* streams, const uint16_t* x, const int8_t* w, int64_t ldw,
                               int64_t steps, float* sums) {
  const int64_t len = steps * kStep / 2;
  const __m512i t0 = _mm512_load_si512(Bits == 4 ? kSignedNibble : kUnsignedNibble);  // nibbles 0 and 2
  const __m512i t1 = _mm512_load_si512(Bits == 4 ? kSignedNibble : kSixteenSigned);   // nibbles 1 and 3
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < 4; ++s) a[r][s] = _mm512_setzero_ps();
  for (int64_t i = 0; i < steps; ++i) {
    const int64_t j = i * kStep;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + R * j + 64 * r + kAhead), _MM_HINT_T1);
    const int64_t o = j / 2;
    __m512bh xv[4];
    if (Bits == 4) {
      for (int s = 0; s < 4; ++s) xv[s] = (__m512bh)_mm512_loadu_si512(streams + s * len + o);
    } else {
      xv[0] = xv[1] = (__m512bh)_mm512_loadu_si512(streams + o);
      xv[2] = xv[3] = (__m512bh)_mm512_loadu_si512(streams + len + o);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512i b = _mm512_loadu_si512(w + r * ldw + j);
      a[r][0] = _mm512_dpbf16_ps(a[r][0], (__m512bh)_mm512_permutexvar_epi16(b, t0), xv[0]);
      a[r][1] = _mm512_dpbf16_ps(a[r][1], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), t1), xv[1]);
      a[r][2] = _mm512_dpbf16_ps(a[r][2], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 8), t0), xv[2]);
      a[r][3] = _mm512_dpbf16_ps(a[r][3], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 12), t1), xv[3]);
    }
  }
  // each row's four accumulators summed, then the rows' sums side by side (missing rows as zeros, so a row's sum
  // is computed in the same order whatever the pass size)
  __m512 row_sum[kPass];
  for (int r = 0; r < kPass; ++r)
    row_sum[r] = r < R ? _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3]))
                       : _mm512_setzero_ps();
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, glm_kernels::vec::reduce4(row_sum[0], row_sum[1], row_sum[2], row_sum[3]));
  for (int r = 0; r < R; ++r) sums[r] = lanes[r] + pass_tail<Bits>(x, w + r * ldw, steps * kStep, ldw);
}

// One thread's share of the read-ahead lines [first, last) (counted over the ranges one after the other), handed
// out a few per pass so the prefetches spread over the whole product instead of queueing in front of the weight
class AheadLines {
 public:
  AheadLines(const std::vector<glm_kernels::ReadAhead>& ranges, int64_t first, int64_t last, int64_t calls)
      : ranges_(ranges), line_(first), last_(last), per_pass_(calls > 0 ? (last - first + calls - 1) / calls : 0) {}

  void next() {
    for (int64_t i = 0; i < per_pass_ && line_ < last_; ++i, ++line_) {
      while (range_ < ranges_.size() && line_ - base_ >= lines(range_)) base_ += lines(range_++);
      if (range_ == ranges_.size()) return;
      __builtin_prefetch(static_cast<const char*>(ranges_[range_].data) + 64 * (line_ - base_), 0, 2);
    }
  }

  static int64_t total(const std::vector<glm_kernels::ReadAhead>& ranges) {
    int64_t n = 0;
    for (const auto& r : ranges) n += (r.bytes + 63) / 64;
    return n;
  }

 private:
  int64_t lines(size_t i) const { return (ranges_[i].bytes + 63) / 64; }
  const std::vector<glm_kernels::ReadAhead>& ranges_;
  size_t range_ = 0;
  int64_t base_ = 0;  // lines of the ranges before range_
  int64_t line_, last_, per_pass_;
};

// ---- one row of x in fixed point (AVX512-VNNI)
//
// With bf16 x, the passes above make four vdpbf16ps per 64 weight bytes, and on some CPUs that arithmetic, not
// DRAM, bounds them: on a 2-core Xeon (Emerald Rapids) VM their loop reads 15 GB/s of weight per core from L2,
// about what DRAM gives each core, and the products reached only 66-73% of the read floor. Here the row of x
// is first written as 16-bit integers at one power-of-two scale, x_fixed = rint(x * 2^shift) with
// max|x| * 2^shift <= 32640 (bf16 has 8 significant bits, so the largest element and every element within a
// factor 2^7 of it convert exactly; a smaller one is rounded to a multiple of 2^-shift, an error of at most
// max|x| * 2^-16 per element), and the weights meet it in vpdpwssd (16-bit pairs summed into int32):
//   4 bits: per word, nibbles 0-2 as (nibble ^ 8) = q + 8 (one vpternlogd after a shift) and nibble 3 by an
//           arithmetic shift; the +8 is taken back once per product (8 x the sum of streams 0..2, exact);
//   8 bits: the bytes sign-extended to words (vpmovsxbw), x in its natural order.
// The integer sums are exact (int32 lanes summed into int64 every block of steps, before any lane can overflow);
// the row's sum is then scaled by 2^-shift and rounded once to fp32. Same loop shape, twice the weight bytes per
// cycle from L2 (docs/quantization.md). The exact bf16 passes above remain for x holding inf or NaN, and for
// CPUs without VNNI (set_isa("avx512bf16") selects them).
#define GLM_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

// One row of x as the passes read it: bf16 streams (pass_bf16), or 16-bit fixed-point ones (pass_fixed)
struct RowStreams {
  std::vector<uint16_t> streams;  // bf16 bits, or int16 bits when `fixed`, in pass_streams' layout
  bool fixed = false;
  int shift = 0;                  // fixed: x_fixed = rint(x * 2^shift)
  int64_t offset = 0;             // fixed, 4 bits: what the +8 of the unsigned nibbles adds to every row's sum
};

// x (one bf16 row, [count], count a multiple of 32) -> out in 16-bit fixed point; false (out untouched) when x
// holds inf or NaN
GLM_VNNI_TARGET bool fixed_point(const uint16_t* x, int64_t count, uint16_t* out, int* shift) {
  // |x| ordered as bf16 is ordered as the integer bits & 0x7FFF
  __m512i top = _mm512_setzero_si512();
  for (int64_t i = 0; i < count; i += 32)
    top = _mm512_max_epu16(top, _mm512_and_si512(_mm512_loadu_si512(x + i), _mm512_set1_epi16(0x7FFF)));
  alignas(64) uint16_t tops[32];
  _mm512_store_si512(tops, top);
  int largest = 0;
  for (uint16_t t : tops) largest = std::max<int>(largest, t);
  if (largest >= 0x7F80) return false;  // inf or NaN: the exact passes give the IEEE result
  int exponent = 0;
  if (largest > 0) std::frexp(value(static_cast<uint16_t>(largest)), &exponent);
  *shift = 15 - exponent;  // largest * 2^shift = m * 2^15 with m in [0.5, 1) of 8 bits: <= 32640
  const __m512 by = _mm512_set1_ps(static_cast<float>(*shift));
  for (int64_t i = 0; i < count; i += 16) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
    // vscalefps scales by 2^shift without an intermediate overflow; vcvtps2dq rounds to nearest even
    const __m512i fixed = _mm512_cvtps_epi32(_mm512_scalef_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)), by));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(fixed));
  }
  return true;
}

// The streams of one bf16 row for `steps` 64-byte steps of a weight row: in fixed point when `fixed` is asked for
// and x holds no inf or NaN, else bf16
RowStreams row_streams(const uint16_t* x, int64_t bits, int64_t steps, bool fixed) {
  const int64_t count = steps * kStep * (bits == 4 ? 2 : 1);  // the elements the steps cover
  RowStreams row;
  row.streams.resize(steps * kStep * 2);  // 4 bits: 4 x 32 values per step; 8 bits: 2 x 32
  if (fixed && bits == 8) {
    row.fixed = fixed_point(x, count, row.streams.data(), &row.shift);
  } else if (fixed) {
    std::vector<uint16_t> words(count);
    row.fixed = fixed_point(x, count, words.data(), &row.shift);
    if (row.fixed) {
      pass_streams(words.data(), bits, steps, row.streams.data());
      int64_t unsigned_sum = 0;  // streams 0..2 meet q + 8
      for (int64_t i = 0; i < 3 * count / 4; ++i) unsigned_sum += static_cast<int16_t>(row.streams[i]);
      row.offset = 8 * unsigned_sum;
    }
  }
  if (!row.fixed) pass_streams(x, bits, steps, row.streams.data());
  return row;
}

// sum of the int32 lanes of v, in int64
GLM_VNNI_TARGET inline int64_t lanes_sum(__m512i v) {
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                  _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}

// pass_bf16 in fixed point: sums[r] = x . row r of the R rows at w over the first `steps` steps, then the tail
template <int R, int Bits>
GLM_VNNI_TARGET void pass_fixed(const RowStreams& fx, const uint16_t* x, const int8_t* w, int64_t ldw, int64_t steps,
                                float* sums) {
  // steps per block of int32 sums: a lane gains at most 2 * 32640 * 15 (4 bits) or 2 * 32640 * 128 (8 bits) a
  // step, and a row's accumulators are added in int32 before going to int64: within 2^31 either way
  constexpr int64_t kBlock = Bits == 4 ? 512 : 128;
  constexpr int kAcc = Bits == 4 ? 4 : 2;
  const int64_t len = steps * kStep / 2;
  const auto* xs = reinterpret_cast<const int16_t*>(fx.streams.data());
  const __m512i nibble = _mm512_set1_epi16(0x000F), eight = _mm512_set1_epi16(0x0008);
  int64_t total[R] = {};
  for (int64_t i0 = 0; i0 < steps; i0 += kBlock) {
    __m512i a[R][kAcc];
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < kAcc; ++s) a[r][s] = _mm512_setzero_si512();
    for (int64_t i = i0; i < std::min(steps, i0 + kBlock); ++i) {
      const int64_t j = i * kStep;
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + R * j + 64 * r + kAhead), _MM_HINT_T1);
      if (Bits == 4) {
        const int64_t o = j / 2;
        __m512i xv[4];
        for (int s = 0; s < 4; ++s) xv[s] = _mm512_loadu_si512(xs + s * len + o);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m512i b = _mm512_loadu_si512(w + r * ldw + j);
          // (b >> 4n & 15) ^ 8 = q + 8 for nibbles 0..2 (vpternlogd 0x6A: (a & b) ^ c); nibble 3 sign-extended
          a[r][0] = _mm512_dpwssd_epi32(a[r][0], _mm512_ternarylogic_epi32(b, nibble, eight, 0x6A), xv[0]);
          a[r][1] = _mm512_dpwssd_epi32(
              a[r][1], _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 4), nibble, eight, 0x6A), xv[1]);
          a[r][2] = _mm512_dpwssd_epi32(
              a[r][2], _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 8), nibble, eight, 0x6A), xv[2]);
          a[r][3] = _mm512_dpwssd_epi32(a[r][3], _mm512_srai_epi16(b, 12), xv[3]);
        }
      } else {
        const __m512i x0 = _mm512_loadu_si512(xs + j), x1 = _mm512_loadu_si512(xs + j + 32);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const auto* row = reinterpret_cast<const __m256i*>(w + r * ldw + j);
          a[r][0] = _mm512_dpwssd_epi32(a[r][0], _mm512_cvtepi8_epi16(_mm256_loadu_si256(row)), x0);
          a[r][1] = _mm512_dpwssd_epi32(a[r][1], _mm512_cvtepi8_epi16(_mm256_loadu_si256(row + 1)), x1);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      __m512i sum = _mm512_add_epi32(a[r][0], a[r][1]);
      if (Bits == 4) sum = _mm512_add_epi32(sum, _mm512_add_epi32(a[r][2], a[r][3]));
      total[r] += lanes_sum(sum);
    }
  }
  for (int r = 0; r < R; ++r)
    sums[r] = static_cast<float>(std::ldexp(static_cast<double>(total[r] - fx.offset), -fx.shift)) +
              pass_tail<Bits>(x, w + r * ldw, steps * kStep, ldw);
}

// rows [begin, end) of the weight: passes of kPass rows, the last rows of the range one by one, on x's streams
template <int Bits>
void rows_pass(const RowStreams& xs, const uint16_t* x, const int8_t* w, int64_t ldw, int64_t begin, int64_t end,
               float* sums, AheadLines& ahead) {
  const int64_t steps = ldw / kStep;
  int64_t r = begin;
  for (; r + kPass <= end; r += kPass) {
    ahead.next();
    if (xs.fixed) pass_fixed<kPass, Bits>(xs, x, w + r * ldw, ldw, steps, sums + r - begin);
    else pass_bf16<kPass, Bits>(xs.streams.data(), x, w + r * ldw, ldw, steps, sums + r - begin);
  }
  for (; r < end; ++r) {
    ahead.next();
    if (xs.fixed) pass_fixed<1, Bits>(xs, x, w + r * ldw, ldw, steps, sums + r - begin);
    else pass_bf16<1, Bits>(xs.streams.data(), x, w + r * ldw, ldw, steps, sums + r - begin);
  }
}

// sum of the 8-byte words of [p, p + n64 * 64), n64 64-byte lines, four loads in flight
__attribute__((target("avx512f"))) int64_t read_lines_avx512(const uint8_t* p, int64_t n64) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 <= n64; i += 4) {
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + 64 * i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + 64 * i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(p + 64 * i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(p + 64 * i + 192));
  }
  for (; i < n64; ++i) a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + 64 * i));
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
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
    acc[m] = hsum256(sum) + int8_dot(x + m * ldx, w, i, k);
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
    acc[m] = hsum256(sum) + int4_dot(xe + m * ldx, xo + m * ldx, w, j, half);
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

void check(const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kChar && weight.dim() == 2,
              "weight must be a CPU int8 [out, in] or [out, in/2] tensor");
  TORCH_CHECK(scale.device().is_cpu() && scale.dim() == 1 && scale.size(0) == weight.size(0),
              "scale must be a CPU [out] tensor");
}

// A 1-D fp32 / fp16 / bf16 tensor read element by element as fp32: the fp16 scales (and biases) are read as they
// are in every product of every decode step, without a converted copy per call.
class FloatRow {
 public:
  FloatRow(const torch::Tensor& t, const char* name) : t_(t.contiguous()), dtype_(t_.scalar_type()) {
    TORCH_CHECK(dtype_ == torch::kFloat || dtype_ == torch::kHalf || dtype_ == torch::kBFloat16, name,
                " must be fp32, fp16 or bf16, got ", dtype_);
  }
  int64_t size() const { return t_.numel(); }
  // elements [begin, end) as fp32 into out: one dtype switch per range, not per element
  void read(int64_t begin, int64_t end, float* out) const {
    switch (dtype_) {
      case torch::kHalf: copy(t_.const_data_ptr<c10::Half>(), begin, end, out); break;
      case torch::kBFloat16: copy(t_.const_data_ptr<c10::BFloat16>(), begin, end, out); break;
      default: copy(t_.const_data_ptr<float>(), begin, end, out); break;
    }
  }
  float operator[](int64_t i) const {
    switch (dtype_) {
      case torch::kHalf: return static_cast<float>(t_.const_data_ptr<c10::Half>()[i]);
      case torch::kBFloat16: return static_cast<float>(t_.const_data_ptr<c10::BFloat16>()[i]);
      default: return t_.const_data_ptr<float>()[i];
    }
  }

 private:
  template <typename T>
  static void copy(const T* p, int64_t begin, int64_t end, float* out) {
    for (int64_t i = begin; i < end; ++i) out[i - begin] = static_cast<float>(p[i]);
  }
  torch::Tensor t_;
  at::ScalarType dtype_;
};

// One output element: the fp32 row sum times the fp16 scale (exact in fp32), plus the bias in fp32, rounded once
// to the output dtype.
template <typename T>
inline void store(T* out, float value) { *out = static_cast<T>(value); }

// x [M, K] (row-major, K even) -> out[0 : M*K/2] the even columns, out[M*K/2 : M*K] the odd ones
template <typename T>
void deinterleave(const T* x, int64_t pairs, T* out) {
  for (int64_t i = 0; i < pairs; ++i) {
    out[i] = x[2 * i];
    out[pairs + i] = x[2 * i + 1];
  }
}

// y [M, N] = x [M, K] @ (q * scale)^T (+ bias), fp32 accumulation, written in out's dtype (fp32, fp16, bf16).
void product_into(const torch::Tensor& x_in, const torch::Tensor& weight_in, const torch::Tensor& scale_in,
                  int64_t bits, const c10::optional<torch::Tensor>& bias_in, torch::Tensor& out,
                  const std::vector<glm_kernels::ReadAhead>& ahead = {}) {
  const auto weight = weight_in.contiguous();
  const FloatRow scale(scale_in, "scale");
  const int64_t n = weight.size(0);
  const int64_t k = bits == 8 ? weight.size(1) : weight.size(1) * 2;
  const int64_t rows = x_in.size(0);
  if (rows == 0 || n == 0) return;
  c10::optional<FloatRow> bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == n, "bias must be [", n, "]");
    bias.emplace(*bias_in, "bias");
  }
  const Isa chosen = isa();
  // bf16 x on an AVX512-BF16 CPU stays bf16 (even / odd columns for 4 bits); otherwise an fp32 copy
  const bool bf16_x = chosen >= Isa::kAvx512Bf16 && x_in.scalar_type() == torch::kBFloat16;
  const auto x_dtype = bf16_x ? torch::kBFloat16 : torch::kFloat;
  // x as the loops read it; usually no copy for 8 bits. For 4 bits the even / odd columns go to one new buffer
  // in a plain loop (a decode step makes ~30 of these calls; strided slices cost five ATen ops each).
  const auto xc = x_in.scalar_type() == x_dtype ? x_in.contiguous() : x_in.to(x_dtype).contiguous();
  // xa: x (8 bits) or its even columns, xb: the odd ones (4 bits), both [rows, ldx] row-major, in x_dtype
  torch::Tensor halves;
  const char* xa = static_cast<const char*>(xc.data_ptr());
  const char* xb = nullptr;
  const int64_t ldx = bits == 8 ? k : k / 2;
  if (bits == 4 && !(bf16_x && rows == 1)) {  // one bf16 row of x takes the pass loops, which build their own streams
    halves = torch::empty({2, rows, ldx}, xc.options());
    if (bf16_x) deinterleave(reinterpret_cast<const uint16_t*>(xc.data_ptr()), rows * ldx,
                             reinterpret_cast<uint16_t*>(halves.data_ptr()));
    else deinterleave(xc.data_ptr<float>(), rows * ldx, halves.data_ptr<float>());
    xa = static_cast<const char*>(halves.data_ptr());
    xb = xa + rows * ldx * halves.element_size();
  }
  const int8_t* wp = weight.data_ptr<int8_t>();
  const int64_t ldw = weight.size(1);
  auto finish = [&](auto* op, int64_t m0, int64_t mb, int64_t begin, int64_t end, const float* sums) {
    float s[kChunkRows], b[kChunkRows];  // blocks of rows: no allocation per call (one per chunk of a product)
    for (int64_t r0 = begin; r0 < end; r0 += kChunkRows) {
      const int64_t r1 = std::min(end, r0 + kChunkRows);
      scale.read(r0, r1, s);
      if (bias) bias->read(r0, r1, b);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t m = 0; m < mb; ++m) {
          const float v = sums[(r - begin) * mb + m] * s[r - r0];
          store(op + (m0 + m) * n + r, bias ? v + b[r - r0] : v);
        }
    }
  };
  auto write = [&](int64_t m0, int64_t mb, int64_t begin, int64_t end, const float* sums) {
    switch (out.scalar_type()) {
      case torch::kBFloat16: finish(out.data_ptr<c10::BFloat16>(), m0, mb, begin, end, sums); break;
      case torch::kHalf: finish(out.data_ptr<c10::Half>(), m0, mb, begin, end, sums); break;
      default: finish(out.data_ptr<float>(), m0, mb, begin, end, sums); break;
    }
  };
  for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
    const int64_t mb = std::min(kMaxRows, rows - m0);
#ifdef GLM_X86
    if (bf16_x && mb == 1) {
      // one row of x: the several-rows-per-pass loops, each thread's share in whole passes
      const auto* xr = reinterpret_cast<const uint16_t*>(xc.data_ptr()) + m0 * k;
      const int64_t steps = ldw / kStep;
      const RowStreams streams = row_streams(xr, bits, steps, chosen >= Isa::kAvx512Vnni);
      const int64_t passes = (n + kPass - 1) / kPass;
      const int64_t ahead_lines = AheadLines::total(ahead);
      // chunks of ~kChunkBytes of weight, each thread its share first, then the slower thread's last chunks
      const int64_t per_chunk = std::clamp<int64_t>(kChunkBytes / (kPass * ldw), 1, kChunkRows / kPass);
      parallel_chunks((passes + per_chunk - 1) / per_chunk, [&](int64_t c) {
        const int64_t p0 = c * per_chunk, p1 = std::min(passes, p0 + per_chunk);
        const int64_t begin = p0 * kPass, end = std::min(n, p1 * kPass);
        float sums[kChunkRows];
        // each chunk prefetches the read-ahead lines in proportion to its passes, spread over the calls
        // rows_pass makes: one per pass of kPass rows and one per row left over
        const int64_t calls = (end - begin) / kPass + (end - begin) % kPass;
        AheadLines lines(ahead, ahead_lines * p0 / passes, ahead_lines * p1 / passes, calls);
        if (bits == 8) rows_pass<8>(streams, xr, wp, ldw, begin, end, sums, lines);
        else rows_pass<4>(streams, xr, wp, ldw, begin, end, sums, lines);
        write(m0, 1, begin, end, sums);
      });
      continue;
    }
    if (bf16_x) {
      // Whole weight rows, one after the other: each thread streams its contiguous share of the weight. The
      // bf16 rows of x (at most 8 x 16 KiB for ChatGLM-6B's widest input) stay in L1/L2.
      const auto* xap = reinterpret_cast<const uint16_t*>(xa) + m0 * ldx;
      const auto* xbp = bits == 4 ? reinterpret_cast<const uint16_t*>(xb) + m0 * ldx
                                  : nullptr;
      at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> sums((end - begin) * mb);
        for (int64_t r = begin; r < end; ++r) {
          float* acc = sums.data() + (r - begin) * mb;
          if (bits == 8) rows_int8_bf16(xap, ldx, mb, wp + r * ldw, ldw, acc);
          else rows_int4_bf16(xap, xbp, ldx, mb, wp + r * ldw, ldw, acc);
        }
        write(m0, mb, begin, end, sums.data());
      });
      continue;
    }
#endif
    const float* xap = reinterpret_cast<const float*>(xa) + m0 * ldx;
    const float* xbp = bits == 4 ? reinterpret_cast<const float*>(xb) + m0 * ldx : nullptr;
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
            if (chosen >= Isa::kAvx512) rows_int8_avx512(xap + c0, ldx, mb, wr, width, acc);
            else if (chosen == Isa::kAvx2) rows_int8_avx2(xap + c0, ldx, mb, wr, width, acc);
            else
#endif
              rows_int8_scalar(xap + c0, ldx, mb, wr, width, acc);
          } else {
#ifdef GLM_X86
            if (chosen >= Isa::kAvx512) rows_int4_avx512(xap + c0, xbp + c0, ldx, mb, wr, width, acc);
            else if (chosen == Isa::kAvx2) rows_int4_avx2(xap + c0, xbp + c0, ldx, mb, wr, width, acc);
            else
#endif
              rows_int4_scalar(xap + c0, xbp + c0, ldx, mb, wr, width, acc);
          }
          float* sr = sums.data() + (r - begin) * mb;
          for (int64_t m = 0; m < mb; ++m) sr[m] += acc[m];
        }
      }
      write(m0, mb, begin, end, sums.data());
    });
  }
}

void check_x(const torch::Tensor& x, const torch::Tensor& weight, int64_t bits) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a CPU [M, K] tensor");
  const int64_t k = bits == 8 ? weight.size(1) : weight.size(1) * 2;
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weight ", k);
}

}  // namespace

// y [M, N] fp32 = x [M, K] @ (q * scale)^T, fp32 accumulation, one multiplication by the scale per output.
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits) {
  check(weight, scale, bits);
  check_x(x, weight, bits);
  auto out = torch::empty({x.size(0), weight.size(0)}, x.options().dtype(torch::kFloat));
  product_into(x, weight, scale, bits, c10::nullopt, out);
  return out;
}

// y [M, N] in x's dtype = x @ (q * scale)^T + bias: gemv with the bias added in fp32 before the one rounding.
torch::Tensor glm_kernels::linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                                  int64_t bits, const c10::optional<torch::Tensor>& bias,
                                  const std::vector<ReadAhead>& ahead) {
  check(weight, scale, bits);
  check_x(x, weight, bits);
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kHalf ||
                  x.scalar_type() == torch::kBFloat16, "x must be fp32, fp16 or bf16");
  auto out = torch::empty({x.size(0), weight.size(0)}, x.options());
  product_into(x, weight, scale, bits, bias, out, ahead);
  return out;
}

torch::Tensor glm_kernels::linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                                  int64_t bits, const c10::optional<torch::Tensor>& bias) {
  return linear(x, weight, scale, bits, bias, {});
}

// Sum of every 8-byte word of the tensors' storage, read as a decode step reads its weights: one tensor after
// the other, each split over the threads. The benchmarks time it over a model's weights as its read floor.
int64_t stream_read(const std::vector<torch::Tensor>& tensors) {
  int64_t total = 0;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "stream_read takes contiguous CPU tensors");
    const auto* p = static_cast<const uint8_t*>(t.data_ptr());
    const int64_t bytes = t.numel() * t.element_size();
    const int64_t lines = bytes / 64;
    std::vector<int64_t> parts(at::get_num_threads(), 0);
    // as the products split their weights (parallel_chunks), so the floor is not slowed by the slower core;
    // under 256 KiB one chunk
    const int64_t chunk = std::max<int64_t>(1, lines < 4096 ? lines : kChunkBytes / 64);
    parallel_chunks((lines + chunk - 1) / chunk, [&](int64_t c) {
      const int64_t begin = c * chunk, end = std::min(lines, begin + chunk);
      int64_t s = 0;
#ifdef GLM_X86
      if (isa() >= Isa::kAvx512) {
        s = read_lines_avx512(p + 64 * begin, end - begin);
      } else
#endif
      {
        const auto* w = reinterpret_cast<const int64_t*>(p + 64 * begin);
        for (int64_t i = 0; i < (end - begin) * 8; ++i) s += w[i];
      }
      parts[at::get_thread_num()] += s;
    });
    for (int64_t v : parts) total += v;
    for (int64_t b = lines * 64; b < bytes; ++b) total += p[b];
  }
  return total;
}

// rows [start, stop) of W = q * scale, fp32
namespace {

void dequant_row(const int8_t* wr, float s, int64_t ldw, int64_t bits, Isa chosen, float* o) {
#ifdef GLM_X86
  if (chosen >= Isa::kAvx512) {
    if (bits == 8) dequant_int8_avx512(wr, s, ldw, o);
    else dequant_int4_avx512(wr, s, ldw, o);
    return;
  }
#endif
  dequant_tail(wr, s, bits, 0, ldw, o);
}

#ifdef GLM_X86
// fp32 -> bf16, rounding to nearest even
__attribute__((target("avx512f"))) void to_bf16_avx512(const float* in, int64_t k, c10::BFloat16* out) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) glm_kernels::vec::store16(out + i, _mm512_loadu_ps(in + i));
  for (; i < k; ++i) out[i] = c10::BFloat16(in[i]);
}
#endif

}  // namespace

// Rows [start, stop) of W = q * scale into `out` (contiguous CPU [>= stop - start, K], fp32 or bf16: the product
// is computed in fp32 and rounded once). Callers reuse one cache-sized buffer for every block.
void glm_kernels::dequantize_into(const torch::Tensor& weight_in, const torch::Tensor& scale_in, int64_t bits,
                                  int64_t start, int64_t stop, const torch::Tensor& out) {
  check(weight_in, scale_in, bits);
  const auto weight = weight_in.contiguous();
  const FloatRow scale(scale_in, "scale");
  TORCH_CHECK(0 <= start && start <= stop && stop <= weight.size(0), "rows [", start, ", ", stop, ") out of range");
  const int64_t ldw = weight.size(1);
  const int64_t k = bits == 8 ? ldw : ldw * 2;
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(out.device().is_cpu() && (out.scalar_type() == torch::kFloat || bf16) && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) >= stop - start && out.size(1) == k,
              "out must be a contiguous fp32 or bf16 CPU tensor of at least [", stop - start, ", ", k, "]");
  const int8_t* wp = weight.data_ptr<int8_t>();
  const Isa chosen = isa();
  at::parallel_for(start, stop, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, k)), [&](int64_t begin, int64_t end) {
    std::vector<float> row(bf16 ? k : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int8_t* wr = wp + r * ldw;
      if (!bf16) {
        dequant_row(wr, scale[r], ldw, bits, chosen, out.data_ptr<float>() + (r - start) * k);
        continue;
      }
      dequant_row(wr, scale[r], ldw, bits, chosen, row.data());
      c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + (r - start) * k;
#ifdef GLM_X86
      if (chosen >= Isa::kAvx512) {
        to_bf16_avx512(row.data(), k, o);
        continue;
      }
#endif
      for (int64_t i = 0; i < k; ++i) o[i] = c10::BFloat16(row[i]);
    }
  });
}

torch::Tensor glm_kernels::dequantize(const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits,
                                      int64_t start, int64_t stop) {
  const int64_t k = bits == 8 ? weight.size(1) : weight.size(1) * 2;
  auto out = torch::empty({std::max<int64_t>(stop - start, 0), k}, weight.options().dtype(torch::kFloat));
  glm_kernels::dequantize_into(weight, scale, bits, start, stop, out);
  return out;
}

std::string isa_name() { return isa_label(isa()); }

// Tests run every build of the loops on one machine: choose one the CPU supports (returns the previous choice).
std::string set_isa(const std::string& name) {
  const std::string previous = isa_name();
  const Isa best = glm_kernels::detect_isa();
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16, Isa::kAvx512Vnni}) {
    if (name == isa_label(i)) {
      TORCH_CHECK(i <= best, "this CPU does not support ", name, " (best: ", isa_label(best), ")");
      glm_kernels::chosen_isa() = i;
      return previous;
    }
  }
  TORCH_CHECK(false, "unknown instruction set ", name, "; known: scalar, avx2, avx512f, avx512bf16, avx512vnni");
}

// The operators, as torch.ops.glm_kernels.* (visible to the profiler and to torch.library tooling).
TORCH_LIBRARY(glm_kernels, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor scale, int bits) -> Tensor", &gemv);
  m.def("linear(Tensor x, Tensor weight, Tensor scale, int bits, Tensor? bias=None) -> Tensor",
        static_cast<torch::Tensor (*)(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, int64_t,
                                      const c10::optional<torch::Tensor>&)>(&glm_kernels::linear));
  m.def("dequantize(Tensor weight, Tensor scale, int bits, int start, int stop) -> Tensor", &glm_kernels::dequantize);
  m.def("dequantize_into(Tensor weight, Tensor scale, int bits, int start, int stop, Tensor(a!) out) -> ()",
        &glm_kernels::dequantize_into);
  m.def("stream_read(Tensor[] tensors) -> int", &stream_read);
}

// parallel_chunks seen from outside, for the tests: per chunk the number of times it ran and the thread that ran it
// last, [chunks, 2] int64, with thread 0 spinning `slow_us` microseconds in each of its chunks so that the others
// take the end of its share
torch::Tensor chunk_runs(int64_t chunks, double slow_us) {
  auto out = torch::zeros({chunks, 2}, torch::kLong);
  auto* runs = out.data_ptr<int64_t>();
  std::vector<std::atomic<int64_t>> counts(chunks);
  parallel_chunks(chunks, [&](int64_t c) {
    const int thread = at::get_thread_num();
    if (thread == 0 && slow_us > 0) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double, std::micro>(slow_us);
      while (std::chrono::steady_clock::now() < until) {
      }
    }
    counts[c].fetch_add(1);
    runs[2 * c + 1] = thread;
  });
  for (int64_t c = 0; c < chunks; ++c) runs[2 * c] = counts[c].load();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "glm_kernels CPU extension: weight-only INT8/INT4 products on THUDM's layout (operators in "
            "torch.ops.glm_kernels)";
  m.def("isa", &isa_name, "the instruction set the kernels use on this CPU");
  m.def("best_isa", [] { return std::string(isa_label(glm_kernels::detect_isa())); },
        "the best instruction set this CPU supports");
  m.def("set_isa", &set_isa,
        "use another build of the loops (scalar, avx2, avx512f, avx512bf16, avx512vnni); returns the previous",
        py::arg("name"));
  m.def("chunk_runs", &chunk_runs, "how parallel_chunks ran `chunks` chunks (tests)", py::arg("chunks"),
        py::arg("slow_us") = 0.0);
  m.attr("VERSION") = 14;
}
