// Vector load/store in fp32 lanes for every CPU dtype of the ldm kernels, and a fast sigmoid.
//
// Reduced-precision inputs (bf16, fp16) are widened to fp32 lanes on load and narrowed on
// store, so every kernel computes in fp32. double has no vector path (it exists for gradcheck).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

// 1 / (1 + exp(-z)) with PyTorch's vectorised exp (ULP 20, far below our tolerances).
inline Vec sigmoid(const Vec& z) {
  const Vec one(1.0f);
  return one / (one + z.neg().exp_u20());
}

template <typename acc_t>
inline acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
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
