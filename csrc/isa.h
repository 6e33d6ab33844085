// The instruction set the extension's loops use, chosen once at run time (shared by every source file).
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GLM_X86 1
#endif

namespace glm_kernels {

// ordered: each level includes the ones before it. kAvx512Vnni is AVX512-BF16 with AVX512-VNNI (every CPU with
// AVX512-BF16 so far also has VNNI: Cooper Lake, Sapphire / Emerald Rapids, Zen 4 and later): one bf16 row of x
// meets the weights in 16-bit integers there (csrc/quant_cpu.cpp, "one row of x in fixed point").
enum class Isa { kScalar, kAvx2, kAvx512, kAvx512Bf16, kAvx512Vnni };

inline Isa detect_isa() {
#ifdef GLM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16"))
      return __builtin_cpu_supports("avx512vnni") ? Isa::kAvx512Vnni : Isa::kAvx512Bf16;
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// the choice (tests switch it with _C.set_isa to run every build on one machine)
inline Isa& chosen_isa() {
  static Isa chosen = detect_isa();
  return chosen;
}

inline Isa isa() { return chosen_isa(); }

inline const char* isa_label(Isa i) {
  switch (i) {
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512f";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace glm_kernels
