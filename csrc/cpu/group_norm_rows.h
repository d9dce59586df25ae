// Inner loops of the CPU GroupNorm(+SiLU) kernels over one run of values.
//
// A run is either HW values of one channel (NCHW: parameters are uniform over the run) or
// one row of C channels (channels_last: parameters vary per channel). `Uniform` and
// `PerChannel` hide that difference so each loop is written once. Values are processed in
// fp32 vector lanes with a scalar tail; fp64 runs take the scalar loop only.
#pragma once

#include "csrc/cpu/vec_helpers.h"
#include "csrc/math.h"

#include <algorithm>
#include <numeric>
#include <type_traits>

namespace ldm::cpu {

// A parameter that is the same for every value of the run.
template <typename acc_t>
struct Uniform {
  static constexpr bool kUniform = true;
  acc_t value;
  Vec vec(int64_t) const { return Vec(static_cast<float>(value)); }
  acc_t at(int64_t) const { return value; }
};

// A parameter indexed by the position in the run (the channel of a channels_last row).
template <typename acc_t>
struct PerChannel {
  const acc_t* values;
  Vec vec(int64_t i) const {
    if constexpr (std::is_same_v<acc_t, float>) return Vec::loadu(values + i);
    else return Vec(0.0f);  // unreachable: fp64 has no vector path
  }
  acc_t at(int64_t i) const { return values[i]; }
};

// A parameter constant over blocks of 2^shift values: NCHW channels of HW values each, when HW
// is a power of two of at least one vector, so that one run spans several short channels
// (every vector stays inside one block). The run starts `offset` values into block 0.
// kWholeSteps: every 4-vector step of apply_run lies inside one block (HW >= 64, aligned
// start), so the loop loads the parameter once per step instead of once per vector.
template <typename acc_t, bool kWholeSteps = false>
struct PerBlock {
  static constexpr bool kSameOverStep = kWholeSteps;
  const acc_t* values;
  int64_t offset;
  int shift;
  Vec vec(int64_t i) const { return Vec(static_cast<float>(at(i))); }
  acc_t at(int64_t i) const { return values[(offset + i) >> shift]; }
};

// Whether parameter type P declares itself constant over a 4-vector step.
template <typename P>
constexpr bool same_over_step() {
  if constexpr (requires { P::kSameOverStep; }) return P::kSameOverStep;
  return false;
}

// Whether P has one value for all of a 4-vector step: Uniform, or a PerBlock that says so
// (apply_run's bf16 even/odd path). fp32 keeps Uniform's per-vector form, which is as fast.
template <typename P>
constexpr bool one_value_per_step() {
  if constexpr (requires { P::kUniform; }) return true;
  return same_over_step<P>();
}

// Sum of one run into a single accumulator (NCHW: one channel).
template <typename acc_t>
struct UniformSum {
  Vec lanes{0.0f};
  acc_t tail = 0;
  void add(int64_t, const Vec& v) { lanes = lanes + v; }
  void add(int64_t, acc_t v) { tail += v; }
  acc_t total() const { return static_cast<acc_t>(reduce_lanes(lanes)) + tail; }
};

// Per-position sums (channels_last: one accumulator per channel, added row by row).
template <typename acc_t>
struct PerChannelSum {
  acc_t* sums;
  void add(int64_t i, const Vec& v) {
    if constexpr (std::is_same_v<acc_t, float>) (Vec::loadu(sums + i) + v).store(sums + i);
  }
  void add(int64_t i, acc_t v) { sums[i] += v; }
};

// Moments of n contiguous values, exactly by two passes (the scalar path: fp64, and tails).
template <typename T, typename acc_t = acc_type<T>>
Moments<acc_t> two_pass_moments(const T* x, int64_t n) {
  if (n == 0) return Moments<acc_t>{0, 0, 0};
  acc_t sum = 0, m2 = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(x[i]);
  const acc_t mean = sum / static_cast<acc_t>(n);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - mean;
    m2 += d * d;
  }
  return Moments<acc_t>{static_cast<acc_t>(n), mean, m2};
}

