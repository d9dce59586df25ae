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

#include <array>
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

// CPU_CAPABILITY_AVX512 (AVX-512F/BW/VL/DQ on the build host, setup.py) enables the
// hand-written 512-bit paths below; other builds use at::vec's generic code.
#if defined(CPU_CAPABILITY_AVX512)
// 16 fp32 lanes rounded (to nearest even) to 16 bf16 values.
inline __m256i to_bf16_lanes(__m512 v) {
#if defined(__AVX512BF16__)  // avx512_bf16: one vcvtneps2bf16
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
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

// kLanes fp32 values to p (aligned to 64 bytes) with a non-temporal store (AVX-512F
// vmovntps): the line goes to memory without first being read into the cache (write-allocate)
// and without evicting anything. Callers fence (streamed_stores_done) before other threads may
// read. Without AVX-512 an ordinary store.
inline void stream_lanes(float* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#else
  v.store(p);
#endif
}

// Orders this thread's non-temporal stores before what follows (they are weakly ordered).
inline void streamed_stores_done() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Whether p starts a whole vector of T in memory (the non-temporal store needs it).
template <typename T>
inline bool vector_aligned(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % (kLanes * sizeof(T)) == 0;
}

#if defined(CPU_CAPABILITY_AVX512)
// 32 bf16 values from p as fp32 lanes: `even` holds values 0, 2, ..., 30 and `odd` 1, 3, ..., 31.
// A bf16 is the high half of its fp32, so one shift and one mask widen a whole 64-byte load,
// where load_lanes takes a zero-extension and a shift per 16 values. For loops whose
// parameters are the same for all 32 values (NCHW), which lane holds which value is free.
inline void load_bf16_even_odd(const c10::BFloat16* p, Vec& even, Vec& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = Vec(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  odd = Vec(_mm512_castsi512_ps(
      _mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
}

// The inverse of load_bf16_even_odd: both rounded to bf16 (to nearest even), then stored in
// value order by one word permute.
inline void store_bf16_even_odd(c10::BFloat16* p, const Vec& even, const Vec& odd) {
  // Value 2i is even's lane i (word i of `packed`), value 2i + 1 is odd's lane i (word 16 + i).
  alignas(64) static constexpr int16_t kInterleave[32] = {
      0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
#if defined(__AVX512BF16__)  // avx512_bf16: vcvtne2ps2bf16 narrows both in one instruction
  const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));
#else
  const __m512i packed =
      _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_lanes(even)), to_bf16_lanes(odd), 1);
#endif
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), packed));
}

// 2^t for every lane, for results rounded to bf16 (the attention's softmax): 2^n 2^f with
// n = round(t), f = t - n in [-1/2, 1/2], 2^f a degree-4 minimax polynomial (fitted by
// Lawson's iteration: 2.6e-6 relative in exact arithmetic, 0.07% of bf16's rounding step)
// and 2^n applied by vscalefps, which underflows to 0 for very negative t without a clamp.
// NaN propagates; t = +-inf does not (the softmax keeps t finite).
inline __m512 exp2_poly_narrow(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.570102207e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.591786280e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402474433e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931217909e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999992847e-01f));
  return _mm512_scalef_ps(p, n);
}

// 2^t for every lane, cheaper than exp2_poly_narrow where the exponentials dominate (the AMX
// attention's softmax): f = t - floor(t) in [0, 1) by one vreduceps, 2^f a degree-3 minimax
// polynomial (Lawson's iteration: 7.5e-5 relative, 4% of bf16's rounding step) and
// 2^floor(t) applied by vscalefps, which floors its exponent operand itself. Very negative t
// underflows to 0; t = -inf gives NaN (callers keep t finite).
inline __m512 exp2_poly3(__m512 t) {
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(7.802402973e-02f), f,
                             _mm512_set1_ps(2.260670662e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.958339810e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999251366e-01f));
  return _mm512_scalef_ps(p, t);
}

// 32 bf16 values (lo's 16 lanes, then hi's), rounded to nearest even: one vcvtne2ps2bf16 with
// avx512_bf16.
inline __m512i to_bf16_pair(__m512 lo, __m512 hi) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
#else
  return _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_lanes(lo)), to_bf16_lanes(hi), 1);
#endif
}
#endif

// scale 2^(j / 32) for j = 0..31, each rounded once to fp32 from a double Taylor series of
// exp(j ln2 / 32) (20 terms: exact to double precision), at compile time.
constexpr std::array<float, 32> exp2_fraction_table(double scale) {
  std::array<float, 32> table{};
  for (int j = 0; j < 32; ++j) {
    const double x = j / 32.0 * 0.69314718055994530942;
    double term = 1.0, sum = 1.0;
    for (int k = 1; k < 20; ++k) sum += (term *= x / k);
    table[j] = static_cast<float>(scale * sum);
  }
  return table;
}

template <float kScale>
inline constexpr std::array<float, 32> kExp2Fractions = exp2_fraction_table(kScale);

