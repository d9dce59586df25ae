// Winograd F(m x m, 3x3) tile transforms for fp32 channels-last tensors, m = 2 or 4: the
// input transform B^T d B of every a x a input tile (a = m + 2) and the output transform
// A^T M A (+ bias) of every a x a product tile. ldm/models/winograd.py has the maths, the
// matrices' source (Lavin and Gray 2016) and the reference path these replace.
//
// Why: done as PyTorch elementwise ops on strided views, the two transforms took about half of
// a Winograd convolution's time (SD U-Net layers, docs/performance.md); here each tile is
// read once and each output written once, channels in vector lanes.
//
// The matrices are compile-time constants and the loops over them are unrolled, so the
// compiler drops the zero terms and turns the +-1 ones into adds and subtracts.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

namespace ldm::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;

// B^T (a x a) and A^T (m x a) per tile side, as ldm/models/winograd.py's _B_T and _A_T.
template <int M>
struct Matrices;

template <>
struct Matrices<2> {
  static constexpr float kBT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float kAT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

template <>
struct Matrices<4> {
  static constexpr float kBT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0},
                                      {0, 4, -4, -1, 1, 0}, {0, -2, -1, 2, 1, 0},
                                      {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float kAT[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

// acc + c x, with c a compile-time constant once the caller's loops are unrolled.
inline Vec add_scaled(Vec acc, float c, const Vec& x) {
  if (c == 0.0f) return acc;
  if (c == 1.0f) return acc + x;
  if (c == -1.0f) return acc - x;
  return at::vec::fmadd(Vec(c), x, acc);
}

// Rows out[0:R] = T (R x K) applied to the rows in[0:K]: out[r] = sum_k T[r][k] in[k].
template <int R, int K>
inline void apply(const float (&t)[R][K], const Vec (&in)[K], Vec (&out)[R]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    Vec acc(0.0f);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) acc = add_scaled(acc, t[r][k], in[k]);
    out[r] = acc;
  }
}

// store(i, j, (T X T^T)[i][j]) for i, j < R, with X[k][l] = load(k, l) for k, l < K: T down
// the columns of X, then along the rows of the result. Both transforms are this product.
template <int R, int K, typename Load, typename Store>
inline void two_sided(const float (&t)[R][K], Load&& load, Store&& store) {
  Vec half[R][K];  // T X, rows i, columns l
#pragma GCC unroll 8
  for (int l = 0; l < K; ++l) {
    Vec column[K], transformed[R];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) column[k] = load(k, l);
    apply(t, column, transformed);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) half[i][l] = transformed[i];
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    Vec out[R];
    apply(t, half[i], out);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) store(i, j, out[j]);
  }
}

// v[i][j] (planes of `plane` floats) = (B^T d B)[i][j] for `lanes` channels of one tile whose
// top-left input is `d` (rows `row` floats apart, pixels `pixel` apart).
template <int M>
inline void input_tile(const float* d, int64_t row, int64_t pixel, float* v, int64_t plane,
                       int64_t lanes) {
  constexpr int A = M + 2;
  two_sided(
      Matrices<M>::kBT, [&](int k, int l) { return Vec::loadu(d + k * row + l * pixel, lanes); },
      [&](int i, int j, const Vec& x) { x.store(v + (i * A + j) * plane, lanes); });
}

// y (m x m pixels, rows `row` floats apart) = A^T P A + bias for `lanes` channels of one tile,
// P[i][j] at p + (i a + j) plane.
template <int M>
inline void output_tile(const float* p, int64_t plane, const float* bias, float* y,
                        int64_t row, int64_t pixel, int64_t lanes) {
  constexpr int A = M + 2;
  const Vec b = bias ? Vec::loadu(bias, lanes) : Vec(0.0f);
  two_sided(
      Matrices<M>::kAT, [&](int i, int j) { return Vec::loadu(p + (i * A + j) * plane, lanes); },
      [&](int r, int c, const Vec& x) { (x + b).store(y + r * row + c * pixel, lanes); });
}

void check_tile_side(int64_t m) {
  TORCH_CHECK(m == 2 || m == 4, "winograd: tile side m must be 2 or 4, got ", m);
}