// Chan merge of two moments with the same count (exact halves, no division).
inline void merge_equal_counts(Vec& mean, Vec& m2, const Vec& mean_b, const Vec& m2_b,
                               float count) {
  const Vec d = mean_b - mean;
  m2 = m2 + m2_b + d * d * Vec(0.5f * count);
  mean = (mean + mean_b) * Vec(0.5f);
}

// Moments of steps * kWelfordSets * kLanes contiguous values in one memory pass: Welford's
// update on every fp32 lane of kWelfordSets independent vectors (so consecutive updates
// overlap instead of waiting on each other), then the lanes are Chan-merged as a fixed tree.
// The updates run on x - pivot (the first value): with a large common offset the running
// means would otherwise sit where fp32's spacing is coarse (about 1e-3 at 1e4) and round at
// every update, an error that grows with the number of updates per lane.
constexpr int kWelfordSets = 4;
template <typename T>
Moments<float> welford_lanes(const T* x, int64_t steps) {
  const float pivot = static_cast<float>(x[0]);
  const Vec shift(pivot);
  Vec mean[kWelfordSets], m2[kWelfordSets];
  for (int k = 0; k < kWelfordSets; ++k) mean[k] = m2[k] = Vec(0.0f);
  for (int64_t s = 0; s < steps; ++s) {
    const Vec inv_count(1.0f / static_cast<float>(s + 1));
    const T* p = x + s * kWelfordSets * kLanes;
    // bf16 on AVX-512: 32 values per load (load_bf16_even_odd). Other types load inside the
    // update loop: loading all four vectors first makes GCC generate a slower fp32 loop.
#if defined(CPU_CAPABILITY_AVX512)
    constexpr bool kPairs = std::is_same_v<T, c10::BFloat16>;
#else
    constexpr bool kPairs = false;
#endif
    Vec pairs[kWelfordSets];
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kPairs) {
      static_assert(kWelfordSets == 4, "two 32-value loads per step");
      load_bf16_even_odd(p, pairs[0], pairs[1]);
      load_bf16_even_odd(p + 2 * kLanes, pairs[2], pairs[3]);
    }
#endif
    for (int k = 0; k < kWelfordSets; ++k) {
      const Vec v = (kPairs ? pairs[k] : load_lanes(p + k * kLanes)) - shift;
      const Vec delta = v - mean[k];
      mean[k] = at::vec::fmadd(delta, inv_count, mean[k]);
      m2[k] = at::vec::fmadd(delta, v - mean[k], m2[k]);
    }
  }
  float count = static_cast<float>(steps);
  for (int width = kWelfordSets / 2; width >= 1; width /= 2, count *= 2) {
    for (int k = 0; k < width; ++k) merge_equal_counts(mean[k], m2[k], mean[k + width], m2[k + width], count);
  }
  float lane_mean[kLanes], lane_m2[kLanes];
  mean[0].store(lane_mean);
  m2[0].store(lane_m2);
  for (int64_t width = kLanes / 2; width >= 1; width /= 2, count *= 2) {
    for (int64_t k = 0; k < width; ++k) {
      const float d = lane_mean[k + width] - lane_mean[k];
      lane_m2[k] += lane_m2[k + width] + d * d * (0.5f * count);
      lane_mean[k] = 0.5f * (lane_mean[k] + lane_mean[k + width]);
    }
  }
  return Moments<float>{count, lane_mean[0] + pivot, lane_m2[0]};
}

// Moments of n contiguous values: one-pass Welford lanes over the vector part, an exact
// two-pass tail, Chan-merged (no E[x^2] - E[x]^2 cancellation anywhere).
template <typename T, typename acc_t = acc_type<T>>
Moments<acc_t> contiguous_moments(const T* x, int64_t n) {
  if constexpr (kHasVecPath<T>) {
    const int64_t steps = n / (kWelfordSets * kLanes);
    const int64_t head = steps * kWelfordSets * kLanes;
    const Moments<acc_t> lanes = steps > 0 ? welford_lanes(x, steps) : Moments<acc_t>{0, 0, 0};
    return chan_merge(lanes, two_pass_moments(x + head, n - head));
  } else {
    return two_pass_moments(x, n);
  }
}

