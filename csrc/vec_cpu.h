// 16 floats at a time from and to fp32 / bf16 / fp16 storage (AVX512F), shared by the element-wise CPU ops.
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
// round to nearest even, as c10::BFloat16(float) does (a NaN stays a quiet NaN)
GLM_AVX512 inline void store16(c10::BFloat16* p, __m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
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

}  // namespace glm_kernels::vec
#endif  // GLM_X86

namespace glm_kernels {

// the scalar form of vec::round_to
template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

}  // namespace glm_kernels
