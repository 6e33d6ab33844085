// 16 floats at a time from and to fp32 / bf16 / fp16 storage (AVX512F), e^x of 16 floats and the sums of four
// vectors, shared by the CPU ops.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "isa.h"

#ifdef GLM_X86
#define GLM_AVX512 __attribute__((target("avx512f")))

namespace glm_kernels::vec {

GLM_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
GLM_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
GLM_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

GLM_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// the bf16 bits of 16 floats (in the low half of each 32-bit lane), rounded to nearest even as
// c10::BFloat16(float) does (a NaN stays a quiet NaN)
GLM_AVX512 inline __m512i bf16_bits(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}
GLM_AVX512 inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
}

// 32 bf16 values as two fp32 vectors without a cross-lane shuffle: the even elements (low halves of the 32-bit
// lanes) and the odd ones (high halves)
GLM_AVX512 inline __m512 even_bf16(__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
GLM_AVX512 inline __m512 odd_bf16(__m512i w) {
  return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// and back: 32 bf16 values in memory order from their even and odd elements, each rounded to nearest even
GLM_AVX512 inline void store32(c10::BFloat16* p, __m512 even, __m512 odd) {
  _mm512_storeu_si512(p, _mm512_or_si512(bf16_bits(even), _mm512_slli_epi32(bf16_bits(odd), 16)));
}
GLM_AVX512 inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// v rounded to T and back: what storing an intermediate result in T keeps
template <typename T>
GLM_AVX512 inline __m512 round_to(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    alignas(64) T tmp[16];
    store16(tmp, v);
    return load16(tmp);
  }
}

// e^x: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6 (relative error < 2e-7), times 2^n
// (vscalefps: 2^n overflows to inf and underflows to 0 as exp does)
GLM_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2, high part: n * it is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094172e-06f), r);     // ln 2, low part
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  for (const float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// the horizontal sums of four vectors, in lanes 0..3: halves, then quarters of all four at once, then the four
// lanes of each quarter (14 instructions against four reductions' ~32)
GLM_AVX512 inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 z = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  z = _mm512_add_ps(z, _mm512_permute_ps(z, 0x4E));
  z = _mm512_add_ps(z, _mm512_permute_ps(z, 0xB1));
  const __m512i lanes = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(lanes, z));
}

}  // namespace glm_kernels::vec
#endif  // GLM_X86

namespace glm_kernels {

// the scalar form of vec::round_to
template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

}  // namespace glm_kernels