// Per-channel Welford moments of kWidth channel vectors down `rows` rows of a channels_last
// block (row stride `stride` values): every channel on its own vector lane, all lanes with the
// same count (so 1 / count is one scalar per row), the kWidth vectors in registers across the
// rows (a read-modify-write of per-channel arrays per row would be store-bound). Writes
// mean[k] and m2[k] (sum of squared deviations) for k < kWidth * kLanes.
template <int kWidth, typename T>
void block_channel_moments(const T* x, int64_t rows, int64_t stride, float* mean, float* m2) {
  Vec mu[kWidth], sq[kWidth];
  for (int k = 0; k < kWidth; ++k) mu[k] = sq[k] = Vec(0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * stride;
    const Vec inv_count(1.0f / static_cast<float>(r + 1));
    for (int k = 0; k < kWidth; ++k) {
      const Vec v = load_lanes(row + k * kLanes);
      const Vec delta = v - mu[k];
      mu[k] = at::vec::fmadd(delta, inv_count, mu[k]);
      sq[k] = at::vec::fmadd(delta, v - mu[k], sq[k]);
    }
  }
  for (int k = 0; k < kWidth; ++k) {
    mu[k].store(mean + k * kLanes);
    sq[k].store(m2 + k * kLanes);
  }
}

// Per-channel moments over the rows of a channels_last tile in one memory pass, blocks of up to
// 8 channel vectors at a time (block_channel_moments). Writes mean[c] and m2[c] of each channel
// over `rows` values.
template <typename T, typename acc_t = acc_type<T>>
void tile_channel_moments(const T* x, int64_t rows, int64_t C, acc_t* mean, acc_t* m2) {
  int64_t c0 = 0;
  if constexpr (kHasVecPath<T>) {
    constexpr int kBlock = 8;
    for (; c0 + kBlock * kLanes <= C; c0 += kBlock * kLanes) {
      block_channel_moments<kBlock>(x + c0, rows, C, mean + c0, m2 + c0);
    }
    // The remainder in blocks of 4, 2, 1 vectors: a lone vector per row is one dependent
    // chain (at C = 320 the last 64 channels would take as long as the first 256).
    if (c0 + 4 * kLanes <= C) block_channel_moments<4>(x + c0, rows, C, mean + c0, m2 + c0), c0 += 4 * kLanes;
    if (c0 + 2 * kLanes <= C) block_channel_moments<2>(x + c0, rows, C, mean + c0, m2 + c0), c0 += 2 * kLanes;
    if (c0 + kLanes <= C) block_channel_moments<1>(x + c0, rows, C, mean + c0, m2 + c0), c0 += kLanes;
  }
  for (int64_t c = c0; c < C; ++c) {
    Moments<acc_t> m{0, 0, 0};
    for (int64_t r = 0; r < rows; ++r) m = welford_add(m, static_cast<acc_t>(x[r * C + c]));
    mean[c] = m.mean;
    m2[c] = m.m2;
  }
}

// Sums of D values (and of their squared deviations from `center`) in a fixed order: vector
// lanes, the reduce_lanes tree, then the scalar tail.
inline float lane_sum(const float* v, int64_t D) {
  Vec lanes(0.0f);
  int64_t c = 0;
  for (; c + kLanes <= D; c += kLanes) lanes = lanes + Vec::loadu(v + c);
  float sum = reduce_lanes(lanes);
  for (; c < D; ++c) sum += v[c];
  return sum;
}

inline float lane_sum_squared_deviations(const float* v, float center, int64_t D) {
  Vec lanes(0.0f);
  int64_t c = 0;
  for (; c + kLanes <= D; c += kLanes) {
    const Vec d = Vec::loadu(v + c) - Vec(center);
    lanes = at::vec::fmadd(d, d, lanes);
  }
  float sum = reduce_lanes(lanes);
  for (; c < D; ++c) sum += (v[c] - center) * (v[c] - center);
  return sum;
}