#if defined(CPU_CAPABILITY_AVX512)
// kScale 2^t for every lane by a table: t = m + j/32 + f with integers m and 0 <= j < 32 and
// |f| <= 1/64. kScale 2^(j/32) is looked up (vpermt2ps over two registers), 2^f is
// 1 + f (a1 + a2 f) (minimax on [-1/64, 1/64] by Lawson's iteration: 5.3e-8 relative in exact
// arithmetic) and 2^m is applied by vscalefps (2^floor of its argument k/32, which is m).
// Adding 1.5 * 2^18 rounds t to a multiple of 1/32 and leaves k = 32 m + j in the low mantissa
// bits, whose low 5 are the permute's index. Why a table: a degree-5 polynomial over
// [-1/2, 1/2] takes 7 FMA-pipe slots per vector, this takes 5 (the mul, two FMAs and
// vscalefps' two) and moves 3 adds and a permute to the other pipes; the SiLU loop is bound
// by the FMA pipes (AVX-512F, two 256-bit slots per 512-bit op on Zen 4).
// Saturates without a clamp: 2^t is inf above t = 128 and 0 below about -150. NaN propagates;
// t = -inf gives 0 and +inf gives inf (f is NaN there; vscalefps' special cases take over).
template <float kScale>
inline __m512 exp2_table(__m512 t) {
  // t must be rounded before the shifter is added: GCC's default -ffp-contract=fast would
  // otherwise fuse a caller's z * c into both adds, and f = exact (z c) - k / 32 is then up to
  // an ulp of t (1e23 at z = 1e30), which overflows the polynomial to inf (the extreme-value
  // test caught it). The empty asm makes t an opaque register value; it emits nothing.
  __asm__("" : "+v"(t));
  const __m512 shifter = _mm512_set1_ps(393216.0f);  // 1.5 * 2^18, whose ulp is 2^-5
  const __m512 shifted = _mm512_add_ps(t, shifter);
  const __m512 k_over_32 = _mm512_sub_ps(shifted, shifter);
  const __m512 f = _mm512_sub_ps(t, k_over_32);
  const float* table = kExp2Fractions<kScale>.data();
  const __m512 head = _mm512_permutex2var_ps(_mm512_loadu_ps(table),
                                             _mm512_castps_si512(shifted),
                                             _mm512_loadu_ps(table + 16));
  const __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(2.402267596e-01f), f,
                                   _mm512_set1_ps(6.931573293e-01f));
  return _mm512_scalef_ps(_mm512_fmadd_ps(_mm512_mul_ps(head, f), q, head), k_over_32);
}
#endif

// exp(-z) for every lane. AVX-512: 2^t with t = -z log2 e by exp2_table; inf for z below
// about -88.7, where the callers' 1 / (1 + exp(-z)) is then 0, as it should be. In fp32 over
// z in [-88, 88]: at most 6e-7 relative error for the SiLU wherever |silu| > 1e-3 (from the
// rounding of t). Elsewhere PyTorch's vectorised exp (20 ulp, far below our tolerances)
// of z clamped to +-88, so that 1 + exp(-z) stays finite.
inline Vec exp_neg(const Vec& z) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(exp2_table<1.0f>(_mm512_mul_ps(z, _mm512_set1_ps(kNegLog2e))));
#else
  const Vec clamped = at::vec::clamp(z, Vec(-88.0f), Vec(88.0f));
  return clamped.neg().exp_u20();
#endif
}

// The sigmoid and SiLU divide by 1 + exp(-z) with a full-width division. On Zen 4 the 512-bit
// vdivps runs in its own unit (about one per 9 cycles) beside the FMA pipes, which the exp
// already keeps busy; a reciprocal estimate (vrcp14ps), its Newton step and the multiply by z
// would add 4 FMA-pipe slots to the affine's and the exp's. The result is also correctly
// rounded, and where exp(-z) is inf the quotient is 0 (z finite), the SiLU's and the
// sigmoid's limit.

// 1 / (1 + exp(-z)).
inline Vec sigmoid(const Vec& z) {
  return Vec(1.0f) / (Vec(1.0f) + exp_neg(z));
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
// c = kNegLog2e, and c 2^t comes from exp2_table with c folded into its table. For z below
// about -88.7, c 2^t is -inf and the quotient -0 (PyTorch's F.silu gives -0 there too). Step
// by step across the K vectors, so their independent dependency chains interleave in the
// instruction stream. One exp for fp32 and bf16 results (a shorter polynomial for bf16 is no
// faster than the table). Always inlined: as a call (GCC leaves it one in the bf16 NCHW apply
// loop otherwise), its K vectors go through memory around every call.
template <int K>
C10_ALWAYS_INLINE void silu_lanes_from_exponent(Vec (&t)[K]) {
#if defined(CPU_CAPABILITY_AVX512)
  Vec ce[K];
  for (int k = 0; k < K; ++k) ce[k] = Vec(exp2_table<kNegLog2e>(t[k]));
  for (int k = 0; k < K; ++k) t[k] = t[k] / (Vec(kNegLog2e) + ce[k]);
#else
  for (int k = 0; k < K; ++k) {
    const Vec z = t[k] * Vec(1.0f / kNegLog2e);
    t[k] = z / (Vec(1.0f) + exp_neg(z));
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
