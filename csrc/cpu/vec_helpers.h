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

// Store kLanes fp32 values to p, narrowing to T.
template <typename T>
inline void store_lanes(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    // convert_from_float packs two fp32 vectors; only the first half is stored.
    at::vec::convert_from_float<T>(v, v).store(p, kLanes);
  }
}

// exp(-z) for every lane, z clamped to [-88, 88] first (so the result is finite and the
// callers' 1 + exp(-z) never overflows; for |z| > 88 the SiLU and sigmoid are exact anyway).
// AVX-512: exp(a) = 2^n * p(r), n = round(a log2 e), r = a - n ln 2 with ln 2 split in two
// (Cody-Waite), p the degree-7 polynomial of Cephes' expf (about 1 ulp), and 2^n applied by
// vscalefps. 14 instructions against about 20 for at::vec's exp_u20: on this Zen 4, which
// runs 512-bit ops as two 256-bit halves, the SiLU's exp is what bounds the fused kernels.
inline Vec exp_neg_clamped(const Vec& z) {
  const Vec a = at::vec::clamp(z, Vec(-88.0f), Vec(88.0f)).neg();
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = a;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return Vec(_mm512_scalef_ps(p, n));
#else
  return a.exp_u20();  // PyTorch's vectorised exp (ULP 20, far below our tolerances)
#endif
}

// 1 / (1 + exp(-z)).
inline Vec sigmoid(const Vec& z) {
  const Vec one(1.0f);
  return one / (one + exp_neg_clamped(z));
}

template <typename acc_t>
inline acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
}

// 1 / d from the hardware reciprocal estimate plus one Newton step (about 1e-7 relative
// error): a full-width division is the slowest instruction of the SiLU.
inline Vec reciprocal(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const Vec r(_mm512_rcp14_ps(d));
#elif defined(CPU_CAPABILITY_AVX2)
  const Vec r(_mm256_rcp_ps(d));
#else
  return Vec(1.0f) / d;
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return r * at::vec::fnmadd(d, r, Vec(2.0f));  // r (2 - d r)
#endif
}

// silu(z) = z / (1 + exp(-z)) with one vectorised exp and a fast reciprocal. The exponent
// is capped below ln(FLT_MAX) so 1 + exp(-z) stays finite (its reciprocal then is ~0, as is
// silu(z) for z < -88) instead of giving inf * 0 = NaN in the Newton step.
inline Vec silu(const Vec& z) {
  return z * reciprocal(Vec(1.0f) + exp_neg_clamped(z));
}

template <typename acc_t>
inline acc_t silu(acc_t z) {
  return silu_from_exp_neg(z, std::exp(-z), acc_t(1));
}

// Sum over [i, n) of f(kLanes values at p + j) with four independent accumulators (so the
// adds pipeline instead of waiting on one another); advances i past the vectorised part.
template <typename T, typename F>
inline Vec accumulate_lanes(const T* p, int64_t n, int64_t& i, F f) {
  Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    a0 = a0 + f(load_lanes(p + i));
    a1 = a1 + f(load_lanes(p + i + kLanes));
    a2 = a2 + f(load_lanes(p + i + 2 * kLanes));
    a3 = a3 + f(load_lanes(p + i + 3 * kLanes));
  }
  for (; i + kLanes <= n; i += kLanes) a0 = a0 + f(load_lanes(p + i));
  return (a0 + a1) + (a2 + a3);
}

// Sum of the lanes in a fixed order (deterministic).
inline float reduce_lanes(const Vec& v) {
  float buf[kLanes];
  v.store(buf);
  float total = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) total += buf[i];
  return total;
}

}  // namespace ldm::cpu