// Moments of the values of channels [c, c + D), each with `count` values and moments
// (mean[c], m2[c]): Chan's merge of equal-count parts, M2 = sum M2_c + count sum (mean_c - mean)^2.
// Runs per (tile, group) of the channels_last forward; vector lanes from D = kLanes up (below
// that, the lane reductions cost more than they save).
template <typename acc_t>
Moments<acc_t> merge_channel_moments(const acc_t* mean, const acc_t* m2, int64_t D, acc_t count) {
  const acc_t n = count * static_cast<acc_t>(D);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (D >= kLanes) {
      const float group_mean = lane_sum(mean, D) / static_cast<float>(D);
      return Moments<acc_t>{n, group_mean, lane_sum(m2, D) +
                                               count * lane_sum_squared_deviations(mean, group_mean, D)};
    }
  }
  acc_t sum = 0;
  for (int64_t c = 0; c < D; ++c) sum += mean[c];
  const acc_t group_mean = sum / static_cast<acc_t>(D);
  acc_t within = 0, between = 0;
  for (int64_t c = 0; c < D; ++c) {
    const acc_t d = mean[c] - group_mean;
    within += m2[c];
    between += d * d;
  }
  return Moments<acc_t>{n, group_mean, within + count * between};
}

// y = [silu](x * scale + shift) over n values. With kSilu, scale and shift arrive multiplied
// by kNegLog2e (channel_affine does it), so the affine yields the exp's argument directly
// (silu_lanes_from_exponent). With `stream` (fp32 only; y vector-aligned) the unrolled part
// is written with non-temporal stores, and the caller fences (streamed_stores_done).
template <bool kSilu, typename T, typename P, typename acc_t = acc_type<T>>
void apply_run(const T* x, T* y, int64_t n, const P& scale, const P& shift,
               bool stream = false) {
  int64_t i = 0;
  if constexpr (kHasVecPath<T>) {
    // Four vectors per iteration: the SiLU is one long dependency chain per vector, and
    // adjacent independent chains keep the FP pipes busy without a deep scheduler window.
    constexpr int kUnroll = 4;
    for (; i + kUnroll * kLanes <= n; i += kUnroll * kLanes) {
      Vec z[kUnroll];
#if defined(CPU_CAPABILITY_AVX512)  // load_bf16_even_odd's 512-bit shifts and permute
      if constexpr (std::is_same_v<T, c10::BFloat16> && one_value_per_step<P>()) {
        // bf16 with one scale and shift for the whole step: even and odd values in separate
        // vectors (load_bf16_even_odd), one vector op fewer per 16 values.
        static_assert(kUnroll == 4, "two 32-value loads per step");
        const Vec s = scale.vec(i), b = shift.vec(i);
        load_bf16_even_odd(x + i, z[0], z[1]);
        load_bf16_even_odd(x + i + 2 * kLanes, z[2], z[3]);
        for (int k = 0; k < kUnroll; ++k) z[k] = at::vec::fmadd(z[k], s, b);
        if constexpr (kSilu) silu_lanes_from_exponent<kUnroll>(z);
        store_bf16_even_odd(y + i, z[0], z[1]);
        store_bf16_even_odd(y + i + 2 * kLanes, z[2], z[3]);
        continue;
      }
#endif
      if constexpr (same_over_step<P>()) {
        const Vec s = scale.vec(i), b = shift.vec(i);
        for (int k = 0; k < kUnroll; ++k) {
          z[k] = at::vec::fmadd(load_lanes(x + i + k * kLanes), s, b);
        }
      } else {
        for (int k = 0; k < kUnroll; ++k) {
          const int64_t j = i + k * kLanes;
          z[k] = at::vec::fmadd(load_lanes(x + j), scale.vec(j), shift.vec(j));
        }
      }
      if constexpr (kSilu) silu_lanes_from_exponent<kUnroll>(z);
      if constexpr (std::is_same_v<T, float>) {
        if (stream) {
          for (int k = 0; k < kUnroll; ++k) stream_lanes(y + i + k * kLanes, z[k]);
          continue;
        }
      }
      for (int k = 0; k < kUnroll; ++k) store_lanes(y + i + k * kLanes, z[k]);
    }
    for (; i + kLanes <= n; i += kLanes) {
      Vec z[1] = {at::vec::fmadd(load_lanes(x + i), scale.vec(i), shift.vec(i))};
      if constexpr (kSilu) silu_lanes_from_exponent<1>(z);
      store_lanes(y + i, z[0]);
    }
  }
  for (; i < n; ++i) {
    acc_t z = static_cast<acc_t>(x[i]) * scale.at(i) + shift.at(i);
    if constexpr (kSilu) z = silu_from_exponent(z);
    y[i] = static_cast<T>(z);
  }
}