// padded [N, m T_h + 2, m T_w + 2, C] -> v [a, a, N, T_h, T_w, C].
at::Tensor winograd_input_cpu(const at::Tensor& padded_in, int64_t m) {
  check_tile_side(m);
  TORCH_CHECK(padded_in.dim() == 4 && padded_in.scalar_type() == at::kFloat,
              "winograd_input: padded must be a float32 [N, H + 2, W + 2, C] tensor");
  const at::Tensor padded = padded_in.contiguous();
  const int64_t n = padded.size(0), c = padded.size(3), a = m + 2;
  TORCH_CHECK(padded.size(1) >= a && padded.size(2) >= a && (padded.size(1) - 2) % m == 0 &&
                  (padded.size(2) - 2) % m == 0,
              "winograd_input: padded sides must be m * tiles + 2, got ", padded.sizes());
  const int64_t th = (padded.size(1) - 2) / m, tw = (padded.size(2) - 2) / m;
  at::Tensor v = at::empty({a, a, n, th, tw, c}, padded.options());
  const int64_t plane = n * th * tw * c, row = padded.size(2) * c;
  const float* src = padded.const_data_ptr<float>();
  float* dst = v.data_ptr<float>();
  at::parallel_for(0, n * th, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nt = begin; nt < end; ++nt) {
      const int64_t image = nt / th, ty = nt % th;
      for (int64_t tx = 0; tx < tw; ++tx) {
        const float* d = src + (image * padded.size(1) + ty * m) * row + tx * m * c;
        float* out = dst + (nt * tw + tx) * c;
        for (int64_t ch = 0; ch < c; ch += Vec::size()) {
          const int64_t lanes = std::min<int64_t>(Vec::size(), c - ch);
          if (m == 2) input_tile<2>(d + ch, row, c, out + ch, plane, lanes);
          else input_tile<4>(d + ch, row, c, out + ch, plane, lanes);
        }
      }
    }
  });
  return v;
}

// prod [a, a, N, T_h, T_w, C] -> y [N, m T_h, m T_w, C] = A^T prod A (+ bias per channel).
at::Tensor winograd_output_cpu(const at::Tensor& prod_in,
                               const std::optional<at::Tensor>& bias_in, int64_t m) {
  check_tile_side(m);
  const int64_t a = m + 2;
  TORCH_CHECK(prod_in.dim() == 6 && prod_in.size(0) == a && prod_in.size(1) == a &&
                  prod_in.scalar_type() == at::kFloat,
              "winograd_output: prod must be a float32 [a, a, N, T_h, T_w, C] tensor with "
              "a = m + 2");
  const at::Tensor prod = prod_in.contiguous();
  const int64_t n = prod.size(2), th = prod.size(3), tw = prod.size(4), c = prod.size(5);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == c && bias.scalar_type() == at::kFloat,
                "winograd_output: bias must be float32 [C] with C = ", c);
  }
  at::Tensor y = at::empty({n, m * th, m * tw, c}, prod.options());
  const int64_t plane = n * th * tw * c, row = m * tw * c;
  const float* src = prod.const_data_ptr<float>();
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, n * th, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nt = begin; nt < end; ++nt) {
      for (int64_t tx = 0; tx < tw; ++tx) {
        const float* p = src + (nt * tw + tx) * c;
        float* out = dst + nt * m * row + tx * m * c;
        for (int64_t ch = 0; ch < c; ch += Vec::size()) {
          const int64_t lanes = std::min<int64_t>(Vec::size(), c - ch);
          const float* bc = b ? b + ch : nullptr;
          if (m == 2) output_tile<2>(p + ch, plane, bc, out + ch, row, c, lanes);
          else output_tile<4>(p + ch, plane, bc, out + ch, row, c, lanes);
        }
      }
    }
  });
  return y;
}

}  // namespace
}  // namespace ldm::cpu

TORCH_LIBRARY_IMPL(ldm, CPU, m) {
  m.impl("winograd_input", &ldm::cpu::winograd_input_cpu);
  m.impl("winograd_output", &ldm::cpu::winograd_output_cpu);
}
