// What the two CPU flash-attention kernels (attention.cpp on vdpbf16ps, attention_amx.cpp on
// AMX tiles) share: input checks, strided head views and the final O / l store.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include "csrc/cpu/vec_helpers.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include <cstdint>

namespace ldm::cpu {

constexpr int64_t kMaxHeadDim = 512;  // the VAE's single-head attention has 512
constexpr float kLog2e = 1.44269504088896341f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline __mmask16 first_lanes(int64_t count) {  // lanes [0, count) of a vector; none if count <= 0
  return _cvtu32_mask16(count >= kLanes ? 0xFFFFu : count <= 0 ? 0u : (1u << count) - 1);
}

// Strided [rows, d] bf16 view of one (batch, head).
struct Rows {
  const uint16_t* data;
  int64_t row_stride;
  uint16_t at(int64_t row, int64_t col) const { return data[row * row_stride + col]; }
};

inline Rows head_rows(const at::Tensor& t, int64_t b, int64_t h) {
  return Rows{reinterpret_cast<const uint16_t*>(t.const_data_ptr<c10::BFloat16>()) +
                  b * t.stride(0) + h * t.stride(1),
              t.stride(2)};
}

inline void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4, op, ": q, k, v must be [B, H, L, D], got ", t->dim(), " dims");
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, op,
                " (CPU): q, k, v must be bfloat16, got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), op, " (CPU): tensors must be on the CPU");
  }
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && k.sizes() == v.sizes(), op,
              ": q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(),
              " need equal batch and heads, and k and v equal shapes");
  TORCH_CHECK(q.size(3) == k.size(3), op, ": q and k head sizes differ (", q.size(3), " vs ",
              k.size(3), ")");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, op, ": head size must be in [1, ",
              kMaxHeadDim, "], got ", q.size(3));
  TORCH_CHECK(k.size(2) >= 1 || q.size(2) == 0, op, ": no keys to attend to");
}

// dst[0:d] = bf16(o[0:d] * inv_sum); o holds whole vectors past d.
inline void store_normalised_row(const float* o, float inv_sum, int64_t d, uint16_t* dst) {
  const __m512 inv = _mm512_set1_ps(inv_sum);
  int64_t e = 0;
  for (; e + kLanes <= d; e += kLanes)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + e),
                        to_bf16_lanes(_mm512_mul_ps(_mm512_loadu_ps(o + e), inv)));
  if (e < d)
    _mm256_mask_storeu_epi16(dst + e, first_lanes(d - e),
                             to_bf16_lanes(_mm512_mul_ps(_mm512_loadu_ps(o + e), inv)));
}

}  // namespace ldm::cpu
#endif  // CPU_CAPABILITY_AVX512