// Channels per channels_last band: whole groups and whole vectors (a multiple of
// lcm(D, kLanes) from 4 to 8 vectors), or 0 when the channels do not split into such bands or
// one band's values over all rows would exceed max_bytes.
template <typename T>
int64_t band_channels(int64_t C, int64_t D, int64_t HW, int64_t max_bytes) {
  if constexpr (!kHasVecPath<T>) return 0;
  const int64_t step = std::lcm(D, kLanes);
  int64_t B = step;
  while (B < 4 * kLanes) B += step;
  if (B > 8 * kLanes || C % B != 0 || B * HW * static_cast<int64_t>(sizeof(T)) > max_bytes) {
    return 0;
  }
  return B;
}

// Calls f with std::integral_constant<int, W> for W = vectors in {4, ..., 8}.
template <typename F>
void with_band_width(int64_t vectors, F&& f) {
  switch (vectors) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// y = [silu](x * scale + shift) down `rows` rows of kWidth channel vectors of a channels_last
// band (row stride `stride` values); the band's scale and shift (kNegLog2e-scaled, as apply_run
// takes them) stay in registers for all rows and the kWidth SiLUs of a row interleave (an
// apply_run call per row would reload them and pay its set-up and tail on every row).
template <bool kSilu, int kWidth, typename T>
void apply_band(const T* x, T* y, int64_t rows, int64_t stride, const float* scale,
                const float* shift) {
  Vec s[kWidth], b[kWidth];
  for (int k = 0; k < kWidth; ++k) {
    s[k] = Vec::loadu(scale + k * kLanes);
    b[k] = Vec::loadu(shift + k * kLanes);
  }
  for (int64_t r = 0; r < rows; ++r) {
    Vec z[kWidth];
    for (int k = 0; k < kWidth; ++k) {
      z[k] = at::vec::fmadd(load_lanes(x + r * stride + k * kLanes), s[k], b[k]);
    }
    if constexpr (kSilu) silu_lanes_from_exponent<kWidth>(z);
    for (int k = 0; k < kWidth; ++k) store_lanes(y + r * stride + k * kLanes, z[k]);
  }
}

// dz = dy * silu'(z) (or dy), with z = (x - center) * scale + shift; returns it with xc.
template <bool kSilu>
inline Vec upstream_grad(const Vec& dy, const Vec& xc, const Vec& scale, const Vec& shift) {
  if constexpr (!kSilu) return dy;
  const Vec z = at::vec::fmadd(xc, scale, shift);
  return dy * silu_grad_from_sigmoid(z, sigmoid(z), Vec(1.0f));
}

template <bool kSilu, typename acc_t>
inline acc_t upstream_grad(acc_t dy, acc_t xc, acc_t scale, acc_t shift) {
  if constexpr (!kSilu) return dy;
  const acc_t z = xc * scale + shift;
  return dy * silu_grad_from_sigmoid(z, sigmoid(z), acc_t(1));
}

// xc = x - center and the upstream gradient dz for K consecutive vectors from index i.
template <bool kSilu, int K, typename T, typename P>
inline void upstream_grads(const T* dy, const T* x, int64_t i, const P& center, const P& scale,
                           const P& shift, Vec (&xc)[K], Vec (&dz)[K]) {
  for (int k = 0; k < K; ++k) {
    const int64_t j = i + k * kLanes;
    xc[k] = load_lanes(x + j) - center.vec(j);
    dz[k] = upstream_grad<kSilu>(load_lanes(dy + j), xc[k], scale.vec(j), shift.vec(j));
  }
}

// Backward pass 1 over a run: dsx += dz * (x - center), db += dz; dz is also stored to
// dz_out when given (so pass 2 need not recompute the SiLU derivative).
template <bool kSilu, typename T, typename P, typename S, typename acc_t = acc_type<T>>
void backward_sums_run(const T* dy, const T* x, int64_t n, const P& center, const P& scale,
                       const P& shift, S& dsx_out, S& db_out, acc_t* dz_out = nullptr) {
  // Local copies: through the references, the accumulators would be stored and reloaded
  // around every dz_out store (both are floats, so they may alias), putting a store-to-load
  // round trip on each add's dependency chain.
  S dsx = dsx_out, db = db_out;
  int64_t i = 0;
  if constexpr (kHasVecPath<T>) {
    // Four independent vectors per iteration, as in apply_run (the SiLU derivative is a long
    // dependency chain per vector).
    constexpr int kUnroll = 4;
    for (; i + kUnroll * kLanes <= n; i += kUnroll * kLanes) {
      Vec xc[kUnroll], dz[kUnroll];
      upstream_grads<kSilu>(dy, x, i, center, scale, shift, xc, dz);
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t j = i + k * kLanes;
        if (dz_out) dz[k].store(dz_out + j);
        dsx.add(j, dz[k] * xc[k]);
        db.add(j, dz[k]);
      }
    }
    for (; i + kLanes <= n; i += kLanes) {
      const Vec xc = load_lanes(x + i) - center.vec(i);
      const Vec dz = upstream_grad<kSilu>(load_lanes(dy + i), xc, scale.vec(i), shift.vec(i));
      if (dz_out) dz.store(dz_out + i);
      dsx.add(i, dz * xc);
      db.add(i, dz);
    }
  }
  for (; i < n; ++i) {
    const acc_t xc = static_cast<acc_t>(x[i]) - center.at(i);
    const acc_t dz = upstream_grad<kSilu>(static_cast<acc_t>(dy[i]), xc, scale.at(i), shift.at(i));
    if (dz_out) dz_out[i] = dz;
    dsx.add(i, dz * xc);
    db.add(i, dz);
  }
  dsx_out = dsx;
  db_out = db;
}

