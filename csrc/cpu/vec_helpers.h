// Vector load/store in fp32 lanes for every CPU dtype of the ldm kernels, and a fast sigmoid.
//
// Reduced-precision inputs (bf16, fp16) are widened to fp32 lanes on load and narrowed on
// store, so every kernel computes in fp32. double has no vector path (it exists for gradcheck).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "csrc/math.h"

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace ldm::cpu {

// -log2(e): exp(-z) = 2^(z * kNegLog2e).
constexpr float kNegLog2e = -1.44269504088896341f;

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// True for the dtypes that run on fp32 vector lanes.
template <typename T>
constexpr bool kHasVecPath = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                             std::is_same_v<T, c10::Half>;

// Accumulation type: fp32 for fp32/bf16/fp16 (statistics in fp32), fp64 for fp64.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// kLanes values starting at p, widened to fp32.
template <typename T>
inline Vec load_lanes(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 fp32 lanes rounded (to nearest even) to 16 bf16 values.
inline __m256i to_bf16_lanes(__m512 v) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));  // one instruction
#else
  return at::vec::cvtfp32_bf16(v);
#endif
}
#endif

// Store kLanes fp32 values to p, narrowing to T (round to nearest even).
template <typename T>
inline void store_lanes(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
#if defined(CPU_CAPABILITY_AVX512)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // One conversion of 16 lanes (at::vec's path converts a pair and stores half of it).
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_lanes(v));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  } else {
    // convert_from_float packs two fp32 vectors; only the first half is stored.
    at::vec::convert_from_float<T>(v, v).store(p, kLanes);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// 2^t for every lane: 2^n 2^f with n = round(t), f = t - n in [-1/2, 1/2], 2^f a degree-5
// minimax polynomial (fitted by Lawson's iteration: relative error 7.5e-8 in exact
// arithmetic) and 2^n applied by vscalefps, which underflows to 0 for very negative t
// without a clamp. NaN propagates; t = +-inf does not (callers keep t finite or clamp it).
// kNarrow (results rounded to bf16, whose half-ulp is 2e-3 relative): a degree-4 polynomial
// (2.6e-6), one FMA fewer. `scale` multiplies the result at no cost (it is folded into the
// polynomial's coefficients at compile time).
template <bool kNarrow = false>
inline __m512 exp2_poly(__m512 t, float scale = 1.0f) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p;
  if constexpr (kNarrow) {
    p = _mm512_set1_ps(scale * 9.570102207e-03f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(scale * 5.591786280e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(scale * 2.402474433e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(scale * 6.931217909e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(scale * 9.999992847e-01f));
  } else {
    p = _mm512_set1_ps(scale * 1.327647245e-03f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(scale * 9.675541893e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(scale * 5.550713092e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(scale * 2.402212024e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(scale * 6.931469440e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(scale * 1.000000119e+00f));
  }
  return _mm512_scalef_ps(p, n);
}
#endif

// exp(-z) for every lane, never above 2^126 (so the callers' 1 + exp(-z) stays finite; the
// SiLU and sigmoid are then 0 to fp32 precision, as they should be, for z below -87.3).
// AVX-512: 2^t with t = min(-z log2 e, 126) by exp2_poly. Measured in fp32 over z in
// [-88, 88]: at most 4e-6 relative for exp and 5.3e-7 for the SiLU wherever |silu| > 1e-3
// (from the rounding of t). 10 instructions, 7 of them on the FMA pipes: on this Zen 4,
// which runs 512-bit ops as two 256-bit halves, the SiLU's arithmetic bounds the fused
// kernels.
template <bool kNarrow = false>
inline Vec exp_neg_clamped(const Vec& z) {
#if defined(CPU_CAPABILITY_AVX512)
  // min(126, t) returns t when t is NaN (vminps passes its second operand on NaN).
  const __m512 t = _mm512_min_ps(_mm512_set1_ps(126.0f),
                                 _mm512_mul_ps(z, _mm512_set1_ps(kNegLog2e)));
  return Vec(exp2_poly<kNarrow>(t));
#else
  const Vec clamped = at::vec::clamp(z, Vec(-88.0f), Vec(88.0f));
  return clamped.neg().exp_u20();  // PyTorch's vectorised exp (ULP 20, far below our tolerances)
#endif
}

// The sigmoid and SiLU divide by 1 + exp(-z) with a full-width division. On Zen 4 the 512-bit
// divide runs in its own unit (about one per 9 cycles) beside the FMA pipes, which the exp
// already keeps busy; a reciprocal estimate, its Newton step and the multiply by z would add
// 4 FMA-pipe slots to the 8-9 of the affine and the exp. Measured A/B in the forward kernel:
// fp32 7-19% faster, bf16 the same. The result is also correctly rounded. The exp is capped
// below ln(FLT_MAX), so 1 + exp(-z) stays finite and the quotient goes to 0 for z < -88
// (never inf / inf = NaN).

// 1 / (1 + exp(-z)).
inline Vec sigmoid(const Vec& z) {
  return Vec(1.0f) / (Vec(1.0f) + exp_neg_clamped(z));
}

template <typename acc_t>
inline acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
}

template <typename acc_t>
inline acc_t silu(acc_t z) {
  return silu_from_exp_neg(z, std::exp(-z), acc_t(1));
}

// silu(z) of K vectors in place, given t = z * kNegLog2e (the affine before the SiLU folds the
// constant into its scale and shift, saving a multiply): z / (1 + 2^t) = t / (c + c 2^t) with
// c = kNegLog2e, and c 2^t comes from exp2_poly with c folded into its coefficients: 8
// FMA-pipe slots per vector instead of 9 (11.5 vs 12.3 cycles per 16 values in isolation).
// 2^t is capped at 2^126 as in exp_neg_clamped. Step by step across the K vectors, so their
// independent dependency chains interleave in the instruction stream.
// kNarrow: the results will be rounded to bf16, so the exp may be 2.6e-6 relative instead of
// 7.5e-8 (0.07% of bf16's rounding step; one FMA fewer).
template <int K, bool kNarrow = false>
inline void silu_lanes_from_exponent(Vec (&t)[K]) {
#if defined(CPU_CAPABILITY_AVX512)
  Vec ce[K];
  for (int k = 0; k < K; ++k) {
    ce[k] = Vec(exp2_poly<kNarrow>(_mm512_min_ps(_mm512_set1_ps(126.0f), t[k]), kNegLog2e));
  }
  for (int k = 0; k < K; ++k) t[k] = t[k] / (Vec(kNegLog2e) + ce[k]);
#else
  for (int k = 0; k < K; ++k) {
    const Vec z = t[k] * Vec(1.0f / kNegLog2e);
    t[k] = z / (Vec(1.0f) + exp_neg_clamped<kNarrow>(z));
  }
#endif
}

template <typename acc_t>
inline acc_t silu_from_exponent(acc_t t) {
  return silu(t / static_cast<acc_t>(kNegLog2e));
}

// Sum of the lanes in a fixed order (deterministic): a pairwise tree, halves added to halves
// (4 dependent adds instead of 15; it ends every NCHW channel of the backward's pass 1).
inline float reduce_lanes(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  const __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
  const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
#else
  float buf[kLanes];
  v.store(buf);
  float total = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) total += buf[i];
  return total;
#endif
}

}  // namespace ldm::cpu