// Backward pass 1 down `rows` rows of a channels_last band of kWidth channel vectors (row
// stride `stride`): per-channel sums dsx = sum dz (x - center) and db = sum dz, held in
// registers over the rows; dz is stored to dz_out (row stride dz_stride) for pass 2.
template <bool kSilu, int kWidth, typename T>
void band_backward_sums(const T* dy, const T* x, int64_t rows, int64_t stride,
                        const float* center, const float* scale, const float* shift,
                        float* dz_out, int64_t dz_stride, float* dsx, float* db) {
  Vec sx[kWidth], sb[kWidth];
  for (int k = 0; k < kWidth; ++k) sx[k] = sb[k] = Vec(0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < kWidth; ++k) {
      const int64_t j = r * stride + k * kLanes;
      const Vec xc = load_lanes(x + j) - Vec::loadu(center + k * kLanes);
      const Vec dz = upstream_grad<kSilu>(load_lanes(dy + j), xc, Vec::loadu(scale + k * kLanes),
                                          Vec::loadu(shift + k * kLanes));
      dz.store(dz_out + r * dz_stride + k * kLanes);
      sx[k] = sx[k] + dz * xc;
      sb[k] = sb[k] + dz;
    }
  }
  for (int k = 0; k < kWidth; ++k) sx[k].store(dsx + k * kLanes), sb[k].store(db + k * kLanes);
}

// Backward pass 2 down the rows of a band from the dz that band_backward_sums stored (dz may be
// dx itself: every value is read before it is overwritten): dx = k1 dz + k2 (x - center) + k3.
// One loop over the band's rows, not a backward_apply_stored_run call per row, for the same
// reason as apply_band.
template <int kWidth, typename T>
void band_backward_apply(const float* dz, int64_t dz_stride, const T* x, T* dx, int64_t rows,
                         int64_t stride, const float* center, const float* k1, const float* k2,
                         const float* k3) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < kWidth; ++k) {
      const int64_t j = r * stride + k * kLanes;
      const Vec xc = load_lanes(x + j) - Vec::loadu(center + k * kLanes);
      const Vec dz_k = Vec::loadu(dz + r * dz_stride + k * kLanes);
      store_lanes(dx + j, at::vec::fmadd(Vec::loadu(k1 + k * kLanes), dz_k,
                                         at::vec::fmadd(Vec::loadu(k2 + k * kLanes), xc,
                                                        Vec::loadu(k3 + k * kLanes))));
    }
  }
}

// Backward pass 2 from stored dz: dx = k1 * dz + k2 * (x - center) + k3. dz may be dx itself
// (every value is read before it is overwritten).
template <typename T, typename P, typename acc_t = acc_type<T>>
void backward_apply_stored_run(const acc_t* dz, const T* x, T* dx, int64_t n, const P& center,
                               const P& k1, const P& k2, const P& k3) {
  int64_t i = 0;
  if constexpr (kHasVecPath<T>) {
    for (; i + kLanes <= n; i += kLanes) {
      const Vec xc = load_lanes(x + i) - center.vec(i);
      store_lanes(dx + i, at::vec::fmadd(k1.vec(i), Vec::loadu(dz + i),
                                         at::vec::fmadd(k2.vec(i), xc, k3.vec(i))));
    }
  }
  for (; i < n; ++i) {
    const acc_t xc = static_cast<acc_t>(x[i]) - center.at(i);
    dx[i] = static_cast<T>(k1.at(i) * dz[i] + k2.at(i) * xc + k3.at(i));
  }
}

// Backward pass 2 over a run: dx = k1 * dz + k2 * (x - center) + k3.
template <bool kSilu, typename T, typename P, typename acc_t = acc_type<T>>
void backward_apply_run(const T* dy, const T* x, T* dx, int64_t n, const P& center,
                        const P& scale, const P& shift, const P& k1, const P& k2, const P& k3) {
  int64_t i = 0;
  if constexpr (kHasVecPath<T>) {
    constexpr int kUnroll = 4;  // independent chains, as in backward_sums_run
    for (; i + kUnroll * kLanes <= n; i += kUnroll * kLanes) {
      Vec xc[kUnroll], dz[kUnroll];
      upstream_grads<kSilu>(dy, x, i, center, scale, shift, xc, dz);
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t j = i + k * kLanes;
        store_lanes(dx + j, at::vec::fmadd(k1.vec(j), dz[k], at::vec::fmadd(k2.vec(j), xc[k], k3.vec(j))));
      }
    }
    for (; i + kLanes <= n; i += kLanes) {
      const Vec xc = load_lanes(x + i) - center.vec(i);
      const Vec dz = upstream_grad<kSilu>(load_lanes(dy + i), xc, scale.vec(i), shift.vec(i));
      store_lanes(dx + i, at::vec::fmadd(k1.vec(i), dz, at::vec::fmadd(k2.vec(i), xc, k3.vec(i))));
    }
  }
  for (; i < n; ++i) {
    const acc_t xc = static_cast<acc_t>(x[i]) - center.at(i);
    const acc_t dz = upstream_grad<kSilu>(static_cast<acc_t>(dy[i]), xc, scale.at(i), shift.at(i));
    dx[i] = static_cast<T>(k1.at(i) * dz + k2.at(i) * xc + k3.at(i));
  }
}

}  // namespace ldm::cpu
